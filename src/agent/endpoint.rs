//! Where the agent finds the host daemon (`vsock:CID:PORT` or `unix:PATH`)
//! and the stream it talks over.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, SockFlag, SockType, VsockAddr, setsockopt, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::protocol::DEFAULT_PORT;

/// The CID a guest reaches its host at.
pub const HOST_CID: u32 = 2;
/// `VMADDR_CID_ANY` and `VMADDR_PORT_ANY`: wildcards for binding, not
/// addresses one can connect to.
const VSOCK_ANY: u32 = u32::MAX;
/// Longer socket timeouts are cut to this (a day is "forever" here).
const MAX_IO_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// The daemon's address as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// AF_VSOCK: `vsock:CID:PORT`, CID 2 being the host. With hybrid vsock
    /// (Firecracker, cloud-hypervisor, vhost-device-vsock) the VMM turns a
    /// connection to host port PORT into one to the host socket `PATH_PORT`.
    Vsock { cid: u32, port: u32 },
    /// A Unix socket: `unix:PATH`, for tests and for agents on the host.
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "'{0}' is not an endpoint: give vsock:CID:PORT (e.g. vsock:{HOST_CID}:{DEFAULT_PORT} for the host) or unix:PATH"
    )]
    UnknownKind(String),
    #[error("'{0}' is not a vsock CID: give a number such as {HOST_CID} (the host)")]
    BadCid(String),
    #[error("'{0}' is not a vsock port: give a number such as {DEFAULT_PORT}")]
    BadPort(String),
    #[error("vsock:{value} is a wildcard, not an address to connect to")]
    Wildcard { value: String },
    #[error("unix: needs a socket path, e.g. unix:/run/vhost-rng/entropy.sock")]
    EmptyPath,
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    /// Parses `vsock:CID:PORT` (PORT may be left out for the default) or
    /// `unix:PATH`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
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

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Endpoint {
    /// Opens a connection whose reads and writes each give up after
    /// `io_timeout`.
    pub fn connect(&self, io_timeout: Duration) -> io::Result<Connection> {
        match self {
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
            // A virtio vsock host answers a port nobody listens on with a reset.
            (_, Some(Errno::ECONNREFUSED | Errno::ECONNRESET)) => {
                " (is vhost-rng serving the entropy protocol there?)"
            }
            (Endpoint::Vsock { .. }, Some(Errno::ETIMEDOUT)) => {
                " (nothing answered: is the CID right, and is the VMM's vsock device connected?)"
            }
            (Endpoint::Unix(_), Some(Errno::ENOENT)) => " (no socket at this path)",
            _ => "",
        }
    }
}

/// An open connection to the daemon.
#[derive(Debug)]
pub enum Connection {
    Unix(UnixStream),
    Vsock(VsockStream),
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(stream) => stream.read(buf),
            Connection::Vsock(stream) => stream.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(stream) => stream.write(buf),
            Connection::Vsock(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connected AF_VSOCK stream socket (the standard library has none).
#[derive(Debug)]
pub struct VsockStream {
    socket: OwnedFd,
}

impl VsockStream {
    pub fn connect(cid: u32, port: u32, io_timeout: Duration) -> io::Result<Self> {
        let socket = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // The kernel bounds the connect itself (2 s by default for vsock).
        socket::connect(socket.as_raw_fd(), &VsockAddr::new(cid, port))?;
        Self::from_connected(socket, io_timeout)
    }

    /// Wraps a connected stream socket, setting its read and write timeouts.
    fn from_connected(socket: OwnedFd, io_timeout: Duration) -> io::Result<Self> {
        // Clamped so the conversion cannot overflow; a zero timeout would
        // mean "wait forever" to the kernel, so it becomes 1 µs instead.
        let micros = io_timeout
            .clamp(Duration::from_micros(1), MAX_IO_TIMEOUT)
            .as_micros();
        let timeout = TimeVal::microseconds(i64::try_from(micros).unwrap_or(i64::MAX));
        setsockopt(&socket, sockopt::ReceiveTimeout, &timeout)?;
        setsockopt(&socket, sockopt::SendTimeout, &timeout)?;
        Ok(VsockStream { socket })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(socket::recv(
            self.socket.as_raw_fd(),
            buf,
            MsgFlags::empty(),
        )?)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE.
        Ok(socket::send(
            self.socket.as_raw_fd(),
            buf,
            MsgFlags::MSG_NOSIGNAL,
        )?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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
                "tcp:1.2.3.4:5",
                EndpointError::UnknownKind("tcp:1.2.3.4:5".into()),
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
        let message = parse("tcp:x").unwrap_err().to_string();
        assert!(message.contains("vsock:2:5564"), "{message}");
    }

    #[test]
    fn endpoints_display_as_they_are_written() {
        for value in ["vsock:2:5564", "vsock:42:1", "unix:/tmp/a.sock"] {
            assert_eq!(parse(value).unwrap().to_string(), value);
        }
    }

    #[test]
    fn vsock_stream_reads_writes_and_times_out() {
        // Any connected stream socket exercises the same recv/send calls
        // and socket options; this host need not have vsock.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut stream =
            VsockStream::from_connected(OwnedFd::from(ours), Duration::from_millis(50)).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        theirs.write_all(b"pong").unwrap();
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        let err = stream.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        drop(theirs);
        assert_eq!(stream.read(&mut buf).unwrap(), 0, "end of stream");
        let err = stream.write_all(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "no SIGPIPE: {err}");
    }

    #[test]
    fn connecting_to_a_missing_unix_socket_explains_itself() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Unix(dir.path().join("none.sock"));
        let error = endpoint.connect(Duration::from_secs(1)).unwrap_err();
        assert_eq!(endpoint.connect_hint(&error), " (no socket at this path)");
    }
}
