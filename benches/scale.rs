// SPDX-License-Identifier: Apache-2.0
//! Scale: what one backend process costs a host that runs hundreds of VMs,
//! each with its own vhost-user socket, most of the time doing nothing.
//!
//! For each backend (vhost-rng with `--source os`, vhost-rng with its
//! default sources, and the reference backend `vhost-device-rng` from
//! rust-vmm) this starts one daemon with `--guests` sockets (default 512) in
//! a temporary directory and waits until every socket file exists. Then:
//!
//! 1. Idle, nothing connected: the process is measured over `--idle-secs`
//!    (default 5) after a 1 s settle.
//! 2. One in-tree test VMM (`vhost_rng_testing::TestVmm`, QEMU profile,
//!    256 KiB of guest memory, 16-entry queue) connects to every socket, one
//!    after the other (timed: "connect all"). Each posts one 64-byte request,
//!    all are kicked, and every one must come back with 64 bytes that are not
//!    all zero (buffers are zeroed before posting): every guest is served.
//! 3. Idle with every guest connected: measured the same way.
//! 4. Every test VMM disconnects as QEMU does at guest shutdown; once the
//!    thread count stops falling (at most 5 s), measured again (in later
//!    cycles, once the descriptor count stops falling too), so a thread,
//!    descriptor or memory leak per connection shows up against step 1.
//! 5. Steps 2 and 4 are repeated (`--cycles`, default 3 in all, without the
//!    idle windows), sampling the process with every guest connected and
//!    after each disconnection: what every reconnection (a VM reboot or
//!    migration) leaves behind accumulates here.
//!
//! Between steps 3 and 4, a steady load with every guest connected: for `--steady-secs`
//! (default 10), every guest reads `--steady-rate` bytes a second
//! (default 1024, one request a second, the guests' posts spread evenly
//! over each second), every answer checked; measured the same way, so
//! the daemon's CPU and RSS at a steady trickle per guest show (issue 15:
//! 512 guests at 1 KiB/s, < 2% of a core, < 64 MiB).
//!
//! "Measured" means, from `/proc/PID`: VmRSS (with its anonymous and shared
//! memory parts: pages of guest memory the backend touched count as shared),
//! Threads (and the number of `/proc/PID/task` entries), open descriptors
//! (`/proc/PID/fd`), and CPU over the idle window: utime + stime from
//! `/proc/PID/stat` in clock ticks (as % of one core), the scheduler's exact
//! run time summed over threads (`se.sum_exec_runtime` in
//! `/proc/PID/task/TID/sched`), and context switches per second summed over
//! threads (`/proc/PID/task/TID/status`): a backend that polls while idle
//! shows up in the last figure even when it uses too little CPU to be
//! charged a clock tick. Per-thread figures are grouped by thread name (digits
//! replaced by `#`), so the thread model can be read off the report and a
//! thread that wakes while idle can be named.
//!
//! ```text
//! cargo bench --bench scale
//! cargo bench --bench scale -- --guests N --idle-secs S [--cycles N] [--peer PATH] [--no-default-sources]
//!                               [--steady-secs S] [--steady-rate BYTES]
//!                               [--isolation shared|guest]
//! ```
//!
//! - `--guests N`: sockets per backend (default 512).
//! - `--idle-secs S`: length of each idle measurement (default 5).
//! - `--cycles N`: connect/disconnect cycles per backend (default 3).
//! - `--peer PATH`: the `vhost-device-rng` binary (default
//!   `$HOME/.cargo/bin/vhost-device-rng`; without it only vhost-rng runs).
//! - `--no-default-sources`: skip the vhost-rng run with its default sources.
//! - `--steady-secs S`: length of the steady-load window (default 10; 0
//!   skips it).
//! - `--steady-rate BYTES`: bytes each guest reads a second in it, as one
//!   request (default 1024, at most 65536).
//! - `--isolation guest`: one more vhost-rng run (`--source os
//!   --isolation guest`: a guest process per vhost-user guest), next to the
//!   shared one in the same run; every figure sums the top process and all
//!   its children, so guest processes count. `shared` (the default) adds
//!   nothing.
//!
//! With the defaults a run takes a little over a minute. This process
//! raises its soft open-file limit to the hard limit before starting the
//! backends (they inherit it); the limit each backend ran with is reported.
//! Results and their analysis: `docs/scale.md`.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Process, Result, peer_version, ticks_per_second};
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig, raise_fd_limit};

/// Guest RAM per test VMM: small, so hundreds fit in this process.
const GUEST_MEMORY: usize = 256 << 10;
/// Descriptors in each test VMM's request queue.
const QUEUE_SIZE: u16 = 16;
/// The size of the Linux virtio-rng driver's requests.
const REQUEST_LEN: u32 = 64;
/// Pause before each idle measurement, so start-up or connection work is over.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for a backend to create all its sockets, or to exit.
const START_STOP: Duration = Duration::from_secs(30);
/// Longest wait for a request to complete.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the threads of ended connections to go away.
const DISCONNECT_SETTLE: Duration = Duration::from_secs(5);

fn main() {
    if let Err(message) = run() {
        eprintln!("scale benchmark aborted: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    let fd_limit = raise_fd_limit().map_err(|e| format!("raising the fd limit: {e}"))?;
    let needed = options.guests as u64 * 6 + 64;
    if fd_limit < needed {
        return Err(format!(
            "open-file limit {fd_limit} is too low for {} test VMMs (about {needed} needed)",
            options.guests
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| format!("creating a temporary directory: {e}"))?;

    println!("vhost-rng scale benchmark");
    println!();
    print_machine();
    println!(
        "settings: {} guests per backend, {} s per idle measurement (after {} s settle); \
         test VMM: QEMU profile, {} KiB guest memory, queue {QUEUE_SIZE}, one {REQUEST_LEN}-byte \
         request per guest; this process's open-file limit {fd_limit}",
        options.guests,
        options.idle.as_secs_f64(),
        SETTLE.as_secs(),
        GUEST_MEMORY >> 10,
    );
    if let Some(note) = &options.peer_note {
        println!("note: {note}; measuring vhost-rng only");
    }
    println!();

    let mut specs = vec![BackendSpec::VhostRng {
        sources: Some("os"),
        isolated: false,
    }];
    if options.isolated {
        specs.push(BackendSpec::VhostRng {
            sources: Some("os"),
            isolated: true,
        });
    }
    if options.default_sources {
        specs.push(BackendSpec::VhostRng {
            sources: None,
            isolated: false,
        });
    }
    if let Some(peer) = &options.peer {
        specs.push(BackendSpec::Peer(peer.clone()));
    }

    let mut reports = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        eprintln!("[{}/{}] {}", index + 1, specs.len(), spec.label());
        let run_dir = dir.path().join(format!("run{index}"));
        std::fs::create_dir(&run_dir)
            .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
        reports.push(measure(spec, &run_dir, &options)?);
    }

    print_report(&options, &reports);
    Ok(())
}

struct Options {
    guests: usize,
    idle: Duration,
    peer: Option<PathBuf>,
    /// Why there is no peer, when there is none.
    peer_note: Option<String>,
    default_sources: bool,
    /// Connect/disconnect cycles per backend (the first one is measured).
    cycles: usize,
    /// Length of the steady-load window (zero: none).
    steady: Duration,
    /// Bytes each guest reads a second during it.
    steady_rate: u32,
    /// Also run vhost-rng with `--isolation guest`.
    isolated: bool,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self> {
        let usage = "usage: cargo bench --bench scale [-- [--guests N] [--idle-secs S] \
                     [--cycles N] [--peer PATH] [--no-default-sources] [--steady-secs S] \
                     [--steady-rate BYTES] [--isolation shared|guest]]";
        let mut guests = 512;
        let mut idle = 5.0;
        let mut peer = None;
        let mut default_sources = true;
        let mut cycles = 3;
        let mut steady = 10.0;
        let mut steady_rate = 1024;
        let mut isolated = false;
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| format!("{name} needs a value\n{usage}"))
            };
            match arg.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "--guests" => {
                    guests = value("--guests")?
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| (1..=10_000).contains(&n))
                        .ok_or_else(|| format!("--guests needs 1 to 10000\n{usage}"))?;
                }
                "--idle-secs" => {
                    idle = value("--idle-secs")?
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .ok_or_else(|| format!("--idle-secs needs a positive number\n{usage}"))?;
                }
                "--cycles" => {
                    cycles = value("--cycles")?
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("--cycles needs a positive integer\n{usage}"))?;
                }
                "--steady-secs" => {
                    steady = value("--steady-secs")?
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .ok_or_else(|| format!("--steady-secs needs a number >= 0\n{usage}"))?;
                }
                "--steady-rate" => {
                    steady_rate = value("--steady-rate")?
                        .parse::<u32>()
                        .ok()
                        .filter(|&n| (1..=65536).contains(&n))
                        .ok_or_else(|| format!("--steady-rate needs 1 to 65536\n{usage}"))?;
                }
                "--peer" => peer = Some(PathBuf::from(value("--peer")?)),
                "--no-default-sources" => default_sources = false,
                "--isolation" => {
                    isolated = match value("--isolation")?.as_str() {
                        "guest" => true,
                        "shared" => false,
                        _ => return Err(format!("--isolation takes shared or guest\n{usage}")),
                    };
                }
                "-h" | "--help" => {
                    println!("{usage}");
                    std::process::exit(0);
                }
                other => return Err(format!("unexpected argument '{other}'\n{usage}")),
            }
        }
        let mut peer_note = None;
        let peer = match peer {
            Some(path) if path.is_file() => Some(path),
            Some(path) => return Err(format!("--peer {}: no such file", path.display())),
            None => match std::env::var_os("HOME") {
                Some(home) => {
                    let path = PathBuf::from(home).join(".cargo/bin/vhost-device-rng");
                    if path.is_file() {
                        Some(path)
                    } else {
                        peer_note = Some(format!(
                            "no peer at {} (cargo install vhost-device-rng, or --peer PATH)",
                            path.display()
                        ));
                        None
                    }
                }
                None => {
                    peer_note = Some("HOME is not set and no --peer given".into());
                    None
                }
            },
        };
        Ok(Options {
            guests,
            idle: Duration::from_secs_f64(idle),
            peer,
            peer_note,
            default_sources,
            cycles,
            steady: Duration::from_secs_f64(steady),
            steady_rate,
            isolated,
        })
    }
}

/// Which backend to run.
enum BackendSpec {
    /// vhost-rng, with `--source SOURCE` or (None) its default sources,
    /// and `--isolation guest` if `isolated`.
    VhostRng {
        sources: Option<&'static str>,
        isolated: bool,
    },
    /// vhost-device-rng at this path.
    Peer(PathBuf),
}

impl BackendSpec {
    fn label(&self) -> String {
        match self {
            BackendSpec::VhostRng {
                sources: Some(source),
                isolated: false,
            } => format!("vhost-rng --source {source}"),
            BackendSpec::VhostRng {
                sources: Some(source),
                isolated: true,
            } => format!("vhost-rng --source {source} --isolation guest"),
            BackendSpec::VhostRng { sources: None, .. } => "vhost-rng (default sources)".into(),
            BackendSpec::Peer(_) => "vhost-device-rng".into(),
        }
    }

    /// The command, the socket paths it will create and a printable form of
    /// the command line.
    fn command(&self, dir: &Path, guests: usize) -> (Command, Vec<PathBuf>, String) {
        match self {
            BackendSpec::VhostRng { sources, isolated } => {
                let sockets: Vec<PathBuf> = (0..guests)
                    .map(|i| dir.join(format!("g{i:03}.sock")))
                    .collect();
                let mut command = Command::new(env!("CARGO_BIN_EXE_vhost-rng"));
                command.arg("serve");
                for socket in &sockets {
                    command.arg("--socket").arg(socket);
                }
                let mut shown = format!("vhost-rng serve --socket DIR/g000.sock ... (x{guests})");
                if let Some(source) = sources {
                    command.arg("--source").arg(source);
                    let _ = write!(shown, " --source {source}");
                }
                if *isolated {
                    command.arg("--isolation").arg("guest");
                    shown.push_str(" --isolation guest");
                }
                command.arg("--control").arg(dir.join("control.sock"));
                shown.push_str(" --control DIR/control.sock");
                command.env("RUST_LOG", "info");
                (command, sockets, shown)
            }
            BackendSpec::Peer(binary) => {
                let base = dir.join("peer.sock");
                let sockets = (0..guests)
                    .map(|i| dir.join(format!("peer.sock{i}")))
                    .collect();
                let mut command = Command::new(binary);
                command
                    .arg("--socket-path")
                    .arg(&base)
                    .arg("-c")
                    .arg(guests.to_string())
                    .env("RUST_LOG", "info");
                let shown = format!(
                    "{} --socket-path DIR/peer.sock -c {guests}",
                    binary
                        .file_name()
                        .map_or_else(|| "vhost-device-rng".into(), |n| n.to_string_lossy())
                );
                (command, sockets, shown)
            }
        }
    }
}

/// Waits until every socket file exists.
fn wait_for_sockets(backend: &mut Process, sockets: &[PathBuf]) -> Result<()> {
    let started = Instant::now();
    let mut next = 0;
    while next < sockets.len() {
        if sockets[next].exists() {
            next += 1;
            continue;
        }
        backend.check_alive()?;
        if started.elapsed() > START_STOP {
            return Err(backend.failure(&format!(
                "created only {next} of {} sockets in {} s",
                sockets.len(),
                START_STOP.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Everything measured for one backend.
struct Report {
    label: String,
    command: String,
    version: String,
    /// The backend's soft and hard open-file limits.
    fd_limits: String,
    /// Spawn until every socket file existed.
    startup: Duration,
    connect_all: Duration,
    first_requests: Duration,
    served: usize,
    /// Why a guest was not served, for the first one that was not.
    serve_failure: Option<String>,
    disconnect_all: Duration,
    disconnect_errors: usize,
    /// How long the threads of ended connections took to go away (or the
    /// time waited for them, when they did not).
    disconnect_settle: Duration,
    unconnected: Window,
    connected: Window,
    /// Every guest reading `steady_rate` bytes a second (None: skipped).
    steady: Option<Steady>,
    disconnected: Window,
    /// The backend with every guest connected and after they disconnected,
    /// for each connect/disconnect cycle (the first is the measured one).
    cycles: Vec<Cycle>,
    /// Warning and error lines in the backend's log.
    log_problems: Vec<String>,
}

fn measure(spec: &BackendSpec, dir: &Path, options: &Options) -> Result<Report> {
    let label = spec.label();
    let (command, sockets, shown) = spec.command(dir, options.guests);
    let version = match spec {
        BackendSpec::VhostRng { .. } => format!("{} (this tree)", env!("CARGO_PKG_VERSION")),
        BackendSpec::Peer(binary) => peer_version(binary),
    };

    let started = Instant::now();
    let mut backend = Process::spawn(label.clone(), command, dir.join("backend.log"), START_STOP)?
        .with_log_tail(30);
    wait_for_sockets(&mut backend, &sockets)?;
    let startup = started.elapsed();
    let pid = backend.pid();
    let fd_limits = fd_limits(pid);

    eprintln!("  idle, no guest connected");
    std::thread::sleep(SETTLE);
    let unconnected = Window::measure(pid, options.idle)?;

    let config = TestVmmConfig {
        memory_size: GUEST_MEMORY,
        queue_size: QUEUE_SIZE,
        ..TestVmmConfig::qemu()
    };
    eprintln!(
        "  cycle 1/{}: connecting {} guests",
        options.cycles,
        sockets.len()
    );
    let (vmms, first) = connect_round(&mut backend, &sockets, &config)?;

    eprintln!("  idle, {} guests connected", vmms.len());
    std::thread::sleep(SETTLE);
    let connected = Window::measure(pid, options.idle)?;

    let mut vmms = vmms;
    let steady = if options.steady.is_zero() {
        None
    } else {
        eprintln!(
            "  steady load: {} guests reading {} B/s each for {:.0} s",
            vmms.len(),
            options.steady_rate,
            options.steady.as_secs_f64()
        );
        let steady = Steady::run(pid, &mut vmms, options.steady, options.steady_rate)?;
        backend.check_alive()?;
        Some(steady)
    };

    eprintln!("  disconnecting");
    let (disconnect_all, disconnect_errors) = disconnect_round(vmms);
    let disconnect_settle = wait_for_threads(pid, unconnected.after.tasks);
    backend.check_alive()?;

    eprintln!("  idle, all disconnected");
    std::thread::sleep(SETTLE);
    let disconnected = Window::measure(pid, options.idle)?;

    // Further cycles without idle windows: what each reconnection leaves.
    let mut cycles = vec![Cycle {
        connected: connected.after.clone(),
        disconnected: disconnected.after.clone(),
        served: first.served,
    }];
    for cycle in 2..=options.cycles {
        eprintln!(
            "  cycle {cycle}/{}: connect, one request each, disconnect",
            options.cycles
        );
        let (vmms, round) = connect_round(&mut backend, &sockets, &config)?;
        let connected = Sample::take(pid)?;
        disconnect_round(vmms);
        wait_for_threads(pid, unconnected.after.tasks);
        // A backend that serves connections in a fixed set of threads has
        // no thread count to watch: its descriptors say when it is done.
        wait_for_fds(pid, unconnected.after.fds);
        backend.check_alive()?;
        cycles.push(Cycle {
            connected,
            disconnected: Sample::take(pid)?,
            served: round.served,
        });
    }

    backend.check_alive()?;
    backend.stop()?;
    let log_problems = backend
        .log_text()
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .map(str::to_owned)
        .collect();

    Ok(Report {
        label,
        command: shown,
        version,
        fd_limits,
        startup,
        connect_all: first.connect_all,
        first_requests: first.first_requests,
        served: first.served,
        serve_failure: first.serve_failure,
        disconnect_all,
        disconnect_errors,
        disconnect_settle,
        unconnected,
        connected,
        steady,
        disconnected,
        cycles,
        log_problems,
    })
}

/// The backend while every guest reads a steady trickle.
struct Steady {
    window: Window,
    /// Bytes each guest asked for a second.
    rate: u32,
    guests: usize,
    /// Requests answered in full, and those that were not (late, short or
    /// all zero).
    answered: u64,
    failed: u64,
    first_failure: Option<String>,
}

impl Steady {
    /// Every second, each guest posts one `rate`-byte request, the posts
    /// spread evenly over the second; after the second's posts each answer
    /// is checked.
    fn run(pid: u32, vmms: &mut [TestVmm], length: Duration, rate: u32) -> Result<Self> {
        let before = Sample::take(pid)?;
        let started = Instant::now();
        let spacing = Duration::from_secs(1) / u32::try_from(vmms.len().max(1)).unwrap_or(1);
        let (mut answered, mut failed, mut first_failure) = (0, 0, None);
        let mut second = 0u32;
        while started.elapsed() < length {
            let second_start = started + Duration::from_secs(u64::from(second));
            let mut heads = Vec::with_capacity(vmms.len());
            for (index, vmm) in vmms.iter_mut().enumerate() {
                let due = second_start + spacing * u32::try_from(index).unwrap_or(0);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let head = vmm
                    .post(&[Buffer::writable(rate)])
                    .map_err(|e| format!("guest {index}: posting: {e}"))?;
                vmm.kick()
                    .map_err(|e| format!("guest {index}: kick: {e}"))?;
                heads.push(head);
            }
            for (index, (vmm, head)) in vmms.iter_mut().zip(heads).enumerate() {
                match check_served_len(vmm, head, rate) {
                    Ok(()) => answered += 1,
                    Err(why) => {
                        failed += 1;
                        first_failure.get_or_insert(format!("guest {index}: {why}"));
                    }
                }
            }
            second += 1;
            if let Some(wait) = (started + Duration::from_secs(u64::from(second)))
                .checked_duration_since(Instant::now())
            {
                std::thread::sleep(wait);
            }
        }
        let after = Sample::take(pid)?;
        Ok(Steady {
            window: Window { before, after },
            rate,
            guests: vmms.len(),
            answered,
            failed,
            first_failure,
        })
    }
}

/// One connect/disconnect cycle.
struct Cycle {
    connected: Sample,
    disconnected: Sample,
    served: usize,
}

/// What one round of connecting every guest measured.
struct Round {
    connect_all: Duration,
    first_requests: Duration,
    served: usize,
    serve_failure: Option<String>,
}

/// Connects one test VMM per socket, one after the other, then posts one
/// request on each, kicks, and checks every one is filled.
fn connect_round(
    backend: &mut Process,
    sockets: &[PathBuf],
    config: &TestVmmConfig,
) -> Result<(Vec<TestVmm>, Round)> {
    let started = Instant::now();
    let mut vmms = Vec::with_capacity(sockets.len());
    for (index, socket) in sockets.iter().enumerate() {
        let vmm = TestVmm::connect(socket, config.clone()).map_err(|e| {
            backend.failure(&format!(
                "refused guest {index} ({}): {e}",
                socket.display()
            ))
        })?;
        vmms.push(vmm);
    }
    let connect_all = started.elapsed();
    backend.check_alive()?;

    let started = Instant::now();
    let mut heads = Vec::with_capacity(vmms.len());
    for (index, vmm) in vmms.iter_mut().enumerate() {
        let fail = |e| format!("{}: guest {index}: posting: {e}", backend.name());
        heads.push(vmm.post(&[Buffer::writable(REQUEST_LEN)]).map_err(fail)?);
        vmm.kick().map_err(fail)?;
    }
    let mut served = 0;
    let mut serve_failure = None;
    for (index, (vmm, head)) in vmms.iter_mut().zip(&heads).enumerate() {
        match check_served(vmm, *head) {
            Ok(()) => served += 1,
            Err(why) => {
                serve_failure.get_or_insert(format!("guest {index}: {why}"));
            }
        }
    }
    let first_requests = started.elapsed();
    backend.check_alive()?;
    Ok((
        vmms,
        Round {
            connect_all,
            first_requests,
            served,
            serve_failure,
        },
    ))
}

/// Disconnects every test VMM as QEMU does at guest shutdown. Returns the
/// time taken and how many disconnections failed.
fn disconnect_round(vmms: Vec<TestVmm>) -> (Duration, usize) {
    let started = Instant::now();
    let errors = vmms
        .into_iter()
        .map(TestVmm::disconnect)
        .filter(std::result::Result::is_err)
        .count();
    (started.elapsed(), errors)
}

/// Waits for the request with head `head` and checks it was filled.
fn check_served(vmm: &mut TestVmm, head: u16) -> std::result::Result<(), String> {
    check_served_len(vmm, head, REQUEST_LEN)
}

/// Waits for the `len`-byte request with head `head` and checks it was
/// filled.
fn check_served_len(vmm: &mut TestVmm, head: u16, len: u32) -> std::result::Result<(), String> {
    let used = vmm.wait_used(1, SERVE_TIMEOUT).map_err(|e| e.to_string())?;
    let elem = used[0];
    if elem.head != head || elem.len != len {
        return Err(format!(
            "completed head {} with {} bytes (expected head {head}, {len} bytes)",
            elem.head, elem.len
        ));
    }
    let bytes = vmm.read_buffer(head, 0).map_err(|e| e.to_string())?;
    if bytes.iter().all(|&b| b == 0) {
        return Err("the buffer came back all zero".into());
    }
    Ok(())
}

/// Waits until the backend has at most `baseline` threads, or until its
/// thread count has not fallen for a second, at most `DISCONNECT_SETTLE`.
fn wait_for_threads(pid: u32, baseline: usize) -> Duration {
    let started = Instant::now();
    let mut last = usize::MAX;
    let mut last_change = Instant::now();
    while started.elapsed() < DISCONNECT_SETTLE {
        let now = count_dir(&format!("/proc/{pid}/task"));
        if now <= baseline {
            break;
        }
        if now < last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// Waits until the backend's descriptors (both processes) are back to
/// `baseline`, or stop falling for a second (at most
/// [`DISCONNECT_SETTLE`]).
fn wait_for_fds(pid: u32, baseline: usize) {
    let started = Instant::now();
    let mut last = usize::MAX;
    let mut last_change = Instant::now();
    while started.elapsed() < DISCONNECT_SETTLE {
        let Ok(now) = Sample::take(pid).map(|sample| sample.fds) else {
            return;
        };
        if now <= baseline {
            return;
        }
        if now < last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(1) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One thread of the backend at one moment.
#[derive(Clone)]
struct TaskSample {
    name: String,
    /// utime + stime, clock ticks.
    ticks: u64,
    /// The scheduler's run time, ms.
    exec_ms: f64,
    /// Voluntary plus involuntary context switches.
    switches: u64,
}

/// The backend process at one moment.
#[derive(Clone)]
struct Sample {
    at: Instant,
    rss_kib: u64,
    anon_kib: u64,
    shmem_kib: u64,
    /// Proportional set size (`Pss:` of smaps_rollup): file pages shared by
    /// several processes (the binary of each guest process) counted once
    /// in all.
    pss_kib: u64,
    /// Processes summed.
    processes: usize,
    /// `Threads:` from status.
    threads: u64,
    /// Entries of /proc/PID/task.
    tasks: usize,
    fds: usize,
    /// utime + stime of the whole process (threads that exited included).
    ticks: u64,
    per_task: HashMap<u32, TaskSample>,
    /// RSS and descriptors of the top process alone, when the backend runs
    /// as a top process and a serving child (vhost-rng); the other fields
    /// add the two up.
    top: Option<(u64, usize)>,
}

impl Sample {
    /// The process `pid` and its children (vhost-rng's serving process),
    /// added up.
    fn take(pid: u32) -> Result<Self> {
        let mut sample = Self::take_one(pid)?;
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut any = false;
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let Ok(part) = Self::take_one(child) else {
                continue;
            };
            if !any {
                sample.top = Some((sample.rss_kib, sample.fds));
                any = true;
            }
            sample.rss_kib += part.rss_kib;
            sample.anon_kib += part.anon_kib;
            sample.shmem_kib += part.shmem_kib;
            sample.pss_kib += part.pss_kib;
            sample.processes += 1;
            sample.threads += part.threads;
            sample.tasks += part.tasks;
            sample.fds += part.fds;
            sample.ticks += part.ticks;
            sample.per_task.extend(part.per_task);
        }
        Ok(sample)
    }

    fn take_one(pid: u32) -> Result<Self> {
        let proc_dir = format!("/proc/{pid}");
        let status = std::fs::read_to_string(format!("{proc_dir}/status"))
            .map_err(|e| format!("reading {proc_dir}/status: {e}"))?;
        let stat = std::fs::read_to_string(format!("{proc_dir}/stat"))
            .map_err(|e| format!("reading {proc_dir}/stat: {e}"))?;
        let mut per_task = HashMap::new();
        let tasks = std::fs::read_dir(format!("{proc_dir}/task"))
            .map_err(|e| format!("listing {proc_dir}/task: {e}"))?;
        for entry in tasks.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            // A thread may exit between listing and reading: skip it then.
            if let Some(task) = task_sample(&format!("{proc_dir}/task/{tid}")) {
                per_task.insert(tid, task);
            }
        }
        Ok(Sample {
            at: Instant::now(),
            rss_kib: status_field(&status, "VmRSS").unwrap_or(0),
            anon_kib: status_field(&status, "RssAnon").unwrap_or(0),
            shmem_kib: status_field(&status, "RssShmem").unwrap_or(0),
            pss_kib: std::fs::read_to_string(format!("{proc_dir}/smaps_rollup"))
                .ok()
                .and_then(|rollup| status_field(&rollup, "Pss"))
                .unwrap_or(0),
            processes: 1,
            threads: status_field(&status, "Threads").unwrap_or(0),
            tasks: count_dir(&format!("{proc_dir}/task")),
            fds: count_dir(&format!("{proc_dir}/fd")),
            ticks: stat_ticks(&stat).unwrap_or(0),
            per_task,
            top: None,
        })
    }
}

fn task_sample(dir: &str) -> Option<TaskSample> {
    let name = std::fs::read_to_string(format!("{dir}/comm")).ok()?;
    let ticks = stat_ticks(&std::fs::read_to_string(format!("{dir}/stat")).ok()?)?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let switches = status_field(&status, "voluntary_ctxt_switches")?
        + status_field(&status, "nonvoluntary_ctxt_switches")?;
    let sched = std::fs::read_to_string(format!("{dir}/sched")).unwrap_or_default();
    let exec_ms = sched
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "se.sum_exec_runtime").then(|| value.trim().parse::<f64>().ok())?
        })
        .unwrap_or(0.0);
    Some(TaskSample {
        name: name.trim().to_owned(),
        ticks,
        exec_ms,
        switches,
    })
}

/// utime + stime (fields 14 and 15) of a `stat` file, in clock ticks.
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised command name start with field 3.
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The number in a `Key:  value [kB]` line of a `status` file.
fn status_field(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name != key {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map_or(0, |entries| entries.count())
}

/// The backend sampled at both ends of an idle window.
struct Window {
    before: Sample,
    after: Sample,
}

/// What the threads sharing one name pattern did during a window.
#[derive(Clone, Copy, Default)]
struct KindActivity {
    threads: usize,
    ticks: u64,
    exec_ms: f64,
    switches: u64,
}

impl Window {
    fn measure(pid: u32, idle: Duration) -> Result<Self> {
        let before = Sample::take(pid)?;
        std::thread::sleep(idle);
        let after = Sample::take(pid)?;
        Ok(Window { before, after })
    }

    fn seconds(&self) -> f64 {
        (self.after.at - self.before.at).as_secs_f64()
    }

    /// CPU from utime + stime, % of one core.
    fn cpu_percent(&self) -> f64 {
        let ticks = self.after.ticks.saturating_sub(self.before.ticks) as f64;
        100.0 * ticks / ticks_per_second() / self.seconds()
    }

    /// CPU from the scheduler's run time of the threads alive at the end, %
    /// of one core.
    fn exec_percent(&self) -> f64 {
        let ms: f64 = self.kinds().values().map(|k| k.exec_ms).sum();
        100.0 * ms / 1000.0 / self.seconds()
    }

    fn switches_per_second(&self) -> f64 {
        let switches: u64 = self.kinds().values().map(|k| k.switches).sum();
        switches as f64 / self.seconds()
    }

    /// Activity per thread name pattern (digits replaced by `#`), over the
    /// threads alive at the end of the window.
    fn kinds(&self) -> BTreeMap<String, KindActivity> {
        let mut kinds: BTreeMap<String, KindActivity> = BTreeMap::new();
        for (tid, task) in &self.after.per_task {
            let start = self.before.per_task.get(tid);
            let kind = kinds.entry(kind_of(&task.name)).or_default();
            kind.threads += 1;
            kind.ticks += task.ticks - start.map_or(0, |s| s.ticks.min(task.ticks));
            kind.exec_ms += (task.exec_ms - start.map_or(0.0, |s| s.exec_ms)).max(0.0);
            kind.switches += task.switches - start.map_or(0, |s| s.switches.min(task.switches));
        }
        kinds
    }

    /// The threads that ran the most during the window: (tid, name, exec ms,
    /// switches), busiest first.
    fn busiest(&self, n: usize) -> Vec<(u32, String, f64, u64)> {
        let mut tasks: Vec<(u32, String, f64, u64)> = self
            .after
            .per_task
            .iter()
            .map(|(tid, task)| {
                let start = self.before.per_task.get(tid);
                (
                    *tid,
                    task.name.clone(),
                    (task.exec_ms - start.map_or(0.0, |s| s.exec_ms)).max(0.0),
                    task.switches - start.map_or(0, |s| s.switches.min(task.switches)),
                )
            })
            .filter(|(_, _, ms, switches)| *ms > 0.0 || *switches > 0)
            .collect();
        tasks.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)));
        tasks.truncate(n);
        tasks
    }
}

/// A thread name with its digits replaced by `#`, so the threads of
/// different guests fall together.
fn kind_of(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect()
}

/// "soft / hard" open-file limits of a process.
fn fd_limits(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some(format!("{} / {}", fields.get(3)?, fields.get(4)?))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn print_machine() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = status_field(&meminfo, "MemTotal").map_or_else(
        || "unknown".into(),
        |kib| format!("{:.1} GiB", kib as f64 / 1048576.0),
    );
    println!(
        "machine: nproc {}, CPU {}, RAM {memory}, kernel {}",
        support::nproc(),
        support::cpu_model(),
        support::kernel_release()
    );
    support::print_date();
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// A Markdown table: a header row, then rows of a label and one cell per backend.
fn table(header: &[String], rows: &[(String, Vec<String>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "| --- |{}",
        " ---: |".repeat(header.len().saturating_sub(1))
    );
    for (label, cells) in rows {
        let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
    }
    out
}

/// Picks one of a report's idle windows.
type WindowOf = fn(&Report) -> &Window;

fn print_report(options: &Options, reports: &[Report]) {
    let n = options.guests;
    println!("Backends:");
    println!();
    for report in reports {
        println!(
            "- {}: {}; `{}`; open-file limit (soft / hard) {}",
            report.label, report.version, report.command, report.fd_limits
        );
    }
    println!();

    let mut header = vec![String::new()];
    header.extend(reports.iter().map(|r| r.label.clone()));
    let cells = |f: &dyn Fn(&Report) -> String| reports.iter().map(f).collect::<Vec<_>>();

    let mut rows = vec![
        (
            format!("start-up: all {n} sockets present (s)"),
            cells(&|r| secs(r.startup)),
        ),
        (
            format!("connect all {n} guests, one by one (s)"),
            cells(&|r| secs(r.connect_all)),
        ),
        (
            "ms per guest connect".into(),
            cells(&|r| format!("{:.2}", r.connect_all.as_secs_f64() * 1000.0 / n as f64)),
        ),
        (
            format!("one {REQUEST_LEN}-byte request on each: served"),
            cells(&|r| format!("{}/{n}", r.served)),
        ),
        (
            "  ... all posted and checked in (s)".into(),
            cells(&|r| secs(r.first_requests)),
        ),
        (
            format!("disconnect all {n} (s)"),
            cells(&|r| {
                if r.disconnect_errors == 0 {
                    secs(r.disconnect_all)
                } else {
                    format!(
                        "{} ({} errors)",
                        secs(r.disconnect_all),
                        r.disconnect_errors
                    )
                }
            }),
        ),
        (
            "  ... then threads settled within (s)".into(),
            cells(&|r| secs(r.disconnect_settle)),
        ),
    ];
    let phases: [(&str, WindowOf); 3] = [
        ("no guest connected", |r| &r.unconnected),
        ("all guests connected", |r| &r.connected),
        ("after all disconnected", |r| &r.disconnected),
    ];
    for (phase, window) in phases {
        rows.push((format!("**{phase}, idle**"), cells(&|_| String::new())));
        rows.extend([
            ("RSS (MiB)".into(), cells(&|r| mib(window(r).after.rss_kib))),
            (
                "  of which the top process: RSS (MiB) / fds".into(),
                cells(&|r| match window(r).after.top {
                    Some((rss, fds)) => format!("{} / {fds}", mib(rss)),
                    None => "(one process)".into(),
                }),
            ),
            (
                "  anon / shmem (MiB)".into(),
                cells(&|r| {
                    let s = &window(r).after;
                    format!("{} / {}", mib(s.anon_kib), mib(s.shmem_kib))
                }),
            ),
            (
                "  PSS (MiB); processes".into(),
                cells(&|r| {
                    let s = &window(r).after;
                    format!("{}; {}", mib(s.pss_kib), s.processes)
                }),
            ),
            (
                "threads (Threads / tasks)".into(),
                cells(&|r| {
                    let s = &window(r).after;
                    format!("{} / {}", s.threads, s.tasks)
                }),
            ),
            (
                "open fds".into(),
                cells(&|r| window(r).after.fds.to_string()),
            ),
            (
                "CPU, utime+stime (% of a core)".into(),
                cells(&|r| format!("{:.2}", window(r).cpu_percent())),
            ),
            (
                "CPU, sched run time (% of a core)".into(),
                cells(&|r| format!("{:.3}", window(r).exec_percent())),
            ),
            (
                "context switches / s".into(),
                cells(&|r| format!("{:.1}", window(r).switches_per_second())),
            ),
        ]);
    }
    if reports.iter().any(|r| r.steady.is_some()) {
        fn steady(r: &Report) -> Option<&Steady> {
            r.steady.as_ref()
        }
        let rate = reports
            .iter()
            .find_map(|r| r.steady.as_ref())
            .map_or(0, |s| s.rate);
        rows.push((
            format!("**all guests connected, each reading {rate} B/s**"),
            cells(&|_| String::new()),
        ));
        rows.extend([
            (
                "requests answered / failed".into(),
                cells(&|r| match steady(r) {
                    Some(s) => match &s.first_failure {
                        None => format!("{} / 0", s.answered),
                        Some(why) => format!("{} / {} (first: {why})", s.answered, s.failed),
                    },
                    None => "-".into(),
                }),
            ),
            (
                "bytes served a second, all guests".into(),
                cells(&|r| match steady(r) {
                    Some(s) => format!(
                        "{:.0} ({} guests)",
                        s.answered as f64 * f64::from(s.rate) / s.window.seconds(),
                        s.guests
                    ),
                    None => "-".into(),
                }),
            ),
            (
                "RSS (MiB), all processes".into(),
                cells(&|r| steady(r).map_or("-".into(), |s| mib(s.window.after.rss_kib))),
            ),
            (
                "threads (Threads / tasks)".into(),
                cells(&|r| {
                    steady(r).map_or("-".into(), |s| {
                        format!("{} / {}", s.window.after.threads, s.window.after.tasks)
                    })
                }),
            ),
            (
                "CPU, utime+stime (% of a core), all processes".into(),
                cells(&|r| {
                    steady(r).map_or("-".into(), |s| format!("{:.2}", s.window.cpu_percent()))
                }),
            ),
            (
                "CPU, sched run time (% of a core)".into(),
                cells(&|r| {
                    steady(r).map_or("-".into(), |s| format!("{:.3}", s.window.exec_percent()))
                }),
            ),
            (
                "context switches / s".into(),
                cells(&|r| {
                    steady(r).map_or("-".into(), |s| {
                        format!("{:.1}", s.window.switches_per_second())
                    })
                }),
            ),
        ]);
    }
    rows.push((
        format!("**per connected guest** (connected - none) / {n}"),
        cells(&|_| String::new()),
    ));
    rows.extend([
        (
            "RSS (KiB)".into(),
            cells(&|r| {
                let delta = r.connected.after.rss_kib as f64 - r.unconnected.after.rss_kib as f64;
                format!("{:.1}", delta / n as f64)
            }),
        ),
        (
            "  anon (KiB)".into(),
            cells(&|r| {
                let delta = r.connected.after.anon_kib as f64 - r.unconnected.after.anon_kib as f64;
                format!("{:.1}", delta / n as f64)
            }),
        ),
        (
            "threads".into(),
            cells(&|r| {
                let delta = r.connected.after.tasks as f64 - r.unconnected.after.tasks as f64;
                format!("{:.2}", delta / n as f64)
            }),
        ),
        (
            "open fds".into(),
            cells(&|r| {
                let delta = r.connected.after.fds as f64 - r.unconnected.after.fds as f64;
                format!("{:.2}", delta / n as f64)
            }),
        ),
    ]);
    let cycles = options.cycles;
    rows.push((
        format!("**left behind: after disconnect - before connect** (after 1 / {cycles} cycles)"),
        cells(&|_| String::new()),
    ));
    // Each backend's figure after the first cycle and after the last one.
    let left = |r: &Report, of: fn(&Sample) -> i64| {
        let base = of(&r.unconnected.after);
        let first = of(&r.cycles[0].disconnected) - base;
        let last = r
            .cycles
            .last()
            .map_or(first, |c| of(&c.disconnected) - base);
        format!("{first:+} / {last:+}")
    };
    rows.extend([
        (
            "RSS (KiB)".into(),
            cells(&|r| left(r, |s| s.rss_kib as i64)),
        ),
        ("threads".into(), cells(&|r| left(r, |s| s.tasks as i64))),
        ("open fds".into(), cells(&|r| left(r, |s| s.fds as i64))),
    ]);
    println!(
        "Results ({n} guests; idle figures over {} s; memory, threads and fds at the end of each \
         window):",
        options.idle.as_secs_f64()
    );
    println!();
    print!("{}", table(&header, &rows));
    println!();

    for report in reports {
        if let Some(why) = &report.serve_failure {
            println!(
                "NOT SERVED: {}: {} of {n} guests unserved; first: {why}",
                report.label,
                n - report.served
            );
        }
    }

    println!(
        "Connect/disconnect cycles (each: connect all {n}, one {REQUEST_LEN}-byte request each, \
         disconnect all; the first is the measured one). open fds / RSS (MiB) / threads:"
    );
    println!();
    let mut header = vec![
        "backend".to_owned(),
        "cycle".to_owned(),
        "served".to_owned(),
    ];
    header.extend(["all connected".to_owned(), "after disconnect".to_owned()]);
    let counts = |s: &Sample| format!("{} / {} / {}", s.fds, mib(s.rss_kib), s.tasks);
    let mut rows = Vec::new();
    for report in reports {
        rows.push((
            report.label.clone(),
            vec![
                "before".into(),
                "-".into(),
                "-".into(),
                counts(&report.unconnected.after),
            ],
        ));
        for (index, cycle) in report.cycles.iter().enumerate() {
            rows.push((
                report.label.clone(),
                vec![
                    (index + 1).to_string(),
                    format!("{}/{n}", cycle.served),
                    counts(&cycle.connected),
                    counts(&cycle.disconnected),
                ],
            ));
        }
    }
    print!("{}", table(&header, &rows));
    println!();

    println!(
        "Threads by name (digits shown as #): count, and CPU run time (ms) / context switches \
         over each idle window (none connected | all connected | after disconnect):"
    );
    println!();
    for report in reports {
        println!("{}:", report.label);
        println!();
        let windows = [&report.unconnected, &report.connected, &report.disconnected];
        let kinds: Vec<BTreeMap<String, KindActivity>> =
            windows.iter().map(|w| w.kinds()).collect();
        let mut names: Vec<&String> = kinds.iter().flat_map(|k| k.keys()).collect();
        names.sort();
        names.dedup();
        let mut header = vec!["thread name".to_owned()];
        header.extend(["threads", "ms / switches"].iter().flat_map(|what| {
            ["none", "all", "after"]
                .iter()
                .map(move |phase| format!("{what} ({phase})"))
        }));
        let rows: Vec<(String, Vec<String>)> = names
            .iter()
            .map(|name| {
                let get = |i: usize| kinds[i].get(*name).copied().unwrap_or_default();
                let mut cells: Vec<String> = (0..3).map(|i| get(i).threads.to_string()).collect();
                cells.extend((0..3).map(|i| {
                    let k = get(i);
                    format!("{:.1} / {}", k.exec_ms, k.switches)
                }));
                (format!("`{name}`"), cells)
            })
            .collect();
        print!("{}", table(&header, &rows));
        println!();
        for (phase, window) in ["none", "all", "after"].iter().zip(windows) {
            let busiest = window.busiest(5);
            if busiest.is_empty() {
                continue;
            }
            let list: Vec<String> = busiest
                .iter()
                .map(|(tid, name, ms, switches)| {
                    format!("{name} (tid {tid}): {ms:.2} ms, {switches} switches")
                })
                .collect();
            println!("  busiest threads ({phase}): {}", list.join("; "));
        }
        if report.log_problems.is_empty() {
            println!("  log: no warnings or errors");
        } else {
            println!(
                "  log: {} warning/error lines, first: {}",
                report.log_problems.len(),
                report.log_problems[0]
            );
        }
        println!();
    }
}
