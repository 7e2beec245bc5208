// SPDX-License-Identifier: Apache-2.0
//! Command-line interface: what an operator types, checked before anything
//! starts. Bad input is reported by clap with exit status 2.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nix::unistd::{Gid, Group};

use crate::config::{self, GuestEndpoint, GuestSpec};
use crate::entropy::pool::Mode;
use crate::entropy::source::{self, SourceSpec};
use crate::service::control::DEFAULT_CONTROL_PATH;
use crate::service::daemon::Settings;
use crate::service::sandbox::{Isolation, SeccompMode};

/// The `vhost-rng` command line: one subcommand, with its options.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-rng",
    version = crate::LONG_VERSION,
    about = "Host entropy service for virtual machines",
    long_about = "vhost-rng gives virtual machines randomness from the host.\n\n\
                  It serves the virtio-rng device (the guest's /dev/hwrng) over vhost-user, \
                  one Unix socket per guest, to QEMU (-device vhost-user-rng-pci) and \
                  cloud-hypervisor (--generic-vhost-user); guests without vhost-user are \
                  served over EGD (QEMU rng-egd) or, through an in-guest agent, over \
                  vsock, hybrid vsock or encrypted TCP. Logging follows RUST_LOG \
                  (default: info)."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// QEMU's vhost-user backend program options, used without a
    /// subcommand.
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The options QEMU's vhost-user "backend program conventions" define
/// (docs/interop/vhost-user.rst), so that management software can run
/// `vhost-rng` like any vhost-user backend: `vhost-rng --socket-path PATH`
/// is `vhost-rng serve --socket PATH`, `vhost-rng --fd N` is `vhost-rng
/// serve --fd N`.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Print the backend's capabilities as QEMU's vhost-user.json defines
    /// them ({"type":"rng"}) and exit, ignoring every other argument.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Serve one guest on a socket at PATH, named after the file (as
    /// serve --socket PATH).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Serve the listening Unix socket the parent passed as descriptor N
    /// (as serve --fd N).
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,
}

/// What `--print-capabilities` prints: the `VHostUserBackendCapabilities`
/// of QEMU's docs/interop/vhost-user.json for type `rng`, which defines no
/// features.
pub const CAPABILITIES: &str = "{\n  \"type\": \"rng\"\n}";

impl Cli {
    /// The subcommand, with the backend program form (no subcommand)
    /// turned into the `serve` it stands for; an error (exit status 2) when
    /// there is neither.
    pub fn into_command(self) -> Result<Command, clap::Error> {
        use clap::CommandFactory;
        if let Some(command) = self.command {
            return Ok(command);
        }
        let serve: Vec<std::ffi::OsString> = match (self.backend.socket_path, self.backend.fd) {
            (Some(path), _) => vec!["--socket".into(), path.into()],
            (None, Some(fd)) => vec!["--fd".into(), fd.to_string().into()],
            (None, None) => {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::MissingSubcommand,
                    "give a subcommand (serve, check, status, ...; see --help), or \
                     --socket-path PATH or --fd N to serve one vhost-user socket",
                ));
            }
        };
        let args = ["vhost-rng".into(), "serve".into()]
            .into_iter()
            .chain(serve);
        Cli::try_parse_from(args)?
            .command
            .ok_or_else(|| Cli::command().error(clap::error::ErrorKind::MissingSubcommand, "serve"))
    }
}

/// The subcommands of `vhost-rng`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve guests until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
    /// Run entropy sources through the health tests and report on each;
    /// exit 0 if all are healthy, 1 if not.
    Check(CheckArgs),
    /// Add, remove or list the guests of a running daemon.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Show a running daemon's guests, sources and pool.
    Status(StatusArgs),
    /// Run inside a guest: feed the guest kernel's RNG from the host daemon.
    Agent(vhost_rng_agent::AgentArgs),
    /// Manage the pre-shared keys of guests served over TCP (tcp-psk=).
    #[command(subcommand)]
    Psk(PskCommand),
    /// Upgrade a running daemon in place: it re-executes its binary from
    /// disk with the same pid and hands every guest over, so no VM sees its
    /// device go away. Exits non-zero, with the reason, if the new binary
    /// does not run or cannot take over (the daemon then goes on as it was).
    Upgrade(UpgradeArgs),
    /// Print random bytes for a VM's boot (a seed for guests without an RNG
    /// device, or for first-boot keys), from the running daemon's pool or,
    /// when no daemon runs, from the entropy sources; --format cloud-init
    /// prints a #cloud-config random_seed block for user-data.
    Seed(SeedArgs),
    /// Print the in-place upgrade state version this binary reads (used by
    /// a running daemon before it upgrades to this binary).
    #[command(hide = true)]
    UpgradeStateVersion,
    /// libvirt's qemu hook (install as /etc/libvirt/hooks/qemu.d/vhost-rng,
    /// see contrib/libvirt/): with the domain XML on standard input, adds
    /// the domain's guest on `prepare` and removes it on `release`.
    LibvirtHook(LibvirtHookArgs),
}

/// `vhost-rng libvirt-hook`'s arguments, as libvirt passes them.
#[derive(Debug, Args)]
pub struct LibvirtHookArgs {
    /// The domain's name (the guest is named from the XML).
    pub domain: String,
    /// The operation: prepare, start, started, stopped, release, ...
    pub operation: String,
    /// The sub-operation and extra argument libvirt adds.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
    /// The running daemon's control socket.
    #[command(flatten)]
    pub control: ControlArgs,
}

/// `vhost-rng seed`'s options.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// How many bytes (at most 4096).
    #[arg(long, value_name = "N", default_value_t = crate::service::seed::DEFAULT_SEED_BYTES,
          value_parser = parse_seed_bytes)]
    pub bytes: usize,
    /// raw: the bytes as they are; base64: one line; cloud-init: a
    /// #cloud-config document with a random_seed block.
    #[arg(long, value_enum, default_value = "base64")]
    pub format: crate::service::seed::SeedFormat,
    /// With no daemon running: the sources to read (as for serve).
    #[command(flatten)]
    pub entropy: EntropyArgs,
    /// With no daemon running: give up after this many seconds without a
    /// healthy source.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = parse_positive)]
    pub timeout: u64,
    /// The running daemon's control socket.
    #[command(flatten)]
    pub control: ControlArgs,
}

/// `vhost-rng upgrade`'s options.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Seconds to wait for the new version to take over.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = parse_positive)]
    pub timeout: u64,
    /// The running daemon's control socket.
    #[command(flatten)]
    pub control: ControlArgs,
}

/// The subcommands of `vhost-rng psk`.
#[derive(Debug, Subcommand)]
pub enum PskCommand {
    /// Write a new random key to PATH (mode 0600; never overwrites). Give
    /// the same file to the daemon (tcp-psk=PATH) and to the guest's agent
    /// (--psk-file).
    New {
        // The key file to create. (Not a doc comment: clap would
        // print that as the argument's --help text.)
        #[allow(missing_docs)]
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
}

/// Entropy sources and how guests are served from them.
#[derive(Debug, Args)]
pub struct EntropyArgs {
    /// Entropy source: hwrng[=PATH], rdseed, jitter, file=PATH or os, optionally
    /// followed by ,min-entropy=BITS (per byte). Repeatable. Default: every
    /// hardware source that works on this host, or jitter when none does.
    #[arg(long = "source", value_name = "SPEC")]
    pub sources: Vec<SourceSpec>,
}

// Not compiled by build.rs, which renders the man pages from the clap
// definitions above (see build.rs).
#[cfg(vhost_rng_lib)]
impl EntropyArgs {
    /// The sources given, or the host's working hardware sources.
    pub fn sources_or_defaults(&self) -> Vec<SourceSpec> {
        if self.sources.is_empty() {
            source::default_sources()
        } else {
            self.sources.clone()
        }
    }
}

/// The options of `vhost-rng check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The sources to check.
    #[command(flatten)]
    pub entropy: EntropyArgs,

    /// Bytes to read from each source.
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = parse_positive)]
    pub bytes: u64,

    /// Give up on a source that has not delivered --bytes after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = parse_positive)]
    pub timeout: u64,
}

/// The options of `vhost-rng serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen on PATH for one guest's VMM (QEMU: -chardev socket,path=PATH);
    /// the guest is named after the file. Repeatable. (--socket-path is
    /// the same.)
    #[arg(long = "socket", visible_alias = "socket-path", value_name = "PATH")]
    pub sockets: Vec<PathBuf>,

    /// Serve the listening Unix socket the parent process passed as
    /// descriptor N (3 or above), as a guest named after the socket file,
    /// which the daemon never removes. Repeatable.
    #[arg(long = "fd", value_name = "N")]
    pub fds: Vec<RawFd>,

    /// Connect to a VMM listening on PATH (QEMU: -chardev socket,path=PATH,server=on)
    /// and connect again whenever that connection ends. Repeatable.
    #[arg(long = "connect", value_name = "PATH", value_parser = parse_utf8_path)]
    pub connects: Vec<PathBuf>,

    /// One guest: name=NAME, then socket=PATH (vhost-user, the daemon listens),
    /// connect=PATH (vhost-user, the VMM listens), egd=PATH (EGD),
    /// vsock-uds=PATH (agent over hybrid vsock), cid=N (agent over AF_VSOCK,
    /// needs --vsock), tcp-psk=PATH (agent over TCP with the key in PATH,
    /// needs --listen-tcp) or fifo=PATH (a named pipe the daemon keeps
    /// filled, for QEMU rng-random, libvirt random, Nova), then
    /// [,rate-bytes=N][,rate-period=MS][,burst=N][,weight=W]. Repeatable.
    #[allow(rustdoc::broken_intra_doc_links)] // the brackets are clap help text, not links
    #[arg(long = "guest", value_name = "SPEC")]
    pub guests: Vec<GuestSpec>,

    /// Serve the in-guest agent over hybrid vsock (Firecracker, cloud-hypervisor,
    /// vhost-device-vsock uds-path=PATH): listen on PATH_5564; the guest is named
    /// after the file. Repeatable.
    #[arg(long = "vsock-uds", value_name = "PATH")]
    pub vsock_uds: Vec<PathBuf>,

    /// Listen on AF_VSOCK port PORT (any CID) for the in-guest agent of guests
    /// given by cid=N (kernel vhost-vsock); other CIDs are refused unless
    /// --vsock-default-rate is given.
    #[arg(long, value_name = "PORT", value_parser = parse_vsock_port)]
    pub vsock: Option<u32>,

    /// Serve vsock CIDs that no guest has, each as a guest of its own
    /// (cid-N) limited to this many bytes per second.
    #[arg(long, value_name = "BYTES/SEC", value_parser = parse_positive)]
    pub vsock_default_rate: Option<u64>,

    /// Listen on TCP ADDR (IP:PORT) for the in-guest agent of guests given by
    /// tcp-psk=PATH: Noise handshake with the guest's key, then encrypted;
    /// never plaintext. For hosts without vsock (Xen).
    #[arg(long, value_name = "ADDR")]
    pub listen_tcp: Option<SocketAddr>,

    /// TOML configuration file (sources, mode, limits, [[guest]] tables);
    /// re-read on SIGHUP. Command-line options take precedence.
    #[allow(rustdoc::broken_intra_doc_links)] // the brackets are clap help text, not links
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Permission bits, in octal, of the socket files the daemon creates [default: 0600].
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Group (name or number) owning the socket files, e.g. kvm or libvirt-qemu;
    /// combine with --socket-mode 0660 to let that group's VMMs connect.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub socket_group: Option<Gid>,

    /// The entropy sources.
    #[command(flatten)]
    pub entropy: EntropyArgs,

    /// drbg: a per-guest DRBG seeded from conditioned hardware entropy;
    /// raw: only conditioned full-entropy output, shared among guests [default: drbg].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,

    /// In drbg mode, reseed each guest's DRBG after at most this many bytes [default: 1048576].
    #[arg(long, value_name = "BYTES", value_parser = parse_positive)]
    pub reseed_bytes: Option<u64>,

    /// In drbg mode, reseed each guest's DRBG after at most this many seconds [default: 60].
    #[arg(long, value_name = "SECS", value_parser = parse_positive)]
    pub reseed_secs: Option<u64>,

    /// Cap on bytes per second to all guests together.
    #[arg(long, value_name = "BYTES/SEC", value_parser = parse_positive)]
    pub max_rate: Option<u64>,

    /// Control socket for `vhost-rng guest ...` and `vhost-rng status`
    /// [default: /run/vhost-rng/control.sock when run as root].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9564.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Most guest memory regions one vhost-user connection may map; also
    /// the slot count offered to the VMM [default: 509].
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub vhost_user_max_regions: Option<u64>,

    /// Most bytes of guest memory one vhost-user connection may map, all
    /// regions together [default: 17592186044416, 16 TiB].
    #[arg(long, value_name = "BYTES", value_parser = parse_positive)]
    pub vhost_user_max_memory: Option<u64>,

    /// Seconds a new vhost-user connection has to claim the device
    /// (SET_OWNER), and a begun message to arrive whole, before the
    /// connection is closed to make way for the next [default: 10].
    #[arg(long, value_name = "SECS", value_parser = parse_positive)]
    pub vhost_user_setup_timeout: Option<u64>,

    /// Started as root: after creating its sockets and opening its devices
    /// as root, the serving process (which maps guest memory) runs as
    /// USER, with GROUP (default: USER's group) as its only group and no
    /// capabilities. Without it, a daemon started as root serves as root
    /// and says so.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,

    /// What a system call outside the daemon's allow-list does: kill (the
    /// serving process dies with SIGSYS and is restarted), log (allowed,
    /// logged by the kernel as audit type 1326: for finding what a new
    /// kernel or libc needs) or none [default: kill].
    #[arg(long, value_enum, value_name = "ACTION")]
    pub seccomp: Option<SeccompMode>,

    /// Which processes map guest memory: shared (one serving process maps
    /// every vhost-user guest's memory) or guest (each vhost-user guest's
    /// memory is mapped only in a process of its own, which serves that
    /// guest alone; a process more per guest, no in-place upgrade)
    /// [default: shared].
    #[arg(long, value_enum, value_name = "MODE")]
    pub isolation: Option<Isolation>,

    /// A directory where guests added later (vhost-rng guest add, a
    /// reload) may have their socket files, besides those of the sockets
    /// served at start and the control socket's; repeatable. Landlock lets
    /// the serving process make socket files nowhere else.
    #[arg(long = "socket-dir", value_name = "DIR")]
    pub socket_dirs: Vec<PathBuf>,

    /// Check the configuration (the command line, the --config file, the
    /// --user) and exit: 0 if the daemon would accept it, non-zero with
    /// the reason if not. Starts nothing.
    #[arg(long)]
    pub check_config: bool,
}

// Not compiled by build.rs, which renders the man pages from the clap
// definitions above (see build.rs).
#[cfg(vhost_rng_lib)]
impl ServeArgs {
    /// Checks what clap cannot see one argument at a time; `handed` when
    /// sockets were passed another way (systemd's `LISTEN_FDS`, or this is
    /// the serving process, which the top process hands every guest).
    pub fn validate(&self, handed: bool) -> Result<(), String> {
        let mut seen = HashSet::new();
        for path in self
            .sockets
            .iter()
            .chain(&self.connects)
            .chain(&self.vsock_uds)
        {
            if !seen.insert(path) {
                return Err(format!(
                    "{} is given more than once; each guest needs its own socket",
                    path.display()
                ));
            }
        }
        let nothing = !handed
            && self.fds.is_empty()
            && self.sockets.is_empty()
            && self.connects.is_empty()
            && self.vsock_uds.is_empty()
            && self.vsock_default_rate.is_none()
            && self.guests.is_empty()
            && self.config.is_none()
            && self.control.is_none();
        if nothing {
            return Err(
                "nothing to serve: give --socket <PATH>, --connect <PATH>, --vsock-uds \
                 <PATH>, --guest <SPEC>, --fd <N> or --config <FILE>, or --control <PATH> \
                 to add guests at runtime"
                    .into(),
            );
        }
        Ok(())
    }

    /// The guests named on the command line: the --socket/--connect/
    /// --vsock-uds shorthand first, then --guest.
    pub fn command_line_guests(&self) -> Vec<GuestSpec> {
        let shorthand = self
            .sockets
            .iter()
            .cloned()
            .map(GuestEndpoint::Socket)
            .chain(self.connects.iter().cloned().map(GuestEndpoint::Connect))
            .chain(self.vsock_uds.iter().cloned().map(GuestEndpoint::VsockUds));
        let mut guests = config::shorthand_guests(shorthand);
        guests.extend(self.guests.iter().cloned());
        guests
    }
}

// Not compiled by build.rs, which renders the man pages from the clap
// definitions above (see build.rs).
#[cfg(vhost_rng_lib)]
/// Settings given on the command line, which override the config file's.
impl From<&ServeArgs> for Settings {
    fn from(args: &ServeArgs) -> Settings {
        Settings {
            sources: args.entropy.sources.clone(),
            mode: args.mode,
            reseed_bytes: args.reseed_bytes,
            reseed_secs: args.reseed_secs,
            max_rate: args.max_rate,
            socket_mode: args.socket_mode,
            socket_group: args.socket_group,
            control: args.control.clone(),
            metrics: args.metrics,
            vsock: args.vsock,
            vsock_default_rate: args.vsock_default_rate,
            listen_tcp: args.listen_tcp,
            vhost_user_max_regions: args.vhost_user_max_regions,
            vhost_user_max_memory: args.vhost_user_max_memory,
            vhost_user_setup_timeout: args.vhost_user_setup_timeout,
            user: args.user.clone(),
            seccomp: args.seccomp,
            isolation: args.isolation,
            socket_dirs: args.socket_dirs.clone(),
        }
    }
}

/// Talks to a running daemon.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_PATH)]
    pub control: PathBuf,
}

/// The subcommands of `vhost-rng guest`.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Start serving a guest: name=NAME,socket=PATH (or connect=, egd=, vsock-uds=)[,rate-bytes=N]...
    Add {
        // The guest, in `--guest` form. (Not a doc comment: clap would
        // print that as the argument's --help text.)
        #[allow(missing_docs)]
        spec: GuestSpec,
        /// The daemon to ask.
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Stop serving a guest: close its connection, remove its socket.
    Remove {
        // The name of the guest to stop serving. (Not a doc comment: clap would
        // print that as the argument's --help text.)
        #[allow(missing_docs)]
        name: String,
        /// The daemon to ask.
        #[command(flatten)]
        control: ControlArgs,
    },
    /// List the guests with their counters and limits.
    List {
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
        /// The daemon to ask.
        #[command(flatten)]
        control: ControlArgs,
    },
}

/// The options of `vhost-rng status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON for tools.
    #[arg(long)]
    pub json: bool,
    /// The daemon to ask.
    #[command(flatten)]
    pub control: ControlArgs,
}

fn parse_positive(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{value}' is not a positive whole number")),
    }
}

fn parse_seed_bytes(value: &str) -> Result<usize, String> {
    let max = crate::service::seed::MAX_SEED_BYTES;
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{value}' is not a number of bytes from 1 to {max}"
        )),
    }
}

fn parse_vsock_port(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(port) if port != u32::MAX => Ok(port),
        _ => Err(format!(
            "'{value}' is not a vsock port: give a number from 0 to {}",
            u32::MAX - 1
        )),
    }
}

fn parse_mode(value: &str) -> Result<u32, String> {
    let digits = value.strip_prefix("0o").unwrap_or(value);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "'{value}' is not a permission mode: give octal digits up to 0777, e.g. 0600 or 0660"
        )),
    }
}

fn parse_group(value: &str) -> Result<Gid, String> {
    if let Ok(id) = value.parse::<u32>() {
        return Ok(Gid::from_raw(id));
    }
    match Group::from_name(value) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => Err(format!("no group named '{value}' on this host")),
        Err(e) => Err(format!("cannot look up group '{value}': {e}")),
    }
}

fn parse_utf8_path(value: &str) -> Result<PathBuf, String> {
    // clap hands value parsers a &str, so any path reaching here is UTF-8;
    // an empty one is the remaining mistake to catch.
    if value.is_empty() {
        return Err("the path is empty".into());
    }
    Ok(PathBuf::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vhost-rng").chain(args.iter().copied()))
    }

    fn serve(args: &[&str]) -> ServeArgs {
        match parse(args).unwrap().into_command().unwrap() {
            Command::Serve(serve) => *serve,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_takes_repeated_sockets_and_connects() {
        let args = serve(&[
            "serve",
            "--socket",
            "/a",
            "--socket",
            "/b",
            "--connect",
            "/c",
        ]);
        assert_eq!(args.sockets, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(args.connects, vec![PathBuf::from("/c")]);
        assert_eq!(args.socket_mode, None);
        assert!(args.validate(false).is_ok());
    }

    #[test]
    fn serve_needs_something_to_serve() {
        let err = serve(&["serve"]).validate(false).unwrap_err();
        assert!(err.contains("--socket <PATH>"), "{err}");
        assert!(serve(&["serve", "--control", "/c"]).validate(false).is_ok());
        assert!(
            serve(&["serve", "--guest", "name=a,socket=/a"])
                .validate(false)
                .is_ok()
        );
    }

    #[test]
    fn guests_from_shorthand_and_specs() {
        let args = serve(&[
            "serve",
            "--socket",
            "/run/vm1.sock",
            "--guest",
            "name=vm2,socket=/run/b.sock,rate-bytes=16384,rate-period=500",
        ]);
        let guests = args.command_line_guests();
        assert_eq!(guests.len(), 2);
        assert_eq!(guests[0].name, "vm1");
        assert_eq!(guests[1].rate_bytes, Some(16384));
        assert_eq!(guests[1].rate_period_ms, 500);
        let err = parse(&["serve", "--guest", "name=x"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn control_subcommands_parse() {
        match parse(&["guest", "add", "name=a,socket=/a", "--control", "/c"])
            .unwrap()
            .into_command()
            .unwrap()
        {
            Command::Guest(GuestCommand::Add { spec, control }) => {
                assert_eq!(spec.name, "a");
                assert_eq!(control.control, PathBuf::from("/c"));
            }
            other => panic!("parsed as {other:?}"),
        }
        match parse(&["status", "--json"])
            .unwrap()
            .into_command()
            .unwrap()
        {
            Command::Status(status) => {
                assert!(status.json);
                assert_eq!(status.control.control, PathBuf::from(DEFAULT_CONTROL_PATH));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(parse(&["guest", "remove"]).is_err());
    }

    #[test]
    fn socket_mode_is_octal_and_bounded() {
        assert_eq!(
            serve(&["serve", "--socket", "/a", "--socket-mode", "660"]).socket_mode,
            Some(0o660)
        );
        assert_eq!(
            serve(&["serve", "--socket", "/a", "--socket-mode", "0o640"]).socket_mode,
            Some(0o640)
        );
        for bad in ["888", "1777", "rw", ""] {
            let err = parse(&["serve", "--socket", "/a", "--socket-mode", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn socket_group_by_name_or_number() {
        assert_eq!(
            serve(&["serve", "--socket", "/a", "--socket-group", "0"]).socket_group,
            Some(Gid::from_raw(0))
        );
        assert_eq!(
            serve(&["serve", "--socket", "/a", "--socket-group", "root"]).socket_group,
            Some(Gid::from_raw(0))
        );
        let err = parse(&[
            "serve",
            "--socket",
            "/a",
            "--socket-group",
            "no-such-group-x",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("no group named"), "{err}");
    }

    #[test]
    fn entropy_options_parse_and_default() {
        let args = serve(&["serve", "--socket", "/a"]);
        assert_eq!(
            (args.mode, args.reseed_bytes, args.max_rate),
            (None, None, None)
        );

        let args = serve(&[
            "serve",
            "--socket",
            "/a",
            "--source",
            "os",
            "--source",
            "file=/f,min-entropy=2",
            "--mode",
            "raw",
            "--reseed-bytes",
            "4096",
            "--reseed-secs",
            "5",
        ]);
        assert_eq!(args.entropy.sources.len(), 2);
        assert_eq!(args.mode, Some(Mode::Raw));
        assert_eq!(args.reseed_bytes, Some(4096));

        for bad in [
            &["serve", "--socket", "/a", "--source", "havege"][..],
            &["serve", "--socket", "/a", "--mode", "fast"],
            &["serve", "--socket", "/a", "--reseed-bytes", "0"],
            &["serve", "--socket", "/a", "--reseed-secs", "-1"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn check_takes_sources_and_limits() {
        match parse(&["check", "--source", "os", "--bytes", "1000"])
            .unwrap()
            .into_command()
            .unwrap()
        {
            Command::Check(check) => {
                assert_eq!(check.bytes, 1000);
                assert_eq!(check.timeout, 30);
                assert_eq!(check.entropy.sources.len(), 1);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn backend_program_options_stand_for_serve() {
        let args = match parse(&["--socket-path", "/run/vm1.sock"])
            .unwrap()
            .into_command()
            .unwrap()
        {
            Command::Serve(serve) => *serve,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(args.sockets, vec![PathBuf::from("/run/vm1.sock")]);
        let args = match parse(&["--fd=5"]).unwrap().into_command().unwrap() {
            Command::Serve(serve) => *serve,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(args.fds, vec![5]);
        assert!(args.validate(false).is_ok());
        assert_eq!(serve(&["serve", "--socket-path", "/a"]).sockets.len(), 1);
        // Neither, both, or mixed with a subcommand: refused with status 2.
        let err = parse(&[]).unwrap().into_command().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("--socket-path PATH or --fd N"),
            "{err}"
        );
        for bad in [
            &["--socket-path", "/a", "--fd", "3"][..],
            &["--fd", "3", "status"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
        let capabilities: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(capabilities, serde_json::json!({"type": "rng"}));
    }

    #[test]
    fn duplicate_socket_is_rejected() {
        let args = serve(&["serve", "--socket", "/a", "--connect", "/a"]);
        assert!(args.validate(false).unwrap_err().contains("more than once"));
    }
}
