//! Packet buffers. Every buffer is allocated once, when its PMD starts, and then circulates
//! between the PMD's free list and the ports: nothing is allocated per packet.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use torii_vhost_user_net::{BufPool, NetBuf, VirtioNetHdr};

/// Room in front of a frame: a tap's 12-byte vnet header, or an 802.1Q tag to push.
pub const HEADROOM: usize = 64;
/// Largest frame: a 64 KiB GSO packet with its Ethernet and VLAN headers.
pub const MAX_FRAME: usize = torii_vhost_user_net::MAX_FRAME;
/// Buffers differ in where their headroom starts, in steps of a cache line over one page
/// ("colouring"): every buffer is larger than a page, so without it the first bytes of all
/// buffers — the ones every packet touches — would fall in the same few L1 cache sets and
/// evict each other within a burst.
const COLOURS: usize = 64;
/// 802.1Q: the TPID and the length of a tag.
const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];
pub const VLAN_TAG_LEN: usize = 4;
const COLOUR_STEP: usize = 64;

/// One frame and its offload metadata (the virtio-net header, which is also a tap's).
///
/// A thin handle: bursts, free lists and queues move 8-byte pointers, not the metadata (as
/// DPDK moves `rte_mbuf` pointers). Moving a 56-byte struct through three vectors per packet
/// was a tenth of a guest-RX PMD's time.
pub struct Packet(Box<Meta>);

struct Meta {
    buf: Box<[u8]>,
    /// Where this buffer's frames start when there is no header in front: HEADROOM plus its
    /// colour.
    home: usize,
    off: usize,
    len: usize,
    hdr: VirtioNetHdr,
}

impl Packet {
    /// Buffer `i` of a pool, in `buf` (of at least `buf_len(i)` bytes).
    fn new(i: usize, buf: Box<[u8]>) -> Self {
        let home = HEADROOM + (i % COLOURS) * COLOUR_STEP;
        debug_assert!(buf.len() >= home + MAX_FRAME);
        Packet(Box::new(Meta {
            buf,
            home,
            off: home,
            len: 0,
            hdr: VirtioNetHdr::default(),
        }))
    }

    /// The size of buffer `i` of a pool.
    fn buf_len(i: usize) -> usize {
        HEADROOM + (i % COLOURS) * COLOUR_STEP + MAX_FRAME
    }

    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    pub fn data(&self) -> &[u8] {
        &self.0.buf[self.0.off..self.0.off + self.0.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.0.buf[self.0.off..self.0.off + self.0.len]
    }

    pub fn hdr_mut(&mut self) -> &mut VirtioNetHdr {
        &mut self.0.hdr
    }

    /// Copies `frame` in with no offload metadata.
    pub fn fill(&mut self, frame: &[u8]) {
        let len = frame.len().min(MAX_FRAME);
        self.0.off = self.0.home;
        self.0.len = len;
        self.0.hdr = VirtioNetHdr::default();
        torii_vhost_user_net::copy::copy_bytes(
            &mut self.0.buf[self.0.home..self.0.home + len],
            &frame[..len],
        );
    }

    /// Makes the packet a frame of `len` bytes (at most [`MAX_FRAME`]) with offload metadata
    /// `hdr`, and returns it for the caller to fill (a frame copied in pieces, from a chain of
    /// DPDK mbufs). None if `len` is too large.
    pub fn frame_area(&mut self, len: usize, hdr: VirtioNetHdr) -> Option<&mut [u8]> {
        if len > MAX_FRAME {
            return None;
        }
        let m = &mut *self.0;
        m.off = m.home;
        m.len = len;
        m.hdr = hdr;
        Some(&mut m.buf[m.home..m.home + len])
    }

    /// The 802.1Q tag control information, if the frame carries a tag.
    #[inline]
    pub fn vlan_tci(&self) -> Option<u16> {
        let d = self.data();
        (d.len() >= 18 && d[12..14] == ETH_P_8021Q).then(|| u16::from_be_bytes([d[14], d[15]]))
    }

    /// Inserts an 802.1Q tag after the MAC addresses (into the headroom). Offload offsets move
    /// with the frame. False (nothing changed) if the frame is too short or there is no room.
    pub fn push_vlan(&mut self, tci: u16) -> bool {
        let m = &mut *self.0;
        if m.len < 12 || m.off < VLAN_TAG_LEN || m.off + m.len + VLAN_TAG_LEN > m.buf.len() {
            return false;
        }
        let start = m.off - VLAN_TAG_LEN;
        m.buf.copy_within(m.off..m.off + 12, start);
        m.buf[start + 12..start + 14].copy_from_slice(&ETH_P_8021Q);
        m.buf[start + 14..start + 16].copy_from_slice(&tci.to_be_bytes());
        m.off = start;
        m.len += VLAN_TAG_LEN;
        m.hdr.shift_offsets(VLAN_TAG_LEN as i32);
        true
    }

    /// Removes the outer 802.1Q tag. False (nothing changed) if there is none.
    pub fn pop_vlan(&mut self) -> bool {
        if self.vlan_tci().is_none() {
            return false;
        }
        let m = &mut *self.0;
        m.buf.copy_within(m.off..m.off + 12, m.off + VLAN_TAG_LEN);
        m.off += VLAN_TAG_LEN;
        m.len -= VLAN_TAG_LEN;
        m.hdr.shift_offsets(-(VLAN_TAG_LEN as i32));
        true
    }

    /// Rewrites the outer tag's control information (the frame must carry a tag).
    pub fn set_vlan_tci(&mut self, tci: u16) {
        if self.vlan_tci().is_some() {
            self.data_mut()[14..16].copy_from_slice(&tci.to_be_bytes());
        }
    }

    /// A copy of this packet (frame and offload metadata) in a buffer from `pool`.
    pub fn duplicate(&self, pool: &mut PacketPool) -> Option<Packet> {
        let mut c = pool.alloc()?;
        c.fill(self.data());
        c.0.hdr = self.0.hdr;
        Some(c)
    }

    /// The frame preceded by `prefix` bytes of headroom, which the caller fills (a tap's vnet
    /// header). Returns None if there is not that much headroom.
    pub fn with_prefix(&mut self, prefix: usize) -> Option<&mut [u8]> {
        let start = self.0.off.checked_sub(prefix)?;
        Some(&mut self.0.buf[start..self.0.off + self.0.len])
    }

    /// The buffer for a read that will place a `prefix`-byte header then the frame.
    pub fn read_area(&mut self, prefix: usize) -> &mut [u8] {
        &mut self.0.buf[self.0.home - prefix..]
    }

    /// After a read into `read_area(prefix)` of `n` bytes, the header was the first `prefix`.
    pub fn set_read(&mut self, prefix: usize, n: usize, hdr: VirtioNetHdr) {
        self.0.off = self.0.home;
        self.0.len = n.saturating_sub(prefix);
        self.0.hdr = hdr;
    }
}

impl NetBuf for Packet {
    fn raw_mut(&mut self) -> &mut [u8] {
        // The virtio header lands in the headroom's tail so the frame starts at `home`.
        &mut self.0.buf[self.0.home - torii_vhost_user_net::hdr::HDR_LEN_MRG..]
    }

    fn set_frame(&mut self, hdr: VirtioNetHdr, offset: usize, len: usize) {
        self.0.off = self.0.home - torii_vhost_user_net::hdr::HDR_LEN_MRG + offset;
        self.0.len = len;
        self.0.hdr = hdr;
    }

    fn frame(&self) -> &[u8] {
        self.data()
    }

    fn hdr(&self) -> VirtioNetHdr {
        self.0.hdr
    }

    fn with_header(&mut self, hdr: &[u8]) -> &[u8] {
        // `off` never goes below home - 12 (virtio header of a received chain), and the
        // header is at most 12 bytes.
        let area = self
            .with_prefix(hdr.len())
            .expect("packet headroom holds a virtio-net header");
        area[..hdr.len()].copy_from_slice(hdr);
        area
    }
}

/// Packets shared by every PMD: a lock-free ring that each PMD's [`PacketPool`] cache refills
/// from and spills to in batches (DPDK's mempool with its per-lcore caches). A packet received
/// on one PMD can so be sent, and freed, by another. The ring never holds more than the
/// packets made for it, so a spill always fits.
pub struct SharedPool {
    ring: ArrayQueue<Packet>,
    made: AtomicUsize,
}

impl SharedPool {
    /// A pool that will hold up to `capacity` packets (see [`Self::populate`]).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(SharedPool {
            ring: ArrayQueue::new(capacity.max(1)),
            made: AtomicUsize::new(0),
        })
    }

    /// Makes up to `n` more packets (on the calling thread, which first touches their memory:
    /// a PMD populates its share on its own CPU). Returns how many were made.
    pub fn populate(&self, n: usize) -> usize {
        let room = self.ring.capacity() - self.made.load(Ordering::Acquire);
        let n = n.min(room);
        // All frame buffers before the metadata, so that the metadata of all packets lies
        // together in a few pages, as DPDK's mbuf headers do.
        let bufs: Vec<Box<[u8]>> = (0..n)
            .map(|i| vec![0u8; Packet::buf_len(i)].into_boxed_slice())
            .collect();
        for (i, b) in bufs.into_iter().enumerate() {
            if self.ring.push(Packet::new(i, b)).is_err() {
                return i;
            }
            self.made.fetch_add(1, Ordering::AcqRel);
        }
        n
    }

    /// Packets made so far.
    pub fn size(&self) -> usize {
        self.made.load(Ordering::Acquire)
    }
}

/// Packets a PMD keeps for itself before it returns some to the shared ring.
const CACHE: usize = 256;

/// A PMD's packet cache over the [`SharedPool`]. Allocation and free are a `Vec` pop and push;
/// the shared ring is touched once per [`CACHE`]/2 packets.
pub struct PacketPool {
    cache: Vec<Packet>,
    shared: Arc<SharedPool>,
}

impl PacketPool {
    /// A pool of its own with `size` packets.
    pub fn new(size: usize) -> Self {
        let shared = SharedPool::new(size);
        shared.populate(size);
        Self::attach(shared)
    }

    /// A cache over `shared`.
    pub fn attach(shared: Arc<SharedPool>) -> Self {
        PacketPool {
            cache: Vec::with_capacity(2 * CACHE + 1),
            shared,
        }
    }

    /// Packets free: in this cache and in the shared ring (not in other PMDs' caches).
    pub fn available(&self) -> usize {
        self.cache.len() + self.shared.ring.len()
    }

    pub fn size(&self) -> usize {
        self.shared.size()
    }

    #[cold]
    fn refill(&mut self) {
        for _ in 0..CACHE / 2 {
            match self.shared.ring.pop() {
                Some(p) => self.cache.push(p),
                None => break,
            }
        }
    }

    #[cold]
    fn spill(&mut self) {
        for p in self.cache.drain(CACHE..) {
            // Cannot fail: the ring has room for every packet ever made.
            let _ = self.shared.ring.push(p);
        }
    }
}

impl Drop for PacketPool {
    /// The cached packets go back to the ring, for the other PMDs.
    fn drop(&mut self) {
        for p in self.cache.drain(..) {
            let _ = self.shared.ring.push(p);
        }
    }
}

impl BufPool for PacketPool {
    type Buf = Packet;

    #[inline]
    fn alloc(&mut self) -> Option<Packet> {
        if self.cache.is_empty() {
            self.refill();
        }
        self.cache.pop()
    }

    #[inline]
    fn free(&mut self, mut p: Packet) {
        let m = &mut *p.0;
        m.len = 0;
        m.off = m.home;
        m.hdr = VirtioNetHdr::default();
        if self.cache.len() >= 2 * CACHE {
            self.spill();
        }
        self.cache.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_move_between_pmd_caches() {
        let shared = SharedPool::new(1000);
        assert_eq!(shared.populate(600), 600);
        assert_eq!(shared.populate(600), 400, "never more than the capacity");
        let (s1, s2) = (shared.clone(), shared.clone());
        // One thread allocates and hands packets over, the other frees them: the second
        // one's cache spills back to the ring the first one refills from.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Packet>(64);
        let a = std::thread::spawn(move || {
            let mut pool = PacketPool::attach(s1);
            for _ in 0..20_000 {
                let p = loop {
                    if let Some(p) = pool.alloc() {
                        break p;
                    }
                    std::thread::yield_now();
                };
                tx.send(p).unwrap();
            }
        });
        let b = std::thread::spawn(move || {
            let mut pool = PacketPool::attach(s2);
            for p in rx {
                pool.free(p);
            }
        });
        a.join().unwrap();
        b.join().unwrap();
        // Both caches were dropped: every packet is back in the ring.
        assert_eq!(PacketPool::attach(shared).available(), 1000);
    }

    #[test]
    fn pool_recycles_without_growing() {
        let mut pool = PacketPool::new(2);
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        assert!(pool.alloc().is_none());
        pool.free(a);
        pool.free(b);
        assert_eq!(pool.available(), 2);
    }

    #[test]
    fn virtio_header_lands_in_headroom() {
        let mut pool = PacketPool::new(1);
        let mut p = pool.alloc().unwrap();
        let raw = p.raw_mut();
        raw[12..16].copy_from_slice(b"abcd");
        p.set_frame(VirtioNetHdr::default(), 12, 4);
        assert_eq!(p.data(), b"abcd");
        let pre = p.with_prefix(12).unwrap();
        assert_eq!(pre.len(), 16);
    }
}
