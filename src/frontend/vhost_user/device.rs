// SPDX-License-Identifier: Apache-2.0
//! The virtio-rng device: what it offers the VMM (features, one request
//! queue) and how it answers the requests on that queue.
//!
//! One `RngDevice` lives for one VMM connection; the [`Guest`] it serves
//! outlives it, so counters and the token bucket survive a VM reboot. The
//! vhost-user protocol around it is [`super::handler`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{Level, debug};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_rng_protocol::log_limited;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::remote_supply::{RemoteLink, RemoteSupply};
use super::request::{RequestProcessor, Supplied, Supply};
use crate::entropy::pool::EntropyStream;
use crate::guest::Guest;

/// virtio device id of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Largest queue the device accepts; the VMM picks the size up to this.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// virtio-rng has one queue, the request queue.
pub const NUM_QUEUES: u64 = 1;

/// Virtio features offered to the driver.
pub const VIRTIO_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// vhost-user protocol features offered to the VMM. cloud-hypervisor's
/// generic vhost-user frontend needs CONFIGURE_MEM_SLOTS and REPLY_ACK.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The virtio-rng data path for one VMM connection.
pub struct RngDevice {
    guest: Arc<Guest>,
    processor: RequestProcessor,
    stream: Box<dyn EntropyStream>,
    /// Set by the pool when a starved guest can be served again.
    wake: Arc<Wake>,
    /// When a throttled guest has tokens again; the serving loop's one
    /// timer fires then (no descriptor of its own).
    throttled_until: Option<Instant>,
    /// In a guest process (`--isolation guest`): bytes come from the main
    /// serving process over this link, which wakes the device through the
    /// loop ([`super::event_loop`] watches the link's wake eventfd).
    remote: Option<Arc<RemoteLink>>,
}

/// The pool's wake-up for a starved device: a flag, and once the device is
/// served by an event loop, that loop's hook (one eventfd per loop, not
/// one per guest). Only the first wake-up after [`Wake::take`] calls the
/// hook.
#[derive(Default)]
pub struct Wake {
    woken: AtomicBool,
    hook: OnceLock<Arc<dyn Fn() + Send + Sync>>,
}

impl Wake {
    /// The pool (or, in a guest process, the main serving process over the
    /// entropy link) can serve the device again.
    pub fn signal(&self) {
        if !self.woken.swap(true, Ordering::SeqCst)
            && let Some(hook) = self.hook.get()
        {
            hook();
        }
    }

    /// Routes wake-ups to `hook` from now on; a wake-up that came before
    /// stays in the flag ([`Wake::take`] after binding sees it).
    pub fn bind(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.hook.set(hook);
    }

    /// Whether the pool woke the device since the last call.
    pub fn take(&self) -> bool {
        self.woken.swap(false, Ordering::SeqCst)
    }
}

impl RngDevice {
    /// The device of `guest`, with its own stream from the guest's pool and
    /// the flag the pool wakes it with.
    pub fn new(guest: Arc<Guest>) -> io::Result<Self> {
        let wake = Arc::new(Wake::default());
        let stream = guest.pool().stream(waker(&wake), guest.weight());
        Ok(RngDevice {
            guest,
            processor: RequestProcessor::default(),
            stream,
            wake,
            throttled_until: None,
            remote: super::remote_supply::installed(),
        })
    }

    /// The guest this device serves.
    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    /// The pool's wake-up for this device.
    pub fn wake(&self) -> &Arc<Wake> {
        &self.wake
    }

    /// When a throttled guest has tokens again, if it is throttled.
    pub fn throttled_until(&self) -> Option<Instant> {
        self.throttled_until
    }

    /// Forgets the throttle (its time came).
    pub fn clear_throttle(&mut self) {
        self.throttled_until = None;
    }

    /// Answers what the guest has queued; true when the driver must be
    /// notified.
    pub fn serve(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> bool {
        let guest = Arc::clone(&self.guest);
        let mut local = GuestSupply {
            guest: &guest,
            stream: self.stream.as_mut(),
            now: Instant::now(),
        };
        let mut remote = (self.remote.as_deref()).map(|link| RemoteSupply::new(link, &guest.stats));
        let inner: &mut dyn Supply = match remote.as_mut() {
            Some(remote) => remote,
            None => &mut local,
        };
        let mut supply = PassBudget::new(inner);
        let outcome =
            self.processor
                .process_queue(queue, memory, &mut supply, &mut |head, defect| {
                    log_limited!(
                        guest.defect_log,
                        Level::Warn,
                        "guest {}: request {head} answered with 0 bytes: {defect}",
                        guest.name()
                    );
                });
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                log_limited!(
                    guest.defect_log,
                    Level::Warn,
                    "guest {}: request queue unusable until the driver resets it: {e}",
                    guest.name()
                );
                return false;
            }
        };
        let stats = &guest.stats;
        stats
            .requests
            .fetch_add(outcome.completed, Ordering::Relaxed);
        guest.record(outcome.bytes, Instant::now());
        stats.bytes.fetch_add(outcome.bytes, Ordering::Relaxed);
        stats
            .defective_requests
            .fetch_add(outcome.defects, Ordering::Relaxed);
        if outcome.starved {
            // The pool wakes this device through its wake fd.
            debug!(
                "guest {}: no entropy available, request left pending",
                guest.name()
            );
        }
        if let Some(wait) = outcome.throttled {
            self.throttled_until = Some(Instant::now() + wait.max(Duration::from_nanos(1)));
        }
        outcome.notify
    }
}

fn waker(wake: &Arc<Wake>) -> Arc<dyn Fn() + Send + Sync> {
    let wake = Arc::clone(wake);
    Arc::new(move || wake.signal())
}

/// A request's bytes: tokens from the guest's limits, then bytes from its
/// stream; unused tokens go back.
struct GuestSupply<'a> {
    guest: &'a Guest,
    stream: &'a mut dyn EntropyStream,
    /// Read once for a pass over the queue: reading the clock for every
    /// 64-byte request took a fifth of the data path's time. A pass is
    /// short (microseconds for the guest driver's small requests, at most
    /// [`PASS_REQUESTS`] requests or [`PASS_BYTES`] bytes): a stale reading
    /// grants fewer tokens, never more, and delays a reseed by age by at
    /// most one pass (the byte bound is exact).
    now: Instant,
}

/// Most requests, and bytes, answered in one pass over a queue before the
/// guest yields to the others its event loop serves: a guest that keeps its
/// queue full would otherwise hold the loop for as long as it posts. About
/// a millisecond of work; the rest is answered on the loop's next turn.
const PASS_REQUESTS: u32 = 1024;
const PASS_BYTES: usize = 1 << 20;

impl Supply for GuestSupply<'_> {
    fn supply(&mut self, buf: &mut [u8]) -> Supplied {
        self.guest.supply(self.stream, buf, self.now)
    }

    fn supply_batch(&mut self, buf: &mut [u8], _requests: usize) -> Option<Supplied> {
        self.guest.supply_batch(self.stream, buf, self.now)
    }
}

/// A pass's supply, cut off after [`PASS_REQUESTS`] answered requests or
/// [`PASS_BYTES`] bytes.
struct PassBudget<'a> {
    inner: &'a mut dyn Supply,
    requests: u32,
    bytes: usize,
}

impl<'a> PassBudget<'a> {
    fn new(inner: &'a mut dyn Supply) -> Self {
        PassBudget {
            inner,
            requests: 0,
            bytes: 0,
        }
    }
}

impl Supply for PassBudget<'_> {
    fn supply(&mut self, buf: &mut [u8]) -> Supplied {
        if self.requests >= PASS_REQUESTS || self.bytes >= PASS_BYTES {
            // Taken up again at once, after the loop's other guests: the
            // throttle path with no wait, no tokens taken.
            return Supplied::Throttled(Duration::ZERO);
        }
        let supplied = self.inner.supply(buf);
        if let Supplied::Bytes(n) = supplied {
            self.requests += 1;
            self.bytes += n;
        }
        supplied
    }

    /// A batch is taken whole only when all of it fits the budget: then
    /// every request in it would have been answered one by one too. One
    /// that would cross the budget is asked for request by request, and
    /// the budget cuts where it always does. (A batch the stream fills
    /// short, at a DRBG's byte bound, counts all its requests: the pass
    /// yields a little early then, never late.)
    fn supply_batch(&mut self, buf: &mut [u8], requests: usize) -> Option<Supplied> {
        let requests_after = self.requests.saturating_add(u32::try_from(requests).ok()?);
        if requests_after > PASS_REQUESTS || self.bytes.saturating_add(buf.len()) > PASS_BYTES {
            return None;
        }
        let supplied = self.inner.supply_batch(buf, requests)?;
        if let Supplied::Bytes(n) = supplied {
            self.requests = requests_after;
            self.bytes += n;
        }
        Some(supplied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every request in full.
    struct Plenty;

    impl Supply for Plenty {
        fn supply(&mut self, buf: &mut [u8]) -> Supplied {
            buf.fill(0xa5);
            Supplied::Bytes(buf.len())
        }
    }

    /// Requests of `len` bytes answered in one pass before it yields.
    fn answered_in_one_pass(len: usize) -> usize {
        let mut plenty = Plenty;
        let mut budget = PassBudget::new(&mut plenty);
        let mut buf = vec![0; len];
        let mut answered = 0;
        loop {
            match budget.supply(&mut buf) {
                Supplied::Bytes(n) => {
                    assert_eq!(n, len);
                    answered += 1;
                }
                Supplied::Throttled(wait) => {
                    assert_eq!(wait, Duration::ZERO, "a yield, not a throttle");
                    return answered;
                }
                Supplied::Starved => panic!("plenty never starves"),
            }
        }
    }

    /// Answers batches in full too.
    struct PlentyInBatches;

    impl Supply for PlentyInBatches {
        fn supply(&mut self, buf: &mut [u8]) -> Supplied {
            Plenty.supply(buf)
        }

        fn supply_batch(&mut self, buf: &mut [u8], _requests: usize) -> Option<Supplied> {
            Some(Plenty.supply(buf))
        }
    }

    #[test]
    fn batches_count_against_the_budget_and_never_cross_it() {
        let mut plenty = PlentyInBatches;
        let mut budget = PassBudget::new(&mut plenty);
        let mut batch = vec![0; 256 * 64];
        // Three batches of 256 requests fit in 1024 requests; a fourth
        // would fit exactly too; a fifth does not.
        for _ in 0..4 {
            assert_eq!(
                budget.supply_batch(&mut batch, 256),
                Some(Supplied::Bytes(256 * 64))
            );
        }
        assert_eq!(budget.requests, PASS_REQUESTS);
        assert_eq!(budget.supply_batch(&mut batch, 2), None);
        // One by one, the budget yields as it always does.
        assert_eq!(
            budget.supply(&mut batch[..64]),
            Supplied::Throttled(Duration::ZERO)
        );

        // A batch that would cross the byte budget goes request by request.
        let mut plenty = PlentyInBatches;
        let mut budget = PassBudget::new(&mut plenty);
        budget.bytes = PASS_BYTES - 100;
        let mut two = vec![0; 128];
        assert_eq!(budget.supply_batch(&mut two, 2), None);
        assert_eq!(budget.supply(&mut two[..64]), Supplied::Bytes(64));
        assert_eq!(budget.supply(&mut two[64..]), Supplied::Bytes(64));
        assert_eq!(
            budget.supply(&mut two[..64]),
            Supplied::Throttled(Duration::ZERO)
        );
    }

    #[test]
    fn a_pass_yields_after_its_request_or_byte_budget() {
        // The Linux driver's 64-byte requests: the request count bounds.
        assert_eq!(answered_in_one_pass(64), PASS_REQUESTS as usize);
        // 4 KiB and the largest, 64 KiB: the bytes bound.
        assert_eq!(answered_in_one_pass(4096), PASS_BYTES / 4096);
        assert_eq!(answered_in_one_pass(64 * 1024), PASS_BYTES / (64 * 1024));
    }
}
