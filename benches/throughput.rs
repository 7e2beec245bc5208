// SPDX-License-Identifier: Apache-2.0
//! Throughput of the virtio-rng data path: vhost-rng against the reference
//! vhost-user RNG backend, `vhost-device-rng` (rust-vmm), side by side.
//!
//! Each backend runs as its own process on a Unix socket in a temporary
//! directory; the in-tree test VMM (`vhost_rng_testing::TestVmm`, QEMU
//! profile, 256-entry queue, EVENT_IDX) plays the guest driver in this
//! process and keeps the queue full: 128 requests posted, every completed
//! request checked (used length = buffer length, or the run aborts; in
//! vhost-rng's raw mode any length from 1 up, see below), and
//! completed requests re-posted (with one kick if the backend asks for it)
//! as soon as 32 have gathered. Two shapes of request, each one
//! device-writable descriptor:
//!
//! - 4 KiB: bulk throughput, reported in MB/s (10^6 bytes per second);
//! - 64 bytes: the size the Linux virtio-rng driver posts (one
//!   `SMP_CACHE_BYTES` buffer), so what matters is requests per second,
//!   reported in thousands (kreq/s).
//!
//! By default the driver polls the used ring (`--driver poll`) and asks the
//! backend not to signal, so the backend never waits for the driver: the
//! figure is the backend's capacity on one core. With `--driver sleep` it
//! sleeps on the call eventfd until at least 32 requests completed, as an
//! interrupt-driven guest does.
//!
//! For reference it also measures, in this process, how fast the bytes can be
//! produced at all with the same buffer sizes: `getrandom::fill` (the kernel
//! CSPRNG, vhost-rng's `os` source), `read(2)` of `/dev/urandom` (the
//! peer's default source) and vhost-rng's per-guest DRBG
//! (`vhost_rng::entropy::drbg::Drbg`, which answers each request in the default
//! `drbg` mode).
//!
//! Every figure is the median of `--runs` runs; the runs of the backends are
//! interleaved so slow drift of the machine hits both alike, and the CPU
//! time other processes took during each measurement is reported (the
//! figures are only meaningful on an otherwise idle machine). These are
//! reported figures, not pass/fail thresholds.
//!
//! Run it with
//!
//! ```text
//! cargo bench --bench throughput
//! cargo bench --bench throughput -- --peer PATH --seconds S --runs N
//! ```
//!
//! - `--peer PATH`: the `vhost-device-rng` binary (0.1.0, `cargo install
//!   vhost-device-rng`); default `$HOME/.cargo/bin/vhost-device-rng`, and
//!   without it only vhost-rng is measured.
//! - `--seconds S`: length of one backend measurement (default 3, after
//!   0.3 s of warm-up); each in-process source measurement takes S/6.
//! - `--runs N`: runs per figure (default 3).
//! - `--driver poll|sleep`: how the driver waits for completions (default poll).
//! - `--vhost-rng-arg ARG`: append ARG to `vhost-rng serve` (repeatable),
//!   e.g. `--vhost-rng-arg --mode --vhost-rng-arg raw`.
//! - `--only 4k|64`: measure one request shape only (for profiling).
//!
//! In raw mode (vhost-rng's status says so) every byte a guest gets is
//! conditioned full-entropy output, and a request is filled with what the
//! pool has: partial fills are legal virtio-rng answers and are counted as
//! delivered bytes. The benchmark then also reads the sources' counters
//! (`vhost-rng status --json` on the control socket it gives the daemon)
//! at both ends of each measurement and reports delivered bytes per second
//! against the entropy the sources were credited with meanwhile, and
//! against the most the conditioner can make of that credit (256 bits out
//! for 320 credited bits in).
//!
//! With the defaults a run takes a little under a minute. Results and their
//! analysis: `docs/performance.md`.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{
    Process, Result, cpu_seconds, machine_busy_seconds, median, peer_version, tree_cpu_seconds,
};
use vhost_rng::entropy::drbg::{Drbg, ReseedPolicy, SEED_BYTES};
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig, UsedElem};

/// Descriptors in the request queue.
const QUEUE_SIZE: u16 = 256;
/// Requests kept posted while measuring.
const IN_FLIGHT: usize = 128;
/// Completed requests re-posted together; with `--driver sleep` also how
/// many completions the driver waits for before it reaps.
const BATCH: usize = 32;
/// Untimed running before each backend measurement.
const WARM_UP: Duration = Duration::from_millis(300);
/// Longest wait for completions before the run is declared stuck.
const STALL: Duration = Duration::from_secs(5);
/// Longest wait for a backend to come up or go away.
const START_STOP: Duration = Duration::from_secs(10);

const BULK_LEN: u32 = 4096;
const SMALL_LEN: u32 = 64;
const MB: f64 = 1e6;
const K: f64 = 1e3;

fn main() {
    if let Err(message) = run() {
        eprintln!("throughput benchmark aborted: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    let dir = tempfile::tempdir().map_err(|e| format!("creating a temporary directory: {e}"))?;

    println!("vhost-rng throughput benchmark");
    println!();
    support::print_machine();
    println!(
        "settings: {} s per backend measurement (after {} ms warm-up), {} run(s), median \
         reported; queue {QUEUE_SIZE}, {IN_FLIGHT} requests in flight, driver {}",
        options.seconds.as_secs_f64(),
        WARM_UP.as_millis(),
        options.runs,
        options.wait.describe(),
    );

    let mut backends = vec![Backend::start_vhost_rng(
        dir.path(),
        &options.vhost_rng_args,
    )?];
    match &options.peer {
        Some(peer) => backends.push(Backend::start_peer(peer, dir.path())?),
        None => println!("note: {}; measuring vhost-rng only", options.peer_note),
    }
    for backend in &backends {
        println!("backend {}: {}", backend.name, backend.version);
        for line in &backend.startup_log {
            println!("  {line}");
        }
    }
    println!();

    let mut vmms = Vec::new();
    for backend in &backends {
        vmms.push(connect(backend)?);
    }

    let source_time = options.seconds / 6;
    let mut sources = vec![
        SourceRates::new(
            "getrandom::fill",
            "kernel CSPRNG (vhost-rng `os` source)",
            getrandom_rate,
        ),
        SourceRates::new(
            "read /dev/urandom",
            "kernel CSPRNG (vhost-device-rng's source)",
            urandom_rate,
        ),
        SourceRates::new(
            "vhost-rng Drbg::generate",
            "per-guest DRBG (vhost-rng drbg mode)",
            drbg_rate,
        ),
    ];
    let mut results: Vec<BackendRates> = backends.iter().map(|_| Default::default()).collect();
    for run in 1..=options.runs {
        eprintln!("run {run}/{}", options.runs);
        for source in &mut sources {
            for &len in &options.shapes {
                source.run(len, source_time)?;
            }
        }
        for ((backend, vmm), rates) in backends.iter().zip(&mut vmms).zip(&mut results) {
            for &len in &options.shapes {
                let rate = pipeline(vmm, backend, len, options.seconds, options.wait)?;
                if len == BULK_LEN {
                    rates.bulk.push(rate);
                } else {
                    rates.small.push(rate);
                }
            }
        }
    }

    for (backend, vmm) in backends.iter().zip(vmms) {
        vmm.disconnect()
            .map_err(|e| format!("{}: disconnecting: {e}", backend.name))?;
    }
    for backend in &mut backends {
        backend.process.stop()?;
    }

    print_report(&backends, &results, &sources);
    Ok(())
}

struct Options {
    peer: Option<PathBuf>,
    /// Why there is no peer, when there is none.
    peer_note: String,
    seconds: Duration,
    runs: usize,
    wait: Wait,
    vhost_rng_args: Vec<String>,
    /// The request shapes to measure.
    shapes: Vec<u32>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self> {
        let usage = "usage: cargo bench --bench throughput [-- [--peer PATH] [--seconds S] \
                     [--runs N] [--driver poll|sleep] [--vhost-rng-arg ARG]... [--only 4k|64]]";
        let mut peer = None;
        let mut seconds = 3.0;
        let mut runs = 3;
        let mut wait = Wait::Poll;
        let mut vhost_rng_args = Vec::new();
        let mut shapes = vec![BULK_LEN, SMALL_LEN];
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| format!("{name} needs a value\n{usage}"))
            };
            match arg.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "--peer" => peer = Some(PathBuf::from(value("--peer")?)),
                "--seconds" => {
                    seconds = value("--seconds")?
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .ok_or_else(|| format!("--seconds needs a positive number\n{usage}"))?;
                }
                "--runs" => {
                    runs = value("--runs")?
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("--runs needs a positive integer\n{usage}"))?;
                }
                "--driver" => {
                    wait = match value("--driver")?.as_str() {
                        "poll" => Wait::Poll,
                        "sleep" => Wait::Sleep,
                        _ => return Err(format!("--driver is poll or sleep\n{usage}")),
                    };
                }
                "--vhost-rng-arg" => vhost_rng_args.push(value("--vhost-rng-arg")?),
                "--only" => {
                    shapes = match value("--only")?.as_str() {
                        "4k" => vec![BULK_LEN],
                        "64" => vec![SMALL_LEN],
                        _ => return Err(format!("--only is 4k or 64\n{usage}")),
                    };
                }
                "-h" | "--help" => {
                    println!("{usage}");
                    std::process::exit(0);
                }
                other => return Err(format!("unexpected argument '{other}'\n{usage}")),
            }
        }

        let mut peer_note = String::new();
        let peer = match peer {
            Some(path) if path.is_file() => Some(path),
            Some(path) => return Err(format!("--peer {}: no such file", path.display())),
            None => {
                let default = std::env::var_os("HOME")
                    .map(|home| PathBuf::from(home).join(".cargo/bin/vhost-device-rng"));
                match default {
                    Some(path) if path.is_file() => Some(path),
                    Some(path) => {
                        peer_note = format!(
                            "no peer at {} (cargo install vhost-device-rng, or --peer PATH)",
                            path.display()
                        );
                        None
                    }
                    None => {
                        peer_note = "HOME is not set and no --peer given".into();
                        None
                    }
                }
            }
        };
        Ok(Options {
            peer,
            peer_note,
            seconds: Duration::from_secs_f64(seconds),
            runs,
            wait,
            vhost_rng_args,
            shapes,
        })
    }
}

/// A backend daemon running as a child process.
struct Backend {
    name: &'static str,
    version: String,
    /// What the backend logged while starting (vhost-rng: mode and sources).
    startup_log: Vec<String>,
    socket: PathBuf,
    process: Process,
    /// vhost-rng's control socket, for its status (None for the peer).
    control: Option<PathBuf>,
    /// vhost-rng in raw mode: requests may be partly filled.
    raw: bool,
}

impl Backend {
    /// `vhost-rng serve --socket DIR/vhost-rng.sock [ARGS]`, ready once it
    /// logs "serving on".
    fn start_vhost_rng(dir: &Path, args: &[String]) -> Result<Self> {
        let name = "vhost-rng";
        let socket = dir.join("vhost-rng.sock");
        let log = dir.join("vhost-rng.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_vhost-rng"));
        command
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "info");
        // A control socket of its own (for its status), unless one is named.
        let control = match args.iter().position(|arg| arg == "--control") {
            Some(at) => args.get(at + 1).map(PathBuf::from),
            None => {
                let control = dir.join("control.sock");
                command.arg("--control").arg(&control);
                Some(control)
            }
        };
        let mut process = Process::spawn(name, command, log, START_STOP)?;
        let log = process.wait_for_log("serving on", Duration::from_millis(10))?;
        let end = log.find("serving on").unwrap_or(0);
        let through_line = log[end..].find('\n').map_or(log.len(), |n| end + n);
        Ok(Backend {
            name,
            version: format!(
                "{} (this tree, release build), `vhost-rng serve --socket PATH{}`",
                env!("CARGO_PKG_VERSION"),
                args.iter().fold(String::new(), |all, arg| all + " " + arg)
            ),
            startup_log: log[..through_line].lines().map(strip_log_prefix).collect(),
            raw: match &control {
                Some(control) => {
                    // The control socket comes up just after the guests'.
                    let started = Instant::now();
                    while !control.exists() {
                        process.check_alive()?;
                        if started.elapsed() > START_STOP {
                            return Err(process.failure("did not create its control socket"));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    status(control)?["pool"]["mode"] == "raw"
                }
                None => false,
            },
            socket,
            process,
            control,
        })
    }

    /// `vhost-device-rng --socket-path DIR/peer.sock -c 1`, which listens on
    /// DIR/peer.sock0. Ready once that file exists (a probe connection would
    /// be taken for a VMM); `TestVmm::connect` retries while it still refuses.
    fn start_peer(binary: &Path, dir: &Path) -> Result<Self> {
        let name = "vhost-device-rng";
        let log = dir.join("peer.log");
        let socket = dir.join("peer.sock0");
        let mut command = Command::new(binary);
        command
            .arg("--socket-path")
            .arg(dir.join("peer.sock"))
            .arg("-c")
            .arg("1")
            .env("RUST_LOG", "info");
        let mut process = Process::spawn(name, command, log, START_STOP)?;
        let started = Instant::now();
        while !socket.exists() {
            process.check_alive()?;
            if started.elapsed() > START_STOP {
                return Err(process.failure("did not create its socket in time"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Backend {
            name,
            version: format!(
                "{}, `vhost-device-rng --socket-path PATH -c 1` (source /dev/urandom, no rate limit)",
                peer_version(binary)
            ),
            startup_log: Vec::new(),
            socket,
            process,
            control: None,
            raw: false,
        })
    }
}

/// `vhost-rng status --json` over `control`.
fn status(control: &Path) -> Result<serde_json::Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_vhost-rng"))
        .arg("status")
        .arg("--json")
        .arg("--control")
        .arg(control)
        .output()
        .map_err(|e| format!("running vhost-rng status: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "vhost-rng status: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("vhost-rng status --json: {e}"))
}

/// Entropy the sources have released to the conditioner so far, in bytes:
/// each source's approved bytes times its credit (bits per byte) / 8.
fn credited_bytes(control: &Path) -> Result<f64> {
    let status = status(control)?;
    let sources = status["pool"]["sources"]
        .as_array()
        .ok_or("vhost-rng status --json: no pool.sources")?;
    Ok(sources
        .iter()
        .map(|source| {
            source["bytes_contributed"].as_f64().unwrap_or(0.0)
                * source["min_entropy"].as_f64().unwrap_or(0.0)
                / 8.0
        })
        .sum())
}

/// An env_logger line without its `[time LEVEL target]` prefix.
fn strip_log_prefix(line: &str) -> String {
    match line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    {
        Some((_, message)) => message.to_owned(),
        None => line.to_owned(),
    }
}

/// Connects the test VMM and checks once, with buffers zeroed before posting,
/// that the backend really writes into them. Zeroing is then turned off: the
/// measurements should time the backend, not the driver's memset.
fn connect(backend: &Backend) -> Result<TestVmm> {
    let config = TestVmmConfig {
        queue_size: QUEUE_SIZE,
        ..TestVmmConfig::qemu()
    };
    let mut vmm = TestVmm::connect(&backend.socket, config).map_err(|e| {
        backend
            .process
            .failure(&format!("refused the test VMM: {e}"))
    })?;
    let fail = |e: vhost_rng_testing::Error| format!("{}: {e}", backend.name);
    for len in [BULK_LEN, SMALL_LEN] {
        for _ in 0..8 {
            vmm.post(&[Buffer::writable(len)]).map_err(fail)?;
        }
        vmm.kick().map_err(fail)?;
        let used = vmm.wait_used(8, STALL).map_err(fail)?;
        check_lengths(backend, &used, len)?;
        for elem in &used {
            let bytes = vmm.read_buffer(elem.head, 0).map_err(fail)?;
            if bytes.iter().all(|&b| b == 0) {
                return Err(format!(
                    "{}: request {} came back with {len} zero bytes: \
                     the backend did not write the buffer",
                    backend.name, elem.head
                ));
            }
        }
    }
    vmm.driver_mut().set_clear_buffers(false);
    Ok(vmm)
}

/// Every request must come back full; in raw mode, with at least a byte
/// (the pool fills it with what it has).
fn check_lengths(backend: &Backend, used: &[UsedElem], len: u32) -> Result<()> {
    let wrong = |elem: &&UsedElem| match backend.raw {
        true => elem.len == 0 || elem.len > len,
        false => elem.len != len,
    };
    match used.iter().find(wrong) {
        None => Ok(()),
        Some(elem) => Err(format!(
            "{}: request {} of {len} bytes completed with used length {} \
             (expected {}; is the backend rate-limited or failing?)",
            backend.name,
            elem.head,
            elem.len,
            if backend.raw {
                "1 to the buffer's length"
            } else {
                "the whole buffer"
            }
        )),
    }
}

/// How the driver learns about completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Spin on the used ring, re-posting as soon as `BATCH` requests have
    /// completed, and tell the backend not to signal: the queue never runs
    /// dry, so the figure is the backend's capacity. Takes one core for the
    /// driver.
    Poll,
    /// Sleep on the call eventfd until at least `BATCH` requests completed,
    /// as an interrupt-driven guest driver does. A backend that signals once
    /// per pass over the queue then alternates with the driver.
    Sleep,
}

impl Wait {
    fn describe(self) -> String {
        match self {
            Wait::Poll => format!(
                "poll (spins on the used ring, re-posts every {BATCH} completions, \
                 backend asked not to signal)"
            ),
            Wait::Sleep => format!("sleep (sleeps on the call eventfd until >= {BATCH} completed)"),
        }
    }
}

/// One timed pipeline measurement.
#[derive(Clone, Copy, Debug)]
struct Rate {
    requests_per_s: f64,
    bytes_per_s: f64,
    /// Kicks sent per request completed.
    kicks_per_request: f64,
    /// Call-eventfd signals received per request completed.
    calls_per_request: f64,
    /// CPU time of the backend process and its children per second of wall
    /// time (1.0 = one core busy).
    backend_cpu: f64,
    /// The same for this process (the test VMM; nothing else runs meanwhile).
    driver_cpu: f64,
    /// Busy CPU time of the whole machine outside these two processes, per
    /// second: anything above a few hundredths means the figures are disturbed.
    other_cpu: f64,
    /// Raw mode: entropy credited to the sources per second meanwhile, in bytes.
    credited_per_s: Option<f64>,
}

/// Counters read when the timed window opens and when it closes.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    kicks: u64,
    calls: u64,
    backend_cpu: f64,
    driver_cpu: f64,
    machine_busy: f64,
    /// Raw mode: the sources' credited bytes so far.
    credited: Option<f64>,
}

impl Snapshot {
    fn take(vmm: &mut TestVmm, backend: &Backend) -> Result<Self> {
        let credited = match (&backend.control, backend.raw) {
            (Some(control), true) => Some(credited_bytes(control)?),
            _ => None,
        };
        let fail = |e: vhost_rng_testing::Error| format!("{}: {e}", backend.name);
        Ok(Snapshot {
            at: Instant::now(),
            kicks: vmm.kicks(),
            calls: vmm.notifications().map_err(fail)?,
            backend_cpu: tree_cpu_seconds(backend.process.pid()),
            driver_cpu: cpu_seconds("/proc/self/stat"),
            machine_busy: machine_busy_seconds(),
            credited,
        })
    }
}

/// Keeps `IN_FLIGHT` requests of `len` bytes posted for `WARM_UP` plus
/// `duration`, and measures completions over `duration`.
fn pipeline(
    vmm: &mut TestVmm,
    backend: &Backend,
    len: u32,
    duration: Duration,
    wait: Wait,
) -> Result<Rate> {
    let name = backend.name;
    let fail = |e: vhost_rng_testing::Error| format!("{name}: {len}-byte requests: {e}");
    let request = [Buffer::writable(len)];
    let mut used = Vec::with_capacity(usize::from(QUEUE_SIZE));

    for _ in 0..IN_FLIGHT {
        vmm.post(&request).map_err(fail)?;
    }
    vmm.kick().map_err(fail)?;

    let warm_until = Instant::now() + WARM_UP;
    // Taken at the first reap after the warm-up: completions count from there.
    let mut start: Option<Snapshot> = None;
    let mut counted: u64 = 0;
    let mut counted_bytes: u64 = 0;
    let mut last_progress = Instant::now();
    let mut to_post = 0;
    let end = loop {
        used.clear();
        match wait {
            Wait::Sleep => {
                vmm.wait_used_into(BATCH, STALL, &mut used).map_err(fail)?;
                vmm.reap(&mut used).map_err(fail)?;
            }
            Wait::Poll => {
                let driver = vmm.driver_mut();
                if driver.reap(usize::MAX, &mut used).map_err(fail)? == 0 {
                    if last_progress.elapsed() > STALL {
                        return Err(format!(
                            "{name}: {len}-byte requests: nothing completed for {} s",
                            STALL.as_secs()
                        ));
                    }
                    std::hint::spin_loop();
                    continue;
                }
                // A used_event behind the driver's position never triggers:
                // the backend need not signal a driver that polls.
                let behind = driver.last_used_idx().wrapping_sub(1);
                driver.set_used_event(behind).map_err(fail)?;
                last_progress = Instant::now();
            }
        }
        check_lengths(backend, &used, len)?;
        match &start {
            None if Instant::now() >= warm_until => {
                start = Some(Snapshot::take(vmm, backend)?);
            }
            None => {}
            Some(start) => {
                counted += used.len() as u64;
                counted_bytes += used.iter().map(|elem| u64::from(elem.len)).sum::<u64>();
                if start.at.elapsed() >= duration {
                    break Snapshot::take(vmm, backend)?;
                }
            }
        }
        // Re-post in batches: publishing every single request would make the
        // driver and the backend fight over the avail ring's cache lines.
        to_post += used.len();
        if to_post >= BATCH {
            // The reaped requests go again as they were, one avail-index
            // store for all: the driver's cost per request must stay well
            // below a backend's, or it is the driver that is measured.
            vmm.driver_mut().repost_reaped(to_post).map_err(fail)?;
            to_post = 0;
            vmm.kick_if_needed().map_err(fail)?;
        }
    };
    let start = start.expect("the window opened before it closed");

    // Let the requests still in flight finish so the next measurement starts
    // from an empty queue.
    let in_flight = vmm.driver().in_flight();
    used.clear();
    vmm.wait_used_into(in_flight, STALL, &mut used)
        .map_err(fail)?;
    check_lengths(backend, &used, len)?;

    let seconds = (end.at - start.at).as_secs_f64();
    let backend_cpu = end.backend_cpu - start.backend_cpu;
    let driver_cpu = end.driver_cpu - start.driver_cpu;
    let machine_busy = end.machine_busy - start.machine_busy;
    Ok(Rate {
        requests_per_s: counted as f64 / seconds,
        bytes_per_s: counted_bytes as f64 / seconds,
        kicks_per_request: (end.kicks - start.kicks) as f64 / counted as f64,
        calls_per_request: (end.calls - start.calls) as f64 / counted as f64,
        backend_cpu: backend_cpu / seconds,
        driver_cpu: driver_cpu / seconds,
        // Clock-tick accounting can make this dip just below zero.
        other_cpu: ((machine_busy - backend_cpu - driver_cpu) / seconds).max(0.0),
        credited_per_s: end
            .credited
            .zip(start.credited)
            .map(|(end, start)| (end - start) / seconds),
    })
}

/// Calls of `fill` on a `len`-byte buffer per second, over about `duration`.
fn call_rate(
    len: u32,
    duration: Duration,
    mut fill: impl FnMut(&mut [u8]) -> Result<()>,
) -> Result<f64> {
    let mut buf = vec![0u8; len as usize];
    let started = Instant::now();
    let mut calls: u64 = 0;
    loop {
        for _ in 0..16 {
            fill(&mut buf)?;
            std::hint::black_box(&mut buf);
        }
        calls += 16;
        let elapsed = started.elapsed();
        if elapsed >= duration {
            return Ok(calls as f64 / elapsed.as_secs_f64());
        }
    }
}

/// The kernel CSPRNG through `getrandom::fill`, one call per buffer.
fn getrandom_rate(len: u32, duration: Duration) -> Result<f64> {
    call_rate(len, duration, |buf| {
        getrandom::fill(buf).map_err(|e| format!("getrandom: {e}"))
    })
}

/// The peer's source: one `read(2)` of `/dev/urandom` per buffer.
fn urandom_rate(len: u32, duration: Duration) -> Result<f64> {
    let mut file = File::open("/dev/urandom").map_err(|e| format!("opening /dev/urandom: {e}"))?;
    call_rate(len, duration, |buf| {
        let n = file
            .read(buf)
            .map_err(|e| format!("reading /dev/urandom: {e}"))?;
        if n != buf.len() {
            return Err(format!(
                "short read from /dev/urandom: {n} of {} bytes",
                buf.len()
            ));
        }
        Ok(())
    })
}

/// vhost-rng's per-guest DRBG with the daemon's default reseed policy, used
/// as a guest stream uses it: a clock reading and the reseed checks per
/// request, a reseed from 3/4 of the byte bound on (from a fixed seed here,
/// where the daemon takes one from its pool).
fn drbg_rate(len: u32, duration: Duration) -> Result<f64> {
    let mut drbg = Drbg::new(ReseedPolicy::default());
    let seed = [0x5a; SEED_BYTES];
    call_rate(len, duration, |buf| {
        let now = Instant::now();
        if drbg.needs_reseed(now) || drbg.due_soon(now) {
            drbg.reseed(&seed, now);
        }
        match drbg.generate(buf, now) {
            n if n == buf.len() => Ok(()),
            n => Err(format!("Drbg::generate gave {n} of {} bytes", buf.len())),
        }
    })
}

#[derive(Default)]
struct BackendRates {
    bulk: Vec<Rate>,
    small: Vec<Rate>,
}

/// In-process rates of one way of producing random bytes.
struct SourceRates {
    name: &'static str,
    what: &'static str,
    measure: fn(u32, Duration) -> Result<f64>,
    /// Calls per second with 4 KiB buffers, one entry per run.
    bulk: Vec<f64>,
    /// Calls per second with 64-byte buffers.
    small: Vec<f64>,
    /// The most CPU other processes used during one of its measurements.
    other_cpu: f64,
}

impl SourceRates {
    fn new(
        name: &'static str,
        what: &'static str,
        measure: fn(u32, Duration) -> Result<f64>,
    ) -> Self {
        SourceRates {
            name,
            what,
            measure,
            bulk: Vec::new(),
            small: Vec::new(),
            other_cpu: 0.0,
        }
    }

    /// Measures `len`-byte calls for about `duration` and records the rate.
    fn run(&mut self, len: u32, duration: Duration) -> Result<()> {
        let started = Instant::now();
        let busy = machine_busy_seconds();
        let own = cpu_seconds("/proc/self/stat");
        let rate = (self.measure)(len, duration)?;
        let seconds = started.elapsed().as_secs_f64();
        let other = (machine_busy_seconds() - busy) - (cpu_seconds("/proc/self/stat") - own);
        self.other_cpu = self.other_cpu.max(other / seconds);
        if len == BULK_LEN {
            self.bulk.push(rate);
        } else {
            self.small.push(rate);
        }
        Ok(())
    }
}

fn all_runs(values: impl IntoIterator<Item = f64>, scale: f64) -> String {
    values
        .into_iter()
        .map(|v| format!("{:.1}", v / scale))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(backends: &[Backend], results: &[BackendRates], sources: &[SourceRates]) {
    let bulk_of = |rates: &BackendRates| median(rates.bulk.iter().map(|r| r.bytes_per_s));
    let small_of = |rates: &BackendRates| median(rates.small.iter().map(|r| r.requests_per_s));
    let bulk_bytes = f64::from(BULK_LEN);

    let busiest = results
        .iter()
        .flat_map(|rates| rates.bulk.iter().chain(&rates.small))
        .map(|r| r.other_cpu)
        .chain(sources.iter().map(|s| s.other_cpu))
        .fold(0.0, f64::max);
    if busiest > 0.05 {
        println!(
            "WARNING: other processes used up to {busiest:.2} CPUs during the measurements; \
             the figures below are disturbed (see \"other CPU\" in the details)."
        );
        println!();
    }

    let mut table = String::new();
    let _ = writeln!(table, "| backend | 4 KiB MB/s | 64 B kreq/s |");
    let _ = writeln!(table, "| --- | ---: | ---: |");
    for (backend, rates) in backends.iter().zip(results) {
        let _ = writeln!(
            table,
            "| {} | {:.1} | {:.1} |",
            backend.name,
            bulk_of(rates) / MB,
            small_of(rates) / K
        );
    }
    if let [ours, peer] = results {
        let _ = writeln!(
            table,
            "| ratio vhost-rng / {} | {:.2} | {:.2} |",
            backends[1].name,
            bulk_of(ours) / bulk_of(peer),
            small_of(ours) / small_of(peer)
        );
    }
    println!(
        "Backends (median of {} runs):",
        results[0].bulk.len().max(results[0].small.len())
    );
    println!();
    print!("{table}");
    println!();

    println!("Producing the bytes in this process, one call per buffer (median):");
    println!();
    println!("| source | what | 4 KiB MB/s | 64 B kcalls/s | other CPU (max) |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for source in sources {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} |",
            source.name,
            source.what,
            median(source.bulk.iter().copied()) * bulk_bytes / MB,
            median(source.small.iter().copied()) / K,
            source.other_cpu,
        );
    }
    println!();

    println!("Backend rate as a share of a source's rate (same buffer size):");
    println!();
    for (backend, rates) in backends.iter().zip(results) {
        for source in sources {
            let fits = match backend.name {
                "vhost-rng" => source.name != "read /dev/urandom",
                _ => source.name == "read /dev/urandom",
            };
            if fits {
                println!(
                    "  {} vs {}: 4 KiB {:.0} %, 64 B {:.0} %",
                    backend.name,
                    source.name,
                    100.0 * bulk_of(rates) / (median(source.bulk.iter().copied()) * bulk_bytes),
                    100.0 * small_of(rates) / median(source.small.iter().copied())
                );
            }
        }
    }
    println!();

    for (backend, rates) in backends.iter().zip(results) {
        if backend.raw {
            print_raw(backend, rates);
        }
    }

    println!(
        "Details: every run; medians of notifications per request and of CPU use \
         (1.00 = one core busy for the whole window), and the most CPU other processes used:"
    );
    println!();
    println!(
        "| backend | request | runs | kicks/req | calls/req | backend CPU | per backend core | driver CPU | other CPU (max) |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (backend, rates) in backends.iter().zip(results) {
        for (label, runs, unit, scale) in [
            ("4 KiB", &rates.bulk, "MB/s", MB),
            ("64 B", &rates.small, "kreq/s", K),
        ] {
            let values = runs.iter().map(|r| {
                if scale == MB {
                    r.bytes_per_s
                } else {
                    r.requests_per_s
                }
            });
            let pick = |f: fn(&Rate) -> f64| median(runs.iter().map(f));
            let most_other = runs.iter().map(|r| r.other_cpu).fold(0.0, f64::max);
            // The rate divided by the backend's CPU use: what one core of
            // it would serve, when the machine's load kept it from a whole core.
            let per_core = median(runs.iter().map(|r| {
                let rate = if scale == MB {
                    r.bytes_per_s
                } else {
                    r.requests_per_s
                };
                rate / r.backend_cpu / scale
            }));
            println!(
                "| {} | {label} | {} {unit} | {:.4} | {:.4} | {:.2} | {per_core:.1} {unit} | {:.2} | {:.2} |",
                backend.name,
                all_runs(values, scale),
                pick(|r| r.kicks_per_request),
                pick(|r| r.calls_per_request),
                pick(|r| r.backend_cpu),
                pick(|r| r.driver_cpu),
                most_other,
            );
        }
    }
    println!();
    println!("Sources, every run (4 KiB in MB/s, 64 B in kcalls/s):");
    println!();
    for source in sources {
        println!(
            "  {}: 4 KiB [{}], 64 B [{}]",
            source.name,
            all_runs(source.bulk.iter().copied(), MB / bulk_bytes),
            all_runs(source.small.iter().copied(), K),
        );
    }
}

/// Raw mode: what the guest got against what the sources were credited
/// with. Conditioning turns 320 credited bits into 256 full-entropy bits,
/// so the most a guest can get is 80 % of the credited entropy.
fn print_raw(backend: &Backend, rates: &BackendRates) {
    const CEILING: f64 = 256.0 / 320.0;
    println!(
        "{} in raw mode: full-entropy bytes delivered against the entropy the sources \
         were credited with during the same window (median of runs; ceiling = credited x 256/320):",
        backend.name
    );
    println!();
    println!(
        "| request | delivered MB/s | credited entropy MB/s | delivered / credited | delivered / ceiling | every run, delivered / ceiling |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    for (label, runs) in [("4 KiB", &rates.bulk), ("64 B", &rates.small)] {
        if runs.is_empty() {
            continue;
        }
        let delivered = median(runs.iter().map(|r| r.bytes_per_s));
        let credited = median(runs.iter().filter_map(|r| r.credited_per_s));
        let shares: Vec<String> = runs
            .iter()
            .filter_map(|r| {
                r.credited_per_s
                    .map(|c| format!("{:.0} %", 100.0 * r.bytes_per_s / (c * CEILING)))
            })
            .collect();
        println!(
            "| {label} | {:.2} | {:.2} | {:.0} % | {:.0} % | {} |",
            delivered / MB,
            credited / MB,
            100.0 * delivered / credited,
            100.0 * delivered / (credited * CEILING),
            shares.join(", ")
        );
    }
    println!();
}
