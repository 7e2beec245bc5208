// SPDX-License-Identifier: Apache-2.0
//! The virtio-rng device: what it offers the VMM (features, one request
//! queue) and how it answers the requests on that queue.
//!
//! One `RngDevice` lives for one VMM connection; the [`Guest`] it serves
//! outlives it, so counters and the token bucket survive a VM reboot. The
//! vhost-user protocol around it is [`super::handler`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{Level, debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_rng_protocol::log_limited;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::timerfd::TimerFd;

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
    /// Signalled by the pool when a starved guest can be served again.
    wake: EventConsumer,
    /// Fires when a throttled guest has tokens again; never slept on.
    timer: TimerFd,
    /// In a guest process (`--isolation guest`): bytes come from the main
    /// serving process over this link, and it signals `wake`.
    remote: Option<Arc<RemoteLink>>,
}

impl RngDevice {
    /// The device of `guest`, with its own stream from the guest's pool, the
    /// eventfd the pool wakes it with and its throttle timer.
    pub fn new(guest: Arc<Guest>) -> io::Result<Self> {
        let (mut wake, wake_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let remote = super::remote_supply::installed();
        if let Some(link) = &remote {
            wake = link.wake_consumer()?;
        }
        let timer = TimerFd::new()?;
        let stream = guest
            .pool()
            .stream(waker(&guest, wake_notifier), guest.weight());
        Ok(RngDevice {
            guest,
            processor: RequestProcessor::default(),
            stream,
            wake,
            timer,
            remote,
        })
    }

    /// The guest this device serves.
    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    /// Readable when the pool can serve a starved guest again.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the consumer owns the fd for as long as `self` lives.
        unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) }
    }

    /// Readable when a throttled guest has tokens again.
    pub fn timer_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the TimerFd owns the fd for as long as `self` lives.
        unsafe { BorrowedFd::borrow_raw(self.timer.as_raw_fd()) }
    }

    /// Takes a wake-up; a spurious one finds nothing to read.
    pub fn consume_wake(&self) {
        let _ = self.wake.consume();
    }

    /// Takes a timer expiry.
    pub fn clear_timer(&mut self) {
        // Only called when poll reported the timer readable, so this read
        // does not block.
        let _ = self.timer.wait();
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
        let supply: &mut dyn Supply = match remote.as_mut() {
            Some(remote) => remote,
            None => &mut local,
        };
        let outcome = self
            .processor
            .process_queue(queue, memory, supply, &mut |head, defect| {
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
            self.arm_timer(wait);
        }
        outcome.notify
    }

    fn arm_timer(&mut self, wait: Duration) {
        // A zero duration would disarm the timer instead.
        if let Err(e) = self.timer.reset(wait.max(Duration::from_nanos(1)), None) {
            warn!(
                "guest {}: cannot arm the rate-limit timer: {e}",
                self.guest.name()
            );
        }
    }
}

fn waker(guest: &Guest, notifier: EventNotifier) -> Arc<dyn Fn() + Send + Sync> {
    let name = guest.name().to_owned();
    Arc::new(move || {
        if let Err(e) = notifier.notify() {
            warn!("guest {name}: cannot wake the request queue: {e}");
        }
    })
}

/// A request's bytes: tokens from the guest's limits, then bytes from its
/// stream; unused tokens go back.
struct GuestSupply<'a> {
    guest: &'a Guest,
    stream: &'a mut dyn EntropyStream,
    /// Read once for a pass over the queue: reading the clock for every
    /// 64-byte request took a fifth of the data path's time. A pass is
    /// short (microseconds for the guest driver's small requests, tens of
    /// milliseconds for a full queue of 64 KiB ones): a stale reading
    /// grants fewer tokens, never more, and delays a reseed by age by at
    /// most one pass (the byte bound is exact).
    now: Instant,
}

impl Supply for GuestSupply<'_> {
    fn supply(&mut self, buf: &mut [u8]) -> Supplied {
        self.guest.supply(self.stream, buf, self.now)
    }
}
