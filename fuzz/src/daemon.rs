// SPDX-License-Identifier: Apache-2.0
//! What the targets share of a running daemon, made once per process: an
//! entropy pool on the operating system's generator (the one source that
//! works everywhere), a guest drawing from it without limits, and an empty
//! guest registry, and the clients of that guest's stream protocols.

use std::sync::{Arc, OnceLock};

use vhost_rng::entropy::pool::{Mode, Pool, PoolConfig};
use vhost_rng::frontend::socket_file::SocketAccess;
use vhost_rng::frontend::stream::{Clients, Timeouts};
use vhost_rng::frontend::vhost_user::VhostUserLimits;
use vhost_rng::guest::Guest;
use vhost_rng::service::registry::Registry;

/// The pool, started on first use.
pub fn pool() -> Arc<Pool> {
    static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
    Arc::clone(POOL.get_or_init(|| {
        Pool::start(PoolConfig {
            sources: vec!["os".parse().expect("os is a source")],
            mode: Mode::Drbg,
            reseed: Default::default(),
        })
        .expect("the OS generator is always there")
    }))
}

/// The guest the targets serve: no rate limit (a limited guest's blocking
/// reads would wait for tokens, which a fuzzer cannot afford), weight 1.
pub fn guest() -> Arc<Guest> {
    static GUEST: OnceLock<Arc<Guest>> = OnceLock::new();
    Arc::clone(GUEST.get_or_init(|| Guest::new("fuzz", pool())))
}

/// A registry with no guests; guests are never added to it (that binds
/// sockets wherever a spec says).
pub fn registry() -> Arc<Registry> {
    static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
    Arc::clone(
        REGISTRY.get_or_init(|| {
            Registry::new(pool(), SocketAccess::default(), VhostUserLimits::default())
        }),
    )
}

/// The guest's stream clients (EGD and channel), held to the protocol's
/// deadlines save the pause between looks at a starved pool, cut short
/// here; none of them is ever waited out, a scripted client being always
/// ready or at its end.
pub fn clients() -> Arc<Clients> {
    static CLIENTS: OnceLock<Arc<Clients>> = OnceLock::new();
    Arc::clone(CLIENTS.get_or_init(|| {
        let timeouts = Timeouts {
            stop_check: std::time::Duration::from_millis(5),
            ..Timeouts::DEFAULT
        };
        Clients::with_timeouts(guest(), timeouts)
    }))
}
