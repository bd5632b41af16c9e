//! Benchmark ports: a source that produces frames as fast as it is polled and a sink that
//! counts and drops. They stand in for a NIC so the vhost-user side can be measured alone.

use std::sync::Arc;

use torii_vhost_user_net::{BufPool, Offloads};

use super::{Port, PortStats};
use crate::packet::{Packet, PacketPool};

/// Produces copies of one UDP/IPv4 frame of a configured size, and consumes (counts as
/// transmitted, then drops) whatever is sent to it: a traffic generator and sink in one, so
/// that two sources cross-connected, or any number on the switch, load each other.
pub struct SourcePort {
    name: String,
    frame: Vec<u8>,
    stats: Arc<PortStats>,
}

/// Counts and drops everything sent to it.
pub struct SinkPort {
    name: String,
    stats: Arc<PortStats>,
}

impl SourcePort {
    /// `size` is the Ethernet frame length without FCS (60..=9000), the length testpmd's
    /// `--txpkts` gives its frames: a "64 B" benchmark passes 64 to both.
    /// Frames go from `src` to `dst` (defaults: 02:00:00:00:00:01 → 02:00:00:00:00:02).
    pub fn new(name: &str, size: usize, src: Option<[u8; 6]>, dst: Option<[u8; 6]>) -> Self {
        let mut frame = udp_frame(size);
        if let Some(d) = dst {
            frame[0..6].copy_from_slice(&d);
        }
        if let Some(s) = src {
            frame[6..12].copy_from_slice(&s);
        }
        SourcePort {
            name: name.to_string(),
            frame,
            stats: Arc::new(PortStats::with_queues(1)),
        }
    }
}

impl SinkPort {
    pub fn new(name: &str) -> Self {
        SinkPort {
            name: name.to_string(),
            stats: Arc::new(PortStats::with_queues(1)),
        }
    }
}

/// A UDP/IPv4 frame of `size` bytes from 02:00:00:00:00:01 to 02:00:00:00:00:02 with valid
/// IPv4 header checksum (UDP checksum 0, allowed for IPv4).
pub fn udp_frame(size: usize) -> Vec<u8> {
    let size = size.clamp(60, 9000);
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let csum = crate::offload::fold(crate::offload::sum16(ip, 0));
    ip[10..12].copy_from_slice(&(!csum).to_be_bytes());
    let udp_len = ip_len - 20;
    f[34..36].copy_from_slice(&9u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f
}

impl Port for SourcePort {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "source"
    }
    fn num_queues(&self) -> u16 {
        1
    }
    fn rx_burst(&mut self, _q: u16, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        let mut n = 0;
        while n < max {
            let Some(p) = pool.alloc() else { break };
            // Filled where it stays (see `PacketPool::free`).
            out.push(p);
            if let Some(p) = out.last_mut() {
                p.fill(&self.frame);
            }
            n += 1;
        }
        self.stats.rx(0, n, n * self.frame.len());
    }
    fn tx_burst(&mut self, _q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
        let bytes: usize = pkts.iter().map(|p| p.len()).sum();
        self.stats.tx(0, pkts.len(), bytes);
        pkts.drain(..).for_each(|p| pool.free(p));
    }
    fn tx_offloads(&self) -> Offloads {
        Offloads::all()
    }
    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }
    fn arm_wakeup(&mut self) -> bool {
        true // always has work
    }
}

impl Port for SinkPort {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "sink"
    }
    fn num_queues(&self) -> u16 {
        1
    }
    fn rx_burst(&mut self, _q: u16, _pool: &mut PacketPool, _out: &mut Vec<Packet>, _max: usize) {}
    fn tx_burst(&mut self, _q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
        let bytes: usize = pkts.iter().map(|p| p.len()).sum();
        self.stats.tx(0, pkts.len(), bytes);
        pkts.drain(..).for_each(|p| pool.free(p));
    }
    fn tx_offloads(&self) -> Offloads {
        // A sink takes anything: nothing is ever put on a wire.
        Offloads::all()
    }
    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }
}
