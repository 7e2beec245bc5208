// SPDX-License-Identifier: Apache-2.0
//! `vhost-rng check`: reads each entropy source through the same health
//! tests the daemon uses and reports on it, like rngtest does for FIPS
//! tests. Exit status 0 when every source is healthy, 1 when not.

use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::entropy::health::{HealthConfig, HealthFailure, HealthTests};
use crate::entropy::source::{RawSource, SourceSpec};

/// What one source did during the check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckReport {
    /// The source's name, as in the daemon's logs and status.
    pub name: String,
    /// Whether the bytes come from hardware.
    pub hardware: bool,
    /// Bits of min-entropy credited per byte, which set the test cutoffs.
    pub min_entropy: f64,
    /// Bytes read from the source.
    pub bytes: u64,
    /// Seconds the reading took (the timeout, for a stalled source).
    pub seconds: f64,
    /// Whether the start-up test passed at least once.
    pub startup_passed: bool,
    /// Repetition count test failures; the tests start over after each.
    pub rct_failures: u64,
    /// Adaptive proportion test failures; the tests start over after each.
    pub apt_failures: u64,
    /// Why the source could not be opened or read, if it could not.
    pub error: Option<String>,
    /// Did not deliver the bytes asked for in time.
    pub stalled: bool,
}

impl CheckReport {
    /// True when the source was read in full and in time, passed its
    /// start-up test and never failed a health test.
    pub fn healthy(&self) -> bool {
        self.error.is_none()
            && !self.stalled
            && self.startup_passed
            && self.rct_failures == 0
            && self.apt_failures == 0
    }

    fn verdict(&self) -> &'static str {
        if self.error.is_some() {
            "failed"
        } else if self.rct_failures + self.apt_failures > 0 {
            "unhealthy"
        } else if self.stalled {
            "stalled"
        } else if !self.startup_passed {
            "starting"
        } else {
            "healthy"
        }
    }

    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Runs the check on `specs`, reading `bytes` from each within `timeout`,
/// and prints the report; the process's exit status.
pub fn run(specs: &[SourceSpec], bytes: u64, timeout: Duration) -> ExitCode {
    if specs.is_empty() {
        eprintln!(
            "vhost-rng check: no entropy source works on this host (no readable \
             /dev/hwrng, no RDSEED, no jitter RNG over AF_ALG); name one with --source"
        );
        return ExitCode::FAILURE;
    }
    let reports = check_sources(specs, bytes, timeout);
    let mut out = std::io::stdout().lock();
    let _ = write_table(&mut out, &reports);
    if reports.iter().all(CheckReport::healthy) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Checks every source in parallel, each on its own thread, and waits at
/// most `timeout` (a source that hangs is reported as stalled).
pub fn check_sources(specs: &[SourceSpec], bytes: u64, timeout: Duration) -> Vec<CheckReport> {
    let deadline = Instant::now() + timeout;
    let receivers: Vec<_> = specs
        .iter()
        .map(|spec| {
            let (progress, latest) = mpsc::channel();
            let spec = spec.clone();
            let started = thread::Builder::new()
                .name(format!("check-{}", spec.label()))
                .spawn(move || check_one(&spec, bytes, deadline, &progress));
            (latest, started.err())
        })
        .collect();

    specs
        .iter()
        .zip(receivers)
        .map(|(spec, (latest, spawn_error))| {
            let mut report = CheckReport {
                name: spec.label(),
                min_entropy: spec.min_entropy(),
                error: spawn_error.map(|e| format!("cannot start a thread: {e}")),
                ..CheckReport::default()
            };
            // Every update is a complete report; keep the last one that
            // arrives before the deadline.
            loop {
                let wait = deadline.saturating_duration_since(Instant::now());
                match latest.recv_timeout(wait) {
                    Ok(update) => report = update,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        report.stalled = true;
                        report.seconds = timeout.as_secs_f64();
                        break;
                    }
                }
            }
            report
        })
        .collect()
}

fn check_one(
    spec: &SourceSpec,
    bytes: u64,
    deadline: Instant,
    progress: &mpsc::Sender<CheckReport>,
) {
    let started = Instant::now();
    let mut report = CheckReport {
        name: spec.label(),
        min_entropy: spec.min_entropy(),
        ..CheckReport::default()
    };
    let mut source: Box<dyn RawSource> = match spec.open() {
        Ok(source) => source,
        Err(e) => {
            report.error = Some(e.to_string());
            let _ = progress.send(report);
            return;
        }
    };
    report.hardware = source.is_hardware();
    let config = HealthConfig {
        min_entropy: spec.min_entropy(),
        ..HealthConfig::default()
    };
    let mut tests = match HealthTests::new(config) {
        Ok(tests) => tests,
        Err(e) => {
            report.error = Some(e.to_string());
            let _ = progress.send(report);
            return;
        }
    };
    let mut buf = [0u8; 512];
    while report.bytes < bytes && Instant::now() < deadline {
        let n = match source.read(&mut buf) {
            Ok(n) => n.min(buf.len()),
            Err(e) => {
                report.error = Some(e.to_string());
                break;
            }
        };
        report.bytes += n as u64;
        match tests.feed(&buf[..n]) {
            Ok(_) => report.startup_passed |= !tests.in_startup(),
            Err(HealthFailure::RepetitionCount { .. }) => {
                report.rct_failures += 1;
                tests.restart();
            }
            Err(HealthFailure::AdaptiveProportion { .. }) => {
                report.apt_failures += 1;
                tests.restart();
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        if progress.send(report.clone()).is_err() {
            return;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.stalled = report.bytes < bytes && report.error.is_none();
    let _ = progress.send(report);
}

fn write_table(out: &mut impl Write, reports: &[CheckReport]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<10} {:>10} {:>12} {:>5} {:>5}  NOTES",
        "SOURCE", "STATE", "BYTES", "RATE", "RCT", "APT"
    )?;
    for r in reports {
        let mut notes = vec![format!("credited {} bits/byte", r.min_entropy)];
        if !r.hardware && r.error.is_none() {
            notes.push("not hardware".into());
        }
        if let Some(error) = &r.error {
            notes.push(error.clone());
        }
        if r.stalled {
            notes.push(format!("delivered {} bytes in {:.0}s", r.bytes, r.seconds));
        }
        writeln!(
            out,
            "{:<24} {:<10} {:>10} {:>12} {:>5} {:>5}  {}",
            r.name,
            r.verdict(),
            r.bytes,
            format_rate(r.rate()),
            r.rct_failures,
            r.apt_failures,
            notes.join("; ")
        )?;
    }
    Ok(())
}

fn format_rate(bytes_per_second: f64) -> String {
    if bytes_per_second >= 1e6 {
        format!("{:.1} MB/s", bytes_per_second / 1e6)
    } else {
        format!("{:.1} kB/s", bytes_per_second / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(spec: &str, bytes: u64, timeout_ms: u64) -> CheckReport {
        let spec: SourceSpec = spec.parse().unwrap();
        check_sources(&[spec], bytes, Duration::from_millis(timeout_ms)).remove(0)
    }

    #[test]
    fn os_source_is_healthy() {
        let report = check("os", 20_000, 10_000);
        assert!(report.healthy(), "{report:?}");
        assert!(report.bytes >= 20_000);
        assert!(!report.hardware);
    }

    #[test]
    fn stuck_source_is_unhealthy() {
        let report = check("file=/dev/zero", 20_000, 10_000);
        assert!(!report.healthy());
        assert!(report.rct_failures > 0, "{report:?}");
        assert_eq!(report.verdict(), "unhealthy");
    }

    #[test]
    fn unreadable_source_fails_with_its_error() {
        let report = check("file=/proc/self/mem", 1000, 10_000);
        assert_eq!(report.verdict(), "failed");
        assert!(
            report
                .error
                .as_deref()
                .unwrap_or("")
                .contains("read failed"),
            "{report:?}"
        );
    }

    #[test]
    fn hanging_source_is_reported_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Nobody ever writes: the reader blocks in open.
        let report = check(&format!("file={}", fifo.display()), 1000, 300);
        assert_eq!(report.verdict(), "stalled", "{report:?}");
        assert!(!report.healthy());
    }

    #[test]
    fn table_lists_every_source() {
        let reports = vec![
            check("os", 2048, 10_000),
            check("file=/dev/zero", 2048, 10_000),
        ];
        let mut out = Vec::new();
        write_table(&mut out, &reports).unwrap();
        let table = String::from_utf8(out).unwrap();
        assert!(table.contains("os") && table.contains("healthy"), "{table}");
        assert!(
            table.contains("file:/dev/zero") && table.contains("unhealthy"),
            "{table}"
        );
    }
}
