// SPDX-License-Identifier: Apache-2.0
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
//! Each client has a thread of its own ([`super::stream`]), so a blocking
//! read that waits for the guest's tokens or for the pool never holds up
//! another client. A client may stay quiet between commands as long as it
//! likes (QEMU does), but when the guest has all its clients and another
//! arrives, the one idle longest, save the one connected longest, is
//! closed to make room.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::Level;
use vhost_rng_protocol::log_limited;

use super::socket_file::GuestSocket;
use super::stream::{ClientStream, GuestReader, Protocol, Session, StreamServer, read_exact_by};
use crate::entropy::pool::Mode;
use crate::guest::Guest;

const GET_ENTROPY_LEVEL: u8 = 0x00;
const READ_NONBLOCKING: u8 = 0x01;
const READ_BLOCKING: u8 = 0x02;
const WRITE_ENTROPY: u8 = 0x03;
const GET_PID: u8 = 0x04;
/// How long the rest of a command that has begun, or the answer's
/// delivery, may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The EGD protocol. It has no way to say "busy": a refused client is
/// just closed.
pub const PROTOCOL: Protocol = Protocol {
    name: "EGD",
    new_session: |reader| Box::new(EgdSession { reader }),
    busy_reply: &[],
};

/// Starts serving `guest` over EGD on `socket`.
pub fn spawn(guest: Arc<Guest>, socket: GuestSocket) -> io::Result<Arc<StreamServer>> {
    StreamServer::spawn(guest, socket, PROTOCOL)
}

struct EgdSession {
    reader: GuestReader,
}

impl Session for EgdSession {
    fn serve(&mut self, client: &mut dyn ClientStream) -> io::Result<()> {
        let command_timeout = self.reader.timeouts().command;
        client.set_write_timeout(Some(command_timeout))?;
        let mut command = [0u8; 1];
        // The longest answer: a count byte and 255 bytes.
        let mut answer = Vec::with_capacity(256);
        loop {
            // Between commands a client may stay quiet as long as it likes:
            // QEMU holds one connection for the life of the VM and asks only
            // when the guest reads. Once a command has begun, the rest of it
            // must follow promptly, or the client's slot is given back.
            self.reader.wait_for_command(client, None)?;
            client.set_read_timeout(None)?;
            match client.read(&mut command) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let deadline = Instant::now() + command_timeout;
            answer.clear();
            match command[0] {
                GET_ENTROPY_LEVEL => {
                    answer.extend_from_slice(&self.available_bits().to_be_bytes());
                }
                READ_NONBLOCKING => {
                    let wanted = read_u8(client, deadline)? as usize;
                    answer.resize(1 + wanted, 0);
                    let n = self.reader.read_now(&mut answer[1..]);
                    answer[0] = n as u8;
                    answer.truncate(1 + n);
                }
                READ_BLOCKING => {
                    let wanted = read_u8(client, deadline)? as usize;
                    answer.resize(wanted, 0);
                    self.reader.read_blocking(&mut answer)?;
                }
                WRITE_ENTROPY => self.refuse_write(client, deadline)?,
                GET_PID => {
                    let pid = std::process::id().to_string();
                    answer.push(pid.len() as u8);
                    answer.extend_from_slice(pid.as_bytes());
                }
                other => {
                    let stats = &self.reader.guest().stats;
                    stats.defective_requests.fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unknown EGD command {other:#04x}"),
                    ));
                }
            }
            // Idle from here on, should a newcomer need a place; marked
            // before the answer goes out, so that a client holding its
            // answer is sure to be marked.
            self.reader.command_done();
            client.write_all(&answer)?;
        }
    }
}

impl EgdSession {
    /// What a client is told is available: the pool's full-entropy bytes in
    /// raw mode; in DRBG mode a nominal 4096 bytes while a source is healthy.
    fn available_bits(&self) -> u32 {
        let pool = self.reader.guest().pool();
        let bytes = match pool.mode() {
            Mode::Raw => pool.level(),
            Mode::Drbg if pool.any_healthy() => 4096,
            Mode::Drbg => 0,
        };
        u32::try_from(bytes * 8).unwrap_or(u32::MAX)
    }

    /// Reads a write request (bits, length, data) and drops it: clients
    /// never feed the pool.
    fn refuse_write(&self, client: &mut dyn ClientStream, deadline: Instant) -> io::Result<()> {
        let mut header = [0u8; 3];
        read_exact_by(client, &mut header, deadline)?;
        let mut discard = vec![0u8; header[2] as usize];
        read_exact_by(client, &mut discard, deadline)?;
        let guest = self.reader.guest();
        log_limited!(
            guest.defect_log,
            Level::Warn,
            "guest {}: EGD client tried to write entropy; refused, clients never feed \
             the pool",
            guest.name()
        );
        Ok(())
    }
}

fn read_u8(stream: &mut dyn ClientStream, deadline: Instant) -> io::Result<u8> {
    let mut byte = [0u8; 1];
    read_exact_by(stream, &mut byte, deadline)?;
    Ok(byte[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::pool::Pool;
    use crate::frontend::socket_file::SocketAccess;
    use crate::frontend::stream::{MAX_CLIENTS, Timeouts};
    use crate::guest::limiter::RateLimit;
    use crate::guest::{GuestLimits, SharedBucket};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn pool() -> Arc<Pool> {
        crate::entropy::pool::os_pool()
    }

    fn server(limits: GuestLimits) -> (Arc<StreamServer>, tempfile::TempDir) {
        server_named("egd", limits)
    }

    /// A server for a guest named `name`, whose client threads are named
    /// `EGD-{name}-client`: a test counting them needs a name of its own,
    /// of 4 characters at most (the kernel keeps 15 of a thread's name).
    fn server_named(name: &str, limits: GuestLimits) -> (Arc<StreamServer>, tempfile::TempDir) {
        server_with(name, limits, Timeouts::DEFAULT)
    }

    /// [`server_named`], holding its clients to `timeouts`.
    fn server_with(
        name: &str,
        limits: GuestLimits,
        timeouts: Timeouts,
    ) -> (Arc<StreamServer>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let socket =
            GuestSocket::bind(&dir.path().join("egd.sock"), SocketAccess::default()).unwrap();
        let guest = Guest::with_limits(name, pool(), limits, SharedBucket::default());
        let server = StreamServer::spawn_with_timeouts(guest, socket, PROTOCOL, timeouts).unwrap();
        (server, dir)
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
    fn a_command_dribbled_past_its_timeout_is_dropped() {
        let command = Duration::from_millis(400);
        let timeouts = Timeouts {
            command,
            ..Timeouts::DEFAULT
        };
        let (_server, dir) = server_with("egd", GuestLimits::default(), timeouts);
        let mut c = client(&dir);
        let started = Instant::now();
        // A write of 255 bytes, sent a byte every 50 ms: each read well
        // within the command timeout, the whole command (13 s) far beyond
        // it.
        for byte in [WRITE_ENTROPY, 0, 8, 255].into_iter().chain([0u8; 255]) {
            if c.write_all(&[byte]).is_err() || started.elapsed() > command * 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(closed(&mut c), "not closed at the command timeout");
        let took = started.elapsed();
        assert!(
            took >= command && took < command + Duration::from_secs(1),
            "{took:?}"
        );
    }

    /// Polls `condition` for up to 10 s.
    fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks `c` for the daemon's pid: whether it is still served.
    fn answers(c: &mut UnixStream) -> bool {
        let mut len = [0u8; 1];
        c.write_all(&[GET_PID]).is_ok()
            && c.read_exact(&mut len).is_ok()
            && c.read_exact(&mut vec![0u8; len[0] as usize]).is_ok()
    }

    /// Whether `c` was closed by the daemon: EOF (or a reset) rather than
    /// the 10 s read timeout.
    fn closed(c: &mut UnixStream) -> bool {
        match c.read(&mut [0u8; 1]) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    fn threads_named(name: &str) -> usize {
        vhost_rng_testing::threads_named(name).unwrap()
    }

    #[test]
    fn the_first_client_keeps_its_place_however_many_idle_clients_arrive() {
        let (server, dir) = server(GuestLimits::default());
        let stats = || server.guest().stats.snapshot();
        // QEMU connects when the VM starts, reads once, then stays quiet:
        // idle longer than any client after it.
        let mut qemu = client(&dir);
        qemu.write_all(&[GET_ENTROPY_LEVEL]).unwrap();
        qemu.read_exact(&mut [0u8; 4]).unwrap();

        let mut attackers: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| client(&dir)).collect();
        // The eighth made the ninth client: the attacker idle longest made
        // room for it, not QEMU.
        wait_for("an eviction", || stats().evicted_connections == 1);
        qemu.write_all(&[GET_ENTROPY_LEVEL]).unwrap();
        qemu.read_exact(&mut [0u8; 4]).unwrap();
        qemu.write_all(&[READ_NONBLOCKING, 16]).unwrap();
        let mut count = [0u8; 1];
        qemu.read_exact(&mut count).unwrap();
        qemu.read_exact(&mut vec![0u8; count[0] as usize]).unwrap();

        // A ninth and a tenth attacker close attackers, never QEMU.
        attackers.push(client(&dir));
        attackers.push(client(&dir));
        wait_for("two more evictions", || stats().evicted_connections == 3);
        assert!(answers(&mut qemu), "QEMU lost its connection");
        for (i, attacker) in attackers.iter_mut().enumerate() {
            if i < 3 {
                assert!(
                    closed(attacker),
                    "attacker {i}, idle longest, was not closed"
                );
            } else {
                assert!(answers(attacker), "attacker {i} was closed");
            }
        }
        assert!(answers(&mut qemu));
        assert_eq!(stats().refused_connections, 0);
        assert_eq!(stats().connections, 1 + MAX_CLIENTS as u64 + 2);
    }

    #[test]
    fn a_newcomer_to_a_full_guest_closes_the_idlest_client_but_the_first() {
        let (server, dir) = server_named("full", GuestLimits::default());
        let stats = || server.guest().stats.snapshot();
        let client_threads = || threads_named("EGD-full-client");
        let mut idle: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| client(&dir)).collect();
        wait_for("every client served", || client_threads() == MAX_CLIENTS);

        let mut newcomer = client(&dir);
        assert!(answers(&mut newcomer), "the newcomer is served");
        // None of them ever completed a command: the second connected is
        // idle longest, the first being left out.
        assert!(closed(&mut idle[1]), "the idlest client was not closed");
        assert_eq!(stats().evicted_connections, 1);
        // Its thread ended: one per open client again.
        wait_for("the closed client's thread to end", || {
            client_threads() == MAX_CLIENTS
        });
        for i in [0, 2, 3, 4, 5, 6, 7] {
            assert!(answers(&mut idle[i]), "client {i} was closed");
        }

        drop((idle, newcomer));
        wait_for("every client thread to end", || client_threads() == 0);
        assert!(!stats().connected);
    }

    #[test]
    fn a_client_closed_while_its_read_waits_for_tokens_gives_its_thread_back() {
        // One byte a minute: a blocking read of 255 bytes would wait for
        // hours, and does not look at its socket while it waits.
        let limits = GuestLimits {
            rate: Some(RateLimit::new(1, 60_000, 1).unwrap()),
            weight: 1,
        };
        // Looks every 50 ms whether its client was closed.
        let stop_check = Duration::from_millis(50);
        let timeouts = Timeouts {
            stop_check,
            ..Timeouts::DEFAULT
        };
        let (server, dir) = server_with("wait", limits, timeouts);
        let client_threads = || threads_named("EGD-wait-client");
        let mut first = client(&dir);
        let mut waiting = client(&dir);
        waiting.write_all(&[READ_BLOCKING, 255]).unwrap();
        let mut others: Vec<UnixStream> = (2..MAX_CLIENTS).map(|_| client(&dir)).collect();
        wait_for("every client served", || client_threads() == MAX_CLIENTS);

        // The waiting client never completed a command: idlest but the
        // first. Its thread ends at its next look, not hours later.
        let mut newcomer = client(&dir);
        wait_for("the eviction", || {
            server.guest().stats.snapshot().evicted_connections == 1
        });
        let closed_at = Instant::now();
        wait_for("the waiting client's thread to end", || {
            client_threads() == MAX_CLIENTS
        });
        assert!(
            closed_at.elapsed() < stop_check + Duration::from_millis(500),
            "{:?}",
            closed_at.elapsed()
        );
        assert!(closed(&mut waiting));
        assert!(answers(&mut first) && answers(&mut newcomer));
        assert!(others.iter_mut().all(answers));
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
