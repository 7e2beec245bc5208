// SPDX-License-Identifier: Apache-2.0
//! Many guests in one daemon: per-guest limits, runtime control over the
//! control socket, SIGHUP reload, and the metrics endpoint, all through the
//! real binary and real vhost-user connections.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, run_cli, wait_until};
use nix::sys::signal::{self, Signal};
use vhost_rng::service::status::DaemonStatus;
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

const TIMEOUT: Duration = Duration::from_secs(20);

fn serve(args: &[&str]) -> Daemon {
    let mut all = vec!["serve", "--source", "os"];
    all.extend_from_slice(args);
    let daemon = Daemon::start(all);
    // The control socket comes up last.
    daemon.wait_for_log("control socket on", 1);
    daemon
}

fn connect(path: &Path) -> TestVmm {
    TestVmm::connect(path, TestVmmConfig::qemu()).unwrap()
}

fn control_json(daemon: &Daemon, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--control", daemon.control().to_str().unwrap()]);
    let output = run_cli(all);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_throttled_guest_does_not_slow_an_unthrottled_one() {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow.sock");
    let fast = dir.path().join("fast.sock");
    let daemon = serve(&[
        "--guest",
        &format!(
            "name=slow,socket={},rate-bytes=4096,rate-period=1000",
            slow.display()
        ),
        "--guest",
        &format!("name=fast,socket={}", fast.display()),
    ]);
    wait_until("sockets", || slow.exists() && fast.exists());
    let mut slow_vmm = connect(&slow);
    let mut fast_vmm = connect(&fast);

    // The slow guest asks for far more than its limit...
    let heads: Vec<u16> = (0..8)
        .map(|_| slow_vmm.post(&[Buffer::writable(1024)]).unwrap())
        .collect();
    slow_vmm.kick().unwrap();

    // ...while the fast one is served as if alone.
    let started = Instant::now();
    for _ in 0..64 {
        fast_vmm.post(&[Buffer::writable(4096)]).unwrap();
        fast_vmm.kick().unwrap();
        let used = fast_vmm.wait_used(1, TIMEOUT).unwrap();
        assert_eq!(used[0].len, 4096);
    }
    let fast_time = started.elapsed();

    // The throttled requests complete in order, as tokens arrive: 4 KiB a
    // second from an empty bucket means about 2 s for all 8.
    let used = slow_vmm.wait_used(8, TIMEOUT).unwrap();
    let slow_time = started.elapsed();
    assert_eq!(used.iter().map(|u| u.head).collect::<Vec<_>>(), heads);
    assert!(used.iter().all(|u| u.len == 1024));
    assert!(
        slow_time >= Duration::from_millis(1900),
        "8 KiB at 4 KiB/s took only {slow_time:?}"
    );
    assert!(
        fast_time < slow_time,
        "fast guest {fast_time:?} vs slow {slow_time:?}"
    );

    let slow_status = daemon
        .guests()
        .into_iter()
        .find(|g| g.name == "slow")
        .unwrap();
    assert!(slow_status.throttled_seconds > 1.0, "{slow_status:?}");
    assert_eq!(slow_status.rate_bytes, Some(4096));
}

#[test]
fn a_reconnect_does_not_reset_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let daemon = serve(&[
        "--guest",
        &format!(
            "name=vm,socket={},rate-bytes=2048,burst=2048",
            socket.display()
        ),
    ]);
    wait_until("socket", || socket.exists());

    let mut vmm = connect(&socket);
    vmm.post(&[Buffer::writable(2048)]).unwrap();
    vmm.kick().unwrap();
    vmm.wait_used(1, TIMEOUT).unwrap();
    drop(vmm); // a VM crash and reboot
    daemon.wait_for_log("guest vm: VMM disconnected", 1);

    let mut rebooted = connect(&socket);
    let started = Instant::now();
    rebooted.post(&[Buffer::writable(2048)]).unwrap();
    rebooted.kick().unwrap();
    rebooted.wait_used(1, TIMEOUT).unwrap();
    // A fresh bucket would not be empty; the guest's own bucket, kept across
    // the reconnect, needs most of a second to earn 2 KiB again.
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "served after {:?}: the budget was reset",
        started.elapsed()
    );
}

#[test]
fn guests_are_added_listed_and_removed_at_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.sock");
    let daemon = serve(&["--socket", first.to_str().unwrap()]);
    let added = dir.path().join("added.sock");

    control_json(
        &daemon,
        &[
            "guest",
            "add",
            &format!("name=added,socket={},rate-bytes=65536", added.display()),
        ],
    );
    wait_until("added socket", || added.exists());
    let mut vmm = connect(&added);
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    assert_eq!(vmm.wait_used(1, TIMEOUT).unwrap()[0].len, 64);

    let guests = daemon.guests();
    let names: Vec<&str> = guests.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["added", "first"]);
    let added_status = &guests[0];
    assert!(
        added_status.connected && added_status.bytes >= 64,
        "{added_status:?}"
    );

    // A duplicate is refused with a reason and exit status 1.
    let output = run_cli([
        "guest",
        "add",
        &format!(
            "name=added,socket={}",
            dir.path().join("other.sock").display()
        ),
        "--control",
        daemon.control().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));

    control_json(&daemon, &["guest", "remove", "added"]);
    assert!(!added.exists(), "a removed guest's socket file stays");
    let names: Vec<String> = daemon.guests().into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["first"]);

    let status: DaemonStatus =
        serde_json::from_str(&control_json(&daemon, &["status", "--json"])).unwrap();
    assert_eq!(status.pool.mode, "drbg");
    assert_eq!(status.pool.sources[0].name, "os");
    assert_eq!(status.guests.len(), 1);
    let text = control_json(&daemon, &["status"]);
    assert!(text.contains("SOURCES") && text.contains("first"), "{text}");
}

#[test]
fn sighup_reloads_the_config_and_rejects_a_bad_one_whole() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vhost-rng.toml");
    let sock = |name: &str| dir.path().join(format!("{name}.sock"));
    let guest = |name: &str, extra: &str| {
        format!(
            "[[guest]]\nname = \"{name}\"\nsocket = \"{}\"\n{extra}\n",
            sock(name).display()
        )
    };
    std::fs::write(
        &config,
        guest("keep", "rate-bytes = 1000") + &guest("drop", ""),
    )
    .unwrap();
    let daemon = serve(&["--config", config.to_str().unwrap()]);
    wait_until("sockets", || sock("keep").exists() && sock("drop").exists());
    let mut kept = connect(&sock("keep"));

    std::fs::write(
        &config,
        guest("keep", "rate-bytes = 9000") + &guest("new", ""),
    )
    .unwrap();
    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("SIGHUP: reloaded", 1);
    assert!(
        daemon
            .log()
            .contains("1 added, 1 removed, 1 changed, 0 unchanged"),
        "{}",
        daemon.log()
    );
    assert!(sock("new").exists() && !sock("drop").exists());
    let keep = daemon
        .guests()
        .into_iter()
        .find(|g| g.name == "keep")
        .unwrap();
    assert_eq!(keep.rate_bytes, Some(9000));
    assert!(
        keep.connected,
        "an unchanged endpoint must keep its connection"
    );
    kept.post(&[Buffer::writable(64)]).unwrap();
    kept.kick().unwrap();
    assert_eq!(kept.wait_used(1, TIMEOUT).unwrap()[0].len, 64);

    // A bad file changes nothing, even its valid parts.
    std::fs::write(
        &config,
        guest("keep", "") + &guest("other", "rate-bytes = 0"),
    )
    .unwrap();
    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("configuration rejected", 1);
    let names: Vec<String> = daemon.guests().into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["keep", "new"]);
    assert!(daemon.log().contains("vhost-rng.toml"), "{}", daemon.log());

    // A truncated file (a full disk, a write cut short) is no order to
    // detach every VM: the reload is refused and the guest still served.
    std::fs::write(&config, "").unwrap();
    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("configuration rejected", 2);
    assert!(
        daemon
            .log()
            .contains("would remove all 2 running guests (keep, new); write `guest = []`"),
        "{}",
        daemon.log()
    );
    let names: Vec<String> = daemon.guests().into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["keep", "new"]);
    assert!(daemon.guest("keep").connected);
    kept.post(&[Buffer::writable(64)]).unwrap();
    kept.kick().unwrap();
    assert_eq!(kept.wait_used(1, TIMEOUT).unwrap()[0].len, 64);

    // Said explicitly, no guests is what the file gets.
    std::fs::write(&config, "guest = []\n").unwrap();
    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("SIGHUP: reloaded", 2);
    assert!(
        daemon
            .log()
            .contains("0 added, 2 removed, 0 changed, 0 unchanged"),
        "{}",
        daemon.log()
    );
    assert!(daemon.guests().is_empty());
    assert!(!sock("keep").exists() && !sock("new").exists());
}

/// Scrapes http://ADDR/metrics with a plain socket.
fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the series `name{labels}` in a scrape.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{scrape}"))
}

#[test]
fn metrics_are_served_in_the_exposition_format() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("m.sock");
    let daemon = serve(&[
        "--socket",
        socket.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ]);
    daemon.wait_for_log("metrics on http://", 1);
    let log = daemon.log();
    let addr = log
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();

    let mut vmm = connect(&socket);
    vmm.post(&[Buffer::writable(4096)]).unwrap();
    vmm.kick().unwrap();
    vmm.wait_used(1, TIMEOUT).unwrap();

    let text = scrape(&addr);
    assert!(
        text.contains("# TYPE vhost_rng_guest_bytes counter"),
        "{text}"
    );
    assert!(sample(&text, "vhost_rng_guest_bytes_total{guest=\"m\"}") >= 4096.0);
    assert_eq!(sample(&text, "vhost_rng_guest_connected{guest=\"m\"}"), 1.0);
    assert!(sample(&text, "vhost_rng_source_bytes_read_total{source=\"os\"}") > 0.0);
    assert_eq!(
        sample(&text, "vhost_rng_source_healthy{source=\"os\"}"),
        1.0
    );
    assert!(text.trim_end().ends_with("# EOF"));
}

/// Keeps 8 small requests in flight for `time`; returns the bytes received.
fn greedy(socket: &Path, time: Duration) -> usize {
    let mut vmm = connect(socket);
    let started = Instant::now();
    let mut in_flight = 0;
    let mut received = 0;
    let mut used = Vec::new();
    while started.elapsed() < time {
        while in_flight < 8 {
            vmm.post(&[Buffer::writable(64)]).unwrap();
            in_flight += 1;
        }
        vmm.kick().unwrap();
        used.clear();
        vmm.reap(&mut used).unwrap();
        if used.is_empty() {
            let _ = vmm
                .wait_used(1, Duration::from_millis(50))
                .map(|u| used.extend(u));
        }
        in_flight -= used.len();
        received += used.iter().map(|u| u.len as usize).sum::<usize>();
    }
    received
}

#[test]
fn in_raw_mode_a_scarce_source_is_shared_by_weight() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("slow.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // A source of 64 kB/s, credited 1 bit/byte: about 6.4 kB/s of raw output.
    let writer_path = fifo.clone();
    std::thread::spawn(move || {
        let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
        let Ok(mut out) = std::fs::OpenOptions::new().write(true).open(&writer_path) else {
            return;
        };
        let mut chunk = [0u8; 6400];
        loop {
            urandom.read_exact(&mut chunk).unwrap();
            if out.write_all(&chunk).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let light = dir.path().join("light.sock");
    let heavy = dir.path().join("heavy.sock");
    let idle = dir.path().join("idle.sock");
    let mut daemon = Daemon::start([
        "serve".to_owned(),
        "--mode".into(),
        "raw".into(),
        "--source".into(),
        format!("file={}", fifo.display()),
        "--guest".into(),
        format!("name=light,socket={},weight=1", light.display()),
        "--guest".into(),
        format!("name=heavy,socket={},weight=3", heavy.display()),
        "--guest".into(),
        format!("name=idle,socket={},weight=10", idle.display()),
    ]);
    daemon.wait_for_socket(&idle);
    // The idle guest is connected but asks for nothing: its share goes to
    // the others.
    let _idle = connect(&idle);

    let time = Duration::from_secs(5);
    let heavy_thread = std::thread::spawn(move || greedy(&heavy, time));
    let light_bytes = greedy(&light, time);
    let heavy_bytes = heavy_thread.join().unwrap();

    let ratio = heavy_bytes as f64 / light_bytes.max(1) as f64;
    eprintln!("heavy {heavy_bytes} bytes, light {light_bytes} bytes, ratio {ratio:.2}");
    assert!(
        (2.0..=4.5).contains(&ratio),
        "weights 3:1 gave {heavy_bytes} : {light_bytes} bytes"
    );
    assert!(
        light_bytes + heavy_bytes > 10_000,
        "the source output was not used"
    );
}

fn threads_of(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", daemon.serving_pid()))
        .unwrap()
        .count()
}

#[test]
fn removing_idle_guests_leaves_no_threads_behind() {
    let dir = tempfile::tempdir().unwrap();
    // No socket at start: the directory of those added later is named
    // (Landlock confines the serving process to the directories it knows).
    let daemon = serve(&["--socket-dir", dir.path().to_str().unwrap()]);
    // The first vhost-user guest starts the event loops that serve every
    // later one (a fixed few, kept while the daemon runs): counted from
    // there.
    let socket = dir.path().join("first.sock");
    control_json(
        &daemon,
        &[
            "guest",
            "add",
            &format!("name=first,socket={}", socket.display()),
        ],
    );
    control_json(&daemon, &["guest", "remove", "first"]);
    let baseline = threads_of(&daemon);
    for round in 0..5 {
        let socket = dir.path().join(format!("idle{round}.sock"));
        let spec = format!("name=idle{round},socket={}", socket.display());
        control_json(&daemon, &["guest", "add", &spec]);
        control_json(&daemon, &["guest", "remove", &format!("idle{round}")]);
    }
    wait_until("the removed guests' threads to end", || {
        threads_of(&daemon) <= baseline
    });
}

#[test]
fn a_reload_keeps_guests_added_at_runtime_and_a_rejected_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let file_guest = dir.path().join("file.sock");
    let write = |max_rate: u64, extra: &str| {
        std::fs::write(
            &config,
            format!(
                "max-rate = {max_rate}\n[[guest]]\nname = \"file\"\nsocket = \"{}\"\n{extra}",
                file_guest.display()
            ),
        )
        .unwrap();
    };
    write(100000, "");
    let daemon = serve(&["--config", config.to_str().unwrap()]);
    let runtime = dir.path().join("runtime.sock");
    control_json(
        &daemon,
        &[
            "guest",
            "add",
            &format!("name=runtime,socket={}", runtime.display()),
        ],
    );

    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("SIGHUP: reloaded", 1);
    let names: Vec<String> = daemon.guests().into_iter().map(|g| g.name).collect();
    assert_eq!(
        names,
        ["file", "runtime"],
        "a reload removed a runtime guest"
    );
    assert!(runtime.exists());

    // A new max-rate together with a bad guest: nothing of it applies.
    write(
        5,
        "[[guest]]\nname = \"bad\"\nsocket = \"/nonexistent/dir/x.sock\"\n",
    );
    signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("configuration rejected", 1);
    let status: DaemonStatus =
        serde_json::from_str(&control_json(&daemon, &["status", "--json"])).unwrap();
    assert_eq!(status.max_rate, Some(100000));
    assert_eq!(status.guests.len(), 2);
}

fn fds_of(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.serving_pid()))
        .unwrap()
        .count()
}

/// An EGD client of the daemon, as QEMU's `rng-egd` is.
fn egd_client(path: &Path) -> std::os::unix::net::UnixStream {
    let client = std::os::unix::net::UnixStream::connect(path).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client
}

/// Whether an EGD client is still served: it asks for the entropy level
/// (command 0x00) and reads the 4-byte answer.
fn egd_answers(client: &mut std::os::unix::net::UnixStream) -> bool {
    client.write_all(&[0x00]).is_ok() && client.read_exact(&mut [0u8; 4]).is_ok()
}

#[test]
fn idle_egd_clients_cannot_lock_the_vmm_out_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let egd = dir.path().join("vm.egd");
    let daemon = serve(&["--guest", &format!("name=vm,egd={}", egd.display())]);
    let threads_before = threads_of(&daemon);
    // The guest's pool stream (and its wake-up descriptor) is made with its
    // first client and kept: a first client that comes and goes sets the
    // descriptors' baseline.
    let mut warm_up = egd_client(&egd);
    assert!(egd_answers(&mut warm_up));
    drop(warm_up);
    wait_until("the first client's thread to end", || {
        threads_of(&daemon) <= threads_before
    });
    let fds_before = fds_of(&daemon);

    // QEMU connects when the VM starts, and reads.
    let mut qemu = egd_client(&egd);
    assert!(egd_answers(&mut qemu));
    // Eight clients that connect and say nothing: the last of them makes
    // room by closing the first of them, not QEMU.
    let mut attackers: Vec<_> = (0..8).map(|_| egd_client(&egd)).collect();
    daemon.wait_for_log("closed to make room for a new one", 1);
    assert!(egd_answers(&mut qemu), "QEMU was locked out");
    // A ninth and a tenth cannot close QEMU either.
    attackers.push(egd_client(&egd));
    attackers.push(egd_client(&egd));
    wait_until("three evictions", || {
        daemon.guest("vm").evicted_connections == 3
    });
    assert!(egd_answers(&mut qemu), "QEMU was locked out");
    // Each was shut down before it was counted: its end of file is there
    // to read already, where the others have nothing.
    for (i, attacker) in attackers.iter_mut().enumerate() {
        attacker.set_nonblocking(true).unwrap();
        let closed = matches!(attacker.read(&mut [0u8; 1]), Ok(0));
        attacker.set_nonblocking(false).unwrap();
        assert_eq!(closed, i < 3, "attacker {i}");
        if !closed {
            assert!(egd_answers(attacker), "attacker {i}");
        }
    }
    let vm = daemon.guest("vm");
    assert_eq!((vm.connections, vm.refused_connections), (12, 0));

    drop((qemu, attackers));
    wait_until(
        "the daemon's threads and descriptors back to before",
        || threads_of(&daemon) <= threads_before && fds_of(&daemon) <= fds_before,
    );
}
