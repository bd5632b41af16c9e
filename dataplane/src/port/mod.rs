//! Ports: where packets enter and leave the data plane. One trait, one module per port type.
//! A port is owned by exactly one PMD thread; its counters are shared read-only with the
//! control path.

#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod null;
pub mod tap;
pub mod vhost_user;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
pub use torii_vhost_user_net::Offloads;

use crate::packet::{Packet, PacketPool};

/// Packets moved per burst.
pub const BURST: usize = 32;

/// The data-path face of a port.
pub trait Port: Send {
    fn name(&self) -> &str;
    fn kind(&self) -> &'static str;
    fn num_queues(&self) -> u16;

    /// Once per poll round, before any burst: pick up connection or configuration changes.
    fn poll_start(&mut self) {}

    /// Appends up to `max` received packets of queue `q` to `out` (`max` may be below a
    /// burst — the destination's room, the port's rate limit — and what is not taken must
    /// stay where it is, for a later call).
    fn rx_burst(&mut self, q: u16, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize);

    /// Transmits every packet of `pkts` on queue `q` (or drops and counts it); `pkts` is empty
    /// afterwards and all buffers are back in `pool` or owned by the port until completion.
    fn tx_burst(&mut self, q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>);

    /// How many packets `tx_burst` on queue `q` can take now, at least `want` if it can
    /// (backpressure: the PMD then pulls no more than that from the other port).
    fn tx_room(&mut self, _q: u16, _want: usize) -> usize {
        usize::MAX
    }

    /// Offloads `tx_burst` accepts (partial checksums, GSO).
    fn tx_offloads(&self) -> Offloads;

    /// Limits what `rx_burst` may hand out to what the peer accepts.
    fn set_rx_offloads(&mut self, _accepted: Offloads) {}

    fn stats(&self) -> &Arc<PortStats>;

    /// Adaptive mode, before the PMD sleeps: ask for wakeups. Returns true if work arrived
    /// meanwhile (then the PMD does not sleep).
    fn arm_wakeup(&mut self) -> bool {
        false
    }

    /// Adaptive mode, after waking: back to polling without notifications.
    fn disarm_wakeup(&mut self) {}

    /// File descriptors that become readable when the port has work, for the PMD's epoll.
    fn wakeup_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// For ports woken by another thread (vhost-user kicks): the PMD's eventfd.
    fn set_waker(&mut self, _waker: &torii_vhost_user_net::EventNotifier) {}

    /// The device's number of this port's queue `q` (a split part's queues are a subset).
    fn queue_id(&self, q: u16) -> u16 {
        q
    }

    /// Splits a multiqueue port into one port per group of its queues (every queue in exactly
    /// one group), so that different PMDs can poll them; each part's queue `i` is queue
    /// `group[i]` of the whole, and all parts share the counters. On success `self` is left
    /// empty, to be dropped. None (nothing changed) for ports that cannot be split.
    fn split(&mut self, _groups: &[Vec<u16>]) -> Option<Vec<Box<dyn Port>>> {
        None
    }
}

/// Port counters. Written by the owning PMD only (relaxed, once per burst), read by anyone.
#[derive(Default)]
pub struct PortStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Received frames dropped: malformed (bad header, runt, oversize) or read errors.
    pub rx_dropped_invalid: AtomicU64,
    /// Received frames dropped by the switch: VLAN not allowed on the port.
    pub rx_dropped_vlan: AtomicU64,
    /// Received frames dropped by the switch: source MAC over the port's MAC limit.
    pub rx_dropped_mac_limit: AtomicU64,
    /// Received frames dropped because no packet buffer was free (ports that are handed
    /// frames before Torii can offer a buffer: DPDK).
    pub rx_dropped_no_buffer: AtomicU64,
    /// Queue polls the port's rate limit skipped (its allowance used up) or cut short (fewer
    /// packets allowed than a burst, and the queue had them): its packets were left waiting
    /// in the guest's ring, the tap or the device, not dropped.
    pub rx_rate_limited_rounds: AtomicU64,
    /// Transmit dropped: peer not connected or no room (guest ring full, tap backlog).
    pub tx_dropped_no_room: AtomicU64,
    /// Transmit dropped: the packet needs an offload the port cannot take.
    pub tx_dropped_offload: AtomicU64,
    /// Transmit errors reported by the kernel.
    pub tx_errors: AtomicU64,
    /// Checksums completed in software because the peer lacks checksum offload.
    pub sw_csum: AtomicU64,
    /// GSO super-frames segmented in software because this port cannot take them.
    pub sw_gso: AtomicU64,
    /// Received / transmitted packets that were unsegmented (TSO/UFO) super-frames.
    pub rx_gso_packets: AtomicU64,
    pub tx_gso_packets: AtomicU64,
    /// Packets received per queue.
    pub rxq_packets: Vec<AtomicU64>,
    /// Switch ports: PMD cycles spent on each queue's packets (receive, switching, sending),
    /// the load `rebalance` spreads.
    pub rxq_cycles: Vec<AtomicU64>,
    /// Packets transmitted per queue.
    pub txq_packets: Vec<AtomicU64>,
    /// Bytes received and transmitted per queue.
    pub rxq_bytes: Vec<AtomicU64>,
    pub txq_bytes: Vec<AtomicU64>,
}

/// A copy of [`PortStats`] for reporting.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PortStatsSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_dropped_invalid: u64,
    pub rx_dropped_vlan: u64,
    pub rx_dropped_mac_limit: u64,
    pub rx_dropped_no_buffer: u64,
    pub rx_rate_limited_rounds: u64,
    pub tx_dropped_no_room: u64,
    pub tx_dropped_offload: u64,
    pub tx_errors: u64,
    pub sw_csum: u64,
    pub sw_gso: u64,
    pub rx_gso_packets: u64,
    pub tx_gso_packets: u64,
    pub rxq_packets: Vec<u64>,
    pub rxq_cycles: Vec<u64>,
    pub txq_packets: Vec<u64>,
    pub rxq_bytes: Vec<u64>,
    pub txq_bytes: Vec<u64>,
}

impl PortStats {
    /// Counters for a port with `queues` queues.
    pub fn with_queues(queues: u16) -> Self {
        PortStats {
            rxq_packets: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            rxq_cycles: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            rxq_bytes: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            txq_bytes: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            txq_packets: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    /// Counts `n` received packets of `bytes` on queue `q`.
    #[inline]
    pub fn rx(&self, q: u16, n: usize, bytes: usize) {
        if n != 0 {
            Self::add(&self.rx_packets, n);
            Self::add(&self.rx_bytes, bytes);
            if let Some(c) = self.rxq_packets.get(q as usize) {
                Self::add(c, n);
            }
            if let Some(c) = self.rxq_bytes.get(q as usize) {
                Self::add(c, bytes);
            }
        }
    }

    /// Counts `n` transmitted packets of `bytes` on queue `q`.
    #[inline]
    pub fn tx(&self, q: u16, n: usize, bytes: usize) {
        if n != 0 {
            Self::add(&self.tx_packets, n);
            Self::add(&self.tx_bytes, bytes);
            if let Some(c) = self.txq_packets.get(q as usize) {
                Self::add(c, n);
            }
            if let Some(c) = self.txq_bytes.get(q as usize) {
                Self::add(c, bytes);
            }
        }
    }

    #[inline]
    pub fn add(c: &AtomicU64, n: usize) {
        if n != 0 {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> PortStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PortStatsSnapshot {
            rx_packets: l(&self.rx_packets),
            rx_bytes: l(&self.rx_bytes),
            tx_packets: l(&self.tx_packets),
            tx_bytes: l(&self.tx_bytes),
            rx_dropped_invalid: l(&self.rx_dropped_invalid),
            rx_dropped_vlan: l(&self.rx_dropped_vlan),
            rx_dropped_mac_limit: l(&self.rx_dropped_mac_limit),
            rx_dropped_no_buffer: l(&self.rx_dropped_no_buffer),
            rx_rate_limited_rounds: l(&self.rx_rate_limited_rounds),
            tx_dropped_no_room: l(&self.tx_dropped_no_room),
            tx_dropped_offload: l(&self.tx_dropped_offload),
            tx_errors: l(&self.tx_errors),
            sw_csum: l(&self.sw_csum),
            sw_gso: l(&self.sw_gso),
            rx_gso_packets: l(&self.rx_gso_packets),
            tx_gso_packets: l(&self.tx_gso_packets),
            rxq_packets: self.rxq_packets.iter().map(l).collect(),
            rxq_cycles: self.rxq_cycles.iter().map(l).collect(),
            txq_packets: self.txq_packets.iter().map(l).collect(),
            rxq_bytes: self.rxq_bytes.iter().map(l).collect(),
            txq_bytes: self.txq_bytes.iter().map(l).collect(),
        }
    }
}
