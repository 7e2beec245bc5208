// SPDX-License-Identifier: Apache-2.0
//! The vhost-user virtio-rng frontend: one Unix socket per guest, served to
//! QEMU (`-device vhost-user-rng-pci`) and cloud-hypervisor
//! (`--generic-vhost-user`).
//!
//! - [`server`]: one guest's connections, one after another.
//! - [`event_loop`]: the few threads that serve every guest's socket,
//!   connection and queue.
//! - [`connection`]: vhost-user framing: whole messages in, replies out.
//! - [`dispatch`]: each message to the handler, sizes and fds checked.
//! - [`handler`]: the device state the messages change, checked.
//! - [`memory`]: the guest memory a VMM shares, checked and mapped.
//! - [`fault_guard`]: surviving a guest memory file that shrinks.
//! - [`snapshot`]: a connection's state as data, to hand it over.
//! - [`device`]: the virtio-rng device offered over each connection.
//! - [`request`]: answering the requests on its queue.
//! - [`remote_supply`]: `--isolation guest`'s entropy link between a guest
//!   process and the main serving process.

pub mod connection;
pub mod device;
pub mod dispatch;
pub mod event_loop;
pub mod fault_guard;
pub mod handler;
pub mod memory;
pub mod remote_supply;
pub mod request;
pub mod server;
pub mod snapshot;

pub use memory::MemoryLimits;
pub use server::{Endpoint, Frozen, FrozenConnection, GuestServer, Resumed, VhostUserLimits};
