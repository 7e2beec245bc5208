// SPDX-License-Identifier: Apache-2.0
//! A connection's guest memory: the regions a VMM shares, checked before
//! they are mapped and kept out of core dumps.
//!
//! Every region arrives with a file descriptor and numbers the VMM chose.
//! Before anything is mapped: the numbers must not overflow, the fd must be a
//! regular file (memfd, tmpfs, hugetlbfs) at least as long as the region
//! says, regions must not overlap, and the connection must stay under its
//! region and byte limits ([`MemoryLimits`]). A memory table is applied
//! whole or not at all. Mapped regions are marked `MADV_DONTDUMP`, so a core
//! dump never carries a guest's RAM; a file shrunk later is handled by
//! [`super::fault_guard`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use log::debug;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// How much guest memory one VMM connection may have the daemon map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Regions at once; also the slot count offered in GET_MAX_MEM_SLOTS.
    pub max_regions: usize,
    /// Bytes mapped at once, all regions together.
    pub max_bytes: u64,
}

/// Slots QEMU's vhost-user frontend can use at most (VHOST_USER_MAX_RAM_SLOTS
/// is 512; backends conventionally offer 509).
pub const DEFAULT_MAX_REGIONS: usize = 509;
/// 16 TiB: above the RAM of the largest hosts a VM runs on, and far enough
/// below the 128 TiB of user address space that a few hostile connections
/// cannot use it all up.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 40;

impl Default for MemoryLimits {
    fn default() -> Self {
        MemoryLimits {
            max_regions: DEFAULT_MAX_REGIONS,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Why a region or memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region of size 0.
    #[error("region {index}: size 0")]
    Empty {
        /// The region's place in its table (from 0), or among the regions
        /// already mapped for ADD_MEM_REG.
        index: usize,
    },
    /// A region's start plus its size does not fit in 64 bits.
    #[error("region {index}: {what} {start:#x} + size {size:#x} overflows")]
    Overflow {
        /// The region's place in its table, from 0.
        index: usize,
        /// Which start: "guest address", "VMM address" or "file offset".
        what: &'static str,
        /// That start.
        start: u64,
        /// The region's size, in bytes.
        size: u64,
    },
    /// The region's file could not be fstat'ed.
    #[error("region {index}: cannot inspect its file: {error}")]
    Stat {
        /// The region's place in its table, from 0.
        index: usize,
        /// The error from fstat.
        #[source]
        error: std::io::Error,
    },
    /// The region's fd is not a regular file (a pipe, socket, device...).
    #[error("region {index}: its file descriptor is a {kind}, not a regular memory file")]
    NotAFile {
        /// The region's place in its table, from 0.
        index: usize,
        /// What the fd is instead ("pipe", "socket", ...).
        kind: &'static str,
    },
    /// The region reaches past the end of its file, so touching it would
    /// fault.
    #[error(
        "region {index}: needs bytes up to {end:#x} of its file, which holds only {file_size:#x}"
    )]
    BeyondFile {
        /// The region's place in its table, from 0.
        index: usize,
        /// File offset of the region's end, in bytes.
        end: u64,
        /// The file's size, in bytes.
        file_size: u64,
    },
    /// The region overlaps a region of the same table, or one already
    /// mapped.
    #[error("region {index}: overlaps another region's {what}")]
    Overlap {
        /// The region's place in its table, from 0.
        index: usize,
        /// Where they overlap: "guest addresses" or "VMM addresses".
        what: &'static str,
    },
    /// The table has more regions than [`MemoryLimits::max_regions`].
    #[error("{regions} regions; this daemon allows at most {max} per connection")]
    TooManyRegions {
        /// Regions the connection would have.
        regions: usize,
        /// The limit.
        max: usize,
    },
    /// The regions together are more bytes than [`MemoryLimits::max_bytes`]
    /// (or one region is more than this machine can address).
    #[error(
        "{bytes} bytes of guest memory; this daemon maps at most {max} per connection \
         (see --vhost-user-max-memory)"
    )]
    TooLarge {
        /// Bytes the connection would have mapped.
        bytes: u64,
        /// The limit, in bytes.
        max: u64,
    },
    /// REM_MEM_REG named a region that is not mapped.
    #[error("no region at guest address {gpa:#x} of size {size:#x} to remove")]
    NoSuchRegion {
        /// The guest address given.
        gpa: u64,
        /// The size given, in bytes.
        size: u64,
    },
    /// mmap(2) of the region failed.
    #[error("region {index}: cannot map it: {error}")]
    Map {
        /// The region's place in its table, from 0.
        index: usize,
        /// The error from mapping it.
        #[source]
        error: vm_memory::mmap::MmapRegionError,
    },
}

/// Where one region sits for the VMM and for the guest.
#[derive(Debug, Clone, Copy)]
struct Placement {
    guest_addr: u64,
    vmm_addr: u64,
    size: u64,
}

impl Placement {
    fn of(index: usize, region: &VhostUserMemoryRegion) -> Result<Self, MemoryError> {
        let size = region.memory_size;
        if size == 0 {
            return Err(MemoryError::Empty { index });
        }
        let end = |what, start: u64| {
            start.checked_add(size).ok_or(MemoryError::Overflow {
                index,
                what,
                start,
                size,
            })
        };
        end("guest address", region.guest_phys_addr)?;
        end("VMM address", region.user_addr)?;
        end("file offset", region.mmap_offset)?;
        if usize::try_from(size).is_err() {
            return Err(MemoryError::TooLarge {
                bytes: size,
                max: usize::MAX as u64,
            });
        }
        Ok(Placement {
            guest_addr: region.guest_phys_addr,
            vmm_addr: region.user_addr,
            size,
        })
    }

    fn overlaps(&self, other: &Placement) -> Option<&'static str> {
        let crosses = |a: u64, b: u64| a < b + other.size && b < a + self.size;
        if crosses(self.guest_addr, other.guest_addr) {
            Some("guest addresses")
        } else if crosses(self.vmm_addr, other.vmm_addr) {
            Some("VMM addresses")
        } else {
            None
        }
    }
}

struct Region {
    placement: Placement,
    mmap_offset: u64,
    /// The VMM's memory file, kept for a snapshot of the connection.
    file: Arc<File>,
    mapping: Arc<GuestRegionMmap>,
}

/// One mapped region as the VMM described it, with its file.
pub struct RegionView<'a> {
    /// Guest physical address where the region starts.
    pub guest_addr: u64,
    /// The region's size, in bytes.
    pub size: u64,
    /// Where the region is in the VMM's address space (what vring addresses
    /// refer to).
    pub vmm_addr: u64,
    /// Offset in the file where the region starts, in bytes.
    pub mmap_offset: u64,
    /// The VMM's memory file (memfd, tmpfs, hugetlbfs).
    pub file: &'a File,
}

/// The guest memory of one VMM connection.
pub struct MemoryTable {
    limits: MemoryLimits,
    regions: Vec<Region>,
    memory: Option<GuestMemoryMmap>,
}

impl MemoryTable {
    /// An empty table held to `limits`.
    pub fn new(limits: MemoryLimits) -> Self {
        MemoryTable {
            limits,
            regions: Vec::new(),
            memory: None,
        }
    }

    /// The limits this table is held to.
    pub fn limits(&self) -> MemoryLimits {
        self.limits
    }

    /// The mapped guest memory, once the VMM has sent any.
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.memory.as_ref()
    }

    /// The regions, in the order they were given.
    pub fn regions(&self) -> impl Iterator<Item = RegionView<'_>> {
        self.regions.iter().map(|r| RegionView {
            guest_addr: r.placement.guest_addr,
            size: r.placement.size,
            vmm_addr: r.placement.vmm_addr,
            mmap_offset: r.mmap_offset,
            file: &r.file,
        })
    }

    /// Bytes mapped now.
    pub fn mapped_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.placement.size).sum()
    }

    /// Replaces the whole table (SET_MEM_TABLE); on error the old one stays.
    pub fn replace(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        self.check_totals(regions.len(), regions.iter().map(|r| r.memory_size))?;
        let mut mapped: Vec<Region> = Vec::with_capacity(regions.len());
        for (index, (region, file)) in regions.iter().zip(files).enumerate() {
            let new = map(index, region, file)?;
            if let Some(what) = mapped
                .iter()
                .find_map(|old| new.placement.overlaps(&old.placement))
            {
                return Err(MemoryError::Overlap { index, what });
            }
            mapped.push(new);
        }
        self.regions = mapped;
        self.rebuild();
        Ok(())
    }

    /// Adds one region (ADD_MEM_REG).
    pub fn add(&mut self, region: &VhostUserMemoryRegion, file: File) -> Result<(), MemoryError> {
        let index = self.regions.len();
        self.check_totals(
            index + 1,
            self.regions
                .iter()
                .map(|r| r.placement.size)
                .chain([region.memory_size]),
        )?;
        // Check overlap before mapping, so a refused region costs nothing.
        let placement = Placement::of(index, region)?;
        if let Some(what) = self
            .regions
            .iter()
            .find_map(|old| placement.overlaps(&old.placement))
        {
            return Err(MemoryError::Overlap { index, what });
        }
        let new = map(index, region, file)?;
        self.regions.push(new);
        self.rebuild();
        Ok(())
    }

    /// Removes the region at `region`'s guest address and size (REM_MEM_REG).
    pub fn remove(&mut self, region: &VhostUserMemoryRegion) -> Result<(), MemoryError> {
        let position = self
            .regions
            .iter()
            .position(|r| {
                r.placement.guest_addr == region.guest_phys_addr
                    && r.placement.size == region.memory_size
            })
            .ok_or(MemoryError::NoSuchRegion {
                gpa: region.guest_phys_addr,
                size: region.memory_size,
            })?;
        self.regions.remove(position);
        self.rebuild();
        Ok(())
    }

    /// The guest address of a VMM virtual address (how vring addresses are
    /// given).
    pub fn guest_address(&self, vmm_addr: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|r| {
            let offset = vmm_addr.checked_sub(r.placement.vmm_addr)?;
            (offset < r.placement.size).then(|| GuestAddress(r.placement.guest_addr + offset))
        })
    }

    fn check_totals(
        &self,
        regions: usize,
        sizes: impl Iterator<Item = u64>,
    ) -> Result<(), MemoryError> {
        if regions > self.limits.max_regions {
            return Err(MemoryError::TooManyRegions {
                regions,
                max: self.limits.max_regions,
            });
        }
        let bytes = sizes.fold(0u64, u64::saturating_add);
        if bytes > self.limits.max_bytes {
            return Err(MemoryError::TooLarge {
                bytes,
                max: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    fn rebuild(&mut self) {
        // Regions were checked not to overlap, which is all from_arc_regions
        // refuses besides an empty list.
        self.memory = GuestMemoryMmap::from_arc_regions(
            self.regions.iter().map(|r| r.mapping.clone()).collect(),
        )
        .ok();
    }
}

/// Checks one region against its file and maps it.
fn map(index: usize, region: &VhostUserMemoryRegion, file: File) -> Result<Region, MemoryError> {
    let placement = Placement::of(index, region)?;
    let metadata = file
        .metadata()
        .map_err(|error| MemoryError::Stat { index, error })?;
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_dir() {
            "directory"
        } else if file_type.is_fifo() {
            "pipe"
        } else if file_type.is_socket() {
            "socket"
        } else if file_type.is_char_device() {
            "character device"
        } else if file_type.is_block_device() {
            "block device"
        } else {
            "special file"
        };
        return Err(MemoryError::NotAFile { index, kind });
    }
    // Checked in Placement::of.
    let end = region.mmap_offset + placement.size;
    if end > metadata.size() {
        return Err(MemoryError::BeyondFile {
            index,
            end,
            file_size: metadata.size(),
        });
    }
    if !shrink_sealed(&file) {
        debug!(
            "region {index}: file not sealed against shrinking; a truncation would be caught \
             by the fault guard"
        );
    }
    // Checked in Placement::of to fit.
    let size = placement.size as usize;
    let file = Arc::new(file);
    let mapping = MmapRegion::<()>::from_file(
        FileOffset::from_arc(Arc::clone(&file), region.mmap_offset),
        size,
    )
    .map_err(|error| MemoryError::Map { index, error })?;
    // SAFETY: the range is exactly the mapping just made; madvise only
    // changes how the kernel treats it in a core dump.
    let advised = unsafe {
        libc::madvise(
            mapping.as_ptr().cast::<libc::c_void>(),
            size,
            libc::MADV_DONTDUMP,
        )
    };
    if advised != 0 {
        debug!(
            "region {index}: MADV_DONTDUMP: {}",
            std::io::Error::last_os_error()
        );
    }
    let mapping = GuestRegionMmap::new(mapping, GuestAddress(placement.guest_addr))
        // Only refused when guest address + size overflows, checked above.
        .ok_or(MemoryError::Overflow {
            index,
            what: "guest address",
            start: placement.guest_addr,
            size: placement.size,
        })?;
    Ok(Region {
        placement,
        mmap_offset: region.mmap_offset,
        file,
        mapping: Arc::new(mapping),
    })
}

/// Whether the file is a memfd sealed against shrinking (QEMU's memfd
/// backend seals by default).
fn shrink_sealed(file: &File) -> bool {
    // SAFETY: F_GET_SEALS only reads the file's seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        let fd =
            nix::sys::memfd::memfd_create(c"test-guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let file = File::from(fd);
        file.set_len(len).unwrap();
        file
    }

    fn region(gpa: u64, size: u64, vmm: u64, offset: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, vmm, offset)
    }

    #[test]
    fn a_region_longer_than_its_file_is_refused() {
        let mut table = MemoryTable::new(MemoryLimits::default());
        let err = table
            .replace(&[region(0, 1 << 20, 0x7000_0000, 0)], vec![memfd(4096)])
            .unwrap_err();
        assert!(matches!(err, MemoryError::BeyondFile { .. }), "{err}");
        assert!(table.memory().is_none());

        let err = table
            .replace(&[region(0, 4096, 0x7000_0000, 4096)], vec![memfd(4096)])
            .unwrap_err();
        assert!(matches!(err, MemoryError::BeyondFile { .. }), "{err}");
    }

    #[test]
    fn overflowing_numbers_and_empty_regions_are_refused() {
        let mut table = MemoryTable::new(MemoryLimits::default());
        for bad in [
            region(u64::MAX - 10, 4096, 0, 0),
            region(0, 4096, u64::MAX - 10, 0),
            region(0, 4096, 0, u64::MAX - 10),
            region(0, 0, 0, 0),
        ] {
            assert!(table.replace(&[bad], vec![memfd(4096)]).is_err());
        }
        assert!(table.memory().is_none());
    }

    #[test]
    fn pipes_and_sockets_are_not_memory() {
        let mut table = MemoryTable::new(MemoryLimits::default());
        let (read, _write) = nix::unistd::pipe().unwrap();
        let err = table
            .replace(&[region(0, 4096, 0, 0)], vec![File::from(read)])
            .unwrap_err();
        assert!(
            matches!(err, MemoryError::NotAFile { kind: "pipe", .. }),
            "{err}"
        );
    }

    #[test]
    fn overlapping_regions_are_refused_whole() {
        let mut table = MemoryTable::new(MemoryLimits::default());
        table
            .replace(&[region(0, 8192, 0x1000_0000, 0)], vec![memfd(8192)])
            .unwrap();
        let err = table
            .replace(
                &[
                    region(0, 8192, 0x2000_0000, 0),
                    region(4096, 8192, 0x3000_0000, 0),
                ],
                vec![memfd(8192), memfd(8192)],
            )
            .unwrap_err();
        assert!(
            matches!(err, MemoryError::Overlap { index: 1, .. }),
            "{err}"
        );
        // The old table is still there.
        assert_eq!(table.guest_address(0x1000_0010), Some(GuestAddress(0x10)));

        let err = table
            .add(&region(0x10_0000, 4096, 0x1000_0000, 0), memfd(4096))
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::Overlap {
                    what: "VMM addresses",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn region_and_byte_limits_hold_for_tables_and_added_regions() {
        let limits = MemoryLimits {
            max_regions: 2,
            max_bytes: 3 * 4096,
        };
        let mut table = MemoryTable::new(limits);
        table
            .add(&region(0, 4096, 0x1000_0000, 0), memfd(4096))
            .unwrap();
        table
            .add(&region(0x10_0000, 4096, 0x2000_0000, 0), memfd(4096))
            .unwrap();
        let err = table
            .add(&region(0x20_0000, 4096, 0x3000_0000, 0), memfd(4096))
            .unwrap_err();
        assert!(matches!(err, MemoryError::TooManyRegions { .. }), "{err}");

        table.remove(&region(0x10_0000, 4096, 0, 0)).unwrap();
        let err = table
            .add(
                &region(0x20_0000, 3 * 4096, 0x3000_0000, 0),
                memfd(3 * 4096),
            )
            .unwrap_err();
        assert!(matches!(err, MemoryError::TooLarge { .. }), "{err}");
        assert_eq!(table.mapped_bytes(), 4096);

        let err = table
            .replace(
                &[region(0, 4 * 4096, 0x1000_0000, 0)],
                vec![memfd(4 * 4096)],
            )
            .unwrap_err();
        assert!(matches!(err, MemoryError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn vmm_addresses_translate_within_regions_only() {
        let mut table = MemoryTable::new(MemoryLimits::default());
        table
            .replace(
                &[
                    region(0, 8192, 0x1000_0000, 0),
                    region(0x10_0000, 4096, 0x2000_0000, 4096),
                ],
                vec![memfd(8192), memfd(8192)],
            )
            .unwrap();
        assert_eq!(table.guest_address(0x1000_1fff), Some(GuestAddress(0x1fff)));
        assert_eq!(
            table.guest_address(0x2000_0004),
            Some(GuestAddress(0x10_0004))
        );
        assert_eq!(table.guest_address(0x1000_2000), None);
        assert_eq!(table.guest_address(u64::MAX), None);
    }
}
