// SPDX-License-Identifier: Apache-2.0
//! `vhost-rng serve`: resolves the settings (command line over config
//! file), starts the pool, every guest, the control socket and the metrics
//! endpoint, then waits for signals: SIGHUP reloads the config file,
//! SIGTERM or SIGINT closes connections and removes the socket files.
//!
//! Start-up is all or nothing: if any guest cannot be served, the sockets
//! already created are removed and the daemon exits with an error.

use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Gid;

use crate::config::{self, ConfigError, ConfigFile, GuestEndpoint, GuestSpec};
use crate::entropy::drbg::ReseedPolicy;
use crate::entropy::pool::{Mode, Pool, PoolConfig, PoolError};
use crate::entropy::source::{self, SourceKind, SourceSpec};
use crate::frontend::socket_file::{GuestSocket, SocketAccess, SocketError};
use crate::frontend::tcp::{TcpError, TcpListener};
use crate::frontend::vhost_user::{MemoryLimits, VhostUserLimits};
use crate::frontend::vsock::{VsockError, VsockListener};
use crate::guest::limiter::RateLimit;
use crate::metrics::MetricsServer;
use crate::service::control::{ControlServer, DEFAULT_CONTROL_PATH};
use crate::service::registry::{Listeners, Registry, RegistryError};
use crate::service::sandbox::{
    self, Isolation, PrivilegeError, RunAs, SandboxStatus, SeccompError, SeccompMode, seccomp,
};
use crate::service::shared_sockets;
use crate::service::supervisor::{self, Report, WorkerLink};
use crate::service::systemd::Notifier;
use crate::service::upgrade;

mod guest_process;
pub use guest_process::run_guest_process;

/// Settings that may come from the command line or the config file; the
/// command line wins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Entropy sources (`--source`, `sources`); empty when not given, which
    /// means every hardware source that works on this host.
    pub sources: Vec<SourceSpec>,
    /// How guests are served (`--mode`, `mode`); drbg when not given.
    pub mode: Option<Mode>,
    /// In drbg mode, the most bytes a guest's DRBG gives between reseeds
    /// (`--reseed-bytes`, `reseed-bytes`).
    pub reseed_bytes: Option<u64>,
    /// In drbg mode, the most seconds between reseeds of a guest's DRBG
    /// (`--reseed-secs`, `reseed-secs`).
    pub reseed_secs: Option<u64>,
    /// Cap on bytes per second to all guests together (`--max-rate`,
    /// `max-rate`); none when not given.
    pub max_rate: Option<u64>,
    /// Permission bits of the socket files the daemon creates
    /// (`--socket-mode`, `socket-mode`); 0o600 when not given.
    pub socket_mode: Option<u32>,
    /// Group owning those socket files (`--socket-group`, `socket-group`).
    pub socket_group: Option<Gid>,
    /// The control socket (`--control`, `control`); when not given,
    /// [`DEFAULT_CONTROL_PATH`] for root and none otherwise.
    pub control: Option<PathBuf>,
    /// Address the metrics endpoint listens on (`--metrics`, `metrics`).
    pub metrics: Option<SocketAddr>,
    /// AF_VSOCK port for `cid=` guests (`--vsock`, `vsock`).
    pub vsock: Option<u32>,
    /// Bytes per second for vsock CIDs no guest has (`--vsock-default-rate`,
    /// `vsock-default-rate`); such CIDs are refused when not given.
    pub vsock_default_rate: Option<u64>,
    /// Address of the encrypted TCP listener for `tcp-psk=` guests
    /// (`--listen-tcp`, `listen-tcp`).
    pub listen_tcp: Option<SocketAddr>,
    /// Most guest memory regions per vhost-user connection
    /// (`--vhost-user-max-regions`, `vhost-user-max-regions`).
    pub vhost_user_max_regions: Option<u64>,
    /// Most bytes of guest memory per vhost-user connection
    /// (`--vhost-user-max-memory`, `vhost-user-max-memory`).
    pub vhost_user_max_memory: Option<u64>,
    /// Seconds a vhost-user connection has to send SET_OWNER
    /// (`--vhost-user-setup-timeout`, `vhost-user-setup-timeout`).
    pub vhost_user_setup_timeout: Option<u64>,
    /// `USER[:GROUP]` the serving process runs as after set-up (`--user`,
    /// `user`).
    pub user: Option<String>,
    /// What a system call outside the allow-list does (`--seccomp`,
    /// `seccomp`); kill when not given.
    pub seccomp: Option<SeccompMode>,
    /// Whether each vhost-user guest has a process of its own
    /// (`--isolation`, `isolation`); shared when not given.
    pub isolation: Option<Isolation>,
    /// Directories for the socket files of guests added later
    /// (`--socket-dir`, `socket-dirs`), added to the config file's.
    pub socket_dirs: Vec<PathBuf>,
}

/// What `serve` was asked for.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The guests of the command line (`--guest` and the shorthand options),
    /// served before the config file's.
    pub guests: Vec<GuestSpec>,
    /// The `--config` file, read at start and again on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// The command line's settings, which override the config file's.
    pub settings: Settings,
}

/// Settings with the config file applied and defaults filled in.
#[derive(Debug, Clone)]
struct Resolved {
    pool: PoolConfig,
    access: SocketAccess,
    vhost_user: VhostUserLimits,
    max_rate: Option<u64>,
    control: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    vsock: Option<u32>,
    vsock_default_rate: Option<u64>,
    listen_tcp: Option<SocketAddr>,
    guests: Vec<GuestSpec>,
    /// The config file has the `guest` key (`guest = []` included): a
    /// reload may then end with no guests.
    guests_declared: bool,
    user: Option<String>,
    seccomp: SeccompMode,
    isolation: Isolation,
    socket_dirs: Vec<PathBuf>,
}

/// Why the daemon could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file could not be read or is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A socket file (a guest's, the control socket) could not be made.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The entropy pool could not start.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A guest could not be served.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The metrics endpoint could not listen.
    #[error("metrics on {addr}: {error}")]
    Metrics {
        /// The `--metrics` address.
        addr: SocketAddr,
        /// The error from the operating system.
        #[source]
        error: std::io::Error,
    },
    /// The signals the daemon waits for could not be blocked, or waiting
    /// for them failed.
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] nix::Error),
    /// The state a previous version handed over could not be read.
    #[error("cannot take over from the previous daemon: {0}")]
    Inherit(#[from] upgrade::InheritError),
    /// The `--vsock` listener could not start.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The `--listen-tcp` listener could not start.
    #[error(transparent)]
    Tcp(#[from] TcpError),
    /// `--user` cannot be honoured, or the privilege drop failed.
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A guest process (`--isolation guest`) could not start.
    #[error("guest process: {0}")]
    GuestProcess(String),
    /// `vsock-default-rate` was given without `--vsock`.
    #[error("vsock-default-rate needs a vsock port to listen on: give --vsock PORT")]
    DefaultRateWithoutVsock,
}

fn resolve(config: &ServeConfig) -> Result<Resolved, DaemonError> {
    let file = match &config.config_file {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let cli = &config.settings;
    let sources = if !cli.sources.is_empty() {
        cli.sources.clone()
    } else if !file.sources.is_empty() {
        file.sources.clone()
    } else {
        source::default_sources()
    };
    let reseed = ReseedPolicy {
        max_bytes: cli
            .reseed_bytes
            .or(file.reseed_bytes)
            .unwrap_or(ReseedPolicy::default().max_bytes),
        max_age: cli
            .reseed_secs
            .or(file.reseed_secs)
            .map(Duration::from_secs)
            .unwrap_or(ReseedPolicy::default().max_age),
    };
    let group = match cli.socket_group {
        Some(group) => Some(group),
        None => file.socket_group_id()?,
    };
    let control = cli.control.clone().or(file.control.clone()).or_else(|| {
        nix::unistd::geteuid()
            .is_root()
            .then(|| PathBuf::from(DEFAULT_CONTROL_PATH))
    });
    let vsock = cli.vsock.or(file.vsock);
    let vsock_default_rate = cli.vsock_default_rate.or(file.vsock_default_rate);
    if vsock_default_rate.is_some() && vsock.is_none() {
        return Err(DaemonError::DefaultRateWithoutVsock);
    }
    Ok(Resolved {
        pool: PoolConfig {
            sources,
            mode: cli.mode.or(file.mode).unwrap_or_default(),
            reseed,
        },
        access: SocketAccess {
            mode: cli.socket_mode.or(file.socket_mode).unwrap_or(0o600),
            group,
        },
        vhost_user: vhost_user_limits(cli, &file),
        max_rate: cli.max_rate.or(file.max_rate),
        control,
        metrics: cli.metrics.or(file.metrics),
        vsock,
        vsock_default_rate,
        listen_tcp: cli.listen_tcp.or(file.listen_tcp),
        guests: config::merge_guests(config.guests.clone(), file.guests)?,
        guests_declared: file.guests_declared,
        user: cli.user.clone().or(file.user),
        seccomp: cli.seccomp.or(file.seccomp).unwrap_or_default(),
        isolation: cli.isolation.or(file.isolation).unwrap_or_default(),
        socket_dirs: cli
            .socket_dirs
            .iter()
            .chain(&file.socket_dirs)
            .cloned()
            .collect(),
    })
}

/// `serve --check-config`: everything the daemon checks before it starts
/// anything (the config file, how it combines with the command line, the
/// `--user`, that there is an entropy source), and a one-line summary of
/// what it would serve. Opens no socket, starts no thread, drops nothing.
pub fn check_config(config: &ServeConfig) -> Result<String, DaemonError> {
    let resolved = resolve(config)?;
    if let Some(user) = resolved.user.as_deref() {
        RunAs::resolve(user)?;
    }
    if resolved.pool.sources.is_empty() {
        return Err(PoolError::NoSources.into());
    }
    let sources: Vec<String> = resolved.pool.sources.iter().map(|s| s.label()).collect();
    Ok(format!(
        "{} guest(s){}, mode {}, sources {}, control socket {}",
        resolved.guests.len(),
        if resolved.guests.is_empty() && resolved.guests_declared {
            " (none, on purpose)"
        } else {
            ""
        },
        resolved.pool.mode.as_str(),
        sources.join(" "),
        resolved
            .control
            .as_deref()
            .map_or_else(|| "none".into(), |p| p.display().to_string()),
    ))
}

fn vhost_user_limits(cli: &Settings, file: &ConfigFile) -> VhostUserLimits {
    let defaults = VhostUserLimits::default();
    VhostUserLimits {
        memory: MemoryLimits {
            max_regions: cli
                .vhost_user_max_regions
                .or(file.vhost_user_max_regions)
                .map_or(defaults.memory.max_regions, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                }),
            max_bytes: cli
                .vhost_user_max_memory
                .or(file.vhost_user_max_memory)
                .unwrap_or(defaults.memory.max_bytes),
        },
        timeout: cli
            .vhost_user_setup_timeout
            .or(file.vhost_user_setup_timeout)
            .map_or(defaults.timeout, Duration::from_secs),
    }
}

/// The daemon maps guests' RAM and holds every guest's DRBG keys: a core
/// dump would write them to disk, readable by whoever reads crash reports.
/// Guest mappings are also marked MADV_DONTDUMP (frontend::vhost_user::memory).
fn keep_out_of_core_dumps() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        warn!(
            "cannot make the daemon non-dumpable ({e}): a crash may write guest memory and keys to a core file"
        );
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: ServeConfig) -> Result<(), DaemonError> {
    // Blocked before any thread starts so that every thread inherits the
    // mask and the signals reach only the `wait` below.
    let signals = daemon_signals();
    signals.thread_block().map_err(DaemonError::Signals)?;
    keep_out_of_core_dumps();
    sandbox::prepare_process();
    sandbox::privileges::clear_inheritable_capabilities();
    // Before any thread starts: it edits the environment.
    let inherited = upgrade::inherited()?;
    let link = WorkerLink::from_env().map(|(link, restarts)| (Arc::new(link), restarts));
    let notifier = match &link {
        Some((link, _)) => Notifier::relayed(Arc::clone(link)),
        None => Notifier::from_env(),
    };
    notifier.status("starting");

    let resolved = resolve(&config)?;
    // Before anything is created: an unknown user starts nothing.
    let run_as = resolved.user.as_deref().map(RunAs::resolve).transpose()?;
    if run_as.is_none() && nix::unistd::geteuid().is_root() {
        sandbox::privileges::warn_running_as_root();
    }
    sandbox::arm(resolved.seccomp);
    // The default control socket's directory is ours to make, and must
    // exist before Landlock, which allows what exists.
    if let Some(control) = &resolved.control {
        ControlServer::prepare_directory(control);
    }
    // Runtime additions make their sockets there as --user.
    sandbox::socket_dirs::prepare(&resolved.socket_dirs, run_as.as_ref());
    // Before any thread starts, so that every thread is confined.
    let landlock = sandbox::landlock::restrict(&reachable(&config, &resolved, inherited.as_ref()));
    info!("serving mode: {}", resolved.pool.mode.as_str());
    let pool = Pool::start(resolved.pool.clone())?;
    let registry = Registry::new(Arc::clone(&pool), resolved.access, resolved.vhost_user);
    if resolved.isolation == Isolation::Guest && link.is_none() {
        warn!("--isolation guest needs the top process; serving every guest in this process");
    } else {
        registry.set_isolation(resolved.isolation);
    }
    let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    registry.update_lifecycle(|life| life.binary = binary);
    if let Some((link, restarts)) = &link {
        registry.set_link(Arc::clone(link));
        let restarts = restarts.clone();
        registry.update_lifecycle(|life| {
            life.worker_restarts = restarts.count;
            life.last_worker_exit = restarts.last_cause;
        });
    }
    if let Some(state) = inherited {
        info!(
            "taking over {} guest(s) from vhost-rng {} (upgrade {})",
            state.guests.len(),
            state.written_by,
            state.upgrades
        );
        registry.update_lifecycle(|life| {
            life.started_at = state.started_at;
            life.upgrades = state.upgrades;
        });
        let (guests, shared) = upgrade::take_over(state);
        shared_sockets::set_inherited(shared);
        registry.set_carried(guests);
    }
    registry.set_max_rate(resolved.max_rate)?;
    registry.set_listeners(open_listeners(&resolved, &pool, &registry)?);
    if let Err(e) = registry.apply(resolved.guests.clone()) {
        registry.stop_all();
        return Err(e.into());
    }
    registry.take_up_runtime();

    let control = match &resolved.control {
        Some(path) => match open_control(path, Arc::clone(&registry)) {
            Ok(control) => {
                if let Some((link, _)) = &link {
                    link.send(&Report::ControlSocket { path: path.clone() }, &[]);
                }
                Some(control)
            }
            Err(e) => {
                registry.stop_all();
                return Err(e.into());
            }
        },
        None => None,
    };
    let _metrics = match resolved.metrics {
        Some(addr) => {
            let snapshot = Arc::clone(&registry);
            let key = format!("metrics@{addr}");
            let started = shared_sockets::listen(&key, || {
                std::net::TcpListener::bind(addr).map(OwnedFd::from)
            })
            .and_then(|socket| {
                MetricsServer::start_on(
                    std::net::TcpListener::from(socket),
                    Arc::new(move || snapshot.status()),
                    crate::metrics::IO_TIMEOUT,
                )
            });
            match started {
                Ok(server) => {
                    info!("metrics on http://{}/metrics", server.local_addr());
                    Some(server)
                }
                Err(error) => {
                    registry.stop_all();
                    if let Some(control) = &control {
                        control.stop();
                    }
                    return Err(DaemonError::Metrics { addr, error });
                }
            }
        }
        None => None,
    };
    shared_sockets::drop_unused();
    // Everything that needs root is done: drop it, then the filter; only
    // then do the threads reading guest input start reading it.
    if let Err(e) = enter_sandbox(
        seccomp::Role::Worker,
        run_as.as_ref(),
        resolved.seccomp,
        landlock,
    ) {
        registry.stop_all();
        if let Some(control) = &control {
            control.stop();
        }
        return Err(e);
    }
    let serving = format!("serving {} guest(s)", registry.names().len());
    info!("{serving}");
    if let Some((link, _)) = &link {
        let mut fds = Vec::new();
        let keys = shared_sockets::hand_over(|fd| {
            fds.push(fd);
            (fds.len() - 1) as RawFd
        })
        .into_iter()
        .map(|(key, _)| key)
        .collect();
        link.send(&Report::Shared { keys }, &fds);
        let life = registry.lifecycle();
        link.send(
            &Report::Life {
                started_at: life.started_at,
                upgrades: life.upgrades,
            },
            &[],
        );
    }
    // Every socket exists now, and the top process holds the shared ones
    // (a serving process that dies from here on loses none of them):
    // units ordered after this one can start.
    notifier.ready(&serving);

    let watchdog = notifier.watchdog_interval();
    loop {
        let signal = match wait_signal(&signals, watchdog).map_err(DaemonError::Signals)? {
            Some(signal) => signal,
            None => {
                notifier.watchdog();
                continue;
            }
        };
        match signal {
            Signal::SIGUSR2 => {
                notifier.status("upgrading");
                // A serving process under a top process may not execute
                // anything: the top process starts the new binary.
                let upgraded = match &link {
                    // Refused before any guest is frozen.
                    Some(_) if registry.isolation() == Isolation::Guest => {
                        Err(crate::service::isolation::NO_UPGRADE.to_owned())
                    }
                    Some((link, _)) => supervisor::upgrade_through_top(&registry, link),
                    None => upgrade::perform(&registry, None).map_err(|e| e.to_string()),
                };
                if let Err(e) = upgraded {
                    warn!("upgrade: {e}; going on as before");
                    let message = e;
                    registry.update_lifecycle(|life| {
                        life.last_upgrade_error = Some(message);
                        life.upgrade_failures += 1;
                    });
                }
                notifier.status(&format!("serving {} guest(s)", registry.names().len()));
            }
            Signal::SIGHUP => {
                notifier.reloading();
                reload(&config, &resolved, &registry);
                notifier.ready(&format!("serving {} guest(s)", registry.names().len()));
            }
            signal => {
                info!("{signal}: shutting down");
                notifier.stopping();
                break;
            }
        }
    }
    if std::env::var_os(crate::service::fd_store::KEEPS_CONNECTIONS_ENV).is_some() {
        // systemd's file descriptor store holds every guest's sockets: a
        // restart finds them there and VMMs keep their connections; a stop
        // closes them as systemd empties the store.
        registry.report_counters();
        if let Some(control) = &control {
            control.stop();
        }
        info!(
            "stopped; guests' connections and socket files left to systemd's file descriptor              store for the next start"
        );
        return Ok(());
    }
    registry.stop_all();
    if let Some(control) = &control {
        control.stop();
    }
    info!("stopped; socket files removed");
    Ok(())
}

/// Drops privileges (`--user`), installs the serving process's filter on
/// every thread and opens the gate for the threads that read input.
fn enter_sandbox(
    role: seccomp::Role,
    run_as: Option<&RunAs>,
    mode: SeccompMode,
    landlock: String,
) -> Result<(), DaemonError> {
    if let Some(run_as) = run_as {
        run_as.drop_privileges()?;
        info!("running as {}", run_as.describe());
    }
    seccomp::install_process(role, mode)?;
    let uid = nix::unistd::getuid();
    let user = match run_as {
        Some(run_as) => run_as.describe(),
        None if uid.is_root() => "root (no --user)".into(),
        None => format!("uid {uid} (started unprivileged)"),
    };
    info!("sandbox: user {user}, seccomp {mode}, Landlock {landlock}");
    sandbox::open(SandboxStatus {
        user,
        seccomp: mode.to_string(),
        landlock,
    });
    Ok(())
}

/// What the serving process may reach once Landlock is on: the socket
/// directories, key files, devices and config file its configuration (and
/// the guests handed over to it) name, and its TCP ports.
fn reachable(
    config: &ServeConfig,
    resolved: &Resolved,
    inherited: Option<&upgrade::DaemonState>,
) -> sandbox::landlock::Allowed {
    let mut allowed = sandbox::landlock::Allowed::default();
    let carried = inherited
        .into_iter()
        .flat_map(|state| &state.guests)
        .filter_map(|guest| guest.spec.parse::<GuestSpec>().ok());
    for guest in resolved.guests.iter().cloned().chain(carried) {
        match &guest.endpoint {
            GuestEndpoint::Socket(path)
            | GuestEndpoint::Egd(path)
            | GuestEndpoint::VsockUds(path) => allowed.socket(path),
            GuestEndpoint::TcpPsk(path) => allowed.read(path),
            GuestEndpoint::Fifo(path) => allowed.fifo(path),
            GuestEndpoint::Connect(_) | GuestEndpoint::Cid(_) => {}
        }
    }
    if let Some(control) = &resolved.control {
        allowed.socket(control);
    }
    for dir in &resolved.socket_dirs {
        allowed.socket(&dir.join("socket"));
        allowed.fifo(&dir.join("fifo"));
    }
    if let Some(file) = &config.config_file {
        allowed.read(file);
    }
    for source in &resolved.pool.sources {
        match (source.kind, &source.path) {
            (SourceKind::Hwrng, None) => allowed.read(Path::new(source::DEFAULT_HWRNG_PATH)),
            (_, Some(path)) => allowed.read(path),
            _ => {}
        }
    }
    allowed.tcp_ports = [resolved.metrics, resolved.listen_tcp]
        .into_iter()
        .flatten()
        .map(|addr| addr.port())
        .collect();
    allowed
}

/// The control socket: the one handed over, or a new one.
fn open_control(path: &Path, registry: Arc<Registry>) -> Result<ControlServer, SocketError> {
    let key = format!("control@{}", path.display());
    let socket = shared_sockets::listen(&key, || {
        ControlServer::prepare_directory(path);
        GuestSocket::bind(path, ControlServer::ACCESS).and_then(|socket| {
            socket.duplicate().map_err(|error| SocketError::Io {
                path: path.to_owned(),
                action: "copy the control socket",
                error,
            })
        })
    })?;
    let socket = GuestSocket::adopt(path, socket)?;
    ControlServer::start_on(socket, registry, crate::service::control::CLIENT_TIMEOUT)
}

/// Starts the listeners shared by many guests (`--vsock`, `--listen-tcp`);
/// all or none.
fn open_listeners(
    resolved: &Resolved,
    pool: &Arc<Pool>,
    registry: &Registry,
) -> Result<Listeners, DaemonError> {
    let mut listeners = Listeners::default();
    if let Some(port) = resolved.vsock {
        let socket =
            shared_sockets::listen(&format!("vsock@{port}"), || VsockListener::bind(port))?;
        listeners.vsock = Some(VsockListener::start_on(
            socket,
            port,
            resolved.vsock_default_rate,
            Arc::clone(pool),
            registry.global_limit(),
        )?);
    }
    if let Some(addr) = resolved.listen_tcp {
        let started = shared_sockets::listen(&format!("tcp@{addr}"), || {
            std::net::TcpListener::bind(addr)
                .map(OwnedFd::from)
                .map_err(|error| TcpError::Listen { addr, error })
        })
        .and_then(|socket| {
            TcpListener::start_on(
                std::net::TcpListener::from(socket),
                crate::frontend::tcp::HANDSHAKE_TIMEOUT,
            )
        });
        match started {
            Ok(tcp) => listeners.tcp = Some(tcp),
            Err(e) => {
                listeners.stop();
                return Err(e.into());
            }
        }
    }
    Ok(listeners)
}

/// SIGHUP: re-reads the config file and applies its guests and limits.
/// A config that does not load, guests that cannot be served, or a file
/// that would remove every running guest without saying `guest = []`
/// leave the running set untouched.
fn reload(config: &ServeConfig, running: &Resolved, registry: &Registry) {
    let Some(path) = &config.config_file else {
        info!("SIGHUP: no configuration file to reload");
        return;
    };
    let resolved = match resolve(config) {
        Ok(resolved) => resolved,
        Err(e) => {
            error!("SIGHUP: configuration rejected, keeping the running one: {e}");
            return;
        }
    };
    warn_restart_needed(path, running, &resolved);
    // Checked before anything changes, applied only once the guests are.
    if let Some(Err(e)) = resolved.max_rate.map(RateLimit::per_second) {
        error!("SIGHUP: configuration rejected, keeping the running one: max-rate: {e}");
        return;
    }
    match registry.reload(resolved.guests, resolved.guests_declared) {
        Ok(summary) => {
            if let Err(e) = registry.set_max_rate(resolved.max_rate) {
                error!("SIGHUP: max-rate not applied: {e}");
            }
            info!(
                "SIGHUP: reloaded {}: {} added, {} removed, {} changed, {} unchanged",
                path.display(),
                summary.added.len(),
                summary.removed.len(),
                summary.reconfigured.len(),
                summary.unchanged
            );
        }
        Err(e @ RegistryError::PartlyApplied(_)) => error!("SIGHUP: {e}"),
        Err(e) => error!("SIGHUP: configuration rejected, keeping the running one: {e}"),
    }
}

/// Settings a running daemon cannot change say so instead of being
/// silently ignored.
fn warn_restart_needed(path: &Path, running: &Resolved, new: &Resolved) {
    let mut ignored = Vec::new();
    if new.pool.sources != running.pool.sources || new.pool.mode != running.pool.mode {
        ignored.push("sources/mode");
    }
    if new.pool.reseed != running.pool.reseed {
        ignored.push("reseed bounds");
    }
    if new.access != running.access {
        ignored.push("socket-mode/socket-group (apply to new sockets only after a restart)");
    }
    if new.control != running.control || new.metrics != running.metrics {
        ignored.push("control/metrics");
    }
    if new.vsock != running.vsock
        || new.vsock_default_rate != running.vsock_default_rate
        || new.listen_tcp != running.listen_tcp
    {
        ignored.push("vsock/vsock-default-rate/listen-tcp");
    }
    if new.vhost_user != running.vhost_user {
        ignored.push("vhost-user-max-regions/vhost-user-max-memory/vhost-user-setup-timeout");
    }
    if new.isolation != running.isolation {
        ignored.push("isolation");
    }
    if !ignored.is_empty() {
        warn!(
            "SIGHUP: {}: changes to {} take effect only after a restart",
            path.display(),
            ignored.join(", ")
        );
    }
}

/// Waits for one of `signals`; `None` when `timeout` passes first.
fn wait_signal(signals: &SigSet, timeout: Option<Duration>) -> nix::Result<Option<Signal>> {
    let Some(timeout) = timeout else {
        return signals.wait().map(Some);
    };
    let timespec = nix::sys::time::TimeSpec::from_duration(timeout);
    // SAFETY: both pointers are valid for the call; a null siginfo is
    // allowed and means the caller does not want it.
    let received =
        unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), timespec.as_ref()) };
    if received < 0 {
        return match nix::errno::Errno::last() {
            nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR => Ok(None),
            error => Err(error),
        };
    }
    Signal::try_from(received).map(Some)
}

fn daemon_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.add(Signal::SIGUSR2);
    signals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(file: Option<&Path>, settings: Settings) -> ServeConfig {
        ServeConfig {
            guests: vec![],
            config_file: file.map(Path::to_owned),
            settings,
        }
    }

    #[test]
    fn command_line_overrides_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "mode = \"raw\"\nreseed-bytes = 4096\nsocket-mode = \"0660\"\nmax-rate = 1000\n\
             sources = [\"os\"]\n[[guest]]\nname = \"vm1\"\nsocket = \"/run/x.sock\"\n",
        )
        .unwrap();
        let resolved = resolve(&config_with(
            Some(&file),
            Settings {
                mode: Some(Mode::Drbg),
                max_rate: Some(5),
                control: Some("/tmp/c.sock".into()),
                ..Settings::default()
            },
        ))
        .unwrap();
        assert_eq!(resolved.pool.mode, Mode::Drbg);
        assert_eq!(resolved.pool.reseed.max_bytes, 4096);
        assert_eq!(resolved.pool.reseed.max_age, Duration::from_secs(60));
        assert_eq!(resolved.access.mode, 0o660);
        assert_eq!(resolved.max_rate, Some(5));
        assert_eq!(resolved.guests.len(), 1);
        assert_eq!(resolved.pool.sources.len(), 1);
    }

    #[test]
    fn a_broken_config_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "mode = \"fast\"\n").unwrap();
        let err = resolve(&config_with(Some(&file), Settings::default()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("mode"), "{err}");
    }
}
