// SPDX-License-Identifier: Apache-2.0
//! A guest process of `--isolation guest`: serves one vhost-user guest
//! (its socket, its VMM connection, its memory and queue) and nothing
//! else. Its bytes come from the main serving process over the entropy
//! link ([`crate::frontend::vhost_user::remote_supply`]); it reports its
//! guest's descriptors to the top process, which starts it again with
//! them if it dies. It runs under the same sandbox as the serving process
//! (`--user`, seccomp, Landlock, not dumpable).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use log::{info, warn};
use nix::sys::signal::Signal;

use super::{
    DaemonError, ServeConfig, daemon_signals, enter_sandbox, keep_out_of_core_dumps, resolve,
    wait_signal,
};
use crate::config::GuestEndpoint;
use crate::entropy::pool::Pool;
use crate::frontend::Handover;
use crate::frontend::socket_file::GuestSocket;
use crate::frontend::vhost_user::handler::Handler;
use crate::frontend::vhost_user::remote_supply::{self, RemoteLink};
use crate::frontend::vhost_user::{Endpoint, GuestServer, Resumed};
use crate::guest::Guest;
use crate::service::sandbox::{self, RunAs, seccomp};
use crate::service::supervisor::{LINK_ENV, Report, WorkerLink};
use crate::service::upgrade::{self, Counters};

/// Why a guest process cannot start.
fn setup_error(message: impl Into<String>) -> DaemonError {
    DaemonError::GuestProcess(message.into())
}

/// The link and wake descriptors the top process passed.
fn link_from_env() -> Result<RemoteLink, DaemonError> {
    let value = std::env::var(LINK_ENV).map_err(|_| setup_error("no entropy link passed"))?;
    let (link, wake) = value
        .split_once(',')
        .and_then(|(l, w)| Some((l.parse::<RawFd>().ok()?, w.parse::<RawFd>().ok()?)))
        .filter(|&(l, w)| l >= 0 && w >= 0 && l != w)
        .ok_or_else(|| setup_error(format!("a malformed {LINK_ENV}: {value}")))?;
    // SAFETY: the top process passed these two descriptors, open and ours
    // alone, under this name; nothing else here refers to them.
    let (link, wake) = unsafe { (OwnedFd::from_raw_fd(link), OwnedFd::from_raw_fd(wake)) };
    RemoteLink::new(link, wake).map_err(|e| setup_error(format!("the entropy link: {e}")))
}

/// Runs a guest process until the top process ends it.
pub fn run_guest_process(config: ServeConfig) -> Result<(), DaemonError> {
    let signals = daemon_signals();
    signals.thread_block().map_err(DaemonError::Signals)?;
    keep_out_of_core_dumps();
    sandbox::prepare_process();
    sandbox::privileges::clear_inheritable_capabilities();
    let state = upgrade::inherited()?.ok_or_else(|| setup_error("no guest passed"))?;
    let top = Arc::new(
        WorkerLink::for_guest_process().ok_or_else(|| setup_error("no link to the top process"))?,
    );
    let link = Arc::new(link_from_env()?);
    let resolved = resolve(&config)?;
    let run_as = resolved.user.as_deref().map(RunAs::resolve).transpose()?;
    let (mut carried, _) = upgrade::take_over(state);
    if carried.len() != 1 {
        return Err(setup_error(format!(
            "{} guests passed; a guest process serves one",
            carried.len()
        )));
    }
    let carried = carried.remove(0);
    let spec = carried.spec.clone();
    sandbox::arm(resolved.seccomp);
    let mut allowed = sandbox::landlock::Allowed::default();
    if let GuestEndpoint::Socket(path) = &spec.endpoint {
        allowed.socket(path);
    }
    let endpoint = match (&spec.endpoint, carried.listener) {
        (GuestEndpoint::Socket(path), Some(listener)) => Endpoint::Listen(
            GuestSocket::adopt(path, listener).map_err(|e| setup_error(e.to_string()))?,
        ),
        (GuestEndpoint::Connect(path), _) => Endpoint::Connect(path.clone()),
        _ => {
            return Err(setup_error(format!(
                "guest {}: nothing to serve",
                spec.name
            )));
        }
    };
    let landlock = sandbox::landlock::restrict(&allowed);
    // Limits, counters and the pool are the main serving process's: this
    // guest draws nothing itself.
    let guest = Guest::new(spec.name.clone(), Pool::empty(resolved.pool.mode));
    remote_supply::install(Arc::clone(&link));
    let resumed = carried.connection.and_then(|(stream, state, fds)| {
        match Handler::restore(Arc::clone(&guest), resolved.vhost_user.memory, &state, fds) {
            Ok(handler) => Some(Resumed { stream, handler }),
            Err(e) => {
                warn!(
                    "guest {}: cannot take over its VMM connection ({e}); the VMM must reconnect",
                    spec.name
                );
                None
            }
        }
    });
    let checkpoint = {
        let (spec, guest, link) = (spec.clone(), Arc::clone(&guest), Arc::clone(&link));
        let runtime = carried.runtime;
        Arc::new(move |handover: Handover| {
            // Connected or not, and new connections, for status.
            link.report(&guest.stats);
            let mut fds = Vec::new();
            let state =
                upgrade::guest_state(&spec, runtime, handover, None, Counters::default(), |fd| {
                    fds.push(fd);
                    (fds.len() - 1) as RawFd
                });
            top.send(
                &Report::Guest {
                    name: spec.name.clone(),
                    state: Box::new(state),
                },
                &fds,
            );
        })
    };
    let _server = GuestServer::spawn_resumed(
        Arc::clone(&guest),
        endpoint,
        resolved.vhost_user,
        resumed,
        Some(checkpoint),
    )
    .map_err(|e| setup_error(format!("guest {}: {e}", spec.name)))?;
    give_back_setup_memory();
    enter_sandbox(
        seccomp::Role::GuestProcess,
        run_as.as_ref(),
        resolved.seccomp,
        landlock,
    )?;
    info!(
        "guest {}: guest process {} serves it alone",
        spec.name,
        std::process::id()
    );
    loop {
        match wait_signal(&signals, None).map_err(DaemonError::Signals)? {
            Some(Signal::SIGTERM | Signal::SIGINT) => break,
            _ => continue,
        }
    }
    // The serving process owns the socket file; the top process holds the
    // connection: nothing to close here.
    Ok(())
}

/// Returns the heap the command line and set-up used to the kernel: one
/// guest process per guest makes a few hundred KiB each add up.
fn give_back_setup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is
    // passed and nothing in use is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}
