// SPDX-License-Identifier: Apache-2.0
//! What `--seccomp` (the `seccomp` key) takes. A file of its own so that
//! the build script, which renders the man pages from the clap
//! definitions, compiles the same enum as the daemon.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a system call outside the allow-list does (`--seccomp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    /// The process is killed with SIGSYS (the supervisor restarts a
    /// serving process).
    #[default]
    Kill,
    /// The call goes ahead and the kernel logs it (audit type 1326): for
    /// operators finding what a new kernel or libc needs.
    Log,
    /// No filter at all.
    None,
}

impl SeccompMode {
    /// The name `--seccomp` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
            SeccompMode::None => "none",
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            "none" => Ok(SeccompMode::None),
            other => Err(format!("'{other}': expected kill, log or none")),
        }
    }
}

/// Which processes map which guests' memory (`--isolation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// One serving process maps every vhost-user guest's memory.
    #[default]
    Shared,
    /// Each vhost-user guest's memory is mapped in a guest process that
    /// serves that guest alone.
    Guest,
}

impl Isolation {
    /// The name `--isolation` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Shared => "shared",
            Isolation::Guest => "guest",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(Isolation::Shared),
            "guest" => Ok(Isolation::Guest),
            other => Err(format!("'{other}': expected shared or guest")),
        }
    }
}
