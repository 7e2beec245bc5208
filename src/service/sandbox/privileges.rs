// SPDX-License-Identifier: Apache-2.0
//! `--user USER[:GROUP]`: the serving process, started as root, does what
//! needs root and then becomes USER, with GROUP (or USER's primary group)
//! as its only group and no capabilities left in any set.

use nix::unistd::{Gid, Group, Uid, User};

/// Why `--user` cannot be honoured. Each message is meant for the
/// operator as it is.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `--user ""` or `--user :grp`.
    #[error("--user: empty user name in '{0}'")]
    Empty(String),
    /// No such user in the password database.
    #[error("--user: no user named '{0}' on this host (create it, e.g. useradd --system {0})")]
    UnknownUser(String),
    /// No such group in the group database.
    #[error("--user: no group named '{0}' on this host")]
    UnknownGroup(String),
    /// The user or group database could not be read.
    #[error("--user: cannot look up '{name}': {error}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// The error from the C library.
        #[source]
        error: nix::Error,
    },
    /// Root is what the given user is: nothing would be dropped.
    #[error("--user {0}: that is root; name an unprivileged user")]
    IsRoot(String),
    /// Not started as root, and not already that user.
    #[error(
        "--user {user}: the daemon runs as uid {uid}, and only root can become another user; \
         start it as root or drop --user"
    )]
    NotRoot {
        /// The `--user` value.
        user: String,
        /// The uid the daemon runs as.
        uid: u32,
    },
    /// A step of the drop failed.
    #[error("cannot drop privileges to {user}: {step} failed: {error}")]
    Drop {
        /// The `--user` value.
        user: String,
        /// setgroups, setresgid, setresuid, ...
        step: &'static str,
        /// The error from the kernel.
        #[source]
        error: nix::Error,
    },
    /// After the drop, root could be regained: refuse to serve.
    #[error("privileges were not dropped to {0}: root can still be regained")]
    NotDropped(String),
}

/// The user and group to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The `--user` value as given.
    pub spec: String,
    /// The user's id.
    pub uid: Uid,
    /// The group's id.
    pub gid: Gid,
}

impl RunAs {
    /// Resolves `USER[:GROUP]` (names or numbers) on this host.
    pub fn resolve(spec: &str) -> Result<RunAs, PrivilegeError> {
        let (user, group) = match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        };
        if user.is_empty() {
            return Err(PrivilegeError::Empty(spec.into()));
        }
        let lookup = |error| PrivilegeError::Lookup {
            name: user.into(),
            error,
        };
        let (uid, primary) = match User::from_name(user).map_err(lookup)? {
            Some(found) => (found.uid, Some(found.gid)),
            None => match user.parse::<u32>() {
                Ok(number) => {
                    let found = User::from_uid(Uid::from_raw(number)).map_err(lookup)?;
                    (Uid::from_raw(number), found.map(|u| u.gid))
                }
                Err(_) => return Err(PrivilegeError::UnknownUser(user.into())),
            },
        };
        let gid = match group.filter(|g| !g.is_empty()) {
            Some(group) => {
                let lookup = |error| PrivilegeError::Lookup {
                    name: group.into(),
                    error,
                };
                match Group::from_name(group).map_err(lookup)? {
                    Some(found) => found.gid,
                    None => group
                        .parse::<u32>()
                        .map(Gid::from_raw)
                        .map_err(|_| PrivilegeError::UnknownGroup(group.into()))?,
                }
            }
            // A uid with no passwd entry: its own number as the group.
            None => primary.unwrap_or_else(|| Gid::from_raw(uid.as_raw())),
        };
        if uid.is_root() {
            return Err(PrivilegeError::IsRoot(spec.into()));
        }
        let current = Uid::current();
        if !current.is_root() && current != uid {
            return Err(PrivilegeError::NotRoot {
                user: spec.into(),
                uid: current.as_raw(),
            });
        }
        Ok(RunAs {
            spec: spec.into(),
            uid,
            gid,
        })
    }

    /// "vhost-rng (uid 998, gid 998)".
    pub fn describe(&self) -> String {
        format!(
            "{} (uid {}, gid {})",
            self.spec,
            self.uid.as_raw(),
            self.gid.as_raw()
        )
    }

    /// Becomes this user for good, in every thread of the process: no
    /// supplementary groups, real, effective and saved ids all changed,
    /// which empties the permitted, effective and ambient capability sets
    /// (the inheritable set was emptied at start, see
    /// [`clear_inheritable_capabilities`]). Checks that root cannot be
    /// regained.
    pub fn drop_privileges(&self) -> Result<(), PrivilegeError> {
        let step = |step: &'static str| {
            move |error| PrivilegeError::Drop {
                user: self.spec.clone(),
                step,
                error,
            }
        };
        if Uid::current() == self.uid && !Uid::effective().is_root() {
            // Already this user (started as it): nothing to give up.
            return Ok(());
        }
        // glibc applies each of these to every thread of the process.
        nix::unistd::setgroups(&[]).map_err(step("setgroups"))?;
        nix::unistd::setresgid(self.gid, self.gid, self.gid).map_err(step("setresgid"))?;
        nix::unistd::setresuid(self.uid, self.uid, self.uid).map_err(step("setresuid"))?;
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok()
            || nix::unistd::setgid(Gid::from_raw(0)).is_ok()
        {
            return Err(PrivilegeError::NotDropped(self.spec.clone()));
        }
        // A change of credentials clears the parent-death signal: set it
        // again, so that the serving process still goes with the top one.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
        Ok(())
    }
}

/// Empties the inheritable and ambient capability sets and the bounding
/// set of this thread (call before any other thread starts, so that all
/// inherit it): with the uid change later emptying the permitted and
/// effective sets, every set ends empty. The capabilities the set-up uses
/// stay effective until then: the bounding set only limits what could be
/// gained later (nothing: the serving process executes nothing).
pub fn clear_inheritable_capabilities() {
    // Up to the first capability this kernel does not know (EINVAL); EPERM
    // without CAP_SETPCAP (not root), where there is nothing to drop.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    let Some((mut header, mut data)) = capget() else {
        return;
    };
    if data.iter().all(|d| d.inheritable == 0) {
        return;
    }
    for d in &mut data {
        d.inheritable = 0;
    }
    // SAFETY: capset with the header and data capget filled in, only the
    // inheritable set lowered (always allowed).
    let set = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if set != 0 {
        log::warn!(
            "cannot empty the inheritable capability set: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The capabilities the top process keeps, and why: every serving process
/// it starts (the first, and one after each crash) does the root set-up
/// as its child and can only have what the top process has. (Numbers from
/// linux/capability.h.)
pub const TOP_CAPABILITIES: [(u32, &str); 9] = [
    (0, "CAP_CHOWN: give socket files and FIFOs --socket-group"),
    (
        1,
        "CAP_DAC_OVERRIDE: make sockets in directories root does not own (libvirt's)",
    ),
    (
        2,
        "CAP_DAC_READ_SEARCH: read /dev/hwrng and key files whatever their mode",
    ),
    (
        3,
        "CAP_FOWNER: remove stale socket files in sticky directories",
    ),
    (
        5,
        "CAP_KILL: signal the serving process, which runs as another user",
    ),
    (
        6,
        "CAP_SETGID: the serving process's setgroups and setresgid",
    ),
    (7, "CAP_SETUID: the serving process's setresuid"),
    (
        8,
        "CAP_SETPCAP: the serving process empties its bounding set",
    ),
    (
        10,
        "CAP_NET_BIND_SERVICE: --metrics or --listen-tcp on a port below 1024",
    ),
];

/// The top process lets go of every capability but [`TOP_CAPABILITIES`]:
/// from the bounding set (so nothing it executes gains more) and from its
/// permitted and effective sets. Does nothing when not started as root.
pub fn narrow_top_capabilities() {
    let keep: u64 = TOP_CAPABILITIES
        .iter()
        .fold(0, |mask, (cap, _)| mask | 1 << cap);
    // Up to the first capability this kernel does not know (EINVAL); EPERM
    // without CAP_SETPCAP, where there is nothing to drop.
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            break;
        }
    }
    let Some((mut header, mut data)) = capget() else {
        return;
    };
    for (i, d) in data.iter_mut().enumerate() {
        let keep = (keep >> (32 * i)) as u32;
        d.effective &= keep;
        d.permitted &= keep;
        d.inheritable = 0;
    }
    // SAFETY: capset with the header and data capget filled in, every set
    // only lowered (always allowed).
    let set = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if set != 0 {
        log::warn!(
            "cannot narrow the top process's capabilities: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's capability sets (version 3: two words each).
fn capget() -> Option<(Header, [Data; 2])> {
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version 3 header and room for its two data
    // structures, both valid for the call.
    let got = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    (got == 0).then_some((header, data))
}

/// Started as root without `--user`: says exactly what that exposes.
pub fn warn_running_as_root() {
    log::warn!(
        "running as root without --user: the serving process, which maps every guest's memory \
         and parses what guests, VMMs and network peers send, keeps uid 0 and every \
         capability: only its seccomp filter and Landlock stand between a bug reachable from \
         one guest and root on this host (every other guest's memory included); start with \
         --user USER (e.g. --user vhost-rng) so that it runs unprivileged after set-up"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_are_resolved_by_name_or_number() {
        assert!(matches!(RunAs::resolve(""), Err(PrivilegeError::Empty(_))));
        assert!(matches!(
            RunAs::resolve(":x"),
            Err(PrivilegeError::Empty(_))
        ));
        let err = RunAs::resolve("no-such-user-vhost-rng").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--user: no user named 'no-such-user-vhost-rng' on this host (create it, e.g. \
             useradd --system no-such-user-vhost-rng)"
        );
        assert!(matches!(
            RunAs::resolve("root"),
            Err(PrivilegeError::IsRoot(_))
        ));
        assert!(matches!(
            RunAs::resolve("0"),
            Err(PrivilegeError::IsRoot(_))
        ));
        if !Uid::current().is_root() {
            return;
        }
        let Ok(Some(nobody)) = User::from_name("nobody") else {
            return;
        };
        let by_name = RunAs::resolve("nobody").unwrap();
        assert_eq!((by_name.uid, by_name.gid), (nobody.uid, nobody.gid));
        let by_number = RunAs::resolve(&nobody.uid.to_string()).unwrap();
        assert_eq!((by_number.uid, by_number.gid), (nobody.uid, nobody.gid));
        let with_group = RunAs::resolve("nobody:0").unwrap();
        assert_eq!(with_group.gid, Gid::from_raw(0));
        assert!(matches!(
            RunAs::resolve("nobody:no-such-group-vhost-rng"),
            Err(PrivilegeError::UnknownGroup(_))
        ));
        // A uid with no passwd entry is its own group.
        let unnamed = RunAs::resolve("4000000").unwrap();
        assert_eq!(unnamed.gid, Gid::from_raw(4_000_000));
    }
}
