// SPDX-License-Identifier: Apache-2.0
//! A guest: its spec ([`GuestSpec`]), its keys and their checks, shared by
//! the command line (`--guest SPEC`, parsed here by [`GuestSpec`]'s
//! `FromStr`) and the file's `[[guest]]` and `[defaults]` tables (whose
//! derived structures, [`GuestTable`] and [`DefaultsTable`], are here too);
//! and the guests of the `--socket` shorthand and [`merge_guests`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use toml::Spanned;

use super::value::{Earliest, Found, as_written};
use super::{
    ConfigError, DEFAULT_RATE_PERIOD_MS, DEFAULT_WEIGHT, FIRST_GUEST_CID, MAX_NAME_LEN, MAX_WEIGHT,
    VSOCK_CID_ANY,
};
use crate::guest::limiter::{MAX_BURST, MAX_BYTES, MAX_PERIOD_MS};

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
    /// A named pipe the daemon keeps filled, for VMMs that read a path
    /// (QEMU `rng-random`, libvirt `<backend model='random'>`, OpenStack
    /// Nova's `rng_dev_path`, cloud-hypervisor `--rng src=`).
    Fifo(PathBuf),
}

/// What a guest's endpoint takes for itself: a path on the host or a vsock
/// CID. No two guests may share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A socket file or key file on the host, by its path as configured.
    Path(PathBuf),
    /// A vsock context ID (the `cid=` endpoint).
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
            | GuestEndpoint::TcpPsk(path)
            | GuestEndpoint::Fifo(path) => Some(path),
            GuestEndpoint::Cid(_) => None,
        }
    }

    /// Whether serving it creates a file at its path, a socket or a FIFO
    /// (rather than connecting to one, or using a key file or a CID).
    pub fn creates_socket(&self) -> bool {
        matches!(
            self,
            GuestEndpoint::Socket(_)
                | GuestEndpoint::Egd(_)
                | GuestEndpoint::VsockUds(_)
                | GuestEndpoint::Fifo(_)
        )
    }

    /// What this endpoint takes for itself, for the check that no two guests
    /// share one; an endpoint without a path (only `cid=` has none) is never
    /// given one here.
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
            GuestEndpoint::Fifo(_) => GuestKey::Fifo,
        }
    }
}

/// One guest: its name, its socket and its share of the entropy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// `[A-Za-z0-9._-]{1,64}`, unique among guests (names derived by
    /// [`GuestSpec::from_socket_shorthand`] are not held to the pattern).
    pub name: String,
    /// Where the guest's VMM (or in-guest agent) reaches the daemon.
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

    pub(super) fn unlimited(name: String, endpoint: GuestEndpoint) -> GuestSpec {
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

/// The command-line form: `KEY=VALUE` items separated by commas. The keys
/// are checked here, in the order given; the values then go through the
/// same checks as a `[[guest]]` table's (see `GuestTable::check`).
impl FromStr for GuestSpec {
    type Err = GuestSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(GuestSpecError::Empty);
        }
        let mut table = GuestTable::default();
        let mut item_start = 0;
        for item in text.split(',') {
            let value_start = item_start;
            item_start += item.len() + 1;
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
            let slot = table.slot(key);
            if slot.is_some() {
                return Err(GuestSpecError::DuplicateKey(key));
            }
            // Each value keeps its place in `text`, as a file's value does
            // in the file, so that the first bad one is the one reported.
            let value_start = value_start + key_text.len() + 1;
            let span = value_start..value_start + value.len();
            *slot = Some(Spanned::new(span, Found::Text(value.to_owned())));
        }
        let reader = Reader {
            text,
            numbers_as_text: true,
        };
        table
            .check(reader, &GuestDefaults::default())
            .map(|guest| guest.spec)
            .map_err(|(_, error)| error)
    }
}

/// The keys of a guest, on the command line and in a `[[guest]]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestKey {
    /// `name`: the guest's name.
    Name,
    /// `socket`: a vhost-user socket the daemon listens on.
    Socket,
    /// `connect`: a vhost-user socket the VMM listens on.
    Connect,
    /// `egd`: an EGD socket the daemon listens on.
    Egd,
    /// `vsock-uds`: the base path of a hybrid vsock socket, for the agent.
    VsockUds,
    /// `cid`: the guest's vsock CID, for the agent over AF_VSOCK.
    Cid,
    /// `tcp-psk`: the guest's pre-shared key file, for the agent over TCP.
    TcpPsk,
    /// `fifo`: a named pipe the daemon keeps filled.
    Fifo,
    /// `rate-bytes`: bytes allowed per rate period.
    RateBytes,
    /// `rate-period`: the rate limit's period, in milliseconds.
    RatePeriod,
    /// `burst`: the most bytes the guest may draw at once, in bytes.
    Burst,
    /// `weight`: the guest's share when guests compete.
    Weight,
}

impl GuestKey {
    /// Every key of a guest, in canonical order.
    pub const ALL: [GuestKey; 12] = [
        GuestKey::Name,
        GuestKey::Socket,
        GuestKey::Connect,
        GuestKey::Egd,
        GuestKey::VsockUds,
        GuestKey::Cid,
        GuestKey::TcpPsk,
        GuestKey::Fifo,
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

    /// The key as written on the command line and in the file
    /// (`rate-bytes`, `vsock-uds`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKey::Name => "name",
            GuestKey::Socket => "socket",
            GuestKey::Connect => "connect",
            GuestKey::Egd => "egd",
            GuestKey::VsockUds => "vsock-uds",
            GuestKey::Cid => "cid",
            GuestKey::TcpPsk => "tcp-psk",
            GuestKey::Fifo => "fifo",
            GuestKey::RateBytes => "rate-bytes",
            GuestKey::RatePeriod => "rate-period",
            GuestKey::Burst => "burst",
            GuestKey::Weight => "weight",
        }
    }

    /// The key written `name`, or `None` for a name that is no key.
    pub fn from_name(name: &str) -> Option<GuestKey> {
        GuestKey::ALL.into_iter().find(|key| key.as_str() == name)
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
    /// A `--guest` with nothing in it.
    #[error("the guest is empty; give name=NAME,socket=PATH or name=NAME,connect=PATH")]
    Empty,
    /// Two commas in a row, or a comma at either end.
    #[error("empty item between commas")]
    EmptyItem,
    /// A key that is not a guest key (or not one `[defaults]` may set).
    #[error("unknown key '{key}' (valid: {})", key_list(.valid))]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The keys that would have been accepted there.
        valid: &'static [GuestKey],
    },
    /// A key without `=VALUE`.
    #[error("key '{0}' has no value; write {0}=VALUE")]
    MissingValue(GuestKey),
    /// The same key twice in one guest.
    #[error("key '{0}' is given twice")]
    DuplicateKey(GuestKey),
    /// A guest without `name`.
    #[error("missing key 'name': every guest needs a name")]
    MissingName,
    /// A guest with none of the endpoint keys.
    #[error(
        "no endpoint: give socket=PATH for a vhost-user socket the daemon listens on, \
         connect=PATH for one the VMM listens on, egd=PATH for an EGD socket, \
         vsock-uds=PATH for the agent over hybrid vsock, cid=N for the agent over \
         AF_VSOCK, tcp-psk=PATH for the agent over TCP, or fifo=PATH for a named pipe"
    )]
    NoEndpoint,
    /// A guest with more than one endpoint key.
    #[error(
        "more than one of 'socket', 'connect', 'egd', 'vsock-uds', 'cid', 'tcp-psk' and \
         'fifo' is set; give only one"
    )]
    BothEndpoints,
    /// `cid` outside the guest CIDs (the value as written is given).
    #[error(
        "key 'cid': {0} is not a guest CID ({FIRST_GUEST_CID} to {max}; 0 to 2 are the \
         hypervisor, local and host)",
        max = VSOCK_CID_ANY - 1
    )]
    CidOutOfRange(String),
    /// `name` does not match `[A-Za-z0-9._-]{1,64}`.
    #[error("key 'name': {name:?} {problem}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
    /// A path key with an empty value.
    #[error("key '{0}': the path is empty")]
    EmptyPath(GuestKey),
    /// A number key whose value is not digits.
    #[error("key '{key}': '{value}' is not a whole number")]
    NotANumber {
        /// The key at fault.
        key: GuestKey,
        /// Its value as written.
        value: String,
    },
    /// A number key with a negative value.
    #[error("key '{key}': {value} is negative")]
    Negative {
        /// The key at fault.
        key: GuestKey,
        /// Its value as written.
        value: String,
    },
    /// A number over the key's bound (the rate limiter's, or the CID range).
    #[error("key '{key}': {value} is too large (at most {max})")]
    TooLarge {
        /// The key at fault.
        key: GuestKey,
        /// Its value as written.
        value: String,
        /// The largest value the key takes.
        max: u64,
    },
    /// `rate-bytes`, `rate-period` or `burst` of 0 (the key is given).
    #[error("key '{0}': must be more than 0{hint}", hint = .0.zero_hint())]
    Zero(GuestKey),
    /// `weight` outside 1 to [`MAX_WEIGHT`](super::MAX_WEIGHT) (the value as
    /// written is given).
    #[error("key 'weight': {0} is out of range (1 to {max})", max = MAX_WEIGHT)]
    WeightOutOfRange(String),
    /// `rate-period` or `burst` set without `rate-bytes` in the same place.
    #[error("key '{0}' only applies to a rate limit; set rate-bytes too, or remove {0}")]
    NeedsRateBytes(GuestKey),
    /// In the file, a value of the wrong TOML type (a number in quotes, a
    /// path as a number).
    #[error("key '{key}': expected {expected}, found {found}")]
    WrongType {
        /// The key at fault.
        key: GuestKey,
        /// What the key takes ("a string", "a whole number", ...).
        expected: &'static str,
        /// The TOML type that was there instead.
        found: &'static str,
    },
}

impl GuestSpecError {
    /// `value` is more than `key` allows.
    fn too_large(key: GuestKey, value: String) -> GuestSpecError {
        match key.max_value() {
            Some(max) => GuestSpecError::TooLarge { key, value, max },
            None if key == GuestKey::Cid => GuestSpecError::CidOutOfRange(value),
            None => GuestSpecError::WeightOutOfRange(value),
        }
    }

    pub(super) fn unknown_key(key: &str, valid: &'static [GuestKey]) -> GuestSpecError {
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
    /// The name is empty.
    Empty,
    /// The name has a character outside `[A-Za-z0-9._-]` (the first is
    /// given).
    BadChar(char),
    /// The name is longer than [`MAX_NAME_LEN`](super::MAX_NAME_LEN) (its
    /// length in bytes is given).
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
    /// Bytes per period for guests without `rate-bytes`; `None` for no limit.
    pub rate_bytes: Option<u64>,
    /// Rate period in milliseconds for guests without `rate-period`; `None`
    /// for the built-in 1000 ms.
    pub rate_period_ms: Option<u64>,
    /// Burst in bytes for guests that set neither `burst` nor `rate-bytes`;
    /// `None` for the rate itself.
    pub burst: Option<u64>,
    /// Weight for guests without `weight`; `None` for 1.
    pub weight: Option<u32>,
}

/// A `[[guest]]` table as serde reads it, or a `--guest SPEC` as
/// [`GuestSpec`]'s `FromStr` fills it in: every key, with where its value
/// was given, still unchecked. The fields are in the order of
/// [`GuestKey::ALL`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct GuestTable {
    name: Option<Spanned<Found>>,
    socket: Option<Spanned<Found>>,
    connect: Option<Spanned<Found>>,
    egd: Option<Spanned<Found>>,
    vsock_uds: Option<Spanned<Found>>,
    cid: Option<Spanned<Found>>,
    tcp_psk: Option<Spanned<Found>>,
    fifo: Option<Spanned<Found>>,
    rate_bytes: Option<Spanned<Found>>,
    rate_period: Option<Spanned<Found>>,
    burst: Option<Spanned<Found>>,
    weight: Option<Spanned<Found>>,
}

/// The `[defaults]` table as serde reads it: the limit keys of a guest
/// ([`GuestKey::DEFAULTS`], in that order), unchecked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct DefaultsTable {
    rate_bytes: Option<Spanned<Found>>,
    rate_period: Option<Spanned<Found>>,
    burst: Option<Spanned<Found>>,
    weight: Option<Spanned<Found>>,
}

/// A guest checked whole, with where its name and its endpoint were given
/// (for the file's messages about a name or a path used twice).
#[derive(Debug)]
pub(super) struct CheckedGuest {
    pub(super) spec: GuestSpec,
    pub(super) name_at: usize,
    pub(super) endpoint_at: usize,
}

/// A guest's mistake: where the value at fault starts, or `None` when it is
/// the guest as a whole (no name, no endpoint).
pub(super) type GuestMistake = (Option<usize>, GuestSpecError);

impl GuestTable {
    /// Where the command line puts the value of `key`.
    fn slot(&mut self, key: GuestKey) -> &mut Option<Spanned<Found>> {
        match key {
            GuestKey::Name => &mut self.name,
            GuestKey::Socket => &mut self.socket,
            GuestKey::Connect => &mut self.connect,
            GuestKey::Egd => &mut self.egd,
            GuestKey::VsockUds => &mut self.vsock_uds,
            GuestKey::Cid => &mut self.cid,
            GuestKey::TcpPsk => &mut self.tcp_psk,
            GuestKey::Fifo => &mut self.fifo,
            GuestKey::RateBytes => &mut self.rate_bytes,
            GuestKey::RatePeriod => &mut self.rate_period,
            GuestKey::Burst => &mut self.burst,
            GuestKey::Weight => &mut self.weight,
        }
    }

    /// The name given, even a bad one, to say which guest a message is
    /// about; `None` when there is no usable text to say it with.
    pub(super) fn given_name(&self) -> Option<String> {
        match self.name.as_ref().map(Spanned::get_ref) {
            Some(Found::Text(name)) if !name.is_empty() => Some(name.clone()),
            _ => None,
        }
    }

    /// Checks each key (reporting the first mistake in the order given),
    /// then the keys together: exactly one endpoint, and `rate-period` and
    /// `burst` only with a rate. Keys not given come from `defaults`, then
    /// the built-in defaults.
    pub(super) fn check(
        self,
        reader: Reader<'_>,
        defaults: &GuestDefaults,
    ) -> Result<CheckedGuest, GuestMistake> {
        use GuestEndpoint as E;
        use GuestKey as K;
        let start = |value: &Option<Spanned<Found>>| value.as_ref().map(|v| v.span().start);
        let (period_at, burst_at) = (start(&self.rate_period), start(&self.burst));
        let mut first = Earliest::default();
        let name = first.check_at(self.name, |v| reader.name(v));
        let mut endpoints: Vec<(usize, GuestEndpoint)> = [
            first.check_at(self.socket, |v| reader.path(K::Socket, v).map(E::Socket)),
            first.check_at(self.connect, |v| reader.path(K::Connect, v).map(E::Connect)),
            first.check_at(self.egd, |v| reader.path(K::Egd, v).map(E::Egd)),
            first.check_at(self.vsock_uds, |v| {
                reader.path(K::VsockUds, v).map(E::VsockUds)
            }),
            first.check_at(self.cid, |v| reader.cid(&v).map(E::Cid)),
            first.check_at(self.tcp_psk, |v| reader.path(K::TcpPsk, v).map(E::TcpPsk)),
            first.check_at(self.fifo, |v| reader.path(K::Fifo, v).map(E::Fifo)),
        ]
        .into_iter()
        .flatten()
        .collect();
        // The guest's own limits, which [defaults] fills in where missing.
        let own = GuestDefaults {
            rate_bytes: first.check(self.rate_bytes, |v| reader.limit(K::RateBytes, &v)),
            rate_period_ms: first.check(self.rate_period, |v| reader.limit(K::RatePeriod, &v)),
            burst: first.check(self.burst, |v| reader.limit(K::Burst, &v)),
            weight: first.check(self.weight, |v| reader.weight(&v)),
        };
        first.finish().map_err(|(at, error)| (Some(at), error))?;

        let (name_at, name) = name.ok_or((None, GuestSpecError::MissingName))?;
        endpoints.sort_by_key(|(at, _)| *at);
        let mut endpoints = endpoints.into_iter();
        let (endpoint_at, endpoint) = match (endpoints.next(), endpoints.next()) {
            (Some(endpoint), None) => endpoint,
            (None, _) => return Err((None, GuestSpecError::NoEndpoint)),
            // The second endpoint given is where the guest went wrong.
            (Some(_), Some((second_at, _))) => {
                return Err((Some(second_at), GuestSpecError::BothEndpoints));
            }
        };
        let mut spec = GuestSpec::unlimited(name, endpoint);
        spec.weight = own.weight.or(defaults.weight).unwrap_or(DEFAULT_WEIGHT);
        let checked = |spec| CheckedGuest {
            spec,
            name_at,
            endpoint_at,
        };
        let Some(rate_bytes) = own.rate_bytes.or(defaults.rate_bytes) else {
            // Defaults for the rate-limit keys only matter to limited
            // guests; a guest's own ones without a limit are a mistake.
            if own.rate_period_ms.is_some() {
                return Err((period_at, GuestSpecError::NeedsRateBytes(K::RatePeriod)));
            }
            if own.burst.is_some() {
                return Err((burst_at, GuestSpecError::NeedsRateBytes(K::Burst)));
            }
            return Ok(checked(spec));
        };
        spec.rate_bytes = Some(rate_bytes);
        spec.rate_period_ms = own
            .rate_period_ms
            .or(defaults.rate_period_ms)
            .unwrap_or(DEFAULT_RATE_PERIOD_MS);
        // A guest that sets its own rate but no burst gets a burst of its
        // own rate, not the default burst meant for the default rate.
        spec.burst = match (own.burst, own.rate_bytes) {
            (Some(burst), _) => Some(burst),
            (None, Some(_)) => None,
            (None, None) => defaults.burst,
        };
        Ok(checked(spec))
    }
}

impl DefaultsTable {
    /// Checks each key as a guest's own, reporting the first mistake in the
    /// file, with where its value starts.
    pub(super) fn check(
        self,
        reader: Reader<'_>,
    ) -> Result<GuestDefaults, (usize, GuestSpecError)> {
        let mut first = Earliest::default();
        let defaults = GuestDefaults {
            rate_bytes: first.check(self.rate_bytes, |v| reader.limit(GuestKey::RateBytes, &v)),
            rate_period_ms: first
                .check(self.rate_period, |v| reader.limit(GuestKey::RatePeriod, &v)),
            burst: first.check(self.burst, |v| reader.limit(GuestKey::Burst, &v)),
            weight: first.check(self.weight, |v| reader.weight(&v)),
        };
        first.finish()?;
        Ok(defaults)
    }
}

/// Checks a guest's values one by one, whether they come from the file or
/// from the command line.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reader<'a> {
    /// The text the values' positions are in: a number out of range is
    /// quoted as written there.
    pub(super) text: &'a str,
    /// Whether numbers come as digits in text (the command line) rather
    /// than as TOML integers (where text in quotes is the wrong type).
    pub(super) numbers_as_text: bool,
}

impl Reader<'_> {
    fn name(self, value: Spanned<Found>) -> Result<String, GuestSpecError> {
        match value.into_inner() {
            Found::Text(name) => validate_name(&name).map(|()| name),
            other => Err(GuestSpecError::WrongType {
                key: GuestKey::Name,
                expected: "a string",
                found: other.type_name(),
            }),
        }
    }

    fn path(self, key: GuestKey, value: Spanned<Found>) -> Result<PathBuf, GuestSpecError> {
        match value.into_inner() {
            Found::Text(path) if path.is_empty() => Err(GuestSpecError::EmptyPath(key)),
            Found::Text(path) => Ok(PathBuf::from(path)),
            other => Err(GuestSpecError::WrongType {
                key,
                expected: "a path as a string",
                found: other.type_name(),
            }),
        }
    }

    /// A whole number of at least 0 (`-0` is 0).
    fn whole(self, key: GuestKey, value: &Spanned<Found>) -> Result<u64, GuestSpecError> {
        match value.get_ref() {
            Found::Whole(number) => Ok(*number),
            Found::Text(text) if self.numbers_as_text => parse_number_text(key, text),
            Found::OutOfRange => {
                let written = as_written(self.text, value.span());
                Err(if written.starts_with('-') {
                    GuestSpecError::Negative {
                        key,
                        value: written,
                    }
                } else {
                    GuestSpecError::too_large(key, written)
                })
            }
            other => Err(GuestSpecError::WrongType {
                key,
                expected: "a whole number",
                found: other.type_name(),
            }),
        }
    }

    /// `rate-bytes`, `rate-period` or `burst`: more than 0, at most what the
    /// rate limiter takes.
    fn limit(self, key: GuestKey, value: &Spanned<Found>) -> Result<u64, GuestSpecError> {
        let number = self.whole(key, value)?;
        if number == 0 {
            return Err(GuestSpecError::Zero(key));
        }
        if key.max_value().is_some_and(|max| number > max) {
            return Err(GuestSpecError::too_large(key, number.to_string()));
        }
        Ok(number)
    }

    fn weight(self, value: &Spanned<Found>) -> Result<u32, GuestSpecError> {
        let number = self.whole(GuestKey::Weight, value)?;
        u32::try_from(number)
            .ok()
            .filter(|weight| (1..=MAX_WEIGHT).contains(weight))
            .ok_or_else(|| GuestSpecError::WeightOutOfRange(number.to_string()))
    }

    fn cid(self, value: &Spanned<Found>) -> Result<u32, GuestSpecError> {
        let number = self.whole(GuestKey::Cid, value)?;
        u32::try_from(number)
            .ok()
            .filter(|cid| (FIRST_GUEST_CID..VSOCK_CID_ANY).contains(cid))
            .ok_or_else(|| GuestSpecError::CidOutOfRange(number.to_string()))
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
    /// A `--guest`, `--socket` or `--connect` option.
    CommandLine,
    /// A `[[guest]]` table of the `--config` file.
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::EXAMPLE;
    use crate::config::test_support::*;

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
                "unknown key 'rate_bytes' (valid: name, socket, connect, egd, vsock-uds, cid, tcp-psk, fifo, rate-bytes, \
                 rate-period, burst, weight)",
            ),
            (
                "vm1",
                "unknown key 'vm1' (valid: name, socket, connect, egd, vsock-uds, cid, tcp-psk, fifo, rate-bytes, rate-period, \
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
                 AF_VSOCK, tcp-psk=PATH for the agent over TCP, or fifo=PATH for a named pipe",
            ),
            (
                "name=vm1,socket=/a,connect=/b",
                "more than one of 'socket', 'connect', 'egd', 'vsock-uds', 'cid', 'tcp-psk' and 'fifo' is set; give only one",
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
        // Beyond u64, a CID is out of range like any other (this used to be
        // reported as a weight).
        assert_eq!(
            spec_err("name=vm,cid=99999999999999999999"),
            "key 'cid': 99999999999999999999 is not a guest CID (3 to 4294967294; 0 to 2 are \
             the hypervisor, local and host)"
        );
    }
}
