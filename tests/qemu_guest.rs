// SPDX-License-Identifier: Apache-2.0
//! End to end: a real Linux guest under QEMU reads /dev/hwrng through
//! `vhost-user-rng-pci` served by the `vhost-rng` binary.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Daemon, boot_guest, sha256_prefix, spawn_guest, test_guest, wait_guest, wait_until};
use nix::sys::signal::Signal;

const MIB: usize = 1 << 20;

#[test]
fn guest_reads_one_mib_from_hwrng_through_the_daemon() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let received = dir.path().join("received.bin");
    let daemon = Daemon::serve_sandboxed(&[&socket]);
    // Unprivileged (run as root: --user), no capabilities, filtered.
    daemon.assert_sandboxed();

    let report = boot_guest(
        &guest,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--bytes",
            &MIB.to_string(),
            "--out",
            received.to_str().unwrap(),
        ],
    );

    report.assert_read(MIB);
    // The bytes the guest read reached the host disk intact, and they are
    // not a constant fill.
    assert_eq!(sha256_prefix(&received, MIB), report.get("sha256"));
    let bytes = fs::read(&received).unwrap();
    let zeros = bytes[..MIB].iter().filter(|&&b| b == 0).count();
    assert!(
        zeros < MIB / 128,
        "{zeros} zero bytes in 1 MiB of random data"
    );
    daemon.wait_for_log("guest vm: VMM connected on", 1);
    daemon.wait_for_log("guest vm: VMM disconnected from", 1);
}

/// `--isolation guest`: the same read, served by the guest's own guest
/// process (unprivileged, filtered), fed by the serving process.
#[test]
fn a_guest_reads_through_a_guest_process_of_its_own() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let received = dir.path().join("received.bin");
    let mut daemon = Daemon::start_sandboxed([
        "serve",
        "--isolation",
        "guest",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    daemon.wait_for_socket(&socket);
    let report = boot_guest(
        &guest,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--bytes",
            &MIB.to_string(),
            "--out",
            received.to_str().unwrap(),
        ],
    );
    report.assert_read(MIB);
    assert_eq!(sha256_prefix(&received, MIB), report.get("sha256"));
    daemon.wait_for_log("guest vm: VMM disconnected from", 1);
    let status = daemon.guest("vm");
    assert!(status.bytes >= MIB as u64, "{status:?}");
    let process = status.process.expect("a guest process");
    assert!(
        daemon
            .log()
            .contains(&format!("guest process {process} serves it alone"))
    );
    assert!(
        !daemon.log().contains("its guest process"),
        "{}",
        daemon.log()
    );
}

#[test]
fn three_power_cycles_against_one_daemon_socket() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cycled.sock");
    let mut daemon = Daemon::serve_sandboxed(&[&socket]);

    let mut digests = Vec::new();
    for boot in 1..=3 {
        let report = boot_guest(
            &guest,
            &["--socket", socket.to_str().unwrap(), "--bytes", "65536"],
        );
        report.assert_read(65536);
        digests.push(report.get("sha256").to_owned());
        daemon.wait_for_log("guest cycled: VMM disconnected from", boot);
        assert!(
            daemon.is_running(),
            "daemon died after boot {boot}:\n{}",
            daemon.log()
        );
    }
    digests.dedup();
    assert_eq!(digests.len(), 3, "every boot must get fresh bytes");

    let log = daemon.log();
    assert_eq!(log.matches("VMM connected on").count(), 3, "{log}");
    let status = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket file left behind after SIGTERM");
}

#[test]
fn connect_mode_serves_qemu_listening_and_reconnects() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("server.sock");
    let socket_arg = socket.to_str().unwrap();
    // The serving process (--user) dials QEMU's socket as that user: the
    // directory and the socket must let it, as a group would in production.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let reachable = |socket: &Path| {
        wait_until("QEMU to listen", || socket.exists());
        fs::set_permissions(socket, fs::Permissions::from_mode(0o666)).unwrap();
    };

    // QEMU listens and holds the guest until the daemon connects.
    let first = spawn_guest(&guest, &["--server", socket_arg, "--bytes", "131072"]);
    reachable(&socket);
    let daemon = Daemon::start_sandboxed(["serve", "--connect", socket_arg]);
    wait_guest(first).assert_read(131072);
    daemon.wait_for_log("guest server: VMM disconnected from", 1);

    // The next VM on the same path is picked up without restarting the daemon.
    fs::remove_file(&socket).ok();
    let second = spawn_guest(&guest, &["--server", socket_arg, "--bytes", "65536"]);
    reachable(&socket);
    wait_guest(second).assert_read(65536);
    daemon.wait_for_log("guest server: VMM connected on", 2);
}

#[test]
fn a_crashed_vm_does_not_need_a_daemon_restart() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("crash.sock");
    let mut daemon = Daemon::serve_sandboxed(&[&socket]);
    let socket_arg = socket.to_str().unwrap();

    // A large read keeps the queue busy when QEMU is killed.
    let mut doomed = spawn_guest(&guest, &["--socket", socket_arg, "--bytes", "50000000"]);
    daemon.wait_for_log("guest crash: VMM connected on", 1);
    std::thread::sleep(std::time::Duration::from_secs(3));
    // run-guest.sh execs `timeout`, which runs QEMU as its child: kill QEMU
    // itself, as a crash would.
    let children = format!("/proc/{0}/task/{0}/children", doomed.id());
    let qemu: i32 = fs::read_to_string(&children)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu), Signal::SIGKILL).unwrap();
    doomed.wait().unwrap();
    daemon.wait_for_log("guest crash: VMM disconnected from", 1);

    boot_guest(&guest, &["--socket", socket_arg, "--bytes", "65536"]).assert_read(65536);
    assert!(daemon.is_running(), "{}", daemon.log());
}

/// Parses "rngtest: FIPS 140-2 <what>: N" from rngtest's report.
fn rngtest_count(report: &str, what: &str) -> u64 {
    let prefix = format!("rngtest: FIPS 140-2 {what}: ");
    report
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{what}' count in rngtest output:\n{report}"))
}

#[test]
fn bytes_a_guest_reads_from_the_default_sources_pass_fips_140_2() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fips.sock");
    let received = dir.path().join("received.bin");
    // No --source: every hardware source that works on this host.
    let daemon = Daemon::serve_sandboxed(&[&socket]);
    // 8000 rngtest blocks of 2500 bytes: enough that the 0.2% bound sits far
    // above the ~0.08% failure rate of ideal random data.
    let bytes = 20_000_000;

    let report = boot_guest(
        &guest,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--bytes",
            &bytes.to_string(),
            "--out",
            received.to_str().unwrap(),
            // Reading 20 MB under TCG takes 40 s to over a minute depending
            // on the machine and the other tests running beside it; the
            // guest's own 60 s default is too tight for a correctness test.
            "--append",
            "vrng.timeout=240",
            "--timeout",
            "300",
        ],
    );
    report.assert_read(bytes);
    assert_eq!(sha256_prefix(&received, bytes), report.get("sha256"));

    let output = std::process::Command::new("rngtest")
        .arg("--blockcount=7999")
        .stdin(fs::File::open(&received).unwrap())
        .output()
        .expect("run rngtest (Debian package rng-tools5)");
    let rngtest = String::from_utf8_lossy(&output.stderr);
    let successes = rngtest_count(&rngtest, "successes");
    let failures = rngtest_count(&rngtest, "failures");
    eprintln!(
        "rngtest: {failures} FIPS 140-2 failures in {} blocks",
        successes + failures
    );
    assert_eq!(successes + failures, 7999, "{rngtest}");
    assert!(
        failures * 1000 <= (successes + failures) * 2,
        "{failures} FIPS 140-2 failures in {} blocks:\n{rngtest}",
        successes + failures
    );
    daemon.wait_for_log("entropy available from", 1);
}

#[test]
fn a_rate_limited_guest_reads_at_its_configured_rate() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("limited.sock");
    let mut daemon = Daemon::start_sandboxed([
        "serve".to_owned(),
        "--guest".into(),
        format!(
            "name=limited,socket={},rate-bytes=16384,rate-period=1000",
            socket.display()
        ),
    ]);
    daemon.wait_for_socket(&socket);
    let bytes = 192 * 1024;

    let report = boot_guest(
        &guest,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--bytes",
            &bytes.to_string(),
        ],
    );

    report.assert_read(bytes);
    let elapsed_ms: f64 = report.get("elapsed_ms").parse().unwrap();
    // The guest booted with a full bucket (burst = rate-bytes = 16 KiB, the
    // allowance of an idle guest), so the first 16 KiB came at once and the
    // rest at the configured rate.
    let burst = 16384.0;
    let rate = (bytes as f64 - burst) * 1000.0 / elapsed_ms;
    eprintln!(
        "guest read {bytes} bytes in {elapsed_ms} ms: {rate:.0} B/s after its burst (limit 16384 B/s)"
    );
    // The guest's clock under TCG is noisy: 10%.
    assert!(
        (16384.0 * 0.9..=16384.0 * 1.1).contains(&rate),
        "guest read at {rate:.0} B/s after its burst, with a 16384 B/s limit"
    );
}

#[test]
fn a_guest_without_vhost_user_reads_through_qemu_rng_egd() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let egd = dir.path().join("legacy.egd");
    let mut daemon = Daemon::start_sandboxed([
        "serve".to_owned(),
        "--guest".into(),
        format!("name=legacy,egd={},rate-bytes=65536", egd.display()),
    ]);
    daemon.wait_for_socket(&egd);
    let bytes = 256 * 1024;

    let report = boot_guest(
        &guest,
        &[
            "--egd",
            egd.to_str().unwrap(),
            "--bytes",
            &bytes.to_string(),
        ],
    );

    report.assert_read(bytes);
    daemon.wait_for_log("guest legacy: EGD client connected", 1);
    // 256 KiB at 64 KiB/s after a 64 KiB burst: about 3 s. The limit holds.
    let elapsed_ms: f64 = report.get("elapsed_ms").parse().unwrap();
    let rate = (bytes as f64 - 65536.0) * 1000.0 / elapsed_ms;
    eprintln!("EGD guest read {bytes} bytes in {elapsed_ms} ms: {rate:.0} B/s after its burst");
    assert!(
        rate <= 65536.0 * 1.1,
        "the guest exceeded its limit: {rate:.0} B/s"
    );
}
