// SPDX-License-Identifier: Apache-2.0
//! The driver side of a split virtqueue: what the guest's virtio driver does.
//!
//! [`SplitRingDriver`] lays out a descriptor table, an available ring and a
//! used ring in guest memory, posts descriptor chains (direct or through an
//! indirect table), publishes them in the available ring and reads back what
//! the device put in the used ring. It implements both notification
//! suppression schemes a driver can negotiate: the `flags` words without
//! `VIRTIO_RING_F_EVENT_IDX`, and the `used_event` / `avail_event` indices
//! with it.
//!
//! Buffer space is cheap to hand out: every possible chain head owns a fixed
//! slab of guest memory, and a chain's buffers (and its indirect table) are
//! packed into the slab of its head. Posting and reaping therefore never
//! search or allocate, which keeps throughput benchmarks honest, and a chain's
//! buffers stay readable after it completed until its head is reused. Free
//! descriptors are recycled first-in first-out, so a head is reused as late as
//! possible.
//!
//! Layout inside the area given to the driver:
//!
//! ```text
//! | descriptor table | available ring | used ring | slab 0 | slab 1 | ... | slab N-1 |
//!   each ring starts on a page boundary; N = queue size
//! ```

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::error::{Error, Result};
use super::guest_memory::page_size;

/// Size of one split-ring descriptor.
pub const DESCRIPTOR_SIZE: u64 = 16;
/// Largest queue size a split ring may have (virtio 1.x, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Buffers in a slab start on this boundary (a cache line), so consecutive
/// buffers of a chain never share one.
pub const BUFFER_ALIGN: u64 = 64;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

// Ring field offsets (virtio 1.x, 2.7.6 and 2.7.8).
const RING_FLAGS: u64 = 0;
const RING_IDX: u64 = 2;
const RING_ENTRIES: u64 = 4;
const AVAIL_ENTRY_SIZE: u64 = 2;
const USED_ENTRY_SIZE: u64 = 8;

/// One buffer of a chain to post.
///
/// Most tests want [`Buffer::writable`] (a virtio-rng request is one
/// device-writable buffer) and let the driver place it in guest memory.
/// [`Buffer::raw`] puts an arbitrary descriptor in the chain instead, for
/// tests that feed the device addresses outside guest memory or odd flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    kind: BufferKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BufferKind {
    /// Placed by the driver in the head's slab.
    Placed { len: u32, writable: bool },
    /// Descriptor fields chosen by the caller.
    Raw { addr: u64, len: u32, flags: u16 },
}

impl Buffer {
    /// A buffer of `len` bytes the device may write (`VRING_DESC_F_WRITE`).
    pub const fn writable(len: u32) -> Self {
        Self::new(len, true)
    }

    /// A buffer of `len` bytes the device may only read.
    pub const fn readable(len: u32) -> Self {
        Self::new(len, false)
    }

    /// A buffer of `len` bytes, device-writable or not.
    pub const fn new(len: u32, writable: bool) -> Self {
        Self {
            kind: BufferKind::Placed { len, writable },
        }
    }

    /// A descriptor with a caller-chosen guest address, length and flags.
    ///
    /// `flags` is used as given (so `VRING_DESC_F_INDIRECT` can be smuggled
    /// into a chain), except that the driver sets `VRING_DESC_F_NEXT` and the
    /// `next` field itself to link the chain.
    pub const fn raw(addr: u64, len: u32, flags: u16) -> Self {
        Self {
            kind: BufferKind::Raw { addr, len, flags },
        }
    }

    /// Length of the buffer in bytes.
    pub const fn len(&self) -> u32 {
        match self.kind {
            BufferKind::Placed { len, .. } | BufferKind::Raw { len, .. } => len,
        }
    }

    /// True for a zero-length buffer.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the descriptor carries `VRING_DESC_F_WRITE`.
    pub const fn is_writable(&self) -> bool {
        match self.kind {
            BufferKind::Placed { writable, .. } => writable,
            BufferKind::Raw { flags, .. } => flags & WRITE != 0,
        }
    }

    /// Bytes of slab this buffer takes (raw buffers take none).
    fn slab_bytes(&self) -> u64 {
        match self.kind {
            BufferKind::Placed { len, .. } => align_up(u64::from(len), BUFFER_ALIGN),
            BufferKind::Raw { .. } => 0,
        }
    }
}

/// One element the device put in the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head of the completed chain (what `post` returned).
    pub head: u16,
    /// Bytes the device says it wrote into the chain.
    pub len: u32,
}

/// Where the rings and buffer slabs of a queue live in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of descriptors (a power of two).
    pub queue_size: u16,
    /// Guest address of the descriptor table.
    pub desc_table: GuestAddress,
    /// Guest address of the available ring.
    pub avail_ring: GuestAddress,
    /// Guest address of the used ring.
    pub used_ring: GuestAddress,
    /// Guest address of slab 0; slab `h` follows at `h * slab_size`.
    pub slabs: GuestAddress,
    /// Bytes of buffer space each chain head owns.
    pub slab_size: u64,
}

impl RingLayout {
    /// Lays out a queue of `queue_size` in `len` bytes of guest memory at `start`.
    pub fn new(start: GuestAddress, len: u64, queue_size: u16) -> Result<Self> {
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidConfig(format!(
                "queue size {queue_size} is not a power of two in 1..={MAX_QUEUE_SIZE}"
            )));
        }
        let page = page_size() as u64;
        let size = u64::from(queue_size);
        let desc_table = align_up(start.raw_value(), page);
        let avail_ring = align_up(desc_table + DESCRIPTOR_SIZE * size, page);
        // flags, idx, ring[size], used_event
        let used_ring = align_up(
            avail_ring + RING_ENTRIES + AVAIL_ENTRY_SIZE * size + 2,
            page,
        );
        // flags, idx, ring[size], avail_event
        let slabs = align_up(used_ring + RING_ENTRIES + USED_ENTRY_SIZE * size + 2, page);

        let end = start.raw_value().saturating_add(len);
        let space = end.saturating_sub(slabs);
        let mut slab_size = space / size;
        // Page-sized buffers land on page boundaries when slabs are page multiples.
        slab_size -= slab_size
            % if slab_size >= page {
                page
            } else {
                BUFFER_ALIGN
            };
        if slab_size == 0 {
            return Err(Error::InvalidConfig(format!(
                "{len} bytes of guest memory cannot hold a queue of {queue_size} and its buffers"
            )));
        }

        Ok(Self {
            queue_size,
            desc_table: GuestAddress(desc_table),
            avail_ring: GuestAddress(avail_ring),
            used_ring: GuestAddress(used_ring),
            slabs: GuestAddress(slabs),
            slab_size,
        })
    }

    /// Bytes of the descriptor table.
    pub fn desc_table_len(&self) -> u64 {
        DESCRIPTOR_SIZE * u64::from(self.queue_size)
    }

    /// Bytes of the available ring, `used_event` included.
    pub fn avail_ring_len(&self) -> u64 {
        RING_ENTRIES + AVAIL_ENTRY_SIZE * u64::from(self.queue_size) + 2
    }

    /// Bytes of the used ring, `avail_event` included.
    pub fn used_ring_len(&self) -> u64 {
        RING_ENTRIES + USED_ENTRY_SIZE * u64::from(self.queue_size) + 2
    }

    /// Guest address of `used_event` (last field of the available ring).
    pub fn used_event_addr(&self) -> GuestAddress {
        self.avail_ring
            .unchecked_add(RING_ENTRIES + AVAIL_ENTRY_SIZE * u64::from(self.queue_size))
    }

    /// Guest address of `avail_event` (last field of the used ring).
    pub fn avail_event_addr(&self) -> GuestAddress {
        self.used_ring
            .unchecked_add(RING_ENTRIES + USED_ENTRY_SIZE * u64::from(self.queue_size))
    }

    /// Guest address of the slab owned by `head`.
    pub fn slab(&self, head: u16) -> GuestAddress {
        self.slabs.unchecked_add(u64::from(head) * self.slab_size)
    }

    fn descriptor_addr(&self, index: u16) -> GuestAddress {
        self.desc_table
            .unchecked_add(DESCRIPTOR_SIZE * u64::from(index))
    }
}

/// A buffer as it went into a descriptor.
#[derive(Clone, Copy, Debug)]
struct Span {
    addr: GuestAddress,
    len: u32,
}

/// Driver bookkeeping for the chain whose head is the index of this entry.
#[derive(Debug, Default)]
struct Chain {
    /// Ring descriptors the chain occupies, head first.
    descriptors: Vec<u16>,
    /// The buffers, in chain order (through the indirect table if any).
    buffers: Vec<Span>,
    /// Posted and not yet returned by the device.
    in_flight: bool,
}

/// The driver side of one split virtqueue in guest memory.
#[derive(Debug)]
pub struct SplitRingDriver {
    memory: GuestMemoryMmap,
    layout: RingLayout,
    event_idx: bool,
    clear_buffers: bool,
    /// Free ring descriptors, reused oldest first.
    free: VecDeque<u16>,
    /// Per-head chain records, indexed by head.
    chains: Vec<Chain>,
    in_flight: usize,
    /// Available index we last published.
    avail_idx: Wrapping<u16>,
    /// Used index up to which we consumed the used ring.
    last_used: Wrapping<u16>,
    /// Available index at the last kick decision (the `old` of vring_need_event).
    avail_idx_at_last_kick: Wrapping<u16>,
    /// Descriptor indices of the chain being posted (kept to avoid allocating).
    scratch: Vec<u16>,
}

impl SplitRingDriver {
    /// Lays out a queue of `queue_size` descriptors in `len` bytes of `memory`
    /// starting at `start`, and zeroes its rings.
    pub fn new(
        memory: GuestMemoryMmap,
        start: GuestAddress,
        len: u64,
        queue_size: u16,
    ) -> Result<Self> {
        let layout = RingLayout::new(start, len, queue_size)?;
        let end = layout
            .slab(queue_size - 1)
            .unchecked_add(layout.slab_size - 1);
        let driver = Self {
            memory,
            layout,
            event_idx: false,
            clear_buffers: true,
            free: (0..queue_size).collect(),
            chains: (0..queue_size).map(|_| Chain::default()).collect(),
            in_flight: 0,
            avail_idx: Wrapping(0),
            last_used: Wrapping(0),
            avail_idx_at_last_kick: Wrapping(0),
            scratch: Vec::with_capacity(usize::from(queue_size)),
        };
        if driver.memory.read_obj::<u8>(end).is_err() {
            return Err(Error::UnmappedGuestAddress(end.raw_value()));
        }
        driver.zero(layout.desc_table, layout.desc_table_len())?;
        driver.zero(layout.avail_ring, layout.avail_ring_len())?;
        driver.zero(layout.used_ring, layout.used_ring_len())?;
        Ok(driver)
    }

    /// Where the rings live.
    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }

    /// The guest memory the ring lives in.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Number of descriptors.
    pub fn queue_size(&self) -> u16 {
        self.layout.queue_size
    }

    /// Largest number of bytes one chain's placed buffers may take.
    pub fn max_chain_bytes(&self) -> u64 {
        self.layout.slab_size
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` semantics are used.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Switches to `VIRTIO_RING_F_EVENT_IDX` semantics (must match what was negotiated).
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Whether placed device-writable buffers are zeroed when posted
    /// (on by default, so stale bytes from an earlier request can never pass
    /// for fresh device output; benchmarks may turn it off).
    pub fn set_clear_buffers(&mut self, clear: bool) {
        self.clear_buffers = clear;
    }

    /// Descriptors not used by any in-flight chain.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains posted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The available index the driver last published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx.0
    }

    /// The used index up to which the driver consumed the used ring.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used.0
    }

    /// Posts one chain of direct descriptors and publishes it in the
    /// available ring. Returns the head descriptor index.
    pub fn post(&mut self, buffers: &[Buffer]) -> Result<u16> {
        let needed = buffers.len();
        if needed == 0 {
            return Err(Error::EmptyChain);
        }
        if needed > self.free.len() {
            return Err(Error::QueueFull {
                needed,
                free: self.free.len(),
            });
        }
        let slab_bytes: u64 = buffers.iter().map(Buffer::slab_bytes).sum();
        self.check_fits(slab_bytes)?;

        self.scratch.clear();
        self.scratch.extend(self.free.drain(..needed));
        let head = self.scratch[0];
        let mut cursor = self.layout.slab(head);
        let mut chain = std::mem::take(&mut self.chains[usize::from(head)]);
        chain.descriptors.clear();
        chain.descriptors.extend_from_slice(&self.scratch);
        chain.buffers.clear();

        let result = (|| {
            for (position, buffer) in buffers.iter().enumerate() {
                let index = self.scratch[position];
                let next = self.scratch.get(position + 1).copied();
                let (span, flags) = self.place(buffer, &mut cursor)?;
                let flags = match next {
                    Some(_) => flags | NEXT,
                    None => flags & !NEXT,
                };
                self.write_descriptor(
                    index,
                    span.addr.raw_value(),
                    span.len,
                    flags,
                    next.unwrap_or(0),
                )?;
                chain.buffers.push(span);
            }
            Ok(())
        })();
        self.finish_post(head, chain, result)
    }

    /// Posts one chain through an indirect descriptor table: a single ring
    /// descriptor with `VRING_DESC_F_INDIRECT` pointing at a table (in the
    /// head's slab) that holds the buffers. Returns the head.
    pub fn post_indirect(&mut self, buffers: &[Buffer]) -> Result<u16> {
        if buffers.is_empty() {
            return Err(Error::EmptyChain);
        }
        if buffers.len() > usize::from(self.layout.queue_size) {
            // A chain may not be longer than the queue (virtio 1.x, 2.7.5.3.1).
            return Err(Error::IndirectTooLong(buffers.len()));
        }
        if self.free.is_empty() {
            return Err(Error::QueueFull { needed: 1, free: 0 });
        }
        let table_len = DESCRIPTOR_SIZE * buffers.len() as u64;
        let slab_bytes =
            align_up(table_len, BUFFER_ALIGN) + buffers.iter().map(Buffer::slab_bytes).sum::<u64>();
        self.check_fits(slab_bytes)?;

        let head = self
            .free
            .pop_front()
            .ok_or(Error::QueueFull { needed: 1, free: 0 })?;
        let table = self.layout.slab(head);
        let mut cursor = table.unchecked_add(align_up(table_len, BUFFER_ALIGN));
        let mut chain = std::mem::take(&mut self.chains[usize::from(head)]);
        chain.descriptors.clear();
        chain.buffers.clear();
        chain.descriptors.push(head);

        let result = (|| {
            for (position, buffer) in buffers.iter().enumerate() {
                let (span, flags) = self.place(buffer, &mut cursor)?;
                let last = position + 1 == buffers.len();
                let flags = if last { flags & !NEXT } else { flags | NEXT };
                let next = if last { 0 } else { position as u16 + 1 };
                let entry = table.unchecked_add(DESCRIPTOR_SIZE * position as u64);
                let descriptor = Descriptor::new(span.addr.raw_value(), span.len, flags, next);
                self.memory
                    .write_obj(descriptor, entry)
                    .map_err(Error::memory(entry.raw_value()))?;
                chain.buffers.push(span);
            }
            self.write_descriptor(head, table.raw_value(), table_len as u32, INDIRECT, 0)
        })();
        self.finish_post(head, chain, result)
    }

    /// Records the chain and publishes its head, or undoes the reservation
    /// when writing the descriptors failed.
    fn finish_post(&mut self, head: u16, chain: Chain, result: Result<()>) -> Result<u16> {
        if let Err(error) = result {
            // Give the reserved descriptors back; nothing was published.
            self.free.extend(chain.descriptors.iter().copied());
            self.chains[usize::from(head)] = Chain::default();
            return Err(error);
        }
        self.chains[usize::from(head)] = Chain {
            in_flight: true,
            ..chain
        };
        self.in_flight += 1;
        self.publish_head(head)?;
        Ok(head)
    }

    fn check_fits(&self, needed: u64) -> Result<()> {
        if needed > self.layout.slab_size {
            return Err(Error::ChainTooLarge {
                needed,
                slab: self.layout.slab_size,
            });
        }
        Ok(())
    }

    /// Decides where `buffer` lives and with which flags, advancing `cursor`
    /// through the head's slab for placed buffers.
    fn place(&self, buffer: &Buffer, cursor: &mut GuestAddress) -> Result<(Span, u16)> {
        match buffer.kind {
            BufferKind::Placed { len, writable } => {
                let span = Span { addr: *cursor, len };
                *cursor = cursor.unchecked_add(buffer.slab_bytes());
                if writable && self.clear_buffers {
                    self.zero(span.addr, u64::from(len))?;
                }
                Ok((span, if writable { WRITE } else { 0 }))
            }
            BufferKind::Raw { addr, len, flags } => Ok((
                Span {
                    addr: GuestAddress(addr),
                    len,
                },
                flags,
            )),
        }
    }

    /// Writes descriptor `index` of the descriptor table verbatim.
    ///
    /// Bookkeeping is not touched: this is for tests that hand-craft broken
    /// chains (loops, bad `next`, nested indirect tables) and publish them
    /// with [`Self::publish_head`].
    pub fn write_descriptor(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let at = self.layout.descriptor_addr(index % self.layout.queue_size);
        self.memory
            .write_obj(Descriptor::new(addr, len, flags, next), at)
            .map_err(Error::memory(at.raw_value()))
    }

    /// Appends `head` to the available ring and publishes the new available
    /// index. [`Self::post`] does this itself; call it directly only for
    /// chains built with [`Self::write_descriptor`].
    pub fn publish_head(&mut self, head: u16) -> Result<()> {
        self.append_avail(head)?;
        self.store_avail_idx(self.avail_idx.0)
    }

    /// Writes `head` into the next available-ring slot; the index is not
    /// published.
    fn append_avail(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx.0 % self.layout.queue_size);
        let entry = self
            .layout
            .avail_ring
            .unchecked_add(RING_ENTRIES + AVAIL_ENTRY_SIZE * slot);
        self.memory
            .write_obj(head.to_le(), entry)
            .map_err(Error::memory(entry.raw_value()))?;
        self.avail_idx += Wrapping(1);
        Ok(())
    }

    /// Posts the last `count` chains reaped again, as they were (same
    /// buffer, bytes left as the device wrote them), and publishes the
    /// available index once: what a benchmark's driver does to keep a queue
    /// full at millions of requests a second without the driver's own cost
    /// (descriptor writes, zeroing, one index store per request) hiding the
    /// device's. Only for single-descriptor chains, with no post since
    /// they were reaped.
    pub fn repost_reaped(&mut self, count: usize) -> Result<()> {
        if count > self.free.len() {
            return Err(Error::NotRepostable(format!(
                "{count} chains asked for, {} descriptors free",
                self.free.len()
            )));
        }
        let heads = self.free.split_off(self.free.len() - count);
        for (position, &head) in heads.iter().enumerate() {
            let chain = &mut self.chains[usize::from(head)];
            if chain.in_flight || chain.descriptors != [head] || chain.buffers.len() != 1 {
                // Leave the ring as it was: the rest go back free.
                self.free.extend(heads.iter().skip(position).copied());
                return Err(Error::NotRepostable(format!(
                    "descriptor {head} is not a reaped single-descriptor chain"
                )));
            }
            chain.in_flight = true;
            self.in_flight += 1;
            self.append_avail(head)?;
        }
        self.store_avail_idx(self.avail_idx.0)
    }

    /// Stores `idx` as the available index without posting anything, for
    /// tests that make the index jump. The driver's own count is unchanged.
    pub fn store_avail_idx(&self, idx: u16) -> Result<()> {
        // Release: descriptors and ring entries written before must be
        // visible to a device that observes the new index.
        let at = self.layout.avail_ring.unchecked_add(RING_IDX);
        self.memory
            .store(idx.to_le(), at, Ordering::Release)
            .map_err(Error::memory(at.raw_value()))
    }

    /// The used index as the device last wrote it.
    pub fn used_idx(&self) -> Result<u16> {
        let at = self.layout.used_ring.unchecked_add(RING_IDX);
        self.memory
            .load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(Error::memory(at.raw_value()))
    }

    /// Used elements the device produced that the driver has not reaped.
    pub fn used_pending(&self) -> Result<u16> {
        let advanced = (Wrapping(self.used_idx()?) - self.last_used).0;
        if advanced > self.layout.queue_size {
            return Err(Error::UsedIndexOverrun {
                advanced,
                queue_size: self.layout.queue_size,
            });
        }
        Ok(advanced)
    }

    /// Consumes up to `max` used elements, appending them to `out` in
    /// used-ring order, and frees their descriptors. Returns how many were
    /// consumed. Does not wait.
    ///
    /// With `VIRTIO_RING_F_EVENT_IDX` it then sets `used_event` to the new
    /// consumption point, asking for a notification at the next completion,
    /// as a driver that keeps callbacks enabled does.
    pub fn reap(&mut self, max: usize, out: &mut Vec<UsedElem>) -> Result<usize> {
        let pending = usize::from(self.used_pending()?);
        let count = pending.min(max);
        for _ in 0..count {
            let slot = u64::from(self.last_used.0 % self.layout.queue_size);
            let at = self
                .layout
                .used_ring
                .unchecked_add(RING_ENTRIES + USED_ENTRY_SIZE * slot);
            let id = u32::from_le(
                self.memory
                    .read_obj(at)
                    .map_err(Error::memory(at.raw_value()))?,
            );
            let len_at = at.unchecked_add(4);
            let len = u32::from_le(
                self.memory
                    .read_obj(len_at)
                    .map_err(Error::memory(len_at.raw_value()))?,
            );
            self.last_used += Wrapping(1);
            let head = self.complete(id)?;
            out.push(UsedElem { head, len });
        }
        if self.event_idx && count > 0 {
            self.set_used_event(self.last_used.0)?;
        }
        Ok(count)
    }

    /// Marks the chain with head `id` as returned and frees its descriptors.
    fn complete(&mut self, id: u32) -> Result<u16> {
        let head = u16::try_from(id)
            .ok()
            .filter(|&head| head < self.layout.queue_size)
            .ok_or(Error::BogusUsedId(id))?;
        let chain = &mut self.chains[usize::from(head)];
        if !chain.in_flight {
            return Err(Error::BogusUsedId(id));
        }
        chain.in_flight = false;
        self.free.extend(chain.descriptors.iter().copied());
        self.in_flight -= 1;
        Ok(head)
    }

    /// Writes `used_event`: with `VIRTIO_RING_F_EVENT_IDX`, the device
    /// notifies only when its used index passes this value.
    pub fn set_used_event(&self, idx: u16) -> Result<()> {
        let at = self.layout.used_event_addr();
        self.memory
            .store(idx.to_le(), at, Ordering::Relaxed)
            .map_err(Error::memory(at.raw_value()))?;
        // The device must see the new used_event before we look at the used
        // index again, or a completion could slip between without a call.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Sets or clears `VRING_AVAIL_F_NO_INTERRUPT` (notification suppression
    /// without `VIRTIO_RING_F_EVENT_IDX`).
    pub fn set_no_interrupt(&self, suppress: bool) -> Result<()> {
        let at = self.layout.avail_ring.unchecked_add(RING_FLAGS);
        let flags = if suppress {
            VRING_AVAIL_F_NO_INTERRUPT as u16
        } else {
            0
        };
        self.memory
            .store(flags.to_le(), at, Ordering::Relaxed)
            .map_err(Error::memory(at.raw_value()))?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Whether the device asked to be notified about what was published since
    /// the last call, per `avail_event` (with `VIRTIO_RING_F_EVENT_IDX`) or
    /// the used ring's `VRING_USED_F_NO_NOTIFY` flag (without).
    pub fn needs_kick(&mut self) -> Result<bool> {
        // Our avail index store must be visible before we read the device's
        // suppression state, or both sides could decide not to act.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = std::mem::replace(&mut self.avail_idx_at_last_kick, new);
        if self.event_idx {
            let at = self.layout.avail_event_addr();
            let event = Wrapping(u16::from_le(
                self.memory
                    .load::<u16>(at, Ordering::Relaxed)
                    .map_err(Error::memory(at.raw_value()))?,
            ));
            // vring_need_event(): kick if `event` lies in the half-open window (old, new].
            Ok(new - event - Wrapping(1) < new - old)
        } else {
            let at = self.layout.used_ring.unchecked_add(RING_FLAGS);
            let flags = u16::from_le(
                self.memory
                    .load::<u16>(at, Ordering::Relaxed)
                    .map_err(Error::memory(at.raw_value()))?,
            );
            Ok(flags & VRING_USED_F_NO_NOTIFY as u16 == 0)
        }
    }

    /// Number of buffers in the chain with head `head`.
    pub fn buffer_count(&self, head: u16) -> Result<usize> {
        Ok(self.chain(head)?.buffers.len())
    }

    /// Guest address and length of buffer `index` of the chain with head `head`.
    pub fn buffer(&self, head: u16, index: usize) -> Result<(GuestAddress, u32)> {
        let chain = self.chain(head)?;
        chain
            .buffers
            .get(index)
            .map(|span| (span.addr, span.len))
            .ok_or(Error::NoSuchBuffer {
                head,
                index,
                count: chain.buffers.len(),
            })
    }

    /// The bytes of buffer `index` of the chain with head `head`, as they are
    /// in guest memory now. Valid until the head is reused by a later post.
    pub fn read_buffer(&self, head: u16, index: usize) -> Result<Vec<u8>> {
        let (addr, len) = self.buffer(head, index)?;
        let mut bytes = vec![0; len as usize];
        self.memory
            .read_slice(&mut bytes, addr)
            .map_err(Error::memory(addr.raw_value()))?;
        Ok(bytes)
    }

    fn chain(&self, head: u16) -> Result<&Chain> {
        self.chains
            .get(usize::from(head))
            .filter(|chain| !chain.buffers.is_empty())
            .ok_or(Error::UnknownHead(head))
    }

    fn zero(&self, start: GuestAddress, len: u64) -> Result<()> {
        const ZEROES: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(ZEROES.len() as u64);
            let at = start.unchecked_add(done);
            self.memory
                .write_slice(&ZEROES[..chunk as usize], at)
                .map_err(Error::memory(at.raw_value()))?;
            done += chunk;
        }
        Ok(())
    }
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemory;

    const BASE: u64 = 0x4000_0000;
    const MEM_SIZE: usize = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), MEM_SIZE)]).unwrap()
    }

    /// A device-side queue looking at the driver's rings, as a backend sets
    /// it up from SET_VRING_NUM/ADDR.
    fn device_queue(layout: &RingLayout, event_idx: bool) -> Queue {
        let mut queue = Queue::new(layout.queue_size).unwrap();
        queue.set_size(layout.queue_size);
        let split = |addr: GuestAddress| {
            let raw = addr.raw_value();
            (Some(raw as u32), Some((raw >> 32) as u32))
        };
        let (low, high) = split(layout.desc_table);
        queue.set_desc_table_address(low, high);
        let (low, high) = split(layout.avail_ring);
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(layout.used_ring);
        queue.set_used_ring_address(low, high);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    /// A descriptor as the device saw it: (address, length, device-writable).
    type Seen = (u64, u32, bool);

    /// What the device did with one chain.
    struct Served {
        head: u16,
        written: u32,
        seen: Vec<Seen>,
    }

    /// Consumes every available chain like an rng device: fills each
    /// writable descriptor with `fill` and reports what it saw.
    fn serve_all(queue: &mut Queue, mem: &GuestMemoryMmap, fill: u8) -> Vec<Served> {
        let mut served = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written = 0;
            let mut seen = Vec::new();
            for desc in chain {
                seen.push((desc.addr().raw_value(), desc.len(), desc.is_write_only()));
                if desc.is_write_only() {
                    let bytes = vec![fill; desc.len() as usize];
                    mem.write_slice(&bytes, desc.addr()).unwrap();
                    written += desc.len();
                }
            }
            queue.add_used(mem, head, written).unwrap();
            served.push(Served {
                head,
                written,
                seen,
            });
        }
        served
    }

    #[test]
    fn layout_fits_and_aligns() {
        let layout = RingLayout::new(GuestAddress(BASE), MEM_SIZE as u64, 256).unwrap();
        let page = page_size() as u64;
        assert_eq!(layout.desc_table.raw_value(), BASE);
        assert_eq!(layout.avail_ring.raw_value() % page, 0);
        assert_eq!(layout.used_ring.raw_value() % page, 0);
        assert!(layout.avail_ring.raw_value() >= BASE + layout.desc_table_len());
        assert!(
            layout.used_ring.raw_value() >= layout.avail_ring.raw_value() + layout.avail_ring_len()
        );
        assert!(layout.slabs.raw_value() >= layout.used_ring.raw_value() + layout.used_ring_len());
        let end = layout.slab(255).raw_value() + layout.slab_size;
        assert!(end <= BASE + MEM_SIZE as u64);
        // 1 MiB with 256 descriptors leaves just under a page per head.
        assert_eq!(layout.slab_size, 4032);

        assert!(RingLayout::new(GuestAddress(BASE), MEM_SIZE as u64, 100).is_err());
        assert!(RingLayout::new(GuestAddress(BASE), 8192, 256).is_err());
    }

    #[test]
    fn device_sees_posted_chain_and_driver_reads_used_ring() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 16).unwrap();
        let mut queue = device_queue(driver.layout(), false);

        let chain = [
            Buffer::readable(16),
            Buffer::writable(64),
            Buffer::writable(100),
        ];
        let first = driver.post(&chain).unwrap();
        let second = driver.post(&[Buffer::writable(4096)]).unwrap();
        assert_eq!(driver.free_descriptors(), 12);
        assert_eq!(driver.in_flight(), 2);
        assert_eq!(queue.avail_idx(&mem, Ordering::Acquire).unwrap().0, 2);

        let served = serve_all(&mut queue, &mem, 0xab);
        assert_eq!(served.len(), 2);
        let Served {
            head,
            written,
            seen,
        } = &served[0];
        assert_eq!(*head, first);
        assert_eq!(*written, 164);
        assert_eq!(seen.len(), 3);
        for (i, (addr, len, writable)) in seen.iter().enumerate() {
            let (expected_addr, expected_len) = driver.buffer(first, i).unwrap();
            assert_eq!(*addr, expected_addr.raw_value());
            assert_eq!(*len, expected_len);
            assert_eq!(*writable, chain[i].is_writable());
        }
        assert_eq!(served[1].head, second);

        let mut used = Vec::new();
        assert_eq!(driver.reap(usize::MAX, &mut used).unwrap(), 2);
        assert_eq!(
            used,
            [
                UsedElem {
                    head: first,
                    len: 164
                },
                UsedElem {
                    head: second,
                    len: 4096
                }
            ]
        );
        assert_eq!(driver.free_descriptors(), 16);
        assert_eq!(driver.in_flight(), 0);
        assert_eq!(driver.read_buffer(first, 0).unwrap(), vec![0; 16]);
        assert_eq!(driver.read_buffer(first, 1).unwrap(), vec![0xab; 64]);
        assert_eq!(driver.read_buffer(second, 0).unwrap(), vec![0xab; 4096]);
        assert!(matches!(
            driver.read_buffer(first, 3),
            Err(Error::NoSuchBuffer { count: 3, .. })
        ));
    }

    #[test]
    fn indirect_chain_reaches_device() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 8).unwrap();
        let mut queue = device_queue(driver.layout(), false);

        let head = driver
            .post_indirect(&[Buffer::writable(32), Buffer::writable(48)])
            .unwrap();
        // One ring descriptor, whatever the chain length.
        assert_eq!(driver.free_descriptors(), 7);

        let served = serve_all(&mut queue, &mem, 0x5a);
        assert_eq!(served.len(), 1);
        let Served {
            head: served_head,
            written,
            seen,
        } = &served[0];
        assert_eq!(*served_head, head);
        assert_eq!(*written, 80);
        let expected: Vec<_> = (0..2)
            .map(|i| {
                let (addr, len) = driver.buffer(head, i).unwrap();
                (addr.raw_value(), len, true)
            })
            .collect();
        assert_eq!(seen, &expected);

        let mut used = Vec::new();
        driver.reap(usize::MAX, &mut used).unwrap();
        assert_eq!(used, [UsedElem { head, len: 80 }]);
        assert_eq!(driver.read_buffer(head, 1).unwrap(), vec![0x5a; 48]);
        assert_eq!(driver.free_descriptors(), 8);
    }

    #[test]
    fn raw_descriptors_are_posted_verbatim() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 8).unwrap();
        let mut queue = device_queue(driver.layout(), false);

        let outside = BASE + MEM_SIZE as u64 + 0x1000;
        let head = driver.post(&[Buffer::raw(outside, 64, WRITE)]).unwrap();
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(chain.head_index(), head);
        let descriptors: Vec<_> = chain.collect();
        assert_eq!(descriptors.len(), 1);
        assert_eq!(descriptors[0].addr().raw_value(), outside);
        assert!(!mem.check_range(descriptors[0].addr(), 64, vm_memory::Permissions::Write));
    }

    #[test]
    fn descriptors_recycle_and_queue_fills_up() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 4).unwrap();
        let mut queue = device_queue(driver.layout(), false);
        let mut used = Vec::new();

        // Many more requests than descriptors, wrapping the ring indices.
        for round in 0..100u32 {
            for _ in 0..4 {
                driver.post(&[Buffer::writable(64)]).unwrap();
            }
            assert!(matches!(
                driver.post(&[Buffer::writable(64)]),
                Err(Error::QueueFull { needed: 1, free: 0 })
            ));
            serve_all(&mut queue, &mem, round as u8);
            used.clear();
            assert_eq!(driver.reap(usize::MAX, &mut used).unwrap(), 4);
            assert!(used.iter().all(|elem| elem.len == 64));
        }
        assert_eq!(driver.avail_idx(), 400);
        assert_eq!(driver.last_used_idx(), 400);
    }

    #[test]
    fn reaped_chains_are_posted_again_with_one_index_store() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 8).unwrap();
        let mut queue = device_queue(driver.layout(), false);
        let mut used = Vec::new();
        let heads: Vec<u16> = (0..4)
            .map(|_| driver.post(&[Buffer::writable(64)]).unwrap())
            .collect();
        serve_all(&mut queue, &mem, 1);
        driver.reap(usize::MAX, &mut used).unwrap();
        // Nothing else reaped since: the last three go again, in order.
        driver.repost_reaped(3).unwrap();
        assert_eq!(driver.avail_idx(), 7);
        assert_eq!(driver.in_flight(), 3);
        let again: Vec<u16> = serve_all(&mut queue, &mem, 2)
            .iter()
            .map(|served| served.head)
            .collect();
        assert_eq!(again, heads[1..]);
        used.clear();
        assert_eq!(driver.reap(usize::MAX, &mut used).unwrap(), 3);
        // A chain never posted is not taken for a reaped one.
        let mut fresh = SplitRingDriver::new(mem, GuestAddress(BASE), MEM_SIZE as u64, 8).unwrap();
        assert!(matches!(
            fresh.repost_reaped(1),
            Err(Error::NotRepostable(_))
        ));
        assert_eq!(fresh.free_descriptors(), 8);
        assert_eq!(fresh.avail_idx(), 0);
    }

    #[test]
    fn chains_larger_than_a_slab_are_refused() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem, GuestAddress(BASE), MEM_SIZE as u64, 256).unwrap();
        let slab = driver.max_chain_bytes() as u32;
        assert!(driver.post(&[Buffer::writable(slab)]).is_ok());
        assert!(matches!(
            driver.post(&[Buffer::writable(slab + 1)]),
            Err(Error::ChainTooLarge { .. })
        ));
        assert!(matches!(driver.post(&[]), Err(Error::EmptyChain)));
        // A refused chain leaves the ring as it was.
        assert_eq!(driver.free_descriptors(), 255);
        assert_eq!(driver.avail_idx(), 1);
    }

    #[test]
    fn bogus_used_ids_are_reported() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 8).unwrap();
        let mut queue = device_queue(driver.layout(), false);
        // The device completes head 5, which the driver never posted.
        queue.add_used(&mem, 5, 0).unwrap();
        let mut used = Vec::new();
        assert!(matches!(
            driver.reap(usize::MAX, &mut used),
            Err(Error::BogusUsedId(5))
        ));
    }

    #[test]
    fn event_idx_controls_notifications_both_ways() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 16).unwrap();
        driver.set_event_idx(true);
        let mut queue = device_queue(driver.layout(), true);
        let mut used = Vec::new();

        // Device side: with used_event = 0 the first completion notifies.
        driver.post(&[Buffer::writable(8)]).unwrap();
        // avail_event starts at 0, so publishing index 1 needs a kick.
        assert!(driver.needs_kick().unwrap());
        serve_all(&mut queue, &mem, 1);
        assert!(queue.needs_notification(&mem).unwrap());
        driver.reap(usize::MAX, &mut used).unwrap();

        // Ask for a notification only after three more completions.
        driver.set_used_event(driver.last_used_idx() + 2).unwrap();
        for _ in 0..2 {
            driver.post(&[Buffer::writable(8)]).unwrap();
        }
        serve_all(&mut queue, &mem, 2);
        assert!(!queue.needs_notification(&mem).unwrap());
        driver.post(&[Buffer::writable(8)]).unwrap();
        serve_all(&mut queue, &mem, 3);
        assert!(queue.needs_notification(&mem).unwrap());
        used.clear();
        assert_eq!(driver.reap(usize::MAX, &mut used).unwrap(), 3);

        // Driver side: the device asks for a kick at avail index 6 only.
        driver.needs_kick().unwrap();
        let avail_event = driver.layout().avail_event_addr();
        mem.store(6u16.to_le(), avail_event, Ordering::Relaxed)
            .unwrap();
        driver.post(&[Buffer::writable(8)]).unwrap(); // avail idx 5
        assert!(!driver.needs_kick().unwrap());
        driver.post(&[Buffer::writable(8)]).unwrap(); // 6
        driver.post(&[Buffer::writable(8)]).unwrap(); // 7: window (5, 7] holds 6
        assert!(driver.needs_kick().unwrap());
    }

    #[test]
    fn used_flags_suppress_kicks_without_event_idx() {
        let mem = memory();
        let mut driver =
            SplitRingDriver::new(mem.clone(), GuestAddress(BASE), MEM_SIZE as u64, 8).unwrap();
        let mut queue = device_queue(driver.layout(), false);
        driver.post(&[Buffer::writable(8)]).unwrap();
        assert!(driver.needs_kick().unwrap());
        queue.disable_notification(&mem).unwrap();
        driver.post(&[Buffer::writable(8)]).unwrap();
        assert!(!driver.needs_kick().unwrap());
    }
}
