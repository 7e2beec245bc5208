// SPDX-License-Identifier: Apache-2.0
//! Listeners shared by many guests (AF_VSOCK, TCP): such a listener finds a
//! connection's guest by an identity (a vsock CID, a guest name proven with
//! its key) in a [`Directory`] that the registry fills as guests come and
//! go.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use log::info;
use serde::{Deserialize, Serialize};

use super::GuestFrontend;
use super::stream::Clients;
use crate::guest::Guest;

/// A listener shared by many guests (`--vsock`, `--listen-tcp`) at one
/// moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// `vsock` or `tcp`.
    pub kind: String,
    /// The port for vsock, IP:PORT for TCP.
    pub address: String,
    /// Connections accepted, refused ones included.
    pub connections: u64,
    /// Connections refused before they reached a guest, by reason. Every
    /// reason of the listener's kind is present, at 0 until it happens, so
    /// that rates over them start from the first refusal.
    pub refused: BTreeMap<String, u64>,
}

/// A guest reachable through a shared listener.
pub struct Member<C> {
    /// The guest's open clients, shared with its other sockets, so that its
    /// connection limit counts them all.
    pub clients: Arc<Clients>,
    /// What the guest proves its identity with (a TCP key; nothing for
    /// vsock, where the host assigns CIDs).
    pub credential: C,
    /// Let in by a listener's default policy (an unknown vsock CID under
    /// `--vsock-default-rate`) rather than configured.
    pub automatic: bool,
}

/// The guests of one shared listener, by identity.
pub struct Directory<K, C> {
    members: Mutex<HashMap<K, Arc<Member<C>>>>,
}

impl<K, C> Default for Directory<K, C> {
    fn default() -> Self {
        Directory {
            members: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, C> Directory<K, C>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
    C: Send + Sync + 'static,
{
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Arc<Member<C>>>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The member under `key`, if the guest is known.
    pub fn get(&self, key: &K) -> Option<Arc<Member<C>>> {
        self.lock().get(key).cloned()
    }

    /// The member under `key`, made by `make` if there is none yet.
    pub fn get_or_insert_with(&self, key: &K, make: impl FnOnce() -> Member<C>) -> Arc<Member<C>> {
        Arc::clone(
            self.lock()
                .entry(key.clone())
                .or_insert_with(|| Arc::new(make())),
        )
    }

    /// Adds a configured guest under `key`. A guest that was let in
    /// automatically under the same key makes way: its clients are closed.
    pub fn join(
        self: &Arc<Self>,
        key: K,
        clients: Arc<Clients>,
        credential: C,
    ) -> Arc<Membership<K, C>> {
        let member = Arc::new(Member {
            clients,
            credential,
            automatic: false,
        });
        let replaced = self.lock().insert(key.clone(), Arc::clone(&member));
        if let Some(replaced) = replaced {
            info!(
                "{key}: guest {} is now served as guest {}",
                replaced.clients.guest().name(),
                member.clients.guest().name()
            );
            replaced.clients.close_all();
        }
        Arc::new(Membership {
            directory: Arc::clone(self),
            key,
            member,
        })
    }

    /// Forgets the guests let in automatically that have no client now.
    /// Called when another is let in, so their number stays near the number
    /// connected, however many CIDs come and go; one that comes back
    /// starts afresh (with an empty bucket, so it gains nothing).
    pub fn forget_idle_automatic(&self) {
        self.lock()
            .retain(|_, member| !member.automatic || member.clients.has_clients());
    }

    /// The guests let in automatically, with their keys.
    pub fn automatic(&self) -> Vec<(K, Arc<Guest>)> {
        self.lock()
            .iter()
            .filter(|(_, member)| member.automatic)
            .map(|(key, member)| (key.clone(), Arc::clone(member.clients.guest())))
            .collect()
    }

    /// Closes every member's clients.
    pub fn close_all(&self) {
        for (_, member) in self.lock().drain() {
            member.clients.close_all();
        }
    }
}

/// A configured guest's place in a directory: the frontend the registry
/// holds for it. Stopping it takes the guest out and closes its clients.
pub struct Membership<K, C> {
    directory: Arc<Directory<K, C>>,
    key: K,
    member: Arc<Member<C>>,
}

impl<K, C> GuestFrontend for Membership<K, C>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
    C: Send + Sync + 'static,
{
    fn guest(&self) -> &Arc<Guest> {
        self.member.clients.guest()
    }

    fn stop(&self) {
        let mut members = self.directory.lock();
        // Only if it is still this guest: another may have taken the key.
        if members
            .get(&self.key)
            .is_some_and(|current| Arc::ptr_eq(current, &self.member))
        {
            members.remove(&self.key);
        }
        drop(members);
        self.member.clients.close_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{GuestLimits, SharedBucket};

    fn clients(name: &str) -> Arc<Clients> {
        let pool = crate::entropy::pool::os_pool();
        Clients::new(Guest::with_limits(
            name,
            pool,
            GuestLimits::default(),
            SharedBucket::default(),
        ))
    }

    #[test]
    fn members_join_and_leave_by_key() {
        let directory: Arc<Directory<u32, ()>> = Arc::default();
        let vm = directory.join(3, clients("vm"), ());
        assert_eq!(directory.get(&3).unwrap().clients.guest().name(), "vm");
        assert!(directory.get(&4).is_none());
        vm.stop();
        assert!(directory.get(&3).is_none());
        assert!(
            vm.member.clients.is_stopping(),
            "stopping closes its clients"
        );
    }

    #[test]
    fn a_configured_guest_replaces_an_automatic_one() {
        let directory: Arc<Directory<u32, ()>> = Arc::default();
        let automatic = directory.get_or_insert_with(&5, || Member {
            clients: clients("cid-5"),
            credential: (),
            automatic: true,
        });
        assert_eq!(directory.automatic().len(), 1);
        let configured = directory.join(5, clients("vm5"), ());
        assert!(automatic.clients.is_stopping());
        assert!(directory.automatic().is_empty());
        assert_eq!(directory.get(&5).unwrap().clients.guest().name(), "vm5");
        configured.stop();
        assert!(directory.get(&5).is_none());
    }

    #[test]
    fn a_stale_membership_does_not_remove_its_successor() {
        let directory: Arc<Directory<String, ()>> = Arc::default();
        let first = directory.join("vm".into(), clients("vm"), ());
        let second = directory.join("vm".into(), clients("vm"), ());
        first.stop();
        assert!(
            directory
                .get(&"vm".to_owned())
                .is_some_and(|m| Arc::ptr_eq(&m, &second.member))
        );
    }
}
