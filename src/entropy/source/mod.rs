// SPDX-License-Identifier: Apache-2.0
//! Entropy sources: where raw bytes come from before health tests and
//! conditioning.
//!
//! Every source is read on a thread of its own ([`runner`]), so one that is
//! slow or stalls never holds up a guest or another source. A source is
//! named on the command line as `KIND[=PATH][,min-entropy=BITS]`:
//!
//! | kind | reads | default min-entropy (bits/byte) |
//! | --- | --- | --- |
//! | `hwrng[=PATH]` | the kernel's hardware RNG, `/dev/hwrng` | 1 |
//! | `rdseed` | the x86 RDSEED instruction | 4 |
//! | `file=PATH` | any file, character device or FIFO | 1 |
//! | `jitter` | the kernel's CPU-jitter RNG (`jitterentropy_rng`) over AF_ALG; not hardware | 1 |
//! | `os` | `getrandom(2)`, not hardware; only when asked for | 4 |
//!
//! The defaults are deliberately low: a source is credited with at most
//! what it is known to deliver, and the health-test cutoffs follow from the
//! same figure.
//!
//! With no `--source`, the daemon uses every hardware source that works on
//! the host, and `jitter` only when none does ([`default_sources`]).

mod device;
pub mod jitter;
mod os;
pub mod rdseed;
pub mod runner;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use device::DeviceSource;
pub use jitter::JitterSource;
pub use os::OsSource;
pub use rdseed::RdseedSource;
pub use runner::{SourceState, SourceStats, SourceStatsSnapshot};

/// Why a source could not deliver bytes.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source's path is missing or cannot be opened.
    #[error("{source_name}: cannot open {path}: {error}")]
    Open {
        /// The source's name, as [`SourceSpec::label`] gives it.
        source_name: String,
        /// The device, file or FIFO.
        path: PathBuf,
        /// The error from the operating system.
        #[source]
        error: std::io::Error,
    },
    /// Reading the source failed (a device error, getrandom(2) failing).
    #[error("{source_name}: read failed: {error}")]
    Read {
        /// The source's name.
        source_name: String,
        /// The error from the operating system.
        #[source]
        error: std::io::Error,
    },
    /// A file or FIFO source reached its end: a file that ran out, a FIFO
    /// whose writer went away.
    #[error("{source_name}: end of file")]
    EndOfFile {
        /// The source's name.
        source_name: String,
    },
    /// The source cannot be used at all on this host (RDSEED missing or
    /// failing its self-test), or one draw found it drained.
    #[error("{source_name}: {reason}")]
    Unavailable {
        /// The source's name.
        source_name: String,
        /// Why, for the operator.
        reason: String,
    },
}

/// A producer of raw random bytes, read on its own thread.
pub trait RawSource: Send {
    /// Name used in logs, status and metrics (`hwrng:/dev/hwrng`, `rdseed`).
    fn name(&self) -> &str;

    /// Whether the bytes come from hardware.
    fn is_hardware(&self) -> bool;

    /// Reads some raw bytes into `buf` and returns how many (at least one);
    /// may block.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, SourceError>;

    /// Gets ready to read again after an error (e.g. reopens a device).
    fn recover(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Draws the source had to retry (RDSEED underflow), for statistics.
    fn retries(&self) -> u64 {
        0
    }
}

/// The kinds of source the daemon knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// `hwrng[=PATH]`: the kernel's hardware RNG device.
    Hwrng,
    /// `rdseed`: the x86 RDSEED instruction.
    Rdseed,
    /// `file=PATH`: any file, character device or FIFO.
    File,
    /// `os`: getrandom(2), the kernel's CSPRNG; not hardware.
    Os,
    /// `jitter`: the kernel's CPU-jitter RNG through AF_ALG; not hardware.
    Jitter,
}

impl SourceKind {
    /// Conservative min-entropy credited per byte when the operator does not
    /// give one; see docs/entropy.md for the reasoning.
    pub fn default_min_entropy(self) -> f64 {
        match self {
            SourceKind::Hwrng | SourceKind::File | SourceKind::Jitter => 1.0,
            SourceKind::Rdseed | SourceKind::Os => 4.0,
        }
    }
}

/// Default device of the `hwrng` kind.
pub const DEFAULT_HWRNG_PATH: &str = "/dev/hwrng";

/// A source as the operator named it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// Which kind of source.
    pub kind: SourceKind,
    /// The device or file: required for `file`, optional for `hwrng`
    /// ([`DEFAULT_HWRNG_PATH`] then), unused by the others.
    pub path: Option<PathBuf>,
    min_entropy: Option<f64>,
}

impl SourceSpec {
    /// A source of `kind` at `path`, credited its kind's default min-entropy.
    pub fn new(kind: SourceKind, path: Option<PathBuf>) -> Self {
        SourceSpec {
            kind,
            path,
            min_entropy: None,
        }
    }

    /// Bits of min-entropy credited per byte.
    pub fn min_entropy(&self) -> f64 {
        self.min_entropy
            .unwrap_or_else(|| self.kind.default_min_entropy())
    }

    /// The name the source goes by in logs and status.
    pub fn label(&self) -> String {
        match (self.kind, &self.path) {
            (SourceKind::Hwrng, path) => format!(
                "hwrng:{}",
                path.as_deref()
                    .unwrap_or(Path::new(DEFAULT_HWRNG_PATH))
                    .display()
            ),
            (SourceKind::File, Some(path)) => format!("file:{}", path.display()),
            (SourceKind::File, None) => "file".into(),
            (SourceKind::Rdseed, _) => "rdseed".into(),
            (SourceKind::Os, _) => "os".into(),
            (SourceKind::Jitter, _) => jitter::NAME.into(),
        }
    }

    /// Opens the source. Devices and files are opened lazily on the
    /// source's own thread (a FIFO blocks in open until a writer comes), so
    /// here only their existence is checked.
    pub fn open(&self) -> Result<Box<dyn RawSource>, SourceError> {
        let label = self.label();
        match self.kind {
            SourceKind::Hwrng | SourceKind::File => {
                let path = self
                    .path
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_HWRNG_PATH));
                if let Err(error) = std::fs::metadata(&path) {
                    return Err(SourceError::Open {
                        source_name: label,
                        path,
                        error,
                    });
                }
                let hardware = self.kind == SourceKind::Hwrng;
                Ok(Box::new(DeviceSource::new(label, path, hardware)))
            }
            SourceKind::Rdseed => RdseedSource::detect()
                .map(|source| Box::new(source) as Box<dyn RawSource>)
                .map_err(|e| SourceError::Unavailable {
                    source_name: label,
                    reason: e.to_string(),
                }),
            SourceKind::Os => Ok(Box::new(OsSource)),
            SourceKind::Jitter => {
                JitterSource::detect().map(|source| Box::new(source) as Box<dyn RawSource>)
            }
        }
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut parts = value.split(',');
        let head = parts.next().unwrap_or_default();
        let (kind, path) = match head.split_once('=') {
            Some((kind, path)) => (kind, Some(path)),
            None => (head, None),
        };
        if path.is_some_and(str::is_empty) {
            return Err(format!("'{value}': the path after '{kind}=' is empty"));
        }
        let path = path.map(PathBuf::from);
        let kind = match (kind, &path) {
            ("hwrng", _) => SourceKind::Hwrng,
            ("file", Some(_)) => SourceKind::File,
            ("file", None) => return Err("'file' needs a path: file=PATH".into()),
            ("rdseed" | "os" | "jitter", Some(_)) => {
                return Err(format!("'{kind}' takes no path"));
            }
            ("rdseed", None) => SourceKind::Rdseed,
            ("os", None) => SourceKind::Os,
            ("jitter", None) => SourceKind::Jitter,
            _ => {
                return Err(format!(
                    "unknown source '{kind}': use hwrng[=PATH], rdseed, jitter, file=PATH or os"
                ));
            }
        };
        let mut spec = SourceSpec::new(kind, path);
        for option in parts {
            match option.split_once('=') {
                Some(("min-entropy", bits)) => {
                    let bits: f64 = bits
                        .parse()
                        .map_err(|_| format!("min-entropy '{bits}' is not a number"))?;
                    if !(bits > 0.0 && bits <= 8.0) {
                        return Err(format!(
                            "min-entropy {bits} is out of range: give bits per byte, more than 0 and at most 8"
                        ));
                    }
                    spec.min_entropy = Some(bits);
                }
                _ => {
                    return Err(format!(
                        "unknown source option '{option}': the only option is min-entropy=BITS"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

/// The sources used when the operator names none: the hardware sources
/// that work on this host (`/dev/hwrng` if it can be opened, RDSEED if the
/// CPU has it) or, when there is none, the kernel's CPU-jitter RNG if the
/// kernel offers it (docs/entropy.md says why). Empty when nothing works.
pub fn default_sources() -> Vec<SourceSpec> {
    let mut specs = hardware_sources();
    if specs.is_empty() && jitter::jitter_available() {
        log::warn!(
            "no hardware entropy source works on this host (no readable {DEFAULT_HWRNG_PATH}, \
             no RDSEED): using the kernel's CPU-jitter RNG (--source jitter), credited \
             {} bits/byte; name sources with --source to choose",
            SourceKind::Jitter.default_min_entropy()
        );
        specs.push(SourceSpec::new(SourceKind::Jitter, None));
    }
    specs
}

/// The hardware sources that work on this host: `/dev/hwrng` if it can be
/// opened, RDSEED if the CPU has it.
pub fn hardware_sources() -> Vec<SourceSpec> {
    let mut specs = Vec::new();
    if std::fs::File::open(DEFAULT_HWRNG_PATH).is_ok() {
        specs.push(SourceSpec::new(SourceKind::Hwrng, None));
    }
    if rdseed::rdseed_supported() {
        specs.push(SourceSpec::new(SourceKind::Rdseed, None));
    }
    specs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let hwrng: SourceSpec = "hwrng".parse().unwrap();
        assert_eq!(hwrng.kind, SourceKind::Hwrng);
        assert_eq!(hwrng.label(), "hwrng:/dev/hwrng");
        assert_eq!(hwrng.min_entropy(), 1.0);

        let custom: SourceSpec = "hwrng=/dev/other,min-entropy=2.5".parse().unwrap();
        assert_eq!(custom.path, Some(PathBuf::from("/dev/other")));
        assert_eq!(custom.min_entropy(), 2.5);

        let file: SourceSpec = "file=/tmp/fifo".parse().unwrap();
        assert_eq!(
            (file.kind, file.label()),
            (SourceKind::File, "file:/tmp/fifo".into())
        );

        assert_eq!("rdseed".parse::<SourceSpec>().unwrap().min_entropy(), 4.0);
        assert_eq!("os".parse::<SourceSpec>().unwrap().kind, SourceKind::Os);

        let jitter: SourceSpec = "jitter".parse().unwrap();
        assert_eq!(
            (jitter.kind, jitter.label(), jitter.min_entropy()),
            (SourceKind::Jitter, "jitter".into(), 1.0)
        );
        let jitter: SourceSpec = "jitter,min-entropy=3".parse().unwrap();
        assert_eq!(jitter.min_entropy(), 3.0);
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (spec, reason) in [
            ("entropyd", "unknown source"),
            ("jitter=/dev/x", "takes no path"),
            ("file", "needs a path"),
            ("file=", "empty"),
            ("rdseed=/x", "takes no path"),
            ("os,min-entropy=0", "out of range"),
            ("os,min-entropy=8.5", "out of range"),
            ("os,min-entropy=lots", "not a number"),
            ("hwrng,speed=1", "unknown source option"),
        ] {
            let err = spec.parse::<SourceSpec>().unwrap_err();
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }

    #[test]
    fn opening_a_missing_file_is_an_error_naming_it() {
        let spec: SourceSpec = "file=/nonexistent/entropy".parse().unwrap();
        let err = spec.open().err().unwrap().to_string();
        assert!(err.contains("/nonexistent/entropy"), "{err}");
    }
}
