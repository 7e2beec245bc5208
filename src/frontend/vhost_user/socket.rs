//! Socket files for guests: created with the operator's permissions, stale
//! files from a crashed daemon replaced, live ones (another daemon) refused,
//! and removed on shutdown only if they are still ours.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::info;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::unistd::Gid;

/// Who may connect to a guest socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file (e.g. 0o600, or 0o660 with a group).
    pub mode: u32,
    /// Group owning the socket file, e.g. `kvm` or `libvirt-qemu`.
    pub group: Option<Gid>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            group: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: another process is listening on this socket (is another vhost-rng running?)")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: the directory does not exist")]
    NoDirectory { path: PathBuf },
    #[error("{path}: path too long for a Unix socket (at most 107 bytes)")]
    PathTooLong { path: PathBuf },
    #[error("{path}: cannot {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        error: io::Error,
    },
}

fn io_error(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    let path = path.to_owned();
    move |error| SocketError::Io {
        path,
        action,
        error,
    }
}

/// A listening socket file this daemon created.
#[derive(Debug)]
pub struct GuestSocket {
    path: PathBuf,
    listener: UnixListener,
    /// Identity of the file we created, so we never remove a socket another
    /// process put at the same path after us.
    identity: (u64, u64),
}

impl GuestSocket {
    /// Creates the socket file at `path` and listens on it.
    pub fn bind(path: &Path, access: SocketAccess) -> Result<Self, SocketError> {
        remove_if_stale(path)?;
        let listener = bind_with_access(path, access)?;
        let metadata = fs::symlink_metadata(path).map_err(io_error(path, "inspect socket"))?;
        Ok(GuestSocket {
            path: path.to_owned(),
            listener,
            identity: (metadata.dev(), metadata.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the listening socket, for the thread that accepts.
    pub fn try_clone_listener(&self) -> io::Result<UnixListener> {
        self.listener.try_clone()
    }

    /// Removes the socket file if it is still the one we created.
    pub fn remove(&self) {
        let ours = fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.identity)
            .unwrap_or(false);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            log::warn!("{}: cannot remove socket file: {e}", self.path.display());
        }
    }
}

/// Clears the way for a new socket: a leftover socket file nobody listens
/// on is removed; anything else at the path is an error.
fn remove_if_stale(path: &Path) -> Result<(), SocketError> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path, "inspect existing file")(e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("{}: replacing stale socket file", path.display());
            fs::remove_file(path).map_err(io_error(path, "remove stale socket file"))
        }
        Err(e) => Err(io_error(path, "probe existing socket")(e)),
    }
}

/// Binds, sets mode and group, and only then listens, so no client can
/// connect while the file still has the default permissions.
fn bind_with_access(path: &Path, access: SocketAccess) -> Result<UnixListener, SocketError> {
    let address = UnixAddr::new(path).map_err(|_| SocketError::PathTooLong {
        path: path.to_owned(),
    })?;
    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io_error(path, "create socket")(e.into()))?;
    if let Err(e) = socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &address) {
        let parent_missing = path
            .parent()
            .is_some_and(|dir| !dir.as_os_str().is_empty() && !dir.exists());
        return Err(if parent_missing {
            SocketError::NoDirectory {
                path: path.to_owned(),
            }
        } else {
            io_error(path, "bind socket")(e.into())
        });
    }
    let finish = || -> Result<(), SocketError> {
        fs::set_permissions(path, fs::Permissions::from_mode(access.mode))
            .map_err(io_error(path, "set socket permissions"))?;
        if let Some(group) = access.group {
            std::os::unix::fs::chown(path, None, Some(group.as_raw()))
                .map_err(io_error(path, "set socket group"))?;
        }
        socket::listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| io_error(path, "listen on socket")(e.into()))
    };
    if let Err(e) = finish() {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_socket_with_requested_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        let socket = GuestSocket::bind(&path, SocketAccess::default()).unwrap();
        let metadata = fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();

        socket.remove();
        assert!(!path.exists());
    }

    #[test]
    fn applies_group_and_wider_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        let gid = nix::unistd::getegid();
        let access = SocketAccess {
            mode: 0o660,
            group: Some(gid),
        };
        let _socket = GuestSocket::bind(&path, access).unwrap();
        let metadata = fs::symlink_metadata(&path).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
        assert_eq!(metadata.gid(), gid.as_raw());
    }

    #[test]
    fn replaces_stale_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file behind");

        let _socket = GuestSocket::bind(&path, SocketAccess::default()).unwrap();
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn refuses_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();

        let err = GuestSocket::bind(&path, SocketAccess::default()).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("another process is listening"));
    }

    #[test]
    fn refuses_to_replace_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        fs::write(&path, b"keep me").unwrap();

        let err = GuestSocket::bind(&path, SocketAccess::default()).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn missing_directory_and_long_path_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = GuestSocket::bind(&dir.path().join("nope/guest.sock"), SocketAccess::default())
            .unwrap_err();
        assert!(matches!(err, SocketError::NoDirectory { .. }), "{err}");

        let long = dir.path().join("x".repeat(120));
        let err = GuestSocket::bind(&long, SocketAccess::default()).unwrap_err();
        assert!(matches!(err, SocketError::PathTooLong { .. }), "{err}");
    }

    #[test]
    fn remove_leaves_a_replacement_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        let ours = GuestSocket::bind(&path, SocketAccess::default()).unwrap();
        fs::remove_file(&path).unwrap();
        let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();

        ours.remove();
        assert!(path.exists());
    }
}
