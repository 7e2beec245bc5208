// SPDX-License-Identifier: Apache-2.0
//! In-place upgrades through the real binary: `vhost-rng upgrade` (and
//! SIGUSR2) re-execute the daemon with the same pid while VMMs (the test
//! VMM over vhost-user, an EGD client) stay connected and keep being
//! served; a binary that cannot take over is refused and the daemon goes on.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, run_cli};
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

const PATIENCE: Duration = Duration::from_secs(30);

fn serve_64(vmm: &mut TestVmm) {
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, PATIENCE).unwrap();
    assert_eq!(used[0].len, 64);
}

/// EGD: "how many bits are there" (0x00) answers 4 bytes.
fn egd_level(client: &mut UnixStream) {
    client.write_all(&[0x00]).unwrap();
    let mut answer = [0u8; 4];
    client.read_exact(&mut answer).unwrap();
}

/// EGD: a non-blocking read of 16 bytes (0x01 16) answers a length byte
/// and that many bytes.
fn egd_read(client: &mut UnixStream) -> usize {
    client.write_all(&[0x01, 16]).unwrap();
    let mut length = [0u8; 1];
    client.read_exact(&mut length).unwrap();
    let mut bytes = vec![0u8; usize::from(length[0])];
    client.read_exact(&mut bytes).unwrap();
    bytes.len()
}

fn upgrade(control: &Path) -> std::process::Output {
    run_cli([
        "upgrade".as_ref(),
        "--control".as_ref(),
        control.as_os_str(),
    ])
}

struct Setup {
    daemon: Daemon,
    sockets: Vec<PathBuf>,
    egd: PathBuf,
    _dir: tempfile::TempDir,
}

/// A daemon started from `binary` with three vhost-user guests (one rate
/// limited) and an EGD guest.
fn start(binary: &Path, dir: tempfile::TempDir) -> Setup {
    let sockets: Vec<PathBuf> = (1..=3)
        .map(|n| dir.path().join(format!("vm{n}.sock")))
        .collect();
    let egd = dir.path().join("legacy.egd");
    let mut args = vec!["serve".to_owned(), "--source".into(), "os".into()];
    for (n, socket) in sockets.iter().enumerate() {
        args.push("--guest".into());
        let limit = if n == 0 { ",rate-bytes=65536" } else { "" };
        args.push(format!(
            "name=vm{},socket={}{limit}",
            n + 1,
            socket.display()
        ));
    }
    args.push("--guest".into());
    args.push(format!("name=legacy,egd={}", egd.display()));
    let mut daemon = Daemon::start_binary(binary, args, &[]);
    for path in sockets.iter().chain([&egd]) {
        daemon.wait_for_socket(path);
    }
    Setup {
        daemon,
        sockets,
        egd,
        _dir: dir,
    }
}

#[test]
fn upgrades_keep_every_guest_served_without_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(Path::new(env!("CARGO_BIN_EXE_vhost-rng")), dir);
    let pid = setup.daemon.pid();
    let mut vmms: Vec<TestVmm> = setup
        .sockets
        .iter()
        .map(|socket| TestVmm::connect(socket, TestVmmConfig::qemu()).unwrap())
        .collect();
    for vmm in &mut vmms {
        serve_64(vmm);
    }
    let negotiated: Vec<usize> = vmms.iter().map(|v| v.sent_requests().len()).collect();
    let mut egd = UnixStream::connect(&setup.egd).unwrap();
    egd.set_read_timeout(Some(PATIENCE)).unwrap();
    egd_level(&mut egd);
    // A guest added at runtime is in no file; it must survive too.
    let runtime = setup.sockets[0].with_file_name("late.sock");
    let added = run_cli([
        "guest".as_ref(),
        "add".as_ref(),
        format!("name=late,socket={}", runtime.display()).as_ref(),
        "--control".as_ref(),
        setup.daemon.control().as_os_str(),
    ]);
    assert!(added.status.success(), "{added:?}");
    let mut late = TestVmm::connect(&runtime, TestVmmConfig::cloud_hypervisor()).unwrap();
    serve_64(&mut late);
    let bytes_before = setup.daemon.guest("vm2").bytes;

    for round in 1..=2u64 {
        // Requests posted just before the upgrade are answered after it.
        for vmm in &mut vmms {
            vmm.post(&[Buffer::writable(64)]).unwrap();
            vmm.kick().unwrap();
        }
        if round == 1 {
            let output = upgrade(setup.daemon.control());
            assert!(
                output.status.success(),
                "{}{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                setup.daemon.log()
            );
            assert!(String::from_utf8_lossy(&output.stdout).contains("upgraded"));
        } else {
            // The same through the signal, as `systemctl kill -s USR2`.
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2).unwrap();
        }
        assert!(setup.daemon.is_running());
        assert_eq!(setup.daemon.pid(), pid, "the same process, re-executed");
        setup
            .daemon
            .wait_for_log("taking over 5 guest(s)", round as usize);
        // The top process follows the serving process to the new binary.
        setup
            .daemon
            .wait_for_log("top process upgraded in place", round as usize);

        for vmm in &mut vmms {
            let used = vmm.wait_used(1, PATIENCE).unwrap();
            assert_eq!(used[0].len, 64, "the request posted before the upgrade");
            serve_64(vmm);
        }
        serve_64(&mut late);
        assert_eq!(
            egd_read(&mut egd),
            16,
            "the EGD client's connection goes on"
        );

        let status = setup.daemon.guests();
        assert_eq!(status.len(), 5, "{status:?}");
        let upgrades = {
            let output = run_cli([
                "status".as_ref(),
                "--json".as_ref(),
                "--control".as_ref(),
                setup.daemon.control().as_os_str(),
            ]);
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            status["upgrades"].as_u64().unwrap()
        };
        assert_eq!(upgrades, round);
    }
    // The upgraded top process still restarts a serving process that dies.
    let worker = setup.daemon.serving_pid();
    nix::sys::signal::kill(worker, nix::sys::signal::Signal::SIGKILL).unwrap();
    common::wait_until("another serving process", || {
        setup.daemon.serving_pid() != worker
    });
    for vmm in &mut vmms {
        serve_64(vmm);
    }
    let after: Vec<usize> = vmms.iter().map(|v| v.sent_requests().len()).collect();
    assert_eq!(after, negotiated, "no VMM had to set its device up again");
    assert!(
        setup.daemon.guest("vm2").bytes > bytes_before,
        "counters carried on"
    );
    assert!(
        !setup.daemon.log().contains("disconnected"),
        "{}",
        setup.daemon.log()
    );
}

#[test]
fn a_binary_that_cannot_take_over_is_refused_and_the_daemon_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // The daemon runs from a copy that the test replaces, as a package
    // upgrade replaces /usr/bin/vhost-rng.
    let binary = dir.path().join("vhost-rng");
    std::fs::copy(env!("CARGO_BIN_EXE_vhost-rng"), &binary).unwrap();
    let mut setup = start(&binary, dir);
    let mut vmm = TestVmm::connect(&setup.sockets[1], TestVmmConfig::qemu()).unwrap();
    serve_64(&mut vmm);

    // A future version whose state record this one cannot write.
    let replacement = binary.with_file_name("vhost-rng.new");
    std::fs::write(&replacement, "#!/bin/sh\necho 99\n").unwrap();
    std::fs::set_permissions(&replacement, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&replacement, &binary).unwrap();
    let output = upgrade(setup.daemon.control());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("upgrade refused"), "{stderr}");
    assert!(stderr.contains("\"99\""), "{stderr}");

    // Nothing there at all.
    std::fs::remove_file(&binary).unwrap();
    let output = upgrade(setup.daemon.control());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not run"), "{stderr}");

    serve_64(&mut vmm);
    assert!(setup.daemon.is_running());
    let output = run_cli([
        "status".as_ref(),
        "--control".as_ref(),
        setup.daemon.control().as_os_str(),
    ]);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("last upgrade refused"),
        "{output:?}"
    );
}

#[test]
fn an_egd_read_waiting_for_tokens_is_answered_across_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let egd = dir.path().join("slow.egd");
    // 32 bytes every 400 ms, starting empty: each blocking read waits.
    let mut daemon = Daemon::start([
        "serve",
        "--source",
        "os",
        "--guest",
        &format!(
            "name=slow,egd={},rate-bytes=32,rate-period=400",
            egd.display()
        ),
    ]);
    daemon.wait_for_socket(&egd);
    let mut client = UnixStream::connect(&egd).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    for round in 1..=2 {
        // A blocking read of 32 bytes (0x02 32), then the upgrade while it
        // waits for tokens: the session finishes the command before it
        // parks, so the answer is not lost with the old process.
        client.write_all(&[0x02, 32]).unwrap();
        let output = upgrade(daemon.control());
        assert!(
            output.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            daemon.log()
        );
        let mut answer = [0u8; 32];
        client.read_exact(&mut answer).unwrap();
        daemon.wait_for_log("taking over 1 guest(s)", round);
    }
    // And the connection is served by the new process.
    client.write_all(&[0x02, 32]).unwrap();
    let mut answer = [0u8; 32];
    client.read_exact(&mut answer).unwrap();
}
