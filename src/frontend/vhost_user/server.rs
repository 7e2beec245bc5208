// SPDX-License-Identifier: Apache-2.0
//! Serving one guest's vhost-user connections, one after another, for as
//! long as the daemon runs: a VM shutting down, rebooting or crashing ends a
//! connection, never the guest's service.
//!
//! One thread per guest does everything for it: waits for the VMM, reads its
//! messages ([`super::handler`]) and answers the guest's requests when it
//! kicks, when the pool can serve a starved request again, or when a
//! throttled guest has tokens again. Nothing a VMM sends can block that
//! thread for long: a connection must claim the device (SET_OWNER), and a
//! begun message must arrive whole, within [`VhostUserLimits::timeout`], or
//! the connection is closed to make way for the next one.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, debug, info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vhost_rng_protocol::log_limited;
use vmm_sys_util::eventfd::EventFd;

use super::connection::{self, Arrival};
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
    /// rest of a begun message may take to arrive, and a reply to be taken.
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

/// Retry delays while a VMM is not there to connect to: short at first, so
/// a VM that is starting is served quickly, capped so the wait stays cheap.
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(50);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(1);
/// Pause after a failure to accept or set up a connection, so a persistent
/// failure (e.g. out of file descriptors) does not spin.
const SETUP_RETRY: Duration = Duration::from_millis(500);

/// A running guest server; the daemon keeps it to stop it.
pub struct GuestServer {
    guest: Arc<Guest>,
    endpoint: Endpoint,
    limits: VhostUserLimits,
    stopping: AtomicBool,
    /// Wakes the guest's thread when the guest is stopped.
    stop_event: EventFd,
    /// A second handle on the current connection, to end it from stop().
    active: Mutex<Option<UnixStream>>,
    /// Set by [`GuestServer::freeze`]: the thread parks at its next safe
    /// point and hands over its connection.
    freezing: AtomicBool,
    /// Told what the guest holds after every change (crash survival).
    checkpoint: Option<crate::frontend::Checkpoint>,
    frozen: Mutex<Option<mpsc::Sender<Frozen>>>,
    thaw: Mutex<mpsc::Receiver<()>>,
    thaw_sender: Mutex<mpsc::Sender<()>>,
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

/// What a parked guest thread hands over.
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
    /// Starts serving `guest` on `endpoint` in a thread of its own.
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
        let (thaw_sender, thaw) = mpsc::channel();
        let listener = match &endpoint {
            Endpoint::Listen(socket) => Some(socket.try_clone_listener()?),
            Endpoint::Connect(_) => None,
        };
        let server = Arc::new(GuestServer {
            guest,
            endpoint,
            limits,
            stopping: AtomicBool::new(false),
            stop_event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            active: Mutex::new(None),
            freezing: AtomicBool::new(false),
            checkpoint,
            frozen: Mutex::new(None),
            thaw: Mutex::new(thaw),
            thaw_sender: Mutex::new(thaw_sender),
        });
        let worker = Arc::clone(&server);
        thread::Builder::new()
            .name(format!("guest-{}", server.guest.name()))
            .spawn(move || {
                // Nothing from the VMM is read before the process has
                // dropped root and installed its filter.
                crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Vring {
                    dials: listener.is_none(),
                });
                // serve_with reports the resumed connection as it starts.
                if let Some(Resumed { stream, handler }) = resumed {
                    worker.serve_with(stream, handler, true);
                }
                worker.report(None);
                match listener {
                    Some(listener) => worker.listen_loop(&listener),
                    None => worker.connect_loop(),
                }
            })?;
        Ok(server)
    }

    /// Parks the guest's thread at its next safe point (between two vhost-
    /// user messages) and returns what it hands over; it stays parked until
    /// [`GuestServer::thaw`], or until the process is replaced.
    pub fn freeze(&self, patience: Duration) -> Frozen {
        let (sender, receiver) = mpsc::channel();
        *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        self.freezing.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_event.write(1) {
            return Frozen::Failed(format!("cannot wake the guest's thread: {e}"));
        }
        receiver
            .recv_timeout(patience)
            .unwrap_or_else(|_| Frozen::Failed("the guest's thread did not park in time".into()))
    }

    /// Lets a parked thread go on serving (an upgrade that did not happen).
    pub fn thaw(&self) {
        if self.freezing.load(Ordering::SeqCst) {
            let _ = self
                .thaw_sender
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(());
        }
    }

    /// Tells the checkpoint watcher (if any) what the guest holds now.
    fn report(&self, connection: Option<(&UnixStream, &Handler)>) {
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

    /// Called by the guest's thread at a safe point: if a freeze was asked
    /// for, hands over `connection` and waits to be thawed.
    fn park_if_asked(&self, connection: Option<(&UnixStream, &Handler)>) -> bool {
        if !self.freezing.load(Ordering::SeqCst) {
            return false;
        }
        let frozen = match connection.map(capture).transpose() {
            Ok(None) => Frozen::Idle,
            Ok(Some(connection)) => Frozen::Connected(connection),
            Err(e) => Frozen::Failed(format!("cannot capture the connection: {e}")),
        };
        if let Some(sender) = self.frozen.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = sender.send(frozen);
        }
        let _ = self.thaw.lock().unwrap_or_else(|e| e.into_inner()).recv();
        // Take the wake-up freeze() sent, unless a stop came meanwhile.
        if !self.is_stopping() {
            let _ = self.stop_event.read();
        }
        self.freezing.store(false, Ordering::SeqCst);
        true
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
        if let Err(e) = self.stop_event.write(1) {
            warn!(
                "guest {}: cannot wake its thread to stop: {e}",
                self.guest.name()
            );
        }
        if let Some(connection) = self.lock_active().take() {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
        if let Endpoint::Listen(socket) = &self.endpoint {
            socket.remove();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the EventFd lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.stop_event.as_raw_fd()) }
    }

    fn listen_loop(&self, listener: &UnixListener) {
        while !self.is_stopping() {
            let waited = wait_readable(&[listener.as_fd(), self.stop_fd()], PollTimeout::NONE);
            if self.is_stopping() {
                return;
            }
            if self.park_if_asked(None) {
                continue;
            }
            let accepted = waited
                .map_err(io::Error::from)
                .and_then(|_| listener.accept());
            match accepted {
                Ok((stream, _)) => self.serve_connection(stream),
                // Another thread cannot take it, but a VMM that gave up
                // between poll and accept leaves nothing to take.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    warn!(
                        "guest {}: accepting on {}: {e}",
                        self.guest.name(),
                        self.path().display()
                    );
                    thread::sleep(SETUP_RETRY);
                }
            }
        }
    }

    fn connect_loop(&self) {
        let path = self.path().to_owned();
        let mut delay = CONNECT_RETRY_FIRST;
        let mut waiting_logged = false;
        while !self.is_stopping() {
            match UnixStream::connect(&path) {
                Ok(stream) => {
                    delay = CONNECT_RETRY_FIRST;
                    waiting_logged = false;
                    self.serve_connection(stream);
                }
                Err(e) => {
                    if !waiting_logged {
                        info!(
                            "guest {}: waiting for the VMM to listen on {}: {e}",
                            self.guest.name(),
                            path.display()
                        );
                        waiting_logged = true;
                    } else {
                        debug!(
                            "guest {}: connect to {}: {e}",
                            self.guest.name(),
                            path.display()
                        );
                    }
                    // Woken early by stop() and freeze().
                    let _ = wait_readable(&[self.stop_fd()], timeout_of(delay));
                    self.park_if_asked(None);
                    delay = (delay * 2).min(CONNECT_RETRY_MAX);
                }
            }
        }
    }

    fn serve_connection(&self, stream: UnixStream) {
        match Handler::new(Arc::clone(&self.guest), self.limits.memory) {
            Ok(handler) => self.serve_with(stream, handler, false),
            Err(e) => {
                warn!(
                    "guest {}: cannot set up a connection on {}: {e}",
                    self.guest.name(),
                    self.path().display()
                );
                thread::sleep(SETUP_RETRY);
            }
        }
    }

    /// Serves `stream` with `handler` until the connection ends; `resumed`
    /// for a connection a previous daemon handed over.
    fn serve_with(&self, stream: UnixStream, mut handler: Handler, resumed: bool) {
        let name = self.guest.name();
        let path = self.path().display();
        let handle = stream
            .set_write_timeout(Some(self.limits.timeout))
            .and_then(|()| stream.try_clone());
        match handle {
            Ok(handle) => *self.lock_active() = Some(handle),
            Err(e) => {
                warn!("guest {name}: cannot set up a connection on {path}: {e}");
                thread::sleep(SETUP_RETRY);
                return;
            }
        }
        if self.is_stopping() {
            // stop() ran between accept and registering the connection.
            return;
        }
        if !resumed {
            self.guest.stats.connections.fetch_add(1, Ordering::Relaxed);
        }
        self.guest.stats.connected.store(true, Ordering::Relaxed);
        if resumed {
            info!("guest {name}: VMM connection on {path} taken over from the previous daemon");
        } else {
            info!("guest {name}: VMM connected on {path}");
        }
        self.report(Some((&stream, &handler)));
        if resumed {
            handler.serve_pending();
        }
        let ended = loop {
            let ended = run_connection_reporting(
                &stream,
                &mut handler,
                self.stop_fd(),
                self.limits.timeout,
                &|stream, handler| self.report(Some((stream, handler))),
            );
            if matches!(ended, Ended::Stopped)
                && !self.is_stopping()
                && self.park_if_asked(Some((&stream, &handler)))
            {
                continue;
            }
            break ended;
        };
        self.lock_active().take();
        self.guest.stats.connected.store(false, Ordering::Relaxed);
        match ended {
            Ended::Disconnected => info!("guest {name}: VMM disconnected from {path}"),
            Ended::Stopped => info!("guest {name}: connection on {path} closed (guest stopped)"),
            Ended::Closed(reason) => {
                log_limited!(
                    self.guest.defect_log,
                    Level::Warn,
                    "guest {name}: connection on {path} closed: {reason}"
                );
            }
        }
        // Dropping the handler unmaps the guest's memory and closes every
        // fd the VMM sent.
        drop(handler);
        self.report(None);
    }
}

/// Serves one connection until it ends or `stop` becomes readable; the
/// caller owns the connection, the handler and the stop event, so a stopped
/// connection can be taken over (see [`Handler::snapshot`]).
pub fn run_connection(
    connection: &UnixStream,
    handler: &mut Handler,
    stop: BorrowedFd<'_>,
    limit: Duration,
) -> Ended {
    run_connection_reporting(connection, handler, stop, limit, &|_, _| {})
}

/// [`run_connection`], calling `after_message` after each message the
/// handler took (crash survival records the state it changed).
pub fn run_connection_reporting(
    connection: &UnixStream,
    handler: &mut Handler,
    stop: BorrowedFd<'_>,
    limit: Duration,
    after_message: &dyn Fn(&UnixStream, &Handler),
) -> Ended {
    let setup_deadline = Instant::now() + limit;
    // Set when part of a message has arrived: the rest must follow by
    // then.
    let mut message_deadline: Option<Instant> = None;
    loop {
        let deadline = match (handler.owned(), message_deadline) {
            (_, Some(deadline)) => Some((deadline, "to finish a message")),
            (false, None) => Some((setup_deadline, "to claim the device (SET_OWNER)")),
            (true, None) => None,
        };
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some((deadline, what)) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => timeout_of(left),
                _ => {
                    return Ended::Closed(format!("the VMM took longer than {limit:?} {what}"));
                }
            },
        };
        let (kick, wake, timer) = handler.wait_fds();
        let mut fds = vec![
            PollFd::new(connection.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop, PollFlags::POLLIN),
            PollFd::new(wake, PollFlags::POLLIN),
            PollFd::new(timer, PollFlags::POLLIN),
        ];
        if let Some(kick) = kick {
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
        if ready[1] {
            return Ended::Stopped;
        }
        if ready.get(4) == Some(&true) {
            handler.on_kick();
        }
        if ready[2] {
            handler.on_wake();
        }
        if ready[3] {
            handler.on_timer();
        }
        if let Some(refusal) = handler.take_fatal() {
            return Ended::Closed(format!("the VMM's guest memory is unusable: {refusal}"));
        }
        if !ready[0] {
            continue;
        }
        let message = match connection::peek_message(connection) {
            Ok(Arrival::Message(message)) => message,
            Ok(Arrival::Closed) => return Ended::Disconnected,
            Ok(Arrival::Partial) => {
                message_deadline.get_or_insert(Instant::now() + limit);
                // The stream stays readable while the part waits: pause
                // instead of spinning, then look again.
                let _ = wait_readable(&[stop], timeout_of(PARTIAL_MESSAGE_POLL));
                continue;
            }
            Err(e) => return Ended::Closed(format!("bad message from the VMM: {e}")),
        };
        message_deadline = None;
        let mut message = message;
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
            if let Err(reason) = taken_off(reply.as_deref()) {
                return Ended::Closed(reason);
            }
            continue;
        }
        let raw = message.raw.clone();
        // Guest memory is touched by some messages too (a kick fd set on
        // a ring with requests waiting).
        let (result, faults) = fault_guard::guarded(|| dispatch::dispatch(handler, message));
        if faults > 0 {
            return Ended::Closed(format!(
                "its guest memory file shrank under the daemon ({faults} fault(s))"
            ));
        }
        let handled = match result {
            Err(reason) => return Ended::Closed(reason),
            Ok(handled) => handled,
        };
        // Recorded before the message leaves the socket: a process that
        // dies from here on is replaced by one that knows it was handled.
        // (Queries are recorded too: their reply must not be lost.)
        handler.set_answered(raw, handled.reply.clone());
        after_message(connection, handler);
        test_hooks::after_report(&handled);
        if let Err(reason) = taken_off(handled.reply.as_deref()) {
            return Ended::Closed(reason);
        }
        // A VMM that sends without reading the replies is closed long
        // before its socket fills and a reply would wait on it.
        if let Some(unread) = unread_replies(connection)
            && unread > MAX_UNREAD_REPLIES
        {
            return Ended::Closed(format!("the VMM left {unread} bytes of replies unread"));
        }
    }
}

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

/// How often an incomplete message is looked at again.
const PARTIAL_MESSAGE_POLL: Duration = Duration::from_millis(10);

/// Duplicates of a connection's socket and of what its state needs.
fn capture((stream, handler): (&UnixStream, &Handler)) -> io::Result<FrozenConnection> {
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

/// Blocks until one of `fds` is readable or `timeout` passes.
fn wait_readable(fds: &[BorrowedFd<'_>], timeout: PollTimeout) -> nix::Result<()> {
    let mut fds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    loop {
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            result => return result.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::vhost_user::snapshot::{RestoreError, STATE_VERSION};
    use crate::guest::{GuestLimits, SharedBucket};
    use std::thread::JoinHandle;
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
