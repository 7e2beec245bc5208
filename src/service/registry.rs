// SPDX-License-Identifier: Apache-2.0
//! The guests a running daemon serves: added, removed and reconfigured at
//! runtime (control socket, SIGHUP reload) without touching the others.
//!
//! Changes are all or nothing: a reload first opens every new socket and
//! checks every new limit; if anything fails, what it opened is closed
//! again and the running set stays exactly as it was.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::config::{GuestEndpoint, GuestSpec};
use crate::entropy::pool::Pool;
use crate::frontend::fifo::{self, FifoServer};
use crate::frontend::socket_file::{
    Fifo, FifoFdError, GuestSocket, SocketAccess, SocketError, open_fifo, remove_fifo,
};
use crate::frontend::stream::Clients;
use crate::frontend::tcp::TcpListener;
use crate::frontend::vhost_user::handler::Handler;
use crate::frontend::vhost_user::snapshot::ConnectionState;
use crate::frontend::vhost_user::{Endpoint, GuestServer, Resumed, VhostUserLimits};
use crate::frontend::vsock::VsockListener;
use crate::frontend::{Checkpoint, GuestFrontend, Handover};
use crate::frontend::{channel, egd};
use crate::guest::limiter::{RateLimit, RateLimitError};
use crate::guest::{Guest, GuestLimits, SharedBucket};
use crate::service::isolation::{Isolation, RemoteGuest};
use crate::service::status::{DaemonStatus, GuestStatus, ListenerStatus, PoolStatus, SourceStatus};
use crate::service::supervisor::{Report, WorkerLink};
use crate::service::upgrade::{self, Counters};
use vhost_rng_protocol::noise::{Psk, PskError};
use vhost_rng_protocol::wire;

/// Why a guest could not be added, removed or reloaded. Except for
/// [`RegistryError::PartlyApplied`], the running guests are as they were.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A guest of that name is served already (the name is given).
    #[error("guest {0} already exists")]
    Exists(String),
    /// No guest has that name (it is given).
    #[error("no guest named {0}")]
    Unknown(String),
    /// The config file defines a guest that was added over the control
    /// socket (its name is given).
    #[error(
        "guest {0} was added at runtime; remove it (vhost-rng guest remove {0}) before \
         defining it in the config file"
    )]
    AddedAtRuntime(String),
    /// Two guests would share a socket path, key file or CID.
    #[error("guest {name}: {path} is already used by guest {other}")]
    PathInUse {
        /// The guest being added.
        name: String,
        /// The path, or `vsock CID N`.
        path: String,
        /// The guest that has it.
        other: String,
    },
    /// The guest's rate limit is refused.
    #[error("guest {name}: {error}")]
    Limit {
        /// The guest's name.
        name: String,
        /// What is wrong with the limit.
        #[source]
        error: RateLimitError,
    },
    /// `max-rate` is refused.
    #[error("max-rate: {0}")]
    MaxRate(#[source] RateLimitError),
    /// The guest's socket file could not be made.
    #[error("guest {name}: {error}")]
    Socket {
        /// The guest's name.
        name: String,
        /// What went wrong.
        #[source]
        error: SocketError,
    },
    /// A `cid=` or `tcp-psk=` guest, but the daemon runs no listener for it.
    #[error("guest {name}: {key}= needs the daemon to run with {option}")]
    NoListener {
        /// The guest's name.
        name: String,
        /// The endpoint key: "cid" or "tcp-psk".
        key: &'static str,
        /// The option the daemon needs: "--vsock PORT" or "--listen-tcp ADDR".
        option: &'static str,
    },
    /// A `tcp-psk=` guest's key file could not be read or holds no key.
    #[error("guest {name}: {error}")]
    Key {
        /// The guest's name.
        name: String,
        /// What is wrong with the key file.
        #[source]
        error: PskError,
    },
    /// A reload failed after the guests it replaced were stopped: some of
    /// its changes are in force, some not (the error is given).
    #[error(
        "the change was applied only in part, as the guests it replaced had left already: \
         {0}; `vhost-rng status` lists the guests now served"
    )]
    PartlyApplied(#[source] Box<RegistryError>),
    /// The thread serving the guest could not be started.
    #[error("guest {name}: cannot start its thread: {error}")]
    Spawn {
        /// The guest's name.
        name: String,
        /// The error from the operating system.
        #[source]
        error: std::io::Error,
    },
    /// A reload of a file without the `guest` key would remove every guest
    /// (their names are given).
    #[error(
        "the new configuration has no guests and would remove {}; write `guest = []` in the \
         config file to mean that",
        running_guests(.0)
    )]
    WouldRemoveAll(Vec<String>),
}

/// "the running guest vm1", "all 2 running guests (vm1, vm2)".
fn running_guests(names: &[String]) -> String {
    match names {
        [name] => format!("the running guest {name}"),
        _ => format!("all {} running guests ({})", names.len(), names.join(", ")),
    }
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Guests started: new in the file, or restarted because their endpoint
    /// or key changed.
    pub added: Vec<String>,
    /// Guests stopped because the file no longer has them.
    pub removed: Vec<String>,
    /// Guests whose limits or weight changed, in place.
    pub reconfigured: Vec<String>,
    /// How many guests the reload left as they were.
    pub unchanged: usize,
}

struct Entry {
    spec: GuestSpec,
    server: Arc<dyn GuestFrontend>,
    /// Added over the control socket: a reload of the config file leaves
    /// it alone.
    runtime: bool,
    /// For a `tcp-psk=` guest, the key read from its file when it started,
    /// so that a reload can tell the file now holds another.
    key: Option<Psk>,
}

/// The running guests.
pub struct Registry {
    pool: Arc<Pool>,
    access: SocketAccess,
    vhost_user: VhostUserLimits,
    global: SharedBucket,
    max_rate: Mutex<Option<u64>>,
    guests: Mutex<BTreeMap<String, Entry>>,
    listeners: OnceLock<Listeners>,
    started: Instant,
    /// Guests a previous daemon handed over and not yet taken up.
    carried: Mutex<HashMap<String, Carried>>,
    /// The daemon's life across in-place upgrades, for status.
    lifecycle: Mutex<Lifecycle>,
    /// The top process, when this is a serving process it restarts after
    /// a crash: told what each guest holds after every change.
    link: OnceLock<Arc<WorkerLink>>,
    /// Whether vhost-user guests are served by guest processes.
    isolation: Mutex<Isolation>,
}

/// The daemon's life across in-place upgrades.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// The binary the daemon was started from, which an upgrade executes.
    pub binary: std::path::PathBuf,
    /// Seconds since the Unix epoch at the first start.
    pub started_at: u64,
    /// In-place upgrades since then.
    pub upgrades: u64,
    /// Why the last upgrade asked for did not happen, if it did not.
    pub last_upgrade_error: Option<String>,
    /// Upgrades asked for that did not happen.
    pub upgrade_failures: u64,
    /// Serving processes started again after one died.
    pub worker_restarts: u64,
    /// How the last one ended.
    pub last_worker_exit: Option<String>,
}

/// The listeners shared by many guests, where the daemon runs them.
#[derive(Default)]
pub struct Listeners {
    /// The `--vsock` listener, if the daemon runs one.
    pub vsock: Option<Arc<VsockListener>>,
    /// The `--listen-tcp` listener, if the daemon runs one.
    pub tcp: Option<Arc<TcpListener>>,
}

impl Listeners {
    /// The counters of each listener the daemon runs: vsock, then TCP.
    pub fn statuses(&self) -> Vec<ListenerStatus> {
        let vsock = self.vsock.as_ref().map(|vsock| vsock.status());
        let tcp = self.tcp.as_ref().map(|tcp| tcp.status());
        vsock.into_iter().chain(tcp).collect()
    }

    /// Stops every listener: no new connections, and their clients closed.
    pub fn stop(&self) {
        if let Some(vsock) = &self.vsock {
            vsock.stop();
        }
        if let Some(tcp) = &self.tcp {
            tcp.stop();
        }
    }
}

/// A guest's limits as the spec gives them.
pub fn limits_of(spec: &GuestSpec) -> Result<GuestLimits, RegistryError> {
    let rate = match spec.rate_bytes {
        None => None,
        Some(bytes) => {
            let burst = spec.burst.unwrap_or(bytes);
            Some(
                RateLimit::new(bytes, spec.rate_period_ms, burst).map_err(|error| {
                    RegistryError::Limit {
                        name: spec.name.clone(),
                        error,
                    }
                })?,
            )
        }
    };
    Ok(GuestLimits {
        rate,
        weight: spec.weight,
    })
}

/// Where a prepared guest will be served.
enum Opened {
    VhostUser(Endpoint),
    Egd(GuestSocket),
    Channel(GuestSocket),
    Vsock(Arc<VsockListener>, u32),
    Tcp(Arc<TcpListener>, Psk),
    Fifo(std::path::PathBuf, Fifo),
}

/// A socket opened for a guest that is not serving yet.
struct Prepared {
    spec: GuestSpec,
    limits: GuestLimits,
    endpoint: Opened,
    /// What a previous daemon handed over for this guest (an upgrade).
    carried: Option<Carried>,
}

/// A guest's connections and state from a previous daemon, its
/// descriptors now owned by this one.
pub struct Carried {
    /// The guest as the previous daemon served it.
    pub spec: GuestSpec,
    /// Added at runtime (in no file): added again without being configured.
    pub runtime: bool,
    /// A socket passed by systemd or `--fd`, not taken up before: a
    /// configured guest of the same name and path takes it and stays
    /// configured.
    pub activated: bool,
    /// Its listening socket, adopted instead of bound.
    pub listener: Option<OwnedFd>,
    /// A vhost-user VMM connection with its state and the descriptors the
    /// state indexes.
    pub connection: Option<(UnixStream, ConnectionState, Vec<OwnedFd>)>,
    /// EGD or channel clients, served again.
    pub clients: Vec<UnixStream>,
    /// Tokens its bucket held.
    pub tokens: Option<u64>,
    /// Its counters.
    pub counters: Counters,
}

/// A guest as handed over by [`Registry::handover_all`].
pub struct HandedOver {
    /// The guest's spec.
    pub spec: GuestSpec,
    /// Added at runtime.
    pub runtime: bool,
    /// Its descriptors and connection state.
    pub handover: Handover,
    /// Tokens in its bucket.
    pub tokens: Option<u64>,
    /// Its counters.
    pub counters: Counters,
}

impl Registry {
    /// An empty registry: guests drawing from `pool`, socket files made with
    /// `access`, vhost-user connections held to `vhost_user`.
    pub fn new(pool: Arc<Pool>, access: SocketAccess, vhost_user: VhostUserLimits) -> Arc<Self> {
        Arc::new(Registry {
            pool,
            access,
            vhost_user,
            global: SharedBucket::default(),
            max_rate: Mutex::new(None),
            guests: Mutex::new(BTreeMap::new()),
            listeners: OnceLock::new(),
            started: Instant::now(),
            carried: Mutex::new(HashMap::new()),
            lifecycle: Mutex::new(Lifecycle {
                started_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                ..Lifecycle::default()
            }),
            link: OnceLock::new(),
            isolation: Mutex::new(Isolation::Shared),
        })
    }

    /// The pool every guest draws from (for `vhost-rng seed`).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The cap on all guests together, which guests let in by a listener's
    /// default policy share too.
    pub fn global_limit(&self) -> SharedBucket {
        Arc::clone(&self.global)
    }

    /// Sets the shared listeners, once, before guests that need them are
    /// added.
    pub fn set_listeners(&self, listeners: Listeners) {
        if let Err(unused) = self.listeners.set(listeners) {
            unused.stop();
        }
    }

    fn listeners(&self) -> Option<&Listeners> {
        self.listeners.get()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets or removes the cap on all guests together, in bytes per second.
    pub fn set_max_rate(&self, max_rate: Option<u64>) -> Result<(), RegistryError> {
        let limit = max_rate
            .map(RateLimit::per_second)
            .transpose()
            .map_err(RegistryError::MaxRate)?;
        self.global.set(limit, Instant::now());
        *self.max_rate.lock().unwrap_or_else(|e| e.into_inner()) = max_rate;
        Ok(())
    }

    /// Starts serving one more guest, at runtime: config reloads leave it
    /// alone.
    pub fn add(&self, spec: GuestSpec) -> Result<(), RegistryError> {
        let mut guests = self.lock();
        check_unique(&guests, std::slice::from_ref(&spec), &[])?;
        let prepared = self.prepare(spec)?;
        self.launch(&mut guests, prepared, true)
    }

    /// Stops serving a guest: its connection is closed, its socket removed.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let entry = self
            .lock()
            .remove(name)
            .ok_or_else(|| RegistryError::Unknown(name.to_owned()))?;
        entry.server.stop();
        entry.server.remove_files();
        self.forget(name);
        info!("guest {name}: removed");
        Ok(())
    }

    /// Serves vhost-user guests added from now on in guest processes
    /// (`--isolation guest`), or here.
    pub fn set_isolation(&self, isolation: Isolation) {
        *self.isolation.lock().unwrap_or_else(|e| e.into_inner()) = isolation;
    }

    /// The isolation mode, for status.
    pub fn isolation(&self) -> Isolation {
        *self.isolation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports guests' changes to the top process from now on.
    pub fn set_link(&self, link: Arc<WorkerLink>) {
        let _ = self.link.set(link);
    }

    /// The link to the top process, in a serving process.
    pub fn link(&self) -> Option<Arc<WorkerLink>> {
        self.link.get().cloned()
    }

    /// Tells the top process every guest's counters as they are now.
    pub fn report_counters(&self) {
        let Some(link) = self.link.get() else {
            return;
        };
        for (name, entry) in self.lock().iter() {
            link.send(
                &Report::Counters {
                    name: name.clone(),
                    counters: Counters::of(&entry.server.guest().stats),
                },
                &[],
            );
        }
    }

    /// Tells the top process that `name` is no longer served.
    fn forget(&self, name: &str) {
        if let Some(link) = self.link.get() {
            link.send(
                &Report::Gone {
                    name: name.to_owned(),
                },
                &[],
            );
        }
    }

    /// What reports a guest's changes to the top process, if there is one.
    fn checkpoint_for(
        &self,
        spec: &GuestSpec,
        runtime: bool,
        guest: &Arc<Guest>,
    ) -> Option<Checkpoint> {
        let link = Arc::clone(self.link.get()?);
        let (spec, guest) = (spec.clone(), Arc::clone(guest));
        Some(Arc::new(move |handover: Handover| {
            let mut fds = Vec::new();
            let state = upgrade::guest_state(
                &spec,
                runtime,
                handover,
                guest.tokens(),
                Counters::of(&guest.stats),
                |fd| {
                    fds.push(fd);
                    (fds.len() - 1) as RawFd
                },
            );
            let report = Report::Guest {
                name: spec.name.clone(),
                state: Box::new(state),
            };
            link.send(&report, &fds);
        }))
    }

    /// Makes the running guests match `specs`: adds new ones, removes
    /// missing ones, changes limits in place; guests whose spec did not
    /// change keep their connection. All or nothing.
    ///
    /// Only guests from the command line and the config file are managed
    /// here; guests added at runtime stay as they are.
    pub fn apply(&self, specs: Vec<GuestSpec>) -> Result<ReloadSummary, RegistryError> {
        self.apply_locked(&mut self.lock(), specs)
    }

    /// [`Registry::apply`] for a reload of the config file, which refuses
    /// to end with no guests from the command line and the file where some
    /// are running, unless `none_on_purpose` (the file says `guest = []`):
    /// a file emptied by a truncated write or a full disk is far likelier
    /// than a wish to detach every VM, and a guest removed this way stays
    /// cut off. A reload that keeps or adds any guest is an ordinary one,
    /// whatever it removes. Guests added at runtime count for nothing here:
    /// a reload leaves them alone either way.
    pub fn reload(
        &self,
        specs: Vec<GuestSpec>,
        none_on_purpose: bool,
    ) -> Result<ReloadSummary, RegistryError> {
        let mut guests = self.lock();
        if specs.is_empty() && !none_on_purpose {
            let leaving: Vec<String> = guests
                .iter()
                .filter(|(_, entry)| !entry.runtime)
                .map(|(name, _)| name.clone())
                .collect();
            if !leaving.is_empty() {
                return Err(RegistryError::WouldRemoveAll(leaving));
            }
        }
        self.apply_locked(&mut guests, specs)
    }

    fn apply_locked(
        &self,
        guests: &mut BTreeMap<String, Entry>,
        specs: Vec<GuestSpec>,
    ) -> Result<ReloadSummary, RegistryError> {
        let mut summary = ReloadSummary::default();
        if let Some(spec) = specs
            .iter()
            .find(|spec| guests.get(&spec.name).is_some_and(|e| e.runtime))
        {
            return Err(RegistryError::AddedAtRuntime(spec.name.clone()));
        }

        // Guests whose endpoint changes are replaced: removed, then added.
        // So are TCP guests whose key file now holds another key: their
        // connections were proven with the old one.
        let rekeyed = rekeyed_guests(guests, &specs)?;
        let replaced: Vec<String> = specs
            .iter()
            .filter(|spec| {
                guests
                    .get(&spec.name)
                    .is_some_and(|e| e.spec.endpoint != spec.endpoint)
                    || rekeyed.contains(&spec.name)
            })
            .map(|spec| spec.name.clone())
            .collect();
        let leaving: Vec<String> = guests
            .iter()
            .filter(|(name, entry)| {
                !entry.runtime
                    && (!specs.iter().any(|s| &s.name == *name) || replaced.contains(name))
            })
            .map(|(name, _)| name.clone())
            .collect();
        let new_specs: Vec<GuestSpec> = specs
            .iter()
            .filter(|spec| !guests.contains_key(&spec.name) || replaced.contains(&spec.name))
            .cloned()
            .collect();
        check_unique(guests, &new_specs, &leaving)?;

        // Check every limit, then open every new socket, before changing
        // anything.
        let mut changed_limits = Vec::new();
        for spec in &specs {
            let limits = limits_of(spec)?;
            if let Some(entry) = guests.get(&spec.name)
                && !replaced.contains(&spec.name)
            {
                if entry.spec != *spec {
                    changed_limits.push((spec.clone(), limits));
                } else {
                    summary.unchanged += 1;
                }
            }
        }
        let kept_paths: Vec<std::path::PathBuf> = new_specs
            .iter()
            .filter_map(|spec| spec.endpoint.path().map(Path::to_owned))
            .collect();
        let mut prepared = Vec::new();
        for spec in new_specs {
            // A new socket file may be at the path of a leaving guest's;
            // that guest is removed first below, so only sockets at fresh
            // paths are opened here. Endpoints that create no file (a key,
            // a CID, a VMM's socket) are prepared now whatever they share.
            let path_leaving = spec.endpoint.creates_socket()
                && leaving.iter().any(|name| {
                    guests
                        .get(name)
                        .is_some_and(|e| e.spec.endpoint.address() == spec.endpoint.address())
                });
            if path_leaving {
                prepared.push(Err(spec));
                continue;
            }
            match self.prepare(spec) {
                Ok(ready) => prepared.push(Ok(ready)),
                Err(error) => {
                    close_prepared(prepared);
                    return Err(error);
                }
            }
        }

        for name in &leaving {
            if let Some(entry) = guests.remove(name) {
                entry.server.stop();
                // A FIFO a new guest takes over stays: VMMs may read it.
                let kept = entry
                    .spec
                    .endpoint
                    .path()
                    .is_some_and(|path| kept_paths.contains(&path.to_owned()));
                if !kept {
                    entry.server.remove_files();
                }
                self.forget(name);
                info!("guest {name}: removed");
                if !replaced.contains(name) {
                    summary.removed.push(name.clone());
                }
            }
        }
        for (spec, limits) in changed_limits {
            if let Some(entry) = guests.get_mut(&spec.name) {
                entry.server.guest().set_limits(limits);
                info!("guest {}: limits changed to {spec}", spec.name);
                summary.reconfigured.push(spec.name.clone());
                entry.spec = spec;
            }
        }
        // From here on the old guests are gone, so a failure cannot leave
        // the running set as it was: it says so instead of "rejected".
        let partly = |error| RegistryError::PartlyApplied(Box::new(error));
        for item in prepared {
            let ready = match item {
                Ok(ready) => ready,
                // The path is free now that the guest holding it left.
                Err(spec) => self.prepare(spec).map_err(partly)?,
            };
            let name = ready.spec.name.clone();
            self.launch(guests, ready, false).map_err(partly)?;
            summary.added.push(name);
        }
        Ok(summary)
    }

    /// Opens a guest's socket (for `socket=`) and checks its limits.
    fn prepare(&self, spec: GuestSpec) -> Result<Prepared, RegistryError> {
        let limits = limits_of(&spec)?;
        // A guest a previous daemon handed over with the same endpoint
        // keeps its socket and connections.
        let mut carried = self
            .carried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&spec.name)
            .filter(|carried| {
                let same = carried.spec.endpoint == spec.endpoint;
                if !same {
                    warn!(
                        "guest {}: what was handed over for it ({}) is closed: it is now \
                         configured as {spec}",
                        spec.name, carried.spec
                    );
                }
                same
            });
        let inherited_listener = carried.as_mut().and_then(|c| c.listener.take());
        let socket_error = |error| RegistryError::Socket {
            name: spec.name.clone(),
            error,
        };
        let mut inherited_listener = inherited_listener;
        let mut bind = |path: &Path| match inherited_listener.take() {
            Some(listener) => GuestSocket::adopt(path, listener).map_err(socket_error),
            None => GuestSocket::bind(path, self.access).map_err(socket_error),
        };
        let endpoint = match &spec.endpoint {
            GuestEndpoint::Socket(path) => Opened::VhostUser(Endpoint::Listen(bind(path)?)),
            GuestEndpoint::Connect(path) => Opened::VhostUser(Endpoint::Connect(path.clone())),
            GuestEndpoint::Egd(path) => Opened::Egd(bind(path)?),
            GuestEndpoint::VsockUds(path) => {
                Opened::Channel(bind(&channel::uds_path(path, wire::DEFAULT_PORT))?)
            }
            GuestEndpoint::Cid(cid) => {
                let listener = self
                    .listeners()
                    .and_then(|l| l.vsock.clone())
                    .ok_or_else(|| RegistryError::NoListener {
                        name: spec.name.clone(),
                        key: "cid",
                        option: "--vsock PORT",
                    })?;
                Opened::Vsock(listener, *cid)
            }
            GuestEndpoint::Fifo(path) => {
                let fifo = match inherited_listener.take() {
                    // The pipe the previous daemon filled: a VMM may have
                    // it open, so it is this one, whatever is at the path.
                    Some(fd) => Fifo::from_fd(fd).map_err(|e| {
                        socket_error(match e {
                            FifoFdError::NotAFifo => SocketError::NotAFifo { path: path.clone() },
                            FifoFdError::Io(error) => SocketError::Io {
                                path: path.clone(),
                                action: "take over the FIFO",
                                error,
                            },
                        })
                    })?,
                    None => open_fifo(path, self.access).map_err(socket_error)?,
                };
                Opened::Fifo(path.clone(), fifo)
            }
            GuestEndpoint::TcpPsk(path) => {
                let listener = self
                    .listeners()
                    .and_then(|l| l.tcp.clone())
                    .ok_or_else(|| RegistryError::NoListener {
                        name: spec.name.clone(),
                        key: "tcp-psk",
                        option: "--listen-tcp ADDR",
                    })?;
                let psk = Psk::load(path).map_err(|error| RegistryError::Key {
                    name: spec.name.clone(),
                    error,
                })?;
                Opened::Tcp(listener, psk)
            }
        };
        Ok(Prepared {
            spec,
            limits,
            endpoint,
            carried,
        })
    }

    fn launch(
        &self,
        guests: &mut BTreeMap<String, Entry>,
        prepared: Prepared,
        runtime: bool,
    ) -> Result<(), RegistryError> {
        let Prepared {
            spec,
            limits,
            endpoint,
            carried,
        } = prepared;
        let guest = Guest::with_limits(
            spec.name.clone(),
            Arc::clone(&self.pool),
            limits,
            Arc::clone(&self.global),
        );
        let (connection, clients, runtime) = match carried {
            Some(carried) => {
                carried.counters.restore(&guest.stats);
                if let Some(tokens) = carried.tokens {
                    guest.restore_tokens(tokens);
                }
                (
                    carried.connection,
                    carried.clients,
                    runtime || (carried.runtime && !carried.activated),
                )
            }
            None => (None, Vec::new(), runtime),
        };
        let spawn_error = |error| RegistryError::Spawn {
            name: spec.name.clone(),
            error,
        };
        let mut key = None;
        let server: Arc<dyn GuestFrontend> = match endpoint {
            Opened::VhostUser(endpoint)
                if self.isolation() == Isolation::Guest && self.link.get().is_some() =>
            {
                info!(
                    "guest {}: serving on {} in a guest process of its own ({spec})",
                    spec.name,
                    endpoint.path().display()
                );
                // What a previous serving process held for it stays with
                // the top process, which hands it to the guest process:
                // guest memory is never mapped here.
                drop(connection);
                let top = self.link.get().ok_or_else(|| {
                    spawn_error(std::io::Error::other("no top process to start it"))
                })?;
                Arc::new(
                    RemoteGuest::start(guest, &spec, runtime, endpoint, top)
                        .map_err(spawn_error)?,
                )
            }
            Opened::VhostUser(endpoint) => {
                info!(
                    "guest {}: serving on {} ({spec})",
                    spec.name,
                    endpoint.path().display()
                );
                let resumed = connection.and_then(|(stream, state, fds)| {
                    let limits = self.vhost_user.memory;
                    match Handler::restore(Arc::clone(&guest), limits, &state, fds) {
                        Ok(handler) => Some(Resumed { stream, handler }),
                        Err(e) => {
                            warn!(
                                "guest {}: cannot take over its VMM connection ({e}); the VMM \
                                 must reconnect",
                                spec.name
                            );
                            None
                        }
                    }
                });
                let checkpoint = self.checkpoint_for(&spec, runtime, &guest);
                GuestServer::spawn_resumed(guest, endpoint, self.vhost_user, resumed, checkpoint)
                    .map_err(spawn_error)?
            }
            Opened::Egd(socket) => {
                info!(
                    "guest {}: serving on {} (EGD; {spec})",
                    spec.name,
                    socket.path().display()
                );
                let checkpoint = self.checkpoint_for(&spec, runtime, &guest);
                let server = egd::spawn(guest, socket).map_err(spawn_error)?;
                if let Some(checkpoint) = checkpoint {
                    server.set_checkpoint(checkpoint);
                }
                server.resume_clients(egd::PROTOCOL, clients);
                server
            }
            Opened::Channel(socket) => {
                info!(
                    "guest {}: serving on {} (agent channel; {spec})",
                    spec.name,
                    socket.path().display()
                );
                let checkpoint = self.checkpoint_for(&spec, runtime, &guest);
                let server = channel::spawn(guest, socket).map_err(spawn_error)?;
                if let Some(checkpoint) = checkpoint {
                    server.set_checkpoint(checkpoint);
                }
                server.resume_clients(channel::PROTOCOL, clients);
                server
            }
            Opened::Fifo(path, fifo) => {
                fifo::announce(&guest, &path, &spec);
                let checkpoint = self.checkpoint_for(&spec, runtime, &guest);
                let server =
                    FifoServer::spawn(guest, &path, fifo.fd, fifo.identity).map_err(spawn_error)?;
                if let Some(checkpoint) = checkpoint {
                    server.set_checkpoint(checkpoint);
                }
                server
            }
            Opened::Vsock(listener, cid) => {
                info!(
                    "guest {}: serving vsock CID {cid} on port {} (agent channel; {spec})",
                    spec.name,
                    listener.port()
                );
                listener.directory().join(cid, Clients::new(guest), ())
            }
            Opened::Tcp(listener, psk) => {
                info!(
                    "guest {}: serving TCP clients with its key on {} (agent channel, \
                     Noise; {spec})",
                    spec.name,
                    listener.local_addr()
                );
                key = Some(psk.clone());
                let name = spec.name.clone();
                listener.directory().join(name, Clients::new(guest), psk)
            }
        };
        guests.insert(
            spec.name.clone(),
            Entry {
                spec,
                server,
                runtime,
                key,
            },
        );
        Ok(())
    }

    /// Takes what a previous daemon handed over, to be used as the guests
    /// are set up (by [`Registry::apply`] and [`Registry::take_up_runtime`]).
    pub fn set_carried(&self, carried: Vec<Carried>) {
        let mut map = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        for guest in carried {
            map.insert(guest.spec.name.clone(), guest);
        }
    }

    /// Adds the guests the previous daemon had added at runtime (they are
    /// in no file), then drops what no guest took up, closing it.
    pub fn take_up_runtime(&self) {
        let runtime: Vec<GuestSpec> = self
            .carried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|carried| carried.runtime)
            .map(|carried| carried.spec.clone())
            .collect();
        for spec in runtime {
            let name = spec.name.clone();
            if let Err(e) = self.add(spec) {
                warn!("guest {name}: added at runtime before the upgrade, cannot be served: {e}");
            }
        }
        let left: Vec<String> =
            std::mem::take(&mut *self.carried.lock().unwrap_or_else(|e| e.into_inner()))
                .into_keys()
                .collect();
        for name in left {
            warn!(
                "guest {name}: handed over by the previous daemon but no longer configured; its \
                 connections are closed"
            );
            // The top process must let go of its copies too, or the VMM
            // would never see the connection close; a guest of the same
            // name served at another endpoint is not gone.
            if !self.lock().contains_key(&name) {
                self.forget(&name);
            }
        }
    }

    /// Parks every guest at a safe point and collects what the next daemon
    /// needs; on any failure every guest goes on serving and the reason is
    /// returned.
    pub fn handover_all(&self, patience: Duration) -> Result<Vec<HandedOver>, String> {
        let guests = self.lock();
        let mut handed = Vec::new();
        let mut failure = None;
        for (name, entry) in guests.iter() {
            let handover = entry.server.handover(patience);
            if let Handover::Failed(reason) = &handover {
                failure = Some(format!("guest {name}: {reason}"));
                break;
            }
            handed.push(HandedOver {
                spec: entry.spec.clone(),
                runtime: entry.runtime,
                handover,
                tokens: entry.server.guest().tokens(),
                counters: Counters::of(&entry.server.guest().stats),
            });
        }
        if let Some(reason) = failure {
            for entry in guests.values() {
                entry.server.thaw();
            }
            return Err(reason);
        }
        Ok(handed)
    }

    /// Lets every guest go on serving after a hand-over that was not used.
    pub fn thaw_all(&self) {
        for entry in self.lock().values() {
            entry.server.thaw();
        }
    }

    /// The daemon's life across upgrades.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the daemon's life record (an upgrade taken over, refused).
    pub fn update_lifecycle(&self, change: impl FnOnce(&mut Lifecycle)) {
        change(&mut self.lifecycle.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Names of the running guests.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Closes every connection and removes every socket file.
    pub fn stop_all(&self) {
        for (_, entry) in std::mem::take(&mut *self.lock()) {
            entry.server.stop();
        }
        if let Some(listeners) = self.listeners() {
            listeners.stop();
        }
    }

    /// Every guest's counters and limits, configured guests by name, then
    /// the ones a listener's default policy let in.
    pub fn guest_statuses(&self) -> Vec<GuestStatus> {
        let now = Instant::now();
        let configured: Vec<(Arc<Guest>, &'static str, String, Option<u32>)> = self
            .lock()
            .values()
            .map(|entry| {
                let endpoint = &entry.spec.endpoint;
                let guest = Arc::clone(entry.server.guest());
                let process = entry.server.process();
                (guest, endpoint.key().as_str(), endpoint.value(), process)
            })
            .collect();
        let automatic = self
            .listeners()
            .and_then(|l| l.vsock.as_ref())
            .map(|vsock| vsock.directory().automatic())
            .unwrap_or_default()
            .into_iter()
            .map(|(cid, guest)| (guest, "cid", cid.to_string(), None));
        configured
            .into_iter()
            .chain(automatic)
            .map(|(guest, endpoint, address, process)| {
                let stats = guest.stats.snapshot();
                let limits = guest.limits();
                GuestStatus {
                    name: guest.name().to_owned(),
                    endpoint: endpoint.into(),
                    path: address,
                    connected: stats.connected,
                    connections: stats.connections,
                    requests: stats.requests,
                    bytes: stats.bytes,
                    defective_requests: stats.defective_requests,
                    throttled_seconds: stats.throttled.as_secs_f64(),
                    current_rate: guest.current_rate(now),
                    rate_bytes: limits.rate.map(|r| r.bytes()),
                    rate_period_ms: limits.rate.map(|r| r.period().as_millis() as u64),
                    burst: limits.rate.map(|r| r.burst()),
                    weight: limits.weight,
                    refused_connections: stats.refused_connections,
                    evicted_connections: stats.evicted_connections,
                    wrong_key_connections: stats.wrong_key_connections,
                    process,
                }
            })
            .collect()
    }

    /// The whole daemon: version, uptime, guests, pool, sources and
    /// listeners.
    pub fn status(&self) -> DaemonStatus {
        let life = self.lifecycle();
        DaemonStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            started_at: life.started_at,
            upgrades: life.upgrades,
            worker_restarts: life.worker_restarts,
            last_worker_exit: life.last_worker_exit,
            last_upgrade_error: life.last_upgrade_error,
            upgrade_failures: life.upgrade_failures,
            max_rate: *self.max_rate.lock().unwrap_or_else(|e| e.into_inner()),
            guests: self.guest_statuses(),
            pool: PoolStatus {
                mode: self.pool.mode().as_str().into(),
                level: self.pool.level() as u64,
                capacity: self.pool.capacity() as u64,
                sources: self
                    .pool
                    .sources()
                    .iter()
                    .map(|s| SourceStatus::from_snapshot(&s.snapshot()))
                    .collect(),
            },
            listeners: self
                .listeners()
                .map(Listeners::statuses)
                .unwrap_or_default(),
            sandbox: crate::service::sandbox::status(),
            isolation: self.isolation().as_str().into(),
        }
    }
}

/// New names and paths must not clash with each other or with running
/// guests, except with those in `leaving`.
fn check_unique(
    running: &BTreeMap<String, Entry>,
    new: &[GuestSpec],
    leaving: &[String],
) -> Result<(), RegistryError> {
    let staying = || running.values().filter(|e| !leaving.contains(&e.spec.name));
    for (i, spec) in new.iter().enumerate() {
        if staying().any(|e| e.spec.name == spec.name)
            || new[..i].iter().any(|s| s.name == spec.name)
        {
            return Err(RegistryError::Exists(spec.name.clone()));
        }
        let address = spec.endpoint.address();
        let holder = staying()
            .map(|e| &e.spec)
            .chain(new[..i].iter())
            .find(|other| other.endpoint.address() == address);
        if let Some(other) = holder {
            return Err(RegistryError::PathInUse {
                name: spec.name.clone(),
                path: address.to_string(),
                other: other.name.clone(),
            });
        }
    }
    Ok(())
}

/// The running TCP guests, among `specs`, whose key file now holds a key
/// other than the one they started with. A key file that cannot be read
/// fails the whole reload, as a new guest's would.
fn rekeyed_guests(
    running: &BTreeMap<String, Entry>,
    specs: &[GuestSpec],
) -> Result<Vec<String>, RegistryError> {
    let mut rekeyed = Vec::new();
    for spec in specs {
        let GuestEndpoint::TcpPsk(path) = &spec.endpoint else {
            continue;
        };
        let Some(entry) = running.get(&spec.name) else {
            continue;
        };
        if entry.spec.endpoint != spec.endpoint {
            continue;
        }
        let key = Psk::load(path).map_err(|error| RegistryError::Key {
            name: spec.name.clone(),
            error,
        })?;
        if entry.key.as_ref() != Some(&key) {
            info!("guest {}: its key file holds a new key", spec.name);
            rekeyed.push(spec.name.clone());
        }
    }
    Ok(rekeyed)
}

fn close_prepared(prepared: Vec<Result<Prepared, GuestSpec>>) {
    for ready in prepared.into_iter().flatten() {
        match ready.endpoint {
            Opened::VhostUser(Endpoint::Listen(socket))
            | Opened::Egd(socket)
            | Opened::Channel(socket) => socket.remove(),
            Opened::Fifo(path, fifo) if fifo.created => remove_fifo(&path, fifo.identity),
            Opened::VhostUser(Endpoint::Connect(_))
            | Opened::Vsock(..)
            | Opened::Tcp(..)
            | Opened::Fifo(..) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Arc<Registry> {
        let pool = crate::entropy::pool::os_pool();
        Registry::new(pool, SocketAccess::default(), VhostUserLimits::default())
    }

    /// An EGD guest named `name` with its socket in `dir`.
    fn egd_guest(dir: &tempfile::TempDir, name: &str) -> GuestSpec {
        let path = dir.path().join(format!("{name}.egd"));
        format!("name={name},egd={}", path.display())
            .parse()
            .unwrap()
    }

    #[test]
    fn a_reload_to_no_guests_is_refused_unless_the_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry();
        registry
            .apply(vec![egd_guest(&dir, "vm1"), egd_guest(&dir, "vm2")])
            .unwrap();
        registry.add(egd_guest(&dir, "runtime")).unwrap();

        // An empty file: nothing changes, and the operator is told why.
        let error = registry.reload(vec![], false).unwrap_err();
        assert!(matches!(error, RegistryError::WouldRemoveAll(_)), "{error}");
        assert_eq!(
            error.to_string(),
            "the new configuration has no guests and would remove all 2 running guests \
             (vm1, vm2); write `guest = []` in the config file to mean that"
        );
        assert_eq!(registry.names(), ["runtime", "vm1", "vm2"]);
        assert!(dir.path().join("vm1.egd").exists());

        // `guest = []`: the file's guests go, the runtime one stays.
        let summary = registry.reload(vec![], true).unwrap();
        assert_eq!(summary.removed, ["vm1", "vm2"]);
        assert_eq!(registry.names(), ["runtime"]);
        assert!(!dir.path().join("vm1.egd").exists());

        // With only runtime guests left there is nothing to protect.
        assert_eq!(
            registry.reload(vec![], false).unwrap(),
            ReloadSummary::default()
        );
        assert_eq!(registry.names(), ["runtime"]);
        registry.stop_all();
    }

    #[test]
    fn a_reload_whose_guests_all_changed_name_is_an_ordinary_one() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry();
        registry.apply(vec![egd_guest(&dir, "old")]).unwrap();
        let error = registry.reload(vec![], false).unwrap_err().to_string();
        assert!(error.contains("remove the running guest old;"), "{error}");

        // It removes every running guest but does not end with none.
        let summary = registry
            .reload(vec![egd_guest(&dir, "new")], false)
            .unwrap();
        assert_eq!(
            (summary.added, summary.removed),
            (vec!["new".to_owned()], vec!["old".to_owned()])
        );
        assert_eq!(registry.names(), ["new"]);
        registry.stop_all();
    }

    #[test]
    fn status_lists_the_shared_listeners_the_daemon_runs() {
        let without = registry();
        assert!(without.status().listeners.is_empty());

        let with_tcp = registry();
        let tcp = TcpListener::start("127.0.0.1:0".parse().unwrap()).unwrap();
        with_tcp.set_listeners(Listeners {
            vsock: None,
            tcp: Some(Arc::clone(&tcp)),
        });
        let listeners = with_tcp.status().listeners;
        assert_eq!(listeners.len(), 1);
        assert_eq!(listeners[0].kind, "tcp");
        assert_eq!(listeners[0].address, tcp.local_addr().to_string());
        assert_eq!(listeners[0], tcp.status());
        with_tcp.stop_all();
    }

    #[test]
    fn a_reload_picks_up_a_new_key_in_a_tcp_guests_key_file() {
        use std::os::unix::fs::PermissionsExt;
        use vhost_rng_protocol::noise;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xen1.psk");
        let old = noise::write_new_psk(&path).unwrap();
        let registry = registry();
        let tcp = TcpListener::start("127.0.0.1:0".parse().unwrap()).unwrap();
        registry.set_listeners(Listeners {
            vsock: None,
            tcp: Some(Arc::clone(&tcp)),
        });
        let spec: GuestSpec = format!("name=xen1,tcp-psk={}", path.display())
            .parse()
            .unwrap();
        let key_served = || {
            tcp.directory()
                .get(&"xen1".to_owned())
                .map(|member| member.credential.clone())
        };
        registry.apply(vec![spec.clone()]).unwrap();
        assert_eq!(key_served(), Some(old.clone()));

        // The same file, the same key: nothing to do.
        let summary = registry.apply(vec![spec.clone()]).unwrap();
        assert_eq!(summary.unchanged, 1);

        // A new key in the same file: the guest is served with it.
        std::fs::remove_file(&path).unwrap();
        let new = noise::write_new_psk(&path).unwrap();
        let summary = registry.apply(vec![spec.clone()]).unwrap();
        assert_eq!(summary.added, ["xen1"], "{summary:?}");
        assert_eq!(key_served(), Some(new.clone()));
        assert_ne!(old, new);

        // A key file gone bad fails the reload and keeps the running key.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = registry.apply(vec![spec]).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        assert_eq!(key_served(), Some(new));
        registry.stop_all();
    }

    #[test]
    fn a_reload_that_fails_after_old_guests_left_says_it_was_applied_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        // A VMM listening on the path, as for connect=.
        let _vmm = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let registry = registry();
        let spec = |text: String| -> GuestSpec { text.parse().unwrap() };
        registry
            .apply(vec![spec(format!("name=vm1,connect={}", path.display()))])
            .unwrap();
        // The same path as a socket the daemon would create: it can only
        // try once the connect= guest has left, and the VMM's live socket
        // is still there.
        let error = registry
            .apply(vec![spec(format!("name=vm1,socket={}", path.display()))])
            .unwrap_err();
        assert!(matches!(error, RegistryError::PartlyApplied(_)), "{error}");
        assert!(
            error.to_string().contains("applied only in part"),
            "{error}"
        );
        assert!(registry.names().is_empty());
        registry.stop_all();
    }
}
