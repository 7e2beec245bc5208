// SPDX-License-Identifier: Apache-2.0
//! The fallback paths against a real daemon: the encrypted TCP transport
//! (keys made by `vhost-rng psk new`, the agent over `tcp:`, refusals,
//! what is on the wire), the `--vsock` options, and clients that misbehave
//! in numbers.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, new_psk, run_cli, wait_until};
use vhost_rng_protocol::noise::{self, Psk};
use vhost_rng_protocol::wire::{self, Request, Status};
use vhost_rng_testing::connect_from;

struct TcpSetup {
    daemon: Daemon,
    addr: SocketAddr,
    xen1_key: PathBuf,
    xen2_key: PathBuf,
    _dir: tempfile::TempDir,
}

/// A daemon serving guests xen1 and xen2 over TCP, each with its own key.
fn serve_tcp() -> TcpSetup {
    let dir = tempfile::tempdir().unwrap();
    let xen1_key = new_psk(dir.path(), "xen1");
    let xen2_key = new_psk(dir.path(), "xen2");
    let mut daemon = Daemon::start([
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--listen-tcp".into(),
        "127.0.0.1:0".into(),
        "--guest".into(),
        format!(
            "name=xen1,tcp-psk={},rate-bytes=1048576",
            xen1_key.display()
        ),
        "--guest".into(),
        format!("name=xen2,tcp-psk={}", xen2_key.display()),
    ]);
    let addr = daemon.tcp_addr();
    daemon.wait_for_log("control socket on", 1);
    TcpSetup {
        daemon,
        addr,
        xen1_key,
        xen2_key,
        _dir: dir,
    }
}

fn agent_once(addr: SocketAddr, key: &Path, name: &str) -> (bool, String) {
    let output = run_cli([
        "agent",
        "--connect",
        &format!("tcp:{addr}"),
        "--psk-file",
        &key.display().to_string(),
        "--name",
        name,
        "--once",
        "--bytes",
        "256",
        "--credit-bits-per-byte",
        "0",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn psk_new_writes_a_private_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = new_psk(dir.path(), "vm");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = std::fs::read_to_string(&path).unwrap();
    assert_eq!(key.trim().len(), 64, "{key}");

    let again = run_cli(["psk".as_ref(), "new".as_ref(), path.as_os_str()]);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), key, "kept");
}

#[test]
fn the_agent_over_tcp_is_served_with_its_key_and_refused_with_another() {
    let setup = serve_tcp();

    let (ok, text) = agent_once(setup.addr, &setup.xen1_key, "xen1");
    assert!(ok, "{text}");
    assert!(text.contains("VRNG-AGENT ok bytes=256"), "{text}");
    assert_eq!(setup.daemon.guest("xen1").bytes, 256);

    // xen2's key does not prove the name xen1.
    let (ok, text) = agent_once(setup.addr, &setup.xen2_key, "xen1");
    assert!(!ok, "{text}");
    assert!(text.contains("refused"), "{text}");
    setup
        .daemon
        .wait_for_log("refused: wrong key for guest xen1", 1);
    // Counted against the guest the hello named, not the key's owner.
    let xen1 = setup.daemon.guest("xen1");
    assert_eq!(xen1.wrong_key_connections, 1);
    assert_eq!(xen1.refused_connections, 0);
    assert_eq!(setup.daemon.guest("xen2").wrong_key_connections, 0);

    // A name the daemon does not know.
    let (ok, _) = agent_once(setup.addr, &setup.xen1_key, "nobody");
    assert!(!ok);
    setup.daemon.wait_for_log("no guest named nobody", 1);

    assert_eq!(setup.daemon.guest("xen1").bytes, 256, "nothing more served");
    assert_eq!(setup.daemon.guest("xen2").bytes, 0);
    assert_eq!(
        setup.daemon.guest("xen1").wrong_key_connections,
        1,
        "an unknown name is no wrong key"
    );
}

/// Bytes a proxy saw going one way.
type Capture = Arc<Mutex<Vec<u8>>>;

/// Forwards one connection to `target`, recording what goes up (to the
/// daemon) and down; the counter is how many of the two directions have
/// ended (seen their end of stream, or an error).
fn recording_proxy(target: SocketAddr) -> (SocketAddr, Capture, Capture, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Arc::new(Mutex::new(Vec::new()));
    let down = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(AtomicUsize::new(0));
    let (up_log, down_log, pipes_ended) = (Arc::clone(&up), Arc::clone(&down), Arc::clone(&ended));
    thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(target).unwrap();
        let pipe = |mut from: TcpStream, mut to: TcpStream, log: Capture| {
            let ended = Arc::clone(&pipes_ended);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                // The proxy is only the test's witness: passing the close
                // on is best effort.
                let _ = to.shutdown(Shutdown::Write);
                ended.fetch_add(1, Ordering::SeqCst);
            })
        };
        pipe(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            up_log,
        );
        pipe(server, client, down_log);
    });
    (addr, up, down, ended)
}

/// Whether the daemon closed `stream` (end of stream, or a reset), rather
/// than the client's read timing out.
fn closed_by_daemon(stream: &mut impl Read) -> bool {
    match stream.read(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn tcp_traffic_is_encrypted_and_clients_cannot_push() {
    let setup = serve_tcp();
    let (proxy, up, down, pipes_ended) = recording_proxy(setup.addr);
    let key = Psk::load(&setup.xen1_key).unwrap();
    let stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut secure = noise::connect_handshake(stream, "xen1", &key).unwrap();
    let mut entropy = Vec::new();
    assert_eq!(wire::fetch(&mut secure, 4096, &mut entropy).unwrap(), 4096);

    // A push: any request type but "get" is refused, and nothing is taken.
    let mut push = wire::encode_request(&Request { length: 64 });
    push[5] = 2;
    secure.write_all(&push).unwrap();
    let mut answer = [0u8; wire::RESPONSE_HEADER_LEN];
    secure.read_exact(&mut answer).unwrap();
    let header = wire::decode_response_header(&answer).unwrap();
    assert_eq!(header.status, Status::BadRequest);
    assert!(
        closed_by_daemon(&mut secure),
        "not closed after the refusal"
    );
    drop(secure);

    // Everything either side sent has gone through the proxy once both
    // directions have ended.
    wait_until("the proxy to see both ends close", || {
        pipes_ended.load(Ordering::SeqCst) == 2
    });
    let up = up.lock().unwrap().clone();
    let down = down.lock().unwrap().clone();
    assert!(down.len() > 4096, "the entropy went through the proxy");
    // What was plaintext on either end never appears on the wire: not the
    // protocol's headers, not any 16 bytes of the entropy.
    assert!(!contains(&up, &wire::MAGIC), "request header in clear");
    assert!(!contains(&down, &wire::MAGIC), "response header in clear");
    for chunk in entropy.chunks(16) {
        assert!(!contains(&down, chunk), "entropy in clear");
    }
    // The guest's name is the one thing sent in clear (the hello).
    assert!(contains(&up, b"xen1"));
    assert_eq!(setup.daemon.guest("xen1").bytes, 4096);
}

#[test]
fn a_plaintext_client_gets_nothing_over_tcp() {
    let setup = serve_tcp();
    let mut plain = TcpStream::connect(setup.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(&wire::encode_request(&Request { length: 64 }))
        .unwrap();
    let mut got = Vec::new();
    let read = plain.read_to_end(&mut got);
    assert!(got.is_empty(), "answered a plaintext client: {got:?}");
    // Closed by the daemon, not left to the client's read timeout.
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    setup
        .daemon
        .wait_for_log("does not speak the vhost-rng encrypted transport", 1);
}

#[test]
fn two_hundred_idle_tcp_connections_do_not_lock_out_a_guest() {
    let setup = serve_tcp();
    // Another host opens 200 connections that never send a byte, a third
    // sends garbage 20 times; the guest's agent, on its own address, is
    // served all the same.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| connect_from([127, 0, 0, 2], setup.addr).unwrap())
        .collect();
    for _ in 0..20 {
        let mut garbage = connect_from([127, 0, 0, 3], setup.addr).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    }
    let (ok, text) = agent_once(setup.addr, &setup.xen1_key, "xen1");
    assert!(ok, "{text}");
    assert_eq!(setup.daemon.guest("xen1").bytes, 256);

    // The idle host got only its share of handshake places; the rest of
    // its connections were closed at once and counted.
    let status = run_cli([
        "status".as_ref(),
        "--json".as_ref(),
        "--control".as_ref(),
        setup.daemon.control().as_os_str(),
    ]);
    let status: vhost_rng::service::status::DaemonStatus =
        serde_json::from_slice(&status.stdout).unwrap();
    let refused = &status.listeners[0].refused;
    assert!(
        refused["too_many_handshakes"] >= 190,
        "{:?}",
        status.listeners
    );
    drop(idle);
}

#[test]
fn the_vsock_listener_starts_reports_itself_and_its_port_cannot_be_taken_twice() {
    // A port of its own, so that tests running side by side do not meet.
    let port = 0x4000_0000 + std::process::id();
    let args = |control: &str| {
        vec![
            "serve".to_owned(),
            "--source".into(),
            "os".into(),
            "--vsock".into(),
            port.to_string(),
            "--vsock-default-rate".into(),
            "4096".into(),
            "--guest".into(),
            "name=vm3,cid=3,rate-bytes=8192".into(),
            "--control".into(),
            control.into(),
        ]
    };
    let dir = tempfile::tempdir().unwrap();
    let first_control = dir.path().join("first.sock");
    let daemon = Daemon::start(args(first_control.to_str().unwrap()));
    daemon.wait_for_log(
        &format!("listening on vsock port {port}; unknown CIDs are served at 4096 bytes/s"),
        1,
    );
    daemon.wait_for_log("guest vm3: serving vsock CID 3", 1);
    let status = run_cli([
        "status".as_ref(),
        "--json".as_ref(),
        "--control".as_ref(),
        first_control.as_os_str(),
    ]);
    assert!(status.status.success(), "{status:?}");
    let status: vhost_rng::service::status::DaemonStatus =
        serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status.listeners.len(), 1, "{:?}", status.listeners);
    assert_eq!(status.listeners[0].kind, "vsock");
    assert_eq!(status.listeners[0].address, port.to_string());
    let vm3 = status.guests.iter().find(|g| g.name == "vm3").unwrap();
    assert_eq!((vm3.endpoint.as_str(), vm3.path.as_str()), ("cid", "3"));

    // A second daemon on the same port says why it cannot start, and
    // leaves nothing behind.
    let second_control = dir.path().join("second.sock");
    let output = run_cli(args(second_control.to_str().unwrap()));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on vsock port {port}"))
            && stderr.contains("another process listens on that port"),
        "{stderr}"
    );
    assert!(!second_control.exists());
}

#[test]
fn vsock_options_are_checked_before_anything_starts() {
    // A default rate with no port to serve it on.
    let output = run_cli([
        "serve",
        "--source",
        "os",
        "--control",
        "/nonexistent/c.sock",
        "--vsock-default-rate",
        "4096",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("give --vsock PORT"), "{stderr}");

    // cid= needs --vsock; tcp-psk= needs --listen-tcp.
    for (spec, option) in [
        ("name=vm,cid=3", "--vsock PORT"),
        ("name=vm,tcp-psk=/nonexistent.psk", "--listen-tcp ADDR"),
    ] {
        let output = run_cli(["serve", "--source", "os", "--guest", spec]);
        assert_eq!(output.status.code(), Some(1), "{spec}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(option), "{spec}: {stderr}");
    }

    for bad in ["name=vm,cid=2", "name=vm,cid=4294967295", "name=vm,cid=x"] {
        let output = run_cli(["serve", "--source", "os", "--guest", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad}");
    }
}

#[test]
fn a_guest_key_file_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = new_psk(dir.path(), "xen1");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = run_cli([
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--listen-tcp".into(),
        "127.0.0.1:0".into(),
        "--guest".into(),
        format!("name=xen1,tcp-psk={}", key.display()),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn two_hundred_concurrent_clients_of_one_guest_leave_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let busy = dir.path().join("busy.vsock");
    let calm = dir.path().join("calm.vsock");
    let busy_channel = dir.path().join("busy.vsock_5564");
    let calm_channel = dir.path().join("calm.vsock_5564");
    let mut daemon = Daemon::start([
        "serve".as_ref(),
        "--source".as_ref(),
        "os".as_ref(),
        "--vsock-uds".as_ref(),
        busy.as_os_str(),
        "--vsock-uds".as_ref(),
        calm.as_os_str(),
    ]);
    daemon.wait_for_socket(&busy_channel);
    daemon.wait_for_socket(&calm_channel);

    // 200 clients at once, each asking for 64 KiB: each newcomer to the
    // full guest is served and closes the client idle longest (but the
    // first) to make room, so every client is either served or closed;
    // none is left hanging.
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let path = busy_channel.clone();
            thread::spawn(move || {
                let mut stream = UnixStream::connect(path).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                match wire::fetch(&mut stream, 65536, &mut Vec::new()) {
                    Ok(n) => Ok(n),
                    Err(e @ (wire::ProtocolError::TimedOut | wire::ProtocolError::Server(_))) => {
                        panic!("neither served nor closed: {e}")
                    }
                    // Closed before or during its answer, or while sending.
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    // Meanwhile the other guest is served as usual.
    let started = Instant::now();
    let mut calm_stream = UnixStream::connect(&calm_channel).unwrap();
    for _ in 0..10 {
        assert_eq!(
            wire::fetch(&mut calm_stream, 4096, &mut Vec::new()).unwrap(),
            4096
        );
    }
    let calm_time = started.elapsed();

    let outcomes: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let served = outcomes.iter().filter(|o| o.is_ok()).count();
    let closed = outcomes.len() - served;
    assert!(
        served >= 8,
        "at least a full guest's worth served: {served}"
    );
    let busy = daemon.guest("busy");
    assert!(
        busy.evicted_connections >= closed as u64 && busy.evicted_connections > 0,
        "{closed} closed, {} evicted",
        busy.evicted_connections
    );
    assert_eq!(busy.refused_connections, 0);
    eprintln!(
        "200 clients: {served} served, {closed} closed to make room; other guest 10 x 4 KiB \
         in {calm_time:?}"
    );

    // And the busy guest serves again once the storm is over.
    let mut after = UnixStream::connect(&busy_channel).unwrap();
    assert_eq!(wire::fetch(&mut after, 64, &mut Vec::new()).unwrap(), 64);
    assert!(daemon.is_running());
}
