//! Stream-socket frontends (EGD, the vhost-rng channel protocol): one
//! guest's listening socket, a thread per client, and blocking reads that
//! wait for the guest's tokens or for the pool on that client's own thread,
//! so one waiting client never holds up another.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmm_sys_util::event::{EventConsumer, EventFlag, new_event_consumer_and_notifier};

use super::vhost_user::GuestSocket;
use crate::guest::{Guest, Supplied};
use crate::pool::EntropyStream;

/// Clients served at once per guest; more are refused (closed) so a
/// misbehaving client cannot make the daemon spawn threads without bound.
pub const MAX_CLIENTS: usize = 8;
/// How often a waiting client looks whether the daemon is stopping.
const STOP_CHECK: Duration = Duration::from_millis(500);

/// Serves one client connection until it ends.
pub trait Session: Send {
    fn serve(&mut self, client: &UnixStream) -> io::Result<()>;
}

/// Makes a session for a new client of `guest`.
pub type SessionFactory = fn(GuestReader) -> Box<dyn Session>;

/// One guest's listening socket and its clients.
pub struct StreamServer {
    guest: Arc<Guest>,
    socket: GuestSocket,
    /// `EGD`, `channel`: names the protocol in logs.
    protocol: &'static str,
    new_session: SessionFactory,
    stopping: Arc<AtomicBool>,
    /// Open clients by id, so `stop` can close them.
    clients: Mutex<HashMap<u64, UnixStream>>,
}

impl StreamServer {
    /// Starts accepting clients of `guest` on `socket`.
    pub fn spawn(
        guest: Arc<Guest>,
        socket: GuestSocket,
        protocol: &'static str,
        new_session: SessionFactory,
    ) -> io::Result<Arc<Self>> {
        let listener = socket.try_clone_listener()?;
        let server = Arc::new(StreamServer {
            guest,
            socket,
            protocol,
            new_session,
            stopping: Arc::new(AtomicBool::new(false)),
            clients: Mutex::new(HashMap::new()),
        });
        let accepting = Arc::clone(&server);
        thread::Builder::new()
            .name(format!("{protocol}-{}", server.guest.name()))
            .spawn(move || {
                for stream in listener.incoming() {
                    if accepting.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    match stream {
                        Ok(stream) => accepting.admit(stream),
                        Err(e) => {
                            warn!("guest {}: {protocol} accept: {e}", accepting.guest.name());
                            thread::sleep(STOP_CHECK);
                        }
                    }
                }
            })?;
        Ok(server)
    }

    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    fn lock_clients(&self) -> MutexGuard<'_, HashMap<u64, UnixStream>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes every client and removes the socket file.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (_, client) in self.lock_clients().drain() {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        // Unblocks the accept loop so its thread ends, then removes the file.
        let _ = UnixStream::connect(self.socket.path());
        self.socket.remove();
    }

    fn admit(self: &Arc<Self>, stream: UnixStream) {
        let name = self.guest.name().to_owned();
        let protocol = self.protocol;
        if self.lock_clients().len() >= MAX_CLIENTS {
            warn!("guest {name}: more than {MAX_CLIENTS} {protocol} clients; refusing one");
            return;
        }
        let Ok(registered) = stream.try_clone() else {
            return;
        };
        static NEXT_CLIENT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        self.lock_clients().insert(id, registered);
        self.guest.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.guest.stats.connected.store(true, Ordering::Relaxed);
        info!(
            "guest {name}: {protocol} client connected on {}",
            self.socket.path().display()
        );

        let server = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("{protocol}-{name}-client"))
            .spawn(move || {
                let guest = &server.guest;
                let result = GuestReader::new(Arc::clone(guest), Arc::clone(&server.stopping))
                    .and_then(|reader| (server.new_session)(reader).serve(&stream));
                match result {
                    Ok(()) => info!("guest {}: {protocol} client disconnected", guest.name()),
                    Err(e) => info!("guest {}: {protocol} client closed: {e}", guest.name()),
                }
                // Closed here, not only when `stop` drops its copy.
                let _ = stream.shutdown(std::net::Shutdown::Both);
                let mut clients = server.lock_clients();
                clients.remove(&id);
                if clients.is_empty() {
                    guest.stats.connected.store(false, Ordering::Relaxed);
                }
            });
        if let Err(e) = spawned {
            self.lock_clients().remove(&id);
            warn!("guest {name}: cannot start a {protocol} client thread: {e}");
        }
    }
}

/// A client's access to its guest's bytes: the guest's limits and a pool
/// stream of its own, with a wake-up for when the pool has bytes again.
pub struct GuestReader {
    guest: Arc<Guest>,
    stream: Box<dyn EntropyStream>,
    wake: EventConsumer,
    stopping: Arc<AtomicBool>,
}

impl GuestReader {
    fn new(guest: Arc<Guest>, stopping: Arc<AtomicBool>) -> io::Result<Self> {
        let (wake, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let waker = Arc::new(move || {
            let _ = notifier.notify();
        });
        let stream = guest.pool().stream(waker, guest.weight());
        Ok(GuestReader {
            guest,
            stream,
            wake,
            stopping,
        })
    }

    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// One attempt: up to `buf.len()` bytes now, or 0.
    pub fn read_now(&mut self, buf: &mut [u8]) -> usize {
        match self.guest.supply(self.stream.as_mut(), buf) {
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
    /// on this thread; returns how many bytes that was.
    pub fn read_until(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|left| left.is_zero()) {
                break;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return Err(io::Error::other("the daemon is stopping"));
            }
            match self.guest.supply(self.stream.as_mut(), &mut buf[filled..]) {
                Supplied::Bytes(n) => {
                    self.account(n);
                    filled += n;
                }
                Supplied::Throttled(wait) => {
                    thread::sleep(wait.min(STOP_CHECK).min(left.unwrap_or(wait)));
                }
                Supplied::Starved => {
                    debug!("guest {}: read waits for entropy", self.guest.name());
                    self.wait_for_wake()?;
                }
            }
        }
        self.guest.stats.requests.fetch_add(1, Ordering::Relaxed);
        Ok(filled)
    }

    fn wait_for_wake(&self) -> io::Result<()> {
        // SAFETY: the consumer owns this fd and outlives the poll call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(STOP_CHECK).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {
                let _ = self.wake.consume();
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
