//! Packet buffers. Every buffer is allocated once, when its PMD starts, and then circulates
//! between the PMD's free list and the ports: nothing is allocated per packet.

use std::ffi::c_void;
use std::ptr::NonNull;
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
    /// The buffer the frame is in when it is not `buf` (`off` is then relative to it).
    ext: Option<ExtBuf>,
}

/// A frame buffer lent to a packet by someone else — a DPDK mbuf's, so that a received frame
/// is not copied — and given back with `release(handle)` when the packet lets go of it.
pub struct ExtBuf {
    pub base: NonNull<u8>,
    pub cap: usize,
    pub handle: NonNull<c_void>,
    pub release: unsafe fn(NonNull<c_void>),
    /// Who made it, for [`Packet::take_external`].
    pub tag: u32,
}

// SAFETY: the lent buffer belongs to the packet alone until released, and `release` may be
// called from any thread (the contract of `attach_external`): packets move between PMDs.
unsafe impl Send for ExtBuf {}

impl Meta {
    /// The buffer the frame is in.
    #[inline]
    fn store(&self) -> &[u8] {
        match &self.ext {
            None => &self.buf,
            // SAFETY: an attached buffer is `cap` bytes only this packet uses until it is
            // released (the contract of `attach_external`).
            Some(e) => unsafe { std::slice::from_raw_parts(e.base.as_ptr(), e.cap) },
        }
    }

    #[inline]
    fn store_mut(&mut self) -> &mut [u8] {
        match &mut self.ext {
            None => &mut self.buf,
            // SAFETY: as in `store`; `&mut self` makes this the only access.
            Some(e) => unsafe { std::slice::from_raw_parts_mut(e.base.as_ptr(), e.cap) },
        }
    }

    /// Back on the packet's own buffer (an attached one is released).
    #[inline]
    fn own(&mut self) {
        if self.ext.is_some() {
            self.detach();
        }
    }

    #[cold]
    fn detach(&mut self) {
        if let Some(e) = self.ext.take() {
            // SAFETY: released once: `ext` no longer holds it.
            unsafe { (e.release)(e.handle) };
            self.off = self.home;
            self.len = 0;
        }
    }
}

impl Drop for Meta {
    fn drop(&mut self) {
        self.detach();
    }
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
            ext: None,
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
        &self.0.store()[self.0.off..self.0.off + self.0.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        let (off, len) = (self.0.off, self.0.len);
        &mut self.0.store_mut()[off..off + len]
    }

    pub fn hdr_mut(&mut self) -> &mut VirtioNetHdr {
        &mut self.0.hdr
    }

    /// Copies `frame` in with no offload metadata.
    pub fn fill(&mut self, frame: &[u8]) {
        let len = frame.len().min(MAX_FRAME);
        self.0.own();
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
        m.own();
        m.off = m.home;
        m.len = len;
        m.hdr = hdr;
        Some(&mut m.buf[m.home..m.home + len])
    }

    /// Makes the packet the frame of `len` bytes at `off` in the lent buffer `ext` (a received
    /// DPDK mbuf's), instead of copying it.
    ///
    /// # Safety
    /// `ext.base` points to `ext.cap` bytes that nothing else reads or writes until the
    /// packet calls `ext.release(ext.handle)` — exactly once: when it is freed, dropped, given
    /// another frame, or the buffer is taken back with [`Self::take_external`] — on whatever
    /// thread holds the packet then.
    pub unsafe fn attach_external(
        &mut self,
        ext: ExtBuf,
        off: usize,
        len: usize,
        hdr: VirtioNetHdr,
    ) {
        debug_assert!(off + len <= ext.cap);
        let m = &mut *self.0;
        m.own();
        m.ext = Some(ext);
        m.off = off;
        m.len = len;
        m.hdr = hdr;
    }

    /// If the frame is in a lent buffer made with `tag`, gives the buffer back unreleased,
    /// with the frame's offset and length in it (after any VLAN push or pop); the packet is
    /// left empty on its own buffer.
    pub fn take_external(&mut self, tag: u32) -> Option<(ExtBuf, usize, usize)> {
        let m = &mut *self.0;
        if m.ext.as_ref()?.tag != tag {
            return None;
        }
        let e = m.ext.take()?;
        let r = (e, m.off, m.len);
        m.off = m.home;
        m.len = 0;
        Some(r)
    }

    /// Whether the frame is in a lent buffer.
    pub fn is_external(&self) -> bool {
        self.0.ext.is_some()
    }

    /// Lends the packet's own buffer out (a DPDK external buffer): the frame's address, and
    /// `scratch` bytes (8-byte aligned) after the frame for metadata that must live as long
    /// as the loan. None if the frame is in a lent buffer itself or there is no room. The
    /// addresses stay valid while the packet is held through [`Self::into_raw`].
    pub fn lend(&mut self, scratch: usize) -> Option<(NonNull<u8>, NonNull<u8>)> {
        let m = &mut *self.0;
        if m.ext.is_some() {
            return None;
        }
        let at = (m.off + m.len).next_multiple_of(8);
        if at + scratch > m.buf.len() {
            return None;
        }
        let base = m.buf.as_mut_ptr();
        // SAFETY: off and at + scratch are within buf (checked above).
        unsafe {
            Some((
                NonNull::new_unchecked(base.add(m.off)),
                NonNull::new_unchecked(base.add(at)),
            ))
        }
    }

    /// The packet as one pointer, for C code to hold while its buffer is lent out.
    pub fn into_raw(self) -> NonNull<c_void> {
        let p = Box::into_raw(self.0);
        // SAFETY: Box::into_raw never returns null.
        unsafe { NonNull::new_unchecked(p.cast()) }
    }

    /// The packet given out by [`Self::into_raw`].
    ///
    /// # Safety
    /// `p` came from `into_raw` and is turned back once.
    pub unsafe fn from_raw(p: NonNull<c_void>) -> Packet {
        // SAFETY: the caller's contract: p is a leaked Box<Meta>, reclaimed once.
        Packet(unsafe { Box::from_raw(p.as_ptr().cast::<Meta>()) })
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
        let (off, len) = (m.off, m.len);
        let buf = m.store_mut();
        if len < 12 || off < VLAN_TAG_LEN || off + len + VLAN_TAG_LEN > buf.len() {
            return false;
        }
        let start = off - VLAN_TAG_LEN;
        buf.copy_within(off..off + 12, start);
        buf[start + 12..start + 14].copy_from_slice(&ETH_P_8021Q);
        buf[start + 14..start + 16].copy_from_slice(&tci.to_be_bytes());
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
        let off = m.off;
        m.store_mut().copy_within(off..off + 12, off + VLAN_TAG_LEN);
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
        let end = self.0.off + self.0.len;
        Some(&mut self.0.store_mut()[start..end])
    }

    /// The buffer for a read that will place a `prefix`-byte header then the frame.
    pub fn read_area(&mut self, prefix: usize) -> &mut [u8] {
        self.0.own();
        &mut self.0.buf[self.0.home - prefix..]
    }

    /// After a read into `read_area(prefix)` of `n` bytes, the header was the first `prefix`.
    pub fn set_read(&mut self, prefix: usize, n: usize, hdr: VirtioNetHdr) {
        self.0.own();
        self.0.off = self.0.home;
        self.0.len = n.saturating_sub(prefix);
        self.0.hdr = hdr;
    }
}

impl NetBuf for Packet {
    fn raw_mut(&mut self) -> &mut [u8] {
        // The virtio header lands in the headroom's tail so the frame starts at `home`.
        self.0.own();
        &mut self.0.buf[self.0.home - torii_vhost_user_net::hdr::HDR_LEN_MRG..]
    }

    fn set_frame(&mut self, hdr: VirtioNetHdr, offset: usize, len: usize) {
        self.0.own();
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

    /// Puts back a packet held outside every PMD's cache: the buffers a port still holds when
    /// it is dropped (on the control thread), which would otherwise be lost to the pool for
    /// good — it never makes more than its size.
    pub fn give_back(&self, mut p: Packet) {
        let m = &mut *p.0;
        m.own();
        m.len = 0;
        m.off = m.home;
        m.hdr = VirtioNetHdr::default();
        // Cannot fail: the ring has room for every packet ever made.
        let _ = self.ring.push(p);
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

    /// The pool this is a cache of.
    pub fn shared(&self) -> &Arc<SharedPool> {
        &self.shared
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
        m.own();
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

    static RELEASED: AtomicUsize = AtomicUsize::new(0);

    /// A lent buffer for the tests: a leaked boxed slice, counted when released.
    fn lent(frame: &[u8], headroom: usize) -> ExtBuf {
        unsafe fn release(h: NonNull<c_void>) {
            RELEASED.fetch_add(1, Ordering::SeqCst);
            // SAFETY: h is the Box<Vec<u8>> leaked by `lent`.
            drop(unsafe { Box::from_raw(h.as_ptr().cast::<Vec<u8>>()) });
        }
        let mut v = vec![0u8; headroom];
        v.extend_from_slice(frame);
        v.resize(v.len() + 16, 0);
        let cap = v.len();
        let mut b = Box::new(v);
        let base = NonNull::new(b.as_mut_ptr()).unwrap();
        let handle = NonNull::new(Box::into_raw(b).cast::<c_void>()).unwrap();
        ExtBuf {
            base,
            cap,
            handle,
            release,
            tag: 7,
        }
    }

    #[test]
    fn lent_buffers_are_used_in_place_and_released_once() {
        let before = RELEASED.load(Ordering::SeqCst);
        let mut pool = PacketPool::new(2);
        let frame: Vec<u8> = (0..60u8).collect();
        let mut p = pool.alloc().unwrap();
        // SAFETY: the buffer is the packet's alone; release may run on any thread.
        unsafe { p.attach_external(lent(&frame, 32), 32, 60, VirtioNetHdr::default()) };
        assert!(p.is_external());
        assert_eq!(p.data(), &frame[..]);
        // Edits happen in the lent buffer: a tag goes into its headroom.
        assert!(p.push_vlan(0x0064));
        assert_eq!(p.vlan_tci(), Some(0x0064));
        assert_eq!(p.with_prefix(12).unwrap().len(), 12 + 64);
        // Freed: released once, and the packet is back on its own buffer.
        pool.free(p);
        assert_eq!(RELEASED.load(Ordering::SeqCst), before + 1);
        let mut p = pool.alloc().unwrap();
        assert!(!p.is_external());
        // Taken back unreleased, with the frame's place after a tag push.
        unsafe { p.attach_external(lent(&frame, 32), 32, 60, VirtioNetHdr::default()) };
        assert!(p.push_vlan(5));
        assert!(p.take_external(8).is_none(), "another owner's tag");
        let (e, off, len) = p.take_external(7).unwrap();
        assert_eq!((off, len), (28, 64));
        assert_eq!(RELEASED.load(Ordering::SeqCst), before + 1);
        unsafe { (e.release)(e.handle) };
        // Given a frame of its own, or dropped: the lent buffer goes back.
        unsafe { p.attach_external(lent(&frame, 32), 32, 60, VirtioNetHdr::default()) };
        p.fill(b"own frame");
        assert_eq!(p.data(), b"own frame");
        assert_eq!(RELEASED.load(Ordering::SeqCst), before + 3);
        unsafe { p.attach_external(lent(&frame, 32), 32, 60, VirtioNetHdr::default()) };
        drop(p);
        assert_eq!(RELEASED.load(Ordering::SeqCst), before + 4);
    }

    #[test]
    fn a_lent_out_packet_comes_back_whole() {
        let mut pool = PacketPool::new(1);
        let mut p = pool.alloc().unwrap();
        p.fill(b"abcdef");
        let (frame, scratch) = p.lend(24).unwrap();
        assert_eq!(scratch.as_ptr() as usize % 8, 0);
        assert!(scratch.as_ptr() as usize >= frame.as_ptr() as usize + 6);
        let raw = p.into_raw();
        // SAFETY: raw came from into_raw, once.
        let p = unsafe { Packet::from_raw(raw) };
        assert_eq!(p.data(), b"abcdef");
        pool.free(p);
        assert_eq!(pool.available(), 1);
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
