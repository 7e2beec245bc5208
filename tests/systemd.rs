// SPDX-License-Identifier: Apache-2.0
//! `Type=notify` as systemd runs it: the daemon's notifications arrive on
//! the socket named in `NOTIFY_SOCKET`, in order, and `READY=1` only once
//! every guest socket exists. (No systemd runs here; this test is its
//! notification socket.)

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;

use common::Daemon;
use nix::sys::signal::{self, Signal};

/// The next notification; fails the test after `PATIENCE`.
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The next notification other than a watchdog ping.
fn next_state(socket: &UnixDatagram) -> String {
    loop {
        let message = next(socket);
        if message != "WATCHDOG=1" {
            return message;
        }
    }
}

#[test]
fn notifications_follow_the_daemon_through_start_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let guests = [dir.path().join("vm1.sock"), dir.path().join("vm2.egd")];
    let config = dir.path().join("vhost-rng.toml");
    std::fs::write(
        &config,
        format!(
            "[[guest]]\nname = \"vm1\"\nsocket = \"{}\"\n\n[[guest]]\nname = \"vm2\"\negd = \"{}\"\n",
            guests[0].display(),
            guests[1].display()
        ),
    )
    .unwrap();
    // A 0.4 s watchdog: pings every 0.2 s.
    let mut daemon = Daemon::start_with_env(
        [
            "serve",
            "--source",
            "os",
            "--config",
            config.to_str().unwrap(),
        ],
        &[
            ("NOTIFY_SOCKET", notify.as_os_str()),
            ("WATCHDOG_USEC", "400000".as_ref()),
        ],
    );

    assert_eq!(next_state(&socket), "STATUS=starting");
    let ready = next_state(&socket);
    assert_eq!(ready, "READY=1\nSTATUS=serving 2 guest(s)");
    for guest in &guests {
        assert!(
            guest.exists(),
            "READY=1 came before {} existed",
            guest.display()
        );
    }
    // Watchdog pings keep coming while the daemon is idle.
    for _ in 0..3 {
        assert_eq!(next(&socket), "WATCHDOG=1");
    }

    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    let reloading = next_state(&socket);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next_state(&socket), "READY=1\nSTATUS=serving 2 guest(s)");
    assert!(daemon.is_running());

    signal::kill(daemon.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(next_state(&socket), "STOPPING=1");
    let (status, log) = daemon.wait_exit();
    assert!(status.success(), "{status}: {log}");
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let unit =
        std::fs::read_to_string(common::repo_root().join("contrib/systemd/vhost-rng.service"))
            .unwrap();
    assert!(unit.contains("Type=notify"), "{unit}");
    // Verify it as installed, with ExecStart naming the binary built here.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("vhost-rng.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/vhost-rng", env!("CARGO_BIN_EXE_vhost-rng")),
    )
    .unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
