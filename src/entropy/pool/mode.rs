// SPDX-License-Identifier: Apache-2.0
//! How guests are served (`--mode`, the `mode` key). A file of its own so
//! that the build script, which renders the man pages from the clap
//! definitions, compiles the same enum as the daemon.

/// How guests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Per-guest DRBG seeded and reseeded from full-entropy output.
    #[default]
    Drbg,
    /// Only conditioned full-entropy output, shared among the guests.
    Raw,
}

impl Mode {
    /// The mode as the `mode` key and `--mode` write it: `drbg` or `raw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Drbg => "drbg",
            Mode::Raw => "raw",
        }
    }
}
