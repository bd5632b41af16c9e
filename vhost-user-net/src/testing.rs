//! Test support: a [`NetQueues`] over guest memory made in-process, with no socket and no
//! frontend, plus a minimal driver that lays out split virtqueues (virtio 1.2 §2.7) in that memory
//! and a `Vec`-backed [`NetBuf`]/[`BufPool`].
//!
//! Compiled for this crate's unit tests and, with the `test-support` feature, for other crates'
//! tests and for the fuzz target (`fuzz/`), whose body is [`fuzz_descriptor_chains`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion,
};

use torii_vhost_user::Connection;

use crate::backend::{GuestMem, NetModel, MAX_QUEUE_SIZE};
use crate::device::{BrokenQueue, DeviceShared, VhostUserNetDevice};
use crate::hdr::{VirtioNetHdr, HDR_LEN_MRG};
use crate::queue::{BufPool, NetBuf, NetQueues, MAX_FRAME};

/// Feature bits (§5.1.3, §6), as the acked-features word the tests choose.
pub const F_CSUM: u64 = 1 << vn::VIRTIO_NET_F_CSUM;
pub const F_GUEST_CSUM: u64 = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
pub const F_GUEST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
pub const F_GUEST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO6;
pub const F_GUEST_UFO: u64 = 1 << vn::VIRTIO_NET_F_GUEST_UFO;
pub const F_GUEST_ECN: u64 = 1 << vn::VIRTIO_NET_F_GUEST_ECN;
pub const F_HOST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO4;
pub const F_MRG_RXBUF: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
pub const F_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
pub const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
pub const F_IN_ORDER: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_IN_ORDER;

/// Descriptor flags (§2.7.5).
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Guest address of the second memory region (packet buffers). Region 0 starts at 0 and holds the
/// rings and a scratch area; between the two is a hole (see [`HOLE`]).
pub const DATA_BASE: u64 = 0x100_0000;
/// An address in no region.
pub const HOLE: u64 = DATA_BASE / 2;

/// The guest RX queue of pair `qp` (§5.1.2: receiveq1 is 0, transmitq1 is 1, ...).
pub fn rx(qp: u16) -> u16 {
    2 * qp
}

/// The guest TX queue of pair `qp`.
pub fn tx(qp: u16) -> u16 {
    2 * qp + 1
}

/// How to build a [`TestDevice`].
#[derive(Clone, Debug)]
pub struct Config {
    pub queue_pairs: u16,
    /// A power of two up to [`MAX_QUEUE_SIZE`] (§2.7: split queue sizes are powers of two).
    pub queue_size: u16,
    /// The features the "driver" acked.
    pub features: u64,
    /// Size of the scratch area after the rings in region 0 (indirect tables).
    pub scratch_size: u64,
    /// Size of region 1, at [`DATA_BASE`].
    pub data_size: u64,
}

impl Config {
    pub fn new(features: u64) -> Self {
        Config {
            queue_pairs: 1,
            queue_size: 256,
            features,
            scratch_size: 0x1_0000,
            data_size: 0x20_0000,
        }
    }
}

/// Where one split virtqueue lives (§2.7: descriptor table 16-byte aligned, available ring
/// 2-byte aligned, used ring 4-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// One split-ring descriptor (§2.7.5), as the driver writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The driver side: writes descriptors and available entries, reads used entries. Indices `q`
/// are virtqueue indices (see [`rx`], [`tx`]).
pub struct Driver {
    mem: GuestMem,
    layouts: Vec<QueueLayout>,
    /// Next free descriptor of each queue (the driver here never reuses one before it wraps).
    next_desc: Vec<u16>,
    /// Used index up to which [`Driver::take_used`] has read.
    last_used: Vec<u16>,
    scratch: (u64, u64),
    data: (u64, u64),
}

impl Driver {
    pub fn layout(&self, q: u16) -> QueueLayout {
        self.layouts[q as usize]
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .expect("driver write outside guest memory");
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .expect("driver read outside guest memory");
        v
    }

    fn read_u16(&self, addr: u64) -> u16 {
        u16::from_le_bytes(self.read(addr, 2).try_into().unwrap())
    }

    fn read_u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.read(addr, 4).try_into().unwrap())
    }

    /// The contents of all of guest memory, region by region.
    pub fn snapshot(&self) -> Vec<u8> {
        let mem = self.mem.memory();
        let mut out = Vec::new();
        for r in mem.iter() {
            let start = out.len();
            out.resize(start + r.len() as usize, 0);
            mem.read_slice(&mut out[start..], r.start_addr())
                .expect("region readable");
        }
        out
    }

    /// Overwrites guest memory, region by region, with `image` (what is left over stays as is).
    pub fn load_image(&self, mut image: &[u8]) {
        let mem = self.mem.memory();
        for r in mem.iter() {
            let n = image.len().min(r.len() as usize);
            mem.write_slice(&image[..n], r.start_addr())
                .expect("region writable");
            image = &image[n..];
        }
    }

    /// Writes entry `idx` of a descriptor table at `table` (a queue's or an indirect one).
    pub fn write_desc_at(&self, table: u64, idx: u16, d: Desc) {
        self.write(table + 16 * idx as u64, &d.to_bytes());
    }

    /// Writes descriptor `idx` of queue `q`.
    pub fn set_desc(&self, q: u16, idx: u16, d: Desc) {
        self.write_desc_at(self.layout(q).desc, idx, d);
    }

    /// `avail->idx` (§2.7.6).
    pub fn avail_idx(&self, q: u16) -> u16 {
        self.read_u16(self.layout(q).avail + 2)
    }

    pub fn set_avail_idx(&self, q: u16, idx: u16) {
        self.write(self.layout(q).avail + 2, &idx.to_le_bytes());
    }

    /// Puts `head` in the next available-ring slot and publishes it by bumping `avail->idx`.
    pub fn make_available(&self, q: u16, head: u16) {
        let l = self.layout(q);
        let idx = self.avail_idx(q);
        let slot = (idx % l.size) as u64;
        self.write(l.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.set_avail_idx(q, idx.wrapping_add(1));
    }

    /// `used->idx` (§2.7.8).
    pub fn used_idx(&self, q: u16) -> u16 {
        self.read_u16(self.layout(q).used + 2)
    }

    /// Used element `i` (an index into the ring, taken modulo the size): (id, len).
    pub fn used_elem(&self, q: u16, i: u16) -> (u32, u32) {
        let l = self.layout(q);
        let at = l.used + 4 + 8 * (i % l.size) as u64;
        (self.read_u32(at), self.read_u32(at + 4))
    }

    /// The used elements added since the last call.
    pub fn take_used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let end = self.used_idx(q);
        let mut v = Vec::new();
        let mut i = self.last_used[q as usize];
        while i != end {
            v.push(self.used_elem(q, i));
            i = i.wrapping_add(1);
        }
        self.last_used[q as usize] = end;
        v
    }

    /// Allocates `len` bytes (16-byte aligned) of packet buffer in region 1.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.data.0;
        self.data.0 = align(a + len, 16);
        assert!(self.data.0 <= self.data.1, "test data region exhausted");
        a
    }

    /// Allocates `len` bytes (16-byte aligned) in the scratch area of region 0.
    pub fn alloc_scratch(&mut self, len: u64) -> u64 {
        let a = self.scratch.0;
        self.scratch.0 = align(a + len, 16);
        assert!(
            self.scratch.0 <= self.scratch.1,
            "test scratch area exhausted"
        );
        a
    }

    /// Takes the next `n` descriptor indices of queue `q`.
    pub fn take_descs(&mut self, q: u16, n: u16) -> Vec<u16> {
        let size = self.layout(q).size;
        let c = &mut self.next_desc[q as usize];
        (0..n)
            .map(|_| {
                let i = *c;
                *c = (*c + 1) % size;
                i
            })
            .collect()
    }

    /// Writes `bufs` (address, length, device-writable) as one chain in fresh descriptors of `q`
    /// and makes it available. Returns its head.
    pub fn add_chain(&mut self, q: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        let idx = self.take_descs(q, bufs.len() as u16);
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
                next = idx[k + 1];
            }
            self.set_desc(q, idx[k], Desc::new(addr, len, flags, next));
        }
        self.make_available(q, idx[0]);
        idx[0]
    }

    /// Copies each part of a packet (virtio header bytes included) into its own buffer and posts
    /// them as one device-readable chain on the TX queue of `qp`. Returns the head.
    pub fn add_tx(&mut self, qp: u16, parts: &[&[u8]]) -> u16 {
        let bufs: Vec<_> = parts
            .iter()
            .map(|p| {
                let a = self.alloc(p.len() as u64);
                self.write(a, p);
                (a, p.len() as u32, false)
            })
            .collect();
        self.add_chain(tx(qp), &bufs)
    }

    /// Like [`Driver::add_tx`] but through an indirect table (§2.7.5.3): the ring holds one
    /// descriptor pointing at a table of `parts.len()` descriptors in the scratch area.
    pub fn add_tx_indirect(&mut self, qp: u16, parts: &[&[u8]]) -> u16 {
        let table = self.alloc_scratch(16 * parts.len() as u64);
        for (k, p) in parts.iter().enumerate() {
            let a = self.alloc(p.len() as u64);
            self.write(a, p);
            let (flags, next) = if k + 1 < parts.len() {
                (DESC_F_NEXT, k as u16 + 1)
            } else {
                (0, 0)
            };
            self.write_desc_at(table, k as u16, Desc::new(a, p.len() as u32, flags, next));
        }
        let head = self.take_descs(tx(qp), 1)[0];
        let d = Desc::new(table, 16 * parts.len() as u32, DESC_F_INDIRECT, 0);
        self.set_desc(tx(qp), head, d);
        self.make_available(tx(qp), head);
        head
    }

    /// Posts one device-writable chain of buffers of `lens` bytes on the RX queue of `qp`.
    /// Returns the head and the buffers' addresses.
    pub fn add_rx(&mut self, qp: u16, lens: &[u32]) -> (u16, Vec<u64>) {
        let addrs: Vec<u64> = lens.iter().map(|&l| self.alloc(l as u64)).collect();
        let bufs: Vec<_> = addrs
            .iter()
            .zip(lens)
            .map(|(&a, &l)| (a, l, true))
            .collect();
        (self.add_chain(rx(qp), &bufs), addrs)
    }
}

/// A [`NetQueues`] with a connection published as the control thread would, over memory and
/// vrings made here.
pub struct TestDevice {
    pub device: VhostUserNetDevice,
    pub queues: NetQueues,
    pub driver: Driver,
    vrings: Vec<VringRwLock<GuestMem>>,
    shared: Arc<DeviceShared>,
    mem_generation: Arc<AtomicU64>,
}

impl Drop for TestDevice {
    /// Retires the connection as the control thread does on disconnect; this also breaks the
    /// reference cycle device → connection → backend → device.
    fn drop(&mut self) {
        self.queues.detach();
        self.shared.publish(None);
    }
}

impl TestDevice {
    /// Two regions: region 0 at 0 (rings of every queue, then the scratch area) and region 1 at
    /// [`DATA_BASE`]. Every queue is set up, ready and enabled with `cfg.features` acked.
    pub fn new(cfg: &Config) -> Self {
        let size = cfg.queue_size as u64;
        let nq = 2 * cfg.queue_pairs as usize;
        let mut at = 0u64;
        let mut layouts = Vec::with_capacity(nq);
        for _ in 0..nq {
            let desc = align(at, 16);
            let avail = align(desc + 16 * size, 2);
            let used = align(avail + 6 + 2 * size, 4);
            at = used + 6 + 8 * size;
            layouts.push(QueueLayout {
                size: cfg.queue_size,
                desc,
                avail,
                used,
            });
        }
        let scratch = align(at, 16);
        let region0 = align(scratch + cfg.scratch_size, 0x1000);
        assert!(
            region0 <= HOLE,
            "rings and scratch do not fit below the hole"
        );
        let mmap = torii_vhost_user::MemTable::from_ranges(&[
            (GuestAddress(0), region0 as usize),
            (GuestAddress(DATA_BASE), cfg.data_size as usize),
        ])
        .expect("cannot map test guest memory");
        let mem: GuestMem = GuestMemoryAtomic::new(mmap);

        let shared = Arc::new(DeviceShared::new(
            "test".into(),
            NetModel::new([0x52, 0x54, 0, 0x12, 0x34, 0x56], 1500, cfg.queue_pairs),
            cfg.queue_pairs as usize,
        ));
        let vrings: Vec<_> = layouts
            .iter()
            .map(|l| {
                let v = VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE as u16).expect("vring");
                v.set_queue_size(l.size);
                v.set_queue_info(l.desc, l.avail, l.used)
                    .expect("aligned ring addresses");
                v.set_queue_event_idx(cfg.features & F_EVENT_IDX != 0);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        let mut queues = NetQueues::new(shared.clone());
        let mem_generation = Arc::new(AtomicU64::new(0));
        let conn = Connection::new(vrings.clone(), mem.clone(), mem_generation.clone());
        // What the vhost-user handler does on SET_FEATURES.
        conn.set_acked_features(cfg.features);
        shared.publish(Some(Arc::new(conn)));
        queues.refresh();
        let driver = Driver {
            mem,
            next_desc: vec![0; nq],
            last_used: vec![0; nq],
            layouts,
            scratch: (scratch, region0),
            data: (DATA_BASE, DATA_BASE + cfg.data_size),
        };
        TestDevice {
            device: VhostUserNetDevice::detached(shared.clone()),
            queues,
            driver,
            vrings,
            shared,
            mem_generation,
        }
    }

    /// Takes the data region (region 1) out of the memory table, as the handler does on
    /// VHOST_USER_REM_MEM_REG: a new table is installed and its generation bumped.
    pub fn remove_data_region(&mut self) {
        let size = self.driver.data.1 - DATA_BASE;
        let (table, _) = self
            .driver
            .mem
            .memory()
            .remove_region(GuestAddress(DATA_BASE), size)
            .expect("data region");
        self.driver.mem.lock().unwrap().replace(table);
        self.mem_generation.fetch_add(1, Ordering::Release);
    }

    pub fn broken_queues(&self) -> Vec<BrokenQueue> {
        self.device.broken_queues()
    }

    /// The reason queue `q` was reported broken, if it was.
    pub fn broken_reason(&self, q: u16) -> Option<String> {
        self.broken_queues()
            .into_iter()
            .find(|b| b.queue == q)
            .map(|b| b.reason)
    }

    /// The device's `next_avail` for `q` (its position in the available ring).
    pub fn next_avail(&self, q: u16) -> u16 {
        self.vrings[q as usize].queue_next_avail()
    }

    /// What SET_VRING_BASE does: where the device resumes in the available and used rings.
    pub fn set_ring_base(&self, q: u16, next_avail: u16, next_used: u16) {
        let v = &self.vrings[q as usize];
        v.set_queue_next_avail(next_avail);
        v.set_queue_next_used(next_used);
    }

    /// What SET_VRING_CALL does: the eventfd the device writes to interrupt the driver.
    pub fn set_call(&self, q: u16, call: Option<std::fs::File>) {
        self.vrings[q as usize].set_call(call);
    }

    /// What SET_VRING_ADDR does (the frontend has translated the addresses already).
    pub fn set_ring_addresses(&self, q: u16, desc: u64, avail: u64, used: u64) {
        self.vrings[q as usize]
            .set_queue_info(desc, avail, used)
            .expect("aligned ring addresses");
    }
}

/// Room in front of a frame in a [`VecBuf`], as the dataplane's packets have.
pub const VEC_HEADROOM: usize = 64;

/// A heap buffer standing in for the dataplane's packets.
#[derive(Debug)]
pub struct VecBuf {
    data: Vec<u8>,
    off: usize,
    len: usize,
    hdr: VirtioNetHdr,
}

impl VecBuf {
    /// Makes the buffer hold `frame` with `hdr`, as a port would before `to_guest`.
    pub fn set_packet(&mut self, hdr: VirtioNetHdr, frame: &[u8]) {
        self.data[VEC_HEADROOM..VEC_HEADROOM + frame.len()].copy_from_slice(frame);
        self.off = VEC_HEADROOM;
        self.len = frame.len();
        self.hdr = hdr;
    }
}

impl NetBuf for VecBuf {
    fn raw_mut(&mut self) -> &mut [u8] {
        // As the dataplane does: the virtio header lands at the end of the headroom.
        &mut self.data[VEC_HEADROOM - HDR_LEN_MRG..]
    }

    fn set_frame(&mut self, hdr: VirtioNetHdr, offset: usize, len: usize) {
        self.off = VEC_HEADROOM - HDR_LEN_MRG + offset;
        self.len = len;
        self.hdr = hdr;
    }

    fn frame(&self) -> &[u8] {
        &self.data[self.off..self.off + self.len]
    }

    fn hdr(&self) -> VirtioNetHdr {
        self.hdr
    }

    fn with_header(&mut self, hdr: &[u8]) -> &[u8] {
        let start = self.off - hdr.len();
        self.data[start..self.off].copy_from_slice(hdr);
        &self.data[start..self.off + self.len]
    }
}

/// A fixed set of [`VecBuf`]s whose frames hold up to `frame_room` bytes.
pub struct VecPool {
    free: Vec<VecBuf>,
    count: usize,
    frame_room: usize,
}

impl VecPool {
    pub fn new(count: usize, frame_room: usize) -> Self {
        let free = (0..count)
            .map(|_| VecBuf {
                data: vec![0; VEC_HEADROOM + frame_room],
                off: VEC_HEADROOM,
                len: 0,
                hdr: VirtioNetHdr::default(),
            })
            .collect();
        VecPool {
            free,
            count,
            frame_room,
        }
    }

    /// Buffers handed out and not returned.
    pub fn outstanding(&self) -> usize {
        self.count - self.free.len()
    }

    pub fn frame_room(&self) -> usize {
        self.frame_room
    }

    /// A buffer holding `frame` with `hdr`.
    pub fn packet(&mut self, hdr: VirtioNetHdr, frame: &[u8]) -> VecBuf {
        let mut b = self.alloc().expect("test pool exhausted");
        b.set_packet(hdr, frame);
        b
    }
}

impl BufPool for VecPool {
    type Buf = VecBuf;

    fn alloc(&mut self) -> Option<VecBuf> {
        self.free.pop()
    }

    fn free(&mut self, mut b: VecBuf) {
        assert!(self.free.len() < self.count, "buffer freed twice");
        b.len = 0;
        b.off = VEC_HEADROOM;
        b.hdr = VirtioNetHdr::default();
        self.free.push(b);
    }
}

/// A deterministic pseudo-random generator (xorshift64) for tests that need many inputs.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The fixed-size prefix of a fuzz input; the rest is the guest memory image.
///
/// | byte  | meaning                                                                      |
/// |-------|------------------------------------------------------------------------------|
/// | 0     | features: 0 MRG_RXBUF, 1 VERSION_1, 2 GUEST_CSUM, 3 GUEST_TSO4, 4 GUEST_TSO6 + GUEST_UFO + GUEST_ECN, 5 CSUM + HOST_TSO4, 6 EVENT_IDX, 7 INDIRECT_DESC |
/// | 1     | queue size `1 << (b % 5)`                                                    |
/// | 2     | pool: frame room `FUZZ_FRAME_ROOM[b & 3]`, `(b >> 2) % 9` buffers            |
/// | 3..11 | next_avail rx, tx; next_used rx, tx (u16 LE each)                            |
/// | 11    | `1 + (b & 3) % 3` rounds, burst size `(b >> 2) % 9`                          |
/// | 12..44| four packets for `to_guest`: len u16, flags, gso_type, gso_size u16, csum_start, csum_offset |
pub const FUZZ_HEADER: usize = 44;
/// Frame room of the fuzz pool's buffers.
pub const FUZZ_FRAME_ROOM: [usize; 4] = [16, 256, 1600, 10_000];

/// The decoded prefix of a fuzz input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuzzParams {
    pub features_sel: u8,
    pub queue_size_log2: u8,
    pub pool_sel: u8,
    pub next_avail: [u16; 2],
    pub next_used: [u16; 2],
    pub rounds_sel: u8,
    pub packets: [FuzzPacket; 4],
}

/// One packet the fuzz target sends to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuzzPacket {
    pub len: u16,
    pub hdr: VirtioNetHdr,
}

impl FuzzParams {
    pub fn decode(b: &[u8; FUZZ_HEADER]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut packets = [FuzzPacket::default(); 4];
        for (k, p) in packets.iter_mut().enumerate() {
            let o = 12 + 8 * k;
            *p = FuzzPacket {
                len: u16_at(o),
                hdr: VirtioNetHdr {
                    flags: b[o + 2],
                    gso_type: b[o + 3],
                    hdr_len: 0,
                    gso_size: u16_at(o + 4),
                    csum_start: b[o + 6] as u16,
                    csum_offset: b[o + 7] as u16,
                },
            };
        }
        FuzzParams {
            features_sel: b[0],
            queue_size_log2: b[1],
            pool_sel: b[2],
            next_avail: [u16_at(3), u16_at(5)],
            next_used: [u16_at(7), u16_at(9)],
            rounds_sel: b[11],
            packets,
        }
    }

    pub fn encode(&self) -> [u8; FUZZ_HEADER] {
        let mut b = [0u8; FUZZ_HEADER];
        b[0] = self.features_sel;
        b[1] = self.queue_size_log2;
        b[2] = self.pool_sel;
        b[3..5].copy_from_slice(&self.next_avail[0].to_le_bytes());
        b[5..7].copy_from_slice(&self.next_avail[1].to_le_bytes());
        b[7..9].copy_from_slice(&self.next_used[0].to_le_bytes());
        b[9..11].copy_from_slice(&self.next_used[1].to_le_bytes());
        b[11] = self.rounds_sel;
        for (k, p) in self.packets.iter().enumerate() {
            let o = 12 + 8 * k;
            b[o..o + 2].copy_from_slice(&p.len.to_le_bytes());
            b[o + 2] = p.hdr.flags;
            b[o + 3] = p.hdr.gso_type;
            b[o + 4..o + 6].copy_from_slice(&p.hdr.gso_size.to_le_bytes());
            b[o + 6] = p.hdr.csum_start as u8;
            b[o + 7] = p.hdr.csum_offset as u8;
        }
        b
    }

    pub fn features(&self) -> u64 {
        let s = self.features_sel;
        let on = |bit: u8, f: u64| if s & (1 << bit) != 0 { f } else { 0 };
        on(0, F_MRG_RXBUF)
            | on(1, F_VERSION_1)
            | on(2, F_GUEST_CSUM)
            | on(3, F_GUEST_TSO4)
            | on(4, F_GUEST_TSO6 | F_GUEST_UFO | F_GUEST_ECN)
            | on(5, F_CSUM | F_HOST_TSO4)
            | on(6, F_EVENT_IDX)
            | on(7, F_INDIRECT_DESC)
    }

    pub fn config(&self) -> Config {
        Config {
            queue_pairs: 1,
            queue_size: 1 << (self.queue_size_log2 % 5),
            features: self.features(),
            scratch_size: 512,
            data_size: 0x1000,
        }
    }

    pub fn frame_room(&self) -> usize {
        FUZZ_FRAME_ROOM[(self.pool_sel & 3) as usize]
    }

    pub fn pool_count(&self) -> usize {
        (self.pool_sel >> 2) as usize % 9
    }

    pub fn rounds(&self) -> usize {
        1 + (self.rounds_sel & 3) as usize % 3
    }

    pub fn burst(&self) -> usize {
        (self.rounds_sel >> 2) as usize % 9
    }
}

/// What one fuzz input did, so that tests can check the generator reaches the interesting paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuzzOutcome {
    pub received: usize,
    pub delivered: usize,
    pub dropped: usize,
    pub broken: Vec<BrokenQueue>,
}

/// The fuzz body for the descriptor-chain path: `data` is a [`FUZZ_HEADER`]-byte prefix (see
/// [`FuzzParams`]) followed by the contents of guest memory, rings included. Runs bursts of
/// `from_guest` and `to_guest` on pair 0 and checks what must hold whatever the guest wrote:
/// no panic, buffers conserved, counters consistent, frames within bounds, each broken queue
/// reported once, and a broken queue left alone (no guest memory write, no packet).
pub fn fuzz_descriptor_chains(data: &[u8]) -> FuzzOutcome {
    let mut head = [0u8; FUZZ_HEADER];
    let n = data.len().min(FUZZ_HEADER);
    head[..n].copy_from_slice(&data[..n]);
    let image = &data[n..];
    let p = FuzzParams::decode(&head);
    let cfg = p.config();
    let mut dev = TestDevice::new(&cfg);
    dev.driver.load_image(image);
    for q in [rx(0), tx(0)] {
        dev.set_ring_base(q, p.next_avail[q as usize], p.next_used[q as usize]);
    }
    let mut pool = VecPool::new(p.pool_count(), p.frame_room());
    let mut out = Vec::with_capacity(8);
    let mut outcome = FuzzOutcome::default();
    for _ in 0..p.rounds() {
        // Guest TX.
        let tx_broken = dev.broken_reason(tx(0)).is_some();
        let before = tx_broken.then(|| dev.driver.snapshot());
        let st = dev.queues.from_guest(0, p.burst(), &mut pool, &mut out);
        assert_eq!(st.packets, out.len());
        assert!(st.packets + st.dropped_invalid <= p.burst());
        assert_eq!(pool.outstanding(), out.len());
        assert_eq!(st.bytes, out.iter().map(|b| b.frame().len()).sum::<usize>());
        for b in &out {
            assert!(b.frame().len() <= MAX_FRAME);
            assert!(b.hdr().validate(b.frame().len()).is_ok());
        }
        if let Some(before) = before {
            assert_eq!(st, Default::default(), "a broken TX queue was served");
            assert!(
                before == dev.driver.snapshot(),
                "a broken TX queue was touched"
            );
        }
        outcome.received += st.packets;
        outcome.dropped += st.dropped_invalid;
        out.drain(..).for_each(|b| pool.free(b));

        // Guest RX.
        let rx_broken = dev.broken_reason(rx(0)).is_some();
        let before = rx_broken.then(|| dev.driver.snapshot());
        let mut pkts = Vec::with_capacity(4);
        for fp in &p.packets {
            let Some(mut b) = pool.alloc() else { break };
            let len = fp.len as usize % (pool.frame_room() + 1);
            let frame: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            b.set_packet(fp.hdr, &frame);
            pkts.push(b);
        }
        let n = pkts.len();
        let st = dev.queues.to_guest(0, &mut pkts, &mut pool);
        assert!(pkts.is_empty());
        assert_eq!(pool.outstanding(), 0);
        assert_eq!(
            st.packets + st.dropped_no_buffer + st.dropped_unsupported,
            n
        );
        if let Some(before) = before {
            assert_eq!(st.dropped_no_buffer, n, "a broken RX queue was served");
            assert!(
                before == dev.driver.snapshot(),
                "a broken RX queue was touched"
            );
        }
        outcome.delivered += st.packets;
        outcome.dropped += st.dropped_no_buffer + st.dropped_unsupported;
    }
    outcome.broken = dev.broken_queues();
    for (i, b) in outcome.broken.iter().enumerate() {
        assert!(b.queue == rx(0) || b.queue == tx(0));
        assert!(!b.reason.is_empty());
        assert!(
            outcome.broken[..i].iter().all(|o| o.queue != b.queue),
            "queue {} reported broken twice",
            b.queue
        );
    }
    outcome
}

/// A well-formed fuzz input: a few TX chains (direct, split header, indirect) and RX chains laid
/// out by the [`Driver`], so that fuzzing (and the unit test that mutates these) starts from
/// rings that work.
pub fn fuzz_seed(rng: &mut XorShift) -> Vec<u8> {
    let mut p = FuzzParams {
        features_sel: rng.next_u64() as u8,
        queue_size_log2: 2 + rng.below(3) as u8,
        pool_sel: (2 + rng.below(2) as u8) | ((4 + rng.below(5) as u8) << 2),
        rounds_sel: (1 + rng.below(2) as u8) | ((2 + rng.below(7) as u8) << 2),
        ..Default::default()
    };
    let start = [rng.next_u64() as u16, rng.next_u64() as u16];
    p.next_avail = start;
    p.next_used = [rng.next_u64() as u16, rng.next_u64() as u16];
    for fp in p.packets.iter_mut() {
        fp.len = 60 + rng.below(1400) as u16;
        if rng.below(4) == 0 {
            fp.hdr.flags = crate::hdr::F_DATA_VALID;
        }
    }
    let cfg = p.config();
    let hdr_len = if cfg.features & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    };
    let mut dev = TestDevice::new(&cfg);
    let d = &mut dev.driver;
    for q in [rx(0), tx(0)] {
        d.set_avail_idx(q, start[q as usize]);
    }
    let size = cfg.queue_size;
    let mut descs_left = size;
    for k in 0..size.min(3) {
        let frame_len = 14 + rng.below(200) as usize;
        let mut pkt = vec![0u8; hdr_len + frame_len];
        rng.fill(&mut pkt[hdr_len..]);
        match k {
            0 if descs_left >= 2 => {
                d.add_tx(0, &[&pkt[..hdr_len], &pkt[hdr_len..]]);
                descs_left -= 2;
            }
            1 if descs_left >= 1 => {
                d.add_tx_indirect(0, &[&pkt[..5], &pkt[5..]]);
                descs_left -= 1;
            }
            _ if descs_left >= 1 => {
                d.add_tx(0, &[&pkt]);
                descs_left -= 1;
            }
            _ => {}
        }
    }
    for _ in 0..size.min(3) {
        d.add_rx(0, &[512]);
    }
    let mut input = p.encode().to_vec();
    input.extend_from_slice(&dev.driver.snapshot());
    input
}
