//! The pool: the one place every guest frontend draws bytes from.
//!
//! Each guest gets its own [`EntropyStream`] so that later stages (per-guest
//! DRBG instances, health-gated output) can keep per-guest state without the
//! frontends knowing.

use std::sync::Arc;

use log::warn;

use crate::log_limit::RateLimitedLog;
use crate::source::EntropySource;

/// A guest's view of the pool.
pub trait EntropyStream: Send {
    /// Fills the start of `buf` and returns how many bytes were written.
    /// Returns 0 when no bytes may be handed out now (fail closed); the
    /// caller leaves the request pending instead of answering it.
    fn fill(&mut self, buf: &mut [u8]) -> usize;
}

/// Shared entropy pool fed by the configured sources.
pub struct Pool {
    source: Arc<dyn EntropySource>,
    read_errors: RateLimitedLog,
}

impl Pool {
    pub fn new(source: Arc<dyn EntropySource>) -> Arc<Self> {
        Arc::new(Pool {
            source,
            read_errors: RateLimitedLog::per_minute(6),
        })
    }

    /// Name of the source feeding the pool, for logs.
    pub fn source_name(&self) -> &str {
        self.source.name()
    }

    /// A new stream for one guest.
    pub fn stream(self: &Arc<Self>) -> Box<dyn EntropyStream> {
        Box::new(PoolStream {
            pool: Arc::clone(self),
        })
    }

    fn fill(&self, buf: &mut [u8]) -> usize {
        match self.source.read(buf) {
            Ok(n) => n,
            Err(e) => {
                if let Some(suppressed) = self.read_errors.permit() {
                    warn!(
                        "entropy pool: {e}; guests wait ({suppressed} similar messages suppressed)"
                    );
                }
                0
            }
        }
    }
}

struct PoolStream {
    pool: Arc<Pool>,
}

impl EntropyStream for PoolStream {
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        self.pool.fill(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{OsSource, SourceError};

    struct FailingSource;

    impl EntropySource for FailingSource {
        fn name(&self) -> &str {
            "failing"
        }
        fn is_hardware(&self) -> bool {
            true
        }
        fn read(&self, _buf: &mut [u8]) -> Result<usize, SourceError> {
            Err(SourceError::Read {
                source_name: "failing".into(),
                error: std::io::Error::from_raw_os_error(libc::EIO),
            })
        }
    }

    #[test]
    fn streams_fill_from_the_source() {
        let pool = Pool::new(Arc::new(OsSource));
        let mut stream = pool.stream();
        let mut buf = [0u8; 32];
        assert_eq!(stream.fill(&mut buf), 32);
        assert_eq!(pool.source_name(), "os");
    }

    #[test]
    fn source_error_yields_no_bytes() {
        let pool = Pool::new(Arc::new(FailingSource));
        let mut buf = [0xAAu8; 32];
        assert_eq!(pool.stream().fill(&mut buf), 0);
    }
}
