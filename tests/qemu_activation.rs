// SPDX-License-Identifier: Apache-2.0
//! End to end: a real Linux guest under QEMU reads /dev/hwrng through a
//! socket the daemon did not make but was handed, as systemd's socket
//! activation hands it (`LISTEN_FDS`, `LISTEN_FDNAMES`).

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;

use common::{Daemon, boot_guest, test_guest};
use nix::sys::signal::Signal;

#[test]
fn a_guest_reads_through_a_socket_activated_guest() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    // What a socket unit with FileDescriptorName=vm1 passes.
    let listener = OwnedFd::from(UnixListener::bind(&socket).unwrap());
    let mut daemon = Daemon::start_with_fds(&["serve"], &[], &[("vm1".to_string(), listener)]);
    daemon.wait_for_log_while_running("serving 1 guest(s)", 1);

    let report = boot_guest(
        &guest,
        &["--socket", socket.to_str().unwrap(), "--bytes", "65536"],
    );
    report.assert_read(65536);
    assert!(daemon.bytes_served("vm1").unwrap() >= 65536);
    daemon.wait_for_log("guest vm1: VMM disconnected from", 1);
    assert!(daemon.stop_with(Signal::SIGTERM).success());
    assert!(socket.exists(), "the socket unit's file is left to it");
}
