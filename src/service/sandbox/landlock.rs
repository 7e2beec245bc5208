// SPDX-License-Identifier: Apache-2.0
//! Landlock for the serving process: before any of its threads starts, it
//! confines itself (and so every thread it will have) to the paths its
//! configuration names. Best effort: what the kernel's Landlock ABI
//! supports is enforced, and `vhost-rng status` says how much that was.
//!
//! Allowed: in each directory holding a socket the daemon binds (guests'
//! sockets, the control socket), making, renaming and removing socket
//! files and the private directory they are bound in; the same for the
//! FIFOs of `fifo=` guests, which are also opened for reading and writing
//! there; reading the config
//! file, each key file and each entropy device; binding the TCP ports of
//! `--listen-tcp` and `--metrics`. Everything else on the filesystem is
//! out of reach (reading, writing, executing, creating), and so are TCP
//! connections, abstract UNIX sockets made outside and signals to other
//! processes.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};

/// The newest ABI these rules were written and tested for.
const ABI_TESTED: ABI = ABI::V7;

/// What the serving process may still reach.
#[derive(Debug, Default, Clone)]
pub struct Allowed {
    /// Directories where socket files are made and removed.
    pub socket_dirs: Vec<PathBuf>,
    /// Directories where FIFOs (`fifo=` guests) are made, opened and
    /// removed.
    pub fifo_dirs: Vec<PathBuf>,
    /// Files read after start (config file, keys, devices).
    pub read_files: Vec<PathBuf>,
    /// TCP ports bound.
    pub tcp_ports: Vec<u16>,
}

impl Allowed {
    /// Adds the directory of the socket file at `path`.
    pub fn socket(&mut self, path: &Path) {
        let dir = parent(path);
        if !self.socket_dirs.contains(&dir) {
            self.socket_dirs.push(dir);
        }
    }

    /// Adds the directory of the FIFO at `path`.
    pub fn fifo(&mut self, path: &Path) {
        let dir = parent(path);
        if !self.fifo_dirs.contains(&dir) {
            self.fifo_dirs.push(dir);
        }
    }

    /// Adds a file read after start.
    pub fn read(&mut self, path: &Path) {
        if !self.read_files.iter().any(|p| p == path) {
            self.read_files.push(path.to_owned());
        }
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Restricts the calling thread, and every thread it starts from now on,
/// to `allowed`. Returns what is enforced, for the status.
pub fn restrict(allowed: &Allowed) -> String {
    match try_restrict(allowed) {
        Ok(status) => status,
        Err(e) => {
            log::warn!("Landlock not enforced: {e}");
            format!("not enforced: {e}")
        }
    }
}

fn try_restrict(allowed: &Allowed) -> Result<String, landlock::RulesetError> {
    let abi = ABI_TESTED;
    let socket_rights: BitFlags<AccessFs> = AccessFs::MakeSock
        | AccessFs::MakeDir
        | AccessFs::RemoveDir
        | AccessFs::RemoveFile
        | AccessFs::ReadDir
        | AccessFs::Refer;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    for dir in &allowed.socket_dirs {
        match PathFd::new(dir) {
            Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, socket_rights))?,
            Err(e) => log::warn!("Landlock: {}: {e}", dir.display()),
        }
    }
    // A FIFO is made like a socket file, and opened for reading and
    // writing (the daemon keeps it open both ways).
    let fifo_rights = socket_rights | AccessFs::MakeFifo | AccessFs::ReadFile | AccessFs::WriteFile;
    for dir in &allowed.fifo_dirs {
        match PathFd::new(dir) {
            Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, fifo_rights))?,
            Err(e) => log::warn!("Landlock: {}: {e}", dir.display()),
        }
    }
    for file in &allowed.read_files {
        match PathFd::new(file) {
            Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, AccessFs::ReadFile))?,
            // A source device that is not there yet stays unreadable.
            Err(e) => log::warn!("Landlock: {}: {e}", file.display()),
        }
    }
    for &port in &allowed.tcp_ports {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::BindTcp))?;
    }
    let status = ruleset.restrict_self()?;
    let kernel = kernel_abi();
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => format!("fully enforced (kernel ABI {kernel})"),
        RulesetStatus::PartiallyEnforced => {
            format!("partially enforced (kernel ABI {kernel}, rules written for ABI 7)")
        }
        RulesetStatus::NotEnforced => "not enforced: this kernel has no Landlock".into(),
    })
}

/// The kernel's Landlock ABI version (0: none).
fn kernel_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the
    // ABI version.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    version.max(0)
}
