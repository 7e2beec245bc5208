// SPDX-License-Identifier: Apache-2.0
//! Test support: the VMM side of vhost-user (what QEMU or cloud-hypervisor
//! does), with memfd-backed guest memory and a driver-side split virtqueue.
//! Used by the integration tests in `tests/` and by the benchmarks.
//!
//! Typical use, against a backend listening on `socket`:
//!
//! ```no_run
//! use std::time::Duration;
//! use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};
//!
//! # fn main() -> vhost_rng_testing::Result<()> {
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
//! - [`connect_from`]: a TCP client of a chosen loopback address, so one
//!   test can play several network peers.
//! - [`threads_named`]: how many threads of a kind the process has, to see
//!   that a server's threads end.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod error;
pub mod guest_memory;
pub mod split_ring;
pub mod vmm;

pub use error::{Error, Result};
pub use guest_memory::MemfdGuestMemory;
pub use split_ring::{Buffer, RingLayout, SplitRingDriver, UsedElem};
pub use vmm::{
    CLOUD_HYPERVISOR_PROTOCOL_FEATURES, CLOUD_HYPERVISOR_UNIMPLEMENTED_PROTOCOL_FEATURES,
    FrontendProfile, MemoryRegistration, QEMU_PROTOCOL_FEATURES, TestVmm, TestVmmConfig,
    raise_fd_limit,
};

/// A TCP connection to `to` from the loopback address `source` (all of
/// 127.0.0.0/8 is local on Linux), so that one test can play several hosts.
pub fn connect_from(
    source: [u8; 4],
    to: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let std::net::SocketAddr::V4(to) = to else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "connect_from connects to IPv4 addresses only",
        ));
    };
    let socket = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let [a, b, c, d] = source;
    bind(socket.as_raw_fd(), &SockaddrIn::new(a, b, c, d, 0))?;
    connect(socket.as_raw_fd(), &SockaddrIn::from(to))?;
    Ok(std::net::TcpStream::from(socket))
}

/// The threads of this process named `name` (as given to
/// `thread::Builder::name`, at most 15 bytes), counted in /proc/self/task.
/// By name rather than all of them: tests running beside the caller start
/// and end threads of their own.
pub fn threads_named(name: &str) -> std::io::Result<usize> {
    let mut count = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        // A thread that ended since the listing is simply not counted.
        let Ok(comm) = std::fs::read_to_string(task?.path().join("comm")) else {
            continue;
        };
        if comm.trim_end_matches('\n') == name {
            count += 1;
        }
    }
    Ok(count)
}
