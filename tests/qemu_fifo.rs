// SPDX-License-Identifier: Apache-2.0
//! A real QEMU guest whose virtio-rng reads a `fifo=` guest's named pipe
//! (QEMU's `rng-random`, as libvirt's `random` backend and Nova set it up)
//! reads 2 MiB while the daemon's serving process is killed and the whole
//! daemon is stopped and started again: every byte arrives, QEMU says
//! nothing, and no VM needs restarting.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Daemon, sha256_prefix, spawn_guest, test_guest, wait_guest, wait_until};
use nix::sys::signal::{self, Signal};

const BYTES: usize = 2 << 20;

fn start(fifo: &std::path::Path) -> Daemon {
    let mut daemon = Daemon::start_sandboxed([
        "serve".to_owned(),
        "--guest".into(),
        format!("name=vm,fifo={}", fifo.display()),
    ]);
    daemon.wait_for_log_while_running("filling FIFO", 1);
    daemon.assert_sandboxed();
    daemon
}

#[test]
fn a_guest_reading_a_fifo_through_a_crash_and_a_restart_gets_every_byte() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("vm.fifo");
    let received = dir.path().join("received.bin");
    let mut daemon = start(&fifo);
    let qemu = spawn_guest(
        &guest,
        &[
            "--fifo",
            fifo.to_str().unwrap(),
            "--bytes",
            &BYTES.to_string(),
            "--out",
            received.to_str().unwrap(),
        ],
    );
    let mut read = 0;
    let mut served = 0;
    for event in ["kill", "restart"] {
        read = daemon.wait_served_more("vm", read + 64 * 1024);
        if event == "kill" {
            let worker = daemon.serving_pid();
            signal::kill(worker, Signal::SIGKILL).unwrap();
            wait_until("another serving process", || daemon.serving_pid() != worker);
        } else {
            served += read;
            assert!(daemon.stop_with(Signal::SIGTERM).success());
            assert!(fifo.exists());
            daemon = start(&fifo);
            read = 0;
        }
    }
    assert!(
        (served as usize) < BYTES,
        "the guest had finished before the restart; nothing was tested"
    );
    let report = wait_guest(qemu);
    report.assert_read(BYTES);
    assert_eq!(sha256_prefix(&received, BYTES), report.get("sha256"));
    for bad in ["rng-random", "Failed"] {
        assert!(
            !report.console.contains(bad),
            "QEMU said {bad}:\n{}",
            report.console
        );
    }
}
