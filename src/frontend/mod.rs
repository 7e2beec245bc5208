// SPDX-License-Identifier: Apache-2.0
//! Guest frontends: the ways guests receive bytes from the pool.
//!
//! - [`vhost_user`]: the virtio-rng device over vhost-user, one Unix socket
//!   per guest (QEMU, cloud-hypervisor).
//! - [`egd`]: the EGD protocol on a Unix socket, for VMMs that only have
//!   their built-in virtio-rng backends (QEMU `rng-egd`, libvirt).
//! - [`channel`]: the vhost-rng channel protocol for the in-guest agent,
//!   over hybrid vsock, [`vsock`] (AF_VSOCK) or [`tcp`] (Noise over TCP).
//! - [`fifo`]: a named pipe the daemon keeps filled, for VMMs that read a
//!   path (QEMU `rng-random`, libvirt `random`, Nova, cloud-hypervisor).
//! - [`stream`]: what the stream-socket frontends share; [`shared`]: what
//!   the listeners shared by many guests (vsock, TCP) share.
//! - [`accept`]: what every accept loop shares.
//! - [`socket_file`]: the socket files every frontend listens on
//!   (permissions, stale files, no symlink games).

pub mod accept;
pub mod channel;
pub mod egd;
pub mod fifo;
pub mod shared;
pub mod socket_file;
pub mod stream;
pub mod tcp;
pub mod vhost_user;
pub mod vsock;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::guest::Guest;

/// A running frontend serving one guest.
pub trait GuestFrontend: Send + Sync {
    /// The guest this frontend serves.
    fn guest(&self) -> &Arc<Guest>;
    /// Closes the guest's connections and removes its socket file.
    fn stop(&self);
    /// Removes files the guest keeps across daemon restarts (a `fifo=`
    /// guest's FIFO), once the guest itself is removed.
    fn remove_files(&self) {}
    /// Stops serving at a safe point and hands over the descriptors another
    /// daemon needs to go on (an in-place upgrade), closing nothing.
    fn handover(&self, _patience: Duration) -> Handover {
        Handover::Nothing
    }
    /// Goes on serving after a [`GuestFrontend::handover`] that was not
    /// used (the upgrade did not happen).
    fn thaw(&self) {}
    /// The pid of the process that serves this guest alone, if one does
    /// (`--isolation guest`).
    fn process(&self) -> Option<u32> {
        None
    }
}

/// Told what a guest holds after every change (a VMM connected, a message
/// changed its device, a client came or went), so that a top process can
/// restart a crashed serving process with it (see
/// `service::supervisor`).
pub type Checkpoint = Arc<dyn Fn(Handover) + Send + Sync>;

/// What a guest's frontend hands over in an in-place upgrade.
pub enum Handover {
    /// Nothing: the guest is reached through a shared listener (vsock,
    /// TCP), which the new daemon opens again; its agent reconnects.
    Nothing,
    /// A vhost-user guest: its listening socket (`socket=` guests) and its
    /// VMM connection, if one is up.
    VhostUser {
        /// The listening socket, for a `socket=` guest.
        listener: Option<OwnedFd>,
        /// The VMM's connection and device state, if a VMM is connected.
        connection: Option<vhost_user::FrozenConnection>,
    },
    /// An EGD or channel guest: its listening socket and connected clients.
    Stream {
        /// The listening socket.
        listener: OwnedFd,
        /// The connected clients' sockets, oldest first.
        clients: Vec<OwnedFd>,
    },
    /// The frontend could not hand over; the upgrade must not go ahead.
    Failed(String),
}

impl GuestFrontend for vhost_user::GuestServer {
    fn guest(&self) -> &Arc<Guest> {
        vhost_user::GuestServer::guest(self)
    }

    fn stop(&self) {
        vhost_user::GuestServer::stop(self)
    }

    fn handover(&self, patience: Duration) -> Handover {
        let listener = match self.listener_duplicate() {
            Ok(listener) => listener,
            Err(e) => return Handover::Failed(format!("cannot duplicate its socket: {e}")),
        };
        match self.freeze(patience) {
            vhost_user::Frozen::Idle => Handover::VhostUser {
                listener,
                connection: None,
            },
            vhost_user::Frozen::Connected(connection) => Handover::VhostUser {
                listener,
                connection: Some(connection),
            },
            vhost_user::Frozen::Failed(reason) => Handover::Failed(reason),
        }
    }

    fn thaw(&self) {
        vhost_user::GuestServer::thaw(self)
    }
}

impl GuestFrontend for stream::StreamServer {
    fn guest(&self) -> &Arc<Guest> {
        stream::StreamServer::guest(self)
    }

    fn stop(&self) {
        stream::StreamServer::stop(self)
    }

    fn handover(&self, patience: Duration) -> Handover {
        match stream::StreamServer::handover(self, patience) {
            Ok((listener, clients)) => Handover::Stream { listener, clients },
            Err(e) => Handover::Failed(format!("cannot hand its clients over: {e}")),
        }
    }

    fn thaw(&self) {
        stream::StreamServer::thaw(self)
    }
}
