//! Test support: the VMM side of vhost-user (what QEMU or cloud-hypervisor
//! does), with memfd-backed guest memory and a driver-side split virtqueue.
//! Used by the integration tests in `tests/` and by the benchmarks.
//!
//! Typical use, against a backend listening on `socket`:
//!
//! ```no_run
//! use std::time::Duration;
//! use vhost_rng::testing::{Buffer, TestVmm, TestVmmConfig};
//!
//! # fn main() -> vhost_rng::testing::Result<()> {
//! # let socket = std::path::Path::new("/tmp/vhost-rng.sock");
//! let mut vmm = TestVmm::connect(socket, TestVmmConfig::qemu())?;
//! let head = vmm.post(&[Buffer::writable(64)])?;
//! vmm.kick()?;
//! let used = vmm.wait_used(1, Duration::from_secs(5))?;
//! assert_eq!((used[0].head, used[0].len), (head, 64));
//! let entropy = vmm.read_buffer(head, 0)?;
//! # drop(entropy);
//! vmm.disconnect()?;
//! # Ok(())
//! # }
//! ```
//!
//! - [`guest_memory`]: memfd-backed guest RAM whose fd is handed to the backend.
//! - [`split_ring`]: the guest driver's side of the split virtqueue.
//! - [`vmm`]: the vhost-user connection, with QEMU and cloud-hypervisor profiles.

pub mod error;
pub mod guest_memory;
pub mod split_ring;
pub mod vmm;

pub use error::{Error, Result};
pub use guest_memory::MemfdGuestMemory;
pub use split_ring::{Buffer, RingLayout, SplitRingDriver, UsedElem};
pub use vmm::{
    CLOUD_HYPERVISOR_PROTOCOL_FEATURES, FrontendProfile, MemoryRegistration,
    QEMU_PROTOCOL_FEATURES, TestVmm, TestVmmConfig, raise_fd_limit,
};
