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
//! <- {"result":"error","message":"no guest named vm9"}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::config::GuestSpec;
use crate::frontend::vhost_user::{GuestSocket, SocketAccess, SocketError};
use crate::log_limit::RateLimitedLog;
use crate::registry::Registry;
use crate::status::{DaemonStatus, GuestStatus};

/// Where the control socket is when the daemon runs as root.
pub const DEFAULT_CONTROL_PATH: &str = "/run/vhost-rng/control.sock";
/// A request line longer than this is refused.
const MAX_REQUEST: u64 = 64 * 1024;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    GuestAdd { spec: String },
    GuestRemove { name: String },
    GuestList,
    Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Error { message: String },
    Guests { guests: Vec<GuestStatus> },
    Status { status: Box<DaemonStatus> },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the daemon at {path}: {error} (is vhost-rng serve running with --control {path}?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("talking to the daemon at {path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("the daemon's answer is not understood: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
}

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
    };
    result.unwrap_or_else(|message| Response::Error { message })
}

/// The daemon's end: listens on `path` and serves clients one at a time on
/// a thread of its own (each with a timeout, so one stuck client cannot
/// keep the others out for long).
pub struct ControlServer {
    socket: GuestSocket,
}

impl ControlServer {
    pub fn start(path: &Path, registry: Arc<Registry>) -> Result<Self, SocketError> {
        if path == Path::new(DEFAULT_CONTROL_PATH)
            && let Some(dir) = path.parent()
            && !dir.exists()
        {
            // The default lives in a directory of our own under /run.
            let _ = std::fs::create_dir_all(dir);
        }
        // Control is root's business only: 0600 whatever --socket-mode says.
        let access = SocketAccess {
            mode: 0o600,
            group: None,
        };
        let socket = GuestSocket::bind(path, access)?;
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
                let errors = RateLimitedLog::per_minute(6);
                for client in listener.incoming() {
                    let result = client.and_then(|stream| serve_client(stream, &registry));
                    if let Err(e) = result
                        && let Some(suppressed) = errors.permit()
                    {
                        warn!("control socket: {e} ({suppressed} similar messages suppressed)");
                    }
                }
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

fn serve_client(stream: UnixStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(line.trim_end()) {
        Ok(request) => handle(registry, request),
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    send_line(&stream, &response)
}

fn send_line<T: Serialize>(mut stream: &UnixStream, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
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
