// SPDX-License-Identifier: Apache-2.0
//! What the daemon reports about itself: per guest, per source, per shared
//! listener, and the pool. One snapshot type feeds `vhost-rng status`,
//! `guest list` and the Prometheus metrics, so they never disagree.

use serde::{Deserialize, Serialize};

/// One guest at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The guest's name, unique in the daemon (`cid-N` for a CID let in by
    /// `--vsock-default-rate`).
    pub name: String,
    /// `socket` (the daemon listens) or `connect` (the VMM listens).
    pub endpoint: String,
    /// The endpoint's value: a socket or key file path, or a vsock CID.
    pub path: String,
    /// Whether a VMM (or an agent client) is connected now.
    pub connected: bool,
    /// Connections accepted or made since the guest was added.
    pub connections: u64,
    /// Requests completed, defective ones included.
    pub requests: u64,
    /// Random bytes handed to the guest.
    pub bytes: u64,
    /// Requests completed with no bytes because the guest got them wrong.
    pub defective_requests: u64,
    /// Time requests waited for rate-limit tokens.
    pub throttled_seconds: f64,
    /// Bytes per second served over the last few seconds.
    pub current_rate: f64,
    /// Configured limit: bytes per period.
    pub rate_bytes: Option<u64>,
    /// Configured limit: the period `rate_bytes` are per, in milliseconds.
    pub rate_period_ms: Option<u64>,
    /// Configured limit: the most bytes at once; `rate_bytes` unless set.
    pub burst: Option<u64>,
    /// The guest's share of scarce raw output relative to other guests.
    pub weight: u32,
    /// Clients refused because the guest had as many as it may have at
    /// once. Absent from the JSON of daemons before this field: 0.
    #[serde(default)]
    pub refused_connections: u64,
    /// Idle clients closed to make room for a new one when the guest had
    /// as many as it may have at once. Absent from the JSON of daemons
    /// before this field: 0.
    #[serde(default)]
    pub evicted_connections: u64,
    /// TCP handshakes that named the guest but did not prove its key.
    #[serde(default)]
    pub wrong_key_connections: u64,
    /// With `--isolation guest`, the pid of the guest process that serves
    /// this vhost-user guest alone (as that process last said).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<u32>,
}

pub use crate::frontend::shared::ListenerStatus;

/// One entropy source at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The source's name, as in the logs (`hwrng:/dev/hwrng`, `rdseed`).
    pub name: String,
    /// Whether the bytes come from hardware.
    pub hardware: bool,
    /// `starting`, `healthy`, `quarantined` or `failed`.
    pub state: String,
    /// Bits of min-entropy credited per byte.
    pub min_entropy: f64,
    /// Bytes read from the source, approved or not.
    pub bytes_read: u64,
    /// Bytes that passed the health tests and went to the conditioner.
    pub bytes_contributed: u64,
    /// Bytes read but thrown away unapproved, after a failure.
    pub bytes_discarded: u64,
    /// Repetition count test failures.
    pub rct_failures: u64,
    /// Adaptive proportion test failures.
    pub apt_failures: u64,
    /// Reads that failed.
    pub read_errors: u64,
    /// RDSEED draws that had to be retried; 0 for other sources.
    pub retries: u64,
    /// Bytes per second read over the last measuring window.
    pub rate: u64,
}

/// The pool at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// `drbg` or `raw`.
    pub mode: String,
    /// Full-entropy bytes waiting in the reservoir.
    pub level: u64,
    /// The most full-entropy bytes the reservoir holds.
    pub capacity: u64,
    /// Every source, in the order they were given.
    pub sources: Vec<SourceStatus>,
}

/// Everything `vhost-rng status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// When the daemon first started, in seconds since the Unix epoch; kept
    /// across in-place upgrades (uptime restarts with each process image).
    #[serde(default)]
    pub started_at: u64,
    /// In-place upgrades since the daemon first started.
    #[serde(default)]
    pub upgrades: u64,
    /// Serving processes started again after one died.
    #[serde(default)]
    pub worker_restarts: u64,
    /// How the last serving process that died ended ("was killed by
    /// SIGKILL").
    #[serde(default)]
    pub last_worker_exit: Option<String>,
    /// Why the last upgrade asked for did not happen, if it did not.
    #[serde(default)]
    pub last_upgrade_error: Option<String>,
    /// Upgrades asked for that did not happen.
    #[serde(default)]
    pub upgrade_failures: u64,
    /// Global cap over all guests, bytes per second.
    pub max_rate: Option<u64>,
    /// Every guest, as `guest list` shows them.
    pub guests: Vec<GuestStatus>,
    /// The entropy pool and its sources.
    pub pool: PoolStatus,
    /// The shared listeners the daemon runs; none from daemons before this
    /// field.
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
    /// The serving process's sandbox: its user, seccomp mode and what
    /// Landlock enforces; none from daemons before this field.
    #[serde(default)]
    pub sandbox: Option<crate::service::sandbox::SandboxStatus>,
    /// `shared` or `guest` (`--isolation`). Absent from the JSON of
    /// daemons before this field.
    #[serde(default)]
    pub isolation: String,
}

impl SourceStatus {
    /// The status of the source whose counters `s` holds.
    pub fn from_snapshot(s: &crate::entropy::source::SourceStatsSnapshot) -> Self {
        SourceStatus {
            name: s.name.clone(),
            hardware: s.hardware,
            state: s.state.as_str().to_owned(),
            min_entropy: s.min_entropy,
            bytes_read: s.bytes_read,
            bytes_contributed: s.bytes_contributed,
            bytes_discarded: s.bytes_discarded,
            rct_failures: s.rct_failures,
            apt_failures: s.apt_failures,
            read_errors: s.read_errors,
            retries: s.retries,
            rate: s.rate,
        }
    }
}

/// Formats a byte rate for people.
pub fn human_rate(bytes_per_second: f64) -> String {
    if bytes_per_second >= 1e6 {
        format!("{:.1} MB/s", bytes_per_second / 1e6)
    } else if bytes_per_second >= 1e3 {
        format!("{:.1} kB/s", bytes_per_second / 1e3)
    } else {
        format!("{bytes_per_second:.0} B/s")
    }
}

impl DaemonStatus {
    /// The human-readable report of `vhost-rng status`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let upgrades = match self.upgrades {
            0 => String::new(),
            n => format!(" ({n} in-place upgrade(s))"),
        };
        let _ = writeln!(
            out,
            "vhost-rng {}, up {:.0}s{upgrades}, mode {}, pool {}/{} bytes{}",
            self.version,
            self.uptime_seconds,
            self.pool.mode,
            self.pool.level,
            self.pool.capacity,
            self.max_rate
                .map(|r| format!(", max rate {}", human_rate(r as f64)))
                .unwrap_or_default()
        );
        if let Some(error) = &self.last_upgrade_error {
            let _ = writeln!(out, "last upgrade refused: {error}");
        }
        if let Some(exit) = &self.last_worker_exit {
            let _ = writeln!(
                out,
                "serving process restarted {} time(s); the last one {exit}",
                self.worker_restarts
            );
        }
        if let Some(sandbox) = &self.sandbox {
            let _ = writeln!(
                out,
                "sandbox: user {}, seccomp {}, Landlock {}",
                sandbox.user, sandbox.seccomp, sandbox.landlock
            );
        }
        if self.isolation == "guest" {
            let _ = writeln!(
                out,
                "isolation: guest (each vhost-user guest's memory is mapped only by its own \
                 guest process)"
            );
        }
        let _ = writeln!(out, "\nSOURCES");
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>12} {:>12} {:>10} {:>5} {:>5} {:>7}",
            "NAME", "STATE", "RATE", "READ", "DISCARDED", "RCT", "APT", "ERRORS"
        );
        for s in &self.pool.sources {
            let _ = writeln!(
                out,
                "{:<24} {:<12} {:>12} {:>12} {:>10} {:>5} {:>5} {:>7}",
                s.name,
                s.state,
                human_rate(s.rate as f64),
                s.bytes_read,
                s.bytes_discarded,
                s.rct_failures,
                s.apt_failures,
                s.read_errors
            );
        }
        let _ = writeln!(out, "\nGUESTS");
        out.push_str(&render_guests(&self.guests));
        if !self.listeners.is_empty() {
            let _ = writeln!(out, "\nLISTENERS");
            out.push_str(&render_listeners(&self.listeners));
        }
        out
    }
}

/// The listener table of `vhost-rng status`: refusals by reason, in the
/// order of their names.
fn render_listeners(listeners: &[ListenerStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<24} {:>12}  REFUSED",
        "KIND", "ADDRESS", "CONNECTIONS"
    );
    for l in listeners {
        let refused = l
            .refused
            .iter()
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "{:<6} {:<24} {:>12}  {refused}",
            l.kind, l.address, l.connections
        );
    }
    out
}

/// The table of `vhost-rng guest list`.
pub fn render_guests(guests: &[GuestStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:>12} {:>10} {:>12} {:>10} {:>12} {:>8} {:>8} {:>9}  LIMIT",
        "NAME",
        "CONNECTED",
        "BYTES",
        "REQUESTS",
        "RATE",
        "THROTTLED",
        "DEFECTIVE",
        "REFUSED",
        "EVICTED",
        "WRONG-KEY"
    );
    for g in guests {
        let limit = match (g.rate_bytes, g.rate_period_ms) {
            (Some(bytes), Some(period)) => format!(
                "{bytes} bytes / {period} ms, burst {}, weight {}",
                g.burst.unwrap_or(bytes),
                g.weight
            ),
            _ => format!("unlimited, weight {}", g.weight),
        };
        let limit = match g.process {
            Some(pid) => format!("{limit}, guest process {pid}"),
            None => limit,
        };
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:>12} {:>10} {:>12} {:>9.1}s {:>12} {:>8} {:>8} {:>9}  {limit}",
            g.name,
            if g.connected { "yes" } else { "no" },
            g.bytes,
            g.requests,
            human_rate(g.current_rate),
            g.throttled_seconds,
            g.defective_requests,
            g.refused_connections,
            g.evicted_connections,
            g.wrong_key_connections
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(name: &str) -> GuestStatus {
        GuestStatus {
            name: name.into(),
            endpoint: "socket".into(),
            path: format!("/run/{name}.sock"),
            connected: true,
            connections: 1,
            requests: 10,
            bytes: 640,
            defective_requests: 0,
            throttled_seconds: 1.5,
            current_rate: 16384.0,
            rate_bytes: Some(16384),
            rate_period_ms: Some(1000),
            burst: None,
            weight: 1,
            refused_connections: 0,
            evicted_connections: 0,
            wrong_key_connections: 0,
            process: None,
        }
    }

    #[test]
    fn status_round_trips_through_json_and_renders() {
        let status = DaemonStatus {
            version: "0.1.0".into(),
            uptime_seconds: 12.0,
            started_at: 0,
            upgrades: 0,
            worker_restarts: 0,
            last_worker_exit: None,
            last_upgrade_error: None,
            upgrade_failures: 0,
            max_rate: None,
            guests: vec![guest("vm1")],
            pool: PoolStatus {
                mode: "drbg".into(),
                level: 64,
                capacity: 8192,
                sources: vec![],
            },
            listeners: vec![],
            sandbox: None,
            isolation: String::new(),
        };
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<DaemonStatus>(&json).unwrap(), status);
        let text = status.render();
        assert!(
            text.contains("vm1") && text.contains("16384 bytes / 1000 ms"),
            "{text}"
        );
        assert!(text.contains("16.4 kB/s"), "{text}");
    }

    fn listener(kind: &str, address: &str, refused: &[(&str, u64)]) -> ListenerStatus {
        ListenerStatus {
            kind: kind.into(),
            address: address.into(),
            connections: 12,
            refused: refused.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn refusals_and_listeners_are_rendered() {
        let mut xen1 = guest("xen1");
        xen1.refused_connections = 7;
        xen1.evicted_connections = 5;
        xen1.wrong_key_connections = 3;
        let status = DaemonStatus {
            version: "0.1.0".into(),
            uptime_seconds: 12.0,
            started_at: 0,
            upgrades: 0,
            worker_restarts: 0,
            last_worker_exit: None,
            last_upgrade_error: None,
            upgrade_failures: 0,
            max_rate: None,
            guests: vec![xen1],
            pool: PoolStatus {
                mode: "drbg".into(),
                level: 64,
                capacity: 8192,
                sources: vec![],
            },
            listeners: vec![
                listener("vsock", "5564", &[("unknown_cid", 4)]),
                listener(
                    "tcp",
                    "192.0.2.1:5565",
                    &[("unknown_name", 2), ("not_protocol", 1)],
                ),
            ],
            sandbox: None,
            isolation: String::new(),
        };
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<DaemonStatus>(&json).unwrap(), status);

        let text = status.render();
        let header = text.lines().find(|l| l.contains(" REFUSED ")).unwrap();
        let row = text.lines().find(|l| l.starts_with("xen1 ")).unwrap();
        // Columns are right-aligned under their heading.
        let column = |name: &str| {
            let end = header.find(name).unwrap() + name.len();
            row[..end].split_whitespace().last().unwrap()
        };
        assert_eq!(
            (column("REFUSED"), column("EVICTED"), column("WRONG-KEY")),
            ("7", "5", "3"),
            "{text}"
        );

        let listeners = &text[text.find("\nLISTENERS\n").expect("a listener section")..];
        assert!(
            listeners.contains("vsock  5564 ") && listeners.contains("unknown_cid 4"),
            "{text}"
        );
        // Reasons in the order of their names.
        assert!(
            listeners.contains("192.0.2.1:5565")
                && listeners.contains("not_protocol 1, unknown_name 2"),
            "{text}"
        );
    }

    #[test]
    fn no_listener_section_without_listeners() {
        let status = DaemonStatus {
            version: "0.1.0".into(),
            uptime_seconds: 1.0,
            started_at: 0,
            upgrades: 0,
            worker_restarts: 0,
            last_worker_exit: None,
            last_upgrade_error: None,
            upgrade_failures: 0,
            max_rate: None,
            guests: vec![],
            pool: PoolStatus {
                mode: "raw".into(),
                level: 0,
                capacity: 65536,
                sources: vec![],
            },
            listeners: vec![],
            sandbox: None,
            isolation: String::new(),
        };
        assert!(!status.render().contains("LISTENERS"));
    }

    #[test]
    fn json_of_a_daemon_before_refusal_counts_still_parses() {
        let mut status: serde_json::Value = serde_json::to_value(DaemonStatus {
            version: "0.1.0".into(),
            uptime_seconds: 1.0,
            started_at: 0,
            upgrades: 0,
            worker_restarts: 0,
            last_worker_exit: None,
            last_upgrade_error: None,
            upgrade_failures: 0,
            max_rate: None,
            guests: vec![guest("vm1")],
            pool: PoolStatus {
                mode: "drbg".into(),
                level: 0,
                capacity: 8192,
                sources: vec![],
            },
            listeners: vec![listener("tcp", "127.0.0.1:5565", &[])],
            sandbox: None,
            isolation: String::new(),
        })
        .unwrap();
        status.as_object_mut().unwrap().remove("listeners");
        let vm1 = status["guests"][0].as_object_mut().unwrap();
        vm1.remove("refused_connections");
        vm1.remove("evicted_connections");
        vm1.remove("wrong_key_connections");
        let parsed: DaemonStatus = serde_json::from_value(status).unwrap();
        assert!(parsed.listeners.is_empty());
        assert_eq!(parsed.guests[0], guest("vm1"));
    }
}
