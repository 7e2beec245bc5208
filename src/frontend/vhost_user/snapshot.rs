//! A VMM connection's device state as data: what it negotiated, its memory
//! table and its ring, with the file descriptors they need listed apart.
//!
//! This is what lets a connection outlive the code serving it: a frozen
//! connection's [`ConnectionState`] and descriptors are enough for another
//! [`super::handler::Handler`] (in this process, a restarted one, or a new
//! version of the daemon) to go on serving the same VMM, which never sees a
//! disconnect. Nothing that could hand out extra or repeated bytes is in
//! it: the DRBG is reseeded, never restored, and the position in the
//! request ring is rebuilt from the used ring in guest memory (the device
//! completes requests in order, so the used index is where serving stopped;
//! a request taken and not completed is served again).

use serde::{Deserialize, Serialize};

/// The version of [`ConnectionState`]'s layout. A reader refuses any other.
pub const STATE_VERSION: u32 = 1;

/// One VMM connection's negotiated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    pub version: u32,
    pub owner: bool,
    pub acked_features: u64,
    pub acked_protocol_features: u64,
    pub regions: Vec<RegionState>,
    pub ring: RingState,
}

/// One memory region; `fd` indexes the descriptor list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub vmm_addr: u64,
    pub mmap_offset: u64,
    pub fd: usize,
}

/// The request ring as configured; fds index the descriptor list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Started (a kick fd was set and GET_VRING_BASE has not stopped it).
    pub ready: bool,
    pub enabled: bool,
    pub kick: Option<usize>,
    pub call: Option<usize>,
    pub err: Option<usize>,
}

/// Why a state could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("connection state version {found}; this daemon reads only version {STATE_VERSION}")]
    Version { found: u32 },
    #[error("the state names descriptor {index}, but only {count} were handed over")]
    MissingFd { index: usize, count: usize },
    #[error("its memory table: {0}")]
    Memory(#[from] super::memory::MemoryError),
    #[error("its {which} descriptor: {reason}")]
    EventFd { which: &'static str, reason: String },
    #[error("cannot read the used ring to resume from: {0}")]
    UsedRing(String),
    #[error("cannot set up the device: {0}")]
    Device(#[from] std::io::Error),
}
