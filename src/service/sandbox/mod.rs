// SPDX-License-Identifier: Apache-2.0
//! The sandbox of `vhost-rng serve` (least privilege): the serving process
//! gives up root ([`privileges`], `--user`), confines itself to the paths
//! it was configured with ([`landlock`]) and both processes run under a
//! system-call allow-list ([`seccomp`], `--seccomp`).
//!
//! Order in the serving process: stdin on /dev/null and umask 077 first;
//! then the `--socket-dir` directories made ready ([`socket_dirs`]); then,
//! before any thread starts, Landlock (inherited by every thread);
//! then the set-up that needs root (sockets, devices, the control socket);
//! then the privilege drop and the process-wide filter. Threads that read
//! guest, VMM or network input wait at a gate ([`enter`]) until all of that
//! is in place, so no input is ever parsed with root's rights, and then
//! add a narrower filter for their role ([`ThreadRole`]).

pub mod landlock;
pub mod privileges;
pub mod seccomp;
pub mod socket_dirs;

mod mode;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};

pub use mode::{Isolation, SeccompMode};
pub use privileges::{PrivilegeError, RunAs};
pub use seccomp::{SeccompError, ThreadRole};

/// What `vhost-rng status` says about the serving process's sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// The user the serving process runs as, e.g. "vhost-rng (uid 998, gid
    /// 998)" or "root (no --user)".
    pub user: String,
    /// The seccomp mode: kill, log or none.
    pub seccomp: String,
    /// Landlock as enforced: "fully enforced (ABI 7)", "partially
    /// enforced (ABI 3)", "not enforced: ...".
    pub landlock: String,
}

/// The sandbox was set up in this process and threads wait for it.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The seccomp mode thread filters use.
static MODE: Mutex<SeccompMode> = Mutex::new(SeccompMode::None);
/// Open once the privilege drop and the process filter are in place.
static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());
/// What [`status`] reports.
static STATUS: Mutex<Option<SandboxStatus>> = Mutex::new(None);

/// Makes threads that call [`enter`] wait for [`open`]; threads in
/// processes that never arm (tests, `vhost-rng check`) go straight on.
pub fn arm(mode: SeccompMode) {
    *MODE.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    ARMED.store(true, Ordering::SeqCst);
}

/// Lets the threads waiting in [`enter`] go on, and records the status.
pub fn open(status: SandboxStatus) {
    *STATUS.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    let (lock, opened) = &GATE;
    *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
    opened.notify_all();
}

/// The sandbox as the serving process set it up (none before [`open`]).
pub fn status() -> Option<SandboxStatus> {
    STATUS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Called first by every thread that reads input from a guest, a VMM, a
/// network peer or an entropy source: waits until the process has dropped
/// its privileges and installed its filter, then adds `role`'s narrower
/// filter to this thread. A filter that cannot be installed stops the
/// process: serving without it is not an option.
pub fn enter(role: ThreadRole) {
    if !ARMED.load(Ordering::SeqCst) {
        return;
    }
    wait_for_gate();
    let mode = *MODE.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = seccomp::install_thread(role, mode) {
        log::error!("{e}; stopping rather than serving without it");
        std::process::exit(70);
    }
}

/// Waits until the process has dropped its privileges and installed its
/// filter (at once where the sandbox is not armed).
pub fn wait_for_gate() {
    if !ARMED.load(Ordering::SeqCst) {
        return;
    }
    let (lock, opened) = &GATE;
    let mut open = lock.lock().unwrap_or_else(|e| e.into_inner());
    while !*open {
        open = opened.wait(open).unwrap_or_else(|e| e.into_inner());
    }
}

/// What every daemon process does first: stdin becomes /dev/null (the
/// daemon reads nothing from a terminal, and a descriptor 0 left closed
/// would be reused by the first socket) and files are created private
/// (umask 077; socket files get their configured mode explicitly).
pub fn prepare_process() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    match std::fs::File::open("/dev/null") {
        Ok(null) => {
            if null.as_raw_fd() != 0 {
                // SAFETY: dup2 onto descriptor 0, which this process owns;
                // `null` stays valid for the call.
                if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
                    log::warn!(
                        "cannot put stdin on /dev/null: {}",
                        std::io::Error::last_os_error()
                    );
                }
            } else {
                // Descriptor 0 was closed and is now /dev/null: keep it.
                let _ = std::os::fd::IntoRawFd::into_raw_fd(null);
            }
        }
        Err(e) => log::warn!("cannot open /dev/null for stdin: {e}"),
    }
}

/// The top process's share, before it starts the serving process: stdin,
/// umask, and its filter (`mode` from the command line, else the config
/// file's `seccomp`, else kill). An upgraded top process keeps the filter
/// its first image installed: filters cannot be removed, and stacking one
/// per upgrade would only grow.
pub fn enter_top(
    mode: Option<SeccompMode>,
    config_file: Option<&std::path::Path>,
) -> Result<(), SeccompError> {
    prepare_process();
    privileges::narrow_top_capabilities();
    if seccomp::already_filtered() {
        return Ok(());
    }
    let mode = mode
        .or_else(|| {
            config_file
                .and_then(|path| crate::config::ConfigFile::load(path).ok())
                .and_then(|file| file.seccomp)
        })
        .unwrap_or_default();
    seccomp::install_process(seccomp::Role::Top, mode)
}
