// SPDX-License-Identifier: Apache-2.0
//! In-place upgrades: the running daemon re-executes its binary from disk,
//! keeping its pid, and hands the new version every guest's sockets and
//! state, so no VMM sees its connection drop.
//!
//! The hand-over is a versioned [`DaemonState`] record (JSON) in a memfd
//! whose number is in `$VHOST_RNG_UPGRADE_STATE`, and the descriptors it
//! names, inherited across `execve` (the record holds their numbers). Before
//! anything is stopped, the new binary is asked which record versions it
//! reads (`vhost-rng upgrade-state-version`): a binary that does not run, or
//! does not read this version, is refused and the running daemon goes on.
//!
//! What is carried: every guest's listening socket, a vhost-user guest's
//! VMM connection with its negotiated state ([`ConnectionState`]), an EGD or
//! channel guest's connected clients, token-bucket levels and counters,
//! guests added at runtime, the start time and the count of upgrades, and
//! the listening sockets all guests share (vsock, TCP, control, metrics;
//! [`crate::service::shared_sockets`]). Not carried: connections to those
//! being answered (an agent mid-request reconnects), and DRBG state, which
//! is reseeded, never restored.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::{info, warn};

use crate::config::GuestSpec;
use crate::frontend::Handover;
use crate::frontend::vhost_user::snapshot::ConnectionState;
use crate::guest::GuestStats;
use crate::service::registry::{Carried, Registry};

/// The layout version of [`DaemonState`]; a reader refuses any other.
pub const UPGRADE_STATE_VERSION: u32 = 1;
/// The variable naming the memfd that holds the record.
pub const STATE_ENV: &str = "VHOST_RNG_UPGRADE_STATE";

/// Everything the new version needs to go on serving.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonState {
    /// [`UPGRADE_STATE_VERSION`] of the writer.
    pub version: u32,
    /// The version of the daemon that wrote the record.
    pub written_by: String,
    /// When the daemon first started (seconds since the Unix epoch); kept
    /// across upgrades.
    pub started_at: u64,
    /// Upgrades so far, this one included.
    pub upgrades: u64,
    /// Every guest served.
    pub guests: Vec<GuestState>,
    /// The listening sockets shared by guests (vsock, TCP), the control
    /// socket and the metrics port, by key (see
    /// [`crate::service::shared_sockets`]).
    #[serde(default)]
    pub shared: Vec<(String, RawFd)>,
}

/// One guest as handed over. Descriptors are the numbers they have in the
/// new process (inherited across execve).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestState {
    /// The guest's spec, as `--guest` takes it.
    pub spec: String,
    /// Added over the control socket, so not in the config file.
    pub runtime: bool,
    /// A listening socket passed by systemd or `--fd` that no serving
    /// process has taken up yet (see [`crate::service::activation`]): a
    /// configured guest of the same name and path takes it and stays
    /// configured. Absent (false) in records of earlier versions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub activated: bool,
    /// The listening socket (`socket=`, `egd=`, `vsock-uds=` guests).
    pub listener: Option<RawFd>,
    /// A vhost-user guest's VMM connection and its state.
    pub connection: Option<ConnectionHandover>,
    /// An EGD or channel guest's connected clients.
    pub clients: Vec<RawFd>,
    /// Tokens in the guest's bucket, in bytes.
    pub tokens: Option<u64>,
    /// Its counters.
    pub counters: Counters,
}

/// A vhost-user connection: its socket and its device state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionHandover {
    /// The VMM's connection.
    pub socket: RawFd,
    /// What it negotiated, its memory table and its ring.
    pub state: ConnectionState,
    /// The descriptors `state` indexes, in order.
    pub fds: Vec<RawFd>,
}

/// A guest's counters, so status and metrics do not restart from zero.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    /// VMM or client connections so far.
    pub connections: u64,
    /// Requests answered.
    pub requests: u64,
    /// Random bytes served.
    pub bytes: u64,
    /// Requests answered with 0 bytes for a defect.
    pub defective_requests: u64,
    /// Time requests waited for tokens, in nanoseconds.
    pub throttled_ns: u64,
    /// Clients turned away.
    pub refused_connections: u64,
    /// Idle clients closed to make room.
    pub evicted_connections: u64,
    /// TCP handshakes without the guest's key.
    pub wrong_key_connections: u64,
}

impl Counters {
    /// The counters of a running guest.
    pub fn of(stats: &GuestStats) -> Counters {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        Counters {
            connections: load(&stats.connections),
            requests: load(&stats.requests),
            bytes: load(&stats.bytes),
            defective_requests: load(&stats.defective_requests),
            throttled_ns: load(&stats.throttled_ns),
            refused_connections: load(&stats.refused_connections),
            evicted_connections: load(&stats.evicted_connections),
            wrong_key_connections: load(&stats.wrong_key_connections),
        }
    }

    /// Puts the counters back into a new guest's.
    pub fn restore(&self, stats: &GuestStats) {
        let store =
            |counter: &std::sync::atomic::AtomicU64, value| counter.store(value, Ordering::Relaxed);
        store(&stats.connections, self.connections);
        store(&stats.requests, self.requests);
        store(&stats.bytes, self.bytes);
        store(&stats.defective_requests, self.defective_requests);
        store(&stats.throttled_ns, self.throttled_ns);
        store(&stats.refused_connections, self.refused_connections);
        store(&stats.evicted_connections, self.evicted_connections);
        store(&stats.wrong_key_connections, self.wrong_key_connections);
    }
}

/// Why an upgrade did not happen (the running daemon goes on serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The binary on disk could not be started.
    #[error("the new binary {path} does not run: {error}")]
    NotRunnable {
        /// The binary.
        path: PathBuf,
        /// Why it did not start.
        #[source]
        error: std::io::Error,
    },
    /// The binary reads another state version.
    #[error(
        "the new binary {path} reads upgrade state version(s) {reads:?}, not version \
         {UPGRADE_STATE_VERSION}: restart the daemon instead"
    )]
    Version {
        /// The binary.
        path: PathBuf,
        /// What it said it reads.
        reads: String,
    },
    /// The state record or its descriptors could not be prepared.
    #[error("cannot write the upgrade state: {0}")]
    State(#[source] std::io::Error),
    /// execve failed.
    #[error("cannot execute {path}: {error}")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// Why execve failed.
        #[source]
        error: nix::Error,
    },
    /// A guest could not be parked or captured.
    #[error("{0}")]
    Handover(String),
}

/// Why inherited state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    /// The variable does not hold a descriptor number.
    #[error("{STATE_ENV}={0}: not a descriptor number")]
    BadFd(String),
    /// The record could not be read.
    #[error("reading the upgrade state: {0}")]
    Read(#[source] std::io::Error),
    /// The record is not valid JSON of the expected shape.
    #[error("the upgrade state does not parse: {0}")]
    Parse(#[source] serde_json::Error),
    /// The record is of another version.
    #[error(
        "upgrade state version {found} (written by vhost-rng {written_by}); this binary reads \
         only version {UPGRADE_STATE_VERSION}"
    )]
    Version {
        /// The record's version.
        found: u32,
        /// The daemon version that wrote it.
        written_by: String,
    },
}

/// Asks `binary` which upgrade state version it reads; `Ok` if this one.
pub fn check_binary(binary: &Path) -> Result<(), UpgradeError> {
    let output = std::process::Command::new(binary)
        .arg("upgrade-state-version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| UpgradeError::NotRunnable {
            path: binary.to_owned(),
            error,
        })?;
    let reads = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() && reads == UPGRADE_STATE_VERSION.to_string() {
        Ok(())
    } else {
        Err(UpgradeError::Version {
            path: binary.to_owned(),
            reads: if reads.is_empty() {
                format!("none ({})", output.status)
            } else {
                reads
            },
        })
    }
}

/// Writes `state` to a memfd the new process inherits, and marks every
/// descriptor it names (and the memfd) to survive execve.
pub fn write_state(state: &DaemonState, keep: &[RawFd]) -> Result<OwnedFd, UpgradeError> {
    let record = write_record(state).map_err(UpgradeError::State)?;
    // The record itself must be inherited too.
    inherit(record.as_raw_fd()).map_err(UpgradeError::State)?;
    for &fd in keep {
        inherit(fd).map_err(UpgradeError::State)?;
    }
    Ok(record)
}

/// `state` as JSON in a new memfd (close-on-exec), read from its start by
/// whoever inherits it.
pub fn write_record(state: &DaemonState) -> std::io::Result<OwnedFd> {
    write_json(state)
}

/// `value` as JSON in a new memfd (close-on-exec), rewound, for the next
/// process image to read (the daemon's record, or the top process's own).
pub fn write_json<T: Serialize>(value: &T) -> std::io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(
        c"vhost-rng-upgrade",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )?;
    let mut file = File::from(fd);
    let json = serde_json::to_vec(value)?;
    file.write_all(&json)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// Clears close-on-exec on `fd`.
fn inherit(fd: RawFd) -> std::io::Result<()> {
    set_inherited(fd, true)
}

/// Whether `fd` survives execve (clears or sets its close-on-exec flag).
pub fn set_inherited(fd: RawFd, inherited: bool) -> std::io::Result<()> {
    // SAFETY: the caller holds `fd` open for the duration of the call;
    // F_SETFD only changes its close-on-exec flag.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flag = if inherited {
        nix::fcntl::FdFlag::empty()
    } else {
        nix::fcntl::FdFlag::FD_CLOEXEC
    };
    nix::fcntl::fcntl(borrowed, nix::fcntl::FcntlArg::F_SETFD(flag))
        .map(drop)
        .map_err(std::io::Error::from)
}

/// Replaces this process with `binary`, same arguments, with the state in
/// `state_fd`. Returns only on failure.
pub fn exec(binary: &Path, args: &[OsString], state_fd: &OwnedFd) -> UpgradeError {
    let env = std::env::vars_os()
        .filter(|(key, _)| key != STATE_ENV)
        .chain([(
            OsString::from(STATE_ENV),
            OsString::from(state_fd.as_raw_fd().to_string()),
        )]);
    UpgradeError::Exec {
        path: binary.to_owned(),
        error: execve(binary, args, env),
    }
}

/// Replaces this process with `binary` and `args`, environment as it is.
/// Returns only on failure.
pub fn exec_plain(binary: &Path, args: &[OsString]) -> nix::Error {
    execve(binary, args, std::env::vars_os())
}

fn execve(
    binary: &Path,
    args: &[OsString],
    env: impl Iterator<Item = (OsString, OsString)>,
) -> nix::Error {
    let to_c = |s: OsString| CString::new(s.into_vec()).unwrap_or_default();
    let path = to_c(binary.as_os_str().to_owned());
    let argv: Vec<CString> = args.iter().cloned().map(to_c).collect();
    let env: Vec<CString> = env
        .map(|(key, value)| {
            let mut pair = key.into_vec();
            pair.push(b'=');
            pair.extend(value.into_vec());
            CString::new(pair).unwrap_or_default()
        })
        .collect();
    match nix::unistd::execve(&path, &argv, &env) {
        Err(error) => error,
        Ok(never) => match never {},
    }
}

/// The state a previous version handed over, if this process was started
/// by an upgrade. The variable is removed so that children do not see it.
pub fn inherited() -> Result<Option<DaemonState>, InheritError> {
    let Some(value) = std::env::var_os(STATE_ENV) else {
        return Ok(None);
    };
    // SAFETY: no other thread runs yet at start-up, when this is called.
    unsafe { std::env::remove_var(STATE_ENV) };
    let text = value.to_string_lossy().into_owned();
    let fd: RawFd = text
        .parse()
        .map_err(|_| InheritError::BadFd(text.clone()))?;
    if fd < 0 {
        return Err(InheritError::BadFd(text));
    }
    // SAFETY: the previous version passed this descriptor, open and ours
    // alone, under this name; nothing else in this process refers to it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut json = Vec::new();
    file.read_to_end(&mut json).map_err(InheritError::Read)?;
    drop(file);
    let state = parse_state(&json)?;
    Ok(Some(state))
}

/// Parses a record, refusing versions other than this one.
pub fn parse_state(json: &[u8]) -> Result<DaemonState, InheritError> {
    parse_versioned(json)
}

/// Parses a versioned record (a `version` field, and `written_by`), refusing
/// versions other than [`UPGRADE_STATE_VERSION`] before the rest is read:
/// the upgrade record and each guest's record in systemd's store.
pub fn parse_versioned<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, InheritError> {
    #[derive(Deserialize)]
    struct Header {
        version: u32,
        #[serde(default)]
        written_by: String,
    }
    let header: Header = serde_json::from_slice(json).map_err(InheritError::Parse)?;
    if header.version != UPGRADE_STATE_VERSION {
        return Err(InheritError::Version {
            found: header.version,
            written_by: header.written_by,
        });
    }
    serde_json::from_slice(json).map_err(InheritError::Parse)
}

/// Takes ownership of an inherited descriptor named by the record.
///
/// # Safety
///
/// `fd` must be a descriptor the previous version handed over, taken only
/// once.
pub unsafe fn adopt(fd: RawFd) -> OwnedFd {
    // Not inherited by anything this process runs later.
    let _ = set_inherited(fd, false);
    // SAFETY: the caller's contract.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// How long each guest has to reach a safe point: a vhost-user guest's
/// longest wait is for a begun message, bounded by the vhost-user timeout
/// (10 s by default); an EGD or channel session's, the command it is
/// answering (a blocking read waiting for tokens).
const HANDOVER_PATIENCE: Duration = Duration::from_secs(15);

/// Upgrades the daemon in place: checks the binary on disk, parks every
/// guest, writes the state and executes the binary. Returns only if the
/// upgrade did not happen, after every guest went back to serving.
///
/// `also_inherit` (the serving process's link to the top process) is passed
/// to the new image too, and kept open if the upgrade does not happen.
pub fn perform(registry: &Registry, also_inherit: Option<RawFd>) -> Result<(), UpgradeError> {
    let life = registry.lifecycle();
    check_binary(&life.binary)?;
    let handed = registry
        .handover_all(HANDOVER_PATIENCE)
        .map_err(UpgradeError::Handover)?;
    let mut kept: Vec<RawFd> = Vec::new();
    let guests = handed
        .into_iter()
        .map(|guest| {
            guest_state(
                &guest.spec,
                guest.runtime,
                guest.handover,
                guest.tokens,
                guest.counters,
                |fd| {
                    let raw = fd.into_raw_fd();
                    kept.push(raw);
                    raw
                },
            )
        })
        .collect();
    let shared = crate::service::shared_sockets::hand_over(|fd| {
        let raw = fd.into_raw_fd();
        kept.push(raw);
        raw
    });
    let state = DaemonState {
        version: UPGRADE_STATE_VERSION,
        written_by: env!("CARGO_PKG_VERSION").into(),
        started_at: life.started_at,
        upgrades: life.upgrades + 1,
        guests,
        shared,
    };
    info!(
        "upgrading in place: executing {} with {} guest(s)",
        life.binary.display(),
        state.guests.len()
    );
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some(fd) = also_inherit
        && let Err(e) = inherit(fd)
    {
        registry.thaw_all();
        return Err(UpgradeError::State(e));
    }
    let error = match write_state(&state, &kept) {
        Ok(state_fd) => exec(&life.binary, &args, &state_fd),
        Err(error) => error,
    };
    for fd in kept {
        // SAFETY: each was an OwnedFd given up above for the record; the
        // record is unused, so this is its only owner again.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    if let Some(fd) = also_inherit {
        let _ = set_inherited(fd, false);
    }
    registry.thaw_all();
    Err(error)
}

/// A guest's record: `keep` takes each descriptor and says how the record
/// names it (its number for an upgrade, an index for a report to the top
/// process).
pub fn guest_state(
    spec: &GuestSpec,
    runtime: bool,
    handover: Handover,
    tokens: Option<u64>,
    counters: Counters,
    mut keep: impl FnMut(OwnedFd) -> RawFd,
) -> GuestState {
    let (listener, connection, clients) = match handover {
        Handover::Nothing | Handover::Failed(_) => (None, None, Vec::new()),
        Handover::VhostUser {
            listener,
            connection,
        } => (
            listener.map(&mut keep),
            connection.map(|c| ConnectionHandover {
                socket: keep(c.socket),
                state: c.state,
                fds: c.fds.into_iter().map(&mut keep).collect(),
            }),
            Vec::new(),
        ),
        Handover::Stream { listener, clients } => (
            Some(keep(listener)),
            None,
            clients.into_iter().map(&mut keep).collect(),
        ),
    };
    GuestState {
        spec: spec.to_string(),
        runtime,
        activated: false,
        listener,
        connection,
        clients,
        tokens,
        counters,
    }
}

/// Turns a handed-over record into guests this daemon takes up and the
/// shared listening sockets, owning their descriptors. A guest whose spec
/// no longer parses is dropped, its descriptors closed.
pub fn take_over(state: DaemonState) -> (Vec<Carried>, Vec<(String, OwnedFd)>) {
    // Only ever called here, once per descriptor the record names.
    let take = |fd: RawFd| {
        // SAFETY: the previous version handed these descriptors over in
        // this record, each named once, and nothing else owns them.
        unsafe { adopt(fd) }
    };
    let shared = state
        .shared
        .into_iter()
        .map(|(key, fd)| (key, take(fd)))
        .collect();
    let mut carried = Vec::new();
    for guest in state.guests {
        let listener = guest.listener.map(take);
        let connection = guest.connection.map(|c| {
            let socket = UnixStream::from(take(c.socket));
            let fds = c.fds.into_iter().map(take).collect();
            (socket, c.state, fds)
        });
        let clients = guest
            .clients
            .into_iter()
            .map(|fd| UnixStream::from(take(fd)))
            .collect();
        match guest.spec.parse::<GuestSpec>() {
            Ok(spec) => carried.push(Carried {
                spec,
                runtime: guest.runtime,
                activated: guest.activated,
                listener,
                connection,
                clients,
                tokens: guest.tokens,
                counters: guest.counters,
            }),
            Err(e) => warn!(
                "a guest the previous daemon handed over has a spec this version refuses \
                 ({}: {e}); its connections are closed",
                guest.spec
            ),
        }
    }
    (carried, shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_another_version_is_refused_with_who_wrote_it() {
        let json = br#"{"version": 2, "written_by": "9.9.9", "started_at": 0}"#;
        let err = parse_state(json).unwrap_err();
        assert!(
            matches!(err, InheritError::Version { found: 2, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("written by vhost-rng 9.9.9"),
            "{err}"
        );
        assert!(matches!(parse_state(b"{"), Err(InheritError::Parse(_))));
    }

    #[test]
    fn a_record_round_trips() {
        let state = DaemonState {
            version: UPGRADE_STATE_VERSION,
            written_by: "0.1.0".into(),
            started_at: 1,
            upgrades: 2,
            guests: vec![GuestState {
                spec: "name=vm1,socket=/run/vhost-rng/vm1.sock".into(),
                runtime: false,
                activated: false,
                listener: Some(7),
                connection: None,
                clients: vec![9],
                tokens: Some(100),
                counters: Counters::default(),
            }],
            shared: vec![("tcp@127.0.0.1:5565".into(), 8)],
        };
        let json = serde_json::to_vec(&state).unwrap();
        let back = parse_state(&json).unwrap();
        assert_eq!(back.guests[0].listener, Some(7));
        assert_eq!(back.upgrades, 2);
        assert_eq!(back.shared, [("tcp@127.0.0.1:5565".to_owned(), 8)]);
    }
}
