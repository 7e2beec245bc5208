// SPDX-License-Identifier: Apache-2.0
//! Target `entropy_link`: a compromised guest process of `--isolation
//! guest` on its entropy link (src/frontend/vhost_user/remote_supply.rs),
//! answered by the serving process's own [`LinkServer`] over a real
//! `SOCK_SEQPACKET` pair. The input is a sequence of messages, each a
//! length byte and that many bytes, sent as they are.
//!
//! Checked besides "no panic": every message that is a well-formed ask for
//! bytes gets exactly one answer, with its id, no more bytes than it asked
//! for and a known tag; nothing else is answered (a spurious answer would
//! arrive in place of the next expected one); the guest is charged exactly
//! the bytes handed out; and the server still answers a last, honest ask.
//!
//! [`LinkServer`]: vhost_rng::frontend::vhost_user::remote_supply::LinkServer

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, recv, send, setsockopt, socketpair, sockopt,
};
use nix::sys::time::TimeVal;
use vhost_rng::frontend::vhost_user::remote_supply::{ANSWER_HEADER, ASK_LEN, Ask, LinkServer};
use vhost_rng::frontend::vhost_user::request::MAX_REQUEST_BYTES;

use crate::daemon;

/// The guest process's end of the one link of this process, and its server.
fn link() -> &'static (OwnedFd, Arc<LinkServer>) {
    static LINK: OnceLock<(OwnedFd, Arc<LinkServer>)> = OnceLock::new();
    LINK.get_or_init(|| {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("a socket pair");
        // A server that stops answering fails the input instead of hanging.
        setsockopt(&theirs, sockopt::ReceiveTimeout, &TimeVal::new(10, 0))
            .expect("a receive timeout");
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .expect("an eventfd");
        // SAFETY: the EventFd's descriptor is ours; the OwnedFd takes it over.
        let wake = unsafe {
            std::os::fd::FromRawFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(wake))
        };
        let server = LinkServer::spawn(daemon::guest(), ours, wake).expect("the link thread");
        (theirs, server)
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (socket, _server) = link();
    let stats = &daemon::guest().stats;
    let before = stats.bytes.load(Ordering::Relaxed);
    let mut handed = 0u64;
    let mut answer = vec![0u8; ANSWER_HEADER + MAX_REQUEST_BYTES + 1];
    let mut rest = data;
    let mut asks = 0u32;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        handed += exchange(socket, message, &mut answer);
        asks += 1;
    }
    // The link still serves an honest ask.
    let last = Ask {
        id: 0xfeed_0000 ^ asks,
        want: 64,
        pid: 1,
        ..Ask::default()
    };
    handed += exchange(socket, &last.encode(), &mut answer);
    assert_eq!(
        stats.bytes.load(Ordering::Relaxed) - before,
        handed,
        "the guest was charged other than what was handed out"
    );
}

/// Sends `message` and, if it is an ask for bytes, takes and checks its
/// answer; the bytes handed out.
fn exchange(socket: &OwnedFd, message: &[u8], answer: &mut [u8]) -> u64 {
    // libFuzzer's own timers interrupt system calls: EINTR is retried.
    while let Err(e) = send(socket.as_raw_fd(), message, MsgFlags::MSG_NOSIGNAL) {
        assert_eq!(e, Errno::EINTR, "the link takes a message");
    }
    let asked = match Ask::decode(message) {
        Ok(ask) if ask.want > 0 => ask,
        // Unanswered; a spurious answer would meet the next ask's check.
        _ => return 0,
    };
    let got = loop {
        match recv(socket.as_raw_fd(), answer, MsgFlags::empty()) {
            Ok(got) => break got,
            Err(Errno::EINTR) => {}
            Err(e) => panic!("an answer to a well-formed ask: {e}"),
        }
    };
    assert!(got >= ANSWER_HEADER, "an answer of {got} bytes");
    assert_eq!(
        answer[4..8],
        asked.id.to_le_bytes(),
        "an answer for another ask"
    );
    match answer[0] {
        1 => {
            let n = got - ANSWER_HEADER;
            assert!(
                n >= 1 && n <= asked.want as usize,
                "{n} bytes for {}",
                asked.want
            );
            n as u64
        }
        2 | 3 => {
            assert_eq!(got, ANSWER_HEADER);
            0
        }
        tag => panic!("answer tag {tag}"),
    }
}

/// A few asks, good and bad.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let framed = |messages: &[Vec<u8>]| {
        let mut bytes = Vec::new();
        for message in messages {
            bytes.push(message.len() as u8);
            bytes.extend_from_slice(message);
        }
        bytes
    };
    let ask = |id: u32, want: u32| {
        Ask {
            id,
            want,
            pid: 7,
            connected: true,
            connections: 1,
            defective: 0,
        }
        .encode()
        .to_vec()
    };
    let mut too_big = ask(3, 64);
    too_big[8..12].copy_from_slice(&(1u32 << 24).to_le_bytes());
    let mut bad_padding = ask(4, 64);
    bad_padding[ASK_LEN - 1] = 1;
    vec![
        ("asks", framed(&[ask(1, 64), ask(2, 4096), ask(3, 0)])),
        (
            "garbage",
            framed(&[vec![], vec![0xff; 3], vec![1; 33], too_big]),
        ),
        ("padding", framed(&[bad_padding, ask(5, 65536)])),
    ]
}
