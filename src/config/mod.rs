// SPDX-License-Identifier: Apache-2.0
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
//! The file is read by serde into derived structures, which name the keys,
//! refuse unknown ones and keep where each value is ([`toml::Spanned`]), so
//! every error names the file, the line, the key and, inside a `[[guest]]`,
//! the guest. The whole file is checked before [`ConfigFile`] is returned,
//! so a bad file (say, on reload) can be rejected whole.
//!
//! - `guest.rs`: a guest's spec, keys and checks, the `--guest SPEC` form,
//!   the `[[guest]]` and `[defaults]` tables, shorthand and merged guests;
//! - `file.rs`: the file's top-level keys, [`ConfigFile`] and its checks;
//! - `value.rs`: how values are read, keeping a wrong type to explain it;
//! - here: the constants, [`EXAMPLE`] and [`ConfigError`].

mod file;
mod guest;
mod value;

use std::path::PathBuf;

pub use file::{ConfigFile, FILE_KEYS, load, parse};
pub use guest::{
    Address, GuestDefaults, GuestEndpoint, GuestKey, GuestOrigin, GuestSpec, GuestSpecError,
    NameProblem, merge_guests, shorthand_guests, shorthand_names, validate_name,
};

use crate::guest::limiter;

/// A complete configuration file, with every key explained.
pub const EXAMPLE: &str = r#"# all top-level keys optional

# Entropy sources, in the same SPEC form as --source: hwrng[=PATH], rdseed,
# jitter, file=PATH or os, each optionally followed by ,min-entropy=BITS (per byte).
# Leave the key out to use every hardware source that works on this host
# (jitter when none does).
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

# Started as root, the serving process does what needs root (sockets, the
# control socket, /dev/hwrng) and then runs as this USER[:GROUP], with no
# capabilities and no supplementary groups (docs/security.md).
user = "vhost-rng"
# What a system call outside the daemon's allow-list does: "kill" (the
# serving process is killed with SIGSYS and restarted), "log" (allowed and
# logged by the kernel, to find what a new kernel or libc needs) or "none".
seccomp = "kill"
# Which processes map guest memory: "shared" (one serving process maps every
# vhost-user guest's memory) or "guest" (each vhost-user guest's memory is
# mapped only by a process serving that guest alone: about 0.5 MiB and two
# threads more per guest, no in-place upgrade; docs/security.md).
isolation = "shared"
# Directories where guests added later (vhost-rng guest add, a reload) may
# have their socket files, besides those of the sockets served at start and
# the control socket's: with Landlock, the serving process can make and
# remove socket files nowhere else.
socket-dirs = ["/run/vhost-rng"]

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
#            agent connects to tcp:HOST:PORT --psk-file --name, or
#   fifo     a named pipe the daemon creates (or reuses) and keeps filled, for
#            VMMs that read a path: QEMU rng-random, libvirt <backend
#            model='random'>, Nova's rng_dev_path, cloud-hypervisor --rng src=
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

[[guest]]
name = "nova"
fifo = "/run/vhost-rng/nova.fifo"
rate-bytes = 1048576
"#;

/// Rate-limit period when a guest has `rate-bytes` but no `rate-period`.
pub const DEFAULT_RATE_PERIOD_MS: u64 = limiter::DEFAULT_PERIOD_MS;
/// Weight of a guest that does not set one.
pub use crate::guest::DEFAULT_WEIGHT;
/// Largest weight a guest may have.
pub const MAX_WEIGHT: u32 = 1000;
/// Longest guest name, in characters.
pub const MAX_NAME_LEN: usize = 64;
/// The lowest vsock CID a guest can have: 0, 1 and 2 are the hypervisor,
/// local loopback and the host.
pub const FIRST_GUEST_CID: u32 = 3;
/// `VMADDR_CID_ANY`, a wildcard rather than a guest.
pub use crate::frontend::vsock::VSOCK_CID_ANY;

/// A configuration problem; `Display` is the message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The error from the operating system.
        #[source]
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}: invalid TOML{}: {message}", .path.display(), at_snippet(.snippet))]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// Line of the error, from 1.
        line: usize,
        /// The text the error points at, if short.
        snippet: Option<String>,
        /// The TOML parser's description of the error.
        message: String,
    },
    /// A top-level key that is not one of [`FILE_KEYS`].
    #[error("{}:{line}: unknown key '{key}' (valid: {})", .path.display(), FILE_KEYS.join(", "))]
    UnknownKey {
        /// The configuration file.
        path: PathBuf,
        /// Line of the key, from 1.
        line: usize,
        /// The key as written.
        key: String,
    },
    /// A top-level key with a value it does not take.
    #[error("{}:{line}: key '{key}': {message}", .path.display())]
    Value {
        /// The configuration file.
        path: PathBuf,
        /// Line of the value, from 1.
        line: usize,
        /// The key.
        key: String,
        /// What is wrong with the value, and what the key takes.
        message: String,
    },
    /// A mistake in the `[defaults]` table.
    #[error("{}:{line}: [defaults]: {error}", .path.display())]
    Defaults {
        /// The configuration file.
        path: PathBuf,
        /// Line of the value at fault (or of the table), from 1.
        line: usize,
        /// What is wrong.
        #[source]
        error: GuestSpecError,
    },
    /// A mistake in one `[[guest]]` table.
    #[error("{}:{line}: {}: {error}", .path.display(), guest_label(.name, *.number))]
    Guest {
        /// The configuration file.
        path: PathBuf,
        /// Line of the value at fault (or of the table), from 1.
        line: usize,
        /// The guest's name, if it has a usable one.
        name: Option<String>,
        /// Its place among the `[[guest]]` tables, from 1.
        number: usize,
        /// What is wrong.
        #[source]
        error: GuestSpecError,
    },
    /// Two `[[guest]]` tables with the same name.
    #[error(
        "{}:{line}: guest {name:?}: the name is already used by the guest on line {first_line}",
        .path.display()
    )]
    DuplicateName {
        /// The configuration file.
        path: PathBuf,
        /// Line of the second guest's name, from 1.
        line: usize,
        /// The name both use.
        name: String,
        /// Line of the first guest's name, from 1.
        first_line: usize,
    },
    /// Two `[[guest]]` tables with the same socket path, key file or CID.
    #[error(
        "{}:{line}: guest {name:?}: {endpoint} is already used by guest {other:?} on line {other_line}",
        .path.display()
    )]
    DuplicatePath {
        /// The configuration file.
        path: PathBuf,
        /// Line of the second guest's endpoint, from 1.
        line: usize,
        /// The second guest's name.
        name: String,
        /// The path or CID both use.
        endpoint: Address,
        /// The first guest's name.
        other: String,
        /// Line of the first guest's endpoint, from 1.
        other_line: usize,
    },
    /// A guest of the command line and one of the file (or two of the same
    /// place) share a name, when [`merge_guests`] puts them together.
    #[error(
        "guest name {name:?} is used twice: {first} ({first_spec}) and {second} ({second_spec})"
    )]
    MergeName {
        /// The name both use.
        name: String,
        /// Where the first guest was defined.
        first: GuestOrigin,
        /// The first guest in `--guest` form.
        first_spec: String,
        /// Where the second guest was defined.
        second: GuestOrigin,
        /// The second guest in `--guest` form.
        second_spec: String,
    },
    /// Two guests share a socket path, key file or CID, when
    /// [`merge_guests`] puts them together.
    #[error("{path} is used by two guests: {first_guest:?} {first} and {second_guest:?} {second}")]
    MergePath {
        /// The path or CID both use.
        path: Address,
        /// Where the first guest was defined.
        first: GuestOrigin,
        /// The first guest's name.
        first_guest: String,
        /// Where the second guest was defined.
        second: GuestOrigin,
        /// The second guest's name.
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

/// What the tests of `file.rs` and `guest.rs` share.
#[cfg(test)]
mod test_support {
    use std::path::Path;

    use super::{ConfigError, ConfigFile, GuestEndpoint, GuestSpec, parse};

    pub(super) const FILE: &str = "/etc/vhost-rng.toml";

    pub(super) fn parse_ok(text: &str) -> ConfigFile {
        match parse(text, Path::new(FILE)) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        }
    }

    pub(super) fn parse_err(text: &str) -> ConfigError {
        match parse(text, Path::new(FILE)) {
            Ok(config) => panic!("parsed: {config:?}"),
            Err(e) => e,
        }
    }

    /// The message of the error in `text`.
    pub(super) fn message(text: &str) -> String {
        parse_err(text).to_string()
    }

    pub(super) fn spec(text: &str) -> GuestSpec {
        match text.parse() {
            Ok(spec) => spec,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    pub(super) fn spec_err(text: &str) -> String {
        match text.parse::<GuestSpec>() {
            Ok(spec) => panic!("{text} parsed: {spec:?}"),
            Err(e) => e.to_string(),
        }
    }

    pub(super) fn socket(name: &str, path: &str) -> GuestSpec {
        GuestSpec::unlimited(name.into(), GuestEndpoint::Socket(path.into()))
    }

    pub(super) const GUEST_KEYS: &str = "name, socket, connect, egd, vsock-uds, cid, tcp-psk, fifo, rate-bytes, rate-period, \
         burst, weight";
}
