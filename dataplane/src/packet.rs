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
const COLOUR_STEP: usize = 64;

/// One frame and its offload metadata (the virtio-net header, which is also a tap's).
pub struct Packet {
    buf: Box<[u8]>,
    /// Where this buffer's frames start when there is no header in front: HEADROOM plus its
    /// colour.
    home: usize,
    off: usize,
    len: usize,
    hdr: VirtioNetHdr,
}

impl Packet {
    /// Buffer `i` of a pool.
    fn new(i: usize) -> Self {
        let home = HEADROOM + (i % COLOURS) * COLOUR_STEP;
        Packet {
            buf: vec![0u8; home + MAX_FRAME].into_boxed_slice(),
            home,
            off: home,
            len: 0,
            hdr: VirtioNetHdr::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }

    pub fn hdr_mut(&mut self) -> &mut VirtioNetHdr {
        &mut self.hdr
    }

    /// Copies `frame` in with no offload metadata.
    pub fn fill(&mut self, frame: &[u8]) {
        let len = frame.len().min(MAX_FRAME);
        self.off = self.home;
        self.len = len;
        self.hdr = VirtioNetHdr::default();
        torii_vhost_user_net::copy::copy_bytes(
            &mut self.buf[self.home..self.home + len],
            &frame[..len],
        );
    }

    /// The frame preceded by `prefix` bytes of headroom, which the caller fills (a tap's vnet
    /// header). Returns None if there is not that much headroom.
    pub fn with_prefix(&mut self, prefix: usize) -> Option<&mut [u8]> {
        let start = self.off.checked_sub(prefix)?;
        Some(&mut self.buf[start..self.off + self.len])
    }

    /// The buffer for a read that will place a `prefix`-byte header then the frame.
    pub fn read_area(&mut self, prefix: usize) -> &mut [u8] {
        &mut self.buf[self.home - prefix..]
    }

    /// After a read into `read_area(prefix)` of `n` bytes, the header was the first `prefix`.
    pub fn set_read(&mut self, prefix: usize, n: usize, hdr: VirtioNetHdr) {
        self.off = self.home;
        self.len = n.saturating_sub(prefix);
        self.hdr = hdr;
    }
}

impl NetBuf for Packet {
    fn raw_mut(&mut self) -> &mut [u8] {
        // The virtio header lands in the headroom's tail so the frame starts at `home`.
        &mut self.buf[self.home - torii_vhost_user_net::hdr::HDR_LEN_MRG..]
    }

    fn set_frame(&mut self, hdr: VirtioNetHdr, offset: usize, len: usize) {
        self.off = self.home - torii_vhost_user_net::hdr::HDR_LEN_MRG + offset;
        self.len = len;
        self.hdr = hdr;
    }

    fn frame(&self) -> &[u8] {
        self.data()
    }

    fn hdr(&self) -> VirtioNetHdr {
        self.hdr
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
            free: (0..size).map(Packet::new).collect(),
            size,
        }
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
    fn free(&mut self, p: Packet) {
        if self.free.len() < self.size {
            // Reset in place, after the move: a packet moved right after its fields were written
            // one by one is read back with wider loads that cannot be forwarded from those
            // stores, a stall per packet.
            self.free.push(p);
            if let Some(p) = self.free.last_mut() {
                p.len = 0;
                p.off = p.home;
                p.hdr = VirtioNetHdr::default();
            }
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
