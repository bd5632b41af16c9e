//! A userspace virtio-blk driver over vhost-user: a VM without a VM. It plays the frontend
//! (rust-vmm `vhost`'s `Frontend` for the protocol), owns "guest" memory (a shared memfd it
//! hands to the backend), and drives split virtqueues (virtio 1.2 §2.7) the way a polling
//! guest driver would: requests of three descriptors (header, data, status), a batch of them
//! made available with one index store, one kick when the backend asks for kicks, completions
//! polled from the used ring. It works against any vhost-user-blk backend: Torii's or
//! qemu-storage-daemon's.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

const F_VERSION_1: u64 = 1 << 32;
const F_BLK_SIZE: u64 = 1 << 6;
const F_MQ: u64 = 1 << 12;
const F_FLUSH: u64 = 1 << 9;
const F_RO: u64 = 1 << 5;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_INDIRECT_DESC: u64 = 1 << 28;
/// Most data descriptors of one request.
pub const MAX_SEGMENTS: u16 = 64;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Request types (virtio 1.2 §5.2.6).
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH as T_FLUSH, VIRTIO_BLK_T_GET_ID as T_GET_ID, VIRTIO_BLK_T_IN as T_IN,
    VIRTIO_BLK_T_OUT as T_OUT,
};

/// How to connect and lay out the queues.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub queues: u16,
    /// Descriptors per queue (a power of two); each request takes three.
    pub queue_size: u16,
    /// Requests each queue can have in flight (at most queue_size / 3).
    pub slots: u16,
    /// Largest transfer of one request (each slot has a data buffer this large).
    pub max_bytes: u32,
    /// Data descriptors per request: 1 for a direct chain of three descriptors; more for an
    /// indirect table (header, the data buffer cut in this many pieces, status), as a guest
    /// driver sends scatter-gather I/O.
    pub segments: u16,
}

/// What the device told us.
#[derive(Clone, Copy, Debug)]
pub struct DeviceInfo {
    pub capacity_sectors: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub flush: bool,
}

/// The shared "guest" memory: one memfd mapped here, and at guest physical address 0 in the
/// backend.
struct GuestMemory {
    file: File,
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; each queue's part is used by one thread only
// (see `DriverQueue`), and the map is only unmapped on drop.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"torii-blk-client".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: maps `len` bytes of the new file, shared, at an address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(GuestMemory {
            file,
            addr: addr.cast(),
            len,
        })
    }

    /// Host address of guest physical address `gpa`.
    fn host(&self, gpa: u64) -> *mut u8 {
        assert!(
            (gpa as usize) < self.len,
            "gpa {gpa:#x} outside client memory"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.addr.add(gpa as usize) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our mapping; no queue outlives the memory (they hold it).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Bytes of one queue's area: rings, then per slot a header, a status byte, an indirect
/// table and a data buffer.
fn queue_area(cfg: &ClientConfig) -> (u64, [u64; 6]) {
    let size = u64::from(cfg.queue_size);
    let slots = u64::from(cfg.slots);
    let desc = 0;
    let avail = desc + 16 * size;
    let used = align(avail + 6 + 2 * size, 4096);
    let hdrs = align(used + 6 + 8 * size, 64);
    let status = hdrs + 16 * slots;
    let ind = align(status + slots, 16);
    let data = align(ind + slots * 16 * (u64::from(cfg.segments) + 2), 4096);
    let end = align(data + slots * u64::from(cfg.max_bytes), 4096);
    (end, [desc, avail, used, hdrs, ind, data])
}

/// Whose file the inflight region sent back with SET_INFLIGHT_FD is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inflight {
    /// The backend's, from GET_INFLIGHT_FD.
    Backends,
    /// A copy in a memfd of the client's.
    Own,
}

/// `len` bytes of `file` from `offset`, copied into a new memfd.
fn copy_to_memfd(file: &File, offset: u64, len: u64) -> std::io::Result<File> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    file.read_exact_at(&mut bytes, offset)?;
    // SAFETY: the name is a NUL-terminated literal.
    let fd =
        unsafe { libc::memfd_create(c"torii-blk-client-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh fd we own.
    let own = unsafe { File::from_raw_fd(fd) };
    own.write_all_at(&bytes, 0)?;
    Ok(own)
}

/// A connected vhost-user-blk device.
pub struct BlkClient {
    frontend: Frontend,
    mem: Arc<GuestMemory>,
    info: DeviceInfo,
    queues: Vec<DriverQueue>,
    queues_at_connect: u64,
    /// The inflight region the backend made (GET_INFLIGHT_FD), when asked for.
    inflight: Option<File>,
}

impl BlkClient {
    /// Connects to `socket`, negotiates, shares the memory and starts `cfg.queues` queues.
    pub fn connect(socket: &Path, cfg: &ClientConfig) -> Result<Self, ClientError> {
        Self::open(socket, cfg, None)
    }

    /// As [`BlkClient::connect`], and has the backend track requests in flight in an inflight
    /// region it makes (GET_INFLIGHT_FD, then SET_INFLIGHT_FD with the same file), as QEMU
    /// does for a backend that may reconnect. This process does not map the region.
    pub fn connect_with_inflight(socket: &Path, cfg: &ClientConfig) -> Result<Self, ClientError> {
        Self::open(socket, cfg, Some(Inflight::Backends))
    }

    /// As [`BlkClient::connect_with_inflight`], but the region sent back with SET_INFLIGHT_FD
    /// is a copy in a file of this client's own making (which it may then truncate: the
    /// backend's own file is sealed at its size).
    pub fn connect_with_own_inflight(
        socket: &Path,
        cfg: &ClientConfig,
    ) -> Result<Self, ClientError> {
        Self::open(socket, cfg, Some(Inflight::Own))
    }

    fn open(
        socket: &Path,
        cfg: &ClientConfig,
        inflight: Option<Inflight>,
    ) -> Result<Self, ClientError> {
        if cfg.segments == 0 || cfg.segments > MAX_SEGMENTS {
            return Err(ClientError::Setup(format!(
                "segments must be 1..={MAX_SEGMENTS}, got {}",
                cfg.segments
            )));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.slots == 0 || cfg.slots > cfg.queue_size / 3 {
            return Err(ClientError::Setup(format!(
                "{} slots do not fit a queue of {} descriptors",
                cfg.slots, cfg.queue_size
            )));
        }
        let mut fe = Frontend::connect(socket, u64::from(cfg.queues))?;
        fe.set_owner()?;
        let offered = fe.get_features()?;
        if offered & F_VERSION_1 == 0 || offered & F_PROTOCOL_FEATURES == 0 {
            return Err(ClientError::Setup(format!(
                "backend offers {offered:#x}: VERSION_1 and PROTOCOL_FEATURES needed"
            )));
        }
        let mut want = F_VERSION_1 | F_PROTOCOL_FEATURES | F_BLK_SIZE | F_MQ | F_FLUSH | F_RO;
        if cfg.segments > 1 {
            if offered & F_INDIRECT_DESC == 0 {
                return Err(ClientError::Setup(
                    "several segments need INDIRECT_DESC, which the backend does not offer".into(),
                ));
            }
            want |= F_INDIRECT_DESC;
        }
        fe.set_features(offered & want)?;
        let p = fe.get_protocol_features()?;
        let mut wantp = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if inflight.is_some() {
            if !p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
                return Err(ClientError::Setup(
                    "backend without the INFLIGHT_SHMFD protocol feature".into(),
                ));
            }
            wantp |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        fe.set_protocol_features(p & wantp)?;
        if !p.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(ClientError::Setup(
                "backend without the CONFIG protocol feature".into(),
            ));
        }
        if cfg.queues > 1 {
            let n = fe.get_queue_num()?;
            if n < u64::from(cfg.queues) || offered & F_MQ == 0 {
                return Err(ClientError::Setup(format!(
                    "{} queues asked, backend has {n}",
                    cfg.queues
                )));
            }
        }
        let (_, cfgspace) = fe.get_config(0, 24, VhostUserConfigFlags::WRITABLE, &[0u8; 24])?;
        let le32 = |o: usize| u32::from_le_bytes(cfgspace[o..o + 4].try_into().unwrap_or_default());
        let info = DeviceInfo {
            capacity_sectors: u64::from_le_bytes(cfgspace[0..8].try_into().unwrap_or_default()),
            block_size: if offered & F_BLK_SIZE != 0 {
                le32(20)
            } else {
                512
            },
            read_only: offered & F_RO != 0,
            flush: offered & F_FLUSH != 0,
        };

        let (per_queue, layout) = queue_area(cfg);
        let mem = Arc::new(GuestMemory::new(
            (per_queue * u64::from(cfg.queues)) as usize,
        )?);
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.len as u64,
            userspace_addr: mem.addr as u64,
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        }])?;
        let inflight = match inflight {
            Some(how) => {
                let (region, mut file) = fe.get_inflight_fd(&VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: cfg.queues,
                    queue_size: cfg.queue_size,
                })?;
                if how == Inflight::Own {
                    file = copy_to_memfd(&file, region.mmap_offset, region.mmap_size)?;
                }
                let sent = VhostUserInflight {
                    mmap_offset: if how == Inflight::Own {
                        0
                    } else {
                        region.mmap_offset
                    },
                    ..region
                };
                fe.set_inflight_fd(&sent, file.as_raw_fd())?;
                Some(file)
            }
            None => None,
        };
        let mut queues = Vec::new();
        for q in 0..cfg.queues {
            let base = per_queue * u64::from(q);
            let [desc, avail, used, hdrs, ind, data] = layout.map(|o| base + o);
            let dq = DriverQueue::new(mem.clone(), q, cfg, [desc, avail, used, hdrs, ind, data])?;
            let qi = q as usize;
            fe.set_vring_num(qi, cfg.queue_size)?;
            fe.set_vring_base(qi, 0)?;
            fe.set_vring_addr(
                qi,
                &VringConfigData {
                    queue_max_size: cfg.queue_size,
                    queue_size: cfg.queue_size,
                    flags: 0,
                    // The backend translates these through the memory table's user addresses.
                    desc_table_addr: mem.addr as u64 + desc,
                    used_ring_addr: mem.addr as u64 + used,
                    avail_ring_addr: mem.addr as u64 + avail,
                    log_addr: None,
                },
            )?;
            fe.set_vring_call(qi, &dq.call)?;
            fe.set_vring_kick(qi, &dq.kick)?;
            fe.set_vring_enable(qi, true)?;
            queues.push(dq);
        }
        Ok(BlkClient {
            frontend: fe,
            mem,
            info,
            queues,
            queues_at_connect: u64::from(cfg.queues),
            inflight,
        })
    }

    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// Takes the queues, to drive them from one thread each.
    pub fn take_queues(&mut self) -> Vec<DriverQueue> {
        std::mem::take(&mut self.queues)
    }

    /// Shrinks the file behind the shared memory to `len` bytes after SET_MEM_TABLE, as a
    /// buggy or hostile frontend could. This process maps it too: nothing here may touch the
    /// memory past `len` afterwards.
    pub fn truncate_memory(&self, len: u64) -> std::io::Result<()> {
        self.mem.file.set_len(len)
    }

    /// Shrinks the inflight region's file to `len` bytes under the backend, as a buggy or
    /// hostile frontend could (the client must have connected with an inflight region; the
    /// backend's own file refuses, sealed).
    pub fn truncate_inflight(&self, len: u64) -> std::io::Result<()> {
        self.inflight
            .as_ref()
            .ok_or_else(|| std::io::Error::other("connected without an inflight region"))?
            .set_len(len)
    }

    /// Bytes of each queue's part of the memory (queue `q`'s part starts at `q` times this).
    pub fn queue_area_len(&self) -> u64 {
        self.mem.len as u64 / self.queues_at_connect
    }

    /// Stops every ring (GET_VRING_BASE) and closes the connection.
    pub fn close(self, queues: u16) {
        for q in 0..queues as usize {
            let _ = self.frontend.get_vring_base(q);
        }
        drop(self.mem);
    }
}

/// One request's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub slot: u16,
    pub status: u8,
    /// Bytes the device said it wrote (used element `len`).
    pub written: u32,
}

/// One virtqueue, driven by one thread.
pub struct DriverQueue {
    mem: Arc<GuestMemory>,
    index: u16,
    size: u16,
    slots: u16,
    max_bytes: u32,
    segments: u16,
    desc: u64,
    avail: u64,
    used: u64,
    hdrs: u64,
    ind: u64,
    data: u64,
    avail_idx: u16,
    /// Avail index at the last kick.
    kicked_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl DriverQueue {
    fn new(
        mem: Arc<GuestMemory>,
        index: u16,
        cfg: &ClientConfig,
        [desc, avail, used, hdrs, ind, data]: [u64; 6],
    ) -> Result<Self, ClientError> {
        let q = DriverQueue {
            mem,
            index,
            size: cfg.queue_size,
            slots: cfg.slots,
            max_bytes: cfg.max_bytes,
            segments: cfg.segments,
            desc,
            avail,
            used,
            hdrs,
            ind,
            data,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
        };
        // A polling driver: no interrupts wanted.
        q.write_u16(q.avail, AVAIL_F_NO_INTERRUPT);
        Ok(q)
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn slots(&self) -> u16 {
        self.slots
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        // SAFETY: `gpa` is inside this queue's area of the mapping (laid out in `queue_area`),
        // 2-aligned.
        unsafe { ptr::write_volatile(self.mem.host(gpa) as *mut u16, v.to_le()) };
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        // SAFETY: as in `write_u16`.
        u16::from_le(unsafe { ptr::read_volatile(self.mem.host(gpa) as *const u16) })
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc_at(self.desc + 16 * u64::from(i), addr, len, flags, next);
    }

    /// Writes a descriptor at guest address `gpa` (in the ring's table or an indirect one).
    fn write_desc_at(&self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.mem.host(gpa);
        // SAFETY: `gpa` is a 16-aligned descriptor slot inside this queue's area (the ring's
        // table or a slot's indirect table, laid out in `queue_area`).
        unsafe {
            ptr::write_volatile(at as *mut u64, addr.to_le());
            ptr::write_volatile(at.add(8) as *mut u32, len.to_le());
            ptr::write_volatile(at.add(12) as *mut u16, flags.to_le());
            ptr::write_volatile(at.add(14) as *mut u16, next.to_le());
        }
    }

    /// The data buffer of `slot` (`max_bytes` long).
    pub fn data(&mut self, slot: u16) -> &mut [u8] {
        assert!(slot < self.slots);
        let gpa = self.data + u64::from(slot) * u64::from(self.max_bytes);
        // SAFETY: the slot's buffer lies in this queue's area; `&mut self` makes this the only
        // reference to it on our side while the backend does not own the slot.
        unsafe { std::slice::from_raw_parts_mut(self.mem.host(gpa), self.max_bytes as usize) }
    }

    /// Queues request `kind` at `sector` for `slot`, moving `len` bytes of its data buffer
    /// (none for FLUSH). Not visible to the device until [`DriverQueue::publish`].
    pub fn queue(&mut self, slot: u16, kind: u32, sector: u64, len: u32) {
        assert!(slot < self.slots && len <= self.max_bytes);
        let hdr = self.hdrs + 16 * u64::from(slot);
        let h = self.mem.host(hdr);
        // SAFETY: the slot's 16-byte header lies in this queue's area.
        unsafe {
            ptr::write_volatile(h as *mut u32, kind.to_le());
            ptr::write_volatile(h.add(4) as *mut u32, 0);
            ptr::write_volatile(h.add(8) as *mut u64, sector.to_le());
        }
        let status = self.hdrs + 16 * u64::from(self.slots) + u64::from(slot);
        // SAFETY: the status byte lies in this queue's area.
        unsafe { ptr::write_volatile(self.mem.host(status), 0xff) };
        let d = 3 * slot;
        let data = self.data + u64::from(slot) * u64::from(self.max_bytes);
        let dir = if kind == T_IN || kind == T_GET_ID {
            DESC_F_WRITE
        } else {
            0
        };
        if self.segments > 1 && len > 0 {
            // An indirect table: header, the data in `segments` pieces, status.
            let n = self.segments;
            let table = self.ind + u64::from(slot) * 16 * (u64::from(n) + 2);
            self.write_desc_at(table, hdr, 16, DESC_F_NEXT, 1);
            let piece = len.div_ceil(u32::from(n));
            let mut off = 0u32;
            let mut i = 1u16;
            while off < len {
                let l = piece.min(len - off);
                self.write_desc_at(
                    table + 16 * u64::from(i),
                    data + u64::from(off),
                    l,
                    DESC_F_NEXT | dir,
                    i + 1,
                );
                off += l;
                i += 1;
            }
            self.write_desc_at(table + 16 * u64::from(i), status, 1, DESC_F_WRITE, 0);
            self.write_desc(d, table, 16 * (u32::from(i) + 1), DESC_F_INDIRECT, 0);
            let ring = self.avail + 4 + 2 * u64::from(self.avail_idx & (self.size - 1));
            self.write_u16(ring, d);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            return;
        }
        if len == 0 {
            self.write_desc(d, hdr, 16, DESC_F_NEXT, d + 2);
        } else {
            self.write_desc(d, hdr, 16, DESC_F_NEXT, d + 1);
            self.write_desc(d + 1, data, len, DESC_F_NEXT | dir, d + 2);
        }
        self.write_desc(d + 2, status, 1, DESC_F_WRITE, 0);
        let ring = self.avail + 4 + 2 * u64::from(self.avail_idx & (self.size - 1));
        self.write_u16(ring, d);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Guest addresses of `slot`'s header, data buffer and status byte, for hand-made chains.
    pub fn slot_addrs(&self, slot: u16) -> (u64, u64, u64) {
        (
            self.hdrs + 16 * u64::from(slot),
            self.data + u64::from(slot) * u64::from(self.max_bytes),
            self.hdrs + 16 * u64::from(self.slots) + u64::from(slot),
        )
    }

    /// Size of the guest memory (addresses from here on are outside it).
    pub fn memory_len(&self) -> u64 {
        self.mem.len as u64
    }

    /// Writes `header` into `slot`'s header and the status byte to 0xff.
    pub fn set_header(&mut self, slot: u16, kind: u32, sector: u64) {
        let (hdr, _, status) = self.slot_addrs(slot);
        let h = self.mem.host(hdr);
        // SAFETY: the header and status byte lie in this queue's area.
        unsafe {
            ptr::write_volatile(h as *mut u32, kind.to_le());
            ptr::write_volatile(h.add(4) as *mut u32, 0);
            ptr::write_volatile(h.add(8) as *mut u64, sector.to_le());
            ptr::write_volatile(self.mem.host(status), 0xff);
        }
    }

    /// A hostile driver's move: writes descriptors `(index, addr, len, flags, next)` as given
    /// (indices taken modulo the queue size) and makes `head` available, unchecked.
    pub fn queue_raw(&mut self, head: u16, descs: &[(u16, u64, u32, u16, u16)]) {
        for &(i, addr, len, flags, next) in descs {
            self.write_desc(i & (self.size - 1), addr, len, flags, next);
        }
        let ring = self.avail + 4 + 2 * u64::from(self.avail_idx & (self.size - 1));
        self.write_u16(ring, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// A hostile driver's move: stores `idx` as the avail index (and kicks).
    pub fn publish_raw_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.kicked_idx = idx.wrapping_sub(1);
        self.publish();
    }

    /// Makes the queued requests visible (one release store of the avail index) and kicks the
    /// device unless it asked not to be (it polls).
    pub fn publish(&mut self) {
        if self.avail_idx == self.kicked_idx {
            return;
        }
        let idx = self.mem.host(self.avail + 2);
        // SAFETY: the avail index is 2-aligned inside the avail ring.
        unsafe { AtomicU16::from_ptr(idx as *mut u16) }
            .store(self.avail_idx.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
        if self.read_u16(self.used) & USED_F_NO_NOTIFY == 0 {
            let _ = self.kick.write(1);
        }
        self.kicked_idx = self.avail_idx;
    }

    /// Appends the requests the device has completed to `out`.
    pub fn poll(&mut self, out: &mut Vec<Completion>) {
        let idx = self.mem.host(self.used + 2);
        // SAFETY: the used index is 2-aligned inside the used ring.
        let used =
            u16::from_le(unsafe { AtomicU16::from_ptr(idx as *mut u16) }.load(Ordering::Acquire));
        while self.last_used != used {
            let e = self.used + 4 + 8 * u64::from(self.last_used & (self.size - 1));
            let h = self.mem.host(e);
            // SAFETY: used element inside the used ring, 4-aligned.
            let (id, len) = unsafe {
                (
                    u32::from_le(ptr::read_volatile(h as *const u32)),
                    u32::from_le(ptr::read_volatile(h.add(4) as *const u32)),
                )
            };
            let slot = (id / 3) as u16;
            let status_gpa =
                self.hdrs + 16 * u64::from(self.slots) + u64::from(slot.min(self.slots - 1));
            // SAFETY: the status byte lies in this queue's area.
            let status = unsafe { ptr::read_volatile(self.mem.host(status_gpa)) };
            out.push(Completion {
                slot,
                status,
                written: len,
            });
            self.last_used = self.last_used.wrapping_add(1);
        }
    }
}

/// Writes one 4 KiB block of `fill` at sector 8 through a fresh connection to `socket` with
/// `cfg`'s layout, reads it back and compares: what went wrong, if anything.
pub fn write_and_read_back(socket: &Path, cfg: &ClientConfig, fill: u8) -> Result<(), String> {
    let mut c = BlkClient::connect(socket, cfg).map_err(|e| format!("connect: {e}"))?;
    let mut q = c.take_queues().pop().ok_or("no queue")?;
    fn request(q: &mut DriverQueue, kind: u32) -> Result<(), String> {
        q.queue(0, kind, 8, 4096);
        q.publish();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut out = Vec::new();
        while out.is_empty() && std::time::Instant::now() < end {
            q.poll(&mut out);
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        match out.first().map(|c| c.status) {
            Some(0) => Ok(()),
            other => Err(format!("request {kind}: status {other:?}")),
        }
    }
    q.data(0)[..4096].fill(fill);
    request(&mut q, T_OUT)?;
    q.data(0)[..4096].fill(0);
    request(&mut q, T_IN)?;
    if q.data(0)[..4096].iter().all(|&b| b == fill) {
        Ok(())
    } else {
        Err("the block read back differs from the one written".into())
    }
}
