// SPDX-License-Identifier: Apache-2.0
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
    /// [`STATE_VERSION`] when written; a reader refuses any other.
    pub version: u32,
    /// Whether the VMM had sent SET_OWNER.
    pub owner: bool,
    /// The virtio feature bits the VMM acked (SET_FEATURES).
    pub acked_features: u64,
    /// The vhost-user protocol feature bits the VMM acked.
    pub acked_protocol_features: u64,
    /// The memory table, in the order the regions were given.
    pub regions: Vec<RegionState>,
    /// The request queue (virtio-rng has one).
    pub ring: RingState,
    /// The last message handled, recorded before it was taken off the
    /// socket (a writer that had none leaves it out).
    #[serde(default)]
    pub answered: Option<Answered>,
}

/// The last message a connection handled and the reply it got. A serving
/// process that died after recording it but before taking the message off
/// the socket leaves it first in line: the next one finds it there, takes
/// it off and sends this reply, instead of handling it twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answered {
    /// The message as it was on the socket, header and payload.
    pub message: Vec<u8>,
    /// Its reply as it goes on the socket, if it gets one.
    pub reply: Option<Vec<u8>>,
}

/// One memory region; `fd` indexes the descriptor list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest physical address where the region starts.
    pub guest_addr: u64,
    /// The region's size, in bytes.
    pub size: u64,
    /// Where the region is in the VMM's address space.
    pub vmm_addr: u64,
    /// Offset in the memory file where the region starts, in bytes.
    pub mmap_offset: u64,
    /// Index of the region's memory file in the descriptor list.
    pub fd: usize,
}

/// The request ring as configured; fds index the descriptor list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    /// Descriptors in the ring (SET_VRING_NUM).
    pub size: u16,
    /// The descriptor table's address in the VMM's address space.
    pub desc: u64,
    /// The available ring's address in the VMM's address space.
    pub avail: u64,
    /// The used ring's address in the VMM's address space.
    pub used: u64,
    /// Started (a kick fd was set and GET_VRING_BASE has not stopped it).
    pub ready: bool,
    /// Enabled (SET_VRING_ENABLE, or implied without PROTOCOL_FEATURES).
    pub enabled: bool,
    /// Index of the kick eventfd in the descriptor list, if one was set.
    pub kick: Option<usize>,
    /// Index of the call eventfd in the descriptor list, if one was set.
    pub call: Option<usize>,
    /// Index of the error eventfd in the descriptor list, if one was set.
    pub err: Option<usize>,
}

/// Why a state could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state was written in another layout than [`STATE_VERSION`].
    #[error("connection state version {found}; this daemon reads only version {STATE_VERSION}")]
    Version {
        /// The version the state says it has.
        found: u32,
    },
    /// The state indexes a descriptor beyond the list handed over with it.
    #[error("the state names descriptor {index}, but only {count} were handed over")]
    MissingFd {
        /// The index in the state.
        index: usize,
        /// Descriptors handed over.
        count: usize,
    },
    /// The memory table could not be mapped again, or no longer passes its
    /// checks.
    #[error("its memory table: {0}")]
    Memory(#[from] super::memory::MemoryError),
    /// A kick, call or error descriptor is not a usable eventfd.
    #[error("its {which} descriptor: {reason}")]
    EventFd {
        /// Which one: "kick", "call" or "error".
        which: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The used ring could not be read from guest memory to find where
    /// serving stopped.
    #[error("cannot read the used ring to resume from: {0}")]
    UsedRing(String),
    /// The device (its eventfd, its timer) could not be made.
    #[error("cannot set up the device: {0}")]
    Device(#[from] std::io::Error),
}
