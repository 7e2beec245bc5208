// SPDX-License-Identifier: Apache-2.0
//! A client connection made of a fuzz input: reads hand out the input in
//! pieces of a size the input chooses (so that every split of a message
//! across reads is tried), then end of stream; writes are kept to be
//! checked. It passes for a socket where the daemon polls one: its
//! [`ClientStream::socket`] is an eventfd that always reads as readable.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

use vhost_rng::frontend::stream::ClientStream;
use vhost_rng_protocol::deadline::TimedStream;

/// Most bytes a client's answers are kept to: past this a write fails, as
/// one to a peer that stopped reading would.
const MAX_OUTPUT: usize = 1 << 20;

/// A scripted client: the bytes it sends, what it was answered.
#[derive(Debug)]
pub struct Client<'a> {
    input: &'a [u8],
    piece: usize,
    /// Everything written to the client, in order.
    pub output: Vec<u8>,
    /// Whether a write was refused for going past [`MAX_OUTPUT`]: the
    /// last answer may then be cut short.
    pub full: bool,
}

impl<'a> Client<'a> {
    /// A client that sends `bytes`, at most `piece` bytes a read (0 is
    /// taken as 1), then closes its side.
    pub fn new(bytes: &'a [u8], piece: usize) -> Self {
        Client {
            input: bytes,
            piece: piece.max(1),
            output: Vec::new(),
            full: false,
        }
    }

    /// A client whose first byte chooses the piece size (1 to 256, or the
    /// whole input for 0) and whose other bytes are what it sends.
    pub fn scripted(bytes: &'a [u8]) -> Self {
        let (piece, rest) = match bytes.split_first() {
            Some((0, rest)) => (rest.len(), rest),
            Some((&piece, rest)) => (usize::from(piece), rest),
            None => (1, bytes),
        };
        Client::new(rest, piece)
    }
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.input.len());
        let (sent, rest) = self.input.split_at(n);
        buf[..n].copy_from_slice(sent);
        self.input = rest;
        Ok(n)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.output.len() + buf.len() > MAX_OUTPUT {
            self.full = true;
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TimedStream for Client<'_> {
    fn set_read_timeout(&self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }

    fn set_write_timeout(&self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl ClientStream for Client<'_> {
    fn socket(&self) -> BorrowedFd<'_> {
        always_readable()
    }
}

/// An eventfd whose counter is never read: poll(2) always finds it
/// readable, as it finds a socket with data (or at its end).
fn always_readable() -> BorrowedFd<'static> {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| {
        // SAFETY: eventfd(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: a new descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .as_fd()
}
