// SPDX-License-Identifier: Apache-2.0
//! Running the daemon: `vhost-rng serve` ([`daemon`]), the sockets it is
//! handed by systemd or `--fd` ([`activation`]), the running guests
//! ([`registry`]), the control socket ([`control`]), what they report
//! ([`status`]), systemd notifications ([`systemd`]), in-place upgrades
//! ([`upgrade`]), the top process that restarts a crashed serving process
//! ([`supervisor`]) and what it keeps in systemd's file descriptor store
//! ([`fd_store`]), the listening sockets all guests share and that are
//! handed over like theirs ([`shared_sockets`]), the sandbox of both
//! processes ([`sandbox`]), the guest processes of `--isolation guest`
//! ([`isolation`]), `vhost-rng check` ([`check`]) and `vhost-rng
//! seed` ([`seed`]).

pub mod activation;
pub mod check;
pub mod control;
pub mod daemon;
pub mod fd_store;
pub mod isolation;
pub mod libvirt_hook;
pub mod registry;
pub mod sandbox;
pub mod seed;
pub mod shared_sockets;
pub mod status;
pub mod supervisor;
pub mod systemd;
pub mod upgrade;
