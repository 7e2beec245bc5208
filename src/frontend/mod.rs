// SPDX-License-Identifier: Apache-2.0
//! Guest frontends: the ways guests receive bytes from the pool.
//!
//! - [`vhost_user`]: the virtio-rng device over vhost-user, one Unix socket
//!   per guest (QEMU, cloud-hypervisor).
//! - [`egd`]: the EGD protocol on a Unix socket, for VMMs that only have
//!   their built-in virtio-rng backends (QEMU `rng-egd`, libvirt).
//! - [`channel`]: the vhost-rng channel protocol for the in-guest agent,
//!   over hybrid vsock, [`vsock`] (AF_VSOCK) or [`tcp`] (Noise over TCP).
//! - [`stream`]: what the stream-socket frontends share; [`shared`]: what
//!   the listeners shared by many guests (vsock, TCP) share.
//! - [`accept`]: what every accept loop shares.
//! - [`socket_file`]: the socket files every frontend listens on
//!   (permissions, stale files, no symlink games).

pub mod accept;
pub mod channel;
pub mod egd;
pub mod shared;
pub mod socket_file;
pub mod stream;
pub mod tcp;
pub mod vhost_user;
pub mod vsock;

use std::sync::Arc;

use crate::guest::Guest;

/// A running frontend serving one guest.
pub trait GuestFrontend: Send + Sync {
    /// The guest this frontend serves.
    fn guest(&self) -> &Arc<Guest>;
    /// Closes the guest's connections and removes its socket file.
    fn stop(&self);
}

impl GuestFrontend for vhost_user::GuestServer {
    fn guest(&self) -> &Arc<Guest> {
        vhost_user::GuestServer::guest(self)
    }

    fn stop(&self) {
        vhost_user::GuestServer::stop(self)
    }
}

impl GuestFrontend for stream::StreamServer {
    fn guest(&self) -> &Arc<Guest> {
        stream::StreamServer::guest(self)
    }

    fn stop(&self) {
        stream::StreamServer::stop(self)
    }
}
