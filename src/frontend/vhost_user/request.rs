// SPDX-License-Identifier: Apache-2.0
//! Serving virtio-rng requests from a split virtqueue.
//!
//! A virtio-rng request is a descriptor chain of device-writable buffers; the
//! device fills them and reports how many bytes it wrote. Everything in a
//! chain comes from the guest and is checked before a byte is written: a
//! defective chain is completed with 0 bytes and reported, and the queue
//! keeps being served.
//!
//! A pass over the queue reads the avail index once, takes the requests it
//! announces in batches (up to [`BATCH_BYTES`] together), asks the supply
//! once for a whole batch where that answers each request exactly as asking
//! for it alone would ([`Supply::supply_batch`]), and publishes the used
//! index once a batch, after the batch's used elements are written: once a
//! pass for the Linux driver's 64-byte requests (a queue of them is one
//! batch), every 16 KiB for larger ones, so a driver reposting buffers
//! meanwhile gets them back before the whole pass is done. Whether the
//! driver is notified is decided once per pass.

use std::num::Wrapping;
use std::ops::Range;
use std::sync::atomic::{Ordering, fence};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use std::time::Duration;

/// Most bytes one request is given, however large its buffers are: keeps one
/// guest's request from holding the queue (and the pool) for long.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Most bytes the requests of one batch want together, unless a single
/// request wants more (up to [`MAX_REQUEST_BYTES`]): 256 of the Linux
/// driver's 64-byte requests, small enough to stay in the CPU's caches.
pub const BATCH_BYTES: usize = 16 * 1024;

/// Descriptors read ahead for one batch beyond its first request: bounds
/// what a guest's chains (up to 65535 descriptors each, indirect) make the
/// device hold at once.
const BATCH_DESCRIPTORS: usize = 1024;

/// Size of a used-ring element: the head index and the length, both u32.
const USED_ELEM_BYTES: usize = 8;

/// What a request's bytes come from: the guest's limits and its stream.
pub trait Supply {
    /// Fills the start of `buf` for one request, or says why not now.
    fn supply(&mut self, buf: &mut [u8]) -> Supplied;

    /// Fills the start of `buf` for `requests` requests at once (their
    /// lengths together, at most [`MAX_REQUEST_BYTES`]), when that answers
    /// each of them exactly as asking for it alone would: nothing (a rate
    /// limit, a fair share, a budget about to run out) decides request by
    /// request. `None` when the requests must be asked for one by one.
    ///
    /// The bytes are handed to the requests in order; a short fill ends
    /// in the middle of one request, which gets what there is (as a short
    /// fill of its own would), and the next is asked for on its own.
    fn supply_batch(&mut self, buf: &mut [u8], requests: usize) -> Option<Supplied> {
        let _ = (buf, requests);
        None
    }
}

pub use crate::guest::Supplied;

/// What is wrong with a request a guest posted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestDefect {
    /// A descriptor of the chain is not device-writable.
    #[error(
        "descriptor {position} of the chain is device-readable; virtio-rng buffers must be device-writable"
    )]
    ReadOnlyDescriptor {
        /// Its place in the chain, from 0.
        position: usize,
    },
    /// A buffer is not wholly inside the guest's memory.
    #[error("buffer at guest address {addr:#x} ({len} bytes) is outside guest memory")]
    OutsideGuestMemory {
        /// The buffer's guest physical address.
        addr: u64,
        /// The buffer's length, in bytes.
        len: u32,
    },
    /// Writing into a buffer failed although it was checked to be inside
    /// guest memory.
    #[error("writing {len} bytes at guest address {addr:#x} failed")]
    WriteFailed {
        /// The buffer's guest physical address.
        addr: u64,
        /// Bytes that were to be written.
        len: usize,
    },
}

/// The queue itself is unusable (e.g. the guest published an impossible
/// avail index, or the used ring is outside guest memory).
#[derive(Debug, thiserror::Error)]
#[error("virtqueue error: {0}")]
pub struct QueueError(#[from] virtio_queue::Error);

/// What one pass over the queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Requests completed, defective ones included.
    pub completed: u64,
    /// Random bytes written into guest buffers.
    pub bytes: u64,
    /// Requests completed with 0 bytes because of a defect.
    pub defects: u64,
    /// The pool had nothing to give: the first unanswered request was left
    /// on the queue and must be retried when the pool wakes the device.
    pub starved: bool,
    /// The guest is over its rate limit: the first unanswered request was
    /// left on the queue and must be retried after this long.
    pub throttled: Option<Duration>,
    /// The driver must be notified (used buffers and the driver asked for it).
    pub notify: bool,
}

/// Most rounds (one avail-index reading, at most a queue's worth of
/// requests each) in one pass: with EVENT_IDX a pass goes on while the
/// driver keeps adding requests, and must end however fast it adds them.
pub const MAX_ROUNDS: usize = 4;

/// Serves requests from one queue; owns the buffers a pass works in so the
/// data path does not allocate per request.
#[derive(Default)]
pub struct RequestProcessor {
    /// Where a batch's bytes are produced before they are copied into the
    /// guest's buffers; wiped at the end of every pass. Grown to the
    /// largest batch seen: most guests only ever ask for 64 bytes a
    /// request, and hundreds of idle 64 KiB buffers add up.
    scratch: Vec<u8>,
    /// How much of `scratch` this pass wrote.
    dirty: usize,
    /// The descriptors of the batch's requests, one after the other.
    descriptors: Vec<Descriptor>,
    /// The batch's requests, in queue order.
    batch: Vec<Pending>,
    /// Used-ring elements of this batch, written out before the used index
    /// is published.
    used: Vec<u8>,
    /// The used ring as of this round.
    ring: UsedRing,
}

/// Where used elements go.
#[derive(Debug, Default, Clone, Copy)]
struct UsedRing {
    addr: GuestAddress,
    size: u16,
    /// The used index the next element gets.
    next: u16,
}

/// A request taken from the avail ring and not yet completed.
#[derive(Debug, Clone)]
struct Pending {
    head: u16,
    /// Its descriptors in [`RequestProcessor::descriptors`].
    descriptors: Range<usize>,
    /// Bytes it is to be given (0 for an empty request), or its defect.
    wanted: Result<usize, RequestDefect>,
}

impl Pending {
    fn wants(&self) -> usize {
        *self.wanted.as_ref().unwrap_or(&0)
    }
}

/// How far a batch got.
enum BatchEnd {
    /// Every request of the batch was completed.
    Done,
    /// This many requests, from the first one not completed, stay on the
    /// queue (the pool is dry or the guest over its limit).
    Stopped(usize),
}

impl RequestProcessor {
    /// Answers every request available on `queue` (or until the pool runs
    /// dry), calling `report` for each defective request with its head index.
    ///
    /// With EVENT_IDX the queue is drained until the driver has stopped
    /// adding requests, so no kick is missed between the last pop and
    /// re-enabling notifications.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        supply: &mut dyn Supply,
        report: &mut dyn FnMut(u16, RequestDefect),
    ) -> Result<QueueOutcome, QueueError> {
        let mut outcome = QueueOutcome::default();
        let used_before = Wrapping(queue.next_used());
        let result = self.drain_until_quiet(queue, mem, supply, report, &mut outcome);
        // Bytes already handed out do not stay behind in the daemon.
        self.scratch[..self.dirty].fill(0);
        self.dirty = 0;
        result?;
        if outcome.completed > 0 {
            outcome.notify = needs_notification(queue, mem, used_before)?;
        }
        Ok(outcome)
    }

    fn drain_until_quiet<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        supply: &mut dyn Supply,
        report: &mut dyn FnMut(u16, RequestDefect),
        outcome: &mut QueueOutcome,
    ) -> Result<(), QueueError> {
        let event_idx = queue.event_idx_enabled();
        for _ in 0..MAX_ROUNDS {
            if event_idx {
                queue.disable_notification(mem)?;
            }
            self.drain(queue, mem, supply, report, outcome)?;
            let waiting = outcome.starved || outcome.throttled.is_some();
            if waiting || !event_idx || !queue.enable_notification(mem)? {
                return Ok(());
            }
        }
        // Still more: a driver (or a VMM writing the ring) that keeps
        // posting, empty or defective requests included, which the pass
        // budget does not see. Yield to the loop's other guests and come
        // back on its next turn, as a budget cut does.
        outcome.throttled.get_or_insert(Duration::ZERO);
        Ok(())
    }

    /// One round: the requests the avail index announces now, answered in
    /// order, and their used elements published with one used index.
    fn drain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        supply: &mut dyn Supply,
        report: &mut dyn FnMut(u16, RequestDefect),
        outcome: &mut QueueOutcome,
    ) -> Result<(), QueueError> {
        let size = queue.size();
        self.ring = UsedRing {
            addr: GuestAddress(queue.used_ring()),
            size,
            next: queue.next_used(),
        };
        self.used.clear();
        let served = self.serve_available(queue, mem, supply, report, outcome, size);
        // What was completed is published even when the queue then turned
        // out unusable: those buffers were written.
        let published = self.publish(mem);
        queue.set_next_used(self.ring.next);
        let left = served?;
        published?;
        // Requests taken but not answered go back: the next pass starts
        // with them (the device completes in order, so next_avail and
        // next_used meet again once they are answered).
        queue.set_next_avail(queue.next_avail().wrapping_sub(left));
        Ok(())
    }

    /// Answers requests until the avail ring (as of one reading of its
    /// index) is empty or the supply stops; returns how many requests were
    /// taken from the ring but left unanswered.
    fn serve_available<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        supply: &mut dyn Supply,
        report: &mut dyn FnMut(u16, RequestDefect),
        outcome: &mut QueueOutcome,
        size: u16,
    ) -> Result<u16, QueueError> {
        // The one reading of the avail index for this round; a corrupt index
        // surfaces as an error instead of a silently empty queue.
        let mut chains = queue.iter(mem)?;
        let mut carried: Option<Pending> = None;
        loop {
            self.batch.clear();
            let mut total = 0;
            match carried.take() {
                Some(mut first) => {
                    // The request that did not fit the last batch opens this
                    // one, its descriptors moved to the front.
                    self.descriptors.drain(..first.descriptors.start);
                    first.descriptors = 0..self.descriptors.len();
                    total = first.wants();
                    self.batch.push(first);
                }
                None => self.descriptors.clear(),
            }
            while self.batch.is_empty() || self.descriptors.len() < BATCH_DESCRIPTORS {
                let Some(chain) = chains.next() else {
                    break;
                };
                let head = chain.head_index();
                let start = self.descriptors.len();
                self.descriptors.extend(chain);
                let pending = Pending {
                    head,
                    descriptors: start..self.descriptors.len(),
                    wanted: check_chain(mem, &self.descriptors[start..]),
                };
                if !self.batch.is_empty() && total + pending.wants() > BATCH_BYTES {
                    carried = Some(pending);
                    break;
                }
                total += pending.wants();
                self.batch.push(pending);
            }
            if self.batch.is_empty() {
                return Ok(0);
            }
            match self.serve_batch(mem, supply, report, outcome, total, size)? {
                BatchEnd::Done => {
                    // The driver can reuse these buffers while the next
                    // batch is served.
                    self.publish(mem)?;
                }
                BatchEnd::Stopped(left) => {
                    // At most a queue's worth of requests is ever taken.
                    return Ok((left + usize::from(carried.is_some())) as u16);
                }
            }
        }
    }

    /// Answers the requests in `self.batch`, wanting `total` bytes together.
    fn serve_batch<M: GuestMemory>(
        &mut self,
        mem: &M,
        supply: &mut dyn Supply,
        report: &mut dyn FnMut(u16, RequestDefect),
        outcome: &mut QueueOutcome,
        total: usize,
        size: u16,
    ) -> Result<BatchEnd, QueueError> {
        if self.scratch.len() < total {
            self.scratch.resize(total, 0);
        }
        self.dirty = self.dirty.max(total);
        let asking = self.batch.iter().filter(|p| p.wants() > 0).count();
        // Bytes at the start of `scratch` for the batch's requests in
        // order, from one call of the supply; or why none.
        let (mut ready, mut refusal) = (0, None);
        if asking > 1 {
            match supply.supply_batch(&mut self.scratch[..total], asking) {
                Some(Supplied::Bytes(n)) if n > 0 => ready = n.min(total),
                Some(Supplied::Bytes(_)) => refusal = Some(Supplied::Starved),
                Some(waiting) => refusal = Some(waiting),
                None => {}
            }
        }

        let mut offset = 0;
        for index in 0..self.batch.len() {
            let pending = &self.batch[index];
            let head = pending.head;
            let written = match &pending.wanted {
                Err(defect) => Err(defect.clone()),
                Ok(0) => Ok(0),
                &Ok(wanted) => {
                    let range = offset..offset + wanted;
                    offset += wanted;
                    let available = if range.start < ready {
                        // From the batch's bytes; the request where they
                        // run out gets what is left, as a short fill.
                        ready.min(range.end) - range.start
                    } else {
                        match refusal.take() {
                            Some(waiting) => return Ok(self.stop(index, waiting, outcome)),
                            None => match supply.supply(&mut self.scratch[range.clone()]) {
                                Supplied::Bytes(n) if n > 0 => n.min(wanted),
                                Supplied::Bytes(_) => {
                                    return Ok(self.stop(index, Supplied::Starved, outcome));
                                }
                                waiting => return Ok(self.stop(index, waiting, outcome)),
                            },
                        }
                    };
                    let bytes = &self.scratch[range.start..range.start + available];
                    let descriptors = &self.descriptors[pending.descriptors.clone()];
                    write_chain(mem, descriptors, bytes)
                }
            };
            let written = match written {
                Ok(written) => written,
                Err(defect) => {
                    report(head, defect);
                    outcome.defects += 1;
                    0
                }
            };
            if head >= size {
                return Err(QueueError(virtio_queue::Error::InvalidDescriptorIndex));
            }
            // `written` never exceeds MAX_REQUEST_BYTES, so it fits in u32.
            self.used.extend_from_slice(&u32::from(head).to_le_bytes());
            self.used.extend_from_slice(&(written as u32).to_le_bytes());
            outcome.completed += 1;
            outcome.bytes += written as u64;
        }
        Ok(BatchEnd::Done)
    }

    /// The batch's request `index` cannot be answered now: it and those
    /// after it stay on the queue.
    fn stop(&self, index: usize, waiting: Supplied, outcome: &mut QueueOutcome) -> BatchEnd {
        match waiting {
            Supplied::Throttled(wait) => outcome.throttled = Some(wait),
            _ => outcome.starved = true,
        }
        BatchEnd::Stopped(self.batch.len() - index)
    }
}

/// The bytes a chain is to be given, checked before anything is written:
/// every buffer device-writable and inside guest memory.
fn check_chain<M: GuestMemory>(
    mem: &M,
    descriptors: &[Descriptor],
) -> Result<usize, RequestDefect> {
    let mut wanted = 0usize;
    for (position, desc) in descriptors.iter().enumerate() {
        if !desc.is_write_only() {
            return Err(RequestDefect::ReadOnlyDescriptor { position });
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write) {
            return Err(RequestDefect::OutsideGuestMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        wanted = wanted.saturating_add(desc.len() as usize);
    }
    Ok(wanted.min(MAX_REQUEST_BYTES))
}

/// Copies `bytes` into the chain's buffers in order; returns how many were
/// written (all of them).
fn write_chain<M: GuestMemory>(
    mem: &M,
    descriptors: &[Descriptor],
    bytes: &[u8],
) -> Result<usize, RequestDefect> {
    let mut written = 0;
    for desc in descriptors {
        if written == bytes.len() {
            break;
        }
        let len = (desc.len() as usize).min(bytes.len() - written);
        write_guest(mem, &bytes[written..written + len], desc.addr())?;
        written += len;
    }
    Ok(written)
}

impl RequestProcessor {
    /// Writes the used elements gathered so far into the used ring, then
    /// publishes the new used index, once, with release ordering: the
    /// driver sees every element before the index that announces it.
    fn publish<M: GuestMemory>(&mut self, mem: &M) -> Result<(), QueueError> {
        let UsedRing { addr, size, next } = self.ring;
        let count = self.used.len() / USED_ELEM_BYTES;
        let result = write_used(mem, addr, size, next, &self.used);
        // At most a queue's worth (<= 32768) of elements: fits in u16.
        self.ring.next = next.wrapping_add(count as u16);
        self.used.clear();
        result
    }
}

/// Writes used elements (`used`, at most a queue's worth) into the used
/// ring at `used_ring` from index `first`, then stores the used index.
fn write_used<M: GuestMemory>(
    mem: &M,
    used_ring: GuestAddress,
    size: u16,
    first: u16,
    used: &[u8],
) -> Result<(), QueueError> {
    let count = used.len() / USED_ELEM_BYTES;
    if count == 0 || size == 0 {
        return Ok(());
    }
    let overflow = || QueueError(virtio_queue::Error::AddressOverflow);
    let memory = |e| QueueError(virtio_queue::Error::GuestMemory(e));
    let ring = used_ring.checked_add(4).ok_or_else(overflow)?;
    let start = usize::from(first % size);
    // The elements up to the end of the ring, then the rest from its start.
    let to_end = count.min(usize::from(size) - start);
    let (before_wrap, after_wrap) = used.split_at(to_end * USED_ELEM_BYTES);
    let at = ring
        .checked_add((start * USED_ELEM_BYTES) as u64)
        .ok_or_else(overflow)?;
    mem.write_slice(before_wrap, at).map_err(memory)?;
    if !after_wrap.is_empty() {
        mem.write_slice(after_wrap, ring).map_err(memory)?;
    }
    let index = used_ring.checked_add(2).ok_or_else(overflow)?;
    // At most a queue's worth (<= 32768) of elements: fits in u16.
    let new = first.wrapping_add(count as u16);
    mem.store(u16::to_le(new), index, Ordering::Release)
        .map_err(memory)
}

/// Whether the driver wants to hear about the requests completed since
/// the used index was `old`: always without EVENT_IDX, else when its
/// `used_event` lies in that stretch (the virtio spec's `vring_need_event`).
fn needs_notification<M: GuestMemory>(
    queue: &Queue,
    mem: &M,
    old: Wrapping<u16>,
) -> Result<bool, QueueError> {
    // The used index is published before the driver's used_event is read.
    fence(Ordering::SeqCst);
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    let new = Wrapping(queue.next_used());
    // used_event follows the avail ring's `size` entries.
    let at = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(QueueError(virtio_queue::Error::AddressOverflow))?;
    let used_event = mem
        .load::<u16>(at, Ordering::Relaxed)
        .map(|v| Wrapping(u16::from_le(v)))
        .map_err(|e| QueueError(virtio_queue::Error::GuestMemory(e)))?;
    Ok(new - used_event - Wrapping(1) < new - old)
}

fn write_guest<M: GuestMemory>(
    mem: &M,
    bytes: &[u8],
    addr: GuestAddress,
) -> Result<(), RequestDefect> {
    mem.write_slice(bytes, addr)
        .map_err(|_| RequestDefect::WriteFailed {
            addr: addr.0,
            len: bytes.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

    const BUFFERS: u64 = 0x10_0000;
    const MEM_SIZE: usize = 0x40_0000;
    const QUEUE_SIZE: u16 = 16;

    /// A stream that hands out a counter pattern, at most `limit` bytes a call.
    struct PatternStream {
        next: u8,
        limit: usize,
        calls: usize,
    }

    impl PatternStream {
        fn unlimited() -> Self {
            PatternStream {
                next: 1,
                limit: usize::MAX,
                calls: 0,
            }
        }
    }

    impl Supply for PatternStream {
        fn supply(&mut self, buf: &mut [u8]) -> Supplied {
            self.calls += 1;
            let n = buf.len().min(self.limit);
            for byte in &mut buf[..n] {
                *byte = self.next;
                self.next = self.next.wrapping_add(1).max(1);
            }
            if n == 0 {
                Supplied::Starved
            } else {
                Supplied::Bytes(n)
            }
        }
    }

    /// Over its limit until `allow` is set.
    struct Throttle {
        allow: bool,
        inner: PatternStream,
    }

    impl Supply for Throttle {
        fn supply(&mut self, buf: &mut [u8]) -> Supplied {
            if self.allow {
                self.inner.supply(buf)
            } else {
                Supplied::Throttled(Duration::from_millis(250))
            }
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn writable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    fn readable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    /// Links `descs` into one chain starting at table index `first`.
    fn chain(first: u16, descs: &[RawDescriptor]) -> Vec<RawDescriptor> {
        let last = descs.len() - 1;
        descs
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                let desc = SplitDescriptor::from(*raw);
                let (flags, next) = if i == last {
                    (desc.flags() & !(VRING_DESC_F_NEXT as u16), 0)
                } else {
                    (
                        desc.flags() | VRING_DESC_F_NEXT as u16,
                        first + i as u16 + 1,
                    )
                };
                RawDescriptor::from(SplitDescriptor::new(desc.addr().0, desc.len(), flags, next))
            })
            .collect()
    }

    struct Run {
        outcome: QueueOutcome,
        defects: Vec<(u16, RequestDefect)>,
        queue: Queue,
    }

    fn run(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        supply: &mut dyn Supply,
    ) -> Run {
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut defects = Vec::new();
        let outcome = RequestProcessor::default()
            .process_queue(&mut queue, mem, supply, &mut |head, d| {
                defects.push((head, d))
            })
            .unwrap();
        Run {
            outcome,
            defects,
            queue,
        }
    }

    fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let elem = vq.used().ring().ref_at(i).unwrap().load();
        (elem.id(), elem.len())
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn fills_single_descriptor_request() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        vq.add_desc_chains(&[writable(BUFFERS, 64)], 0).unwrap();

        let run = run(&mem, &vq, &mut PatternStream::unlimited());

        assert_eq!(run.outcome.completed, 1);
        assert_eq!(run.outcome.bytes, 64);
        assert!(run.defects.is_empty());
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 64));
        let expected: Vec<u8> = (1..=64).collect();
        assert_eq!(read(&mem, BUFFERS, 64), expected);
    }

    #[test]
    fn fills_every_descriptor_of_a_multi_descriptor_chain() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs = chain(
            0,
            &[
                writable(BUFFERS, 100),
                writable(BUFFERS + 0x1000, 28),
                writable(BUFFERS + 0x2000, 1),
            ],
        );
        vq.add_desc_chains(&descs, 0).unwrap();

        let run = run(&mem, &vq, &mut PatternStream::unlimited());

        assert_eq!(used(&vq, 0), (0, 129));
        assert_eq!(run.outcome.bytes, 129);
        // The pattern continues across buffers: nothing skipped, nothing repeated.
        assert_eq!(read(&mem, BUFFERS, 100), (1..=100).collect::<Vec<u8>>());
        assert_eq!(
            read(&mem, BUFFERS + 0x1000, 28),
            (101..=128).collect::<Vec<u8>>()
        );
        assert_eq!(read(&mem, BUFFERS + 0x2000, 1), vec![129]);
    }

    #[test]
    fn serves_several_requests_in_order() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..4).map(|i| writable(BUFFERS + i * 0x1000, 16)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();

        let run = run(&mem, &vq, &mut PatternStream::unlimited());

        assert_eq!(run.outcome.completed, 4);
        for i in 0..4 {
            assert_eq!(used(&vq, i), (i as u32, 16));
        }
        assert_ne!(read(&mem, BUFFERS, 16), read(&mem, BUFFERS + 0x1000, 16));
    }

    #[test]
    fn read_only_descriptor_completes_with_zero_bytes_and_is_reported() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs = chain(0, &[writable(BUFFERS, 16), readable(BUFFERS + 0x1000, 16)]);
        vq.add_desc_chains(&descs, 0).unwrap();
        vq.add_desc_chains(&[writable(BUFFERS + 0x2000, 8)], 2)
            .unwrap();

        let run = run(&mem, &vq, &mut PatternStream::unlimited());

        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(
            run.defects,
            vec![(0, RequestDefect::ReadOnlyDescriptor { position: 1 })]
        );
        // Nothing was written into the defective chain's writable buffer.
        assert_eq!(read(&mem, BUFFERS, 16), vec![0; 16]);
        // The next request is still served.
        assert_eq!(used(&vq, 1), (2, 8));
        assert_eq!(run.outcome.completed, 2);
        assert_eq!(run.outcome.defects, 1);
    }

    #[test]
    fn zero_length_request_completes_without_drawing_entropy() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        vq.add_desc_chains(&[writable(BUFFERS, 0)], 0).unwrap();
        let mut stream = PatternStream::unlimited();

        let run = run(&mem, &vq, &mut stream);

        assert_eq!(used(&vq, 0), (0, 0));
        assert!(run.defects.is_empty());
        assert_eq!(stream.calls, 0);
    }

    #[test]
    fn buffer_outside_guest_memory_is_a_defect() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let beyond = MEM_SIZE as u64 - 8;
        vq.add_desc_chains(&[writable(beyond, 16)], 0).unwrap();
        vq.add_desc_chains(&[writable(u64::MAX - 4, 16)], 1)
            .unwrap();
        vq.add_desc_chains(&[writable(BUFFERS, 16)], 2).unwrap();

        let run = run(&mem, &vq, &mut PatternStream::unlimited());

        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(used(&vq, 1), (1, 0));
        assert_eq!(used(&vq, 2), (2, 16));
        assert_eq!(
            run.defects[0],
            (
                0,
                RequestDefect::OutsideGuestMemory {
                    addr: beyond,
                    len: 16
                }
            )
        );
        assert_eq!(run.outcome.defects, 2);
        // The straddling buffer's in-memory part was left untouched.
        assert_eq!(read(&mem, beyond, 8), vec![0; 8]);
    }

    #[test]
    fn request_is_capped_at_64_kib() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs = chain(
            0,
            &[
                writable(BUFFERS, 0x18000),
                writable(BUFFERS + 0x20000, 0x1000),
            ],
        );
        vq.add_desc_chains(&descs, 0).unwrap();

        let run = run(&mem, &vq, &mut PatternStream::unlimited());

        assert_eq!(used(&vq, 0), (0, MAX_REQUEST_BYTES as u32));
        assert_eq!(run.outcome.bytes, MAX_REQUEST_BYTES as u64);
        // Past the cap the guest's buffers stay as they were.
        assert_eq!(
            read(&mem, BUFFERS + MAX_REQUEST_BYTES as u64, 16),
            vec![0; 16]
        );
        assert_eq!(read(&mem, BUFFERS + 0x20000, 16), vec![0; 16]);
    }

    #[test]
    fn short_fill_reports_the_bytes_actually_written() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        vq.add_desc_chains(&[writable(BUFFERS, 64)], 0).unwrap();
        let mut stream = PatternStream {
            limit: 10,
            ..PatternStream::unlimited()
        };

        run(&mem, &vq, &mut stream);

        assert_eq!(used(&vq, 0), (0, 10));
        assert_eq!(read(&mem, BUFFERS + 10, 4), vec![0; 4]);
    }

    #[test]
    fn starved_pool_leaves_the_request_on_the_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        vq.add_desc_chains(&[writable(BUFFERS, 64), writable(BUFFERS + 0x1000, 64)], 0)
            .unwrap();
        let mut empty = PatternStream {
            limit: 0,
            ..PatternStream::unlimited()
        };

        let mut run = run(&mem, &vq, &mut empty);

        assert!(run.outcome.starved);
        assert_eq!(run.outcome.completed, 0);
        assert!(!run.outcome.notify);
        assert_eq!(vq.used().idx().load(), 0);

        // Once the pool has bytes again the same requests are answered.
        let outcome = RequestProcessor::default()
            .process_queue(
                &mut run.queue,
                &mem,
                &mut PatternStream::unlimited(),
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(outcome.completed, 2);
        assert_eq!(used(&vq, 0), (0, 64));
        assert_eq!(used(&vq, 1), (1, 64));
    }

    #[test]
    fn throttled_requests_stay_queued_and_complete_in_order_later() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..3).map(|i| writable(BUFFERS + i * 0x1000, 16)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut throttle = Throttle {
            allow: false,
            inner: PatternStream::unlimited(),
        };

        let mut run = run(&mem, &vq, &mut throttle);
        assert_eq!(run.outcome.throttled, Some(Duration::from_millis(250)));
        assert_eq!(run.outcome.completed, 0);
        assert_eq!(vq.used().idx().load(), 0);

        throttle.allow = true;
        let outcome = RequestProcessor::default()
            .process_queue(&mut run.queue, &mem, &mut throttle, &mut |_, _| {})
            .unwrap();
        assert_eq!(outcome.completed, 3);
        assert_eq!(outcome.throttled, None);
        for i in 0..3 {
            assert_eq!(used(&vq, i), (i as u32, 16));
        }
    }

    #[test]
    fn indirect_chain_is_filled() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let table = GuestAddress(BUFFERS + 0x10_0000);
        let entries = chain(0, &[writable(BUFFERS, 32), writable(BUFFERS + 0x1000, 32)]);
        for (i, entry) in entries.iter().enumerate() {
            mem.write_obj(*entry, table.unchecked_add(16 * i as u64))
                .unwrap();
        }
        let head = RawDescriptor::from(SplitDescriptor::new(
            table.0,
            16 * entries.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        vq.add_desc_chains(&[head], 0).unwrap();

        let run = run(&mem, &vq, &mut PatternStream::unlimited());

        assert!(run.defects.is_empty(), "{:?}", run.defects);
        assert_eq!(used(&vq, 0), (0, 64));
        assert_eq!(
            read(&mem, BUFFERS + 0x1000, 32),
            (33..=64).collect::<Vec<u8>>()
        );
    }

    #[test]
    fn corrupt_avail_index_is_a_queue_error_not_a_panic() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        // An avail index more than a queue's worth ahead is impossible.
        vq.avail().idx().store(QUEUE_SIZE + 5);
        let mut queue: Queue = vq.create_queue().unwrap();
        let result = RequestProcessor::default().process_queue(
            &mut queue,
            &mem,
            &mut PatternStream::unlimited(),
            &mut |_, _| {},
        );
        assert!(result.is_err());
    }

    #[test]
    fn event_idx_notifies_only_when_the_driver_asked() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..3).map(|i| writable(BUFFERS + i * 0x1000, 8)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_event_idx(true);
        // Per the split-ring layout, avail_event follows the used ring.
        let used_event = used_event_addr(&vq);
        let avail_event = vq.used_addr().unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
        let mut processor = RequestProcessor::default();
        let mut stream = PatternStream::unlimited();

        // Driver wants a notification only after used index passes 10.
        mem.write_obj(10u16, used_event).unwrap();
        let outcome = processor
            .process_queue(&mut queue, &mem, &mut stream, &mut |_, _| {})
            .unwrap();
        assert_eq!(outcome.completed, 3);
        assert!(!outcome.notify);
        // With EVENT_IDX the device publishes where it wants the next kick.
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);

        // Driver asks to be told as soon as used index moves past 3.
        mem.write_obj(3u16, used_event).unwrap();
        vq.add_desc_chains(&[writable(BUFFERS + 0x8000, 8)], 3)
            .unwrap();
        let outcome = processor
            .process_queue(&mut queue, &mem, &mut stream, &mut |_, _| {})
            .unwrap();
        assert_eq!(outcome.completed, 1);
        assert!(outcome.notify);
    }

    /// A driver (or a VMM writing the ring) that posts one more request
    /// every time one is answered.
    struct EndlessDriver {
        mem: GuestMemoryMmap,
        avail: GuestAddress,
        posted: u16,
        inner: PatternStream,
    }

    impl Supply for EndlessDriver {
        fn supply(&mut self, buf: &mut [u8]) -> Supplied {
            // Descriptor 0 again, at the next avail slot, then the index.
            let slot = 4 + 2 * u64::from(self.posted % QUEUE_SIZE);
            self.mem
                .write_obj(0u16, self.avail.unchecked_add(slot))
                .unwrap();
            self.posted = self.posted.wrapping_add(1);
            self.mem
                .write_obj(self.posted, self.avail.unchecked_add(2))
                .unwrap();
            self.inner.supply(buf)
        }
    }

    #[test]
    fn a_pass_ends_however_fast_the_driver_posts() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        vq.add_desc_chains(&[writable(BUFFERS, 8)], 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_event_idx(true);
        let mut driver = EndlessDriver {
            mem: mem.clone(),
            avail: vq.avail_addr(),
            posted: 1,
            inner: PatternStream::unlimited(),
        };
        let outcome = RequestProcessor::default()
            .process_queue(&mut queue, &mem, &mut driver, &mut |_, _| {})
            .unwrap();
        // One request a round, MAX_ROUNDS rounds, then a yield with no wait.
        assert_eq!(outcome.completed, MAX_ROUNDS as u64);
        assert_eq!(outcome.throttled, Some(Duration::ZERO));
        assert_eq!(queue.next_used(), MAX_ROUNDS as u16);
    }

    #[test]
    fn without_event_idx_every_pass_that_completes_notifies() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        vq.add_desc_chains(&[writable(BUFFERS, 8)], 0).unwrap();
        let run = run(&mem, &vq, &mut PatternStream::unlimited());
        assert!(run.outcome.notify);

        let empty = run_empty(&memory());
        assert!(!empty.notify);
    }

    fn run_empty(mem: &GuestMemoryMmap) -> QueueOutcome {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        RequestProcessor::default()
            .process_queue(
                &mut queue,
                mem,
                &mut PatternStream::unlimited(),
                &mut |_, _| {},
            )
            .unwrap()
    }

    /// Unlimited like the DRBG: answers batches with one call, and records
    /// every call.
    struct Batching {
        inner: PatternStream,
        /// Lengths asked for by `supply_batch`.
        batches: Vec<usize>,
        /// At most this many bytes per batch.
        batch_limit: usize,
        /// What `supply_batch` answers instead of bytes, if set.
        refuse: Option<Supplied>,
    }

    impl Batching {
        fn new() -> Self {
            Batching {
                inner: PatternStream::unlimited(),
                batches: Vec::new(),
                batch_limit: usize::MAX,
                refuse: None,
            }
        }
    }

    impl Supply for Batching {
        fn supply(&mut self, buf: &mut [u8]) -> Supplied {
            self.inner.supply(buf)
        }

        fn supply_batch(&mut self, buf: &mut [u8], requests: usize) -> Option<Supplied> {
            assert!(requests > 1, "a batch is several requests");
            self.batches.push(buf.len());
            if let Some(refusal) = self.refuse {
                return Some(refusal);
            }
            let n = buf.len().min(self.batch_limit);
            Some(self.inner.supply(&mut buf[..n]))
        }
    }

    #[test]
    fn a_batch_of_requests_is_supplied_by_one_call_in_order() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..5).map(|i| writable(BUFFERS + i * 0x1000, 20)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut supply = Batching::new();

        let run = run(&mem, &vq, &mut supply);

        assert_eq!(supply.batches, vec![100]);
        assert_eq!(supply.inner.calls, 1);
        assert_eq!(run.outcome.completed, 5);
        assert_eq!(run.outcome.bytes, 100);
        // The batch's bytes go to the requests in queue order.
        for i in 0..5u8 {
            assert_eq!(used(&vq, i.into()), (u32::from(i), 20));
            let expected: Vec<u8> = (1 + 20 * i..=20 * (i + 1)).collect();
            assert_eq!(read(&mem, BUFFERS + u64::from(i) * 0x1000, 20), expected);
        }
    }

    #[test]
    fn a_short_batch_ends_in_a_request_and_the_next_is_asked_alone() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..3).map(|i| writable(BUFFERS + i * 0x1000, 64)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut supply = Batching {
            // As a DRBG at its byte bound cuts a fill.
            batch_limit: 100,
            ..Batching::new()
        };

        let run = run(&mem, &vq, &mut supply);

        assert_eq!(supply.batches, vec![192]);
        // The first request whole, the second the 36 bytes left (a short
        // fill, as a request of its own would get), the third on its own.
        assert_eq!(used(&vq, 0), (0, 64));
        assert_eq!(used(&vq, 1), (1, 36));
        assert_eq!(used(&vq, 2), (2, 64));
        assert_eq!(supply.inner.calls, 2);
        assert_eq!(run.outcome.bytes, 164);
        assert_eq!(read(&mem, BUFFERS + 0x1000 + 36, 28), vec![0; 28]);
    }

    #[test]
    fn a_refused_batch_leaves_every_request_queued_in_order() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        // A defective request first: it is answered (with 0 bytes) before
        // the first one that needs entropy meets the dry pool.
        let mut descs = vec![readable(BUFFERS, 16)];
        descs.extend((1..4).map(|i| writable(BUFFERS + i * 0x1000, 64)));
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut supply = Batching {
            refuse: Some(Supplied::Starved),
            ..Batching::new()
        };

        let mut run = run(&mem, &vq, &mut supply);

        assert!(run.outcome.starved);
        assert_eq!(run.outcome.completed, 1);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(run.queue.next_avail(), 1, "the refused requests went back");
        assert_eq!(run.queue.next_used(), 1);

        supply.refuse = None;
        let outcome = RequestProcessor::default()
            .process_queue(&mut run.queue, &mem, &mut supply, &mut |_, _| {})
            .unwrap();
        assert_eq!(outcome.completed, 3);
        for i in 1..4 {
            assert_eq!(used(&vq, i), (i as u32, 64));
        }
    }

    #[test]
    fn requests_after_a_starved_one_stay_queued_without_batches() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..5).map(|i| writable(BUFFERS + i * 0x1000, 16)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        // Two requests' worth, then dry.
        struct TwoThenDry(PatternStream);
        impl Supply for TwoThenDry {
            fn supply(&mut self, buf: &mut [u8]) -> Supplied {
                if self.0.calls == 2 {
                    return Supplied::Starved;
                }
                self.0.supply(buf)
            }
        }
        let mut supply = TwoThenDry(PatternStream::unlimited());

        let mut run = run(&mem, &vq, &mut supply);

        assert!(run.outcome.starved);
        assert_eq!(run.outcome.completed, 2);
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(run.queue.next_avail(), 2);

        let outcome = RequestProcessor::default()
            .process_queue(
                &mut run.queue,
                &mem,
                &mut PatternStream::unlimited(),
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(outcome.completed, 3);
        for i in 2..5 {
            assert_eq!(used(&vq, i), (i as u32, 16));
        }
        assert_eq!(vq.used().idx().load(), 5);
    }

    /// Reads the used index at every call: what the driver could see
    /// while the pass was still running.
    struct Watching<'a> {
        mem: &'a GuestMemoryMmap,
        used_idx: GuestAddress,
        seen: Vec<u16>,
        inner: PatternStream,
    }

    impl Supply for Watching<'_> {
        fn supply(&mut self, buf: &mut [u8]) -> Supplied {
            self.seen.push(self.mem.read_obj(self.used_idx).unwrap());
            self.inner.supply(buf)
        }
    }

    #[test]
    fn the_used_index_is_published_once_a_pass_after_every_element() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..6).map(|i| writable(BUFFERS + i * 0x1000, 32)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut supply = Watching {
            mem: &mem,
            used_idx: vq.used_addr().unchecked_add(2),
            seen: Vec::new(),
            inner: PatternStream::unlimited(),
        };

        let run = run(&mem, &vq, &mut supply);

        // Asked six times (no batches), and the driver saw no completion
        // until all six were in the used ring.
        assert_eq!(supply.seen, vec![0; 6]);
        assert_eq!(run.outcome.completed, 6);
        assert_eq!(vq.used().idx().load(), 6);
        for i in 0..6 {
            assert_eq!(used(&vq, i), (i as u32, 32));
        }
        assert!(run.outcome.notify, "one notification for the pass");
    }

    /// Where the next two tests put the used ring: the mock's overlaps the
    /// avail ring's `used_event`, which these tests need to set first.
    const USED_RING: u64 = 0x8000;

    /// The driver's `used_event`: per the split-ring layout, it follows
    /// the avail ring.
    fn used_event_addr(vq: &MockSplitQueue<GuestMemoryMmap>) -> GuestAddress {
        vq.avail_addr().unchecked_add(4 + 2 * u64::from(QUEUE_SIZE))
    }

    fn queue_with_separate_used_ring(vq: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_event_idx(true);
        queue
    }

    fn used_idx_at(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    fn used_at(mem: &GuestMemoryMmap, slot: u64) -> (u32, u32) {
        let at = USED_RING + 4 + 8 * slot;
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    #[test]
    fn used_elements_wrap_around_the_ring_and_the_index_around_u16() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut queue = queue_with_separate_used_ring(&vq);
        queue.set_event_idx(true);
        // The driver has posted 65534 requests before these: the ring
        // positions are 14, 15, 0 and 1, the indexes 65534 to 65537.
        let start = u16::MAX - 1;
        queue.set_next_avail(start);
        queue.set_next_used(start);
        for i in 0..4u16 {
            vq.desc_table()
                .store(i, writable(BUFFERS + u64::from(i) * 0x1000, 8))
                .unwrap();
            let slot = u64::from(start.wrapping_add(i) % QUEUE_SIZE);
            mem.write_obj(i, vq.avail_addr().unchecked_add(4 + 2 * slot))
                .unwrap();
        }
        vq.avail().idx().store(start.wrapping_add(4));
        // The driver wants to hear once the request at index 65535 is used.
        let used_event = used_event_addr(&vq);
        mem.write_obj(u16::MAX, used_event).unwrap();

        let outcome = RequestProcessor::default()
            .process_queue(
                &mut queue,
                &mem,
                &mut PatternStream::unlimited(),
                &mut |_, _| {},
            )
            .unwrap();

        assert_eq!(outcome.completed, 4);
        assert_eq!(used_idx_at(&mem), 2);
        assert_eq!(queue.next_used(), 2);
        for (i, slot) in [14, 15, 0, 1].into_iter().enumerate() {
            assert_eq!(used_at(&mem, slot), (i as u32, 8));
        }
        assert!(outcome.notify, "used_event 65535 lies in 65534..2");
    }

    #[test]
    fn event_idx_hears_of_a_pass_once_and_not_of_an_event_already_passed() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut queue = queue_with_separate_used_ring(&vq);
        let used_event = used_event_addr(&vq);
        let descs: Vec<_> = (0..4).map(|i| writable(BUFFERS + i * 0x1000, 8)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut processor = RequestProcessor::default();
        let mut stream = PatternStream::unlimited();

        // The driver asked to hear when index 1 is used: the pass that
        // completes 0 to 3 covers it, with one notification.
        mem.write_obj(1u16, used_event).unwrap();
        let outcome = processor
            .process_queue(&mut queue, &mem, &mut stream, &mut |_, _| {})
            .unwrap();
        assert_eq!(outcome.completed, 4);
        assert!(outcome.notify);

        // The driver has not moved used_event on: the next pass is past it.
        vq.add_desc_chains(&[writable(BUFFERS + 0x8000, 8)], 4)
            .unwrap();
        let outcome = processor
            .process_queue(&mut queue, &mem, &mut stream, &mut |_, _| {})
            .unwrap();
        assert_eq!(outcome.completed, 1);
        assert!(!outcome.notify);
        assert_eq!(used_idx_at(&mem), 5);
        assert_eq!(used_at(&mem, 4), (4, 8));
    }

    #[test]
    fn batches_stop_at_16_kib_and_a_large_request_goes_alone() {
        let mem = memory();
        let size = 512u16;
        let vq = MockSplitQueue::new(&mem, size);
        // 300 requests of 64 bytes, then one of 64 KiB, then one of 64.
        let mut descs: Vec<_> = (0..300).map(|i| writable(BUFFERS + i * 64, 64)).collect();
        descs.push(writable(BUFFERS + 0x10_0000, 0x1_0000));
        descs.push(writable(BUFFERS + 0x20_0000, 64));
        vq.add_desc_chains(&descs, 0).unwrap();
        // The mock's used ring would overlap this large a queue's avail ring.
        let mut queue = queue_with_separate_used_ring(&vq);
        let mut supply = Batching::new();

        let outcome = RequestProcessor::default()
            .process_queue(&mut queue, &mem, &mut supply, &mut |_, _| {})
            .unwrap();

        assert_eq!(outcome.completed, 302);
        assert_eq!(
            supply.batches,
            vec![BATCH_BYTES, 44 * 64],
            "256 requests, then the 44 left before the large one"
        );
        // The large request and the one after it were each asked alone.
        assert_eq!(supply.inner.calls, 4);
        assert_eq!(used_idx_at(&mem), 302);
        assert_eq!(used_at(&mem, 299), (299, 64));
        assert_eq!(
            used_at(&mem, 300),
            (300, MAX_REQUEST_BYTES as u32),
            "the large request was given all it asked for"
        );
        assert_eq!(used_at(&mem, 301), (301, 64));
    }

    #[test]
    fn the_staging_buffer_is_wiped_after_a_pass() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs: Vec<_> = (0..3).map(|i| writable(BUFFERS + i * 0x1000, 64)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut processor = RequestProcessor::default();

        processor
            .process_queue(&mut queue, &mem, &mut Batching::new(), &mut |_, _| {})
            .unwrap();

        assert!(processor.scratch.len() >= 192);
        assert!(processor.scratch.iter().all(|&b| b == 0));
        assert_ne!(read(&mem, BUFFERS, 64), vec![0; 64]);
    }
}
