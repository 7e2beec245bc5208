// SPDX-License-Identifier: Apache-2.0
//! Serving one guest's vhost-user connections, one after another, for as
//! long as the daemon runs: a VM shutting down, rebooting or crashing ends a
//! connection, never the guest's service.
//!
//! A [`GuestServer`] is the daemon's handle on one guest; the guest's
//! socket, VMM connection and queue are served by one of a few event loops
//! shared by all guests ([`super::event_loop`]): it waits for the VMM, reads
//! its messages ([`super::handler`], one at a time, each handled here by
//! `handle_message`) and answers the guest's requests when it kicks, when
//! the pool can serve a starved request again, or when a throttled guest
//! has tokens again. Nothing a VMM sends can block a loop: a message is
//! read only once it has arrived whole, replies are written without
//! waiting, a connection must claim the device (SET_OWNER), and a begun
//! message must arrive whole, within [`VhostUserLimits::timeout`], or the
//! connection is closed to make way for the next one.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use log::warn;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{self, Arrival};
use super::event_loop::{self, Command, LoopHandle};
use super::handler::Handler;
use super::memory::MemoryLimits;
use super::snapshot::ConnectionState;
use super::{dispatch, fault_guard};
use crate::frontend::socket_file::GuestSocket;
use crate::guest::Guest;

/// How a guest's VMM reaches the daemon.
#[derive(Debug)]
pub enum Endpoint {
    /// The daemon listens; the VMM connects (QEMU `-chardev socket,path=`).
    Listen(GuestSocket),
    /// The VMM listens; the daemon connects, and connects again after each
    /// connection ends (QEMU `-chardev socket,server=on`).
    Connect(PathBuf),
}

impl Endpoint {
    /// The socket's path: the one the daemon listens on, or the VMM's it
    /// connects to.
    pub fn path(&self) -> &Path {
        match self {
            Endpoint::Listen(socket) => socket.path(),
            Endpoint::Connect(path) => path,
        }
    }
}

/// What one VMM connection may cost the daemon, and how long it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostUserLimits {
    /// What a connection may map of the guest's memory.
    pub memory: MemoryLimits,
    /// From accepting a connection to its SET_OWNER; also how long the
    /// rest of a begun message may take to arrive. (Replies are never waited
    /// on: one that does not fit in the socket's buffer ends the
    /// connection.)
    pub timeout: Duration,
}

/// QEMU and cloud-hypervisor send SET_OWNER within milliseconds of
/// connecting, and a message is a few KiB on a local socket; ten seconds
/// leaves room for a loaded host.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for VhostUserLimits {
    fn default() -> Self {
        VhostUserLimits {
            memory: MemoryLimits::default(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A running guest server; the daemon keeps it to stop it. Its socket,
/// VMM connection and queue are served by one of a few event loops shared
/// by every vhost-user guest ([`super::event_loop`]).
pub struct GuestServer {
    guest: Arc<Guest>,
    endpoint: Endpoint,
    limits: VhostUserLimits,
    stopping: AtomicBool,
    /// Told what the guest holds after every change (crash survival).
    checkpoint: Option<crate::frontend::Checkpoint>,
    /// Its place in its loop.
    slot: u64,
    event_loop: LoopHandle,
}

/// A guest's VMM connection, handed over by its parked thread: the socket,
/// its device state, and the descriptors the state indexes.
pub struct FrozenConnection {
    /// A duplicate of the VMM's connection.
    pub socket: OwnedFd,
    /// What the VMM negotiated, its memory table and its ring.
    pub state: ConnectionState,
    /// Duplicates of the descriptors `state` indexes, in order.
    pub fds: Vec<OwnedFd>,
}

/// What a parked guest hands over.
pub enum Frozen {
    /// No VMM was connected.
    Idle,
    /// A VMM was connected: its connection and device state.
    Connected(FrozenConnection),
    /// The connection could not be captured (out of descriptors, most
    /// likely); the upgrade must not go ahead.
    Failed(String),
}

/// A connection taken over from a previous daemon, served first.
pub struct Resumed {
    /// The VMM's connection, inherited.
    pub stream: UnixStream,
    /// Its device state, restored from the hand-over.
    pub handler: Handler,
}

impl GuestServer {
    /// Starts serving `guest` on `endpoint`, in one of the shared event
    /// loops.
    pub fn spawn(
        guest: Arc<Guest>,
        endpoint: Endpoint,
        limits: VhostUserLimits,
    ) -> io::Result<Arc<Self>> {
        Self::spawn_resumed(guest, endpoint, limits, None, None)
    }

    /// Like [`GuestServer::spawn`], serving `resumed` (a connection a
    /// previous daemon handed over) first.
    pub fn spawn_resumed(
        guest: Arc<Guest>,
        endpoint: Endpoint,
        limits: VhostUserLimits,
        resumed: Option<Resumed>,
        checkpoint: Option<crate::frontend::Checkpoint>,
    ) -> io::Result<Arc<Self>> {
        fault_guard::install();
        let dials = matches!(endpoint, Endpoint::Connect(_));
        let (slot, event_loop) = event_loop::assign(dials)?;
        let server = Arc::new(GuestServer {
            guest,
            endpoint,
            limits,
            stopping: AtomicBool::new(false),
            checkpoint,
            slot,
            event_loop,
        });
        server
            .event_loop
            .send(Command::Add(Arc::clone(&server), resumed.map(Box::new)))?;
        Ok(server)
    }

    /// Parks the guest at its next safe point (between two vhost-user
    /// messages: its loop handles one message at a time) and returns what
    /// it hands over; it stays parked until [`GuestServer::thaw`], or until
    /// the process is replaced.
    pub fn freeze(&self, patience: Duration) -> Frozen {
        let (sender, receiver) = mpsc::channel();
        if let Err(e) = self.event_loop.send(Command::Freeze(self.slot, sender)) {
            return Frozen::Failed(format!("cannot wake the guest's event loop: {e}"));
        }
        receiver.recv_timeout(patience).unwrap_or_else(|_| {
            Frozen::Failed("the guest's event loop did not park it in time".into())
        })
    }

    /// Lets a parked guest go on serving (an upgrade that did not happen).
    pub fn thaw(&self) {
        if let Err(e) = self.event_loop.send(Command::Thaw(self.slot)) {
            warn!(
                "guest {}: cannot wake its event loop to go on: {e}",
                self.guest.name()
            );
        }
    }

    /// Tells the checkpoint watcher (if any) what the guest holds now.
    pub(super) fn report(&self, connection: Option<(&UnixStream, &Handler)>) {
        let Some(checkpoint) = &self.checkpoint else {
            return;
        };
        let listener = self.listener_duplicate().ok().flatten();
        let connection = match connection.map(capture).transpose() {
            Ok(connection) => connection,
            Err(e) => {
                warn!(
                    "guest {}: cannot record its connection for crash survival: {e}",
                    self.guest.name()
                );
                return;
            }
        };
        checkpoint(crate::frontend::Handover::VhostUser {
            listener,
            connection,
        });
    }

    /// The guest this server serves.
    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    /// A duplicate of the listening socket (`socket=` guests), to hand over.
    pub fn listener_duplicate(&self) -> io::Result<Option<OwnedFd>> {
        match &self.endpoint {
            Endpoint::Listen(socket) => socket.duplicate().map(Some),
            Endpoint::Connect(_) => Ok(None),
        }
    }

    /// The guest's vhost-user socket path, listened on or connected to.
    pub fn path(&self) -> &Path {
        self.endpoint.path()
    }

    /// Ends the current connection (if any) and stops taking new ones;
    /// removes the socket file if the daemon created it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.event_loop.send(Command::Stop(self.slot)) {
            warn!(
                "guest {}: cannot wake its event loop to stop: {e}",
                self.guest.name()
            );
        }
        if let Endpoint::Listen(socket) = &self.endpoint {
            socket.remove();
        }
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(super) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub(super) fn slot(&self) -> u64 {
        self.slot
    }

    pub(super) fn limits(&self) -> VhostUserLimits {
        self.limits
    }
}

/// Handles one whole `message` peeked on `connection`: a repeat of the one
/// a process that died had answered is only taken off and answered again;
/// anything else is dispatched (under the fault guard), recorded
/// (`after_message`), taken off the socket and answered, without blocking.
/// `Err` says why the connection must close.
pub(super) fn handle_message(
    connection: &UnixStream,
    handler: &mut Handler,
    mut message: connection::Message,
    after_message: &dyn Fn(&UnixStream, &Handler),
) -> Result<(), String> {
    // A peek of a message without descriptors may pass the next
    // message's: dropped here, and what the message really carried is
    // counted when it is taken off.
    let expects_fds = dispatch::expects_fds(message.code, &message.payload);
    if !expects_fds {
        message.fds.clear();
    }
    let (code, peeked_fds) = (message.code, message.fds.len());
    let len = message.raw.len();
    // The message a process that died had handled and recorded, left
    // on the socket: taken off and answered again, not handled twice.
    let taken_off = |reply: Option<&[u8]>| {
        finish(connection, len, reply, |fds| {
            let expected = if expects_fds { peeked_fds } else { 0 };
            fds == expected || (code == dispatch::REM_MEM_REG && fds <= 1)
        })
    };
    if let Some(reply) = handler.repeat_of_answered(&message) {
        return taken_off(reply.as_deref());
    }
    let raw = message.raw.clone();
    // Guest memory is touched by some messages too (a kick fd set on
    // a ring with requests waiting).
    let (result, faults) = fault_guard::guarded(|| dispatch::dispatch(handler, message));
    if faults > 0 {
        return Err(format!(
            "its guest memory file shrank under the daemon ({faults} fault(s))"
        ));
    }
    let handled = result?;
    // Recorded before the message leaves the socket: a process that
    // dies from here on is replaced by one that knows it was handled.
    // (Queries are recorded too: their reply must not be lost.)
    handler.set_answered(raw, handled.reply.clone());
    after_message(connection, handler);
    test_hooks::after_report(&handled);
    taken_off(handled.reply.as_deref())?;
    // A VMM that sends without reading the replies is closed long
    // before its socket fills and a reply would wait on it.
    if let Some(unread) = unread_replies(connection)
        && unread > MAX_UNREAD_REPLIES
    {
        return Err(format!("the VMM left {unread} bytes of replies unread"));
    }
    Ok(())
}

/// Serves one connection on the calling thread until it ends or `stop`
/// becomes readable; the caller owns the connection, the handler and the
/// stop event, so a stopped connection can be taken over (see
/// [`Handler::snapshot`]). The daemon serves its guests in event loops
/// instead; this is the same handling, for one connection.
pub fn run_connection(
    connection: &UnixStream,
    handler: &mut Handler,
    stop: BorrowedFd<'_>,
    limit: Duration,
) -> Ended {
    let wake = match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
        Ok(wake) => Arc::new(wake),
        Err(e) => return Ended::Closed(format!("cannot make a wake-up eventfd: {e}")),
    };
    let notify = Arc::clone(&wake);
    handler.wake().bind(Arc::new(move || {
        let _ = notify.write(1);
    }));
    handler.on_wake();
    let setup_deadline = Instant::now() + limit;
    let mut message_deadline: Option<Instant> = None;
    loop {
        let deadline = match (handler.owned(), message_deadline) {
            (_, Some(deadline)) => Some((deadline, "to finish a message")),
            (false, None) => Some((setup_deadline, "to claim the device (SET_OWNER)")),
            (true, None) => None,
        };
        if let Some((deadline, what)) = deadline
            && deadline <= Instant::now()
        {
            return Ended::Closed(format!("the VMM took longer than {limit:?} {what}"));
        }
        let next = [deadline.map(|(at, _)| at), handler.throttled_until()]
            .into_iter()
            .flatten()
            .min();
        let timeout = next.map_or(PollTimeout::NONE, |at| {
            timeout_of(at.saturating_duration_since(Instant::now()))
        });
        // SAFETY: the EventFd lives in `wake` for the whole call.
        let wake_fd = unsafe { BorrowedFd::borrow_raw(wake.as_raw_fd()) };
        let mut fds = vec![
            PollFd::new(stop, PollFlags::POLLIN),
            PollFd::new(wake_fd, PollFlags::POLLIN),
        ];
        // A part of a message stays readable: not waited on until its
        // deadline (or a stop).
        if message_deadline.is_none() {
            fds.push(PollFd::new(connection.as_fd(), PollFlags::POLLIN));
        }
        if let Some(kick) = handler.kick_fd() {
            fds.push(PollFd::new(kick, PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Ended::Closed(format!("waiting for events: {e}")),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            return Ended::Stopped;
        }
        if ready[1] {
            let _ = wake.read();
            handler.on_wake();
        }
        if let Some(kick) = handler.kick_fd()
            && ready.last() == Some(&true)
        {
            // poll(2) is level-triggered: the kick is taken here, where
            // the event loops wait on it edge-triggered and never read it.
            let _ = nix::unistd::read(kick, &mut [0u8; 8]);
            handler.on_kick();
        }
        if handler
            .throttled_until()
            .is_some_and(|at| at <= Instant::now())
        {
            handler.on_timer();
        }
        if let Some(refusal) = handler.take_fatal() {
            return Ended::Closed(format!("the VMM's guest memory is unusable: {refusal}"));
        }
        loop {
            match connection::peek_message(connection) {
                Ok(Arrival::Message(message)) => {
                    message_deadline = None;
                    if let Err(reason) = handle_message(connection, handler, message, &|_, _| {}) {
                        return Ended::Closed(reason);
                    }
                }
                Ok(Arrival::Empty) => break,
                Ok(Arrival::Closed) => return Ended::Disconnected,
                Ok(Arrival::Partial) => {
                    message_deadline.get_or_insert(Instant::now() + limit);
                    // Looked at again when its deadline comes, or sooner.
                    let _ = poll(
                        &mut [PollFd::new(stop, PollFlags::POLLIN)],
                        timeout_of(PARTIAL_MESSAGE_POLL),
                    );
                    break;
                }
                Err(e) => return Ended::Closed(format!("bad message from the VMM: {e}")),
            }
        }
    }
}

/// How often [`run_connection`] looks at an incomplete message again.
const PARTIAL_MESSAGE_POLL: Duration = Duration::from_millis(10);

/// Takes a handled message of `len` bytes off the socket, checks the
/// descriptors it really carried (`fds_ok`), then sends its reply. (Dying
/// between taking it off and replying loses the reply: a window of two
/// system calls; the other order would risk sending it twice.)
fn finish(
    connection: &UnixStream,
    len: usize,
    reply: Option<&[u8]>,
    fds_ok: impl FnOnce(usize) -> bool,
) -> Result<(), String> {
    let fds = connection::consume(connection, len)
        .map_err(|e| format!("cannot take a handled message off the socket: {e}"))?;
    if !fds_ok(fds) {
        return Err(format!(
            "a message with {fds} file descriptor(s) where its request takes another number"
        ));
    }
    if let Some(reply) = reply {
        connection::send_reply(connection, reply)
            .map_err(|e| format!("cannot send a reply: {e}"))?;
    }
    Ok(())
}

/// A hook for the crash-survival tests: with `VHOST_RNG_TEST_DIE_AFTER=CODE`
/// in its environment, the first serving process (no restart before it)
/// aborts right after recording a handled message with that request code,
/// before taking it off the socket: the window this recording covers.
mod test_hooks {
    use super::dispatch::Handled;
    use std::sync::OnceLock;

    pub fn after_report(handled: &Handled) {
        static CODE: OnceLock<Option<u32>> = OnceLock::new();
        let code = CODE.get_or_init(|| {
            let first = std::env::var(crate::service::supervisor::RESTARTS_ENV)
                .map_or(true, |restarts| restarts.starts_with("0;"));
            std::env::var("VHOST_RNG_TEST_DIE_AFTER")
                .ok()
                .filter(|_| first)
                .and_then(|code| code.parse().ok())
        });
        if *code == Some(handled.code) {
            std::process::abort();
        }
    }
}

/// QEMU and cloud-hypervisor wait for each reply before the next request,
/// so more than a few replies unread means a VMM that does not read them.
/// Far below a Unix socket's default send buffer (about 200 KiB).
const MAX_UNREAD_REPLIES: usize = 64 * 1024;

/// Bytes the daemon wrote that the VMM has not read yet.
fn unread_replies(connection: &UnixStream) -> Option<usize> {
    let mut unread: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which lives for
    // the call.
    let result = unsafe { libc::ioctl(connection.as_raw_fd(), libc::TIOCOUTQ, &mut unread) };
    (result == 0).then(|| usize::try_from(unread).unwrap_or(0))
}

/// Duplicates of a connection's socket and of what its state needs.
pub(super) fn capture((stream, handler): (&UnixStream, &Handler)) -> io::Result<FrozenConnection> {
    let socket = stream.as_fd().try_clone_to_owned()?;
    let (state, fds) = handler.snapshot()?;
    Ok(FrozenConnection { socket, state, fds })
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The VMM closed it (a VM shutting down, rebooting, crashing).
    Disconnected,
    /// The guest was removed or the daemon is stopping.
    Stopped,
    /// The daemon closed it, for this reason.
    Closed(String),
}

fn timeout_of(duration: Duration) -> PollTimeout {
    // Round up, so a deadline is never polled with 0 ms and spun on.
    let millis = duration.as_nanos().div_ceil(1_000_000);
    PollTimeout::try_from(millis.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::vhost_user::snapshot::{RestoreError, STATE_VERSION};
    use crate::guest::{GuestLimits, SharedBucket};
    use std::os::unix::net::UnixListener;
    use std::thread::{self, JoinHandle};
    use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

    const PATIENCE: Duration = Duration::from_secs(20);

    fn guest() -> Arc<Guest> {
        Guest::with_limits(
            "vm",
            crate::entropy::pool::os_pool(),
            GuestLimits::default(),
            SharedBucket::default(),
        )
    }

    /// Serves `connection` with `handler` on a thread until `stop` fires,
    /// then gives both back.
    fn serve(
        connection: UnixStream,
        mut handler: Handler,
        stop: Arc<EventFd>,
    ) -> JoinHandle<(UnixStream, Handler, Ended)> {
        thread::spawn(move || {
            // SAFETY: `stop` is kept alive by the Arc for the whole call.
            let stop_fd = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
            let ended = run_connection(&connection, &mut handler, stop_fd, PATIENCE);
            (connection, handler, ended)
        })
    }

    fn serve_64(vmm: &mut TestVmm) {
        vmm.post(&[Buffer::writable(64)]).unwrap();
        vmm.kick().unwrap();
        let used = vmm.wait_used(1, PATIENCE).unwrap();
        assert_eq!(used[0].len, 64);
    }

    #[test]
    fn a_connection_taken_over_by_another_handler_goes_on_unnoticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let vmm = thread::spawn(move || TestVmm::connect(&path, TestVmmConfig::qemu()).unwrap());
        let (connection, _) = listener.accept().unwrap();
        let guest = guest();
        let limits = MemoryLimits::default();
        let first = Handler::new(Arc::clone(&guest), limits).unwrap();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serving = serve(connection, first, Arc::clone(&stop));
        let mut vmm = vmm.join().unwrap();
        serve_64(&mut vmm);
        let negotiated = vmm.sent_requests().len();

        stop.write(1).unwrap();
        let (connection, first, ended) = serving.join().unwrap();
        assert!(matches!(ended, Ended::Stopped), "{ended:?}");
        // A request the guest posts while nobody serves it.
        vmm.post(&[Buffer::writable(64)]).unwrap();
        vmm.kick().unwrap();

        let (state, fds) = first.snapshot().unwrap();
        assert_eq!(state.version, STATE_VERSION);
        assert!(state.ring.ready && state.ring.kick.is_some());
        drop(first);
        let second = Handler::restore(Arc::clone(&guest), limits, &state, fds).unwrap();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serving = serve(connection, second, Arc::clone(&stop));

        let used = vmm.wait_used(1, PATIENCE).unwrap();
        assert_eq!(used[0].len, 64, "the request posted in the gap is answered");
        serve_64(&mut vmm);
        assert_eq!(
            vmm.sent_requests().len(),
            negotiated,
            "the VMM never had to set the device up again"
        );
        stop.write(1).unwrap();
        serving.join().unwrap();
    }

    #[test]
    fn a_state_of_another_version_is_refused() {
        let first = Handler::new(guest(), MemoryLimits::default()).unwrap();
        let (mut state, fds) = first.snapshot().unwrap();
        state.version = STATE_VERSION + 1;
        let err = Handler::restore(guest(), MemoryLimits::default(), &state, fds)
            .err()
            .unwrap();
        assert!(matches!(err, RestoreError::Version { .. }), "{err}");
        assert!(err.to_string().contains("reads only version 1"), "{err}");
    }
}
