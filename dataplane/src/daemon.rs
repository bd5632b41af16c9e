//! Builds a running data plane from a [`Config`]: creates every port and starts every disk
//! (vhost-user-blk export), then starts the PMDs. If any port or disk fails, everything made
//! so far is torn down (sockets removed, taps closed, disk workers stopped).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;
use torii_vhost_user_blk::device::BlkExport;
use torii_vhost_user_blk::settings::ExportSettings;
use torii_vhost_user_blk::stats::{Counters, ExportReport};
use torii_vhost_user_net::{NetDeviceConfig, SocketMode, VhostUserNetDevice};

use crate::config::{parse_mac, Config, PortConfig, PortKind, RateLimitConfig, SwitchPortConfig};
use crate::packet::SharedPool;
use crate::pmd::{self, PmdCommand, PmdHandle, PmdStatsSnapshot, PmdWake, XConnect};
use crate::port::null::{SinkPort, SourcePort};
use crate::port::tap::TapPort;
use crate::port::vhost_user::VhostUserPort;
use crate::port::{Port, PortStats, PortStatsSnapshot};
use crate::ratelimit::{Limiter, RateLimit};
use crate::switch::mactable::PortId;
use crate::switch::vlan::VlanReport;
use crate::switch::{PortLink, Switch, SwitchPort, SwitchShared, SwitchStatsSnapshot};

struct PortInfo {
    id: PortId,
    cfg: PortConfig,
    kind: &'static str,
    stats: Arc<PortStats>,
    device: Option<VhostUserNetDevice>,
    /// dpdk ports: the DPDK device, for its link state and counters.
    dpdk: Option<DpdkHandle>,
    /// On the switch (not in a cross-connect).
    switched: bool,
    /// Which PMDs (index in `Dataplane::pmds`) poll which of its queues; the part with
    /// queue 0 first. Empty until placed.
    parts: Vec<(usize, Vec<u16>)>,
    /// Switch ports: how the PMDs reach it.
    link: Option<Arc<PortLink>>,
}

/// Spreads the `nq` queues of a port over `n` PMDs, each to the one polling the fewest queues
/// of `ports` so far (or all to `pin`): the part with queue 0 first.
fn place(ports: &[PortInfo], n: usize, nq: u16, pin: Option<usize>) -> Vec<(usize, Vec<u16>)> {
    let mut load = vec![0usize; n.max(1)];
    for p in ports {
        for (k, qs) in &p.parts {
            if let Some(l) = load.get_mut(*k) {
                *l += qs.len();
            }
        }
    }
    let mut groups: Vec<Vec<u16>> = vec![Vec::new(); load.len()];
    for q in 0..nq.max(1) {
        let k = pin.unwrap_or_else(|| (0..load.len()).min_by_key(|&k| load[k]).unwrap_or(0));
        load[k] += 1;
        groups[k].push(q);
    }
    let mut parts: Vec<(usize, Vec<u16>)> = groups
        .into_iter()
        .enumerate()
        .filter(|(_, g)| !g.is_empty())
        .collect();
    parts.sort_by_key(|(_, g)| g[0]);
    parts
}

/// Splits `port` as `parts` says (whole if one part, or if it cannot be split: then all its
/// queues go to the first part's PMD). Returns (PMD, port part) pairs.
fn split_port(
    mut port: Box<dyn Port>,
    parts: &mut Vec<(usize, Vec<u16>)>,
) -> Vec<(usize, Box<dyn Port>)> {
    if parts.len() > 1 {
        let groups: Vec<Vec<u16>> = parts.iter().map(|(_, g)| g.clone()).collect();
        if let Some(split) = port.split(&groups) {
            return parts.iter().map(|(k, _)| *k).zip(split).collect();
        }
        let k = parts[0].0;
        *parts = vec![(k, (0..port.num_queues()).collect())];
    }
    vec![(parts[0].0, port)]
}

/// The limit on what port `p` takes in, as the PMDs apply it (the first one measures the
/// PMDs' clock rate: on the control thread, never on a PMD).
fn rate_limit(p: &PortConfig) -> Option<RateLimit> {
    p.rate_limit
        .map(|r| r.to_limit(crate::ratelimit::clock_hz()))
}

/// The limiter of `port` (a port or one of its parts) as configured in `p`.
fn limiter(p: &PortConfig, port: &dyn Port) -> Option<Limiter> {
    rate_limit(p).map(|r| r.limiter_for(port, pmd::cycles()))
}

/// Fewest PMD cycles (time-stamp counter) since the last rebalance, over all switch ports,
/// for a rebalance to go by measured load rather than by queue count (about 20 ms of one
/// busy core).
const MIN_MEASURED_CYCLES: u64 = 50_000_000;

/// A running data plane.
pub struct Dataplane {
    cfg: Config,
    /// Every PMD's wake handle (same order as `pmds`).
    wakes: Arc<[Arc<PmdWake>]>,
    /// Each port's `rxq_cycles` at the last rebalance (by port id), to weigh recent load.
    rebalanced_at: Vec<(PortId, Vec<u64>)>,
    pmds: Vec<PmdHandle>,
    ports: Vec<PortInfo>,
    switch: Arc<SwitchShared>,
    ager: Option<Ager>,
    disks: Vec<Disk>,
}

/// A vhost-user-blk export served by this process: its own queue workers and io_urings,
/// beside the PMDs.
pub struct Disk {
    settings: ExportSettings,
    export: BlkExport,
}

impl Disk {
    /// Opens the file, starts the workers, binds the socket; nothing is left if it fails.
    pub fn start(settings: &ExportSettings) -> Result<Disk, String> {
        let cfg = settings.to_config()?;
        let export = BlkExport::start(cfg).map_err(|e| format!("disk {:?}: {e}", settings.name))?;
        tracing::info!(disk = %settings.name, socket = %settings.socket.display(), file = %settings.file.display(), "disk started");
        Ok(Disk {
            settings: settings.clone(),
            export,
        })
    }

    /// Closes the connection, lets in-flight I/O complete, removes the socket.
    pub fn stop(mut self) {
        self.export.stop();
        tracing::info!(disk = %self.settings.name, "disk removed");
    }

    fn report(&self) -> DiskReport {
        let s = &self.settings;
        let r = self.export.report();
        let mut total = Counters::default();
        for q in &r.queues {
            total.add(q);
        }
        DiskReport {
            name: s.name.clone(),
            socket: s.socket.display().to_string(),
            file: s.file.display().to_string(),
            read_only: s.read_only,
            direct: s.direct,
            connected: r.connected,
            connections: r.connections,
            broken_queues: self
                .export
                .broken_queues()
                .into_iter()
                .map(|b| format!("queue {}: {}", b.queue, b.reason))
                .collect(),
            total,
            queues: r.queues,
        }
    }
}

/// Why a control request failed; maps to an HTTP status in the API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    /// "no port named …", "no disk named …": the message names the missing thing.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
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
                torii_vhost_user::seccomp::enter(
                    torii_vhost_user::seccomp::ThreadClass::Housekeeping,
                );
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
    /// vhost-user only: the administrative link status (`ctl link`).
    pub link_up: Option<bool>,
    /// vhost-user only: connections served so far.
    pub connections: Option<u64>,
    /// vhost-user only: queues stopped because the guest broke them.
    pub broken_queues: Vec<String>,
    /// Switch ports: VLAN membership and MACs learned on the port.
    pub vlan: Option<VlanReport>,
    pub macs: Option<u32>,
    /// The limit on what the port takes in (bursts resolved), if any.
    pub rate_limit: Option<RateLimitConfig>,
    /// dpdk only: the device as DPDK reports it (driver, MAC, link, DPDK's counters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpdk: Option<serde_json::Value>,
    #[serde(flatten)]
    pub stats: PortStatsSnapshot,
}

/// Everything the daemon reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub ports: Vec<PortReport>,
    pub pmds: Vec<PmdStatsSnapshot>,
    pub switch: SwitchReport,
    pub disks: Vec<DiskReport>,
}

/// One disk (vhost-user-blk export) in a report.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub socket: String,
    pub file: String,
    pub read_only: bool,
    pub direct: bool,
    pub connected: bool,
    /// Connections served so far.
    pub connections: u64,
    /// Queues stopped because the guest broke them.
    pub broken_queues: Vec<String>,
    /// The sum over the queues.
    pub total: Counters,
    pub queues: Vec<Counters>,
}

/// The switch in a report.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchReport {
    pub mac_entries: usize,
    pub mac_capacity: usize,
    #[serde(flatten)]
    pub stats: SwitchStatsSnapshot,
}

/// One learned MAC in a report.
#[derive(Clone, Debug, Serialize)]
pub struct MacReport {
    pub vlan: u16,
    pub mac: String,
    pub port: String,
    /// Seconds since last seen.
    pub age: u32,
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(feature = "dpdk")]
type DpdkHandle = Arc<crate::port::dpdk::DpdkDevice>;
/// Without DPDK support there are no dpdk ports (the configuration refuses them).
#[cfg(not(feature = "dpdk"))]
type DpdkHandle = std::convert::Infallible;

#[cfg(feature = "dpdk")]
fn dpdk_report(d: &DpdkHandle) -> Option<serde_json::Value> {
    serde_json::to_value(d.report()).ok()
}
#[cfg(not(feature = "dpdk"))]
fn dpdk_report(d: &DpdkHandle) -> Option<serde_json::Value> {
    match *d {}
}

/// What `make_port` makes: the data-path port and the control path's handle on it.
type MadePort = (
    Box<dyn Port>,
    Option<VhostUserNetDevice>,
    Option<DpdkHandle>,
);

/// A locally generated MAC for a port without one: 52:54:00 (QEMU's OUI is what guests
/// expect) plus a hash of the name.
fn mac_for(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Creates the data-path half of port `p` (and the device, for vhost-user and DPDK; DPDK
/// is initialised with `dpdk` first if it is not yet).
#[cfg_attr(not(feature = "dpdk"), allow(unused_variables))]
fn make_port(p: &PortConfig, dpdk: Option<&crate::config::DpdkConfig>) -> anyhow::Result<MadePort> {
    Ok(match &p.kind {
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
            (Box::new(port), Some(dev), None)
        }
        PortKind::Tap { ifname, queues } => {
            let t = TapPort::open(&p.name, ifname, *queues)
                .map_err(|e| anyhow::anyhow!("port {:?}: {e}", p.name))?;
            (Box::new(t), None, None)
        }
        PortKind::Source {
            frame_size,
            src_mac,
            dst_mac,
        } => {
            let mac = |m: &Option<String>| m.as_deref().map(parse_mac).transpose();
            let (src, dst) = (
                mac(src_mac).map_err(anyhow::Error::msg)?,
                mac(dst_mac).map_err(anyhow::Error::msg)?,
            );
            (
                Box::new(SourcePort::new(&p.name, *frame_size, src, dst)),
                None,
                None,
            )
        }
        PortKind::Sink => (Box::new(SinkPort::new(&p.name)), None, None),
        #[cfg(feature = "dpdk")]
        PortKind::Dpdk(c) => {
            use crate::port::dpdk::{DpdkDevice, DpdkPort};
            let dev = DpdkDevice::open(&dpdk.cloned().unwrap_or_default(), c)
                .map_err(|e| anyhow::anyhow!("port {:?}: {e}", p.name))?;
            (
                Box::new(DpdkPort::new(&p.name, dev.clone())),
                None,
                Some(dev),
            )
        }
        #[cfg(not(feature = "dpdk"))]
        PortKind::Dpdk(_) => anyhow::bail!("port {:?}: built without DPDK support", p.name),
    })
}

impl Dataplane {
    pub fn start(cfg: &Config) -> anyhow::Result<Dataplane> {
        cfg.validate()?;
        // DPDK's own devices (allow-list, vdevs) are probed at start, so their errors too.
        #[cfg(feature = "dpdk")]
        if let Some(d) = &cfg.dpdk {
            crate::port::dpdk::eal::init(d).map_err(anyhow::Error::msg)?;
        }
        let mut infos = Vec::new();
        let mut made: Vec<Option<Box<dyn Port>>> = Vec::new();
        // A port that fails drops everything made so far (sockets removed, taps closed).
        for (i, p) in cfg.ports.iter().enumerate() {
            let (port, device, dpdk) = make_port(p, cfg.dpdk.as_ref())?;
            infos.push(PortInfo {
                id: i as PortId,
                cfg: p.clone(),
                kind: port.kind(),
                stats: port.stats().clone(),
                device,
                dpdk,
                switched: false,
                parts: Vec::new(),
                link: None,
            });
            made.push(Some(port));
        }

        let disks = cfg
            .disks
            .iter()
            .map(Disk::start)
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;

        let npmd = cfg.dataplane.pmd_cpus.len().max(1);
        let mut per_pmd: Vec<Vec<XConnect>> = (0..npmd).map(|_| Vec::new()).collect();
        let index = |n: &str| {
            cfg.ports
                .iter()
                .position(|p| p.name == n)
                .expect("validated")
        };
        for (i, x) in cfg.xconnects.iter().enumerate() {
            let k = x.pmd.unwrap_or(i % npmd);
            let (ia, ib) = (index(&x.ports[0]), index(&x.ports[1]));
            let a = made[ia].take().expect("validated: used once");
            let b = made[ib].take().expect("validated: used once");
            for i in [ia, ib] {
                let nq = infos[i].stats.rxq_packets.len().max(1) as u16;
                infos[i].parts = vec![(k, (0..nq).collect())];
            }
            let limits = [limiter(&cfg.ports[ia], &*a), limiter(&cfg.ports[ib], &*b)];
            per_pmd[k].push(XConnect {
                a,
                b,
                ids: [infos[ia].id, infos[ib].id],
                limits,
            });
        }
        // Every port outside a cross-connect is on the switch, its id its place in the config,
        // polled by the PMD it names or the one with the fewest queues so far; every other PMD
        // reaches it through its inbox.
        let switch = Arc::new(SwitchShared::new(cfg.switch.mac_table_size));
        let mut consumers = Vec::new();
        let mut wake_list = Vec::new();
        for _ in 0..npmd {
            let (w, c) = PmdWake::new()?;
            wake_list.push(w);
            consumers.push(c);
        }
        let wakes: Arc<[Arc<PmdWake>]> = wake_list.into();
        let mut locals: Vec<Vec<SwitchPort>> = (0..npmd).map(|_| Vec::new()).collect();
        for i in 0..infos.len() {
            let Some(port) = made[i].take() else {
                continue;
            };
            let nq = port.num_queues();
            let mut parts = place(&infos, npmd, nq, infos[i].cfg.switch.pmd);
            let split = split_port(port, &mut parts);
            let info = &mut infos[i];
            switch
                .table
                .set_port_limit(info.id, info.cfg.switch.mac_limit);
            let link = PortLink::new(info.id, info.stats.clone(), wakes.clone(), parts[0].0);
            info.switched = true;
            info.parts = parts;
            info.link = Some(link.clone());
            for (n, (k, port)) in split.into_iter().enumerate() {
                locals[k].push(SwitchPort {
                    link: link.clone(),
                    limiter: limiter(&info.cfg, &*port),
                    port,
                    vlan: info.cfg.switch.vlan_mode(),
                    drains_inbox: n == 0,
                });
            }
        }
        let shared_pool = SharedPool::new(cfg.dataplane.pool_size * npmd);
        let mut pmds = Vec::new();
        for (k, ((xcs, local), consumer)) in
            per_pmd.into_iter().zip(locals).zip(consumers).enumerate()
        {
            let remote = infos
                .iter()
                .filter(|i| i.switched && i.parts.iter().all(|(j, _)| *j != k))
                .filter_map(|i| Some((i.link.clone()?, i.cfg.switch.vlan_mode())))
                .collect();
            let sw = Switch::new(switch.clone(), local, remote);
            let cpu = cfg.dataplane.pmd_cpus.get(k).copied();
            pmds.push(pmd::spawn(
                k,
                cpu,
                cfg.dataplane.pmd_mode,
                (shared_pool.clone(), cfg.dataplane.pool_size),
                (wakes[k].clone(), consumer),
                xcs,
                sw,
            )?);
        }
        let ager = Some(Ager::start(switch.clone(), cfg.switch.mac_ageing_secs)?);
        Ok(Dataplane {
            cfg: cfg.clone(),
            wakes,
            rebalanced_at: Vec::new(),
            pmds,
            ports: infos,
            switch,
            ager,
            disks,
        })
    }

    /// Sends `cmd(k)` to every PMD not in `except`, each answering on the channel it is
    /// given; waits for all answers.
    fn to_other_pmds(
        &self,
        except: &[usize],
        cmd: impl Fn(mpsc::SyncSender<()>) -> PmdCommand,
    ) -> Result<(), ControlError> {
        for (k, p) in self.pmds.iter().enumerate() {
            if except.contains(&k) {
                continue;
            }
            let (tx, rx) = mpsc::sync_channel(1);
            if !p.command(cmd(tx)) || rx.recv_timeout(Duration::from_secs(5)).is_err() {
                return Err(ControlError::Failed(format!("PMD {k} did not answer")));
            }
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Result<usize, ControlError> {
        self.ports
            .iter()
            .position(|p| p.cfg.name == name)
            .ok_or_else(|| ControlError::NotFound(format!("no port named {name:?}")))
    }

    /// Adds a switch port at runtime. Validated against the running configuration first;
    /// nothing is left behind if it cannot be created.
    pub fn add_port(&mut self, p: PortConfig) -> Result<(), ControlError> {
        if self.ports.iter().any(|q| q.cfg.name == p.name) {
            return Err(ControlError::Conflict(format!(
                "port {:?} already exists",
                p.name
            )));
        }
        let mut check = self.cfg.clone();
        check.ports.push(p.clone());
        check
            .validate()
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        let id = (0..crate::switch::mactable::MAX_PORTS as PortId)
            .find(|id| self.ports.iter().all(|q| q.id != *id))
            .ok_or_else(|| ControlError::Conflict("no free port id".into()))?;
        let (port, device, dpdk) = make_port(&p, self.cfg.dpdk.as_ref())
            .map_err(|e| ControlError::Failed(format!("{e:#}")))?;
        self.switch.table.flush_port(id);
        self.switch.table.set_port_limit(id, p.switch.mac_limit);
        let mut parts = place(
            &self.ports,
            self.pmds.len(),
            port.num_queues(),
            p.switch.pmd,
        );
        let stats = port.stats().clone();
        let kind = port.kind();
        let split = split_port(port, &mut parts);
        let owners: Vec<usize> = parts.iter().map(|(k, _)| *k).collect();
        let link = PortLink::new(id, stats.clone(), self.wakes.clone(), owners[0]);
        let vlan = p.switch.vlan_mode();
        let info = PortInfo {
            id,
            cfg: p.clone(),
            kind,
            stats,
            device,
            dpdk,
            switched: true,
            parts,
            link: Some(link.clone()),
        };
        // The other PMDs first: what they queue before the owner polls the port waits in its
        // inbox.
        for (j, pmd) in self.pmds.iter().enumerate() {
            if !owners.contains(&j) {
                pmd.command(PmdCommand::AddRemote(link.clone(), vlan.clone()));
            }
        }
        for (n, (k, port)) in split.into_iter().enumerate() {
            let part = SwitchPort {
                link: link.clone(),
                limiter: limiter(&p, &*port),
                port,
                vlan: vlan.clone(),
                drains_inbox: n == 0,
            };
            if !self.pmds[k].command(PmdCommand::AddSwitchPort(part)) {
                return Err(ControlError::Failed(format!("PMD {k} has stopped")));
            }
        }
        tracing::info!(port = %p.name, id, pmds = ?owners, "port added");
        self.ports.push(info);
        self.cfg.ports.push(p);
        Ok(())
    }

    /// Removes a switch port at runtime: the other PMDs stop queueing for it, then its PMD
    /// lets go of it between two rounds; its device is stopped (socket removed) and its MACs
    /// forgotten. Then the remaining ports are rebalanced.
    pub fn remove_port(&mut self, name: &str) -> Result<(), ControlError> {
        let i = self.find(name)?;
        if !self.ports[i].switched {
            return Err(ControlError::Conflict(format!(
                "port {name:?} is cross-connected; only switch ports can be removed at runtime"
            )));
        }
        let id = self.ports[i].id;
        let owners: Vec<usize> = self.ports[i].parts.iter().map(|(k, _)| *k).collect();
        self.to_other_pmds(&owners, |ack| PmdCommand::RemoveRemote(id, ack))?;
        // The part that drains the inbox (queue 0's) last.
        for &k in owners.iter().rev() {
            let (tx, rx) = mpsc::sync_channel(1);
            if !self.pmds[k].command(PmdCommand::RemoveSwitchPort(id, tx)) {
                return Err(ControlError::Failed(format!("PMD {k} has stopped")));
            }
            let part = rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| ControlError::Failed(format!("PMD {k} did not answer")))?;
            drop(part);
        }
        let mut info = self.ports.remove(i);
        self.cfg.ports.retain(|p| p.name != name);
        if let Some(d) = &mut info.device {
            d.stop();
        }
        self.switch.table.flush_port(id);
        self.switch.table.set_port_limit(id, 0);
        tracing::info!(port = %name, id, "port removed");
        // What it leaves may be uneven: even it out (only if that helps by a tenth).
        if let Err(e) = self.rebalance() {
            tracing::warn!("rebalance after removing {name:?}: {e}");
        }
        Ok(())
    }

    /// Checks a disk to add at runtime against the running configuration (names, sockets).
    pub fn check_disk(&self, d: &ExportSettings) -> Result<(), ControlError> {
        if self.disks.iter().any(|k| k.settings.name == d.name) {
            return Err(ControlError::Conflict(format!(
                "disk {:?} already exists",
                d.name
            )));
        }
        let mut check = self.cfg.clone();
        check.disks.push(d.clone());
        check
            .validate()
            .map_err(|e| ControlError::BadRequest(e.to_string()))
    }

    /// Adds a disk started with [`Disk::start`] after [`Dataplane::check_disk`] (the API
    /// serializes disk changes, so the check still holds).
    pub fn insert_disk(&mut self, disk: Disk) {
        self.cfg.disks.push(disk.settings.clone());
        self.disks.push(disk);
    }

    /// Takes a disk out of the data plane; the caller stops it (outside the data plane's
    /// lock: its in-flight I/O completes first).
    pub fn take_disk(&mut self, name: &str) -> Result<Disk, ControlError> {
        let i = self
            .disks
            .iter()
            .position(|k| k.settings.name == name)
            .ok_or_else(|| ControlError::NotFound(format!("no disk named {name:?}")))?;
        self.cfg.disks.retain(|k| k.name != name);
        Ok(self.disks.remove(i))
    }

    /// Every disk's connection state and counters, as the blk daemon's metrics have them.
    pub fn disk_exports(&self) -> Vec<ExportReport> {
        self.disks.iter().map(|k| k.export.report()).collect()
    }

    /// Replaces a switch port's VLAN settings and MAC limit. Its learned MACs are forgotten
    /// (they may belong to VLANs it no longer carries).
    pub fn set_switch_settings(
        &mut self,
        name: &str,
        s: SwitchPortConfig,
    ) -> Result<(), ControlError> {
        let i = self.find(name)?;
        if !self.ports[i].switched {
            return Err(ControlError::Conflict(format!(
                "port {name:?} is cross-connected, not on the switch"
            )));
        }
        s.validate()
            .map_err(|e| ControlError::BadRequest(format!("port {name:?}: {e}")))?;
        // `pmd` may only restate where the whole port already is.
        if s.pmd
            .is_some_and(|n| self.ports[i].parts.iter().any(|(k, _)| *k != n))
        {
            return Err(ControlError::BadRequest(format!(
                "port {name:?}: moving a port to another PMD is not supported; remove and add it"
            )));
        }
        if s.pmd.is_some_and(|n| n >= self.pmds.len()) {
            return Err(ControlError::BadRequest(format!(
                "port {name:?}: no such PMD"
            )));
        }
        let id = self.ports[i].id;
        for p in &self.pmds {
            p.command(PmdCommand::SetVlan(id, s.vlan_mode()));
        }
        self.switch.table.set_port_limit(id, s.mac_limit);
        self.switch.table.flush_port(id);
        self.ports[i].cfg.switch = s.clone();
        if let Some(c) = self.cfg.ports.iter_mut().find(|p| p.name == name) {
            c.switch = s;
        }
        Ok(())
    }

    /// Moves switch port parts between PMDs so that their load is even, as OVS's
    /// `pmd-rxq-assign=cycles`: parts sorted by the PMD cycles their queues took since the
    /// last rebalance (by queue count when nothing moved), each given to the PMD with the least
    /// load so far that polls no other part of the same port (by queue count when too few
    /// cycles were measured to tell loads apart). Ports pinned with `pmd` stay and
    /// count as load of their PMD. Nothing moves unless the busiest PMD's load drops by at
    /// least a tenth (moving costs a short pause of the port). Returns the moves made.
    pub fn rebalance(&mut self) -> Result<Vec<String>, ControlError> {
        let n = self.pmds.len();
        // (port index, part index, load)
        let mut load = vec![0u64; n];
        let mut movable = Vec::new();
        let recent = |info: &PortInfo, qs: &[u16], before: &[(PortId, Vec<u64>)]| -> u64 {
            let old = before.iter().find(|(id, _)| *id == info.id).map(|(_, v)| v);
            qs.iter()
                .map(|&q| {
                    let now = info
                        .stats
                        .rxq_cycles
                        .get(q as usize)
                        .map_or(0, |c| c.load(Ordering::Relaxed));
                    now.saturating_sub(old.and_then(|v| v.get(q as usize)).copied().unwrap_or(0))
                })
                .sum()
        };
        // Cycles measured over a moment (a rebalance right after another, as when a port
        // leaves just after one) are noise: below MIN_MEASURED_CYCLES in all, parts count by
        // their queues instead.
        let measured: u64 = self
            .ports
            .iter()
            .filter(|i| i.switched)
            .flat_map(|i| i.parts.iter().map(move |(_, qs)| (i, qs)))
            .map(|(i, qs)| recent(i, qs, &self.rebalanced_at))
            .sum();
        let by_cycles = measured >= MIN_MEASURED_CYCLES;
        for (pi, info) in self.ports.iter().enumerate() {
            for (j, (k, qs)) in info.parts.iter().enumerate() {
                let l = if by_cycles {
                    recent(info, qs, &self.rebalanced_at)
                } else {
                    qs.len() as u64
                };
                if info.switched && info.cfg.switch.pmd.is_none() {
                    movable.push((pi, j, l));
                } else if let Some(x) = load.get_mut(*k) {
                    *x += l;
                }
            }
        }
        movable.sort_by(|a, b| b.2.cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        // The load as placed now, to judge the plan by.
        let mut before = load.clone();
        for &(pi, j, l) in &movable {
            before[self.ports[pi].parts[j].0] += l;
        }
        let mut target: Vec<(usize, usize, usize)> = Vec::new(); // (port, part, pmd)
        for &(pi, j, l) in &movable {
            let taken: Vec<usize> = target
                .iter()
                .filter(|(p, _, _)| *p == pi)
                .map(|(_, _, k)| *k)
                .collect();
            let k = (0..n)
                .filter(|k| !taken.contains(k))
                .min_by_key(|&k| load[k])
                .unwrap_or(self.ports[pi].parts[j].0);
            load[k] += l;
            target.push((pi, j, k));
        }
        // Worth it?
        let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
        let mut moves = Vec::new();
        if max(&load) * 10 >= max(&before) * 9 {
            self.snapshot_load();
            return Ok(moves);
        }
        // Parts leave their PMDs first, then arrive: two parts of one port may swap PMDs.
        let mut moving = Vec::new();
        for &(pi, j, k) in &target {
            let from = self.ports[pi].parts[j].0;
            if from == k {
                continue;
            }
            let id = self.ports[pi].id;
            let (tx, rx) = mpsc::sync_channel(1);
            if !self.pmds[from].command(PmdCommand::RemoveSwitchPort(id, tx)) {
                return Err(ControlError::Failed(format!("PMD {from} has stopped")));
            }
            let part = rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| ControlError::Failed(format!("PMD {from} did not answer")))?
                .ok_or_else(|| ControlError::Failed(format!("PMD {from} did not poll it")))?;
            moving.push((pi, j, from, k, part));
        }
        for (pi, j, from, k, part) in moving {
            let info = &mut self.ports[pi];
            let link = info.link.clone().ok_or_else(|| {
                ControlError::Failed(format!("port {:?} has no link", info.cfg.name))
            })?;
            let vlan = info.cfg.switch.vlan_mode();
            let primary = j == 0;
            info.parts[j].0 = k;
            if !info.parts.iter().any(|(m, _)| *m == from) {
                self.pmds[from].command(PmdCommand::AddRemote(link.clone(), vlan.clone()));
            }
            if primary {
                link.set_owner(k);
            }
            self.pmds[k].command(PmdCommand::AddSwitchPort(SwitchPort {
                link,
                limiter: limiter(&info.cfg, &*part),
                port: part,
                vlan,
                drains_inbox: primary,
            }));
            let qs: Vec<String> = info.parts[j].1.iter().map(u16::to_string).collect();
            let m = format!("{}[{}]: pmd {from} -> {k}", info.cfg.name, qs.join(","));
            tracing::info!("rebalance: {m}");
            moves.push(m);
        }
        self.snapshot_load();
        Ok(moves)
    }

    /// Remembers every port's cycle counters: the next rebalance weighs what came after.
    fn snapshot_load(&mut self) {
        self.rebalanced_at = self
            .ports
            .iter()
            .map(|i| {
                let v = i.stats.rxq_cycles.iter().map(|c| c.load(Ordering::Relaxed));
                (i.id, v.collect())
            })
            .collect();
    }

    /// Limits what a port (switched or cross-connected) takes in, or lifts its limit (None).
    /// Each PMD polling a part of it applies the change between two rounds.
    pub fn set_rate_limit(
        &mut self,
        name: &str,
        r: Option<RateLimitConfig>,
    ) -> Result<(), ControlError> {
        let i = self.find(name)?;
        if let Some(r) = &r {
            r.validate()
                .map_err(|e| ControlError::BadRequest(format!("port {name:?}: {e}")))?;
        }
        let mut cfg = self.ports[i].cfg.clone();
        cfg.rate_limit = r;
        let limit = rate_limit(&cfg);
        let id = self.ports[i].id;
        let mut pmds: Vec<usize> = self.ports[i].parts.iter().map(|(k, _)| *k).collect();
        pmds.sort_unstable();
        pmds.dedup();
        for k in pmds {
            if !self.pmds[k].command(PmdCommand::SetRateLimit(id, limit)) {
                return Err(ControlError::Failed(format!("PMD {k} has stopped")));
            }
        }
        tracing::info!(port = %name, rate_limit = ?r, "rate limit set");
        self.ports[i].cfg.rate_limit = r;
        if let Some(c) = self.cfg.ports.iter_mut().find(|p| p.name == name) {
            c.rate_limit = r;
        }
        Ok(())
    }

    /// Sets the link status a vhost-user port's driver sees.
    pub fn set_link(&mut self, name: &str, up: bool) -> Result<(), ControlError> {
        let i = self.find(name)?;
        match &self.ports[i].device {
            Some(d) => {
                d.set_link(up);
                Ok(())
            }
            None => Err(ControlError::BadRequest(format!(
                "port {name:?} is a {} port; only vhost-user ports have a link to set",
                self.ports[i].kind
            ))),
        }
    }

    /// The learned MACs, with port names.
    pub fn mac_table(&self) -> Vec<MacReport> {
        let now = self.switch.clock.load(Ordering::Relaxed);
        self.switch
            .table
            .entries(now)
            .into_iter()
            .map(|e| MacReport {
                port: self
                    .ports
                    .iter()
                    .find(|p| p.id == e.port)
                    .map_or_else(|| format!("#{}", e.port), |p| p.cfg.name.clone()),
                vlan: e.vlan,
                mac: format_mac(&e.mac),
                age: e.age,
            })
            .collect()
    }

    pub fn report(&self) -> Report {
        Report {
            ports: self
                .ports
                .iter()
                .map(|p| {
                    let dev = p.device.as_ref();
                    let vlan = p.switched.then(|| p.cfg.switch.vlan_mode().report());
                    PortReport {
                        name: p.cfg.name.clone(),
                        kind: p.kind,
                        connected: dev.map(|d| d.is_connected()),
                        link_up: dev.map(|d| d.link_up()),
                        connections: dev.map(|d| d.connections()),
                        broken_queues: dev
                            .map(|d| {
                                d.broken_queues()
                                    .into_iter()
                                    .map(|b| format!("queue {}: {}", b.queue, b.reason))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        macs: vlan.as_ref().map(|_| self.switch.table.port_count(p.id)),
                        vlan,
                        rate_limit: p.cfg.rate_limit.map(|r| r.resolved()),
                        dpdk: p.dpdk.as_ref().and_then(dpdk_report),
                        stats: p.stats.snapshot(),
                    }
                })
                .collect(),
            pmds: self
                .pmds
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let mut s = p.snapshot();
                    s.ports = self
                        .ports
                        .iter()
                        .flat_map(|i| {
                            let whole = i.parts.len() == 1;
                            i.parts
                                .iter()
                                .filter(move |(j, _)| *j == k)
                                .map(move |(_, qs)| {
                                    if whole {
                                        i.cfg.name.clone()
                                    } else {
                                        let qs: Vec<String> =
                                            qs.iter().map(u16::to_string).collect();
                                        format!("{}[{}]", i.cfg.name, qs.join(","))
                                    }
                                })
                        })
                        .collect();
                    s
                })
                .collect(),
            switch: SwitchReport {
                mac_entries: self.switch.table.len(),
                mac_capacity: self.switch.table.capacity(),
                stats: self.switch.stats.snapshot(),
            },
            disks: self.disks.iter().map(Disk::report).collect(),
        }
    }

    /// Stops the PMDs (dropping the ports' data halves), then the devices.
    pub fn stop(&mut self) {
        self.ager = None;
        for p in &mut self.pmds {
            p.stop();
        }
        for p in &mut self.ports {
            if let Some(d) = &mut p.device {
                d.stop();
            }
        }
        for k in &mut self.disks {
            k.export.stop();
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
        for k in &self.disks {
            let t = &k.total;
            s += &format!(
                "disk {} connected={} reads={} writes={} read_bytes={} written_bytes={} errors={}\n",
                k.name,
                k.connected,
                t.reads,
                t.writes,
                t.read_bytes,
                t.written_bytes,
                t.io_errors + t.unsupported
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(parts: Vec<(usize, Vec<u16>)>) -> PortInfo {
        PortInfo {
            id: 0,
            cfg: PortConfig {
                name: "p".into(),
                kind: PortKind::Sink,
                switch: SwitchPortConfig::default(),
                rate_limit: None,
            },
            kind: "sink",
            stats: Arc::new(PortStats::with_queues(1)),
            device: None,
            dpdk: None,
            switched: true,
            parts,
            link: None,
        }
    }

    #[test]
    fn queues_go_to_the_least_loaded_pmds() {
        // Nothing placed yet: four queues over two PMDs alternate, queue 0's part first.
        assert_eq!(
            place(&[], 2, 4, None),
            vec![(0, vec![0, 2]), (1, vec![1, 3])]
        );
        // PMD 0 already polls three queues: the next three all go to PMD 1.
        let busy = [info(vec![(0, vec![0, 1, 2])])];
        assert_eq!(place(&busy, 2, 3, None), vec![(1, vec![0, 1, 2])]);
        // PMD 0 polls one: PMD 1 catches up, then they alternate.
        let one = [info(vec![(0, vec![0])])];
        assert_eq!(place(&one, 2, 3, None), vec![(1, vec![0, 2]), (0, vec![1])]);
        // Pinned: all on that PMD.
        assert_eq!(place(&busy, 2, 2, Some(0)), vec![(0, vec![0, 1])]);
        // One PMD.
        assert_eq!(place(&busy, 1, 2, None), vec![(0, vec![0, 1])]);
    }
}
