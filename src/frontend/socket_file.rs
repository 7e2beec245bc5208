// SPDX-License-Identifier: Apache-2.0
//! Socket files for guests: created with the operator's permissions, stale
//! files from a crashed daemon replaced, live ones (another daemon) refused,
//! and removed on shutdown only if they are still ours.
//!
//! Every socket file the daemon makes (guest sockets, EGD and hybrid vsock
//! sockets, the control socket) is made here: in a private directory next
//! to its path, given its mode and group there, and renamed into place, so
//! that nobody who can write the directory can redirect the chmod or chown
//! to another file with a symlink.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::info;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat, renameat};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{FchmodatFlags, Mode, fchmodat, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, UnlinkatFlags, fchownat, geteuid, unlinkat};

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

/// Why a socket file could not be made, or its path not cleared for one.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process listens on the socket at `path` (another daemon,
    /// most likely); it is left alone.
    #[allow(missing_docs)] // its one field, `path`: the socket file's path
    #[error("{path}: another process is listening on this socket (is another vhost-rng running?)")]
    InUse { path: PathBuf },
    /// Something other than a socket is at `path`; the daemon never
    /// replaces it.
    #[allow(missing_docs)] // its one field, `path`: the socket file's path
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    /// The directory `path` would be in does not exist; the daemon does not
    /// create it.
    #[allow(missing_docs)] // its one field, `path`: the socket file's path
    #[error("{path}: the directory does not exist")]
    NoDirectory { path: PathBuf },
    /// `path` does not fit in a Unix socket address (108 bytes), or the
    /// private directory the socket is made in next to it would not.
    #[allow(missing_docs)] // its one field, `path`: the socket file's path
    #[error("{path}: path too long for a Unix socket (at most 107 bytes)")]
    PathTooLong { path: PathBuf },
    /// Something other than a FIFO is at the path of a `fifo=` guest; the
    /// daemon never replaces it.
    #[allow(missing_docs)] // its one field, `path`: the FIFO's path
    #[error("{path}: exists and is not a FIFO (named pipe); refusing to use it")]
    NotAFifo { path: PathBuf },
    /// A system call on the way failed.
    #[error("{path}: cannot {action}: {error}")]
    Io {
        /// The socket file's path.
        path: PathBuf,
        /// What was being done ("bind socket", "set socket group", ...).
        action: &'static str,
        /// The error from the operating system.
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
    /// Made by someone else (systemd's socket unit, a parent passing
    /// `--fd`): its file is theirs to remove, never ours.
    foreign: bool,
}

impl GuestSocket {
    /// Creates the socket file at `path` and listens on it.
    pub fn bind(path: &Path, access: SocketAccess) -> Result<Self, SocketError> {
        remove_if_stale(path)?;
        let (listener, identity) = bind_with_access(path, access)?;
        Ok(GuestSocket {
            path: path.to_owned(),
            listener,
            identity,
            foreign: false,
        })
    }

    /// Takes over a listening socket a previous daemon created at `path`
    /// and handed over (an in-place upgrade), or one systemd or a parent
    /// passed (socket activation, `--fd`). It must still be a listening
    /// Unix socket, and the file at `path` a socket. A socket this daemon
    /// made is bound in the private directory it was created in, never at
    /// `path` itself; one bound at `path` was made by someone else, and its
    /// file is left in place when the guest goes.
    pub fn adopt(path: &Path, listener: OwnedFd) -> Result<Self, SocketError> {
        let listening = socket::getsockopt(&listener, socket::sockopt::AcceptConn)
            .map_err(|e| io_error(path, "inspect handed-over socket")(e.into()))?;
        let bound = socket::getsockname::<UnixAddr>(listener.as_raw_fd()).ok();
        let unix = bound.is_some();
        let foreign = bound
            .as_ref()
            .and_then(|address| address.path())
            .is_some_and(|bound| bound == path);
        if !listening || !unix {
            return Err(SocketError::Io {
                path: path.to_owned(),
                action: "take over the socket",
                error: io::Error::other(
                    "the handed-over descriptor is not a listening Unix socket",
                ),
            });
        }
        let metadata = fs::symlink_metadata(path).map_err(io_error(path, "inspect socket file"))?;
        if !metadata.file_type().is_socket() {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(GuestSocket {
            path: path.to_owned(),
            listener: UnixListener::from(listener),
            identity: (metadata.dev(), metadata.ino()),
            foreign,
        })
    }

    /// The socket file's path, as given to [`GuestSocket::bind`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A duplicate of the listening socket, to hand over in an upgrade.
    pub fn duplicate(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned()
    }

    /// The listening socket, for the loop that accepts on it.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// A second handle on the listening socket, for the thread that accepts.
    pub fn try_clone_listener(&self) -> io::Result<UnixListener> {
        self.listener.try_clone()
    }

    /// Removes the socket file if it is still the one we created (never
    /// one someone else made and passed to us).
    pub fn remove(&self) {
        if self.foreign {
            return;
        }
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

/// The name of the socket inside its private directory: one byte, so the
/// temporary path is as short as it can be.
const PRIVATE_NAME: &str = "s";

/// Binds the socket, sets its mode and group and listens, all inside a
/// private directory next to `path`, then renames it onto `path`; returns
/// the listener and the (device, inode) of the file now at `path`.
///
/// Nothing here touches `path` by name but the rename. Binding at `path`
/// and then calling chmod/chown on it would follow a symlink someone with
/// write access to the directory swapped in meanwhile, and hand them the
/// mode and group of a file of their choice. Inside a directory only we
/// can enter nobody can swap anything, and `rename` replaces whatever is at
/// `path` by then (a symlink included) instead of following it. The
/// private directory is used through a descriptor, so renaming it does not
/// redirect anything either. Clients can only reach the socket once it has
/// its final permissions.
fn bind_with_access(
    path: &Path,
    access: SocketAccess,
) -> Result<(UnixListener, (u64, u64)), SocketError> {
    // The operator's path must fit: clients connect to it.
    UnixAddr::new(path).map_err(|_| SocketError::PathTooLong {
        path: path.to_owned(),
    })?;
    let (parent_fd, name) = open_parent(path, "socket")?;
    let parent = parent_of(path);
    let private = PrivateDir::create(&parent_fd).map_err(io_error(
        path,
        "create a private directory next to the socket",
    ))?;

    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io_error(path, "create socket")(e.into()))?;
    let address = private
        .socket_address(parent)
        .map_err(|_| SocketError::PathTooLong {
            path: path.to_owned(),
        })?;
    socket::bind(fd.as_raw_fd(), &address).map_err(|e| io_error(path, "bind socket")(e.into()))?;
    // Through the directory's descriptor: if the socket is not in our
    // directory (someone renamed it and put theirs in its place before
    // bind), these fail rather than act on theirs.
    private.give(access, path, "socket")?;
    socket::listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| io_error(path, "listen on socket")(e.into()))?;
    // Taken before the rename, which keeps device and inode: looked up at
    // `path` afterwards it could already be someone else's file.
    let stat = fstatat(&private.fd, PRIVATE_NAME, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| io_error(path, "inspect socket")(e.into()))?;
    renameat(&private.fd, PRIVATE_NAME, &parent_fd, name)
        .map_err(|e| io_error(path, "move the socket into place")(e.into()))?;
    // `private` is dropped here, removing the now empty directory.
    Ok((UnixListener::from(fd), (stat.st_dev, stat.st_ino)))
}

/// The directory `path` names its file in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The directory `path` is in, opened, and the file name in it; `what`
/// (`socket`, `FIFO`) names the file in errors.
fn open_parent<'p>(
    path: &'p Path,
    what: &'static str,
) -> Result<(OwnedFd, &'p std::ffi::OsStr), SocketError> {
    let name = path.file_name().ok_or_else(|| SocketError::Io {
        path: path.to_owned(),
        action: if what == "socket" {
            "bind socket"
        } else {
            "create FIFO"
        },
        error: io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path does not end in a file name",
        ),
    })?;
    let parent_fd = open(
        parent_of(path),
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ENOENT => SocketError::NoDirectory {
            path: path.to_owned(),
        },
        e => SocketError::Io {
            path: path.to_owned(),
            action: if what == "socket" {
                "open the socket's directory"
            } else {
                "open the FIFO's directory"
            },
            error: e.into(),
        },
    })?;
    Ok((parent_fd, name))
}

/// The named pipe at `path`, opened for reading and writing (non-blocking,
/// close-on-exec), with its identity (device, inode): an existing FIFO is
/// used as it is (a VMM may have it open: that is the point of leaving it
/// in place when the daemon stops), a missing one is made like a socket
/// file (in a private directory, given its mode and group there, then
/// moved into place without replacing anything). Anything else at `path`
/// is refused, and a symlink is never followed.
pub fn open_fifo(path: &Path, access: SocketAccess) -> Result<Fifo, SocketError> {
    let (parent_fd, name) = open_parent(path, "FIFO")?;
    let flags = OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let not_a_fifo = || SocketError::NotAFifo {
        path: path.to_owned(),
    };
    let checked = |fd: OwnedFd, created: bool| {
        let mut fifo = Fifo::from_fd(fd).map_err(|e| match e {
            FifoFdError::NotAFifo => not_a_fifo(),
            FifoFdError::Io(e) => io_error(path, "inspect FIFO")(e),
        })?;
        fifo.created = created;
        Ok(fifo)
    };
    // Twice at most: a FIFO someone else makes between our look and our
    // rename is then found and used.
    for _ in 0..2 {
        match fstatat(&parent_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) if stat.st_mode & libc::S_IFMT == libc::S_IFIFO => {
                let fd = openat(&parent_fd, name, flags, Mode::empty())
                    .map_err(|e| io_error(path, "open FIFO")(e.into()))?;
                return checked(fd, false);
            }
            Ok(_) => return Err(not_a_fifo()),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(io_error(path, "inspect FIFO")(e.into())),
        }
        let private = PrivateDir::create(&parent_fd).map_err(io_error(
            path,
            "create a private directory next to the FIFO",
        ))?;
        nix::unistd::mkfifoat(&private.fd, PRIVATE_NAME, Mode::S_IRUSR | Mode::S_IWUSR)
            .map_err(|e| io_error(path, "create FIFO")(e.into()))?;
        private.give(access, path, "FIFO")?;
        let fd = openat(&private.fd, PRIVATE_NAME, flags, Mode::empty())
            .map_err(|e| io_error(path, "open FIFO")(e.into()))?;
        match nix::fcntl::renameat2(
            &private.fd,
            PRIVATE_NAME,
            &parent_fd,
            name,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return checked(fd, true),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(io_error(path, "move the FIFO into place")(e.into())),
        }
    }
    Err(io_error(path, "create FIFO")(io::Error::other(
        "the path keeps changing under the daemon",
    )))
}

/// A `fifo=` guest's pipe, open for reading and writing.
#[derive(Debug)]
pub struct Fifo {
    /// The pipe.
    pub fd: OwnedFd,
    /// Its device and inode.
    pub identity: (u64, u64),
    /// Made just now (not found in place).
    pub created: bool,
}

/// Why a descriptor is no FIFO to serve.
#[derive(Debug)]
pub enum FifoFdError {
    /// It is something else.
    NotAFifo,
    /// fstat failed.
    Io(io::Error),
}

impl Fifo {
    /// A pipe handed over (an upgrade, a restart of the serving process).
    pub fn from_fd(fd: OwnedFd) -> Result<Fifo, FifoFdError> {
        let stat = fstat(&fd).map_err(|e| FifoFdError::Io(e.into()))?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return Err(FifoFdError::NotAFifo);
        }
        Ok(Fifo {
            fd,
            identity: (stat.st_dev, stat.st_ino),
            created: false,
        })
    }
}

/// Removes the FIFO at `path` if it is still the one with `identity`.
pub fn remove_fifo(path: &Path, identity: (u64, u64)) {
    let ours = fs::symlink_metadata(path)
        .map(|m| m.file_type().is_fifo() && (m.dev(), m.ino()) == identity)
        .unwrap_or(false);
    if ours && let Err(e) = fs::remove_file(path) {
        log::warn!("{}: cannot remove FIFO: {e}", path.display());
    }
}

/// A directory only this process's user can enter, made next to a socket's
/// final path for [`bind_with_access`]; removed with whatever is left in it
/// when dropped, on success and on every error alike.
struct PrivateDir<'a> {
    parent: &'a OwnedFd,
    name: String,
    fd: OwnedFd,
}

impl<'a> PrivateDir<'a> {
    /// Tries a few random names, in case one is taken.
    fn create(parent: &'a OwnedFd) -> io::Result<Self> {
        let mut attempts = 0;
        loop {
            let mut random = [0u8; 4];
            getrandom::fill(&mut random)?;
            // Short, so the socket's temporary path is rarely longer than
            // a Unix socket address allows (see `socket_address`).
            let name = format!(".vrng-{:08x}", u32::from_ne_bytes(random));
            match mkdirat(parent, name.as_str(), Mode::S_IRWXU) {
                Ok(()) => return Self::open(parent, name),
                Err(Errno::EEXIST) if attempts < 8 => attempts += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Opens the directory just made, checking it is still the one made:
    /// not a symlink, and ours alone.
    fn open(parent: &'a OwnedFd, name: String) -> io::Result<Self> {
        let opened = openat(
            parent,
            name.as_str(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => {
                let _ = unlinkat(parent, name.as_str(), UnlinkatFlags::RemoveDir);
                return Err(e.into());
            }
        };
        let dir = PrivateDir { parent, name, fd };
        let stat = fstat(&dir.fd)?;
        if stat.st_uid != geteuid().as_raw() || stat.st_mode & 0o077 != 0 {
            return Err(io::Error::other(
                "the new directory was replaced by someone else's",
            ));
        }
        Ok(dir)
    }

    /// Gives the file made here its mode and group, through the
    /// directory's descriptor: if it is not in our directory (someone
    /// renamed it and put theirs in its place), this fails rather than act
    /// on theirs. `what` (`socket`, `FIFO`) names it in errors.
    fn give(&self, access: SocketAccess, path: &Path, what: &str) -> Result<(), SocketError> {
        let failed = |action: &'static str| {
            let path = path.to_owned();
            move |e: Errno| SocketError::Io {
                path,
                action,
                error: e.into(),
            }
        };
        let socket = what == "socket";
        fchmodat(
            &self.fd,
            PRIVATE_NAME,
            Mode::from_bits_truncate(access.mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(failed(if socket {
            "set socket permissions"
        } else {
            "set FIFO permissions"
        }))?;
        if let Some(group) = access.group {
            fchownat(
                &self.fd,
                PRIVATE_NAME,
                None,
                Some(group),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(failed(if socket {
                "set socket group"
            } else {
                "set FIFO group"
            }))?;
        }
        Ok(())
    }

    /// The address to bind: the socket's path inside this directory or,
    /// if that is too long for a Unix socket address (the operator's path
    /// fits, but this one is longer), the same place reached through
    /// /proc/self/fd, which is short whatever the directory.
    fn socket_address(&self, parent: &Path) -> nix::Result<UnixAddr> {
        let direct = parent.join(&self.name).join(PRIVATE_NAME);
        UnixAddr::new(&direct).or_else(|_| {
            let through_fd = format!("/proc/self/fd/{}/{PRIVATE_NAME}", self.fd.as_raw_fd());
            UnixAddr::new(through_fd.as_str())
        })
    }
}

impl Drop for PrivateDir<'_> {
    fn drop(&mut self) {
        // The socket is still here only if something failed before the
        // rename. Nothing else can be: nobody else can write here.
        let _ = unlinkat(&self.fd, PRIVATE_NAME, UnlinkatFlags::NoRemoveDir);
        // By name, but removing a directory takes an empty one: if someone
        // swapped ours for theirs, at worst their empty directory goes.
        if let Err(e) = unlinkat(self.parent, self.name.as_str(), UnlinkatFlags::RemoveDir) {
            log::warn!("cannot remove the temporary directory {}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A group to give sockets that is not the one they get anyway, so
    /// that a test can see it was set; needs root (otherwise our own).
    fn other_group() -> Gid {
        if geteuid().is_root() {
            Gid::from_raw(4242)
        } else {
            nix::unistd::getegid()
        }
    }

    /// The names in `dir`, sorted.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

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
        let gid = other_group();
        let access = SocketAccess {
            mode: 0o660,
            group: Some(gid),
        };
        let socket = GuestSocket::bind(&path, access).unwrap();
        let metadata = fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
        assert_eq!(metadata.gid(), gid.as_raw());
        UnixStream::connect(&path).unwrap();
        // The private directory it was made in is gone.
        assert_eq!(entries(dir.path()), ["guest.sock"]);
        socket.remove();
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn a_symlink_swapped_in_before_the_socket_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim_dir = tempfile::tempdir().unwrap();
        let victim = victim_dir.path().join("shadow");
        fs::write(&victim, b"secret").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let before = fs::metadata(&victim).unwrap();
        let path = dir.path().join("guest.sock");
        // What an attacker with write access to the directory plants after
        // the daemon checked the path and before it creates the socket:
        // bind_with_access is the part that runs after the check.
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let gid = other_group();
        let access = SocketAccess {
            mode: 0o660,
            group: Some(gid),
        };

        let (_listener, identity) = bind_with_access(&path, access).unwrap();

        let metadata = fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket(), "the link was replaced");
        assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
        assert_eq!(metadata.gid(), gid.as_raw());
        assert_eq!(identity, (metadata.dev(), metadata.ino()));
        UnixStream::connect(&path).unwrap();
        let after = fs::metadata(&victim).unwrap();
        assert_eq!(after.permissions().mode(), before.permissions().mode());
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        assert_eq!(fs::read(&victim).unwrap(), b"secret");
        assert_eq!(entries(dir.path()), ["guest.sock"]);
    }

    #[test]
    fn a_symlink_already_there_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("guest.sock");
        std::os::unix::fs::symlink(&victim, &path).unwrap();

        let err = GuestSocket::bind(&path, SocketAccess::default()).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert!(fs::symlink_metadata(&path).unwrap().is_symlink());
        let metadata = fs::metadata(&victim).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    }

    #[test]
    fn a_path_that_fits_works_even_if_the_temporary_one_would_not() {
        let dir = tempfile::tempdir().unwrap();
        // 107 bytes in all, the most an address holds; the socket's path
        // in its private directory is longer.
        let base = dir.path().as_os_str().len();
        let sub = dir
            .path()
            .join("d".repeat(107 - base - "/g.sock".len() - 1));
        fs::create_dir(&sub).unwrap();
        let path = sub.join("g.sock");
        assert_eq!(path.as_os_str().len(), 107);

        let socket = GuestSocket::bind(&path, SocketAccess::default()).unwrap();
        let metadata = fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        assert_eq!(entries(&sub), ["g.sock"]);
        socket.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_failed_bind_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        // A directory where the socket should go: the rename fails.
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"").unwrap();

        let err = bind_with_access(&path, SocketAccess::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot move the socket into place"),
            "{err}"
        );
        assert_eq!(entries(dir.path()), ["guest.sock"]);
        assert_eq!(entries(&path), ["inside"]);
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
        assert!(
            matches!(&err, SocketError::PathTooLong { path } if *path == long),
            "{err}"
        );
        assert!(entries(dir.path()).is_empty());
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
