// SPDX-License-Identifier: Apache-2.0
//! What every accept loop shares: a signal that wakes it to stop, and the
//! pause after a failed accept.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// How long a listener pauses after a failed accept. The usual cause (no
/// descriptors left) leaves the connection queued, so an immediate retry
/// would fail the same way, over and over, at full speed.
pub const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Wakes a shared listener's accept loop so that it ends.
pub struct StopSignal {
    event: EventFd,
}

impl StopSignal {
    /// A signal not yet raised (a non-blocking eventfd).
    pub fn new() -> io::Result<Self> {
        Ok(StopSignal {
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }

    /// Readable once the signal is raised, for loops that poll more.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is owned by `self`, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.event.as_raw_fd()) }
    }

    /// Raises the signal: the accept loop waiting on it returns. Raising it
    /// again does no harm.
    pub fn raise(&self) {
        let _ = self.event.write(1);
    }

    /// Waits until `listener` has a connection to accept (true) or the
    /// signal is raised (false), without waking up in between.
    pub fn wait_for_connection(&self, listener: BorrowedFd<'_>) -> bool {
        // SAFETY: the eventfd is owned by `self` and outlives the poll call.
        let stop = unsafe { BorrowedFd::borrow_raw(self.event.as_raw_fd()) };
        loop {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop, PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {
                    let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
                    return !stopped;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_stop_signal_ends_a_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let signal = Arc::new(StopSignal::new().unwrap());
        let raised = Arc::clone(&signal);
        let waiter = std::thread::spawn(move || raised.wait_for_connection(listener.as_fd()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        signal.raise();
        assert!(!waiter.join().unwrap());

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(
            StopSignal::new()
                .unwrap()
                .wait_for_connection(listener.as_fd())
        );
    }
}
