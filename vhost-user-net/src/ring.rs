//! Split virtqueue access for the data path (virtio 1.2 §2.7): the descriptor table and avail
//! ring are translated once per burst into bounds-checked slices of guest memory, chains are
//! walked with every guest-controlled field checked, and buffer addresses are prefetched while
//! the chains of a burst are gathered, so the copies that follow do not stall on one cache
//! miss after another.

use std::sync::atomic::Ordering;

use std::cell::Cell;
use virtio_queue::QueueT;

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileSlice,
};

use crate::queue::RingError;

const DESC_LEN: usize = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Most descriptors an indirect table may hold (a queue never needs more than its size).
const MAX_INDIRECT: usize = crate::backend::MAX_QUEUE_SIZE;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Where the buffer is mapped in this process, when it lies in one memory region (0
    /// otherwise). Valid only while the burst's guest memory guard is held.
    host: usize,
}

impl Seg {
    /// The buffer as a slice of guest memory, if it lies in one region.
    ///
    /// # Safety
    /// The guest memory guard under which the chain was walked must still be held, so that the
    /// mapping `host` points into is alive.
    #[inline]
    pub(crate) unsafe fn slice<'a>(&self) -> Option<VolatileSlice<'a, ()>> {
        if self.host == 0 {
            return None;
        }
        // SAFETY: `host..host+len` was a VolatileSlice of a live mapping when walked, and the
        // caller guarantees the mapping is still alive.
        Some(unsafe { VolatileSlice::new(self.host as *mut u8, self.len as usize) })
    }
}

/// The descriptor table and avail ring of one queue, valid for one burst.
pub(crate) struct SplitRing<'m> {
    mem: &'m GuestMemoryMmap<()>,
    desc: VolatileSlice<'m, ()>,
    avail: VolatileSlice<'m, ()>,
    size: u16,
    /// The guest memory region the last buffer was found in: (guest start, length, host
    /// address). Buffers of a burst nearly always share a region, so this spares a region
    /// search per buffer.
    last_region: Cell<(u64, u64, usize)>,
}

impl<'m> SplitRing<'m> {
    /// Translates the ring areas of `queue`; fails if any lies outside guest memory.
    pub(crate) fn new(
        mem: &'m GuestMemoryMmap<()>,
        queue: &virtio_queue::Queue,
    ) -> Result<Self, RingError> {
        let size = queue.size();
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::Layout);
        }
        let desc = mem
            .get_slice(GuestAddress(queue.desc_table()), DESC_LEN * size as usize)
            .map_err(|_| RingError::Layout)?;
        // struct virtq_avail: flags, idx, ring[size], used_event.
        let avail = mem
            .get_slice(GuestAddress(queue.avail_ring()), 6 + 2 * size as usize)
            .map_err(|_| RingError::Layout)?;
        // The used ring is written through its own slice (see `publish_used`); check it here
        // so that a bad one is found before anything is consumed.
        mem.get_slice(GuestAddress(queue.used_ring()), 6 + 8 * size as usize)
            .map_err(|_| RingError::Layout)?;
        Ok(SplitRing {
            mem,
            desc,
            avail,
            size,
            last_region: Cell::new((0, 0, 0)),
        })
    }

    /// Chains the driver made available since `next_avail` (§2.7.6), checked against the size.
    pub(crate) fn pending(&self, next_avail: u16) -> Result<u16, RingError> {
        let idx: u16 = self
            .avail
            .load(2, Ordering::Acquire)
            .map_err(|_| RingError::Layout)?;
        let n = u16::from_le(idx).wrapping_sub(next_avail);
        if n > self.size {
            return Err(RingError::AvailIdx(n, self.size));
        }
        Ok(n)
    }

    /// The head index at avail position `pos`.
    pub(crate) fn head(&self, pos: u16) -> Result<u16, RingError> {
        let off = 4 + 2 * (pos % self.size) as usize;
        let h: u16 = self.avail.read_obj(off).map_err(|_| RingError::Layout)?;
        let h = u16::from_le(h);
        if h >= self.size {
            return Err(RingError::Chain(h));
        }
        Ok(h)
    }

    /// Prefetches the head descriptors of the `n` chains from avail position `pos`, so the
    /// walks that follow find them in cache instead of missing on each in turn.
    pub(crate) fn prefetch_heads(&self, pos: u16, n: u16) {
        for i in 0..n {
            if let Ok(h) = self.head(pos.wrapping_add(i)) {
                if let Ok(d) = self.desc.subslice(h as usize * DESC_LEN, DESC_LEN) {
                    prefetch(&d);
                }
            }
        }
    }

    /// Walks the chain at `head`, appending its buffers to `segs` and prefetching each one.
    /// `writable`: the device writes (RX) or reads (TX) every buffer. Bounded by the queue size
    /// (or the indirect table's length), so a loop ends as an error, not a hang.
    pub(crate) fn walk(
        &self,
        head: u16,
        writable: bool,
        segs: &mut Vec<Seg>,
    ) -> Result<(), RingError> {
        let mut table = self.desc;
        let mut table_len = self.size as usize;
        let mut idx = head as usize;
        let mut ttl = table_len;
        let mut indirect = false;
        loop {
            if idx >= table_len || ttl == 0 {
                return Err(RingError::Chain(head));
            }
            ttl -= 1;
            let raw: [u8; DESC_LEN] = table
                .read_obj(idx * DESC_LEN)
                .map_err(|_| RingError::Chain(head))?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(raw[14..16].try_into().unwrap());
            if flags & F_INDIRECT != 0 {
                // §2.7.5.3.1: no nested tables, no NEXT with INDIRECT, whole descriptors only.
                let n = len as usize / DESC_LEN;
                if indirect
                    || flags & F_NEXT != 0
                    || !(len as usize).is_multiple_of(DESC_LEN)
                    || n == 0
                    || n > MAX_INDIRECT
                {
                    return Err(RingError::Chain(head));
                }
                table = self
                    .mem
                    .get_slice(GuestAddress(addr), len as usize)
                    .map_err(|_| RingError::Chain(head))?;
                table_len = n;
                ttl = n;
                idx = 0;
                indirect = true;
                continue;
            }
            if (flags & F_WRITE != 0) != writable {
                return Err(if writable {
                    RingError::Direction("device-readable", "receive")
                } else {
                    RingError::Direction("device-writable", "transmit")
                });
            }
            let host = match self.host_addr(addr, len) {
                Some(h) => {
                    prefetch_ptr(h);
                    h
                }
                // A buffer across two regions is still fine; the copy takes the slow path.
                None if addr.checked_add(len as u64).is_some() => 0,
                None => return Err(RingError::Address(addr, len)),
            };
            segs.push(Seg { addr, len, host });
            if flags & F_NEXT == 0 {
                return Ok(());
            }
            idx = next as usize;
        }
    }
}

impl SplitRing<'_> {
    /// Where guest range `addr..addr+len` is mapped here, if it lies inside one region.
    #[inline]
    fn host_addr(&self, addr: u64, len: u32) -> Option<usize> {
        let inside = |(start, size, host): (u64, u64, usize)| {
            let off = addr.checked_sub(start)?;
            (off <= size && u64::from(len) <= size - off).then(|| host + off as usize)
        };
        if let Some(h) = inside(self.last_region.get()) {
            return Some(h);
        }
        let r = self.mem.find_region(GuestAddress(addr))?;
        let whole = r.get_slice(MemoryRegionAddress(0), r.len() as usize).ok()?;
        let entry = (
            r.start_addr().0,
            r.len(),
            whole.ptr_guard().as_ptr() as usize,
        );
        self.last_region.set(entry);
        inside(entry)
    }
}

#[inline]
fn prefetch_ptr(p: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults or changes memory.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline]
fn prefetch(s: &VolatileSlice<'_, ()>) {
    if s.is_empty() {
        return;
    }
    let p = s.ptr_guard();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults or changes memory, and the address is
    // inside a live mapping of guest memory anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.as_ptr() as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
