// SPDX-License-Identifier: Apache-2.0
//! A real QEMU guest keeps reading /dev/hwrng while the process serving it
//! is killed with SIGKILL three times and the daemon is upgraded in place
//! once, and while the whole service is restarted as systemd does with its
//! file descriptor store: every byte arrives, QEMU never sees its
//! vhost-user connection drop, and its log has no error.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fake_systemd::FakeSystemd;
use common::{Daemon, run_cli, sha256_prefix, spawn_guest, test_guest, wait_guest, wait_until};
use nix::sys::signal::{self, Signal};

const BYTES: usize = 4 << 20;

/// `--isolation guest`: the guest process that maps the guest's memory is
/// killed twice and the serving process once while the guest reads; each
/// time that guest's process is started again with the VMM's connection,
/// and every byte arrives.
#[test]
fn a_guest_reading_through_kills_of_its_guest_process_gets_every_byte() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let received = dir.path().join("received.bin");
    let mut args = vec![
        "serve".to_owned(),
        "--isolation".into(),
        "guest".into(),
        "--socket".into(),
        socket.display().to_string(),
    ];
    if let Some(user) = common::test_user() {
        args.push("--user".into());
        args.push(user);
    }
    let backoff = std::ffi::OsString::from("10");
    let mut daemon = Daemon::start_with_env(
        args,
        &[("VHOST_RNG_TEST_RESTART_BACKOFF_MS", backoff.as_os_str())],
    );
    daemon.wait_for_socket(&socket);
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
    let process = |daemon: &Daemon| {
        nix::unistd::Pid::from_raw(daemon.guest("vm").process.unwrap_or(0) as i32)
    };
    let mut read = 0;
    for event in ["guest process", "serving process", "guest process"] {
        read = daemon.wait_served_more("vm", read);
        let victim = process(&daemon);
        if event == "guest process" {
            signal::kill(victim, Signal::SIGKILL).unwrap();
        } else {
            // The top process's other child.
            let top = daemon.pid();
            let children =
                std::fs::read_to_string(format!("/proc/{top}/task/{top}/children")).unwrap();
            let worker = children
                .split_whitespace()
                .map(|pid| nix::unistd::Pid::from_raw(pid.parse().unwrap()))
                .find(|&pid| pid != victim)
                .unwrap();
            signal::kill(worker, Signal::SIGKILL).unwrap();
        }
        wait_until("another guest process", || {
            let now = process(&daemon);
            now.as_raw() != 0 && now != victim
        });
    }
    assert!(
        (read as usize) < BYTES,
        "the guest had finished before the last kill; nothing was tested"
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
        log.matches("its guest process was killed by SIGKILL")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("the serving process was killed by SIGKILL")
            .count(),
        1,
        "{log}"
    );
    assert!(daemon.is_running());
}

#[test]
fn a_guest_reading_through_crashes_and_an_upgrade_gets_every_byte() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let received = dir.path().join("received.bin");
    let daemon = Daemon::serve_sandboxed(&[&socket]);
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

    // Each event while the guest is reading: after it has read more than
    // before the previous one.
    let mut read = 0;
    for event in ["kill", "kill", "upgrade", "kill"] {
        read = daemon.wait_served_more("vm", read);
        if event == "kill" {
            let worker = daemon.serving_pid();
            signal::kill(worker, Signal::SIGKILL).unwrap();
            wait_until("another serving process", || daemon.serving_pid() != worker);
        } else {
            let output = run_cli([
                "upgrade".as_ref(),
                "--control".as_ref(),
                daemon.control().as_os_str(),
            ]);
            assert!(
                output.status.success(),
                "upgrade: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                daemon.log()
            );
        }
    }
    assert!(
        (read as usize) < BYTES,
        "the guest had finished before the last event; nothing was tested"
    );
    // The serving process after kills and an upgrade is sandboxed as the
    // first one was.
    daemon.assert_sandboxed();

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
    assert_eq!(log.matches("was killed by SIGKILL").count(), 3, "{log}");
    assert_eq!(
        log.matches("taken over from the previous daemon").count(),
        4,
        "{log}"
    );
}

/// The whole service restarted under a real guest, as systemd does it with
/// the shipped unit: `systemctl restart` (SIGTERM), then a SIGKILL of the
/// top process followed by systemd's restart; each new daemon gets the
/// guest back from the file descriptor store. Every byte arrives and QEMU
/// never sees its connection drop.
#[test]
fn a_guest_reading_through_restarts_of_the_whole_service_gets_every_byte() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let received = dir.path().join("received.bin");
    let mut systemd = FakeSystemd::new();
    let notify = systemd.path.clone();
    // With --user when run as root, as every real-guest test.
    let user = common::test_user();
    let mut args = vec!["serve", "--socket", socket.to_str().unwrap()];
    if let Some(user) = &user {
        args.extend(["--user", user.as_str()]);
    }
    let env = [("NOTIFY_SOCKET", notify.as_os_str())];
    let mut daemon = Daemon::start_with_fds(&args, &env, &[]);
    systemd.wait_for("READY=1\nSTATUS=serving 1 guest(s)");
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
    let mut read = 0;
    let mut logs = String::new();
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        read = daemon.wait_served_more("vm", read);
        systemd.sync();
        let serving = daemon.serving_pid();
        logs.push_str(&daemon.log());
        daemon.stop_with(signal);
        common::wait_gone(serving);
        systemd.sync();
        daemon = Daemon::start_with_fds(&args, &env, &systemd.passed());
        systemd.wait_for("READY=1\nSTATUS=serving 1 guest(s)");
        daemon.assert_sandboxed();
        assert!(
            daemon
                .log()
                .contains("systemd's file descriptor store gave back 1 guest(s)"),
            "{}",
            daemon.log()
        );
    }
    assert!(
        (read as usize) < BYTES,
        "the guest had finished before the last restart; nothing was tested"
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
    logs.push_str(&daemon.log());
    assert_eq!(logs.matches("VMM connected on").count(), 1, "{logs}");
}
