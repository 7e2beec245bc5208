// SPDX-License-Identifier: Apache-2.0
//! Target `agent_protocol`: the channel protocol the in-guest agent speaks
//! (crates/protocol/src/wire.rs) and the Noise hello of its TCP transport
//! (crates/protocol/src/noise.rs), from both ends. The first input byte
//! picks what the rest is:
//!
//! - 0: a request and a response header, decoded; one that decodes must
//!   encode back to the same 12 bytes;
//! - 1: a server's answer to the agent's [`fetch`] of a length the input
//!   gives; the agent must take no more than it asked for, and keep nothing
//!   of an answer it refused;
//! - 2: what a TCP peer sends the daemon's [`accept_handshake`]: hello,
//!   handshake message 1, then (should it prove the key, as the seed does)
//!   encrypted frames, read until they fail;
//! - 3: what a host answers the agent's [`connect_handshake`];
//! - 4: a client of the daemon's channel session (src/frontend/channel.rs)
//!   through [`Clients::serve`], as on a hybrid-vsock socket; every complete
//!   request must get one answer of its kind: data of at most the length
//!   asked for, or an error and the end;
//! - 5: a pre-shared key file's text, [`Psk::from_hex`].
//!
//! [`Clients::serve`]: vhost_rng::frontend::stream::Clients::serve

use std::io::Read;

use vhost_rng::frontend::channel::PROTOCOL;
use vhost_rng_protocol::noise::{Psk, accept_handshake, connect_handshake, is_valid_identity};
use vhost_rng_protocol::wire::{
    self, REQUEST_LEN, RESPONSE_HEADER_LEN, Request, ResponseHeader, Status, decode_request,
    decode_response_header, encode_request, encode_response_header, fetch,
};

use crate::daemon;
use crate::stream::Client;

/// The pre-shared key every guest name but those starting with `x` has.
const PSK_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/// The name the agent's side of the handshake gives.
const IDENTITY: &str = "fuzz-guest";

const MODES: u8 = 6;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % MODES {
        0 => headers(rest),
        1 => agent_fetch(rest),
        2 => daemon_handshake(rest),
        3 => agent_handshake(rest),
        4 => channel_session(rest),
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = Psk::from_hex(text);
            }
        }
    }
}

fn psk() -> Psk {
    Psk::from_hex(PSK_HEX).expect("a valid key")
}

fn headers(data: &[u8]) {
    let mut bytes = [0u8; REQUEST_LEN];
    let n = data.len().min(REQUEST_LEN);
    bytes[..n].copy_from_slice(&data[..n]);
    if let Ok(request) = decode_request(&bytes) {
        assert_eq!(encode_request(&request), bytes);
    }
    if let Ok(header) = decode_response_header(&bytes) {
        assert_eq!(encode_response_header(&header), bytes);
    }
}

fn agent_fetch(data: &[u8]) {
    let (length, answer) = data.split_at(data.len().min(4));
    let mut field = [0u8; 4];
    field[..length.len()].copy_from_slice(length);
    let length = u32::from_le_bytes(field) % (wire::MAX_REQUEST + 2);
    let mut server = Client::scripted(answer);
    let mut out = vec![7u8; 3];
    match fetch(&mut server, length, &mut out) {
        Ok(n) => {
            assert!(n > 0 && n as u64 <= u64::from(length));
            assert_eq!(out.len(), 3 + n);
        }
        Err(_) => assert_eq!(out, [7, 7, 7]),
    }
}

fn daemon_handshake(data: &[u8]) {
    let mut peer = Client::scripted(data);
    let lookup = |name: &str| (!name.starts_with('x')).then(psk);
    if let Ok(mut secure) = accept_handshake(&mut peer, lookup) {
        assert!(is_valid_identity(secure.identity()));
        let mut buf = [0u8; 256];
        while matches!(secure.read(&mut buf), Ok(n) if n > 0) {}
    }
}

fn agent_handshake(data: &[u8]) {
    let mut host = Client::scripted(data);
    let _ = connect_handshake(&mut host, IDENTITY, &psk());
}

fn channel_session(data: &[u8]) {
    let mut client = Client::scripted(data);
    daemon::clients().serve(&PROTOCOL, "in a fuzz target", &mut client);
    check_answers(
        data.get(1..).unwrap_or_default(),
        &client.output,
        client.full,
    );
}

/// Each complete request in `sent` against its answer in `answered`; with
/// `full`, the client stopped taking answers, so the last may be short.
fn check_answers(sent: &[u8], mut answered: &[u8], full: bool) {
    for chunk in sent.chunks_exact(REQUEST_LEN) {
        let mut request = [0u8; REQUEST_LEN];
        request.copy_from_slice(chunk);
        if full && answered.len() < RESPONSE_HEADER_LEN {
            return;
        }
        assert!(
            answered.len() >= RESPONSE_HEADER_LEN,
            "a request unanswered"
        );
        let (head, rest) = answered.split_at(RESPONSE_HEADER_LEN);
        answered = rest;
        let mut header = [0u8; RESPONSE_HEADER_LEN];
        header.copy_from_slice(head);
        let header = decode_response_header(&header).expect("the daemon's header decodes");
        match decode_request(&request) {
            Ok(Request { length }) if header.status == Status::Ok => {
                assert!(
                    header.length <= length,
                    "{} bytes for {length}",
                    header.length
                );
                let body = header.length as usize;
                if full && answered.len() < body {
                    return;
                }
                assert!(answered.len() >= body, "a short answer");
                answered = &answered[body..];
            }
            Ok(_) => {
                assert!(matches!(
                    header.status,
                    Status::RateLimited | Status::Unavailable
                ));
                break;
            }
            Err(_) => {
                assert_eq!(header, ResponseHeader::error(Status::BadRequest));
                break;
            }
        }
    }
    assert!(answered.is_empty(), "an answer to no request");
}

/// What the agent sends to open a TCP connection: its hello and handshake
/// message 1, as `connect_handshake` writes them.
fn client_hello() -> Vec<u8> {
    let mut host = Client::new(&[], 1);
    let _ = connect_handshake(&mut host, IDENTITY, &psk());
    host.output
}

/// Seed inputs: a request and answers, a real hello, a channel exchange.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let request = encode_request(&Request { length: 32 });
    let ok16 = encode_response_header(&ResponseHeader::ok(16));
    let mut headers = vec![0];
    headers.extend_from_slice(&request);
    let mut answer = vec![1, 32, 0, 0, 0, 0];
    answer.extend_from_slice(&ok16);
    answer.extend_from_slice(&[0x5a; 16]);
    let mut refused = vec![1, 32, 0, 0, 0, 5];
    refused.extend_from_slice(&encode_response_header(&ResponseHeader::error(
        Status::Refused,
    )));
    let mut hello = vec![2, 0];
    hello.extend_from_slice(&client_hello());
    // Then a frame that cannot authenticate.
    hello.extend_from_slice(&[0, 20]);
    hello.extend_from_slice(&[0xee; 20]);
    let mut unknown = vec![2, 0];
    unknown.extend_from_slice(b"VRNS\x01\x05xeno1");
    let mut reply = vec![3, 0, 0, 48];
    reply.extend_from_slice(&[0x11; 48]);
    let mut channel = vec![4, 5];
    channel.extend_from_slice(&request);
    channel.extend_from_slice(&encode_request(&Request { length: 65536 }));
    channel.extend_from_slice(b"VRNG\x01\x02\0\0\0\0\0\x01");
    let mut key = vec![5];
    key.extend_from_slice(PSK_HEX.as_bytes());
    key.push(b'\n');
    vec![
        ("headers", headers),
        ("agent-fetch", answer),
        ("agent-fetch-refused", refused),
        ("daemon-hello", hello),
        ("daemon-hello-unknown-guest", unknown),
        ("agent-hello-reply", reply),
        ("channel-requests", channel),
        ("psk-file", key),
    ]
}
