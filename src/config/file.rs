// SPDX-License-Identifier: Apache-2.0
//! The `--config` TOML file: serde reads its keys into `FileTable` (refusing
//! unknown ones, keeping where each value is), and the values are then
//! checked whole into a [`ConfigFile`]: the top-level keys and `[defaults]`
//! in file order, then each `[[guest]]` (see `guest.rs`) and the names and
//! paths that two guests share. What serde refuses (bad TOML, an unknown
//! key) becomes an error naming the file, the line, the key and the guest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::guest::{DefaultsTable, GuestTable, Reader};
use super::value::{Earliest, Found, ListOr, TableOr, as_written};
use super::{Address, ConfigError, GuestDefaults, GuestKey, GuestSpec, GuestSpecError};
use crate::entropy::pool::Mode;
use crate::entropy::source::SourceSpec;
use crate::guest::limiter::MAX_BYTES;
use crate::service::sandbox::{Isolation, SeccompMode};

/// The keys a configuration file may have at its top level.
pub const FILE_KEYS: [&str; 21] = [
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
    "user",
    "seccomp",
    "isolation",
    "socket-dirs",
    "defaults",
    "guest",
];

/// A configuration file, checked whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigFile {
    /// The file it was read from (for messages).
    pub origin: PathBuf,
    /// `sources`; empty when the key is not given (an empty list is an
    /// error).
    pub sources: Vec<SourceSpec>,
    /// `mode`: how guests are served (`drbg` or `raw`).
    pub mode: Option<Mode>,
    /// `reseed-bytes`: in drbg mode, the most bytes a guest's DRBG gives
    /// before it is reseeded.
    pub reseed_bytes: Option<u64>,
    /// `reseed-secs`: in drbg mode, the most seconds between reseeds of a
    /// guest's DRBG.
    pub reseed_secs: Option<u64>,
    /// Cap on bytes per second to all guests together.
    pub max_rate: Option<u64>,
    /// Permission bits, at most `0o777`.
    pub socket_mode: Option<u32>,
    /// Group name or number, as written; see [`ConfigFile::socket_group_id`].
    pub socket_group: Option<String>,
    /// `control`: the Unix socket the daemon takes control commands on.
    pub control: Option<PathBuf>,
    /// `metrics`: the address and port the metrics endpoint listens on.
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
    /// `user`: `USER[:GROUP]` the serving process runs as after set-up.
    pub user: Option<String>,
    /// `seccomp`: what a system call outside the allow-list does.
    pub seccomp: Option<SeccompMode>,
    /// `isolation`: whether each vhost-user guest has a process of its own.
    pub isolation: Option<Isolation>,
    /// `socket-dirs`: directories where guests added later (control
    /// socket, reload) may have their socket files.
    pub socket_dirs: Vec<PathBuf>,
    /// `[defaults]`: the limits of guests that do not set their own (already
    /// applied to `guests`).
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
    let file = FileText { text, path: origin };
    let table: FileTable = toml::from_str(text).map_err(|error| file.refused(&error))?;
    table.check(&file)
}

/// The file as serde reads it: each top-level key of [`FILE_KEYS`], in that
/// order, with where its value is, unchecked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileTable {
    sources: Option<Spanned<ListOr<Found>>>,
    mode: Option<Spanned<Found>>,
    reseed_bytes: Option<Spanned<Found>>,
    reseed_secs: Option<Spanned<Found>>,
    max_rate: Option<Spanned<Found>>,
    socket_mode: Option<Spanned<Found>>,
    socket_group: Option<Spanned<Found>>,
    control: Option<Spanned<Found>>,
    metrics: Option<Spanned<Found>>,
    vsock: Option<Spanned<Found>>,
    vsock_default_rate: Option<Spanned<Found>>,
    listen_tcp: Option<Spanned<Found>>,
    vhost_user_max_regions: Option<Spanned<Found>>,
    vhost_user_max_memory: Option<Spanned<Found>>,
    vhost_user_setup_timeout: Option<Spanned<Found>>,
    user: Option<Spanned<Found>>,
    seccomp: Option<Spanned<Found>>,
    isolation: Option<Spanned<Found>>,
    socket_dirs: Option<Spanned<ListOr<Found>>>,
    defaults: Option<Spanned<TableOr<DefaultsTable>>>,
    guest: Option<Spanned<ListOr<TableOr<GuestTable>>>>,
}

impl FileTable {
    /// Checks the top-level keys and `[defaults]`, reporting the first
    /// mistake in the file, and only then the guests, which need the
    /// defaults.
    fn check(self, file: &FileText<'_>) -> Result<ConfigFile, ConfigError> {
        let mut first = Earliest::default();
        let socket_group = first.check(self.socket_group, |value| {
            let line = file.line(value.span().start);
            let expected = "a group name or number as a string";
            file.text("socket-group", value, expected)
                .map(|group| (group, line))
        });
        let mut config = ConfigFile {
            origin: file.path.to_owned(),
            sources: first
                .check(self.sources, |v| file.sources(v))
                .unwrap_or_default(),
            mode: first.check(self.mode, |v| file.mode(v)),
            reseed_bytes: first.check(self.reseed_bytes, |v| {
                file.positive("reseed-bytes", v, u64::MAX, "")
            }),
            reseed_secs: first.check(self.reseed_secs, |v| {
                file.positive("reseed-secs", v, u64::MAX, "")
            }),
            max_rate: first.check(self.max_rate, |v| {
                file.positive("max-rate", v, MAX_BYTES, "; omit max-rate for no limit")
            }),
            socket_mode: first.check(self.socket_mode, |v| file.socket_mode(v)),
            socket_group_line: socket_group.as_ref().map_or(0, |(_, line)| *line),
            socket_group: socket_group.map(|(group, _)| group),
            control: first.check(self.control, |v| {
                file.text("control", v, "a path as a string")
                    .map(PathBuf::from)
            }),
            metrics: first.check(self.metrics, |v| file.socket_addr("metrics", v)),
            vsock: first
                .check(self.vsock, |v| {
                    file.positive("vsock", v, u64::from(u32::MAX - 1), "")
                })
                .and_then(|port| u32::try_from(port).ok()),
            vsock_default_rate: first.check(self.vsock_default_rate, |v| {
                let hint = "; omit vsock-default-rate to refuse unknown CIDs";
                file.positive("vsock-default-rate", v, MAX_BYTES, hint)
            }),
            listen_tcp: first.check(self.listen_tcp, |v| file.socket_addr("listen-tcp", v)),
            vhost_user_max_regions: first.check(self.vhost_user_max_regions, |v| {
                file.positive("vhost-user-max-regions", v, 65535, "")
            }),
            vhost_user_max_memory: first.check(self.vhost_user_max_memory, |v| {
                file.positive("vhost-user-max-memory", v, u64::MAX, "")
            }),
            vhost_user_setup_timeout: first.check(self.vhost_user_setup_timeout, |v| {
                file.positive("vhost-user-setup-timeout", v, 3600, "")
            }),
            user: first.check(self.user, |v| {
                file.text("user", v, "\"USER\" or \"USER:GROUP\" as a string")
            }),
            seccomp: first.check(self.seccomp, |v| file.seccomp(v)),
            isolation: first.check(self.isolation, |v| file.isolation(v)),
            socket_dirs: first
                .check(self.socket_dirs, |v| file.paths("socket-dirs", v))
                .unwrap_or_default(),
            defaults: first
                .check(self.defaults, |v| file.defaults(v))
                .unwrap_or_default(),
            guests: Vec::new(),
            guests_declared: false,
        };
        first.finish().map_err(|(_, error)| error)?;
        if let Some(guests) = self.guest {
            config.guests = file.guests(guests, &config.defaults)?;
            config.guests_declared = true;
        }
        Ok(config)
    }
}

/// The file's text and name: positions become lines, and values errors.
struct FileText<'a> {
    text: &'a str,
    path: &'a Path,
}

impl FileText<'_> {
    /// The line (from 1) of the byte at `at`.
    fn line(&self, at: usize) -> usize {
        let end = at.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn reader(&self) -> Reader<'_> {
        Reader {
            text: self.text,
            numbers_as_text: false,
        }
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
            line: span.map_or(1, |span| self.line(span.start)),
            snippet,
            message: error.message().to_owned(),
        }
    }

    /// What serde refused, as our error. Only keys are left to serde (values
    /// are read leniently, see `value.rs`), so it refuses bad TOML and
    /// unknown keys, the latter at the key's position.
    fn refused(&self, error: &toml::de::Error) -> ConfigError {
        // serde stops at an unknown key without saying which table it was
        // in; the document, parsed again, tells (and names the guest).
        let unknown = error.span().and_then(|at| {
            let document = DeTable::parse(self.text).ok()?;
            self.unknown_key(document.get_ref(), &at)
        });
        unknown.unwrap_or_else(|| self.syntax_error(error))
    }

    /// The unknown key of the table that has a key at `at`. It is the first
    /// unknown key in the file, which an operator reading down meets first
    /// (serde reports the first in sorted order).
    fn unknown_key(&self, document: &DeTable<'_>, at: &Range<usize>) -> Option<ConfigError> {
        let has_key_at = |table: &DeTable<'_>| table.keys().any(|key| key.span() == *at);
        let path = self.path.to_owned();
        if has_key_at(document) {
            let key = first_unknown(document, |key| FILE_KEYS.contains(&key))?;
            return Some(ConfigError::UnknownKey {
                path,
                line: self.line(key.span().start),
                key: key.get_ref().to_string(),
            });
        }
        let value = |key: &str| document.get(key).map(Spanned::get_ref);
        let defaults = value("defaults").and_then(DeValue::as_table);
        if let Some(defaults) = defaults.filter(|table| has_key_at(table)) {
            let key = first_unknown(defaults, |key| {
                GuestKey::from_name(key).is_some_and(|key| GuestKey::DEFAULTS.contains(&key))
            })?;
            return Some(ConfigError::Defaults {
                path,
                line: self.line(key.span().start),
                error: GuestSpecError::unknown_key(key.get_ref(), &GuestKey::DEFAULTS),
            });
        }
        let (index, guest) =
            value("guest")?
                .as_array()?
                .iter()
                .enumerate()
                .find_map(|(index, item)| {
                    let table = item.get_ref().as_table()?;
                    has_key_at(table).then_some((index, table))
                })?;
        let key = first_unknown(guest, |key| GuestKey::from_name(key).is_some())?;
        let name = guest
            .get("name")
            .and_then(|name| name.get_ref().as_str())
            .filter(|name| !name.is_empty())
            .map(str::to_owned);
        Some(ConfigError::Guest {
            path,
            line: self.line(key.span().start),
            name,
            number: index + 1,
            error: GuestSpecError::unknown_key(key.get_ref(), &GuestKey::ALL),
        })
    }

    fn value_error(&self, key: &str, span: Range<usize>, message: String) -> ConfigError {
        ConfigError::Value {
            path: self.path.to_owned(),
            line: self.line(span.start),
            key: key.to_owned(),
            message,
        }
    }

    /// A non-empty string.
    fn text(
        &self,
        key: &str,
        value: Spanned<Found>,
        expected: &str,
    ) -> Result<String, ConfigError> {
        let span = value.span();
        match value.into_inner() {
            Found::Text(text) if text.is_empty() => {
                Err(self.value_error(key, span, "the value is empty".into()))
            }
            Found::Text(text) => Ok(text),
            other => Err(self.value_error(
                key,
                span,
                format!("expected {expected}, found {}", other.type_name()),
            )),
        }
    }

    /// A whole number from 1 to `max`.
    fn positive(
        &self,
        key: &str,
        value: Spanned<Found>,
        max: u64,
        zero_hint: &str,
    ) -> Result<u64, ConfigError> {
        let span = value.span();
        let message = match value.get_ref() {
            Found::Whole(0) => format!("must be more than 0{zero_hint}"),
            Found::Whole(number) if *number > max => {
                format!("{number} is too large (at most {max})")
            }
            Found::Whole(number) => return Ok(*number),
            Found::OutOfRange => {
                let written = as_written(self.text, span.clone());
                if written.starts_with('-') {
                    format!("{written} is negative")
                } else {
                    format!("{written} is too large (at most {max})")
                }
            }
            other => format!("expected a whole number, found {}", other.type_name()),
        };
        Err(self.value_error(key, span, message))
    }

    fn sources(&self, value: Spanned<ListOr<Found>>) -> Result<Vec<SourceSpec>, ConfigError> {
        let key = "sources";
        let span = value.span();
        let items = match value.into_inner() {
            ListOr::List(items) if items.is_empty() => {
                return Err(self.value_error(
                    key,
                    span,
                    "the list is empty; name at least one source, or leave sources out to use \
                     the host's hardware sources"
                        .into(),
                ));
            }
            ListOr::List(items) => items,
            ListOr::Other(found) => {
                return Err(self.value_error(
                    key,
                    span,
                    format!(
                        "expected a list of sources, e.g. [\"hwrng\", \"rdseed\"], found {found}"
                    ),
                ));
            }
        };
        let mut sources = Vec::new();
        for item in items {
            let span = item.span();
            let spec = match item.into_inner() {
                Found::Text(spec) => spec,
                other => {
                    return Err(self.value_error(
                        key,
                        span,
                        format!(
                            "expected a source as a string, e.g. \"hwrng\", found {}",
                            other.type_name()
                        ),
                    ));
                }
            };
            let source = spec
                .parse::<SourceSpec>()
                .map_err(|e| self.value_error(key, span, format!("{spec:?}: {e}")))?;
            sources.push(source);
        }
        Ok(sources)
    }

    fn mode(&self, value: Spanned<Found>) -> Result<Mode, ConfigError> {
        let span = value.span();
        let text = self.text("mode", value, "\"drbg\" or \"raw\"")?;
        [Mode::Drbg, Mode::Raw]
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| {
                self.value_error("mode", span, format!("unknown mode '{text}' (drbg or raw)"))
            })
    }

    fn paths(&self, key: &str, value: Spanned<ListOr<Found>>) -> Result<Vec<PathBuf>, ConfigError> {
        let span = value.span();
        let items = match value.into_inner() {
            ListOr::List(items) => items,
            ListOr::Other(found) => {
                return Err(self.value_error(
                    key,
                    span,
                    format!("expected a list of paths, e.g. [\"/run/vhost-rng\"], found {found}"),
                ));
            }
        };
        items
            .into_iter()
            .map(|item| {
                let span = item.span();
                match item.into_inner() {
                    Found::Text(path) if !path.is_empty() => Ok(PathBuf::from(path)),
                    other => Err(self.value_error(
                        key,
                        span,
                        format!("expected a path as a string, found {}", other.type_name()),
                    )),
                }
            })
            .collect()
    }

    fn seccomp(&self, value: Spanned<Found>) -> Result<SeccompMode, ConfigError> {
        let span = value.span();
        let text = self.text("seccomp", value, "\"kill\", \"log\" or \"none\"")?;
        text.parse()
            .map_err(|message| self.value_error("seccomp", span, message))
    }

    fn isolation(&self, value: Spanned<Found>) -> Result<Isolation, ConfigError> {
        let span = value.span();
        let text = self.text("isolation", value, "\"shared\" or \"guest\"")?;
        text.parse()
            .map_err(|message| self.value_error("isolation", span, message))
    }

    fn socket_mode(&self, value: Spanned<Found>) -> Result<u32, ConfigError> {
        let key = "socket-mode";
        let span = value.span();
        let text = self.text(key, value, "octal digits as a string, e.g. \"0660\"")?;
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
                span,
                format!(
                    "'{text}' is not a permission mode: give octal digits up to 0777, e.g. \"0660\""
                ),
            )
        })
    }

    fn socket_addr(&self, key: &str, value: Spanned<Found>) -> Result<SocketAddr, ConfigError> {
        let span = value.span();
        let text = self.text(key, value, "an address and port as a string")?;
        text.parse().map_err(|_| {
            self.value_error(
                key,
                span,
                format!(
                    "'{text}' is not an IP address and port, e.g. 127.0.0.1:9564 or [::1]:9564"
                ),
            )
        })
    }

    fn defaults(
        &self,
        value: Spanned<TableOr<DefaultsTable>>,
    ) -> Result<GuestDefaults, ConfigError> {
        let span = value.span();
        match value.into_inner() {
            TableOr::Table(table) => {
                table
                    .check(self.reader())
                    .map_err(|(at, error)| ConfigError::Defaults {
                        path: self.path.to_owned(),
                        line: self.line(at),
                        error,
                    })
            }
            TableOr::Other(found) => Err(self.value_error(
                "defaults",
                span,
                format!("expected a [defaults] table, found {found}"),
            )),
        }
    }

    fn guests(
        &self,
        value: Spanned<ListOr<TableOr<GuestTable>>>,
        defaults: &GuestDefaults,
    ) -> Result<Vec<GuestSpec>, ConfigError> {
        let span = value.span();
        let items = match value.into_inner() {
            ListOr::List(items) => items,
            ListOr::Other("table") => {
                return Err(self.value_error(
                    "guest",
                    span,
                    "write [[guest]], with double brackets, for each guest".into(),
                ));
            }
            ListOr::Other(found) => {
                return Err(self.value_error(
                    "guest",
                    span,
                    format!("expected [[guest]] tables, found {found}"),
                ));
            }
        };
        let mut guests = Vec::new();
        // Line of each name and of each endpoint's address (with its guest)
        // so far.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut addresses: HashMap<Address, (String, usize)> = HashMap::new();
        for (index, item) in items.into_iter().enumerate() {
            let header = item.span();
            let table = match item.into_inner() {
                TableOr::Table(table) => table,
                TableOr::Other(found) => {
                    return Err(self.value_error(
                        "guest",
                        header,
                        format!("expected a table for each guest, found {found}"),
                    ));
                }
            };
            let name = table.given_name();
            let guest = table
                .check(self.reader(), defaults)
                .map_err(|(at, error)| ConfigError::Guest {
                    path: self.path.to_owned(),
                    line: self.line(at.unwrap_or(header.start)),
                    name,
                    number: index + 1,
                    error,
                })?;
            let spec = guest.spec;
            let name_line = self.line(guest.name_at);
            if let Some(&first_line) = names.get(&spec.name) {
                return Err(ConfigError::DuplicateName {
                    path: self.path.to_owned(),
                    line: name_line,
                    name: spec.name,
                    first_line,
                });
            }
            let address = spec.endpoint.address();
            let address_line = self.line(guest.endpoint_at);
            if let Some((other, other_line)) = addresses.get(&address) {
                return Err(ConfigError::DuplicatePath {
                    path: self.path.to_owned(),
                    line: address_line,
                    name: spec.name,
                    endpoint: address,
                    other: other.clone(),
                    other_line: *other_line,
                });
            }
            names.insert(spec.name.clone(), name_line);
            addresses.insert(address, (spec.name.clone(), address_line));
            guests.push(spec);
        }
        Ok(guests)
    }
}

/// The first key of `table` in the file that is not `known`.
fn first_unknown<'a, 'i>(
    table: &'a DeTable<'i>,
    known: impl Fn(&str) -> bool,
) -> Option<&'a Spanned<DeString<'i>>> {
    table
        .keys()
        .filter(|key| !known(key.get_ref()))
        .min_by_key(|key| key.span().start)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use nix::unistd::Gid;

    use super::*;
    use crate::config::test_support::*;
    use crate::config::{DEFAULT_RATE_PERIOD_MS, EXAMPLE, GuestEndpoint, merge_guests};

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
                GuestSpec {
                    name: "nova".into(),
                    endpoint: GuestEndpoint::Fifo("/run/vhost-rng/nova.fifo".into()),
                    rate_bytes: Some(1048576),
                    rate_period_ms: 1000,
                    burst: None,
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
            "isolation = \"shared\"",
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
        assert_eq!(config.guests.len(), 6);

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
             vhost-user-max-memory, vhost-user-setup-timeout, user, seccomp, isolation, \
             socket-dirs, defaults, guest)"
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
            message("sources = [\n  \"os\",\n  \"havege\",\n]\n"),
            "/etc/vhost-rng.toml:3: key 'sources': \"havege\": unknown source 'havege': \
             use hwrng[=PATH], rdseed, jitter, file=PATH or os"
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
    fn sandbox_keys_are_read_and_checked() {
        let config = parse_ok(
            "user = \"vhost-rng:kvm\"\nseccomp = \"log\"\nsocket-dirs = [\"/run/a\", \"/run/b\"]\n",
        );
        assert_eq!(config.user.as_deref(), Some("vhost-rng:kvm"));
        assert_eq!(config.seccomp, Some(SeccompMode::Log));
        let isolated = parse_ok("isolation = \"guest\"\n");
        assert_eq!(isolated.isolation, Some(Isolation::Guest));
        assert_eq!(config.isolation, None);
        assert_eq!(
            parse_err("isolation = \"process\"\n").to_string(),
            "/etc/vhost-rng.toml:1: key 'isolation': 'process': expected shared or guest"
        );
        assert_eq!(
            config.socket_dirs,
            [PathBuf::from("/run/a"), PathBuf::from("/run/b")]
        );
        assert_eq!(
            parse_err("seccomp = \"trap\"\n").to_string(),
            "/etc/vhost-rng.toml:1: key 'seccomp': 'trap': expected kill, log or none"
        );
        assert!(
            parse_err("socket-dirs = \"/run/a\"\n")
                .to_string()
                .contains("expected a list of paths")
        );
        assert!(parse_err("user = 0\n").to_string().contains("USER:GROUP"));
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
             socket, connect, egd, vsock-uds, cid, tcp-psk, fifo, rate-bytes, rate-period, burst, \
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
             'egd', 'vsock-uds', 'cid', 'tcp-psk' and 'fifo' is set; give only one"
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
    fn more_than_one_endpoint_points_at_the_second_endpoint_key() {
        let line = |text: &str| {
            let err = parse_err(text);
            assert!(
                matches!(
                    err,
                    ConfigError::Guest {
                        error: GuestSpecError::BothEndpoints,
                        ..
                    }
                ),
                "{err:?}"
            );
            err.line()
        };
        // cid and tcp-psk are endpoints too: this used to point at the
        // [[guest]] header (line 1), or at the socket on line 3.
        assert_eq!(
            message("[[guest]]\nname = \"vm3\"\ncid = 3\ntcp-psk = \"/k\"\n"),
            "/etc/vhost-rng.toml:4: guest \"vm3\": more than one of 'socket', 'connect', \
             'egd', 'vsock-uds', 'cid', 'tcp-psk' and 'fifo' is set; give only one"
        );
        assert_eq!(
            line("[[guest]]\nname = \"vm3\"\nsocket = \"/a\"\n\ncid = 3\n"),
            Some(5)
        );
        assert_eq!(
            line("[[guest]]\ntcp-psk = \"/k\"\nname = \"x\"\nvsock-uds = \"/v\"\n"),
            Some(4)
        );
        // Of three, the second is where the guest went wrong.
        assert_eq!(
            line("[[guest]]\ncid = 3\nname = \"x\"\negd = \"/e\"\nconnect = \"/c\"\n"),
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
             on, egd=PATH for an EGD socket, vsock-uds=PATH for the agent over hybrid vsock, cid=N for the agent over AF_VSOCK, tcp-psk=PATH for the agent over TCP, or fifo=PATH for a named pipe"
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

    // ---- serde and the keys ----

    #[test]
    fn the_derived_tables_take_exactly_the_keys_the_messages_list() {
        // serde lists the fields it knows when it refuses a key: they must
        // be FILE_KEYS and the guest keys, in their order.
        let refused = |error: toml::de::Error| error.message().to_owned();
        let listed = |keys: &[&str]| {
            let keys: Vec<String> = keys.iter().map(|key| format!("`{key}`")).collect();
            format!("unknown field `x`, expected one of {}", keys.join(", "))
        };
        let names = |keys: &[GuestKey]| keys.iter().map(|key| key.as_str()).collect::<Vec<_>>();
        let file = toml::from_str::<FileTable>("x = 1").unwrap_err();
        assert_eq!(refused(file), listed(&FILE_KEYS));
        let guest = toml::from_str::<GuestTable>("x = 1").unwrap_err();
        assert_eq!(refused(guest), listed(&names(&GuestKey::ALL)));
        let defaults = toml::from_str::<DefaultsTable>("x = 1").unwrap_err();
        assert_eq!(refused(defaults), listed(&names(&GuestKey::DEFAULTS)));
    }

    #[test]
    fn unknown_keys_are_found_in_their_table_and_in_file_order() {
        // serde meets a table's keys sorted by name; the first in the file
        // is the one named.
        let err = parse_err("mode = \"raw\"\nzzz = 1\naaa = 2\n");
        assert_eq!((err.line(), err.key()), (Some(2), Some("zzz")));
        assert_eq!(parse_err("\"max rate\" = 1\n").key(), Some("max rate"));
        // [defaults] after the guests.
        assert_eq!(
            message(
                "[[guest]]\nname = \"a\"\nsocket = \"/a\"\n[defaults]\nweight = 1\nsocket = \"/b\"\n"
            ),
            "/etc/vhost-rng.toml:6: [defaults]: unknown key 'socket' \
             (valid: rate-bytes, rate-period, burst, weight)"
        );
        // The second of two inline guest tables, by name, then by number.
        assert_eq!(
            message("guest = [{ name = \"a\", socket = \"/a\" }, { name = \"b\", port = 1 }]\n"),
            format!("/etc/vhost-rng.toml:1: guest \"b\": unknown key 'port' (valid: {GUEST_KEYS})")
        );
        let err =
            parse_err("[[guest]]\nname = \"a\"\nsocket = \"/a\"\n[[guest]]\ncid = 4\nbogus = 1\n");
        assert!(
            matches!(
                err,
                ConfigError::Guest {
                    line: 6,
                    number: 2,
                    name: None,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn the_first_mistake_in_the_file_is_reported() {
        // serde reads keys sorted by name; the checks follow the file.
        assert_eq!(parse_err("max-rate = 0\nmode = \"fast\"\n").line(), Some(1));
        assert_eq!(parse_err("mode = \"fast\"\nmax-rate = 0\n").line(), Some(1));
        assert_eq!(
            parse_err("[defaults]\nweight = 0\nrate-bytes = 0\n").line(),
            Some(2)
        );
        let err = parse_err("[[guest]]\nweight = 0\nname = \"vm 1\"\nsocket = \"/a\"\n");
        assert_eq!((err.line(), err.key()), (Some(2), Some("weight")));
        let err = parse_err("[[guest]]\nsocket = \"\"\nname = \"vm 1\"\n");
        assert_eq!((err.line(), err.key()), (Some(2), Some("socket")));
    }

    #[test]
    fn values_of_every_toml_type_are_explained() {
        assert_eq!(
            message("defaults = 1979-05-27\n"),
            "/etc/vhost-rng.toml:1: key 'defaults': expected a [defaults] table, found datetime"
        );
        assert_eq!(
            message("guest = [1979-05-27]\n"),
            "/etc/vhost-rng.toml:1: key 'guest': expected a table for each guest, found \
             datetime"
        );
        assert_eq!(
            message("mode = 07:32:00\n"),
            "/etc/vhost-rng.toml:1: key 'mode': expected \"drbg\" or \"raw\", found datetime"
        );
        assert_eq!(
            message("control = [\"/a\"]\n"),
            "/etc/vhost-rng.toml:1: key 'control': expected a path as a string, found array"
        );
        assert_eq!(
            message("sources = [{ hwrng = true }]\n"),
            "/etc/vhost-rng.toml:1: key 'sources': expected a source as a string, \
             e.g. \"hwrng\", found table"
        );
        // Integers beyond 128 bits, which toml itself refuses to convert.
        let huge = "1_234_567_890_123_456_789_012_345_678_901_234_567_890";
        let digits = huge.replace('_', "");
        assert!(digits.parse::<u128>().is_err());
        assert_eq!(
            message(&format!("max-rate = {huge}\n")),
            format!(
                "/etc/vhost-rng.toml:1: key 'max-rate': {digits} is too large \
                 (at most 1099511627776)"
            )
        );
        assert_eq!(
            message(&format!(
                "[[guest]]\nname = \"a\"\nsocket = \"/a\"\nweight = -{huge}\n"
            )),
            format!("/etc/vhost-rng.toml:4: guest \"a\": key 'weight': -{digits} is negative")
        );
        assert_eq!(
            message(&format!("reseed-secs = -{huge}\n")),
            format!("/etc/vhost-rng.toml:1: key 'reseed-secs': -{digits} is negative")
        );
        assert_eq!(
            message("[[guest]]\nname = \"a\"\ncid = 99999999999999999999\n"),
            "/etc/vhost-rng.toml:3: guest \"a\": key 'cid': 99999999999999999999 is not a \
             guest CID (3 to 4294967294; 0 to 2 are the hypervisor, local and host)"
        );
    }
}
