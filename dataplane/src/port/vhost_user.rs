//! vhost-user-net port: the guest's virtio-net device. Guest TX is our rx, guest RX our tx.

use std::sync::Arc;

use torii_vhost_user_net::{
    EventNotifier, NetDeviceConfig, NetQueues, Offloads, VhostUserNetDevice,
};

use super::{Port, PortStats};
use crate::packet::{Packet, PacketPool};

/// The data-path half of a vhost-user port; the device (control half) stays with the daemon.
pub struct VhostUserPort {
    name: String,
    queues: NetQueues,
    /// The device's queue pairs this port serves: its queue `i` is pair `pairs[i]`.
    pairs: Vec<u16>,
    stats: Arc<PortStats>,
}

impl VhostUserPort {
    /// Starts the device (socket, control thread) and returns both halves.
    pub fn start(
        cfg: NetDeviceConfig,
    ) -> Result<(VhostUserNetDevice, Self), torii_vhost_user_net::DeviceError> {
        let name = cfg.name.clone();
        let nq = cfg.queue_pairs;
        let (dev, queues) = VhostUserNetDevice::start(cfg)?;
        Ok((
            dev,
            VhostUserPort {
                name,
                queues,
                pairs: (0..nq).collect(),
                stats: Arc::new(PortStats::with_queues(nq)),
            },
        ))
    }
}

impl Port for VhostUserPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "vhost-user"
    }

    fn num_queues(&self) -> u16 {
        self.pairs.len() as u16
    }

    #[inline]
    fn poll_start(&mut self) {
        self.queues.refresh();
    }

    fn rx_burst(&mut self, q: u16, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        let Some(&q) = self.pairs.get(q as usize) else {
            return;
        };
        let r = self.queues.from_guest(q, max, pool, out);
        self.stats.rx(q, r.packets, r.bytes);
        PortStats::add(&self.stats.rx_dropped_invalid, r.dropped_invalid);
        PortStats::add(&self.stats.rx_gso_packets, r.gso);
    }

    fn tx_burst(&mut self, q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
        let q = self.pairs.get(q as usize).copied().unwrap_or(0);
        let r = self.queues.to_guest(q, pkts, pool);
        self.stats.tx(q, r.packets, r.bytes);
        PortStats::add(&self.stats.tx_dropped_no_room, r.dropped_no_buffer);
        PortStats::add(&self.stats.tx_dropped_offload, r.dropped_unsupported);
        PortStats::add(&self.stats.tx_gso_packets, r.gso);
    }

    fn tx_room(&mut self, q: u16, want: usize) -> usize {
        let q = self.pairs.get(q as usize).copied().unwrap_or(0);
        self.queues.to_guest_room(q, want)
    }

    fn tx_offloads(&self) -> Offloads {
        self.queues.guest_rx_offloads()
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    fn arm_wakeup(&mut self) -> bool {
        self.queues.set_tx_notifications(true)
    }

    fn disarm_wakeup(&mut self) {
        self.queues.set_tx_notifications(false);
    }

    fn set_waker(&mut self, waker: &EventNotifier) {
        self.queues.set_waker(waker.try_clone().ok());
    }

    fn queue_id(&self, q: u16) -> u16 {
        self.pairs.get(q as usize).copied().unwrap_or(q)
    }

    fn split(&mut self, groups: &[Vec<u16>]) -> Option<Vec<Box<dyn Port>>> {
        let mut all: Vec<u16> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        if all != self.pairs || groups.iter().any(|g| g.is_empty()) {
            return None;
        }
        let mut parts: Vec<Box<dyn Port>> = Vec::with_capacity(groups.len());
        for g in groups {
            parts.push(Box::new(VhostUserPort {
                name: self.name.clone(),
                queues: self.queues.handle_for(g)?,
                pairs: g.clone(),
                stats: self.stats.clone(),
            }));
        }
        // The caller drops `self` (the handle on every pair) before any part is polled.
        self.pairs.clear();
        Some(parts)
    }
}

impl Drop for VhostUserPort {
    fn drop(&mut self) {
        self.queues.detach();
    }
}
