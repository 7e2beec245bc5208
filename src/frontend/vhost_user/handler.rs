// SPDX-License-Identifier: Apache-2.0
//! The vhost-user protocol of one VMM connection: what each message does to
//! the device, checked as input from a VMM that may be hostile.
//!
//! [`super::dispatch`] turns each message into a call here; this is the
//! state they change: ownership, features, the memory table ([`super::memory`]) and the
//! request ring. Rules beyond what the crate checks:
//! - nothing but feature queries before SET_OWNER;
//! - kick, call and error fds must be eventfds, and are made non-blocking, so
//!   nothing a VMM hands over can block the loop that serves the guest (the
//!   error fd is then closed: virtio-rng never writes it);
//! - a refused message ends the connection ([`Handler::take_fatal`]): a VMM
//!   that sends one is broken or hostile, and a half-configured device is
//!   worse than a clean disconnect it can see.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserLog, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::connection::Message;
use super::device::{
    MAX_QUEUE_SIZE, NUM_QUEUES, RngDevice, VIRTIO_FEATURES, Wake, protocol_features,
};
use super::dispatch::REM_MEM_REG;
use super::fault_guard;
use super::memory::{MemoryError, MemoryLimits, MemoryTable};
use super::snapshot::{
    Answered, ConnectionState, RegionState, RestoreError, RingState, STATE_VERSION,
};
use crate::guest::Guest;

/// Why a connection is being closed on the daemon's side.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A request that needs an owner came before SET_OWNER (the request is
    /// named).
    #[error("{0} before SET_OWNER")]
    NotOwner(&'static str),
    /// SET_OWNER came again on a connection that has an owner.
    #[error("a second SET_OWNER")]
    OwnerTwice,
    /// SET_FEATURES acked feature bits the device did not offer (they are
    /// given).
    #[error("features {0:#x} that were not offered")]
    UnofferedFeatures(u64),
    /// SET_PROTOCOL_FEATURES acked bits the device did not offer (they are
    /// given).
    #[error("protocol features {0:#x} that were not offered")]
    UnofferedProtocolFeatures(u64),
    /// A ring request named a queue other than 0 (the index is given).
    #[error("queue index {0}; virtio-rng has one queue")]
    NoSuchQueue(u64),
    /// SET_VRING_NUM gave a size that is 0, over [`MAX_QUEUE_SIZE`], or not a
    /// power of two (it is given).
    #[error("queue size {0} (must be a power of two from 1 to {MAX_QUEUE_SIZE})")]
    QueueSize(u32),
    /// SET_VRING_ADDR gave an address in the VMM's space that no memory region
    /// maps (it is given).
    #[error("a vring address {0:#x} outside every memory region")]
    UnmappedRingAddress(u64),
    /// SET_VRING_BASE gave an index of 65536 or more (it is given).
    #[error("a vring base {0} (must be below 65536)")]
    VringBase(u32),
    /// A kick, call or error fd is not an eventfd, or cannot be made
    /// non-blocking.
    #[error("{which} fd: {reason}")]
    BadEventFd {
        /// Which fd: "kick", "call" or "error".
        which: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// SET_VRING_KICK came without an fd, which would mean polling the ring.
    #[error("a kick without an fd (polling mode is not supported)")]
    NoKickFd,
    /// The memory table (SET_MEM_TABLE, ADD_MEM_REG, ...) was refused.
    #[error("memory table refused: {0}")]
    Memory(#[from] MemoryError),
    /// Reading guest memory faulted: its file was truncated under the mapping
    /// (the number of faulting pages is given).
    #[error("its guest memory file shrank under the daemon (SIGBUS on {0} page(s))")]
    MemoryShrank(u64),
    /// A request this device does not support (it is named).
    #[error("{0}, which this device does not support")]
    Unsupported(&'static str),
}

/// The request ring as the VMM configured it.
struct Ring {
    queue: Queue,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    /// SET_VRING_ENABLE, or implied when PROTOCOL_FEATURES is not acked.
    enabled: bool,
}

impl Ring {
    fn new() -> Self {
        Ring {
            // MAX_QUEUE_SIZE is a power of two, which is all new() checks.
            queue: Queue::new(MAX_QUEUE_SIZE).unwrap_or_else(|_| unreachable!()),
            kick: None,
            call: None,
            enabled: false,
        }
    }

    /// Started (kick received, not stopped by GET_VRING_BASE) and enabled.
    fn running(&self) -> bool {
        self.queue.ready() && self.enabled && self.kick.is_some()
    }
}

/// One VMM connection's device state.
pub struct Handler {
    device: RngDevice,
    owner: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    memory: MemoryTable,
    ring: Ring,
    fatal: Option<Refusal>,
    /// The last message handled, for crash survival (see [`Answered`]).
    answered: Option<Answered>,
    /// Taken over from a process that died: the first message may be the
    /// one it had handled and not yet taken off the socket.
    check_repeat: bool,
}

impl Handler {
    /// A handler for a new connection of `guest`, unowned, with no memory
    /// mapped yet; `limits` bound what the VMM may map.
    pub fn new(guest: Arc<Guest>, limits: MemoryLimits) -> io::Result<Self> {
        Ok(Handler {
            device: RngDevice::new(guest)?,
            owner: false,
            acked_features: 0,
            acked_protocol_features: 0,
            memory: MemoryTable::new(limits),
            ring: Ring::new(),
            fatal: None,
            answered: None,
            check_repeat: false,
        })
    }

    /// Records `message` (as it is on the socket) as handled, with the
    /// reply it gets, before it is taken off the socket.
    pub fn set_answered(&mut self, message: Vec<u8>, reply: Option<Vec<u8>>) {
        self.answered = Some(Answered { message, reply });
    }

    /// For the first message after a take-over: if it is the one the
    /// previous process recorded as handled (the same bytes, and any
    /// descriptors it carries already held here), `Some` with the reply it
    /// gets again; the message must then be taken off, not handled again.
    pub fn repeat_of_answered(&mut self, message: &Message) -> Option<Option<Vec<u8>>> {
        if !std::mem::take(&mut self.check_repeat) {
            return None;
        }
        let answered = self.answered.as_ref()?;
        if answered.message != message.raw {
            return None;
        }
        let held = self.held_fds();
        // REM_MEM_REG may carry the fd of the region it removed, which is
        // no longer held.
        let fds_held = message.code == REM_MEM_REG
            || message
                .fds
                .iter()
                .all(|fd| held.iter().any(|h| crate::kcmp::same_file(fd.as_fd(), *h)));
        fds_held.then(|| answered.reply.clone())
    }

    /// Every descriptor the VMM gave that the handler holds.
    fn held_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut held: Vec<BorrowedFd<'_>> = self
            .memory
            .regions()
            .map(|region| region.file.as_fd())
            .collect();
        for event in [&self.ring.kick, &self.ring.call].into_iter().flatten() {
            // SAFETY: the EventFd owns the fd for as long as `self` lives.
            held.push(unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) });
        }
        held
    }

    /// Whether the VMM has claimed the device (SET_OWNER).
    pub fn owned(&self) -> bool {
        self.owner
    }

    /// Whether the VMM acknowledged protocol feature `feature`.
    pub fn acked_protocol(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol_features & feature.bits() != 0
    }

    /// Whether requests that ask for an acknowledgement get one.
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// The connection's state, with duplicates of the descriptors it
    /// needs (indexed by the state), for another handler to take over.
    pub fn snapshot(&self) -> io::Result<(ConnectionState, Vec<OwnedFd>)> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut keep = |fd: BorrowedFd<'_>| -> io::Result<usize> {
            fds.push(fd.try_clone_to_owned()?);
            Ok(fds.len() - 1)
        };
        let mut regions = Vec::new();
        for region in self.memory.regions() {
            regions.push(RegionState {
                guest_addr: region.guest_addr,
                size: region.size,
                vmm_addr: region.vmm_addr,
                mmap_offset: region.mmap_offset,
                fd: keep(region.file.as_fd())?,
            });
        }
        let mut event = |fd: &Option<EventFd>| -> io::Result<Option<usize>> {
            fd.as_ref()
                // SAFETY: the EventFd owns the fd for the duration of this
                // borrow, which only duplicates it.
                .map(|fd| keep(unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }))
                .transpose()
        };
        let (kick, call) = (event(&self.ring.kick)?, event(&self.ring.call)?);
        let queue = &self.ring.queue;
        let state = ConnectionState {
            version: STATE_VERSION,
            owner: self.owner,
            acked_features: self.acked_features,
            acked_protocol_features: self.acked_protocol_features,
            regions,
            ring: RingState {
                size: queue.size(),
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
                ready: queue.ready(),
                enabled: self.ring.enabled,
                kick,
                call,
                // The error eventfd is checked and closed on arrival (see
                // `set_vring_err`): nothing to hand over.
                err: None,
            },
            answered: self.answered.clone(),
        };
        Ok((state, fds))
    }

    /// A handler that goes on where a snapshot left off, taking the
    /// descriptors the state indexes. The VMM's memory is mapped and checked
    /// again, as if it had sent its table now.
    pub fn restore(
        guest: Arc<Guest>,
        limits: MemoryLimits,
        state: &ConnectionState,
        fds: Vec<OwnedFd>,
    ) -> Result<Self, RestoreError> {
        if state.version != STATE_VERSION {
            return Err(RestoreError::Version {
                found: state.version,
            });
        }
        let count = fds.len();
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |index: usize| {
            fds.get_mut(index)
                .and_then(Option::take)
                .ok_or(RestoreError::MissingFd { index, count })
        };
        let mut handler = Handler::new(guest, limits)?;
        handler.owner = state.owner;
        handler.acked_features = state.acked_features;
        handler.acked_protocol_features = state.acked_protocol_features;
        let mut regions = Vec::new();
        let mut files = Vec::new();
        for region in &state.regions {
            regions.push(VhostUserMemoryRegion::new(
                region.guest_addr,
                region.size,
                region.vmm_addr,
                region.mmap_offset,
            ));
            files.push(File::from(take(region.fd)?));
        }
        if !regions.is_empty() {
            handler.memory.replace(&regions, files)?;
        }
        let mut event = |which: &'static str, index: Option<usize>| {
            index
                .map(|index| {
                    let file = File::from(take(index)?);
                    eventfd(file).map_err(|reason| RestoreError::EventFd { which, reason })
                })
                .transpose()
        };
        let ring = &state.ring;
        handler.ring.kick = event("kick", ring.kick)?;
        handler.ring.call = event("call", ring.call)?;
        // Checked like the others and closed (see `set_vring_err`).
        drop(event("error", ring.err)?);
        handler.ring.enabled = ring.enabled;
        handler.answered = state.answered.clone();
        handler.check_repeat = true;
        let queue = &mut handler.ring.queue;
        queue.set_size(ring.size);
        let split = |address: u64| (Some(address as u32), Some((address >> 32) as u32));
        let (low, high) = split(ring.desc);
        queue.set_desc_table_address(low, high);
        let (low, high) = split(ring.avail);
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(ring.used);
        queue.set_used_ring_address(low, high);
        queue.set_event_idx(state.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        if ring.ready {
            // Where serving stopped: requests are completed in order, so
            // everything before the used index was answered and nothing
            // after it was. One taken but not answered is served again.
            let memory = handler.memory.memory().ok_or_else(|| {
                RestoreError::UsedRing("a started ring without guest memory".into())
            })?;
            let (used, faults) = fault_guard::guarded(|| {
                queue.used_idx(memory, std::sync::atomic::Ordering::Acquire)
            });
            if faults > 0 {
                return Err(RestoreError::UsedRing(
                    "its guest memory file shrank".into(),
                ));
            }
            let used = used.map_err(|e| RestoreError::UsedRing(e.to_string()))?.0;
            queue.set_next_avail(used);
            queue.set_next_used(used);
            queue.set_ready(true);
        }
        Ok(handler)
    }

    /// The reason to close the connection, once a message was refused.
    pub fn take_fatal(&mut self) -> Option<Refusal> {
        self.fatal.take()
    }

    /// The kick fd to wait on, while the ring runs.
    pub fn kick_fd(&self) -> Option<BorrowedFd<'_>> {
        self.ring
            .kick
            .as_ref()
            .filter(|_| self.ring.running())
            // SAFETY: the EventFd owns the fd for as long as `self` lives.
            .map(|kick| unsafe { BorrowedFd::borrow_raw(kick.as_raw_fd()) })
    }

    /// The pool's wake-up for this connection's device (see
    /// [`Wake::bind`]).
    pub fn wake(&self) -> &Arc<Wake> {
        self.device.wake()
    }

    /// When a throttled guest has tokens again ([`Handler::on_timer`] then).
    pub fn throttled_until(&self) -> Option<std::time::Instant> {
        self.device.throttled_until()
    }

    /// The guest kicked: take the kick and serve the queue.
    ///
    /// The kick eventfd is not read: the event loop waits on it
    /// edge-triggered, and each write is an edge. Its counter only grows
    /// (2^64 - 2 kicks away from full, which a VMM reaches only by writing
    /// a huge count itself, stalling nobody but its own guest).
    pub fn on_kick(&mut self) {
        self.serve();
    }

    /// Answers what the guest has queued without waiting for a kick: a
    /// connection taken over from a process that died may have requests
    /// whose kick that process had already taken.
    ///
    /// Also interrupts the driver once: the process that died may have
    /// published answers and died before it could notify, and a driver
    /// waiting for that interrupt would wait forever. A spurious interrupt
    /// costs a virtio driver one look at its used ring.
    pub fn serve_pending(&mut self) {
        self.serve();
        if self.ring.running()
            && let Some(call) = &self.ring.call
        {
            let _ = call.write(1);
        }
    }

    /// The pool may be able to serve a starved request again: serves the
    /// queue if the pool woke this device (a spurious call does nothing).
    pub fn on_wake(&mut self) {
        if self.device.wake().take() {
            self.serve();
        }
    }

    /// A throttled guest has tokens again (its
    /// [`Handler::throttled_until`] came).
    pub fn on_timer(&mut self) {
        self.device.clear_throttle();
        self.serve();
    }

    fn serve(&mut self) {
        if !self.ring.running() {
            return;
        }
        let Some(memory) = self.memory.memory() else {
            return;
        };
        let (device, queue) = (&mut self.device, &mut self.ring.queue);
        let (notify, faults) = fault_guard::guarded(|| device.serve(queue, memory));
        if faults > 0 {
            self.fail(Refusal::MemoryShrank(faults));
            return;
        }
        if notify && let Some(call) = &self.ring.call {
            // Non-blocking: a counter the VMM left near its maximum reads
            // EAGAIN, and the driver then simply gets no interrupt.
            let _ = call.write(1);
        }
    }

    fn fail(&mut self, refusal: Refusal) -> VhostUserError {
        let error = VhostUserError::ReqHandlerError(io::Error::other(refusal.to_string()));
        self.fatal.get_or_insert(refusal);
        error
    }

    fn check(&mut self, ok: bool, refusal: impl FnOnce() -> Refusal) -> VhostUserResult<()> {
        if ok {
            Ok(())
        } else {
            let refusal = refusal();
            Err(self.fail(refusal))
        }
    }

    fn require_owner(&mut self, message: &'static str) -> VhostUserResult<()> {
        self.check(self.owner, || Refusal::NotOwner(message))
    }

    fn require_queue(&mut self, message: &'static str, index: u64) -> VhostUserResult<()> {
        self.require_owner(message)?;
        self.check(index < NUM_QUEUES, || Refusal::NoSuchQueue(index))
    }

    fn refuse<T>(&mut self, what: &'static str) -> VhostUserResult<T> {
        Err(self.fail(Refusal::Unsupported(what)))
    }

    fn eventfd(&mut self, which: &'static str, file: File) -> VhostUserResult<EventFd> {
        eventfd(file).map_err(|reason| self.fail(Refusal::BadEventFd { which, reason }))
    }

    fn memory_result(&mut self, result: Result<(), MemoryError>) -> VhostUserResult<()> {
        result.map_err(|e| self.fail(Refusal::Memory(e)))
    }

    /// Stops the ring: GET_VRING_BASE, a reset, or a new owner.
    fn stop_ring(&mut self) -> u16 {
        let next_avail = self.ring.queue.next_avail();
        self.ring.queue.set_ready(false);
        self.ring.kick = None;
        self.ring.call = None;
        next_avail
    }
}

/// Checks that a VMM-supplied fd is an eventfd and makes it non-blocking.
fn eventfd(file: File) -> Result<EventFd, String> {
    let fd = file.as_raw_fd();
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("cannot inspect it: {e}"))?;
    if target.as_os_str() != "anon_inode:[eventfd]" {
        return Err(format!("{} is not an eventfd", target.display()));
    }
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| format!("cannot read its flags: {e}"))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| format!("cannot make it non-blocking: {e}"))?;
    // SAFETY: the fd is an eventfd whose only owner was `file`.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        self.check(!self.owner, || Refusal::OwnerTwice)?;
        self.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.stop_ring();
        self.owner = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        self.stop_ring();
        self.ring.enabled = false;
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(VIRTIO_FEATURES)
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.require_owner("SET_FEATURES")?;
        self.check(features & !VIRTIO_FEATURES == 0, || {
            Refusal::UnofferedFeatures(features & !VIRTIO_FEATURES)
        })?;
        self.acked_features = features;
        // Without PROTOCOL_FEATURES rings are enabled from the start
        // (vhost-user "Ring states").
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.ring.enabled = true;
        }
        self.ring
            .queue
            .set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        self.require_owner("SET_MEM_TABLE")?;
        if postcopy_listening == Some(true) {
            return self.refuse("postcopy");
        }
        let result = self.memory.replace(regions, files);
        self.memory_result(result)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        self.require_queue("SET_VRING_NUM", index.into())?;
        let valid = num.is_power_of_two() && num <= u32::from(MAX_QUEUE_SIZE);
        self.check(valid, || Refusal::QueueSize(num))?;
        // Checked above to fit.
        self.ring.queue.set_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        self.require_queue("SET_VRING_ADDR", index.into())?;
        let mut translate = |vmm_addr: u64| {
            let address = self.memory.guest_address(vmm_addr);
            address
                .ok_or_else(|| self.fail(Refusal::UnmappedRingAddress(vmm_addr)))
                .map(|a| a.0)
        };
        let (descriptor, available, used) = (
            translate(descriptor)?,
            translate(available)?,
            translate(used)?,
        );
        let split = |address: u64| (Some(address as u32), Some((address >> 32) as u32));
        let queue = &mut self.ring.queue;
        let (low, high) = split(descriptor);
        queue.set_desc_table_address(low, high);
        let (low, high) = split(available);
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(used);
        queue.set_used_ring_address(low, high);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        self.require_queue("SET_VRING_BASE", index.into())?;
        let base = u16::try_from(base).map_err(|_| self.fail(Refusal::VringBase(base)))?;
        // The device completes requests in order, so the used index a
        // restarted ring resumes from is the avail index it stopped at.
        self.ring.queue.set_next_avail(base);
        self.ring.queue.set_next_used(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        self.require_queue("GET_VRING_BASE", index.into())?;
        let next_avail = self.stop_ring();
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.require_queue("SET_VRING_KICK", index.into())?;
        let file = fd.ok_or_else(|| self.fail(Refusal::NoKickFd))?;
        let kick = self.eventfd("kick", file)?;
        self.ring.kick = Some(kick);
        // The spec starts the ring on the first kick; QEMU and
        // cloud-hypervisor send this last, once addresses are set.
        self.ring.queue.set_ready(true);
        // Requests may already be waiting from before a reconnect.
        self.serve();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.require_queue("SET_VRING_CALL", index.into())?;
        self.ring.call = match fd {
            Some(file) => Some(self.eventfd("call", file)?),
            None => None,
        };
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.require_queue("SET_VRING_ERR", index.into())?;
        // Checked as the others are, then closed: virtio-rng reports nothing
        // through it, and keeping it would cost a descriptor per guest in
        // both processes.
        if let Some(file) = fd {
            drop(self.eventfd("error", file)?);
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        // QEMU sends this before SET_OWNER.
        let offered = protocol_features().bits();
        self.check(features & !offered == 0, || {
            Refusal::UnofferedProtocolFeatures(features & !offered)
        })?;
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(NUM_QUEUES)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        self.require_queue("SET_VRING_ENABLE", index.into())?;
        let negotiated =
            self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if !negotiated {
            return self.refuse("SET_VRING_ENABLE without PROTOCOL_FEATURES");
        }
        self.ring.enabled = enable;
        if enable {
            self.serve();
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        _offset: u32,
        _size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        self.refuse("GET_CONFIG (virtio-rng has no configuration space)")
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        self.refuse("SET_CONFIG (virtio-rng has no configuration space)")
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // Not offered (BACKEND_REQ); the vhost crate refuses it first.
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        self.refuse("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        self.refuse("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        self.refuse("GET_INFLIGHT_FD")
    }

    fn set_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
        _file: File,
    ) -> VhostUserResult<()> {
        self.refuse("SET_INFLIGHT_FD")
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(self.memory.limits().max_regions as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<vhost::VhostUserMemoryRegionBase>> {
        self.require_owner("ADD_MEM_REG")?;
        if postcopy_listening == Some(true) {
            return self.refuse("postcopy");
        }
        let result = self.memory.add(region, fd);
        self.memory_result(result)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        self.require_owner("REM_MEM_REG")?;
        let result = self.memory.remove(region);
        self.memory_result(result)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: vhost::vhost_user::message::VhostTransferStateDirection,
        _phase: vhost::vhost_user::message::VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        self.refuse("SET_DEVICE_STATE_FD")
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        self.refuse("CHECK_DEVICE_STATE")
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        self.refuse("GET_SHMEM_CONFIG")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        self.refuse("SET_LOG_BASE (dirty logging)")
    }
}
