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

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use log::debug;

/// Where notifications go, if anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
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
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
                None => SocketAddr::from_pathname(&path),
            };
            match (UnixDatagram::unbound(), address) {
                (Ok(socket), Ok(address)) => Some((socket, address)),
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
        if let Some((socket, address)) = &self.target
            && let Err(e) = socket.send_to_addr(state.as_bytes(), address)
        {
            debug!("cannot notify systemd of {state:?}: {e}");
        }
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
    fn notifications_arrive_as_datagrams_at_a_path_or_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
            relay: None,
            watchdog: None,
        };
        notifier.ready("serving 2 guest(s)");
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving 2 guest(s)");

        let name = format!("vhost-rng-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
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
