//! Serving one guest's vhost-user connections, one after another, for as
//! long as the daemon runs: a VM shutting down, rebooting or crashing ends a
//! connection, never the guest's service.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{RngDevice, TIMER_EVENT, WAKE_EVENT};
use super::socket::GuestSocket;
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
    pub fn path(&self) -> &Path {
        match self {
            Endpoint::Listen(socket) => socket.path(),
            Endpoint::Connect(path) => path,
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
    stopping: AtomicBool,
    /// Wakes the thread waiting for a VMM when the guest is stopped.
    stop_event: EventFd,
    active: Mutex<Option<ShutdownHandle>>,
}

impl GuestServer {
    /// Starts serving `guest` on `endpoint` in a thread of its own.
    pub fn spawn(guest: Arc<Guest>, endpoint: Endpoint) -> io::Result<Arc<Self>> {
        let listener = match &endpoint {
            Endpoint::Listen(socket) => Some((
                socket.try_clone_listener()?,
                Listener::from(socket.try_clone_listener()?),
            )),
            Endpoint::Connect(_) => None,
        };
        let server = Arc::new(GuestServer {
            guest,
            endpoint,
            stopping: AtomicBool::new(false),
            stop_event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            active: Mutex::new(None),
        });
        let worker = Arc::clone(&server);
        thread::Builder::new()
            .name(format!("guest-{}", server.guest.name()))
            .spawn(move || match listener {
                Some((readiness, mut listener)) => worker.listen_loop(&readiness, &mut listener),
                None => worker.connect_loop(),
            })?;
        Ok(server)
    }

    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

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
            connection.shutdown();
        }
        if let Endpoint::Listen(socket) = &self.endpoint {
            socket.remove();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_daemon(&self) -> Option<Connection> {
        let device = match RngDevice::new(Arc::clone(&self.guest)) {
            Ok(device) => device,
            Err(e) => {
                warn!("guest {}: cannot create device: {e}", self.guest.name());
                return None;
            }
        };
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let (wake_fd, timer_fd) = (device.wake_fd(), device.timer_fd());
        let name = format!("vhost-rng-{}", self.guest.name());
        let mut daemon = match VhostUserDaemon::new(name, Arc::clone(&device), memory) {
            Ok(daemon) => Connection {
                daemon: Some(daemon),
                device,
            },
            Err(e) => {
                warn!(
                    "guest {}: cannot create vhost-user handler: {e}",
                    self.guest.name()
                );
                return None;
            }
        };
        // The worker thread that serves the queue also takes the pool's
        // wake-ups, so a starved request is retried on the same thread.
        let registered = daemon.daemon().get_epoll_handlers().first().map(|worker| {
            worker.register_listener(wake_fd, EventSet::IN, u64::from(WAKE_EVENT))?;
            worker.register_listener(timer_fd, EventSet::IN, u64::from(TIMER_EVENT))
        });
        match registered {
            Some(Ok(())) => Some(daemon),
            Some(Err(e)) => {
                warn!(
                    "guest {}: cannot watch for wake-ups and timers: {e}",
                    self.guest.name()
                );
                None
            }
            None => {
                warn!(
                    "guest {}: vhost-user handler has no worker",
                    self.guest.name()
                );
                None
            }
        }
    }

    /// `readiness` and `listener` are the same listening socket: the first
    /// to wait on, the second for vhost-user to accept on.
    fn listen_loop(&self, readiness: &UnixListener, listener: &mut Listener) {
        while !self.is_stopping() {
            // The connection's handler and vring worker thread are only
            // created once a VMM is knocking, so an idle guest costs one
            // sleeping thread.
            let waited = wait_readable(readiness, &self.stop_event);
            if self.is_stopping() {
                return;
            }
            if let Err(e) = waited {
                warn!(
                    "guest {}: waiting on {}: {e}",
                    self.guest.name(),
                    self.path().display()
                );
                thread::sleep(SETUP_RETRY);
                continue;
            }
            let Some(mut daemon) = self.new_daemon() else {
                thread::sleep(SETUP_RETRY);
                continue;
            };
            if let Err(e) = daemon.daemon().start(listener) {
                if !self.is_stopping() {
                    warn!(
                        "guest {}: accepting on {}: {e}",
                        self.guest.name(),
                        self.path().display()
                    );
                    thread::sleep(SETUP_RETRY);
                }
                continue;
            }
            self.serve_connection(daemon);
        }
    }

    fn connect_loop(&self) {
        let path = self.path().to_owned();
        // `start_client` takes a &str; the CLI only accepts UTF-8 paths.
        let path_str = path.to_string_lossy().into_owned();
        let mut delay = CONNECT_RETRY_FIRST;
        let mut waiting_logged = false;
        while !self.is_stopping() {
            let Some(mut daemon) = self.new_daemon() else {
                thread::sleep(SETUP_RETRY);
                continue;
            };
            match daemon.daemon().start_client(&path_str) {
                Ok(()) => {
                    delay = CONNECT_RETRY_FIRST;
                    waiting_logged = false;
                    self.serve_connection(daemon);
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
                    thread::sleep(delay);
                    delay = (delay * 2).min(CONNECT_RETRY_MAX);
                }
            }
        }
    }

    fn serve_connection(&self, mut connection: Connection) {
        let daemon = connection.daemon();
        let name = self.guest.name();
        let path = self.path().display();
        *self.lock_active() = daemon.shutdown_handle();
        if self.is_stopping() {
            // stop() ran between accept and registering the connection.
            daemon.request_shutdown();
        }
        self.guest.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.guest.stats.connected.store(true, Ordering::Relaxed);
        info!("guest {name}: VMM connected on {path}");
        let result = daemon.wait();
        self.lock_active().take();
        self.guest.stats.connected.store(false, Ordering::Relaxed);
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("guest {name}: VMM disconnected from {path}"),
            Err(e) => warn!("guest {name}: connection on {path} ended: {e}"),
        }
        // Dropping the connection stops and joins its vring worker.
    }
}

/// One VMM connection's vhost-user handler and the device it serves.
struct Connection {
    daemon: Option<VhostUserDaemon<Arc<RngDevice>>>,
    device: Arc<RngDevice>,
}

impl Connection {
    fn daemon(&mut self) -> &mut VhostUserDaemon<Arc<RngDevice>> {
        // Only `drop` empties it.
        self.daemon.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The handler first (this joins the vring worker), then the exit
        // event the crate leaves open.
        self.daemon.take();
        self.device.close_exit_event();
    }
}

/// Blocks until a connection is waiting on `listener`.
fn wait_readable(listener: &UnixListener, stop: &EventFd) -> nix::Result<()> {
    // SAFETY: the EventFd outlives this call, so its fd stays open.
    let stop = unsafe { std::os::fd::BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    let mut fds = [
        PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        PollFd::new(stop, PollFlags::POLLIN),
    ];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            result => return result.map(|_| ()),
        }
    }
}
