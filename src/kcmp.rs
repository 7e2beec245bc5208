// SPDX-License-Identifier: Apache-2.0
//! Whether two descriptors of this process are the same open file
//! (kcmp(2)): copies of one file passed around by SCM_RIGHTS, `dup` or
//! systemd's file descriptor store are told from other files that merely
//! look alike (eventfds all share one inode).

use std::os::fd::{AsRawFd, BorrowedFd};

/// Whether `a` and `b` are the same open file; false if the kernel cannot
/// say (no kcmp).
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    same_file_checked(a, b).unwrap_or(false)
}

/// [`same_file`], `None` if the kernel cannot say.
pub fn same_file_checked(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Option<bool> {
    /// `KCMP_FILE` from linux/kcmp.h.
    const KCMP_FILE: libc::c_int = 0;
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: kcmp only compares two descriptors of this process, both
    // open for the duration of the call (borrowed); it writes no memory.
    let result = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a.as_raw_fd() as libc::c_ulong,
            b.as_raw_fd() as libc::c_ulong,
        )
    };
    (result >= 0).then_some(result == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    #[test]
    fn the_same_open_file_is_told_from_another_one() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a, b): (OwnedFd, OwnedFd) = (a.into(), b.into());
        let copy = a.try_clone().unwrap();
        assert_eq!(same_file_checked(a.as_fd(), copy.as_fd()), Some(true));
        assert_eq!(same_file_checked(a.as_fd(), b.as_fd()), Some(false));
    }
}
