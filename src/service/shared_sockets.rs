// SPDX-License-Identifier: Apache-2.0
//! The listening sockets that are not one guest's: the vsock and TCP
//! listeners of the agent, the control socket and the metrics port. Like
//! guests' sockets they are kept across in-place upgrades, restarts of the
//! serving process and (through systemd's file descriptor store) restarts
//! of the service, so that an agent, `vhost-rng status` or a scrape never
//! finds nobody listening while the daemon changes hands.
//!
//! Each is known by a key naming what it listens on (`tcp@ADDR`,
//! `vsock@PORT`, `control@PATH`, `metrics@ADDR`): a new process takes the
//! socket handed over under the key it would bind, and binds afresh when
//! the setting changed (the old socket is then closed).

use std::collections::BTreeMap;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use log::{info, warn};

/// Sockets handed over by the previous process, not yet taken.
static INHERITED: Mutex<BTreeMap<String, OwnedFd>> = Mutex::new(BTreeMap::new());
/// Copies of the sockets this process listens on, by key.
static OPEN: Mutex<BTreeMap<String, OwnedFd>> = Mutex::new(BTreeMap::new());

fn lock(map: &Mutex<BTreeMap<String, OwnedFd>>) -> MutexGuard<'_, BTreeMap<String, OwnedFd>> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps what the previous process handed over, for [`listen`] to take.
pub fn set_inherited(sockets: Vec<(String, OwnedFd)>) {
    lock(&INHERITED).extend(sockets);
}

/// The socket `key` names: the one handed over, or a new one from `bind`.
/// A copy is kept to hand over in turn.
pub fn listen<E>(key: &str, bind: impl FnOnce() -> Result<OwnedFd, E>) -> Result<OwnedFd, E> {
    let socket = match lock(&INHERITED).remove(key) {
        Some(socket) => {
            info!("{key}: listening socket taken over from the previous process");
            socket
        }
        None => bind()?,
    };
    match socket.try_clone() {
        Ok(copy) => {
            lock(&OPEN).insert(key.to_owned(), copy);
        }
        Err(e) => warn!("{key}: cannot keep a copy to hand over ({e}); a restart reopens it"),
    }
    Ok(socket)
}

/// Closes the handed-over sockets no setting asked for (a setting changed).
pub fn drop_unused() {
    for (key, _) in std::mem::take(&mut *lock(&INHERITED)) {
        info!("{key}: no longer configured; the handed-over socket is closed");
    }
}

/// Forgets `key`: its listener stopped for good.
pub fn forget(key: &str) {
    lock(&OPEN).remove(key);
}

/// Copies of every socket this process listens on, with their keys, to
/// hand over; `keep` takes each and says how the record names it.
pub fn hand_over(mut keep: impl FnMut(OwnedFd) -> RawFd) -> Vec<(String, RawFd)> {
    lock(&OPEN)
        .iter()
        .filter_map(|(key, fd)| Some((key.clone(), keep(fd.try_clone().ok()?))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_handed_over_socket_is_taken_by_its_key_and_others_are_bound() {
        let (a, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let given: OwnedFd = a.into();
        let raw = given.as_raw_fd();
        set_inherited(vec![
            ("test=taken".into(), given),
            ("test=stale".into(), nix::unistd::pipe().unwrap().0),
        ]);
        let taken = listen::<std::io::Error>("test=taken", || panic!("bound although handed over"))
            .unwrap();
        assert_eq!(taken.as_raw_fd(), raw);
        let mut bound = false;
        listen("test=new", || {
            bound = true;
            nix::unistd::pipe().map(|(read, _)| read)
        })
        .unwrap();
        assert!(bound);
        drop_unused();
        assert!(lock(&INHERITED).is_empty());
        let keys: Vec<String> = hand_over(|fd| {
            let raw = fd.as_raw_fd();
            std::mem::forget(fd);
            raw
        })
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| key.starts_with("test="))
        .collect();
        assert_eq!(keys, ["test=new", "test=taken"]);
        forget("test=new");
        forget("test=taken");
    }
}
