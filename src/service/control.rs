// SPDX-License-Identifier: Apache-2.0
//! The control socket: `vhost-rng guest add|remove|list` and `vhost-rng
//! status` talk to a running daemon over a Unix socket (mode 0600).
//!
//! The protocol is one JSON request line and one JSON response line per
//! connection:
//!
//! ```text
//! -> {"command":"guest-add","spec":"name=vm1,socket=/run/vm1.sock,rate-bytes=16384"}
//! <- {"result":"ok"}
//! -> {"command":"guest-list"}
//! <- {"result":"guests","guests":[{"name":"vm1",...}]}
//! -> {"command":"status"}
//! <- {"result":"status","status":{...}}
//! -> {"command":"seed","bytes":64}
//! <- {"result":"seed","data":"<base64 of 64 bytes>"}
//! <- {"result":"error","message":"no guest named vm9"}
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, info};
use serde::{Deserialize, Serialize};

use crate::config::GuestSpec;
use crate::frontend::accept::ACCEPT_ERROR_PAUSE;
use crate::frontend::socket_file::{GuestSocket, SocketAccess, SocketError};
use crate::frontend::stream::{Places, read_by, refuse, write_all_by};
use crate::service::registry::Registry;
use crate::service::status::{DaemonStatus, GuestStatus};
use vhost_rng_protocol::deadline::TimedStream;
use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;

/// Where the control socket is when the daemon runs as root.
pub const DEFAULT_CONTROL_PATH: &str = "/run/vhost-rng/control.sock";
/// A request line longer than this is refused.
const MAX_REQUEST: usize = 64 * 1024;
/// A client gets this long in all to send its request and read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once; more are refused at once, so clients that never
/// finish cannot make the daemon start threads without bound. `vhost-rng`
/// commands take milliseconds each: 16 leaves room for scripts running
/// several at once, and for a few stuck clients besides.
pub const MAX_CLIENTS: usize = 16;

/// One request line from a client, tagged by `command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// `guest-add`: start serving the guest in `spec`, written in `--guest`
    /// form.
    GuestAdd {
        /// The guest, in `--guest` form.
        spec: String,
    },
    /// `guest-remove`: stop serving the guest called `name`.
    GuestRemove {
        /// The guest's name.
        name: String,
    },
    /// `guest-list`: every guest with its counters and limits.
    GuestList,
    /// `status`: the whole daemon, guests, sources and pool.
    Status,
    /// Re-execute the daemon's binary from disk, keeping every guest
    /// (`vhost-rng upgrade`, like SIGUSR2).
    Upgrade,
    /// `seed`: `bytes` random bytes from the pool for a boot seed
    /// (`vhost-rng seed`), at most [`crate::service::seed::MAX_SEED_BYTES`].
    Seed {
        /// How many bytes.
        bytes: usize,
    },
    /// For the sandbox's tests only: make a system call that no filter
    /// allows, from a thread of the serving process. Refused unless the
    /// daemon was started with `VHOST_RNG_TEST_PROBES=1`; the call
    /// (personality(2) in its query form) changes nothing where it is
    /// allowed.
    #[doc(hidden)]
    ForbiddenSyscallProbe,
}

/// The daemon's answer line, tagged by `result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// The request was carried out.
    Ok,
    /// The request was refused; `message` says why, for the operator.
    #[allow(missing_docs)] // its one field, `message`, is described above
    Error { message: String },
    /// The answer to `guest-list`: `guests`, one entry per guest.
    #[allow(missing_docs)] // its one field, `guests`, is described above
    Guests { guests: Vec<GuestStatus> },
    /// The answer to `status`: `status`, the daemon as a whole.
    #[allow(missing_docs)] // its one field, `status`, is described above
    Status { status: Box<DaemonStatus> },
    /// The answer to `seed`: `data`, the bytes in base64.
    #[allow(missing_docs)] // its one field, `data`, is described above
    Seed { data: String },
}

/// Why a control client got no answer, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens at the control socket's path (or it cannot be
    /// reached).
    #[error(
        "cannot reach the daemon at {path}: {error} (is vhost-rng serve running with --control {path}?)"
    )]
    Connect {
        /// The control socket's path.
        path: PathBuf,
        /// The error from connecting.
        #[source]
        error: std::io::Error,
    },
    /// Sending the request or reading the answer failed (the daemon may have
    /// timed out the client).
    #[error("talking to the daemon at {path}: {error}")]
    Io {
        /// The control socket's path.
        path: PathBuf,
        /// The error from the operating system.
        #[source]
        error: std::io::Error,
    },
    /// The answer is not a response line this client understands (the parse
    /// error and the line are given).
    #[error("the daemon's answer is not understood: {0}")]
    Protocol(String),
    /// The daemon answered with an error (its message is given).
    #[error("{0}")]
    Refused(String),
}

/// Set to 1 in a daemon's environment, it answers
/// [`Request::ForbiddenSyscallProbe`] (tests of the sandbox).
pub const PROBES_ENV: &str = "VHOST_RNG_TEST_PROBES";

/// Answers one request against the registry.
pub fn handle(registry: &Registry, request: Request) -> Response {
    let result = match request {
        Request::GuestAdd { spec } => spec
            .parse::<GuestSpec>()
            .map_err(|e| e.to_string())
            .and_then(|spec| registry.add(spec).map_err(|e| e.to_string()))
            .map(|()| Response::Ok),
        Request::GuestRemove { name } => registry
            .remove(&name)
            .map(|()| Response::Ok)
            .map_err(|e| e.to_string()),
        Request::GuestList => Ok(Response::Guests {
            guests: registry.guest_statuses(),
        }),
        Request::Status => Ok(Response::Status {
            status: Box::new(registry.status()),
        }),
        Request::Upgrade => request_upgrade(registry),
        Request::Seed { bytes } => crate::service::seed::from_pool(registry.pool(), bytes)
            .map(|data| Response::Seed {
                data: crate::service::seed::base64(&data),
            })
            .map_err(|e| e.to_string()),
        Request::ForbiddenSyscallProbe => {
            if std::env::var_os(PROBES_ENV).is_some_and(|v| v == "1") {
                crate::service::sandbox::seccomp::forbidden_call();
                Ok(Response::Ok)
            } else {
                Err("unknown command".into())
            }
        }
    };
    result.unwrap_or_else(|message| Response::Error { message })
}

/// Checks the binary on disk, then has the main thread upgrade (it owns the
/// signal loop): the answer says whether the upgrade was started, not
/// whether it succeeded, which `vhost-rng upgrade` follows in the status.
fn request_upgrade(registry: &Registry) -> Result<Response, String> {
    if registry.isolation() == crate::service::isolation::Isolation::Guest {
        let message = crate::service::isolation::NO_UPGRADE.to_owned();
        registry.update_lifecycle(|life| {
            life.last_upgrade_error = Some(message.clone());
            life.upgrade_failures += 1;
        });
        return Err(message);
    }
    // A serving process may not execute anything: its top process runs
    // the check.
    let checked = match registry.link() {
        Some(link) => crate::service::supervisor::check_through_top(&link),
        None => crate::service::upgrade::check_binary(&registry.lifecycle().binary)
            .map_err(|e| e.to_string()),
    };
    if let Err(message) = checked {
        registry.update_lifecycle(|life| {
            life.last_upgrade_error = Some(message.clone());
            life.upgrade_failures += 1;
        });
        return Err(message);
    }
    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGUSR2)
        .map_err(|e| format!("cannot start the upgrade: {e}"))?;
    Ok(Response::Ok)
}

/// The daemon's end: listens on `path` and serves each client on a thread
/// of its own, at most [`MAX_CLIENTS`] at once. Each client has
/// [`CLIENT_TIMEOUT`] in all to send its request and take the answer, so a
/// client that is slow or stuck (or sends a byte now and then) holds one
/// place for that long at most and never keeps the others waiting.
pub struct ControlServer {
    socket: GuestSocket,
}

impl ControlServer {
    /// Listens on `path` (mode 0600) and serves each client against
    /// `registry`, giving each [`CLIENT_TIMEOUT`].
    pub fn start(path: &Path, registry: Arc<Registry>) -> Result<Self, SocketError> {
        Self::start_with_timeout(path, registry, CLIENT_TIMEOUT)
    }

    /// [`ControlServer::start`], giving each client `timeout` instead of
    /// [`CLIENT_TIMEOUT`] (tests use a short one).
    pub fn start_with_timeout(
        path: &Path,
        registry: Arc<Registry>,
        timeout: Duration,
    ) -> Result<Self, SocketError> {
        Self::prepare_directory(path);
        Self::start_on(GuestSocket::bind(path, Self::ACCESS)?, registry, timeout)
    }

    /// Control is root's business only: 0600 whatever --socket-mode says.
    pub const ACCESS: SocketAccess = SocketAccess {
        mode: 0o600,
        group: None,
    };

    /// Makes the default control socket's directory (one of our own under
    /// /run) if it is missing.
    pub fn prepare_directory(path: &Path) {
        if path == Path::new(DEFAULT_CONTROL_PATH)
            && let Some(dir) = path.parent()
            && !dir.exists()
        {
            let _ = std::fs::create_dir_all(dir);
        }
    }

    /// [`ControlServer::start_with_timeout`] on a socket already listening
    /// (made here, or handed over by the previous process).
    pub fn start_on(
        socket: GuestSocket,
        registry: Arc<Registry>,
        timeout: Duration,
    ) -> Result<Self, SocketError> {
        let path = socket.path().to_owned();
        let path = path.as_path();
        let listener = socket
            .try_clone_listener()
            .map_err(|error| SocketError::Io {
                path: path.to_owned(),
                action: "clone the control socket",
                error,
            })?;
        let shown = path.display().to_string();
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                // No request is taken before the process has dropped root.
                crate::service::sandbox::wait_for_gate();
                accept_loop(&listener, &registry, timeout)
            })
            .map_err(|error| SocketError::Io {
                path: path.to_owned(),
                action: "start the control thread",
                error,
            })?;
        info!("control socket on {shown}");
        Ok(ControlServer { socket })
    }

    /// Removes the socket file.
    pub fn stop(&self) {
        self.socket.remove();
    }
}

/// Accepts clients and hands each to a thread of its own; never waits for
/// a client itself, so a full house only costs the next client a refusal.
fn accept_loop(listener: &UnixListener, registry: &Arc<Registry>, timeout: Duration) {
    let errors = Arc::new(RateLimitedLog::per_minute(6));
    let places = Places::new(MAX_CLIENTS);
    for client in listener.incoming() {
        let mut stream = match client {
            Ok(stream) => stream,
            Err(e) => {
                log_error(&errors, &e);
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        let Some(place) = places.take() else {
            refuse(&mut stream, &busy_reply());
            log_error(
                &errors,
                &format!("{MAX_CLIENTS} clients are being served already; one refused"),
            );
            continue;
        };
        let registry = Arc::clone(registry);
        let thread_errors = Arc::clone(&errors);
        // If the thread cannot start, the closure (and the place with it)
        // is dropped, giving the place back.
        let spawned = thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let _place = place;
                if let Err(e) = serve_client(stream, &registry, timeout) {
                    log_error(&thread_errors, &e);
                }
            });
        if let Err(e) = spawned {
            log_error(&errors, &format!("cannot start a client thread: {e}"));
        }
    }
}

fn log_error(errors: &RateLimitedLog, error: &dyn std::fmt::Display) {
    log_limited!(errors, Level::Warn, "control socket: {error}");
}

/// What a client refused for want of a place is told, if its socket takes
/// it at once.
fn busy_reply() -> Vec<u8> {
    let response = Response::Error {
        message: format!(
            "the daemon is serving {MAX_CLIENTS} control clients already; try again in a few seconds"
        ),
    };
    let mut line = serde_json::to_vec(&response).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Reads one request line, answers it, within `timeout` of the client's
/// time in all: the clock stops while the daemon carries the request out
/// (adding a guest may take a while), which is not the client's doing.
fn serve_client(mut stream: UnixStream, registry: &Registry, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let line = read_request_line(&mut stream, deadline)?;
    let read_at = Instant::now();
    let response = match parse_request(&line) {
        Ok(request) => handle(registry, request),
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let left = deadline.saturating_duration_since(read_at);
    let mut answer = serde_json::to_vec(&response).map_err(io::Error::other)?;
    answer.push(b'\n');
    write_all_by(&mut stream, &answer, Instant::now() + left)
}

/// A request line as the daemon reads it: JSON, trailing whitespace ignored.
pub fn parse_request(line: &[u8]) -> Result<Request, serde_json::Error> {
    serde_json::from_slice(line.trim_ascii_end())
}

/// Reads up to the end of the first line (or of the stream), at most
/// [`MAX_REQUEST`] bytes, by `deadline`. Public for the fuzz target.
#[doc(hidden)]
pub fn read_request_line(stream: &mut dyn TimedStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    while line.len() < MAX_REQUEST {
        let n = read_by(stream, &mut chunk, deadline)?;
        if n == 0 {
            break;
        }
        let got = &chunk[..n];
        if let Some(end) = got.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&got[..end]);
            break;
        }
        line.extend_from_slice(got);
    }
    line.truncate(MAX_REQUEST);
    Ok(line)
}

fn send_line<T: Serialize>(mut stream: &UnixStream, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// The client's end: sends one request to the daemon at `path`.
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let io = |error| ControlError::Io {
        path: path.to_owned(),
        error,
    };
    let stream = UnixStream::connect(path).map_err(|error| ControlError::Connect {
        path: path.to_owned(),
        error,
    })?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT * 2))
        .map_err(io)?;
    send_line(&stream, request).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    match serde_json::from_str::<Response>(line.trim_end()) {
        Ok(Response::Error { message }) => Err(ControlError::Refused(message)),
        Ok(response) => Ok(response),
        Err(e) => Err(ControlError::Protocol(format!("{e}: {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A control server on a socket in `dir`, giving each client `timeout`.
    fn server(dir: &Path, timeout: Duration) -> (ControlServer, PathBuf) {
        let path = dir.join("control.sock");
        let registry = Registry::new(
            crate::entropy::pool::os_pool(),
            crate::frontend::socket_file::SocketAccess::default(),
            crate::frontend::vhost_user::VhostUserLimits::default(),
        );
        let server = ControlServer::start_with_timeout(&path, registry, timeout).unwrap();
        (server, path)
    }

    fn client_threads() -> usize {
        vhost_rng_testing::threads_named("control-client").unwrap()
    }

    /// Held by the tests that hold clients open, so that they do not count
    /// each other's threads.
    static HOLDING_CLIENTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Waits, at most 10 s, for `done`.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn assert_status_works(path: &Path) {
        let response = request(path, &Request::Status).unwrap();
        assert!(matches!(response, Response::Status { .. }), "{response:?}");
    }

    #[test]
    fn a_client_dribbling_its_request_is_dropped_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_secs(1);
        let (_server, path) = server(dir.path(), timeout);
        let mut dribbler = UnixStream::connect(&path).unwrap();
        dribbler
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut writer = dribbler.try_clone().unwrap();
        let started = Instant::now();
        // A byte every 300 ms, never a line end: each read is well within
        // the timeout, all of them together (6 s) are not.
        let sender = thread::spawn(move || {
            for &b in br#"{"command":"status"    "# {
                if writer.write_all(&[b]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(300));
            }
        });
        let mut answer = Vec::new();
        let result = dribbler.read_to_end(&mut answer);
        let dropped_after = started.elapsed();
        assert!(
            result.is_ok()
                || result
                    .as_ref()
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset),
            "{result:?}"
        );
        assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
        assert!(dropped_after >= timeout, "{dropped_after:?}");
        assert!(
            dropped_after < timeout + Duration::from_secs(2),
            "held for {dropped_after:?}"
        );
        sender.join().unwrap();
        assert_status_works(&path);
    }

    #[test]
    fn idle_clients_do_not_keep_others_out_and_their_threads_end() {
        let dir = tempfile::tempdir().unwrap();
        // Long enough that the idle clients are surely still held when the
        // request is made.
        let timeout = Duration::from_secs(10);
        let _holding = HOLDING_CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
        let (_server, path) = server(dir.path(), timeout);
        // The dribbling test's client lasts 1 s.
        wait_for("the other tests' client threads to end", || {
            client_threads() == 0
        });

        let idle: Vec<UnixStream> = (0..8)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        wait_for("a thread for each idle client", || client_threads() >= 8);
        // Served while all 8 are still connected, before their deadline:
        // one client at a time, it would wait for all of theirs.
        let started = Instant::now();
        assert_status_works(&path);
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
        let list = request(&path, &Request::GuestList).unwrap();
        assert_eq!(list, Response::Guests { guests: vec![] });

        drop(idle);
        wait_for("the client threads to end", || client_threads() == 0);
    }

    #[test]
    fn clients_beyond_the_limit_are_told_the_daemon_is_busy() {
        let _holding = HOLDING_CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        // Long enough that the idle clients keep their places throughout.
        let (_server, path) = server(dir.path(), Duration::from_secs(30));
        let idle: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // Every place is taken once a new client is refused; until then the
        // accept thread may not have handed out all of them.
        let deadline = Instant::now() + Duration::from_secs(10);
        let refusal = loop {
            match request(&path, &Request::Status) {
                Err(ControlError::Refused(message)) => break message,
                Ok(_) => {
                    assert!(Instant::now() < deadline, "never refused");
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(
            refusal.contains(&format!("serving {MAX_CLIENTS} control clients already")),
            "{refusal}"
        );
        drop(idle);
        wait_for("a place to free up", || {
            request(&path, &Request::Status).is_ok()
        });
    }

    #[test]
    fn requests_and_responses_have_a_stable_wire_form() {
        let add = Request::GuestAdd {
            spec: "name=vm1,socket=/s".into(),
        };
        assert_eq!(
            serde_json::to_string(&add).unwrap(),
            r#"{"command":"guest-add","spec":"name=vm1,socket=/s"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::GuestList).unwrap(),
            r#"{"command":"guest-list"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Ok).unwrap(),
            r#"{"result":"ok"}"#
        );
        let error: Response = serde_json::from_str(r#"{"result":"error","message":"x"}"#).unwrap();
        assert_eq!(
            error,
            Response::Error {
                message: "x".into()
            }
        );
    }

    #[test]
    fn client_reports_an_absent_daemon_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        let err = request(&path, &Request::Status).unwrap_err().to_string();
        assert!(
            err.contains("is vhost-rng serve running with --control"),
            "{err}"
        );
    }
}
