//! Guest frontends: the ways guests receive bytes from the pool.
//!
//! Today: vhost-user virtio-rng, one Unix socket per guest.

pub mod vhost_user;
