// SPDX-License-Identifier: Apache-2.0
//! A guest as the daemon knows it: its name, its limits, and the state
//! that outlives any one connection. A VM reboot keeps its counters and its
//! token bucket: reconnecting cannot reset a guest's budget.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod limiter;

use crate::entropy::pool::{EntropyStream, Pool};
use limiter::{Grant, RateLimit, TokenBucket, retarget};
use vhost_rng_protocol::log_limit::RateLimitedLog;

/// Weight of a guest that does not set one: its share of scarce raw output.
pub const DEFAULT_WEIGHT: u32 = 1;

/// Counters for one guest, updated by its frontend, read by status reporting.
#[derive(Debug, Default)]
pub struct GuestStats {
    /// Whether a VMM (or an agent client) is connected now.
    pub connected: AtomicBool,
    /// Connections accepted or made since the guest was added.
    pub connections: AtomicU64,
    /// Requests completed: virtio-rng requests, EGD and channel reads,
    /// defective ones included.
    pub requests: AtomicU64,
    /// Random bytes handed to the guest.
    pub bytes: AtomicU64,
    /// Requests completed with no bytes because the guest got them wrong.
    pub defective_requests: AtomicU64,
    /// Time requests spent waiting for rate-limit tokens, in nanoseconds.
    pub throttled_ns: AtomicU64,
    /// Clients turned away because the guest had as many as it may have
    /// ([`crate::frontend::stream::MAX_CLIENTS`]) and none could make room;
    /// since an idle one is closed instead, that no longer happens.
    pub refused_connections: AtomicU64,
    /// Idle clients closed to make room for a new one when the guest had
    /// [`crate::frontend::stream::MAX_CLIENTS`] already.
    pub evicted_connections: AtomicU64,
    /// TCP handshakes that named this guest but did not prove its key.
    pub wrong_key_connections: AtomicU64,
}

/// A plain copy of [`GuestStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatsSnapshot {
    /// Whether a VMM (or an agent client) is connected.
    pub connected: bool,
    /// Connections accepted or made since the guest was added.
    pub connections: u64,
    /// Requests completed, defective ones included.
    pub requests: u64,
    /// Random bytes handed to the guest.
    pub bytes: u64,
    /// Requests completed with no bytes because the guest got them wrong.
    pub defective_requests: u64,
    /// Time requests spent waiting for rate-limit tokens.
    pub throttled: Duration,
    /// Clients turned away because the guest had too many.
    pub refused_connections: u64,
    /// Idle clients closed to make room for a new one.
    pub evicted_connections: u64,
    /// TCP handshakes that named this guest but did not prove its key.
    pub wrong_key_connections: u64,
}

impl GuestStats {
    /// A copy of every counter, each read on its own (not one atomic
    /// snapshot).
    pub fn snapshot(&self) -> GuestStatsSnapshot {
        GuestStatsSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            defective_requests: self.defective_requests.load(Ordering::Relaxed),
            throttled: Duration::from_nanos(self.throttled_ns.load(Ordering::Relaxed)),
            refused_connections: self.refused_connections.load(Ordering::Relaxed),
            evicted_connections: self.evicted_connections.load(Ordering::Relaxed),
            wrong_key_connections: self.wrong_key_connections.load(Ordering::Relaxed),
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

/// The cap on all guests together (`--max-rate`), shared by every guest.
/// A reload can add, change or drop it; without one, a request costs no
/// lock on this shared state.
#[derive(Default)]
pub struct GlobalLimit {
    capped: AtomicBool,
    bucket: Mutex<Option<TokenBucket>>,
}

/// How guests hold the global limit.
pub type SharedBucket = Arc<GlobalLimit>;

impl GlobalLimit {
    /// Sets, changes (keeping earned tokens) or removes the cap.
    pub fn set(&self, limit: Option<RateLimit>, now: Instant) {
        let mut bucket = self.lock();
        *bucket = retarget(bucket.take(), limit, now);
        self.capped.store(bucket.is_some(), Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Option<TokenBucket>> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `None` without a cap.
    fn grant(&self, wanted: u64, now: Instant) -> Option<Grant> {
        if !self.capped.load(Ordering::Acquire) {
            return None;
        }
        self.lock().as_mut().map(|bucket| bucket.grant(wanted, now))
    }

    fn refund(&self, n: u64) {
        if self.capped.load(Ordering::Acquire)
            && let Some(bucket) = self.lock().as_mut()
        {
            bucket.refund(n);
        }
    }
}

/// What a guest's request gets from [`Guest::supply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supplied {
    /// This many bytes (at least one) were written at the start of the buffer.
    Bytes(usize),
    /// No entropy may be handed out now; the stream's waker is called when
    /// there may be.
    Starved,
    /// The guest is over its rate limit; ask again after this long.
    Throttled(Duration),
}

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
    /// The guest's counters, updated by whichever frontend serves it.
    pub stats: GuestStats,
    /// Keeps a guest that posts defective requests in a loop from flooding
    /// the log.
    pub defect_log: RateLimitedLog,
    policy: Mutex<Policy>,
    global: SharedBucket,
    meter: Mutex<RateMeter>,
    /// The weight, readable by the pool without taking the policy lock.
    weight: Arc<AtomicU32>,
}

impl Guest {
    /// A guest named `name` drawing from `pool`, with no rate limit, weight 1
    /// and no global cap.
    pub fn new(name: impl Into<String>, pool: Arc<Pool>) -> Arc<Self> {
        Self::with_limits(name, pool, GuestLimits::default(), SharedBucket::default())
    }

    /// A guest named `name` drawing from `pool`, held to `limits` and to the
    /// global cap `global` shares with the other guests.
    pub fn with_limits(
        name: impl Into<String>,
        pool: Arc<Pool>,
        limits: GuestLimits,
        global: SharedBucket,
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
            meter: Mutex::new(RateMeter::new(now)),
            weight: Arc::new(AtomicU32::new(limits.weight)),
        })
    }

    fn policy(&self) -> MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest's own limits as now in force.
    pub fn limits(&self) -> GuestLimits {
        self.policy().limits
    }

    /// Whole tokens in the guest's own bucket now; `None` without a limit.
    pub fn tokens(&self) -> Option<u64> {
        let now = Instant::now();
        self.policy().bucket.as_mut().map(|b| b.available(now))
    }

    /// Puts `tokens` (what a previous daemon's bucket held, an in-place
    /// upgrade) in the guest's bucket, which starts empty, up to its burst:
    /// a restart never hands out more than the bucket held.
    pub fn restore_tokens(&self, tokens: u64) {
        if let Some(bucket) = self.policy().bucket.as_mut() {
            bucket.refund(tokens.min(bucket.limit().burst()));
        }
    }

    /// Applies new limits in place: tokens already earned are kept (up to
    /// the new burst), the connection is untouched.
    pub fn set_limits(&self, limits: GuestLimits) {
        let now = Instant::now();
        let mut policy = self.policy();
        policy.bucket = retarget(policy.bucket.take(), limits.rate, now);
        policy.limits = limits;
        self.weight.store(limits.weight, Ordering::Relaxed);
    }

    /// The guest's weight, shared with its pool streams.
    pub fn weight(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.weight)
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
        let granted = match self.global.grant(granted, now) {
            None => granted,
            Some(Grant::Now(n)) => {
                if let Some(bucket) = policy.bucket.as_mut() {
                    bucket.refund(granted - n);
                }
                n
            }
            Some(Grant::Wait(wait)) => {
                if let Some(bucket) = policy.bucket.as_mut() {
                    bucket.refund(granted);
                }
                return throttled(&mut policy, now, wait);
            }
        };
        self.end_throttle(&mut policy, now);
        // Grants never exceed `wanted`, a usize.
        Admission::Granted(granted as usize)
    }

    /// Counts the time a request waited for tokens, once it gets them.
    fn end_throttle(&self, policy: &mut Policy, now: Instant) {
        if let Some(since) = policy.throttled_since.take() {
            let waited = now.saturating_duration_since(since).as_nanos();
            self.stats
                .throttled_ns
                .fetch_add(u64::try_from(waited).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
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
        self.global.refund(unused);
    }

    /// Fills the start of `buf` for one request: tokens from the guest's
    /// limits, then bytes from `stream`; tokens the stream could not use
    /// go back. Every frontend serves its guests through this, with one
    /// clock reading (`now`) for as many requests as it answers at once.
    pub fn supply(&self, stream: &mut dyn EntropyStream, buf: &mut [u8], now: Instant) -> Supplied {
        match self.admit(buf.len(), now) {
            Admission::Wait(wait) => Supplied::Throttled(wait),
            Admission::Granted(granted) => {
                let got = stream.fill(&mut buf[..granted], now);
                self.settle(granted, got);
                if got == 0 {
                    Supplied::Starved
                } else {
                    Supplied::Bytes(got)
                }
            }
        }
    }

    /// Fills the start of `buf` for several requests at once, or `None`
    /// when they must be asked for one by one ([`Guest::supply`]): when
    /// the guest has a rate limit or a global cap applies (a token bucket
    /// grants a request all it asks for or nothing, so a grant for the
    /// total differs from grants request by request), or when `stream`
    /// cannot fill batches exactly ([`EntropyStream::fills_batches`]).
    /// Without limits every request is admitted whole, so one fill for the
    /// total is what filling the requests in turn would hand out.
    pub fn supply_batch(
        &self,
        stream: &mut dyn EntropyStream,
        buf: &mut [u8],
        now: Instant,
    ) -> Option<Supplied> {
        if !stream.fills_batches() || self.global.capped.load(Ordering::Acquire) {
            return None;
        }
        {
            let mut policy = self.policy();
            if policy.bucket.is_some() {
                return None;
            }
            self.end_throttle(&mut policy, now);
        }
        Some(match stream.fill(buf, now) {
            0 => Supplied::Starved,
            got => Supplied::Bytes(got),
        })
    }

    /// Counts bytes served, for the current rate.
    pub fn record(&self, bytes: u64, now: Instant) {
        self.meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(bytes, now);
    }

    /// Bytes per second served recently.
    pub fn current_rate(&self, now: Instant) -> f64 {
        self.meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rate(now)
    }

    /// The guest's name, unique in the daemon; logs and metrics use it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool the guest draws from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

fn throttled(policy: &mut Policy, now: Instant, wait: Duration) -> Admission {
    policy.throttled_since.get_or_insert(now);
    Admission::Wait(wait)
}

/// Bytes served over the last [`RateMeter::WINDOW`], counted in one-second
/// slots, so that the rate is what the guest drew in that window and
/// nothing older: a guest that stops asking reads 0 once a whole window
/// has gone by. (Counting from the start of a window that only moved on
/// with the next request kept the last burst in the rate for ever,
/// falling like 1/t.)
struct RateMeter {
    /// Slot `n` holds the bytes of the `n`th second after this.
    origin: Instant,
    /// Second `n`'s bytes at index `n % SLOTS`, for the [`SLOTS`] seconds
    /// up to `newest`.
    ///
    /// [`SLOTS`]: RateMeter::SLOTS
    slots: [u64; RateMeter::SLOTS],
    /// The latest second recorded.
    newest: u64,
}

impl RateMeter {
    const WINDOW: Duration = Duration::from_secs(10);
    /// One per second of the window.
    const SLOTS: usize = Self::WINDOW.as_secs() as usize;

    fn new(now: Instant) -> Self {
        RateMeter {
            origin: now,
            slots: [0; Self::SLOTS],
            newest: 0,
        }
    }

    /// The second since `origin` that `now` falls in.
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    fn slot(second: u64) -> usize {
        (second % Self::SLOTS as u64) as usize
    }

    fn record(&mut self, bytes: u64, now: Instant) {
        let second = self.second(now);
        if second > self.newest {
            // The seconds since the newest saw nothing: their slots, last
            // used SLOTS seconds before, start again from 0.
            let skipped = (second - self.newest).min(Self::SLOTS as u64);
            for past in second + 1 - skipped..=second {
                self.slots[Self::slot(past)] = 0;
            }
            self.newest = second;
        }
        // A clock read before another thread's record may come in a little
        // late; it still counts while its second is held.
        if self.newest - second < Self::SLOTS as u64 {
            let slot = &mut self.slots[Self::slot(second)];
            *slot = slot.saturating_add(bytes);
        }
    }

    /// Bytes per second over the window ending at `now` (or since the
    /// meter started, if that is shorter; at least a second).
    fn rate(&self, now: Instant) -> f64 {
        let current = self.second(now);
        // The window: the current second so far and the SLOTS - 1 before.
        let first = (current + 1).saturating_sub(Self::SLOTS as u64);
        // Of those, the ones the slots still hold.
        let held = (self.newest + 1).saturating_sub(Self::SLOTS as u64);
        let bytes: u64 = (first.max(held)..=current.min(self.newest))
            .map(|second| self.slots[Self::slot(second)])
            .sum();
        let elapsed = now.saturating_duration_since(self.origin);
        let covered = elapsed.saturating_sub(Duration::from_secs(first));
        bytes as f64 / covered.max(Duration::from_secs(1)).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<Pool> {
        crate::entropy::pool::os_pool()
    }

    fn limited(bytes: u64) -> GuestLimits {
        GuestLimits {
            rate: Some(RateLimit::new(bytes, 1000, bytes).unwrap()),
            weight: 1,
        }
    }

    #[test]
    fn unlimited_guest_is_granted_everything() {
        let guest = Guest::new("g", pool());
        assert_eq!(guest.admit(4096, Instant::now()), Admission::Granted(4096));
    }

    #[test]
    fn limited_guest_waits_then_is_granted_and_throttled_time_is_counted() {
        let guest = Guest::with_limits("g", pool(), limited(1000), SharedBucket::default());
        let t0 = Instant::now();
        let Admission::Wait(wait) = guest.admit(100, t0) else {
            panic!("a bucket starts empty");
        };
        // 100 bytes at 1000 B/s, less what trickled in since the guest was made.
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(50));
        assert_eq!(guest.admit(100, t0 + wait), Admission::Granted(100));
        assert_eq!(guest.stats.snapshot().throttled, wait);
    }

    #[test]
    fn unused_grant_is_refunded() {
        let guest = Guest::with_limits("g", pool(), limited(1000), SharedBucket::default());
        let t = Instant::now() + Duration::from_secs(1);
        assert_eq!(guest.admit(600, t), Admission::Granted(600));
        guest.settle(600, 100);
        assert_eq!(guest.admit(900, t), Admission::Granted(900));
    }

    #[test]
    fn global_cap_limits_every_guest_and_refunds_the_guest_bucket() {
        let t0 = Instant::now();
        let global = SharedBucket::default();
        global.set(Some(RateLimit::new(100, 1000, 100).unwrap()), t0);
        let pool = pool();
        let a = Guest::with_limits("a", Arc::clone(&pool), limited(1000), Arc::clone(&global));
        let b = Guest::with_limits("b", pool, GuestLimits::default(), global);
        // Both buckets are full by then.
        let t1 = t0 + Duration::from_secs(2);
        // The global bucket holds 100: a takes them all.
        assert_eq!(a.admit(500, t1), Admission::Granted(100));
        assert!(matches!(b.admit(10, t1), Admission::Wait(_)));
        // a's own bucket was refunded the 400 the cap refused.
        assert_eq!(a.policy().bucket.as_mut().unwrap().available(t1), 900);
    }

    #[test]
    fn limits_change_in_place() {
        let guest = Guest::new("g", pool());
        let limits = GuestLimits {
            weight: 3,
            ..limited(10)
        };
        guest.set_limits(limits);
        assert_eq!(guest.limits(), limits);
        assert!(matches!(
            guest.admit(10, Instant::now()),
            Admission::Wait(_)
        ));
        guest.set_limits(GuestLimits::default());
        assert_eq!(guest.admit(10, Instant::now()), Admission::Granted(10));
    }

    #[test]
    fn current_rate_follows_recent_traffic() {
        let guest = Guest::new("g", pool());
        let t0 = Instant::now();
        for i in 0..10 {
            guest.record(1000, t0 + Duration::from_millis(500 * i));
        }
        let rate = guest.current_rate(t0 + Duration::from_secs(5));
        assert!((1900.0..=2100.0).contains(&rate), "{rate}");
        assert_eq!(guest.current_rate(t0 + Duration::from_secs(60)), 0.0);
    }

    /// `bytes` every 100 ms from `from` for `secs` seconds.
    fn steady(meter: &mut RateMeter, from: Instant, secs: u64, bytes: u64) {
        for tick in 0..secs * 10 {
            meter.record(bytes, from + Duration::from_millis(100 * tick));
        }
    }

    fn assert_near(rate: f64, expected: f64) {
        assert!(
            (rate - expected).abs() <= expected * 0.05,
            "{rate} B/s, expected about {expected}"
        );
    }

    #[test]
    fn the_rate_is_the_last_window_and_zero_once_a_whole_window_is_quiet() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut meter = RateMeter::new(t0);
        // 2000 B/s for 30 s.
        steady(&mut meter, t0, 30, 200);
        assert_near(meter.rate(at(30_000)), 2000.0);
        // Five seconds after the guest stopped, the window (the current
        // second so far and the nine before it) is seconds 26 to 35: four
        // of its nine seconds had traffic.
        assert_near(meter.rate(at(35_000)), 4.0 * 2000.0 / 9.0);
        assert_near(meter.rate(at(35_500)), 4.0 * 2000.0 / 9.5);
        // A whole window without traffic reads 0, and so does any later
        // time: three minutes on, not a decaying remnant of the last burst.
        assert_eq!(meter.rate(at(30_000) + RateMeter::WINDOW), 0.0);
        assert_eq!(meter.rate(at(30_000 + 180_000)), 0.0);

        // Back after the pause: only the new traffic counts.
        steady(&mut meter, at(300_000), 10, 50);
        assert_near(meter.rate(at(310_000)), 500.0);
        // One burst after a long pause is spread over the window, not
        // over the time since the last one.
        meter.record(10_000, at(900_000));
        assert_near(meter.rate(at(905_000)), 10_000.0 / 9.0);
        assert_near(meter.rate(at(909_500)), 10_000.0 / 9.5);
        assert_eq!(meter.rate(at(910_000)), 0.0);
    }

    #[test]
    fn a_young_meter_averages_over_its_life_and_late_records_still_count() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut meter = RateMeter::new(t0);
        assert_eq!(meter.rate(t0), 0.0);
        // 3000 bytes within 3 s of starting: 1000 B/s, not 300.
        steady(&mut meter, t0, 3, 100);
        assert_near(meter.rate(at(3_000)), 1000.0);
        // Less than a second old: over a second, not a spike.
        let mut meter = RateMeter::new(t0);
        meter.record(500, at(1));
        assert_eq!(meter.rate(at(2)), 500.0);

        // A record whose clock was read before the newest one's counts...
        let mut meter = RateMeter::new(t0);
        meter.record(1000, at(5_500));
        meter.record(1000, at(5_200));
        meter.record(1000, at(4_900));
        assert_near(meter.rate(at(6_000)), 3000.0 / 6.0);
        // ...unless its second has left the window already.
        meter.record(1000, at(20_000));
        meter.record(1000, at(9_000));
        assert_near(meter.rate(at(20_000)), 1000.0 / 9.0);
    }

    /// Fills with 0xab; says whether it fills batches as told.
    struct Fixed {
        batches: bool,
        fills: usize,
    }

    impl EntropyStream for Fixed {
        fn fill(&mut self, buf: &mut [u8], _now: Instant) -> usize {
            self.fills += 1;
            buf.fill(0xab);
            buf.len()
        }

        fn fills_batches(&self) -> bool {
            self.batches
        }
    }

    #[test]
    fn batches_are_filled_at_once_only_for_unlimited_guests_of_batching_streams() {
        let now = Instant::now();
        let mut buf = [0u8; 640];
        let mut drbg_like = Fixed {
            batches: true,
            fills: 0,
        };
        let guest = Guest::new("g", pool());
        assert_eq!(
            guest.supply_batch(&mut drbg_like, &mut buf, now),
            Some(Supplied::Bytes(640))
        );
        assert_eq!(drbg_like.fills, 1);
        assert_eq!(buf, [0xab; 640]);

        // Raw mode's fair shares are decided fill by fill.
        let mut raw_like = Fixed {
            batches: false,
            fills: 0,
        };
        assert_eq!(guest.supply_batch(&mut raw_like, &mut buf, now), None);
        assert_eq!(raw_like.fills, 0);

        // A bucket grants a request all or nothing: requests go one by one.
        guest.set_limits(limited(1_000_000));
        assert_eq!(guest.supply_batch(&mut drbg_like, &mut buf, now), None);
        guest.set_limits(GuestLimits::default());
        assert!(guest.supply_batch(&mut drbg_like, &mut buf, now).is_some());

        // So does a global cap, even for a guest without limits of its own.
        let global = SharedBucket::default();
        global.set(
            Some(RateLimit::new(1_000_000, 1000, 1_000_000).unwrap()),
            now,
        );
        let capped = Guest::with_limits("c", pool(), GuestLimits::default(), global);
        assert_eq!(capped.supply_batch(&mut drbg_like, &mut buf, now), None);
        assert_eq!(drbg_like.fills, 2);
    }
}
