// SPDX-License-Identifier: Apache-2.0
//! Errors of the test VMM: one enum for guest memory, the driver-side
//! virtqueue and the vhost-user connection, so tests can `?` through all
//! of them.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use vhost::vhost_user::message::FrontendReq;

/// Everything that can go wrong while playing the VMM/driver side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot describe a working VMM (queue size, memory size, ...).
    #[error("invalid test VMM configuration: {0}")]
    InvalidConfig(String),

    /// `memfd_create` or sizing the memfd failed.
    #[error("creating the guest memory memfd: {0}")]
    Memfd(#[source] io::Error),

    /// Mapping the memfd as guest memory failed.
    #[error("mapping guest memory: {0}")]
    MapGuestMemory(#[source] vm_memory::mmap::FromRangesError),

    /// A guest memory access (ring or buffer) failed, usually an address
    /// outside guest memory.
    #[error("guest memory access at {addr:#x}: {source}")]
    GuestMemory {
        /// Guest physical address of the access.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },

    /// A guest physical address has no host mapping (needed for vring addresses).
    #[error("guest address {0:#x} is not backed by guest memory")]
    UnmappedGuestAddress(u64),

    /// A chain must carry at least one buffer.
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,

    /// Not enough free descriptors in the ring; reap used elements first.
    #[error("virtqueue full: chain needs {needed} descriptors, {free} free")]
    QueueFull {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors currently free.
        free: usize,
    },

    /// The buffers of one chain must fit in the per-head buffer slab.
    #[error(
        "chain needs {needed} bytes of guest memory but a head owns only {slab} (raise memory_size or lower queue_size)"
    )]
    ChainTooLarge {
        /// Bytes the chain needs (buffers plus indirect table, aligned).
        needed: u64,
        /// Size of the slab each head owns.
        slab: u64,
    },

    /// The chain has more buffers than an indirect table may hold here.
    #[error("indirect chain of {0} buffers is longer than allowed")]
    IndirectTooLong(usize),

    /// `read_buffer` and friends were asked about a head that carries no chain.
    #[error("no chain was posted with head {0}")]
    UnknownHead(u16),

    /// `read_buffer` was asked for a buffer index past the end of the chain.
    #[error("chain with head {head} has {count} buffers, no buffer {index}")]
    NoSuchBuffer {
        /// Head of the chain.
        head: u16,
        /// Requested buffer.
        index: usize,
        /// Buffers in the chain.
        count: usize,
    },

    /// The device put an id in the used ring that is not the head of a chain
    /// it was given (a device bug this harness exists to catch).
    #[error("device returned used element with id {0}, which is not an in-flight chain head")]
    BogusUsedId(u32),

    /// [`crate::SplitRingDriver::repost_reaped`] was asked for chains that
    /// are not the last ones reaped, or not single-descriptor ones.
    #[error("cannot post again: {0}")]
    NotRepostable(String),

    /// The used index moved by more than the queue size since the last look,
    /// which no correct device can do.
    #[error("used index advanced by {advanced}, more than the queue size {queue_size}")]
    UsedIndexOverrun {
        /// How far the used index moved.
        advanced: u16,
        /// Queue size.
        queue_size: u16,
    },

    /// Waiting for used elements ran out of time.
    #[error("timed out after {waited:?} waiting for {wanted} used elements ({available} arrived)")]
    Timeout {
        /// How long we waited.
        waited: Duration,
        /// How many used elements were wanted.
        wanted: usize,
        /// How many were in the used ring when we gave up.
        available: usize,
    },

    /// The backend does not offer a feature the VMM cannot work without.
    #[error("backend does not offer {0}")]
    MissingFeature(&'static str),

    /// A request needs a feature that was not negotiated on this connection.
    #[error("{0} was not negotiated")]
    FeatureNotNegotiated(&'static str),

    /// The backend reported a queue count the VMM cannot use.
    #[error("backend supports {0} queues, the rng device needs 1")]
    QueueCount(u64),

    /// Connecting to the backend's socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Last connect error.
        #[source]
        source: io::Error,
    },

    /// Accepting the backend's connection failed or timed out.
    #[error("accepting a backend connection: {0}")]
    Accept(#[source] io::Error),

    /// The guest memory region could not be described for the backend.
    #[error("describing the guest memory region: {0}")]
    MemoryRegion(#[source] vhost::Error),

    /// A vhost-user request failed (socket error, refused request, bad reply).
    #[error("vhost-user {request:?}: {source}")]
    VhostUser {
        /// The request that failed.
        request: FrontendReq,
        /// What the vhost crate reported.
        #[source]
        source: vhost::Error,
    },

    /// The backend did not finish answering within the reply timeout; the
    /// connection was shut down.
    #[error("backend did not answer within {0:?}; connection shut down")]
    ReplyTimeout(Duration),

    /// Creating, writing or reading a kick/call eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),

    /// Any other OS-level failure (poll, socketpair, setrlimit).
    #[error("{what}: {source}")]
    Os {
        /// What we were doing.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Result alias for the test VMM.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps a failed guest memory access at `addr`.
    pub(crate) fn memory(addr: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
        move |source| Error::GuestMemory { addr, source }
    }

    /// Wraps an OS error, saying what we were doing.
    pub(crate) fn os(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Os { what, source }
    }
}
