// SPDX-License-Identifier: Apache-2.0
//! Handing entropy to the guest kernel: the RNDADDENTROPY and RNDRESEEDCRNG
//! ioctls on /dev/random, behind a trait so tests can see what would be
//! injected without root or a kernel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use zeroize::Zeroizing;

use super::AgentError;

/// Where the agent adds entropy.
pub const DEV_RANDOM: &str = "/dev/random";

/// The guest kernel's entropy interface.
pub trait KernelEntropy {
    /// Mixes `bytes` into the kernel's input pool and credits `credit_bits`
    /// bits of entropy for them.
    fn add_entropy(&mut self, bytes: &[u8], credit_bits: u32) -> Result<(), AgentError>;
    /// Makes the kernel CRNG reseed from the input pool now rather than at
    /// its next scheduled reseed.
    fn reseed(&mut self) -> Result<(), AgentError>;
}

// The numbers come from nix's `_IOW`/`_IO` (request_code_*), which know
// each architecture's encoding; they are u32 here, as the kernel defines
// them, while nix's type for them varies with the C library.
/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit entropy.
/// The argument is `struct rand_pool_info { int entropy_count; int
/// buf_size; __u32 buf[]; }`, the count in bits.
pub const RNDADDENTROPY: u32 =
    nix::request_code_write!(b'R', 0x03, size_of::<[libc::c_int; 2]>()) as u32;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now (Linux 4.17+).
pub const RNDRESEEDCRNG: u32 = nix::request_code_none!(b'R', 0x07) as u32;

/// The calls, made with the numbers above (the `_bad` forms take a number
/// as it is) so that what the tests pin is what is called. RNDADDENTROPY's
/// argument goes as bytes: rand_pool_info ends in a variable-length array,
/// so no Rust type has its size, and it is built byte by byte.
mod ioctl {
    nix::ioctl_write_ptr_bad!(rnd_add_entropy, super::RNDADDENTROPY, u8);
    nix::ioctl_none_bad!(rnd_reseed_crng, super::RNDRESEEDCRNG);
}

/// The real kernel interface: /dev/random, opened for writing. Both ioctls
/// need CAP_SYS_ADMIN.
#[derive(Debug)]
pub struct DevRandom {
    file: File,
}

impl DevRandom {
    /// Opens /dev/random for writing; [`AgentError::OpenDevRandom`] if it
    /// cannot.
    pub fn open() -> Result<Self, AgentError> {
        let file = OpenOptions::new()
            .write(true)
            .open(DEV_RANDOM)
            .map_err(AgentError::OpenDevRandom)?;
        Ok(DevRandom { file })
    }

    /// Fails with [`AgentError::NotPermitted`] unless this process may add
    /// entropy, so the agent can say so at start-up instead of after its
    /// first request to the host. It adds nothing: an empty buffer with no
    /// credit.
    pub fn check_permission(&mut self) -> Result<(), AgentError> {
        self.add_entropy(&[], 0)
    }
}

impl KernelEntropy for DevRandom {
    fn add_entropy(&mut self, bytes: &[u8], credit_bits: u32) -> Result<(), AgentError> {
        let invalid = |what: &str| AgentError::Kernel {
            action: "add entropy",
            error: io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()),
        };
        let entropy_count = libc::c_int::try_from(credit_bits)
            .map_err(|_| invalid("credit too large for the kernel"))?;
        let buf_size = libc::c_int::try_from(bytes.len())
            .map_err(|_| invalid("too many bytes for one call"))?;
        // struct rand_pool_info, built byte by byte: the kernel reads the two
        // ints and then buf_size bytes, with no alignment requirement. It
        // holds what is about to seed the guest's CRNG, so it is wiped when
        // dropped rather than left behind in freed memory.
        let mut info = Zeroizing::new(Vec::with_capacity(
            2 * size_of::<libc::c_int>() + bytes.len(),
        ));
        info.extend_from_slice(&entropy_count.to_ne_bytes());
        info.extend_from_slice(&buf_size.to_ne_bytes());
        info.extend_from_slice(bytes);
        // SAFETY: the fd is open for the life of `self.file`; `info` holds a
        // complete rand_pool_info of buf_size bytes, which the kernel only
        // reads, and outlives the call.
        let result = unsafe { ioctl::rnd_add_entropy(self.file.as_raw_fd(), info.as_ptr()) };
        match result {
            Ok(_) => Ok(()),
            Err(Errno::EPERM) => Err(AgentError::NotPermitted),
            Err(errno) => Err(AgentError::Kernel {
                action: "add entropy",
                error: errno.into(),
            }),
        }
    }

    fn reseed(&mut self) -> Result<(), AgentError> {
        // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
        let result = unsafe { ioctl::rnd_reseed_crng(self.file.as_raw_fd()) };
        match result {
            Ok(_) => Ok(()),
            Err(Errno::EPERM) => Err(AgentError::NotPermitted),
            // Linux 5.18+ refuses to reseed a CRNG that was never seeded; it
            // seeds itself as soon as enough entropy is credited.
            Err(Errno::ENODATA) => Err(AgentError::CrngNotReady),
            // Kernels before 4.17 do not know this ioctl.
            Err(Errno::ENOTTY | Errno::EINVAL) => Err(AgentError::ReseedUnsupported),
            Err(errno) => Err(AgentError::Kernel {
                action: "reseed the CRNG",
                error: errno.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn ioctl_numbers_match_linux_headers_on_x86_64() {
        // From <linux/random.h> as compiled on x86_64.
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x0000_5207);
    }

    #[test]
    fn ioctl_numbers_encode_type_and_number() {
        // The same on every architecture; the direction and size bits are
        // nix's to place.
        assert_eq!(RNDADDENTROPY & 0xffff, 0x5203);
        assert_eq!(RNDRESEEDCRNG & 0xffff, 0x5207);
    }
}
