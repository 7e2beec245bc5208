// SPDX-License-Identifier: Apache-2.0
//! The pool: health-tested source output, conditioned into full-entropy
//! blocks, and the streams every guest frontend draws from.
//!
//! ```text
//! source threads ──(approved bytes)──> conditioner thread ──> reservoir
//!                                                              │
//!            DRBG mode: per-guest AES-256 CTR_DRBG, reseeded ──┤
//!            raw mode:  full-entropy bytes handed out as is ───┘
//! ```
//!
//! Fail closed: when the reservoir is empty a stream hands out nothing and
//! remembers the guest's waker; the conditioner wakes it when new
//! full-entropy output arrives. A guest's requests wait meanwhile; nothing
//! else in the daemon does.

mod mode;

pub use mode::Mode;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use log::{info, warn};
use zeroize::{Zeroize, Zeroizing};

use crate::entropy::conditioner::{BLOCK_BYTES, Conditioner};
use crate::entropy::drbg::{Drbg, ReseedPolicy, SEED_BYTES};
use crate::entropy::fairness::{ACTIVE_WINDOW, Fairness};
use crate::entropy::health::HealthConfig;
use crate::entropy::source::runner::{self, Contribution, SourceBoard, SourceStats};
use crate::entropy::source::{SourceError, SourceSpec};

/// Everything the pool needs to start.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The sources to open, in order; none is [`PoolError::NoSources`].
    pub sources: Vec<SourceSpec>,
    /// How guests are served.
    pub mode: Mode,
    /// When each guest's DRBG is reseeded (drbg mode only).
    pub reseed: ReseedPolicy,
}

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No source was given, and none was found on this host.
    #[error(
        "no entropy source works on this host (no readable /dev/hwrng, no RDSEED, no \
         jitter RNG over AF_ALG); name one with --source, or use --source os to serve the operating system's CSPRNG"
    )]
    NoSources,
    /// A source could not be opened.
    #[error("entropy source {0}")]
    Source(#[from] SourceError),
    /// A source or conditioner thread could not be started.
    #[error("cannot start a thread for {what}: {error}")]
    Thread {
        /// Whose thread: "the conditioner" or the source's name.
        what: String,
        /// The error from the operating system.
        #[source]
        error: std::io::Error,
    },
}

/// Wakes a guest whose request waits for entropy.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// A guest's view of the pool.
pub trait EntropyStream: Send {
    /// Fills the start of `buf` and returns how many bytes were written.
    /// Returns 0 when no bytes may be handed out now (fail closed); the
    /// stream's waker is then called once more bytes may be available.
    /// `now` is the caller's clock reading, one for a whole pass over a
    /// queue rather than one a request.
    fn fill(&mut self, buf: &mut [u8], now: Instant) -> usize;

    /// Whether one fill for several requests together hands each of them
    /// what filling it alone would: true when only the stream's own
    /// bounds can cut a fill short, and a cut then falls where it would
    /// have fallen anyway (the DRBG's reseed bounds); false when the
    /// stream decides fill by fill (raw mode's fair shares).
    fn fills_batches(&self) -> bool {
        false
    }
}

/// A stream's place in the queue of starved streams: registered at most
/// once until woken, however often its guest retries meanwhile.
#[derive(Clone)]
struct WaitSlot {
    waker: Waker,
    registered: Arc<AtomicBool>,
}

impl WaitSlot {
    fn new(waker: Waker) -> Self {
        WaitSlot {
            waker,
            registered: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Full-entropy bytes waiting for guests, bounded so the conditioner (and
/// behind it the sources) stop when nobody consumes.
struct Reservoir {
    bytes: VecDeque<u8>,
    capacity: usize,
    waiters: Vec<WaitSlot>,
    fairness: Fairness,
}

impl Reservoir {
    /// Moves the oldest `dst.len()` bytes (at most all there are) into
    /// `dst`. They are wiped where they were: a guest's seed or its raw
    /// output must not stay behind in the buffer, which is only overwritten
    /// when the conditioner gets round to it.
    fn move_out(&mut self, dst: &mut [u8]) {
        let n = dst.len().min(self.bytes.len());
        let (front, back) = self.bytes.as_mut_slices();
        let from_front = n.min(front.len());
        let from_back = n - from_front;
        dst[..from_front].copy_from_slice(&front[..from_front]);
        dst[from_front..n].copy_from_slice(&back[..from_back]);
        front[..from_front].zeroize();
        back[..from_back].zeroize();
        self.bytes.drain(..n);
    }

    fn enqueue(&mut self, slot: Option<&WaitSlot>) {
        if let Some(slot) = slot
            && !slot.registered.swap(true, Ordering::AcqRel)
        {
            self.waiters.push(slot.clone());
        }
    }
}

/// The shared entropy pool.
pub struct Pool {
    mode: Mode,
    reseed: ReseedPolicy,
    reservoir: Mutex<Reservoir>,
    space: Condvar,
    board: Arc<SourceBoard>,
}

impl Pool {
    /// Opens the sources and starts their threads and the conditioner.
    pub fn start(config: PoolConfig) -> Result<Arc<Pool>, PoolError> {
        if config.sources.is_empty() {
            return Err(PoolError::NoSources);
        }
        let mut opened = Vec::new();
        for spec in &config.sources {
            let source = spec.open()?;
            let stats = Arc::new(SourceStats::new(
                spec.label(),
                source.is_hardware(),
                spec.min_entropy(),
            ));
            opened.push((source, stats, spec.min_entropy()));
        }
        let board = SourceBoard::new(opened.iter().map(|(_, s, _)| Arc::clone(s)).collect());
        if config.mode == Mode::Drbg && !crate::entropy::drbg::hardware_accelerated() {
            warn!(
                "this CPU has no AES instructions: guests' DRBGs run AES in software, \
                 several times slower (constant-time, as safe)"
            );
        }

        let capacity = match config.mode {
            // Seeds for a burst of reseeds; a seed is taken per guest.
            Mode::Drbg => 256 * SEED_BYTES,
            Mode::Raw => 64 * 1024,
        };
        let pool = Arc::new(Pool {
            mode: config.mode,
            reseed: config.reseed,
            reservoir: Mutex::new(Reservoir {
                bytes: VecDeque::with_capacity(capacity),
                capacity,
                waiters: Vec::new(),
                fairness: Fairness::default(),
            }),
            space: Condvar::new(),
            board: Arc::clone(&board),
        });

        // A few chunks per source in flight; beyond that sources wait.
        let (sink, contributions) = sync_channel::<Contribution>(4 * opened.len());
        let conditioner = Arc::clone(&pool);
        thread::Builder::new()
            .name("conditioner".into())
            .spawn(move || conditioner.condition(contributions))
            .map_err(|error| PoolError::Thread {
                what: "the conditioner".into(),
                error,
            })?;
        for (source, stats, min_entropy) in opened {
            let health = HealthConfig {
                min_entropy,
                ..HealthConfig::default()
            };
            let name = stats.name().to_owned();
            info!(
                "entropy source {name}: {}, credited {min_entropy} bits/byte; running start-up test",
                if source.is_hardware() {
                    "hardware"
                } else {
                    "not hardware"
                }
            );
            runner::spawn(source, health, stats, Arc::clone(&board), sink.clone())
                .map_err(|error| PoolError::Thread { what: name, error })?;
        }
        Ok(pool)
    }

    /// A pool with no sources and no threads, never fed: for a process
    /// that gets its bytes from elsewhere (a guest process of `--isolation
    /// guest`, which draws through the main serving process).
    pub fn empty(mode: Mode) -> Arc<Pool> {
        Arc::new(Pool {
            mode,
            reseed: ReseedPolicy::default(),
            reservoir: Mutex::new(Reservoir {
                bytes: VecDeque::new(),
                capacity: 0,
                waiters: Vec::new(),
                fairness: Fairness::default(),
            }),
            space: Condvar::new(),
            board: SourceBoard::new(Vec::new()),
        })
    }

    /// How guests are served, as configured.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Per-source statistics.
    pub fn sources(&self) -> &[Arc<SourceStats>] {
        self.board.sources()
    }

    /// Full-entropy bytes waiting in the reservoir.
    pub fn level(&self) -> usize {
        self.lock().bytes.len()
    }

    /// Whether any source is healthy now.
    pub fn any_healthy(&self) -> bool {
        self.board.any_healthy()
    }

    /// Most full-entropy bytes the reservoir holds.
    pub fn capacity(&self) -> usize {
        self.lock().capacity
    }

    /// A new stream for one guest; `waker` is called when a starved stream
    /// may be served again.
    /// `weight` is the guest's share of raw output when it is scarce; it
    /// may change while the stream lives.
    pub fn stream(
        self: &Arc<Self>,
        waker: Waker,
        weight: Arc<AtomicU32>,
    ) -> Box<dyn EntropyStream> {
        match self.mode {
            Mode::Drbg => Box::new(DrbgStream {
                pool: Arc::clone(self),
                drbg: Drbg::new(self.reseed),
                slot: WaitSlot::new(waker),
            }),
            Mode::Raw => Box::new(RawStream {
                pool: Arc::clone(self),
                slot: WaitSlot::new(waker),
                id: self.lock().fairness.register(),
                weight,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Reservoir> {
        self.reservoir.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves up to `buf.len()` bytes out of the reservoir; when it has none,
    /// registers `waker` (only when given) in the same critical section, so
    /// no refill can slip in unnoticed.
    /// Raw mode: takes up to `buf.len()` bytes for stream `id` if it is not
    /// ahead of its fair share; otherwise registers its waker.
    fn take_fair(
        &self,
        buf: &mut [u8],
        id: u64,
        weight: u32,
        slot: &WaitSlot,
        now: Instant,
    ) -> usize {
        let mut reservoir = self.lock();
        if !reservoir.fairness.may_take(id, now) {
            reservoir.enqueue(Some(slot));
            return 0;
        }
        let n = self.take_locked(&mut reservoir, buf, Some(slot));
        reservoir.fairness.charge(id, n, weight);
        n
    }

    fn take_locked(
        &self,
        reservoir: &mut Reservoir,
        buf: &mut [u8],
        slot: Option<&WaitSlot>,
    ) -> usize {
        let n = buf.len().min(reservoir.bytes.len());
        reservoir.move_out(&mut buf[..n]);
        if n == 0 {
            reservoir.enqueue(slot);
        } else {
            self.space.notify_one();
        }
        n
    }

    /// Takes one whole DRBG seed, or nothing. The seed is wiped when the
    /// caller drops it.
    fn take_seed(&self, slot: Option<&WaitSlot>) -> Option<Zeroizing<[u8; SEED_BYTES]>> {
        let mut reservoir = self.lock();
        if reservoir.bytes.len() < SEED_BYTES {
            reservoir.enqueue(slot);
            return None;
        }
        let mut seed = Zeroizing::new([0u8; SEED_BYTES]);
        reservoir.move_out(seed.as_mut());
        self.space.notify_one();
        Some(seed)
    }

    /// Fills `out` for a boot seed (`vhost-rng seed`), waiting at most
    /// `timeout` for the pool to have what it takes; false if it did not.
    ///
    /// Drbg mode: one full-entropy seed, as a guest's DRBG takes, keys a
    /// DRBG of its own that produces `out` and is then dropped: the same
    /// strength a guest's bytes have, at the cost of one seed whatever the
    /// length. Raw mode: `out` is full-entropy bytes straight from the
    /// reservoir (the caller keeps `out` small: guests draw from the same
    /// reservoir).
    pub fn draw_seed(&self, out: &mut [u8], timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let pause = std::time::Duration::from_millis(20);
        match self.mode {
            Mode::Drbg => loop {
                if let Some(seed) = self.take_seed(None) {
                    let now = Instant::now();
                    // The default bound (1 MiB) is far above any seed
                    // asked for; the operator's may be as low as a byte.
                    let mut drbg = Drbg::new(ReseedPolicy::default());
                    drbg.reseed(&seed, now);
                    let mut filled = 0;
                    while filled < out.len() {
                        let n = drbg.generate(&mut out[filled..], now);
                        if n == 0 {
                            return false;
                        }
                        filled += n;
                    }
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(pause);
            },
            Mode::Raw => {
                let mut filled = 0;
                while filled < out.len() {
                    filled += self.take_locked(&mut self.lock(), &mut out[filled..], None);
                    if filled < out.len() {
                        if Instant::now() >= deadline {
                            out.zeroize();
                            return false;
                        }
                        thread::sleep(pause);
                    }
                }
                true
            }
        }
    }

    /// The conditioner thread: absorbs approved bytes, fills the reservoir.
    fn condition(&self, contributions: Receiver<Contribution>) {
        let mut key = Zeroizing::new([0u8; 32]);
        if let Err(e) = getrandom::fill(key.as_mut()) {
            // The key need not be secret; a fixed one is still a valid
            // conditioning component.
            warn!("conditioner: no random key ({e}); using a fixed key");
        }
        let mut conditioner = Conditioner::new(*key);
        let mut blocks: Vec<[u8; BLOCK_BYTES]> = Vec::new();
        while let Ok(contribution) = contributions.recv() {
            conditioner.absorb(&contribution.bytes, contribution.min_entropy, &mut blocks);
            for block in &blocks {
                self.store(block);
            }
            // Empties it, wiping its buffer too: the blocks are what guests
            // are seeded with or receive, and no copy of them should stay
            // behind there until the next ones overwrite it.
            blocks.zeroize();
        }
    }

    /// Adds a block, waiting for room; wakes every waiting guest.
    fn store(&self, block: &[u8; BLOCK_BYTES]) {
        let waiters = {
            let mut reservoir = self.lock();
            while reservoir.bytes.len() + block.len() > reservoir.capacity {
                if reservoir.waiters.is_empty() {
                    reservoir = self
                        .space
                        .wait(reservoir)
                        .unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                // Full, yet guests wait: they were held back for fairness
                // by a guest that may have stopped asking. Let them look
                // again once that guest's turn has lapsed.
                let (guard, timeout) = self
                    .space
                    .wait_timeout(reservoir, ACTIVE_WINDOW)
                    .unwrap_or_else(|e| e.into_inner());
                reservoir = guard;
                if timeout.timed_out() {
                    let waiters = std::mem::take(&mut reservoir.waiters);
                    drop(reservoir);
                    wake(waiters);
                    reservoir = self.lock();
                }
            }
            reservoir.bytes.extend(block.iter());
            std::mem::take(&mut reservoir.waiters)
        };
        wake(waiters);
    }
}

/// DRBG mode: the guest's own generator, reseeded from the reservoir.
struct DrbgStream {
    pool: Arc<Pool>,
    drbg: Drbg,
    slot: WaitSlot,
}

impl EntropyStream for DrbgStream {
    fn fill(&mut self, buf: &mut [u8], now: Instant) -> usize {
        if self.drbg.needs_reseed(now) {
            match self.pool.take_seed(Some(&self.slot)) {
                Some(seed) => self.drbg.reseed(&seed, now),
                None => return 0,
            }
        } else if self.drbg.due_soon(now) {
            // Reseed early when a seed is at hand, so a guest rarely meets
            // the hard bound.
            if let Some(seed) = self.pool.take_seed(None) {
                self.drbg.reseed(&seed, now);
            }
        }
        self.drbg.generate(buf, now)
    }

    fn fills_batches(&self) -> bool {
        true
    }
}

/// Raw mode: full-entropy bytes straight from the reservoir.
struct RawStream {
    pool: Arc<Pool>,
    slot: WaitSlot,
    id: u64,
    weight: Arc<AtomicU32>,
}

impl EntropyStream for RawStream {
    fn fill(&mut self, buf: &mut [u8], now: Instant) -> usize {
        let weight = self.weight.load(Ordering::Relaxed);
        self.pool.take_fair(buf, self.id, weight, &self.slot, now)
    }
}

impl Drop for RawStream {
    fn drop(&mut self) {
        self.pool.lock().fairness.forget(self.id);
    }
}

fn wake(waiters: Vec<WaitSlot>) {
    for slot in waiters {
        slot.registered.store(false, Ordering::Release);
        (slot.waker)();
    }
}

/// A pool fed by the operating system's generator, for the unit tests of
/// what sits on top of the pool.
#[cfg(test)]
pub(crate) fn os_pool() -> Arc<Pool> {
    Pool::start(PoolConfig {
        sources: vec!["os".parse().expect("os is a source")],
        mode: Mode::default(),
        reseed: crate::entropy::drbg::ReseedPolicy::default(),
    })
    .expect("the OS generator is always there")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_move_out_in_order_across_the_ring_boundary() {
        let mut reservoir = Reservoir {
            bytes: VecDeque::with_capacity(8),
            capacity: 8,
            waiters: Vec::new(),
            fairness: Fairness::default(),
        };
        // Wrap the ring around, so that the bytes sit in two slices.
        // (Emptied, a deque may start over at the front; it is not here.)
        reservoir.bytes.extend([0xee; 6]);
        reservoir.bytes.drain(..5);
        reservoir.bytes.extend(1..=7);
        assert!(!reservoir.bytes.as_slices().1.is_empty());
        let mut out = [0; 6];
        reservoir.move_out(&mut out);
        assert_eq!(out, [0xee, 1, 2, 3, 4, 5]);
        assert_eq!(reservoir.bytes, [6, 7]);
        reservoir.bytes.push_back(8);
        let mut out = [0; 4];
        reservoir.move_out(&mut out[..3]);
        assert_eq!(out, [6, 7, 8, 0]);
        assert!(reservoir.bytes.is_empty());
    }
}
