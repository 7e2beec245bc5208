//! A guest as the daemon knows it: its name, where it is served, and the
//! counters that outlive any one connection (a VM reboot keeps them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::log_limit::RateLimitedLog;
use crate::pool::Pool;

/// Counters for one guest, updated by its frontend, read by status reporting.
#[derive(Debug, Default)]
pub struct GuestStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub defective_requests: AtomicU64,
}

/// A plain copy of [`GuestStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatsSnapshot {
    pub connections: u64,
    pub requests: u64,
    pub bytes: u64,
    pub defective_requests: u64,
}

impl GuestStats {
    pub fn snapshot(&self) -> GuestStatsSnapshot {
        GuestStatsSnapshot {
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            defective_requests: self.defective_requests.load(Ordering::Relaxed),
        }
    }
}

/// One guest served by the daemon.
pub struct Guest {
    name: String,
    pool: Arc<Pool>,
    pub stats: GuestStats,
    /// Keeps a guest that posts defective requests in a loop from flooding
    /// the log.
    pub defect_log: RateLimitedLog,
}

impl Guest {
    pub fn new(name: impl Into<String>, pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Guest {
            name: name.into(),
            pool,
            stats: GuestStats::default(),
            defect_log: RateLimitedLog::per_minute(10),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}
