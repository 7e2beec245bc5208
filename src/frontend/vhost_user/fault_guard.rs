// SPDX-License-Identifier: Apache-2.0
//! Surviving a VMM that shrinks a guest-memory file under the daemon.
//!
//! Guest memory is a file the VMM shares (a memfd, or a file on tmpfs or
//! hugetlbfs). Sizes are checked when the memory table arrives
//! ([`super::memory`]), but nothing stops a VMM from `ftruncate`-ing an
//! unsealed file afterwards, and touching a page past the new end raises
//! SIGBUS, whose default action kills the daemon and every other guest's
//! service with it.
//!
//! So the threads that touch guest memory do it inside [`guarded`]. A SIGBUS
//! raised there is answered by mapping a private zero page over the faulting
//! page: the access completes harmlessly (reads see zeros, writes land
//! nowhere) and the fault is counted for the thread. The caller sees the
//! count and closes the connection whose memory it was. A SIGBUS anywhere
//! else is not ours: the default action is restored and the fault, repeated,
//! ends the process as it always would.

use std::cell::Cell;
use std::sync::Once;

use log::warn;

thread_local! {
    /// Nesting depth of [`guarded`] on this thread. Const-initialised and
    /// without a destructor, so the signal handler can read it without
    /// allocating or registering anything.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Guest-memory faults answered on this thread since it started.
    static FAULTS: Cell<u64> = const { Cell::new(0) };
}

static INSTALL: Once = Once::new();

/// Installs the SIGBUS handler, once per process.
pub fn install() {
    INSTALL.call_once(|| {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::SigAction(on_sigbus),
            nix::sys::signal::SaFlags::SA_SIGINFO | nix::sys::signal::SaFlags::SA_ONSTACK,
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: `on_sigbus` only touches const-initialised thread-locals
        // and makes async-signal-safe system calls (mmap, signal).
        if let Err(e) = unsafe { nix::sys::signal::sigaction(nix::sys::signal::SIGBUS, &action) } {
            warn!(
                "cannot install the SIGBUS handler ({e}): a VMM that truncates its guest \
                 memory file will crash the daemon"
            );
        }
    });
}

/// Runs `access` (which reads or writes guest memory) with faults on
/// truncated guest memory answered instead of fatal; returns its result and
/// how many such faults it raised.
pub fn guarded<T>(access: impl FnOnce() -> T) -> (T, u64) {
    struct Inside;
    impl Drop for Inside {
        fn drop(&mut self) {
            DEPTH.with(|depth| depth.set(depth.get() - 1));
        }
    }
    let before = FAULTS.with(Cell::get);
    DEPTH.with(|depth| depth.set(depth.get() + 1));
    let inside = Inside;
    let result = access();
    drop(inside);
    (result, FAULTS.with(Cell::get) - before)
}

/// Page sizes a guest mapping may use: base pages, then the huge page sizes
/// (a hugetlbfs mapping cannot be split at a smaller boundary).
const PAGE_SIZES: [usize; 3] = [4 << 10, 2 << 20, 1 << 30];

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let inside = DEPTH.with(Cell::get) > 0;
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler;
    // for SIGBUS `si_addr` is the faulting address.
    let address = unsafe { (*info).si_addr() } as usize;
    if inside && address != 0 && replace_page(address) {
        FAULTS.with(|faults| faults.set(faults.get() + 1));
        return;
    }
    // Not a guest-memory access: let the fault kill the process as it would
    // have without us.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Maps a private zero page over the page holding `address`.
fn replace_page(address: usize) -> bool {
    PAGE_SIZES.iter().any(|&size| {
        let start = address & !(size - 1);
        // SAFETY: MAP_FIXED over a page of a shared guest mapping that the
        // faulting thread is accessing: the mapping is ours (created by
        // vm-memory for this connection) and is unmapped as a whole when the
        // connection's memory is dropped, zero page included.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        mapped != libc::MAP_FAILED
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_truncated_mapping_reads_zeros_and_counts_the_fault() {
        install();
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let len = 8192;
        // SAFETY: a fresh shared mapping of our own file.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let second_page = (base as usize + 4096) as *mut u8;
        // SAFETY: inside the mapping, the file is still long enough.
        unsafe { second_page.write_volatile(7) };

        File::set_len(&file, 0).unwrap();
        let (read, faults) = guarded(|| {
            // SAFETY: inside the mapping; the page is now past the end of
            // the file, which is the fault under test.
            unsafe {
                second_page.write_volatile(9);
                second_page.read_volatile()
            }
        });
        assert_eq!(faults, 1, "the write past the end faulted once");
        assert_eq!(read, 9, "the access completed on the replacement page");

        let (_, faults) = guarded(|| ());
        assert_eq!(faults, 0);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(base, len) };
    }
}
