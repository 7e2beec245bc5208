// SPDX-License-Identifier: Apache-2.0
//! The entropy link of `--isolation guest`: a guest process (which maps one
//! guest's memory and serves its queue) asks the main serving process for
//! each request's bytes, and the main serving process answers from that
//! guest's own stream through [`Guest::supply`] (its token bucket, the
//! global cap, its DRBG), so limits, counters and status stay in one place.
//!
//! Both ends are here: [`RemoteLink`] and [`RemoteSupply`] in the guest
//! process (a [`Supply`] behind [`super::device::RngDevice`]), and
//! [`LinkServer`] in the main serving process.
//!
//! The link is a `SOCK_SEQPACKET` socket pair, one per guest, plus an
//! eventfd the main serving process signals when a starved guest can be
//! served again. Messages have fixed layouts (little-endian):
//!
//! - ask, guest process to main, exactly [`ASK_LEN`] bytes: `tag=1`,
//!   `connected` (0 or 1), 2 zero bytes, `id` u32, `want` u32 (0: counters
//!   only, no answer), the guest process's `pid` u32, then deltas since the
//!   last ask of `connections` and `defective` requests (u32 each), 8 zero
//!   bytes. Requests and bytes are counted by the main serving process as
//!   it answers them.
//! - answer, main to guest process: `tag` (1 bytes, 2 throttled, 3
//!   starved), 3 zero bytes, the ask's `id` u32, the wait in nanoseconds u64
//!   (throttled), then the bytes (at most `want`).
//!
//! From the main serving process's side a guest process may be compromised:
//! every ask is checked (size, tag, padding, `want` at most
//! [`MAX_REQUEST_BYTES`]) and a wrong one is dropped unanswered; one ask is
//! answered at a time, from this guest's stream and under this guest's
//! limits only, so a guest process can never get another guest's bytes nor
//! more than its guest may have.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, info, warn};
use nix::sys::socket::{MsgFlags, Shutdown, recv, send, shutdown};
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::request::{MAX_REQUEST_BYTES, Supplied, Supply};
use crate::guest::{Guest, GuestStats};

/// Size of an ask.
pub const ASK_LEN: usize = 32;
/// Size of an answer's header; the bytes follow.
pub const ANSWER_HEADER: usize = 16;

const TAG_ASK: u8 = 1;
const TAG_BYTES: u8 = 1;
const TAG_THROTTLED: u8 = 2;
const TAG_STARVED: u8 = 3;

/// How long a guest process waits for an answer before it gives up on this
/// one and retries after [`RETRY`]: a main serving process that is being
/// restarted answers nothing.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// When a request that got no answer is tried again.
const RETRY: Duration = Duration::from_millis(250);

/// What a guest process asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    /// Echoed in the answer; answers to other ids are stale.
    pub id: u32,
    /// Bytes for one request; 0 to pass counters only.
    pub want: u32,
    /// The guest process's pid, as it says (shown in status).
    pub pid: u32,
    /// Whether its VMM is connected now.
    pub connected: bool,
    /// New VMM connections since the last ask.
    pub connections: u32,
    /// Defective requests (answered with 0 bytes without asking) since the
    /// last ask.
    pub defective: u32,
}

/// Why an ask was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskDefect {
    /// Not [`ASK_LEN`] bytes.
    #[error("an ask of {0} bytes (asks are {ASK_LEN})")]
    Size(usize),
    /// Not an ask.
    #[error("unknown message tag {0}")]
    Tag(u8),
    /// A flag or padding byte that must be 0 or 1 is not.
    #[error("malformed ask")]
    Malformed,
    /// More than one request may have.
    #[error("an ask for {0} bytes, more than a request may have ({MAX_REQUEST_BYTES})")]
    TooLarge(u32),
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

impl Ask {
    /// The wire form.
    pub fn encode(&self) -> [u8; ASK_LEN] {
        let mut out = [0u8; ASK_LEN];
        out[0] = TAG_ASK;
        out[1] = u8::from(self.connected);
        for (at, value) in [
            (4, self.id),
            (8, self.want),
            (12, self.pid),
            (16, self.connections),
            (20, self.defective),
        ] {
            out[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// Reads and checks an ask from a guest process.
    pub fn decode(bytes: &[u8]) -> Result<Ask, AskDefect> {
        if bytes.len() != ASK_LEN {
            return Err(AskDefect::Size(bytes.len()));
        }
        if bytes[0] != TAG_ASK {
            return Err(AskDefect::Tag(bytes[0]));
        }
        if bytes[1] > 1 || bytes[2..4] != [0, 0] || bytes[24..32] != [0; 8] {
            return Err(AskDefect::Malformed);
        }
        let ask = Ask {
            connected: bytes[1] == 1,
            id: u32_at(bytes, 4),
            want: u32_at(bytes, 8),
            pid: u32_at(bytes, 12),
            connections: u32_at(bytes, 16),
            defective: u32_at(bytes, 20),
        };
        if ask.want as usize > MAX_REQUEST_BYTES {
            return Err(AskDefect::TooLarge(ask.want));
        }
        Ok(ask)
    }
}

/// The guest process's end, installed once for the whole process (a guest
/// process serves one guest).
pub struct RemoteLink {
    socket: OwnedFd,
    wake: OwnedFd,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    next_id: u32,
    /// Counters as last passed on: connections, defective requests.
    sent: (u64, u64),
    answer: Vec<u8>,
}

static INSTALLED: OnceLock<Arc<RemoteLink>> = OnceLock::new();

/// Makes every device of this process draw through `link`.
pub fn install(link: Arc<RemoteLink>) {
    let _ = INSTALLED.set(link);
}

/// The link of this guest process, if it is one.
pub fn installed() -> Option<Arc<RemoteLink>> {
    INSTALLED.get().cloned()
}

impl RemoteLink {
    /// The guest process's end of the link and the wake eventfd.
    pub fn new(socket: OwnedFd, wake: OwnedFd) -> io::Result<RemoteLink> {
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0),
        )?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::SendTimeout,
            &nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0),
        )?;
        // Ids start somewhere new in each guest process, so that an answer
        // meant for a dead predecessor is not taken for ours.
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        Ok(RemoteLink {
            socket,
            wake,
            state: Mutex::new(LinkState {
                next_id: u32::from_le_bytes(seed),
                sent: (0, 0),
                answer: vec![0; ANSWER_HEADER + MAX_REQUEST_BYTES],
            }),
        })
    }

    /// The wake eventfd, for the guest process's event loop to wait on.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Takes what the wake eventfd holds (it is non-blocking; nothing there
    /// is no error worth a word).
    pub fn take_wake(&self) {
        let mut count = [0u8; 8];
        let _ = nix::unistd::read(&self.wake, &mut count);
    }

    /// A consumer of the wake eventfd for a device.
    pub fn wake_consumer(&self) -> io::Result<EventConsumer> {
        let copy = self.wake.try_clone()?;
        // SAFETY: `copy` is an eventfd we own; the consumer takes it over.
        Ok(unsafe { EventConsumer::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(copy)) })
    }

    /// Passes the guest's counters on, asking for nothing.
    pub fn report(&self, stats: &GuestStats) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ask = state.ask(0, stats);
        let _ = send(
            self.socket.as_raw_fd(),
            &ask.encode(),
            MsgFlags::MSG_NOSIGNAL,
        );
    }

    /// One request's bytes from the main serving process.
    pub fn supply(&self, stats: &GuestStats, buf: &mut [u8]) -> Supplied {
        let want = buf.len().min(MAX_REQUEST_BYTES);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ask = state.ask(want as u32, stats);
        if send(
            self.socket.as_raw_fd(),
            &ask.encode(),
            MsgFlags::MSG_NOSIGNAL,
        )
        .is_err()
        {
            return Supplied::Throttled(RETRY);
        }
        loop {
            let got = match recv(
                self.socket.as_raw_fd(),
                &mut state.answer,
                MsgFlags::empty(),
            ) {
                Ok(got) if got >= ANSWER_HEADER => got,
                // Shorter than a header: not an answer.
                Ok(got) if got > 0 => continue,
                // A timeout, or no main serving process: try again later.
                _ => return Supplied::Throttled(RETRY),
            };
            let answer = &state.answer[..got];
            if u32_at(answer, 4) != ask.id {
                continue;
            }
            return match answer[0] {
                TAG_BYTES => {
                    let bytes = &answer[ANSWER_HEADER..];
                    let n = bytes.len().min(want);
                    buf[..n].copy_from_slice(&bytes[..n]);
                    if n == 0 {
                        Supplied::Starved
                    } else {
                        Supplied::Bytes(n)
                    }
                }
                TAG_THROTTLED => {
                    let mut nanos = [0u8; 8];
                    nanos.copy_from_slice(&answer[8..16]);
                    Supplied::Throttled(Duration::from_nanos(u64::from_le_bytes(nanos)))
                }
                _ => Supplied::Starved,
            };
        }
    }
}

impl LinkState {
    fn ask(&mut self, want: u32, stats: &GuestStats) -> Ask {
        let now = (
            stats.connections.load(Ordering::Relaxed),
            stats.defective_requests.load(Ordering::Relaxed),
        );
        let delta =
            |now: u64, sent: u64| u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX);
        let ask = Ask {
            id: self.next_id,
            want,
            pid: std::process::id(),
            connected: stats.connected.load(Ordering::Relaxed),
            connections: delta(now.0, self.sent.0),
            defective: delta(now.1, self.sent.1),
        };
        self.sent = now;
        self.next_id = self.next_id.wrapping_add(1);
        ask
    }
}

/// A request's bytes, from the main serving process over the link.
pub struct RemoteSupply<'a> {
    link: &'a RemoteLink,
    stats: &'a GuestStats,
}

impl<'a> RemoteSupply<'a> {
    /// Draws through `link`, passing on `stats` with each request.
    pub fn new(link: &'a RemoteLink, stats: &'a GuestStats) -> Self {
        RemoteSupply { link, stats }
    }
}

impl Supply for RemoteSupply<'_> {
    fn supply(&mut self, buf: &mut [u8]) -> Supplied {
        self.link.supply(self.stats, buf)
    }
}

/// The main serving process's end of one guest's link: a thread that
/// answers the guest process's asks from the guest's own stream.
pub struct LinkServer {
    socket: OwnedFd,
    stopping: AtomicBool,
    /// The guest process's pid as it last said; 0 before its first ask.
    pid: AtomicU32,
    log: RateLimitedLog,
}

impl LinkServer {
    /// Serves `guest` on `socket` (the main serving process's end), waking
    /// the guest process through the eventfd `wake`.
    pub fn spawn(guest: Arc<Guest>, socket: OwnedFd, wake: OwnedFd) -> io::Result<Arc<LinkServer>> {
        // SAFETY: `wake` is an eventfd we own; the notifier takes it over.
        let notifier =
            unsafe { EventNotifier::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(wake)) };
        let name = guest.name().to_owned();
        let waker: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Err(e) = notifier.notify() {
                warn!("guest {name}: cannot wake its guest process: {e}");
            }
        });
        let stream = guest.pool().stream(waker, guest.weight());
        let server = Arc::new(LinkServer {
            socket,
            stopping: AtomicBool::new(false),
            pid: AtomicU32::new(0),
            log: RateLimitedLog::per_minute(4),
        });
        let serving = Arc::clone(&server);
        thread::Builder::new()
            .name(format!("link-{}", guest.name()))
            .spawn(move || {
                crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Peer);
                serving.run(&guest, stream);
            })?;
        Ok(server)
    }

    /// The guest process's pid, as it said; none before it asked anything.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&pid| pid != 0)
    }

    /// Ends the thread.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = shutdown(self.socket.as_raw_fd(), Shutdown::Both);
    }

    fn run(&self, guest: &Guest, mut stream: Box<dyn crate::entropy::pool::EntropyStream>) {
        let mut ask = [0u8; ASK_LEN];
        let mut answer = vec![0u8; ANSWER_HEADER + MAX_REQUEST_BYTES];
        while !self.stopping.load(Ordering::SeqCst) {
            // MSG_TRUNC: the real length of a longer message, so that it
            // is refused rather than read in part.
            let got = match recv(self.socket.as_raw_fd(), &mut ask, MsgFlags::MSG_TRUNC) {
                // An empty message, or the end: only a hang-up ends it.
                Ok(0) if self.hung_up() => break,
                Ok(0) => {
                    log_limited!(
                        self.log,
                        Level::Warn,
                        "guest {}: its guest process sent an empty message on the entropy \
                         link; dropped",
                        guest.name()
                    );
                    continue;
                }
                Ok(got) => got,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("guest {}: its entropy link failed: {e}", guest.name());
                    break;
                }
            };
            let received = match Ask::decode(&ask[..got.min(ASK_LEN)]) {
                Ok(_) if got > ASK_LEN => Err(AskDefect::Size(got)),
                decoded => decoded,
            };
            let asked = match received {
                Ok(asked) => asked,
                Err(defect) => {
                    log_limited!(
                        self.log,
                        Level::Warn,
                        "guest {}: its guest process sent a bad message on the entropy link \
                         ({defect}); dropped",
                        guest.name()
                    );
                    continue;
                }
            };
            let len = self.answer(guest, stream.as_mut(), &asked, &mut answer);
            if len == 0 {
                continue;
            }
            let sent = loop {
                match send(
                    self.socket.as_raw_fd(),
                    &answer[..len],
                    MsgFlags::MSG_NOSIGNAL,
                ) {
                    Err(nix::errno::Errno::EINTR) => {}
                    sent => break sent,
                }
            };
            if let Err(e) = sent {
                if self.stopping.load(Ordering::SeqCst) {
                    break;
                }
                log_limited!(
                    self.log,
                    Level::Warn,
                    "guest {}: cannot answer its guest process: {e}",
                    guest.name()
                );
            }
        }
        info!("guest {}: entropy link closed", guest.name());
    }

    /// Whether the other end is gone (or shut its side down).
    fn hung_up(&self) -> bool {
        // POLLRDHUP: the guest process shut its side down.
        let rdhup = nix::poll::PollFlags::from_bits_retain(libc::POLLRDHUP);
        let mut fds = [nix::poll::PollFd::new(self.socket.as_fd(), rdhup)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO);
        fds[0]
            .revents()
            .is_some_and(|r| r.intersects(nix::poll::PollFlags::POLLHUP | rdhup))
            || self.stopping.load(Ordering::SeqCst)
    }

    /// Takes `asked`'s counters and writes its answer; the answer's length
    /// (0: none).
    fn answer(
        &self,
        guest: &Guest,
        stream: &mut dyn crate::entropy::pool::EntropyStream,
        asked: &Ask,
        answer: &mut [u8],
    ) -> usize {
        self.pid.store(asked.pid, Ordering::Relaxed);
        let stats = &guest.stats;
        stats.connected.store(asked.connected, Ordering::Relaxed);
        stats
            .connections
            .fetch_add(u64::from(asked.connections), Ordering::Relaxed);
        // A defective request is a completed one too.
        stats
            .requests
            .fetch_add(u64::from(asked.defective), Ordering::Relaxed);
        stats
            .defective_requests
            .fetch_add(u64::from(asked.defective), Ordering::Relaxed);
        if asked.want == 0 {
            return 0;
        }
        answer[..ANSWER_HEADER].fill(0);
        answer[4..8].copy_from_slice(&asked.id.to_le_bytes());
        let want = asked.want as usize;
        let now = Instant::now();
        match guest.supply(
            stream,
            &mut answer[ANSWER_HEADER..ANSWER_HEADER + want],
            now,
        ) {
            Supplied::Bytes(n) => {
                let n = n.min(want);
                answer[0] = TAG_BYTES;
                stats.requests.fetch_add(1, Ordering::Relaxed);
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                guest.record(n as u64, now);
                ANSWER_HEADER + n
            }
            Supplied::Throttled(wait) => {
                answer[0] = TAG_THROTTLED;
                let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                answer[8..16].copy_from_slice(&nanos.to_le_bytes());
                ANSWER_HEADER
            }
            Supplied::Starved => {
                answer[0] = TAG_STARVED;
                ANSWER_HEADER
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    #[test]
    fn an_ask_survives_its_wire_form_and_bad_ones_are_refused() {
        let ask = Ask {
            id: 7,
            want: 64,
            pid: 42,
            connected: true,
            connections: 1,
            defective: 3,
        };
        assert_eq!(Ask::decode(&ask.encode()), Ok(ask));
        let mut bad = ask.encode();
        bad[0] = 9;
        assert_eq!(Ask::decode(&bad), Err(AskDefect::Tag(9)));
        let mut bad = ask.encode();
        bad[1] = 2;
        assert_eq!(Ask::decode(&bad), Err(AskDefect::Malformed));
        let mut bad = ask.encode();
        bad[30] = 1;
        assert_eq!(Ask::decode(&bad), Err(AskDefect::Malformed));
        let big = Ask {
            want: MAX_REQUEST_BYTES as u32 + 1,
            ..ask
        };
        assert!(matches!(
            Ask::decode(&big.encode()),
            Err(AskDefect::TooLarge(_))
        ));
        assert_eq!(Ask::decode(&[1; 31]), Err(AskDefect::Size(31)));
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn test_guest(limits: crate::guest::GuestLimits) -> Arc<Guest> {
        let pool = crate::entropy::pool::Pool::start(crate::entropy::pool::PoolConfig {
            sources: vec!["os".parse().unwrap()],
            mode: crate::entropy::pool::Mode::Drbg,
            reseed: crate::entropy::drbg::ReseedPolicy::default(),
        })
        .unwrap();
        Guest::with_limits("g", pool, limits, crate::guest::SharedBucket::default())
    }

    fn wake() -> OwnedFd {
        let event = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).unwrap();
        // SAFETY: the EventFd's descriptor is ours to take.
        unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(event)) }
    }

    /// Every hostile message is dropped, the server goes on answering, and
    /// what it answers stays within the guest's limit.
    #[test]
    fn a_hostile_guest_process_gets_nothing_beyond_its_guests_limit() {
        let limits = crate::guest::GuestLimits {
            rate: Some(crate::guest::limiter::RateLimit::new(1000, 3_600_000, 1000).unwrap()),
            ..Default::default()
        };
        let guest = test_guest(limits);
        // A full bucket: 1000 bytes now, then (nearly) nothing for an hour.
        guest.restore_tokens(1000);
        let (ours, theirs) = pair();
        let wake = wake();
        let server =
            LinkServer::spawn(Arc::clone(&guest), ours, wake.try_clone().unwrap()).unwrap();
        // Garbage of every size, a too-large ask, and descriptors.
        for garbage in [
            vec![],
            vec![0xff; 1],
            vec![1; 31],
            vec![1; 33],
            vec![7; 4096],
        ] {
            send(theirs.as_raw_fd(), &garbage, MsgFlags::MSG_NOSIGNAL).unwrap();
        }
        let too_big = Ask {
            want: 1 << 20,
            ..Ask::default()
        };
        let mut bytes = too_big.encode();
        bytes[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        send(theirs.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL).unwrap();
        // Asks for far more than the limit, many times over.
        let link = RemoteLink::new(theirs, wake).unwrap();
        let woken = link.wake_consumer().unwrap();
        let stats = GuestStats::default();
        let mut got = 0usize;
        let mut throttled = 0;
        let mut buf = vec![0u8; MAX_REQUEST_BYTES];
        for _ in 0..1000 {
            match link.supply(&stats, &mut buf) {
                Supplied::Bytes(n) => got += n,
                Supplied::Throttled(_) => throttled += 1,
                // The sources are still starting: wait for the pool.
                Supplied::Starved => {
                    let fd = [nix::poll::PollFd::new(
                        // SAFETY: `woken` outlives the poll.
                        unsafe { std::os::fd::BorrowedFd::borrow_raw(woken.as_raw_fd()) },
                        nix::poll::PollFlags::POLLIN,
                    )];
                    nix::poll::poll(&mut { fd }, nix::poll::PollTimeout::NONE).unwrap();
                    woken.consume().unwrap();
                }
            }
            if throttled > 3 {
                break;
            }
        }
        // The bucket's burst is its rate for the period (1000 bytes).
        // (plus what an hour-long period refills while the test runs: < 1)
        assert!(got <= 1001, "got {got} bytes past a 1000-byte limit");
        assert!(got > 0);
        assert!(throttled > 0);
        assert_eq!(guest.stats.bytes.load(Ordering::Relaxed), got as u64);
        assert_eq!(server.pid(), Some(std::process::id()));
        server.stop();
    }
}
