// SPDX-License-Identifier: Apache-2.0
//! The in-guest agent against a real daemon over the channel protocol on
//! a hybrid-vsock Unix socket (what a VMM's vsock device connects to).

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use common::{Daemon, run_cli};

/// A daemon serving guest `vm` (with `limits`) on its hybrid-vsock socket;
/// returns it with the socket the agent connects to.
fn serve_agent_guest(limits: &str) -> (Daemon, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vm.vsock");
    let channel = dir.path().join("vm.vsock_5564");
    let mut daemon = Daemon::start([
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--guest".into(),
        format!("name=vm,vsock-uds={}{limits}", base.display()),
    ]);
    daemon.wait_for_socket(&channel);
    daemon.wait_for_log("control socket on", 1);
    (daemon, channel, dir)
}

#[test]
fn the_agent_fetches_from_the_daemon_and_injects() {
    let (daemon, channel, _dir) = serve_agent_guest(",rate-bytes=65536");

    // Credit 0: this test runs on the host, whose kernel needs no credit.
    let output = run_cli([
        "agent",
        "--connect",
        &format!("unix:{}", channel.display()),
        "--once",
        "--bytes",
        "256",
        "--credit-bits-per-byte",
        "0",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("VRNG-AGENT ok bytes=256 credited_bits=0"),
        "{stdout}"
    );
    assert!(daemon.guest("vm").bytes >= 256);
}

#[test]
fn bad_channel_clients_do_not_disturb_a_good_one() {
    let (_daemon, channel, _dir) = serve_agent_guest("");

    // Garbage, an oversized request, and a half-open client that sends
    // half a header and stalls.
    let mut garbage = UnixStream::connect(&channel).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut oversize = UnixStream::connect(&channel).unwrap();
    let mut request =
        vhost_rng_protocol::wire::encode_request(&vhost_rng_protocol::wire::Request { length: 1 });
    request[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    oversize.write_all(&request).unwrap();
    let mut half_open = UnixStream::connect(&channel).unwrap();
    half_open.write_all(&request[..5]).unwrap();

    for bad in [&mut garbage, &mut oversize] {
        let mut answer = [0u8; 12];
        bad.read_exact(&mut answer).unwrap();
        let header = vhost_rng_protocol::wire::decode_response_header(&answer).unwrap();
        assert_eq!(header.status, vhost_rng_protocol::wire::Status::BadRequest);
    }

    let mut good = UnixStream::connect(&channel).unwrap();
    let mut bytes = Vec::new();
    assert_eq!(
        vhost_rng_protocol::wire::fetch(&mut good, 1024, &mut bytes).unwrap(),
        1024
    );
    drop(half_open);
}
