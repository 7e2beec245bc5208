//! The virtio-rng device as a vhost-user backend: what it offers the VMM
//! (features, one request queue) and what it does when the guest kicks.
//!
//! One `RngDevice` lives for one VMM connection; the [`Guest`] it serves
//! outlives it, so counters survive a VM reboot.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::timerfd::TimerFd;

use super::request::{QueueOutcome, RequestProcessor, Supplied, Supply};
use crate::guest::Guest;
use crate::pool::EntropyStream;

/// virtio device id of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Largest queue the device accepts; the VMM picks the size up to this.
pub const MAX_QUEUE_SIZE: usize = 1024;
const NUM_QUEUES: usize = 1;
const REQUEST_QUEUE: u16 = 0;
/// Epoll event id of the device's wake-up eventfd. Ids up to NUM_QUEUES are
/// the vhost-user-backend crate's (queues, then its exit event).
pub const WAKE_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Epoll event id of the device's rate-limit timer.
pub const TIMER_EVENT: u16 = WAKE_EVENT + 1;

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

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The virtio-rng device for one VMM connection.
pub struct RngDevice {
    guest: Arc<Guest>,
    memory: RwLock<Option<GuestMemory>>,
    data_path: Mutex<DataPath>,
    /// The vring worker's exit event, handed to the worker once; the
    /// vhost-user handler fires it when the connection's handler is dropped.
    exit_consumer: Mutex<Option<EventConsumer>>,
    exit_notifier: EventNotifier,
    /// The exit event's fd once handed over; see [`RngDevice::close_exit_event`].
    handed_exit_fd: Mutex<Option<RawFd>>,
    /// Signalled by the pool when a starved guest can be served again.
    wake: EventConsumer,
    /// Fires when a throttled guest has tokens again; never slept on.
    timer: Mutex<TimerFd>,
    timer_fd: RawFd,
}

struct DataPath {
    processor: RequestProcessor,
    stream: Box<dyn EntropyStream>,
}

impl RngDevice {
    pub fn new(guest: Arc<Guest>) -> io::Result<Arc<Self>> {
        let (exit_consumer, exit_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let (wake, wake_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let timer = TimerFd::new()?;
        let timer_fd = timer.as_raw_fd();
        let waker_guest = guest.name().to_owned();
        let waker = Arc::new(move || {
            if let Err(e) = wake_notifier.notify() {
                warn!("guest {waker_guest}: cannot wake the request queue: {e}");
            }
        });
        let stream = guest.pool().stream(waker, guest.weight());
        Ok(Arc::new(RngDevice {
            guest,
            memory: RwLock::new(None),
            data_path: Mutex::new(DataPath {
                processor: RequestProcessor::default(),
                stream,
            }),
            exit_consumer: Mutex::new(Some(exit_consumer)),
            exit_notifier,
            handed_exit_fd: Mutex::new(None),
            wake,
            timer: Mutex::new(timer),
            timer_fd,
        }))
    }

    /// Closes the exit event handed to the vring worker.
    ///
    /// vhost-user-backend 0.24 turns it into a raw fd (`into_raw_fd`) that
    /// it registers with the worker's epoll and never closes, so without
    /// this every VMM connection would leave one descriptor behind. Call
    /// only once the connection's `VhostUserDaemon` is dropped: that joins
    /// the worker and drops its epoll, the fd's only user.
    pub fn close_exit_event(&self) {
        let handed = self
            .handed_exit_fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(fd) = handed {
            // SAFETY: the fd came from our EventConsumer, whose ownership the
            // crate took with into_raw_fd and abandoned; the crate version is
            // pinned in Cargo.toml so this stays true. Nothing refers to the
            // fd any more (see above), and `take` makes this run once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// The timerfd to watch for [`TIMER_EVENT`] in the vring worker.
    pub fn timer_fd(&self) -> RawFd {
        self.timer_fd
    }

    /// The eventfd to watch for [`WAKE_EVENT`] in the vring worker.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    fn serve_queue(&self, vring: &VringRwLock) {
        let Some(memory) = self
            .memory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            debug!(
                "guest {}: kick before the memory table; ignored",
                self.guest.name()
            );
            return;
        };
        let guest_memory = memory.memory();
        let outcome = {
            let mut data_path = self.data_path.lock().unwrap_or_else(|e| e.into_inner());
            let DataPath { processor, stream } = &mut *data_path;
            let mut vring_state = vring.get_mut();
            let guest = &self.guest;
            let mut supply = GuestSupply {
                guest,
                stream: stream.as_mut(),
                now: Instant::now(),
            };
            processor.process_queue(
                vring_state.get_queue_mut(),
                &*guest_memory,
                &mut supply,
                &mut |head, defect| {
                    if let Some(suppressed) = guest.defect_log.permit() {
                        warn!(
                            "guest {}: request {head} answered with 0 bytes: {defect} \
                             ({suppressed} similar messages suppressed)",
                            guest.name()
                        );
                    }
                },
            )
        };
        match outcome {
            Ok(outcome) => self.account(vring, outcome),
            Err(e) => {
                if let Some(suppressed) = self.guest.defect_log.permit() {
                    warn!(
                        "guest {}: request queue unusable until the driver resets it: {e} \
                         ({suppressed} similar messages suppressed)",
                        self.guest.name()
                    );
                }
            }
        }
    }

    fn account(&self, vring: &VringRwLock, outcome: QueueOutcome) {
        let stats = &self.guest.stats;
        stats
            .requests
            .fetch_add(outcome.completed, Ordering::Relaxed);
        self.guest.record(outcome.bytes, Instant::now());
        stats.bytes.fetch_add(outcome.bytes, Ordering::Relaxed);
        stats
            .defective_requests
            .fetch_add(outcome.defects, Ordering::Relaxed);
        if outcome.starved {
            // The pool wakes this device through WAKE_EVENT.
            debug!(
                "guest {}: no entropy available, request left pending",
                self.guest.name()
            );
        }
        if let Some(wait) = outcome.throttled {
            self.arm_timer(wait);
        }
        if outcome.notify
            && let Err(e) = vring.signal_used_queue()
        {
            warn!(
                "guest {}: cannot signal the used queue: {e}",
                self.guest.name()
            );
        }
    }
}

impl RngDevice {
    fn arm_timer(&self, wait: Duration) {
        let mut timer = self.timer.lock().unwrap_or_else(|e| e.into_inner());
        // A zero duration would disarm the timer instead.
        if let Err(e) = timer.reset(wait.max(Duration::from_nanos(1)), None) {
            warn!(
                "guest {}: cannot arm the rate-limit timer: {e}",
                self.guest.name()
            );
        }
    }

    fn clear_timer(&self) {
        let mut timer = self.timer.lock().unwrap_or_else(|e| e.into_inner());
        // Only called when epoll reported the timer readable, so this read
        // does not block.
        let _ = timer.wait();
    }
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

impl VhostUserBackend for RngDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    /// The handler has already set EVENT_IDX on the vring's queue, which is
    /// where request processing reads it.
    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, memory: GuestMemory) -> io::Result<()> {
        *self.memory.write().unwrap_or_else(|e| e.into_inner()) = Some(memory);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let consumer = self
            .exit_consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        match self.exit_notifier.try_clone() {
            Ok(notifier) => {
                *self
                    .handed_exit_fd
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                warn!(
                    "guest {}: cannot set up the worker exit event: {e}",
                    self.guest.name()
                );
                None
            }
        }
    }

    /// Never returns an error for anything a guest did: an error here ends
    /// the vring worker thread, and with it the guest's service.
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match (device_event, vrings.first()) {
            (REQUEST_QUEUE, Some(vring)) => self.serve_queue(vring),
            (WAKE_EVENT, Some(vring)) => {
                // Non-blocking: a spurious wake-up just finds nothing to read.
                let _ = self.wake.consume();
                self.serve_queue(vring);
            }
            (TIMER_EVENT, Some(vring)) => {
                self.clear_timer();
                self.serve_queue(vring);
            }
            _ => debug!(
                "guest {}: unexpected event {device_event}",
                self.guest.name()
            ),
        }
        Ok(())
    }
}
