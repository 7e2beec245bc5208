// SPDX-License-Identifier: Apache-2.0
//! systemd's service notifications (sd_notify(3)), for `Type=notify` units:
//! `READY=1` once every socket exists, so units ordered after vhost-rng
//! (libvirt, VMs) find their sockets; `STATUS=` lines; `RELOADING=1` around
//! a SIGHUP reload; `STOPPING=1`; and `WATCHDOG=1` pings when the unit sets
//! `WatchdogSec=`.
//!
//! The protocol is one datagram per notification to the socket named in
//! `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), so it is
//! written here rather than linking libsystemd. Without `$NOTIFY_SOCKET`
//! (not run by systemd) every call does nothing. Relies only on what
//! systemd has accepted since version 209 (READY, STATUS, STOPPING,
//! WATCHDOG, WATCHDOG_USEC) and 253 (RELOADING with MONOTONIC_USEC, which
//! older versions ignore).
//!
//! The file descriptor store (`FDSTORE=1` with `FDNAME=`, since systemd
//! 233; `FDSTOREREMOVE=1`, since 236) and the descriptors systemd passes
//! back on start (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, since 227)
//! are here too; what the daemon keeps there is [`super::fd_store`].

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use log::{debug, warn};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Where notifications go, if anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, UnixAddr)>,
    /// A serving process passes them to its top process instead.
    relay: Option<std::sync::Arc<crate::service::supervisor::WorkerLink>>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier systemd asked for through the environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let target = socket.and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let address = match path.strip_prefix('@') {
                Some(name) => UnixAddr::new_abstract(name.as_bytes()),
                None => UnixAddr::new(path.as_str()),
            }
            .map_err(std::io::Error::from);
            match (UnixDatagram::unbound(), address) {
                (Ok(socket), Ok(address)) => {
                    // A service manager that stopped reading must not hold
                    // the daemon up.
                    let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
                    Some((socket, address))
                }
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("NOTIFY_SOCKET={path}: cannot notify systemd: {e}");
                    None
                }
            }
        });
        Notifier {
            target,
            relay: None,
            watchdog,
        }
    }

    /// A serving process's notifier: every notification goes to the top
    /// process, which passes it to systemd.
    pub fn relayed(link: std::sync::Arc<crate::service::supervisor::WorkerLink>) -> Notifier {
        Notifier {
            relay: Some(link),
            ..Notifier::from_env()
        }
    }

    /// A notifier sending to the datagram socket at `path` (tests).
    #[cfg(test)]
    pub fn to_path(path: &std::path::Path) -> Notifier {
        Notifier {
            target: Some((
                UnixDatagram::unbound().expect("a datagram socket"),
                UnixAddr::new(path).expect("a socket path"),
            )),
            relay: None,
            watchdog: None,
        }
    }

    /// A notifier that sends nothing (tests, and runs outside systemd).
    pub fn none() -> Notifier {
        Notifier {
            target: None,
            relay: None,
            watchdog: None,
        }
    }

    /// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec=`.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state`, newline-separated `KEY=VALUE` assignments.
    pub fn notify(&self, state: &str) {
        if let Some(link) = &self.relay {
            link.send(
                &crate::service::supervisor::Report::Notify {
                    state: state.to_owned(),
                },
                &[],
            );
            return;
        }
        if let Err(e) = self.send(state, &[]) {
            debug!("cannot notify systemd of {state:?}: {e}");
        }
    }

    /// Whether notifications reach systemd from this process (not relayed,
    /// not disabled).
    pub fn is_direct(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` with `fds` attached (for `FDSTORE=1`) without
    /// waiting: a full queue is an error (`EAGAIN`) for the caller to retry
    /// later.
    pub fn send_now(&self, state: &str, fds: &[RawFd]) -> nix::Result<()> {
        self.send_with(state, fds, MsgFlags::MSG_DONTWAIT)
    }

    /// Sends `state` with `fds` attached, waiting up to a second for room.
    fn send(&self, state: &str, fds: &[RawFd]) -> nix::Result<()> {
        self.send_with(state, fds, MsgFlags::empty())
    }

    fn send_with(&self, state: &str, fds: &[RawFd], flags: MsgFlags) -> nix::Result<()> {
        let Some((socket, address)) = &self.target else {
            return Ok(());
        };
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg(
            socket.as_raw_fd(),
            &[IoSlice::new(state.as_bytes())],
            cmsgs,
            flags,
            Some(address),
        )
        .map(drop)
    }

    /// `READY=1` with `status` as the `STATUS=` line: start-up is over and
    /// every socket exists.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// A `STATUS=` line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={status}"));
    }

    /// `RELOADING=1` with the monotonic clock's time, as a reload begins;
    /// [`Notifier::ready`] ends it.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }

    /// `STOPPING=1`, as the daemon begins to stop.
    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    /// A `WATCHDOG=1` ping; see [`Notifier::watchdog_interval`].
    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

/// The descriptors systemd passed to this process on start (from its file
/// descriptor store or its socket units), each with its `FDNAME`
/// (`"unknown"` where systemd gave none). The variables are removed, so
/// that nothing this process starts takes them for its own; descriptors
/// meant for another process (`LISTEN_PID` not ours) are left alone.
pub fn listen_fds() -> Vec<(String, OwnedFd)> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: called at start-up, before the process starts any thread.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        std::env::remove_var("LISTEN_PIDFDID");
    }
    let Some(count) = passed_count(pid.as_deref(), count.as_deref(), std::process::id()) else {
        return Vec::new();
    };
    let mut names = names.as_deref().unwrap_or("").split(':');
    (0..count)
        .map(|i| {
            let fd = LISTEN_FDS_START + i;
            // SAFETY: systemd passed descriptors LISTEN_FDS_START onwards to
            // this process (LISTEN_PID is ours); nothing else owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Err(e) = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            ) {
                warn!("descriptor {} from systemd: {e}", fd.as_raw_fd());
            }
            let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
            (name.to_owned(), fd)
        })
        .collect()
}

/// How many descriptors systemd passed, if they are meant for `own_pid`.
fn passed_count(pid: Option<&str>, count: Option<&str>, own_pid: u32) -> Option<RawFd> {
    if pid?.parse::<u32>().ok()? != own_pid {
        return None;
    }
    // More than this cannot be real: the store's size is bounded by the
    // unit's FileDescriptorStoreMax= and the process's descriptor limit.
    count?
        .parse::<RawFd>()
        .ok()
        .filter(|&n| (1..=1 << 20).contains(&n))
}

/// Half of `WATCHDOG_USEC` when it is meant for this process (systemd sets
/// `WATCHDOG_PID` to the main process; a child that inherited the variables
/// must not ping for it).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_the_unit_interval_for_this_process_only() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn passed_descriptors_count_only_for_the_process_they_were_meant_for() {
        assert_eq!(passed_count(Some("7"), Some("3"), 7), Some(3));
        assert_eq!(passed_count(Some("8"), Some("3"), 7), None);
        assert_eq!(passed_count(None, Some("3"), 7), None);
        assert_eq!(passed_count(Some("7"), None, 7), None);
        assert_eq!(passed_count(Some("7"), Some("0"), 7), None);
        assert_eq!(passed_count(Some("7"), Some("-2"), 7), None);
        assert_eq!(passed_count(Some("7"), Some("many"), 7), None);
        assert_eq!(passed_count(Some("7"), Some("99999999"), 7), None);
    }

    #[test]
    fn notifications_arrive_as_datagrams_at_a_path_or_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                UnixAddr::new(&path).unwrap(),
            )),
            relay: None,
            watchdog: None,
        };
        notifier.ready("serving 2 guest(s)");
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving 2 guest(s)");

        let name = format!("vhost-rng-test-{}", std::process::id());
        let receiver = {
            use std::os::linux::net::SocketAddrExt;
            UnixDatagram::bind_addr(
                &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
            )
            .unwrap()
        };
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                UnixAddr::new_abstract(name.as_bytes()).unwrap(),
            )),
            relay: None,
            watchdog: None,
        };
        notifier.stopping();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        Notifier::none().stopping();
    }
}
