// SPDX-License-Identifier: Apache-2.0
//! vhost-rng: a host entropy service for virtual machines.
//!
//! The folders follow the data path, then what runs it:
//!
//! ```text
//! entropy/   sources -> health tests -> conditioner -> pool -> per-guest DRBG
//! guest/     each guest: its token bucket, its counters, what it may draw
//! frontend/  how guests are reached: vhost-user, EGD, FIFOs, the agent's
//!            channel over Unix sockets, vsock and TCP, and the socket files
//! service/   the daemon: the running guests, control socket, status, check
//! config/    the configuration file and --guest specs
//! metrics/   the Prometheus endpoint
//! kcmp.rs    whether two descriptors are the same open file
//! ```
//!
//! What the daemon shares with its in-guest agent (the channel's wire
//! format, Noise, vsock streams, deadline I/O) is the `vhost-rng-protocol`
//! crate; the agent is `vhost-rng-agent`; the test VMM is
//! `vhost-rng-testing`. See docs/architecture.md.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod config;
pub mod entropy;
pub mod frontend;
pub mod guest;
pub mod kcmp;
pub mod metrics;
pub mod service;
