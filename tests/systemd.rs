// SPDX-License-Identifier: Apache-2.0
//! `Type=notify` as systemd runs it: the daemon's notifications arrive on
//! the socket named in `NOTIFY_SOCKET`, in order, and `READY=1` only once
//! every guest socket exists; the file descriptor store keeps guests'
//! connections across restarts of the whole service. (No systemd runs
//! here; these tests are its notification socket and its store.)

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};

use common::Daemon;
use common::fake_systemd::FakeSystemd;
use nix::sys::signal::{self, Signal};
use nix::sys::socket::MsgFlags;
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

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
            // The file descriptor store is another test's subject.
            ("FDSTORE", "0".as_ref()),
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

/// The shipped unit as installed, with ExecStart naming the binary built
/// here, in a directory that lives as long as the first value.
fn installed_unit() -> (tempfile::TempDir, std::path::PathBuf) {
    let unit =
        std::fs::read_to_string(common::repo_root().join("contrib/systemd/vhost-rng.service"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("vhost-rng.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/vhost-rng", env!("CARGO_BIN_EXE_vhost-rng")),
    )
    .unwrap();
    (dir, copy)
}

/// The shipped unit's sandbox as systemd scores it: "OK" or better (an
/// exposure below 5.0 of 10). Recorded in docs/security.md.
#[test]
fn the_shipped_unit_is_rated_ok_or_better_by_systemd_analyze_security() {
    let (_dir, copy) = installed_unit();
    let output = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let text = String::from_utf8_lossy(&output.stdout);
    let level = text
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for vhost-rng.service: ")
                .nth(1)
        })
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
    let exposure: f64 = level.split_whitespace().next().unwrap().parse().unwrap();
    assert!(exposure < 5.0, "exposure {level}:\n{text}");
    assert!(level.contains("OK") || level.contains("SAFE"), "{level}");
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let (_dir, copy) = installed_unit();
    let unit = std::fs::read_to_string(&copy).unwrap();
    assert!(unit.contains("Type=notify"), "{unit}");
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

/// Whether the daemon closed `socket` (its peer end): end of file or reset
/// on a peek.
fn peer_closed(socket: &UnixStream) -> bool {
    socket.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = matches!(
        nix::sys::socket::recv(socket.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK),
        Ok(0) | Err(nix::errno::Errno::ECONNRESET)
    );
    socket.set_nonblocking(false).unwrap();
    closed
}

/// `systemctl restart vhost-rng` (SIGTERM to the service) and a kill of the
/// top process (SIGKILL), each followed by a new start with what the store
/// holds: the VMM and the EGD client keep their connections, a request
/// posted while no daemon ran is answered, counters go on; a stop closes
/// connections only when systemd empties the store.
#[test]
fn guests_keep_their_connections_through_restarts_by_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let egd = dir.path().join("legacy.egd");
    let args = [
        "serve",
        "--source",
        "os",
        "--socket",
        socket.to_str().unwrap(),
        "--guest",
        &format!("name=legacy,egd={}", egd.display()),
    ];
    let mut systemd = FakeSystemd::new();
    let notify = systemd.path.clone();
    let env = [
        ("NOTIFY_SOCKET", notify.as_os_str()),
        ("VHOST_RNG_TEST_RESTART_BACKOFF_MS", "10".as_ref()),
    ];
    let mut daemon = Daemon::start_with_fds(&args, &env, &[]);
    systemd.wait_for("READY=1\nSTATUS=serving 2 guest(s)");

    let stream = UnixStream::connect(&socket).unwrap();
    let watch = stream.try_clone().unwrap();
    let mut vmm = TestVmm::from_stream(stream, TestVmmConfig::qemu()).unwrap();
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    assert_eq!(vmm.wait_used(1, common::PATIENCE).unwrap()[0].len, 64);
    let negotiated = vmm.sent_requests().len();
    let mut egd_client = UnixStream::connect(&egd).unwrap();
    egd_client.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let egd_read = |client: &mut UnixStream| {
        client.write_all(&[0x02, 16]).unwrap();
        let mut bytes = [0u8; 16];
        client.read_exact(&mut bytes).unwrap();
    };
    egd_read(&mut egd_client);

    for (round, signal) in [Signal::SIGTERM, Signal::SIGKILL].into_iter().enumerate() {
        if round == 1 {
            // An in-place upgrade in between keeps what the store holds.
            let upgrade = common::run_cli([
                "upgrade".as_ref(),
                "--control".as_ref(),
                daemon.control().as_os_str(),
            ]);
            assert!(upgrade.status.success(), "{upgrade:?}");
            daemon.wait_for_log("top process upgraded in place", 1);
        }
        // The store has the VMM's connection and the EGD client.
        common::wait_until("both guests' records with their connections", || {
            let vm = systemd.record("vm");
            let legacy = systemd.record("legacy");
            vm.is_some_and(|r| !r["state"]["connection"].is_null())
                && legacy.is_some_and(|r| r["state"]["clients"].as_array().unwrap().len() == 1)
        });
        // The control socket is kept too.
        let control = format!("shared.control@{}", daemon.control().display());
        common::wait_until("the control socket in the store", || {
            systemd.names().contains(&control)
        });
        let requests_before = daemon.guest("vm").requests;
        let serving = daemon.serving_pid();
        let status = daemon.stop_with(signal);
        if signal == Signal::SIGTERM {
            assert!(status.success(), "{status}");
        }
        common::wait_gone(serving);
        systemd.sync();
        assert!(
            socket.exists() && egd.exists(),
            "socket files left for the next start"
        );
        assert!(!peer_closed(&watch), "the VMM saw its connection close");

        // Posted while no daemon runs: answered by the next one.
        vmm.post(&[Buffer::writable(64)]).unwrap();
        vmm.kick().unwrap();
        daemon = Daemon::start_with_fds(&args, &env, &systemd.passed());
        systemd.wait_for("READY=1\nSTATUS=serving 2 guest(s)");
        assert_eq!(vmm.wait_used(1, common::PATIENCE).unwrap()[0].len, 64);
        egd_read(&mut egd_client);
        assert_eq!(
            vmm.sent_requests().len(),
            negotiated,
            "the VMM set nothing up again"
        );
        assert!(
            daemon
                .log()
                .contains("systemd's file descriptor store gave back 2 guest(s)"),
            "round {round}: {}",
            daemon.log()
        );
        // A stop reports the counters as they are; after a kill they go on
        // from the last record (here the take-over's, one request behind).
        let requests = daemon.guest("vm").requests;
        match signal {
            Signal::SIGTERM => assert_eq!(requests, requests_before + 1),
            _ => assert!(
                requests >= requests_before,
                "{requests} < {requests_before}"
            ),
        }
    }

    // `systemctl stop`: the daemon goes, then systemd empties the store;
    // only then does the VMM see its connection close.
    let serving = daemon.serving_pid();
    assert!(daemon.stop_with(Signal::SIGTERM).success());
    common::wait_gone(serving);
    assert!(!peer_closed(&watch));
    systemd.clear();
    common::wait_until("the VMM to see its connection close", || {
        peer_closed(&watch)
    });
}

/// systemd 254 and later say when a unit has no store (`FDSTORE=0`): then
/// nothing is stored and a stop closes connections and removes sockets.
#[test]
fn without_a_store_nothing_is_stored_and_a_stop_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let mut systemd = FakeSystemd::new();
    let notify = systemd.path.clone();
    let args = [
        "serve",
        "--source",
        "os",
        "--socket",
        socket.to_str().unwrap(),
    ];
    let env = [
        ("NOTIFY_SOCKET", notify.as_os_str()),
        ("FDSTORE", "0".as_ref()),
    ];
    let daemon = Daemon::start_with_fds(&args, &env, &[]);
    systemd.wait_for("READY=1\nSTATUS=serving 1 guest(s)");
    let stream = UnixStream::connect(&socket).unwrap();
    let watch = stream.try_clone().unwrap();
    let mut vmm = TestVmm::from_stream(stream, TestVmmConfig::qemu()).unwrap();
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    assert_eq!(vmm.wait_used(1, common::PATIENCE).unwrap()[0].len, 64);
    assert!(daemon.stop_with(Signal::SIGTERM).success());
    systemd.sync();
    assert_eq!(systemd.stored(), 0);
    assert!(!socket.exists());
    assert!(peer_closed(&watch));
}
