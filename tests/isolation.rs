// SPDX-License-Identifier: Apache-2.0
//! `--isolation guest` through the real binary and the test VMM: each
//! vhost-user guest's memory is mapped in exactly one daemon process, its
//! own guest process, sandboxed like the serving process; its limits are
//! the guest's; and a guest process killed with SIGKILL is started again
//! alone, its VMM's connection kept, while the other guest notices nothing.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, proc_status, test_user, wait_until};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

const PATIENCE: Duration = Duration::from_secs(60);

fn status_json(daemon: &Daemon) -> serde_json::Value {
    let output = common::run_cli([
        "status".as_ref(),
        "--json".as_ref(),
        "--control".as_ref(),
        daemon.control().as_os_str(),
    ]);
    serde_json::from_slice(&output.stdout).unwrap_or_default()
}

/// The guest process of `name`, as status shows it.
fn guest_process(daemon: &Daemon, name: &str) -> Option<Pid> {
    let status = status_json(daemon);
    let guests = status["guests"].as_array()?;
    let guest = guests.iter().find(|g| g["name"] == name)?;
    Some(Pid::from_raw(guest["process"].as_i64()? as i32))
}

/// The top process and its children (the serving process, guest
/// processes).
fn daemon_processes(daemon: &Daemon) -> Vec<Pid> {
    let top = daemon.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{top}/task/{top}/children")).unwrap_or_default();
    std::iter::once(top)
        .chain(
            children
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .map(Pid::from_raw),
        )
        .collect()
}

/// Whether `pid` maps the memfd whose inode is `inode`.
fn maps_inode(pid: Pid, inode: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("memfd:vhost-rng-test-guest-ram"))
        .any(|line| line.split_whitespace().nth(4) == Some(&inode.to_string()))
}

fn memfd_inode(vmm: &TestVmm) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", vmm.memory().fd()))
        .unwrap()
        .ino()
}

fn serve_64(vmm: &mut TestVmm) {
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, PATIENCE).unwrap();
    assert_eq!(used[0].len, 64);
}

fn start(dir: &Path, extra: &[String]) -> (Daemon, Vec<PathBuf>) {
    let sockets: Vec<PathBuf> = ["vm1", "vm2"]
        .iter()
        .map(|n| dir.join(format!("{n}.sock")))
        .collect();
    let mut args = vec![
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--isolation".into(),
        "guest".into(),
    ];
    for socket in &sockets {
        args.push("--socket".into());
        args.push(socket.display().to_string());
    }
    args.extend(extra.iter().cloned());
    let mut daemon = Daemon::start_sandboxed(args);
    for socket in &sockets {
        daemon.wait_for_socket(socket);
    }
    (daemon, sockets)
}

#[test]
fn each_guests_memory_is_mapped_only_by_its_own_sandboxed_guest_process() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sockets) = start(dir.path(), &[]);
    let mut vmms: Vec<TestVmm> = sockets
        .iter()
        .map(|s| TestVmm::connect(s, TestVmmConfig::qemu()).unwrap())
        .collect();
    for vmm in &mut vmms {
        serve_64(vmm);
    }
    let status = status_json(&daemon);
    assert_eq!(status["isolation"], "guest", "{status}");
    let mut owners = BTreeSet::new();
    for (vmm, name) in vmms.iter().zip(["vm1", "vm2"]) {
        let inode = memfd_inode(vmm);
        let mapping: Vec<Pid> = daemon_processes(&daemon)
            .into_iter()
            .filter(|&pid| maps_inode(pid, inode))
            .collect();
        assert_eq!(mapping.len(), 1, "{name}'s memory mapped by {mapping:?}");
        let process = guest_process(&daemon, name).expect("status names its guest process");
        assert_eq!(mapping[0], process, "{name}");
        assert_ne!(process, daemon.pid());
        owners.insert(process);
        let status = proc_status(process);
        if test_user().is_some() {
            assert_ne!(
                status["Uid"].split_whitespace().next(),
                Some("0"),
                "{status:?}"
            );
            for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
                assert_eq!(status[set], "0000000000000000", "{set}: {status:?}");
            }
        }
        assert_eq!(status["NoNewPrivs"], "1", "{status:?}");
        assert_eq!(status["Seccomp"], "2", "{status:?}");
    }
    assert_eq!(owners.len(), 2, "one process per guest");
    // The main serving process maps neither guest.
    let serving: Vec<Pid> = daemon_processes(&daemon)
        .into_iter()
        .filter(|pid| *pid != daemon.pid() && !owners.contains(pid))
        .collect();
    assert_eq!(serving.len(), 1, "{serving:?}");
    for vmm in &vmms {
        assert!(!maps_inode(serving[0], memfd_inode(vmm)));
    }
    // Counters are kept by the main serving process, as for any guest.
    let guests = daemon.guests();
    for guest in &guests {
        assert!(guest.bytes >= 64, "{guest:?}");
        assert!(guest.connected, "{guest:?}");
    }
}

#[test]
fn a_killed_guest_process_is_restarted_alone_with_its_vmm_connection() {
    let dir = tempfile::tempdir().unwrap();
    let backoff = std::ffi::OsString::from("10");
    let sockets: Vec<PathBuf> = ["vm1", "vm2"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.sock")))
        .collect();
    let mut args = vec![
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--isolation".into(),
        "guest".into(),
    ];
    for socket in &sockets {
        args.push("--socket".into());
        args.push(socket.display().to_string());
    }
    if let Some(user) = test_user() {
        args.push("--user".into());
        args.push(user);
    }
    let mut daemon = Daemon::start_with_env(
        args,
        &[("VHOST_RNG_TEST_RESTART_BACKOFF_MS", backoff.as_os_str())],
    );
    for socket in &sockets {
        daemon.wait_for_socket(socket);
    }
    let mut vmms: Vec<TestVmm> = sockets
        .iter()
        .map(|s| TestVmm::connect(s, TestVmmConfig::qemu()).unwrap())
        .collect();
    for vmm in &mut vmms {
        serve_64(vmm);
    }
    let negotiated: Vec<usize> = vmms.iter().map(|v| v.sent_requests().len()).collect();
    let serving_before: Vec<Pid> = daemon_processes(&daemon);
    let victim = guest_process(&daemon, "vm1").unwrap();
    let other = guest_process(&daemon, "vm2").unwrap();
    // A request in flight on the victim when it dies.
    vmms[0].post(&[Buffer::writable(64)]).unwrap();
    vmms[0].kick().unwrap();
    signal::kill(victim, Signal::SIGKILL).unwrap();
    common::wait_gone(victim);
    // The other guest is served throughout, by the same process.
    for _ in 0..8 {
        serve_64(&mut vmms[1]);
    }
    // The victim's request is answered by its next guest process.
    let used = vmms[0].wait_used(1, PATIENCE).unwrap();
    assert_eq!(used[0].len, 64);
    serve_64(&mut vmms[0]);
    wait_until("the new guest process in status", || {
        guest_process(&daemon, "vm1").is_some_and(|pid| pid != victim)
    });
    assert_eq!(guest_process(&daemon, "vm2"), Some(other));
    let after: Vec<usize> = vmms.iter().map(|v| v.sent_requests().len()).collect();
    assert_eq!(after, negotiated, "no VMM had to set its device up again");
    // The serving process was not restarted.
    let status = status_json(&daemon);
    assert_eq!(status["worker_restarts"], 0, "{status}");
    let still: Vec<Pid> = daemon_processes(&daemon);
    let serving = serving_before
        .iter()
        .find(|pid| **pid != daemon.pid() && **pid != victim && **pid != other)
        .unwrap();
    assert!(still.contains(serving));
    assert!(daemon.is_running());
    assert!(
        daemon
            .log()
            .contains("its guest process was killed by SIGKILL")
    );
}

#[test]
fn a_guest_process_is_held_to_its_guests_rate() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("slow.sock");
    let mut args = vec![
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--isolation".into(),
        "guest".into(),
        "--guest".into(),
        format!(
            "name=slow,socket={},rate-bytes=2000,rate-period=1000",
            socket.display()
        ),
    ];
    if let Some(user) = test_user() {
        args.push("--user".into());
        args.push(user);
    }
    let mut daemon = Daemon::start(args);
    daemon.wait_for_socket(&socket);
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    let started = Instant::now();
    for _ in 0..4 {
        vmm.post(&[Buffer::writable(4096)]).unwrap();
    }
    vmm.kick().unwrap();
    let mut got = 0u64;
    let mut answered = 0;
    while answered < 4 {
        for used in vmm.wait_used(1, PATIENCE).unwrap() {
            got += u64::from(used.len);
            answered += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // No more than the burst (2000) plus 2000 bytes a second since start.
    let bound = 2000.0 + 2000.0 * elapsed;
    assert!(
        (got as f64) <= bound,
        "{got} bytes in {elapsed:.2} s: more than a 2000 bytes/s guest may have"
    );
    // Each request got at most a burst.
    let guest = daemon.guest("slow");
    assert_eq!(guest.bytes, got, "{guest:?}");
    assert!(guest.process.is_some(), "{guest:?}");
    assert!(guest.throttled_seconds > 0.0 || got <= 2000, "{guest:?}");
}
