//! VFIO access to a device bound to vfio-pci, through rust-vmm's vfio-ioctls: the container
//! (type1 IOMMU) and group, the device fd, its regions and interrupts, BAR mapping, DMA
//! mapping. `probe` is what `torii-vfio probe` shows; `edu_dma_check` proves DMA through the
//! IOMMU with QEMU's `edu` test device.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::pci::PciAddr;

/// Region indexes of a vfio-pci device (linux/vfio.h).
const BAR_REGIONS: u32 = 6;
const ROM_REGION: u32 = 6;
const CONFIG_REGION: u32 = 7;
/// Interrupt indexes: INTx, MSI, MSI-X, error, request.
const IRQ_NAMES: [&str; 5] = ["intx", "msi", "msix", "err", "req"];

const REGION_FLAG_READ: u32 = 1 << 0;
const REGION_FLAG_WRITE: u32 = 1 << 1;
const REGION_FLAG_MMAP: u32 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("{addr}: {what}: {source}")]
    Vfio {
        addr: PciAddr,
        what: &'static str,
        source: vfio_ioctls::VfioError,
    },
    #[error("{addr}: {msg}")]
    Other { addr: PciAddr, msg: String },
}

impl VfioError {
    fn other(addr: PciAddr, msg: impl Into<String>) -> Self {
        VfioError::Other {
            addr,
            msg: msg.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RegionReport {
    pub index: u32,
    pub name: String,
    pub size: u64,
    pub offset: u64,
    pub read: bool,
    pub write: bool,
    pub mmap: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct IrqReport {
    pub index: u32,
    pub name: &'static str,
    pub count: u32,
    pub flags: u32,
}

/// What `probe` found.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub addr: PciAddr,
    pub iommu_group: u32,
    pub regions: Vec<RegionReport>,
    pub irqs: Vec<IrqReport>,
    /// The first BAR that could be mapped, and its first 32-bit word read through the map.
    pub mapped_bar: Option<(u32, u32)>,
}

/// An open device: the container it is attached through and the device.
pub struct Opened {
    pub addr: PciAddr,
    pub container: Arc<VfioContainer>,
    pub device: VfioDevice,
}

/// Opens `addr` (bound to vfio-pci, its group viable) through a new type1 container.
pub fn open(sysfs_dir: &Path, addr: PciAddr) -> Result<Opened, VfioError> {
    let container = Arc::new(VfioContainer::new(None).map_err(|source| VfioError::Vfio {
        addr,
        what: "opening /dev/vfio/vfio",
        source,
    })?);
    let ops: Arc<dyn VfioOps> = container.clone();
    let device = VfioDevice::new(sysfs_dir, ops, false).map_err(|source| VfioError::Vfio {
        addr,
        what: "opening the device through its VFIO group",
        source,
    })?;
    Ok(Opened {
        addr,
        container,
        device,
    })
}

/// A BAR mapped into our address space; unmapped on drop.
pub struct MappedBar {
    ptr: *mut u8,
    len: usize,
}

impl MappedBar {
    /// Reads the 32-bit register at `offset`.
    pub fn read32(&self, offset: usize) -> u32 {
        assert!(
            offset.is_multiple_of(4) && offset.checked_add(4).is_some_and(|end| end <= self.len),
            "offset {offset} outside the BAR"
        );
        // SAFETY: inside the mapping (checked above), 4-byte aligned; device memory is read
        // with a volatile access.
        unsafe { std::ptr::read_volatile(self.ptr.add(offset).cast::<u32>()) }
    }

    /// Writes the 32-bit register at `offset`.
    pub fn write32(&self, offset: usize, v: u32) {
        assert!(
            offset.is_multiple_of(4) && offset.checked_add(4).is_some_and(|end| end <= self.len),
            "offset {offset} outside the BAR"
        );
        // SAFETY: as in read32.
        unsafe { std::ptr::write_volatile(self.ptr.add(offset).cast::<u32>(), v) }
    }

    /// Writes the 64-bit register at `offset` as two 32-bit halves, low first.
    pub fn write64(&self, offset: usize, v: u64) {
        self.write32(offset, v as u32);
        self.write32(offset + 4, (v >> 32) as u32);
    }
}

impl Drop for MappedBar {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what map_bar mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Opened {
    /// Maps BAR `index` (which must be mappable).
    pub fn map_bar(&self, index: u32) -> Result<MappedBar, VfioError> {
        use std::os::fd::AsRawFd;
        let d = &self.device;
        let (flags, size, offset) = (
            d.get_region_flags(index),
            d.get_region_size(index),
            d.get_region_offset(index),
        );
        if index >= BAR_REGIONS || flags & REGION_FLAG_MMAP == 0 || size == 0 {
            return Err(VfioError::other(
                self.addr,
                format!("BAR {index} cannot be mapped (size {size}, flags {flags:#x})"),
            ));
        }
        let len = usize::try_from(size).map_err(|_| VfioError::other(self.addr, "BAR too big"))?;
        // SAFETY: a new shared mapping of the device fd at the region's offset, which the
        // kernel checks; nothing else is at the returned address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                d.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::other(
                self.addr,
                format!("mmap of BAR {index}: {}", std::io::Error::last_os_error()),
            ));
        }
        Ok(MappedBar {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Sets the Bus Master bit of the PCI command register, so the device may DMA.
    pub fn enable_bus_master(&self) {
        let mut cmd = [0u8; 2];
        self.device.region_read(CONFIG_REGION, &mut cmd, 4);
        let v = u16::from_le_bytes(cmd) | (1 << 2) | (1 << 1);
        self.device.region_write(CONFIG_REGION, &v.to_le_bytes(), 4);
    }
}

/// Opens `addr` and lists its regions and interrupts; maps the first mappable BAR.
pub fn probe(sysfs_dir: &Path, addr: PciAddr, iommu_group: u32) -> Result<ProbeReport, VfioError> {
    let o = open(sysfs_dir, addr)?;
    let d = &o.device;
    let mut regions = Vec::new();
    for i in 0..=CONFIG_REGION {
        let (flags, size) = (d.get_region_flags(i), d.get_region_size(i));
        if size == 0 {
            continue;
        }
        regions.push(RegionReport {
            index: i,
            name: match i {
                ROM_REGION => "rom".into(),
                CONFIG_REGION => "config".into(),
                b => format!("bar{b}"),
            },
            size,
            offset: d.get_region_offset(i),
            read: flags & REGION_FLAG_READ != 0,
            write: flags & REGION_FLAG_WRITE != 0,
            mmap: flags & REGION_FLAG_MMAP != 0,
        });
    }
    let irqs = IRQ_NAMES
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let info = d.get_irq_info(i as u32)?;
            Some(IrqReport {
                index: i as u32,
                name,
                count: info.count,
                flags: info.flags,
            })
        })
        .collect();
    let mapped_bar = regions
        .iter()
        .filter(|r| r.index < BAR_REGIONS && r.mmap)
        .find_map(|r| {
            let bar = o.map_bar(r.index).ok()?;
            Some((r.index, bar.read32(0)))
        });
    Ok(ProbeReport {
        addr,
        iommu_group,
        regions,
        irqs,
        mapped_bar,
    })
}

/// QEMU's `edu` test device (docs/specs/edu.rst): identification register, DMA engine
/// registers and its 4 KiB internal buffer at device address 0x40000. Its DMA addresses are 28
/// bits wide.
const EDU_ID: usize = 0x00;
const EDU_DMA_SRC: usize = 0x80;
const EDU_DMA_DST: usize = 0x88;
const EDU_DMA_COUNT: usize = 0x90;
const EDU_DMA_CMD: usize = 0x98;
const EDU_CMD_START: u32 = 1;
const EDU_CMD_TO_RAM: u32 = 2;
const EDU_BUFFER: u32 = 0x40000;
const PAGE: usize = 4096;

/// What `edu_dma_check` did.
#[derive(Clone, Debug, Serialize)]
pub struct DmaReport {
    pub id: u32,
    /// IOVAs of the source and destination pages (mapped through the type1 IOMMU).
    pub iova_src: u64,
    pub iova_dst: u64,
    /// The page DMA'd to the device and back equals the original.
    pub round_trip_equal: bool,
    /// The IOVA the device was told to write to after its mapping was removed.
    pub unmapped_iova: u64,
    /// The page that had been mapped there was not touched by that write.
    pub unmapped_write_blocked: bool,
}

/// Anonymous page-aligned memory; unmapped on drop.
struct Pages {
    ptr: *mut u8,
    len: usize,
}

impl Pages {
    fn new(len: usize) -> std::io::Result<Pages> {
        // SAFETY: a new private anonymous mapping; nothing else uses the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Pages {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The bytes, read volatile (a device may have written them).
    fn read(&self) -> Vec<u8> {
        (0..self.len)
            // SAFETY: inside the mapping.
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(i)) })
            .collect()
    }

    fn fill(&self, f: impl Fn(usize) -> u8) {
        for i in 0..self.len {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(i), f(i)) };
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Whether this process's pinned memory is bounded by RLIMIT_MEMLOCK: a finite limit and no
/// CAP_IPC_LOCK (so an ENOMEM from a DMA map is most likely that limit).
fn memlock_bounds_dma() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `lim`.
    let finite = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY;
    let ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    finite && !ipc_lock
}

/// DMA through the IOMMU with QEMU's `edu` device at `addr` (bound to vfio-pci): a page
/// mapped at one IOVA is copied into the device and back to a page mapped at another, and must
/// arrive byte-exact; once that page is unmapped, a copy to its IOVA must not reach it (the
/// IOMMU blocks it and the kernel logs a DMA fault).
pub fn edu_dma_check(sysfs_dir: &Path, addr: PciAddr) -> Result<DmaReport, VfioError> {
    let o = open(sysfs_dir, addr)?;
    let bar = o.map_bar(0)?;
    let id = bar.read32(EDU_ID);
    if id & 0xffff != 0x00ed {
        return Err(VfioError::other(
            addr,
            format!("not an edu device (identification {id:#x})"),
        ));
    }
    o.enable_bus_master();
    let io = |e: std::io::Error| VfioError::other(addr, e.to_string());
    let (src, dst) = (Pages::new(PAGE).map_err(io)?, Pages::new(PAGE).map_err(io)?);
    src.fill(|i| (i as u8).wrapping_mul(31).wrapping_add(7));
    dst.fill(|_| 0);
    let (iova_src, iova_dst) = (0x10_0000u64, 0x10_1000u64);
    for (iova, p) in [(iova_src, &src), (iova_dst, &dst)] {
        // SAFETY: the pages stay mapped until after the unmap below (they are dropped last).
        unsafe { o.container.vfio_dma_map(iova, PAGE, p.ptr) }.map_err(|source| match source {
            // The type1 IOMMU pins the pages it maps and counts them against the caller's
            // RLIMIT_MEMLOCK unless it has CAP_IPC_LOCK.
            vfio_ioctls::VfioError::IommuDmaMap(e)
                if e.errno() == libc::ENOMEM && memlock_bounds_dma() =>
            {
                VfioError::other(
                    addr,
                    format!("mapping a page for DMA: {e}: pages mapped for DMA are pinned and count against RLIMIT_MEMLOCK; raise the limit or grant CAP_IPC_LOCK"),
                )
            }
            source => VfioError::Vfio {
                addr,
                what: "mapping a page for DMA",
                source,
            },
        })?;
    }
    let transfer = |from: u64, to: u64, cmd: u32| -> Result<(), VfioError> {
        bar.write32(EDU_DMA_SRC, from as u32);
        bar.write32(EDU_DMA_DST, to as u32);
        bar.write32(EDU_DMA_COUNT, PAGE as u32);
        bar.write32(EDU_DMA_CMD, cmd | EDU_CMD_START);
        let t0 = std::time::Instant::now();
        while bar.read32(EDU_DMA_CMD) & EDU_CMD_START != 0 {
            if t0.elapsed() > std::time::Duration::from_secs(5) {
                return Err(VfioError::other(addr, "edu DMA did not complete in 5 s"));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    };
    let result = (|| {
        transfer(iova_src, u64::from(EDU_BUFFER), 0)?;
        transfer(u64::from(EDU_BUFFER), iova_dst, EDU_CMD_TO_RAM)?;
        let round_trip_equal = dst.read() == src.read();
        // Now the destination page unmapped, cleared, and the device told to write there
        // again: the IOMMU must block it, so the page stays clear.
        o.container
            .vfio_dma_unmap(iova_dst, PAGE)
            .map_err(|source| VfioError::Vfio {
                addr,
                what: "unmapping a page",
                source,
            })?;
        dst.fill(|_| 0);
        transfer(u64::from(EDU_BUFFER), iova_dst, EDU_CMD_TO_RAM)?;
        let unmapped_write_blocked = dst.read().iter().all(|&b| b == 0);
        Ok(DmaReport {
            id,
            iova_src,
            iova_dst,
            round_trip_equal,
            unmapped_iova: iova_dst,
            unmapped_write_blocked,
        })
    })();
    for iova in [iova_src, iova_dst] {
        let _ = o.container.vfio_dma_unmap(iova, PAGE);
    }
    result
}
