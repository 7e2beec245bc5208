// SPDX-License-Identifier: Apache-2.0
//! The fallback paths a guest can use when it has no virtio-rng device,
//! measured against one real `vhost-rng serve --source os` process, one
//! client at a time:
//!
//! - **agent over hybrid vsock**: the agent channel protocol
//!   (`vhost_rng_protocol::wire`) on the Unix socket a hybrid-vsock VMM
//!   (Firecracker, Cloud Hypervisor) forwards port 5564 to
//!   (`--guest name=uds,vsock-uds=DIR/vm.vsock`, clients connect to
//!   `DIR/vm.vsock_5564`);
//! - **agent over TCP**: the same protocol inside the Noise transport
//!   (`--listen-tcp 127.0.0.1:0 --guest name=tcp,tcp-psk=DIR/tcp.psk`);
//! - **EGD** (`--guest name=egd,egd=DIR/egd.sock`): the blocking read
//!   command `0x02 N`, whose length is one byte, so at most 255 bytes a
//!   request.
//!
//! For each path, on one connection kept open:
//!
//! - 64-byte requests, reported in thousands per second (kreq/s): the fixed
//!   cost of one round trip;
//! - bulk requests, reported in MB/s (10^6 bytes per second): 65536 bytes
//!   (the protocol's largest request) for the agent paths, 255 bytes for EGD.
//!
//! And for TCP, full handshakes per second: connect, Noise handshake, one
//! 64-byte request, close; what an agent that reconnects for every refill
//! pays each time.
//!
//! Every request's answer is checked: one returning fewer bytes than asked
//! for aborts the run with a message. The runs of the paths are interleaved
//! so slow drift of the machine hits all alike, every figure is the median
//! of `--runs` runs, and the CPU time of the daemon, of this process and of
//! everything else during each measurement is reported (the figures mean
//! something only on an otherwise idle machine). These are reported
//! figures, not pass/fail thresholds.
//!
//! Run it with
//!
//! ```text
//! cargo bench --bench fallbacks
//! cargo bench --bench fallbacks -- --seconds S --runs N
//! ```
//!
//! - `--seconds S`: length of one measurement (default 2, after 0.2 s of
//!   warm-up).
//! - `--runs N`: runs per figure (default 3).
//!
//! With the defaults a run takes about 40 s. Results and their analysis:
//! `docs/performance.md`, "Fallback paths".

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Process, Result, cpu_seconds, machine_busy_seconds, median};
use vhost_rng_protocol::noise::{self, Psk};
use vhost_rng_protocol::wire;

/// Untimed running before each measurement.
const WARM_UP: Duration = Duration::from_millis(200);
/// Longest wait for one answer before the run is declared stuck.
const STALL: Duration = Duration::from_secs(10);
/// Longest wait for the daemon to come up or go away.
const START_STOP: Duration = Duration::from_secs(10);

const SMALL_LEN: u32 = 64;
/// The agent protocol's largest request.
const BULK_LEN: u32 = wire::MAX_REQUEST;
/// EGD's largest read: its length field is one byte.
const EGD_BULK_LEN: u8 = 255;
/// EGD's blocking read command.
const EGD_READ_BLOCKING: u8 = 0x02;

/// The guest names, also the TCP identity.
const UDS_GUEST: &str = "uds";
const TCP_GUEST: &str = "tcp";
const EGD_GUEST: &str = "egd";

const MB: f64 = 1e6;
const K: f64 = 1e3;

fn main() {
    if let Err(message) = run() {
        eprintln!("fallbacks benchmark aborted: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    let dir = tempfile::tempdir().map_err(|e| format!("creating a temporary directory: {e}"))?;

    println!("vhost-rng fallback paths benchmark");
    println!();
    support::print_machine();
    support::print_date();
    println!(
        "settings: {} s per measurement (after {} ms warm-up), {} run(s), median reported; \
         one client at a time",
        options.seconds.as_secs_f64(),
        WARM_UP.as_millis(),
        options.runs,
    );

    let mut daemon = Daemon::start(dir.path())?;
    println!(
        "daemon: vhost-rng {} (this tree, release build), `{}`",
        env!("CARGO_PKG_VERSION"),
        daemon.command_line
    );
    println!("TCP listener bound to {}", daemon.tcp_addr);
    println!();

    let cases = cases();
    let mut results: Vec<Vec<Measurement>> = cases.iter().map(|_| Vec::new()).collect();
    for run in 1..=options.runs {
        eprintln!("run {run}/{}", options.runs);
        for (case, runs) in cases.iter().zip(&mut results) {
            let measurement = measure(&mut daemon, case, options.seconds)
                .map_err(|e| format!("{} ({} run {run}): {e}", case.path.name(), case.what))?;
            runs.push(measurement);
        }
    }
    daemon.process.stop()?;

    print_report(&cases, &results);
    Ok(())
}

struct Options {
    seconds: Duration,
    runs: usize,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self> {
        let usage = "usage: cargo bench --bench fallbacks [-- [--seconds S] [--runs N]]";
        let mut seconds = 2.0;
        let mut runs = 3;
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| format!("{name} needs a value\n{usage}"))
            };
            match arg.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
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
                "-h" | "--help" => {
                    println!("{usage}");
                    std::process::exit(0);
                }
                other => return Err(format!("unexpected argument '{other}'\n{usage}")),
            }
        }
        Ok(Options {
            seconds: Duration::from_secs_f64(seconds),
            runs,
        })
    }
}

/// The daemon serving the three guests, and how to reach each.
struct Daemon {
    process: Process,
    command_line: String,
    /// The agent's Unix socket for the hybrid-vsock guest (`PATH_5564`).
    vsock_port: PathBuf,
    tcp_addr: SocketAddr,
    psk: Psk,
    egd_socket: PathBuf,
}

impl Daemon {
    /// `vhost-rng serve --source os --listen-tcp 127.0.0.1:0` with the three
    /// guests, ready once it logged that it serves each and the TCP address.
    fn start(dir: &Path) -> Result<Self> {
        let vsock_uds = dir.join("vm.vsock");
        let vsock_port = dir.join(format!("vm.vsock_{}", wire::DEFAULT_PORT));
        let egd_socket = dir.join("egd.sock");
        let psk_path = dir.join("tcp.psk");
        let psk = noise::write_new_psk(&psk_path)
            .map_err(|e| format!("writing a key to {}: {e}", psk_path.display()))?;

        let args = [
            "serve".to_owned(),
            "--source".to_owned(),
            "os".to_owned(),
            "--listen-tcp".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--guest".to_owned(),
            format!("name={UDS_GUEST},vsock-uds={}", vsock_uds.display()),
            "--guest".to_owned(),
            format!("name={TCP_GUEST},tcp-psk={}", psk_path.display()),
            "--guest".to_owned(),
            format!("name={EGD_GUEST},egd={}", egd_socket.display()),
        ];
        let mut command = Command::new(env!("CARGO_BIN_EXE_vhost-rng"));
        command
            .args(&args)
            .arg("--control")
            .arg(dir.join("control.sock"))
            .env("RUST_LOG", "info");
        let mut process =
            Process::spawn("vhost-rng", command, dir.join("vhost-rng.log"), START_STOP)?
                .with_log_tail(20);
        let poll = Duration::from_millis(10);
        for guest in [UDS_GUEST, TCP_GUEST, EGD_GUEST] {
            process.wait_for_log(&format!("guest {guest}: serving "), poll)?;
        }
        let log = process.wait_for_log("listening on TCP ", poll)?;
        let tcp_addr = log
            .lines()
            .find_map(|line| {
                let (_, rest) = line.split_once("listening on TCP ")?;
                rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
            })
            .ok_or_else(|| process.failure("logged no TCP address that parses"))?;
        if !vsock_port.exists() {
            return Err(process.failure(&format!("did not create {}", vsock_port.display())));
        }

        let command_line = format!(
            "vhost-rng {} --control DIR/control.sock",
            args.join(" ").replace(&dir.display().to_string(), "DIR")
        );
        Ok(Daemon {
            process,
            command_line,
            vsock_port,
            tcp_addr,
            psk,
            egd_socket,
        })
    }

    fn connect_uds(&self) -> Result<UnixStream> {
        let stream = UnixStream::connect(&self.vsock_port)
            .map_err(|e| format!("connecting to {}: {e}", self.vsock_port.display()))?;
        set_unix_timeouts(&stream)?;
        Ok(stream)
    }

    fn connect_egd(&self) -> Result<UnixStream> {
        let stream = UnixStream::connect(&self.egd_socket)
            .map_err(|e| format!("connecting to {}: {e}", self.egd_socket.display()))?;
        set_unix_timeouts(&stream)?;
        Ok(stream)
    }

    /// TCP connection and Noise handshake as the `tcp` guest, set up as the
    /// agent sets up its own (no Nagle delay, bounded waits).
    fn connect_tcp(&self) -> Result<noise::SecureStream<TcpStream>> {
        let stream = TcpStream::connect(self.tcp_addr)
            .map_err(|e| format!("connecting to {}: {e}", self.tcp_addr))?;
        stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(STALL)))
            .and_then(|()| stream.set_write_timeout(Some(STALL)))
            .map_err(|e| format!("setting up the TCP connection: {e}"))?;
        noise::connect_handshake(stream, TCP_GUEST, &self.psk)
            .map_err(|e| format!("handshake with {}: {e}", self.tcp_addr))
    }
}

fn set_unix_timeouts(stream: &UnixStream) -> Result<()> {
    stream
        .set_read_timeout(Some(STALL))
        .and_then(|()| stream.set_write_timeout(Some(STALL)))
        .map_err(|e| format!("setting socket timeouts: {e}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Uds,
    Tcp,
    Egd,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Uds => "agent, hybrid vsock (Unix socket)",
            Route::Tcp => "agent, TCP + Noise",
            Route::Egd => "EGD (Unix socket)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Requests of this many bytes on one kept connection.
    Kept(u32),
    /// Connect, handshake, one 64-byte request, close (TCP only).
    Handshake,
}

struct Case {
    path: Route,
    kind: Kind,
    what: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            path: Route::Uds,
            kind: Kind::Kept(SMALL_LEN),
            what: "64 B requests",
        },
        Case {
            path: Route::Uds,
            kind: Kind::Kept(BULK_LEN),
            what: "65536 B requests",
        },
        Case {
            path: Route::Tcp,
            kind: Kind::Kept(SMALL_LEN),
            what: "64 B requests",
        },
        Case {
            path: Route::Tcp,
            kind: Kind::Kept(BULK_LEN),
            what: "65536 B requests",
        },
        Case {
            path: Route::Tcp,
            kind: Kind::Handshake,
            what: "full handshakes",
        },
        Case {
            path: Route::Egd,
            kind: Kind::Kept(SMALL_LEN),
            what: "64 B reads",
        },
        Case {
            path: Route::Egd,
            kind: Kind::Kept(u32::from(EGD_BULK_LEN)),
            what: "255 B reads",
        },
    ]
}

/// One timed measurement.
#[derive(Clone, Copy)]
struct Measurement {
    /// Requests (or handshakes) completed per second.
    ops_per_s: f64,
    /// Random bytes received per second.
    bytes_per_s: f64,
    /// CPU time of the daemon per second of wall time (1.0 = one core busy).
    daemon_cpu: f64,
    /// The same for this process (the client).
    client_cpu: f64,
    /// Busy CPU time of the machine outside these two, per second: anything
    /// above a few hundredths means the figures are disturbed.
    other_cpu: f64,
}

/// Counters read when the timed window opens and when it closes.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    daemon_cpu: f64,
    client_cpu: f64,
    machine_busy: f64,
}

impl Snapshot {
    fn take(daemon_stat: &str) -> Self {
        Snapshot {
            at: Instant::now(),
            daemon_cpu: cpu_seconds(daemon_stat),
            client_cpu: cpu_seconds("/proc/self/stat"),
            machine_busy: machine_busy_seconds(),
        }
    }
}

/// One request (or one whole connection, for handshakes); returns the bytes
/// it brought.
trait Client {
    fn once(&mut self) -> Result<u64>;
}

/// The agent protocol on a kept connection.
struct AgentClient<S> {
    stream: S,
    len: u32,
    out: Vec<u8>,
}

impl<S: Read + Write> Client for AgentClient<S> {
    fn once(&mut self) -> Result<u64> {
        self.out.clear();
        let n = wire::fetch(&mut self.stream, self.len, &mut self.out)
            .map_err(|e| format!("{}-byte request: {e}", self.len))?;
        if n != self.len as usize {
            return Err(format!(
                "a {}-byte request returned only {n} bytes",
                self.len
            ));
        }
        std::hint::black_box(&self.out);
        Ok(u64::from(self.len))
    }
}

/// EGD blocking reads on a kept connection.
struct EgdClient {
    stream: UnixStream,
    command: [u8; 2],
    buf: Vec<u8>,
}

impl Client for EgdClient {
    fn once(&mut self) -> Result<u64> {
        let len = self.buf.len();
        self.stream
            .write_all(&self.command)
            .map_err(|e| format!("sending a {len}-byte read: {e}"))?;
        // read_exact fails with UnexpectedEof if the daemon closes early.
        self.stream
            .read_exact(&mut self.buf)
            .map_err(|e| format!("a {len}-byte blocking read did not return {len} bytes: {e}"))?;
        std::hint::black_box(&self.buf);
        Ok(len as u64)
    }
}

/// A fresh TCP connection, handshake and one 64-byte request each time.
struct HandshakeClient<'a> {
    daemon: &'a Daemon,
    out: Vec<u8>,
}

impl Client for HandshakeClient<'_> {
    fn once(&mut self) -> Result<u64> {
        let mut stream = self.daemon.connect_tcp()?;
        self.out.clear();
        let n = wire::fetch(&mut stream, SMALL_LEN, &mut self.out)
            .map_err(|e| format!("request after the handshake: {e}"))?;
        if n != SMALL_LEN as usize {
            return Err(format!(
                "a {SMALL_LEN}-byte request returned only {n} bytes"
            ));
        }
        // Dropping the stream closes the connection.
        Ok(u64::from(SMALL_LEN))
    }
}

/// Runs `case` for `WARM_UP` plus `duration` and measures over `duration`.
fn measure(daemon: &mut Daemon, case: &Case, duration: Duration) -> Result<Measurement> {
    daemon.process.check_alive()?;
    let daemon_stat = format!("/proc/{}/stat", daemon.process.pid());
    let measurement = {
        let daemon: &Daemon = daemon;
        let mut client: Box<dyn Client + '_> = match (case.path, case.kind) {
            (Route::Uds, Kind::Kept(len)) => Box::new(AgentClient {
                stream: daemon.connect_uds()?,
                len,
                out: Vec::with_capacity(len as usize),
            }),
            (Route::Tcp, Kind::Kept(len)) => Box::new(AgentClient {
                stream: daemon.connect_tcp()?,
                len,
                out: Vec::with_capacity(len as usize),
            }),
            (Route::Tcp, Kind::Handshake) => Box::new(HandshakeClient {
                daemon,
                out: Vec::with_capacity(SMALL_LEN as usize),
            }),
            (Route::Egd, Kind::Kept(len)) => {
                let len = u8::try_from(len).map_err(|_| format!("EGD cannot read {len} bytes"))?;
                Box::new(EgdClient {
                    stream: daemon.connect_egd()?,
                    command: [EGD_READ_BLOCKING, len],
                    buf: vec![0; usize::from(len)],
                })
            }
            _ => return Err("no such case".into()),
        };
        time(client.as_mut(), &daemon_stat, duration)
    };
    // A daemon that failed shows in its log: say so rather than only that a
    // read failed.
    match measurement {
        Ok(m) => Ok(m),
        Err(e) => match daemon.process.check_alive() {
            Ok(()) => Err(e),
            Err(dead) => Err(format!("{e}\n{dead}")),
        },
    }
}

fn time(client: &mut dyn Client, daemon_stat: &str, duration: Duration) -> Result<Measurement> {
    let warm_until = Instant::now() + WARM_UP;
    while Instant::now() < warm_until {
        client.once()?;
    }
    let start = Snapshot::take(daemon_stat);
    let mut ops: u64 = 0;
    let mut bytes: u64 = 0;
    while start.at.elapsed() < duration {
        bytes += client.once()?;
        ops += 1;
    }
    let end = Snapshot::take(daemon_stat);

    let seconds = (end.at - start.at).as_secs_f64();
    let daemon_cpu = end.daemon_cpu - start.daemon_cpu;
    let client_cpu = end.client_cpu - start.client_cpu;
    let machine_busy = end.machine_busy - start.machine_busy;
    Ok(Measurement {
        ops_per_s: ops as f64 / seconds,
        bytes_per_s: bytes as f64 / seconds,
        daemon_cpu: daemon_cpu / seconds,
        client_cpu: client_cpu / seconds,
        // Clock-tick accounting can make this dip just below zero.
        other_cpu: ((machine_busy - daemon_cpu - client_cpu) / seconds).max(0.0),
    })
}

/// The figure a case is reported by: requests or handshakes per second in
/// thousands or units, or MB/s.
fn figure(case: &Case, m: &Measurement) -> f64 {
    match case.kind {
        Kind::Kept(SMALL_LEN) => m.ops_per_s / K,
        Kind::Kept(_) => m.bytes_per_s / MB,
        Kind::Handshake => m.ops_per_s,
    }
}

fn unit(case: &Case) -> &'static str {
    match case.kind {
        Kind::Kept(SMALL_LEN) => "kreq/s",
        Kind::Kept(_) => "MB/s",
        Kind::Handshake => "handshakes/s",
    }
}

fn print_report(cases: &[Case], results: &[Vec<Measurement>]) {
    let busiest = results
        .iter()
        .flatten()
        .map(|m| m.other_cpu)
        .fold(0.0, f64::max);
    if busiest > 0.05 {
        println!(
            "WARNING: other processes used up to {busiest:.2} CPUs during the measurements; \
             the figures below are disturbed (see \"other CPU\" in the details)."
        );
        println!();
    }

    let cell = |path: Route, pick: &dyn Fn(&Kind) -> bool, decimals: usize| {
        cases
            .iter()
            .zip(results)
            .find(|(case, _)| case.path == path && pick(&case.kind))
            .map_or_else(
                || "—".to_owned(),
                |(case, runs)| {
                    format!(
                        "{:.decimals$}",
                        median(runs.iter().map(|m| figure(case, m)))
                    )
                },
            )
    };
    let small = |kind: &Kind| *kind == Kind::Kept(SMALL_LEN);
    let bulk = |kind: &Kind| matches!(kind, Kind::Kept(len) if *len != SMALL_LEN);
    let handshake = |kind: &Kind| *kind == Kind::Handshake;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| path | 64 B kreq/s | bulk MB/s | bulk request | handshakes/s |"
    );
    let _ = writeln!(table, "| --- | ---: | ---: | ---: | ---: |");
    for path in [Route::Uds, Route::Tcp, Route::Egd] {
        let bulk_request = if path == Route::Egd {
            "255 B (EGD limit)"
        } else {
            "65536 B"
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {bulk_request} | {} |",
            path.name(),
            cell(path, &small, 1),
            cell(path, &bulk, 1),
            cell(path, &handshake, 0),
        );
    }
    println!(
        "Fallback paths, one client, one connection kept open unless stated (median of {} runs):",
        results[0].len()
    );
    println!();
    print!("{table}");
    println!();
    println!(
        "handshakes/s: TCP connect + Noise handshake + one 64 B request + close, \
         a new connection each time."
    );
    println!();

    println!(
        "Details: every run; medians of CPU use (1.00 = one core busy for the whole window) \
         and the most CPU other processes used:"
    );
    println!();
    println!("| path | measurement | runs | daemon CPU | client CPU | other CPU (max) |");
    println!("| --- | --- | --- | ---: | ---: | ---: |");
    for (case, runs) in cases.iter().zip(results) {
        let decimals = if case.kind == Kind::Handshake { 0 } else { 1 };
        let all = runs
            .iter()
            .map(|m| format!("{:.decimals$}", figure(case, m)))
            .collect::<Vec<_>>()
            .join(", ");
        let pick = |f: fn(&Measurement) -> f64| median(runs.iter().map(f));
        println!(
            "| {} | {} | {all} {} | {:.2} | {:.2} | {:.2} |",
            case.path.name(),
            case.what,
            unit(case),
            pick(|m| m.daemon_cpu),
            pick(|m| m.client_cpu),
            runs.iter().map(|m| m.other_cpu).fold(0.0, f64::max),
        );
    }
}
