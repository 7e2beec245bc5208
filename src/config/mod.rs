//! Configuration for many guests, shared by the command line and the
//! `--config` TOML file.
//!
//! A guest is named and placed on the command line as
//! `name=NAME,socket=PATH[,rate-bytes=N][,rate-period=MS][,burst=N][,weight=W]`
//! (or `connect=PATH`, `egd=PATH` or `vsock-uds=PATH` instead of
//! `socket=PATH`), parsed by
//! [`GuestSpec`]'s `FromStr`, and in the file as a `[[guest]]` table with the
//! same keys. [`EXAMPLE`] is a complete, commented file.
//!
//! The file is read with toml's spanned document parser
//! ([`toml::de::DeTable`]) rather than derived serde structures, so every
//! key and value keeps its position: each error names the file, the line,
//! the key and, inside a `[[guest]]`, the guest. The whole file is checked
//! before [`ConfigFile`] is returned, so a bad file (say, on reload) can be
//! rejected whole.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::unistd::{Gid, Group};
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::entropy::pool::Mode;
use crate::entropy::source::SourceSpec;
use crate::guest::limiter::{self, MAX_BURST, MAX_BYTES, MAX_PERIOD_MS};

/// A complete configuration file, with every key explained.
pub const EXAMPLE: &str = r#"# all top-level keys optional

# Entropy sources, in the same SPEC form as --source: hwrng[=PATH], rdseed,
# file=PATH or os, each optionally followed by ,min-entropy=BITS (per byte).
# Leave the key out to use every hardware source that works on this host.
sources = ["hwrng", "rdseed"]      # same SPEC strings as --source

# How guests are served. drbg: each guest gets its own DRBG, seeded and
# reseeded from conditioned hardware entropy. raw: guests share conditioned
# full-entropy output only.
mode = "drbg"                      # or "raw"

# In drbg mode, reseed each guest's DRBG after at most this many bytes...
reseed-bytes = 1048576
# ...and after at most this many seconds, whichever comes first.
reseed-secs = 60

# Most bytes per second handed out to all guests together. Leave the key out
# for no overall limit.
max-rate = 1048576                 # global cap, bytes per second, optional

# Permission bits of the socket files the daemon creates, as octal digits in
# quotes (a bare 0660 is not a TOML number).
socket-mode = "0660"               # string, octal
# Group (name or number) owning those socket files; together with
# socket-mode "0660" it lets that group's VMMs connect.
socket-group = "kvm"

# Unix socket on which the daemon takes control commands.
control = "/run/vhost-rng/control.sock"
# Address and port (IP:PORT) on which the daemon serves its metrics.
metrics = "127.0.0.1:9564"

# AF_VSOCK port for guests given by cid= (kernel vhost-vsock); the agent in
# the guest connects to vsock:2:PORT.
vsock = 5564
# Bytes per second for guests whose CID no [[guest]] has; leave the key out
# to refuse them.
vsock-default-rate = 4096
# Address and port (IP:PORT) of the encrypted TCP listener for guests given
# by tcp-psk= (Xen guests without vsock). Never plaintext. Use the host's
# address on the guests' network; 127.0.0.1 here only reaches local agents.
listen-tcp = "127.0.0.1:5565"

# What one vhost-user connection (one VMM) may cost the daemon. The defaults
# fit any real VM; lower them on hosts whose VMs are small.
# Guest memory regions it may map (also the slots offered to the VMM).
vhost-user-max-regions = 509
# Bytes of guest memory it may map, all regions together (16 TiB).
vhost-user-max-memory = 17592186044416
# Seconds a new connection has to claim the device (SET_OWNER).
vhost-user-setup-timeout = 10

# Limits for every [[guest]] that does not set the key itself.
[defaults]                         # applied to every [[guest]] that does not set the key
# Rate limit: at most rate-bytes bytes every rate-period milliseconds. A
# guest without rate-bytes is not limited.
rate-bytes = 16384
# Length of the rate-limit period in milliseconds (default 1000).
rate-period = 1000
# Most bytes a guest may take in one burst (default: its rate-bytes). A guest
# that sets its own rate-bytes but no burst gets a burst of its own rate.
burst = 16384
# Relative share of a guest when guests compete, 1 to 1000 (default 1).
weight = 1

# One [[guest]] table per guest, with the keys of --guest:
#   name     1 to 64 letters, digits, '.', '_' or '-'; unique in the file
#   socket   a socket the daemon creates and listens on (QEMU: -chardev
#            socket,path=PATH), or instead
#   connect  a socket the VMM listens on (QEMU: -chardev
#            socket,path=PATH,server=on); the daemon connects to it, or
#   egd      a socket the daemon listens on speaking the EGD protocol, for
#            QEMU rng-egd / libvirt <backend model='egd'> (no vhost-user), or
#   vsock-uds  hybrid vsock: the daemon listens on PATH_5564 for the
#            in-guest agent (vhost-rng agent --connect vsock:2:5564), or
#   cid      AF_VSOCK: the guest with this CID, on the --vsock PORT listener
#            (vhost-vsock); the agent connects to vsock:2:PORT, or
#   tcp-psk  TCP: the guest holding the pre-shared key in this file (made by
#            vhost-rng psk new PATH), on the --listen-tcp ADDR listener; the
#            agent connects to tcp:HOST:PORT --psk-file --name
#   rate-bytes, rate-period, burst, weight: as in [defaults], which they override
# A file meant to have no guests says so with guest = [] instead of tables: a
# reload of a file with neither, which would remove every running guest, is
# refused (an empty or truncated file is likelier than that wish).
[[guest]]
name = "vm1"
socket = "/run/vhost-rng/vm1.sock"
rate-bytes = 65536

[[guest]]
name = "vm2"
connect = "/run/qemu/vm2-rng.sock"

[[guest]]
name = "legacy"
egd = "/run/vhost-rng/legacy.egd"

[[guest]]
name = "vm3"
cid = 3

[[guest]]
name = "xen1"
tcp-psk = "/etc/vhost-rng/keys/xen1.psk"
"#;

/// Rate-limit period when a guest has `rate-bytes` but no `rate-period`.
pub const DEFAULT_RATE_PERIOD_MS: u64 = limiter::DEFAULT_PERIOD_MS;
/// Weight of a guest that does not set one.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest weight a guest may have.
pub const MAX_WEIGHT: u32 = 1000;
/// Longest guest name, in characters.
pub const MAX_NAME_LEN: usize = 64;
/// The lowest vsock CID a guest can have: 0, 1 and 2 are the hypervisor,
/// local loopback and the host.
pub const FIRST_GUEST_CID: u32 = 3;
/// `VMADDR_CID_ANY`, a wildcard rather than a guest.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// The keys a configuration file may have at its top level.
pub const FILE_KEYS: [&str; 17] = [
    "sources",
    "mode",
    "reseed-bytes",
    "reseed-secs",
    "max-rate",
    "socket-mode",
    "socket-group",
    "control",
    "metrics",
    "vsock",
    "vsock-default-rate",
    "listen-tcp",
    "vhost-user-max-regions",
    "vhost-user-max-memory",
    "vhost-user-setup-timeout",
    "defaults",
    "guest",
];

/// Where a guest's VMM meets the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GuestEndpoint {
    /// The daemon creates this socket and listens on it.
    Socket(PathBuf),
    /// The VMM listens on this socket; the daemon connects to it.
    Connect(PathBuf),
    /// The daemon listens on this socket and speaks the EGD protocol (QEMU
    /// `rng-egd`, libvirt `<backend model='egd'>`).
    Egd(PathBuf),
    /// Hybrid vsock (Firecracker, cloud-hypervisor, vhost-device-vsock): the
    /// daemon listens on `PATH_PORT` and speaks the vhost-rng channel
    /// protocol to the in-guest agent.
    VsockUds(PathBuf),
    /// AF_VSOCK: the guest with this CID, on the daemon's `--vsock PORT`
    /// listener, speaking the channel protocol.
    Cid(u32),
    /// TCP: the guest that proves it holds the pre-shared key in this file,
    /// on the daemon's `--listen-tcp ADDR` listener (Noise, never plaintext).
    TcpPsk(PathBuf),
}

/// What a guest's endpoint takes for itself: a path on the host or a vsock
/// CID. No two guests may share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Path(PathBuf),
    Cid(u32),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Path(path) => write!(f, "{}", path.display()),
            Address::Cid(cid) => write!(f, "vsock CID {cid}"),
        }
    }
}

impl GuestEndpoint {
    /// The endpoint's path, if it has one (all but `cid=`).
    pub fn path(&self) -> Option<&Path> {
        match self {
            GuestEndpoint::Socket(path)
            | GuestEndpoint::Connect(path)
            | GuestEndpoint::Egd(path)
            | GuestEndpoint::VsockUds(path)
            | GuestEndpoint::TcpPsk(path) => Some(path),
            GuestEndpoint::Cid(_) => None,
        }
    }

    /// Whether serving it creates a socket file at its path (rather than
    /// connecting to one, or using a key file or a CID).
    pub fn creates_socket(&self) -> bool {
        matches!(
            self,
            GuestEndpoint::Socket(_) | GuestEndpoint::Egd(_) | GuestEndpoint::VsockUds(_)
        )
    }

    pub fn address(&self) -> Address {
        match self {
            GuestEndpoint::Cid(cid) => Address::Cid(*cid),
            other => Address::Path(other.path().map(Path::to_owned).unwrap_or_default()),
        }
    }

    /// The value written after the key: a path or a CID.
    pub fn value(&self) -> String {
        match self {
            GuestEndpoint::Cid(cid) => cid.to_string(),
            other => other
                .path()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
        }
    }

    /// The key naming this kind of endpoint: `socket` or `connect`.
    pub fn key(&self) -> GuestKey {
        match self {
            GuestEndpoint::Socket(_) => GuestKey::Socket,
            GuestEndpoint::Connect(_) => GuestKey::Connect,
            GuestEndpoint::Egd(_) => GuestKey::Egd,
            GuestEndpoint::VsockUds(_) => GuestKey::VsockUds,
            GuestEndpoint::Cid(_) => GuestKey::Cid,
            GuestEndpoint::TcpPsk(_) => GuestKey::TcpPsk,
        }
    }
}

/// One guest: its name, its socket and its share of the entropy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// `[A-Za-z0-9._-]{1,64}`, unique among guests (names derived by
    /// [`GuestSpec::from_socket_shorthand`] are not held to the pattern).
    pub name: String,
    pub endpoint: GuestEndpoint,
    /// Bytes per `rate_period_ms`; `None` for no limit.
    pub rate_bytes: Option<u64>,
    /// Length of the rate-limit period; only meaningful with `rate_bytes`.
    pub rate_period_ms: u64,
    /// Largest burst in bytes; `None` means `rate_bytes` (see
    /// [`GuestSpec::burst_bytes`]).
    pub burst: Option<u64>,
    /// Relative share when guests compete, `1..=1000`.
    pub weight: u32,
}

impl GuestSpec {
    /// The guest of the `--socket PATH` / `--connect PATH` shorthand: named
    /// after the socket file (`/run/vm1.sock` -> `vm1`), not limited, of
    /// weight 1. Where several shorthand sockets share a file name, use
    /// [`shorthand_guests`], which names them by their whole paths instead.
    pub fn from_socket_shorthand(endpoint: GuestEndpoint) -> GuestSpec {
        let name = file_stem_name(endpoint.path().unwrap_or(Path::new("guest")));
        GuestSpec::unlimited(name, endpoint)
    }

    fn unlimited(name: String, endpoint: GuestEndpoint) -> GuestSpec {
        GuestSpec {
            name,
            endpoint,
            rate_bytes: None,
            rate_period_ms: DEFAULT_RATE_PERIOD_MS,
            burst: None,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// The burst in effect: `burst`, else `rate_bytes`; `None` without a
    /// rate limit.
    pub fn burst_bytes(&self) -> Option<u64> {
        self.rate_bytes.map(|rate| self.burst.unwrap_or(rate))
    }
}

/// The canonical command-line form, which parses back to the same spec.
/// Keys at their defaults are left out, and so are `rate-period` and
/// `burst` when there is no `rate-bytes`. A path containing `,` cannot be
/// written in this form.
impl fmt::Display for GuestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "name={},{}={}",
            self.name,
            self.endpoint.key(),
            self.endpoint.value()
        )?;
        if let Some(rate) = self.rate_bytes {
            write!(f, ",rate-bytes={rate}")?;
            if self.rate_period_ms != DEFAULT_RATE_PERIOD_MS {
                write!(f, ",rate-period={}", self.rate_period_ms)?;
            }
            if let Some(burst) = self.burst {
                write!(f, ",burst={burst}")?;
            }
        }
        if self.weight != DEFAULT_WEIGHT {
            write!(f, ",weight={}", self.weight)?;
        }
        Ok(())
    }
}

impl FromStr for GuestSpec {
    type Err = GuestSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(GuestSpecError::Empty);
        }
        let mut draft = Draft::default();
        for item in text.split(',') {
            if item.is_empty() {
                return Err(GuestSpecError::EmptyItem);
            }
            let (key_text, value) = match item.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (item, None),
            };
            let key = GuestKey::from_name(key_text)
                .ok_or_else(|| GuestSpecError::unknown_key(key_text, &GuestKey::ALL))?;
            let value = value.ok_or(GuestSpecError::MissingValue(key))?;
            draft.set_text(key, value)?;
        }
        draft.finish(&GuestDefaults::default())
    }
}

/// The keys of a guest, on the command line and in a `[[guest]]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestKey {
    Name,
    Socket,
    Connect,
    Egd,
    VsockUds,
    Cid,
    TcpPsk,
    RateBytes,
    RatePeriod,
    Burst,
    Weight,
}

impl GuestKey {
    /// Every key of a guest, in canonical order.
    pub const ALL: [GuestKey; 11] = [
        GuestKey::Name,
        GuestKey::Socket,
        GuestKey::Connect,
        GuestKey::Egd,
        GuestKey::VsockUds,
        GuestKey::Cid,
        GuestKey::TcpPsk,
        GuestKey::RateBytes,
        GuestKey::RatePeriod,
        GuestKey::Burst,
        GuestKey::Weight,
    ];

    /// The keys `[defaults]` may set.
    pub const DEFAULTS: [GuestKey; 4] = [
        GuestKey::RateBytes,
        GuestKey::RatePeriod,
        GuestKey::Burst,
        GuestKey::Weight,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GuestKey::Name => "name",
            GuestKey::Socket => "socket",
            GuestKey::Connect => "connect",
            GuestKey::Egd => "egd",
            GuestKey::VsockUds => "vsock-uds",
            GuestKey::Cid => "cid",
            GuestKey::TcpPsk => "tcp-psk",
            GuestKey::RateBytes => "rate-bytes",
            GuestKey::RatePeriod => "rate-period",
            GuestKey::Burst => "burst",
            GuestKey::Weight => "weight",
        }
    }

    pub fn from_name(name: &str) -> Option<GuestKey> {
        GuestKey::ALL.into_iter().find(|key| key.as_str() == name)
    }

    /// Whether the key takes a whole number (rather than text).
    fn is_number(self) -> bool {
        !matches!(
            self,
            GuestKey::Name
                | GuestKey::Socket
                | GuestKey::Connect
                | GuestKey::Egd
                | GuestKey::VsockUds
                | GuestKey::TcpPsk
        )
    }

    /// The largest value of a rate-limit key (the rate limiter's bounds).
    fn max_value(self) -> Option<u64> {
        match self {
            GuestKey::RateBytes => Some(MAX_BYTES),
            GuestKey::RatePeriod => Some(MAX_PERIOD_MS),
            GuestKey::Burst => Some(MAX_BURST),
            _ => None,
        }
    }

    /// What the operator may do instead of giving 0.
    fn zero_hint(self) -> &'static str {
        match self {
            GuestKey::RateBytes => "; omit rate-bytes for no limit",
            GuestKey::RatePeriod => " ms; omit rate-period for the default, 1000 ms",
            GuestKey::Burst => "; omit burst to use rate-bytes",
            _ => "",
        }
    }
}

impl fmt::Display for GuestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn key_list(keys: &[GuestKey]) -> String {
    keys.iter()
        .map(|key| key.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What is wrong with a guest's settings, on the command line or in one
/// `[[guest]]` (or `[defaults]`) table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestSpecError {
    #[error("the guest is empty; give name=NAME,socket=PATH or name=NAME,connect=PATH")]
    Empty,
    #[error("empty item between commas")]
    EmptyItem,
    #[error("unknown key '{key}' (valid: {})", key_list(.valid))]
    UnknownKey {
        key: String,
        valid: &'static [GuestKey],
    },
    #[error("key '{0}' has no value; write {0}=VALUE")]
    MissingValue(GuestKey),
    #[error("key '{0}' is given twice")]
    DuplicateKey(GuestKey),
    #[error("missing key 'name': every guest needs a name")]
    MissingName,
    #[error(
        "no endpoint: give socket=PATH for a vhost-user socket the daemon listens on, \
         connect=PATH for one the VMM listens on, egd=PATH for an EGD socket, \
         vsock-uds=PATH for the agent over hybrid vsock, cid=N for the agent over \
         AF_VSOCK, or tcp-psk=PATH for the agent over TCP"
    )]
    NoEndpoint,
    #[error(
        "more than one of 'socket', 'connect', 'egd', 'vsock-uds', 'cid' and 'tcp-psk' is \
         set; give only one"
    )]
    BothEndpoints,
    #[error(
        "key 'cid': {0} is not a guest CID ({FIRST_GUEST_CID} to {max}; 0 to 2 are the \
         hypervisor, local and host)",
        max = VSOCK_CID_ANY - 1
    )]
    CidOutOfRange(String),
    #[error("key 'name': {name:?} {problem}")]
    InvalidName { name: String, problem: NameProblem },
    #[error("key '{0}': the path is empty")]
    EmptyPath(GuestKey),
    #[error("key '{key}': '{value}' is not a whole number")]
    NotANumber { key: GuestKey, value: String },
    #[error("key '{key}': {value} is negative")]
    Negative { key: GuestKey, value: String },
    #[error("key '{key}': {value} is too large (at most {max})")]
    TooLarge {
        key: GuestKey,
        value: String,
        max: u64,
    },
    #[error("key '{0}': must be more than 0{hint}", hint = .0.zero_hint())]
    Zero(GuestKey),
    #[error("key 'weight': {0} is out of range (1 to {max})", max = MAX_WEIGHT)]
    WeightOutOfRange(String),
    #[error("key '{0}' only applies to a rate limit; set rate-bytes too, or remove {0}")]
    NeedsRateBytes(GuestKey),
    #[error("key '{key}': expected {expected}, found {found}")]
    WrongType {
        key: GuestKey,
        expected: &'static str,
        found: &'static str,
    },
}

impl GuestSpecError {
    /// `value` is more than `key` allows.
    fn too_large(key: GuestKey, value: String) -> GuestSpecError {
        match key.max_value() {
            Some(max) => GuestSpecError::TooLarge { key, value, max },
            None => GuestSpecError::WeightOutOfRange(value),
        }
    }

    fn unknown_key(key: &str, valid: &'static [GuestKey]) -> GuestSpecError {
        GuestSpecError::UnknownKey {
            key: key.to_owned(),
            valid,
        }
    }

    /// The (known) key the error is about, if it is about one.
    pub fn key(&self) -> Option<GuestKey> {
        match self {
            GuestSpecError::MissingValue(key)
            | GuestSpecError::DuplicateKey(key)
            | GuestSpecError::EmptyPath(key)
            | GuestSpecError::Zero(key)
            | GuestSpecError::NeedsRateBytes(key)
            | GuestSpecError::NotANumber { key, .. }
            | GuestSpecError::Negative { key, .. }
            | GuestSpecError::TooLarge { key, .. }
            | GuestSpecError::WrongType { key, .. } => Some(*key),
            GuestSpecError::InvalidName { .. } => Some(GuestKey::Name),
            GuestSpecError::WeightOutOfRange(_) => Some(GuestKey::Weight),
            GuestSpecError::CidOutOfRange(_) => Some(GuestKey::Cid),
            GuestSpecError::Empty
            | GuestSpecError::EmptyItem
            | GuestSpecError::UnknownKey { .. }
            | GuestSpecError::MissingName
            | GuestSpecError::NoEndpoint
            | GuestSpecError::BothEndpoints => None,
        }
    }
}

/// Why a guest name is not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    BadChar(char),
    TooLong(usize),
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => f.write_str("is empty"),
            NameProblem::BadChar(c) => write!(
                f,
                "contains {c:?}; use only letters, digits, '.', '_' and '-'"
            ),
            NameProblem::TooLong(len) => {
                write!(
                    f,
                    "is {len} characters long; at most {MAX_NAME_LEN} are allowed"
                )
            }
        }
    }
}

/// Checks a guest name against `[A-Za-z0-9._-]{1,64}`.
pub fn validate_name(name: &str) -> Result<(), GuestSpecError> {
    let problem = if name.is_empty() {
        Some(NameProblem::Empty)
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(NameProblem::BadChar(c))
    } else if name.len() > MAX_NAME_LEN {
        Some(NameProblem::TooLong(name.len()))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(GuestSpecError::InvalidName {
            name: name.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// Limits applied to every `[[guest]]` that does not set the key itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDefaults {
    pub rate_bytes: Option<u64>,
    pub rate_period_ms: Option<u64>,
    pub burst: Option<u64>,
    pub weight: Option<u32>,
}

/// A guest's keys as given, each checked on its own; [`Draft::finish`]
/// checks them together.
#[derive(Debug, Default)]
struct Draft {
    name: Option<String>,
    socket: Option<PathBuf>,
    connect: Option<PathBuf>,
    egd: Option<PathBuf>,
    vsock_uds: Option<PathBuf>,
    cid: Option<u32>,
    tcp_psk: Option<PathBuf>,
    rate_bytes: Option<u64>,
    rate_period_ms: Option<u64>,
    burst: Option<u64>,
    weight: Option<u32>,
}

impl Draft {
    fn is_set(&self, key: GuestKey) -> bool {
        match key {
            GuestKey::Name => self.name.is_some(),
            GuestKey::Socket => self.socket.is_some(),
            GuestKey::Connect => self.connect.is_some(),
            GuestKey::Egd => self.egd.is_some(),
            GuestKey::VsockUds => self.vsock_uds.is_some(),
            GuestKey::Cid => self.cid.is_some(),
            GuestKey::TcpPsk => self.tcp_psk.is_some(),
            GuestKey::RateBytes => self.rate_bytes.is_some(),
            GuestKey::RatePeriod => self.rate_period_ms.is_some(),
            GuestKey::Burst => self.burst.is_some(),
            GuestKey::Weight => self.weight.is_some(),
        }
    }

    /// Sets a key from text: its command-line value, or a TOML string.
    fn set_text(&mut self, key: GuestKey, text: &str) -> Result<(), GuestSpecError> {
        if self.is_set(key) {
            return Err(GuestSpecError::DuplicateKey(key));
        }
        if key.is_number() {
            let number = parse_number_text(key, text)?;
            return self.set_number(key, number);
        }
        match key {
            GuestKey::Name => {
                validate_name(text)?;
                self.name = Some(text.to_owned());
            }
            GuestKey::Socket
            | GuestKey::Connect
            | GuestKey::Egd
            | GuestKey::VsockUds
            | GuestKey::TcpPsk => {
                if text.is_empty() {
                    return Err(GuestSpecError::EmptyPath(key));
                }
                let path = Some(PathBuf::from(text));
                match key {
                    GuestKey::Socket => self.socket = path,
                    GuestKey::Connect => self.connect = path,
                    GuestKey::Egd => self.egd = path,
                    GuestKey::TcpPsk => self.tcp_psk = path,
                    _ => self.vsock_uds = path,
                }
            }
            _ => unreachable!("{key} takes a number"),
        }
        Ok(())
    }

    /// Sets a key from its value in a TOML table.
    fn set_toml(&mut self, key: GuestKey, value: &DeValue<'_>) -> Result<(), GuestSpecError> {
        if key.is_number() {
            let number = toml_number(value).map_err(|problem| match problem {
                NumberProblem::WrongType(found) => GuestSpecError::WrongType {
                    key,
                    expected: "a whole number",
                    found,
                },
                NumberProblem::Negative(value) => GuestSpecError::Negative { key, value },
                NumberProblem::TooLarge(value) => GuestSpecError::too_large(key, value),
            })?;
            if self.is_set(key) {
                return Err(GuestSpecError::DuplicateKey(key));
            }
            return self.set_number(key, number);
        }
        match value {
            DeValue::String(text) => self.set_text(key, text),
            other => Err(GuestSpecError::WrongType {
                key,
                expected: if key == GuestKey::Name {
                    "a string"
                } else {
                    "a path as a string"
                },
                found: other.type_str(),
            }),
        }
    }

    fn set_number(&mut self, key: GuestKey, number: u64) -> Result<(), GuestSpecError> {
        if key == GuestKey::Weight {
            match u32::try_from(number) {
                Ok(weight) if (1..=MAX_WEIGHT).contains(&weight) => self.weight = Some(weight),
                _ => return Err(GuestSpecError::WeightOutOfRange(number.to_string())),
            }
            return Ok(());
        }
        if key == GuestKey::Cid {
            match u32::try_from(number) {
                Ok(cid) if (FIRST_GUEST_CID..VSOCK_CID_ANY).contains(&cid) => self.cid = Some(cid),
                _ => return Err(GuestSpecError::CidOutOfRange(number.to_string())),
            }
            return Ok(());
        }
        if number == 0 {
            return Err(GuestSpecError::Zero(key));
        }
        if key.max_value().is_some_and(|max| number > max) {
            return Err(GuestSpecError::too_large(key, number.to_string()));
        }
        match key {
            GuestKey::RateBytes => self.rate_bytes = Some(number),
            GuestKey::RatePeriod => self.rate_period_ms = Some(number),
            GuestKey::Burst => self.burst = Some(number),
            _ => unreachable!("{key} takes text"),
        }
        Ok(())
    }

    /// Checks the keys together and fills in what is not given from
    /// `defaults`, then the built-in defaults.
    fn finish(self, defaults: &GuestDefaults) -> Result<GuestSpec, GuestSpecError> {
        let name = self.name.ok_or(GuestSpecError::MissingName)?;
        let endpoints = [
            self.socket.map(GuestEndpoint::Socket),
            self.connect.map(GuestEndpoint::Connect),
            self.egd.map(GuestEndpoint::Egd),
            self.vsock_uds.map(GuestEndpoint::VsockUds),
            self.cid.map(GuestEndpoint::Cid),
            self.tcp_psk.map(GuestEndpoint::TcpPsk),
        ];
        let mut given = endpoints.into_iter().flatten();
        let endpoint = match (given.next(), given.next()) {
            (Some(endpoint), None) => endpoint,
            (None, _) => return Err(GuestSpecError::NoEndpoint),
            (Some(_), Some(_)) => return Err(GuestSpecError::BothEndpoints),
        };
        let rate_bytes = self.rate_bytes.or(defaults.rate_bytes);
        let weight = self.weight.or(defaults.weight).unwrap_or(DEFAULT_WEIGHT);
        let mut spec = GuestSpec::unlimited(name, endpoint);
        spec.weight = weight;
        if rate_bytes.is_none() {
            // Defaults for the rate-limit keys only matter to limited
            // guests; a guest's own ones without a limit are a mistake.
            if self.rate_period_ms.is_some() {
                return Err(GuestSpecError::NeedsRateBytes(GuestKey::RatePeriod));
            }
            if self.burst.is_some() {
                return Err(GuestSpecError::NeedsRateBytes(GuestKey::Burst));
            }
            return Ok(spec);
        }
        spec.rate_bytes = rate_bytes;
        spec.rate_period_ms = self
            .rate_period_ms
            .or(defaults.rate_period_ms)
            .unwrap_or(DEFAULT_RATE_PERIOD_MS);
        // A guest that sets its own rate but no burst gets a burst of its
        // own rate, not the default burst meant for the default rate.
        spec.burst = match (self.burst, self.rate_bytes) {
            (Some(burst), _) => Some(burst),
            (None, Some(_)) => None,
            (None, None) => defaults.burst,
        };
        Ok(spec)
    }
}

fn parse_number_text(key: GuestKey, text: &str) -> Result<u64, GuestSpecError> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(text) {
        return text
            .parse()
            .map_err(|_| GuestSpecError::too_large(key, text.to_owned()));
    }
    if text.strip_prefix('-').is_some_and(digits) {
        if text[1..].bytes().all(|b| b == b'0') {
            return Ok(0);
        }
        return Err(GuestSpecError::Negative {
            key,
            value: text.to_owned(),
        });
    }
    Err(GuestSpecError::NotANumber {
        key,
        value: text.to_owned(),
    })
}

/// Why a TOML value is not a whole number of at least 0.
enum NumberProblem {
    WrongType(&'static str),
    Negative(String),
    TooLarge(String),
}

fn toml_number(value: &DeValue<'_>) -> Result<u64, NumberProblem> {
    let DeValue::Integer(integer) = value else {
        return Err(NumberProblem::WrongType(value.type_str()));
    };
    let digits = integer.as_str();
    match u64::from_str_radix(digits, integer.radix()) {
        Ok(number) => Ok(number),
        Err(_) => match digits.strip_prefix('-') {
            Some(rest) if rest.bytes().all(|b| b == b'0') => Ok(0),
            Some(_) => Err(NumberProblem::Negative(integer.to_string())),
            None => Err(NumberProblem::TooLarge(integer.to_string())),
        },
    }
}

/// A guest's name under the shorthand: its socket's file stem, or the whole
/// path if there is no stem.
fn file_stem_name(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Names for the guests of the `--socket` / `--connect` shorthand: each is
/// named after its socket file (`/run/vm1.sock` -> `vm1`), except that
/// sockets whose file names clash are named by their whole paths.
pub fn shorthand_names<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<String> {
    let paths: Vec<&Path> = paths.into_iter().collect();
    let stems: Vec<String> = paths.iter().map(|path| file_stem_name(path)).collect();
    paths
        .iter()
        .zip(&stems)
        .map(|(path, stem)| {
            if stems.iter().filter(|other| *other == stem).count() > 1 {
                path.display().to_string()
            } else {
                stem.clone()
            }
        })
        .collect()
}

/// The guests of the `--socket` / `--connect` shorthand, named by
/// [`shorthand_names`], not limited, weight 1.
pub fn shorthand_guests(endpoints: impl IntoIterator<Item = GuestEndpoint>) -> Vec<GuestSpec> {
    let endpoints: Vec<GuestEndpoint> = endpoints.into_iter().collect();
    let names = shorthand_names(
        endpoints
            .iter()
            .map(|endpoint| endpoint.path().unwrap_or(Path::new("guest"))),
    );
    names
        .into_iter()
        .zip(endpoints)
        .map(|(name, endpoint)| GuestSpec::unlimited(name, endpoint))
        .collect()
}

/// Where a guest was defined, for [`merge_guests`]' errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestOrigin {
    CommandLine,
    ConfigFile,
}

impl fmt::Display for GuestOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestOrigin::CommandLine => "on the command line",
            GuestOrigin::ConfigFile => "in the config file",
        })
    }
}

/// The command line's guests followed by the config file's. Two guests
/// with the same name, or with the same socket path (listening or
/// connecting), are an error naming where each was defined.
pub fn merge_guests(
    cli: Vec<GuestSpec>,
    file: Vec<GuestSpec>,
) -> Result<Vec<GuestSpec>, ConfigError> {
    let tagged = cli
        .into_iter()
        .map(|spec| (GuestOrigin::CommandLine, spec))
        .chain(file.into_iter().map(|spec| (GuestOrigin::ConfigFile, spec)));
    let mut merged: Vec<(GuestOrigin, GuestSpec)> = Vec::new();
    for (origin, spec) in tagged {
        if let Some((first_origin, first)) = merged.iter().find(|(_, g)| g.name == spec.name) {
            return Err(ConfigError::MergeName {
                name: spec.name.clone(),
                first: *first_origin,
                first_spec: first.to_string(),
                second: origin,
                second_spec: spec.to_string(),
            });
        }
        if let Some((first_origin, first)) = merged
            .iter()
            .find(|(_, g)| g.endpoint.address() == spec.endpoint.address())
        {
            return Err(ConfigError::MergePath {
                path: spec.endpoint.address(),
                first: *first_origin,
                first_guest: first.name.clone(),
                second: origin,
                second_guest: spec.name.clone(),
            });
        }
        merged.push((origin, spec));
    }
    Ok(merged.into_iter().map(|(_, spec)| spec).collect())
}

/// A configuration file, checked whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigFile {
    /// The file it was read from (for messages).
    pub origin: PathBuf,
    /// `sources`; empty when the key is not given (an empty list is an
    /// error).
    pub sources: Vec<SourceSpec>,
    pub mode: Option<Mode>,
    pub reseed_bytes: Option<u64>,
    pub reseed_secs: Option<u64>,
    /// Cap on bytes per second to all guests together.
    pub max_rate: Option<u64>,
    /// Permission bits, at most `0o777`.
    pub socket_mode: Option<u32>,
    /// Group name or number, as written; see [`ConfigFile::socket_group_id`].
    pub socket_group: Option<String>,
    pub control: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// AF_VSOCK port for `cid=` guests.
    pub vsock: Option<u32>,
    /// Bytes per second for vsock CIDs no guest is configured for.
    pub vsock_default_rate: Option<u64>,
    /// Address of the TCP listener for `tcp-psk=` guests.
    pub listen_tcp: Option<SocketAddr>,
    /// Most guest memory regions per vhost-user connection.
    pub vhost_user_max_regions: Option<u64>,
    /// Most bytes of guest memory per vhost-user connection.
    pub vhost_user_max_memory: Option<u64>,
    /// Seconds a vhost-user connection has to send SET_OWNER.
    pub vhost_user_setup_timeout: Option<u64>,
    pub defaults: GuestDefaults,
    /// The `[[guest]]` tables in file order, with `[defaults]` applied.
    pub guests: Vec<GuestSpec>,
    /// Whether the file has the `guest` key at all: `[[guest]]` tables, or
    /// `guest = []` for no guests on purpose. A reload of a file without it
    /// does not remove every running guest: an empty or truncated file is
    /// far likelier than that wish.
    pub guests_declared: bool,
    socket_group_line: usize,
}

impl ConfigFile {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        load(path)
    }

    /// Checks the configuration `text`, read from `origin`.
    pub fn parse(text: &str, origin: &Path) -> Result<ConfigFile, ConfigError> {
        parse(text, origin)
    }

    /// Looks up `socket-group` on this host. Kept apart from parsing so
    /// that a file can be checked anywhere; call it before acting on a file.
    pub fn socket_group_id(&self) -> Result<Option<Gid>, ConfigError> {
        let Some(group) = &self.socket_group else {
            return Ok(None);
        };
        if let Ok(id) = group.parse::<u32>() {
            return Ok(Some(Gid::from_raw(id)));
        }
        let message = match Group::from_name(group) {
            Ok(Some(found)) => return Ok(Some(found.gid)),
            Ok(None) => format!("no group named '{group}' on this host"),
            Err(e) => format!("cannot look up group '{group}': {e}"),
        };
        Err(ConfigError::Value {
            path: self.origin.clone(),
            line: self.socket_group_line,
            key: "socket-group".into(),
            message,
        })
    }
}

/// Reads and checks the configuration file at `path`.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse(&text, path)
}

/// Checks the configuration `text`, read from `origin` (named in errors).
pub fn parse(text: &str, origin: &Path) -> Result<ConfigFile, ConfigError> {
    let parser = FileParser { text, path: origin };
    let document = DeTable::parse(text).map_err(|e| parser.syntax_error(&e))?;
    parser.file(document.get_ref())
}

/// A configuration problem; `Display` is the message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{}:{line}: invalid TOML{}: {message}", .path.display(), at_snippet(.snippet))]
    Syntax {
        path: PathBuf,
        line: usize,
        /// The text the error points at, if short.
        snippet: Option<String>,
        message: String,
    },
    #[error("{}:{line}: unknown key '{key}' (valid: {})", .path.display(), FILE_KEYS.join(", "))]
    UnknownKey {
        path: PathBuf,
        line: usize,
        key: String,
    },
    #[error("{}:{line}: key '{key}': {message}", .path.display())]
    Value {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{}:{line}: [defaults]: {error}", .path.display())]
    Defaults {
        path: PathBuf,
        line: usize,
        #[source]
        error: GuestSpecError,
    },
    #[error("{}:{line}: {}: {error}", .path.display(), guest_label(.name, *.number))]
    Guest {
        path: PathBuf,
        line: usize,
        /// The guest's name, if it has a usable one.
        name: Option<String>,
        /// Its place among the `[[guest]]` tables, from 1.
        number: usize,
        #[source]
        error: GuestSpecError,
    },
    #[error(
        "{}:{line}: guest {name:?}: the name is already used by the guest on line {first_line}",
        .path.display()
    )]
    DuplicateName {
        path: PathBuf,
        line: usize,
        name: String,
        first_line: usize,
    },
    #[error(
        "{}:{line}: guest {name:?}: {endpoint} is already used by guest {other:?} on line {other_line}",
        .path.display()
    )]
    DuplicatePath {
        path: PathBuf,
        line: usize,
        name: String,
        endpoint: Address,
        other: String,
        other_line: usize,
    },
    #[error(
        "guest name {name:?} is used twice: {first} ({first_spec}) and {second} ({second_spec})"
    )]
    MergeName {
        name: String,
        first: GuestOrigin,
        first_spec: String,
        second: GuestOrigin,
        second_spec: String,
    },
    #[error("{path} is used by two guests: {first_guest:?} {first} and {second_guest:?} {second}")]
    MergePath {
        path: Address,
        first: GuestOrigin,
        first_guest: String,
        second: GuestOrigin,
        second_guest: String,
    },
}

impl ConfigError {
    /// The line of the configuration file the error is about.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Syntax { line, .. }
            | ConfigError::UnknownKey { line, .. }
            | ConfigError::Value { line, .. }
            | ConfigError::Defaults { line, .. }
            | ConfigError::Guest { line, .. }
            | ConfigError::DuplicateName { line, .. }
            | ConfigError::DuplicatePath { line, .. } => Some(*line),
            ConfigError::Read { .. }
            | ConfigError::MergeName { .. }
            | ConfigError::MergePath { .. } => None,
        }
    }

    /// The key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Value { key, .. } => Some(key),
            ConfigError::Defaults { error, .. } | ConfigError::Guest { error, .. } => match error {
                GuestSpecError::UnknownKey { key, .. } => Some(key),
                other => other.key().map(GuestKey::as_str),
            },
            ConfigError::DuplicateName { .. } | ConfigError::MergeName { .. } => Some("name"),
            ConfigError::Read { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::DuplicatePath { .. }
            | ConfigError::MergePath { .. } => None,
        }
    }
}

fn at_snippet(snippet: &Option<String>) -> String {
    match snippet {
        Some(text) => format!(" at '{text}'"),
        None => String::new(),
    }
}

fn guest_label(name: &Option<String>, number: usize) -> String {
    match name {
        Some(name) => format!("guest {name:?}"),
        None => format!("guest #{number}"),
    }
}

type Key<'i> = Spanned<DeString<'i>>;
type Value<'i> = Spanned<DeValue<'i>>;

/// A table's entries in file order (toml keeps them sorted by key).
fn in_file_order<'a, 'i>(table: &'a DeTable<'i>) -> Vec<(&'a Key<'i>, &'a Value<'i>)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

/// Checks one file's text, turning spans into lines.
struct FileParser<'a> {
    text: &'a str,
    path: &'a Path,
}

impl FileParser<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn syntax_error(&self, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let snippet = span
            .clone()
            .and_then(|span| self.text.get(span))
            .filter(|s| !s.is_empty() && s.len() <= 40 && !s.contains('\n'))
            .map(str::to_owned);
        ConfigError::Syntax {
            path: self.path.to_owned(),
            line: span.map_or(1, |span| self.line(span)),
            snippet,
            message: error.message().to_owned(),
        }
    }

    fn value_error(&self, key: &str, value: &Value<'_>, message: String) -> ConfigError {
        ConfigError::Value {
            path: self.path.to_owned(),
            line: self.line(value.span()),
            key: key.to_owned(),
            message,
        }
    }

    fn file(&self, document: &DeTable<'_>) -> Result<ConfigFile, ConfigError> {
        let mut config = ConfigFile {
            origin: self.path.to_owned(),
            ..ConfigFile::default()
        };
        let mut guests = None;
        for (key, value) in in_file_order(document) {
            let name: &str = key.get_ref();
            match name {
                "sources" => config.sources = self.sources(name, value)?,
                "mode" => config.mode = Some(self.mode(name, value)?),
                "reseed-bytes" | "reseed-secs" => {
                    let number = self.positive(name, value, u64::MAX, "")?;
                    if name == "reseed-bytes" {
                        config.reseed_bytes = Some(number);
                    } else {
                        config.reseed_secs = Some(number);
                    }
                }
                "max-rate" => {
                    let hint = "; omit max-rate for no limit";
                    config.max_rate = Some(self.positive(name, value, MAX_BYTES, hint)?);
                }
                "socket-mode" => config.socket_mode = Some(self.socket_mode(name, value)?),
                "socket-group" => {
                    let expected = "a group name or number as a string";
                    config.socket_group = Some(self.text_value(name, value, expected)?);
                    config.socket_group_line = self.line(value.span());
                }
                "control" => {
                    let path = self.text_value(name, value, "a path as a string")?;
                    config.control = Some(PathBuf::from(path));
                }
                "metrics" => config.metrics = Some(self.socket_addr(name, value)?),
                "vsock" => {
                    let port = self.positive(name, value, u64::from(u32::MAX - 1), "")?;
                    config.vsock = u32::try_from(port).ok();
                }
                "vsock-default-rate" => {
                    let hint = "; omit vsock-default-rate to refuse unknown CIDs";
                    config.vsock_default_rate = Some(self.positive(name, value, MAX_BYTES, hint)?);
                }
                "listen-tcp" => config.listen_tcp = Some(self.socket_addr(name, value)?),
                "vhost-user-max-regions" => {
                    config.vhost_user_max_regions = Some(self.positive(name, value, 65535, "")?);
                }
                "vhost-user-max-memory" => {
                    config.vhost_user_max_memory =
                        Some(self.positive(name, value, u64::MAX, "")?);
                }
                "vhost-user-setup-timeout" => {
                    let secs = self.positive(name, value, 3600, "")?;
                    config.vhost_user_setup_timeout = Some(secs);
                }
                "defaults" => config.defaults = self.defaults(value)?,
                "guest" => guests = Some(value),
                _ => {
                    return Err(ConfigError::UnknownKey {
                        path: self.path.to_owned(),
                        line: self.line(key.span()),
                        key: name.to_owned(),
                    });
                }
            }
        }
        if let Some(guests) = guests {
            config.guests = self.guests(guests, &config.defaults)?;
            config.guests_declared = true;
        }
        Ok(config)
    }

    fn sources(&self, key: &str, value: &Value<'_>) -> Result<Vec<SourceSpec>, ConfigError> {
        let DeValue::Array(array) = value.get_ref() else {
            return Err(self.value_error(
                key,
                value,
                format!(
                    "expected a list of sources, e.g. [\"hwrng\", \"rdseed\"], found {}",
                    value.get_ref().type_str()
                ),
            ));
        };
        if array.is_empty() {
            return Err(self.value_error(
                key,
                value,
                "the list is empty; name at least one source, or leave sources out to use \
                 the host's hardware sources"
                    .into(),
            ));
        }
        let mut sources = Vec::new();
        for item in array.iter() {
            let DeValue::String(spec) = item.get_ref() else {
                return Err(self.value_error(
                    key,
                    item,
                    format!(
                        "expected a source as a string, e.g. \"hwrng\", found {}",
                        item.get_ref().type_str()
                    ),
                ));
            };
            let source = spec
                .parse::<SourceSpec>()
                .map_err(|e| self.value_error(key, item, format!("{spec:?}: {e}")))?;
            sources.push(source);
        }
        Ok(sources)
    }

    fn mode(&self, key: &str, value: &Value<'_>) -> Result<Mode, ConfigError> {
        let text = self.text_value(key, value, "\"drbg\" or \"raw\"")?;
        [Mode::Drbg, Mode::Raw]
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| {
                self.value_error(key, value, format!("unknown mode '{text}' (drbg or raw)"))
            })
    }

    /// A whole number from 1 to `max`.
    fn positive(
        &self,
        key: &str,
        value: &Value<'_>,
        max: u64,
        zero_hint: &str,
    ) -> Result<u64, ConfigError> {
        let message = match toml_number(value.get_ref()) {
            Ok(0) => format!("must be more than 0{zero_hint}"),
            Ok(number) if number > max => format!("{number} is too large (at most {max})"),
            Ok(number) => return Ok(number),
            Err(NumberProblem::WrongType(found)) => {
                format!("expected a whole number, found {found}")
            }
            Err(NumberProblem::Negative(n)) => format!("{n} is negative"),
            Err(NumberProblem::TooLarge(n)) => format!("{n} is too large (at most {max})"),
        };
        Err(self.value_error(key, value, message))
    }

    /// A non-empty string.
    fn text_value(
        &self,
        key: &str,
        value: &Value<'_>,
        expected: &str,
    ) -> Result<String, ConfigError> {
        match value.get_ref() {
            DeValue::String(text) if text.is_empty() => {
                Err(self.value_error(key, value, "the value is empty".into()))
            }
            DeValue::String(text) => Ok(text.to_string()),
            other => Err(self.value_error(
                key,
                value,
                format!("expected {expected}, found {}", other.type_str()),
            )),
        }
    }

    fn socket_mode(&self, key: &str, value: &Value<'_>) -> Result<u32, ConfigError> {
        if let DeValue::Integer(_) = value.get_ref() {
            return Err(self.value_error(
                key,
                value,
                "expected octal digits as a string, e.g. \"0660\", found integer".into(),
            ));
        }
        let text = self.text_value(key, value, "octal digits as a string, e.g. \"0660\"")?;
        let digits = text.strip_prefix("0o").unwrap_or(&text);
        let mode = if !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            u32::from_str_radix(digits, 8)
                .ok()
                .filter(|mode| *mode <= 0o777)
        } else {
            None
        };
        mode.ok_or_else(|| {
            self.value_error(
                key,
                value,
                format!(
                    "'{text}' is not a permission mode: give octal digits up to 0777, e.g. \"0660\""
                ),
            )
        })
    }

    fn socket_addr(&self, key: &str, value: &Value<'_>) -> Result<SocketAddr, ConfigError> {
        let text = self.text_value(key, value, "an address and port as a string")?;
        text.parse().map_err(|_| {
            self.value_error(
                key,
                value,
                format!(
                    "'{text}' is not an IP address and port, e.g. 127.0.0.1:9564 or [::1]:9564"
                ),
            )
        })
    }

    fn defaults(&self, value: &Value<'_>) -> Result<GuestDefaults, ConfigError> {
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.value_error(
                "defaults",
                value,
                format!(
                    "expected a [defaults] table, found {}",
                    value.get_ref().type_str()
                ),
            ));
        };
        let error = |line, error| ConfigError::Defaults {
            path: self.path.to_owned(),
            line,
            error,
        };
        let mut draft = Draft::default();
        for (key, value) in in_file_order(table) {
            let line = self.line(key.span());
            let guest_key = GuestKey::from_name(key.get_ref())
                .filter(|k| GuestKey::DEFAULTS.contains(k))
                .ok_or_else(|| {
                    error(
                        line,
                        GuestSpecError::unknown_key(key.get_ref(), &GuestKey::DEFAULTS),
                    )
                })?;
            draft
                .set_toml(guest_key, value.get_ref())
                .map_err(|e| error(line, e))?;
        }
        Ok(GuestDefaults {
            rate_bytes: draft.rate_bytes,
            rate_period_ms: draft.rate_period_ms,
            burst: draft.burst,
            weight: draft.weight,
        })
    }

    fn guests(
        &self,
        value: &Value<'_>,
        defaults: &GuestDefaults,
    ) -> Result<Vec<GuestSpec>, ConfigError> {
        let tables = match value.get_ref() {
            DeValue::Array(array) => array,
            DeValue::Table(_) => {
                return Err(self.value_error(
                    "guest",
                    value,
                    "write [[guest]], with double brackets, for each guest".into(),
                ));
            }
            other => {
                return Err(self.value_error(
                    "guest",
                    value,
                    format!("expected [[guest]] tables, found {}", other.type_str()),
                ));
            }
        };
        let mut guests = Vec::new();
        // Line of each name and of each socket path (with its guest) so far.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut paths: HashMap<Address, (String, usize)> = HashMap::new();
        for (index, item) in tables.iter().enumerate() {
            let DeValue::Table(table) = item.get_ref() else {
                return Err(self.value_error(
                    "guest",
                    item,
                    format!(
                        "expected a table for each guest, found {}",
                        item.get_ref().type_str()
                    ),
                ));
            };
            let (spec, lines) = self.guest(index + 1, self.line(item.span()), table, defaults)?;
            let name_line = lines[&GuestKey::Name];
            if let Some(&first_line) = names.get(&spec.name) {
                return Err(ConfigError::DuplicateName {
                    path: self.path.to_owned(),
                    line: name_line,
                    name: spec.name,
                    first_line,
                });
            }
            let path = spec.endpoint.address();
            let path_line = lines[&spec.endpoint.key()];
            if let Some((other, other_line)) = paths.get(&path) {
                return Err(ConfigError::DuplicatePath {
                    path: self.path.to_owned(),
                    line: path_line,
                    name: spec.name,
                    endpoint: path,
                    other: other.clone(),
                    other_line: *other_line,
                });
            }
            names.insert(spec.name.clone(), name_line);
            paths.insert(path, (spec.name.clone(), path_line));
            guests.push(spec);
        }
        Ok(guests)
    }

    /// One `[[guest]]` table, the `number`th, whose header is on `line`;
    /// returns the guest and the line of each of its keys.
    fn guest(
        &self,
        number: usize,
        line: usize,
        table: &DeTable<'_>,
        defaults: &GuestDefaults,
    ) -> Result<(GuestSpec, HashMap<GuestKey, usize>), ConfigError> {
        let entries = in_file_order(table);
        let name = entries
            .iter()
            .find_map(|(key, value)| match value.get_ref() {
                DeValue::String(name) if key.get_ref() == "name" && !name.is_empty() => {
                    Some(name.to_string())
                }
                _ => None,
            });
        let error = |line, error| ConfigError::Guest {
            path: self.path.to_owned(),
            line,
            name: name.clone(),
            number,
            error,
        };
        let mut draft = Draft::default();
        let mut lines = HashMap::new();
        for (key, value) in entries {
            let key_line = self.line(key.span());
            let guest_key = GuestKey::from_name(key.get_ref()).ok_or_else(|| {
                error(
                    key_line,
                    GuestSpecError::unknown_key(key.get_ref(), &GuestKey::ALL),
                )
            })?;
            lines.insert(guest_key, key_line);
            draft
                .set_toml(guest_key, value.get_ref())
                .map_err(|e| error(key_line, e))?;
        }
        match draft.finish(defaults) {
            Ok(spec) => Ok((spec, lines)),
            Err(e) => {
                let at = match &e {
                    // The later of the two keys is where the guest went wrong.
                    GuestSpecError::BothEndpoints => [
                        GuestKey::Socket,
                        GuestKey::Connect,
                        GuestKey::Egd,
                        GuestKey::VsockUds,
                    ]
                    .iter()
                    .filter_map(|key| lines.get(key).copied())
                    .max()
                    .unwrap_or(line),
                    other => other
                        .key()
                        .and_then(|key| lines.get(&key).copied())
                        .unwrap_or(line),
                };
                Err(error(at, e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/vhost-rng.toml";

    fn parse_ok(text: &str) -> ConfigFile {
        match parse(text, Path::new(FILE)) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        }
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text, Path::new(FILE)) {
            Ok(config) => panic!("parsed: {config:?}"),
            Err(e) => e,
        }
    }

    /// The message of the error in `text`.
    fn message(text: &str) -> String {
        parse_err(text).to_string()
    }

    fn spec(text: &str) -> GuestSpec {
        match text.parse() {
            Ok(spec) => spec,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    fn spec_err(text: &str) -> String {
        match text.parse::<GuestSpec>() {
            Ok(spec) => panic!("{text} parsed: {spec:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn socket(name: &str, path: &str) -> GuestSpec {
        GuestSpec::unlimited(name.into(), GuestEndpoint::Socket(path.into()))
    }

    const GUEST_KEYS: &str = "name, socket, connect, egd, vsock-uds, cid, tcp-psk, rate-bytes, rate-period, burst, \
         weight";

    // ---- the example ----

    #[test]
    fn example_parses_to_the_expected_configuration() {
        let config = parse_ok(EXAMPLE);
        assert_eq!(config.origin, Path::new(FILE));
        assert_eq!(
            config.sources,
            vec![
                "hwrng".parse::<SourceSpec>().unwrap(),
                "rdseed".parse().unwrap()
            ]
        );
        assert_eq!(config.mode, Some(Mode::Drbg));
        assert_eq!(config.reseed_bytes, Some(1_048_576));
        assert_eq!(config.reseed_secs, Some(60));
        assert_eq!(config.max_rate, Some(1_048_576));
        assert_eq!(config.socket_mode, Some(0o660));
        assert_eq!(config.socket_group.as_deref(), Some("kvm"));
        assert_eq!(
            config.control,
            Some(PathBuf::from("/run/vhost-rng/control.sock"))
        );
        assert_eq!(config.metrics, Some("127.0.0.1:9564".parse().unwrap()));
        assert_eq!(config.vsock, Some(5564));
        assert_eq!(config.vsock_default_rate, Some(4096));
        assert_eq!(config.listen_tcp, Some("127.0.0.1:5565".parse().unwrap()));
        assert_eq!(config.vhost_user_max_regions, Some(509));
        assert_eq!(config.vhost_user_max_memory, Some(16 << 40));
        assert_eq!(config.vhost_user_setup_timeout, Some(10));
        assert_eq!(
            config.defaults,
            GuestDefaults {
                rate_bytes: Some(16384),
                rate_period_ms: Some(1000),
                burst: Some(16384),
                weight: Some(1),
            }
        );
        assert_eq!(
            config.guests,
            vec![
                GuestSpec {
                    name: "vm1".into(),
                    endpoint: GuestEndpoint::Socket("/run/vhost-rng/vm1.sock".into()),
                    rate_bytes: Some(65536),
                    rate_period_ms: 1000,
                    burst: None,
                    weight: 1,
                },
                GuestSpec {
                    name: "vm2".into(),
                    endpoint: GuestEndpoint::Connect("/run/qemu/vm2-rng.sock".into()),
                    rate_bytes: Some(16384),
                    rate_period_ms: 1000,
                    burst: Some(16384),
                    weight: 1,
                },
                GuestSpec {
                    name: "legacy".into(),
                    endpoint: GuestEndpoint::Egd("/run/vhost-rng/legacy.egd".into()),
                    rate_bytes: Some(16384),
                    rate_period_ms: 1000,
                    burst: Some(16384),
                    weight: 1,
                },
                GuestSpec {
                    name: "vm3".into(),
                    endpoint: GuestEndpoint::Cid(3),
                    rate_bytes: Some(16384),
                    rate_period_ms: 1000,
                    burst: Some(16384),
                    weight: 1,
                },
                GuestSpec {
                    name: "xen1".into(),
                    endpoint: GuestEndpoint::TcpPsk("/etc/vhost-rng/keys/xen1.psk".into()),
                    rate_bytes: Some(16384),
                    rate_period_ms: 1000,
                    burst: Some(16384),
                    weight: 1,
                },
            ]
        );
    }

    #[test]
    fn example_keeps_every_line_of_the_documented_example() {
        for line in [
            "# all top-level keys optional",
            "sources = [\"hwrng\", \"rdseed\"]      # same SPEC strings as --source",
            "mode = \"drbg\"                      # or \"raw\"",
            "reseed-bytes = 1048576",
            "reseed-secs = 60",
            "max-rate = 1048576                 # global cap, bytes per second, optional",
            "socket-mode = \"0660\"               # string, octal",
            "socket-group = \"kvm\"",
            "control = \"/run/vhost-rng/control.sock\"",
            "metrics = \"127.0.0.1:9564\"",
            "[defaults]                         \
             # applied to every [[guest]] that does not set the key",
            "rate-bytes = 16384",
            "rate-period = 1000",
            "burst = 16384",
            "weight = 1",
            "[[guest]]",
            "name = \"vm1\"",
            "socket = \"/run/vhost-rng/vm1.sock\"",
            "rate-bytes = 65536",
            "name = \"vm2\"",
            "connect = \"/run/qemu/vm2-rng.sock\"",
        ] {
            assert!(EXAMPLE.lines().any(|l| l == line), "missing: {line}");
        }
    }

    #[test]
    fn every_file_key_is_documented_in_the_example() {
        for key in FILE_KEYS
            .iter()
            .copied()
            .chain(GuestKey::ALL.iter().map(|k| k.as_str()))
        {
            assert!(EXAMPLE.contains(key), "{key}");
        }
    }

    // ---- files that are fine ----

    #[test]
    fn empty_and_comment_only_files_set_nothing() {
        for text in ["", "\n\n", "# nothing here\n   # nor here\n"] {
            let config = parse_ok(text);
            assert_eq!(
                config,
                ConfigFile {
                    origin: FILE.into(),
                    ..ConfigFile::default()
                }
            );
            assert!(config.guests.is_empty());
            assert!(config.sources.is_empty());
            assert_eq!(config.mode, None);
            assert_eq!(config.max_rate, None);
            assert_eq!(config.defaults, GuestDefaults::default());
            assert_eq!(config.socket_group_id().unwrap(), None);
        }
    }

    #[test]
    fn an_empty_guest_array_declares_no_guests_on_purpose() {
        let config = parse_ok("guest = []\n");
        assert!(config.guests.is_empty());
        assert!(config.guests_declared);
        // With other keys, and after [defaults], it is the same key.
        let config = parse_ok("max-rate = 100\nguest = []\n[defaults]\nweight = 2\n");
        assert!(config.guests.is_empty() && config.guests_declared);
        let config = parse_ok("[[guest]]\nname = \"a\"\nsocket = \"/a\"\n");
        assert!(config.guests_declared);
        // A file without the key says nothing about guests.
        for text in ["", "max-rate = 100\n", "[defaults]\nweight = 2\n"] {
            assert!(!parse_ok(text).guests_declared, "{text:?}");
        }
        // Both forms at once is one key given twice.
        let error = message("guest = []\n[[guest]]\nname = \"a\"\nsocket = \"/a\"\n");
        assert!(error.contains(":2: invalid TOML"), "{error}");
        // Anything in the array must be a guest's table.
        let error = message("guest = [1]\n");
        assert!(error.contains("expected a table for each guest"), "{error}");
    }

    #[test]
    fn defaults_apply_to_keys_a_guest_does_not_set() {
        let config = parse_ok(
            "[defaults]\nrate-bytes = 1000\nrate-period = 500\nburst = 4000\nweight = 7\n\
             [[guest]]\nname = \"a\"\nsocket = \"/a\"\n\
             [[guest]]\nname = \"b\"\nsocket = \"/b\"\nrate-bytes = 10\nrate-period = 20\n\
             burst = 30\nweight = 40\n\
             [[guest]]\nname = \"c\"\nconnect = \"/c\"\nweight = 2\n",
        );
        let [a, b, c] = &config.guests[..] else {
            panic!("{:?}", config.guests)
        };
        assert_eq!(
            (a.rate_bytes, a.rate_period_ms, a.burst, a.weight),
            (Some(1000), 500, Some(4000), 7)
        );
        assert_eq!(
            (b.rate_bytes, b.rate_period_ms, b.burst, b.weight),
            (Some(10), 20, Some(30), 40)
        );
        assert_eq!(
            (c.rate_bytes, c.rate_period_ms, c.burst, c.weight),
            (Some(1000), 500, Some(4000), 2)
        );
        assert_eq!(c.endpoint, GuestEndpoint::Connect("/c".into()));
    }

    #[test]
    fn without_defaults_guests_are_unlimited_with_weight_1() {
        let config = parse_ok("[[guest]]\nname = \"a\"\nsocket = \"/a\"\n");
        assert_eq!(config.guests, vec![socket("a", "/a")]);
        assert_eq!(config.guests[0].burst_bytes(), None);
    }

    #[test]
    fn guest_burst_defaults_to_its_rate() {
        let config = parse_ok("[[guest]]\nname = \"a\"\nsocket = \"/a\"\nrate-bytes = 512\n");
        assert_eq!(config.guests[0].burst, None);
        assert_eq!(config.guests[0].burst_bytes(), Some(512));
        assert_eq!(config.guests[0].rate_period_ms, DEFAULT_RATE_PERIOD_MS);
    }

    #[test]
    fn guest_may_set_burst_or_period_when_its_rate_comes_from_defaults() {
        let config = parse_ok(
            "[defaults]\nrate-bytes = 100\n\
             [[guest]]\nname = \"a\"\nsocket = \"/a\"\nburst = 300\nrate-period = 50\n",
        );
        let guest = &config.guests[0];
        assert_eq!(
            (guest.rate_bytes, guest.rate_period_ms, guest.burst),
            (Some(100), 50, Some(300))
        );
    }

    #[test]
    fn default_burst_and_period_without_default_rate_leave_guests_unlimited() {
        let config = parse_ok(
            "[defaults]\nburst = 100\nrate-period = 50\n\
             [[guest]]\nname = \"a\"\nsocket = \"/a\"\n\
             [[guest]]\nname = \"b\"\nsocket = \"/b\"\nrate-bytes = 10\n",
        );
        assert_eq!(config.guests[0], socket("a", "/a"));
        let b = &config.guests[1];
        // b's own rate brings its own burst; the default burst goes with
        // the default rate only.
        assert_eq!(
            (b.rate_bytes, b.rate_period_ms, b.burst),
            (Some(10), 50, None)
        );
    }

    #[test]
    fn file_accepts_other_toml_spellings() {
        let config = parse_ok(
            "sources = [\n  \"os\",\n  \"file=/dev/x,min-entropy=2\",\n]\n\
             socket-mode = \"0o640\"\nreseed-bytes = 0x10_00\nmetrics = \"[::1]:9000\"\n\
             guest = [{ name = \"a\", socket = \"/a\" }]\n",
        );
        assert_eq!(config.sources.len(), 2);
        assert_eq!(config.socket_mode, Some(0o640));
        assert_eq!(config.reseed_bytes, Some(4096));
        assert_eq!(config.metrics, Some("[::1]:9000".parse().unwrap()));
        assert_eq!(config.guests, vec![socket("a", "/a")]);
        assert_eq!(parse_ok("mode = \"raw\"\n").mode, Some(Mode::Raw));
    }

    #[test]
    fn load_reads_the_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vhost-rng.toml");
        std::fs::write(&path, "mode = \"raw\"\n\nmode2 = 1\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:3: unknown key 'mode2' (valid: {})",
                path.display(),
                FILE_KEYS.join(", ")
            )
        );
        std::fs::write(&path, EXAMPLE).unwrap();
        let config = ConfigFile::load(&path).unwrap();
        assert_eq!(config.origin, path);
        assert_eq!(config.guests.len(), 5);

        let missing = dir.path().join("missing.toml");
        let err = load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}: ", missing.display())),
            "{err}"
        );
        assert_eq!(err.line(), None);
    }

    // ---- top-level errors ----

    #[test]
    fn unknown_top_level_key_names_line_and_valid_keys() {
        let err = parse_err("mode = \"drbg\"\n# comment\nmax_rate = 5\n");
        assert_eq!(
            err.to_string(),
            "/etc/vhost-rng.toml:3: unknown key 'max_rate' (valid: sources, mode, \
             reseed-bytes, reseed-secs, max-rate, socket-mode, socket-group, control, \
             metrics, vsock, vsock-default-rate, listen-tcp, vhost-user-max-regions, \
             vhost-user-max-memory, vhost-user-setup-timeout, defaults, guest)"
        );
        assert_eq!(err.line(), Some(3));
        assert_eq!(err.key(), Some("max_rate"));
    }

    #[test]
    fn unknown_mode_names_line_and_key() {
        let err = parse_err("# c\nsources = [\"os\"]\n\nmode = \"fast\"\n");
        assert_eq!(
            err.to_string(),
            "/etc/vhost-rng.toml:4: key 'mode': unknown mode 'fast' (drbg or raw)"
        );
        assert_eq!((err.line(), err.key()), (Some(4), Some("mode")));
        assert_eq!(
            message("mode = 1\n"),
            "/etc/vhost-rng.toml:1: key 'mode': expected \"drbg\" or \"raw\", found integer"
        );
    }

    #[test]
    fn bad_source_names_the_line_of_the_entry() {
        assert_eq!(
            message("sources = [\n  \"os\",\n  \"jitter\",\n]\n"),
            "/etc/vhost-rng.toml:3: key 'sources': \"jitter\": unknown source 'jitter': \
             use hwrng[=PATH], rdseed, file=PATH or os"
        );
        assert_eq!(
            message("sources = [\"os\", 5]\n"),
            "/etc/vhost-rng.toml:1: key 'sources': expected a source as a string, \
             e.g. \"hwrng\", found integer"
        );
        assert_eq!(
            message("\nsources = \"os\"\n"),
            "/etc/vhost-rng.toml:2: key 'sources': expected a list of sources, \
             e.g. [\"hwrng\", \"rdseed\"], found string"
        );
        assert_eq!(
            message("sources = []\n"),
            "/etc/vhost-rng.toml:1: key 'sources': the list is empty; name at least one \
             source, or leave sources out to use the host's hardware sources"
        );
    }

    #[test]
    fn top_level_numbers_must_be_positive_whole_numbers() {
        assert_eq!(
            message("reseed-bytes = 0\n"),
            "/etc/vhost-rng.toml:1: key 'reseed-bytes': must be more than 0"
        );
        assert_eq!(
            message("\nreseed-secs = -3\n"),
            "/etc/vhost-rng.toml:2: key 'reseed-secs': -3 is negative"
        );
        assert_eq!(
            message("reseed-secs = 1.5\n"),
            "/etc/vhost-rng.toml:1: key 'reseed-secs': expected a whole number, found float"
        );
        assert_eq!(
            message("max-rate = 1099511627777\n"),
            "/etc/vhost-rng.toml:1: key 'max-rate': 1099511627777 is too large \
             (at most 1099511627776)"
        );
        assert_eq!(
            parse_ok("reseed-bytes = 18446744073709551615\n").reseed_bytes,
            Some(u64::MAX)
        );
        assert_eq!(
            message("max-rate = 0\n"),
            "/etc/vhost-rng.toml:1: key 'max-rate': must be more than 0; \
             omit max-rate for no limit"
        );
        assert_eq!(
            message("max-rate = \"1M\"\n"),
            "/etc/vhost-rng.toml:1: key 'max-rate': expected a whole number, found string"
        );
        assert_eq!(
            message("max-rate = 99999999999999999999\n"),
            "/etc/vhost-rng.toml:1: key 'max-rate': 99999999999999999999 is too large \
             (at most 1099511627776)"
        );
    }

    #[test]
    fn socket_mode_is_an_octal_string() {
        assert_eq!(parse_ok("socket-mode = \"600\"").socket_mode, Some(0o600));
        assert_eq!(
            message("socket-mode = \"888\"\n"),
            "/etc/vhost-rng.toml:1: key 'socket-mode': '888' is not a permission mode: \
             give octal digits up to 0777, e.g. \"0660\""
        );
        for bad in ["\"1777\"", "\"rw\"", "\"+660\"", "\"0o\""] {
            let err = parse_err(&format!("socket-mode = {bad}\n"));
            assert_eq!(err.key(), Some("socket-mode"), "{bad}");
        }
        assert_eq!(
            message("socket-mode = 0o660\n"),
            "/etc/vhost-rng.toml:1: key 'socket-mode': expected octal digits as a string, \
             e.g. \"0660\", found integer"
        );
        assert_eq!(
            message("socket-mode = \"\"\n"),
            "/etc/vhost-rng.toml:1: key 'socket-mode': the value is empty"
        );
    }

    #[test]
    fn socket_group_is_resolved_on_request() {
        let config = parse_ok("socket-group = \"0\"\n");
        assert_eq!(config.socket_group_id().unwrap(), Some(Gid::from_raw(0)));
        let config = parse_ok("socket-group = \"root\"\n");
        assert_eq!(config.socket_group_id().unwrap(), Some(Gid::from_raw(0)));
        let config = parse_ok("\n\nsocket-group = \"no-such-group-x\"\n");
        assert_eq!(
            config.socket_group_id().unwrap_err().to_string(),
            "/etc/vhost-rng.toml:3: key 'socket-group': no group named 'no-such-group-x' \
             on this host"
        );
        assert_eq!(
            message("socket-group = 36\n"),
            "/etc/vhost-rng.toml:1: key 'socket-group': expected a group name or number \
             as a string, found integer"
        );
    }

    #[test]
    fn control_and_metrics_are_checked() {
        assert_eq!(
            message("control = \"\"\n"),
            "/etc/vhost-rng.toml:1: key 'control': the value is empty"
        );
        assert_eq!(
            message("metrics = \"localhost:9564\"\n"),
            "/etc/vhost-rng.toml:1: key 'metrics': 'localhost:9564' is not an IP address \
             and port, e.g. 127.0.0.1:9564 or [::1]:9564"
        );
        assert_eq!(
            message("metrics = 9564\n"),
            "/etc/vhost-rng.toml:1: key 'metrics': expected an address and port as a \
             string, found integer"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse_err("mode = \"drbg\"\nreseed-secs = = 5\n");
        assert!(
            matches!(err, ConfigError::Syntax { line: 2, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("/etc/vhost-rng.toml:2: invalid TOML"),
            "{err}"
        );
        assert_eq!(
            message("[[guest]]\nname = \"a\"\nname = \"b\"\n"),
            "/etc/vhost-rng.toml:3: invalid TOML at 'name': duplicate key"
        );
        assert_eq!(
            message("[defaults]\nweight = 1\n[defaults]\n"),
            "/etc/vhost-rng.toml:3: invalid TOML at 'defaults': duplicate key"
        );
    }

    // ---- [defaults] errors ----

    #[test]
    fn defaults_take_only_limit_keys() {
        let err = parse_err("[defaults]\nrate-bytes = 1\nsocket = \"/a\"\n");
        assert_eq!(
            err.to_string(),
            "/etc/vhost-rng.toml:3: [defaults]: unknown key 'socket' \
             (valid: rate-bytes, rate-period, burst, weight)"
        );
        assert_eq!((err.line(), err.key()), (Some(3), Some("socket")));
        assert_eq!(
            message("defaults = 5\n"),
            "/etc/vhost-rng.toml:1: key 'defaults': expected a [defaults] table, found integer"
        );
    }

    #[test]
    fn defaults_values_are_checked_like_a_guests() {
        assert_eq!(
            message("[defaults]\n\nweight = 0\n"),
            "/etc/vhost-rng.toml:3: [defaults]: key 'weight': 0 is out of range (1 to 1000)"
        );
        assert_eq!(
            message("[defaults]\nrate-bytes = 0\n"),
            "/etc/vhost-rng.toml:2: [defaults]: key 'rate-bytes': must be more than 0; \
             omit rate-bytes for no limit"
        );
        assert_eq!(
            message("[defaults]\nburst = \"big\"\n"),
            "/etc/vhost-rng.toml:2: [defaults]: key 'burst': expected a whole number, \
             found string"
        );
    }

    // ---- [[guest]] errors ----

    #[test]
    fn unknown_guest_key_names_file_line_guest_and_valid_keys() {
        let text = "# vhost-rng\nmode = \"drbg\"\n\n\
                    [[guest]]\nname = \"vm1\"\nsocket = \"/run/vm1.sock\"\n\n\
                    [[guest]]\nname = \"vm2\"\nsocket = \"/run/vm2.sock\"\n\n\
                    rate_bytes = 5\n\
                    [[guest]]\nname = \"vm3\"\n";
        // rate_bytes is line 12; it belongs to vm2.
        assert_eq!(
            message(text),
            format!(
                "/etc/vhost-rng.toml:12: guest \"vm2\": unknown key 'rate_bytes' \
                 (valid: {GUEST_KEYS})"
            )
        );
        let text = "[[guest]]\nname = \"vm1\"\nsocket = \"/a\"\n\
                    [[guest]]\nname = \"vm2\"\nsocket = \"/b\"\n\
                    [[guest]]\nname = \"vm3\"\nsocket = \"/c\"\n\n\n\
                    rate_bytes = 65536\n";
        let err = parse_err(text);
        assert_eq!(
            err.to_string(),
            "/etc/vhost-rng.toml:12: guest \"vm3\": unknown key 'rate_bytes' (valid: name, \
             socket, connect, egd, vsock-uds, cid, tcp-psk, rate-bytes, rate-period, burst, \
             weight)"
        );
        assert_eq!((err.line(), err.key()), (Some(12), Some("rate_bytes")));
    }

    #[test]
    fn unknown_key_before_the_name_still_names_the_guest() {
        assert_eq!(
            message("[[guest]]\nport = 1\nname = \"vm1\"\n"),
            format!(
                "/etc/vhost-rng.toml:2: guest \"vm1\": unknown key 'port' (valid: {GUEST_KEYS})"
            )
        );
    }

    #[test]
    fn socket_and_connect_both_set_names_the_guest_and_line() {
        let err = parse_err(
            "[[guest]]\nname = \"vm1\"\nsocket = \"/a\"\n\n\
             [[guest]]\nname = \"vm2\"\nsocket = \"/b\"\nconnect = \"/c\"\n",
        );
        assert_eq!(
            err.to_string(),
            "/etc/vhost-rng.toml:8: guest \"vm2\": more than one of 'socket', 'connect', \
             'egd', 'vsock-uds', 'cid' and 'tcp-psk' is set; give only one"
        );
        assert!(
            matches!(
                err,
                ConfigError::Guest {
                    line: 8,
                    number: 2,
                    error: GuestSpecError::BothEndpoints,
                    ..
                }
            ),
            "{err:?}"
        );
        // Whichever comes last in the table.
        assert_eq!(
            parse_err("[[guest]]\nconnect = \"/c\"\nname = \"x\"\nsocket = \"/b\"\n").line(),
            Some(4)
        );
    }

    #[test]
    fn guest_without_socket_or_connect_names_its_header() {
        assert_eq!(
            message(
                "[[guest]]\nname = \"a\"\nsocket = \"/a\"\n\n[[guest]]\nname = \"b\"\nweight = 3\n"
            ),
            "/etc/vhost-rng.toml:5: guest \"b\": no endpoint: give socket=PATH for a \
             vhost-user socket the daemon listens on, connect=PATH for one the VMM listens \
             on, egd=PATH for an EGD socket, vsock-uds=PATH for the agent over hybrid vsock, cid=N for the agent over AF_VSOCK, or tcp-psk=PATH for the agent over TCP"
        );
    }

    #[test]
    fn guest_without_name_is_numbered() {
        let err =
            parse_err("[[guest]]\nname = \"a\"\nsocket = \"/a\"\n\n[[guest]]\nsocket = \"/b\"\n");
        assert_eq!(
            err.to_string(),
            "/etc/vhost-rng.toml:5: guest #2: missing key 'name': every guest needs a name"
        );
        assert_eq!(err.key(), None);
        assert_eq!(
            message("[[guest]]\nname = 7\nsocket = \"/b\"\n"),
            "/etc/vhost-rng.toml:2: guest #1: key 'name': expected a string, found integer"
        );
    }

    #[test]
    fn guest_values_are_checked_with_their_lines() {
        let guest = |extra: &str| {
            message(&format!(
                "[[guest]]\nname = \"vm1\"\nsocket = \"/a\"\n{extra}\n"
            ))
        };
        let at4 = |rest: &str| format!("/etc/vhost-rng.toml:4: guest \"vm1\": {rest}");
        assert_eq!(
            guest("rate-bytes = 0"),
            at4("key 'rate-bytes': must be more than 0; omit rate-bytes for no limit")
        );
        assert_eq!(
            guest("rate-bytes = 10\nrate-period = 0"),
            "/etc/vhost-rng.toml:5: guest \"vm1\": key 'rate-period': must be more than 0 \
             ms; omit rate-period for the default, 1000 ms"
        );
        assert_eq!(
            guest("rate-bytes = 10\nburst = 0"),
            "/etc/vhost-rng.toml:5: guest \"vm1\": key 'burst': must be more than 0; \
             omit burst to use rate-bytes"
        );
        assert_eq!(
            guest("weight = 0"),
            at4("key 'weight': 0 is out of range (1 to 1000)")
        );
        assert_eq!(
            guest("weight = 1001"),
            at4("key 'weight': 1001 is out of range (1 to 1000)")
        );
        assert_eq!(
            guest("weight = 99999999999"),
            at4("key 'weight': 99999999999 is out of range (1 to 1000)")
        );
        assert_eq!(
            guest("rate-bytes = -1"),
            at4("key 'rate-bytes': -1 is negative")
        );
        assert_eq!(
            guest("rate-bytes = 18446744073709551616"),
            at4("key 'rate-bytes': 18446744073709551616 is too large (at most 1099511627776)")
        );
        assert_eq!(
            guest("rate-bytes = 1099511627777"),
            at4("key 'rate-bytes': 1099511627777 is too large (at most 1099511627776)")
        );
        assert_eq!(
            guest("rate-bytes = 1\nrate-period = 86400001"),
            "/etc/vhost-rng.toml:5: guest \"vm1\": key 'rate-period': 86400001 is too large \
             (at most 86400000)"
        );
        assert_eq!(
            guest("rate-bytes = 1\nburst = 1099511627777"),
            "/etc/vhost-rng.toml:5: guest \"vm1\": key 'burst': 1099511627777 is too large \
             (at most 1099511627776)"
        );
        assert_eq!(
            guest("rate-bytes = \"65536\""),
            at4("key 'rate-bytes': expected a whole number, found string")
        );
        assert_eq!(
            guest("weight = true"),
            at4("key 'weight': expected a whole number, found boolean")
        );
    }

    #[test]
    fn burst_or_period_without_any_rate_is_an_error_at_that_key() {
        assert_eq!(
            message("[[guest]]\nname = \"vm1\"\nsocket = \"/a\"\n\nburst = 100\n"),
            "/etc/vhost-rng.toml:5: guest \"vm1\": key 'burst' only applies to a rate limit; \
             set rate-bytes too, or remove burst"
        );
        assert_eq!(
            message("[[guest]]\nrate-period = 100\nname = \"vm1\"\nsocket = \"/a\"\n"),
            "/etc/vhost-rng.toml:2: guest \"vm1\": key 'rate-period' only applies to a rate \
             limit; set rate-bytes too, or remove rate-period"
        );
    }

    #[test]
    fn bad_guest_names_and_paths() {
        assert_eq!(
            message("[[guest]]\nname = \"vm 1\"\nsocket = \"/a\"\n"),
            "/etc/vhost-rng.toml:2: guest \"vm 1\": key 'name': \"vm 1\" contains ' '; use \
             only letters, digits, '.', '_' and '-'"
        );
        assert_eq!(
            message("[[guest]]\nname = \"\"\nsocket = \"/a\"\n"),
            "/etc/vhost-rng.toml:2: guest #1: key 'name': \"\" is empty"
        );
        let long = "x".repeat(65);
        assert_eq!(
            message(&format!("[[guest]]\nname = \"{long}\"\nsocket = \"/a\"\n")),
            format!(
                "/etc/vhost-rng.toml:2: guest \"{long}\": key 'name': \"{long}\" is 65 \
                 characters long; at most 64 are allowed"
            )
        );
        assert_eq!(
            message("[[guest]]\nname = \"a\"\nconnect = \"\"\n"),
            "/etc/vhost-rng.toml:3: guest \"a\": key 'connect': the path is empty"
        );
        assert_eq!(
            message("[[guest]]\nname = \"a\"\nsocket = 5\n"),
            "/etc/vhost-rng.toml:3: guest \"a\": key 'socket': expected a path as a string, \
             found integer"
        );
    }

    #[test]
    fn duplicate_guest_name_is_reported_at_the_second() {
        let err = parse_err(
            "[[guest]]\nname = \"vm1\"\nsocket = \"/a\"\n\n\
             [[guest]]\nsocket = \"/b\"\nname = \"vm1\"\n",
        );
        assert_eq!(
            err.to_string(),
            "/etc/vhost-rng.toml:7: guest \"vm1\": the name is already used by the guest \
             on line 2"
        );
        assert_eq!((err.line(), err.key()), (Some(7), Some("name")));
    }

    #[test]
    fn duplicate_socket_path_is_reported_at_the_second() {
        assert_eq!(
            message(
                "[[guest]]\nname = \"vm1\"\nsocket = \"/run/x.sock\"\n\n\
                 [[guest]]\nname = \"vm2\"\nsocket = \"/run/x.sock\"\n"
            ),
            "/etc/vhost-rng.toml:7: guest \"vm2\": /run/x.sock is already used by guest \
             \"vm1\" on line 3"
        );
        // A listening socket and a connecting one cannot share a path either.
        assert_eq!(
            message(
                "[[guest]]\nname = \"vm1\"\nconnect = \"/run/x.sock\"\n\
                 [[guest]]\nname = \"vm2\"\nsocket = \"/run/x.sock\"\n"
            ),
            "/etc/vhost-rng.toml:6: guest \"vm2\": /run/x.sock is already used by guest \
             \"vm1\" on line 3"
        );
    }

    #[test]
    fn guest_must_be_an_array_of_tables() {
        assert_eq!(
            message("[guest]\nname = \"a\"\n"),
            "/etc/vhost-rng.toml:1: key 'guest': write [[guest]], with double brackets, \
             for each guest"
        );
        assert_eq!(
            message("guest = [1]\n"),
            "/etc/vhost-rng.toml:1: key 'guest': expected a table for each guest, found integer"
        );
        assert_eq!(
            message("guest = \"vm1\"\n"),
            "/etc/vhost-rng.toml:1: key 'guest': expected [[guest]] tables, found string"
        );
    }

    #[test]
    fn guest_errors_come_after_a_fully_checked_top_level() {
        // Nothing is returned unless the whole file is right.
        let err = parse_err(
            "mode = \"raw\"\n[[guest]]\nname = \"a\"\nsocket = \"/a\"\n\
             [[guest]]\nname = \"b\"\nsocket = \"/b\"\nweight = 0\n",
        );
        assert_eq!(err.line(), Some(8));
    }

    // ---- the command-line form ----

    #[test]
    fn command_line_form_parses_every_key() {
        assert_eq!(
            spec(concat!(
                "name=vm1,socket=/run/vm1.sock,rate-bytes=65536,rate-period=500,",
                "burst=100000,weight=5"
            )),
            GuestSpec {
                name: "vm1".into(),
                endpoint: GuestEndpoint::Socket("/run/vm1.sock".into()),
                rate_bytes: Some(65536),
                rate_period_ms: 500,
                burst: Some(100_000),
                weight: 5,
            }
        );
        assert_eq!(
            spec("connect=/run/q=1.sock,name=A.b_c-9"),
            GuestSpec::unlimited(
                "A.b_c-9".into(),
                GuestEndpoint::Connect("/run/q=1.sock".into())
            )
        );
        let max = spec(&format!(
            "name={},socket=/a,weight=1000,rate-bytes={}",
            "n".repeat(64),
            MAX_BYTES
        ));
        assert_eq!((max.weight, max.rate_bytes), (1000, Some(1 << 40)));
        let max = spec("name=a,socket=/a,rate-bytes=1,rate-period=86400000,burst=1099511627776");
        assert_eq!((max.rate_period_ms, max.burst), (86_400_000, Some(1 << 40)));
    }

    #[test]
    fn command_line_errors_are_precise() {
        let cases: &[(&str, &str)] = &[
            (
                "",
                "the guest is empty; give name=NAME,socket=PATH or name=NAME,connect=PATH",
            ),
            (
                "name=vm1,socket=/a,rate_bytes=5",
                "unknown key 'rate_bytes' (valid: name, socket, connect, egd, vsock-uds, cid, tcp-psk, rate-bytes, \
                 rate-period, burst, weight)",
            ),
            (
                "vm1",
                "unknown key 'vm1' (valid: name, socket, connect, egd, vsock-uds, cid, tcp-psk, rate-bytes, rate-period, \
                 burst, weight)",
            ),
            (
                "name=vm1,socket",
                "key 'socket' has no value; write socket=VALUE",
            ),
            ("name=vm1,,socket=/a", "empty item between commas"),
            ("name=vm1,socket=/a,", "empty item between commas"),
            ("socket=/a", "missing key 'name': every guest needs a name"),
            (
                "name=vm1",
                "no endpoint: give socket=PATH for a vhost-user socket the daemon listens on, \
                 connect=PATH for one the VMM listens on, egd=PATH for an EGD socket, \
                 vsock-uds=PATH for the agent over hybrid vsock, cid=N for the agent over \
                 AF_VSOCK, or tcp-psk=PATH for the agent over TCP",
            ),
            (
                "name=vm1,socket=/a,connect=/b",
                "more than one of 'socket', 'connect', 'egd', 'vsock-uds', 'cid' and 'tcp-psk' is set; give only one",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=64k",
                "key 'rate-bytes': '64k' is not a whole number",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=",
                "key 'rate-bytes': '' is not a whole number",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=+5",
                "key 'rate-bytes': '+5' is not a whole number",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=-5",
                "key 'rate-bytes': -5 is negative",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=18446744073709551616",
                "key 'rate-bytes': 18446744073709551616 is too large (at most 1099511627776)",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=1099511627777",
                "key 'rate-bytes': 1099511627777 is too large (at most 1099511627776)",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=1,rate-period=86400001",
                "key 'rate-period': 86400001 is too large (at most 86400000)",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=1,burst=1099511627777",
                "key 'burst': 1099511627777 is too large (at most 1099511627776)",
            ),
            (
                "name=vm1,socket=/a,weight=99999999999999999999999",
                "key 'weight': 99999999999999999999999 is out of range (1 to 1000)",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=0",
                "key 'rate-bytes': must be more than 0; omit rate-bytes for no limit",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=-0",
                "key 'rate-bytes': must be more than 0; omit rate-bytes for no limit",
            ),
            (
                "name=vm1,socket=/a,rate-bytes=1,rate-period=0",
                "key 'rate-period': must be more than 0 ms; omit rate-period for the \
                 default, 1000 ms",
            ),
            (
                "name=vm1,socket=/a,burst=10",
                "key 'burst' only applies to a rate limit; set rate-bytes too, or remove burst",
            ),
            (
                "name=vm1,socket=/a,rate-period=10",
                "key 'rate-period' only applies to a rate limit; set rate-bytes too, or \
                 remove rate-period",
            ),
            (
                "name=vm1,socket=/a,weight=0",
                "key 'weight': 0 is out of range (1 to 1000)",
            ),
            (
                "name=vm1,socket=/a,weight=1001",
                "key 'weight': 1001 is out of range (1 to 1000)",
            ),
            (
                "name=vm1,socket=/a,weight=heavy",
                "key 'weight': 'heavy' is not a whole number",
            ),
            (
                "name=vm/1,socket=/a",
                "key 'name': \"vm/1\" contains '/'; use only letters, digits, '.', '_' and '-'",
            ),
            ("name=,socket=/a", "key 'name': \"\" is empty"),
            ("name=vm1,socket=", "key 'socket': the path is empty"),
            ("name=vm1,connect=", "key 'connect': the path is empty"),
            ("name=vm1,socket=/a,name=vm2", "key 'name' is given twice"),
            (
                "name=vm1,socket=/a,rate-bytes=1,rate-bytes=2",
                "key 'rate-bytes' is given twice",
            ),
            (
                "name=vm1,socket=/a,socket=/b",
                "key 'socket' is given twice",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(&spec_err(text), expected, "{text}");
        }
        let long = "x".repeat(65);
        assert_eq!(
            spec_err(&format!("name={long},socket=/a")),
            format!("key 'name': \"{long}\" is 65 characters long; at most 64 are allowed")
        );
    }

    #[test]
    fn command_line_error_keys() {
        let key = |text: &str| text.parse::<GuestSpec>().unwrap_err().key();
        assert_eq!(key("name=a,socket=/a,weight=0"), Some(GuestKey::Weight));
        assert_eq!(key("name=a b,socket=/a"), Some(GuestKey::Name));
        assert_eq!(key("name=a,socket=/a,burst=1"), Some(GuestKey::Burst));
        assert_eq!(key("name=a,socket=/a,connect=/b"), None);
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        let cases = [
            (
                "name=vm1,socket=/run/vm1.sock",
                "name=vm1,socket=/run/vm1.sock",
            ),
            (
                "socket=/a,name=vm1,weight=1,rate-period=1000,rate-bytes=5",
                "name=vm1,socket=/a,rate-bytes=5",
            ),
            (
                "weight=9,burst=7,rate-period=250,rate-bytes=5,connect=/c d,name=x",
                "name=x,connect=/c d,rate-bytes=5,rate-period=250,burst=7,weight=9",
            ),
        ];
        for (input, canonical) in cases {
            let parsed = spec(input);
            assert_eq!(parsed.to_string(), canonical);
            assert_eq!(spec(canonical), parsed);
        }
        for guest in parse_ok(EXAMPLE).guests {
            assert_eq!(spec(&guest.to_string()), guest);
        }
    }

    #[test]
    fn display_leaves_out_limits_that_do_not_apply() {
        let mut guest = socket("a", "/a");
        guest.rate_period_ms = 5;
        guest.burst = Some(9);
        assert_eq!(guest.to_string(), "name=a,socket=/a");
        assert_eq!(spec(&guest.to_string()), socket("a", "/a"));
    }

    #[test]
    fn guest_flag_works_with_clap() {
        use clap::Parser;

        #[derive(Debug, Parser)]
        struct Args {
            #[arg(long = "guest", value_name = "SPEC")]
            guests: Vec<GuestSpec>,
        }

        let args = Args::try_parse_from([
            "t",
            "--guest",
            "name=a,socket=/a",
            "--guest",
            "name=b,connect=/b,weight=2",
        ])
        .unwrap();
        assert_eq!(args.guests.len(), 2);
        assert_eq!(args.guests[1].weight, 2);

        let err = Args::try_parse_from(["t", "--guest", "name=a,socket=/a,weight=0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string()
                .contains("key 'weight': 0 is out of range (1 to 1000)"),
            "{err}"
        );
    }

    // ---- shorthand ----

    #[test]
    fn shorthand_names_after_stem_unless_stems_clash() {
        let paths = [
            Path::new("/run/vm1.sock"),
            Path::new("/a/vm2.sock"),
            Path::new("/b/vm2.sock"),
            Path::new("/c/vm2"),
            Path::new("/run/vm3.rng.sock"),
        ];
        assert_eq!(
            shorthand_names(paths),
            vec!["vm1", "/a/vm2.sock", "/b/vm2.sock", "/c/vm2", "vm3.rng"]
        );
        assert_eq!(shorthand_names([Path::new("/")]), vec!["/"]);
        assert!(shorthand_names(std::iter::empty()).is_empty());
    }

    #[test]
    fn shorthand_guests_are_unlimited_and_named_like_the_daemon_does() {
        assert_eq!(
            GuestSpec::from_socket_shorthand(GuestEndpoint::Connect("/run/qemu/vm9.sock".into())),
            GuestSpec {
                name: "vm9".into(),
                endpoint: GuestEndpoint::Connect("/run/qemu/vm9.sock".into()),
                rate_bytes: None,
                rate_period_ms: 1000,
                burst: None,
                weight: 1,
            }
        );
        let guests = shorthand_guests([
            GuestEndpoint::Socket("/a/vm.sock".into()),
            GuestEndpoint::Socket("/run/other.sock".into()),
            GuestEndpoint::Connect("/b/vm.sock".into()),
        ]);
        let names: Vec<_> = guests.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["/a/vm.sock", "other", "/b/vm.sock"]);
        assert_eq!(
            guests[2].endpoint,
            GuestEndpoint::Connect("/b/vm.sock".into())
        );
    }

    // ---- merging ----

    #[test]
    fn merge_puts_command_line_guests_first() {
        let merged = merge_guests(
            vec![socket("a", "/a"), socket("b", "/b")],
            vec![socket("c", "/c")],
        )
        .unwrap();
        let names: Vec<_> = merged.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(merge_guests(vec![], vec![]).unwrap().is_empty());
    }

    #[test]
    fn merge_rejects_a_name_used_on_both_sides() {
        let err = merge_guests(
            vec![spec("name=vm1,socket=/a,weight=2")],
            vec![socket("vm1", "/b")],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest name \"vm1\" is used twice: on the command line \
             (name=vm1,socket=/a,weight=2) and in the config file (name=vm1,socket=/b)"
        );
        assert_eq!(err.key(), Some("name"));
    }

    #[test]
    fn merge_rejects_a_socket_path_used_on_both_sides() {
        let err = merge_guests(
            vec![GuestSpec::from_socket_shorthand(GuestEndpoint::Connect(
                "/run/x.sock".into(),
            ))],
            vec![socket("vm2", "/run/x.sock")],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/run/x.sock is used by two guests: \"x\" on the command line and \"vm2\" in the \
             config file"
        );
    }

    #[test]
    fn merge_rejects_clashes_within_the_command_line() {
        let err = merge_guests(vec![socket("a", "/a"), socket("a", "/b")], vec![]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest name \"a\" is used twice: on the command line (name=a,socket=/a) and on \
             the command line (name=a,socket=/b)"
        );
        let err = merge_guests(vec![], vec![socket("a", "/x"), socket("b", "/x")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/x is used by two guests: \"a\" in the config file and \"b\" in the config file"
        );
    }

    // ---- vsock and TCP guests ----

    #[test]
    fn cid_and_tcp_psk_guests_parse_and_print_back() {
        let vm = spec("name=vm3,cid=3,rate-bytes=4096");
        assert_eq!(vm.endpoint, GuestEndpoint::Cid(3));
        assert_eq!(vm.endpoint.path(), None);
        assert_eq!(vm.endpoint.address(), Address::Cid(3));
        assert_eq!(vm.to_string(), "name=vm3,cid=3,rate-bytes=4096");
        let xen = spec("name=xen1,tcp-psk=/etc/k/xen1.psk");
        assert_eq!(
            xen.endpoint,
            GuestEndpoint::TcpPsk("/etc/k/xen1.psk".into())
        );
        assert_eq!(xen.to_string(), "name=xen1,tcp-psk=/etc/k/xen1.psk");
        assert_eq!(spec(&xen.to_string()), xen);
        let highest = format!("name=vm,cid={}", VSOCK_CID_ANY - 1);
        assert_eq!(
            spec(&highest).endpoint,
            GuestEndpoint::Cid(VSOCK_CID_ANY - 1)
        );
    }

    #[test]
    fn cids_of_the_host_and_the_wildcard_are_refused() {
        for cid in ["0", "1", "2", "4294967295", "4294967296"] {
            assert_eq!(
                spec_err(&format!("name=vm,cid={cid}")),
                format!(
                    "key 'cid': {cid} is not a guest CID (3 to 4294967294; 0 to 2 are the \
                     hypervisor, local and host)"
                ),
                "{cid}"
            );
        }
        assert_eq!(
            spec_err("name=vm,cid=three"),
            "key 'cid': 'three' is not a whole number"
        );
        assert_eq!(
            spec_err("name=vm,tcp-psk="),
            "key 'tcp-psk': the path is empty"
        );
        assert!(spec_err("name=vm,cid=3,socket=/a").starts_with("more than one of"));
    }

    #[test]
    fn two_guests_may_not_share_a_cid_or_a_key_file() {
        let text = "[[guest]]\nname = \"a\"\ncid = 3\n\n[[guest]]\nname = \"b\"\ncid = 3\n";
        assert_eq!(
            message(text),
            "/etc/vhost-rng.toml:7: guest \"b\": vsock CID 3 is already used by guest \"a\" \
             on line 3"
        );
        let cli = vec![spec("name=a,tcp-psk=/k")];
        let file = vec![spec("name=b,tcp-psk=/k")];
        let err = merge_guests(cli, file).unwrap_err().to_string();
        assert_eq!(
            err,
            "/k is used by two guests: \"a\" on the command line and \"b\" in the config file"
        );
        // A CID and a path never clash.
        assert!(merge_guests(vec![spec("name=a,cid=3")], vec![spec("name=b,socket=/3")]).is_ok());
    }

    #[test]
    fn listener_keys_are_checked() {
        let config =
            parse_ok("vsock = 1024\nvsock-default-rate = 100\nlisten-tcp = \"[::1]:5565\"\n");
        assert_eq!(config.vsock, Some(1024));
        assert_eq!(config.vsock_default_rate, Some(100));
        assert_eq!(config.listen_tcp, Some("[::1]:5565".parse().unwrap()));
        assert_eq!(
            message("vsock-default-rate = 0\n"),
            "/etc/vhost-rng.toml:1: key 'vsock-default-rate': must be more than 0; omit \
             vsock-default-rate to refuse unknown CIDs"
        );
        assert_eq!(
            message("vsock = \"5564\"\n"),
            "/etc/vhost-rng.toml:1: key 'vsock': expected a whole number, found string"
        );
        assert!(message("listen-tcp = \"example.org:5565\"\n").contains("not an IP address"));
    }
}
