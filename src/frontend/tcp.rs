//! The TCP listener (`--listen-tcp ADDR`) for guests with no vsock (Xen):
//! every connection must complete a Noise handshake with its guest's
//! pre-shared key ([`crate::noise`]) before it is served; there is no
//! plaintext mode. The name the guest gives in its hello selects the key
//! (`tcp-psk=PATH`), the key proves the name, and the guest is served the
//! channel protocol over the encrypted stream with that guest's limits.
//!
//! Anyone on the network can connect, so connections that have not proved
//! a key yet are bounded: at most [`MAX_HANDSHAKES`] at once, each with
//! [`HANDSHAKE_TIMEOUT`] to finish. A wrong key or an unknown name is
//! logged and the connection closed without an answer.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};

use super::channel;
use super::shared::{Directory, StopSignal};
use super::stream::ClientStream;
use crate::log_limit::RateLimitedLog;
use crate::noise::{self, HandshakeError, Psk, SecureStream};

/// Connections allowed to be in their handshake at once; more are closed
/// at once, so unauthenticated peers cannot make the daemon start threads
/// without bound.
pub const MAX_HANDSHAKES: usize = 256;
/// Time a connection has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The guests of the TCP listener, by name, with their keys.
pub type TcpDirectory = Directory<String, Psk>;

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("cannot listen on TCP {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        #[source]
        error: io::Error,
    },
    #[error("cannot start the TCP listener: {0}")]
    Spawn(#[source] io::Error),
}

/// The running listener.
pub struct TcpListener {
    local_addr: SocketAddr,
    directory: Arc<TcpDirectory>,
    handshakes: AtomicUsize,
    stop: StopSignal,
    refusals: RateLimitedLog,
}

impl TcpListener {
    pub fn start(addr: SocketAddr) -> Result<Arc<Self>, TcpError> {
        let socket =
            StdTcpListener::bind(addr).map_err(|error| TcpError::Listen { addr, error })?;
        let local_addr = socket
            .local_addr()
            .map_err(|error| TcpError::Listen { addr, error })?;
        let listener = Arc::new(TcpListener {
            local_addr,
            directory: Arc::default(),
            handshakes: AtomicUsize::new(0),
            stop: StopSignal::new().map_err(TcpError::Spawn)?,
            refusals: RateLimitedLog::per_minute(8),
        });
        let accepting = Arc::clone(&listener);
        thread::Builder::new()
            .name("tcp-listener".into())
            .spawn(move || accepting.accept_loop(socket))
            .map_err(TcpError::Spawn)?;
        info!(
            "listening on TCP {local_addr} (Noise {})",
            noise::NOISE_PARAMS
        );
        Ok(listener)
    }

    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn directory(&self) -> &Arc<TcpDirectory> {
        &self.directory
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
                Err(e) => self.log_refusal(format_args!("TCP accept: {e}")),
            }
        }
    }

    fn start_handshake(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let pending = self.handshakes.fetch_add(1, Ordering::SeqCst);
        if pending >= MAX_HANDSHAKES {
            self.handshakes.fetch_sub(1, Ordering::SeqCst);
            self.log_refusal(format_args!(
                "TCP {peer}: closed at once: {MAX_HANDSHAKES} connections are in their \
                 handshake already"
            ));
            return;
        }
        let listener = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("tcp-handshake".into())
            .spawn(move || {
                let outcome = listener.handshake(stream, peer);
                listener.handshakes.fetch_sub(1, Ordering::SeqCst);
                if let Some(secure) = outcome {
                    listener.serve(secure, peer);
                }
            });
        if let Err(e) = spawned {
            self.handshakes.fetch_sub(1, Ordering::SeqCst);
            self.log_refusal(format_args!("TCP {peer}: cannot start a thread: {e}"));
        }
    }

    /// Authenticates the connection; `None` (and a log line) if it fails.
    fn handshake(&self, stream: TcpStream, peer: SocketAddr) -> Option<SecureStream<TcpStream>> {
        let prepared = stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true));
        if let Err(e) = prepared {
            debug!("TCP {peer}: {e}");
            return None;
        }
        let lookup = |name: &str| {
            self.directory
                .get(&name.to_owned())
                .map(|member| member.credential.clone())
        };
        match noise::accept_handshake(stream, lookup) {
            Ok(secure) => Some(secure),
            Err(HandshakeError::WrongCredential(name)) => {
                self.log_refusal(format_args!(
                    "TCP {peer}: refused: wrong key for guest {name} (or a hello altered in \
                     transit)"
                ));
                None
            }
            // Closed before finishing, or silent until the timeout: port
            // probes and health checks as much as attacks; not worth a warning.
            Err(HandshakeError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                debug!("TCP {peer}: no handshake: {e}");
                None
            }
            Err(HandshakeError::UnknownIdentity(name)) => {
                self.log_refusal(format_args!(
                    "TCP {peer}: refused: no guest named {name} has a tcp-psk key"
                ));
                None
            }
            Err(e) => {
                self.log_refusal(format_args!("TCP {peer}: refused: {e}"));
                None
            }
        }
    }

    /// Serves an authenticated client on its handshake's thread.
    fn serve(&self, mut secure: SecureStream<TcpStream>, peer: SocketAddr) {
        let name = secure.identity().to_owned();
        // The guest may have been removed during the handshake.
        let Some(member) = self.directory.get(&name) else {
            return;
        };
        let peer = format!("from TCP {peer}");
        member.clients.serve(&channel::PROTOCOL, &peer, &mut secure);
    }

    fn log_refusal(&self, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.refusals.permit() {
            warn!("{message} ({suppressed} similar messages suppressed)");
        }
    }
}

impl ClientStream for SecureStream<TcpStream> {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.get_ref().set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.get_ref().set_write_timeout(timeout)
    }

    fn socket(&self) -> BorrowedFd<'_> {
        self.get_ref().as_fd()
    }
}
