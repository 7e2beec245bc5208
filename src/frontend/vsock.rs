// SPDX-License-Identifier: Apache-2.0
//! The AF_VSOCK listener (`--vsock PORT`): one socket for every guest of a
//! host whose VMMs use the kernel's vhost-vsock. The peer's CID, which the
//! host assigns and a guest cannot choose, names the guest (`cid=N`).
//! Guests speak the channel protocol ([`super::channel`]).
//!
//! A CID no guest is configured for is refused with an explicit answer,
//! unless `--vsock-default-rate` lets such guests in, each as a guest of
//! its own (`cid-N`) limited to that rate. Connections and refusals are
//! counted for `vhost-rng status` and the metrics ([`VsockListener::status`]).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use log::{Level, info};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

use super::accept::{ACCEPT_ERROR_PAUSE, StopSignal};
use super::channel;
use super::shared::{Directory, ListenerStatus, Member};
use super::stream::{ClientStream, Clients, refuse, spawn_client};
use crate::entropy::pool::Pool;
use crate::guest::limiter::RateLimit;
use crate::guest::{Guest, GuestLimits, SharedBucket};
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;
use vhost_rng_protocol::vsock::VsockStream;
use vhost_rng_protocol::wire::{self, ResponseHeader, Status};

/// `VMADDR_CID_ANY`: listen for every CID, a wildcard rather than a guest.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// The guests of the vsock listener, by CID.
pub type VsockDirectory = Directory<u32, ()>;

/// Why the `--vsock` listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Creating, binding or listening on the AF_VSOCK socket failed (no vsock
    /// transport on this host, the port in use).
    #[error(
        "cannot listen on vsock port {port}: {error}{hint}",
        hint = vsock_hint(error)
    )]
    Listen {
        /// The `--vsock` port.
        port: u32,
        /// The error from the system call.
        #[source]
        error: nix::Error,
    },
    /// `--vsock-default-rate` is not a rate the limiter takes.
    #[error("--vsock-default-rate: {0}")]
    DefaultRate(#[source] crate::guest::limiter::RateLimitError),
    /// The listener's stop signal or accept thread could not be made.
    #[error("cannot start the vsock listener: {0}")]
    Spawn(#[source] io::Error),
}

fn vsock_hint(error: &nix::Error) -> &'static str {
    match error {
        nix::Error::EAFNOSUPPORT => " (this host has no vsock support: load vhost_vsock)",
        nix::Error::EADDRINUSE => " (another process listens on that port)",
        _ => "",
    }
}

/// What unknown CIDs get under `--vsock-default-rate`.
struct DefaultGuests {
    rate: RateLimit,
    pool: Arc<Pool>,
    global: SharedBucket,
}

/// What the listener counts, for [`VsockListener::status`].
#[derive(Default)]
struct Counters {
    /// Every connection from a guest, whether served or refused.
    connections: AtomicU64,
    /// Refused because no guest has the peer's CID (and there is no
    /// default rate to let it in).
    unknown_cid: AtomicU64,
}

/// The running listener.
pub struct VsockListener {
    port: u32,
    directory: Arc<VsockDirectory>,
    default: Option<DefaultGuests>,
    stop: StopSignal,
    refusals: RateLimitedLog,
    counters: Counters,
}

impl VsockListener {
    /// Listens on `port` for every CID. With `default_rate` (bytes per
    /// second), unknown CIDs are served as guests of their own.
    pub fn start(
        port: u32,
        default_rate: Option<u64>,
        pool: Arc<Pool>,
        global: SharedBucket,
    ) -> Result<Arc<Self>, VsockError> {
        Self::start_on(Self::bind(port)?, port, default_rate, pool, global)
    }

    /// A socket listening on `port` for every CID.
    pub fn bind(port: u32) -> Result<OwnedFd, VsockError> {
        let listen = |error| VsockError::Listen { port, error };
        let socket = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(listen)?;
        socket::bind(socket.as_raw_fd(), &VsockAddr::new(VSOCK_CID_ANY, port)).map_err(listen)?;
        socket::listen(&socket, Backlog::new(128).unwrap_or(Backlog::MAXCONN)).map_err(listen)?;
        Ok(socket)
    }

    /// [`VsockListener::start`] on `socket`, already listening on `port`
    /// (bound by [`VsockListener::bind`], or handed over).
    pub fn start_on(
        socket: OwnedFd,
        port: u32,
        default_rate: Option<u64>,
        pool: Arc<Pool>,
        global: SharedBucket,
    ) -> Result<Arc<Self>, VsockError> {
        let listener = Self::new(port, default_rate, pool, global)?;
        let accepting = Arc::clone(&listener);
        thread::Builder::new()
            .name("vsock-listener".into())
            .spawn(move || {
                crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Peer);
                accepting.accept_loop(socket)
            })
            .map_err(VsockError::Spawn)?;
        match listener.default.as_ref() {
            Some(default) => info!(
                "listening on vsock port {port}; unknown CIDs are served at {} bytes/s",
                default.rate.bytes()
            ),
            None => info!("listening on vsock port {port}; unknown CIDs are refused"),
        }
        Ok(listener)
    }

    /// The listener's state, without a socket: [`VsockListener::admit`]
    /// takes connections from wherever they come.
    fn new(
        port: u32,
        default_rate: Option<u64>,
        pool: Arc<Pool>,
        global: SharedBucket,
    ) -> Result<Arc<Self>, VsockError> {
        let default = default_rate
            .map(|rate| {
                RateLimit::per_second(rate).map(|rate| DefaultGuests { rate, pool, global })
            })
            .transpose()
            .map_err(VsockError::DefaultRate)?;
        Ok(Arc::new(VsockListener {
            port,
            directory: Arc::default(),
            default,
            stop: StopSignal::new().map_err(VsockError::Spawn)?,
            refusals: RateLimitedLog::per_minute(4),
            counters: Counters::default(),
        }))
    }

    /// The vsock port it listens on.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The guests this listener knows, by CID; the registry adds and removes
    /// them.
    pub fn directory(&self) -> &Arc<VsockDirectory> {
        &self.directory
    }

    /// Connections and refusals so far. Refusals by the guest itself (its
    /// client limit) are the guest's, not the listener's.
    pub fn status(&self) -> ListenerStatus {
        let counters = &self.counters;
        ListenerStatus {
            kind: "vsock".into(),
            address: self.port.to_string(),
            connections: counters.connections.load(Ordering::Relaxed),
            refused: BTreeMap::from([(
                "unknown_cid".to_owned(),
                counters.unknown_cid.load(Ordering::Relaxed),
            )]),
        }
    }

    /// Closes every connection and stops listening.
    pub fn stop(&self) {
        self.stop.raise();
        self.directory.close_all();
    }

    fn accept_loop(&self, socket: OwnedFd) {
        while self.stop.wait_for_connection(socket.as_fd()) {
            let accepted = socket::accept4(socket.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                .map(|fd| {
                    // SAFETY: accept4 returned a new descriptor we now own.
                    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                })
                .and_then(|fd| {
                    let peer: VsockAddr = socket::getpeername(fd.as_raw_fd())?;
                    Ok((fd, peer.cid()))
                });
            match accepted {
                Ok((fd, cid)) => self.admit(VsockStream::accepted(fd), cid),
                Err(e) => {
                    log_limited!(self.refusals, Level::Warn, "vsock accept: {e}");
                    thread::sleep(ACCEPT_ERROR_PAUSE);
                }
            }
        }
    }

    /// Serves a connection from `cid` as that CID's guest, or refuses it.
    pub fn admit<S: ClientStream + 'static>(&self, mut stream: S, cid: u32) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let peer = format!("from vsock CID {cid}");
        match self.member(cid) {
            Some(member) => spawn_client(&member.clients, channel::PROTOCOL, peer, stream),
            None => {
                self.counters.unknown_cid.fetch_add(1, Ordering::Relaxed);
                log_limited!(
                    self.refusals,
                    Level::Warn,
                    "vsock: connection from CID {cid} refused: no guest has cid={cid} \
                     (add one, or serve unknown CIDs with --vsock-default-rate)"
                );
                let refusal = wire::encode_response_header(&ResponseHeader::error(Status::Refused));
                refuse(&mut stream, &refusal);
            }
        }
    }

    /// The guest with CID `cid`: configured, or let in by the default rate.
    fn member(&self, cid: u32) -> Option<Arc<Member<()>>> {
        if let Some(member) = self.directory.get(&cid) {
            return Some(member);
        }
        let default = self.default.as_ref()?;
        self.directory.forget_idle_automatic();
        Some(self.directory.get_or_insert_with(&cid, || {
            let name = format!("cid-{cid}");
            info!(
                "guest {name}: unknown vsock CID {cid} let in at the default {} bytes/s",
                default.rate.bytes()
            );
            let limits = GuestLimits {
                rate: Some(default.rate),
                weight: crate::guest::DEFAULT_WEIGHT,
            };
            let guest = Guest::with_limits(
                name,
                Arc::clone(&default.pool),
                limits,
                Arc::clone(&default.global),
            );
            Member {
                clients: Clients::new(guest),
                credential: (),
                automatic: true,
            }
        }))
    }
}

impl ClientStream for VsockStream {
    fn socket(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::GuestFrontend;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn pool() -> Arc<Pool> {
        crate::entropy::pool::os_pool()
    }

    fn listener(default_rate: Option<u64>) -> Arc<VsockListener> {
        VsockListener::new(5564, default_rate, pool(), SharedBucket::default()).unwrap()
    }

    /// A connection "from" `cid`: the test holds one end of a socket pair.
    fn connect(listener: &VsockListener, cid: u32) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        listener.admit(theirs, cid);
        ours
    }

    fn status_of(stream: &mut UnixStream) -> Status {
        let mut header = [0u8; wire::RESPONSE_HEADER_LEN];
        stream.read_exact(&mut header).unwrap();
        wire::decode_response_header(&header).unwrap().status
    }

    #[test]
    fn a_configured_cid_is_served_as_its_guest() {
        let listener = listener(None);
        let guest = Guest::with_limits("vm3", pool(), GuestLimits::default(), Default::default());
        let member = listener.directory().join(3, Clients::new(guest), ());
        let mut stream = connect(&listener, 3);
        let mut bytes = Vec::new();
        assert_eq!(wire::fetch(&mut stream, 64, &mut bytes).unwrap(), 64);
        assert_eq!(member.guest().stats.snapshot().bytes, 64);

        member.stop();
        assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0, "closed on stop");
        let mut after = connect(&listener, 3);
        assert_eq!(status_of(&mut after), Status::Refused, "gone once removed");
    }

    #[test]
    fn an_unknown_cid_is_refused_explicitly() {
        let listener = listener(None);
        let mut stream = connect(&listener, 42);
        assert_eq!(status_of(&mut stream), Status::Refused);
        assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0, "then closed");
        assert!(listener.directory().automatic().is_empty());
    }

    #[test]
    fn unknown_cids_are_counted_as_refused_and_known_ones_as_connections() {
        let listener = listener(None);
        let status = listener.status();
        assert_eq!(
            (status.kind.as_str(), status.address.as_str()),
            ("vsock", "5564")
        );
        assert_eq!(status.connections, 0);
        assert_eq!(
            status.refused,
            BTreeMap::from([("unknown_cid".to_owned(), 0)])
        );

        for cid in [42, 43] {
            let mut stream = connect(&listener, cid);
            assert_eq!(status_of(&mut stream), Status::Refused);
        }
        let guest = Guest::with_limits("vm3", pool(), GuestLimits::default(), Default::default());
        let _member = listener.directory().join(3, Clients::new(guest), ());
        let mut served = connect(&listener, 3);
        assert_eq!(wire::fetch(&mut served, 8, &mut Vec::new()).unwrap(), 8);

        let status = listener.status();
        assert_eq!(status.connections, 3);
        assert_eq!(status.refused["unknown_cid"], 2);
    }

    #[test]
    fn unknown_cids_let_in_by_the_default_rate_are_not_refusals() {
        let listener = listener(Some(1_000_000));
        let mut stream = connect(&listener, 9);
        assert_eq!(wire::fetch(&mut stream, 8, &mut Vec::new()).unwrap(), 8);
        let status = listener.status();
        assert_eq!((status.connections, status.refused["unknown_cid"]), (1, 0));
    }

    #[test]
    fn the_default_rate_lets_unknown_cids_in_as_limited_guests_of_their_own() {
        let listener = listener(Some(1000));
        let mut first = connect(&listener, 7);
        let mut bytes = Vec::new();
        // The bucket starts empty: 500 bytes at 1000 B/s take about 0.5 s.
        assert_eq!(wire::fetch(&mut first, 500, &mut bytes).unwrap(), 500);
        let automatic = listener.directory().automatic();
        assert_eq!(automatic.len(), 1);
        let (cid, guest) = &automatic[0];
        assert_eq!((*cid, guest.name()), (7, "cid-7"));
        assert_eq!(guest.limits().rate.map(|r| r.bytes()), Some(1000));

        // A second connection from the same CID is the same guest.
        let mut second = connect(&listener, 7);
        assert_eq!(wire::fetch(&mut second, 10, &mut bytes).unwrap(), 10);
        assert_eq!(listener.directory().automatic().len(), 1);
        assert_eq!(guest.stats.snapshot().bytes, 510);
    }

    #[test]
    fn guests_let_in_by_the_default_rate_are_forgotten_once_idle() {
        let listener = listener(Some(1_000_000));
        let mut first = connect(&listener, 7);
        assert_eq!(wire::fetch(&mut first, 8, &mut Vec::new()).unwrap(), 8);
        drop(first);
        let seven = listener.directory().get(&7).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seven.clients.has_clients() {
            assert!(
                std::time::Instant::now() < deadline,
                "cid-7 never went idle"
            );
            thread::sleep(Duration::from_millis(20));
        }
        // Still listed until another unknown CID comes...
        assert_eq!(listener.directory().automatic().len(), 1);
        let mut second = connect(&listener, 8);
        assert_eq!(wire::fetch(&mut second, 8, &mut Vec::new()).unwrap(), 8);
        // ...which takes the idle one's place; a connected one stays.
        let cids: Vec<u32> = listener
            .directory()
            .automatic()
            .into_iter()
            .map(|(cid, _)| cid)
            .collect();
        assert_eq!(cids, [8]);
        let mut third = connect(&listener, 9);
        assert_eq!(wire::fetch(&mut third, 8, &mut Vec::new()).unwrap(), 8);
        let mut cids: Vec<u32> = listener
            .directory()
            .automatic()
            .into_iter()
            .map(|(cid, _)| cid)
            .collect();
        cids.sort();
        assert_eq!(cids, [8, 9]);
    }

    #[test]
    fn a_ninth_client_of_a_guest_closes_the_idlest_but_the_first() {
        let listener = listener(None);
        let guest = Guest::with_limits("vm3", pool(), GuestLimits::default(), Default::default());
        let _member = listener
            .directory()
            .join(3, Clients::new(Arc::clone(&guest)), ());
        let mut open: Vec<UnixStream> = (0..super::super::stream::MAX_CLIENTS)
            .map(|_| connect(&listener, 3))
            .collect();
        for stream in &mut open {
            assert_eq!(wire::fetch(stream, 8, &mut Vec::new()).unwrap(), 8);
        }
        // Admitted as it connects: by now the second client (the first to
        // fetch after the one connected longest, so the idlest but it) has
        // been closed.
        let mut ninth = connect(&listener, 3);
        assert_eq!(wire::fetch(&mut ninth, 8, &mut Vec::new()).unwrap(), 8);
        assert_eq!(open[1].read(&mut [0u8; 1]).unwrap(), 0, "closed");
        assert_eq!(wire::fetch(&mut open[0], 8, &mut Vec::new()).unwrap(), 8);
        let stats = guest.stats.snapshot();
        assert_eq!(
            (stats.evicted_connections, stats.refused_connections),
            (1, 0)
        );
        assert_eq!(listener.status().refused["unknown_cid"], 0);
    }

    /// Binds a real AF_VSOCK socket. A host without vsock fails it with
    /// the reason rather than passing it unchecked: the kernel must let
    /// AF_VSOCK sockets bind (vhost_vsock or vsock_loopback loaded).
    #[test]
    fn listening_on_a_port_in_use_says_so() {
        // A port of this process's own, so that test runs side by side
        // (and the integration tests' daemons) do not meet.
        let port = 0x5000_0000 + std::process::id();
        let first = VsockListener::start(port, None, pool(), SharedBucket::default())
            .unwrap_or_else(|e| {
                panic!("this test needs AF_VSOCK sockets that bind (modprobe vhost_vsock): {e}")
            });
        assert_eq!(first.port(), port);
        let second = VsockListener::start(port, None, pool(), SharedBucket::default());
        let error = second.err().expect("the port is taken");
        assert!(
            matches!(
                error,
                VsockError::Listen { port: p, error: nix::Error::EADDRINUSE } if p == port
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("another process listens"), "{message}");
        first.stop();
    }
}
