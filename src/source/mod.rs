//! Entropy sources: where raw bytes come from before they reach the pool.
//!
//! A source never blocks its caller for long: it hands over what it has now
//! and says how much that was. Slow hardware is read in the background by the
//! source itself, so a stalled device can never stall a guest.

mod os;

pub use os::OsSource;

/// Why a source could not deliver bytes.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: read failed: {error}")]
    Read {
        source_name: String,
        #[source]
        error: std::io::Error,
    },
}

/// A producer of random bytes.
pub trait EntropySource: Send + Sync {
    /// Short name used in logs, status and metrics (`os`, `hwrng`, ...).
    fn name(&self) -> &str;

    /// Whether the bytes come from hardware; non-hardware sources are
    /// reported as such to operators.
    fn is_hardware(&self) -> bool;

    /// Fills the start of `buf` with what the source has available now and
    /// returns how many bytes that was (0 when it has nothing right now).
    fn read(&self, buf: &mut [u8]) -> Result<usize, SourceError>;
}
