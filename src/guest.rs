//! A guest as the daemon knows it: its name, its limits, and the state
//! that outlives any one connection. A VM reboot keeps its counters and its
//! token bucket: reconnecting cannot reset a guest's budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::limiter::{Grant, RateLimit, TokenBucket};
use crate::log_limit::RateLimitedLog;
use crate::pool::Pool;

/// Counters for one guest, updated by its frontend, read by status reporting.
#[derive(Debug, Default)]
pub struct GuestStats {
    pub connected: AtomicBool,
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub defective_requests: AtomicU64,
    /// Time requests spent waiting for rate-limit tokens, in nanoseconds.
    pub throttled_ns: AtomicU64,
}

/// A plain copy of [`GuestStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatsSnapshot {
    pub connected: bool,
    pub connections: u64,
    pub requests: u64,
    pub bytes: u64,
    pub defective_requests: u64,
    pub throttled: Duration,
}

impl GuestStats {
    pub fn snapshot(&self) -> GuestStatsSnapshot {
        GuestStatsSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            defective_requests: self.defective_requests.load(Ordering::Relaxed),
            throttled: Duration::from_nanos(self.throttled_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A guest's share of the host's entropy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLimits {
    /// `None`: unlimited.
    pub rate: Option<RateLimit>,
    /// Share of a scarce source relative to other guests (raw mode).
    pub weight: u32,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            rate: None,
            weight: 1,
        }
    }
}

/// A cap on all guests together (`--max-rate`), shared by every guest.
pub type SharedBucket = Arc<Mutex<TokenBucket>>;

/// Whether a request may be answered now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Up to this many bytes; tokens for them are already taken.
    Granted(usize),
    /// Over a limit: ask again after this long.
    Wait(Duration),
}

struct Policy {
    limits: GuestLimits,
    bucket: Option<TokenBucket>,
    throttled_since: Option<Instant>,
}

/// One guest served by the daemon.
pub struct Guest {
    name: String,
    pool: Arc<Pool>,
    pub stats: GuestStats,
    /// Keeps a guest that posts defective requests in a loop from flooding
    /// the log.
    pub defect_log: RateLimitedLog,
    policy: Mutex<Policy>,
    global: Option<SharedBucket>,
}

impl Guest {
    pub fn new(name: impl Into<String>, pool: Arc<Pool>) -> Arc<Self> {
        Self::with_limits(name, pool, GuestLimits::default(), None)
    }

    pub fn with_limits(
        name: impl Into<String>,
        pool: Arc<Pool>,
        limits: GuestLimits,
        global: Option<SharedBucket>,
    ) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Guest {
            name: name.into(),
            pool,
            stats: GuestStats::default(),
            defect_log: RateLimitedLog::per_minute(10),
            policy: Mutex::new(Policy {
                limits,
                bucket: limits.rate.map(|rate| TokenBucket::new(rate, now)),
                throttled_since: None,
            }),
            global,
        })
    }

    fn policy(&self) -> MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limits(&self) -> GuestLimits {
        self.policy().limits
    }

    /// Applies new limits in place: tokens already earned are kept (up to
    /// the new burst), the connection is untouched.
    pub fn set_limits(&self, limits: GuestLimits) {
        let now = Instant::now();
        let mut policy = self.policy();
        policy.bucket = match (policy.bucket.take(), limits.rate) {
            (Some(mut bucket), Some(rate)) => {
                bucket.reconfigure(rate, now);
                Some(bucket)
            }
            (None, Some(rate)) => Some(TokenBucket::new(rate, now)),
            (_, None) => None,
        };
        policy.limits = limits;
    }

    /// Asks the guest's bucket, then the global one, for `wanted` bytes.
    pub fn admit(&self, wanted: usize, now: Instant) -> Admission {
        let mut policy = self.policy();
        let wanted = wanted as u64;
        let granted = match policy.bucket.as_mut().map(|b| b.grant(wanted, now)) {
            None => wanted,
            Some(Grant::Now(n)) => n,
            Some(Grant::Wait(wait)) => return throttled(&mut policy, now, wait),
        };
        let granted = match &self.global {
            None => granted,
            Some(global) => {
                let mut global = global.lock().unwrap_or_else(|e| e.into_inner());
                match global.grant(granted, now) {
                    Grant::Now(n) => {
                        if let Some(bucket) = policy.bucket.as_mut() {
                            bucket.refund(granted - n);
                        }
                        n
                    }
                    Grant::Wait(wait) => {
                        if let Some(bucket) = policy.bucket.as_mut() {
                            bucket.refund(granted);
                        }
                        drop(global);
                        return throttled(&mut policy, now, wait);
                    }
                }
            }
        };
        if let Some(since) = policy.throttled_since.take() {
            let waited = now.saturating_duration_since(since).as_nanos();
            self.stats
                .throttled_ns
                .fetch_add(u64::try_from(waited).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        // Grants never exceed `wanted`, a usize.
        Admission::Granted(granted as usize)
    }

    /// Gives back the tokens of a grant the pool could not fill.
    pub fn settle(&self, granted: usize, used: usize) {
        let unused = granted.saturating_sub(used) as u64;
        if unused == 0 {
            return;
        }
        if let Some(bucket) = self.policy().bucket.as_mut() {
            bucket.refund(unused);
        }
        if let Some(global) = &self.global {
            global
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refund(unused);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

fn throttled(policy: &mut Policy, now: Instant, wait: Duration) -> Admission {
    policy.throttled_since.get_or_insert(now);
    Admission::Wait(wait)
}
