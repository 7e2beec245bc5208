// SPDX-License-Identifier: Apache-2.0
//! What the vhost-rng daemon and its in-guest agent share, and nothing
//! else: the agent links this crate, not the daemon.
//!
//! - [`wire`]: the channel protocol's messages (12-byte headers).
//! - [`noise`]: the Noise `NNpsk0` transport for TCP, and pre-shared keys.
//! - [`vsock`]: AF_VSOCK stream sockets.
//! - [`deadline`]: reads and writes bounded by a deadline for the whole
//!   exchange, not per call.
//! - [`log_limit`]: logs a hostile peer cannot flood.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod deadline;
pub mod log_limit;
pub mod noise;
pub mod vsock;
pub mod wire;
