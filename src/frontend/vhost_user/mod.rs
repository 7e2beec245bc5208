//! The vhost-user virtio-rng frontend: one Unix socket per guest, served to
//! QEMU (`-device vhost-user-rng-pci`) and cloud-hypervisor
//! (`--generic-vhost-user`).
//!
//! - [`socket`]: the guest's socket file (permissions, stale files).
//! - [`server`]: one guest's connections, one after another.
//! - [`device`]: the virtio-rng device offered over each connection.
//! - [`request`]: answering the requests on its queue.

pub mod device;
pub mod request;
pub mod server;
pub mod socket;

pub use server::{Endpoint, GuestServer};
pub use socket::{GuestSocket, SocketAccess, SocketError};
