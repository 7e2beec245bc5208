// SPDX-License-Identifier: Apache-2.0
//! Sources read from a path: `/dev/hwrng`, another character device, a
//! file or a FIFO.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::PathBuf;

use super::{RawSource, SourceError};

/// Largest read issued to the device. The kernel's hwrng read path and
/// virtio-rng answer 64 bytes at a time; larger reads only make a slow
/// device sit longer on one call.
const MAX_READ: usize = 64;

/// A source reading a path; opened on first read, reopened after errors.
pub struct DeviceSource {
    name: String,
    path: PathBuf,
    hardware: bool,
    file: Option<File>,
    /// A character device opened at start, while the daemon may still
    /// have root: used again when reopening by path is no longer allowed
    /// (after `--user`, /dev/hwrng is usually root's alone).
    spare: Option<File>,
}

impl DeviceSource {
    /// A source named `name` (for logs) reading `path`, reported as hardware
    /// or not; nothing is opened until the first read.
    pub fn new(name: String, path: PathBuf, hardware: bool) -> Self {
        // Character devices open at once (they do not block in open, as a
        // FIFO would), so that the serving process keeps one after it
        // drops root.
        let is_char_device = std::fs::metadata(&path)
            .is_ok_and(|meta| std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()));
        let spare = if is_char_device {
            File::open(&path).ok()
        } else {
            None
        };
        DeviceSource {
            name,
            path,
            hardware,
            file: None,
            spare,
        }
    }

    fn open(&mut self) -> Result<&mut File, SourceError> {
        if self.file.is_none() {
            // Opening a FIFO blocks until a writer appears: fine on the
            // source's own thread.
            let file = match File::open(&self.path) {
                Ok(file) => Ok(file),
                Err(error) if error.kind() == ErrorKind::PermissionDenied => self
                    .spare
                    .as_ref()
                    .and_then(|spare| spare.try_clone().ok())
                    .ok_or(error),
                Err(error) => Err(error),
            }
            .map_err(|error| SourceError::Open {
                source_name: self.name.clone(),
                path: self.path.clone(),
                error,
            })?;
            self.file = Some(file);
        }
        // Just set if it was empty.
        self.file.as_mut().ok_or_else(|| unreachable!())
    }
}

impl RawSource for DeviceSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn is_hardware(&self) -> bool {
        self.hardware
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, SourceError> {
        let limit = buf.len().min(MAX_READ);
        let file = self.open()?;
        loop {
            match file.read(&mut buf[..limit]) {
                Ok(0) => {
                    self.file = None;
                    return Err(SourceError::EndOfFile {
                        source_name: self.name.clone(),
                    });
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.file = None;
                    return Err(SourceError::Read {
                        source_name: self.name.clone(),
                        error,
                    });
                }
            }
        }
    }

    fn recover(&mut self) -> Result<(), SourceError> {
        self.file = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_file_then_reports_its_end() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &[7u8; 100]).unwrap();
        let mut source = DeviceSource::new("file:test".into(), file.path().into(), false);
        let mut buf = [0u8; 4096];
        assert_eq!(source.read(&mut buf).unwrap(), MAX_READ);
        assert_eq!(source.read(&mut buf).unwrap(), 100 - MAX_READ);
        assert!(matches!(
            source.read(&mut buf),
            Err(SourceError::EndOfFile { .. })
        ));
        // Reopened from the start after the end.
        assert_eq!(source.read(&mut buf).unwrap(), MAX_READ);
    }

    #[test]
    fn read_errors_name_the_source() {
        // Reading /proc/self/mem at offset 0 (never mapped) fails with EIO.
        let mut source =
            DeviceSource::new("file:/proc/self/mem".into(), "/proc/self/mem".into(), false);
        let err = source.read(&mut [0u8; 16]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("file:/proc/self/mem: read failed"),
            "{err}"
        );
    }
}
