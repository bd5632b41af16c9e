//! Builds a running data plane from a [`Config`]: creates every port, then starts the PMDs.
//! If any port fails, everything made so far is torn down (sockets removed, taps closed).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use torii_vhost_user_net::{NetDeviceConfig, SocketMode, VhostUserNetDevice};

use crate::config::{parse_mac, Config, PortKind};
use crate::pmd::{self, PmdHandle, PmdStatsSnapshot, XConnect};
use crate::port::null::{SinkPort, SourcePort};
use crate::port::tap::TapPort;
use crate::port::vhost_user::VhostUserPort;
use crate::port::{Port, PortStats, PortStatsSnapshot};

struct PortInfo {
    name: String,
    kind: &'static str,
    stats: Arc<PortStats>,
    device: Option<usize>,
}

/// A running data plane.
pub struct Dataplane {
    pmds: Vec<PmdHandle>,
    devices: Vec<VhostUserNetDevice>,
    ports: Vec<PortInfo>,
}

/// One port in a stats report.
#[derive(Clone, Debug, Serialize)]
pub struct PortReport {
    pub name: String,
    pub kind: &'static str,
    /// vhost-user only: a frontend is connected.
    pub connected: Option<bool>,
    /// vhost-user only: connections served so far.
    pub connections: Option<u64>,
    /// vhost-user only: queues stopped because the guest broke them.
    pub broken_queues: Vec<String>,
    #[serde(flatten)]
    pub stats: PortStatsSnapshot,
}

/// Everything the daemon reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub ports: Vec<PortReport>,
    pub pmds: Vec<PmdStatsSnapshot>,
}

/// A locally generated MAC for a port without one: 52:54:00 (QEMU's OUI is what guests
/// expect) plus a hash of the name.
fn mac_for(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

impl Dataplane {
    pub fn start(cfg: &Config) -> anyhow::Result<Dataplane> {
        cfg.validate()?;
        let mut devices = Vec::new();
        let mut infos = Vec::new();
        let mut made: Vec<Option<Box<dyn Port>>> = Vec::new();
        for p in &cfg.ports {
            let (port, device): (Box<dyn Port>, Option<VhostUserNetDevice>) = match &p.kind {
                PortKind::VhostUser {
                    socket,
                    mode,
                    queues,
                    mac,
                    mtu,
                } => {
                    let mac = match mac {
                        Some(m) => parse_mac(m).map_err(anyhow::Error::msg)?,
                        None => mac_for(&p.name),
                    };
                    let (dev, port) = VhostUserPort::start(NetDeviceConfig {
                        name: p.name.clone(),
                        socket: socket.clone(),
                        mode: if mode == "client" {
                            SocketMode::Client
                        } else {
                            SocketMode::Server
                        },
                        mac,
                        mtu: *mtu,
                        queue_pairs: *queues,
                        reconnect_interval: Duration::from_millis(500),
                    })
                    .map_err(|e| anyhow::anyhow!("port {:?}: {e}", p.name))?;
                    (Box::new(port), Some(dev))
                }
                PortKind::Tap { ifname, queues } => {
                    let t = TapPort::open(&p.name, ifname, *queues)
                        .map_err(|e| anyhow::anyhow!("port {:?}: {e}", p.name))?;
                    (Box::new(t), None)
                }
                PortKind::Source { frame_size } => {
                    (Box::new(SourcePort::new(&p.name, *frame_size)), None)
                }
                PortKind::Sink => (Box::new(SinkPort::new(&p.name)), None),
            };
            infos.push(PortInfo {
                name: p.name.clone(),
                kind: port.kind(),
                stats: port.stats().clone(),
                device: device.as_ref().map(|_| devices.len()),
            });
            if let Some(d) = device {
                devices.push(d);
            }
            made.push(Some(port));
        }

        let npmd = cfg.dataplane.pmd_cpus.len().max(1);
        let mut per_pmd: Vec<Vec<XConnect>> = (0..npmd).map(|_| Vec::new()).collect();
        let index = |n: &str| {
            cfg.ports
                .iter()
                .position(|p| p.name == n)
                .expect("validated")
        };
        for (i, x) in cfg.xconnects.iter().enumerate() {
            let a = made[index(&x.ports[0])]
                .take()
                .expect("validated: used once");
            let b = made[index(&x.ports[1])]
                .take()
                .expect("validated: used once");
            per_pmd[x.pmd.unwrap_or(i % npmd)].push(XConnect { a, b });
        }
        let mut pmds = Vec::new();
        for (id, xcs) in per_pmd.into_iter().enumerate() {
            if xcs.is_empty() {
                continue;
            }
            let cpu = cfg.dataplane.pmd_cpus.get(id).copied();
            pmds.push(pmd::spawn(
                id,
                cpu,
                cfg.dataplane.pmd_mode,
                cfg.dataplane.pool_size,
                xcs,
            )?);
        }
        for (p, info) in made.iter().zip(&infos) {
            if p.is_some() {
                tracing::warn!(port = %info.name, "port is in no cross-connect: not polled");
            }
        }
        Ok(Dataplane {
            pmds,
            devices,
            ports: infos,
        })
    }

    pub fn report(&self) -> Report {
        Report {
            ports: self
                .ports
                .iter()
                .map(|p| {
                    let dev = p.device.map(|i| &self.devices[i]);
                    PortReport {
                        name: p.name.clone(),
                        kind: p.kind,
                        connected: dev.map(|d| d.is_connected()),
                        connections: dev.map(|d| d.connections()),
                        broken_queues: dev
                            .map(|d| {
                                d.broken_queues()
                                    .into_iter()
                                    .map(|b| format!("queue {}: {}", b.queue, b.reason))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        stats: p.stats.snapshot(),
                    }
                })
                .collect(),
            pmds: self.pmds.iter().map(|p| p.snapshot()).collect(),
        }
    }

    /// Stops the PMDs (dropping the ports' data halves), then the devices.
    pub fn stop(mut self) {
        for p in &mut self.pmds {
            p.stop();
        }
        for d in &mut self.devices {
            d.stop();
        }
    }
}

impl Report {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<12} {:<10} {:>5} {:>12} {:>14} {:>12} {:>14} {:>9} {:>9} {:>9}\n",
            "port",
            "kind",
            "link",
            "rx_pkts",
            "rx_bytes",
            "tx_pkts",
            "tx_bytes",
            "rx_inval",
            "tx_noroom",
            "tx_offl"
        );
        for p in &self.ports {
            let link = match p.connected {
                Some(true) => "up",
                Some(false) => "down",
                None => "-",
            };
            s += &format!(
                "{:<12} {:<10} {:>5} {:>12} {:>14} {:>12} {:>14} {:>9} {:>9} {:>9}\n",
                p.name,
                p.kind,
                link,
                p.stats.rx_packets,
                p.stats.rx_bytes,
                p.stats.tx_packets,
                p.stats.tx_bytes,
                p.stats.rx_dropped_invalid,
                p.stats.tx_dropped_no_room,
                p.stats.tx_dropped_offload
            );
            for b in &p.broken_queues {
                s += &format!("  BROKEN {b}\n");
            }
        }
        for p in &self.pmds {
            let total = (p.busy_cycles + p.idle_cycles).max(1);
            s += &format!(
                "pmd{} cpu={} busy={:.1}% cycles/pkt={:.0} sleeps={}\n",
                p.id,
                p.cpu.map_or("-".into(), |c| c.to_string()),
                100.0 * p.busy_cycles as f64 / total as f64,
                p.cycles_per_packet,
                p.sleeps
            );
        }
        s
    }
}
