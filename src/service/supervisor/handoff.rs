// SPDX-License-Identifier: Apache-2.0
//! In-place upgrades when the serving process is sandboxed: it may not
//! execute anything (no execve in its filter, and as an unprivileged user
//! the new image could not redo the set-up that needs root), so the top
//! process, which keeps root and execve, does the executing.
//!
//! 1. The serving process asks the top process to check the binary on disk
//!    ([`Report::CheckUpgrade`]); the top process runs
//!    `vhost-rng upgrade-state-version` and answers with a [`Verdict`].
//!    A refusal goes back to `vhost-rng upgrade` and into the status.
//! 2. Accepted: the serving process parks every guest at a safe point,
//!    reports each one's final state (token levels included) as it does
//!    after any change, says [`Report::HandedOver`] and exits.
//! 3. The top process starts the new binary as the next serving process
//!    with those states (as after a crash, but with token levels kept and
//!    the upgrade counted); it sets itself up as root, drops privileges and
//!    installs its filter like any serving process. When that one reports
//!    the new upgrade count, the top process re-executes itself too (as it
//!    always did), so that `vhost-rng serve` as a whole runs the new code.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, recvmsg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{Report, Top, WorkerLink};
use crate::service::registry::Registry;
use crate::service::upgrade;

/// The top process's answer to [`Report::CheckUpgrade`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Verdict {
    /// The question answered.
    pub id: u64,
    /// Why the binary on disk cannot take over; none if it can.
    pub refused: Option<String>,
}

/// How long the top process may take to check a binary.
const CHECK_PATIENCE: Duration = Duration::from_secs(30);
/// How long each guest has to reach a safe point (as for the old path).
const HANDOVER_PATIENCE: Duration = Duration::from_secs(15);

/// One question to the top process at a time.
static ASKING: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Serving process: asks the top process whether the binary on disk can
/// take over. `Err` carries the reason, for the operator.
pub fn check_through_top(link: &WorkerLink) -> Result<(), String> {
    let _one = ASKING.lock().unwrap_or_else(|e| e.into_inner());
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    link.send(&Report::CheckUpgrade { id }, &[]);
    let deadline = Instant::now() + CHECK_PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the top process did not answer about the new binary".into());
        }
        let verdict = receive(&link.socket, left)?;
        if let Some(verdict) = verdict.filter(|v| v.id == id) {
            return verdict.refused.map_or(Ok(()), Err);
        }
    }
}

/// Waits up to `patience` for one [`Verdict`]; `None` for anything else.
fn receive(socket: &OwnedFd, patience: Duration) -> Result<Option<Verdict>, String> {
    let millis = u16::try_from(patience.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(format!("waiting for the top process: {e}")),
    }
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let received = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        None,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    );
    let bytes = match received {
        Ok(received) if received.bytes > 0 => received.bytes,
        Ok(_) => return Err("the top process is gone".into()),
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(format!("reading the top process's answer: {e}")),
    };
    Ok(serde_json::from_slice(&buf[..bytes]).ok())
}

/// Serving process: the upgrade. Returns only if it did not happen (the
/// binary was refused, or a guest could not be parked), with every guest
/// serving again.
pub fn upgrade_through_top(registry: &Registry, link: &WorkerLink) -> Result<(), String> {
    check_through_top(link)?;
    let handed = registry.handover_all(HANDOVER_PATIENCE)?;
    let upgrades = registry.lifecycle().upgrades + 1;
    info!(
        "upgrading in place: the top process starts the new binary with {} guest(s)",
        handed.len()
    );
    for guest in handed {
        let mut fds: Vec<OwnedFd> = Vec::new();
        let state = upgrade::guest_state(
            &guest.spec,
            guest.runtime,
            guest.handover,
            guest.tokens,
            guest.counters,
            |fd| {
                fds.push(fd);
                i32::try_from(fds.len() - 1).unwrap_or(-1)
            },
        );
        link.send(
            &Report::Guest {
                name: guest.spec.name.clone(),
                state: Box::new(state),
            },
            &fds,
        );
    }
    link.send(&Report::HandedOver { upgrades }, &[]);
    // Every guest is parked and its state with the top process: this
    // process goes without removing anything (the sockets are the next
    // one's).
    std::process::exit(0);
}

impl Top {
    /// Top process: answers [`Report::CheckUpgrade`].
    pub(super) fn check_upgrade(&self, id: u64, socket: &OwnedFd) {
        let refused = upgrade::check_binary(&self.binary)
            .err()
            .map(|e| e.to_string());
        if let Some(reason) = &refused {
            warn!("upgrade refused: {reason}");
        }
        let Ok(json) = serde_json::to_vec(&Verdict { id, refused }) else {
            return;
        };
        if let Err(e) = nix::sys::socket::send(socket.as_raw_fd(), &json, MsgFlags::MSG_DONTWAIT) {
            warn!("cannot answer the serving process about the upgrade: {e}");
        }
    }

    /// Top process: the serving process handed everything over and exited;
    /// starts the new binary with every guest, token levels kept.
    pub(super) fn start_upgraded(&self, upgrades: u64) -> std::io::Result<Pid> {
        info!(
            "starting {} as the serving process (upgrade {upgrades}) with {} guest(s)",
            self.binary.display(),
            self.held.len()
        );
        self.spawn_from_held(true, Some(upgrades))
    }
}
