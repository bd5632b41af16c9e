//! The vhost-user protocol handler of one frontend connection (vhost-user spec, "Front-end
//! message types"). It owns the connection's guest memory map and vrings; the PMD reads them
//! through [`Connection`](crate::device::Connection).
//!
//! Written against `vhost`'s `VhostUserBackendReqHandlerMut` rather than
//! `vhost-user-backend`'s daemon so that the data plane decides the connection's life: a fresh
//! handler per connection, tolerant of the message orders real frontends use (DPDK virtio-user
//! reconnecting in server mode disables rings before it re-negotiates features).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap};

use crate::backend::{GuestMem, NetBackend, MAX_QUEUE_SIZE};
use crate::device::DeviceShared;

/// Memory slots offered with CONFIGURE_MEM_SLOTS.
const MAX_MEM_SLOTS: u64 = 32;

struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// Protocol state of one connection.
pub(crate) struct ConnHandler {
    backend: Arc<NetBackend>,
    mem: GuestMem,
    vrings: Vec<VringRwLock<GuestMem>>,
    mappings: Vec<Mapping>,
    acked_features: u64,
    acked_protocol: u64,
    kicks: KickWatcher,
}

impl ConnHandler {
    pub(crate) fn new(shared: Arc<DeviceShared>) -> io::Result<Self> {
        let backend = Arc::new(NetBackend::new(shared.clone())?);
        let mem: GuestMem = vm_memory::GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vrings = (0..backend.num_queues())
            .map(|_| VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE as u16))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| io::Error::other(format!("vring: {e:?}")))?;
        Ok(ConnHandler {
            backend,
            mem,
            vrings,
            mappings: Vec::new(),
            acked_features: 0,
            acked_protocol: 0,
            kicks: KickWatcher::start(shared)?,
        })
    }

    pub(crate) fn parts(&self) -> (Vec<VringRwLock<GuestMem>>, GuestMem, Arc<NetBackend>) {
        (self.vrings.clone(), self.mem.clone(), self.backend.clone())
    }

    fn vring(&self, index: u32) -> Result<&VringRwLock<GuestMem>> {
        self.vrings.get(index as usize).ok_or(Error::InvalidParam)
    }

    /// Translates a frontend virtual address (SET_VRING_ADDR) to a guest physical address.
    fn vmm_va_to_gpa(&self, va: u64) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| m.gpa + (va - m.vmm_addr))
            .ok_or(Error::InvalidParam)
    }

    fn reset_vrings(&mut self) {
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
}

fn unsupported<T>(what: &'static str) -> Result<T> {
    Err(Error::InvalidOperation(what))
}

impl VhostUserBackendReqHandlerMut for ConnHandler {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset_vrings();
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset_vrings();
        self.acked_features = 0;
        self.backend.acked_features(0);
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.backend.features() != 0 {
            return Err(Error::InvalidParam);
        }
        self.acked_features = features;
        self.backend.acked_features(features);
        let event_idx =
            features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        self.backend.set_event_idx(event_idx);
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

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return unsupported("postcopy");
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let region =
                GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(r.guest_phys_addr))
                    .ok_or(Error::InvalidParam)?;
            regions.push(region);
            mappings.push(Mapping {
                vmm_addr: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| Error::ReqHandlerError(io::Error::other(e)))?;
        // The PMD loads the memory per burst, so it sees the new table on its next one.
        self.mem.lock().unwrap().replace(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if num == 0 || num as usize > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            return Err(Error::InvalidParam);
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        let v = self.vring(index)?;
        v.set_queue_info(desc, avail, used)
            .map_err(|_| Error::InvalidParam)?;
        // The used index in guest memory is the ground truth of what a previous backend
        // instance completed. A frontend that reconnects after a backend restart may send a
        // base (SET_VRING_BASE comes before SET_VRING_ADDR) that does not match it — DPDK
        // virtio-user sends 0 — so resume both indices from it; the few chains in flight are
        // redone (TX) or refilled (RX), as DPDK's own vhost library does.
        let idx = v.queue_used_idx().map_err(|_| Error::InvalidParam)?;
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

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        // "Stop ring upon receiving VHOST_USER_GET_VRING_BASE."
        let v = self.vring(index)?;
        v.set_queue_ready(false);
        let next = v.queue_next_avail();
        v.set_kick(None);
        v.set_call(None);
        self.kicks.forget(index as usize);
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let watch = match &fd {
            Some(f) => Some(f.try_clone().map_err(Error::ReqHandlerError)?),
            None => None,
        };
        let v = self.vring(index as u32)?;
        v.set_kick(fd);
        // "Start ring upon receiving a kick file descriptor."
        v.set_queue_ready(true);
        self.kicks
            .watch(index as usize, watch)
            .map_err(Error::ReqHandlerError)?;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(index as u32)?.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(index as u32)?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        // The spec sends this only after PROTOCOL_FEATURES, but a reconnecting DPDK virtio-user
        // disables its rings first; honouring it is harmless either way.
        self.vring(index)?.set_enabled(enable);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        // The virtio-net config space is read-only for the driver (§5.1.4).
        unsupported("virtio-net config space is read-only")
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.backend.set_backend_req_fd(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        unsupported("gpu socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        unsupported("shared objects")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        unsupported("inflight tracking")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        unsupported("inflight tracking")
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return unsupported("postcopy");
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(Error::InvalidParam);
        }
        let r = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region(fd)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(Error::InvalidParam)?,
        );
        let mem = self
            .mem
            .memory()
            .insert_region(r)
            .map_err(|e| Error::ReqHandlerError(io::Error::other(e)))?;
        self.mem.lock().unwrap().replace(mem);
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| Error::ReqHandlerError(io::Error::other(e)))?;
        self.mem.lock().unwrap().replace(mem);
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        unsupported("device state transfer")
    }

    fn check_device_state(&mut self) -> Result<()> {
        unsupported("device state transfer")
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        unsupported("shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        unsupported("dirty page logging")
    }
}

/// A thread that turns guest kicks into PMD wakeups. Kicks only arrive while the PMD has
/// notifications enabled, i.e. when it is about to sleep (adaptive mode).
struct KickWatcher {
    epoll: Arc<OwnedFd>,
    exit: OwnedFd,
    watched: Vec<Option<File>>,
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

fn read_eventfd(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into `v` from an eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

impl KickWatcher {
    fn start(shared: Arc<DeviceShared>) -> io::Result<Self> {
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
        let thread = std::thread::Builder::new()
            .name(format!("kick-{}", shared.name))
            .spawn(move || {
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
                        read_eventfd(ev.u64 as RawFd);
                        kicked = true;
                    }
                    if kicked {
                        shared.wake();
                    }
                }
            })?;
        Ok(KickWatcher {
            epoll,
            exit,
            watched: Vec::new(),
            thread: Some(thread),
        })
    }

    fn watch(&mut self, queue: usize, fd: Option<File>) -> io::Result<()> {
        self.forget(queue);
        if let Some(f) = fd {
            epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                f.as_raw_fd(),
                f.as_raw_fd() as u64,
            )?;
            if self.watched.len() <= queue {
                self.watched.resize_with(queue + 1, || None);
            }
            self.watched[queue] = Some(f);
        }
        Ok(())
    }

    fn forget(&mut self, queue: usize) {
        if let Some(f) = self.watched.get_mut(queue).and_then(Option::take) {
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
