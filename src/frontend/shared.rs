//! Listeners shared by many guests (AF_VSOCK, TCP): such a listener finds a
//! connection's guest by an identity (a vsock CID, a guest name proven with
//! its key) in a [`Directory`] that the registry fills as guests come and
//! go.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use log::info;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::GuestFrontend;
use super::stream::Clients;
use crate::guest::Guest;

/// A guest reachable through a shared listener.
pub struct Member<C> {
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

/// How long a listener pauses after a failed accept. The usual cause (no
/// descriptors left) leaves the connection queued, so an immediate retry
/// would fail the same way, over and over, at full speed.
pub const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Wakes a shared listener's accept loop so that it ends.
pub struct StopSignal {
    event: EventFd,
}

impl StopSignal {
    pub fn new() -> io::Result<Self> {
        Ok(StopSignal {
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }

    pub fn raise(&self) {
        let _ = self.event.write(1);
    }

    /// Waits until `listener` has a connection to accept (true) or the
    /// signal is raised (false), without waking up in between.
    pub fn wait_for_connection(&self, listener: BorrowedFd<'_>) -> bool {
        // SAFETY: the eventfd is owned by `self` and outlives the poll call.
        let stop = unsafe { BorrowedFd::borrow_raw(self.event.as_raw_fd()) };
        loop {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop, PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {
                    let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
                    return !stopped;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
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

    #[test]
    fn the_stop_signal_ends_a_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let signal = Arc::new(StopSignal::new().unwrap());
        let raised = Arc::clone(&signal);
        let waiter = std::thread::spawn(move || raised.wait_for_connection(listener.as_fd()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        signal.raise();
        assert!(!waiter.join().unwrap());

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(
            StopSignal::new()
                .unwrap()
                .wait_for_connection(listener.as_fd())
        );
    }
}
