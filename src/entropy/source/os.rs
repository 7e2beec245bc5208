// SPDX-License-Identifier: Apache-2.0
//! The operating system's CSPRNG (`getrandom(2)`): a non-hardware source,
//! used only when the operator asks for it.

use super::{RawSource, SourceError};

/// Reads the kernel CSPRNG.
#[derive(Debug, Default)]
pub struct OsSource;

impl RawSource for OsSource {
    fn name(&self) -> &str {
        "os"
    }

    fn is_hardware(&self) -> bool {
        false
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, SourceError> {
        getrandom::fill(buf).map_err(|error| SourceError::Read {
            source_name: "os".into(),
            error: std::io::Error::from(error),
        })?;
        Ok(buf.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_whole_buffer_with_distinct_reads() {
        let mut source = OsSource;
        let mut first = [0u8; 64];
        let mut second = [0u8; 64];
        assert_eq!(source.read(&mut first).unwrap(), 64);
        assert_eq!(source.read(&mut second).unwrap(), 64);
        assert_ne!(first, second);
        assert!(!source.is_hardware());
    }
}
