// SPDX-License-Identifier: Apache-2.0
//! Reads and writes bounded by a deadline for the whole exchange.
//!
//! A socket timeout bounds each read or write, not their sum: a peer that
//! sends a byte just before each timeout would get as long as it liked.
//! These helpers re-arm the socket's timeout with what is left before the
//! deadline on every call, so a request, a handshake or an answer is over
//! by its deadline however the peer paces it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A stream whose reads and writes can time out.
pub trait TimedStream: Read + Write {
    /// Sets or clears the timeout of each read, as
    /// [`UnixStream::set_read_timeout`] does.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Sets or clears the timeout of each write, as
    /// [`UnixStream::set_write_timeout`] does.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedStream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl TimedStream for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

fn left_until(deadline: Instant, what: &'static str) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, what))
    } else {
        Ok(left)
    }
}

/// One read into `buf` (its byte count, 0 at the end of the stream),
/// giving up at `deadline`.
pub fn read_by(
    stream: &mut dyn TimedStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<usize> {
    loop {
        let left = left_until(deadline, "the request did not arrive in time")?;
        stream.set_read_timeout(Some(left))?;
        match stream.read(buf) {
            // A socket timeout shows as WouldBlock (EAGAIN): the loop's
            // deadline check decides.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            result => return result,
        }
    }
}

/// Fills `buf`, giving up at `deadline`.
pub fn read_exact_by(
    stream: &mut dyn TimedStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match read_by(stream, &mut buf[got..], deadline)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

/// Writes all of `data`, giving up at `deadline` however the peer paces
/// its reads.
pub fn write_all_by(
    stream: &mut dyn TimedStream,
    mut data: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    while !data.is_empty() {
        let left = left_until(deadline, "the peer is too slow to take the answer")?;
        stream.set_write_timeout(Some(left))?;
        match stream.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn a_dribbling_peer_is_cut_off_at_the_deadline_not_per_read() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let dribble = thread::spawn(move || {
            for _ in 0..20 {
                if theirs.write_all(b"x").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let err =
            read_exact_by(&mut ours, &mut buf, started + Duration::from_millis(300)).unwrap_err();
        // Each byte comes well within a per-read timeout of 300 ms, so with
        // one the read would have gone on to the end of the dribble (1 s)
        // and failed as an unexpected end; the whole-exchange deadline
        // stops it as timed out.
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(ours);
        dribble.join().unwrap();
    }

    #[test]
    fn a_whole_message_in_time_is_read() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        read_exact_by(&mut ours, &mut buf, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(&buf, b"hello");
        write_all_by(&mut ours, b"back", Instant::now() + Duration::from_secs(5)).unwrap();
        let mut back = [0u8; 4];
        theirs.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
    }
}
