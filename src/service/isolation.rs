// SPDX-License-Identifier: Apache-2.0
//! `--isolation guest` in the main serving process: a vhost-user guest
//! whose memory is mapped by a guest process of its own (started by the
//! top process, see `supervisor::guest_process`), not here. What stays here
//! is the guest's [`Guest`] (limits, counters, status) and the thread that
//! answers its guest process over the entropy link
//! ([`crate::frontend::vhost_user::remote_supply`]).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use crate::config::GuestSpec;
use crate::frontend::vhost_user::Endpoint;
use crate::frontend::vhost_user::remote_supply::LinkServer;
use crate::frontend::{GuestFrontend, Handover};
use crate::guest::Guest;
use crate::service::supervisor::{Report, WorkerLink};

pub use crate::service::sandbox::Isolation;

/// Why an in-place upgrade is refused in guest mode.
pub const NO_UPGRADE: &str = "in-place upgrade is not available with --isolation guest: \
    restart the service under systemd instead (its file descriptor store keeps VMM \
    connections), or run with --isolation shared";

/// A vhost-user guest served by a guest process.
pub struct RemoteGuest {
    guest: Arc<Guest>,
    endpoint: Endpoint,
    link: Arc<LinkServer>,
}

impl RemoteGuest {
    /// Makes the entropy link, has the top process start the guest
    /// process with it (and `endpoint`'s listening socket), and answers it.
    pub fn start(
        guest: Arc<Guest>,
        spec: &GuestSpec,
        runtime: bool,
        endpoint: Endpoint,
        top: &WorkerLink,
    ) -> std::io::Result<RemoteGuest> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let wake = eventfd_into_owned(vmm_sys_util::eventfd::EventFd::new(
            libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
        )?);
        let mut fds = vec![theirs, wake.try_clone()?];
        if let Endpoint::Listen(socket) = &endpoint {
            fds.push(socket.duplicate().map_err(std::io::Error::other)?);
        }
        let link = LinkServer::spawn(Arc::clone(&guest), ours, wake)?;
        top.send(
            &Report::StartGuest {
                name: spec.name.clone(),
                spec: spec.to_string(),
                runtime,
            },
            &fds,
        );
        Ok(RemoteGuest {
            guest,
            endpoint,
            link,
        })
    }
}

fn eventfd_into_owned(event: vmm_sys_util::eventfd::EventFd) -> OwnedFd {
    // SAFETY: the EventFd's descriptor is ours; the OwnedFd takes it over.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(event)) }
}

impl GuestFrontend for RemoteGuest {
    fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    fn stop(&self) {
        self.link.stop();
        if let Endpoint::Listen(socket) = &self.endpoint {
            socket.remove();
        }
    }

    fn handover(&self, _patience: Duration) -> Handover {
        Handover::Failed(NO_UPGRADE.into())
    }

    fn process(&self) -> Option<u32> {
        self.link.pid()
    }
}
