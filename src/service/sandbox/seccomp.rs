// SPDX-License-Identifier: Apache-2.0
//! System-call allow-lists (seccompiler), one per process role, and
//! narrower ones per thread role.
//!
//! - [`Role::Top`]: the top process. Its filter is inherited by every
//!   serving process it starts, which does its root set-up (binding
//!   sockets, Landlock, the privilege drop) under it, so it is the union of
//!   what the top process needs (fork, execve, wait4, signalfd) and what
//!   that set-up needs (setresuid, capset, landlock_*, any ioctl).
//! - [`Role::Worker`]: the serving process after set-up. No execve, no
//!   fork (threads only), no setuid family, no capset, no ptrace or
//!   process_vm_*, no mount or namespaces, no kexec or modules, no bpf,
//!   ioctl only for descriptor flags and terminal queries, kill and tgkill
//!   only to itself, prctl only to name threads and add filters. What stays
//!   is what serving needs: memory (guest memory is mapped at runtime),
//!   sockets (guests added at runtime listen or dial), files (a reload
//!   reads the config file and keys; a device source reopens after an
//!   error; `mknodat` only for FIFOs, for `fifo=` guests).
//! - [`ThreadRole`]s add a deny-list on top of the worker's for the threads
//!   that read guest, VMM or network input: no opening, creating, renaming
//!   or re-owning files, and no new sockets unless the thread dials.
//!
//! Every daemon process thus shows `NoNewPrivs: 1` and `Seccomp: 2`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SeccompMode;

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter did not compile (a bug in the lists).
    #[error("cannot build the {role} seccomp filter: {error}")]
    Build {
        /// Which filter.
        role: &'static str,
        /// What seccompiler said.
        #[source]
        error: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {role} seccomp filter: {error}")]
    Install {
        /// Which filter.
        role: &'static str,
        /// What seccompiler said.
        #[source]
        error: seccompiler::Error,
    },
}

/// A process's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The top process (`vhost-rng serve` as started).
    Top,
    /// The serving process after its set-up.
    Worker,
    /// A guest process of `--isolation guest` after its set-up: the
    /// serving process's list without what only guests added, removed or
    /// reloaded need (binding, listening, making or removing files).
    GuestProcess,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Top => "top-process",
            Role::Worker => "serving-process",
            Role::GuestProcess => "guest-process",
        }
    }
}

/// A thread's role in the serving process, for its extra filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// A vhost-user event loop: reads VMM messages and guest memory;
    /// `dials` for the loop that connects to VMMs (`connect=` guests).
    Vring {
        /// It opens connections itself.
        dials: bool,
    },
    /// A thread reading from network peers or local clients: EGD,
    /// channels, the agent over vsock or TCP, the metrics endpoint.
    Peer,
    /// An entropy source's reader.
    Source,
}

impl ThreadRole {
    fn name(self) -> &'static str {
        match self {
            ThreadRole::Vring { .. } => "vring-thread",
            ThreadRole::Peer => "peer-thread",
            ThreadRole::Source => "source-thread",
        }
    }
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;
#[cfg(target_arch = "riscv64")]
const ARCH: TargetArch = TargetArch::riscv64;

/// Calls every Rust thread of the daemon makes: memory, descriptors,
/// threads and their synchronisation, signals, time, randomness, polling.
const BASE: &[i64] = &[
    // Memory: the allocator, thread stacks, guest memory tables
    // (MADV_DONTDUMP on guest mappings).
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Descriptors.
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    // Waiting for descriptors.
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // Threads.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    // Signals (blocked and waited for; SIGPIPE ignored; thread stacks).
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    // Time.
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // Randomness (the os source, DRBG reseeds, Noise).
    libc::SYS_getrandom,
    // Sockets: VMM connections and descriptors passed with them, the
    // control and metrics endpoints, guests added at runtime, the reports
    // to the top process.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Files: socket files of guests added or removed at runtime (private
    // directory, chmod/chown, rename into place), reloads reading the
    // config file and keys, device sources reopened after errors.
    libc::SYS_openat,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_fchmod,
    libc::SYS_fchown,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    // Identity (the default control path depends on being root).
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    // Adding a thread's own filter.
    libc::SYS_seccomp,
];

/// The same calls under their older x86_64 names, which glibc and std
/// still use there.
#[cfg(target_arch = "x86_64")]
const BASE_X86_64: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_epoll_wait,
    libc::SYS_dup2,
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_chmod,
    libc::SYS_pipe,
    libc::SYS_access,
];
#[cfg(not(target_arch = "x86_64"))]
const BASE_X86_64: &[i64] = &[];

/// What the top process adds: starting, waiting for and signalling the
/// serving process, executing itself for an upgrade, and everything the
/// serving process's set-up does under this filter (it inherits it):
/// dropping privileges, Landlock, process start-up in the dynamic loader.
const TOP_ONLY: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_signalfd4,
    libc::SYS_prctl,
    libc::SYS_ioctl,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_umask,
    libc::SYS_set_tid_address,
    libc::SYS_prlimit64,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_uname,
    libc::SYS_getcwd,
    libc::SYS_getgroups,
    libc::SYS_setgroups,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setscheduler,
    libc::SYS_statfs,
    libc::SYS_mknodat,
    // systemd's file descriptor store: is this file one it holds already?
    libc::SYS_kcmp,
];
#[cfg(target_arch = "x86_64")]
const TOP_ONLY_X86_64: &[i64] = &[libc::SYS_arch_prctl, libc::SYS_vfork, libc::SYS_getpgrp];
#[cfg(not(target_arch = "x86_64"))]
const TOP_ONLY_X86_64: &[i64] = &[];

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(|error| {
        SeccompError::Build {
            role: "argument",
            error,
        }
    })
}

/// One rule per allowed value of argument `arg`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|&value| {
            SeccompRule::new(vec![condition(arg, SeccompCmpOp::Eq, value)?]).map_err(|error| {
                SeccompError::Build {
                    role: "argument",
                    error,
                }
            })
        })
        .collect()
}

/// What a guest process may not call that the serving process may: it
/// serves one guest whose socket the serving process made, and never makes,
/// binds, renames or removes anything.
const GUEST_PROCESS_REMOVED: &[i64] = &[
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_socketpair,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_fchmod,
    libc::SYS_fchown,
];
#[cfg(target_arch = "x86_64")]
const GUEST_PROCESS_REMOVED_X86_64: &[i64] = &[
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_mkdir,
    libc::SYS_chmod,
];
#[cfg(not(target_arch = "x86_64"))]
const GUEST_PROCESS_REMOVED_X86_64: &[i64] = &[];

/// The allow-list of `role`, with argument conditions where they matter.
// The ioctl request constants are u64 with glibc and i32 with musl.
#[allow(clippy::unnecessary_cast)]
fn allowed(role: Role) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BASE
        .iter()
        .chain(BASE_X86_64)
        .map(|&call| (call, Vec::new()))
        .collect();
    match role {
        Role::Top => {
            for &call in TOP_ONLY.iter().chain(TOP_ONLY_X86_64) {
                rules.insert(call, Vec::new());
            }
        }
        Role::Worker | Role::GuestProcess => {
            let pid = u64::from(std::process::id());
            // FIFOs (`fifo=` guests), and no other special file.
            rules.insert(
                libc::SYS_mknodat,
                vec![
                    SeccompRule::new(vec![condition(
                        2,
                        SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT)),
                        u64::from(libc::S_IFIFO),
                    )?])
                    .map_err(|error| SeccompError::Build {
                        role: "argument",
                        error,
                    })?,
                ],
            );
            // Whether two descriptors are one file (KCMP_FILE), in this
            // process only: a VMM repeating a message with the same files.
            rules.insert(
                libc::SYS_kcmp,
                vec![
                    SeccompRule::new(vec![
                        condition(0, SeccompCmpOp::Eq, pid)?,
                        condition(1, SeccompCmpOp::Eq, pid)?,
                        condition(2, SeccompCmpOp::Eq, 0)?,
                    ])
                    .map_err(|error| SeccompError::Build {
                        role: "argument",
                        error,
                    })?,
                ],
            );
            // Signals to itself only: the control socket's upgrade request
            // (SIGUSR2), abort() on a panic in a thread that must not unwind.
            rules.insert(libc::SYS_kill, any_of(0, &[pid])?);
            rules.insert(libc::SYS_tgkill, any_of(0, &[pid])?);
            // Naming threads, and adding a thread's filter.
            rules.insert(
                libc::SYS_prctl,
                any_of(
                    0,
                    &[
                        libc::PR_SET_NAME as u64,
                        libc::PR_GET_NAME as u64,
                        libc::PR_SET_NO_NEW_PRIVS as u64,
                        libc::PR_GET_NO_NEW_PRIVS as u64,
                    ],
                )?,
            );
            // Non-blocking and close-on-exec flags, and whether stderr is
            // a terminal (log colours).
            rules.insert(
                libc::SYS_ioctl,
                any_of(
                    1,
                    &[
                        libc::FIONBIO as u64,
                        libc::FIOCLEX as u64,
                        libc::FIONCLEX as u64,
                        libc::FIONREAD as u64,
                        libc::TIOCOUTQ as u64,
                        libc::TCGETS as u64,
                        libc::TIOCGWINSZ as u64,
                    ],
                )?,
            );
        }
    }
    if role == Role::GuestProcess {
        for call in GUEST_PROCESS_REMOVED
            .iter()
            .chain(GUEST_PROCESS_REMOVED_X86_64)
        {
            rules.remove(call);
        }
    }
    Ok(rules)
}

/// Calls that fail with EACCES in a thread of `role` rather than kill it:
/// opening files. glibc's allocator probes /proc and /sys from any thread
/// (the CPU count for a new arena, overcommit_memory) and copes with a
/// refusal.
fn refused_with_eacces(role: ThreadRole) -> Vec<i64> {
    match role {
        ThreadRole::Source => Vec::new(),
        ThreadRole::Vring { .. } | ThreadRole::Peer => {
            let mut calls = vec![libc::SYS_openat];
            #[cfg(target_arch = "x86_64")]
            calls.push(libc::SYS_open);
            calls
        }
    }
}

/// What a thread of `role` may not call on top of the worker's list.
fn denied(role: ThreadRole) -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_fchmod,
        libc::SYS_fchown,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_socketpair,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_mkdir, libc::SYS_rename, libc::SYS_chmod]);
    match role {
        ThreadRole::Vring { dials: true } => {}
        ThreadRole::Vring { dials: false } | ThreadRole::Peer => {
            calls.extend([libc::SYS_socket, libc::SYS_connect]);
        }
        ThreadRole::Source => {
            // Reopens its device after an error: openat stays.
            calls.extend([
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_accept,
                libc::SYS_accept4,
                libc::SYS_sendmsg,
                libc::SYS_sendto,
                libc::SYS_recvmsg,
                libc::SYS_recvfrom,
            ]);
        }
    }
    calls
}

fn compile(
    role: &'static str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, ARCH)
        .map_err(|error| SeccompError::Build { role, error })?;
    BpfProgram::try_from(filter).map_err(|error| SeccompError::Build { role, error })
}

fn refused(mode: SeccompMode) -> Option<SeccompAction> {
    match mode {
        SeccompMode::Kill => Some(SeccompAction::KillProcess),
        SeccompMode::Log => Some(SeccompAction::Log),
        SeccompMode::None => None,
    }
}

/// The compiled filter of a process role (none for `--seccomp none`).
pub fn process_filter(role: Role, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let Some(refuse) = refused(mode) else {
        return Ok(None);
    };
    compile(role.name(), allowed(role)?, refuse, SeccompAction::Allow).map(Some)
}

/// Installs `role`'s filter on every thread of this process (and sets
/// no_new_privs). With `--seccomp none`, only no_new_privs.
pub fn install_process(role: Role, mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(filter) = process_filter(role, mode)? else {
        set_no_new_privs();
        return Ok(());
    };
    seccompiler::apply_filter_all_threads(&filter).map_err(|error| SeccompError::Install {
        role: role.name(),
        error,
    })
}

/// Adds `role`'s deny-lists to the calling thread.
pub fn install_thread(role: ThreadRole, mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(refuse) = refused(mode) else {
        return Ok(());
    };
    let eacces = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Errno(libc::EACCES as u32),
    };
    for (calls, action) in [(denied(role), refuse), (refused_with_eacces(role), eacces)] {
        if calls.is_empty() {
            continue;
        }
        let rules = calls.into_iter().map(|call| (call, Vec::new())).collect();
        let filter = compile(role.name(), rules, SeccompAction::Allow, action)?;
        seccompiler::apply_filter(&filter).map_err(|error| SeccompError::Install {
            role: role.name(),
            error,
        })?;
    }
    Ok(())
}

/// Whether this process already runs under a filter (an upgraded top
/// process keeps the one its first image installed).
pub fn already_filtered() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) == 2 }
}

/// `PR_SET_NO_NEW_PRIVS`: nothing this process executes gains privileges.
pub fn set_no_new_privs() {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        log::warn!(
            "cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A call in no list, for the test that proves the filter works: the
/// query form of personality(2), harmless where it is allowed.
pub fn forbidden_call() -> i64 {
    // SAFETY: personality(0xffffffff) only reads the persona.
    unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_in_every_mode() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            for role in [Role::Top, Role::Worker, Role::GuestProcess] {
                assert!(process_filter(role, mode).unwrap().is_some());
            }
        }
        assert!(
            process_filter(Role::Worker, SeccompMode::None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_worker_cannot_execute_or_change_identity() {
        let worker = allowed(Role::Worker).unwrap();
        for call in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_setresuid,
            libc::SYS_setuid,
            libc::SYS_capset,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_personality,
            libc::SYS_wait4,
        ] {
            assert!(!worker.contains_key(&call), "{call}");
        }
        let top = allowed(Role::Top).unwrap();
        assert!(top.contains_key(&libc::SYS_execve));
        assert!(!top.contains_key(&libc::SYS_personality));
        assert!(!top.contains_key(&libc::SYS_ptrace));
    }

    #[test]
    fn a_guest_process_cannot_make_or_remove_files_or_listen() {
        let guest = allowed(Role::GuestProcess).unwrap();
        let worker = allowed(Role::Worker).unwrap();
        for call in [
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_unlinkat,
            libc::SYS_mknodat,
            libc::SYS_execve,
        ] {
            assert!(!guest.contains_key(&call), "{call}");
        }
        assert!(worker.contains_key(&libc::SYS_bind));
        assert!(guest.keys().all(|call| worker.contains_key(call)));
    }

    #[test]
    fn guest_threads_cannot_open_files_or_sockets() {
        let vring = denied(ThreadRole::Vring { dials: false });
        for call in [libc::SYS_mkdirat, libc::SYS_socket, libc::SYS_bind] {
            assert!(vring.contains(&call), "{call}");
        }
        assert!(
            refused_with_eacces(ThreadRole::Vring { dials: false }).contains(&libc::SYS_openat)
        );
        assert!(refused_with_eacces(ThreadRole::Peer).contains(&libc::SYS_openat));
        assert!(!denied(ThreadRole::Vring { dials: true }).contains(&libc::SYS_socket));
        assert!(!denied(ThreadRole::Source).contains(&libc::SYS_openat));
        assert!(refused_with_eacces(ThreadRole::Source).is_empty());
    }
}
