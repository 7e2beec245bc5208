//! Handing entropy to the guest kernel: the RNDADDENTROPY and RNDRESEEDCRNG
//! ioctls on /dev/random, behind a trait so tests can see what would be
//! injected without root or a kernel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

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

// The Linux ioctl number encoding (include/uapi/asm-generic/ioctl.h):
// direction, argument size, type and number packed into 32 bits. A few
// architectures use other direction values and a 13-bit size field.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc {
    pub const NONE: u32 = 1;
    pub const WRITE: u32 = 4;
    pub const SIZE_BITS: u32 = 13;
}
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc {
    pub const NONE: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const SIZE_BITS: u32 = 14;
}

/// `_IOC(dir, type, nr, size)`.
const fn ioctl_number(direction: u32, kind: u8, number: u8, size: usize) -> u32 {
    const NUMBER_SHIFT: u32 = 0;
    const TYPE_SHIFT: u32 = 8;
    const SIZE_SHIFT: u32 = 16;
    const DIRECTION_SHIFT: u32 = SIZE_SHIFT + ioc::SIZE_BITS;
    assert!(size < (1 << ioc::SIZE_BITS), "ioctl argument too large");
    (direction << DIRECTION_SHIFT)
        | ((size as u32) << SIZE_SHIFT)
        | ((kind as u32) << TYPE_SHIFT)
        | ((number as u32) << NUMBER_SHIFT)
}

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit entropy.
/// The argument is `struct rand_pool_info { int entropy_count; int
/// buf_size; __u32 buf[]; }`, the count in bits.
pub const RNDADDENTROPY: u32 = ioctl_number(ioc::WRITE, b'R', 0x03, 2 * size_of::<libc::c_int>());
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now (Linux 4.17+).
pub const RNDRESEEDCRNG: u32 = ioctl_number(ioc::NONE, b'R', 0x07, 0);

/// The real kernel interface: /dev/random, opened for writing. Both ioctls
/// need CAP_SYS_ADMIN.
#[derive(Debug)]
pub struct DevRandom {
    file: File,
}

impl DevRandom {
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
        // ints and then buf_size bytes, with no alignment requirement.
        let mut info = Vec::with_capacity(2 * size_of::<libc::c_int>() + bytes.len());
        info.extend_from_slice(&entropy_count.to_ne_bytes());
        info.extend_from_slice(&buf_size.to_ne_bytes());
        info.extend_from_slice(bytes);
        // SAFETY: the fd is open for the life of `self.file`; `info` holds a
        // complete rand_pool_info of buf_size bytes, which the kernel only
        // reads, and outlives the call.
        let result =
            unsafe { libc::ioctl(self.file.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
        // The buffer held what is about to seed the guest's CRNG; do not
        // leave a copy of it behind in freed memory.
        info.fill(0);
        std::hint::black_box(&info);
        match Errno::result(result) {
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
        let result = unsafe { libc::ioctl(self.file.as_raw_fd(), RNDRESEEDCRNG as _, 0) };
        match Errno::result(result) {
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
    fn ioctl_numbers_encode_type_number_and_size() {
        assert_eq!(RNDADDENTROPY & 0xff, 0x03);
        assert_eq!((RNDADDENTROPY >> 8) & 0xff, u32::from(b'R'));
        assert_eq!((RNDADDENTROPY >> 16) & ((1 << ioc::SIZE_BITS) - 1), 8);
        assert_eq!(RNDADDENTROPY >> (16 + ioc::SIZE_BITS), ioc::WRITE);
        assert_eq!(RNDRESEEDCRNG & 0xffff, 0x5207);
        assert_eq!(RNDRESEEDCRNG >> (16 + ioc::SIZE_BITS), ioc::NONE);
    }
}
