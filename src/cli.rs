//! Command-line interface: what an operator types, checked before anything
//! starts. Bad input is reported by clap with exit status 2.

use std::collections::HashSet;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use nix::unistd::{Gid, Group};

use crate::frontend::vhost_user::SocketAccess;

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
    fn duplicate_socket_is_rejected() {
        let args = serve(&["serve", "--socket", "/a", "--connect", "/a"]);
        assert!(args.validate().unwrap_err().contains("more than once"));
    }
}
