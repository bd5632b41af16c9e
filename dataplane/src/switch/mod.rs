//! The L2 learning switch: every port not in a cross-connect is a switch port. Frames are
//! classified into a VLAN by their ingress port ([`vlan`]), their source MAC is learned
//! ([`mactable`]), and they go to the port their destination was learned on, or are flooded
//! to every other member of the VLAN (broadcast, multicast, unknown unicast). Tags are pushed,
//! popped or rewritten on the way out as the egress port's VLAN mode asks.
//!
//! Per received burst the packets are sorted into one output batch per port, and each batch is
//! sent once the burst is done (or when it fills): one `tx_burst` per destination and burst.

pub mod mactable;
pub mod vlan;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use serde::Serialize;
use torii_vhost_user_net::BufPool;

use crate::packet::{Packet, PacketPool};
use crate::pmd::{transmit, Batches, PmdWake};
use crate::port::{Offloads, Port, PortStats, BURST};
use crate::ratelimit::{Limiter, RateLimit};
use mactable::{Learned, MacTable, PortId};
use vlan::{Egress, VlanMode};

/// Switch-wide counters.
#[derive(Default)]
pub struct SwitchStats {
    /// Frames sent to more than one port (broadcast, multicast, unknown unicast).
    pub flooded: AtomicU64,
    /// Source MACs that could not be learned because the table was full.
    pub table_full: AtomicU64,
    /// Source MACs learned, and moved from one port to another.
    pub learned: AtomicU64,
    pub moved: AtomicU64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SwitchStatsSnapshot {
    pub flooded: u64,
    pub table_full: u64,
    pub learned: u64,
    pub moved: u64,
}

impl SwitchStats {
    pub fn snapshot(&self) -> SwitchStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SwitchStatsSnapshot {
            flooded: l(&self.flooded),
            table_full: l(&self.table_full),
            learned: l(&self.learned),
            moved: l(&self.moved),
        }
    }
}

/// What the switch's ports and the control thread share.
pub struct SwitchShared {
    pub table: MacTable,
    /// Seconds since the switch started, ticked by the control thread: the learning time.
    pub clock: AtomicU32,
    pub stats: SwitchStats,
}

impl SwitchShared {
    pub fn new(capacity: usize) -> Self {
        SwitchShared {
            table: MacTable::new(capacity),
            clock: AtomicU32::new(0),
            stats: SwitchStats::default(),
        }
    }
}

/// Packets one PMD may queue for a port another PMD polls.
pub const INBOX: usize = 1024;

/// A switch port as every PMD knows it, whichever polls it.
pub struct PortLink {
    pub id: PortId,
    pub stats: Arc<PortStats>,
    /// Packets for the port from PMDs that do not poll it (lock-free, many producers); the
    /// PMD that does sends them with its own.
    pub inbox: ArrayQueue<Packet>,
    /// Every PMD's wake handle, and the index of the one that drains the inbox (it changes
    /// when `rebalance` moves that part).
    wakes: Arc<[Arc<PmdWake>]>,
    owner: AtomicUsize,
}

impl PortLink {
    pub fn new(
        id: PortId,
        stats: Arc<PortStats>,
        wakes: Arc<[Arc<PmdWake>]>,
        owner: usize,
    ) -> Arc<Self> {
        Arc::new(PortLink {
            id,
            stats,
            inbox: ArrayQueue::new(INBOX),
            wakes,
            owner: AtomicUsize::new(owner),
        })
    }

    /// Wakes the PMD that drains the inbox, if it sleeps.
    #[inline]
    pub fn poke(&self) {
        if let Some(w) = self.wakes.get(self.owner.load(Ordering::Relaxed)) {
            w.poke();
        }
    }

    /// The inbox is drained by PMD `k` from now on.
    pub fn set_owner(&self, k: usize) {
        self.owner.store(k, Ordering::Relaxed);
    }
}

/// A switch port, or the part of it (some of its queues) a PMD polls.
pub struct SwitchPort {
    pub link: Arc<PortLink>,
    pub port: Box<dyn Port>,
    pub vlan: VlanMode,
    /// This PMD sends what other PMDs queue for the port (the part with queue 0; the port's
    /// `link.owner`).
    pub drains_inbox: bool,
    /// The rate limit on what this part takes in (its queues' share of the port's).
    pub limiter: Option<Limiter>,
}

/// Where a PMD sends packets for a port.
enum To {
    /// This PMD polls it: index in `Switch::ports`.
    Local(usize),
    /// Another PMD does: through its inbox.
    Remote(Arc<PortLink>),
}

struct Target {
    vlan: VlanMode,
    to: To,
}

/// Per-burst state: counts not yet added to the shared counters, and the last source learned
/// and destination looked up. A burst from one port is mostly one flow, so most packets skip
/// both table accesses (as OVS's exact-match cache does for its classifier); an entry stays
/// valid only for the burst.
#[derive(Default)]
struct Pending {
    flooded: u64,
    table_full: u64,
    learned: u64,
    moved: u64,
    src: Option<(u16, [u8; 6])>,
    dst: Option<(u16, [u8; 6], Dest)>,
}

/// The switch's data path on one PMD: the ports it polls, and every switch port it may send
/// to. Every PMD runs one; they share the MAC table.
pub struct Switch {
    shared: Arc<SwitchShared>,
    /// The ports this PMD polls.
    ports: Vec<SwitchPort>,
    /// Port id → where its packets go, for every switch port.
    targets: Vec<Option<Target>>,
    /// The ids in `targets`, for flooding.
    members: Vec<PortId>,
    /// Output batch per polled port (same index as `ports`), and the ports that have one
    /// pending.
    out: Vec<Vec<Packet>>,
    dirty: Vec<usize>,
    /// Remote ports queued to in this burst: their PMDs are poked once it is done.
    poke: Vec<PortId>,
}

/// The switch's decision for one frame.
#[derive(Clone, Copy)]
enum Dest {
    Drop,
    One(PortId),
    Flood,
}

impl Switch {
    /// A switch polling `ports` and sending to `remote` ports through their inboxes.
    pub fn new(
        shared: Arc<SwitchShared>,
        ports: Vec<SwitchPort>,
        remote: Vec<(Arc<PortLink>, VlanMode)>,
    ) -> Self {
        let mut sw = Switch {
            shared,
            ports: Vec::new(),
            targets: (0..mactable::MAX_PORTS).map(|_| None).collect(),
            members: Vec::new(),
            out: Vec::new(),
            dirty: Vec::new(),
            poke: Vec::new(),
        };
        for p in ports {
            sw.add_port(p);
        }
        for (link, vlan) in remote {
            sw.add_remote(link, vlan);
        }
        sw
    }

    fn set_target(&mut self, id: PortId, t: Option<Target>) {
        let Some(slot) = self.targets.get_mut(id as usize) else {
            return;
        };
        match (slot.is_some(), t.is_some()) {
            (false, true) => self.members.push(id),
            (true, false) => self.members.retain(|&m| m != id),
            _ => {}
        }
        *slot = t;
    }

    /// Starts polling a port (its id must be unused or remote).
    pub fn add_port(&mut self, p: SwitchPort) {
        let (id, vlan) = (p.link.id, p.vlan.clone());
        let i = self.ports.len();
        self.ports.push(p);
        self.out.push(Vec::with_capacity(BURST));
        self.dirty.reserve(2 * self.ports.len());
        self.set_target(
            id,
            Some(Target {
                vlan,
                to: To::Local(i),
            }),
        );
    }

    /// Learns of a port another PMD polls.
    pub fn add_remote(&mut self, link: Arc<PortLink>, vlan: VlanMode) {
        let id = link.id;
        self.poke.reserve(self.members.len() + 1);
        self.set_target(
            id,
            Some(Target {
                vlan,
                to: To::Remote(link),
            }),
        );
    }

    /// Forgets a port another PMD polls (after which nothing more is queued for it here).
    pub fn remove_remote(&mut self, id: PortId) {
        if let Some(Some(Target {
            to: To::Remote(_), ..
        })) = self.targets.get(id as usize)
        {
            self.set_target(id, None);
        }
    }

    /// Stops polling port `id` and returns it; if this PMD drained its inbox, what other PMDs
    /// had queued for it is freed to `pool`. Between rounds no packet of this PMD is pending
    /// for it.
    pub fn remove_port(&mut self, id: PortId, pool: &mut PacketPool) -> Option<Box<dyn Port>> {
        let Some(Some(Target {
            to: To::Local(i), ..
        })) = self.targets.get(id as usize)
        else {
            return None;
        };
        let i = *i;
        self.set_target(id, None);
        let p = self.ports.swap_remove(i);
        let out = self.out.swap_remove(i);
        debug_assert!(out.is_empty());
        if let Some(moved) = self.ports.get(i) {
            if let Some(Some(t)) = self.targets.get_mut(moved.link.id as usize) {
                t.to = To::Local(i);
            }
        }
        if p.drains_inbox {
            while let Some(pkt) = p.link.inbox.pop() {
                pool.free(pkt);
            }
        }
        Some(p.port)
    }

    /// Changes the VLAN membership of port `id`.
    pub fn set_vlan(&mut self, id: PortId, vlan: VlanMode) {
        if let Some(Some(t)) = self.targets.get_mut(id as usize) {
            if let To::Local(i) = t.to {
                self.ports[i].vlan = vlan.clone();
            }
            t.vlan = vlan;
        }
    }

    /// Limits what port `id` takes in (the part this PMD polls, if any), or lifts its limit.
    pub fn set_rate_limit(&mut self, id: PortId, r: Option<RateLimit>, now: u64) {
        for p in self.ports.iter_mut().filter(|p| p.link.id == id) {
            p.limiter = r.map(|r| r.limiter_for(&*p.port, now));
        }
    }

    pub fn ports_mut(&mut self) -> impl Iterator<Item = &mut Box<dyn Port>> {
        self.ports.iter_mut().map(|p| &mut p.port)
    }

    pub fn ports(&self) -> impl Iterator<Item = &dyn Port> {
        self.ports.iter().map(|p| &*p.port)
    }

    /// One poll round: a burst from every queue of every port. Returns the packets received.
    pub(crate) fn poll(&mut self, pool: &mut PacketPool, b: &mut Batches) -> usize {
        // What every port may hand out: what all connected ports accept (the rest is fixed
        // in software on the way out).
        let common = self
            .ports
            .iter()
            .map(|p| p.port.tx_offloads())
            .filter(|o| !o.is_empty())
            .fold(Offloads::all(), |a, o| {
                Offloads::from_bits_truncate(a.bits() & o.bits())
            });
        for p in &mut self.ports {
            p.port.poll_start();
            p.port.set_rx_offloads(common);
        }
        let now = self.shared.clock.load(Ordering::Relaxed);
        let mut total = 0;
        // What other PMDs queued for our ports, a burst per port and round.
        for p in self.ports.iter_mut().filter(|p| p.drains_inbox) {
            while b.rx.len() < BURST {
                match p.link.inbox.pop() {
                    Some(pkt) => b.rx.push(pkt),
                    None => break,
                }
            }
            if !b.rx.is_empty() {
                total += b.rx.len();
                transmit(&mut *p.port, 0, &mut b.rx, pool, &mut b.fx);
            }
        }
        // One cycle-counter read per queue and round: the time from one queue's burst to the
        // next is that queue's load. The first is also the rate limiters' clock.
        let mut t = crate::pmd::cycles();
        let start = t;
        for i in 0..self.ports.len() {
            let nq = self.ports[i].port.num_queues();
            // A limited port's queues take turns at being polled first.
            let first = self.ports[i]
                .limiter
                .as_mut()
                .map_or(0, |l| l.first_queue(nq));
            for k in 0..nq {
                let q = if first + k < nq {
                    first + k
                } else {
                    first + k - nq
                };
                let sp = &mut self.ports[i];
                let max = match sp.limiter.as_mut() {
                    None => BURST,
                    Some(l) => match crate::pmd::allowance(&*sp.port, l, start, BURST) {
                        Some(n) => n,
                        None => continue,
                    },
                };
                sp.port.rx_burst(q, pool, &mut b.rx, max);
                if let Some(l) = sp.limiter.as_mut() {
                    crate::pmd::charge(&*sp.port, l, &b.rx, max, BURST);
                }
                if b.rx.is_empty() {
                    t = crate::pmd::cycles();
                    continue;
                }
                total += b.rx.len();
                let mut pending = Pending::default();
                let mut rx = std::mem::take(&mut b.rx);
                for p in rx.drain(..) {
                    self.switch_one(i, q, p, now, pool, b, &mut pending);
                }
                b.rx = rx;
                self.flush(q, pool, b);
                self.publish(&pending);
                let now_t = crate::pmd::cycles();
                let port = &self.ports[i].port;
                if let Some(c) = port.stats().rxq_cycles.get(port.queue_id(q) as usize) {
                    c.fetch_add(now_t.wrapping_sub(t), Ordering::Relaxed);
                }
                t = now_t;
            }
        }
        total
    }

    fn publish(&self, p: &Pending) {
        let s = &self.shared.stats;
        for (c, n) in [
            (&s.flooded, p.flooded),
            (&s.table_full, p.table_full),
            (&s.learned, p.learned),
            (&s.moved, p.moved),
        ] {
            if n != 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn switch_one(
        &mut self,
        from: usize,
        q: u16,
        p: Packet,
        now: u32,
        pool: &mut PacketPool,
        b: &mut Batches,
        pending: &mut Pending,
    ) {
        let src = &self.ports[from];
        let d = p.data();
        let (dst_mac, src_mac) = match (d.get(0..6), d.get(6..12)) {
            (Some(a), Some(s)) if d.len() >= 14 => (
                <[u8; 6]>::try_from(a).unwrap_or_default(),
                <[u8; 6]>::try_from(s).unwrap_or_default(),
            ),
            _ => {
                PortStats::add(&src.port.stats().rx_dropped_invalid, 1);
                pool.free(p);
                return;
            }
        };
        let tci = p.vlan_tci();
        let Some(vlan) = src.vlan.ingress(tci.map(|t| t & 0xfff)) else {
            PortStats::add(&src.port.stats().rx_dropped_vlan, 1);
            pool.free(p);
            return;
        };
        let src_id = src.link.id;
        if src_mac[0] & 1 == 0 && pending.src != Some((vlan, src_mac)) {
            pending.src = Some((vlan, src_mac));
            match self.shared.table.learn(vlan, &src_mac, src_id, now) {
                Learned::Known => {}
                Learned::New => pending.learned += 1,
                Learned::Moved => pending.moved += 1,
                Learned::TableFull => pending.table_full += 1,
                Learned::PortLimit => {
                    pending.src = None;
                    // Port security: frames from MACs over the port's limit are not switched.
                    PortStats::add(&src.port.stats().rx_dropped_mac_limit, 1);
                    pool.free(p);
                    return;
                }
            }
        }
        let dest = if dst_mac[0] & 1 != 0 {
            Dest::Flood
        } else if let Some((_, _, d)) = pending.dst.filter(|&(v, m, _)| (v, m) == (vlan, dst_mac)) {
            d
        } else {
            let d = match self.shared.table.lookup(vlan, &dst_mac) {
                None => Dest::Flood,
                // Learned on the port it came from: the frame is already on that segment.
                Some(id) if id == src_id => Dest::Drop,
                Some(id) if matches!(self.targets.get(id as usize), Some(Some(_))) => Dest::One(id),
                // Learned on a port that has gone: as unknown.
                Some(_) => Dest::Flood,
            };
            pending.dst = Some((vlan, dst_mac, d));
            d
        };
        match dest {
            Dest::Drop => pool.free(p),
            Dest::One(to) => self.output(to, q, p, vlan, tci, pool, b),
            Dest::Flood => {
                pending.flooded += 1;
                self.flood(src_id, q, p, vlan, tci, pool, b)
            }
        }
    }

    /// Sends `p` to every member of `vlan` but `from`: copies for all but the last.
    #[allow(clippy::too_many_arguments)]
    fn flood(
        &mut self,
        from: PortId,
        q: u16,
        p: Packet,
        vlan: u16,
        tci: Option<u16>,
        pool: &mut PacketPool,
        b: &mut Batches,
    ) {
        let mut last = None;
        for k in 0..self.members.len() {
            let to = self.members[k];
            let member = matches!(
                self.targets.get(to as usize),
                Some(Some(t)) if t.vlan.egress(vlan).is_some()
            );
            if to == from || !member {
                continue;
            }
            if let Some(prev) = last.replace(to) {
                match p.duplicate(pool) {
                    Some(c) => self.output(prev, q, c, vlan, tci, pool, b),
                    None => {
                        if let Some(st) = self.stats_of(prev) {
                            PortStats::add(&st.tx_dropped_no_room, 1);
                        }
                    }
                }
            }
        }
        match last {
            Some(to) => self.output(to, q, p, vlan, tci, pool, b),
            None => pool.free(p),
        }
    }

    fn stats_of(&self, id: PortId) -> Option<&Arc<PortStats>> {
        match self.targets.get(id as usize)? {
            Some(Target {
                to: To::Local(i), ..
            }) => Some(self.ports[*i].port.stats()),
            Some(Target {
                to: To::Remote(l), ..
            }) => Some(&l.stats),
            None => None,
        }
    }

    /// Queues `p` (of `vlan`, received with outer tag `tci`) for port `to`, tagged as that
    /// port wants it.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn output(
        &mut self,
        to: PortId,
        q: u16,
        mut p: Packet,
        vlan: u16,
        tci: Option<u16>,
        pool: &mut PacketPool,
        b: &mut Batches,
    ) {
        let Some(Some(t)) = self.targets.get(to as usize) else {
            pool.free(p);
            return;
        };
        let ok = match (t.vlan.egress(vlan), tci) {
            (None, _) => false,
            (Some(Egress::Untagged), None) => true,
            (Some(Egress::Untagged), Some(_)) => p.pop_vlan(),
            (Some(Egress::Tagged), None) => p.push_vlan(vlan),
            (Some(Egress::Tagged), Some(t)) => {
                // Keep the priority bits; a priority tag (VID 0) gets the VLAN.
                p.set_vlan_tci(t & 0xf000 | vlan);
                true
            }
        };
        if !ok {
            if let Some(st) = self.stats_of(to) {
                PortStats::add(&st.tx_dropped_offload, 1);
            }
            pool.free(p);
            return;
        }
        let i = match &t.to {
            To::Local(i) => *i,
            To::Remote(link) => {
                match link.inbox.push(p) {
                    Ok(()) => {
                        if !self.poke.contains(&to) {
                            self.poke.push(to);
                        }
                    }
                    Err(p) => {
                        // Its PMD is behind: drop here rather than wait.
                        PortStats::add(&link.stats.tx_dropped_no_room, 1);
                        pool.free(p);
                    }
                }
                return;
            }
        };
        let out = &mut self.out[i];
        if out.is_empty() {
            self.dirty.push(i);
        }
        out.push(p);
        if out.len() == BURST {
            let port = &mut self.ports[i].port;
            let dq = port.num_queues().max(1);
            transmit(&mut **port, q % dq, out, pool, &mut b.fx);
        }
    }

    /// Whether another PMD queued packets for one of ours.
    pub fn inbox_pending(&self) -> bool {
        self.ports
            .iter()
            .any(|p| p.drains_inbox && !p.link.inbox.is_empty())
    }

    /// Sends every pending output batch, and wakes the PMDs of remote ports queued to.
    fn flush(&mut self, q: u16, pool: &mut PacketPool, b: &mut Batches) {
        for id in self.poke.drain(..) {
            if let Some(Some(Target {
                to: To::Remote(l), ..
            })) = self.targets.get(id as usize)
            {
                l.poke();
            }
        }
        for to in self.dirty.drain(..) {
            let out = &mut self.out[to];
            if out.is_empty() {
                continue;
            }
            let port = &mut self.ports[to].port;
            let dq = port.num_queues().max(1);
            transmit(&mut **port, q % dq, out, pool, &mut b.fx);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::vlan::VlanSet;
    use super::*;

    /// A port whose wire is two in-memory queues: frames to receive, frames sent.
    #[derive(Clone, Default)]
    struct Wire {
        rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
        tx: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    struct MemPort {
        name: String,
        wire: Wire,
        stats: Arc<PortStats>,
    }

    impl Port for MemPort {
        fn name(&self) -> &str {
            &self.name
        }
        fn kind(&self) -> &'static str {
            "mem"
        }
        fn num_queues(&self) -> u16 {
            1
        }
        fn rx_burst(&mut self, _q: u16, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
            let mut rx = self.wire.rx.lock().unwrap();
            while out.len() < max {
                let Some(f) = rx.pop_front() else { break };
                let mut p = pool.alloc().expect("pool");
                p.fill(&f);
                out.push(p);
            }
        }
        fn tx_burst(&mut self, _q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
            let mut tx = self.wire.tx.lock().unwrap();
            for p in pkts.drain(..) {
                tx.push(p.data().to_vec());
                pool.free(p);
            }
        }
        fn tx_offloads(&self) -> Offloads {
            Offloads::all()
        }
        fn stats(&self) -> &Arc<PortStats> {
            &self.stats
        }
    }

    fn frame(dst: u8, src: u8, tag: Option<u16>) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src];
        if dst == 0xff {
            f[..6].copy_from_slice(&[0xff; 6]);
        }
        if let Some(t) = tag {
            f.extend([0x81, 0x00]);
            f.extend(t.to_be_bytes());
        }
        f.extend([0x08, 0x00]);
        f.extend([0x45; 46]);
        f
    }

    struct Rig {
        sw: Switch,
        wires: Vec<Wire>,
        pool: PacketPool,
        b: Batches,
        shared: Arc<SwitchShared>,
    }

    impl Rig {
        fn new(modes: Vec<VlanMode>) -> Rig {
            let shared = Arc::new(SwitchShared::new(64));
            let wires: Vec<Wire> = modes.iter().map(|_| Wire::default()).collect();
            let ports = modes
                .into_iter()
                .enumerate()
                .map(|(i, vlan)| mem_port(i as PortId + 10, &wires[i], vlan))
                .collect();
            Rig {
                sw: Switch::new(shared.clone(), ports, Vec::new()),
                wires,
                pool: PacketPool::new(256),
                b: Batches::new(),
                shared,
            }
        }

        /// Sends `f` into port `i` and returns what every port transmitted.
        fn send(&mut self, i: usize, f: Vec<u8>) -> Vec<Vec<Vec<u8>>> {
            self.wires[i].rx.lock().unwrap().push_back(f);
            self.sw.poll(&mut self.pool, &mut self.b);
            assert_eq!(self.pool.available(), 256, "every buffer is back");
            self.wires
                .iter()
                .map(|w| std::mem::take(&mut *w.tx.lock().unwrap()))
                .collect()
        }

        fn stats(&self, i: usize) -> crate::port::PortStatsSnapshot {
            self.sw.ports[i].port.stats().snapshot()
        }
    }

    fn mem_port(id: PortId, wire: &Wire, vlan: VlanMode) -> SwitchPort {
        let stats = Arc::new(PortStats::with_queues(1));
        SwitchPort {
            link: PortLink::new(id, stats.clone(), Arc::new([PmdWake::new().unwrap().0]), 0),
            drains_inbox: true,
            limiter: None,
            port: Box::new(MemPort {
                name: format!("p{id}"),
                wire: wire.clone(),
                stats,
            }),
            vlan,
        }
    }

    #[test]
    fn ports_on_two_pmds_reach_each_other_through_inboxes() {
        let shared = Arc::new(SwitchShared::new(64));
        let wires: Vec<Wire> = (0..3).map(|_| Wire::default()).collect();
        let ports: Vec<SwitchPort> = (0..3)
            .map(|i| mem_port(i as PortId, &wires[i], access(0)))
            .collect();
        let links: Vec<_> = ports.iter().map(|p| p.link.clone()).collect();
        let mut it = ports.into_iter();
        let (p0, p1, p2) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        // PMD A polls ports 0 and 1, PMD B port 2; one packet pool shared by both.
        let mut a = Switch::new(
            shared.clone(),
            vec![p0, p1],
            vec![(links[2].clone(), access(0))],
        );
        let mut b = Switch::new(
            shared.clone(),
            vec![p2],
            vec![(links[0].clone(), access(0)), (links[1].clone(), access(0))],
        );
        let pool = crate::packet::SharedPool::new(256);
        pool.populate(256);
        let (mut pa, mut pb) = (
            PacketPool::attach(pool.clone()),
            PacketPool::attach(pool.clone()),
        );
        let (mut ba, mut bb) = (Batches::new(), Batches::new());
        let sent = |w: &Wire| std::mem::take(&mut *w.tx.lock().unwrap());
        // A broadcast on port 0 (PMD A): port 1 directly, port 2 once B has polled.
        wires[0].rx.lock().unwrap().push_back(frame(0xff, 1, None));
        a.poll(&mut pa, &mut ba);
        assert_eq!(sent(&wires[1]).len(), 1);
        assert!(sent(&wires[2]).is_empty());
        assert_eq!(links[2].inbox.len(), 1);
        b.poll(&mut pb, &mut bb);
        assert_eq!(sent(&wires[2]), vec![frame(0xff, 1, None)]);
        // The reply from port 2 (PMD B) is a learned unicast to port 0, on PMD A.
        wires[2].rx.lock().unwrap().push_back(frame(1, 3, None));
        b.poll(&mut pb, &mut bb);
        a.poll(&mut pa, &mut ba);
        assert_eq!(sent(&wires[0]), vec![frame(1, 3, None)]);
        assert!(sent(&wires[1]).is_empty(), "unicast, not flooded");
        // Port 2 leaves: B hands it back with nothing queued; A stops sending to it.
        a.remove_remote(2);
        wires[0].rx.lock().unwrap().push_back(frame(0xff, 1, None));
        a.poll(&mut pa, &mut ba);
        assert!(links[2].inbox.is_empty());
        assert!(b.remove_port(2, &mut pb).is_some());
        drop((a, b, pa, pb));
        assert_eq!(PacketPool::attach(pool).available(), 256, "no packet lost");
    }

    fn access(vlan: u16) -> VlanMode {
        VlanMode::Access { vlan }
    }

    #[test]
    fn floods_unknown_then_forwards_learned() {
        let mut r = Rig::new(vec![access(0), access(0), access(0)]);
        // Unknown destination: flooded to both other ports.
        let out = r.send(0, frame(2, 1, None));
        assert_eq!(out[0].len(), 0);
        assert_eq!((out[1].len(), out[2].len()), (1, 1));
        assert_eq!(out[1][0], frame(2, 1, None));
        // The reply is unicast to where 1 was learned.
        let out = r.send(2, frame(1, 2, None));
        assert_eq!((out[0].len(), out[1].len(), out[2].len()), (1, 0, 0));
        // And now 2 is known too.
        let out = r.send(0, frame(2, 1, None));
        assert_eq!((out[0].len(), out[1].len(), out[2].len()), (0, 0, 1));
        // Broadcast always floods.
        let out = r.send(1, frame(0xff, 3, None));
        assert_eq!((out[0].len(), out[1].len(), out[2].len()), (1, 0, 1));
        let s = r.shared.stats.snapshot();
        assert_eq!((s.flooded, s.learned), (2, 3));
        assert_eq!(r.shared.table.lookup(0, &[2, 0, 0, 0, 0, 2]), Some(12));
    }

    #[test]
    fn vlans_are_isolated_and_trunks_tag() {
        let trunk = VlanMode::Trunk {
            allowed: VlanSet::new(&[100, 200]),
            native: None,
        };
        let mut r = Rig::new(vec![access(100), access(100), access(200), trunk]);
        let out = r.send(0, frame(0xff, 1, None));
        // VLAN 100 members only; the trunk gets it tagged 100.
        assert_eq!((out[1].len(), out[2].len(), out[3].len()), (1, 0, 1));
        assert_eq!(out[1][0], frame(0xff, 1, None));
        assert_eq!(out[3][0], frame(0xff, 1, Some(100)));
        // VLAN 200 from the trunk: tag popped towards its access port.
        let out = r.send(3, frame(0xff, 5, Some(200)));
        assert_eq!((out[0].len(), out[1].len(), out[2].len()), (0, 0, 1));
        assert_eq!(out[2][0], frame(0xff, 5, None));
        // A unicast to a MAC learned on VLAN 100 does not cross into VLAN 200.
        let out = r.send(2, frame(1, 6, None));
        assert_eq!((out[0].len(), out[1].len(), out[3].len()), (0, 0, 1));
        assert_eq!(out[3][0], frame(1, 6, Some(200)));
        // Not allowed on the trunk, tagged on an access port, untagged on a trunk without a
        // native VLAN: dropped and counted.
        r.send(3, frame(0xff, 7, Some(300)));
        r.send(0, frame(0xff, 7, Some(100)));
        r.send(3, frame(0xff, 7, None));
        assert_eq!(r.stats(3).rx_dropped_vlan, 2);
        assert_eq!(r.stats(0).rx_dropped_vlan, 1);
        // Priority bits of a tag survive a trunk-to-trunk hop... and a priority tag on an
        // access port is taken as untagged.
        let out = r.send(0, frame(0xff, 8, Some(0x6000)));
        assert_eq!(out[3][0], frame(0xff, 8, Some(0x6000 | 100)));
        assert_eq!(out[1][0], frame(0xff, 8, None));
    }

    #[test]
    fn mac_limit_drops_frames_from_new_macs() {
        let mut r = Rig::new(vec![access(0), access(0)]);
        r.shared.table.set_port_limit(10, 2);
        for src in 1..=2 {
            assert_eq!(r.send(0, frame(0xff, src, None))[1].len(), 1);
        }
        assert_eq!(r.send(0, frame(0xff, 3, None))[1].len(), 0);
        // Known MACs still pass.
        assert_eq!(r.send(0, frame(0xff, 1, None))[1].len(), 1);
        assert_eq!(r.stats(0).rx_dropped_mac_limit, 1);
        assert_eq!(r.shared.table.port_count(10), 2);
    }

    #[test]
    fn a_rate_limited_port_takes_its_allowance_and_leaves_the_rest_waiting() {
        let mut r = Rig::new(vec![access(0), access(0)]);
        // A burst of 3, then one packet per 2^64 cycles: nothing more during the test.
        let limit = RateLimit {
            pps: Some(1),
            bps: None,
            burst_packets: 3,
            burst_bytes: 0,
            hz: u64::MAX,
        };
        r.sw.set_rate_limit(10, Some(limit), crate::pmd::cycles());
        for _ in 0..10 {
            r.wires[0]
                .rx
                .lock()
                .unwrap()
                .push_back(frame(0xff, 1, None));
        }
        let poll = |r: &mut Rig| {
            r.sw.poll(&mut r.pool, &mut r.b);
            std::mem::take(&mut *r.wires[1].tx.lock().unwrap()).len()
        };
        assert_eq!(poll(&mut r), 3);
        assert_eq!(poll(&mut r), 0);
        // The rest waits at the source, nothing is dropped.
        assert_eq!(r.wires[0].rx.lock().unwrap().len(), 7);
        assert_eq!(r.pool.available(), 256);
        // Cut short once (3 of a burst), skipped once.
        assert_eq!(r.stats(0).rx_rate_limited_rounds, 2);
        // Lifted: the rest passes.
        r.sw.set_rate_limit(10, None, 0);
        assert_eq!(poll(&mut r), 7);
        assert_eq!(r.stats(0).rx_rate_limited_rounds, 2);
        assert_eq!(r.stats(1).rx_rate_limited_rounds, 0);
    }

    #[test]
    fn runts_are_dropped_and_counted() {
        let mut r = Rig::new(vec![access(0), access(0)]);
        let out = r.send(0, vec![0xff; 13]);
        assert!(out[1].is_empty());
        assert_eq!(r.stats(0).rx_dropped_invalid, 1);
    }
}
