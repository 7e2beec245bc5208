//! Rate-limited logging, so a misbehaving guest cannot flood the host's logs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}
