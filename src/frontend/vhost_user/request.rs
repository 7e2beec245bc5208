// SPDX-License-Identifier: Apache-2.0
//! Serving virtio-rng requests from a split virtqueue.
//!
//! A virtio-rng request is a descriptor chain of device-writable buffers; the
//! device fills them and reports how many bytes it wrote. Everything in a
//! chain comes from the guest and is checked before a byte is written: a
//! defective chain is completed with 0 bytes and reported, and the queue
//! keeps being served.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use std::time::Duration;

/// Most bytes one request is given, however large its buffers are: keeps one
/// guest's request from holding the queue (and the pool) for long.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What a request's bytes come from: the guest's limits and its stream.
pub trait Supply {
    /// Fills the start of `buf` for one request, or says why not now.
    fn supply(&mut self, buf: &mut [u8]) -> Supplied;
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

/// Serves requests from one queue; owns the scratch buffer bytes are staged
/// in so the data path does not allocate per request.
#[derive(Default)]
pub struct RequestProcessor {
    /// Grown to the largest request seen: most guests only ever ask for 64
    /// bytes, and hundreds of idle 64 KiB buffers add up.
    scratch: Vec<u8>,
    descriptors: Vec<Descriptor>,
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
        let event_idx = queue.event_idx_enabled();
        loop {
            if event_idx {
                queue.disable_notification(mem)?;
            }
            self.drain(queue, mem, supply, report, &mut outcome)?;
            let waiting = outcome.starved || outcome.throttled.is_some();
            if waiting || !event_idx || !queue.enable_notification(mem)? {
                break;
            }
        }
        if outcome.completed > 0 {
            outcome.notify = queue.needs_notification(mem)?;
        }
        Ok(outcome)
    }

    fn drain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        supply: &mut dyn Supply,
        report: &mut dyn FnMut(u16, RequestDefect),
        outcome: &mut QueueOutcome,
    ) -> Result<(), QueueError> {
        loop {
            // Reading the avail index through `iter` surfaces a corrupt index
            // as an error instead of a silently empty queue.
            let Some(chain) = queue.iter(mem)?.next() else {
                return Ok(());
            };
            let head = chain.head_index();
            self.descriptors.clear();
            self.descriptors.extend(chain);

            let written = match self.serve_chain(mem, supply) {
                Ok(Supplied::Bytes(written)) => written,
                Ok(Supplied::Starved) => {
                    queue.go_to_previous_position();
                    outcome.starved = true;
                    return Ok(());
                }
                Ok(Supplied::Throttled(wait)) => {
                    queue.go_to_previous_position();
                    outcome.throttled = Some(wait);
                    return Ok(());
                }
                Err(defect) => {
                    report(head, defect);
                    outcome.defects += 1;
                    0
                }
            };
            // `written` never exceeds MAX_REQUEST_BYTES, so it fits in u32.
            queue.add_used(mem, head, written as u32)?;
            outcome.completed += 1;
            outcome.bytes += written as u64;
        }
    }

    /// Fills the chain in `self.descriptors`; `Bytes(n)` is what was written
    /// (0 for an empty request).
    fn serve_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        supply: &mut dyn Supply,
    ) -> Result<Supplied, RequestDefect> {
        let mut wanted = 0usize;
        for (position, desc) in self.descriptors.iter().enumerate() {
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
        let wanted = wanted.min(MAX_REQUEST_BYTES);
        if wanted == 0 {
            return Ok(Supplied::Bytes(0));
        }

        if self.scratch.len() < wanted {
            self.scratch.resize(wanted, 0);
        }
        let available = match supply.supply(&mut self.scratch[..wanted]) {
            Supplied::Bytes(n) if n > 0 => n.min(wanted),
            Supplied::Bytes(_) => return Ok(Supplied::Starved),
            waiting => return Ok(waiting),
        };

        let mut written = 0;
        for desc in &self.descriptors {
            if written == available {
                break;
            }
            let len = (desc.len() as usize).min(available - written);
            write_guest(mem, &self.scratch[written..written + len], desc.addr())?;
            written += len;
        }
        Ok(Supplied::Bytes(written))
    }
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
        // Per the split-ring layout: used_event follows the avail ring,
        // avail_event follows the used ring.
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
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
}
