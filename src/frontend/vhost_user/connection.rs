// SPDX-License-Identifier: Apache-2.0
//! vhost-user framing on one VMM connection: whole messages in, with their
//! file descriptors, and replies out, without ever blocking the event loop
//! that serves the guest.
//!
//! The daemon reads the messages itself rather than through the vhost
//! crate's request handler: that reader retries a timed-out read or write
//! forever, and keeps the negotiated protocol features where the daemon
//! cannot see them. Here a message is only read once it has arrived whole
//! (a peek says so), and it stays on the socket until it has been handled
//! and its effect recorded ([`consume`] takes it off): a serving process
//! that dies meanwhile leaves it for the next one. A reply that cannot be
//! written at once ends the connection, and everything
//! negotiated is in the [`Handler`](super::handler::Handler).
//! The payload layouts are the vhost-user specification's (QEMU
//! docs/interop/vhost-user.rst), little-endian.

use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recv, recvmsg};
use vhost::vhost_user::message::MAX_MSG_SIZE;

/// Header: request code, flags, payload size; u32 each.
pub const HEADER_LEN: usize = 12;
/// Version 1 in the flags' low two bits; the only one there is.
const VERSION_1: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
/// Set on replies.
const REPLY: u32 = 0x4;
/// The frontend wants an acknowledgement (with REPLY_ACK negotiated).
pub const NEED_REPLY: u32 = 0x8;
/// Most file descriptors one message may carry (a memory table of 8
/// regions is QEMU's most; the vhost crate allows 32).
const MAX_FDS: usize = 32;

/// One message from the VMM.
#[derive(Debug)]
pub struct Message {
    /// The request code (`VHOST_USER_*`), as sent.
    pub code: u32,
    /// The header's flags: version, reply and [`NEED_REPLY`] bits.
    pub flags: u32,
    /// The payload, exactly as long as the header said.
    pub payload: Vec<u8>,
    /// The file descriptors that came with it (SCM_RIGHTS), in order.
    pub fds: Vec<OwnedFd>,
    /// The message as it is on the socket, header and payload; [`consume`]
    /// takes that many bytes off.
    pub raw: Vec<u8>,
}

/// What a look at the connection found.
#[derive(Debug)]
pub enum Arrival {
    /// A whole message, read but still on the socket (see [`consume`]).
    Message(Message),
    /// Only part of a message has arrived; nothing was taken.
    Partial,
    /// Nothing is waiting.
    Empty,
    /// The VMM closed the connection.
    Closed,
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// The header's version bits are not 1 (they are given).
    #[error("a message header with version {0} (only 1 exists)")]
    Version(u32),
    /// The message has the reply bit set: the VMM sent a reply, not a
    /// request.
    #[error("a reply where a request belongs")]
    UnexpectedReply,
    /// The header announces a payload over `MAX_MSG_SIZE`, the vhost
    /// crate's bound on any message.
    #[error("a {size}-byte payload (at most {MAX_MSG_SIZE})")]
    TooLarge {
        /// The payload size announced, in bytes.
        size: usize,
    },
    /// More file descriptors came than a message may carry; they are closed.
    #[error("more file descriptors than a message may carry ({MAX_FDS})")]
    TooManyFds,
    /// Reading the socket failed.
    #[error("reading from the VMM: {0}")]
    Io(#[from] io::Error),
}

/// Looks whether a whole message is waiting and reads it if so, leaving it
/// on the socket; never waits.
pub fn peek_message(stream: &UnixStream) -> Result<Arrival, FramingError> {
    let mut peeked = [0u8; HEADER_LEN + MAX_MSG_SIZE];
    let peek = |buf: &mut [u8]| {
        recv(
            stream.as_raw_fd(),
            buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
    };
    match peek(&mut peeked[..HEADER_LEN]) {
        Ok(0) => return Ok(Arrival::Closed),
        Ok(n) if n < HEADER_LEN => return Ok(Arrival::Partial),
        Ok(_) => {}
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(Arrival::Empty),
        Err(e) => return Err(FramingError::Io(e.into())),
    }
    let flags = u32_at(&peeked, 4);
    if flags & VERSION_MASK != VERSION_1 {
        return Err(FramingError::Version(flags & VERSION_MASK));
    }
    if flags & REPLY != 0 {
        return Err(FramingError::UnexpectedReply);
    }
    let size = u32_at(&peeked, 8) as usize;
    if size > MAX_MSG_SIZE {
        return Err(FramingError::TooLarge { size });
    }
    let whole = HEADER_LEN + size;
    match peek(&mut peeked[..whole]) {
        Ok(n) if n == whole => {}
        Ok(_) | Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
            return Ok(Arrival::Partial);
        }
        Err(e) => return Err(FramingError::Io(e.into())),
    }

    let mut buf = vec![0u8; whole];
    // A peek passes the descriptors too (copies; the message keeps its
    // own for whoever takes it off). But where the message has none, the
    // kernel goes on to the next message and passes *its* descriptors: only
    // a message that takes descriptors may use what a peek gives (see
    // `dispatch::expects_fds`), and [`consume`] counts the real ones.
    let (got, fds) = read_with_fds(stream, &mut buf, MsgFlags::MSG_PEEK)?;
    if got != whole {
        // Peeked whole, so only a concurrent reader could take part of it;
        // there is none.
        return Err(FramingError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    let raw = buf.clone();
    Ok(Arrival::Message(Message {
        code: u32_at(&buf, 0),
        flags: u32_at(&buf, 4),
        payload: buf.split_off(HEADER_LEN),
        fds,
        raw,
    }))
}

/// Takes a message of `len` bytes (header and payload) off the socket once
/// it is handled; the copies of its descriptors this read gets are closed,
/// and counted.
pub fn consume(stream: &UnixStream, len: usize) -> io::Result<usize> {
    let mut buf = vec![0u8; len];
    let (got, fds) = read_with_fds(stream, &mut buf, MsgFlags::empty()).map_err(|e| match e {
        FramingError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    })?;
    if got == len {
        Ok(fds.len())
    } else {
        // Peeked whole, so only a concurrent reader could take part of it;
        // there is none.
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

/// One read of up to `buf.len()` bytes (`flags` added, e.g. a peek) with
/// the descriptors that come with them; more than a message may carry is
/// an error (they are closed).
fn read_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    flags: MsgFlags,
) -> Result<(usize, Vec<OwnedFd>), FramingError> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let received = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        flags | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for message in received.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = message {
            // SAFETY: the kernel just installed these descriptors in this
            // process for us; nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if received.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(FramingError::TooManyFds);
    }
    Ok((received.bytes, fds))
}

/// A reply to `request` with `payload`, as it goes on the socket.
pub fn reply_bytes(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut reply = Vec::with_capacity(HEADER_LEN + payload.len());
    reply.extend_from_slice(&request.to_le_bytes());
    reply.extend_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
    // Payloads are built here, a few dozen bytes at most.
    reply.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    reply.extend_from_slice(payload);
    reply
}

/// Writes a reply built by [`reply_bytes`]. The daemon's connections are
/// non-blocking: a reply that does not fit in the socket's buffer now fails
/// (a VMM that leaves that much unread is closed), it is never waited on.
pub fn send_reply(mut stream: &UnixStream, reply: &[u8]) -> io::Result<()> {
    stream.write_all(reply)
}

/// Reads the little-endian u32 at `offset` of `bytes` (which holds it).
fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

/// A payload read field by field, little-endian; too short is an error.
pub struct Payload<'a> {
    bytes: &'a [u8],
}

/// A payload shorter or longer than its message's layout.
#[derive(Debug, thiserror::Error)]
#[error("a payload of {got} bytes where {expected} belong")]
pub struct PayloadSize {
    /// Bytes the payload has.
    pub got: usize,
    /// Bytes its message's layout needs.
    pub expected: usize,
}

impl<'a> Payload<'a> {
    /// The payload, checked to be exactly `expected` bytes long.
    pub fn exact(bytes: &'a [u8], expected: usize) -> Result<Self, PayloadSize> {
        if bytes.len() == expected {
            Ok(Payload { bytes })
        } else {
            Err(PayloadSize {
                got: bytes.len(),
                expected,
            })
        }
    }

    /// The next field, a little-endian u32.
    ///
    /// # Panics
    ///
    /// If fewer than 4 bytes are left: read no more fields than the length
    /// checked by [`Payload::exact`] holds.
    pub fn u32(&mut self) -> u32 {
        let (word, rest) = self.bytes.split_at(4);
        self.bytes = rest;
        let mut array = [0u8; 4];
        array.copy_from_slice(word);
        u32::from_le_bytes(array)
    }

    /// The next field, a little-endian u64.
    ///
    /// # Panics
    ///
    /// If fewer than 8 bytes are left: read no more fields than the length
    /// checked by [`Payload::exact`] holds.
    pub fn u64(&mut self) -> u64 {
        let (word, rest) = self.bytes.split_at(8);
        self.bytes = rest;
        let mut array = [0u8; 8];
        array.copy_from_slice(word);
        u64::from_le_bytes(array)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
        [code, flags, size]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    #[test]
    fn a_message_is_read_only_once_whole_and_stays_until_consumed() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut message = header(2, VERSION_1, 8);
        message.extend_from_slice(&7u64.to_le_bytes());
        theirs.write_all(&message[..5]).unwrap();
        assert!(matches!(peek_message(&ours), Ok(Arrival::Partial)));
        theirs.write_all(&message[5..14]).unwrap();
        assert!(matches!(peek_message(&ours), Ok(Arrival::Partial)));
        theirs.write_all(&message[14..]).unwrap();
        // A second message behind it, with a descriptor.
        let (pipe, _) = nix::unistd::pipe().unwrap();
        let second = header(13, VERSION_1, 8);
        let fds = [pipe.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            theirs.as_raw_fd(),
            &[std::io::IoSlice::new(
                &[second, 0u64.to_le_bytes().to_vec()].concat(),
            )],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        for _ in 0..2 {
            // Read, not taken: the same message again.
            let Ok(Arrival::Message(read)) = peek_message(&ours) else {
                panic!("the whole message was there");
            };
            assert_eq!(
                (read.code, read.payload.len(), read.raw),
                (2, 8, message.clone())
            );
            let mut payload = Payload::exact(&read.payload, 8).unwrap();
            assert_eq!(payload.u64(), 7);
        }
        // (Its peek may have passed the next message's descriptor: only
        // taking it off says what it really carried.)
        assert_eq!(consume(&ours, message.len()).unwrap(), 0);
        for _ in 0..2 {
            let Ok(Arrival::Message(read)) = peek_message(&ours) else {
                panic!("the second message was there");
            };
            assert_eq!((read.code, read.fds.len()), (13, 1));
            assert!(crate::kcmp::same_file(read.fds[0].as_fd(), pipe.as_fd()));
        }
        assert_eq!(consume(&ours, HEADER_LEN + 8).unwrap(), 1);
        drop(theirs);
        assert!(matches!(peek_message(&ours), Ok(Arrival::Closed)));
    }

    #[test]
    fn bad_headers_are_refused_before_their_payload() {
        for (flags, size) in [(2, 0), (VERSION_1 | REPLY, 0), (VERSION_1, 4097)] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            theirs.write_all(&header(1, flags, size)).unwrap();
            assert!(peek_message(&ours).is_err(), "{flags} {size}");
        }
    }

    #[test]
    fn payload_sizes_are_exact() {
        assert!(Payload::exact(&[0; 7], 8).is_err());
        assert!(Payload::exact(&[0; 9], 8).is_err());
        let bytes = [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0];
        let mut payload = Payload::exact(&bytes, 16).unwrap();
        assert_eq!((payload.u32(), payload.u32(), payload.u64()), (1, 2, 3));
    }
}
