// SPDX-License-Identifier: Apache-2.0
//! Target `descriptor_chain`: a guest's request queue as the device serves
//! it ([`RequestProcessor::process_queue`], src/frontend/vhost_user/request.rs),
//! on a split virtqueue in 64 KiB of guest memory that the input writes as a
//! hostile driver would: descriptors (chained, indirect, read-only, outside
//! memory, of any length), avail entries and indexes, `used_event`, raw bytes
//! anywhere, between passes of the device. The entropy supply answers as
//! the input says: bytes (all, some, more than asked), starved, throttled.
//!
//! Checked besides "no panic": no request is given more than
//! [`MAX_REQUEST_BYTES`], the supply is never asked for 0 bytes nor for more
//! than that, and a pass reports no more bytes than it completed requests
//! could hold.

use std::sync::OnceLock;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use vhost_rng::frontend::vhost_user::request::{
    MAX_REQUEST_BYTES, RequestProcessor, Supplied, Supply,
};

use crate::input::Input;

/// Guest memory: the rings at its start, buffers and indirect tables after.
const MEMORY: usize = 0x1_0000;

const OP_WRITE_MEMORY: u8 = 0;
const OP_DESCRIPTOR: u8 = 1;
const OP_PUBLISH: u8 = 2;
const OP_AVAIL_INDEX: u8 = 3;
const OP_USED_EVENT: u8 = 4;
const OP_PASS: u8 = 5;
const OPS: u8 = 6;

/// The guest memory, mapped once and wiped for each run: mapping and
/// unmapping it every run cost more than the run itself.
fn memory() -> &'static GuestMemoryMmap {
    static MAPPED: OnceLock<GuestMemoryMmap> = OnceLock::new();
    static ZEROS: [u8; MEMORY] = [0; MEMORY];
    let mem = MAPPED.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("64 KiB of guest memory")
    });
    mem.write_slice(&ZEROS, GuestAddress(0))
        .expect("wiping guest memory");
    mem
}

/// The entropy supply, answering from the input.
struct Script<'a> {
    input: Input<'a>,
}

impl Supply for Script<'_> {
    fn supply(&mut self, buf: &mut [u8]) -> Supplied {
        assert!(
            !buf.is_empty() && buf.len() <= MAX_REQUEST_BYTES,
            "the supply was asked for {} bytes",
            buf.len()
        );
        // Zeros: a hostile driver may point buffers at the used ring, where
        // these bytes can land on lengths the device wrote earlier in the
        // pass; zeros only ever lower them, so the check of those lengths
        // stays sound.
        buf.fill(0);
        match self.input.u8() % 5 {
            0 | 1 => Supplied::Bytes(buf.len()),
            // A short fill, or a supply claiming more than it was asked for.
            2 => Supplied::Bytes(usize::from(self.input.u16())),
            3 => Supplied::Starved,
            _ => Supplied::Throttled(Duration::from_millis(1)),
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let event_idx = input.u8() & 1 != 0;
    let mem = memory();
    let vq = MockSplitQueue::new(mem, size);
    let mut queue: Queue = vq.create_queue().expect("a valid mock queue");
    queue.set_event_idx(event_idx);
    let used_event = vq.avail_addr().unchecked_add(4 + 2 * u64::from(size));
    let mut processor = RequestProcessor::default();
    let mut script = Script { input };
    let mut avail_idx = 0u16;

    while !script.input.is_empty() {
        let input = &mut script.input;
        match input.u8() % OPS {
            OP_WRITE_MEMORY => {
                let addr = GuestAddress(u64::from(input.u16()));
                let len = usize::from(input.u8());
                let _ = mem.write_slice(input.take(len), addr);
            }
            OP_DESCRIPTOR => {
                let index = input.u16() % size;
                let desc = descriptor(input);
                let at = vq.desc_table_addr().unchecked_add(16 * u64::from(index));
                let _ = mem.write_obj(desc, at);
            }
            OP_PUBLISH => {
                let head = input.u16();
                let slot = u64::from(avail_idx % size);
                let at = vq.avail_addr().unchecked_add(4 + 2 * slot);
                let _ = mem.write_obj(head, at);
                avail_idx = avail_idx.wrapping_add(1);
                let _ = mem.write_obj(avail_idx, vq.avail_addr().unchecked_add(2));
            }
            OP_AVAIL_INDEX => {
                avail_idx = input.u16();
                let _ = mem.write_obj(avail_idx, vq.avail_addr().unchecked_add(2));
            }
            OP_USED_EVENT => {
                let _ = mem.write_obj(input.u16(), used_event);
            }
            _ => pass(&mut processor, &mut queue, mem, &vq, &mut script),
        }
    }
    pass(&mut processor, &mut queue, mem, &vq, &mut script);
}

/// One descriptor, its address and length mostly inside guest memory.
fn descriptor(input: &mut Input<'_>) -> RawDescriptor {
    let shape = input.u8();
    let addr = match shape & 3 {
        0 | 1 => u64::from(input.u16()),
        2 => u64::from(input.u32()),
        _ => input.u64(),
    };
    let len = if shape & 4 == 0 {
        u32::from(input.u16())
    } else {
        input.u32()
    };
    let flags = input.u16();
    let next = input.u16();
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn pass(
    processor: &mut RequestProcessor,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    script: &mut Script<'_>,
) {
    let size = queue.size();
    let used_before = queue.next_used();
    let Ok(outcome) = processor.process_queue(queue, mem, script, &mut |_, _| {}) else {
        // An unusable queue is reported to the caller, which stops serving
        // it until the driver resets it; this one is simply used on.
        return;
    };
    let completed = queue.next_used().wrapping_sub(used_before);
    assert_eq!(u64::from(completed), outcome.completed % 0x1_0000);
    assert!(outcome.bytes <= outcome.completed * MAX_REQUEST_BYTES as u64);
    assert!(outcome.defects <= outcome.completed);
    for i in 0..completed {
        let slot = u64::from(used_before.wrapping_add(i) % size);
        let at = vq.used_addr().unchecked_add(4 + 8 * slot + 4);
        if let Ok(len) = mem.read_obj::<u32>(at) {
            assert!(
                len as usize <= MAX_REQUEST_BYTES,
                "a request given {len} bytes"
            );
        }
    }
}

/// Builds a seed: queue size index, event-idx flag, then ops.
struct Seed(Vec<u8>);

impl Seed {
    fn new(size_log2: u8, event_idx: bool) -> Self {
        Seed(vec![size_log2, u8::from(event_idx)])
    }

    fn descriptor(mut self, index: u16, addr: u16, len: u16, flags: u32, next: u16) -> Self {
        self.0.push(OP_DESCRIPTOR);
        self.0.extend_from_slice(&index.to_le_bytes());
        self.0.push(0);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&(flags as u16).to_le_bytes());
        self.0.extend_from_slice(&next.to_le_bytes());
        self
    }

    fn publish(mut self, head: u16) -> Self {
        self.0.push(OP_PUBLISH);
        self.0.extend_from_slice(&head.to_le_bytes());
        self
    }

    fn write(mut self, addr: u16, bytes: &[u8]) -> Self {
        self.0.push(OP_WRITE_MEMORY);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }

    /// A pass, with the supply's answers.
    fn pass(mut self, answers: &[u8]) -> Self {
        self.0.push(OP_PASS);
        self.0.extend_from_slice(answers);
        self
    }
}

/// Seed inputs: the requests the tests of request.rs post.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let write = VRING_DESC_F_WRITE;
    let next = VRING_DESC_F_NEXT;
    // An indirect table of two writable descriptors at 0x8000.
    let mut table = Vec::new();
    for (addr, flags, next_index) in [(0x9000u64, write | next, 1u16), (0x9100, write, 0)] {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&64u32.to_le_bytes());
        table.extend_from_slice(&(flags as u16).to_le_bytes());
        table.extend_from_slice(&next_index.to_le_bytes());
    }
    vec![
        (
            "one-request",
            Seed::new(4, false)
                .descriptor(0, 0x4000, 64, write, 0)
                .publish(0)
                .pass(&[0])
                .0,
        ),
        (
            "chain-of-three",
            Seed::new(4, false)
                .descriptor(0, 0x4000, 100, write | next, 1)
                .descriptor(1, 0x5000, 28, write | next, 2)
                .descriptor(2, 0x6000, 1, write, 0)
                .publish(0)
                .pass(&[2, 50, 0])
                .0,
        ),
        (
            "read-only-then-good",
            Seed::new(3, true)
                .descriptor(0, 0x4000, 16, 0, 0)
                .descriptor(1, 0x5000, 16, write, 0)
                .publish(0)
                .publish(1)
                .pass(&[0])
                .0,
        ),
        (
            "indirect",
            Seed::new(2, false)
                .write(0x8000, &table)
                .descriptor(0, 0x8000, 32, VRING_DESC_F_INDIRECT, 0)
                .publish(0)
                .pass(&[0])
                .0,
        ),
        (
            "starved-then-served",
            Seed::new(4, true)
                .descriptor(0, 0x4000, 64, write, 0)
                .publish(0)
                .pass(&[3])
                .pass(&[4])
                .pass(&[0])
                .0,
        ),
    ]
}
