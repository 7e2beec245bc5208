//! The EGD frontend: guests whose VMM speaks the Entropy Gathering Daemon
//! protocol, e.g. QEMU `-object rng-egd` behind `virtio-rng-pci`, or
//! libvirt `<backend model='egd'>`. No vhost-user needed.
//!
//! Commands (one byte each, answers as EGD defines them):
//!
//! | byte | request | answer |
//! | --- | --- | --- |
//! | 0x00 | entropy available | 4 bytes, big-endian bit count |
//! | 0x01 N | read up to N bytes now | 1 byte count, then the bytes |
//! | 0x02 N | read exactly N bytes, waiting | N bytes |
//! | 0x03 ... | write entropy | refused: the payload is discarded, nothing is credited |
//! | 0x04 | process id | 1 byte length, then the pid in ASCII |
//!
//! Each client gets a thread of its own, so a blocking read that waits for
//! the guest's tokens or for the pool never holds up another client.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmm_sys_util::event::{EventConsumer, EventFlag, new_event_consumer_and_notifier};

use super::vhost_user::GuestSocket;
use crate::guest::{Guest, Supplied};
use crate::pool::EntropyStream;

const GET_ENTROPY_LEVEL: u8 = 0x00;
const READ_NONBLOCKING: u8 = 0x01;
const READ_BLOCKING: u8 = 0x02;
const WRITE_ENTROPY: u8 = 0x03;
const GET_PID: u8 = 0x04;

/// Clients served at once per guest; more are refused (closed) so a
/// misbehaving VMM cannot make the daemon spawn threads without bound.
const MAX_CLIENTS: usize = 8;
/// How often a waiting client looks whether the daemon is stopping.
const STOP_CHECK: Duration = Duration::from_millis(500);

/// One guest's EGD socket and its clients.
pub struct EgdServer {
    guest: Arc<Guest>,
    socket: GuestSocket,
    stopping: Arc<AtomicBool>,
    /// Open clients by id, so `stop` can close them.
    clients: Arc<Mutex<HashMap<u64, UnixStream>>>,
}

impl EgdServer {
    /// Starts accepting EGD clients for `guest` on `socket`.
    pub fn spawn(guest: Arc<Guest>, socket: GuestSocket) -> io::Result<Arc<Self>> {
        let listener = socket.try_clone_listener()?;
        let server = Arc::new(EgdServer {
            guest,
            socket,
            stopping: Arc::new(AtomicBool::new(false)),
            clients: Arc::new(Mutex::new(HashMap::new())),
        });
        let accepting = Arc::clone(&server);
        thread::Builder::new()
            .name(format!("egd-{}", server.guest.name()))
            .spawn(move || {
                for stream in listener.incoming() {
                    if accepting.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    match stream {
                        Ok(stream) => accepting.admit(stream),
                        Err(e) => {
                            warn!("guest {}: EGD accept: {e}", accepting.guest.name());
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
        self.socket.remove();
        // Unblocks the accept loop so its thread ends.
        let _ = UnixStream::connect(self.socket.path());
    }

    fn admit(self: &Arc<Self>, stream: UnixStream) {
        let name = self.guest.name().to_owned();
        if self.lock_clients().len() >= MAX_CLIENTS {
            warn!("guest {name}: more than {MAX_CLIENTS} EGD clients; refusing one");
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
            "guest {name}: EGD client connected on {}",
            self.socket.path().display()
        );

        let server = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("egd-{name}-client"))
            .spawn(move || {
                let guest = &server.guest;
                let result = EgdSession::new(guest, Arc::clone(&server.stopping))
                    .and_then(|mut session| session.serve(&stream));
                match result {
                    Ok(()) => info!("guest {}: EGD client disconnected", guest.name()),
                    Err(e) => info!("guest {}: EGD client closed: {e}", guest.name()),
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
            warn!("guest {name}: cannot start an EGD client thread: {e}");
        }
    }
}

/// One client connection.
struct EgdSession<'a> {
    guest: &'a Guest,
    stream: Box<dyn EntropyStream>,
    wake: EventConsumer,
    stopping: Arc<AtomicBool>,
}

impl<'a> EgdSession<'a> {
    fn new(guest: &'a Guest, stopping: Arc<AtomicBool>) -> io::Result<Self> {
        let (wake, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let waker = Arc::new(move || {
            let _ = notifier.notify();
        });
        let stream = guest.pool().stream(waker, guest.weight());
        Ok(EgdSession {
            guest,
            stream,
            wake,
            stopping,
        })
    }

    fn serve(&mut self, mut client: &UnixStream) -> io::Result<()> {
        let mut command = [0u8; 1];
        loop {
            match client.read(&mut command) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            match command[0] {
                GET_ENTROPY_LEVEL => {
                    let bits = self.available_bits();
                    client.write_all(&bits.to_be_bytes())?;
                }
                READ_NONBLOCKING => {
                    let wanted = read_u8(client)? as usize;
                    let mut buf = [0u8; 255];
                    let n = match self.guest.supply(self.stream.as_mut(), &mut buf[..wanted]) {
                        Supplied::Bytes(n) => n,
                        _ => 0,
                    };
                    self.account(n);
                    client.write_all(&[n as u8])?;
                    client.write_all(&buf[..n])?;
                }
                READ_BLOCKING => {
                    let wanted = read_u8(client)? as usize;
                    let mut buf = [0u8; 255];
                    self.fill_blocking(&mut buf[..wanted])?;
                    client.write_all(&buf[..wanted])?;
                }
                WRITE_ENTROPY => {
                    // bits (2 bytes), length (1 byte), then the data.
                    let mut header = [0u8; 3];
                    client.read_exact(&mut header)?;
                    let mut discard = vec![0u8; header[2] as usize];
                    client.read_exact(&mut discard)?;
                    if let Some(suppressed) = self.guest.defect_log.permit() {
                        warn!(
                            "guest {}: EGD client tried to write entropy; refused, clients never \
                             feed the pool ({suppressed} similar messages suppressed)",
                            self.guest.name()
                        );
                    }
                }
                GET_PID => {
                    let pid = std::process::id().to_string();
                    client.write_all(&[pid.len() as u8])?;
                    client.write_all(pid.as_bytes())?;
                }
                other => {
                    self.guest
                        .stats
                        .defective_requests
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unknown EGD command {other:#04x}"),
                    ));
                }
            }
        }
    }

    /// What an EGD client is told is available: the pool's full-entropy
    /// bytes in raw mode; in DRBG mode a nominal 4096 bytes while any source
    /// is healthy.
    fn available_bits(&self) -> u32 {
        let pool = self.guest.pool();
        let bytes = match pool.mode() {
            crate::pool::Mode::Raw => pool.level(),
            crate::pool::Mode::Drbg if pool.any_healthy() => 4096,
            crate::pool::Mode::Drbg => 0,
        };
        u32::try_from(bytes * 8).unwrap_or(u32::MAX)
    }

    /// Fills `buf` whole, waiting on this client's own thread for tokens or
    /// for the pool.
    fn fill_blocking(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.stopping.load(Ordering::SeqCst) {
                return Err(io::Error::other("the daemon is stopping"));
            }
            match self.guest.supply(self.stream.as_mut(), &mut buf[filled..]) {
                Supplied::Bytes(n) => {
                    self.account(n);
                    filled += n;
                }
                Supplied::Throttled(wait) => thread::sleep(wait.min(STOP_CHECK)),
                Supplied::Starved => {
                    debug!("guest {}: EGD read waits for entropy", self.guest.name());
                    self.wait_for_wake()?;
                }
            }
        }
        self.guest.stats.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn wait_for_wake(&self) -> io::Result<()> {
        // SAFETY: the consumer owns this fd and outlives the poll call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(STOP_CHECK).unwrap_or(PollTimeout::MAX),
        ) {
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
        self.guest.record(bytes as u64, std::time::Instant::now());
    }
}

fn read_u8(mut stream: &UnixStream) -> io::Result<u8> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(byte[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::vhost_user::SocketAccess;
    use crate::guest::{GuestLimits, SharedBucket};
    use crate::limiter::RateLimit;
    use crate::pool::{Pool, PoolConfig};
    use std::time::Instant;

    fn pool() -> Arc<Pool> {
        Pool::start(PoolConfig {
            sources: vec!["os".parse().unwrap()],
            mode: Default::default(),
            reseed: Default::default(),
        })
        .unwrap()
    }

    fn server(limits: GuestLimits) -> (Arc<EgdServer>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let socket =
            GuestSocket::bind(&dir.path().join("egd.sock"), SocketAccess::default()).unwrap();
        let guest = Guest::with_limits("egd", pool(), limits, SharedBucket::default());
        (EgdServer::spawn(guest, socket).unwrap(), dir)
    }

    fn client(dir: &tempfile::TempDir) -> UnixStream {
        let stream = UnixStream::connect(dir.path().join("egd.sock")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    #[test]
    fn blocking_and_nonblocking_reads_pid_and_level() {
        let (server, dir) = server(GuestLimits::default());
        let mut c = client(&dir);

        c.write_all(&[READ_BLOCKING, 200]).unwrap();
        let mut first = [0u8; 200];
        c.read_exact(&mut first).unwrap();
        c.write_all(&[READ_BLOCKING, 200]).unwrap();
        let mut second = [0u8; 200];
        c.read_exact(&mut second).unwrap();
        assert_ne!(first, second);

        c.write_all(&[READ_NONBLOCKING, 16]).unwrap();
        let mut count = [0u8; 1];
        c.read_exact(&mut count).unwrap();
        let mut bytes = vec![0u8; count[0] as usize];
        c.read_exact(&mut bytes).unwrap();
        assert!(count[0] <= 16);

        c.write_all(&[GET_PID]).unwrap();
        c.read_exact(&mut count).unwrap();
        let mut pid = vec![0u8; count[0] as usize];
        c.read_exact(&mut pid).unwrap();
        assert_eq!(
            String::from_utf8(pid).unwrap(),
            std::process::id().to_string()
        );

        c.write_all(&[GET_ENTROPY_LEVEL]).unwrap();
        let mut level = [0u8; 4];
        c.read_exact(&mut level).unwrap();
        assert!(u32::from_be_bytes(level) > 0);
        assert!(server.guest().stats.snapshot().bytes >= 400);
    }

    #[test]
    fn writes_are_refused_and_the_connection_goes_on() {
        let (_server, dir) = server(GuestLimits::default());
        let mut c = client(&dir);
        c.write_all(&[WRITE_ENTROPY, 0, 64, 8, 1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        c.write_all(&[READ_BLOCKING, 8]).unwrap();
        let mut out = [0u8; 8];
        c.read_exact(&mut out).unwrap();
        assert_ne!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn unknown_commands_close_only_that_client() {
        let (_server, dir) = server(GuestLimits::default());
        let mut bad = client(&dir);
        bad.write_all(&[0x7f]).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(bad.read(&mut byte).unwrap(), 0, "a bad client is closed");

        let mut good = client(&dir);
        good.write_all(&[READ_BLOCKING, 4]).unwrap();
        good.read_exact(&mut [0u8; 4]).unwrap();
    }

    #[test]
    fn a_throttled_blocking_read_waits_without_holding_up_others() {
        let limits = GuestLimits {
            rate: Some(RateLimit::new(100, 1000, 100).unwrap()),
            weight: 1,
        };
        let (_server, dir) = server(limits);
        let mut slow = client(&dir);
        let mut other = client(&dir);
        let started = Instant::now();
        slow.write_all(&[READ_BLOCKING, 150]).unwrap();
        // While the first read waits for tokens, a second client of the
        // same guest is still answered (from the same bucket, later).
        other.write_all(&[GET_PID]).unwrap();
        let mut len = [0u8; 1];
        other.read_exact(&mut len).unwrap();
        assert!(started.elapsed() < Duration::from_millis(500));

        let mut out = [0u8; 150];
        slow.read_exact(&mut out).unwrap();
        // 150 bytes at 100 B/s from an empty bucket: at least 1.5 s.
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn stop_closes_clients_and_removes_the_socket() {
        let (server, dir) = server(GuestLimits::default());
        let mut c = client(&dir);
        c.write_all(&[GET_PID]).unwrap();
        c.read_exact(&mut [0u8; 1]).unwrap();
        server.stop();
        assert!(!dir.path().join("egd.sock").exists());
    }
}
