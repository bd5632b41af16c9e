//! The vhost-user protocol handler of one frontend connection (vhost-user spec, "Front-end
//! message types"). It owns the connection's guest memory map and vrings; the data path reads
//! them through [`Connection`]. What is device specific (features, queues, config space)
//! comes from the [`DeviceModel`].
//!
//! `protocol.rs` frames the messages and calls these methods. A fresh handler serves each
//! connection, so nothing of a previous frontend (memory map, rings, features) leaks into the
//! next, and it accepts the message orders real frontends use: QEMU enables queue pair 0
//! (SET_VRING_ENABLE) when the NIC is realized, before any SET_FEATURES, and DPDK
//! virtio-user disables its rings before re-negotiating when it reconnects in server mode.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestAddressSpace, GuestRegionMmap};

use crate::endpoint::{Connection, EndpointShared};
use crate::guard::Owned;
use crate::inflight::{InflightInfo, InflightMap};
use crate::{DeviceModel, GuestMem, MemTable, MAX_QUEUE_SIZE};

/// Memory slots offered with CONFIGURE_MEM_SLOTS.
pub(crate) const MAX_MEM_SLOTS: u64 = 32;

/// Largest GET_CONFIG / SET_CONFIG transfer (the spec's VHOST_USER_MAX_CONFIG_SIZE).
pub(crate) const MAX_CONFIG_SIZE: usize = 256;

/// Why a request was refused; the frontend gets a non-zero ack when it asked for one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("invalid parameter: {0}")]
    InvalidParam(&'static str),
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// One guest memory region as SET_MEM_TABLE / ADD_MEM_REG describe it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemRegion {
    pub gpa: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

/// Checks that `len` bytes at `offset` of the frontend's `file` can be mapped and touched:
/// a regular file (memfd, hugetlbfs and tmpfs files are) long enough to back all of them. A
/// mapping past the end of its file would SIGBUS the daemon at the first access there.
fn check_backing(file: &File, offset: u64, len: u64, what: &'static str) -> Result<()> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::InvalidParam(what));
    }
    match offset.checked_add(len) {
        Some(end) if end <= meta.len() => Ok(()),
        _ => Err(Error::InvalidParam(what)),
    }
}

impl MemRegion {
    /// Maps the region, guarded against the frontend truncating its file later
    /// ([`crate::guard`]): the region owns the mapping and its guard, released together.
    fn map(&self, file: File) -> Result<GuestRegionMmap<Owned>> {
        if self.size == 0 || self.size > isize::MAX as u64 {
            return Err(Error::InvalidParam("memory region size"));
        }
        check_backing(
            &file,
            self.mmap_offset,
            self.size,
            "memory region not backed by its file",
        )?;
        if self.gpa.checked_add(self.size).is_none() {
            return Err(Error::InvalidParam("region overflows"));
        }
        let len = self.size as usize;
        let owned = Owned::map(&file, self.mmap_offset, len)?;
        let addr = owned.addr().ok_or(Error::InvalidParam("memory region"))?;
        // SAFETY: `addr` is the start of a live shared mapping of `len` bytes that `owned`
        // made and unmaps only when dropped, which happens when the region is dropped.
        let region = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, owned)
                .with_raw_mmap_pointer(addr)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .with_file_offset(FileOffset::new(file, self.mmap_offset))
                .build()
        }
        .map_err(|e| Error::Io(io::Error::other(e)))?;
        GuestRegionMmap::new(region, GuestAddress(self.gpa))
            .ok_or(Error::InvalidParam("region overflows"))
    }
}

struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// The largest queue size of `model`'s queues: its own limit, within [`MAX_QUEUE_SIZE`] and
/// rounded down to a power of two (a queue's initial and reset size).
fn max_queue_size<M: DeviceModel>(model: &M) -> u16 {
    let max = model.max_queue_size().clamp(1, MAX_QUEUE_SIZE);
    1 << (usize::BITS - 1 - max.leading_zeros())
}

/// Protocol state of one connection.
pub(crate) struct ConnHandler<M: DeviceModel> {
    shared: Arc<EndpointShared<M>>,
    conn: Arc<Connection>,
    mem: GuestMem,
    /// Bumped after every change of `mem`: the PMD keeps its own reference to the table (and
    /// ring translations made under it) until this moves.
    mem_generation: Arc<AtomicU64>,
    vrings: Vec<VringRwLock<GuestMem>>,
    mappings: Vec<Mapping>,
    acked_features: u64,
    acked_protocol: u64,
    kicks: KickWatcher,
}

impl<M: DeviceModel> ConnHandler<M> {
    pub(crate) fn new(shared: Arc<EndpointShared<M>>) -> io::Result<Self> {
        let mem: GuestMem = vm_memory::GuestMemoryAtomic::new(MemTable::new());
        let queues = shared.model.num_queues().min(crate::MAX_QUEUES);
        let max_size = max_queue_size(&shared.model);
        let vrings = (0..queues)
            .map(|_| VringRwLock::new(mem.clone(), max_size))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| io::Error::other(format!("vring: {e:?}")))?;
        let mem_generation = Arc::new(AtomicU64::new(0));
        let conn = Arc::new(Connection::new(
            vrings.clone(),
            mem.clone(),
            mem_generation.clone(),
        ));
        let s = shared.clone();
        let kicks = KickWatcher::start(&shared.name, move || s.wake())?;
        Ok(ConnHandler {
            shared,
            conn,
            mem,
            mem_generation,
            vrings,
            mappings: Vec::new(),
            acked_features: 0,
            acked_protocol: 0,
            kicks,
        })
    }

    /// What the data path needs of this connection.
    pub(crate) fn connection(&self) -> Arc<Connection> {
        self.conn.clone()
    }

    /// Installs a new memory table; the PMD picks it up at its next burst.
    fn set_mem(&self, mem: MemTable) {
        self.mem.lock().unwrap().replace(mem);
        self.mem_generation.fetch_add(1, Ordering::Release);
    }

    fn vring(&self, index: u32) -> Result<&VringRwLock<GuestMem>> {
        self.vrings
            .get(index as usize)
            .ok_or(Error::InvalidParam("vring index"))
    }

    /// Translates a frontend virtual address (SET_VRING_ADDR) to a guest physical address.
    fn vmm_va_to_gpa(&self, va: u64) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| m.gpa + (va - m.vmm_addr))
            .ok_or(Error::InvalidParam("ring address outside the memory table"))
    }

    fn reset_vrings(&mut self) {
        self.shared.bump_queue_epoch(None);
        for (i, v) in self.vrings.iter().enumerate() {
            v.set_queue_ready(false);
            v.set_enabled(false);
            v.get_mut().get_queue_mut().reset();
            v.set_kick(None);
            v.set_call(None);
            v.set_err(None);
            self.kicks.forget(i);
        }
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    pub(crate) fn acked_protocol(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::from_bits_truncate(self.acked_protocol)
    }

    pub(crate) fn reset_owner(&mut self) -> Result<()> {
        self.reset_vrings();
        self.acked_features = 0;
        self.conn.set_acked_features(0);
        Ok(())
    }

    pub(crate) fn reset_device(&mut self) -> Result<()> {
        self.reset_vrings();
        self.acked_features = 0;
        self.conn.set_acked_features(0);
        Ok(())
    }

    pub(crate) fn get_features(&mut self) -> Result<u64> {
        Ok(self.shared.model.features())
    }

    pub(crate) fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.shared.model.features() != 0 {
            return Err(Error::InvalidParam("feature not offered"));
        }
        self.acked_features = features;
        self.conn.set_acked_features(features);
        let event_idx = self.conn.event_idx();
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled (spec, "Ring states").
        if !self.protocol_features_acked() {
            for v in &self.vrings {
                v.set_enabled(true);
            }
        }
        Ok(())
    }

    pub(crate) fn set_mem_table(&mut self, regions: &[MemRegion], files: Vec<File>) -> Result<()> {
        if regions.len() != files.len() || regions.len() as u64 > MAX_MEM_SLOTS {
            return Err(Error::InvalidParam("memory table"));
        }
        // Frontends need not send the regions in guest address order; the table wants it.
        let mut sorted: Vec<(&MemRegion, File)> = regions.iter().zip(files).collect();
        sorted.sort_by_key(|(r, _)| r.gpa);
        let mut mapped = Vec::with_capacity(sorted.len());
        for (r, file) in sorted {
            mapped.push(r.map(file)?);
        }
        let mem = MemTable::from_regions(mapped).map_err(|e| Error::Io(io::Error::other(e)))?;
        self.set_mem(mem);
        self.mappings = regions
            .iter()
            .map(|r| Mapping {
                vmm_addr: r.user_addr,
                size: r.size,
                gpa: r.gpa,
            })
            .collect();
        Ok(())
    }

    pub(crate) fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = max_queue_size(&self.shared.model);
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(Error::InvalidParam("queue size"));
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    pub(crate) fn set_vring_addr(
        &mut self,
        index: u32,
        descriptor: u64,
        used: u64,
        available: u64,
    ) -> Result<()> {
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        // Virtio 1.2 §2.7: alignment of the three areas. Checked first, so that a refused
        // request changes nothing.
        if desc % 16 != 0 || avail % 2 != 0 || used % 4 != 0 {
            return Err(Error::InvalidParam("ring alignment"));
        }
        let v = self.vring(index)?;
        let old = {
            let st = v.get_ref();
            let q = st.get_queue();
            (q.desc_table(), q.avail_ring(), q.used_ring())
        };
        v.set_queue_info(desc, avail, used)
            .map_err(|_| Error::InvalidParam("ring addresses"))?;
        let Ok(idx) = v.queue_used_idx() else {
            // The addresses were valid before (or never set): put them back.
            let _ = v.set_queue_info(old.0, old.1, old.2);
            return Err(Error::InvalidParam("used ring outside guest memory"));
        };
        // The used index in guest memory is the ground truth of what a previous backend
        // instance completed. A frontend that reconnects after a backend restart may send a
        // base (SET_VRING_BASE comes before SET_VRING_ADDR) that does not match it — DPDK
        // virtio-user sends 0 — so resume both indices from it; the few chains in flight are
        // redone (TX) or refilled (RX), as DPDK's own vhost library does.
        v.set_queue_next_used(idx);
        if v.queue_next_avail() != idx {
            tracing::info!(
                queue = index,
                base = v.queue_next_avail(),
                used = idx,
                "resuming ring from its used index"
            );
            v.set_queue_next_avail(idx);
        }
        Ok(())
    }

    pub(crate) fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    pub(crate) fn get_vring_base(&mut self, index: u32) -> Result<u16> {
        // "Stop ring upon receiving VHOST_USER_GET_VRING_BASE."
        let v = self.vring(index)?;
        v.set_queue_ready(false);
        self.shared.bump_queue_epoch(Some(index as usize));
        // Requests still in flight complete into the ring before its state is handed back.
        if !self
            .shared
            .wait_queue_idle(index as usize, std::time::Duration::from_secs(5))
        {
            tracing::warn!(queue = index, "ring stopped with requests still in flight");
        }
        let next = v.queue_next_avail();
        v.set_kick(None);
        v.set_call(None);
        self.kicks.forget(index as usize);
        Ok(next)
    }

    pub(crate) fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(index as u32)?;
        let watch = match &fd {
            Some(f) => Some(f.try_clone()?),
            None => None,
        };
        // Watched first: a fd epoll refuses (a regular file) is refused before the ring
        // changes.
        self.kicks.watch(index as usize, watch)?;
        let v = self.vring(index as u32)?;
        v.set_kick(fd);
        // "Start ring upon receiving a kick file descriptor."
        v.set_queue_ready(true);
        self.shared.bump_queue_epoch(Some(index as usize));
        Ok(())
    }

    pub(crate) fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(index as u32)?.set_call(fd);
        Ok(())
    }

    pub(crate) fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(index as u32)?.set_err(fd);
        Ok(())
    }

    pub(crate) fn get_protocol_features(&mut self) -> VhostUserProtocolFeatures {
        self.shared.model.protocol_features() | VhostUserProtocolFeatures::REPLY_ACK
    }

    pub(crate) fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        if features & !self.get_protocol_features().bits() != 0 {
            return Err(Error::InvalidParam("protocol feature not offered"));
        }
        self.acked_protocol = features;
        Ok(())
    }

    pub(crate) fn get_queue_num(&mut self) -> u64 {
        self.vrings.len() as u64
    }

    pub(crate) fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        // The spec sends this only after PROTOCOL_FEATURES, but a reconnecting DPDK virtio-user
        // disables its rings first; honouring it is harmless either way.
        self.vring(index)?.set_enabled(enable);
        Ok(())
    }

    /// GET_CONFIG: `size` bytes at `offset`, zeros past the end of the config space.
    pub(crate) fn get_config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.shared.model.config();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize((size as usize).min(MAX_CONFIG_SIZE), 0);
        out
    }

    /// SET_CONFIG: the device model only ever sees writes inside its config space.
    pub(crate) fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let len = self.shared.model.config().len();
        if data.len() > MAX_CONFIG_SIZE
            || (offset as usize)
                .checked_add(data.len())
                .is_none_or(|end| end > len)
        {
            return Err(Error::InvalidParam("config write outside the config space"));
        }
        self.shared
            .model
            .set_config(offset, data)
            .map_err(Error::Unsupported)
    }

    pub(crate) fn set_backend_req_fd(&mut self, backend: Backend) {
        self.conn.set_backend_req(backend);
    }

    /// GET_INFLIGHT_FD: a fresh, initialized inflight region for `info.num_queues` queues of
    /// `info.queue_size`, shared with the frontend, which keeps it across backend restarts.
    pub(crate) fn get_inflight_fd(&mut self, info: &InflightInfo) -> Result<(InflightInfo, File)> {
        if !self.inflight_offered() {
            return Err(Error::Unsupported("INFLIGHT_SHMFD not offered"));
        }
        let (map, file) = InflightMap::create(info.num_queues, info.queue_size)
            .map_err(|e| Error::Io(io::Error::other(e)))?;
        let reply = InflightInfo {
            mmap_size: map.len() as u64,
            mmap_offset: 0,
            ..*info
        };
        Ok((reply, file))
    }

    /// SET_INFLIGHT_FD: the region to record in-flight requests in (possibly written by a
    /// previous instance of this backend, whose requests the data path then resubmits).
    pub(crate) fn set_inflight_fd(&mut self, info: &InflightInfo, file: File) -> Result<()> {
        if !self.inflight_offered() {
            return Err(Error::Unsupported("INFLIGHT_SHMFD not offered"));
        }
        check_backing(
            &file,
            info.mmap_offset,
            info.mmap_size,
            "inflight region not backed by its file",
        )?;
        let map = InflightMap::open(file, info).map_err(|e| Error::Io(io::Error::other(e)))?;
        self.conn.set_inflight(Some(Arc::new(map)));
        self.shared.bump_queue_epoch(None);
        Ok(())
    }

    fn inflight_offered(&self) -> bool {
        self.shared
            .model
            .protocol_features()
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    pub(crate) fn add_mem_region(&mut self, region: &MemRegion, file: File) -> Result<()> {
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(Error::InvalidParam("no free memory slot"));
        }
        let r = region.map(file)?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(r))
            .map_err(|e| Error::Io(io::Error::other(e)))?;
        self.set_mem(mem);
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.size,
            gpa: region.gpa,
        });
        Ok(())
    }

    pub(crate) fn remove_mem_region(&mut self, region: &MemRegion) -> Result<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.gpa), region.size)
            .map_err(|e| Error::Io(io::Error::other(e)))?;
        self.set_mem(mem);
        self.mappings.retain(|m| m.gpa != region.gpa);
        Ok(())
    }
}

#[cfg(any(test, feature = "test-support"))]
impl<M: DeviceModel> ConnHandler<M> {
    /// Asserts what the handler promises about its state whatever the frontend sent, and
    /// returns that state. Touches the first and last byte of every guest memory region: a
    /// region mapped past the end of its file would SIGBUS here.
    pub(crate) fn check_invariants(&self) -> crate::fuzzing::HandlerState {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

        let model = &self.shared.model;
        let mem = self.mem.memory();
        // The memory table: bounded, as the mappings say, every byte backed by its file.
        assert!(mem.num_regions() as u64 <= MAX_MEM_SLOTS);
        assert_eq!(mem.num_regions(), self.mappings.len());
        let mut regions = Vec::new();
        for r in mem.iter() {
            let (start, len) = (r.start_addr().0, r.len());
            assert!(len > 0);
            assert!(
                self.mappings
                    .iter()
                    .any(|m| m.gpa == start && m.size == len),
                "region {start:#x}+{len:#x} has no mapping"
            );
            for a in [r.start_addr(), r.last_addr()] {
                mem.read_obj::<u8>(a).expect("guest memory readable");
            }
            regions.push((start, len));
        }
        assert_eq!(
            self.conn.mem.memory().num_regions(),
            mem.num_regions(),
            "the data path sees another memory table"
        );

        // Features: only what was offered, and the data path sees the same.
        assert_eq!(self.acked_features & !model.features(), 0);
        assert_eq!(self.conn.acked_features(), self.acked_features);
        let offered = self.shared.model.protocol_features() | VhostUserProtocolFeatures::REPLY_ACK;
        assert_eq!(self.acked_protocol & !offered.bits(), 0);

        // Vrings: as many as the device has, sizes within its limit, areas aligned.
        let max = max_queue_size(model);
        assert_eq!(self.vrings.len(), model.num_queues().min(crate::MAX_QUEUES));
        assert!(usize::from(max) <= MAX_QUEUE_SIZE);
        let watched = self.kicks.watched.lock().unwrap();
        assert!(watched.len() <= self.vrings.len());
        let mut queues = Vec::new();
        for (i, v) in self.vrings.iter().enumerate() {
            let st = v.get_ref();
            let q = st.get_queue();
            assert_eq!(q.max_size(), max);
            assert!(q.size() <= max && q.size().is_power_of_two(), "queue size");
            assert_eq!(q.desc_table() % 16, 0);
            assert_eq!(q.avail_ring() % 2, 0);
            assert_eq!(q.used_ring() % 4, 0);
            assert_eq!(q.event_idx_enabled(), self.conn.event_idx());
            let kick = st.get_kick().is_some();
            if watched.get(i).is_some_and(Option::is_some) {
                assert!(kick, "queue {i}: a kick fd watched but not set");
            }
            queues.push(crate::fuzzing::QueueState {
                size: q.size(),
                ready: q.ready(),
                enabled: st.is_enabled(),
                valid: q.is_valid(&*mem),
                kick,
                call: st.get_call().is_some(),
                next_avail: q.next_avail(),
                areas: (q.desc_table(), q.avail_ring(), q.used_ring()),
            });
        }

        let inflight = self.conn.inflight().map(|m| {
            let qs = m.queue_size();
            assert!(qs.is_power_of_two() && usize::from(qs) <= MAX_QUEUE_SIZE);
            assert!(m.len() >= crate::inflight::queue_region_size(qs));
            qs
        });
        crate::fuzzing::HandlerState {
            regions,
            acked_features: self.acked_features,
            acked_protocol: self.acked_protocol,
            queues,
            inflight_queue_size: inflight,
        }
    }
}

/// A thread that turns guest kicks into data-path wakeups. Kicks only arrive while the data
/// path has notifications enabled, i.e. when it is about to sleep.
struct KickWatcher {
    epoll: Arc<OwnedFd>,
    exit: OwnedFd,
    /// Per queue, the kick fd watched (its epoll token is the queue index). Shared with the
    /// thread, which reads a kick fd only under this lock: a fd the frontend replaced is never
    /// read after it was closed, when its number may already name another file.
    watched: Arc<Mutex<Vec<Option<File>>>>,
    thread: Option<JoinHandle<()>>,
}

const EXIT_TOKEN: u64 = u64::MAX;

fn epoll_ctl(epoll: RawFd, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: `ev` is valid for the call; the fds are owned by the caller.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What reading a kick fd found.
#[derive(Debug, PartialEq, Eq)]
enum KickRead {
    Kicked,
    Nothing,
    /// End of file or an error: not a live eventfd (a closed socket or pipe, say), which
    /// would otherwise stay readable and spin the thread.
    Dead,
}

/// Reads (consumes) a kick without ever blocking, whatever the fd's flags: the frontend owns
/// the file and may have drained it meanwhile, and a blocked read would hang the watcher and
/// the connection's teardown with it.
fn read_kick(fd: RawFd) -> KickRead {
    let mut v = 0u64;
    let iov = libc::iovec {
        iov_base: (&mut v as *mut u64).cast(),
        iov_len: 8,
    };
    loop {
        // SAFETY: `iov` describes the 8 bytes of `v`, alive for the call; offset -1 reads at
        // the file position, as read(2) does.
        let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        if n > 0 {
            return KickRead::Kicked;
        }
        if n == 0 {
            return KickRead::Dead;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return KickRead::Nothing,
            // A kernel without non-blocking reads of this file (or without preadv2): no read
            // here can be made safe from blocking (the frontend may drain the fd between a
            // poll and a read), so the fd is given up on, as a dead one is; the PMD still
            // polls the queue on its own timeout.
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => return KickRead::Dead,
            _ => return KickRead::Dead,
        }
    }
}

impl KickWatcher {
    fn start(name: &str, wake: impl Fn() + Send + 'static) -> io::Result<Self> {
        // SAFETY: no pointer arguments.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` is a fresh fd we own.
        let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(ep) });
        // SAFETY: no pointer arguments.
        let ex = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if ex < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ex` is a fresh fd we own.
        let exit = unsafe { OwnedFd::from_raw_fd(ex) };
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, exit.as_raw_fd(), EXIT_TOKEN)?;
        let ep2 = epoll.clone();
        let watched: Arc<Mutex<Vec<Option<File>>>> = Arc::default();
        let watched2 = watched.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kick-{name}"))
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadClass::Watcher);
                let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
                loop {
                    // SAFETY: `evs` has room for 16 events.
                    let n = unsafe { libc::epoll_wait(ep2.as_raw_fd(), evs.as_mut_ptr(), 16, -1) };
                    if n < 0 {
                        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return;
                    }
                    let mut kicked = false;
                    for ev in evs.iter().take(n as usize) {
                        if ev.u64 == EXIT_TOKEN {
                            return;
                        }
                        let queue = ev.u64 as usize;
                        let mut w = watched2.lock().unwrap();
                        // None: forgotten since epoll_wait returned.
                        let Some(f) = w.get(queue).and_then(Option::as_ref) else {
                            continue;
                        };
                        match read_kick(f.as_raw_fd()) {
                            KickRead::Kicked => kicked = true,
                            KickRead::Nothing => {}
                            KickRead::Dead => {
                                tracing::warn!(queue, "kick fd closed or not an eventfd: ignored");
                                let _ = epoll_ctl(
                                    ep2.as_raw_fd(),
                                    libc::EPOLL_CTL_DEL,
                                    f.as_raw_fd(),
                                    0,
                                );
                                w[queue] = None;
                            }
                        }
                    }
                    if kicked {
                        wake();
                    }
                }
            })?;
        Ok(KickWatcher {
            epoll,
            exit,
            watched,
            thread: Some(thread),
        })
    }

    /// Watches `fd` for `queue` instead of what was watched for it; an fd epoll refuses
    /// leaves the previous one watched.
    fn watch(&mut self, queue: usize, fd: Option<File>) -> io::Result<()> {
        let Some(f) = fd else {
            self.forget(queue);
            return Ok(());
        };
        let mut w = self.watched.lock().unwrap();
        // The new fd goes in first (the token is the queue, so both may be registered for a
        // moment), the old one out only then.
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            f.as_raw_fd(),
            queue as u64,
        )?;
        if w.len() <= queue {
            w.resize_with(queue + 1, || None);
        }
        if let Some(old) = w[queue].replace(f) {
            let _ = epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                old.as_raw_fd(),
                0,
            );
        }
        Ok(())
    }

    fn forget(&mut self, queue: usize) {
        let mut w = self.watched.lock().unwrap();
        if let Some(f) = w.get_mut(queue).and_then(Option::take) {
            let _ = epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                f.as_raw_fd(),
                0,
            );
        }
    }
}

impl Drop for KickWatcher {
    fn drop(&mut self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(self.exit.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{make_fd, FuzzFd, FuzzModel};
    use std::time::{Duration, Instant};
    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};

    #[test]
    fn dead_kick_fds_are_dropped_not_spun_on() {
        let shared = Arc::new(EndpointShared::new("kick-test".into(), FuzzModel::new(), 1));
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        shared.set_waker(0, Some(notifier));
        let mut h = ConnHandler::new(shared.clone()).unwrap();
        // A socket whose peer is gone is readable forever and reads 0 bytes.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        h.set_vring_kick(0, Some(File::from(OwnedFd::from(a))))
            .unwrap();
        // A live eventfd with a kick pending.
        let ev = make_fd(FuzzFd::Eventfd).unwrap();
        h.set_vring_kick(1, Some(File::from(ev))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.kicks.watched.lock().unwrap()[0].is_some() {
            assert!(Instant::now() < deadline, "dead kick fd still watched");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A wakeup for the real kick (waited for), not one per turn of a spinning loop.
        let mut wakes = 0u64;
        let deadline = Instant::now() + Duration::from_secs(5);
        while wakes == 0 {
            assert!(Instant::now() < deadline, "the live kick never woke anyone");
            std::thread::sleep(Duration::from_millis(1));
            // SAFETY: reads at most 8 bytes into `wakes` from the (non-blocking) eventfd.
            unsafe { libc::read(consumer.as_raw_fd(), (&mut wakes as *mut u64).cast(), 8) };
        }
        // Had it spun, more wakeups would pile up meanwhile.
        std::thread::sleep(Duration::from_millis(20));
        let mut more = 0u64;
        // SAFETY: as above.
        unsafe { libc::read(consumer.as_raw_fd(), (&mut more as *mut u64).cast(), 8) };
        assert!(wakes + more <= 2, "{wakes} + {more} wakeups");
        assert!(h.kicks.watched.lock().unwrap()[1].is_some());
        h.check_invariants();
        drop(h);
        assert_eq!(Arc::strong_count(&shared), 1, "kick thread joined");
    }

    #[test]
    fn kick_reads_never_block() {
        // A blocking eventfd with nothing pending (the frontend drained it): no kick, no wait.
        // SAFETY: no pointer arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        assert_eq!(read_kick(fd.as_raw_fd()), KickRead::Nothing);
        // SAFETY: writes 8 bytes from a u64.
        unsafe { libc::write(fd.as_raw_fd(), (&3u64 as *const u64).cast(), 8) };
        assert_eq!(read_kick(fd.as_raw_fd()), KickRead::Kicked);
        assert_eq!(read_kick(fd.as_raw_fd()), KickRead::Nothing);
    }

    #[test]
    fn queue_limits_follow_the_device() {
        struct Odd;
        impl DeviceModel for Odd {
            fn num_queues(&self) -> usize {
                1
            }
            fn max_queue_size(&self) -> usize {
                300
            }
            fn features(&self) -> u64 {
                0
            }
            fn protocol_features(&self) -> VhostUserProtocolFeatures {
                VhostUserProtocolFeatures::empty()
            }
            fn config(&self) -> Vec<u8> {
                Vec::new()
            }
        }
        assert_eq!(max_queue_size(&Odd), 256);
        assert_eq!(max_queue_size(&FuzzModel::new()), 256);
        let mut h = ConnHandler::new(Arc::new(EndpointShared::new("q".into(), Odd, 1))).unwrap();
        assert!(h.set_vring_num(0, 512).is_err());
        h.set_vring_num(0, 256).unwrap();
        h.reset_device().unwrap();
        assert_eq!(h.vrings[0].get_ref().get_queue().size(), 256);
    }
}
