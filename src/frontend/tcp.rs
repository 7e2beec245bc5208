// SPDX-License-Identifier: Apache-2.0
//! The TCP listener (`--listen-tcp ADDR`) for guests with no vsock (Xen):
//! every connection must complete a Noise handshake with its guest's
//! pre-shared key ([`vhost_rng_protocol::noise`]) before it is served; there is no
//! plaintext mode. The name the guest gives in its hello selects the key
//! (`tcp-psk=PATH`), the key proves the name, and the guest is served the
//! channel protocol over the encrypted stream with that guest's limits.
//!
//! Anyone on the network can connect, so connections that have not proved
//! a key yet are bounded: at most [`MAX_HANDSHAKES`] at once, each with
//! [`HANDSHAKE_TIMEOUT`] to finish, all reads and writes of the handshake
//! together. A wrong key or an unknown name is logged and the connection
//! closed without an answer. Every refusal is also counted, by reason
//! ([`TcpListener::status`]), and a wrong key against the guest it named
//! too, so that both show in `vhost-rng status` and the metrics without
//! reading logs.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, debug, info};
use nix::sys::socket::{setsockopt, sockopt};

use super::accept::{ACCEPT_ERROR_PAUSE, StopSignal};
use super::channel;
use super::shared::{Directory, ListenerStatus, Member};
use super::stream::ClientStream;
use vhost_rng_protocol::deadline::TimedStream;
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;
use vhost_rng_protocol::noise::{self, HandshakeError, Psk, SecureStream};

/// Connections allowed to be in their handshake at once; more are closed
/// at once, so unauthenticated peers cannot make the daemon start threads
/// without bound.
pub const MAX_HANDSHAKES: usize = 256;
/// Of those, how many may come from one IP address. A guest needs one; a
/// handshake takes milliseconds. Without it one host opening silent
/// connections could hold every place and lock all guests out.
pub const MAX_HANDSHAKES_PER_PEER: usize = 8;
/// Time a connection has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The guests of the TCP listener, by name, with their keys.
pub type TcpDirectory = Directory<String, Psk>;

/// Why the `--listen-tcp` listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// Binding or listening on the address failed (in use, not an address of
    /// this host, a privileged port).
    #[error("cannot listen on TCP {addr}: {error}")]
    Listen {
        /// The `--listen-tcp` address.
        addr: SocketAddr,
        /// The error from the operating system.
        #[source]
        error: io::Error,
    },
    /// The listener's stop signal or accept thread could not be made.
    #[error("cannot start the TCP listener: {0}")]
    Spawn(#[source] io::Error),
}

/// What the listener counts, for [`TcpListener::status`]: connections, and
/// refusals before a guest was reached, by reason.
#[derive(Default)]
struct Counters {
    /// Every connection accepted, whatever became of it.
    connections: AtomicU64,
    /// The hello named no guest with a `tcp-psk` key.
    unknown_name: AtomicU64,
    /// The hello named a guest but the handshake did not prove its key.
    wrong_key: AtomicU64,
    /// The peer does not speak the protocol: no hello, an invalid name, a
    /// malformed Noise message.
    not_protocol: AtomicU64,
    /// Closed, reset or silent before the handshake was done.
    handshake_incomplete: AtomicU64,
    /// Closed at once: [`MAX_HANDSHAKES`] were in progress already.
    too_many_handshakes: AtomicU64,
}

impl Counters {
    fn refused(&self) -> BTreeMap<String, u64> {
        [
            ("unknown_name", &self.unknown_name),
            ("wrong_key", &self.wrong_key),
            ("not_protocol", &self.not_protocol),
            ("handshake_incomplete", &self.handshake_incomplete),
            ("too_many_handshakes", &self.too_many_handshakes),
        ]
        .into_iter()
        .map(|(reason, count)| (reason.to_owned(), count.load(Ordering::Relaxed)))
        .collect()
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The running listener.
pub struct TcpListener {
    local_addr: SocketAddr,
    /// [`HANDSHAKE_TIMEOUT`], shorter in tests.
    handshake_timeout: Duration,
    directory: Arc<TcpDirectory>,
    /// Handshakes in progress, by peer address.
    handshakes: Mutex<HashMap<IpAddr, usize>>,
    stop: StopSignal,
    refusals: RateLimitedLog,
    counters: Counters,
}

impl TcpListener {
    /// Listens on `addr` and starts the accept thread, with no guests yet;
    /// each connection has [`HANDSHAKE_TIMEOUT`] for its handshake.
    pub fn start(addr: SocketAddr) -> Result<Arc<Self>, TcpError> {
        Self::start_with_handshake_timeout(addr, HANDSHAKE_TIMEOUT)
    }

    /// [`TcpListener::start`], giving each connection `handshake_timeout`
    /// instead of [`HANDSHAKE_TIMEOUT`] (tests use a short one).
    pub fn start_with_handshake_timeout(
        addr: SocketAddr,
        handshake_timeout: Duration,
    ) -> Result<Arc<Self>, TcpError> {
        let socket =
            StdTcpListener::bind(addr).map_err(|error| TcpError::Listen { addr, error })?;
        Self::start_on(socket, handshake_timeout)
    }

    /// [`TcpListener::start_with_handshake_timeout`] on a socket already
    /// listening (bound here, or handed over by the previous process).
    pub fn start_on(
        socket: StdTcpListener,
        handshake_timeout: Duration,
    ) -> Result<Arc<Self>, TcpError> {
        let addr = socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let local_addr = socket
            .local_addr()
            .map_err(|error| TcpError::Listen { addr, error })?;
        let listener = Arc::new(TcpListener {
            local_addr,
            handshake_timeout,
            directory: Arc::default(),
            handshakes: Mutex::new(HashMap::new()),
            stop: StopSignal::new().map_err(TcpError::Spawn)?,
            refusals: RateLimitedLog::per_minute(8),
            counters: Counters::default(),
        });
        let accepting = Arc::clone(&listener);
        thread::Builder::new()
            .name("tcp-listener".into())
            .spawn(move || {
                crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Peer);
                accepting.accept_loop(socket)
            })
            .map_err(TcpError::Spawn)?;
        info!(
            "listening on TCP {local_addr} (encrypted: {})",
            noise::NOISE_PARAMS
        );
        Ok(listener)
    }

    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The guests this listener knows, by name, with their keys; the registry
    /// adds and removes them.
    pub fn directory(&self) -> &Arc<TcpDirectory> {
        &self.directory
    }

    /// Connections and refusals so far. A wrong key is counted here and
    /// against the guest named; refusals by the guest itself (its client
    /// limit) are the guest's only.
    pub fn status(&self) -> ListenerStatus {
        ListenerStatus {
            kind: "tcp".into(),
            address: self.local_addr.to_string(),
            connections: self.counters.connections.load(Ordering::Relaxed),
            refused: self.counters.refused(),
        }
    }

    /// Closes every connection and stops listening.
    pub fn stop(&self) {
        self.stop.raise();
        self.directory.close_all();
    }

    fn accept_loop(self: Arc<Self>, socket: StdTcpListener) {
        while self.stop.wait_for_connection(socket.as_fd()) {
            match socket.accept() {
                Ok((stream, peer)) => self.start_handshake(stream, peer),
                Err(e) => {
                    self.log_refusal(format_args!("TCP accept: {e}"));
                    thread::sleep(ACCEPT_ERROR_PAUSE);
                }
            }
        }
    }

    fn start_handshake(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        count(&self.counters.connections);
        if let Err(why) = self.begin_handshake(peer.ip()) {
            count(&self.counters.too_many_handshakes);
            self.log_refusal(format_args!("TCP {peer}: closed at once: {why}"));
            close_with_reset(stream);
            return;
        }
        let listener = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("tcp-handshake".into())
            .spawn(move || {
                let outcome = listener.handshake(stream, peer);
                listener.end_handshake(peer.ip());
                if let Some((secure, member)) = outcome {
                    listener.serve(secure, &member, peer);
                }
            });
        if let Err(e) = spawned {
            self.end_handshake(peer.ip());
            self.log_refusal(format_args!("TCP {peer}: cannot start a thread: {e}"));
        }
    }

    /// Takes a place for a handshake from `ip`, or says why there is none:
    /// all [`MAX_HANDSHAKES`] are taken, or `ip` has
    /// [`MAX_HANDSHAKES_PER_PEER`] already (so one host cannot take them all
    /// and lock every guest out).
    fn begin_handshake(&self, ip: IpAddr) -> Result<(), String> {
        let mut pending = self.handshakes.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = pending.values().sum();
        if total >= MAX_HANDSHAKES {
            return Err(format!(
                "{MAX_HANDSHAKES} connections are in their handshake already"
            ));
        }
        let from_peer = pending.entry(ip).or_insert(0);
        if *from_peer >= MAX_HANDSHAKES_PER_PEER {
            return Err(format!(
                "{MAX_HANDSHAKES_PER_PEER} connections from {ip} are in their handshake already"
            ));
        }
        *from_peer += 1;
        Ok(())
    }

    fn end_handshake(&self, ip: IpAddr) {
        let mut pending = self.handshakes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(from_peer) = pending.get_mut(&ip) {
            *from_peer -= 1;
            if *from_peer == 0 {
                pending.remove(&ip);
            }
        }
    }

    /// Authenticates the connection: the stream, and the guest whose key it
    /// proved; `None` (and a log line) if it fails.
    fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(SecureStream<Connection>, Arc<Member<Psk>>)> {
        if let Err(e) = stream.set_nodelay(true) {
            debug!("TCP {peer}: {e}");
            count(&self.counters.handshake_incomplete);
            return None;
        }
        let connection = Connection {
            stream,
            handshake_deadline: Cell::new(Some(Instant::now() + self.handshake_timeout)),
        };
        // The member whose key is checked is the one served: looked up
        // again by name afterwards, it could be a successor (a reload with
        // a new key) that this key does not belong to.
        let mut proven = None;
        let lookup = |name: &str| {
            let member = self.directory.get(&name.to_owned())?;
            let key = member.credential.clone();
            proven = Some(member);
            Some(key)
        };
        let error = match noise::accept_handshake(connection, lookup) {
            Ok(secure) => {
                secure.get_ref().handshake_deadline.set(None);
                return proven.map(|member| (secure, member));
            }
            Err(error) => error,
        };
        let counters = &self.counters;
        match error {
            HandshakeError::WrongCredential(name) => {
                count(&counters.wrong_key);
                // Gone if removed during the handshake; the listener's
                // count still has it.
                if let Some(member) = self.directory.get(&name) {
                    count(&member.clients.guest().stats.wrong_key_connections);
                }
                self.log_refusal(format_args!(
                    "TCP {peer}: refused: wrong key for guest {name} (or a hello altered in \
                     transit)"
                ));
            }
            HandshakeError::UnknownIdentity(name) => {
                count(&counters.unknown_name);
                self.log_refusal(format_args!(
                    "TCP {peer}: refused: no guest named {name} has a tcp-psk key"
                ));
            }
            HandshakeError::Io(e) => {
                count(&counters.handshake_incomplete);
                // Closed before finishing, or silent until the timeout: port
                // probes and health checks as much as attacks; not worth a
                // warning.
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionReset
                ) {
                    debug!("TCP {peer}: no handshake: {e}");
                } else {
                    let error = HandshakeError::Io(e);
                    self.log_refusal(format_args!("TCP {peer}: refused: {error}"));
                }
            }
            // Refused and Dropped are the client side's errors:
            // accept_handshake never returns them, but were it to, it would
            // be a peer out of protocol.
            error @ (HandshakeError::NotOurProtocol
            | HandshakeError::BadIdentity
            | HandshakeError::Noise(_)
            | HandshakeError::Refused
            | HandshakeError::Dropped) => {
                count(&counters.not_protocol);
                self.log_refusal(format_args!("TCP {peer}: refused: {error}"));
            }
        }
        None
    }

    /// Serves an authenticated client on its handshake's thread, as the
    /// guest whose key it proved. A guest removed or re-keyed meanwhile has
    /// closed its clients, and so refuses this one.
    fn serve(&self, mut secure: SecureStream<Connection>, member: &Member<Psk>, peer: SocketAddr) {
        let peer = format!("from TCP {peer}");
        member.clients.serve(&channel::PROTOCOL, &peer, &mut secure);
    }

    fn log_refusal(&self, message: std::fmt::Arguments<'_>) {
        log_limited!(self.refusals, Level::Warn, "{message}");
    }
}

/// Closes `stream` with a reset rather than the orderly close of a refused
/// name or key. Without SO_LINGER the close would be a reset only if the
/// client's hello had arrived by then (unread data), an orderly close if
/// not; always a reset, the client can tell "busy" from "not accepted"
/// (see [`noise::connect_handshake`]). It also leaves no TIME_WAIT behind,
/// which suits a connection refused in a flood.
fn close_with_reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) = setsockopt(&stream, sockopt::Linger, &linger) {
        debug!("cannot set SO_LINGER on a refused connection: {e}");
    }
}

/// An accepted connection. Until its handshake is done, each read and
/// write may only take what is left of [`HANDSHAKE_TIMEOUT`]: a socket
/// timeout bounds each call, not their sum, so a peer sending a byte every
/// few seconds would otherwise keep its handshake (and one of the
/// [`MAX_HANDSHAKES`] places) for hours.
struct Connection {
    stream: TcpStream,
    /// When the handshake must be done by; `None` once it is, when the
    /// session sets its own timeouts.
    handshake_deadline: Cell<Option<Instant>>,
}

impl Connection {
    /// Gives the next read or write (through `set`, which sets its socket
    /// timeout) what is left before the handshake deadline, if any.
    fn limit(&self, set: fn(&TcpStream, Option<Duration>) -> io::Result<()>) -> io::Result<()> {
        let Some(deadline) = self.handshake_deadline.get() else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        set(&self.stream, Some(left))
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.limit(TcpStream::set_read_timeout)?;
        self.stream.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.limit(TcpStream::set_write_timeout)?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl TimedStream for Connection {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(timeout)
    }
}

impl ClientStream for SecureStream<Connection> {
    fn socket(&self) -> BorrowedFd<'_> {
        self.get_ref().stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::stream::Clients;
    use crate::guest::{Guest, GuestLimits, SharedBucket};
    use std::io::Write;
    use std::time::Instant;

    fn guest(name: &str) -> Arc<Guest> {
        let pool = crate::entropy::pool::os_pool();
        Guest::with_limits(name, pool, GuestLimits::default(), SharedBucket::default())
    }

    fn connect(listener: &TcpListener) -> TcpStream {
        connect_from([127, 0, 0, 1], listener)
    }

    fn connect_from(source: [u8; 4], listener: &TcpListener) -> TcpStream {
        let stream = vhost_rng_testing::connect_from(source, listener.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// Waits for the handshake threads to count what the test did.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never counted: {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn refusals_are_counted_by_reason_and_a_wrong_key_against_its_guest() {
        let listener = TcpListener::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let xen1 = guest("xen1");
        let key = Psk::generate().unwrap();
        let _member =
            listener
                .directory()
                .join("xen1".into(), Clients::new(Arc::clone(&xen1)), key.clone());
        let status = listener.status();
        assert_eq!(status.kind, "tcp");
        assert_eq!(status.address, listener.local_addr().to_string());
        assert_eq!(status.connections, 0);
        assert!(status.refused.values().all(|&n| n == 0), "{status:?}");
        assert_eq!(
            status
                .refused
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [
                "handshake_incomplete",
                "not_protocol",
                "too_many_handshakes",
                "unknown_name",
                "wrong_key"
            ]
        );
        let refused = |reason: &str| listener.status().refused[reason];

        // Another key for xen1's name.
        let other_key = Psk::generate().unwrap();
        let wrong = noise::connect_handshake(connect(&listener), "xen1", &other_key);
        assert!(matches!(wrong, Err(HandshakeError::Refused)), "{wrong:?}");
        wait_for("the wrong key", || refused("wrong_key") == 1);
        assert_eq!(xen1.stats.snapshot().wrong_key_connections, 1);

        // A name no guest has.
        let unknown = noise::connect_handshake(connect(&listener), "nobody", &key);
        assert!(
            matches!(unknown, Err(HandshakeError::Refused)),
            "{unknown:?}"
        );
        wait_for("the unknown name", || refused("unknown_name") == 1);

        // Something else entirely.
        let mut http = connect(&listener);
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        wait_for("the HTTP request", || refused("not_protocol") == 1);

        // Connected, then gone before saying anything.
        drop(connect(&listener));
        wait_for("the closed connection", || {
            refused("handshake_incomplete") == 1
        });

        // The right key is served, and no refusal.
        let mut served = noise::connect_handshake(connect(&listener), "xen1", &key).unwrap();
        let mut bytes = Vec::new();
        assert_eq!(
            vhost_rng_protocol::wire::fetch(&mut served, 16, &mut bytes).unwrap(),
            16
        );

        let status = listener.status();
        assert_eq!(status.connections, 5);
        assert_eq!(status.refused.values().sum::<u64>(), 4, "{status:?}");
        assert_eq!(refused("too_many_handshakes"), 0);
        let stats = xen1.stats.snapshot();
        assert_eq!(
            (stats.wrong_key_connections, stats.refused_connections),
            (1, 0)
        );
        assert_eq!(stats.bytes, 16);
        listener.stop();
    }

    #[test]
    fn connections_beyond_the_handshake_limits_are_closed_and_counted() {
        let listener = TcpListener::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let pending = || -> usize {
            let handshakes = listener.handshakes.lock().unwrap();
            handshakes.values().sum()
        };
        // One peer may hold MAX_HANDSHAKES_PER_PEER handshakes, no more.
        let mut silent: Vec<TcpStream> = (0..MAX_HANDSHAKES_PER_PEER)
            .map(|_| connect_from([127, 0, 0, 2], &listener))
            .collect();
        wait_for("one peer's silent connections", || {
            pending() == MAX_HANDSHAKES_PER_PEER
        });
        let mut extra = connect_from([127, 0, 0, 2], &listener);
        wait_for("the peer's connection over its limit", || {
            listener.status().refused["too_many_handshakes"] == 1
        });
        // Closed at once, without an answer, and with a reset even though
        // it sent nothing: not the orderly close of a refused key.
        let err = std::io::Read::read(&mut extra, &mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // Which a client in its handshake tells apart from a refusal.
        let busy = noise::connect_handshake(
            connect_from([127, 0, 0, 2], &listener),
            "xen1",
            &Psk::generate().unwrap(),
        );
        assert!(matches!(busy, Err(HandshakeError::Dropped)), "{busy:?}");
        wait_for("the client over the limit", || {
            listener.status().refused["too_many_handshakes"] == 2
        });

        // Many peers together may hold MAX_HANDSHAKES, no more.
        let peers = MAX_HANDSHAKES / MAX_HANDSHAKES_PER_PEER;
        for peer in 1..peers {
            for _ in 0..MAX_HANDSHAKES_PER_PEER {
                silent.push(connect_from([127, 0, 1, peer as u8], &listener));
            }
        }
        wait_for("every handshake place taken", || {
            pending() == MAX_HANDSHAKES
        });
        let mut over = connect_from([127, 0, 2, 1], &listener);
        wait_for("a new peer's connection over the total", || {
            listener.status().refused["too_many_handshakes"] == 3
        });
        let err = std::io::Read::read(&mut over, &mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");

        drop(silent);
        wait_for("the silent connections to close", || {
            listener.status().refused["handshake_incomplete"] == MAX_HANDSHAKES as u64
        });
        assert_eq!(pending(), 0, "every place given back");
        assert_eq!(listener.status().connections, MAX_HANDSHAKES as u64 + 3);
        listener.stop();
    }

    #[test]
    fn a_peer_that_dribbles_its_handshake_is_cut_off_at_the_timeout() {
        let timeout = Duration::from_millis(500);
        let listener =
            TcpListener::start_with_handshake_timeout("127.0.0.1:0".parse().unwrap(), timeout)
                .unwrap();
        // Before the connection: its deadline cannot start earlier.
        let started = Instant::now();
        let mut slow = connect(&listener);
        // A valid hello, then handshake message 1 (48 bytes) sent a byte
        // every 50 ms: each read alone is well within the timeout, all of
        // them together (2.4 s) are not.
        slow.write_all(b"VRNS\x01\x04xen1\x00\x30").unwrap();
        let cut_off = loop {
            thread::sleep(Duration::from_millis(50));
            if slow.write_all(b"x").is_err()
                || listener.status().refused["handshake_incomplete"] == 1
            {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < timeout * 3,
                "the handshake is still open"
            );
        };
        assert!(
            cut_off >= timeout && cut_off < timeout + Duration::from_secs(1),
            "{cut_off:?}"
        );
        // Cut off as incomplete, not refused for what it sent.
        wait_for("the cut-off", || {
            listener.status().refused["handshake_incomplete"] == 1
        });
        assert_eq!(listener.status().refused["not_protocol"], 0);
        listener.stop();
    }

    #[test]
    fn a_daemon_over_its_handshake_limit_is_busy_not_a_wrong_key() {
        use vhost_rng_agent::{AgentError, DEFAULT_BYTES, run};
        type Daemon = TcpListener;
        const GUEST: &str = "vm1";
        let psk = |byte: u8| Psk::from_hex(&format!("{byte:02x}").repeat(32)).unwrap();

        let daemon = Daemon::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let guest = Guest::with_limits(
            GUEST,
            crate::entropy::pool::os_pool(),
            GuestLimits::default(),
            SharedBucket::default(),
        );
        let _member = daemon
            .directory()
            .join(GUEST.to_owned(), Clients::new(guest), psk(7));
        let port = daemon.local_addr().port();
        let refused = |reason: &str| daemon.status().refused[reason];
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !done() {
                assert!(std::time::Instant::now() < deadline, "never: {what}");
                thread::sleep(Duration::from_millis(10));
            }
        };

        // A flood from the agent's own address: silent connections holding
        // every handshake place that address has.
        let flood: Vec<TcpStream> = (0..MAX_HANDSHAKES_PER_PEER)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        wait_for("the flood to be accepted", &|| {
            daemon.status().connections == MAX_HANDSHAKES_PER_PEER as u64
        });
        let mut kernel = agent_support::FakeKernel::default();
        let err = run(&agent_support::tcp_config(GUEST, port, psk(7)), &mut kernel).unwrap_err();

        assert_eq!(refused("too_many_handshakes"), 1);
        assert!(
            matches!(
                err,
                AgentError::Handshake {
                    error: HandshakeError::Dropped,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_fatal(), "retried with the usual backoff");
        assert_eq!(
            err.report_line(),
            "VRNG-AGENT error reason=connection-closed"
        );
        let message = err.to_string();
        assert!(message.contains("may be busy"), "{message}");
        assert!(!message.contains("credentials"), "{message}");
        assert!(kernel.added.is_empty());

        // Once the flood is over the same key is served; a wrong one is
        // still refused as credentials, by the same daemon.
        drop(flood);
        wait_for("the flood's places to be given back", &|| {
            refused("handshake_incomplete") == MAX_HANDSHAKES_PER_PEER as u64
        });
        let report = run(&agent_support::tcp_config(GUEST, port, psk(7)), &mut kernel).unwrap();
        assert_eq!(report.bytes, DEFAULT_BYTES as usize);
        let err = run(&agent_support::tcp_config(GUEST, port, psk(8)), &mut kernel).unwrap_err();
        assert!(
            matches!(&err, AgentError::CredentialsRefused { name, .. } if name == GUEST),
            "{err}"
        );
        wait_for("the wrong key to be counted", &|| refused("wrong_key") == 1);
        daemon.stop();
    }

    /// The in-guest agent against this listener: a kernel that only records,
    /// and the agent's TCP configuration.
    mod agent_support {
        use std::path::PathBuf;
        use std::time::Duration;

        use vhost_rng_agent::{
            AgentConfig, AgentError, Credentials, DEFAULT_BYTES, DEFAULT_CREDIT_BITS_PER_BYTE,
            Endpoint, KernelEntropy,
        };
        use vhost_rng_protocol::noise::Psk;

        #[derive(Default)]
        pub struct FakeKernel {
            pub added: Vec<Vec<u8>>,
        }

        impl KernelEntropy for FakeKernel {
            fn add_entropy(&mut self, bytes: &[u8], _credit_bits: u32) -> Result<(), AgentError> {
                self.added.push(bytes.to_vec());
                Ok(())
            }

            fn reseed(&mut self) -> Result<(), AgentError> {
                Ok(())
            }
        }

        pub fn tcp_config(guest: &str, port: u16, psk: Psk) -> AgentConfig {
            AgentConfig {
                endpoint: Endpoint::Tcp {
                    host: "127.0.0.1".to_owned(),
                    port,
                },
                bytes: DEFAULT_BYTES,
                interval: Duration::from_secs(60),
                credit_bits_per_byte: DEFAULT_CREDIT_BITS_PER_BYTE,
                once: true,
                credentials: Some(Credentials {
                    name: guest.to_owned(),
                    psk,
                    path: PathBuf::from("/nonexistent/vhost-rng-test/vm1.key"),
                }),
            }
        }
    }
}
