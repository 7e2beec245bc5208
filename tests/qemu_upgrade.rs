// SPDX-License-Identifier: Apache-2.0
//! A real QEMU guest keeps reading /dev/hwrng while the daemon serving it is
//! upgraded in place, three times: every byte arrives, QEMU never sees its
//! vhost-user connection drop, and its log has no error.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Daemon, run_cli, sha256_prefix, spawn_guest, test_guest, wait_guest, wait_until};

const BYTES: usize = 4 << 20;

#[test]
fn a_guest_reading_through_three_upgrades_gets_every_byte() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let received = dir.path().join("received.bin");
    let daemon = Daemon::serve(&[&socket]);
    let qemu = spawn_guest(
        &guest,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--bytes",
            &BYTES.to_string(),
            "--out",
            received.to_str().unwrap(),
        ],
    );

    // Each upgrade while the guest is reading: after it has read more than
    // before the previous one.
    let mut read = 0;
    for round in 1..=3 {
        wait_until("the guest to read more", || daemon.guest("vm").bytes > read);
        read = daemon.guest("vm").bytes;
        let output = run_cli([
            "upgrade".as_ref(),
            "--control".as_ref(),
            daemon.control().as_os_str(),
        ]);
        assert!(
            output.status.success(),
            "upgrade {round}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            daemon.log()
        );
    }
    assert!(
        (read as usize) < BYTES,
        "the guest had finished before the last upgrade; nothing was tested"
    );

    let report = wait_guest(qemu);
    report.assert_read(BYTES);
    assert_eq!(sha256_prefix(&received, BYTES), report.get("sha256"));
    for bad in ["Failed", "ring restore", "Assertion", "vhost_dev_start"] {
        assert!(
            !report.console.contains(bad),
            "QEMU said {bad}:\n{}",
            report.console
        );
    }
    let log = daemon.log();
    assert_eq!(log.matches("VMM connected on").count(), 1, "{log}");
    assert_eq!(
        log.matches("taken over from the previous daemon").count(),
        3,
        "{log}"
    );
}
