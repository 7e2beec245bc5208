// SPDX-License-Identifier: Apache-2.0
//! Guest RAM for the test VMM: one memfd mapped shared as a
//! `vm_memory::GuestMemoryMmap`.
//!
//! A real VMM backs guest RAM with a shareable file (QEMU
//! `memory-backend-memfd`, cloud-hypervisor `shared=on`) so that it can hand
//! the file descriptor to a vhost-user backend in SET_MEM_TABLE or
//! ADD_MEM_REG; the backend maps the same pages and reads the virtqueues and
//! buffers directly. This type does the same, keeps the memfd open for that
//! purpose, and translates guest physical addresses into the VMM-virtual
//! ("userspace") addresses that SET_VRING_ADDR carries.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::{SysconfVar, sysconf};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::error::{Error, Result};

/// Guest RAM backed by a memfd, mapped `MAP_SHARED` in this process.
///
/// The memory is one contiguous region starting at [`Self::base`]. Pages are
/// only allocated when touched, so many small instances are cheap.
#[derive(Debug)]
pub struct MemfdGuestMemory {
    memory: GuestMemoryMmap,
    file: Arc<File>,
    base: GuestAddress,
    size: u64,
}

impl MemfdGuestMemory {
    /// Creates `size` bytes of zeroed guest RAM at guest physical address `base`.
    ///
    /// `size` must be a non-zero multiple of the page size, because the backend
    /// maps the region with `mmap`.
    pub fn new(base: GuestAddress, size: usize) -> Result<Self> {
        let page = page_size();
        if size == 0 || !size.is_multiple_of(page) {
            return Err(Error::InvalidConfig(format!(
                "guest memory size {size} is not a non-zero multiple of the page size {page}"
            )));
        }
        if !base.raw_value().is_multiple_of(page as u64) {
            return Err(Error::InvalidConfig(format!(
                "guest memory base {:#x} is not page aligned",
                base.raw_value()
            )));
        }

        let file = Arc::new(create_memfd(c"vhost-rng-test-guest-ram")?);
        file.set_len(size as u64).map_err(Error::Memfd)?;
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            base,
            size,
            Some(FileOffset::from_arc(Arc::clone(&file), 0)),
        )])
        .map_err(Error::MapGuestMemory)?;

        Ok(Self {
            memory,
            file,
            base,
            size: size as u64,
        })
    }

    /// The mapped guest memory, for `vm_memory::Bytes` accesses.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest physical address of the first byte of RAM.
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest physical address one past the last byte of RAM.
    pub fn end(&self) -> GuestAddress {
        self.base.unchecked_add(self.size)
    }

    /// The memfd backing guest RAM (what SET_MEM_TABLE / ADD_MEM_REG send).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The region description for SET_MEM_TABLE / ADD_MEM_REG: guest address,
    /// size, our mapping address and the memfd with offset 0.
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo> {
        let region = self
            .memory
            .iter()
            .next()
            .ok_or(Error::UnmappedGuestAddress(self.base.raw_value()))?;
        VhostUserMemoryRegionInfo::from_guest_region(region).map_err(Error::MemoryRegion)
    }

    /// The VMM-virtual address of guest address `addr`, valid for `len` bytes.
    ///
    /// vhost-user passes vring addresses in the frontend's address space (the
    /// backend translates them through the `userspace_addr` of the memory
    /// table), so SET_VRING_ADDR needs these rather than guest addresses.
    pub fn host_address(&self, addr: GuestAddress, len: u64) -> Result<u64> {
        let in_range =
            addr >= self.base && addr.checked_add(len).is_some_and(|end| end <= self.end());
        if !in_range {
            return Err(Error::UnmappedGuestAddress(addr.raw_value()));
        }
        let region = self
            .memory
            .iter()
            .next()
            .ok_or(Error::UnmappedGuestAddress(addr.raw_value()))?;
        let offset = addr.unchecked_offset_from(region.start_addr());
        Ok(region.as_ptr() as u64 + offset)
    }
}

/// Creates an anonymous, close-on-exec memfd named `name`.
fn create_memfd(name: &CStr) -> Result<File> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).map_err(|e| Error::Memfd(e.into()))?;
    Ok(File::from(fd))
}

/// The system page size (mmap granularity).
pub(crate) fn page_size() -> usize {
    sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_shared_through_the_memfd() {
        let mem = MemfdGuestMemory::new(GuestAddress(0x4000_0000), 1 << 20).unwrap();
        mem.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x4000_1000))
            .unwrap();

        // A second mapping of the same fd, like the backend makes, sees the write.
        let dup = mem.file.try_clone().unwrap();
        let other = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            1 << 20,
            Some(FileOffset::new(dup, 0)),
        )])
        .unwrap();
        let value: u32 = other.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(value, 0xdead_beef);
    }

    #[test]
    fn region_info_and_host_addresses_agree() {
        let mem = MemfdGuestMemory::new(GuestAddress(0x4000_0000), 1 << 20).unwrap();
        let info = mem.region_info().unwrap();
        assert_eq!(info.guest_phys_addr, 0x4000_0000);
        assert_eq!(info.memory_size, 1 << 20);
        assert_eq!(info.mmap_offset, 0);
        assert_eq!(info.mmap_handle, mem.fd());
        assert_eq!(
            mem.host_address(GuestAddress(0x4000_0010), 16).unwrap(),
            info.userspace_addr + 0x10
        );
        assert!(mem.host_address(GuestAddress(0x3fff_fff0), 16).is_err());
        assert!(mem.host_address(GuestAddress(0x400f_fff8), 16).is_err());
    }

    #[test]
    fn rejects_unaligned_sizes() {
        assert!(MemfdGuestMemory::new(GuestAddress(0), 1000).is_err());
        assert!(MemfdGuestMemory::new(GuestAddress(0), 0).is_err());
        assert!(MemfdGuestMemory::new(GuestAddress(0x10), 1 << 20).is_err());
    }
}
