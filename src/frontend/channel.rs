// SPDX-License-Identifier: Apache-2.0
//! The vhost-rng channel: our own read-only request/response protocol
//! (`docs/protocol.md`, [`vhost_rng_protocol::wire`]) for the in-guest agent, served
//! on a Unix socket in the hybrid-vsock convention: the guest connects to
//! host port P, and the VMM (Firecracker, cloud-hypervisor,
//! vhost-device-vsock) connects to `PATH_P` on the host.
//!
//! Clients can only read. A malformed request is answered with an explicit
//! error and the connection closed; a client idle longer than the protocol's
//! idle timeout is closed, and so is the idlest (save the one connected
//! longest) when the guest has all its clients and another arrives.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::socket_file::GuestSocket;
use super::stream::{
    ClientStream, GuestReader, Protocol, Session, StreamServer, Waited, read_exact_by,
};
use crate::guest::Guest;
use vhost_rng_protocol::wire::{self, REQUEST_LEN, ResponseHeader, Status};

/// The socket a hybrid-vsock VMM connects to for host port `port`.
pub fn uds_path(base: &Path, port: u32) -> PathBuf {
    let mut path = base.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// What a client refused because its guest has too many clients is told.
const BUSY_REPLY: [u8; wire::RESPONSE_HEADER_LEN] =
    wire::encode_response_header(&ResponseHeader::error(Status::Refused));

/// The channel protocol, for any stream socket.
pub const PROTOCOL: Protocol = Protocol {
    name: "channel",
    new_session: |reader| Box::new(ChannelSession { reader }),
    busy_reply: &BUSY_REPLY,
};

/// Starts serving `guest` over the channel protocol on `socket`.
pub fn spawn(guest: Arc<Guest>, socket: GuestSocket) -> io::Result<Arc<StreamServer>> {
    StreamServer::spawn(guest, socket, PROTOCOL)
}

struct ChannelSession {
    reader: GuestReader,
}

impl Session for ChannelSession {
    fn serve(&mut self, client: &mut dyn ClientStream) -> io::Result<()> {
        // The protocol's IDLE_TIMEOUT and REQUEST_TIMEOUT, shorter in tests.
        let timeouts = *self.reader.timeouts();
        client.set_write_timeout(Some(timeouts.request))?;
        let mut header = [0u8; REQUEST_LEN];
        let mut bytes = Vec::new();
        loop {
            // Between requests a client may be quiet for the idle timeout;
            // once a request has begun, all of it must arrive within the
            // request timeout, however it is dribbled.
            self.reader.wait_for_command(client, Some(timeouts.idle))?;
            client.set_read_timeout(Some(timeouts.idle))?;
            match client.read(&mut header[..1]) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            read_exact_by(client, &mut header[1..], Instant::now() + timeouts.request)?;
            let request = match wire::decode_request(&header) {
                Ok(request) => request,
                Err(e) => {
                    let stats = &self.reader.guest().stats;
                    stats.defective_requests.fetch_add(1, Ordering::Relaxed);
                    let answer = ResponseHeader::error(Status::BadRequest);
                    let _ = client
                        .write_all(&wire::encode_response_header(&answer))
                        .and_then(|()| client.flush());
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                }
            };
            bytes.resize(request.length as usize, 0);
            let (n, waited) = self
                .reader
                .read_until(&mut bytes, Some(Instant::now() + timeouts.request))?;
            if n == 0 {
                let status = match waited {
                    Waited::ForTokens => Status::RateLimited,
                    Waited::ForEntropy | Waited::Nothing => Status::Unavailable,
                };
                let answer = ResponseHeader::error(status);
                client.write_all(&wire::encode_response_header(&answer))?;
                client.flush()?;
                return Ok(());
            }
            // Idle from here on, should a newcomer need a place; marked
            // before the answer goes out, so that a client holding its
            // answer is sure to be marked.
            self.reader.command_done();
            let answer = ResponseHeader::ok(n as u32);
            client.write_all(&wire::encode_response_header(&answer))?;
            client.write_all(&bytes[..n])?;
            // An encrypting stream may hold the tail back until flushed.
            client.flush()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::socket_file::SocketAccess;
    use crate::frontend::stream::Timeouts;
    use crate::guest::{GuestLimits, SharedBucket};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    use vhost_rng_protocol::wire::{Request, encode_request};

    /// Stands in for a protocol deadline in the tests of one: long enough
    /// for any single step of a test, short enough not to slow the suite.
    const SHORT: Duration = Duration::from_millis(400);

    fn server() -> (Arc<StreamServer>, PathBuf, tempfile::TempDir) {
        server_with("vm", GuestLimits::default(), Timeouts::DEFAULT)
    }

    fn server_with(
        name: &str,
        limits: GuestLimits,
        timeouts: Timeouts,
    ) -> (Arc<StreamServer>, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = uds_path(&dir.path().join("vm.vsock"), wire::DEFAULT_PORT);
        let socket = GuestSocket::bind(&path, SocketAccess::default()).unwrap();
        let pool = crate::entropy::pool::os_pool();
        let guest = Guest::with_limits(name, pool, limits, SharedBucket::default());
        let server = StreamServer::spawn_with_timeouts(guest, socket, PROTOCOL, timeouts).unwrap();
        (server, path, dir)
    }

    /// Whether the daemon closed `client`: end of stream (or a reset), not
    /// the client's own read timeout running out.
    fn closed(client: &mut UnixStream) -> bool {
        match client.read(&mut [0u8; 1]) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let client = UnixStream::connect(path).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        client
    }

    fn threads_named(name: &str) -> usize {
        vhost_rng_testing::threads_named(name).unwrap()
    }

    #[test]
    fn a_guest_out_of_tokens_is_told_rate_limited() {
        // One byte a minute, from an empty bucket: nothing within the
        // request timeout.
        let limits = GuestLimits {
            rate: Some(crate::guest::limiter::RateLimit::new(1, 60_000, 1).unwrap()),
            weight: 1,
        };
        let timeouts = Timeouts {
            request: SHORT,
            ..Timeouts::DEFAULT
        };
        let (_server, path, _dir) = server_with("slow", limits, timeouts);
        let mut client = connect(&path);
        let started = Instant::now();
        let answer = wire::fetch(&mut client, 32, &mut Vec::new());
        let took = started.elapsed();
        assert!(
            matches!(
                answer,
                Err(wire::ProtocolError::Server(Status::RateLimited))
            ),
            "{answer:?}"
        );
        // Told once the request timeout ran out waiting for tokens, not at
        // once.
        assert!(
            took >= SHORT && took < SHORT + Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[test]
    fn a_request_dribbled_past_the_request_timeout_is_dropped() {
        let timeouts = Timeouts {
            request: SHORT,
            ..Timeouts::DEFAULT
        };
        let (server, path, _dir) = server_with("vm", GuestLimits::default(), timeouts);
        let mut client = connect(&path);
        let request = encode_request(&Request { length: 16 });
        let started = Instant::now();
        // A byte every 100 ms: each read well within the idle and the
        // request timeout, the whole request (1.2 s) not within the
        // request timeout.
        for byte in request {
            if client.write_all(&[byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(closed(&mut client), "not closed, or answered");
        let took = started.elapsed();
        assert!(
            took >= SHORT && took < SHORT + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(server.guest().stats.snapshot().bytes, 0);
    }

    #[test]
    fn a_client_quiet_past_the_idle_timeout_is_closed() {
        let timeouts = Timeouts {
            idle: SHORT,
            ..Timeouts::DEFAULT
        };
        let (server, path, _dir) = server_with("vm", GuestLimits::default(), timeouts);
        let mut client = connect(&path);
        // Fails in a second if the daemon never closes it.
        client
            .set_read_timeout(Some(SHORT + Duration::from_secs(1)))
            .unwrap();
        assert_eq!(wire::fetch(&mut client, 16, &mut Vec::new()).unwrap(), 16);
        // Quiet from its answer on: closed at the idle timeout.
        let answered = Instant::now();
        assert!(closed(&mut client), "an idle client was not closed");
        let idle = answered.elapsed();
        assert!(
            idle >= SHORT.mul_f64(0.9) && idle < SHORT + Duration::from_secs(1),
            "{idle:?}"
        );
        assert_eq!(server.guest().stats.snapshot().bytes, 16);
    }

    #[test]
    fn stopping_ends_the_accept_thread_even_when_the_socket_file_is_gone() {
        let (server, path, _dir) = server_with("gone", GuestLimits::default(), Timeouts::DEFAULT);
        let wait_for = |what: &str, count: usize| {
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while threads_named("channel-gone") != count {
                assert!(Instant::now() < deadline, "{what}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        wait_for("the accept thread never started", 1);
        std::fs::remove_file(&path).unwrap();
        server.stop();
        wait_for("the accept thread is still there", 0);
    }

    #[test]
    fn the_hybrid_vsock_path_carries_the_port() {
        assert_eq!(
            uds_path(Path::new("/run/vm1.vsock"), 5564),
            PathBuf::from("/run/vm1.vsock_5564")
        );
    }

    #[test]
    fn serves_requests_in_sequence_on_one_connection() {
        let (server, path, _dir) = server();
        let mut client = UnixStream::connect(&path).unwrap();
        let mut first = Vec::new();
        let mut second = Vec::new();
        assert_eq!(wire::fetch(&mut client, 64, &mut first).unwrap(), 64);
        assert_eq!(wire::fetch(&mut client, 4096, &mut second).unwrap(), 4096);
        assert_ne!(first[..], second[..64]);
        assert!(server.guest().stats.snapshot().bytes >= 4160);
    }

    #[test]
    fn a_malformed_request_gets_an_explicit_error_and_is_closed() {
        let (server, path, _dir) = server();
        let mut client = UnixStream::connect(&path).unwrap();
        let mut bad = encode_request(&Request { length: 64 });
        bad[0] = b'X';
        client.write_all(&bad).unwrap();
        let mut answer = [0u8; 12];
        client.read_exact(&mut answer).unwrap();
        let header = wire::decode_response_header(&answer).unwrap();
        assert_eq!(header.status, Status::BadRequest);
        assert_eq!(
            client.read(&mut [0u8; 1]).unwrap(),
            0,
            "closed after the error"
        );

        // An oversized request is refused the same way; others go on.
        let mut client = UnixStream::connect(&path).unwrap();
        let mut too_big = encode_request(&Request { length: 64 });
        too_big[8..12].copy_from_slice(&(wire::MAX_REQUEST + 1).to_be_bytes());
        client.write_all(&too_big).unwrap();
        client.read_exact(&mut answer).unwrap();
        assert_eq!(
            wire::decode_response_header(&answer).unwrap().status,
            Status::BadRequest
        );
        let mut ok = UnixStream::connect(&path).unwrap();
        assert_eq!(wire::fetch(&mut ok, 32, &mut Vec::new()).unwrap(), 32);
        assert_eq!(server.guest().stats.snapshot().defective_requests, 2);
    }
}
