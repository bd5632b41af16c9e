//! Packet buffers. Every buffer is allocated once, when its PMD starts, and then circulates
//! between the PMD's free list and the ports: nothing is allocated per packet.

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

/// A PMD's free list. Single-threaded; never grows after creation.
pub struct PacketPool {
    free: Vec<Packet>,
    size: usize,
}

impl PacketPool {
    pub fn new(size: usize) -> Self {
        PacketPool {
            free: Self::buffers(size),
            size,
        }
    }

    /// The pool's packets. All frame buffers are allocated before the metadata, so that the
    /// metadata of all packets lies together in a few pages, as DPDK's mbuf headers do.
    fn buffers(size: usize) -> Vec<Packet> {
        let bufs: Vec<Box<[u8]>> = (0..size)
            .map(|i| vec![0u8; Packet::buf_len(i)].into_boxed_slice())
            .collect();
        bufs.into_iter()
            .enumerate()
            .map(|(i, b)| Packet::new(i, b))
            .collect()
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn size(&self) -> usize {
        self.size
    }
}

impl BufPool for PacketPool {
    type Buf = Packet;

    #[inline]
    fn alloc(&mut self) -> Option<Packet> {
        self.free.pop()
    }

    #[inline]
    fn free(&mut self, mut p: Packet) {
        if self.free.len() < self.size {
            let m = &mut *p.0;
            m.len = 0;
            m.off = m.home;
            m.hdr = VirtioNetHdr::default();
            self.free.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
