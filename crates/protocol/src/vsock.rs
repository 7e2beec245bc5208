// SPDX-License-Identifier: Apache-2.0
//! AF_VSOCK stream sockets, which the standard library does not have: the
//! agent's connection to the host and the daemon's accepted connections
//! (`--vsock PORT`) are both one of these.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, SockFlag, SockType, VsockAddr, setsockopt, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

/// Longer socket timeouts are cut to this (a day is "forever" here).
pub const MAX_IO_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// A connected AF_VSOCK stream socket.
#[derive(Debug)]
pub struct VsockStream {
    socket: OwnedFd,
}

impl VsockStream {
    /// Connects to `cid`:`port`; reads and writes then give up after
    /// `io_timeout`.
    pub fn connect(cid: u32, port: u32, io_timeout: Duration) -> io::Result<Self> {
        let socket = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // The kernel bounds the connect itself (2 s by default for vsock).
        socket::connect(socket.as_raw_fd(), &VsockAddr::new(cid, port))?;
        Self::from_connected(socket, io_timeout)
    }

    /// Wraps a connected stream socket, setting its read and write timeouts.
    pub(crate) fn from_connected(socket: OwnedFd, io_timeout: Duration) -> io::Result<Self> {
        let stream = VsockStream { socket };
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        Ok(stream)
    }

    /// Wraps a connection a listener accepted, leaving its timeouts alone.
    pub fn accepted(socket: OwnedFd) -> Self {
        VsockStream { socket }
    }

    /// `None`: reads wait as long as it takes.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Ok(setsockopt(
            &self.socket,
            sockopt::ReceiveTimeout,
            &timeval(timeout),
        )?)
    }

    /// `None`: writes wait as long as it takes.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Ok(setsockopt(
            &self.socket,
            sockopt::SendTimeout,
            &timeval(timeout),
        )?)
    }
}

/// A socket timeout as the kernel takes it: zero means "no timeout", so
/// `Some` of a zero (or sub-microsecond) duration becomes 1 µs instead, and
/// long ones are cut to [`MAX_IO_TIMEOUT`] so the conversion cannot
/// overflow.
fn timeval(timeout: Option<Duration>) -> TimeVal {
    let micros = timeout.map_or(0, |t| {
        t.clamp(Duration::from_micros(1), MAX_IO_TIMEOUT)
            .as_micros()
    });
    TimeVal::microseconds(i64::try_from(micros).unwrap_or(i64::MAX))
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(socket::recv(
            self.socket.as_raw_fd(),
            buf,
            MsgFlags::empty(),
        )?)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE.
        Ok(socket::send(
            self.socket.as_raw_fd(),
            buf,
            MsgFlags::MSG_NOSIGNAL,
        )?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl crate::deadline::TimedStream for VsockStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        VsockStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        VsockStream::set_write_timeout(self, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn vsock_stream_reads_writes_and_times_out() {
        // Any connected stream socket exercises the same recv/send calls
        // and socket options; this host need not have vsock.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut stream =
            VsockStream::from_connected(OwnedFd::from(ours), Duration::from_millis(50)).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        theirs.write_all(b"pong").unwrap();
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        let err = stream.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        drop(theirs);
        assert_eq!(stream.read(&mut buf).unwrap(), 0, "end of stream");
        let err = stream.write_all(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "no SIGPIPE: {err}");
    }

    #[test]
    fn no_timeout_is_zero_and_a_zero_timeout_is_not() {
        assert_eq!(timeval(None), TimeVal::microseconds(0));
        assert_eq!(timeval(Some(Duration::ZERO)), TimeVal::microseconds(1));
        assert_eq!(
            timeval(Some(Duration::MAX)),
            TimeVal::microseconds(MAX_IO_TIMEOUT.as_micros() as i64)
        );
    }
}
