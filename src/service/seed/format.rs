// SPDX-License-Identifier: Apache-2.0
//! What `vhost-rng seed` takes: its sizes and formats. A file of its own so
//! that the build script, which renders the man pages from the clap
//! definitions, compiles the same values as the daemon.

/// Most bytes one request may ask for. A kernel needs 32 bytes to seed
/// its generator and systemd keeps 512 in its seed file; 4096 is eight
/// times that, base64-encodes to 5464 characters (within the 16 KiB some
/// clouds allow for all of a VM's user-data, and far within OpenStack's
/// 64 KiB), and keeps each control request small and quick, so a script
/// asking in a loop cannot make the daemon hold large buffers.
pub const MAX_SEED_BYTES: usize = 4096;

/// Bytes given when `--bytes` is not: the size of systemd's seed file.
pub const DEFAULT_SEED_BYTES: usize = 512;

/// How the seed is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeedFormat {
    /// The bytes as they are.
    Raw,
    /// One line of base64.
    Base64,
    /// A `#cloud-config` document with a `random_seed:` block.
    CloudInit,
}
