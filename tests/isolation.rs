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

/// The guest process of `name`, as status shows it.
fn guest_process(daemon: &Daemon, name: &str) -> Option<Pid> {
    let status = daemon.status_json();
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
    // And one whose VMM listens (QEMU server=on): its guest process dials.
    let dialled = dir.path().join("server.sock");
    let listener = std::os::unix::net::UnixListener::bind(&dialled).unwrap();
    // The guest process dials as the --user user.
    use std::os::unix::fs::PermissionsExt;
    for path in [dir.path(), dialled.as_path()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let (daemon, sockets) = start(
        dir.path(),
        &["--connect".into(), dialled.display().to_string()],
    );
    let mut vmms: Vec<TestVmm> = sockets
        .iter()
        .map(|s| TestVmm::connect(s, TestVmmConfig::qemu()).unwrap())
        .collect();
    vmms.push(TestVmm::accept(&listener, TestVmmConfig::qemu()).unwrap());
    for vmm in &mut vmms {
        serve_64(vmm);
    }
    let status = daemon.status_json();
    assert_eq!(status["isolation"], "guest", "{status}");
    let mut owners = BTreeSet::new();
    for (vmm, name) in vmms.iter().zip(["vm1", "vm2", "server"]) {
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
    assert_eq!(owners.len(), 3, "one process per guest");
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
    assert_eq!(guests.len(), 3);
    for guest in &guests {
        assert!(guest.bytes >= 64, "{guest:?}");
        assert!(guest.connected, "{guest:?}");
        assert_eq!(guest.connections, 1, "{guest:?}");
        assert!(guest.requests >= 1, "{guest:?}");
    }
    // No guest process died on the way (a seccomp kill, say).
    assert!(
        !daemon.log().contains("its guest process"),
        "{}",
        daemon.log()
    );
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
    let status = daemon.status_json();
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

fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.push("--control".as_ref());
    all.push(daemon.control().as_os_str());
    common::run_cli(all)
}

#[test]
fn runtime_guests_and_reloads_start_and_end_guest_processes_and_upgrades_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vhost-rng.toml");
    let sock = |name: &str| dir.path().join(format!("{name}.sock"));
    let guest = |name: &str| {
        format!(
            "[[guest]]\nname = \"{name}\"\nsocket = \"{}\"\n",
            sock(name).display()
        )
    };
    let head = "isolation = \"guest\"\nsources = [\"os\"]\n";
    std::fs::write(&config, format!("{head}{}", guest("kept"))).unwrap();
    let mut args = vec!["serve".to_owned(), "--config".into()];
    args.push(config.display().to_string());
    // Not --user: the test's directory is root's, where a runtime guest's
    // socket is made (the sandbox is the first test's subject).
    let mut daemon = Daemon::start(args);
    daemon.wait_for_socket(&sock("kept"));
    let mut kept = TestVmm::connect(&sock("kept"), TestVmmConfig::qemu()).unwrap();
    serve_64(&mut kept);
    let kept_process = guest_process(&daemon, "kept").unwrap();

    // Added at runtime: a guest process of its own.
    let spec = format!("name=added,socket={}", sock("added").display());
    let output = cli(&daemon, &["guest", "add", &spec]);
    assert!(output.status.success(), "{output:?}");
    let mut added = TestVmm::connect(&sock("added"), TestVmmConfig::qemu()).unwrap();
    serve_64(&mut added);
    let added_process = guest_process(&daemon, "added").unwrap();
    assert!(maps_inode(added_process, memfd_inode(&added)));
    assert!(!maps_inode(kept_process, memfd_inode(&added)));
    // Removed: its process ends, its socket file goes.
    let output = cli(&daemon, &["guest", "remove", "added"]);
    assert!(output.status.success(), "{output:?}");
    common::wait_gone(added_process);
    assert!(!sock("added").exists());
    drop(added);

    // A reload adds one (a process starts) and keeps the other as it is.
    std::fs::write(
        &config,
        format!("{head}{}{}", guest("kept"), guest("reloaded")),
    )
    .unwrap();
    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("SIGHUP: reloaded", 1);
    daemon.wait_for_socket(&sock("reloaded"));
    let mut reloaded = TestVmm::connect(&sock("reloaded"), TestVmmConfig::qemu()).unwrap();
    serve_64(&mut reloaded);
    let reloaded_process = guest_process(&daemon, "reloaded").unwrap();
    assert!(maps_inode(reloaded_process, memfd_inode(&reloaded)));
    assert_eq!(guest_process(&daemon, "kept"), Some(kept_process));
    serve_64(&mut kept);
    // And one that drops it ends its process.
    std::fs::write(&config, format!("{head}{}", guest("kept"))).unwrap();
    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("SIGHUP: reloaded", 2);
    common::wait_gone(reloaded_process);

    // An in-place upgrade is refused, clearly, and nothing changes.
    let output = cli(&daemon, &["upgrade"]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--isolation guest"), "{stderr}");
    let status = daemon.status_json();
    assert!(
        status["last_upgrade_error"]
            .as_str()
            .is_some_and(|e| e.contains("--isolation guest")),
        "{status}"
    );
    serve_64(&mut kept);
    assert_eq!(guest_process(&daemon, "kept"), Some(kept_process));
    // SIGUSR2 (`systemctl kill -s USR2`) is refused the same way.
    signal::kill(daemon.pid(), Signal::SIGUSR2).unwrap();
    wait_until("the second refusal in status", || {
        daemon.status_json()["upgrade_failures"] == 2
    });
    serve_64(&mut kept);
    assert_eq!(guest_process(&daemon, "kept"), Some(kept_process));
    assert!(daemon.is_running());
}

#[test]
fn a_killed_serving_process_leaves_every_vmm_connected() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, sockets) = start(dir.path(), &[]);
    let mut vmms: Vec<TestVmm> = sockets
        .iter()
        .map(|s| TestVmm::connect(s, TestVmmConfig::qemu()).unwrap())
        .collect();
    for vmm in &mut vmms {
        serve_64(vmm);
    }
    let negotiated: Vec<usize> = vmms.iter().map(|v| v.sent_requests().len()).collect();
    let guests: Vec<Pid> = ["vm1", "vm2"]
        .iter()
        .map(|name| guest_process(&daemon, name).unwrap())
        .collect();
    let serving = daemon_processes(&daemon)
        .into_iter()
        .find(|pid| *pid != daemon.pid() && !guests.contains(pid))
        .unwrap();
    signal::kill(serving, Signal::SIGKILL).unwrap();
    daemon.wait_for_log_while_running("taking over 2 guest(s)", 1);
    for vmm in &mut vmms {
        serve_64(vmm);
    }
    let after: Vec<usize> = vmms.iter().map(|v| v.sent_requests().len()).collect();
    assert_eq!(after, negotiated, "no VMM had to set its device up again");
    let status = daemon.status_json();
    assert_eq!(status["worker_restarts"], 1, "{status}");
    // Each guest's memory is still mapped by one process only.
    for vmm in &vmms {
        let inode = memfd_inode(vmm);
        let mapping = daemon_processes(&daemon)
            .into_iter()
            .filter(|&pid| maps_inode(pid, inode))
            .count();
        assert_eq!(mapping, 1);
    }
}

/// A descriptor of another process, taken with pidfd_getfd (root).
fn steal_fd(pid: Pid, fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain system calls on integers; the results are checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above; `pidfd` is ours and closed below.
    let stolen = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0) };
    let error = std::io::Error::last_os_error();
    // SAFETY: `pidfd` is a descriptor we own.
    unsafe { libc::close(pidfd as i32) };
    assert!(stolen >= 0, "pidfd_getfd: {error}");
    // SAFETY: the kernel just installed it for us.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(stolen as i32) }
}

/// A compromised guest process: the test takes its end of the entropy link
/// and sends garbage, then asks for far more than its guest may have. The
/// main serving process drops the garbage, answers within the guest's
/// limit only, and goes on serving the other guest.
#[test]
fn a_compromised_guest_process_gets_no_more_than_its_guests_limit() {
    use vhost_rng::frontend::vhost_user::remote_supply::{ANSWER_HEADER, Ask};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: taking another process's descriptor needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let limited = dir.path().join("limited.sock");
    let spec = format!(
        "name=limited,socket={},rate-bytes=1000,rate-period=1000",
        limited.display()
    );
    let started = Instant::now();
    let (mut daemon, sockets) = start(dir.path(), &["--guest".into(), spec]);
    daemon.wait_for_socket(&limited);
    let mut vmm = TestVmm::connect(&limited, TestVmmConfig::qemu()).unwrap();
    serve_64(&mut vmm);
    let mut other = TestVmm::connect(&sockets[0], TestVmmConfig::qemu()).unwrap();
    serve_64(&mut other);
    let victim = guest_process(&daemon, "limited").unwrap();
    let environ = std::fs::read(format!("/proc/{victim}/environ")).unwrap();
    let link: i32 = environ
        .split(|&b| b == 0)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(|v| v.strip_prefix("VHOST_RNG_ENTROPY_LINK="))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap();
    // The real guest process stops; the test speaks for it.
    signal::kill(victim, Signal::SIGSTOP).unwrap();
    let link = steal_fd(victim, link);
    use nix::sys::socket::{MsgFlags, recv, send};
    use std::os::fd::AsRawFd;
    let garbage: [&[u8]; 5] = [&[], &[0xff], &[1; 31], &[1; 33], &[7; 60000]];
    for message in garbage {
        send(link.as_raw_fd(), message, MsgFlags::MSG_NOSIGNAL).unwrap();
    }
    let mut too_big = Ask::default().encode();
    too_big[8..12].copy_from_slice(&(1u32 << 24).to_le_bytes());
    send(link.as_raw_fd(), &too_big, MsgFlags::MSG_NOSIGNAL).unwrap();
    // Lies about counters are its own guest's business; bytes are not.
    let mut got = 64u64;
    let mut answer = vec![0u8; ANSWER_HEADER + 65536];
    let mut throttled = 0;
    let mut id = 0x5eed_0000u32;
    // Asks as fast as the answers come, waiting only as long as told,
    // until it has had 3000 bytes.
    while got < 3000 {
        id += 1;
        let ask = Ask {
            id,
            want: 65536,
            ..Ask::default()
        };
        send(link.as_raw_fd(), &ask.encode(), MsgFlags::MSG_NOSIGNAL).unwrap();
        let n = recv(link.as_raw_fd(), &mut answer, MsgFlags::empty()).unwrap();
        assert!(n >= ANSWER_HEADER);
        assert_eq!(&answer[4..8], &ask.id.to_le_bytes(), "one answer per ask");
        match answer[0] {
            1 => got += (n - ANSWER_HEADER) as u64,
            2 => {
                throttled += 1;
                let mut nanos = [0u8; 8];
                nanos.copy_from_slice(&answer[8..16]);
                std::thread::sleep(Duration::from_nanos(u64::from_le_bytes(nanos)));
            }
            tag => panic!("answer tag {tag}"),
        }
    }
    assert!(throttled > 0);
    // No more than the bucket's burst (1000) and 1000 bytes a second since
    // before the daemon started, real VMM's included.
    let bound = 1000.0 + 1000.0 * started.elapsed().as_secs_f64();
    assert!(
        (got as f64) <= bound,
        "a compromised guest process got {got} bytes, more than {bound}"
    );
    eprintln!("compromised guest process got {got} bytes, bound {bound:.0}, throttled {throttled}");
    assert_eq!(daemon.guest("limited").bytes, got);
    // The main serving process lives and serves the others.
    assert!(daemon.is_running());
    serve_64(&mut other);
    assert!(daemon.log().contains("bad message on the entropy link"));
    signal::kill(victim, Signal::SIGCONT).unwrap();
}

/// Under systemd with its file descriptor store, `systemctl restart` and a
/// kill of the top process keep a guest process's VMM connection too: the
/// store holds what the guest process reported, and the next start hands
/// it to a new guest process.
#[test]
fn guest_processes_keep_their_vmm_connections_through_restarts_by_systemd() {
    use common::fake_systemd::FakeSystemd;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let args = [
        "serve",
        "--source",
        "os",
        "--isolation",
        "guest",
        "--socket",
        socket.to_str().unwrap(),
    ];
    let mut systemd = FakeSystemd::new();
    let notify = systemd.path.clone();
    let env = [
        ("NOTIFY_SOCKET", notify.as_os_str()),
        ("VHOST_RNG_TEST_RESTART_BACKOFF_MS", "10".as_ref()),
    ];
    let mut daemon = Daemon::start_with_fds(&args, &env, &[]);
    systemd.wait_for("READY=1\nSTATUS=serving 1 guest(s)");
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    serve_64(&mut vmm);
    let negotiated = vmm.sent_requests().len();
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        common::wait_until("the guest's record with its connection", || {
            systemd
                .record("vm")
                .is_some_and(|r| !r["state"]["connection"].is_null())
        });
        let process = guest_process(&daemon, "vm").unwrap();
        let _ = daemon.stop_with(signal);
        common::wait_gone(process);
        systemd.sync();
        // Posted while no daemon runs: answered by the next one.
        vmm.post(&[Buffer::writable(64)]).unwrap();
        vmm.kick().unwrap();
        daemon = Daemon::start_with_fds(&args, &env, &systemd.passed());
        systemd.wait_for("READY=1\nSTATUS=serving 1 guest(s)");
        assert_eq!(vmm.wait_used(1, PATIENCE).unwrap()[0].len, 64);
        serve_64(&mut vmm);
        assert_eq!(vmm.sent_requests().len(), negotiated, "set up again");
        let process = guest_process(&daemon, "vm").unwrap();
        assert!(maps_inode(process, memfd_inode(&vmm)));
        let serving: Vec<Pid> = daemon_processes(&daemon)
            .into_iter()
            .filter(|&pid| maps_inode(pid, memfd_inode(&vmm)))
            .collect();
        assert_eq!(serving, [process]);
    }
}

/// A starved guest in a guest process (raw mode, a FIFO source with nothing
/// in it yet) is answered once the source delivers, without another kick:
/// the serving process wakes it over the entropy link's eventfd, which the
/// guest process's event loop waits on.
#[test]
fn a_starved_guest_in_a_guest_process_is_woken_over_its_link() {
    let dir = tempfile::tempdir().unwrap();
    // The source is opened by the serving process, which runs as the test
    // user: let it in.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let fifo = dir.path().join("entropy.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let socket = dir.path().join("starved.sock");
    let source = format!("file={}", fifo.display());
    let mut daemon = Daemon::start_sandboxed([
        "serve",
        "--isolation",
        "guest",
        "--mode",
        "raw",
        "--source",
        &source,
        "--socket",
        socket.to_str().unwrap(),
    ]);
    daemon.wait_for_socket(&socket);
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    let writer =
        common::starved_request_is_answered_once_fed(&mut vmm, fifo, PATIENCE, || daemon.log());
    drop(vmm);
    drop(daemon);
    writer.join().unwrap();
}
