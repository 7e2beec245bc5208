//! `vhost-rng serve`: builds the pool, opens every guest's socket, serves
//! them until SIGTERM or SIGINT, then closes connections and removes the
//! socket files it created.
//!
//! Start-up is all or nothing: if any socket cannot be opened, the ones
//! already created are removed and the daemon exits with an error.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use nix::sys::signal::{SigSet, Signal};

use crate::frontend::vhost_user::{Endpoint, GuestServer, GuestSocket, SocketAccess, SocketError};
use crate::guest::Guest;
use crate::pool::{Pool, PoolConfig, PoolError};

/// Everything `serve` needs, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Sockets the daemon listens on, one guest each.
    pub listen: Vec<PathBuf>,
    /// Sockets the VMM listens on, one guest each.
    pub connect: Vec<PathBuf>,
    pub access: SocketAccess,
    pub pool: PoolConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("cannot start the thread serving guest {guest}: {error}")]
    Spawn {
        guest: String,
        #[source]
        error: io::Error,
    },
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] nix::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: ServeConfig) -> Result<(), DaemonError> {
    // Blocked before any thread starts so that every thread inherits the
    // mask and the signals reach only the `wait` below.
    let signals = shutdown_signals();
    signals.thread_block().map_err(DaemonError::Signals)?;

    info!("serving mode: {}", config.pool.mode.as_str());
    let pool = Pool::start(config.pool.clone())?;

    let servers = start_guests(&config, &pool)?;
    info!("serving {} guest(s)", servers.len());

    loop {
        match signals.wait().map_err(DaemonError::Signals)? {
            Signal::SIGHUP => info!("SIGHUP: no configuration file to reload"),
            signal => {
                info!("{signal}: shutting down");
                break;
            }
        }
    }
    for server in &servers {
        server.stop();
    }
    info!("stopped; socket files removed");
    Ok(())
}

fn shutdown_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals
}

/// Opens every endpoint, then starts every server; undoes it all on error.
fn start_guests(
    config: &ServeConfig,
    pool: &Arc<Pool>,
) -> Result<Vec<Arc<GuestServer>>, DaemonError> {
    let mut endpoints = Vec::new();
    for path in &config.listen {
        match GuestSocket::bind(path, config.access) {
            Ok(socket) => endpoints.push(Endpoint::Listen(socket)),
            Err(e) => {
                remove_sockets(&endpoints);
                return Err(e.into());
            }
        }
    }
    endpoints.extend(config.connect.iter().cloned().map(Endpoint::Connect));

    let names = guest_names(endpoints.iter().map(Endpoint::path));
    let mut servers: Vec<Arc<GuestServer>> = Vec::new();
    let mut endpoints = endpoints.into_iter();
    for (name, endpoint) in names.into_iter().zip(endpoints.by_ref()) {
        let guest = Guest::new(name.clone(), Arc::clone(pool));
        info!("guest {name}: serving on {}", endpoint.path().display());
        match GuestServer::spawn(guest, endpoint) {
            Ok(server) => servers.push(server),
            Err(error) => {
                for server in &servers {
                    server.stop();
                }
                remove_sockets(&endpoints.collect::<Vec<_>>());
                warn!("start-up aborted; no guest is served");
                return Err(DaemonError::Spawn { guest: name, error });
            }
        }
    }
    Ok(servers)
}

fn remove_sockets(endpoints: &[Endpoint]) {
    for endpoint in endpoints {
        if let Endpoint::Listen(socket) = endpoint {
            socket.remove();
        }
    }
}

/// Names guests after their socket file (`/run/vm1.sock` -> `vm1`), falling
/// back to the whole path where two files share a name.
fn guest_names<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<String> {
    let paths: Vec<&Path> = paths.collect();
    let stem = |path: &Path| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string())
    };
    paths
        .iter()
        .map(|path| {
            let short = stem(path);
            let clashes = paths.iter().filter(|other| stem(other) == short).count() > 1;
            if clashes {
                path.display().to_string()
            } else {
                short
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_are_named_after_their_socket_unless_names_clash() {
        let paths = [
            Path::new("/run/vm1.sock"),
            Path::new("/a/vm2.sock"),
            Path::new("/b/vm2.sock"),
        ];
        assert_eq!(
            guest_names(paths.into_iter()),
            vec!["vm1", "/a/vm2.sock", "/b/vm2.sock"]
        );
    }

    #[test]
    fn failed_start_removes_sockets_already_created() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first.sock");
        let blocker = dir.path().join("second.sock");
        std::fs::write(&blocker, b"not a socket").unwrap();
        let pool_config = PoolConfig {
            sources: vec!["os".parse().unwrap()],
            mode: Default::default(),
            reseed: Default::default(),
        };
        let config = ServeConfig {
            listen: vec![first.clone(), blocker],
            connect: vec![],
            access: SocketAccess::default(),
            pool: pool_config.clone(),
        };

        let Err(err) = start_guests(&config, &Pool::start(pool_config).unwrap()) else {
            panic!("start-up must fail on a path that is not a socket");
        };

        assert!(
            matches!(err, DaemonError::Socket(SocketError::NotASocket { .. })),
            "{err}"
        );
        assert!(!first.exists(), "half a start must leave nothing behind");
    }
}
