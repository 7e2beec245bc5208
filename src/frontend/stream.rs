// SPDX-License-Identifier: Apache-2.0
//! Stream-socket frontends (EGD, the vhost-rng channel protocol over a Unix
//! socket, AF_VSOCK or TCP): a guest's clients, a thread per client, and
//! blocking reads that wait for the guest's tokens or for the pool on that
//! client's own thread, so one waiting client never holds up another.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, debug, info, warn};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{Shutdown, shutdown};
use vmm_sys_util::event::{EventConsumer, EventFlag, new_event_consumer_and_notifier};
use vmm_sys_util::eventfd::EventFd;

use vhost_rng_protocol::deadline::TimedStream;
pub use vhost_rng_protocol::deadline::{read_by, read_exact_by, write_all_by};

use super::accept::{ACCEPT_ERROR_PAUSE, StopSignal};
use super::socket_file::GuestSocket;
use crate::entropy::pool::EntropyStream;
use crate::guest::{Guest, Supplied};
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;

/// Clients served at once per guest, so a misbehaving client cannot make
/// the daemon spawn threads without bound. A VMM holds one connection per
/// device and an agent one per guest, so 8 leaves room for reconnects that
/// overlap a closing connection.
///
/// A client arriving when all are taken is not refused: the client idle
/// longest is closed to make room for it, except the one connected longest
/// (see [`Clients::serve`]). Refusing it instead would let 8 idle
/// connections lock the guest's VMM out for as long as they stay open.
pub const MAX_CLIENTS: usize = 8;
/// How often a waiting client looks whether the daemon is stopping.
const STOP_CHECK: Duration = Duration::from_millis(500);

/// The deadlines a guest's clients are held to. The daemon always runs
/// with [`Timeouts::DEFAULT`], the values docs/protocol.md promises; they
/// are a value handed to [`Clients`] rather than constants so that a test
/// of a deadline can use a short one and wait a fraction of a second, not
/// the seconds a real client is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Channel: how long a client may stay quiet between requests.
    pub idle: Duration,
    /// Channel: how long a request that has begun may take to arrive in
    /// full, to be filled, and its answer to be written.
    pub request: Duration,
    /// EGD: how long the rest of a command that has begun, or the delivery
    /// of its answer, may take.
    pub command: Duration,
    /// How often a read waiting for tokens or for the pool looks whether
    /// its client was closed or the daemon is stopping.
    pub stop_check: Duration,
}

impl Timeouts {
    /// The production deadlines.
    pub const DEFAULT: Timeouts = Timeouts {
        idle: vhost_rng_protocol::wire::IDLE_TIMEOUT,
        request: vhost_rng_protocol::wire::REQUEST_TIMEOUT,
        command: super::egd::COMMAND_TIMEOUT,
        stop_check: STOP_CHECK,
    };
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::DEFAULT
    }
}

/// A connected client socket a session runs over.
pub trait ClientStream: TimedStream + Send {
    /// The socket, so that stopping the guest can shut it down from
    /// another thread.
    fn socket(&self) -> BorrowedFd<'_>;
}

impl ClientStream for UnixStream {
    fn socket(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl ClientStream for TcpStream {
    fn socket(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

/// Serves one client connection until it ends.
pub trait Session: Send {
    /// Serves `client` on the calling thread until it disconnects, breaks the
    /// protocol or times out; an error ends the connection and is logged.
    fn serve(&mut self, client: &mut dyn ClientStream) -> io::Result<()>;
}

/// A protocol a guest's clients speak.
#[derive(Clone, Copy)]
pub struct Protocol {
    /// `EGD`, `channel`: names the protocol in logs.
    pub name: &'static str,
    /// Makes a session for a new client.
    pub new_session: fn(GuestReader) -> Box<dyn Session>,
    /// Sent to a refused client (its guest is being removed, or its socket
    /// could not be kept) before it is closed; empty where the protocol has
    /// no way to say so.
    pub busy_reply: &'static [u8],
}

/// One guest's open clients, whichever socket they came in on.
pub struct Clients {
    guest: Arc<Guest>,
    timeouts: Timeouts,
    stopping: Arc<AtomicBool>,
    /// Open clients by id, so [`Clients::close_all`] can shut them down
    /// and a newcomer can close the idlest. Ids only grow, so the lowest is
    /// the client connected longest.
    open: Mutex<HashMap<u64, OpenClient>>,
    /// The guest's one pool stream, shared by its clients; made with the
    /// first client.
    stream: Mutex<Option<Arc<SharedStream>>>,
    refusals: RateLimitedLog,
    evictions: RateLimitedLog,
    /// Sessions park here during an in-place upgrade.
    parking: Arc<Parking>,
    /// Called after a client comes or goes (crash survival).
    on_change: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

/// Where a guest's client sessions wait while an in-place upgrade takes
/// their sockets over: between two commands, never in the middle of one,
/// so no command is lost with the old process.
pub struct Parking {
    /// Readable while parking is asked; sessions poll it, never read it.
    /// `None` if it could not be made (out of descriptors): then the guest
    /// cannot be handed over, and an upgrade is refused.
    event: Option<EventFd>,
    state: Mutex<ParkState>,
    changed: Condvar,
}

#[derive(Default)]
struct ParkState {
    asked: bool,
    parked: usize,
}

impl Parking {
    fn new() -> Self {
        Parking {
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).ok(),
            state: Mutex::new(ParkState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ParkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn asked(&self) -> bool {
        self.lock().asked
    }

    fn ask(&self) -> io::Result<()> {
        let event = self
            .event
            .as_ref()
            .ok_or_else(|| io::Error::other("no eventfd to wake the guest's clients with"))?;
        self.lock().asked = true;
        event.write(1)
    }

    fn release(&self) {
        let mut state = self.lock();
        state.asked = false;
        // Non-blocking: empties the counter so polls stop seeing it.
        if let Some(event) = &self.event {
            let _ = event.read();
        }
        self.changed.notify_all();
    }

    /// Parks the calling session until released.
    fn park(&self) {
        let mut state = self.lock();
        state.parked += 1;
        self.changed.notify_all();
        while state.asked {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
    }

    /// Waits until `sessions()` sessions are parked, or `patience` passes.
    fn wait_parked(&self, sessions: impl Fn() -> usize, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut state = self.lock();
        loop {
            if state.parked >= sessions() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Woken by each session that parks; the timeout bounds a
            // count that changed without one.
            state = self
                .changed
                .wait_timeout(state, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// An open client as its guest's table holds it.
struct OpenClient {
    /// A duplicate of the client's socket: shutting it down wakes the
    /// thread serving the client, wherever it waits on the socket.
    socket: OwnedFd,
    /// "on PATH", "from ADDR", for the log line if it is closed.
    peer: String,
    activity: Arc<ClientActivity>,
}

/// What a client's session and its guest's table share about it: when it
/// last completed a command, and whether it was closed to make room.
#[derive(Debug)]
struct ClientActivity {
    last_command: Mutex<Instant>,
    evicted: AtomicBool,
}

impl ClientActivity {
    fn new(connected: Instant) -> Self {
        ClientActivity {
            last_command: Mutex::new(connected),
            evicted: AtomicBool::new(false),
        }
    }

    /// When the client last completed a command, or connected if it never
    /// did.
    fn last_command(&self) -> Instant {
        *self.last_command.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn command_done(&self, now: Instant) {
        *self.last_command.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::SeqCst)
    }
}

/// A guest's pool stream (in `drbg` mode its DRBG) and the wake-up its
/// starved readers wait on. One per guest rather than per connection:
/// a new stream draws a fresh seed from the shared reservoir, which the
/// guest's rate limit does not charge for, so a guest that connected over
/// and over would drain the pool for everyone.
struct SharedStream {
    stream: Mutex<Box<dyn EntropyStream>>,
    wake: EventConsumer,
}

impl Clients {
    /// The clients of `guest`, none yet, held to [`Timeouts::DEFAULT`].
    pub fn new(guest: Arc<Guest>) -> Arc<Self> {
        Self::with_timeouts(guest, Timeouts::DEFAULT)
    }

    /// [`Clients::new`], holding the clients to `timeouts` instead of
    /// [`Timeouts::DEFAULT`] (tests use short ones).
    pub fn with_timeouts(guest: Arc<Guest>, timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Clients {
            guest,
            timeouts,
            stopping: Arc::new(AtomicBool::new(false)),
            open: Mutex::new(HashMap::new()),
            stream: Mutex::new(None),
            refusals: RateLimitedLog::per_minute(4),
            evictions: RateLimitedLog::per_minute(4),
            parking: Arc::new(Parking::new()),
            on_change: Mutex::new(None),
        })
    }

    /// The guest's shared stream, made on first use.
    fn shared_stream(&self) -> io::Result<Arc<SharedStream>> {
        let mut slot = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = slot.as_ref() {
            return Ok(Arc::clone(shared));
        }
        let (wake, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let waker = Arc::new(move || {
            let _ = notifier.notify();
        });
        let stream = self.guest.pool().stream(waker, self.guest.weight());
        let shared = Arc::new(SharedStream {
            stream: Mutex::new(stream),
            wake,
        });
        *slot = Some(Arc::clone(&shared));
        Ok(shared)
    }

    /// The guest these clients belong to.
    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, OpenClient>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any client is connected.
    pub fn has_clients(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Whether [`Clients::close_all`] was called: the guest is going away and
    /// new clients are refused.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Serves `client`, which came in `peer` ("on PATH", "from ADDR"), on
    /// the calling thread until it ends; refuses it if the guest is
    /// stopping. If the guest has [`MAX_CLIENTS`] already, one of them is
    /// closed to make room (see [`Clients::admit`]).
    #[allow(rustdoc::private_intra_doc_links)] // for readers of the source
    pub fn serve(self: &Arc<Self>, protocol: &Protocol, peer: &str, client: &mut dyn ClientStream) {
        if let Some(slot) = self.admit_or_refuse(protocol, peer, client) {
            slot.serve(protocol, peer, client);
        }
    }

    /// [`Clients::admit`], and on refusal tells the client and logs why.
    fn admit_or_refuse(
        self: &Arc<Self>,
        protocol: &Protocol,
        peer: &str,
        client: &mut dyn ClientStream,
    ) -> Option<ClientSlot> {
        let refusal = match self.admit(protocol, peer, client) {
            Ok(slot) => return Some(slot),
            Err(refusal) => refusal,
        };
        // Whatever the reason, "busy" is what the client should hear:
        // trying again later may well succeed.
        refuse(client, protocol.busy_reply);
        if let Refusal::Full = refusal {
            let stats = &self.guest.stats;
            stats.refused_connections.fetch_add(1, Ordering::Relaxed);
        }
        // A guest on its way out refusing clients is expected.
        let level = match refusal {
            Refusal::Stopping => Level::Info,
            Refusal::Full | Refusal::Io(_) => Level::Warn,
        };
        log_limited!(
            self.refusals,
            level,
            "guest {}: {} client {peer} refused: {refusal}",
            self.guest.name(),
            protocol.name
        );
        None
    }

    /// Gives `client` a place among the guest's clients. When all
    /// [`MAX_CLIENTS`] are taken, the client idle longest (since its last
    /// completed command, or since it connected if it completed none) is
    /// closed to make room, leaving out the one connected longest: that is
    /// normally the VMM, which connects when the VM starts and may then stay
    /// quiet for as long as the guest reads nothing. Idle clients cannot
    /// lock it out, nor lock out the newcomers.
    fn admit(
        self: &Arc<Self>,
        protocol: &Protocol,
        peer: &str,
        client: &dyn ClientStream,
    ) -> Result<ClientSlot, Refusal> {
        static NEXT_CLIENT: AtomicU64 = AtomicU64::new(0);
        let socket = client.socket().try_clone_to_owned().map_err(Refusal::Io)?;
        let mut open = self.lock();
        if self.is_stopping() {
            return Err(Refusal::Stopping);
        }
        let now = Instant::now();
        let evicted = if open.len() >= MAX_CLIENTS {
            let id = idlest_but_first(&open).ok_or(Refusal::Full)?;
            open.remove(&id)
        } else {
            None
        };
        let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(ClientActivity::new(now));
        open.insert(
            id,
            OpenClient {
                socket,
                peer: peer.to_owned(),
                activity: Arc::clone(&activity),
            },
        );
        self.guest.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.guest.stats.connected.store(true, Ordering::Relaxed);
        drop(open);
        if let Some(evicted) = evicted {
            self.evict(protocol, evicted, now);
        }
        self.changed();
        Ok(ClientSlot {
            clients: Arc::clone(self),
            id,
            activity,
        })
    }

    /// Closes a client taken out of the table to make room: its thread,
    /// woken by the shutdown (or, in a read waiting for the pool, by the
    /// flag), ends its session and gives its thread back.
    fn evict(&self, protocol: &Protocol, client: OpenClient, now: Instant) {
        client.activity.evicted.store(true, Ordering::SeqCst);
        let _ = shutdown(client.socket.as_raw_fd(), Shutdown::Both);
        let stats = &self.guest.stats;
        stats.evicted_connections.fetch_add(1, Ordering::Relaxed);
        log_limited!(
            self.evictions,
            Level::Info,
            "guest {}: {} client {} closed to make room for a new one: the guest had \
             {MAX_CLIENTS} clients and this one had been idle longest ({:.1} s; the \
             client connected longest is never closed this way)",
            self.guest.name(),
            protocol.name,
            client.peer,
            now.saturating_duration_since(client.activity.last_command())
                .as_secs_f64()
        );
    }

    /// Tells whoever watches (crash survival) that the clients changed.
    fn changed(&self) {
        let watcher = self
            .on_change
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(watcher) = watcher {
            watcher();
        }
    }

    /// Duplicates of the open clients' sockets, oldest first.
    pub fn duplicate_sockets(&self) -> io::Result<Vec<OwnedFd>> {
        let open = self.lock();
        let mut ids: Vec<&u64> = open.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| open.get(id))
            .map(|client| client.socket.try_clone())
            .collect()
    }

    /// Shuts every client down; clients that come later are refused.
    pub fn close_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (_, client) in self.lock().drain() {
            let _ = shutdown(client.socket.as_raw_fd(), Shutdown::Both);
        }
    }
}

/// Tells a refused client `reply` (if anything) without waiting for it:
/// refusals are sent on a listener's accept thread, which a peer that
/// does not read (or a guest that gives its vsock no receive credit) must
/// not hold up. A reply that does not fit at once is dropped.
pub fn refuse(client: &mut dyn ClientStream, reply: &[u8]) {
    if reply.is_empty() {
        return;
    }
    // A duplicate shares the file status flags with the client's socket.
    let set_nonblocking = |socket: OwnedFd| -> nix::Result<()> {
        let flags = OFlag::from_bits_truncate(fcntl(&socket, FcntlArg::F_GETFL)?);
        fcntl(&socket, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
    };
    let socket = client.socket().try_clone_to_owned();
    if socket
        .ok()
        .is_some_and(|socket| set_nonblocking(socket).is_ok())
    {
        let _ = client.write_all(reply).and_then(|()| client.flush());
    }
}

/// A bound on connections served at once, each on a thread of its own
/// (the control socket's, the metrics endpoint's): a place is taken before
/// the thread starts and given back when the thread drops it, so a caller
/// that finds none can refuse at once instead of waiting.
#[derive(Debug)]
pub struct Places {
    limit: usize,
    taken: Arc<AtomicUsize>,
}

/// One taken place of [`Places`], given back when dropped.
#[derive(Debug)]
pub struct Place(Arc<AtomicUsize>);

impl Places {
    /// At most `limit` places taken at once.
    pub fn new(limit: usize) -> Self {
        Places {
            limit,
            taken: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A place, or `None` if all are taken.
    pub fn take(&self) -> Option<Place> {
        self.taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(Arc::clone(&self.taken)))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The client to close when a guest's clients are all taken: the one
/// idle longest (the lower id, the older, on a tie), leaving out the one
/// connected longest. `None` only when there is no other to choose.
fn idlest_but_first(open: &HashMap<u64, OpenClient>) -> Option<u64> {
    let first = open.keys().min()?;
    open.iter()
        .filter(|(id, _)| *id != first)
        .min_by_key(|(id, client)| (client.activity.last_command(), **id))
        .map(|(id, _)| *id)
}

/// Why a client of a guest is not served.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// The one counted in the guest's `refused_connections`: the others
    /// are not the guest's doing. Only when no client can make room, which
    /// with more than one place per guest never happens.
    #[error("the guest has {MAX_CLIENTS} clients already")]
    Full,
    #[error("the guest is being removed or replaced, or the daemon is stopping")]
    Stopping,
    /// Keeping the socket, so that stopping the guest can close it, failed
    /// (out of file descriptors, most likely).
    #[error("cannot keep its socket: {0}")]
    Io(#[source] io::Error),
}

/// A client's place among its guest's clients, given back when it ends.
struct ClientSlot {
    clients: Arc<Clients>,
    id: u64,
    activity: Arc<ClientActivity>,
}

impl ClientSlot {
    /// Serves the client on the calling thread until it ends or is closed.
    fn serve(self, protocol: &Protocol, peer: &str, client: &mut dyn ClientStream) {
        let clients = &self.clients;
        let name = clients.guest.name();
        info!("guest {name}: {} client connected {peer}", protocol.name);
        let result = clients
            .shared_stream()
            .map(|shared| GuestReader {
                guest: Arc::clone(&clients.guest),
                timeouts: clients.timeouts,
                shared,
                stopping: Arc::clone(&clients.stopping),
                activity: Arc::clone(&self.activity),
                parking: Arc::clone(&clients.parking),
            })
            .and_then(|reader| (protocol.new_session)(reader).serve(client));
        match result {
            // Logged (rate-limited) by the newcomer's admission already.
            _ if self.activity.is_evicted() => debug!(
                "guest {name}: {} client {peer} closed to make room for a new one",
                protocol.name
            ),
            Ok(()) => info!("guest {name}: {} client disconnected", protocol.name),
            Err(e) => info!("guest {name}: {} client closed: {e}", protocol.name),
        }
        // Closed here, not only when the caller drops the stream.
        let _ = shutdown(client.socket().as_raw_fd(), Shutdown::Both);
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.lock();
        // A client closed to make room has left the table already.
        open.remove(&self.id);
        if open.is_empty() {
            let stats = &self.clients.guest.stats;
            stats.connected.store(false, Ordering::Relaxed);
        }
        drop(open);
        self.clients.changed();
    }
}

/// One guest's own listening Unix socket (EGD, hybrid vsock) and its
/// clients.
pub struct StreamServer {
    clients: Arc<Clients>,
    socket: GuestSocket,
    stop: Arc<StopSignal>,
}

impl StreamServer {
    /// Starts accepting clients of `guest` on `socket`.
    pub fn spawn(
        guest: Arc<Guest>,
        socket: GuestSocket,
        protocol: Protocol,
    ) -> io::Result<Arc<Self>> {
        Self::spawn_with_timeouts(guest, socket, protocol, Timeouts::DEFAULT)
    }

    /// [`StreamServer::spawn`], holding the clients to `timeouts` instead
    /// of [`Timeouts::DEFAULT`] (tests use short ones).
    pub fn spawn_with_timeouts(
        guest: Arc<Guest>,
        socket: GuestSocket,
        protocol: Protocol,
        timeouts: Timeouts,
    ) -> io::Result<Arc<Self>> {
        let listener = socket.try_clone_listener()?;
        let server = Arc::new(StreamServer {
            clients: Clients::with_timeouts(guest, timeouts),
            socket,
            stop: Arc::new(StopSignal::new()?),
        });
        let clients = Arc::clone(&server.clients);
        let stop = Arc::clone(&server.stop);
        let peer = format!("on {}", server.socket.path().display());
        thread::Builder::new()
            .name(format!("{}-{}", protocol.name, clients.guest.name()))
            .spawn(move || {
                crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Peer);
                // Woken by the stop signal rather than by a connection to
                // the socket file, which someone may have removed already.
                while stop.wait_for_connection(listener.as_fd()) {
                    // During an upgrade, new clients wait in the backlog for
                    // the next process.
                    if clients.parking.asked() {
                        clients.parking.park();
                        continue;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => spawn_client(&clients, protocol, peer.clone(), stream),
                        Err(e) => {
                            warn!(
                                "guest {}: {} accept: {e}",
                                clients.guest.name(),
                                protocol.name
                            );
                            thread::sleep(ACCEPT_ERROR_PAUSE);
                        }
                    }
                }
            })?;
        Ok(server)
    }

    /// The guest this socket serves.
    pub fn guest(&self) -> &Arc<Guest> {
        self.clients.guest()
    }

    /// Duplicates of the listening socket and of every connected client's
    /// socket, to hand over in an in-place upgrade, once every session has
    /// parked between two commands (within `patience`). Nothing is closed:
    /// the process is replaced right after.
    pub fn handover(&self, patience: Duration) -> io::Result<(OwnedFd, Vec<OwnedFd>)> {
        let parking = &self.clients.parking;
        parking.ask()?;
        let open = || self.clients.lock().len();
        if !parking.wait_parked(open, patience) {
            parking.release();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a client stayed in the middle of a command",
            ));
        }
        let duplicated = self
            .socket
            .duplicate()
            .and_then(|listener| Ok((listener, self.clients.duplicate_sockets()?)));
        if duplicated.is_err() {
            parking.release();
        }
        duplicated
    }

    /// Reports the guest's listening socket and clients to `checkpoint`
    /// now and after every change (crash survival).
    pub fn set_checkpoint(self: &Arc<Self>, checkpoint: crate::frontend::Checkpoint) {
        let server = Arc::downgrade(self);
        let report: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            let Some(server) = server.upgrade() else {
                return;
            };
            let duplicated = server
                .socket
                .duplicate()
                .and_then(|listener| Ok((listener, server.clients.duplicate_sockets()?)));
            if let Ok((listener, clients)) = duplicated {
                checkpoint(crate::frontend::Handover::Stream { listener, clients });
            }
        });
        *self
            .clients
            .on_change
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&report));
        report();
    }

    /// Lets parked sessions and the accept thread go on (an upgrade that
    /// did not happen).
    pub fn thaw(&self) {
        self.clients.parking.release();
    }

    /// Serves clients a previous daemon handed over, each on its own
    /// thread as if just accepted.
    pub fn resume_clients(&self, protocol: Protocol, clients: Vec<UnixStream>) {
        let peer = format!("on {} (taken over)", self.socket.path().display());
        for stream in clients {
            spawn_client(&self.clients, protocol, peer.clone(), stream);
        }
    }

    /// Closes every client, ends the accept thread and removes the socket
    /// file.
    pub fn stop(&self) {
        self.clients.close_all();
        self.stop.raise();
        self.socket.remove();
    }
}

/// Serves `stream` on a thread of its own. It is admitted on this thread
/// (closing an idle client to make room if need be), so a refused client
/// costs no thread, and a thread is started only for a client that has a
/// place.
pub fn spawn_client<S: ClientStream + 'static>(
    clients: &Arc<Clients>,
    protocol: Protocol,
    peer: String,
    mut stream: S,
) {
    let Some(slot) = clients.admit_or_refuse(&protocol, &peer, &mut stream) else {
        return;
    };
    let spawned = thread::Builder::new()
        .name(format!("{}-{}-client", protocol.name, clients.guest.name()))
        .spawn(move || {
            crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Peer);
            slot.serve(&protocol, &peer, &mut stream)
        });
    if let Err(e) = spawned {
        warn!(
            "guest {}: cannot start a {} client thread: {e}",
            clients.guest.name(),
            protocol.name
        );
    }
}

/// What a read last waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// It did not wait: the bytes were there (or the deadline had passed
    /// before it began).
    Nothing,
    /// The guest's rate limit (or the daemon's `--max-rate`).
    ForTokens,
    /// Healthy entropy from the sources.
    ForEntropy,
}

/// A client's access to its guest's bytes: the guest's limits and the
/// guest's pool stream, with a wake-up for when the pool has bytes again.
pub struct GuestReader {
    guest: Arc<Guest>,
    timeouts: Timeouts,
    shared: Arc<SharedStream>,
    stopping: Arc<AtomicBool>,
    /// This client's: a read waiting for the pool ends when it is closed.
    activity: Arc<ClientActivity>,
    parking: Arc<Parking>,
}

impl GuestReader {
    /// Waits until `client` has a command to read (or has closed), for at
    /// most `idle` if given (then `TimedOut`). While an in-place upgrade
    /// takes the guest's clients over, the session parks here, between
    /// commands, and reads nothing.
    pub fn wait_for_command(
        &self,
        client: &dyn ClientStream,
        idle: Option<Duration>,
    ) -> io::Result<()> {
        let deadline = idle.map(|idle| Instant::now() + idle);
        loop {
            if self.parking.asked() {
                self.parking.park();
                continue;
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client was idle too long",
                        ));
                    }
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = vec![PollFd::new(client.socket(), PollFlags::POLLIN)];
            if let Some(event) = &self.parking.event {
                // SAFETY: the EventFd lives in `parking`, which outlives
                // the poll.
                let event = unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) };
                fds.push(PollFd::new(event, PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {
                    let readable = fds[0].revents().is_some_and(|r| !r.is_empty());
                    if readable && !self.parking.asked() {
                        return Ok(());
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn supply(&self, buf: &mut [u8], now: Instant) -> Supplied {
        let mut stream = self.shared.stream.lock().unwrap_or_else(|e| e.into_inner());
        self.guest.supply(stream.as_mut(), buf, now)
    }

    /// The guest this reader draws for.
    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// The deadlines the client is held to.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Marks a command of the client's as answered: how long it has been
    /// idle is counted from now when a newcomer needs its place.
    pub fn command_done(&self) {
        self.activity.command_done(Instant::now());
    }

    /// One attempt: up to `buf.len()` bytes now, or 0.
    pub fn read_now(&mut self, buf: &mut [u8]) -> usize {
        match self.supply(buf, Instant::now()) {
            Supplied::Bytes(n) => {
                self.account(n);
                n
            }
            Supplied::Starved | Supplied::Throttled(_) => 0,
        }
    }

    /// Fills `buf` whole, waiting on this thread for tokens or for the pool.
    pub fn read_blocking(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.read_until(buf, None).map(|_| ())
    }

    /// Fills as much of `buf` as it can before `deadline` (if any), waiting
    /// on this thread; returns how many bytes that was, and what it waited
    /// for last (why it got no more, if it got fewer than asked for).
    pub fn read_until(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<(usize, Waited)> {
        let mut filled = 0;
        let mut waited = Waited::Nothing;
        while filled < buf.len() {
            let now = Instant::now();
            let left = deadline.map(|d| d.saturating_duration_since(now));
            if left.is_some_and(|left| left.is_zero()) {
                break;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return Err(io::Error::other("the daemon is stopping"));
            }
            // Its socket is shut down, but a read waiting for the pool
            // would not look at it until it had the bytes.
            if self.activity.is_evicted() {
                return Err(io::Error::other("closed to make room for a new client"));
            }
            match self.supply(&mut buf[filled..], now) {
                Supplied::Bytes(n) => {
                    self.account(n);
                    filled += n;
                }
                Supplied::Throttled(wait) => {
                    waited = Waited::ForTokens;
                    let stop_check = self.timeouts.stop_check;
                    thread::sleep(wait.min(stop_check).min(left.unwrap_or(wait)));
                }
                Supplied::Starved => {
                    waited = Waited::ForEntropy;
                    debug!("guest {}: read waits for entropy", self.guest.name());
                    self.wait_for_wake()?;
                }
            }
        }
        self.guest.stats.requests.fetch_add(1, Ordering::Relaxed);
        Ok((filled, waited))
    }

    fn wait_for_wake(&self) -> io::Result<()> {
        // Other clients of the guest may wait on the same wake-up and take
        // it first; the timeout bounds how long this one then sleeps.
        let wake = &self.shared.wake;
        // SAFETY: the consumer owns this fd and outlives the poll call.
        let fd = unsafe { BorrowedFd::borrow_raw(wake.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(self.timeouts.stop_check).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {
                let _ = wake.consume();
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn account(&self, bytes: usize) {
        self.guest
            .stats
            .bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.guest.record(bytes as u64, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::channel;
    use crate::guest::{GuestLimits, SharedBucket};
    use std::io::Read;

    fn clients() -> Arc<Clients> {
        let pool = crate::entropy::pool::os_pool();
        let guest = Guest::with_limits("vm", pool, GuestLimits::default(), SharedBucket::default());
        Clients::new(guest)
    }

    /// Serves one client on this thread; returns what it was told.
    fn serve_one(clients: &Arc<Clients>) -> Vec<u8> {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        clients.serve(&channel::PROTOCOL, "in a test", &mut theirs);
        drop(theirs);
        let mut told = Vec::new();
        ours.read_to_end(&mut told).unwrap();
        told
    }

    #[test]
    fn the_client_to_close_is_the_idlest_but_never_the_first() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let table = |clients: &[(u64, Instant)]| -> HashMap<u64, OpenClient> {
            clients
                .iter()
                .map(|&(id, last_command)| {
                    let (socket, _) = UnixStream::pair().unwrap();
                    let client = OpenClient {
                        socket: socket.into(),
                        peer: format!("client {id}"),
                        activity: Arc::new(ClientActivity::new(last_command)),
                    };
                    (id, client)
                })
                .collect()
        };
        // The first (lowest id) is idle longest, yet kept; of the others,
        // the one whose last command is oldest goes, however recently it
        // connected.
        let open = table(&[(4, at(0)), (5, at(9)), (6, at(3)), (9, at(1)), (7, at(5))]);
        assert_eq!(idlest_but_first(&open), Some(9));
        // A command done makes a client the least idle.
        open[&9].activity.command_done(at(10));
        assert_eq!(idlest_but_first(&open), Some(6));
        // Equally idle: the older goes.
        let open = table(&[(1, at(0)), (3, at(2)), (2, at(2))]);
        assert_eq!(idlest_but_first(&open), Some(2));
        // Nothing to close but the first, or nothing at all.
        assert_eq!(idlest_but_first(&table(&[(1, at(0))])), None);
        assert_eq!(idlest_but_first(&table(&[])), None);
    }

    #[test]
    fn a_stopping_guest_refuses_clients_without_counting_them_as_over_its_limit() {
        let clients = clients();
        clients.close_all();
        assert_eq!(serve_one(&clients), channel::PROTOCOL.busy_reply);
        let stats = clients.guest().stats.snapshot();
        assert_eq!((stats.refused_connections, stats.connections), (0, 0));
    }

    #[test]
    fn a_guests_clients_share_one_stream_so_reconnecting_draws_no_new_seeds() {
        use crate::entropy::pool::{Pool, PoolConfig};
        use std::io::Write as _;
        use std::time::Duration;

        // A source that delivers 4 KiB once, then nothing: less than the
        // reservoir holds, so the pool's level only goes down from then
        // on, by 32 bytes per seed drawn.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("entropy.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let writer_path = fifo.clone();
        thread::spawn(move || {
            let mut bytes = vec![0u8; 4096];
            getrandom::fill(&mut bytes).unwrap();
            let mut writer = std::fs::OpenOptions::new()
                .write(true)
                .open(writer_path)
                .unwrap();
            writer.write_all(&bytes).unwrap();
            // Kept open: the source waits rather than seeing an end.
            thread::sleep(Duration::from_secs(60));
        });
        let pool = Pool::start(PoolConfig {
            sources: vec![
                format!("file={},min-entropy=8", fifo.display())
                    .parse()
                    .unwrap(),
            ],
            mode: Default::default(),
            reseed: Default::default(),
        })
        .unwrap();
        // Settled once all 4 KiB passed the health tests and the
        // conditioner made blocks of all of it: at 8 credited bits a byte,
        // a block for every 40 bytes. Nothing takes from the pool yet.
        use crate::entropy::conditioner::{BITS_PER_BLOCK, BLOCK_BYTES};
        let source = Arc::clone(&pool.sources()[0]);
        let settled_level = 4096 / (BITS_PER_BLOCK as usize / 8) * BLOCK_BYTES;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let contributed = source.snapshot().bytes_contributed;
            if contributed == 4096 && pool.level() == settled_level {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the pool never took in the 4 KiB: {:?}, level {}",
                source.snapshot(),
                pool.level()
            );
            thread::sleep(Duration::from_millis(10));
        }

        let guest = Guest::with_limits(
            "vm",
            Arc::clone(&pool),
            GuestLimits::default(),
            SharedBucket::default(),
        );
        let clients = Clients::new(guest);
        let level_before = pool.level();
        for _ in 0..5 {
            let (mut ours, mut theirs) = UnixStream::pair().unwrap();
            ours.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let serving = Arc::clone(&clients);
            let server =
                thread::spawn(move || serving.serve(&channel::PROTOCOL, "test", &mut theirs));
            assert_eq!(
                vhost_rng_protocol::wire::fetch(&mut ours, 16, &mut Vec::new()).unwrap(),
                16
            );
            drop(ours);
            server.join().unwrap();
        }
        assert_eq!(
            level_before - pool.level(),
            32,
            "five connections drew one 32-byte seed between them"
        );
    }
}
