// SPDX-License-Identifier: Apache-2.0
//! Listening sockets handed to `vhost-rng serve` by whoever started it:
//! systemd socket activation (`LISTEN_FDS`, `LISTEN_FDNAMES`) and `--fd N`
//! (QEMU's vhost-user backend program conventions, e.g. a management layer
//! that made the socket itself).
//!
//! Each such socket becomes a guest served as `socket=PATH` (PATH is where
//! the socket is bound, from getsockname(2)), named after its `FDNAME` or,
//! where systemd gave none of its own (`unknown`, or the socket unit's name
//! ending in `.socket`), after the socket file (`/run/vhost-rng/vm1.sock`
//! is `vm1`). The guest is a runtime guest: it needs no configuration
//! entry, keeps no rate limit of its own (`--max-rate` applies), and is
//! kept across reloads, upgrades and restarts of the serving process like
//! one added with `vhost-rng guest add`. A configured guest (command line
//! or config file) of the same name and path takes the socket instead,
//! with its limits, and stays a configured guest.
//!
//! The top process takes these sockets at start and hands them to the
//! serving process the way it hands over guests after a crash. The socket
//! file is never removed by the daemon: it belongs to whoever made it
//! (systemd removes a socket unit's file when the unit stops).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use log::{debug, warn};
use nix::sys::socket::{self, SockType, UnixAddr, sockopt};

use crate::config::{GuestEndpoint, GuestSpec, validate_name};
use crate::service::upgrade::{Counters, GuestState};

/// A passed listening socket, turned into a guest.
#[derive(Debug)]
pub struct Activated {
    /// The guest's spec, `name=NAME,socket=PATH`.
    pub spec: GuestSpec,
    /// The listening socket.
    pub fd: OwnedFd,
}

impl Activated {
    /// The guest's record as the top process holds it: a runtime guest
    /// whose listener is the first (and only) descriptor.
    pub fn into_held(self) -> (String, GuestState, OwnedFd) {
        let state = GuestState {
            spec: self.spec.to_string(),
            runtime: true,
            activated: true,
            listener: Some(0),
            connection: None,
            clients: Vec::new(),
            tokens: None,
            counters: Counters::default(),
        };
        (self.spec.name, state, self.fd)
    }
}

/// Why a `--fd` descriptor cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// Descriptors 0, 1 and 2 are standard input, output and error.
    #[error(
        "--fd {0}: descriptors 0, 1 and 2 are stdin, stdout and stderr; pass the socket as 3 or above"
    )]
    Standard(RawFd),
    /// Nothing is open at that number.
    #[error("--fd {fd}: no descriptor {fd} is open in this process: {error}")]
    NotOpen {
        /// The number given.
        fd: RawFd,
        /// The error from fcntl(2).
        #[source]
        error: nix::Error,
    },
    /// The same number was given twice.
    #[error("--fd {0} is given more than once")]
    Twice(RawFd),
    /// It is not what the daemon serves.
    #[error("--fd {fd}: {problem}")]
    Unusable {
        /// The number given.
        fd: RawFd,
        /// What is wrong with it.
        problem: String,
    },
}

/// What a passed descriptor is: a listening Unix stream socket bound to a
/// path (that path), or why not.
fn listening_path(fd: &OwnedFd) -> Result<PathBuf, String> {
    let kind =
        socket::getsockopt(fd, sockopt::SockType).map_err(|e| format!("not a socket ({e})"))?;
    let address = socket::getsockname::<UnixAddr>(fd.as_raw_fd())
        .map_err(|_| "not a Unix socket: vhost-user runs over Unix sockets".to_string())?;
    if kind != SockType::Stream {
        return Err("not a stream socket (SOCK_STREAM)".into());
    }
    if !socket::getsockopt(fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err(
            "a Unix socket that is not listening: vhost-rng takes a listening socket \
             (a connected one, as from socketpair(2), is not served)"
                .into(),
        );
    }
    match address.path() {
        Some(path) => Ok(path.to_owned()),
        None => Err("a listening socket with no path (abstract or unnamed)".into()),
    }
}

/// Whether `fd` is a Unix socket bound at `path` itself: one someone else
/// made (this daemon binds its own in a private directory, then moves
/// them into place), whose file the daemon must leave alone.
pub fn bound_at(fd: &OwnedFd, path: &Path) -> bool {
    socket::getsockname::<UnixAddr>(fd.as_raw_fd())
        .ok()
        .and_then(|address| address.path().map(Path::to_path_buf))
        .is_some_and(|bound| bound == path)
}

/// The guest name for a socket at `path` passed as `fd_name`.
fn guest_name(fd_name: Option<&str>, path: &Path) -> String {
    let file_name = || GuestSpec::from_socket_shorthand(GuestEndpoint::Socket(path.into())).name;
    match fd_name {
        None | Some("unknown" | "stored" | "connection") => file_name(),
        Some(name) if name.ends_with(".socket") => file_name(),
        Some(name) => match validate_name(name) {
            Ok(()) => name.to_owned(),
            Err(e) => {
                let fallback = file_name();
                warn!(
                    "the socket {} passed as {name:?}: {e}; serving it as guest {fallback}",
                    path.display()
                );
                fallback
            }
        },
    }
}

fn activated(fd_name: Option<&str>, fd: OwnedFd) -> Result<Activated, (String, OwnedFd)> {
    let path = match listening_path(&fd) {
        Ok(path) => path,
        Err(problem) => return Err((problem, fd)),
    };
    let mut spec = GuestSpec::from_socket_shorthand(GuestEndpoint::Socket(path.clone()));
    spec.name = guest_name(fd_name, &path);
    if let Err(e) = validate_name(&spec.name) {
        return Err((
            format!("no usable guest name for {}: {e}", path.display()),
            fd,
        ));
    }
    Ok(Activated { spec, fd })
}

/// Splits what systemd passed: the listening sockets that are not the
/// file descriptor store's (whose names start `guest.`) become guests;
/// everything else is returned for the store.
pub fn from_systemd(
    passed: Vec<(String, OwnedFd)>,
    is_store_name: impl Fn(&str) -> bool,
) -> (Vec<(String, OwnedFd)>, Vec<Activated>) {
    let mut rest = Vec::new();
    let mut guests = Vec::new();
    for (fd_name, fd) in passed {
        if is_store_name(&fd_name) {
            rest.push((fd_name, fd));
            continue;
        }
        match activated(Some(&fd_name), fd) {
            Ok(guest) => guests.push(guest),
            Err((problem, fd)) => {
                debug!("descriptor {fd_name:?} from systemd is not a guest socket: {problem}");
                rest.push((fd_name, fd));
            }
        }
    }
    (rest, guests)
}

/// Takes the descriptors `--fd` names. Call once, in the process that was
/// started with them (not after an in-place upgrade, whose numbers mean
/// other things).
pub fn from_fd_args(fds: &[RawFd]) -> Result<Vec<Activated>, ActivationError> {
    let mut seen = Vec::new();
    for &fd in fds {
        if fd < 3 {
            return Err(ActivationError::Standard(fd));
        }
        if seen.contains(&fd) {
            return Err(ActivationError::Twice(fd));
        }
        nix::fcntl::fcntl(
            // SAFETY: only inspected; ownership is taken below, once every
            // number has been checked.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .map_err(|error| ActivationError::NotOpen { fd, error })?;
        seen.push(fd);
    }
    let mut guests = Vec::new();
    let mut failure = None;
    for fd in seen {
        // SAFETY: the parent handed this descriptor to this process for
        // it to serve (--fd), it is open (checked above), named once, and
        // nothing else in this process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        match activated(None, owned) {
            Ok(guest) => guests.push(guest),
            Err((problem, _closed)) => {
                failure.get_or_insert(ActivationError::Unusable { fd, problem });
            }
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(guests),
    }
}

/// Leaves out the sockets whose guest name is already taken: by a guest
/// the file descriptor store gave back (`existing`, name to spec; the same
/// socket passed again by its socket unit is expected then, and dropped
/// quietly) or by an earlier socket in `activated`.
pub fn without_clashes(
    activated: Vec<Activated>,
    existing: &BTreeMap<String, String>,
) -> Vec<Activated> {
    let mut kept: Vec<Activated> = Vec::new();
    for guest in activated {
        let path = guest.spec.endpoint.path().map(Path::to_path_buf);
        if let Some(spec) = existing.get(&guest.spec.name) {
            let same = spec
                .parse::<GuestSpec>()
                .ok()
                .is_some_and(|s| s.endpoint.path().map(Path::to_path_buf) == path);
            if same {
                debug!(
                    "guest {}: its socket came back from the file descriptor store too",
                    guest.spec.name
                );
            } else {
                warn!(
                    "guest {}: a passed socket ({}) has the name of a guest restored from \
                     systemd's file descriptor store ({spec}); the passed socket is closed",
                    guest.spec.name,
                    path.unwrap_or_default().display()
                );
            }
            continue;
        }
        if let Some(first) = kept.iter().find(|k| k.spec.name == guest.spec.name) {
            warn!(
                "guest {}: two passed sockets have this name ({} and {}); the second is \
                 closed: give each socket unit its own FileDescriptorName=",
                guest.spec.name,
                first
                    .spec
                    .endpoint
                    .path()
                    .unwrap_or(Path::new(""))
                    .display(),
                path.unwrap_or_default().display()
            );
            continue;
        }
        kept.push(guest);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn listener(dir: &Path, file: &str) -> OwnedFd {
        OwnedFd::from(UnixListener::bind(dir.join(file)).unwrap())
    }

    #[test]
    fn names_come_from_fdname_or_the_socket_file() {
        let path = Path::new("/run/vhost-rng/vm7.sock");
        assert_eq!(guest_name(Some("web-1"), path), "web-1");
        assert_eq!(guest_name(Some("unknown"), path), "vm7");
        assert_eq!(guest_name(None, path), "vm7");
        assert_eq!(guest_name(Some("vhost-rng@vm7.socket"), path), "vm7");
        assert_eq!(guest_name(Some("bad@name"), path), "vm7");
    }

    #[test]
    fn listening_unix_sockets_become_guests_and_the_rest_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let passed = vec![
            (
                "guest.vm1.0".to_string(),
                listener(dir.path(), "stored.sock"),
            ),
            ("vm2".to_string(), listener(dir.path(), "x.sock")),
            ("unknown".to_string(), listener(dir.path(), "vm3.sock")),
            ("conn".to_string(), OwnedFd::from(a)),
        ];
        let (rest, guests) = from_systemd(passed, |name| name.starts_with("guest."));
        let rest: Vec<&str> = rest.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(rest, ["guest.vm1.0", "conn"]);
        let specs: Vec<String> = guests.iter().map(|g| g.spec.to_string()).collect();
        assert_eq!(
            specs,
            [
                format!("name=vm2,socket={}", dir.path().join("x.sock").display()),
                format!("name=vm3,socket={}", dir.path().join("vm3.sock").display()),
            ]
        );
        let (name, state, _fd) = guests.into_iter().next().unwrap().into_held();
        assert_eq!(name, "vm2");
        assert!(state.runtime && state.activated);
        assert_eq!(state.listener, Some(0));
    }

    #[test]
    fn clashing_names_keep_the_first_and_the_restored() {
        let dir = tempfile::tempdir().unwrap();
        let passed = vec![
            ("a".to_string(), listener(dir.path(), "1.sock")),
            ("a".to_string(), listener(dir.path(), "2.sock")),
            ("b".to_string(), listener(dir.path(), "3.sock")),
            ("c".to_string(), listener(dir.path(), "4.sock")),
        ];
        let (_, guests) = from_systemd(passed, |_| false);
        let mut existing = BTreeMap::new();
        existing.insert(
            "b".to_string(),
            format!("name=b,socket={}", dir.path().join("3.sock").display()),
        );
        let kept = without_clashes(guests, &existing);
        let names: Vec<(&str, PathBuf)> = kept
            .iter()
            .map(|g| (g.spec.name.as_str(), g.spec.endpoint.path().unwrap().into()))
            .collect();
        assert_eq!(
            names,
            [
                ("a", dir.path().join("1.sock")),
                ("c", dir.path().join("4.sock"))
            ]
        );
    }

    #[test]
    fn fd_arguments_are_checked_before_any_is_taken() {
        assert!(matches!(
            from_fd_args(&[1]),
            Err(ActivationError::Standard(1))
        ));
        let err = from_fd_args(&[999_999]).unwrap_err().to_string();
        assert!(
            err.starts_with("--fd 999999: no descriptor 999999 is open"),
            "{err}"
        );
    }
}
