// SPDX-License-Identifier: Apache-2.0
//! Where the agent finds the host daemon (`vsock:CID:PORT`, `unix:PATH` or
//! `tcp:HOST:PORT`) and the stream it talks over.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nix::errno::Errno;

use vhost_rng_protocol::noise::SecureStream;
use vhost_rng_protocol::vsock::{MAX_IO_TIMEOUT, VsockStream};
use vhost_rng_protocol::wire::DEFAULT_PORT;

/// The CID a guest reaches its host at.
pub const HOST_CID: u32 = 2;
/// `VMADDR_CID_ANY` and `VMADDR_PORT_ANY`: wildcards for binding, not
/// addresses one can connect to.
const VSOCK_ANY: u32 = u32::MAX;

/// The daemon's address as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// AF_VSOCK: `vsock:CID:PORT`, CID 2 being the host. With hybrid vsock
    /// (Firecracker, cloud-hypervisor, vhost-device-vsock) the VMM turns a
    /// connection to host port PORT into one to the host socket `PATH_PORT`.
    Vsock {
        /// The context ID to connect to: 2 ([`HOST_CID`]) for the host.
        cid: u32,
        /// The vsock port the daemon listens on ([`DEFAULT_PORT`] unless
        /// given).
        port: u32,
    },
    /// A Unix socket: `unix:PATH`, for tests and for agents on the host.
    Unix(PathBuf),
    /// TCP, for guests without vsock: `tcp:HOST:PORT`, HOST a name, an IPv4
    /// address or an IPv6 address in brackets (kept here without them).
    /// Always encrypted and authenticated with the guest's pre-shared key
    /// (see [`vhost_rng_protocol::noise`]).
    Tcp {
        /// Host name, IPv4 address, or IPv6 address without its brackets.
        host: String,
        /// TCP port the daemon's `--listen-tcp` listens on, 1 to 65535.
        port: u16,
    },
}

/// Why a `--connect` value is not an endpoint the agent can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The value starts with none of `vsock:`, `unix:` or `tcp:` (it is
    /// given whole).
    #[error(
        "'{0}' is not an endpoint: give vsock:CID:PORT (e.g. vsock:{HOST_CID}:{DEFAULT_PORT} for the host), unix:PATH or tcp:HOST:PORT"
    )]
    UnknownKind(String),
    /// The CID of a `vsock:` endpoint is not a 32-bit number (it is given).
    #[error("'{0}' is not a vsock CID: give a number such as {HOST_CID} (the host)")]
    BadCid(String),
    /// The port of a `vsock:` endpoint is not a 32-bit number (it is given).
    #[error("'{0}' is not a vsock port: give a number such as {DEFAULT_PORT}")]
    BadPort(String),
    /// The CID or port of a `vsock:` endpoint is `VMADDR_CID_ANY` or
    /// `VMADDR_PORT_ANY` (4294967295), which only make sense for binding.
    #[error("vsock:{value} is a wildcard, not an address to connect to")]
    Wildcard {
        /// The `CID:PORT` part as given.
        value: String,
    },
    /// `unix:` with no path after it.
    #[error("unix: needs a socket path, e.g. unix:/run/vhost-rng/entropy.sock")]
    EmptyPath,
    /// A `tcp:` endpoint without `:PORT`, or with an empty port (the whole
    /// value is given).
    #[error("'{0}' has no port: give tcp:HOST:PORT, e.g. tcp:192.0.2.1:{DEFAULT_PORT}")]
    TcpNoPort(String),
    /// A `tcp:` endpoint with an empty host (the whole value is given).
    #[error("'{0}' has no host: give tcp:HOST:PORT, e.g. tcp:192.0.2.1:{DEFAULT_PORT}")]
    TcpNoHost(String),
    /// The port of a `tcp:` endpoint is not a number from 1 to 65535 (it is
    /// given).
    #[error("'{0}' is not a TCP port: give a number from 1 to 65535")]
    BadTcpPort(String),
    /// A `tcp:` host with colons that is not in brackets, so its port cannot
    /// be told apart (the whole value is given).
    #[error("'{0}': an IPv6 address goes in brackets, e.g. tcp:[2001:db8::1]:{DEFAULT_PORT}")]
    Ipv6WithoutBrackets(String),
    /// What is in brackets is not an IPv6 address, or has no closing bracket
    /// (it is given).
    #[error("'[{0}]' is not an IPv6 address (only IPv6 addresses go in brackets)")]
    BadIpv6(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    /// Parses `vsock:CID:PORT` (PORT may be left out for the default),
    /// `unix:PATH` or `tcp:HOST:PORT`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if let Some(address) = value.strip_prefix("tcp:") {
            return parse_tcp(value, address);
        }
        if let Some(path) = value.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(EndpointError::EmptyPath);
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let Some(address) = value.strip_prefix("vsock:") else {
            return Err(EndpointError::UnknownKind(value.to_owned()));
        };
        let (cid, port) = match address.split_once(':') {
            Some((cid, port)) => (cid, Some(port)),
            None => (address, None),
        };
        let cid: u32 = cid
            .parse()
            .map_err(|_| EndpointError::BadCid(cid.to_owned()))?;
        let port: u32 = match port {
            Some(port) => port
                .parse()
                .map_err(|_| EndpointError::BadPort(port.to_owned()))?,
            None => DEFAULT_PORT,
        };
        if cid == VSOCK_ANY || port == VSOCK_ANY {
            return Err(EndpointError::Wildcard {
                value: address.to_owned(),
            });
        }
        Ok(Endpoint::Vsock { cid, port })
    }
}

/// `HOST:PORT` of a `tcp:` endpoint (`value` is the whole of it, for errors).
/// The port is required: unlike vsock there is no port everyone agrees on.
fn parse_tcp(value: &str, address: &str) -> Result<Endpoint, EndpointError> {
    let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
        let Some((host, rest)) = bracketed.split_once(']') else {
            return Err(EndpointError::BadIpv6(bracketed.to_owned()));
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(EndpointError::BadIpv6(host.to_owned()));
        }
        let port = rest
            .strip_prefix(':')
            .ok_or_else(|| EndpointError::TcpNoPort(value.to_owned()))?;
        (host, port)
    } else {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| EndpointError::TcpNoPort(value.to_owned()))?;
        if host.contains(':') {
            return Err(EndpointError::Ipv6WithoutBrackets(value.to_owned()));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(EndpointError::TcpNoHost(value.to_owned()));
    }
    if port.is_empty() {
        return Err(EndpointError::TcpNoPort(value.to_owned()));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| EndpointError::BadTcpPort(port.to_owned()))?;
    Ok(Endpoint::Tcp {
        host: host.to_owned(),
        port,
    })
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            // Only an IPv6 address has a colon; it was given in brackets.
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

impl Endpoint {
    /// Opens a connection whose reads and writes each give up after
    /// `io_timeout`. Not for `tcp:` endpoints, which need the guest's name
    /// and key for the handshake: the agent opens those with
    /// [`connect_tcp`] and [`vhost_rng_protocol::noise::connect_handshake`].
    pub fn connect(&self, io_timeout: Duration) -> io::Result<Connection> {
        match self {
            Endpoint::Tcp { .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a tcp: endpoint is encrypted and needs the guest's name and pre-shared key",
            )),
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path)?;
                stream.set_read_timeout(Some(io_timeout))?;
                stream.set_write_timeout(Some(io_timeout))?;
                Ok(Connection::Unix(stream))
            }
            Endpoint::Vsock { cid, port } => {
                VsockStream::connect(*cid, *port, io_timeout).map(Connection::Vsock)
            }
        }
    }

    /// A hint for the operator about why connecting failed, or "".
    pub(super) fn connect_hint(&self, error: &io::Error) -> &'static str {
        let errno = error.raw_os_error().map(Errno::from_raw);
        match (self, errno) {
            (Endpoint::Vsock { .. }, Some(Errno::EAFNOSUPPORT | Errno::ENODEV)) => {
                " (this system has no vsock transport: is there a vsock device in the guest?)"
            }
            (Endpoint::Tcp { .. }, Some(Errno::ECONNREFUSED)) => {
                " (nothing listens on that port: is `vhost-rng serve --listen-tcp` running there, and is the port right?)"
            }
            // A virtio vsock host answers a port nobody listens on with a reset.
            (_, Some(Errno::ECONNREFUSED | Errno::ECONNRESET)) => {
                " (is vhost-rng serving the entropy protocol there?)"
            }
            (Endpoint::Vsock { .. }, Some(Errno::ETIMEDOUT)) => {
                " (nothing answered: is the CID right, and is the VMM's vsock device connected?)"
            }
            (Endpoint::Unix(_), Some(Errno::ENOENT)) => " (no socket at this path)",
            (Endpoint::Tcp { .. }, Some(Errno::EHOSTUNREACH | Errno::ENETUNREACH)) => {
                " (no route to the host: check the address and the guest's network)"
            }
            // connect_timeout's own timeout carries no errno.
            (Endpoint::Tcp { .. }, _) if error.kind() == io::ErrorKind::TimedOut => {
                " (nothing answered: is the host reachable, and does a firewall let the port through?)"
            }
            _ => "",
        }
    }
}

/// Opens a TCP connection to `host:port` for the encrypted transport:
/// tries each address the host resolves to (each attempt giving up after
/// `io_timeout`), then sets read and write timeouts of `io_timeout` and
/// turns off Nagle's algorithm, as each request is a small message waiting
/// for its answer.
pub fn connect_tcp(host: &str, port: u16, io_timeout: Duration) -> io::Result<TcpStream> {
    // A zero timeout is an error to connect_timeout and "forever" to the
    // socket options; neither is meant.
    let io_timeout = io_timeout.clamp(Duration::from_millis(1), MAX_IO_TIMEOUT);
    let mut last_error = None;
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve '{host}': {e}")))?;
    for address in addresses {
        match TcpStream::connect_timeout(&address, io_timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(io_timeout))?;
                stream.set_write_timeout(Some(io_timeout))?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("'{host}' resolves to no address"),
        )
    }))
}

/// An open connection to the daemon.
#[derive(Debug)]
pub enum Connection {
    /// A Unix socket: `unix:` endpoints (tests, and agents on the host).
    Unix(UnixStream),
    /// An AF_VSOCK stream: `vsock:` endpoints.
    Vsock(VsockStream),
    /// TCP after the Noise handshake: everything on it is encrypted.
    /// Boxed, as the cipher state and buffers dwarf the other variants.
    Tcp(Box<SecureStream<TcpStream>>),
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(stream) => stream.read(buf),
            Connection::Vsock(stream) => stream.read(buf),
            Connection::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(stream) => stream.write(buf),
            Connection::Vsock(stream) => stream.write(buf),
            Connection::Tcp(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            // Sockets do not buffer in user space.
            Connection::Unix(_) | Connection::Vsock(_) => Ok(()),
            // A frame whose sending failed is still pending here.
            Connection::Tcp(stream) => stream.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Result<Endpoint, EndpointError> {
        value.parse()
    }

    #[test]
    fn vsock_endpoints_parse() {
        assert_eq!(
            parse("vsock:2:5564").unwrap(),
            Endpoint::Vsock { cid: 2, port: 5564 }
        );
        assert_eq!(
            parse("vsock:3:1").unwrap(),
            Endpoint::Vsock { cid: 3, port: 1 }
        );
        assert_eq!(
            parse("vsock:2").unwrap(),
            Endpoint::Vsock {
                cid: HOST_CID,
                port: DEFAULT_PORT
            },
            "the port defaults to the daemon's"
        );
    }

    #[test]
    fn unix_endpoints_parse() {
        assert_eq!(
            parse("unix:/run/vhost-rng/entropy.sock").unwrap(),
            Endpoint::Unix(PathBuf::from("/run/vhost-rng/entropy.sock"))
        );
        assert_eq!(
            parse("unix:relative:with:colons").unwrap(),
            Endpoint::Unix(PathBuf::from("relative:with:colons"))
        );
        assert_eq!(parse("unix:"), Err(EndpointError::EmptyPath));
    }

    #[test]
    fn bad_endpoints_say_what_is_wrong() {
        for (value, expected) in [
            ("", EndpointError::UnknownKind(String::new())),
            (
                "udp:1.2.3.4:5",
                EndpointError::UnknownKind("udp:1.2.3.4:5".into()),
            ),
            (
                "TCP:1.2.3.4:5",
                EndpointError::UnknownKind("TCP:1.2.3.4:5".into()),
            ),
            (
                "/run/x.sock",
                EndpointError::UnknownKind("/run/x.sock".into()),
            ),
            ("vsock:host:5564", EndpointError::BadCid("host".into())),
            ("vsock:-1:5564", EndpointError::BadCid("-1".into())),
            ("vsock::5564", EndpointError::BadCid(String::new())),
            ("vsock:2:", EndpointError::BadPort(String::new())),
            ("vsock:2:70000x", EndpointError::BadPort("70000x".into())),
            ("vsock:2:1:2", EndpointError::BadPort("1:2".into())),
            (
                "vsock:4294967296:1",
                EndpointError::BadCid("4294967296".into()),
            ),
            (
                "vsock:4294967295:1",
                EndpointError::Wildcard {
                    value: "4294967295:1".into(),
                },
            ),
            (
                "vsock:2:4294967295",
                EndpointError::Wildcard {
                    value: "2:4294967295".into(),
                },
            ),
        ] {
            assert_eq!(parse(value), Err(expected), "{value}");
        }
        let message = parse("x").unwrap_err().to_string();
        assert!(message.contains("vsock:2:5564"), "{message}");
        assert!(message.contains("tcp:HOST:PORT"), "{message}");
    }

    #[test]
    fn tcp_endpoints_parse() {
        let tcp = |host: &str, port| Endpoint::Tcp {
            host: host.to_owned(),
            port,
        };
        assert_eq!(parse("tcp:192.0.2.1:5564").unwrap(), tcp("192.0.2.1", 5564));
        assert_eq!(
            parse("tcp:rng.example.org:1").unwrap(),
            tcp("rng.example.org", 1)
        );
        assert_eq!(
            parse("tcp:localhost:65535").unwrap(),
            tcp("localhost", 65535)
        );
        assert_eq!(parse("tcp:[::1]:5564").unwrap(), tcp("::1", 5564));
        assert_eq!(
            parse("tcp:[2001:db8::7]:80").unwrap(),
            tcp("2001:db8::7", 80)
        );
    }

    #[test]
    fn bad_tcp_endpoints_say_what_is_wrong() {
        for (value, expected) in [
            ("tcp:", EndpointError::TcpNoPort("tcp:".into())),
            ("tcp:host", EndpointError::TcpNoPort("tcp:host".into())),
            ("tcp:host:", EndpointError::TcpNoPort("tcp:host:".into())),
            (":5564", EndpointError::UnknownKind(":5564".into())),
            ("tcp::5564", EndpointError::TcpNoHost("tcp::5564".into())),
            ("tcp:host:0", EndpointError::BadTcpPort("0".into())),
            ("tcp:host:65536", EndpointError::BadTcpPort("65536".into())),
            ("tcp:host:-1", EndpointError::BadTcpPort("-1".into())),
            ("tcp:host:http", EndpointError::BadTcpPort("http".into())),
            (
                "tcp:2001:db8::1:5564",
                EndpointError::Ipv6WithoutBrackets("tcp:2001:db8::1:5564".into()),
            ),
            ("tcp:[::1]", EndpointError::TcpNoPort("tcp:[::1]".into())),
            (
                "tcp:[::1]5564",
                EndpointError::TcpNoPort("tcp:[::1]5564".into()),
            ),
            ("tcp:[::1]:", EndpointError::TcpNoPort("tcp:[::1]:".into())),
            ("tcp:[::1:5564", EndpointError::BadIpv6("::1:5564".into())),
            (
                "tcp:[192.0.2.1]:5564",
                EndpointError::BadIpv6("192.0.2.1".into()),
            ),
            ("tcp:[]:5564", EndpointError::BadIpv6(String::new())),
        ] {
            assert_eq!(parse(value), Err(expected), "{value}");
        }
        let message = parse("tcp:host").unwrap_err().to_string();
        assert!(message.contains("tcp:HOST:PORT"), "{message}");
        let message = parse("tcp:::1:5564").unwrap_err().to_string();
        assert!(message.contains("brackets"), "{message}");
    }

    #[test]
    fn endpoints_display_as_they_are_written() {
        for value in [
            "vsock:2:5564",
            "vsock:42:1",
            "unix:/tmp/a.sock",
            "tcp:192.0.2.1:5564",
            "tcp:rng.example.org:1",
            "tcp:[::1]:5564",
            "tcp:[2001:db8::7]:65535",
        ] {
            assert_eq!(parse(value).unwrap().to_string(), value);
        }
    }

    #[test]
    fn tcp_connections_get_timeouts_and_no_delay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect_tcp("127.0.0.1", port, Duration::from_secs(3)).unwrap();
        assert_eq!(stream.read_timeout().unwrap(), Some(Duration::from_secs(3)));
        assert_eq!(
            stream.write_timeout().unwrap(),
            Some(Duration::from_secs(3))
        );
        assert!(stream.nodelay().unwrap());
        let stream = connect_tcp("localhost", port, Duration::from_secs(3));
        // localhost may resolve to ::1 first, where nothing listens; the
        // IPv4 address is tried next.
        assert!(stream.is_ok(), "{stream:?}");
    }

    #[test]
    fn connecting_to_a_closed_tcp_port_explains_itself() {
        // Bind, learn the port, close: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let error = connect_tcp("127.0.0.1", port, Duration::from_secs(3)).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ECONNREFUSED), "{error}");
        assert!(
            endpoint
                .connect_hint(&error)
                .contains("vhost-rng serve --listen-tcp"),
            "{error}"
        );
        let error = endpoint.connect(Duration::from_secs(1)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let error = connect_tcp("no-such-host.invalid", port, Duration::from_secs(3)).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot resolve 'no-such-host.invalid'"),
            "{error}"
        );
    }

    #[test]
    fn connecting_to_a_missing_unix_socket_explains_itself() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Unix(dir.path().join("none.sock"));
        let error = endpoint.connect(Duration::from_secs(1)).unwrap_err();
        assert_eq!(endpoint.connect_hint(&error), " (no socket at this path)");
    }
}
