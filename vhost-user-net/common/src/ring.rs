//! Split virtqueue access for the data path (virtio 1.2 §2.7).
//!
//! The three ring areas of a queue are translated to host addresses once per memory table and
//! ring layout ([`RingMap`]), not once per burst. Avail entries and descriptors are then read,
//! and used entries written, through raw pointers into that mapping: every index is reduced
//! modulo the (power-of-two) queue size and every guest-controlled field is checked before it
//! is used, so no access can leave the translated areas. Buffer addresses go through a
//! one-entry region cache. This module holds all raw-pointer access to rings; the data copies
//! in `queue.rs` use the host addresses of [`Seg`]s checked here.
//!
//! Chains are walked with every guest-controlled field checked, bounded by the queue size (or
//! the indirect table's length), and buffer addresses are prefetched while the chains of a
//! burst are gathered, so the copies that follow do not stall on one cache miss after another.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::endpoint::Connection;
use crate::{guard, GuestMem, MAX_QUEUE_SIZE};

/// Enables or disables the driver's notifications (kicks) on `vring` (§2.7.10: the used
/// ring's flags, or `avail_event` with EVENT_IDX) — only while the ring is started. Both are
/// writes into the ring, and once the frontend has stopped it (GET_VRING_BASE, done under
/// the same lock) the driver may free and reuse that memory. With `enable`, returns whether
/// buffers were made available meanwhile (the caller must then poll rather than sleep);
/// false for a stopped ring.
pub fn set_notification(vring: &VringRwLock<GuestMem>, enable: bool) -> Result<bool, RingError> {
    let mut state = vring.get_mut();
    if !(state.get_queue().ready() && state.is_enabled()) {
        return Ok(false);
    }
    let r = if enable {
        state.enable_notification()
    } else {
        state.disable_notification().map(|()| false)
    };
    r.map_err(|_| RingError::Layout)
}

/// Why a ring is considered broken.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RingError {
    #[error("avail ring: {0} chains available but the queue holds {1}")]
    AvailIdx(u16, u16),
    #[error(
        "descriptor chain starting at {0} is cut short (loop, bad index or bad indirect table)"
    )]
    Chain(u16),
    #[error("descriptor {0:#x}+{1} is outside guest memory")]
    Address(u64, u32),
    #[error("{0} descriptor in a {1} chain")]
    Direction(&'static str, &'static str),
    #[error("descriptor table, avail ring or used ring is not inside guest memory")]
    Layout,
    #[error("request at descriptor {0}: {1}")]
    Request(u16, &'static str),
    #[error(
        "guest memory {0:#x}+{1:#x} was truncated by the frontend under the device (SIGBUS \
         caught, zero pages mapped in its place)"
    )]
    Truncated(u64, u64),
    #[error(
        "the inflight region was truncated by the frontend under the device (SIGBUS caught, \
         zero pages mapped in its place): requests in flight can no longer be recovered"
    )]
    InflightTruncated,
}

const DESC_LEN: usize = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Used ring flag: the device does not want to be notified of new buffers (§2.7.10).
const USED_F_NO_NOTIFY: u16 = 1;
/// Most descriptors an indirect table may hold (a queue never needs more than its size).
const MAX_INDIRECT: usize = MAX_QUEUE_SIZE;
/// Most buffers one chain can have: a full direct chain ending in a full indirect table.
pub const MAX_CHAIN: usize = MAX_QUEUE_SIZE + MAX_INDIRECT;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub write: bool,
    /// Where the buffer is mapped in this process, when it lies in one memory region (0
    /// otherwise). Valid only while the burst's memory table is borrowed.
    pub host: usize,
}

/// Host addresses of one queue's descriptor table, avail ring and used ring, and the guest
/// layout they were translated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingMap {
    layout: (u64, u64, u64, u16),
    desc: usize,
    avail: usize,
    used: usize,
}

impl RingMap {
    fn layout_of(queue: &virtio_queue::Queue) -> (u64, u64, u64, u16) {
        (
            queue.desc_table(),
            queue.avail_ring(),
            queue.used_ring(),
            queue.size(),
        )
    }

    /// Translates the ring areas of `queue`. Fails if any lies outside guest memory (or across
    /// two regions), or is not aligned as §2.7 requires (16, 2 and 4 bytes).
    fn new(mem: &crate::MemTable, queue: &virtio_queue::Queue) -> Result<Self, RingError> {
        let layout = Self::layout_of(queue);
        let (desc, avail, used, size) = layout;
        if size == 0 || !size.is_power_of_two() || size as usize > MAX_QUEUE_SIZE {
            return Err(RingError::Layout);
        }
        let size = size as usize;
        let area = |addr: u64, len: usize, align: usize| {
            let s = mem
                .get_slice(GuestAddress(addr), len)
                .map_err(|_| RingError::Layout)?;
            let p = s.ptr_guard().as_ptr() as usize;
            if !p.is_multiple_of(align) {
                return Err(RingError::Layout);
            }
            Ok(p)
        };
        Ok(RingMap {
            layout,
            desc: area(desc, DESC_LEN * size, 16)?,
            // struct virtq_avail: flags, idx, ring[size], used_event.
            avail: area(avail, 6 + 2 * size, 2)?,
            // struct virtq_used: flags, idx, ring[size] of {id u32, len u32}, avail_event.
            used: area(used, 6 + 8 * size, 4)?,
        })
    }
}

/// Ring translations of a device's queues, tied to the memory table they were made under.
pub struct RingMaps {
    /// The connection's memory table as of `generation`; the maps point into it, and holding
    /// it keeps those mappings alive.
    mem: Option<Arc<crate::MemTable>>,
    generation: u64,
    maps: Vec<Option<RingMap>>,
    /// [`guard::faults`] when the table was last found intact.
    faults_seen: u64,
    /// Why `mem` is None although the connection has a table: it was truncated under us.
    truncated: Option<RingError>,
}

impl RingMaps {
    pub fn new(queues: usize) -> Self {
        RingMaps {
            mem: None,
            generation: 0,
            maps: vec![None; queues],
            faults_seen: 0,
            truncated: None,
        }
    }

    /// Forgets every translation and the memory table (new connection, or none).
    pub fn clear(&mut self) {
        self.mem = None;
        self.truncated = None;
        self.maps.iter_mut().for_each(|m| *m = None);
    }

    /// The ring view of queue `qi` of `conn` for one burst. The memory table is reloaded only
    /// when the handler changed it (its generation moved), and the rings are translated again
    /// only then or when the queue's ring addresses changed.
    #[inline(always)]
    pub fn get(
        &mut self,
        conn: &Connection,
        qi: usize,
        queue: &virtio_queue::Queue,
    ) -> Result<SplitRing<'_>, RingError> {
        let generation = conn.mem_generation.load(Ordering::Acquire);
        let faults = guard::faults();
        if self.mem.is_none() || generation != self.generation || faults != self.faults_seen {
            self.reload(conn.mem.memory().into_inner(), generation, faults);
        }
        self.view(qi, queue)
    }

    /// Like [`RingMaps::get`], under the memory table `mem` of `generation` that the caller
    /// holds (a data path with I/O in flight into guest memory keeps the table those buffers
    /// were translated under until the I/O completes).
    #[inline]
    pub fn get_in(
        &mut self,
        mem: &Arc<crate::MemTable>,
        generation: u64,
        qi: usize,
        queue: &virtio_queue::Queue,
    ) -> Result<SplitRing<'_>, RingError> {
        let faults = guard::faults();
        if self.mem.is_none() || generation != self.generation || faults != self.faults_seen {
            self.reload(mem.clone(), generation, faults);
        }
        self.view(qi, queue)
    }

    #[inline(always)]
    fn view(&mut self, qi: usize, queue: &virtio_queue::Queue) -> Result<SplitRing<'_>, RingError> {
        let Some(mem) = self.mem.as_deref() else {
            return Err(self.truncated.clone().unwrap_or(RingError::Layout));
        };
        let slot = self.maps.get_mut(qi).ok_or(RingError::Layout)?;
        let map = match slot {
            Some(m) if m.layout == RingMap::layout_of(queue) => m,
            _ => Self::translate(slot, mem, queue)?,
        };
        let size = map.layout.3;
        Ok(SplitRing {
            mem,
            desc: map.desc,
            avail: map.avail,
            used: map.used,
            size,
            mask: size - 1,
            last_region: Cell::new((0, 0, 0)),
        })
    }

    #[cold]
    fn translate<'s>(
        slot: &'s mut Option<RingMap>,
        mem: &crate::MemTable,
        queue: &virtio_queue::Queue,
    ) -> Result<&'s RingMap, RingError> {
        Ok(slot.insert(RingMap::new(mem, queue)?))
    }

    /// Takes the memory table `mem` of `generation`, unless a SIGBUS was caught in it (the
    /// frontend truncated it under the device: the callers report every queue of it broken,
    /// until the frontend connects again), and forgets the ring translations made under
    /// another.
    #[cold]
    fn reload(&mut self, mem: Arc<crate::MemTable>, generation: u64, faults: u64) {
        if generation != self.generation || self.mem.is_none() {
            self.maps.iter_mut().for_each(|m| *m = None);
        }
        self.generation = generation;
        self.truncated = mem.iter().find_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            guard::faulted(host as usize, r.len() as usize)
                .then(|| RingError::Truncated(r.start_addr().0, r.len()))
        });
        if self.truncated.is_some() {
            self.mem = None;
        } else {
            self.mem = Some(mem);
            self.faults_seen = faults;
        }
    }
}

/// One queue's rings, valid for one burst (while the memory table `'m` is borrowed).
pub struct SplitRing<'m> {
    mem: &'m crate::MemTable,
    /// Host addresses of the descriptor table, avail ring and used ring.
    desc: usize,
    avail: usize,
    used: usize,
    size: u16,
    mask: u16,
    /// The guest memory region the last buffer was found in: (guest start, length, host
    /// address). Buffers of a burst nearly always share a region, so this spares a region
    /// search per buffer.
    last_region: Cell<(u64, u64, usize)>,
}

// All raw accesses below stay inside the areas `RingMap::new` translated: the avail ring is
// 6 + 2 * size bytes and 2-aligned, the descriptor table 16 * size bytes and 16-aligned, the
// used ring 6 + 8 * size bytes and 4-aligned, and `size` is a power of two, so every offset
// computed from an index masked with `size - 1` is in bounds and aligned. The mapping is alive
// because `'m` borrows the memory table it was translated under (see `RingMaps::get`).
impl<'m> SplitRing<'m> {
    /// The memory table the rings are in.
    #[inline]
    pub fn mem(&self) -> &'m crate::MemTable {
        self.mem
    }

    #[inline]
    fn avail_u16(&self, off: usize) -> u16 {
        // SAFETY: see the comment on this impl; callers pass offsets inside the avail ring.
        u16::from_le(unsafe { ptr::read_volatile((self.avail + off) as *const u16) })
    }

    /// Chains the driver made available since `next_avail` (§2.7.6), checked against the size.
    #[inline]
    pub fn pending(&self, next_avail: u16) -> Result<u16, RingError> {
        // SAFETY: `idx` is at offset 2 of the 2-aligned avail ring (see this impl's comment).
        let idx = unsafe { AtomicU16::from_ptr((self.avail + 2) as *mut u16) };
        let n = u16::from_le(idx.load(Ordering::Acquire)).wrapping_sub(next_avail);
        if n > self.size {
            return Err(RingError::AvailIdx(n, self.size));
        }
        Ok(n)
    }

    /// The head index at avail position `pos`.
    #[inline]
    pub fn head(&self, pos: u16) -> Result<u16, RingError> {
        let h = self.avail_u16(4 + 2 * (pos & self.mask) as usize);
        if h >= self.size {
            return Err(RingError::Chain(h));
        }
        Ok(h)
    }

    /// Prefetches the head descriptors of the `n` chains from avail position `pos`, so the
    /// walks that follow find them in cache instead of missing on each in turn.
    #[inline]
    pub fn prefetch_heads(&self, pos: u16, n: u16) {
        for i in 0..n {
            let h = self.avail_u16(4 + 2 * (pos.wrapping_add(i) & self.mask) as usize);
            prefetch(self.desc + DESC_LEN * (h & self.mask) as usize);
        }
    }

    /// The used index as the driver sees it (what a previous backend instance completed).
    #[inline]
    pub fn used_idx(&self) -> u16 {
        // SAFETY: `idx` is at offset 2 of the 4-aligned used ring (see this impl's comment).
        let idx = unsafe { AtomicU16::from_ptr((self.used + 2) as *mut u16) };
        u16::from_le(idx.load(Ordering::Acquire))
    }

    /// The avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT) and, with EVENT_IDX, `used_event`.
    #[inline]
    pub fn avail_flags(&self) -> u16 {
        self.avail_u16(0)
    }

    #[inline]
    pub fn used_event(&self) -> u16 {
        self.avail_u16(4 + 2 * self.size as usize)
    }

    /// Writes used element `(head, len)` at used position `pos` (not yet visible: see
    /// [`SplitRing::publish_used`]).
    #[inline]
    pub fn put_used(&self, pos: u16, head: u16, len: u32) {
        let at = self.used + 4 + 8 * (pos & self.mask) as usize;
        // SAFETY: the element is inside the 4-aligned used ring (see this impl's comment).
        unsafe {
            ptr::write_volatile(at as *mut u32, u32::from(head).to_le());
            ptr::write_volatile((at + 4) as *mut u32, len.to_le());
        }
    }

    /// Makes the used elements before `idx` visible to the driver (store-release of the used
    /// index: the driver must never see an index ahead of its elements).
    #[inline]
    pub fn publish_used(&self, idx: u16) {
        // SAFETY: `idx` is at offset 2 of the 4-aligned used ring.
        let at = unsafe { AtomicU16::from_ptr((self.used + 2) as *mut u16) };
        at.store(idx.to_le(), Ordering::Release);
    }

    /// Asks the driver not to notify (kick) us after adding buffers (§2.7.10: the used ring's
    /// VRING_USED_F_NO_NOTIFY): a polling PMD needs no kicks, and each costs the driver a
    /// syscall and us a wakeup of the kick thread. With EVENT_IDX the flag means nothing;
    /// there the driver stops kicking once it passes the `avail_event` we last wrote (only
    /// moved by the data path when it is about to sleep).
    /// Checked every burst, as a driver that resets its rings clears the flag.
    #[inline]
    pub fn suppress_notifications(&self, event_idx: bool) {
        if event_idx {
            return;
        }
        let at = self.used as *mut u16;
        // SAFETY: `flags` is at offset 0 of the 4-aligned used ring (see this impl's comment).
        unsafe {
            if u16::from_le(ptr::read_volatile(at)) & USED_F_NO_NOTIFY == 0 {
                ptr::write_volatile(at, USED_F_NO_NOTIFY.to_le());
            }
        }
    }

    /// Walks the chain at `head`, appending its buffers to `segs` and prefetching each one.
    /// `writable`: the device writes (RX) or reads (TX) every buffer. Bounded by the queue size
    /// (or the indirect table's length), so a loop ends as an error, not a hang. Never grows
    /// `segs`: if the chain does not fit in its spare capacity, `Ok(false)` (and `segs` is as
    /// before); a chain always fits in an empty `segs` of capacity [`MAX_CHAIN`].
    #[inline]
    pub fn walk(&self, head: u16, writable: bool, segs: &mut Vec<Seg>) -> Result<bool, RingError> {
        let d = self.desc(head as usize);
        let want = if writable { F_WRITE } else { 0 };
        if d.flags == want {
            // The common case: one buffer of the right direction.
            return match self.host_addr(d.addr, d.len) {
                Some(host) if segs.len() < segs.capacity() => {
                    prefetch_buf(host, d.len, writable);
                    segs.push(Seg {
                        addr: d.addr,
                        len: d.len,
                        write: writable,
                        host,
                    });
                    Ok(true)
                }
                Some(_) => Ok(false),
                None => self.walk_general(head, Some(writable), segs),
            };
        }
        self.walk_general(head, Some(writable), segs)
    }

    /// Walks the chain at `head` like [`SplitRing::walk`], taking buffers of both directions
    /// (each [`Seg`] says which): a request chain with a header to read, data, and a status to
    /// write. The order of directions is the caller's to check.
    #[inline]
    pub fn walk_mixed(&self, head: u16, segs: &mut Vec<Seg>) -> Result<bool, RingError> {
        self.walk_general(head, None, segs)
    }

    /// Descriptor `idx` (< size) of the ring's own table.
    #[inline]
    fn desc(&self, idx: usize) -> Desc {
        // SAFETY: callers pass idx < size; the table is 16-aligned and 16 * size bytes long.
        unsafe { Desc::load(self.desc + DESC_LEN * (idx & self.mask as usize)) }
    }

    #[cold]
    fn walk_general(
        &self,
        head: u16,
        writable: Option<bool>,
        segs: &mut Vec<Seg>,
    ) -> Result<bool, RingError> {
        let start = segs.len();
        let r = self.walk_chain(head, writable, segs);
        if !matches!(r, Ok(true)) {
            segs.truncate(start);
        }
        r
    }

    /// `writable`: the direction every buffer must have, or None for any.
    fn walk_chain(
        &self,
        head: u16,
        writable: Option<bool>,
        segs: &mut Vec<Seg>,
    ) -> Result<bool, RingError> {
        // The table being walked: (host address, entries). Starts as the ring's own.
        let mut table = (self.desc, self.size as usize);
        let mut idx = head as usize;
        let mut ttl = table.1;
        let mut indirect = false;
        loop {
            if idx >= table.1 || ttl == 0 {
                return Err(RingError::Chain(head));
            }
            ttl -= 1;
            // SAFETY: idx < table.1, and table.0 maps table.1 descriptors: the ring's own
            // table (see this impl's comment) or an indirect table checked below.
            let d = unsafe { Desc::load(table.0 + DESC_LEN * idx) };
            if d.flags & F_INDIRECT != 0 {
                // §2.7.5.3.1: no nested tables, no NEXT with INDIRECT, whole descriptors only.
                let n = d.len as usize / DESC_LEN;
                if indirect
                    || d.flags & F_NEXT != 0
                    || !(d.len as usize).is_multiple_of(DESC_LEN)
                    || n == 0
                    || n > MAX_INDIRECT
                {
                    return Err(RingError::Chain(head));
                }
                let host = self
                    .host_addr(d.addr, d.len)
                    .ok_or(RingError::Chain(head))?;
                table = (host, n);
                ttl = n;
                idx = 0;
                indirect = true;
                continue;
            }
            let write = d.flags & F_WRITE != 0;
            match writable {
                Some(true) if !write => {
                    return Err(RingError::Direction("device-readable", "receive"))
                }
                Some(false) if write => {
                    return Err(RingError::Direction("device-writable", "transmit"))
                }
                _ => {}
            }
            let host = match self.host_addr(d.addr, d.len) {
                Some(h) => {
                    prefetch_buf(h, d.len, write);
                    h
                }
                // A buffer across two regions is still fine; the copy takes the slow path.
                None if d.addr.checked_add(u64::from(d.len)).is_some() => 0,
                None => return Err(RingError::Address(d.addr, d.len)),
            };
            if segs.len() == segs.capacity() {
                return Ok(false);
            }
            segs.push(Seg {
                addr: d.addr,
                len: d.len,
                write,
                host,
            });
            if d.flags & F_NEXT == 0 {
                return Ok(true);
            }
            idx = d.next as usize;
        }
    }

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
        self.host_addr_slow(addr, len)
    }

    #[cold]
    fn host_addr_slow(&self, addr: u64, len: u32) -> Option<usize> {
        let r = self.mem.find_region(GuestAddress(addr))?;
        let whole = r.get_slice(MemoryRegionAddress(0), r.len() as usize).ok()?;
        let entry = (
            r.start_addr().0,
            r.len(),
            whole.ptr_guard().as_ptr() as usize,
        );
        self.last_region.set(entry);
        let off = addr - entry.0;
        (u64::from(len) <= entry.1 - off).then(|| entry.2 + off as usize)
    }
}

/// Writes a burst of used elements and then the used index once (§2.7.8): the driver sees the
/// whole burst at one store-release instead of one per packet, which is what keeps the used
/// index's cache line from bouncing between the guest and the PMD. `last_only`: write only
/// the burst's last element, which §2.7.9 allows with IN_ORDER (the driver then takes every
/// chain up to it as used; only for transmit queues, where all written lengths are 0). Returns
/// whether the driver wants to be notified.
pub fn publish_used_batch(
    ring: &SplitRing<'_>,
    queue: &mut virtio_queue::Queue,
    used: &[(u16, u32)],
    last_only: bool,
) -> bool {
    let Some(&(last_head, last_len)) = used.last() else {
        return false;
    };
    let old = queue.next_used();
    let next = old.wrapping_add(used.len() as u16);
    // Heads come from `SplitRing::head`, which checked them against the size.
    if last_only {
        ring.put_used(next.wrapping_sub(1), last_head, last_len);
    } else {
        let mut pos = old;
        for &(head, len) in used {
            ring.put_used(pos, head, len);
            pos = pos.wrapping_add(1);
        }
    }
    ring.publish_used(next);
    queue.set_next_used(next);
    // Here rather than before the burst: the used ring's first line is now ours anyway. (Receive
    // buffers are only looked at when there is a packet for them, and transmit queues are
    // polled, so neither wants kicks; `set_tx_notifications` asks for them before a sleep.)
    ring.suppress_notifications(queue.event_idx_enabled());
    needs_interrupt(ring, queue, old)
}

/// Whether the driver wants an interrupt for the used entries from `old` to the queue's
/// `next_used` (§2.7.10): with EVENT_IDX, when `used_event` lies in that range (§2.7.10.2,
/// the inequality Linux uses for batches); without it, unless the driver set
/// VRING_AVAIL_F_NO_INTERRUPT — a polling driver (DPDK) does, which saves an eventfd write per
/// burst.
pub fn needs_interrupt(ring: &SplitRing<'_>, queue: &virtio_queue::Queue, old: u16) -> bool {
    let new = queue.next_used();
    if new == old {
        return false;
    }
    // The used index store must be visible before the driver's event field is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if queue.event_idx_enabled() {
        let used_event = ring.used_event();
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    } else {
        ring.avail_flags() & 1 == 0
    }
}

/// A descriptor as read from guest memory (§2.7.5), fields in host order.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    /// Reads the descriptor at host address `at` once (the guest may change it meanwhile; every
    /// field is checked after this copy, never read again).
    ///
    /// # Safety
    /// `at..at+16` must be inside a live mapping of guest memory.
    #[inline]
    unsafe fn load(at: usize) -> Desc {
        let (lo, hi) = if at.is_multiple_of(8) {
            // SAFETY: in bounds by the caller's contract, 8-aligned as checked.
            unsafe {
                (
                    ptr::read_volatile(at as *const u64),
                    ptr::read_volatile((at + 8) as *const u64),
                )
            }
        } else {
            // An indirect table at an odd address: byte by byte.
            let mut b = [0u8; DESC_LEN];
            for (i, v) in b.iter_mut().enumerate() {
                // SAFETY: in bounds by the caller's contract; bytes need no alignment.
                *v = unsafe { ptr::read_volatile((at + i) as *const u8) };
            }
            (
                u64::from_ne_bytes(b[..8].try_into().unwrap_or_default()),
                u64::from_ne_bytes(b[8..].try_into().unwrap_or_default()),
            )
        };
        let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
        Desc {
            addr: lo,
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        }
    }
}

/// Prefetches the start of a buffer: every line of its first [`PREFETCH_BYTES`] (a small
/// packet with its virtio header usually spans two lines), for writing if `write` (so the copy
/// into guest memory does not first fetch the line shared and then upgrade it).
#[inline]
fn prefetch_buf(host: usize, len: u32, write: bool) {
    const LINE: usize = 64;
    let end = host + (len as usize).min(PREFETCH_BYTES);
    let mut line = host & !(LINE - 1);
    while line < end {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint; it never faults or changes memory.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
            if write {
                _mm_prefetch(line as *const i8, _MM_HINT_ET0);
            } else {
                _mm_prefetch(line as *const i8, _MM_HINT_T0);
            }
        }
        line += LINE;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (line, end, write);
}

/// How much of each buffer [`prefetch_buf`] pulls in ahead of the copy; the hardware
/// prefetcher follows the copy of anything longer.
const PREFETCH_BYTES: usize = 128;

#[inline]
fn prefetch(p: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults or changes memory.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
