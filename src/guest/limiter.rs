// SPDX-License-Identifier: Apache-2.0
//! Per-guest rate limiting: a token bucket deciding how many random bytes a
//! guest may receive and when.
//!
//! Units follow libvirt and Nova: a guest may receive `rate-bytes` bytes per
//! `rate-period` milliseconds (libvirt `<rate bytes='N' period='MS'/>`, Nova
//! `hw_rng:rate_bytes` / `hw_rng:rate_period`). One token is one byte. The
//! bucket holds at most `burst` tokens, which defaults to `rate-bytes`; the
//! period defaults to 1000 ms. Those defaults are applied by the callers:
//! [`RateLimit::new`] takes all three values.
//!
//! Tokens are counted exactly. The bucket keeps them in integer units of
//! "byte-nanoseconds" (`tokens × period_ns`): `t` nanoseconds of refill add
//! exactly `t × rate-bytes` of those units, so no rounding error accumulates
//! however often and in whatever steps time is advanced. The bounds enforced
//! by [`RateLimit::new`] ([`MAX_BYTES`], [`MAX_BURST`], [`MAX_PERIOD_MS`])
//! keep every product well inside `u128`.
//!
//! Time is always passed in (`now: Instant`), so the daemon uses the real
//! clock and the tests a fake one.

use std::fmt;
use std::time::{Duration, Instant};

/// Period used when a configuration gives only `rate-bytes`.
pub const DEFAULT_PERIOD_MS: u64 = 1000;

/// Largest `rate-bytes`: 2^40 bytes (1 TiB) per period.
pub const MAX_BYTES: u64 = 1 << 40;

/// Largest `rate-period`: one day, in milliseconds.
pub const MAX_PERIOD_MS: u64 = 86_400_000;

/// Largest burst (bucket capacity): 2^40 bytes (1 TiB).
pub const MAX_BURST: u64 = 1 << 40;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Why a rate limit was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimitError {
    /// `rate-bytes` of 0.
    #[error("rate-bytes must be more than 0 (to stop a guest, remove it)")]
    ZeroRate,
    /// `rate-period` of 0 ms.
    #[error("rate-period must be at least 1 ms")]
    ZeroPeriod,
    /// A burst of 0 bytes.
    #[error("rate-burst must be at least 1 byte")]
    ZeroBurst,
    /// A value over its bound ([`MAX_BYTES`], [`MAX_PERIOD_MS`] or
    /// [`MAX_BURST`]).
    #[error("{what} must be at most {max}, not {value}")]
    TooLarge {
        /// Which value: "rate-bytes", "rate-period (ms)" or "rate-burst".
        what: &'static str,
        /// The value given.
        value: u64,
        /// Its bound.
        max: u64,
    },
}

/// A validated limit: `bytes` per `period`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    bytes: u64,
    period: Duration,
    burst: u64,
}

impl RateLimit {
    /// `bytes` per `period_ms` milliseconds, at most `burst` bytes at once.
    ///
    /// Callers default `period_ms` to [`DEFAULT_PERIOD_MS`] and `burst` to
    /// `bytes`; here all three are given. Each must be at least 1 and at most
    /// [`MAX_BYTES`], [`MAX_PERIOD_MS`] and [`MAX_BURST`] respectively.
    pub fn new(bytes: u64, period_ms: u64, burst: u64) -> Result<Self, RateLimitError> {
        if bytes == 0 {
            return Err(RateLimitError::ZeroRate);
        }
        if bytes > MAX_BYTES {
            return Err(RateLimitError::TooLarge {
                what: "rate-bytes",
                value: bytes,
                max: MAX_BYTES,
            });
        }
        if period_ms == 0 {
            return Err(RateLimitError::ZeroPeriod);
        }
        if period_ms > MAX_PERIOD_MS {
            return Err(RateLimitError::TooLarge {
                what: "rate-period (ms)",
                value: period_ms,
                max: MAX_PERIOD_MS,
            });
        }
        if burst == 0 {
            return Err(RateLimitError::ZeroBurst);
        }
        if burst > MAX_BURST {
            return Err(RateLimitError::TooLarge {
                what: "rate-burst",
                value: burst,
                max: MAX_BURST,
            });
        }
        Ok(RateLimit {
            bytes,
            period: Duration::from_millis(period_ms),
            burst,
        })
    }

    /// `bytes_per_second` per 1000 ms, with a burst of the same size.
    pub fn per_second(bytes_per_second: u64) -> Result<Self, RateLimitError> {
        Self::new(bytes_per_second, DEFAULT_PERIOD_MS, bytes_per_second)
    }

    /// Bytes earned per period (`rate-bytes`).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The refill period (`rate-period`).
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Bucket capacity: the most bytes a guest can receive at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Bytes per second, for display.
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.period.as_secs_f64()
    }

    fn period_ns(&self) -> u128 {
        self.period.as_nanos()
    }

    /// Bucket capacity in scaled units (`burst × period_ns`).
    fn capacity(&self) -> u128 {
        u128::from(self.burst) * self.period_ns()
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes per {} ms (burst {})",
            self.bytes,
            self.period.as_millis(),
            self.burst
        )
    }
}

/// The decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Send this many bytes now; the tokens have been taken.
    Now(u64),
    /// Nothing may be sent yet; ask again after this long (never zero).
    Wait(Duration),
}

/// A token bucket enforcing one [`RateLimit`].
///
/// Time is passed in, so tests drive it with a fake clock. A `now` earlier
/// than one seen before (an `Instant` read on another thread, clock reads out
/// of order) counts as no time passing.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: RateLimit,
    /// Tokens held, times `period_ns`; never above `limit.capacity()`.
    scaled: u128,
    /// Time up to which tokens have been credited.
    last: Instant,
}

impl TokenBucket {
    /// A bucket that starts EMPTY and fills up to the burst while the guest
    /// is idle.
    ///
    /// Starting empty means that over any interval from creation a guest
    /// never receives more than its configured rate: a 10 s measurement of a
    /// new guest then lands within a fraction of a percent of the rate,
    /// instead of the 10% more a full initial bucket would add with
    /// burst = rate-bytes per second.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            scaled: 0,
            last: now,
        }
    }

    /// The limit being enforced.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Largest single grant: the burst.
    pub fn max_grant(&self) -> u64 {
        self.limit.burst
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.whole_tokens()
    }

    /// Takes exactly `n` tokens and returns true if that many are there;
    /// otherwise takes nothing and returns false.
    ///
    /// More than the burst is never there: callers ask for at most
    /// [`max_grant`](Self::max_grant).
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let needed = self.scaled_tokens(n);
        if self.scaled >= needed {
            self.scaled -= needed;
            true
        } else {
            false
        }
    }

    /// How long until `n` tokens will be available: zero if they are now,
    /// otherwise rounded up to whole nanoseconds, so a timer armed for this
    /// duration never fires early.
    ///
    /// `n` above the burst is taken as the burst, the most the bucket ever
    /// holds.
    pub fn time_until(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let needed = self.scaled_tokens(n.min(self.limit.burst));
        if self.scaled >= needed {
            return Duration::ZERO;
        }
        let missing = needed - self.scaled;
        duration_from_nanos(missing.div_ceil(u128::from(self.limit.bytes)))
    }

    /// The decision for a request of `wanted` bytes: `Now(n)` with
    /// `n = min(wanted, burst)`, taking those tokens, when `n` tokens are
    /// there; otherwise `Wait(d)`, taking nothing, where `d` is how long
    /// until they will be.
    ///
    /// A partial grant is a valid answer for virtio-rng: the used length
    /// tells the guest how many bytes were written. `grant(0, _)` is
    /// `Now(0)`.
    pub fn grant(&mut self, wanted: u64, now: Instant) -> Grant {
        let n = wanted.min(self.limit.burst);
        if self.try_take(n, now) {
            Grant::Now(n)
        } else {
            Grant::Wait(self.time_until(n, now))
        }
    }

    /// Returns `n` tokens taken by a grant that could not be used (the pool
    /// had fewer bytes than granted), capped at the burst.
    pub fn refund(&mut self, n: u64) {
        let refunded = self.scaled.saturating_add(self.scaled_tokens(n));
        self.scaled = refunded.min(self.limit.capacity());
    }

    /// Switches to `limit` at `now`.
    ///
    /// Tokens earned so far (at the old rate, up to `now`) are kept, capped
    /// at the new burst; the new rate applies from `now` on, with no jump of
    /// the refill clock. A fraction of a token is kept exactly when the
    /// period is unchanged, and rounded down otherwise.
    pub fn reconfigure(&mut self, limit: RateLimit, now: Instant) {
        self.refill(now);
        let old_period = self.limit.period_ns();
        let new_period = limit.period_ns();
        // Whole tokens and the fraction apart, so that no product exceeds
        // 2^40 × 2^47 (tokens × period) or 2^47 × 2^47 (fraction × period).
        let whole = self.scaled / old_period;
        let fraction = self.scaled % old_period;
        let rescaled = whole * new_period + fraction * new_period / old_period;
        self.scaled = rescaled.min(limit.capacity());
        self.limit = limit;
    }

    /// Credits the tokens earned between the bucket's clock and `now`, then
    /// moves the clock to `now` (unless `now` is earlier).
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        if elapsed == 0 {
            return;
        }
        self.last = now;
        // Saturating: an absurdly long idle time just fills the bucket.
        let earned = elapsed.saturating_mul(u128::from(self.limit.bytes));
        self.scaled = self
            .scaled
            .saturating_add(earned)
            .min(self.limit.capacity());
    }

    fn whole_tokens(&self) -> u64 {
        // At most the burst, so it fits.
        u64::try_from(self.scaled / self.limit.period_ns()).unwrap_or(u64::MAX)
    }

    fn scaled_tokens(&self, n: u64) -> u128 {
        // At most 2^64 × 2^47: no overflow.
        u128::from(n) * self.limit.period_ns()
    }
}

/// A `Duration` of `nanos` nanoseconds. Within the bounds of [`RateLimit`]
/// the longest wait is 2^40 days, about 2^57 seconds, so it always fits.
fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // Below 10^9, so it fits.
    let subsec = (nanos % NANOS_PER_SEC) as u32;
    Duration::new(secs, subsec)
}

/// The bucket for a changed limit: the old one reconfigured (earned
/// tokens kept), a new one for a new limit, none when the limit is gone.
pub fn retarget(
    bucket: Option<TokenBucket>,
    limit: Option<RateLimit>,
    now: Instant,
) -> Option<TokenBucket> {
    match (bucket, limit) {
        (Some(mut bucket), Some(limit)) => {
            bucket.reconfigure(limit, now);
            Some(bucket)
        }
        (None, Some(limit)) => Some(TokenBucket::new(limit, now)),
        (_, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(bytes: u64, period_ms: u64, burst: u64) -> RateLimit {
        RateLimit::new(bytes, period_ms, burst).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    // ---- RateLimit ----

    #[test]
    fn zero_values_are_rejected() {
        assert_eq!(RateLimit::new(0, 1000, 10), Err(RateLimitError::ZeroRate));
        assert_eq!(RateLimit::new(10, 0, 10), Err(RateLimitError::ZeroPeriod));
        assert_eq!(RateLimit::new(10, 1000, 0), Err(RateLimitError::ZeroBurst));
        assert_eq!(RateLimit::per_second(0), Err(RateLimitError::ZeroRate));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            RateLimitError::ZeroRate.to_string(),
            "rate-bytes must be more than 0 (to stop a guest, remove it)"
        );
        assert_eq!(
            RateLimitError::ZeroPeriod.to_string(),
            "rate-period must be at least 1 ms"
        );
        assert_eq!(
            RateLimitError::ZeroBurst.to_string(),
            "rate-burst must be at least 1 byte"
        );
        assert_eq!(
            RateLimit::new(10, 90_000_000, 10).unwrap_err().to_string(),
            "rate-period (ms) must be at most 86400000, not 90000000"
        );
        assert_eq!(
            RateLimit::new(u64::MAX, 1000, 10).unwrap_err().to_string(),
            format!("rate-bytes must be at most 1099511627776, not {}", u64::MAX)
        );
        assert_eq!(
            RateLimit::new(10, 1000, MAX_BURST + 1)
                .unwrap_err()
                .to_string(),
            "rate-burst must be at most 1099511627776, not 1099511627777"
        );
    }

    #[test]
    fn bounds_are_inclusive() {
        let max = limit(MAX_BYTES, MAX_PERIOD_MS, MAX_BURST);
        assert_eq!(max.bytes(), MAX_BYTES);
        assert_eq!(max.period(), Duration::from_secs(86_400));
        assert_eq!(max.burst(), MAX_BURST);
        assert!(RateLimit::new(MAX_BYTES, 1, MAX_BURST).is_ok());
        assert!(RateLimit::per_second(MAX_BYTES).is_ok());
    }

    #[test]
    fn values_over_the_bounds_are_rejected() {
        let too_large = |what, value, max| RateLimitError::TooLarge { what, value, max };
        assert_eq!(
            RateLimit::new(MAX_BYTES + 1, 1000, 1),
            Err(too_large("rate-bytes", MAX_BYTES + 1, MAX_BYTES))
        );
        assert_eq!(
            RateLimit::new(u64::MAX, 1000, 1),
            Err(too_large("rate-bytes", u64::MAX, MAX_BYTES))
        );
        assert_eq!(
            RateLimit::new(1, MAX_PERIOD_MS + 1, 1),
            Err(too_large(
                "rate-period (ms)",
                MAX_PERIOD_MS + 1,
                MAX_PERIOD_MS
            ))
        );
        assert_eq!(
            RateLimit::new(1, u64::MAX, 1),
            Err(too_large("rate-period (ms)", u64::MAX, MAX_PERIOD_MS))
        );
        assert_eq!(
            RateLimit::new(1, 1000, MAX_BURST + 1),
            Err(too_large("rate-burst", MAX_BURST + 1, MAX_BURST))
        );
        assert_eq!(
            RateLimit::new(1, 1000, u64::MAX),
            Err(too_large("rate-burst", u64::MAX, MAX_BURST))
        );
        assert_eq!(
            RateLimit::per_second(u64::MAX),
            Err(too_large("rate-bytes", u64::MAX, MAX_BYTES))
        );
        assert!(RateLimit::new(u64::MAX, u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn accessors_and_display() {
        let l = RateLimit::per_second(16384).unwrap();
        assert_eq!(l, limit(16384, 1000, 16384));
        assert_eq!(l.bytes(), 16384);
        assert_eq!(l.period(), Duration::from_secs(1));
        assert_eq!(l.burst(), 16384);
        assert_eq!(l.bytes_per_second(), 16384.0);
        assert_eq!(limit(3, 500, 1).bytes_per_second(), 6.0);
        assert_eq!(limit(1, 86_400_000, 1).bytes_per_second(), 1.0 / 86_400.0);
        assert_eq!(limit(3, 500, 7).to_string(), "3 bytes per 500 ms (burst 7)");
    }

    // ---- refill ----

    #[test]
    fn starts_empty() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(16384, 1000, 16384), t0);
        assert_eq!(b.available(t0), 0);
        assert!(!b.try_take(1, t0));
        assert_eq!(b.limit(), limit(16384, 1000, 16384));
        assert_eq!(b.max_grant(), 16384);
    }

    #[test]
    fn one_period_earns_rate_bytes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(16384, 1000, 16384), t0);
        assert_eq!(b.available(t0 + ms(500)), 8192);
        assert_eq!(b.available(t0 + ms(1000)), 16384);

        let mut b = TokenBucket::new(limit(1000, 250, 1000), t0);
        assert_eq!(b.available(t0 + ms(125)), 500);
        assert_eq!(b.available(t0 + ms(250)), 1000);
    }

    #[test]
    fn remainders_are_kept_not_lost() {
        let t0 = Instant::now();
        // 3 bytes per second: each 1 ms step earns 0.003 of a token.
        for step_ms in [1, 7] {
            let mut b = TokenBucket::new(limit(3, 1000, 3), t0);
            let mut t = 0;
            while t < 1000 {
                t = (t + step_ms).min(1000);
                assert_eq!(b.available(t0 + ms(t)), 3 * t / 1000, "t = {t} ms");
            }
            assert_eq!(b.available(t0 + ms(1000)), 3);
        }
        // 1 byte per 3 ms, read every 1 ms.
        let mut b = TokenBucket::new(limit(1, 3, 100), t0);
        for t in 1..=300 {
            assert_eq!(b.available(t0 + ms(t)), t / 3);
        }
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let t0 = Instant::now();
        // Burst larger than the rate: fills over several periods.
        let mut b = TokenBucket::new(limit(100, 1000, 250), t0);
        assert_eq!(b.available(t0 + ms(1000)), 100);
        assert_eq!(b.available(t0 + ms(2000)), 200);
        assert_eq!(b.available(t0 + ms(3000)), 250);
        assert_eq!(b.available(t0 + ms(100_000)), 250);
        // The excess while full is discarded, not banked.
        assert!(b.try_take(250, t0 + ms(100_000)));
        assert_eq!(b.available(t0 + ms(100_500)), 50);

        // Burst smaller than the rate.
        let mut b = TokenBucket::new(limit(100, 1000, 40), t0);
        assert_eq!(b.available(t0 + ms(200)), 20);
        assert_eq!(b.available(t0 + ms(400)), 40);
        assert_eq!(b.available(t0 + ms(1000)), 40);
        assert!(!b.try_take(41, t0 + ms(1000)));
        assert!(b.try_take(40, t0 + ms(1000)));
        assert_eq!(b.available(t0 + ms(1100)), 10);
    }

    #[test]
    fn no_drift_over_a_million_small_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(16384, 1000, 16384), t0);
        for i in 1..=1_000_000u64 {
            let now = t0 + Duration::from_micros(i);
            let got = b.available(now);
            if i == 500_000 {
                assert_eq!(got, 8192);
            }
        }
        assert_eq!(b.available(t0 + ms(1000)), 16384);
    }

    #[test]
    fn no_drift_with_irregular_steps() {
        let t0 = Instant::now();
        let l = limit(16384, 1000, 16384);
        let mut stepped = TokenBucket::new(l, t0);
        let mut direct = TokenBucket::new(l, t0);
        // Deterministic pseudo-random steps of 1..=9999 ns.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut t: u64 = 0;
        let end: u64 = 1_000_000_000;
        while t < end {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            t = (t + 1 + (x >> 33) % 9_999).min(end);
            let now = t0 + ns(t);
            assert_eq!(stepped.available(now), 16384 * t / end);
        }
        assert_eq!(stepped.available(t0 + ns(end)), 16384);
        assert_eq!(direct.available(t0 + ns(end)), 16384);
    }

    #[test]
    fn now_before_the_bucket_clock_counts_as_no_time() {
        let t0 = Instant::now();
        let start = t0 + ms(1000);
        let mut b = TokenBucket::new(limit(100, 1000, 100), start);
        assert_eq!(b.available(t0), 0);
        assert!(!b.try_take(1, t0));
        assert_eq!(b.time_until(1, t0), ms(10));
        assert_eq!(b.grant(1, t0), Grant::Wait(ms(10)));
        // The clock did not move back: one period after `start` is 100.
        assert_eq!(b.available(start + ms(500)), 50);
        // An out-of-order read neither adds nor removes tokens...
        assert_eq!(b.available(start + ms(200)), 50);
        assert_eq!(b.available(t0), 50);
        // ...and the clock did not move back to it.
        assert_eq!(b.available(start + ms(1000)), 100);
    }

    // ---- taking ----

    #[test]
    fn try_take_takes_exactly_or_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(100, 1000, 100), t0);
        let t = t0 + ms(1000);
        assert!(b.try_take(30, t));
        assert_eq!(b.available(t), 70);
        assert!(!b.try_take(71, t));
        assert_eq!(b.available(t), 70);
        assert!(b.try_take(70, t));
        assert_eq!(b.available(t), 0);
        assert!(!b.try_take(1, t));
        assert!(b.try_take(0, t));
        // More than the burst never succeeds, however long the wait.
        assert!(!b.try_take(101, t0 + ms(1_000_000)));
        assert_eq!(b.available(t0 + ms(1_000_000)), 100);
    }

    #[test]
    fn taking_keeps_the_fraction() {
        let t0 = Instant::now();
        // 3 bytes per second: at 500 ms there are 1.5 tokens.
        let mut b = TokenBucket::new(limit(3, 1000, 3), t0);
        assert!(b.try_take(1, t0 + ms(500)));
        // The remaining half token plus 500 ms (1.5 tokens) makes 2.
        assert_eq!(b.available(t0 + ms(1000)), 2);
    }

    // ---- time_until ----

    #[test]
    fn time_until_is_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(1, 3, 1), t0);
        assert_eq!(b.time_until(1, t0), ms(3));
        assert_eq!(b.time_until(1, t0 + ms(1)), ms(2));
        assert_eq!(b.time_until(1, t0 + ms(3)), Duration::ZERO);

        let mut b = TokenBucket::new(limit(100, 1000, 100), t0);
        assert_eq!(b.time_until(100, t0), ms(1000));
        assert_eq!(b.time_until(50, t0 + ms(200)), ms(300));
    }

    #[test]
    fn time_until_rounds_up() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(16384, 1000, 16384), t0);
        // 10^9 / 16384 = 61035.15625 ns.
        assert_eq!(b.time_until(1, t0), ns(61_036));
        assert_eq!(b.time_until(3, t0), ns(183_106)); // 183105.46875
        assert_eq!(b.time_until(16384, t0), ms(1000));

        // 3 bytes per second: one token takes 333333333.33 ns.
        let mut b = TokenBucket::new(limit(3, 1000, 3), t0);
        assert_eq!(b.time_until(1, t0), ns(333_333_334));
        assert_eq!(b.time_until(2, t0), ns(666_666_667));
        assert_eq!(b.time_until(3, t0), ms(1000));
    }

    #[test]
    fn time_until_is_zero_when_available() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(100, 1000, 100), t0);
        let t = t0 + ms(500);
        assert_eq!(b.time_until(0, t0), Duration::ZERO);
        assert_eq!(b.time_until(50, t), Duration::ZERO);
        assert_eq!(b.time_until(49, t), Duration::ZERO);
        assert_eq!(b.time_until(51, t), ms(10));
        // Asking does not take anything.
        assert_eq!(b.available(t), 50);
    }

    #[test]
    fn time_until_clamps_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(100, 1000, 10), t0);
        assert_eq!(b.time_until(1000, t0), ms(100));
        assert_eq!(b.time_until(u64::MAX, t0), ms(100));
        assert_eq!(b.time_until(u64::MAX, t0 + ms(100)), Duration::ZERO);
    }

    #[test]
    fn after_waiting_time_until_the_tokens_are_there() {
        let t0 = Instant::now();
        let configs = [
            (16384, 1000, 16384),
            (3, 1000, 3),
            (1, 3, 1),
            (7, 13, 20),
            (1000, 7, 64),
            (65_537, 999, 100_000),
            (1, MAX_PERIOD_MS, 5),
            (MAX_BYTES, 1, MAX_BURST),
            (12_345, 86_399_999, MAX_BURST),
        ];
        for (bytes, period_ms, burst) in configs {
            let l = limit(bytes, period_ms, burst);
            // Start from several fill levels (including fractions).
            for offset in [ns(0), ns(1), ns(999_999), ms(1), ms(17)] {
                let mut b = TokenBucket::new(l, t0);
                let now = t0 + offset;
                b.available(now);
                for n in [1, 2, 3, 64, burst / 2, burst - 1, burst] {
                    let n = n.clamp(1, burst);
                    let wait = b.time_until(n, now);
                    let mut later = b.clone();
                    assert!(
                        later.available(now + wait) >= n,
                        "{l}: {n} tokens not there after {wait:?}"
                    );
                    if !wait.is_zero() {
                        // Rounded up by less than a nanosecond: one
                        // nanosecond sooner is too early.
                        let mut sooner = b.clone();
                        assert!(sooner.available(now + wait - ns(1)) < n, "{l}: {n}");
                    }
                }
            }
        }
    }

    // ---- grant ----

    #[test]
    fn grant_now_or_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(16384, 1000, 16384), t0);
        // 64 bytes take 3906250 ns exactly.
        assert_eq!(b.grant(64, t0), Grant::Wait(ns(3_906_250)));
        assert_eq!(b.grant(64, t0 + ns(3_906_249)), Grant::Wait(ns(1)));
        assert_eq!(b.grant(64, t0 + ns(3_906_250)), Grant::Now(64));
        assert_eq!(b.available(t0 + ns(3_906_250)), 0);
        // Waiting takes nothing.
        let t = t0 + ms(1000);
        assert_eq!(b.available(t), 16384 - 64);
        assert_eq!(b.grant(16384, t), Grant::Wait(ns(3_906_250)));
        assert_eq!(b.available(t), 16384 - 64);
    }

    #[test]
    fn grant_is_capped_at_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(1000, 1000, 100), t0);
        assert_eq!(b.grant(1000, t0), Grant::Wait(ms(100)));
        assert_eq!(b.grant(1000, t0 + ms(100)), Grant::Now(100));
        assert_eq!(b.grant(u64::MAX, t0 + ms(150)), Grant::Wait(ms(50)));
        assert_eq!(b.grant(u64::MAX, t0 + ms(200)), Grant::Now(100));
    }

    #[test]
    fn retarget_keeps_reconfigures_creates_or_drops_the_bucket() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let small = RateLimit::new(100, 1000, 100).unwrap();
        let large = RateLimit::new(1000, 1000, 50).unwrap();
        let mut kept = retarget(Some(TokenBucket::new(small, t0)), Some(large), t1).unwrap();
        // 100 earned at the old rate, capped at the new burst of 50.
        assert_eq!((kept.limit(), kept.available(t1)), (large, 50));
        let mut fresh = retarget(None, Some(small), t1).unwrap();
        assert_eq!(fresh.available(t1), 0);
        assert!(retarget(Some(fresh), None, t1).is_none());
    }

    #[test]
    fn refund_returns_unused_tokens_up_to_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(RateLimit::new(100, 1000, 100).unwrap(), t0);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(bucket.grant(40, t1), Grant::Now(40));
        assert_eq!(bucket.available(t1), 10);
        bucket.refund(25);
        assert_eq!(bucket.available(t1), 35);
        bucket.refund(1000);
        assert_eq!(bucket.available(t1), 100);
    }

    #[test]
    fn grant_of_zero_is_now_zero() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(1, MAX_PERIOD_MS, 1), t0);
        assert_eq!(b.grant(0, t0), Grant::Now(0));
        assert_eq!(b.grant(0, t0 - ms(1)), Grant::Now(0));
    }

    #[test]
    fn grant_waits_for_the_whole_request_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(100, 1000, 100), t0);
        let t = t0 + ms(300);
        // 30 tokens there, 64 wanted: no partial grant from what is there.
        assert_eq!(b.grant(64, t), Grant::Wait(ms(340)));
        assert_eq!(b.grant(30, t), Grant::Now(30));
    }

    // ---- period and size edge cases ----

    #[test]
    fn one_millisecond_period() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(5, 1, 5), t0);
        assert_eq!(b.available(t0 + Duration::from_micros(500)), 2);
        assert_eq!(b.available(t0 + ms(1)), 5);
        assert_eq!(b.available(t0 + ms(2)), 5);
        assert!(b.try_take(5, t0 + ms(2)));
        assert_eq!(b.time_until(1, t0 + ms(2)), Duration::from_micros(200));
    }

    #[test]
    fn one_day_period() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(86_400, MAX_PERIOD_MS, 86_400), t0);
        assert_eq!(b.time_until(1, t0), Duration::from_secs(1));
        assert_eq!(b.available(t0 + Duration::from_secs(1)), 1);
        assert_eq!(b.available(t0 + Duration::from_secs(3600)), 3600);
        assert_eq!(b.available(t0 + Duration::from_secs(86_400)), 86_400);
        assert_eq!(b.available(t0 + Duration::from_secs(10 * 86_400)), 86_400);

        // One byte a day: 64 bytes take 64 days.
        let mut b = TokenBucket::new(limit(1, MAX_PERIOD_MS, 64), t0);
        assert_eq!(
            b.grant(64, t0),
            Grant::Wait(Duration::from_secs(64 * 86_400))
        );
    }

    #[test]
    fn largest_values() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(MAX_BYTES, 1, MAX_BURST), t0);
        assert_eq!(b.available(t0 + Duration::from_micros(500)), MAX_BYTES / 2);
        assert_eq!(b.available(t0 + ms(1)), MAX_BURST);
        assert_eq!(b.grant(u64::MAX, t0 + ms(1)), Grant::Now(MAX_BURST));

        let mut b = TokenBucket::new(limit(MAX_BYTES, MAX_PERIOD_MS, MAX_BURST), t0);
        assert_eq!(b.time_until(MAX_BURST, t0), Duration::from_secs(86_400));
        assert_eq!(b.available(t0 + Duration::from_secs(86_400)), MAX_BURST);

        // The longest possible wait: 2^40 tokens at one byte a day.
        let mut b = TokenBucket::new(limit(1, MAX_PERIOD_MS, MAX_BURST), t0);
        assert_eq!(
            b.time_until(MAX_BURST, t0),
            Duration::from_secs(86_400 * MAX_BURST)
        );
        assert_eq!(b.grant(1, t0), Grant::Wait(Duration::from_secs(86_400)));
    }

    #[test]
    fn burst_of_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(1000, 1000, 1), t0);
        assert_eq!(b.max_grant(), 1);
        assert_eq!(b.grant(64, t0), Grant::Wait(ms(1)));
        assert_eq!(b.grant(64, t0 + ms(1)), Grant::Now(1));
        assert_eq!(b.available(t0 + ms(1000)), 1);
        assert_eq!(b.grant(64, t0 + ms(1000)), Grant::Now(1));
        assert_eq!(b.grant(64, t0 + ms(1000)), Grant::Wait(ms(1)));
    }

    #[test]
    fn very_long_idle_times_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(MAX_BYTES, 1, MAX_BURST), t0);
        let years = Duration::from_secs(300 * 365 * 86_400);
        assert_eq!(b.available(t0 + years), MAX_BURST);
        // Far enough that elapsed_ns × bytes exceeds u128: 2^88 ns times
        // MAX_BYTES (2^40) is exactly 2^128, which a wrapping product would
        // make 0. Linux's Instant (seconds in an i64) reaches that far;
        // were it not to, the test would check nothing, so that fails too.
        let mut b = TokenBucket::new(limit(MAX_BYTES, 1, MAX_BURST), t0);
        assert_eq!(MAX_BYTES, 1 << 40);
        let far_ns: u128 = 1 << 88;
        let far = Duration::new(
            (far_ns / NANOS_PER_SEC) as u64,
            (far_ns % NANOS_PER_SEC) as u32,
        );
        let far = t0.checked_add(far).expect("an Instant 2^88 ns ahead");
        assert_eq!(b.available(far), MAX_BURST);
        assert_eq!(b.grant(u64::MAX, far), Grant::Now(MAX_BURST));
        assert_eq!(b.time_until(1, far), ns(1));
    }

    // ---- reconfigure ----

    #[test]
    fn reconfigure_keeps_earned_tokens_up_to_the_new_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(100, 1000, 100), t0);
        let t = t0 + ms(1000);
        b.reconfigure(limit(10, 1000, 50), t);
        assert_eq!(b.limit(), limit(10, 1000, 50));
        assert_eq!(b.max_grant(), 50);
        assert_eq!(b.available(t), 50);

        let mut b = TokenBucket::new(limit(100, 1000, 100), t0);
        b.reconfigure(limit(10, 1000, 500), t);
        assert_eq!(b.available(t), 100);
        assert_eq!(b.available(t + ms(1000)), 110);
    }

    #[test]
    fn reconfigure_applies_the_new_rate_from_now() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(100, 1000, 1000), t0);
        // 50 earned at the old rate, not yet read.
        let t = t0 + ms(500);
        b.reconfigure(limit(1000, 1000, 1000), t);
        // No jump: nothing more at the same instant.
        assert_eq!(b.available(t), 50);
        assert_eq!(b.available(t + ms(500)), 550);

        // Slower, with a different period.
        let mut b = TokenBucket::new(limit(1000, 1000, 1000), t0);
        b.reconfigure(limit(1, 10, 1000), t);
        assert_eq!(b.available(t), 500);
        assert_eq!(b.available(t + ms(100)), 510);
    }

    #[test]
    fn reconfigure_keeps_fractions() {
        let t0 = Instant::now();
        // 1.5 tokens at 500 ms.
        let mut b = TokenBucket::new(limit(3, 1000, 3), t0);
        b.reconfigure(limit(3, 1000, 3), t0 + ms(500));
        assert_eq!(b.available(t0 + ms(1000)), 3);

        // Same 1.5 tokens, carried into a 2000 ms period: 1.5 more in 1 s.
        let mut b = TokenBucket::new(limit(3, 1000, 3), t0);
        b.reconfigure(limit(3, 2000, 3), t0 + ms(500));
        assert_eq!(b.available(t0 + ms(1499)), 2);
        assert_eq!(b.available(t0 + ms(1500)), 3);
    }

    #[test]
    fn reconfigure_at_the_bounds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(MAX_BYTES, MAX_PERIOD_MS, MAX_BURST), t0);
        let t = t0 + Duration::from_secs(86_400);
        assert_eq!(b.available(t), MAX_BURST);
        b.reconfigure(limit(1, 1, 1), t);
        assert_eq!(b.available(t), 1);
        b.reconfigure(limit(MAX_BYTES, MAX_PERIOD_MS, MAX_BURST), t);
        assert_eq!(b.available(t), 1);
        // A fraction just below one token of the longest period.
        let mut b = TokenBucket::new(limit(1, MAX_PERIOD_MS, MAX_BURST), t0);
        let t = t0 + Duration::from_secs(86_399);
        b.reconfigure(limit(1, MAX_PERIOD_MS, MAX_BURST), t);
        assert_eq!(b.available(t), 0);
        assert_eq!(b.time_until(1, t), Duration::from_secs(1));
    }

    // ---- long-run rate ----

    /// A client that always asks for `ask` bytes and, when told to wait,
    /// advances the clock by exactly the wait; returns the bytes received
    /// within `run` (inclusive) of the bucket's creation.
    fn greedy_client(l: RateLimit, ask: u64, run: Duration) -> u64 {
        let t0 = Instant::now();
        let end = t0 + run;
        let mut b = TokenBucket::new(l, t0);
        let mut now = t0;
        let mut received: u64 = 0;
        while now <= end {
            match b.grant(ask, now) {
                Grant::Now(n) => {
                    assert_eq!(n, ask.min(l.burst()));
                    received += n;
                    // Never ahead of the rate since creation.
                    let elapsed = now.duration_since(t0).as_nanos();
                    let earned = elapsed * u128::from(l.bytes()) / l.period().as_nanos();
                    assert!(u128::from(received) <= earned);
                }
                Grant::Wait(wait) => {
                    assert!(!wait.is_zero());
                    now += wait;
                }
            }
        }
        received
    }

    #[test]
    fn greedy_client_gets_exactly_the_rate() {
        let received = greedy_client(limit(16384, 1000, 16384), 64, Duration::from_secs(10));
        assert!(
            (163_840 - 64..=163_840).contains(&received),
            "received {received}"
        );
    }

    #[test]
    fn greedy_client_long_run_rate_for_other_limits() {
        let run = Duration::from_secs(10);
        for (bytes, period_ms, burst, ask) in [
            (3, 1000, 3, 64),
            (1000, 7, 1000, 64),
            (12_345, 333, 100, 64),
            (16384, 1000, 65_536, 4096),
            (1, 1, 1, 1),
        ] {
            let l = limit(bytes, period_ms, burst);
            let received = greedy_client(l, ask, run);
            let earned = bytes * 10_000 / period_ms;
            let step = ask.min(burst);
            assert!(
                received <= earned && received + step >= earned,
                "{l}: received {received}, earned {earned}"
            );
        }
    }
}
