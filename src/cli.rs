//! Command-line interface: what an operator types, checked before anything
//! starts. Bad input is reported by clap with exit status 2.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use nix::unistd::{Gid, Group};

use crate::drbg::ReseedPolicy;
use crate::frontend::vhost_user::SocketAccess;
use crate::pool::{Mode, PoolConfig};
use crate::source::{self, SourceSpec};

#[derive(Debug, Parser)]
#[command(
    name = "vhost-rng",
    version,
    about = "Host entropy service for virtual machines",
    long_about = "vhost-rng gives virtual machines randomness from the host.\n\n\
                  It serves the virtio-rng device (the guest's /dev/hwrng) over vhost-user, \
                  one Unix socket per guest, to QEMU (-device vhost-user-rng-pci) and \
                  cloud-hypervisor (--generic-vhost-user). Logging follows RUST_LOG \
                  (default: info)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve guests over vhost-user until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Run entropy sources through the health tests and report on each;
    /// exit 0 if all are healthy, 1 if not.
    Check(CheckArgs),
}

/// Entropy sources and how guests are served from them.
#[derive(Debug, Args)]
pub struct EntropyArgs {
    /// Entropy source: hwrng[=PATH], rdseed, file=PATH or os, optionally
    /// followed by ,min-entropy=BITS (per byte). Repeatable. Default: every
    /// hardware source that works on this host.
    #[arg(long = "source", value_name = "SPEC")]
    pub sources: Vec<SourceSpec>,
}

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

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub entropy: EntropyArgs,

    /// Bytes to read from each source.
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = parse_positive)]
    pub bytes: u64,

    /// Give up on a source that has not delivered --bytes after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = parse_positive)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("guests").required(true).multiple(true).args(["sockets", "connects"])
))]
pub struct ServeArgs {
    /// Listen on PATH for one guest's VMM (QEMU: -chardev socket,path=PATH).
    /// Repeat for more guests; each socket is served independently.
    #[arg(long = "socket", value_name = "PATH")]
    pub sockets: Vec<PathBuf>,

    /// Connect to a VMM listening on PATH (QEMU: -chardev socket,path=PATH,server=on)
    /// and connect again whenever that connection ends. Repeatable.
    #[arg(long = "connect", value_name = "PATH", value_parser = parse_utf8_path)]
    pub connects: Vec<PathBuf>,

    /// Permission bits, in octal, of the socket files the daemon creates.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Group (name or number) owning the socket files, e.g. kvm or libvirt-qemu;
    /// combine with --socket-mode 0660 to let that group's VMMs connect.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub socket_group: Option<Gid>,

    #[command(flatten)]
    pub entropy: EntropyArgs,

    /// drbg: a per-guest DRBG seeded from conditioned hardware entropy;
    /// raw: only conditioned full-entropy output, shared among guests.
    #[arg(long, value_enum, default_value_t = Mode::Drbg)]
    pub mode: Mode,

    /// In drbg mode, reseed each guest's DRBG after at most this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20, value_parser = parse_positive)]
    pub reseed_bytes: u64,

    /// In drbg mode, reseed each guest's DRBG after at most this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = parse_positive)]
    pub reseed_secs: u64,
}

impl ServeArgs {
    /// Checks what clap cannot see one argument at a time.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = HashSet::new();
        for path in self.sockets.iter().chain(&self.connects) {
            if !seen.insert(path) {
                return Err(format!(
                    "{} is given more than once; each guest needs its own socket",
                    path.display()
                ));
            }
        }
        Ok(())
    }

    pub fn socket_access(&self) -> SocketAccess {
        SocketAccess {
            mode: self.socket_mode,
            group: self.socket_group,
        }
    }

    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            sources: self.entropy.sources_or_defaults(),
            mode: self.mode,
            reseed: ReseedPolicy {
                max_bytes: self.reseed_bytes,
                max_age: Duration::from_secs(self.reseed_secs),
            },
        }
    }
}

fn parse_positive(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{value}' is not a positive whole number")),
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
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vhost-rng").chain(args.iter().copied()))
    }

    fn serve(args: &[&str]) -> ServeArgs {
        match parse(args).unwrap().command {
            Command::Serve(serve) => serve,
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
        assert_eq!(args.socket_mode, 0o600);
        assert!(args.validate().is_ok());
    }

    #[test]
    fn serve_needs_at_least_one_guest() {
        let err = parse(&["serve"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn socket_mode_is_octal_and_bounded() {
        assert_eq!(
            serve(&["serve", "--socket", "/a", "--socket-mode", "660"]).socket_mode,
            0o660
        );
        assert_eq!(
            serve(&["serve", "--socket", "/a", "--socket-mode", "0o640"]).socket_mode,
            0o640
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
        assert_eq!(args.mode, Mode::Drbg);
        let config = args.pool_config();
        assert_eq!(config.reseed.max_bytes, 1 << 20);
        assert_eq!(config.reseed.max_age, Duration::from_secs(60));

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
        assert_eq!(args.mode, Mode::Raw);
        assert_eq!(args.pool_config().reseed.max_bytes, 4096);

        for bad in [
            &["serve", "--socket", "/a", "--source", "jitter"][..],
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
            .command
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
    fn duplicate_socket_is_rejected() {
        let args = serve(&["serve", "--socket", "/a", "--connect", "/a"]);
        assert!(args.validate().unwrap_err().contains("more than once"));
    }
}
