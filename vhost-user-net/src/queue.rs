//! The data path of a vhost-user-net device: bursts of packets between the guest's virtqueues
//! (split rings, virtio 1.2 §2.7) and the caller's preallocated buffers.
//!
//! Everything the guest controls — avail indices, descriptor addresses, lengths, flags, chain
//! links and indirect tables — is untrusted. A queue whose ring is malformed is marked broken,
//! reported once and no longer served until the frontend reconnects; a merely bad packet is
//! dropped and counted. Nothing here panics on guest input, and every loop is bounded by the
//! burst size or the queue size.

use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net as vn;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use torii_vhost_user::ring::{
    publish_used_batch, set_notification, RingError, RingMaps, Seg, SplitRing, MAX_CHAIN,
};
use torii_vhost_user::Connection;

use crate::device::DeviceShared;
use crate::hdr::{Offloads, VirtioNetHdr, HDR_LEN_LEGACY, HDR_LEN_MRG};

/// A packet buffer the data path can fill or drain. The caller's packet type implements it.
pub trait NetBuf {
    /// The whole writable area. A received chain (virtio header + frame) is copied here.
    fn raw_mut(&mut self) -> &mut [u8];
    /// Records what `raw_mut` now holds: a frame of `len` bytes at `offset`, with `hdr`.
    fn set_frame(&mut self, hdr: VirtioNetHdr, offset: usize, len: usize);
    /// The frame (without any virtio header).
    fn frame(&self) -> &[u8];
    /// Its offload metadata.
    fn hdr(&self) -> VirtioNetHdr;
    /// Puts `hdr` (at most 12 bytes) in the headroom right in front of the frame and returns
    /// both as one slice, so the packet goes into guest memory with one copy per buffer.
    /// Buffers must keep at least 12 bytes of headroom in front of their frame for this.
    fn with_header(&mut self, hdr: &[u8]) -> &[u8];
}

/// Where buffers come from and go back to; a per-PMD free list, never the heap per packet.
pub trait BufPool {
    type Buf: NetBuf;
    fn alloc(&mut self) -> Option<Self::Buf>;
    fn free(&mut self, b: Self::Buf);
}

/// Counters of one burst from the guest (guest TX).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FromGuest {
    pub packets: usize,
    pub bytes: usize,
    /// Chains longer than the buffers, shorter than a header, or with a bad header.
    pub dropped_invalid: usize,
    /// Of `packets`, those the guest handed over unsegmented (TSO/UFO, §5.1.6.2).
    pub gso: usize,
}

/// Counters of one burst to the guest (guest RX).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToGuest {
    pub packets: usize,
    pub bytes: usize,
    /// No guest buffers posted (ring full), or not connected.
    pub dropped_no_buffer: usize,
    /// The packet needs an offload the driver did not negotiate, or is larger than its buffers.
    pub dropped_unsupported: usize,
    /// Of `packets`, those delivered unsegmented (GUEST_TSO/UFO, §5.1.6.4).
    pub gso: usize,
}

/// Largest frame accepted from a guest: a 64 KiB GSO packet plus an Ethernet/VLAN header.
pub const MAX_FRAME: usize = 65535 + 18;

/// The PMD's handle on one device's virtqueues. Owned by exactly one thread.
pub struct NetQueues {
    shared: Arc<DeviceShared>,
    /// This handle's entry in `DeviceShared::handles` and `wakers`.
    slot: usize,
    seen_generation: u64,
    conn: Option<Arc<Connection>>,
    broken: Vec<bool>,
    /// Used-ring entries of the current burst: (head, written length). Preallocated.
    used: Vec<(u16, u32)>,
    /// Buffers of the chains gathered for the current burst. Preallocated.
    segs: Vec<Seg>,
    /// The gathered chains: (head, first seg, end seg). Preallocated.
    chains: Vec<(u16, usize, usize)>,
    /// Buffers of a chain walked on demand (past the gathered ones). Preallocated.
    scratch: Vec<Seg>,
    /// Per queue pair: receive chains known to be posted and unused after the last burst (a
    /// lower bound: the driver only adds more).
    rx_room: Vec<u16>,
    /// Host addresses of the rings, kept across bursts.
    maps: RingMaps,
    /// Guest-receive copies queued during a burst. Preallocated.
    copies: Vec<RxCopy>,
}

impl NetQueues {
    pub(crate) fn new(shared: Arc<DeviceShared>) -> Self {
        Self::with_slot(shared, 0)
    }

    pub(crate) fn with_slot(shared: Arc<DeviceShared>, slot: usize) -> Self {
        let n = 2 * shared.model.queue_pairs as usize;
        NetQueues {
            shared,
            slot,
            seen_generation: 0,
            conn: None,
            broken: vec![false; n],
            used: Vec::with_capacity(torii_vhost_user::MAX_QUEUE_SIZE),
            // Never grown: a burst gathers no more chains than fit (`SplitRing::walk`), and
            // any single chain fits.
            segs: Vec::with_capacity(2 * MAX_CHAIN),
            chains: Vec::with_capacity(torii_vhost_user::MAX_QUEUE_SIZE),
            scratch: Vec::with_capacity(MAX_CHAIN),
            rx_room: vec![0; n / 2],
            maps: RingMaps::new(n),
            copies: Vec::with_capacity(64),
        }
    }

    /// Another data-path handle on the same device, for the queue pairs `pairs` (the first
    /// names its slot): the pairs of one device can so be polled by different PMDs, each pair
    /// through exactly one handle. None if `pairs` is empty or out of range.
    pub fn handle_for(&self, pairs: &[u16]) -> Option<NetQueues> {
        let first = *pairs.first()?;
        if pairs.iter().any(|&p| p >= self.shared.model.queue_pairs) {
            return None;
        }
        Some(NetQueues::with_slot(self.shared.clone(), first as usize))
    }

    /// Number of queue pairs the device was configured with.
    pub fn queue_pairs(&self) -> u16 {
        self.shared.model.queue_pairs
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Marks this handle as polled by a PMD (the control thread then waits for it on
    /// disconnect) and picks up a new connection if there is one. Call once per poll round.
    #[inline]
    pub fn refresh(&mut self) {
        let g = self.shared.generation();
        if g != self.seen_generation {
            self.switch(g);
        }
    }

    #[cold]
    fn switch(&mut self, g: u64) {
        self.maps.clear();
        self.conn = self.shared.attach(self.slot, g);
        self.broken.iter_mut().for_each(|b| *b = false);
        self.rx_room.iter_mut().for_each(|r| *r = 0);
        self.seen_generation = g;
    }

    /// The operator set the link down ([`crate::VhostUserNetDevice::set_link`]): nothing is
    /// taken from or delivered to the guest (deliveries are dropped and counted).
    #[inline]
    fn link_down(&self) -> bool {
        !self.shared.model.link_up.load(Ordering::Relaxed)
    }

    /// Whether a frontend is connected and has acked its features.
    pub fn is_up(&self) -> bool {
        self.conn.is_some()
    }

    /// Offloads the driver accepts on its receive queues.
    pub fn guest_rx_offloads(&self) -> Offloads {
        match &self.conn {
            Some(c) => Offloads::guest_rx_from_features(c.acked_features()),
            None => Offloads::empty(),
        }
    }

    /// Registers the eventfd the owning PMD sleeps on; kicks from the guest write it.
    pub fn set_waker(&self, waker: Option<vmm_sys_util::event::EventNotifier>) {
        self.shared.set_waker(self.slot, waker);
    }

    /// Detaches from the PMD (the port moves or goes away).
    pub fn detach(&mut self) {
        self.conn = None;
        self.maps.clear();
        self.shared.detach(self.slot);
    }

    fn hdr_len(features: u64) -> usize {
        if features & ((1 << VIRTIO_F_VERSION_1) | (1 << vn::VIRTIO_NET_F_MRG_RXBUF)) != 0 {
            HDR_LEN_MRG
        } else {
            HDR_LEN_LEGACY
        }
    }

    fn mark_broken(&mut self, queue: usize, e: RingError) {
        if let Some(b) = self.broken.get_mut(queue) {
            if !*b {
                *b = true;
                self.shared.report_broken(queue as u16, e.to_string());
            }
        }
    }

    /// Enables (before sleeping) or disables (while polling) guest kicks on the guest TX
    /// queues (§2.7.7, used buffer / available buffer notification suppression). Returns true if
    /// buffers arrived meanwhile, in which case the caller must poll instead of sleeping.
    pub fn set_tx_notifications(&mut self, enable: bool) -> bool {
        let Some(conn) = &self.conn else {
            return false;
        };
        let mut pending = false;
        for qp in 0..self.shared.model.queue_pairs as usize {
            let qi = 2 * qp + 1;
            if self.broken[qi] {
                continue;
            }
            let r = set_notification(&conn.vrings[qi], enable).map(|more| pending |= more);
            if r.is_err() {
                // Reported by the next burst on that queue.
                pending = true;
            }
        }
        pending
    }

    /// Moves up to `max` packets from the guest's TX queue of pair `qp` into buffers from
    /// `pool`, appended to `out` (§5.1.6.2). `max` bounds the chains consumed, dropped ones
    /// included; give `out` room for `max` more so that the burst does not allocate.
    pub fn from_guest<P: BufPool>(
        &mut self,
        qp: u16,
        max: usize,
        pool: &mut P,
        out: &mut Vec<P::Buf>,
    ) -> FromGuest {
        let mut stats = FromGuest::default();
        let qi = 2 * qp as usize + 1;
        let Some(conn) = self.conn.as_ref() else {
            return stats;
        };
        // Link down (set by the operator): what the guest sends stays in its ring.
        if self.broken.get(qi).copied().unwrap_or(true) || self.link_down() {
            return stats;
        }
        let features = conn.acked_features();
        let hdr_len = Self::hdr_len(features);
        let allowed = Offloads::guest_tx_from_features(features);
        let in_order = features & (1 << virtio_bindings::virtio_config::VIRTIO_F_IN_ORDER) != 0;
        let mut state = conn.vrings[qi].get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) {
            return stats;
        }
        let queue = state.get_queue_mut();
        // The three ring areas (§2.7: 16*size, 6+2*size and 6+8*size bytes) must lie in guest
        // memory, or an unreadable avail entry would look like an empty ring.
        let ring = match self.maps.get(conn, qi, queue) {
            Ok(r) => r,
            Err(e) => {
                drop(state);
                self.mark_broken(qi, e);
                return stats;
            }
        };
        let next = queue.next_avail();
        let n = match ring.pending(next) {
            Ok(0) => return stats,
            Ok(n) => n.min(max.min(u16::MAX as usize) as u16),
            Err(e) => {
                drop(state);
                self.mark_broken(qi, e);
                return stats;
            }
        };
        self.used.clear();
        self.segs.clear();
        self.chains.clear();
        let mut err = None;
        // Gather: walk every chain of the burst first, prefetching its buffers.
        ring.prefetch_heads(next, n);
        for i in 0..n {
            let start = self.segs.len();
            let walked = ring.head(next.wrapping_add(i)).and_then(|head| {
                ring.walk(head, false, &mut self.segs)
                    .map(|fits| fits.then_some(head))
            });
            match walked {
                Ok(Some(head)) => self.chains.push((head, start, self.segs.len())),
                // Out of room for buffers: the rest waits for the next burst.
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        // Copy: by now the buffers are (being) pulled into the cache.
        let mut consumed = 0u16;
        for &(head, first, end) in &self.chains {
            // The buffer is filled where it stays, in `out`: moving a value right after
            // writing its fields one by one costs a store-forwarding stall per packet.
            let Some(buf) = pool.alloc() else { break };
            out.push(buf);
            let Some(buf) = out.last_mut() else { break };
            let raw = buf.raw_mut();
            let cap = raw.len().min(MAX_FRAME + hdr_len);
            let mut off = 0usize;
            let mut oversize = false;
            let mut bad = None;
            for seg in &self.segs[first..end] {
                let len = seg.len as usize;
                if oversize || off + len > cap {
                    oversize = true;
                    continue;
                }
                let dst = &mut raw[off..off + len];
                let copied = if seg.host != 0 {
                    // SAFETY: `seg.host..+len` was checked to be a mapping of guest memory
                    // when the chain was walked, in the table `ring` borrows until the end of
                    // this function; `dst` is our own buffer of `len` bytes. The guest may
                    // write the source meanwhile: the bytes are parsed from our copy only.
                    unsafe { crate::copy::copy_raw(dst.as_mut_ptr(), seg.host as *const u8, len) };
                    true
                } else {
                    read_guest(ring.mem(), GuestAddress(seg.addr), dst)
                };
                if !copied {
                    bad = Some(RingError::Address(seg.addr, seg.len));
                    break;
                }
                off += len;
            }
            if let Some(e) = bad {
                unpush(out, pool);
                err = Some(e);
                break;
            }
            consumed += 1;
            self.used.push((head, 0));
            if oversize || off < hdr_len {
                stats.dropped_invalid += 1;
                unpush(out, pool);
                continue;
            }
            let mut h = [0u8; HDR_LEN_LEGACY];
            h.copy_from_slice(&raw[..HDR_LEN_LEGACY]);
            let hdr = VirtioNetHdr::parse(&h);
            let frame_len = off - hdr_len;
            if !allowed.contains(hdr.required_offloads()) || hdr.validate(frame_len).is_err() {
                stats.dropped_invalid += 1;
                unpush(out, pool);
                continue;
            }
            buf.set_frame(hdr, hdr_len, frame_len);
            stats.packets += 1;
            stats.bytes += frame_len;
            stats.gso += usize::from(hdr.is_gso());
        }
        queue.set_next_avail(next.wrapping_add(consumed));
        let notify = publish_used_batch(&ring, queue, &self.used, in_order);
        if notify {
            let _ = state.signal_used_queue();
        }
        drop(state);
        if let Some(e) = err {
            self.mark_broken(qi, e);
        }
        stats
    }

    /// How many receive chains the guest has posted on pair `qp` that are not used yet: an
    /// upper bound on what `to_guest` can deliver (each packet takes at least one). Lets the
    /// PMD pull no more from the other port than this one can take, instead of copying packets
    /// only to drop them.
    /// A queue that cannot take anything at all (no frontend, stopped, broken) reports `want`:
    /// those packets are dropped and counted, like on a link that is down.
    pub fn to_guest_room(&mut self, qp: u16, want: usize) -> usize {
        let qi = 2 * qp as usize;
        let Some(conn) = &self.conn else {
            return want;
        };
        if self.broken.get(qi).copied().unwrap_or(true) || self.link_down() {
            return want;
        }
        let known = self.rx_room.get(qp as usize).copied().unwrap_or(0) as usize;
        if known >= want {
            // Enough chains were left over by the last burst: no need to look at the ring.
            return known;
        }
        let state = conn.vrings[qi].get_ref();
        let q = state.get_queue();
        if !(q.ready() && state.is_enabled()) {
            return want;
        }
        // Errors are left for `to_guest` to find and report.
        let Ok(room) = self
            .maps
            .get(conn, qi, q)
            .and_then(|r| r.pending(q.next_avail()))
        else {
            return want;
        };
        drop(state);
        if let Some(r) = self.rx_room.get_mut(qp as usize) {
            *r = room;
        }
        usize::from(room)
    }

    /// Delivers `pkts` (all of them are consumed: sent or dropped, and returned to `pool`) to the
    /// guest's RX queue of pair `qp` (§5.1.6.3, §5.1.6.4 with MRG_RXBUF).
    pub fn to_guest<P: BufPool>(
        &mut self,
        qp: u16,
        pkts: &mut Vec<P::Buf>,
        pool: &mut P,
    ) -> ToGuest {
        let mut stats = ToGuest::default();
        let qi = 2 * qp as usize;
        let down = self.link_down();
        let conn = match self.conn.as_ref() {
            Some(c) if !self.broken.get(qi).copied().unwrap_or(true) && !down => c,
            _ => {
                stats.dropped_no_buffer = pkts.len();
                pkts.drain(..).for_each(|p| pool.free(p));
                return stats;
            }
        };
        let features = conn.acked_features();
        let hdr_len = Self::hdr_len(features);
        let mergeable = features & (1 << vn::VIRTIO_NET_F_MRG_RXBUF) != 0;
        let accepts = Offloads::guest_rx_from_features(features);
        let mut state = conn.vrings[qi].get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) {
            drop(state);
            stats.dropped_no_buffer = pkts.len();
            pkts.drain(..).for_each(|p| pool.free(p));
            return stats;
        }
        let queue = state.get_queue_mut();
        // As in `from_guest`: the ring areas must lie in guest memory.
        let next = queue.next_avail();
        let ring = self
            .maps
            .get(conn, qi, queue)
            .and_then(|r| r.pending(next).map(|n| (r, n)));
        let (ring, avail) = match ring {
            Ok(r) => r,
            Err(e) => {
                drop(state);
                stats.dropped_no_buffer = pkts.len();
                pkts.drain(..).for_each(|p| pool.free(p));
                self.mark_broken(qi, e);
                return stats;
            }
        };
        let mut cur = Cursor {
            pos: next,
            left: avail,
        };
        // Gather the chains the burst will most likely use, prefetching their buffers, so the
        // writes below do not wait on one descriptor miss after another. A chain that fails to
        // walk here (or does not fit) is walked again (and reported) when a packet reaches it.
        self.used.clear();
        self.segs.clear();
        self.chains.clear();
        let want = avail.min(pkts.len().min(u16::MAX as usize) as u16);
        ring.prefetch_heads(next, want);
        for i in 0..want {
            let start = self.segs.len();
            match ring
                .head(next.wrapping_add(i))
                .and_then(|h| ring.walk(h, true, &mut self.segs).map(|fits| (h, fits)))
            {
                Ok((h, true)) => self.chains.push((h, start, self.segs.len())),
                _ => break,
            }
        }
        let pre = Prewalked {
            base: next,
            chains: &self.chains,
            segs: &self.segs,
        };
        let mut err = None;
        // Copies of the common case are queued and run after the loop (see `RxCopy`); every
        // packet stays in `pkts` until then.
        self.copies.clear();
        for pkt in pkts.iter_mut() {
            if cur.left == 0 || err.is_some() {
                // Ring full (or broken): drop without looking at the packet.
                stats.dropped_no_buffer += 1;
                continue;
            }
            let hdr = pkt.hdr();
            if !accepts.contains(hdr.required_offloads()) {
                stats.dropped_unsupported += 1;
                continue;
            }
            let mut h = hdr;
            if !accepts.contains(Offloads::CSUM) {
                // DATA_VALID is only meaningful with GUEST_CSUM (§5.1.6.4.1).
                h.flags = 0;
            }
            let frame_len = pkt.frame().len();
            if self.copies.len() == self.copies.capacity() {
                run_copies(&mut self.copies);
            }
            let written = if let Some(c) =
                plan_simple(&pre, &mut cur, h, hdr_len, pkt.frame(), &mut self.used)
            {
                self.copies.push(c);
                Ok(Written::Done)
            } else {
                let mut hbytes = [0u8; HDR_LEN_MRG];
                h.write(&mut hbytes[..hdr_len], 1);
                let parts = Stream {
                    bytes: pkt.with_header(&hbytes[..hdr_len]),
                    has_nb: hdr_len == HDR_LEN_MRG,
                };
                write_packet(
                    &ring,
                    &pre,
                    &mut cur,
                    parts,
                    mergeable,
                    &mut self.used,
                    &mut self.scratch,
                )
            };
            match written {
                Ok(Written::Done) => {
                    stats.packets += 1;
                    stats.bytes += frame_len;
                    stats.gso += usize::from(hdr.is_gso());
                }
                Ok(Written::NoBuffers) => {
                    // The ring is full: the rest of the burst is dropped too, keeping the
                    // chains for the next burst rather than filling them out of order.
                    stats.dropped_no_buffer += 1;
                    cur.left = 0;
                }
                Ok(Written::TooBig) => stats.dropped_unsupported += 1,
                Err(e) => {
                    stats.dropped_no_buffer += 1;
                    err = Some(e);
                }
            }
        }
        run_copies(&mut self.copies);
        pkts.drain(..).for_each(|p| pool.free(p));
        // `write_packet` puts back the chains of a packet it could not write, so `cur.pos` is
        // just past the chains in `self.used`, error or not.
        queue.set_next_avail(cur.pos);
        if let Some(r) = self.rx_room.get_mut(qp as usize) {
            *r = if err.is_some() { 0 } else { cur.left };
        }
        let notify = publish_used_batch(&ring, queue, &self.used, false);
        if notify {
            let _ = state.signal_used_queue();
        }
        drop(state);
        if let Some(e) = err {
            self.mark_broken(qi, e);
        }
        stats
    }
}

/// Returns the buffer `from_guest` last appended to `out` to the pool (a dropped packet).
#[inline]
fn unpush<P: BufPool>(out: &mut Vec<P::Buf>, pool: &mut P) {
    if let Some(b) = out.pop() {
        pool.free(b);
    }
}

/// Copies guest memory at `addr` into `dst`: one bounds-checked slice when the range lies in
/// one region (the common case), the general path otherwise.
#[inline]
fn read_guest(mem: &torii_vhost_user::MemTable, addr: GuestAddress, dst: &mut [u8]) -> bool {
    match mem.get_slice(addr, dst.len()) {
        Ok(s) => s.copy_to(dst) == dst.len(),
        Err(_) => mem.read_slice(dst, addr).is_ok(),
    }
}

/// Copies `src` into guest memory at `addr`; see [`read_guest`].
#[inline]
fn write_guest(mem: &torii_vhost_user::MemTable, addr: GuestAddress, src: &[u8]) -> bool {
    match mem.get_slice(addr, src.len()) {
        Ok(s) => {
            s.copy_from(src);
            true
        }
        Err(_) => mem.write_slice(src, addr).is_ok(),
    }
}

enum Written {
    Done,
    /// The ring ran out of buffers; the chains taken for this packet were put back.
    NoBuffers,
    /// Without MRG_RXBUF the packet does not fit in one chain; the chain was put back.
    TooBig,
}

/// Position in the avail ring while filling receive buffers.
struct Cursor {
    pos: u16,
    left: u16,
}

/// The bytes of one packet as they go into guest memory: virtio-net header then frame.
/// `has_nb`: the header has `num_buffers` at bytes 10..12.
struct Stream<'p> {
    bytes: &'p [u8],
    has_nb: bool,
}

/// Receive chains walked ahead of the writes: chain `i` is at avail position `base + i`.
struct Prewalked<'a> {
    base: u16,
    chains: &'a [(u16, usize, usize)],
    segs: &'a [Seg],
}

/// A queued write of one packet into one guest buffer: the virtio-net header (two words,
/// `hdr_len` bytes) and then `len` frame bytes from `src`. Like DPDK's vhost library, `to_guest`
/// decides where every packet of a burst goes first and copies afterwards in a tight loop, so
/// the stores that miss (the guest's buffers were last touched on the other CPU) are not
/// interleaved with the bookkeeping.
#[derive(Clone, Copy)]
pub(crate) struct RxCopy {
    dst: usize,
    hdr: (u64, u32),
    hdr_len: usize,
    src: usize,
    len: usize,
}

/// Runs and forgets the queued copies.
///
/// Every `RxCopy` was made by [`plan_simple`]: `dst..dst+hdr_len+len` lies in a guest buffer of
/// the current burst's memory table, and `src..src+len` in a packet still owned by the caller.
#[inline]
fn run_copies(copies: &mut Vec<RxCopy>) {
    for c in copies.drain(..) {
        // SAFETY: see above; the memory table and the packets outlive this call (`to_guest`
        // runs it before it publishes the used ring, frees the packets or drops the ring view).
        // The header is stored from registers, not copied from a buffer: reading freshly written
        // bytes back with a copy's wider loads stalls on store forwarding.
        unsafe {
            let dst = c.dst as *mut u8;
            ptr::write_unaligned(dst as *mut u64, c.hdr.0.to_le());
            if c.hdr_len == HDR_LEN_MRG {
                ptr::write_unaligned(dst.add(8) as *mut u32, c.hdr.1.to_le());
            } else {
                ptr::write_unaligned(dst.add(8) as *mut u16, (c.hdr.1 as u16).to_le());
            }
            crate::copy::copy_raw(dst.add(c.hdr_len), c.src as *const u8, c.len);
        }
    }
}

/// The common case of guest receive: header (`hdr_len` bytes, `num_buffers` 1) and frame fit
/// the first buffer of the next gathered chain. Takes the chain and returns the copy to run
/// (before the used ring is published), or None (nothing taken) if the packet needs
/// [`write_packet`].
#[inline]
fn plan_simple(
    pre: &Prewalked<'_>,
    cur: &mut Cursor,
    hdr: VirtioNetHdr,
    hdr_len: usize,
    frame: &[u8],
    used: &mut Vec<(u16, u32)>,
) -> Option<RxCopy> {
    let k = cur.pos.wrapping_sub(pre.base) as usize;
    let &(head, first, _) = pre.chains.get(k)?;
    let seg = pre.segs[first];
    let total = hdr_len + frame.len();
    if seg.host == 0 || total > seg.len as usize || cur.left == 0 {
        return None;
    }
    used.push((head, total as u32));
    cur.pos = cur.pos.wrapping_add(1);
    cur.left -= 1;
    Some(RxCopy {
        dst: seg.host,
        hdr: hdr.le_words(1),
        hdr_len,
        src: frame.as_ptr() as usize,
        len: frame.len(),
    })
}

/// Writes one packet (virtio header + frame) into as many chains as needed, recording used
/// entries. On any failure the chains taken for this packet are returned to the avail ring.
#[allow(clippy::too_many_arguments)]
fn write_packet(
    ring: &SplitRing<'_>,
    pre: &Prewalked<'_>,
    cur: &mut Cursor,
    data: Stream<'_>,
    mergeable: bool,
    used: &mut Vec<(u16, u32)>,
    segs: &mut Vec<Seg>,
) -> Result<Written, RingError> {
    let mem = ring.mem();
    let bytes = data.bytes;
    let total = bytes.len();
    let mut pos = 0usize;
    let first_used = used.len();
    let start = (cur.pos, cur.left);
    let mut chains = 0u16;
    // Where bytes 10 and 11 (num_buffers) of the header landed in guest memory.
    let mut nb_addr: [Option<GuestAddress>; 2] = [None, None];
    let rollback = |cur: &mut Cursor, used: &mut Vec<(u16, u32)>| {
        (cur.pos, cur.left) = start;
        used.truncate(first_used);
    };
    while pos < total {
        if cur.left == 0 {
            rollback(cur, used);
            return Ok(Written::NoBuffers);
        }
        let k = cur.pos.wrapping_sub(pre.base) as usize;
        let (head, chain) = match pre.chains.get(k) {
            Some(&(h, a, b)) => (h, &pre.segs[a..b]),
            None => {
                segs.clear();
                // `segs` is empty, so any chain fits (`walk` returns true).
                match ring
                    .head(cur.pos)
                    .and_then(|h| ring.walk(h, true, segs).map(|_| h))
                {
                    Ok(h) => (h, &segs[..]),
                    Err(e) => {
                        rollback(cur, used);
                        return Err(e);
                    }
                }
            }
        };
        cur.pos = cur.pos.wrapping_add(1);
        cur.left -= 1;
        chains += 1;
        let mut written = 0u32;
        for seg in chain {
            if pos >= total {
                break;
            }
            let n = (seg.len as usize).min(total - pos);
            let src = &bytes[pos..pos + n];
            let copied = if seg.host != 0 {
                // SAFETY: as for the fast path above; `n <= seg.len`.
                unsafe { crate::copy::copy_raw(seg.host as *mut u8, src.as_ptr(), n) };
                true
            } else {
                write_guest(mem, GuestAddress(seg.addr), src)
            };
            if !copied {
                rollback(cur, used);
                return Err(RingError::Address(seg.addr, seg.len));
            }
            // Remember where num_buffers (header bytes 10 and 11) went, to patch it once the
            // number of chains is known.
            for (k, slot) in nb_addr.iter_mut().enumerate() {
                let b = 10 + k;
                if data.has_nb && pos <= b && b < pos + n {
                    *slot = GuestAddress(seg.addr).checked_add((b - pos) as u64);
                }
            }
            pos += n;
            written += n as u32;
        }
        used.push((head, written));
        if pos < total && !mergeable {
            rollback(cur, used);
            return Ok(Written::TooBig);
        }
    }
    if chains > 1 {
        let nb = chains.to_le_bytes();
        for (k, a) in nb_addr.iter().enumerate() {
            if let Some(a) = a {
                if mem.write_obj(nb[k], *a).is_err() {
                    return Err(RingError::Address(a.0, 1));
                }
            }
        }
    }
    Ok(Written::Done)
}

#[cfg(test)]
mod tests;
