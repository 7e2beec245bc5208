// SPDX-License-Identifier: Apache-2.0
//! The kernel's CPU-jitter noise source (`jitterentropy_rng`) read through
//! the kernel crypto API's user-space interface, AF_ALG.
//!
//! The kernel measures the execution time of a memory-bound loop with a
//! high-resolution timer and collects the variations; it runs its own
//! SP 800-90B health tests on those timings and conditions them (SHA-3)
//! before handing anything out. Reading it takes three calls:
//! `socket(AF_ALG, SOCK_SEQPACKET)`, `bind` to type `rng`, name
//! `jitterentropy_rng` (which instantiates the generator and runs the
//! kernel's start-up test), then `accept` for a descriptor that `read(2)`
//! draws from, at most [`MAX_READ`] bytes a call. No library is needed
//! beyond the C library's socket calls.
//!
//! A read error (the kernel reports its own health-test failures that way)
//! drops both descriptors; the next read binds anew, which gives a fresh
//! instance that must pass the kernel's start-up test again. Under the
//! serving process's sandbox a source thread may not create, bind or
//! accept sockets (its seccomp filter), so there the instance opened at
//! start is kept and read again after the backoff; a fresh one comes with
//! the next serving process (a restart or `vhost-rng upgrade`).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, AlgAddr, SockFlag, SockType};

use super::{RawSource, SourceError};

/// The algorithm type and name bound to.
pub const ALG_TYPE: &str = "rng";
/// The kernel's name for the jitter RNG (in /proc/crypto).
pub const ALG_NAME: &str = "jitterentropy_rng";
/// The name the source goes by in logs, status and metrics.
pub const NAME: &str = "jitter";

/// The kernel's AF_ALG rng interface answers at most 128 bytes per
/// receive (`MAXSIZE` in crypto/algif_rng.c); asking for more only returns
/// 128.
pub const MAX_READ: usize = 128;

/// Reads `jitterentropy_rng` through AF_ALG; opened on first read, opened
/// anew after an error.
#[derive(Debug, Default)]
pub struct JitterSource {
    /// The bound algorithm socket and the operation socket accepted from
    /// it, once opened. The first must stay open while the second is read.
    open: Option<(OwnedFd, std::fs::File)>,
}

impl JitterSource {
    /// Checks that the kernel offers the jitter RNG (binding instantiates
    /// it and runs its start-up test) and returns a source ready to read.
    pub fn detect() -> Result<Self, SourceError> {
        let mut source = JitterSource::default();
        source.open()?;
        Ok(source)
    }

    fn open(&mut self) -> Result<&mut std::fs::File, SourceError> {
        if self.open.is_none() {
            self.open = Some(open_alg().map_err(|reason| SourceError::Unavailable {
                source_name: NAME.into(),
                reason,
            })?);
        }
        match self.open.as_mut() {
            Some((_, op)) => Ok(op),
            // Just set if it was empty.
            None => unreachable!(),
        }
    }
}

/// socket + bind + accept; an operator-readable reason on failure.
fn open_alg() -> Result<(OwnedFd, std::fs::File), String> {
    let tfm = socket::socket(
        AddressFamily::Alg,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| match e {
        nix::errno::Errno::EAFNOSUPPORT => "the kernel has no AF_ALG sockets \
             (CONFIG_CRYPTO_USER_API_RNG is off, or a seccomp filter forbids them)"
            .to_string(),
        e => format!("cannot create an AF_ALG socket: {e}"),
    })?;
    let address = AlgAddr::new(ALG_TYPE, ALG_NAME);
    socket::bind(tfm.as_raw_fd(), &address).map_err(|e| match e {
        nix::errno::Errno::ENOENT => format!(
            "the kernel offers no {ALG_NAME} (CONFIG_CRYPTO_JITTERENTROPY, module \
             jitterentropy_rng; see /proc/crypto), or no AF_ALG rng interface \
             (module algif_rng)"
        ),
        e => format!("cannot bind to {ALG_TYPE}/{ALG_NAME}: {e}"),
    })?;
    let op = socket::accept4(tfm.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
        .map_err(|e| format!("cannot open a {ALG_NAME} instance: {e}"))?;
    // SAFETY: accept4 just returned this descriptor and nothing else owns
    // it.
    let op = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(op) };
    Ok((tfm, std::fs::File::from(op)))
}

impl RawSource for JitterSource {
    fn name(&self) -> &str {
        NAME
    }

    /// Timing noise of this CPU, gathered and conditioned in the kernel:
    /// not a hardware RNG device, and reported as not hardware.
    fn is_hardware(&self) -> bool {
        false
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, SourceError> {
        let limit = buf.len().min(MAX_READ);
        let op = self.open()?;
        loop {
            match op.read(&mut buf[..limit]) {
                Ok(0) => {
                    self.drop_instance();
                    return Err(SourceError::Read {
                        source_name: NAME.into(),
                        error: std::io::Error::other("the kernel returned no bytes"),
                    });
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.drop_instance();
                    return Err(SourceError::Read {
                        source_name: NAME.into(),
                        error,
                    });
                }
            }
        }
    }

    fn recover(&mut self) -> Result<(), SourceError> {
        self.drop_instance();
        Ok(())
    }
}

impl JitterSource {
    /// Forgets the instance so that the next read opens a new one, unless
    /// this thread runs under a seccomp filter (the sandbox), which forbids
    /// a source thread the socket calls that takes.
    fn drop_instance(&mut self) {
        if !crate::service::sandbox::seccomp::already_filtered() {
            self.open = None;
        }
    }
}

/// Whether the kernel offers the jitter RNG through AF_ALG (binding
/// succeeds).
pub fn jitter_available() -> bool {
    open_alg().is_ok()
}

/// Whether the running kernel's own configuration (`/proc/config.gz`)
/// says it was built without the AF_ALG rng interface
/// (`# CONFIG_CRYPTO_USER_API_RNG is not set`). False when it cannot tell.
pub fn kernel_lacks_af_alg_rng() -> bool {
    std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .is_some_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|line| line == "# CONFIG_CRYPTO_USER_API_RNG is not set")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // These fail, rather than skip, where the kernel should offer the
    // jitter RNG and does not: Debian's and most distributions' kernels
    // build AF_ALG's rng interface (algif_rng, loaded when a socket binds)
    // and jitterentropy_rng. Only a kernel whose own configuration says
    // it has no AF_ALG rng interface (some VM kernels, this project's
    // development machines among them) is instead checked for the error
    // an operator then sees.

    #[test]
    fn reads_distinct_bytes_at_most_max_read_at_a_time() {
        if kernel_lacks_af_alg_rng() {
            let err = JitterSource::detect().unwrap_err().to_string();
            assert!(
                err.starts_with("jitter: the kernel has no AF_ALG sockets")
                    || err.contains("no AF_ALG rng interface"),
                "{err}"
            );
            eprintln!("this kernel has no AF_ALG rng interface: checked its error only");
            return;
        }
        let mut source = JitterSource::detect().unwrap();
        let mut first = [0u8; 4096];
        let n = source.read(&mut first).unwrap();
        assert!((1..=MAX_READ).contains(&n), "{n}");
        let mut second = [0u8; MAX_READ];
        let m = source.read(&mut second).unwrap();
        assert_ne!(first[..n.min(m)], second[..n.min(m)]);
        assert!(!source.is_hardware());
        assert_eq!(source.name(), "jitter");
    }

    #[test]
    fn recovers_by_opening_a_new_instance() {
        let mut source = JitterSource::default();
        assert!(source.open.is_none());
        let mut buf = [0u8; 32];
        if kernel_lacks_af_alg_rng() {
            assert!(!jitter_available());
            assert!(matches!(
                source.read(&mut buf),
                Err(SourceError::Unavailable { .. })
            ));
            return;
        }
        assert_eq!(source.read(&mut buf).unwrap(), 32);
        source.recover().unwrap();
        assert!(source.open.is_none());
        assert_eq!(source.read(&mut buf).unwrap(), 32);
        assert!(jitter_available());
    }
}
