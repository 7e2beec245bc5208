// SPDX-License-Identifier: Apache-2.0
//! Rate-limited logging, so a misbehaving guest cannot flood the host's logs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// For [`log_limited!`](crate::log_limited): its expansion reaches `log`
/// through this crate, whatever the caller's own dependencies are.
#[doc(hidden)]
pub use log as __log;

/// Logs a message at `level` (a [`log::Level`]) unless `limiter` (a
/// [`RateLimitedLog`]) holds it back, appending how many were held back
/// since the last one: "(N similar messages suppressed)". A message held
/// back is not formatted, nor are its arguments evaluated. The record
/// keeps the caller's module as its target.
///
/// ```
/// use vhost_rng_protocol::log_limit::RateLimitedLog;
/// use vhost_rng_protocol::log_limited;
///
/// let refusals = RateLimitedLog::per_minute(4);
/// let cid = 7;
/// // "connection from CID 7 refused (0 similar messages suppressed)"
/// log_limited!(refusals, log::Level::Warn, "connection from CID {cid} refused");
/// ```
#[macro_export]
macro_rules! log_limited {
    ($limiter:expr, $level:expr, $($message:tt)+) => {
        if let ::core::option::Option::Some(suppressed) =
            $crate::log_limit::RateLimitedLog::permit(&$limiter)
        {
            $crate::log_limit::__log::log!(
                $level,
                "{} ({} similar messages suppressed)",
                ::core::format_args!($($message)+),
                suppressed
            );
        }
    };
}

/// Allows at most `burst` messages per `window`; counts what it holds back.
#[derive(Debug)]
pub struct RateLimitedLog {
    window: Duration,
    burst: u32,
    state: Mutex<WindowState>,
}

#[derive(Debug)]
struct WindowState {
    started: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    /// At most `burst` messages in each `window`, the window starting at the
    /// first message after the last one ended.
    pub fn new(window: Duration, burst: u32) -> Self {
        RateLimitedLog {
            window,
            burst,
            state: Mutex::new(WindowState {
                started: None,
                emitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// At most `burst` messages a minute.
    pub fn per_minute(burst: u32) -> Self {
        Self::new(Duration::from_secs(60), burst)
    }

    /// Returns `Some(n)` when a message may be logged now, `n` being how many
    /// were suppressed since the last one that was; `None` to stay quiet.
    pub fn permit(&self) -> Option<u64> {
        self.permit_at(Instant::now())
    }

    fn permit_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain counters; the counters are still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let window_over = state
            .started
            .is_none_or(|started| now.duration_since(started) >= self.window);
        if window_over {
            state.started = Some(now);
            state.emitted = 0;
        }
        if state.emitted < self.burst {
            state.emitted += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_burst_then_suppresses_until_next_window() {
        let log = RateLimitedLog::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(log.permit_at(t0), Some(0));
        assert_eq!(log.permit_at(t0), Some(0));
        assert_eq!(log.permit_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.permit_at(t0 + Duration::from_secs(9)), None);
        // The next window reports how many were held back.
        assert_eq!(log.permit_at(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(log.permit_at(t0 + Duration::from_secs(11)), Some(0));
        assert_eq!(log.permit_at(t0 + Duration::from_secs(11)), None);
    }

    /// What was logged from this module: level, target and text.
    struct Capture(Mutex<Vec<(log::Level, String, String)>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }

        fn log(&self, record: &log::Record<'_>) {
            if record.target() == module_path!() {
                let mut records = self.0.lock().unwrap_or_else(|e| e.into_inner());
                records.push((
                    record.level(),
                    record.target().to_owned(),
                    record.args().to_string(),
                ));
            }
        }

        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn log_limited_appends_the_count_and_formats_only_what_it_logs() {
        // The only test of this crate that installs a logger.
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        let limiter = RateLimitedLog::per_minute(2);
        let mut formatted = 0;
        for (i, level) in [log::Level::Info, log::Level::Warn, log::Level::Warn]
            .into_iter()
            .enumerate()
        {
            log_limited!(limiter, level, "refused {}: {}", i, {
                formatted += 1;
                "full"
            });
        }
        assert_eq!(formatted, 2, "the third message was held back unformatted");

        // Two held back in a window; the first message of the next says so.
        let limiter = RateLimitedLog::new(Duration::from_millis(1), 1);
        let t0 = Instant::now();
        assert_eq!(limiter.permit_at(t0), Some(0));
        assert_eq!(limiter.permit_at(t0), None);
        assert_eq!(limiter.permit_at(t0), None);
        std::thread::sleep(Duration::from_millis(2));
        log_limited!(limiter, log::Level::Warn, "again");

        let records = CAPTURE.0.lock().unwrap().clone();
        assert_eq!(
            records,
            [
                (
                    log::Level::Info,
                    module_path!().to_owned(),
                    "refused 0: full (0 similar messages suppressed)".to_owned()
                ),
                (
                    log::Level::Warn,
                    module_path!().to_owned(),
                    "refused 1: full (0 similar messages suppressed)".to_owned()
                ),
                (
                    log::Level::Warn,
                    module_path!().to_owned(),
                    "again (2 similar messages suppressed)".to_owned()
                ),
            ]
        );
    }
}
