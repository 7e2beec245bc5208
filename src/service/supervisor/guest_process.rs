// SPDX-License-Identifier: Apache-2.0
//! Guest processes (`--isolation guest`): the top process starts one per
//! vhost-user guest when the serving process asks ([`super::Report::StartGuest`]),
//! holds what it reports (its listening socket, its VMM connection), and
//! starts it again alone when it dies, with its VMM connection kept.
//!
//! A guest process is the same binary with [`GUEST_PROCESS_ENV`] naming
//! its end of a report socket of its own; [`LINK_ENV`] names its end of
//! the entropy link and the wake eventfd (see
//! [`crate::frontend::vhost_user::remote_supply`]), which the serving
//! process made and the top process keeps across restarts. A report from
//! a guest process is believed about its own guest only: its name, spec,
//! counters and tokens are the top process's.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::{Held, RESTARTS_ENV, WORKER_ENV};
use crate::service::fd_store;
use crate::service::upgrade::{self, DaemonState, GuestState, UPGRADE_STATE_VERSION};

/// Names a guest process's end of its report socket.
pub const GUEST_PROCESS_ENV: &str = "VHOST_RNG_GUEST_PROCESS";
/// `LINK,WAKE`: a guest process's end of the entropy link and the wake
/// eventfd.
pub const LINK_ENV: &str = "VHOST_RNG_ENTROPY_LINK";

/// Whether this process is a guest process.
pub fn is_guest_process() -> bool {
    std::env::var_os(GUEST_PROCESS_ENV).is_some()
}

/// One guest's process as the top process runs it.
pub(super) struct GuestProcess {
    pub(super) pid: Option<Pid>,
    /// The top process's end of its report socket.
    pub(super) reports: OwnedFd,
    /// The guest process's end, given to each one started.
    theirs: OwnedFd,
    link: OwnedFd,
    wake: OwnedFd,
    /// The guest's spec and whether it was added at runtime, as the
    /// serving process said.
    pub(super) spec: String,
    runtime: bool,
    started: Instant,
    backoff: Duration,
    /// When to start it again after a quick death.
    pub(super) restart_at: Option<Instant>,
}

/// Every guest process, by guest name.
#[derive(Default)]
pub(super) struct GuestProcesses {
    pub(super) by_name: BTreeMap<String, GuestProcess>,
}

impl GuestProcesses {
    /// Starts (or, with a new link from a new serving process, starts
    /// again) `name`'s guest process. `fds`: the link, the wake eventfd,
    /// and the listening socket for `socket=` guests.
    pub(super) fn start(
        &mut self,
        binary: &Path,
        args: &[std::ffi::OsString],
        held: &mut BTreeMap<String, Held>,
        (name, spec, runtime): (String, String, bool),
        fds: Vec<OwnedFd>,
    ) {
        let mut fds = fds.into_iter();
        let (Some(link), Some(wake)) = (fds.next(), fds.next()) else {
            warn!("guest {name}: the serving process asked for a guest process without its link");
            return;
        };
        let listener = fds.next();
        if let Some(old) = self.by_name.remove(&name) {
            // A new serving process: the old link is dead.
            old.end();
        }
        // What the top process holds for it (a restart, systemd's store)
        // goes on; otherwise the serving process's socket.
        let keep = held.get(&name).is_some_and(|h| h.state.spec == spec);
        if !keep {
            held.insert(
                name.clone(),
                Held {
                    state: GuestState {
                        spec: spec.clone(),
                        runtime,
                        activated: false,
                        listener: listener.as_ref().map(|_| 0),
                        connection: None,
                        clients: Vec::new(),
                        tokens: None,
                        counters: upgrade::Counters::default(),
                    },
                    fds: listener.into_iter().collect(),
                },
            );
        }
        let (reports, theirs) = match socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(pair) => pair,
            Err(e) => {
                warn!("guest {name}: cannot start its guest process: {e}");
                return;
            }
        };
        let mut process = GuestProcess {
            pid: None,
            reports,
            theirs,
            link,
            wake,
            spec,
            runtime,
            started: Instant::now(),
            backoff: super::backoff_bounds().0,
            restart_at: None,
        };
        process.spawn(binary, args, &name, held.get(&name));
        self.by_name.insert(name, process);
    }

    /// The guest is no longer served: its process ends.
    pub(super) fn stop(&mut self, name: &str) {
        if let Some(process) = self.by_name.remove(name) {
            process.end();
        }
    }

    /// Ends every guest process (the daemon stops).
    pub(super) fn stop_all(&mut self) {
        for (_, process) in std::mem::take(&mut self.by_name) {
            process.end();
        }
    }

    /// Reaps guest processes that died and starts them again (at once, or
    /// after a delay if they keep dying).
    pub(super) fn reap(
        &mut self,
        binary: &Path,
        args: &[std::ffi::OsString],
        held: &BTreeMap<String, Held>,
    ) {
        for (name, process) in &mut self.by_name {
            let Some(pid) = process.pid else {
                continue;
            };
            let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
                Ok(WaitStatus::Signaled(_, signal, _)) => format!("was killed by {signal}"),
                _ => continue,
            };
            process.pid = None;
            let lived = process.started.elapsed();
            let delay = if lived >= super::STABLE {
                process.backoff = super::backoff_bounds().0;
                Duration::ZERO
            } else {
                let delay = process.backoff;
                process.backoff = (process.backoff * 2).min(super::backoff_bounds().1);
                delay
            };
            warn!(
                "guest {name}: its guest process {status} after {:.1} s; starting another in \
                 {delay:?}, its VMM connection kept",
                lived.as_secs_f64()
            );
            if delay.is_zero() {
                process.spawn(binary, args, name, held.get(name));
            } else {
                process.restart_at = Some(Instant::now() + delay);
            }
        }
    }

    /// Starts the guest processes whose delay is over; how long until the
    /// next one is due.
    pub(super) fn restart_due(
        &mut self,
        binary: &Path,
        args: &[std::ffi::OsString],
        held: &BTreeMap<String, Held>,
    ) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        for (name, process) in &mut self.by_name {
            match process.restart_at {
                Some(at) if at <= now => {
                    process.restart_at = None;
                    process.spawn(binary, args, name, held.get(name));
                }
                Some(at) => {
                    let wait = at - now;
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                }
                None => {}
            }
        }
        next
    }

    /// Takes a guest process's report about its own guest into `held`
    /// (its descriptors with it); anything else it says is ignored.
    pub(super) fn accept(
        &self,
        name: &str,
        mut state: GuestState,
        held: Option<&Held>,
    ) -> Option<GuestState> {
        let process = self.by_name.get(name)?;
        state.spec = process.spec.clone();
        state.runtime = process.runtime;
        state.activated = false;
        state.clients = Vec::new();
        // Counters and tokens are the serving process's.
        state.counters = held.map(|h| h.state.counters.clone()).unwrap_or_default();
        state.tokens = None;
        Some(state)
    }
}

impl GuestProcess {
    fn end(self) {
        if let Some(pid) = self.pid {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }

    /// Starts the process with what the top process holds for its guest.
    fn spawn(
        &mut self,
        binary: &Path,
        args: &[std::ffi::OsString],
        name: &str,
        held: Option<&Held>,
    ) {
        match self.try_spawn(binary, args, held) {
            Ok(pid) => {
                info!("guest {name}: guest process {pid} started");
                self.pid = Some(pid);
                self.started = Instant::now();
            }
            Err(e) => {
                warn!("guest {name}: cannot start its guest process: {e}; retrying");
                self.restart_at = Some(Instant::now() + super::backoff_bounds().1);
            }
        }
    }

    fn try_spawn(
        &self,
        binary: &Path,
        args: &[std::ffi::OsString],
        held: Option<&Held>,
    ) -> std::io::Result<Pid> {
        let mut inherit = vec![
            self.theirs.as_raw_fd(),
            self.link.as_raw_fd(),
            self.wake.as_raw_fd(),
        ];
        let mut guests = Vec::new();
        if let Some(held) = held {
            guests.push(held.for_child(&mut inherit, false));
        }
        let record = DaemonState {
            version: UPGRADE_STATE_VERSION,
            written_by: env!("CARGO_PKG_VERSION").into(),
            started_at: 0,
            upgrades: 0,
            guests,
            shared: Vec::new(),
        };
        let memfd = upgrade::write_record(&record)?;
        inherit.push(memfd.as_raw_fd());
        let mut command = Command::new(binary);
        command.args(args);
        command.env(GUEST_PROCESS_ENV, self.theirs.as_raw_fd().to_string());
        command.env(
            LINK_ENV,
            format!("{},{}", self.link.as_raw_fd(), self.wake.as_raw_fd()),
        );
        command.env(upgrade::STATE_ENV, memfd.as_raw_fd().to_string());
        for variable in [
            WORKER_ENV,
            RESTARTS_ENV,
            "NOTIFY_SOCKET",
            "WATCHDOG_PID",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            fd_store::KEEPS_CONNECTIONS_ENV,
        ] {
            command.env_remove(variable);
        }
        // A guest process goes when the top process does.
        super::inherit_into_child(&mut command, inherit, libc::SIGKILL);
        let child = command.spawn()?;
        Ok(Pid::from_raw(child.id() as i32))
    }
}
