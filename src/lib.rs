//! vhost-rng: a host entropy service for virtual machines.
//!
//! Data path, one module per stage:
//!
//! ```text
//! source (OS CSPRNG today; hardware sources next)   -> src/source/
//!   -> pool: what every guest draws from            -> src/pool.rs
//!     -> guest frontends: vhost-user virtio-rng     -> src/frontend/vhost_user/
//! ```
//!
//! [`daemon`] wires the stages together for `vhost-rng serve`; [`testing`]
//! holds a minimal VMM side of vhost-user used by the integration tests and
//! benchmarks.

pub mod agent;
pub mod check;
pub mod cli;
pub mod conditioner;
pub mod config;
pub mod control;
pub mod daemon;
pub mod drbg;
pub mod frontend;
pub mod guest;
pub mod health;
pub mod limiter;
pub mod log_limit;
pub mod metrics;
pub mod noise;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod source;
pub mod status;
pub mod testing;
pub mod vsock_stream;
