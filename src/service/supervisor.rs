// SPDX-License-Identifier: Apache-2.0
//! Crash survival: `vhost-rng serve` is a small top process that holds
//! every guest's descriptors and serves nothing itself; a child process
//! (the worker, the same binary) maps guest memory and serves the guests.
//!
//! The worker tells the top process, after every change, what each guest
//! holds ([`GuestState`]: its listening socket, its VMM connection with the
//! negotiated vhost-user state and the descriptors it needs, its EGD or
//! channel clients), passing duplicates of those descriptors. When the
//! worker dies (a bug, a signal, the OOM killer), the top process starts a
//! new one and hands it all of that exactly as an in-place upgrade would
//! ([`super::upgrade`]): VMMs keep their connections and never see a
//! disconnect, rings resume at the used index (a request the dead worker
//! took and did not answer is answered now), token buckets start empty (a
//! crash loop never hands out extra bytes), DRBGs are reseeded. A worker
//! that keeps dying is restarted after 1 s, then 2, 4, ... up to 30 s.
//!
//! The top process parses nothing a guest or VMM sends and maps no guest
//! memory: it reads the worker's JSON records and keeps descriptors. Run
//! by systemd, it also keeps them in systemd's file descriptor store
//! ([`super::fd_store`]), so that a new top process gets them back.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::process::ExitStatus;

use super::activation;
use super::fd_store::{self, FdStore};
use super::systemd::{self, Notifier};
use super::upgrade::{self, DaemonState, GuestState, UPGRADE_STATE_VERSION};

mod guest_process;
mod handoff;
mod leftovers;
pub use guest_process::{GUEST_PROCESS_ENV, LINK_ENV, is_guest_process};
pub use handoff::{Verdict, check_through_top, upgrade_through_top};

/// The variable that makes `vhost-rng serve` a worker; it names the
/// worker's end of the socket to the top process.
pub const WORKER_ENV: &str = "VHOST_RNG_WORKER";
/// Restarts so far and the last cause, for the worker's status.
pub const RESTARTS_ENV: &str = "VHOST_RNG_WORKER_RESTARTS";

/// Most descriptors one record carries: the kernel passes at most 253 in
/// one message.
const MAX_FDS: usize = 250;
/// Largest record (a guest with hundreds of memory regions stays far below).
const MAX_RECORD: usize = 256 * 1024;
/// A worker that lived at least this long had no crash loop.
const STABLE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Tests set every restart delay to this many milliseconds, so that a
/// hundred kills do not take an hour.
pub const TEST_BACKOFF_ENV: &str = "VHOST_RNG_TEST_RESTART_BACKOFF_MS";

/// The first and the largest restart delay.
fn backoff_bounds() -> (Duration, Duration) {
    match std::env::var(TEST_BACKOFF_ENV)
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        Some(ms) => (Duration::from_millis(ms), Duration::from_millis(ms)),
        None => (FIRST_BACKOFF, MAX_BACKOFF),
    }
}

/// What the worker tells the top process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Report {
    /// A systemd notification (`READY=1`, `STATUS=...`, `WATCHDOG=1`): the
    /// top process is the service's main process, so it passes them on.
    Notify {
        /// Newline-separated `KEY=VALUE` assignments.
        state: String,
    },
    /// A guest's current state; its descriptors (indices into the
    /// message's) come with it.
    Guest {
        /// The guest's name.
        name: String,
        /// The guest's state, descriptors as indices.
        state: Box<GuestState>,
    },
    /// A guest's counters now (sent as the serving process stops, so that
    /// the next one's counters go on from here).
    Counters {
        /// The guest's name.
        name: String,
        /// Its counters.
        counters: upgrade::Counters,
    },
    /// `--isolation guest`: start (or start again, with this new link) a
    /// guest process for a vhost-user guest. Descriptors: the guest
    /// process's end of the entropy link, the wake eventfd, and the
    /// listening socket of a `socket=` guest.
    StartGuest {
        /// The guest's name.
        name: String,
        /// Its spec, as `--guest` takes it.
        spec: String,
        /// Added at runtime.
        runtime: bool,
    },
    /// A guest no longer served.
    Gone {
        /// The guest's name.
        name: String,
    },
    /// The serving process asks whether the binary on disk can take over
    /// (an upgrade, see [`handoff`]); answered with a [`Verdict`].
    CheckUpgrade {
        /// Echoed in the answer.
        id: u64,
    },
    /// Every guest is parked and reported: the serving process exits, and
    /// the top process starts the new binary with them.
    HandedOver {
        /// The upgrade count of the next serving process.
        upgrades: u64,
    },
    /// The control socket's file, for the top process to remove at stop
    /// if the serving process cannot ([`leftovers`]).
    ControlSocket {
        /// Its path.
        path: PathBuf,
    },
    /// The listening sockets shared by guests, the control socket and the
    /// metrics port (see [`crate::service::shared_sockets`]); descriptors
    /// in the order of `keys`.
    Shared {
        /// What each socket listens on.
        keys: Vec<String>,
    },
    /// The daemon's life across upgrades.
    Life {
        /// First start, seconds since the epoch.
        started_at: u64,
        /// In-place upgrades so far.
        upgrades: u64,
    },
}

/// Whether this process is a worker (started by the top process).
pub fn is_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// The worker's end: sends [`Report`]s to the top process.
pub struct WorkerLink {
    socket: OwnedFd,
    /// One report at a time: a record and its descriptors go together.
    sending: Mutex<()>,
    /// A guest with too many descriptors would warn on every change.
    too_many: vhost_rng_protocol::log_limit::RateLimitedLog,
}

/// Restarts and last cause, as the top process passed them.
#[derive(Debug, Clone, Default)]
pub struct Restarts {
    /// Workers started again after one died.
    pub count: u64,
    /// How the last one ended.
    pub last_cause: Option<String>,
}

impl WorkerLink {
    /// The link named by the environment, if this process is a worker. The
    /// variables stay set, so that an in-place upgrade of the worker keeps
    /// its link.
    pub fn from_env() -> Option<(WorkerLink, Restarts)> {
        Self::named_by(WORKER_ENV)
    }

    /// A guest process's link to the top process.
    pub fn for_guest_process() -> Option<WorkerLink> {
        Self::named_by(GUEST_PROCESS_ENV).map(|(link, _)| link)
    }

    fn named_by(variable: &str) -> Option<(WorkerLink, Restarts)> {
        let fd: RawFd = std::env::var(variable).ok()?.parse().ok()?;
        // SAFETY: the top process passed this descriptor, open and meant
        // for this process alone, under this name.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // A top process that does not read (stopped, say) must not hold up
        // the guests' threads for long: a report that cannot go within a
        // second is dropped, with a warning.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::SendTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        );
        let restarts = std::env::var(RESTARTS_ENV)
            .ok()
            .and_then(|value| {
                let (count, cause) = value.split_once(';')?;
                Some(Restarts {
                    count: count.parse().ok()?,
                    last_cause: (!cause.is_empty()).then(|| cause.to_owned()),
                })
            })
            .unwrap_or_default();
        Some((
            WorkerLink {
                socket,
                sending: Mutex::new(()),
                too_many: vhost_rng_protocol::log_limit::RateLimitedLog::per_minute(4),
            },
            restarts,
        ))
    }

    /// The raw descriptor, kept open across the worker's own upgrades.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Sends `report` with `fds` (which its indices refer to).
    pub fn send(&self, report: &Report, fds: &[OwnedFd]) {
        if fds.len() > MAX_FDS {
            vhost_rng_protocol::log_limited!(
                self.too_many,
                log::Level::Warn,
                "a guest holds {} descriptors, more than a record carries ({MAX_FDS}); it would \
                 not survive a crash of the serving process",
                fds.len()
            );
            return;
        }
        let Ok(json) = serde_json::to_vec(report) else {
            return;
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        let _guard = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = sendmsg::<()>(
            self.socket.as_raw_fd(),
            &[IoSlice::new(&json)],
            cmsgs,
            MsgFlags::empty(),
            None,
        ) {
            warn!("cannot tell the top process about a change ({e}); a crash now would lose it");
        }
    }
}

/// A guest as the top process holds it.
struct Held {
    state: GuestState,
    fds: Vec<OwnedFd>,
}

impl Held {
    /// The guest's state as a child process is handed it: every descriptor
    /// index replaced by the raw descriptor the child inherits, which is
    /// added to `inherit` (an index with no descriptor becomes -1); the
    /// stream clients only `with_clients` (a guest process has none to
    /// take).
    fn for_child(&self, inherit: &mut Vec<RawFd>, with_clients: bool) -> GuestState {
        let mut at = |index: RawFd| {
            let raw = usize::try_from(index)
                .ok()
                .and_then(|i| self.fds.get(i))
                .map_or(-1, AsRawFd::as_raw_fd);
            if raw >= 0 {
                inherit.push(raw);
            }
            raw
        };
        let mut state = self.state.clone();
        state.listener = state.listener.map(&mut at);
        if let Some(connection) = state.connection.as_mut() {
            connection.socket = at(connection.socket);
            connection.fds = connection.fds.iter().map(|&fd| at(fd)).collect();
        }
        state.clients = if with_clients {
            state.clients.iter().map(|&fd| at(fd)).collect()
        } else {
            Vec::new()
        };
        state
    }
}

/// The top process's loop: starts the worker and restarts it when it dies,
/// until SIGTERM or SIGINT. Returns the worker's exit status when it is
/// stopped, or when the first worker fails to start. `handed_fds` are the
/// listening sockets given with `--fd` (see [`super::activation`]).
pub fn run(handed_fds: &[RawFd]) -> ExitCode {
    // First, before this process opens anything that could take one of
    // their numbers; not in an image an upgrade started (the numbers are
    // the old image's then).
    let handed = match std::env::var_os(TOP_STATE_ENV) {
        Some(_) => Vec::new(),
        None => match activation::from_fd_args(handed_fds) {
            Ok(handed) => handed,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let signals = {
        let mut set = SigSet::empty();
        for signal in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGUSR2,
            Signal::SIGCHLD,
        ] {
            set.add(signal);
        }
        set
    };
    if let Err(e) = signals.thread_block() {
        error!("cannot set up signal handling: {e}");
        return ExitCode::FAILURE;
    }
    let setup = (|| {
        let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC)?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok::<_, nix::Error>((signal_fd, ours, theirs))
    })();
    let (signal_fd, ours, theirs) = match setup {
        Ok(setup) => setup,
        Err(e) => {
            error!("cannot set up the serving process: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut top = Top {
        binary: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        args: std::env::args_os().skip(1).collect(),
        notifier: Notifier::from_env(),
        link: theirs,
        held: BTreeMap::new(),
        life: None,
        restarts: Restarts::default(),
        ready: false,
        stopping: false,
        upgrading: None,
        leftovers: BTreeMap::new(),
        shared: Vec::new(),
        store: None,
        unstored: BTreeSet::new(),
        guests: guest_process::GuestProcesses::default(),
    };
    let passed = systemd::listen_fds();
    if FdStore::wanted(&top.notifier) {
        top.store = Some(FdStore::default());
    }
    let (mut top, ours, mut worker) = match TopRecord::inherited() {
        // An upgrade re-executed this top process: the serving process,
        // the sockets and what it holds carry on.
        Some(record) => {
            drop(ours);
            let (ours, worker) = record.adopt(&mut top);
            info!(
                "top process upgraded in place: keeping serving process {worker} and {} guest(s)",
                top.held.len()
            );
            (top, ours, worker)
        }
        None => match top.restore_from_systemd(passed, handed) {
            Ok(worker) => (top, ours, worker),
            Err(e) => {
                error!("cannot start the serving process: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut started = Instant::now();
    let (first_backoff, max_backoff) = backoff_bounds();
    let mut backoff = first_backoff;
    loop {
        let due = top.guests.restart_due(&top.binary, &top.args, &top.held);
        let guest_reports: Vec<(String, RawFd)> = (top.guests.by_name.iter())
            .map(|(name, process)| (name.clone(), process.reports.as_raw_fd()))
            .collect();
        let mut fds = vec![
            PollFd::new(ours.as_fd(), PollFlags::POLLIN),
            PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(guest_reports.iter().map(|&(_, fd)| {
            // SAFETY: each is a guest process's report socket, which
            // `top.guests` keeps open until the poll below has returned
            // (nothing changes `top` before `fds` is dropped).
            PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, PollFlags::POLLIN)
        }));
        // A second at most while the store needs a resync, and no later
        // than the next guest process due to start again.
        let timeout = match (top.unstored.is_empty(), due) {
            (true, None) => PollTimeout::NONE,
            (_, due) => {
                PollTimeout::from(due.map_or(1000, |d| d.as_millis().clamp(1, 1000) as u16))
            }
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                error!("waiting for the serving process: {e}");
                return ExitCode::FAILURE;
            }
        }
        let (report, signal) = (
            fds[0].revents().is_some_and(|r| !r.is_empty()),
            fds[1].revents().is_some_and(|r| !r.is_empty()),
        );
        let ready: Vec<usize> = (2..fds.len())
            .filter(|&i| fds[i].revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for i in ready {
            top.receive_from_guest(&guest_reports[i - 2].0);
        }
        if !report && !signal {
            top.resync_store();
        }
        if report {
            let upgrades = top.life.map(|(_, upgrades)| upgrades);
            top.receive_now(&ours);
            // The serving process upgraded itself: this process follows, so
            // that `vhost-rng serve` as a whole runs the new binary.
            let now = top.life.map(|(_, upgrades)| upgrades);
            if upgrades.is_some() && now > upgrades {
                let error = top.exec_self(&ours, worker);
                warn!("the top process keeps its old code: {error}");
            }
        }
        if !signal {
            continue;
        }
        let Ok(Some(info)) = signal_fd.read_signal() else {
            continue;
        };
        let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        match signal {
            Signal::SIGCHLD => {
                top.guests.reap(&top.binary, &top.args, &top.held);
                // Reports the dead worker sent before it died count.
                while top.receive_now(&ours) {}
                let status = match waitpid(worker, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => ExitStatus::from_raw(code << 8),
                    Ok(WaitStatus::Signaled(_, signal, _)) => ExitStatus::from_raw(signal as i32),
                    _ => continue,
                };
                if top.stopping {
                    // The next start gets what the store holds: give
                    // systemd a moment to take what its queue refused.
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while !top.unstored.is_empty() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                        top.resync_store();
                    }
                    top.guests.stop_all();
                    // Unless systemd keeps them for the next start.
                    if top.store.is_none() {
                        leftovers::remove(top.leftovers.values());
                    }
                    return exit_code(status);
                }
                if let Some(upgrades) = top.upgrading.take() {
                    match top.start_upgraded(upgrades) {
                        Ok(next) => {
                            worker = next;
                            started = Instant::now();
                            continue;
                        }
                        Err(e) => error!("cannot start the upgraded serving process: {e}"),
                    }
                }
                if !top.ready {
                    top.guests.stop_all();
                    error!("the serving process could not start ({status}); stopping");
                    return exit_code(status);
                }
                let cause = describe(status);
                top.restarts.count += 1;
                top.restarts.last_cause = Some(cause.clone());
                let lived = started.elapsed();
                let delay = if lived >= STABLE {
                    backoff = first_backoff;
                    Duration::ZERO
                } else {
                    let delay = backoff;
                    backoff = (backoff * 2).min(max_backoff);
                    delay
                };
                warn!(
                    "the serving process {cause} after {:.1} s; starting another{} with its {} \
                     guest(s) (restart {})",
                    lived.as_secs_f64(),
                    if delay.is_zero() {
                        String::new()
                    } else {
                        format!(" in {:?}", delay)
                    },
                    top.held.len(),
                    top.restarts.count
                );
                top.notifier
                    .status(&format!("restarting the serving process ({cause})"));
                std::thread::sleep(delay);
                match top.spawn_restored() {
                    Ok(next) => {
                        worker = next;
                        started = Instant::now();
                    }
                    Err(e) => {
                        error!("cannot start the serving process again: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            Signal::SIGTERM | Signal::SIGINT => {
                top.stopping = true;
                top.notifier.stopping();
                forward(&worker, signal);
            }
            other => forward(&worker, other),
        }
    }
}

struct Top {
    binary: PathBuf,
    args: Vec<OsString>,
    notifier: Notifier,
    /// The worker's end, inherited by every worker.
    link: OwnedFd,
    held: BTreeMap<String, Held>,
    life: Option<(u64, u64)>,
    restarts: Restarts,
    ready: bool,
    stopping: bool,
    /// The serving process handed over for an upgrade (the next one's
    /// upgrade count).
    upgrading: Option<u64>,
    /// Socket files to remove once the serving process has stopped.
    leftovers: BTreeMap<String, leftovers::SocketFile>,
    /// The shared listening sockets, by key.
    shared: Vec<(String, OwnedFd)>,
    /// What systemd's file descriptor store holds, when it is used.
    store: Option<FdStore>,
    /// Guests whose last change systemd's full queue did not take whole;
    /// stored again from scratch a second later.
    unstored: BTreeSet<String>,
    /// `--isolation guest`: each vhost-user guest's own process.
    guests: guest_process::GuestProcesses,
}

impl Top {
    /// Stores again the guests systemd's full queue did not take whole.
    fn resync_store(&mut self) {
        let Some(store) = &mut self.store else {
            return;
        };
        let names = std::mem::take(&mut self.unstored);
        for name in names {
            let stored = match self.held.get(&name) {
                Some(held) => store.resync(&self.notifier, &name, &held.state, &held.fds),
                None => store.forget(&self.notifier, &name),
            };
            if !stored {
                self.unstored.insert(name);
            }
        }
        if self.unstored.is_empty() {
            info!("systemd's file descriptor store holds every guest again");
        } else {
            warn!(
                "systemd does not take what the file descriptor store should hold for {} \
                 guest(s); a restart now would lose their connections; retrying",
                self.unstored.len()
            );
        }
    }

    /// Starts the first worker, with the guests systemd's file descriptor
    /// store gave back, if any.
    fn restore_from_systemd(
        &mut self,
        passed: Vec<(String, OwnedFd)>,
        handed: Vec<activation::Activated>,
    ) -> std::io::Result<Pid> {
        // Listening sockets passed by a socket unit or --fd are guests.
        let (passed, mut activated) = activation::from_systemd(passed, fd_store::is_store_name);
        activated.extend(handed);
        if self.store.is_none() {
            self.adopt_activated(activated);
            if !self.held.is_empty() {
                return self.spawn_restored();
            }
            if !passed.is_empty() {
                warn!(
                    "systemd passed {} descriptor(s) but its file descriptor store is not used                      here; closing them",
                    passed.len()
                );
            }
            return self.spawn(None);
        }
        let (store, restored, shared) = FdStore::restore(&self.notifier, passed);
        self.store = Some(store);
        self.shared = shared;
        for (name, state, fds) in restored {
            self.held.insert(name, Held { state, fds });
        }
        self.adopt_activated(activated);
        if self.held.is_empty() && self.shared.is_empty() {
            return self.spawn(None);
        }
        self.spawn_restored()
    }

    /// Holds the passed sockets as guests, unless their names are taken.
    fn adopt_activated(&mut self, activated: Vec<activation::Activated>) {
        let existing = (self.held.iter())
            .map(|(name, held)| (name.clone(), held.state.spec.clone()))
            .collect();
        for guest in activation::without_clashes(activated, &existing) {
            info!(
                "guest {}: serving a passed socket ({})",
                guest.spec.name, guest.spec
            );
            let (name, state, fd) = guest.into_held();
            self.held.insert(
                name,
                Held {
                    state,
                    fds: vec![fd],
                },
            );
        }
    }

    /// Starts a worker; `state` (a record's memfd and every descriptor it
    /// names) for a restart.
    fn spawn(&self, state: Option<(&OwnedFd, Vec<RawFd>)>) -> std::io::Result<Pid> {
        let mut command = Command::new(&self.binary);
        command.args(&self.args);
        command.env(WORKER_ENV, self.link.as_raw_fd().to_string());
        command.env(
            RESTARTS_ENV,
            format!(
                "{};{}",
                self.restarts.count,
                self.restarts.last_cause.clone().unwrap_or_default()
            ),
        );
        // The worker's notifications go through the top process, the
        // service's main process; the worker pings the watchdog (through it)
        // at the interval systemd asked for.
        command.env_remove("NOTIFY_SOCKET");
        command.env_remove("WATCHDOG_PID");
        command.env_remove(upgrade::STATE_ENV);
        if self.store.is_some() {
            command.env(fd_store::KEEPS_CONNECTIONS_ENV, "1");
        } else {
            command.env_remove(fd_store::KEEPS_CONNECTIONS_ENV);
        }
        let mut inherit = vec![self.link.as_raw_fd()];
        if let Some((record, fds)) = state {
            command.env(upgrade::STATE_ENV, record.as_raw_fd().to_string());
            inherit.push(record.as_raw_fd());
            inherit.extend(fds);
        }
        // The worker goes when the top process does.
        inherit_into_child(&mut command, inherit, libc::SIGTERM);
        let child = command.spawn()?;
        // Waited for with waitpid (SIGCHLD), by this image or the next one.
        Ok(Pid::from_raw(child.id() as i32))
    }

    /// Starts a worker with everything the dead one reported.
    fn spawn_restored(&self) -> std::io::Result<Pid> {
        self.spawn_from_held(false, None)
    }

    /// Starts a worker with every guest held; token levels kept only after
    /// a hand-over (`keep_tokens`), and `upgrades` for an upgrade.
    fn spawn_from_held(&self, keep_tokens: bool, upgrades: Option<u64>) -> std::io::Result<Pid> {
        let mut kept = Vec::new();
        let guests = self
            .held
            .values()
            .map(|held| {
                let mut state = held.for_child(&mut kept, true);
                // Start empty: tokens reported before the crash may have
                // been spent since.
                if !keep_tokens {
                    state.tokens = None;
                }
                state
            })
            .collect();
        let (started_at, upgrades) = match (self.life.unwrap_or((0, 0)), upgrades) {
            ((started_at, _), Some(upgrades)) => (started_at, upgrades),
            (life, None) => life,
        };
        let record = DaemonState {
            version: UPGRADE_STATE_VERSION,
            written_by: env!("CARGO_PKG_VERSION").into(),
            started_at,
            upgrades,
            guests,
            shared: Vec::new(),
        };
        let shared = self
            .shared
            .iter()
            .map(|(key, fd)| {
                kept.push(fd.as_raw_fd());
                (key.clone(), fd.as_raw_fd())
            })
            .collect();
        let record = DaemonState { shared, ..record };
        let memfd = upgrade::write_record(&record)?;
        // Close-on-exec is cleared in the child only (pre_exec): ours stay
        // as they are.
        self.spawn(Some((&memfd, kept)))
    }

    /// Takes a guest process's report: its own guest's state, nothing else.
    fn receive_from_guest(&mut self, name: &str) {
        // A guest process an earlier report of this round stopped has
        // nothing to say any more.
        let Some(process) = self.guests.by_name.get(name) else {
            return;
        };
        let Some((report, fds)) = receive(process.reports.as_fd()) else {
            return;
        };
        match report {
            Ok(Report::Guest {
                name: reported,
                state,
            }) if reported == name => {
                if let Some(state) = self.guests.accept(name, *state, self.held.get(name)) {
                    self.apply(
                        Report::Guest {
                            name: name.to_owned(),
                            state: Box::new(state),
                        },
                        fds,
                    );
                }
            }
            Ok(_) => warn!("guest {name}: its guest process sent a report it may not; ignored"),
            Err(e) => warn!("guest {name}: an unreadable report from its guest process: {e}"),
        }
    }

    /// Takes one report if there is one; false if none was waiting.
    fn receive_now(&mut self, socket: &OwnedFd) -> bool {
        let Some((report, fds)) = receive(socket.as_fd()) else {
            return false;
        };
        match report {
            Ok(Report::CheckUpgrade { id }) => self.check_upgrade(id, socket),
            Ok(report) => self.apply(report, fds),
            Err(e) => warn!("an unreadable report from the serving process: {e}"),
        }
        true
    }

    fn apply(&mut self, report: Report, fds: Vec<OwnedFd>) {
        match report {
            Report::Notify { state } => {
                if state.lines().any(|line| line == "READY=1") && !self.ready {
                    info!("serving process ready");
                    self.ready = true;
                }
                self.notifier.notify(&state);
            }
            Report::Guest { name, state } => {
                if let Some(store) = &mut self.store {
                    let previous = self.held.get(&name).map(|held| held.fds.as_slice());
                    if !store.put(&self.notifier, &name, previous, &state, &fds) {
                        self.unstored.insert(name.clone());
                    }
                }
                self.held.insert(name.clone(), Held { state: *state, fds });
                self.note_socket_file(&name);
            }
            Report::Counters { name, counters } => {
                if let Some(held) = self.held.get_mut(&name) {
                    held.state.counters = counters;
                    if let Some(store) = &mut self.store
                        && !store.put(
                            &self.notifier,
                            &name,
                            Some(&held.fds),
                            &held.state,
                            &held.fds,
                        )
                    {
                        self.unstored.insert(name);
                    }
                }
            }
            Report::StartGuest {
                name,
                spec,
                runtime,
            } => {
                self.guests.start(
                    &self.binary,
                    &self.args,
                    &mut self.held,
                    (name.clone(), spec, runtime),
                    fds,
                );
                self.note_socket_file(&name);
            }
            Report::Gone { name } => {
                self.guests.stop(&name);
                if let Some(store) = &mut self.store
                    && !store.forget(&self.notifier, &name)
                {
                    // Retried with the next change (or resync).
                    self.unstored.insert(name.clone());
                }
                self.held.remove(&name);
                self.leftovers.remove(&name);
            }
            Report::HandedOver { upgrades } => self.upgrading = Some(upgrades),
            Report::ControlSocket { path } => self.note_control_socket(path),
            // Answered where the socket is (receive_now).
            Report::CheckUpgrade { .. } => {}
            Report::Shared { keys } => {
                let shared: Vec<(String, OwnedFd)> = keys.into_iter().zip(fds).collect();
                if let Some(store) = &mut self.store {
                    store.put_shared(&self.notifier, &shared);
                }
                self.shared = shared;
            }
            Report::Life {
                started_at,
                upgrades,
            } => self.life = Some((started_at, upgrades)),
        }
    }
}

/// What a top process hands its next image (an upgrade): the serving
/// process, the sockets to it, and what each guest holds.
#[derive(Serialize, Deserialize)]
struct TopRecord {
    worker: i32,
    ours: RawFd,
    theirs: RawFd,
    guests: Vec<(String, GuestState, Vec<RawFd>)>,
    life: Option<(u64, u64)>,
    restarts: u64,
    last_cause: Option<String>,
    /// What systemd's file descriptor store holds (an older image that
    /// did not use it wrote none).
    #[serde(default)]
    store: Option<FdStore>,
    #[serde(default)]
    unstored: BTreeSet<String>,
    #[serde(default)]
    shared: Vec<(String, RawFd)>,
}

/// The variable naming the memfd with a [`TopRecord`].
const TOP_STATE_ENV: &str = "VHOST_RNG_TOP_STATE";

impl TopRecord {
    /// The record a previous image left, if this one was started by it.
    fn inherited() -> Option<TopRecord> {
        let fd: RawFd = std::env::var(TOP_STATE_ENV).ok()?.parse().ok()?;
        // SAFETY: the previous image passed this memfd, ours alone, under
        // this name; nothing else here refers to it.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut json = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut json).ok()?;
        // SAFETY: no other thread runs yet in the top process.
        unsafe { std::env::remove_var(TOP_STATE_ENV) };
        serde_json::from_slice(&json).ok()
    }

    /// Takes the record's descriptors into `top`; the socket to the serving
    /// process and its pid.
    fn adopt(self, top: &mut Top) -> (OwnedFd, Pid) {
        // Only ever called here, once per descriptor the record names.
        let take = |fd: RawFd| {
            // SAFETY: the previous image handed these over in the record,
            // each named once.
            unsafe { upgrade::adopt(fd) }
        };
        top.link = take(self.theirs);
        for (name, state, fds) in self.guests {
            let fds = fds.into_iter().map(take).collect();
            top.held.insert(name, Held { state, fds });
        }
        top.life = self.life;
        top.restarts = Restarts {
            count: self.restarts,
            last_cause: self.last_cause,
        };
        top.shared = self
            .shared
            .into_iter()
            .map(|(key, fd)| (key, take(fd)))
            .collect();
        top.ready = true;
        if top.store.is_some() {
            top.store = self.store.or_else(|| Some(FdStore::default()));
            top.unstored = self.unstored;
        }
        (take(self.ours), Pid::from_raw(self.worker))
    }
}

impl Top {
    /// Re-executes this top process's binary with the same pid, keeping the
    /// serving process (which stays its child) and every descriptor held.
    /// Returns only if that failed, with everything as it was.
    fn exec_self(&self, ours: &OwnedFd, worker: Pid) -> String {
        let mut keep: Vec<RawFd> = vec![ours.as_raw_fd(), self.link.as_raw_fd()];
        keep.extend(self.shared.iter().map(|(_, fd)| fd.as_raw_fd()));
        let guests = self
            .held
            .iter()
            .map(|(name, held)| {
                let fds: Vec<RawFd> = held.fds.iter().map(AsRawFd::as_raw_fd).collect();
                keep.extend(&fds);
                (name.clone(), held.state.clone(), fds)
            })
            .collect();
        let record = TopRecord {
            worker: worker.as_raw(),
            ours: ours.as_raw_fd(),
            theirs: self.link.as_raw_fd(),
            guests,
            life: self.life,
            restarts: self.restarts.count,
            last_cause: self.restarts.last_cause.clone(),
            store: self.store.clone(),
            unstored: self.unstored.clone(),
            shared: self
                .shared
                .iter()
                .map(|(key, fd)| (key.clone(), fd.as_raw_fd()))
                .collect(),
        };
        let memfd = match upgrade::write_json(&record) {
            Ok(memfd) => memfd,
            Err(e) => return format!("cannot write its state: {e}"),
        };
        keep.push(memfd.as_raw_fd());
        let set_inherited = |inherited: bool| {
            for &fd in &keep {
                let _ = upgrade::set_inherited(fd, inherited);
            }
        };
        set_inherited(true);
        // SAFETY: single-threaded top process; the variable is read by the
        // next image only.
        unsafe { std::env::set_var(TOP_STATE_ENV, memfd.as_raw_fd().to_string()) };
        let mut args = vec![std::env::args_os().next().unwrap_or_default()];
        args.extend(self.args.iter().cloned());
        let error = upgrade::exec_plain(&self.binary, &args);
        // SAFETY: as above.
        unsafe { std::env::remove_var(TOP_STATE_ENV) };
        set_inherited(false);
        format!("cannot execute {}: {error}", self.binary.display())
    }
}

/// One report and its descriptors, if one was waiting.
fn receive(socket: BorrowedFd<'_>) -> Option<(serde_json::Result<Report>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS + 3]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let received = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let bytes = received.bytes;
    let mut fds = Vec::new();
    if let Ok(messages) = received.cmsgs() {
        for message in messages {
            if let ControlMessageOwned::ScmRights(raw) = message {
                // SAFETY: the kernel installed these for us just now.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    if bytes == 0 {
        return None;
    }
    Some((serde_json::from_slice::<Report>(&buf[..bytes]), fds))
}

fn forward(worker: &Pid, signal: Signal) {
    if let Err(e) = nix::sys::signal::kill(*worker, signal) {
        warn!("cannot pass {signal} to the serving process: {e}");
    }
}

/// "was killed by SIGKILL", "exited with status 3".
fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(signal)) => format!(
            "was killed by {}",
            Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string())
        ),
        (Some(code), None) => format!("exited with status {code}"),
        (None, None) => "ended".into(),
    }
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

/// Makes `command`'s child inherit the descriptors `inherit` (close-on-exec
/// cleared in the child only), receive `death_signal` when the top process
/// dies, and start with no signal blocked (the top process blocks the ones
/// it reads from its signalfd).
pub(super) fn inherit_into_child(command: &mut Command, inherit: Vec<RawFd>, death_signal: i32) {
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (fcntl, prctl, sigprocmask), on descriptors this process owns and
    // keeps open until the child has started.
    unsafe {
        command.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, death_signal);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
}
