//! Builds a running data plane from a [`Config`]: creates every port, then starts the PMDs.
//! If any port fails, everything made so far is torn down (sockets removed, taps closed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use torii_vhost_user_net::{NetDeviceConfig, SocketMode, VhostUserNetDevice};

use crate::config::{parse_mac, Config, PortKind};
use crate::pmd::{self, PmdHandle, PmdStatsSnapshot, XConnect};
use crate::port::null::{SinkPort, SourcePort};
use crate::port::tap::TapPort;
use crate::port::vhost_user::VhostUserPort;
use crate::port::{Port, PortStats, PortStatsSnapshot};
use crate::switch::mactable::PortId;
use crate::switch::vlan::VlanReport;
use crate::switch::{Switch, SwitchPort, SwitchShared, SwitchStatsSnapshot};

struct PortInfo {
    name: String,
    kind: &'static str,
    stats: Arc<PortStats>,
    device: Option<usize>,
    /// On the switch: its VLAN settings.
    vlan: Option<VlanReport>,
}

/// A running data plane.
pub struct Dataplane {
    pmds: Vec<PmdHandle>,
    devices: Vec<VhostUserNetDevice>,
    ports: Vec<PortInfo>,
    switch: Arc<SwitchShared>,
    ager: Option<Ager>,
}

/// The control thread that ticks the switch's clock and forgets MACs not seen for a while.
struct Ager {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ager {
    fn start(sw: Arc<SwitchShared>, max_age: u32) -> std::io::Result<Ager> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mac-ager".into())
            .spawn(move || {
                let t0 = Instant::now();
                while !s.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = t0.elapsed().as_secs() as u32;
                    sw.clock.store(now, Ordering::Relaxed);
                    let n = sw.table.age(now, max_age);
                    if n > 0 {
                        tracing::debug!("aged out {n} MAC entries");
                    }
                }
            })?;
        Ok(Ager {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
    /// Switch ports: VLAN membership and MACs learned on the port.
    pub vlan: Option<VlanReport>,
    pub macs: Option<u32>,
    #[serde(flatten)]
    pub stats: PortStatsSnapshot,
}

/// Everything the daemon reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub ports: Vec<PortReport>,
    pub pmds: Vec<PmdStatsSnapshot>,
    pub switch: SwitchReport,
}

/// The switch in a report.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchReport {
    pub mac_entries: usize,
    pub mac_capacity: usize,
    #[serde(flatten)]
    pub stats: SwitchStatsSnapshot,
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
                vlan: None,
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
        // Every port outside a cross-connect is on the switch, its id its place in the config.
        let switch = Arc::new(SwitchShared::new(cfg.switch.mac_table_size));
        let mut sw_ports = Vec::new();
        for (i, (slot, pc)) in made.iter_mut().zip(&cfg.ports).enumerate() {
            if let Some(port) = slot.take() {
                let id = i as PortId;
                switch.table.set_port_limit(id, pc.switch.mac_limit);
                let vlan = pc.switch.vlan_mode();
                infos[i].vlan = Some(vlan.report());
                sw_ports.push(SwitchPort { id, port, vlan });
            }
        }
        let mut sw = (!sw_ports.is_empty()).then(|| Switch::new(switch.clone(), sw_ports));
        let mut pmds = Vec::new();
        for (id, xcs) in per_pmd.into_iter().enumerate() {
            let sw = if id == cfg.switch.pmd {
                sw.take()
            } else {
                None
            };
            if xcs.is_empty() && sw.is_none() {
                continue;
            }
            let cpu = cfg.dataplane.pmd_cpus.get(id).copied();
            pmds.push(pmd::spawn(
                id,
                cpu,
                cfg.dataplane.pmd_mode,
                cfg.dataplane.pool_size,
                xcs,
                sw,
            )?);
        }
        let ager = Some(Ager::start(switch.clone(), cfg.switch.mac_ageing_secs)?);
        Ok(Dataplane {
            pmds,
            devices,
            ports: infos,
            switch,
            ager,
        })
    }

    pub fn report(&self) -> Report {
        Report {
            ports: self
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
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
                        vlan: p.vlan.clone(),
                        macs: p
                            .vlan
                            .as_ref()
                            .map(|_| self.switch.table.port_count(i as PortId)),
                        stats: p.stats.snapshot(),
                    }
                })
                .collect(),
            pmds: self.pmds.iter().map(|p| p.snapshot()).collect(),
            switch: SwitchReport {
                mac_entries: self.switch.table.len(),
                mac_capacity: self.switch.table.capacity(),
                stats: self.switch.stats.snapshot(),
            },
        }
    }

    /// Stops the PMDs (dropping the ports' data halves), then the devices.
    pub fn stop(mut self) {
        self.ager = None;
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
