// SPDX-License-Identifier: Apache-2.0
//! systemd's file descriptor store, so that even the top process can go
//! (`systemctl restart vhost-rng`, a kill, a crash) while VMMs keep their
//! connections: the top process stores a duplicate of every descriptor a
//! guest holds in the service manager, and a new `vhost-rng serve` gets
//! them back on start (`LISTEN_FDS`) and serves every guest from where the
//! last record left it, as after a crash of the serving process.
//!
//! Names (`FDNAME=`): `guest.<name>.<id>` for each of a guest's files (one
//! id per file, kept while the file is: systemd refuses a second copy of a
//! file it holds, and a VMM may pass one memfd for several regions), and
//! `guest.<name>.state<generation>` for a memfd with the guest's record
//! ([`GuestState`], descriptors as positions in a list of ids). A new
//! record is stored before the old one is removed, so a kill between the
//! two leaves two, and the newer one counts.
//!
//! Used when systemd runs the daemon (`$NOTIFY_SOCKET`) unless it says the
//! store is off (`FDSTORE=0`, set by systemd 254 and later; older versions
//! set nothing, and drop what the unit gave no room for, with a warning in
//! the journal). The unit needs `FileDescriptorStoreMax=`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use super::systemd::Notifier;
use super::upgrade::{self, GuestState, UPGRADE_STATE_VERSION};
use crate::kcmp;

/// Set for the serving process when the store holds every guest's
/// descriptors: on SIGTERM it then leaves connections and socket files as
/// they are, for the next start (`systemctl restart`); a `systemctl stop`
/// closes them when systemd empties the store.
pub const KEEPS_CONNECTIONS_ENV: &str = "VHOST_RNG_FD_STORE";

const PREFIX: &str = "guest.";
/// Shared listening sockets: `shared.<key>`, the key's `:` (which systemd
/// does not allow in a name) written `|`.
const SHARED_PREFIX: &str = "shared.";
const STATE: &str = "state";

/// What the store holds for one guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredGuest {
    /// The id of each of the guest's descriptors, in the order the top
    /// process holds them (one file may appear more than once).
    ids: Vec<u32>,
    /// The generation of the stored record (0: none).
    generation: u64,
    /// The next unused id.
    next_id: u32,
}

/// A guest's record in the store.
#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    written_by: String,
    /// Descriptors as positions in `ids`.
    state: GuestState,
    ids: Vec<u32>,
}

/// The top process's view of the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FdStore {
    guests: BTreeMap<String, StoredGuest>,
    /// Names to remove that systemd's full queue refused.
    #[serde(default)]
    unremoved: BTreeSet<String>,
    /// Keys of the shared listening sockets stored.
    #[serde(default)]
    shared: BTreeSet<String>,
}

/// A guest as the store gave it back: its record and its descriptors (the
/// record's descriptors are indices into them).
pub type Restored = (String, GuestState, Vec<OwnedFd>);

impl FdStore {
    /// Whether systemd keeps descriptors for this process: notifications go
    /// to it directly, it did not say the store is off, and descriptors can
    /// be told apart (kcmp(2)).
    pub fn wanted(notifier: &Notifier) -> bool {
        if !notifier.is_direct() || std::env::var("FDSTORE").is_ok_and(|max| max.trim() == "0") {
            return false;
        }
        match nix::unistd::pipe() {
            Ok((read, write)) if same_file_checked(&read, &write).is_some() => true,
            _ => {
                warn!(
                    "kcmp(2) is not available: the file descriptor store is not used, and a \
                     restart of the service closes the guests' connections"
                );
                false
            }
        }
    }

    /// Stores what `name` now holds; `previous` are the descriptors it held
    /// until now (open still), in the order stored before. False if systemd
    /// did not take every message (its queue was full): then call
    /// [`FdStore::resync`] later.
    #[must_use]
    pub fn put(
        &mut self,
        notifier: &Notifier,
        name: &str,
        previous: Option<&[OwnedFd]>,
        state: &GuestState,
        fds: &[OwnedFd],
    ) -> bool {
        let mut sent = self.retry_removals(notifier);
        let old = self.guests.remove(name).unwrap_or_default();
        let previous = previous.filter(|p| p.len() == old.ids.len()).unwrap_or(&[]);
        let mut next_id = old.next_id;
        let mut ids: Vec<u32> = Vec::with_capacity(fds.len());
        for (i, fd) in fds.iter().enumerate() {
            let earlier = (0..i).find(|&j| same_file(&fds[j], fd)).map(|j| ids[j]);
            let kept = || {
                previous
                    .iter()
                    .position(|p| same_file(p, fd))
                    .map(|k| old.ids[k])
            };
            let id = match earlier.or_else(kept) {
                Some(id) => id,
                None => {
                    let id = next_id;
                    next_id += 1;
                    sent &= store(notifier, &file_name(name, id), fd.as_raw_fd());
                    id
                }
            };
            ids.push(id);
        }
        let now: BTreeSet<u32> = ids.iter().copied().collect();
        for id in old.ids.iter().copied().collect::<BTreeSet<_>>() {
            if !now.contains(&id) {
                sent &= self.remove(notifier, file_name(name, id));
            }
        }
        let record = Record {
            version: UPGRADE_STATE_VERSION,
            written_by: env!("CARGO_PKG_VERSION").into(),
            state: state.clone(),
            ids: ids.clone(),
        };
        let generation = old.generation + 1;
        match upgrade::write_json(&record) {
            Ok(memfd) => sent &= store(notifier, &state_name(name, generation), memfd.as_raw_fd()),
            Err(e) => {
                warn!("guest {name}: cannot write its record for systemd's store: {e}");
                sent = false;
            }
        }
        // The old record goes only once the new one is in.
        if old.generation > 0 && sent {
            sent &= self.remove(notifier, state_name(name, old.generation));
        }
        self.guests.insert(
            name.to_owned(),
            StoredGuest {
                ids,
                generation,
                next_id,
            },
        );
        sent
    }

    /// Stores `name` again from scratch after a [`FdStore::put`] systemd did
    /// not take whole: removes every name it may have, then stores each of
    /// its files and its record. False if systemd still did not take it.
    #[must_use]
    pub fn resync(
        &mut self,
        notifier: &Notifier,
        name: &str,
        state: &GuestState,
        fds: &[OwnedFd],
    ) -> bool {
        let old = self.guests.remove(name).unwrap_or_default();
        let mut sent = self.retry_removals(notifier);
        for id in old.ids.iter().copied().collect::<BTreeSet<_>>() {
            sent &= self.remove(notifier, file_name(name, id));
        }
        for generation in old.generation.saturating_sub(1)..=old.generation {
            if generation > 0 {
                sent &= self.remove(notifier, state_name(name, generation));
            }
        }
        // Ids and generations go on from the old ones: a message systemd
        // did take late must not name the new files.
        self.guests.insert(
            name.to_owned(),
            StoredGuest {
                ids: Vec::new(),
                generation: old.generation + 1,
                next_id: old.next_id,
            },
        );
        sent && self.put(notifier, name, None, state, fds)
    }

    /// Stores the shared listening sockets not stored yet, and removes the
    /// ones no longer open (a setting changed). They never change while
    /// they are open, so nothing is stored twice.
    pub fn put_shared(&mut self, notifier: &Notifier, sockets: &[(String, OwnedFd)]) {
        let now: BTreeSet<String> = sockets.iter().map(|(key, _)| key.clone()).collect();
        for key in self.shared.difference(&now).cloned().collect::<Vec<_>>() {
            let _ = self.remove(notifier, shared_name(&key));
        }
        for (key, fd) in sockets {
            if !self.shared.contains(key) && !store(notifier, &shared_name(key), fd.as_raw_fd()) {
                warn!(
                    "{key}: systemd's file descriptor store did not take it; a restart reopens it"
                );
            }
        }
        self.shared = now;
    }

    /// Removes everything stored for `name`. False if systemd did not take
    /// every message.
    #[must_use]
    pub fn forget(&mut self, notifier: &Notifier, name: &str) -> bool {
        let mut sent = self.retry_removals(notifier);
        if let Some(old) = self.guests.remove(name) {
            for id in old.ids.iter().copied().collect::<BTreeSet<_>>() {
                sent &= self.remove(notifier, file_name(name, id));
            }
            if old.generation > 0 {
                sent &= self.remove(notifier, state_name(name, old.generation));
            }
        }
        sent
    }

    /// Asks systemd to remove `fd_name`; remembered for a retry if its
    /// queue was full.
    fn remove(&mut self, notifier: &Notifier, fd_name: String) -> bool {
        let sent = remove(notifier, &fd_name);
        if !sent {
            self.unremoved.insert(fd_name);
        }
        sent
    }

    /// Sends the removals systemd's full queue refused before.
    fn retry_removals(&mut self, notifier: &Notifier) -> bool {
        self.unremoved.retain(|fd_name| !remove(notifier, fd_name));
        self.unremoved.is_empty()
    }

    /// The guests in the descriptors systemd passed on start, and the store
    /// as it now is. Descriptors no record uses, and records this version
    /// cannot read, are closed and removed from the store.
    pub fn restore(
        notifier: &Notifier,
        passed: Vec<(String, OwnedFd)>,
    ) -> (FdStore, Vec<Restored>, Vec<(String, OwnedFd)>) {
        #[derive(Default)]
        struct Found {
            files: BTreeMap<u32, OwnedFd>,
            states: BTreeMap<u64, OwnedFd>,
        }
        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        let mut shared = Vec::new();
        for (fd_name, fd) in passed {
            if let Some(key) = fd_name.strip_prefix(SHARED_PREFIX) {
                shared.push((key.replace('|', ":"), fd));
                continue;
            }
            match parse_name(&fd_name) {
                Some((guest, Entry::File(id))) => {
                    found
                        .entry(guest.to_owned())
                        .or_default()
                        .files
                        .insert(id, fd);
                }
                Some((guest, Entry::State(generation))) => {
                    found
                        .entry(guest.to_owned())
                        .or_default()
                        .states
                        .insert(generation, fd);
                }
                None => warn!(
                    "systemd passed a descriptor named {fd_name:?}, which this version does not \
                     use; closing it"
                ),
            }
        }
        let mut store = FdStore {
            shared: shared.iter().map(|(key, _)| key.clone()).collect(),
            ..FdStore::default()
        };
        let mut restored = Vec::new();
        for (name, mut found) in found {
            // The newest record counts; older ones are a kill mid-update.
            let latest = found.states.pop_last();
            for generation in found.states.keys() {
                let _ = remove(notifier, &state_name(&name, *generation));
            }
            let record = latest.and_then(|(generation, fd)| match read_record(fd) {
                Ok(record) => Some((generation, record)),
                Err(e) => {
                    warn!("guest {name}: its record in systemd's store is unusable ({e})");
                    remove(notifier, &state_name(&name, generation));
                    None
                }
            });
            let Some((generation, record)) = record else {
                for id in found.files.keys() {
                    let _ = remove(notifier, &file_name(&name, *id));
                }
                continue;
            };
            let next_id = found.files.keys().max().map_or(0, |max| max + 1);
            let (state, fds, ids) = rebuild(&name, record, &found.files);
            for id in found.files.keys() {
                if !ids.contains(id) {
                    let _ = remove(notifier, &file_name(&name, *id));
                }
            }
            store.guests.insert(
                name.clone(),
                StoredGuest {
                    ids,
                    generation,
                    next_id: next_id.max(1),
                },
            );
            restored.push((name, state, fds));
        }
        if !restored.is_empty() {
            info!(
                "systemd's file descriptor store gave back {} guest(s)",
                restored.len()
            );
        }
        (store, restored, shared)
    }
}

/// The record's state with descriptors as indices into the returned list,
/// their ids alongside. Parts whose descriptors the store lost (systemd
/// drops a connection the peer closed) are left out.
fn rebuild(
    name: &str,
    record: Record,
    files: &BTreeMap<u32, OwnedFd>,
) -> (GuestState, Vec<OwnedFd>, Vec<u32>) {
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let take = |position: RawFd, fds: &mut Vec<OwnedFd>, ids: &mut Vec<u32>| {
        let id = *usize::try_from(position)
            .ok()
            .and_then(|p| record.ids.get(p))?;
        fds.push(files.get(&id)?.try_clone().ok()?);
        ids.push(id);
        Some((fds.len() - 1) as RawFd)
    };
    let mut state = record.state;
    state.listener = state.listener.and_then(|fd| take(fd, &mut fds, &mut ids));
    state.connection = state.connection.and_then(|mut connection| {
        let before = fds.len();
        let socket = take(connection.socket, &mut fds, &mut ids);
        let taken: Option<Vec<RawFd>> = connection
            .fds
            .iter()
            .map(|&fd| take(fd, &mut fds, &mut ids))
            .collect();
        match (socket, taken) {
            (Some(socket), Some(taken)) => {
                connection.socket = socket;
                connection.fds = taken;
                Some(connection)
            }
            _ => {
                warn!("guest {name}: its VMM connection is no longer in systemd's store");
                fds.truncate(before);
                ids.truncate(before);
                None
            }
        }
    });
    state.clients = state
        .clients
        .iter()
        .filter_map(|&fd| take(fd, &mut fds, &mut ids))
        .collect();
    // Tokens reported before the restart may have been spent since.
    state.tokens = None;
    (state, fds, ids)
}

fn read_record(fd: OwnedFd) -> Result<Record, String> {
    let mut file = std::fs::File::from(fd);
    // The position is shared with systemd's copy: an earlier start that
    // read this record left it at the end.
    file.rewind().map_err(|e| e.to_string())?;
    let mut json = Vec::new();
    file.read_to_end(&mut json).map_err(|e| e.to_string())?;
    upgrade::parse_versioned(&json).map_err(|e| e.to_string())
}

enum Entry {
    File(u32),
    State(u64),
}

fn shared_name(key: &str) -> String {
    format!("{SHARED_PREFIX}{}", key.replace(':', "|"))
}

fn file_name(guest: &str, id: u32) -> String {
    format!("{PREFIX}{guest}.{id}")
}

fn state_name(guest: &str, generation: u64) -> String {
    format!("{PREFIX}{guest}.{STATE}{generation}")
}

/// `guest.<name>.<id>` or `guest.<name>.state<generation>` (guest names
/// may hold dots, ids and generations do not).
/// Whether `fd_name` is one the store uses (`guest.<name>.<id>`,
/// `guest.<name>.state<generation>`, `shared.<key>`).
pub fn is_store_name(fd_name: &str) -> bool {
    parse_name(fd_name).is_some() || fd_name.starts_with(SHARED_PREFIX)
}

fn parse_name(fd_name: &str) -> Option<(&str, Entry)> {
    let (guest, tail) = fd_name.strip_prefix(PREFIX)?.rsplit_once('.')?;
    if guest.is_empty() {
        return None;
    }
    let entry = match tail.strip_prefix(STATE) {
        Some(generation) => Entry::State(generation.parse().ok().filter(|&g| g > 0)?),
        None => Entry::File(tail.parse().ok()?),
    };
    Some((guest, entry))
}

/// Never waits: the top process must go on reading the serving process's
/// reports. systemd reads its queue continuously (and raises its length,
/// `net.unix.max_dgram_qlen`, to 512); a full one is retried later.
fn store(notifier: &Notifier, name: &str, fd: RawFd) -> bool {
    notifier
        .send_now(&format!("FDSTORE=1\nFDNAME={name}"), &[fd])
        .map_err(|e| debug!("cannot keep {name} in systemd's file descriptor store yet: {e}"))
        .is_ok()
}

fn remove(notifier: &Notifier, name: &str) -> bool {
    notifier
        .send_now(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
        .map_err(|e| debug!("cannot remove {name} from systemd's file descriptor store yet: {e}"))
        .is_ok()
}

/// Whether two descriptors are the same open file, as systemd tells them
/// apart (it keeps one copy of each).
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    kcmp::same_file(a.as_fd(), b.as_fd())
}

fn same_file_checked(a: &OwnedFd, b: &OwnedFd) -> Option<bool> {
    kcmp::same_file_checked(a.as_fd(), b.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_guest_and_what_the_descriptor_is() {
        assert!(matches!(
            parse_name("guest.vm-1.2.state7"),
            Some(("vm-1.2", Entry::State(7)))
        ));
        assert!(matches!(
            parse_name("guest.a.b.12"),
            Some(("a.b", Entry::File(12)))
        ));
        assert_eq!(file_name("vm.1", 3), "guest.vm.1.3");
        assert_eq!(state_name("vm.1", 3), "guest.vm.1.state3");
        for other in [
            "guest..3",
            "guest.vm.x",
            "guest.vm.state0",
            "guest.vm.state",
            "vm.3",
            "unknown",
            "guest.vm",
        ] {
            assert!(parse_name(other).is_none(), "{other}");
        }
    }

    use crate::frontend::vhost_user::snapshot::{ConnectionState, RingState};
    use crate::service::upgrade::Counters;
    use std::os::unix::net::UnixDatagram;

    /// systemd's side: every message sent so far, with its descriptors.
    fn drain(socket: &UnixDatagram) -> Vec<(String, Vec<OwnedFd>)> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut out = Vec::new();
        loop {
            let mut buf = [0u8; 512];
            let mut cmsg = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let Ok(message) = recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return out;
            };
            let mut fds = Vec::new();
            for control in message.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(raw) = control {
                    // SAFETY: installed for this process just now.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }),
                    );
                }
            }
            let bytes = message.bytes;
            out.push((String::from_utf8_lossy(&buf[..bytes]).into_owned(), fds));
        }
    }

    fn vmm_guest(memory_fds: usize) -> GuestState {
        GuestState {
            spec: "name=vm,socket=/run/vhost-rng/vm.sock".into(),
            runtime: false,
            activated: false,
            listener: Some(0),
            connection: Some(upgrade::ConnectionHandover {
                socket: 1,
                state: ConnectionState {
                    version: 1,
                    owner: true,
                    acked_features: 0,
                    acked_protocol_features: 0,
                    regions: Vec::new(),
                    ring: RingState {
                        size: 8,
                        desc: 0,
                        avail: 0,
                        used: 0,
                        ready: true,
                        enabled: true,
                        kick: Some(memory_fds),
                        call: None,
                        err: None,
                    },
                    answered: None,
                },
                fds: (2..2 + memory_fds as RawFd + 1).collect(),
            }),
            clients: Vec::new(),
            tokens: Some(5),
            counters: Counters::default(),
        }
    }

    #[test]
    fn each_file_is_stored_once_and_only_changes_are_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to_path(&path);
        let (listener, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let (connection, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let memory = nix::unistd::pipe().unwrap().0;
        let kick = nix::unistd::pipe().unwrap().0;
        // One memory file given twice (two regions of one memfd).
        let fds: Vec<OwnedFd> = vec![
            listener.into(),
            connection.into(),
            memory.try_clone().unwrap(),
            memory,
            kick,
        ];
        let mut store = FdStore::default();
        assert!(store.put(&notifier, "vm", None, &vmm_guest(2), &fds));
        let sent = drain(&systemd);
        let names: Vec<&str> = sent.iter().map(|(text, _)| text.as_str()).collect();
        assert_eq!(
            names,
            [
                "FDSTORE=1\nFDNAME=guest.vm.0",
                "FDSTORE=1\nFDNAME=guest.vm.1",
                "FDSTORE=1\nFDNAME=guest.vm.2",
                "FDSTORE=1\nFDNAME=guest.vm.3",
                "FDSTORE=1\nFDNAME=guest.vm.state1",
            ]
        );

        // The same files again (a later set-up message): only a new record,
        // then the old one goes.
        let again: Vec<OwnedFd> = fds.iter().map(|fd| fd.try_clone().unwrap()).collect();
        assert!(store.put(&notifier, "vm", Some(&fds), &vmm_guest(2), &again));
        let names: Vec<String> = drain(&systemd).into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            names,
            [
                "FDSTORE=1\nFDNAME=guest.vm.state2",
                "FDSTOREREMOVE=1\nFDNAME=guest.vm.state1",
            ]
        );

        // Given back on start: the guest as recorded, with the connection,
        // tokens dropped; with the connection lost (systemd drops a hung-up
        // socket), the guest without it.
        let record = |sent: &[(String, Vec<OwnedFd>)]| -> OwnedFd {
            sent.iter()
                .find(|(t, _)| t.ends_with("state1"))
                .map(|(_, f)| f[0].try_clone().unwrap())
                .unwrap()
        };
        let passed = |skip: Option<u32>| {
            let mut passed: Vec<(String, OwnedFd)> = (0..4u32)
                .filter(|&id| Some(id) != skip)
                .map(|id| {
                    let position = [0, 1, 2, 4][id as usize];
                    (file_name("vm", id), again[position].try_clone().unwrap())
                })
                .collect();
            passed.push(("guest.vm.state1".into(), record(&sent)));
            passed.push(("someone-else".into(), nix::unistd::pipe().unwrap().0));
            passed
        };
        let (_, restored, _) = FdStore::restore(&notifier, passed(None));
        let (name, state, fds) = &restored[0];
        assert_eq!(name, "vm");
        assert_eq!(fds.len(), 5);
        assert_eq!(state.tokens, None);
        let connection = state.connection.as_ref().unwrap();
        assert_eq!(connection.fds.len(), 3);
        assert!(same_file(
            &fds[connection.fds[0] as usize],
            &fds[connection.fds[1] as usize]
        ));
        let _ = drain(&systemd);
        let (_, restored, _) = FdStore::restore(&notifier, passed(Some(1)));
        let (_, state, fds) = &restored[0];
        assert!(state.connection.is_none());
        assert_eq!(state.listener, Some(0));
        assert_eq!(fds.len(), 1);
        // What no record uses any more is removed from the store.
        let names: Vec<String> = drain(&systemd).into_iter().map(|(t, _)| t).collect();
        assert!(
            names.contains(&"FDSTOREREMOVE=1\nFDNAME=guest.vm.2".to_owned()),
            "{names:?}"
        );
    }
}
