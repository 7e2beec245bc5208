// SPDX-License-Identifier: Apache-2.0
//! One thread per source: read raw bytes, run them through the SP 800-90B
//! health tests, and forward only approved bytes to the conditioner.
//!
//! A health-test failure quarantines the source: the bytes read since its
//! last good check are discarded, the failure is logged and counted, and
//! after a backoff the source must pass the start-up test again before it
//! contributes. Read errors are handled the same way, with the source
//! reopened.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, error, info, warn};

use super::{RawSource, SourceError};
use crate::entropy::health::{HealthConfig, HealthFailure, HealthTests};
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;

/// Bytes asked of a source per read.
const READ_CHUNK: usize = 512;
/// First wait after a failure; doubled on each further failure.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A source that stayed healthy this long starts over at the first backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Where a source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SourceState {
    /// Running the start-up test; contributes nothing yet.
    Starting = 0,
    /// Passed its tests; contributing.
    Healthy = 1,
    /// Failed a health test; waiting out its backoff.
    Quarantined = 2,
    /// Cannot be read; waiting out its backoff before reopening.
    Failed = 3,
}

impl SourceState {
    fn from_u8(value: u8) -> SourceState {
        match value {
            1 => SourceState::Healthy,
            2 => SourceState::Quarantined,
            3 => SourceState::Failed,
            _ => SourceState::Starting,
        }
    }

    /// The state as status and metrics show it: `starting`, `healthy`,
    /// `quarantined` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Starting => "starting",
            SourceState::Healthy => "healthy",
            SourceState::Quarantined => "quarantined",
            SourceState::Failed => "failed",
        }
    }
}

/// Counters for one source, written by its thread, read by status.
#[derive(Debug)]
pub struct SourceStats {
    name: String,
    hardware: bool,
    min_entropy: f64,
    state: AtomicU8,
    /// Bytes read from the source, approved or not.
    pub bytes_read: AtomicU64,
    /// Bytes that passed the health tests and went to the conditioner.
    pub bytes_contributed: AtomicU64,
    /// Bytes read but thrown away unapproved, after a health-test failure or
    /// a read error.
    pub bytes_discarded: AtomicU64,
    /// Repetition count test failures.
    pub rct_failures: AtomicU64,
    /// Adaptive proportion test failures.
    pub apt_failures: AtomicU64,
    /// Reads that failed (each followed by a backoff and a reopen).
    pub read_errors: AtomicU64,
    /// RDSEED draws that had to be retried (CF=0); 0 for other sources.
    pub retries: AtomicU64,
    /// Bytes per second read over the last measuring window.
    pub rate: AtomicU64,
}

/// A plain copy of [`SourceStats`].
#[derive(Debug, Clone, PartialEq)]
pub struct SourceStatsSnapshot {
    /// The source's name, as [`SourceSpec::label`](super::SourceSpec::label)
    /// gives it.
    pub name: String,
    /// Whether the bytes come from hardware.
    pub hardware: bool,
    /// Bits of min-entropy credited per byte.
    pub min_entropy: f64,
    /// Where the source stands.
    pub state: SourceState,
    /// Bytes read from the source, approved or not.
    pub bytes_read: u64,
    /// Bytes that passed the health tests and went to the conditioner.
    pub bytes_contributed: u64,
    /// Bytes read but thrown away unapproved.
    pub bytes_discarded: u64,
    /// Repetition count test failures.
    pub rct_failures: u64,
    /// Adaptive proportion test failures.
    pub apt_failures: u64,
    /// Reads that failed.
    pub read_errors: u64,
    /// RDSEED draws that had to be retried; 0 for other sources.
    pub retries: u64,
    /// Bytes per second read over the last measuring window (about a
    /// second); 0 while the source is in backoff.
    pub rate: u64,
}

impl SourceStats {
    /// Zeroed counters for a source named `name`, in the starting state.
    pub fn new(name: impl Into<String>, hardware: bool, min_entropy: f64) -> Self {
        SourceStats {
            name: name.into(),
            hardware,
            min_entropy,
            state: AtomicU8::new(SourceState::Starting as u8),
            bytes_read: AtomicU64::new(0),
            bytes_contributed: AtomicU64::new(0),
            bytes_discarded: AtomicU64::new(0),
            rct_failures: AtomicU64::new(0),
            apt_failures: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        }
    }

    /// The source's name, as in logs, status and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the source stands now.
    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn set_state(&self, state: SourceState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// A copy of every counter, each read on its own (not one atomic
    /// snapshot).
    pub fn snapshot(&self) -> SourceStatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SourceStatsSnapshot {
            name: self.name.clone(),
            hardware: self.hardware,
            min_entropy: self.min_entropy,
            state: self.state(),
            bytes_read: get(&self.bytes_read),
            bytes_contributed: get(&self.bytes_contributed),
            bytes_discarded: get(&self.bytes_discarded),
            rct_failures: get(&self.rct_failures),
            apt_failures: get(&self.apt_failures),
            read_errors: get(&self.read_errors),
            retries: get(&self.retries),
            rate: get(&self.rate),
        }
    }
}

/// All sources of the daemon; says loudly when none is healthy.
pub struct SourceBoard {
    sources: Vec<Arc<SourceStats>>,
    /// What was last announced: `None` before anything was.
    announced: Mutex<Option<bool>>,
}

impl SourceBoard {
    /// A board over `sources`, which has announced nothing yet.
    pub fn new(sources: Vec<Arc<SourceStats>>) -> Arc<Self> {
        Arc::new(SourceBoard {
            sources,
            announced: Mutex::new(None),
        })
    }

    /// Every source's counters, in the order the sources were given.
    pub fn sources(&self) -> &[Arc<SourceStats>] {
        &self.sources
    }

    /// Whether any source is healthy, i.e. contributing now.
    pub fn any_healthy(&self) -> bool {
        self.sources
            .iter()
            .any(|s| s.state() == SourceState::Healthy)
    }

    /// Logs the edges: a source became the first healthy one, or the last
    /// healthy one was lost (or none ever passed its start-up test).
    fn state_changed(&self) {
        let mut announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        let healthy: Vec<&str> = self
            .sources
            .iter()
            .filter(|s| s.state() == SourceState::Healthy)
            .map(|s| s.name())
            .collect();
        let serving = !healthy.is_empty();
        if *announced == Some(serving) {
            return;
        }
        if serving {
            info!(
                "entropy available from {}: serving guests",
                healthy.join(", ")
            );
        } else {
            error!(
                "no healthy entropy source: guests get no new bytes until a source recovers \
                 (requests wait; seeded DRBGs run on only to their reseed bound)"
            );
        }
        *announced = Some(serving);
    }
}

/// Health-tested bytes from one source, on their way to the conditioner.
pub struct Contribution {
    /// The approved bytes, oldest first.
    pub bytes: Vec<u8>,
    /// Min-entropy credited per byte.
    pub min_entropy: f64,
}

impl Drop for Contribution {
    /// Raw entropy goes into DRBG seeds: no copy stays in freed memory.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.bytes);
    }
}

/// Starts the thread that reads `source` for the rest of the process.
pub fn spawn(
    source: Box<dyn RawSource>,
    health: HealthConfig,
    stats: Arc<SourceStats>,
    board: Arc<SourceBoard>,
    sink: SyncSender<Contribution>,
) -> std::io::Result<()> {
    let tests = HealthTests::new(health).map_err(std::io::Error::other)?;
    let name = format!("source-{}", stats.name());
    let runner = Runner {
        source,
        tests,
        min_entropy: health.min_entropy,
        stats,
        board,
        sink,
        failures_log: RateLimitedLog::per_minute(6),
    };
    thread::Builder::new().name(name).spawn(move || {
        crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Source);
        runner.run()
    })?;
    Ok(())
}

struct Runner {
    source: Box<dyn RawSource>,
    tests: HealthTests,
    min_entropy: f64,
    stats: Arc<SourceStats>,
    board: Arc<SourceBoard>,
    sink: SyncSender<Contribution>,
    failures_log: RateLimitedLog,
}

/// Why a source stopped contributing for a while.
enum Setback {
    Health(HealthFailure),
    Read(SourceError),
}

impl Runner {
    fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let healthy_since = Instant::now();
            let setback = match self.contribute() {
                Ok(()) => return, // the conditioner is gone: the daemon is stopping
                Err(setback) => setback,
            };
            if healthy_since.elapsed() >= BACKOFF_RESET_AFTER {
                backoff = BACKOFF_FIRST;
            }
            self.quarantine(setback, backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Reads, tests and forwards until a setback; `Ok` when nobody listens
    /// any more.
    fn contribute(&mut self) -> Result<(), Setback> {
        // Both wiped when the source stops or fails: they hold raw entropy.
        let mut chunk = zeroize::Zeroizing::new([0u8; READ_CHUNK]);
        // Read but not yet approved by a completed test window.
        let mut unapproved = zeroize::Zeroizing::new(Vec::<u8>::with_capacity(4 * READ_CHUNK));
        let mut rate_window = (Instant::now(), 0u64);
        self.stats.set_state(SourceState::Starting);
        loop {
            let read = self.source.read(chunk.as_mut());
            self.stats
                .retries
                .store(self.source.retries(), Ordering::Relaxed);
            let n = match read {
                Ok(n) => n.min(READ_CHUNK),
                Err(e) => {
                    self.discard(&mut unapproved);
                    return Err(Setback::Read(e));
                }
            };
            self.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            self.measure_rate(&mut rate_window, n);

            unapproved.extend_from_slice(&chunk[..n]);
            let approved = match self.tests.feed(&chunk[..n]) {
                Ok(approved) => approved,
                Err(failure) => {
                    self.discard(&mut unapproved);
                    return Err(Setback::Health(failure));
                }
            };
            if approved > 0 {
                let bytes: Vec<u8> = unapproved.drain(..approved).collect();
                self.stats
                    .bytes_contributed
                    .fetch_add(approved as u64, Ordering::Relaxed);
                let contribution = Contribution {
                    bytes,
                    min_entropy: self.min_entropy,
                };
                if self.sink.send(contribution).is_err() {
                    return Ok(());
                }
            }
            if !self.tests.in_startup() && self.stats.state() != SourceState::Healthy {
                self.stats.set_state(SourceState::Healthy);
                info!("{}: passed the start-up health test", self.stats.name());
                self.board.state_changed();
            }
        }
    }

    fn discard(&self, unapproved: &mut Vec<u8>) {
        self.stats
            .bytes_discarded
            .fetch_add(unapproved.len() as u64, Ordering::Relaxed);
        unapproved.clear();
    }

    fn measure_rate(&self, window: &mut (Instant, u64), n: usize) {
        window.1 += n as u64;
        let elapsed = window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let rate = (window.1 as f64 / elapsed.as_secs_f64()) as u64;
            self.stats.rate.store(rate, Ordering::Relaxed);
            *window = (Instant::now(), 0);
        }
    }

    fn quarantine(&mut self, setback: Setback, backoff: Duration) {
        let name = self.stats.name().to_owned();
        let state = match &setback {
            Setback::Health(failure) => {
                let counter = match failure {
                    HealthFailure::RepetitionCount { .. } => &self.stats.rct_failures,
                    HealthFailure::AdaptiveProportion { .. } => &self.stats.apt_failures,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                SourceState::Quarantined
            }
            Setback::Read(_) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                SourceState::Failed
            }
        };
        self.stats.set_state(state);
        self.stats.rate.store(0, Ordering::Relaxed);
        log_limited!(
            self.failures_log,
            Level::Warn,
            "{name}: {}; retrying in {}s with a new start-up test",
            match &setback {
                Setback::Health(failure) => {
                    format!("{failure}; unapproved data discarded, source quarantined")
                }
                Setback::Read(e) => format!("{e}"),
            },
            backoff.as_secs()
        );
        self.board.state_changed();
        thread::sleep(backoff);
        if let Err(e) = self.source.recover() {
            warn!("{name}: {e}");
        }
        self.tests.restart();
    }
}
