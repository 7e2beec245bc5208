// SPDX-License-Identifier: Apache-2.0
//! Prometheus metrics: the daemon's [`DaemonStatus`] snapshot in the
//! OpenMetrics text format, and a minimal HTTP/1.1 server that hands it to
//! scrapers.
//!
//! Nothing here is updated on the data path. Each scrape asks for a fresh
//! snapshot through the closure given to [`MetricsServer::start`], encodes it
//! through a registry built for that scrape alone, and throws both away.
//!
//! The server answers each connection on a thread of its own, at most
//! [`MAX_CONNECTIONS`] at once; a connection beyond those is closed at once
//! rather than queued. Every client gets [`IO_TIMEOUT`] in all to send its
//! request head (at most [`MAX_REQUEST_HEAD`] bytes) and as long again to
//! take the response, so a slow or hostile client holds one place for
//! seconds at most, never delays the scrapes beside it, and never touches
//! the daemon's other threads.

use std::fmt;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{Level, debug, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::frontend::stream::{Places, read_by, write_all_by};
use crate::service::status::{DaemonStatus, GuestStatus, ListenerStatus, SourceStatus};
use vhost_rng_protocol::deadline::TimedStream;
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;

/// The content type of what [`encode`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prepended, with an underscore, to every metric name.
pub const PREFIX: &str = "vhost_rng";

/// The values of the `state` label of `vhost_rng_source_state`.
pub const SOURCE_STATES: [&str; 4] = ["starting", "healthy", "quarantined", "failed"];

/// How long a client may take to send its request head, all reads
/// together, and separately how long it may take to accept the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections served at once. A Prometheus server scrapes over one
/// connection at a time, so this is room for several scrapers and for
/// clients that connect and say nothing (which each hold a place for
/// [`IO_TIMEOUT`]); beyond it new connections are closed at once, so they
/// cannot make the daemon start threads without bound.
pub const MAX_CONNECTIONS: usize = 32;

/// The longest request head (request line and header fields) read.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// After answering, how long request bytes still arriving are read and
/// dropped, so that closing the socket with unread data (which resets the
/// connection) cannot destroy the response before the client has read it.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_MAX_BYTES: usize = 64 * 1024;

/// Pause after a failed `accept`, so that running out of file descriptors
/// does not turn into a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Where a scrape gets its snapshot.
pub type SnapshotFn = Arc<dyn Fn() -> DaemonStatus + Send + Sync>;

/// Encodes `status` in the OpenMetrics text format, `# EOF` included; serve
/// it as [`CONTENT_TYPE`].
///
/// A family without any series (no guests, no rate-limited guest, no
/// sources) is left out entirely.
pub fn encode(status: &DaemonStatus) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(StatusCollector(status.clone())));
    let series = status.guests.len() + status.pool.sources.len() + status.listeners.len();
    let mut out = String::with_capacity(1024 + 2048 * series);
    if let Err(fmt::Error) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        // Neither the String nor the collector ever fails; should that
        // change, a truncated exposition lacks `# EOF`, which scrapers reject.
        warn!("metrics: encoding the status failed");
    }
    out
}

/// Hands one snapshot to the registry of one scrape.
#[derive(Debug)]
struct StatusCollector(DaemonStatus);

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_guests(&mut encoder, &self.0.guests)?;
        encode_sources(&mut encoder, &self.0.pool.sources)?;
        encode_listeners(&mut encoder, &self.0.listeners)?;
        encode_daemon(&mut encoder, &self.0)
    }
}

/// One series per guest, labelled with its name.
fn by_guest<'a, M>(
    guests: &'a [GuestStatus],
    metric: impl Fn(&GuestStatus) -> M + 'a,
) -> impl Iterator<Item = ([(&'static str, &'a str); 1], M)> + 'a {
    guests
        .iter()
        .map(move |g| ([("guest", g.name.as_str())], metric(g)))
}

/// One series per source, labelled with its name.
fn by_source<'a, M>(
    sources: &'a [SourceStatus],
    metric: impl Fn(&SourceStatus) -> M + 'a,
) -> impl Iterator<Item = ([(&'static str, &'a str); 1], M)> + 'a {
    sources
        .iter()
        .map(move |s| ([("source", s.name.as_str())], metric(s)))
}

fn encode_guests(e: &mut DescriptorEncoder, guests: &[GuestStatus]) -> fmt::Result {
    family(
        e,
        "guest_bytes",
        "Bytes of randomness served to the guest.",
        by_guest(guests, |g| ConstCounter::new(g.bytes)),
    )?;
    family(
        e,
        "guest_requests",
        "Requests the guest made.",
        by_guest(guests, |g| ConstCounter::new(g.requests)),
    )?;
    family(
        e,
        "guest_defective_requests",
        "Requests of the guest rejected as malformed.",
        by_guest(guests, |g| ConstCounter::new(g.defective_requests)),
    )?;
    family(
        e,
        "guest_throttled_seconds",
        "Seconds the guest's requests waited for rate-limit tokens.",
        by_guest(guests, |g| ConstCounter::new(g.throttled_seconds)),
    )?;
    family(
        e,
        "guest_connected",
        "Whether the guest's VMM (or, for EGD and agent guests, a client) is connected (1) or not (0).",
        by_guest(guests, |g| ConstGauge::new(i64::from(g.connected))),
    )?;
    family(
        e,
        "guest_connections",
        "Connections made for the guest: VMM connections, or EGD and agent clients.",
        by_guest(guests, |g| ConstCounter::new(g.connections)),
    )?;
    family(
        e,
        "guest_refused_connections",
        "Clients of the guest refused because it had as many as it may have at once.",
        by_guest(guests, |g| ConstCounter::new(g.refused_connections)),
    )?;
    family(
        e,
        "guest_evicted_connections",
        "Idle clients of the guest closed to make room for a new one when it had as many as it may have at once.",
        by_guest(guests, |g| ConstCounter::new(g.evicted_connections)),
    )?;
    family(
        e,
        "guest_wrong_key_connections",
        "TCP handshakes that named the guest but did not prove its pre-shared key.",
        by_guest(guests, |g| ConstCounter::new(g.wrong_key_connections)),
    )?;
    family(
        e,
        "guest_rate_limit_bytes_per_second",
        "Rate limit of the guest in bytes per second; absent for unlimited guests.",
        by_guest(guests, |g| guest_rate_limit(g).map(ConstGauge::new))
            .filter_map(|(labels, limit)| Some((labels, limit?))),
    )
}

/// The configured limit of a guest in bytes per second, if it has one.
fn guest_rate_limit(g: &GuestStatus) -> Option<f64> {
    match (g.rate_bytes, g.rate_period_ms) {
        (Some(bytes), Some(period_ms)) if period_ms > 0 => {
            Some(bytes as f64 * 1000.0 / period_ms as f64)
        }
        _ => None,
    }
}

fn encode_sources(e: &mut DescriptorEncoder, sources: &[SourceStatus]) -> fmt::Result {
    family(
        e,
        "source_bytes_read",
        "Bytes read from the source.",
        by_source(sources, |s| ConstCounter::new(s.bytes_read)),
    )?;
    family(
        e,
        "source_bytes_discarded",
        "Bytes read from the source and dropped after a failed health test.",
        by_source(sources, |s| ConstCounter::new(s.bytes_discarded)),
    )?;
    family(
        e,
        "source_bytes_contributed",
        "Bytes of the source that passed its health tests and went to the pool.",
        by_source(sources, |s| ConstCounter::new(s.bytes_contributed)),
    )?;
    family(
        e,
        "source_health_failures",
        "Health-test failures of the source, by test: repetition count (rct) or \
         adaptive proportion (apt).",
        sources.iter().flat_map(|s| {
            [("rct", s.rct_failures), ("apt", s.apt_failures)].map(|(test, failures)| {
                (
                    [("source", s.name.as_str()), ("test", test)],
                    ConstCounter::new(failures),
                )
            })
        }),
    )?;
    family(
        e,
        "source_read_errors",
        "Reads of the source that failed.",
        by_source(sources, |s| ConstCounter::new(s.read_errors)),
    )?;
    family(
        e,
        "source_state",
        "State of the source: 1 for the state it is in, 0 for the others.",
        sources.iter().flat_map(|s| {
            // A state this module does not know of still shows, as the one
            // series with value 1.
            let current = s.state.as_str();
            let unknown = (!SOURCE_STATES.contains(&current)).then_some(current);
            SOURCE_STATES.into_iter().chain(unknown).map(move |state| {
                (
                    [("source", s.name.as_str()), ("state", state)],
                    ConstGauge::new(i64::from(state == current)),
                )
            })
        }),
    )?;
    family(
        e,
        "source_rate_bytes_per_second",
        "Bytes per second read from the source over its last measuring window.",
        by_source(sources, |s| ConstGauge::new(s.rate)),
    )?;
    family(
        e,
        "source_healthy",
        "Whether the source is healthy and contributing (1) or not (0).",
        by_source(sources, |s| {
            ConstGauge::new(i64::from(s.state == "healthy"))
        }),
    )
}

/// The listeners shared by many guests, labelled with their kind (there is
/// one of each kind at most).
fn encode_listeners(e: &mut DescriptorEncoder, listeners: &[ListenerStatus]) -> fmt::Result {
    family(
        e,
        "listener_connections",
        "Connections the shared listener accepted, refused ones included.",
        listeners.iter().map(|l| {
            (
                [("listener", l.kind.as_str())],
                ConstCounter::new(l.connections),
            )
        }),
    )?;
    family(
        e,
        "listener_refused",
        "Connections the shared listener refused before they reached a guest, by reason.",
        listeners.iter().flat_map(|l| {
            l.refused.iter().map(|(reason, count)| {
                (
                    [("listener", l.kind.as_str()), ("reason", reason.as_str())],
                    ConstCounter::new(*count),
                )
            })
        }),
    )
}

fn encode_daemon(e: &mut DescriptorEncoder, status: &DaemonStatus) -> fmt::Result {
    single(
        e,
        "pool_level_bytes",
        "Full-entropy bytes waiting in the pool.",
        ConstGauge::new(status.pool.level),
    )?;
    single(
        e,
        "pool_capacity_bytes",
        "Capacity of the pool in bytes.",
        ConstGauge::new(status.pool.capacity),
    )?;
    single(
        e,
        "uptime_seconds",
        "Seconds since the daemon started.",
        ConstGauge::new(status.uptime_seconds),
    )?;
    family(
        e,
        "info",
        "Version of the daemon and mode of its pool (drbg or raw); always 1.",
        [(
            [
                ("version", status.version.as_str()),
                ("mode", status.pool.mode.as_str()),
            ],
            ConstGauge::new(1i64),
        )],
    )
}

/// Writes one metric family: its HELP and TYPE lines, then one sample per
/// label set. Writes nothing at all when there is no series.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a metric family of one series without labels.
fn single<M>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: M) -> fmt::Result
where
    M: EncodeMetric + TypedMetric,
{
    value.encode(encoder.encode_descriptor(name, help, None, M::TYPE)?)
}

/// Serves `GET /metrics` over HTTP/1.1 from its own thread.
///
/// Dropping the server (or calling [`shutdown`](Self::shutdown)) stops it
/// and closes its socket.
#[must_use = "the metrics server stops when dropped"]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Binds `addr` (so a bad or busy address is reported here, at
    /// start-up) and serves from new threads. `snapshot` is called once per
    /// scrape, on the thread serving the scrape.
    pub fn start(addr: SocketAddr, snapshot: SnapshotFn) -> io::Result<MetricsServer> {
        Self::start_with_timeout(addr, snapshot, IO_TIMEOUT)
    }

    /// [`MetricsServer::start`], giving each client `io_timeout` instead of
    /// [`IO_TIMEOUT`] (tests use a short one).
    pub fn start_with_timeout(
        addr: SocketAddr,
        snapshot: SnapshotFn,
        io_timeout: Duration,
    ) -> io::Result<MetricsServer> {
        Self::start_on(TcpListener::bind(addr)?, snapshot, io_timeout)
    }

    /// [`MetricsServer::start_with_timeout`] on a socket already listening
    /// (bound here, or handed over by the previous process).
    pub fn start_on(
        listener: TcpListener,
        snapshot: SnapshotFn,
        io_timeout: Duration,
    ) -> io::Result<MetricsServer> {
        let local_addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new().name("metrics".into()).spawn({
            let stop = Arc::clone(&stop);
            move || {
                crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Peer);
                serve(&listener, &snapshot, io_timeout, &stop)
            }
        })?;
        Ok(MetricsServer {
            local_addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address actually bound: the port is known here when `start` was
    /// given port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections and closes the listening socket; the
    /// connections being served end on their own threads (within their
    /// timeouts).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // The thread sits in accept(): a connection wakes it to see the flag.
        let wake = match self.local_addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
            }
            addr => addr,
        };
        match TcpStream::connect_timeout(&wake, IO_TIMEOUT) {
            Ok(_) => {
                let _ = thread.join();
            }
            // Left behind, the thread stops at its next connection.
            Err(e) => debug!("metrics: cannot wake the server at {wake} to stop it: {e}"),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn serve(listener: &TcpListener, snapshot: &SnapshotFn, io_timeout: Duration, stop: &AtomicBool) {
    let accept_log = RateLimitedLog::per_minute(5);
    let busy_log = RateLimitedLog::per_minute(5);
    let failure_log = Arc::new(RateLimitedLog::per_minute(5));
    let places = Places::new(MAX_CONNECTIONS);
    for incoming in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(e) => {
                log_limited!(
                    accept_log,
                    Level::Warn,
                    "metrics: cannot accept a connection: {e}"
                );
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        let peer = stream.peer_addr().ok();
        // Closed at once: queued, it would wait behind the idle ones.
        let Some(place) = places.take() else {
            log_limited!(
                busy_log,
                Level::Warn,
                "metrics: {MAX_CONNECTIONS} connections are being served already; \
                 closed one from {peer:?}"
            );
            continue;
        };
        let snapshot = Arc::clone(snapshot);
        let failure_log = Arc::clone(&failure_log);
        // If the thread cannot start, the closure (and the place with it)
        // is dropped, giving the place back.
        let spawned = thread::Builder::new()
            .name("metrics-client".into())
            .spawn(move || {
                let _place = place;
                if let Err(e) = handle(stream, &*snapshot, &failure_log, io_timeout) {
                    debug!("metrics: client {peer:?}: {e}");
                }
            });
        if let Err(e) = spawned {
            log_limited!(
                accept_log,
                Level::Warn,
                "metrics: cannot start a thread for a client: {e}"
            );
        }
    }
}

/// Serves one client: reads its request head, answers, closes.
fn handle(
    mut stream: TcpStream,
    snapshot: &(dyn Fn() -> DaemonStatus + Send + Sync),
    failure_log: &RateLimitedLog,
    io_timeout: Duration,
) -> io::Result<()> {
    let Some(response) = answer(&mut stream, snapshot, failure_log, io_timeout)? else {
        return Ok(());
    };
    write_all_by(&mut stream, &response, Instant::now() + io_timeout)?;
    linger(&mut stream);
    Ok(())
}

/// Reads a client's request head from `stream` and returns the bytes of
/// the response it gets, or `None` when there is nothing to answer (the
/// client closed, or said nothing within `io_timeout`). The whole of what
/// a client's bytes can do before the response goes out; public for the
/// fuzz target that feeds it arbitrary heads.
#[doc(hidden)]
pub fn answer(
    stream: &mut dyn TimedStream,
    snapshot: &(dyn Fn() -> DaemonStatus + Send + Sync),
    failure_log: &RateLimitedLog,
    io_timeout: Duration,
) -> io::Result<Option<Vec<u8>>> {
    let mut buf = [0u8; MAX_REQUEST_HEAD];
    let response = match read_head(stream, &mut buf, Instant::now() + io_timeout) {
        Ok(request) => respond(&request, snapshot, failure_log),
        // Nothing to answer: the client went away, or never said anything.
        Err(HeadError::Closed) | Err(HeadError::Idle) => return Ok(None),
        Err(HeadError::Io(e)) => return Err(e),
        Err(HeadError::Truncated) | Err(HeadError::Malformed) => {
            Response::plain(400, "Bad Request", "bad request\n")
        }
        Err(HeadError::TimedOut) => Response::plain(408, "Request Timeout", "request timeout\n"),
        Err(HeadError::TooLarge) => Response::plain(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
    };
    Ok(Some(response.to_bytes()))
}

/// What was asked, from a well-formed request line.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    target: String,
}

#[derive(Debug)]
enum HeadError {
    /// The client closed the connection without sending anything.
    Closed,
    /// The client sent nothing before the deadline.
    Idle,
    /// The client closed the connection in the middle of the head.
    Truncated,
    /// The client started a request but did not finish it in time.
    TimedOut,
    /// No end of the head within [`MAX_REQUEST_HEAD`] bytes.
    TooLarge,
    /// Not an HTTP/1 request line.
    Malformed,
    Io(io::Error),
}

/// Reads up to the empty line ending a request head, and parses its request
/// line (header fields are read and ignored). Rejects a malformed request
/// line as soon as it is complete, without waiting for the rest.
fn read_head(
    stream: &mut dyn TimedStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<Request, HeadError> {
    let mut len = 0;
    loop {
        // RFC 9112 allows empty lines before the request line.
        let start = buf[..len]
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        let head = &buf[start..len];
        if let Some(line_end) = head.iter().position(|&b| b == b'\n') {
            let request = parse_request_line(&head[..line_end]).ok_or(HeadError::Malformed)?;
            if head_complete(&head[line_end..]) {
                return Ok(request);
            }
        }
        if len == buf.len() {
            return Err(HeadError::TooLarge);
        }
        let timed_out = if len == 0 {
            HeadError::Idle
        } else {
            HeadError::TimedOut
        };
        match read_by(stream, &mut buf[len..], deadline) {
            Ok(0) if len == 0 => return Err(HeadError::Closed),
            Ok(0) => return Err(HeadError::Truncated),
            Ok(n) => len += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out);
            }
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

/// Whether `rest`, starting at the newline ending the request line, holds
/// the empty line ending the head.
fn head_complete(rest: &[u8]) -> bool {
    rest.windows(2).any(|w| w == b"\n\n") || rest.windows(3).any(|w| w == b"\n\r\n")
}

/// `METHOD SP request-target SP HTTP/1.x`, the line ending not included.
fn parse_request_line(line: &[u8]) -> Option<Request> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let version_ok = version
        .strip_prefix("HTTP/1.")
        .is_some_and(|minor| minor.len() == 1 && minor.as_bytes()[0].is_ascii_digit());
    let target_ok = !target.is_empty() && target.chars().all(|c| c.is_ascii_graphic());
    if method.is_empty() || !method.chars().all(is_token_char) || !target_ok || !version_ok {
        return None;
    }
    Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
    })
}

/// The path of a request target: origin form (`/metrics?x`) or absolute
/// form (`http://host/metrics`).
fn target_path(target: &str) -> &str {
    let target = match target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        Some(rest) => rest.find('/').map_or("/", |slash| &rest[slash..]),
        None => target,
    };
    let end = target.find(['?', '#']).unwrap_or(target.len());
    &target[..end]
}

const INDEX: &str = "vhost-rng metrics exporter\n\nMetrics are served at /metrics.\n";

fn respond(
    request: &Request,
    snapshot: &(dyn Fn() -> DaemonStatus + Send + Sync),
    failure_log: &RateLimitedLog,
) -> Response {
    let head_only = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut response = Response::plain(405, "Method Not Allowed", "method not allowed\n");
            response.allow = true;
            return response;
        }
    };
    let mut response = match target_path(&request.target) {
        "/metrics" => match catch_unwind(AssertUnwindSafe(|| encode(&snapshot()))) {
            Ok(body) => Response {
                status: 200,
                reason: "OK",
                content_type: CONTENT_TYPE,
                body: body.into_bytes(),
                allow: false,
                head_only: false,
            },
            Err(_) => {
                log_limited!(
                    failure_log,
                    Level::Warn,
                    "metrics: taking the status snapshot panicked"
                );
                Response::plain(500, "Internal Server Error", "internal server error\n")
            }
        },
        "/" => Response::plain(200, "OK", INDEX),
        _ => Response::plain(404, "Not Found", "not found\n"),
    };
    response.head_only = head_only;
    response
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// Adds `Allow: GET, HEAD`.
    allow: bool,
    /// Answers HEAD: the headers of the full response, without its body.
    head_only: bool,
}

impl Response {
    fn plain(status: u16, reason: &'static str, body: &str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            allow: false,
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let allow = if self.allow {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// Ends the response with a FIN, then reads and drops whatever the client
/// still sends for a moment, so the close does not reset the connection
/// before the client has read the response.
fn linger(stream: &mut TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut scratch = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_MAX_BYTES {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::status::PoolStatus;
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::atomic::AtomicUsize;

    fn guest(name: &str, limited: bool) -> GuestStatus {
        GuestStatus {
            name: name.into(),
            endpoint: "socket".into(),
            path: format!("/run/{name}.sock"),
            connected: limited,
            connections: if limited { 3 } else { 0 },
            requests: 10,
            bytes: 640,
            defective_requests: 2,
            throttled_seconds: 1.5,
            current_rate: 16384.0,
            rate_bytes: limited.then_some(4096),
            rate_period_ms: limited.then_some(250),
            burst: None,
            weight: 1,
            refused_connections: if limited { 5 } else { 0 },
            evicted_connections: if limited { 6 } else { 0 },
            wrong_key_connections: if limited { 0 } else { 4 },
            process: None,
        }
    }

    fn listener(kind: &str, address: &str, refused: &[(&str, u64)]) -> ListenerStatus {
        ListenerStatus {
            kind: kind.into(),
            address: address.into(),
            connections: 40,
            refused: refused.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
        }
    }

    fn source(name: &str, state: &str) -> SourceStatus {
        SourceStatus {
            name: name.into(),
            hardware: true,
            state: state.into(),
            min_entropy: 0.5,
            bytes_read: 100_000,
            bytes_contributed: 99_000,
            bytes_discarded: 1_000,
            rct_failures: 4,
            apt_failures: 7,
            read_errors: 1,
            retries: 2,
            rate: 123_456,
        }
    }

    fn sample_status() -> DaemonStatus {
        let mut vm2 = guest("vm2", false);
        vm2.bytes = 1 << 40;
        vm2.throttled_seconds = 0.0;
        DaemonStatus {
            version: "0.1.0".into(),
            uptime_seconds: 12.25,
            started_at: 0,
            upgrades: 0,
            worker_restarts: 0,
            last_worker_exit: None,
            last_upgrade_error: None,
            upgrade_failures: 0,
            max_rate: None,
            guests: vec![guest("vm1", true), vm2],
            pool: PoolStatus {
                mode: "drbg".into(),
                level: 64,
                capacity: 8192,
                sources: vec![
                    source("hwrng:/dev/hwrng", "healthy"),
                    source("rdseed", "quarantined"),
                ],
            },
            listeners: vec![
                listener("vsock", "5564", &[("unknown_cid", 6)]),
                listener(
                    "tcp",
                    "127.0.0.1:5565",
                    &[
                        ("handshake_incomplete", 3),
                        ("not_protocol", 2),
                        ("too_many_handshakes", 0),
                        ("unknown_name", 1),
                        ("wrong_key", 4),
                    ],
                ),
            ],
            sandbox: None,
            isolation: String::new(),
        }
    }

    /// One sample line: name, labels, value.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: String,
    }

    #[derive(Debug, Default)]
    struct Exposition {
        /// Family name to (help, type), in the order declared.
        families: Vec<(String, String, String)>,
        samples: Vec<Sample>,
    }

    impl Exposition {
        fn family(&self, name: &str) -> Option<(&str, &str)> {
            self.families
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, help, kind)| (help.as_str(), kind.as_str()))
        }

        fn series(&self, name: &str) -> Vec<&Sample> {
            self.samples.iter().filter(|s| s.name == name).collect()
        }

        fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<&str> {
            let wanted: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let found: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| s.name == name && s.labels == wanted)
                .collect();
            assert!(found.len() <= 1, "duplicate series {name} {labels:?}");
            found.first().map(|s| s.value.as_str())
        }
    }

    /// A strict parser for what `encode` writes; panics on anything else.
    fn parse(text: &str) -> Exposition {
        let body = text
            .strip_suffix("# EOF\n")
            .unwrap_or_else(|| panic!("no final # EOF:\n{text}"));
        let mut out = Exposition::default();
        let mut lines = body.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP without text");
                let kind_line = lines.next().expect("HELP not followed by TYPE");
                let kind = kind_line
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("HELP {name} followed by {kind_line:?}"));
                assert!(out.family(name).is_none(), "family {name} declared twice");
                out.families
                    .push((name.to_owned(), help.to_owned(), kind.to_owned()));
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let sample = parse_sample(line);
            let (family, _, kind) = out.families.last().expect("sample before any family");
            let expected = if kind == "counter" {
                format!("{family}_total")
            } else {
                family.clone()
            };
            assert_eq!(sample.name, expected, "sample outside its family: {line:?}");
            assert!(
                sample.value.parse::<f64>().is_ok(),
                "not a number: {line:?}"
            );
            out.samples.push(sample);
        }
        out
    }

    fn parse_sample(line: &str) -> Sample {
        let name_end = line.find(['{', ' ']).expect("sample without value");
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name {name:?}"
        );
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            loop {
                let (key, after) = rest.split_once("=\"").expect("label without value");
                let mut value = String::new();
                let mut chars = after.char_indices();
                let close = loop {
                    match chars.next().expect("unterminated label value") {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().expect("dangling escape").1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => panic!("bad escape \\{c}"),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key.to_owned(), value));
                rest = &after[close + 1..];
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                } else {
                    rest = rest.strip_prefix('}').expect("labels not closed");
                    break;
                }
            }
        }
        let value = rest.strip_prefix(' ').expect("no space before value");
        assert!(!value.contains(' '), "trailing fields in {line:?}");
        Sample {
            name: name.to_owned(),
            labels,
            value: value.to_owned(),
        }
    }

    fn num(value: Option<&str>) -> f64 {
        value.expect("missing series").parse().unwrap()
    }

    const FAMILIES: [(&str, &str); 24] = [
        ("guest_bytes", "counter"),
        ("guest_requests", "counter"),
        ("guest_defective_requests", "counter"),
        ("guest_throttled_seconds", "counter"),
        ("guest_connected", "gauge"),
        ("guest_connections", "counter"),
        ("guest_refused_connections", "counter"),
        ("guest_evicted_connections", "counter"),
        ("guest_wrong_key_connections", "counter"),
        ("guest_rate_limit_bytes_per_second", "gauge"),
        ("source_bytes_read", "counter"),
        ("source_bytes_discarded", "counter"),
        ("source_bytes_contributed", "counter"),
        ("source_health_failures", "counter"),
        ("source_read_errors", "counter"),
        ("source_state", "gauge"),
        ("source_rate_bytes_per_second", "gauge"),
        ("source_healthy", "gauge"),
        ("listener_connections", "counter"),
        ("listener_refused", "counter"),
        ("pool_level_bytes", "gauge"),
        ("pool_capacity_bytes", "gauge"),
        ("uptime_seconds", "gauge"),
        ("info", "gauge"),
    ];

    #[test]
    fn every_family_is_declared_once_in_order_with_help_and_type() {
        let text = encode(&sample_status());
        let exp = parse(&text);
        let declared: Vec<(&str, &str)> = exp
            .families
            .iter()
            .map(|(name, _, kind)| (name.as_str(), kind.as_str()))
            .collect();
        let expected: Vec<(String, &str)> = FAMILIES
            .iter()
            .map(|(name, kind)| (format!("vhost_rng_{name}"), *kind))
            .collect();
        let expected: Vec<(&str, &str)> = expected.iter().map(|(n, k)| (n.as_str(), *k)).collect();
        assert_eq!(declared, expected, "{text}");
        for (name, help, _) in &exp.families {
            assert!(
                help.len() > 10 && help.ends_with('.'),
                "{name}: help {help:?}"
            );
        }
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("\n# EOF\n"));
    }

    #[test]
    fn guest_series_carry_their_values() {
        let exp = parse(&encode(&sample_status()));
        let vm1 = [("guest", "vm1")];
        let vm2 = [("guest", "vm2")];
        assert_eq!(num(exp.value("vhost_rng_guest_bytes_total", &vm1)), 640.0);
        assert_eq!(
            exp.value("vhost_rng_guest_bytes_total", &vm2),
            Some("1099511627776")
        );
        assert_eq!(num(exp.value("vhost_rng_guest_requests_total", &vm1)), 10.0);
        assert_eq!(
            num(exp.value("vhost_rng_guest_defective_requests_total", &vm2)),
            2.0
        );
        assert_eq!(
            num(exp.value("vhost_rng_guest_throttled_seconds_total", &vm1)),
            1.5
        );
        assert_eq!(
            num(exp.value("vhost_rng_guest_throttled_seconds_total", &vm2)),
            0.0
        );
        assert_eq!(exp.value("vhost_rng_guest_connected", &vm1), Some("1"));
        assert_eq!(exp.value("vhost_rng_guest_connected", &vm2), Some("0"));
        assert_eq!(
            exp.value("vhost_rng_guest_connections_total", &vm1),
            Some("3")
        );
        assert_eq!(
            exp.value("vhost_rng_guest_connections_total", &vm2),
            Some("0")
        );
        let refused = "vhost_rng_guest_refused_connections_total";
        assert_eq!(exp.value(refused, &vm1), Some("5"));
        assert_eq!(exp.value(refused, &vm2), Some("0"));
        let evicted = "vhost_rng_guest_evicted_connections_total";
        assert_eq!(exp.value(evicted, &vm1), Some("6"));
        assert_eq!(exp.value(evicted, &vm2), Some("0"));
        let wrong_key = "vhost_rng_guest_wrong_key_connections_total";
        assert_eq!(exp.value(wrong_key, &vm1), Some("0"));
        assert_eq!(exp.value(wrong_key, &vm2), Some("4"));
        // 4096 bytes per 250 ms; only the limited guest has the series.
        let limits = exp.series("vhost_rng_guest_rate_limit_bytes_per_second");
        assert_eq!(limits.len(), 1, "{limits:?}");
        assert_eq!(limits[0].labels, [("guest".to_owned(), "vm1".to_owned())]);
        assert_eq!(limits[0].value.parse::<f64>().unwrap(), 16384.0);
        for family in [
            "guest_bytes_total",
            "guest_requests_total",
            "guest_connected",
            "guest_refused_connections_total",
            "guest_evicted_connections_total",
            "guest_wrong_key_connections_total",
        ] {
            assert_eq!(exp.series(&format!("vhost_rng_{family}")).len(), 2);
        }
    }

    #[test]
    fn listener_series_carry_their_values_and_every_reason() {
        let exp = parse(&encode(&sample_status()));
        let connections = "vhost_rng_listener_connections_total";
        assert_eq!(exp.series(connections).len(), 2);
        assert_eq!(exp.value(connections, &[("listener", "vsock")]), Some("40"));
        assert_eq!(exp.value(connections, &[("listener", "tcp")]), Some("40"));
        let refused = "vhost_rng_listener_refused_total";
        let by =
            |listener, reason| exp.value(refused, &[("listener", listener), ("reason", reason)]);
        assert_eq!(by("vsock", "unknown_cid"), Some("6"));
        assert_eq!(by("tcp", "handshake_incomplete"), Some("3"));
        assert_eq!(by("tcp", "not_protocol"), Some("2"));
        // A reason that has not happened yet is a series at 0.
        assert_eq!(by("tcp", "too_many_handshakes"), Some("0"));
        assert_eq!(by("tcp", "unknown_name"), Some("1"));
        assert_eq!(by("tcp", "wrong_key"), Some("4"));
        assert_eq!(by("vsock", "unknown_name"), None);
        assert_eq!(exp.series(refused).len(), 6);
    }

    #[test]
    fn source_series_carry_their_values() {
        let exp = parse(&encode(&sample_status()));
        let hw = "hwrng:/dev/hwrng";
        for name in [hw, "rdseed"] {
            let src = [("source", name)];
            assert_eq!(
                num(exp.value("vhost_rng_source_bytes_read_total", &src)),
                100_000.0
            );
            assert_eq!(
                num(exp.value("vhost_rng_source_bytes_discarded_total", &src)),
                1_000.0
            );
            assert_eq!(
                num(exp.value("vhost_rng_source_bytes_contributed_total", &src)),
                99_000.0
            );
            assert_eq!(
                num(exp.value("vhost_rng_source_read_errors_total", &src)),
                1.0
            );
            assert_eq!(
                num(exp.value("vhost_rng_source_rate_bytes_per_second", &src)),
                123_456.0
            );
            let failures = "vhost_rng_source_health_failures_total";
            assert_eq!(
                num(exp.value(failures, &[("source", name), ("test", "rct")])),
                4.0
            );
            assert_eq!(
                num(exp.value(failures, &[("source", name), ("test", "apt")])),
                7.0
            );
        }
        assert_eq!(
            exp.series("vhost_rng_source_health_failures_total").len(),
            4
        );

        let states: HashMap<(String, String), String> = exp
            .series("vhost_rng_source_state")
            .into_iter()
            .map(|s| {
                assert_eq!(s.labels[0].0, "source");
                assert_eq!(s.labels[1].0, "state");
                (
                    (s.labels[0].1.clone(), s.labels[1].1.clone()),
                    s.value.clone(),
                )
            })
            .collect();
        assert_eq!(states.len(), 8, "{states:?}");
        for (name, current) in [(hw, "healthy"), ("rdseed", "quarantined")] {
            for state in SOURCE_STATES {
                let expected = if state == current { "1" } else { "0" };
                assert_eq!(
                    states[&(name.to_owned(), state.to_owned())],
                    expected,
                    "{name} {state}"
                );
            }
        }
        assert_eq!(
            exp.value("vhost_rng_source_healthy", &[("source", hw)]),
            Some("1")
        );
        assert_eq!(
            exp.value("vhost_rng_source_healthy", &[("source", "rdseed")]),
            Some("0")
        );
    }

    #[test]
    fn pool_and_daemon_series_carry_their_values() {
        let exp = parse(&encode(&sample_status()));
        assert_eq!(exp.value("vhost_rng_pool_level_bytes", &[]), Some("64"));
        assert_eq!(
            exp.value("vhost_rng_pool_capacity_bytes", &[]),
            Some("8192")
        );
        assert_eq!(num(exp.value("vhost_rng_uptime_seconds", &[])), 12.25);
        assert_eq!(
            exp.value("vhost_rng_info", &[("version", "0.1.0"), ("mode", "drbg")]),
            Some("1")
        );
        assert_eq!(exp.series("vhost_rng_info").len(), 1);
    }

    #[test]
    fn empty_families_are_left_out() {
        let mut status = sample_status();
        status.guests.clear();
        status.pool.sources.clear();
        status.listeners.clear();
        let exp = parse(&encode(&status));
        let names: Vec<&str> = exp.families.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "vhost_rng_pool_level_bytes",
                "vhost_rng_pool_capacity_bytes",
                "vhost_rng_uptime_seconds",
                "vhost_rng_info"
            ]
        );

        // Unlimited guests only: no rate-limit family at all.
        let mut status = sample_status();
        status.guests.remove(0);
        let exp = parse(&encode(&status));
        assert!(
            exp.family("vhost_rng_guest_rate_limit_bytes_per_second")
                .is_none()
        );
        assert!(exp.family("vhost_rng_guest_bytes").is_some());
    }

    #[test]
    fn zero_period_and_unknown_state_do_not_break_the_output() {
        let mut status = sample_status();
        status.guests[0].rate_period_ms = Some(0);
        status.pool.sources[1].state = "exploded".into();
        let exp = parse(&encode(&status));
        assert!(
            exp.family("vhost_rng_guest_rate_limit_bytes_per_second")
                .is_none()
        );
        let states = exp.series("vhost_rng_source_state");
        assert_eq!(states.len(), 9);
        let odd = [("source", "rdseed"), ("state", "exploded")];
        assert_eq!(exp.value("vhost_rng_source_state", &odd), Some("1"));
        for state in SOURCE_STATES {
            assert_eq!(
                exp.value(
                    "vhost_rng_source_state",
                    &[("source", "rdseed"), ("state", state)]
                ),
                Some("0")
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut status = sample_status();
        status.pool.sources[0].name = "we\"ird\\na\nme".into();
        status.version = "1.0 \"beta\"".into();
        let text = encode(&status);
        let exp = parse(&text);
        assert_eq!(
            num(exp.value(
                "vhost_rng_source_bytes_read_total",
                &[("source", "we\"ird\\na\nme")]
            )),
            100_000.0
        );
        assert_eq!(
            exp.value(
                "vhost_rng_info",
                &[("version", "1.0 \"beta\""), ("mode", "drbg")]
            ),
            Some("1")
        );
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        let ok = |line: &str, method: &str, target: &str| {
            assert_eq!(
                parse_request_line(line.as_bytes()),
                Some(Request {
                    method: method.into(),
                    target: target.into()
                }),
                "{line:?}"
            );
        };
        ok("GET /metrics HTTP/1.1\r", "GET", "/metrics");
        ok("HEAD / HTTP/1.0", "HEAD", "/");
        ok(
            "GET http://h:1/metrics?a=b HTTP/1.1",
            "GET",
            "http://h:1/metrics?a=b",
        );
        for bad in [
            "",
            "GET",
            "GET /metrics",
            "GET  /metrics HTTP/1.1",
            "GET /metrics HTTP/1.1 x",
            "GET /metrics HTTP/2.0",
            "GET /metrics HTTP/1.12",
            "GET /met rics HTTP/1.1",
            "G(T /metrics HTTP/1.1",
            "\u{0}\u{1} / HTTP/1.1",
        ] {
            assert_eq!(parse_request_line(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_request_line(b"GET /\xff HTTP/1.1"), None);
        assert_eq!(target_path("/metrics?x=1"), "/metrics");
        assert_eq!(target_path("/metrics#top"), "/metrics");
        assert_eq!(target_path("http://host:9564/metrics"), "/metrics");
        assert_eq!(target_path("http://host:9564"), "/");
        assert_eq!(target_path("*"), "*");
    }

    // The server, over real sockets.

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Sends `request`, reads until the server closes; `None` if the
    /// server closed without answering.
    fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Reply> {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        if raw.is_empty() {
            return None;
        }
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("no end of head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        assert!(!parts.next().unwrap_or("").is_empty(), "{status_line}");
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").expect("bad header");
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let reply = Reply {
            status,
            headers,
            body: body.to_owned(),
        };
        assert_eq!(reply.header("Connection"), Some("close"));
        Some(reply)
    }

    fn get(addr: SocketAddr, path: &str) -> Reply {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .expect("no reply")
    }

    /// The clients' deadline in the tests of [`start_counting`] servers:
    /// ample for a scrape, and what a test of the deadline waits instead
    /// of [`IO_TIMEOUT`].
    const SHORT_TIMEOUT: Duration = Duration::from_secs(1);

    /// A server whose clients get [`SHORT_TIMEOUT`], counting its
    /// snapshots.
    fn start_counting() -> (MetricsServer, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let snapshot: SnapshotFn = {
            let calls = Arc::clone(&calls);
            Arc::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                sample_status()
            })
        };
        let server = MetricsServer::start_with_timeout(
            "127.0.0.1:0".parse().unwrap(),
            snapshot,
            SHORT_TIMEOUT,
        )
        .unwrap();
        (server, calls)
    }

    fn assert_scrape_ok(addr: SocketAddr) {
        let reply = get(addr, "/metrics");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("Content-Type"), Some(CONTENT_TYPE));
        assert_eq!(
            reply.header("Content-Length"),
            Some(reply.body.len().to_string().as_str())
        );
        assert_eq!(reply.body, encode(&sample_status()));
    }

    #[test]
    fn serves_metrics_and_index() {
        let (server, calls) = start_counting();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        assert_scrape_ok(addr);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let index = get(addr, "/");
        assert_eq!(index.status, 200);
        assert_eq!(
            index.header("Content-Type"),
            Some("text/plain; charset=utf-8")
        );
        assert!(index.body.contains("/metrics"), "{}", index.body);

        let query = get(addr, "/metrics?name[]=vhost_rng_info");
        assert_eq!(query.status, 200);
        // HTTP/1.0 and an absolute-form target work too.
        let old = exchange(addr, b"GET http://localhost/metrics HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(old.status, 200);
        assert!(old.body.ends_with("# EOF\n"));

        let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_eq!(
            head.header("Content-Length"),
            Some(encode(&sample_status()).len().to_string().as_str())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        let (server, calls) = start_counting();
        let addr = server.local_addr();
        for path in ["/nope", "/metrics/", "/metricsx", "//metrics"] {
            let reply = get(addr, path);
            assert_eq!(reply.status, 404, "{path}");
            assert_eq!(
                reply.header("Content-Length"),
                Some(reply.body.len().to_string().as_str())
            );
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "get"] {
            let request =
                format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
            let reply = exchange(addr, request.as_bytes()).unwrap();
            assert_eq!(reply.status, 405, "{method}");
            assert_eq!(reply.header("Allow"), Some("GET, HEAD"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_scrape_ok(addr);
    }

    #[test]
    fn garbage_is_answered_and_survived() {
        let (server, _) = start_counting();
        let addr = server.local_addr();
        let bad_requests: [&[u8]; 7] = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\xff\xfe\xfd /metrics HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
        ];
        for (i, request) in bad_requests.into_iter().enumerate() {
            // The last one is cut short: the client half-closes mid-head.
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(request).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).unwrap();
            let text = String::from_utf8_lossy(&raw);
            assert!(text.starts_with("HTTP/1.1 400 "), "request {i}: {text:?}");
            assert_scrape_ok(addr);
        }

        // A head that never ends.
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 2 * MAX_REQUEST_HEAD));
        let reply = exchange(addr, &huge).unwrap();
        assert_eq!(reply.status, 431);
        assert_scrape_ok(addr);

        // Random bytes without a line end, then nothing: a timeout.
        let reply = exchange(addr, b"\x00\x01\x02\x03garbage").unwrap();
        assert_eq!(reply.status, 408);
        assert_scrape_ok(addr);

        // Connect and close at once.
        drop(TcpStream::connect(addr).unwrap());
        assert_scrape_ok(addr);
    }

    #[test]
    fn silent_and_slow_clients_do_not_delay_others_and_are_cut_off_at_the_deadline() {
        let (server, _) = start_counting();
        let addr = server.local_addr();
        // Before either connects: neither's deadline can start earlier.
        let started = Instant::now();
        // Connects and says nothing.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Sends a byte every 100 ms, never finishing: each read is well
        // within the deadline, the whole head (3 s) is not.
        let (connected, dribbling) = std::sync::mpsc::channel();
        let dribbler = thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            connected.send(()).unwrap();
            let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n";
            let mut sent = 0;
            for &b in head {
                if stream.write_all(&[b]).is_err() {
                    break;
                }
                sent += 1;
                thread::sleep(Duration::from_millis(100));
            }
            // A reset after the answer is fine; the answer is checked.
            let mut raw = Vec::new();
            let _ = stream.read_to_end(&mut raw);
            (
                sent < head.len(),
                String::from_utf8_lossy(&raw).into_owned(),
            )
        });
        dribbling.recv().unwrap();

        // Accepted after both (connections are accepted in order) and
        // served while both are held: one client at a time, it would wait
        // for their deadlines.
        assert_scrape_ok(addr);
        assert!(started.elapsed() < SHORT_TIMEOUT, "{:?}", started.elapsed());

        // The silent one is closed without an answer at its deadline.
        let mut raw = Vec::new();
        idle.read_to_end(&mut raw).unwrap();
        assert!(raw.is_empty());
        let closed_after = started.elapsed();
        assert!(
            closed_after >= SHORT_TIMEOUT && closed_after < SHORT_TIMEOUT + Duration::from_secs(1),
            "{closed_after:?}"
        );
        // The slow one is cut off by the overall deadline, not by a
        // per-read timeout, and told so.
        let (cut_short, answer) = dribbler.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
        assert!(cut_short, "the dribbler could send its whole head");
    }

    fn client_threads() -> usize {
        vhost_rng_testing::threads_named("metrics-client").unwrap()
    }

    /// Held by the tests that count client threads, so that they do not
    /// count each other's.
    static COUNTING_THREADS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Waits, at most 10 s, for `done`.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// A GET /metrics that may be turned away: its status, or `None`.
    fn try_scrape(addr: SocketAddr) -> Option<u16> {
        let mut stream = TcpStream::connect(addr).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw);
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    #[test]
    fn idle_connections_do_not_hold_up_a_scrape_and_their_threads_end() {
        let _counting = COUNTING_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        // Long, so the idle connections are surely all held during the
        // scrape: served one at a time, it would wait for every one.
        let timeout = Duration::from_secs(10);
        let snapshot: SnapshotFn = Arc::new(sample_status);
        let server =
            MetricsServer::start_with_timeout("127.0.0.1:0".parse().unwrap(), snapshot, timeout)
                .unwrap();
        let addr = server.local_addr();
        // The other tests' clients last a second or two at most.
        wait_for("the other tests' client threads to end", || {
            client_threads() == 0
        });

        let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        wait_for("a thread for each idle connection", || {
            client_threads() >= 20
        });
        let started = Instant::now();
        assert_scrape_ok(addr);
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());

        drop(idle);
        wait_for("the idle connections' threads to end", || {
            client_threads() == 0
        });
    }

    #[test]
    fn connections_beyond_the_limit_are_closed_at_once() {
        let _counting = COUNTING_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = Duration::from_secs(30);
        let snapshot: SnapshotFn = Arc::new(sample_status);
        let server =
            MetricsServer::start_with_timeout("127.0.0.1:0".parse().unwrap(), snapshot, timeout)
                .unwrap();
        let addr = server.local_addr();
        // Accepted in the order they connected: these take every place.
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Closed without an answer, long before the idle ones' timeout (a
        // queued connection would wait 30 s and then hit the read timeout).
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut raw = Vec::new();
        let closed = extra.read_to_end(&mut raw);
        assert!(
            closed.is_ok()
                || closed
                    .as_ref()
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset),
            "{closed:?}"
        );
        assert!(raw.is_empty());

        drop(idle);
        // The places come back as the idle connections' threads see them
        // close; until then a scrape may still be turned away.
        wait_for("a scrape to be served again", || {
            try_scrape(addr) == Some(200)
        });
    }

    #[test]
    fn fifty_sequential_scrapes() {
        let (server, calls) = start_counting();
        let addr = server.local_addr();
        for _ in 0..50 {
            assert_scrape_ok(addr);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn a_panicking_snapshot_is_a_500_not_a_dead_server() {
        let calls = Arc::new(AtomicUsize::new(0));
        let snapshot: SnapshotFn = {
            let calls = Arc::clone(&calls);
            Arc::new(move || {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("snapshot failed (expected by the test)");
                }
                sample_status()
            })
        };
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), snapshot).unwrap();
        assert_eq!(get(server.local_addr(), "/metrics").status, 500);
        assert_scrape_ok(server.local_addr());
    }

    #[test]
    fn bind_errors_come_from_start_and_drop_closes_the_socket() {
        let (server, _) = start_counting();
        let addr = server.local_addr();
        let snapshot: SnapshotFn = Arc::new(sample_status);
        let err = MetricsServer::start(addr, snapshot).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);

        let started = Instant::now();
        drop(server);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn shutdown_from_an_unspecified_address() {
        let snapshot: SnapshotFn = Arc::new(sample_status);
        let server = MetricsServer::start("0.0.0.0:0".parse().unwrap(), snapshot).unwrap();
        let port = server.local_addr().port();
        assert_scrape_ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
        server.shutdown();
    }
}
