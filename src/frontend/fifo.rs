// SPDX-License-Identifier: Apache-2.0
//! `fifo=` guests: a named pipe the daemon keeps filled from the guest's
//! stream, within the guest's token bucket, for VMMs that read a path
//! (QEMU `rng-random`, libvirt `<backend model='random'>`, OpenStack Nova's
//! `rng_dev_path`, cloud-hypervisor `--rng src=`, Kata's `entropy_source`).
//!
//! The daemon holds the pipe open for reading and writing, so readers can
//! come and go (a VMM restarts, several VMMs read one pipe) without the
//! daemon ever seeing EPIPE, and without a reader the pipe simply stays
//! full. The pipe is shrunk to [`PIPE_SIZE`] bytes: that much at most,
//! generated ahead, waits in the kernel. Writes are non-blocking and at
//! most [`PIPE_BUF`] bytes, so each goes in whole or not at all.
//!
//! The FIFO is left in place when the daemon stops, and used again when it
//! starts (a VMM that keeps it open is served by the next daemon); it is
//! removed only when its guest is removed.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vmm_sys_util::event::{EventFlag, new_event_consumer_and_notifier};

use super::accept::StopSignal;
use super::{Checkpoint, GuestFrontend, Handover};
use crate::guest::{Guest, Supplied};

/// The pipe's size: two pages, so a reader finds the next page written
/// while it reads one, and little generated data waits unread.
pub const PIPE_SIZE: usize = 8192;
/// The most written at once: a pipe write this size or smaller is atomic.
pub const PIPE_BUF: usize = libc::PIPE_BUF;

/// A `fifo=` guest being served.
pub struct FifoServer {
    guest: Arc<Guest>,
    path: PathBuf,
    /// Device and inode of the FIFO, so that removing the guest never
    /// removes a file someone put at the path after it.
    identity: (u64, u64),
    pipe: Arc<OwnedFd>,
    writer: Mutex<Option<(Arc<StopSignal>, JoinHandle<()>)>>,
    checkpoint: Mutex<Option<Checkpoint>>,
}

impl FifoServer {
    /// Serves `guest` on `pipe`, the FIFO at `path` (opened read-write and
    /// non-blocking, see [`super::socket_file::open_fifo`]).
    pub fn spawn(
        guest: Arc<Guest>,
        path: &Path,
        pipe: OwnedFd,
        identity: (u64, u64),
    ) -> io::Result<Arc<Self>> {
        match nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
            Ok(_) => {}
            Err(e) => warn!(
                "guest {}: {}: cannot shrink the pipe to {PIPE_SIZE} bytes ({e}); more \
                 generated data waits in it",
                guest.name(),
                path.display()
            ),
        }
        let server = Arc::new(FifoServer {
            guest,
            path: path.to_owned(),
            identity,
            pipe: Arc::new(pipe),
            writer: Mutex::new(None),
            checkpoint: Mutex::new(None),
        });
        server.start()?;
        Ok(server)
    }

    /// The FIFO's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reports the pipe to the top process now (it never changes), so that
    /// the next serving process writes to the same pipe.
    pub fn set_checkpoint(&self, checkpoint: Checkpoint) {
        match self.pipe.try_clone() {
            Ok(pipe) => checkpoint(Handover::Stream {
                listener: pipe,
                clients: Vec::new(),
            }),
            Err(e) => warn!(
                "guest {}: cannot copy its pipe for the top process: {e}",
                self.guest.name()
            ),
        }
        *self.lock_checkpoint() = Some(checkpoint);
    }

    fn lock_checkpoint(&self) -> std::sync::MutexGuard<'_, Option<Checkpoint>> {
        self.checkpoint.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Option<(Arc<StopSignal>, JoinHandle<()>)>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self) -> io::Result<()> {
        let stop = Arc::new(StopSignal::new()?);
        let (guest, pipe, signal) = (
            Arc::clone(&self.guest),
            Arc::clone(&self.pipe),
            Arc::clone(&stop),
        );
        let thread = thread::Builder::new()
            .name(format!("fifo-{}", self.guest.name()))
            .spawn(move || {
                crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Peer);
                if let Err(e) = fill(&guest, pipe.as_fd(), &signal) {
                    warn!("guest {}: stopped filling its FIFO: {e}", guest.name());
                }
            })?;
        *self.lock_writer() = Some((stop, thread));
        Ok(())
    }

    /// Stops the writer and waits for it: between two writes, so nothing
    /// is half written.
    fn halt(&self) {
        if let Some((stop, thread)) = self.lock_writer().take() {
            stop.raise();
            let _ = thread.join();
        }
    }
}

impl GuestFrontend for FifoServer {
    fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    /// Stops writing; the FIFO stays, for the next daemon.
    fn stop(&self) {
        self.halt();
    }

    fn remove_files(&self) {
        super::socket_file::remove_fifo(&self.path, self.identity);
    }

    fn handover(&self, _patience: Duration) -> Handover {
        self.halt();
        match self.pipe.try_clone() {
            Ok(pipe) => Handover::Stream {
                listener: pipe,
                clients: Vec::new(),
            },
            Err(e) => {
                self.thaw();
                Handover::Failed(format!("cannot copy its pipe: {e}"))
            }
        }
    }

    fn thaw(&self) {
        if let Err(e) = self.start() {
            warn!(
                "guest {}: cannot start filling its FIFO again: {e}",
                self.guest.name()
            );
        }
    }
}

/// What the writer waits for.
enum Wait<'a> {
    /// Room in the pipe.
    Room(BorrowedFd<'a>),
    /// The pool's wake-up for a starved guest.
    Wake(BorrowedFd<'a>),
    /// Tokens: a while.
    For(Duration),
}

/// Waits for `what`; false when the stop signal was raised instead.
fn wait(stop: &StopSignal, what: Wait<'_>) -> io::Result<bool> {
    let stop_fd = stop.fd();
    let (fd, flags, timeout) = match what {
        Wait::Room(fd) => (Some(fd), PollFlags::POLLOUT, PollTimeout::NONE),
        Wait::Wake(fd) => (Some(fd), PollFlags::POLLIN, PollTimeout::NONE),
        Wait::For(time) => (
            None,
            PollFlags::empty(),
            // At least a millisecond: a zero timeout would spin.
            PollTimeout::try_from(time.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX),
        ),
    };
    let mut fds = vec![PollFd::new(stop_fd, PollFlags::POLLIN)];
    if let Some(fd) = fd {
        fds.push(PollFd::new(fd, flags));
    }
    loop {
        match poll(&mut fds, timeout) {
            Ok(_) => return Ok(fds[0].revents().is_none_or(|r| r.is_empty())),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Bytes waiting in the pipe.
fn queued(pipe: BorrowedFd<'_>) -> usize {
    let mut bytes: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer, which is valid.
    let result = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut bytes) };
    if result < 0 {
        // Unknown: assume full, so that nothing is written that would not
        // fit; poll says when there is room.
        PIPE_SIZE
    } else {
        usize::try_from(bytes).unwrap_or(PIPE_SIZE)
    }
}

/// The writer: whenever the pipe has room, as many bytes as the guest's
/// bucket and the pool allow, a page at most; until `stop`.
fn fill(guest: &Guest, pipe: BorrowedFd<'_>, stop: &StopSignal) -> io::Result<()> {
    let (wake, notifier) =
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
    let name = guest.name().to_owned();
    let waker: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        if let Err(e) = notifier.notify() {
            warn!("guest {name}: cannot wake its FIFO writer: {e}");
        }
    });
    let mut stream = guest.pool().stream(waker, guest.weight());
    // SAFETY: the consumer owns this fd and outlives every use below.
    let wake_fd = unsafe { BorrowedFd::borrow_raw(wake.as_raw_fd()) };
    let errors = RateLimitedLog::per_minute(4);
    let mut buf = zeroize::Zeroizing::new([0u8; PIPE_BUF]);
    let mut pending: Range<usize> = 0..0;
    loop {
        if !wait(stop, Wait::Room(pipe))? {
            return Ok(());
        }
        if pending.is_empty() {
            let want = PIPE_SIZE.saturating_sub(queued(pipe)).min(PIPE_BUF);
            if want == 0 {
                // Room by poll's count of pages, not by bytes: a reader is
                // half-way through a page. Its next read makes room.
                if !wait(stop, Wait::For(Duration::from_millis(1)))? {
                    return Ok(());
                }
                continue;
            }
            match guest.supply(stream.as_mut(), &mut buf[..want], Instant::now()) {
                Supplied::Bytes(n) => pending = 0..n,
                Supplied::Starved => {
                    if !wait(stop, Wait::Wake(wake_fd))? {
                        return Ok(());
                    }
                    let _ = wake.consume();
                    continue;
                }
                Supplied::Throttled(time) => {
                    let began = Instant::now();
                    let going_on = wait(stop, Wait::For(time))?;
                    guest.stats.throttled_ns.fetch_add(
                        u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                    if !going_on {
                        return Ok(());
                    }
                    continue;
                }
            }
        }
        match nix::unistd::write(pipe, &buf[pending.clone()]) {
            Ok(written) => {
                pending.start += written;
                guest
                    .stats
                    .bytes
                    .fetch_add(written as u64, Ordering::Relaxed);
                guest.stats.requests.fetch_add(1, Ordering::Relaxed);
                guest.record(written as u64, Instant::now());
            }
            // No room after all (the last page was not empty enough): the
            // bytes wait here for the next chance.
            Err(Errno::EAGAIN) => {
                if !wait(stop, Wait::For(Duration::from_millis(1)))? {
                    return Ok(());
                }
            }
            Err(e) => {
                vhost_rng_protocol::log_limited!(
                    errors,
                    log::Level::Warn,
                    "guest {}: cannot write to its FIFO: {e}",
                    guest.name()
                );
                if !wait(stop, Wait::For(Duration::from_secs(1)))? {
                    return Ok(());
                }
            }
        }
    }
}

/// Logs the guest's FIFO as the registry starts serving it.
pub fn announce(guest: &Guest, path: &Path, spec: &impl std::fmt::Display) {
    info!(
        "guest {}: filling FIFO {} ({spec}; {PIPE_SIZE} bytes at most wait in it)",
        guest.name(),
        path.display()
    );
}
