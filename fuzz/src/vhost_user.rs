// SPDX-License-Identifier: Apache-2.0
//! Target `vhost_user`: a hostile VMM's side of one vhost-user connection.
//! The input is a sequence of operations: messages (any code, flags and
//! payload, with file descriptors made here: the guest's memory memfd, new
//! eventfds, pipes, a second memfd), raw bytes on the socket (torn and
//! malformed frames), writes into guest memory (descriptors, rings),
//! kicks, and the server loop's turn at its ready kick, wake-up and timer, shrinking the memory file under the mapping
//! (SIGBUS, answered by the fault guard), and a hand-over of the
//! connection's state to a new handler as an in-place upgrade does.
//!
//! Each message goes through the daemon's own pieces, in the order the
//! guest's server thread uses them: [`peek_message`] reads it on a real Unix
//! socket with its descriptors, [`dispatch`] checks it and calls the
//! connection's [`Handler`], which records it as answered, and [`consume`]
//! takes it off the socket before the reply goes out. An error from any
//! ends the connection, as it does in the daemon, and so ends the run.
//! (The server's check of how many descriptors the consumed message really
//! carried is not repeated here.)

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Once;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use vhost_rng::frontend::vhost_user::connection::{
    Arrival, HEADER_LEN, Message, consume, peek_message, send_reply,
};
use vhost_rng::frontend::vhost_user::dispatch::{dispatch, expects_fds};
use vhost_rng::frontend::vhost_user::fault_guard;
use vhost_rng::frontend::vhost_user::handler::Handler;
use vhost_rng::frontend::vhost_user::memory::MemoryLimits;

use crate::daemon;
use crate::input::Input;

/// Held small so that mapping stays cheap; the checks are the same.
const LIMITS: MemoryLimits = MemoryLimits {
    max_regions: 8,
    max_bytes: 1 << 20,
};
/// Sizes the guest memory file may start at (0: an empty file).
const RAM_SIZES: [u64; 4] = [0x1_0000, 0x4000, 0x1000, 0];
/// The second memory file's size.
const SMALL_MEMFD: u64 = 0x1000;

const OP_MESSAGE: u8 = 0;
const OP_RAW: u8 = 1;
const OP_POKE: u8 = 2;
const OP_KICK: u8 = 3;
const OP_EVENT: u8 = 4;
const OP_TRUNCATE: u8 = 5;
const OP_HANDOVER: u8 = 6;
const OPS: u8 = 7;

const FD_RAM: u8 = 0;
const FD_EVENT: u8 = 1;
const FD_PIPE: u8 = 2;
const FD_SMALL_MEMFD: u8 = 3;

/// Runs one input.
pub fn run(data: &[u8]) {
    static GUARD: Once = Once::new();
    GUARD.call_once(fault_guard::install);
    let guest = daemon::guest();
    let mut input = Input::new(data);
    let ram_size = RAM_SIZES[usize::from(input.u8() % 4)];
    let ram = memfd(ram_size);
    let (ours, theirs) = UnixStream::pair().expect("a socket pair");
    theirs.set_nonblocking(true).expect("a non-blocking socket");
    // The server's bound on a reply the VMM does not take; replies are
    // taken after each message here, so it is never reached.
    ours.set_write_timeout(Some(Duration::from_secs(1)))
        .expect("a write timeout");
    let Ok(mut handler) = Handler::new(std::sync::Arc::clone(&guest), LIMITS) else {
        return;
    };

    while !input.is_empty() {
        match input.u8() % OPS {
            OP_MESSAGE => {
                let code = u32::from(input.u8());
                let flags = u32::from(input.u8());
                let len = usize::from(input.u16());
                let payload = input.take(len);
                let fds = fds(input.u8(), &ram);
                let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
                frame.extend_from_slice(&code.to_le_bytes());
                frame.extend_from_slice(&flags.to_le_bytes());
                frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                frame.extend_from_slice(payload);
                if send(&theirs, &frame, &fds).is_err() {
                    return;
                }
            }
            OP_RAW => {
                let len = usize::from(input.u8());
                if send(&theirs, input.take(len), &[]).is_err() {
                    return;
                }
            }
            OP_POKE => {
                let offset = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.take(len);
                // Within the file only: writing past its end would grow it.
                let size = ram.metadata().map_or(0, |m| m.len());
                let end = size.min(offset + bytes.len() as u64);
                if offset < end {
                    let _ = ram.write_all_at(&bytes[..(end - offset) as usize], offset);
                }
            }
            OP_KICK => handler.on_kick(),
            OP_EVENT => {
                if input.u8() & 1 == 0 {
                    events(&mut handler);
                } else {
                    handler.serve_pending();
                }
            }
            OP_TRUNCATE => {
                let _ = ram.set_len(u64::from(input.u16()) << 4);
            }
            _ => {
                let Ok((state, fds)) = handler.snapshot() else {
                    return;
                };
                match Handler::restore(std::sync::Arc::clone(&guest), LIMITS, &state, fds) {
                    Ok(restored) => handler = restored,
                    Err(_) => return,
                }
            }
        }
        if handler.take_fatal().is_some() {
            return;
        }
        // The server thread's turn: every whole message that arrived.
        loop {
            match peek_message(&ours) {
                Ok(Arrival::Message(message)) => {
                    if handle_message(&mut handler, &ours, message).is_err() {
                        return;
                    }
                    drain(&theirs);
                }
                Ok(Arrival::Partial | Arrival::Empty) => break,
                Ok(Arrival::Closed) | Err(_) => return,
            }
        }
        drain(&theirs);
    }
}

/// One message as the server thread handles it: descriptors a peek passed
/// only where the request takes some, a repeat of the message a process
/// before it answered answered again, otherwise dispatched under the fault
/// guard and recorded, then taken off the socket and answered. `Err` ends
/// the connection.
fn handle_message(
    handler: &mut Handler,
    ours: &UnixStream,
    mut message: Message,
) -> Result<(), ()> {
    if !expects_fds(message.code, &message.payload) {
        message.fds.clear();
    }
    let len = message.raw.len();
    let reply = match handler.repeat_of_answered(&message) {
        Some(reply) => reply,
        None => {
            let raw = message.raw.clone();
            let (result, faults) = fault_guard::guarded(|| dispatch(handler, message));
            let handled = result.map_err(drop)?;
            if faults > 0 {
                return Err(());
            }
            handler.set_answered(raw, handled.reply.clone());
            handled.reply
        }
    };
    consume(ours, len).map_err(drop)?;
    if let Some(reply) = reply {
        send_reply(ours, &reply).map_err(drop)?;
    }
    Ok(())
}

/// What the server's event loop does when its epoll returns: the kick if
/// it was written since the last look (the loop waits on it edge-triggered;
/// here the count is taken to see the next write), the pool's wake-up (the
/// handler serves only if the pool woke it) and the rate-limit deadline if
/// it has come.
fn events(handler: &mut Handler) {
    let kicked = handler.kick_fd().is_some_and(|kick| {
        let mut fds = [PollFd::new(kick, PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0);
        if ready {
            let _ = nix::unistd::read(kick, &mut [0u8; 8]);
        }
        ready
    });
    if kicked {
        handler.on_kick();
    }
    handler.on_wake();
    if handler
        .throttled_until()
        .is_some_and(|at| at <= std::time::Instant::now())
    {
        handler.on_timer();
    }
}

/// The descriptors `spec` asks for: a count (bits 0-1), then a kind for
/// each (two bits each from bit 2).
fn fds(spec: u8, ram: &File) -> Vec<OwnedFd> {
    let count = spec & 3;
    (0..count)
        .filter_map(|i| match (spec >> (2 + 2 * i)) & 3 {
            FD_RAM => ram.try_clone().ok().map(OwnedFd::from),
            // SAFETY: eventfd(2) takes no pointers.
            FD_EVENT => owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }),
            FD_PIPE => {
                let mut ends = [0 as RawFd; 2];
                // SAFETY: `ends` has room for the two descriptors.
                let made = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } == 0;
                let write_end = made.then(|| owned(ends[1]));
                drop(write_end);
                made.then(|| owned(ends[0])).flatten()
            }
            _ => Some(OwnedFd::from(memfd(SMALL_MEMFD))),
        })
        .collect()
}

/// A new descriptor from a system call's result, or `None` on failure.
fn owned(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: a descriptor a system call just returned, owned by no one else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A memfd of `size` bytes, as a VMM shares guest memory.
fn memfd(size: u64) -> File {
    // SAFETY: the name is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    let file = File::from(owned(fd).expect("memfd_create"));
    file.set_len(size).expect("sizing a memfd");
    file
}

/// Sends `bytes` with `fds` in one message, as a VMM does.
fn send(stream: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [io::IoSlice::new(bytes)];
    sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Reads and drops the daemon's replies, so the socket never fills up.
fn drain(mut stream: &UnixStream) {
    let mut buf = [0u8; 4096];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

// Request codes (vhost-user.rst) the seeds use.
const GET_FEATURES: u8 = 1;
const SET_FEATURES: u8 = 2;
const SET_OWNER: u8 = 3;
const RESET_OWNER: u8 = 4;
const SET_MEM_TABLE: u8 = 5;
const SET_VRING_NUM: u8 = 8;
const SET_VRING_ADDR: u8 = 9;
const SET_VRING_BASE: u8 = 10;
const GET_VRING_BASE: u8 = 11;
const SET_VRING_KICK: u8 = 12;
const SET_VRING_CALL: u8 = 13;
const SET_VRING_ERR: u8 = 14;
const GET_PROTOCOL_FEATURES: u8 = 15;
const SET_PROTOCOL_FEATURES: u8 = 16;
const SET_VRING_ENABLE: u8 = 18;
const GET_MAX_MEM_SLOTS: u8 = 36;
const ADD_MEM_REG: u8 = 37;
const REM_MEM_REG: u8 = 38;

/// Where the seeds say guest memory is in the VMM's address space.
const VMM_BASE: u64 = 0x7f00_0000_0000;

/// Builds a seed: the guest memory size index, then operations.
struct Seed(Vec<u8>);

impl Seed {
    fn new() -> Self {
        Seed(vec![0])
    }

    /// A message (version 1) with descriptors of `fd_kinds`.
    fn message(mut self, code: u8, flags: u8, payload: &[u8], fd_kinds: &[u8]) -> Self {
        self.0.extend_from_slice(&[OP_MESSAGE, code, 1 | flags]);
        self.0
            .extend_from_slice(&(payload.len() as u16).to_le_bytes());
        self.0.extend_from_slice(payload);
        let mut spec = fd_kinds.len() as u8;
        for (i, kind) in fd_kinds.iter().enumerate() {
            spec |= kind << (2 + 2 * i);
        }
        self.0.push(spec);
        self
    }

    fn simple(self, code: u8) -> Self {
        self.message(code, 0, &[], &[])
    }

    fn poke(mut self, offset: u16, bytes: &[u8]) -> Self {
        self.0.push(OP_POKE);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }

    fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// A started ring: owner, features, memory, ring size and addresses,
    /// call and kick; then a request posted and kicked.
    fn started(features: u64, protocol: Option<u64>) -> Self {
        let mut seed = Seed::new().simple(SET_OWNER).simple(GET_FEATURES);
        if let Some(protocol) = protocol {
            seed = seed.simple(GET_PROTOCOL_FEATURES).message(
                SET_PROTOCOL_FEATURES,
                0,
                &protocol.to_le_bytes(),
                &[],
            );
        }
        let mut table = Vec::new();
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        for field in [0, 0x1_0000, VMM_BASE, 0] {
            table.extend_from_slice(&field.to_le_bytes());
        }
        let mut addr = Vec::new();
        addr.extend_from_slice(&0u32.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for field in [VMM_BASE, VMM_BASE + 0x2000, VMM_BASE + 0x1000, 0] {
            addr.extend_from_slice(&field.to_le_bytes());
        }
        seed = seed
            .message(SET_FEATURES, 0, &features.to_le_bytes(), &[])
            .message(SET_MEM_TABLE, 0, &table, &[FD_RAM])
            .message(SET_VRING_NUM, 0, &pair(0, 8), &[])
            .message(SET_VRING_ADDR, 0, &addr, &[])
            .message(SET_VRING_BASE, 0, &pair(0, 0), &[])
            .message(SET_VRING_CALL, 0, &0u64.to_le_bytes(), &[FD_EVENT])
            .message(SET_VRING_ERR, 0, &0u64.to_le_bytes(), &[FD_EVENT])
            .message(SET_VRING_KICK, 0, &0u64.to_le_bytes(), &[FD_EVENT]);
        if protocol.is_some() {
            seed = seed.message(SET_VRING_ENABLE, 0x8, &pair(0, 1), &[]);
        }
        // Descriptor 0: 64 writable bytes at 0x4000; avail idx 1, ring[0] 0.
        let mut desc = Vec::new();
        desc.extend_from_slice(&0x4000u64.to_le_bytes());
        desc.extend_from_slice(&64u32.to_le_bytes());
        desc.extend_from_slice(&2u16.to_le_bytes());
        desc.extend_from_slice(&0u16.to_le_bytes());
        seed.poke(0, &desc)
            .poke(0x1000, &[0, 0, 1, 0, 0, 0])
            .op(&[OP_KICK])
    }
}

fn pair(a: u32, b: u32) -> Vec<u8> {
    let mut bytes = a.to_le_bytes().to_vec();
    bytes.extend_from_slice(&b.to_le_bytes());
    bytes
}

/// Seed inputs: a QEMU-like set-up and its variations.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let version_1 = 1u64 << 32;
    let protocol_features = 1u64 << 30;
    let event_idx = 1u64 << 29;
    // REPLY_ACK | MQ | CONFIGURE_MEM_SLOTS
    let protocol = (1u64 << 3) | (1 << 0) | (1 << 15);
    let mut region = 0u64.to_le_bytes().to_vec();
    for field in [0x2_0000, SMALL_MEMFD, VMM_BASE + 0x10_0000, 0] {
        region.extend_from_slice(&field.to_le_bytes());
    }
    vec![
        ("qemu-setup", Seed::started(version_1, None).0),
        (
            "protocol-features-and-reply-ack",
            Seed::started(version_1 | protocol_features | event_idx, Some(protocol))
                .message(GET_VRING_BASE, 0, &pair(0, 0), &[])
                .0,
        ),
        (
            "mem-slots",
            Seed::started(version_1 | protocol_features, Some(protocol))
                .simple(GET_MAX_MEM_SLOTS)
                .message(ADD_MEM_REG, 0x8, &region, &[FD_SMALL_MEMFD])
                .message(REM_MEM_REG, 0x8, &region, &[])
                .0,
        ),
        (
            "handover",
            Seed::started(version_1, None)
                .op(&[OP_HANDOVER, OP_KICK])
                .simple(RESET_OWNER)
                .0,
        ),
        (
            "shrunk-memory",
            Seed::started(version_1, None)
                .poke(0x1000, &[0, 0, 2, 0, 0, 0])
                .op(&[OP_TRUNCATE, 0x10, 0, OP_KICK])
                .0,
        ),
        (
            "torn-frame",
            Seed::new()
                .op(&[OP_RAW, 6, SET_OWNER, 0, 0, 0, 1, 0])
                .op(&[OP_RAW, 6, 0, 0, 0, 0, 0, 0])
                .simple(GET_FEATURES)
                .0,
        ),
    ]
}
