//! The daemon's TOML configuration: ports, cross-connects, PMD CPUs. Everything is validated
//! before anything is created, so a bad file changes nothing on the host.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use torii_vhost_user_blk::settings::ExportSettings;

use crate::pmd::PmdMode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    #[serde(default, rename = "port")]
    pub ports: Vec<PortConfig>,
    #[serde(default, rename = "xconnect")]
    pub xconnects: Vec<XConnectConfig>,
    #[serde(default)]
    pub switch: SwitchConfig,
    /// vhost-user-blk exports served by this process (the keys of `torii-vhost-user-blk`'s
    /// `[[export]]` sections).
    #[serde(default, rename = "disk")]
    pub disks: Vec<ExportSettings>,
    /// DPDK's EAL settings, for `dpdk` ports (defaults when absent).
    pub dpdk: Option<DpdkConfig>,
}

/// How DPDK is initialised (once per process, before the first `dpdk` port). DPDK's threads
/// are not the PMDs: those stay Torii's own, pinned by `pmd_cpus`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpdkConfig {
    /// CPUs DPDK's main lcore and service threads may run on (default: all).
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Memory DPDK reserves at start (`-m`), MiB.
    #[serde(default = "default_dpdk_mib")]
    pub memory_mib: u32,
    /// Hugepage memory (the default; needs `vm.nr_hugepages`). `false` runs DPDK on plain
    /// memory (`--no-huge`): enough for virtual devices that copy (memif, af_packet, tap), not
    /// for PCI NICs.
    #[serde(default = "yes")]
    pub hugepages: bool,
    /// PCI devices DPDK may take (`-a`, e.g. "0000:03:00.0", bound to vfio-pci); none: no PCI
    /// bus scan at all (`--no-pci`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Virtual devices made at start (`--vdev`); `dpdk` ports can also make theirs.
    #[serde(default)]
    pub vdevs: Vec<String>,
    /// More EAL arguments, passed last and as they are.
    #[serde(default)]
    pub eal_args: Vec<String>,
}

impl Default for DpdkConfig {
    fn default() -> Self {
        DpdkConfig {
            cpus: Vec::new(),
            memory_mib: default_dpdk_mib(),
            hugepages: true,
            allow: Vec::new(),
            vdevs: Vec::new(),
            eal_args: Vec::new(),
        }
    }
}

fn default_dpdk_mib() -> u32 {
    256
}
fn yes() -> bool {
    true
}

impl DpdkConfig {
    fn validate(&self) -> Result<(), String> {
        let ncpu = host_cpus();
        if let Some(c) = self.cpus.iter().find(|&&c| c >= ncpu) {
            return Err(format!(
                "cpus: CPU {c} does not exist (this host has {ncpu})"
            ));
        }
        if !(64..=65536).contains(&self.memory_mib) {
            return Err(format!(
                "memory_mib {} is outside 64..=65536",
                self.memory_mib
            ));
        }
        for a in &self.allow {
            if !is_pci_address(a) {
                return Err(format!("allow: {a:?} is not a PCI address (dddd:bb:dd.f)"));
            }
        }
        for v in self.vdevs.iter().chain(&self.eal_args) {
            if v.is_empty() || v.contains('\0') {
                return Err(format!("{v:?} is not a valid EAL argument"));
            }
        }
        if !cfg!(feature = "dpdk") {
            return Err(NO_DPDK.into());
        }
        Ok(())
    }
}

/// The error for DPDK settings in a build without DPDK.
const NO_DPDK: &str = "this torii-dataplane was built without DPDK support (cargo feature `dpdk`)";

/// `dddd:bb:dd.f`, hexadecimal.
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// Whether a `dpdk` port's `device` names a PCI device (a NIC or VF through VFIO).
pub fn is_pci_device(device: &str) -> bool {
    is_pci_address(dpdk_device_name(device))
}

/// The device a `dpdk` port's `device` string names: the part before the first comma (a
/// virtual device's name, such as `net_memif0`, or a PCI address).
/// The CPUs online on the host. Not this thread's affinity: DPDK's initialisation narrows the
/// main thread's to its own CPUs (`[dpdk] cpus`), after which the configuration is checked
/// again when the data plane starts.
fn host_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

pub fn dpdk_device_name(device: &str) -> &str {
    device.split(',').next().unwrap_or(device)
}

/// The L2 switch that every port outside a cross-connect is on.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// Most MAC addresses learned at once (all VLANs); beyond it, unknown MACs are flooded.
    #[serde(default = "default_mac_table")]
    pub mac_table_size: usize,
    /// A learned MAC not seen for this long is forgotten.
    #[serde(default = "default_ageing")]
    pub mac_ageing_secs: u32,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            mac_table_size: default_mac_table(),
            mac_ageing_secs: default_ageing(),
        }
    }
}

fn default_mac_table() -> usize {
    8192
}
fn default_ageing() -> u32 {
    300
}

/// A port's switch settings (only for ports on the switch).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchPortConfig {
    /// Access port of this VLAN (1..=4094). Without `vlan` or `trunk`: the untagged segment.
    pub vlan: Option<u16>,
    /// Trunk port carrying these VLANs tagged.
    pub trunk: Option<Vec<u16>>,
    /// A trunk's untagged VLAN (0 = the untagged segment).
    pub native_vlan: Option<u16>,
    /// Most source MACs learned on the port; frames from further MACs are dropped. 0 = none.
    #[serde(default)]
    pub mac_limit: u32,
    /// Index into `pmd_cpus` of the PMD that polls the port (default: the one with the fewest
    /// switch port queues).
    pub pmd: Option<usize>,
}

impl SwitchPortConfig {
    /// Keys of a `[[port]]` entry that are switch settings rather than port-type settings.
    const KEYS: [&'static str; 5] = ["vlan", "trunk", "native_vlan", "mac_limit", "pmd"];

    pub fn is_set(&self) -> bool {
        self.vlan.is_some()
            || self.trunk.is_some()
            || self.native_vlan.is_some()
            || self.mac_limit != 0
            || self.pmd.is_some()
    }

    pub fn validate(&self) -> Result<(), String> {
        let vid = |v: u16, what: &str| {
            if (1..=crate::switch::vlan::MAX_VID).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} {v} is outside 1..=4094"))
            }
        };
        match (&self.vlan, &self.trunk) {
            (Some(_), Some(_)) => return Err("vlan and trunk exclude each other".into()),
            (Some(v), None) => vid(*v, "vlan")?,
            (None, Some(t)) => {
                if t.is_empty() {
                    return Err("trunk lists no VLAN".into());
                }
                for &v in t {
                    vid(v, "trunk VLAN")?;
                }
            }
            (None, None) => {}
        }
        if let Some(n) = self.native_vlan {
            if self.trunk.is_none() {
                return Err("native_vlan needs trunk".into());
            }
            if n > crate::switch::vlan::MAX_VID {
                return Err(format!("native_vlan {n} is outside 0..=4094"));
            }
        }
        Ok(())
    }

    pub fn vlan_mode(&self) -> crate::switch::vlan::VlanMode {
        use crate::switch::vlan::{VlanMode, VlanSet};
        match &self.trunk {
            Some(t) => VlanMode::Trunk {
                allowed: VlanSet::new(t),
                native: self.native_vlan,
            },
            None => VlanMode::Access {
                vlan: self.vlan.unwrap_or(0),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// One PMD thread per entry, pinned to that CPU. Empty: one unpinned PMD.
    #[serde(default)]
    pub pmd_cpus: Vec<usize>,
    #[serde(default)]
    pub pmd_mode: PmdMode,
    /// Packet buffers per PMD.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// Where to write port and PMD statistics (JSON) once a second.
    pub stats_file: Option<PathBuf>,
    /// The control API's Unix socket (mode 0660: root and the socket's group).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Also serve Prometheus metrics (`/metrics`) over TCP here, e.g. "127.0.0.1:9464".
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Per-thread seccomp filters (docs/security.md): "enforce" (default), "log"
    /// (the kernel logs what enforce would refuse) or "off".
    #[serde(default)]
    pub seccomp: torii_vhost_user::seccomp::Mode,
    /// Landlock file-system sandbox (docs/security.md): "off" (default) or "enforce" — the
    /// daemon may then touch only what this file implies (`crate::sandbox`) and
    /// `landlock_paths`.
    #[serde(default)]
    pub landlock: torii_vhost_user::landlock::Mode,
    /// What the sandbox allows besides what the configuration implies (read, write, make and
    /// remove files, sockets and directories beneath each): e.g. the directory where ports
    /// and disks added at run time will have their sockets and images. Absolute paths that
    /// exist when the daemon starts.
    #[serde(default)]
    pub landlock_paths: Vec<PathBuf>,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(crate::ctl::DEFAULT_SOCKET)
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            pmd_cpus: Vec::new(),
            pmd_mode: PmdMode::default(),
            pool_size: default_pool(),
            stats_file: None,
            control_socket: default_control_socket(),
            metrics_listen: None,
            seccomp: Default::default(),
            landlock: Default::default(),
            landlock_paths: Vec::new(),
        }
    }
}

fn default_pool() -> usize {
    1024
}

/// A port's ingress rate limit (`rate_limit = { pps = 100000, bps = 1000000000 }`): what the
/// port may take in from its source — what its guest transmits, what its tap or device
/// delivers. Packets over the limit are left where they are (the guest's ring fills and its
/// driver stops the queue), not dropped. Set at least one of `pps` and `bps`; both: the
/// stricter applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Packets per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps: Option<u64>,
    /// Bits per second: frame bytes × 8 (without the virtio-net header, FCS or preamble).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    /// Packets the port may take at once after a pause (the packet bucket's size). Default:
    /// one PMD burst (32) or 10 ms of `pps`, whichever is more (a PMD that is off its CPU
    /// for a few milliseconds does not lose what the port earned meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_packets: Option<u64>,
    /// Bytes the port may take at once after a pause (the bit bucket's size, in bytes).
    /// Default: 64 KiB (one GSO frame) or 10 ms of `bps`, whichever is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_bytes: Option<u64>,
}

impl RateLimitConfig {
    /// Largest `pps`: 1 Gpps (far above what one port moves).
    pub const MAX_PPS: u64 = 1_000_000_000;
    /// `bps` range: 1 kbit/s to 1 Tbit/s.
    pub const MIN_BPS: u64 = 1_000;
    pub const MAX_BPS: u64 = 1_000_000_000_000;
    pub const MAX_BURST_PACKETS: u64 = 1 << 24;
    /// `burst_bytes` range: one minimum frame to 1 GiB.
    pub const MIN_BURST_BYTES: u64 = 64;
    pub const MAX_BURST_BYTES: u64 = 1 << 30;

    pub fn validate(&self) -> Result<(), String> {
        if self.pps.is_none() && self.bps.is_none() {
            return Err(
                "rate_limit: neither pps nor bps is set (to lift a limit, leave rate_limit out or clear it)"
                    .into(),
            );
        }
        match self.pps {
            Some(0) => {
                return Err(
                    "rate_limit: pps 0 would stop the port; to lift the limit, leave pps out"
                        .into(),
                )
            }
            Some(p) if p > Self::MAX_PPS => {
                return Err(format!(
                    "rate_limit: pps {p} is above {} (1 Gpps)",
                    Self::MAX_PPS
                ))
            }
            _ => {}
        }
        match self.bps {
            Some(0) => {
                return Err(
                    "rate_limit: bps 0 would stop the port; to lift the limit, leave bps out"
                        .into(),
                )
            }
            Some(b) if b < Self::MIN_BPS => {
                return Err(format!(
                    "rate_limit: bps {b} is below {} (1 kbit/s)",
                    Self::MIN_BPS
                ))
            }
            Some(b) if b > Self::MAX_BPS => {
                return Err(format!(
                    "rate_limit: bps {b} is above {} (1 Tbit/s)",
                    Self::MAX_BPS
                ))
            }
            _ => {}
        }
        if let Some(n) = self.burst_packets {
            if self.pps.is_none() {
                return Err("rate_limit: burst_packets needs pps".into());
            }
            if !(1..=Self::MAX_BURST_PACKETS).contains(&n) {
                return Err(format!(
                    "rate_limit: burst_packets {n} is outside 1..={}",
                    Self::MAX_BURST_PACKETS
                ));
            }
        }
        if let Some(n) = self.burst_bytes {
            if self.bps.is_none() {
                return Err("rate_limit: burst_bytes needs bps".into());
            }
            if !(Self::MIN_BURST_BYTES..=Self::MAX_BURST_BYTES).contains(&n) {
                return Err(format!(
                    "rate_limit: burst_bytes {n} is outside {}..={}",
                    Self::MIN_BURST_BYTES,
                    Self::MAX_BURST_BYTES
                ));
            }
        }
        Ok(())
    }

    /// The same limit with each set rate's burst filled in (defaults resolved).
    pub fn resolved(&self) -> RateLimitConfig {
        let burst = crate::port::BURST as u64;
        RateLimitConfig {
            pps: self.pps,
            bps: self.bps,
            burst_packets: self
                .pps
                .map(|p| self.burst_packets.unwrap_or((p / 100).max(burst))),
            burst_bytes: self
                .bps
                .map(|b| self.burst_bytes.unwrap_or((b / 800).max(64 * 1024))),
        }
    }

    /// The limit as the PMDs apply it, in a clock of `hz` ticks per second.
    pub fn to_limit(&self, hz: u64) -> crate::ratelimit::RateLimit {
        let r = self.resolved();
        crate::ratelimit::RateLimit {
            pps: r.pps,
            bps: r.bps,
            burst_packets: r.burst_packets.unwrap_or(0),
            burst_bytes: r.burst_bytes.unwrap_or(0),
            hz,
        }
    }
}

/// A port: its name plus its type-specific settings.
#[derive(Debug, Clone)]
pub struct PortConfig {
    pub name: String,
    pub kind: PortKind,
    pub switch: SwitchPortConfig,
    /// Ingress rate limit (any port, switched or cross-connected).
    pub rate_limit: Option<RateLimitConfig>,
}

impl<'de> Deserialize<'de> for PortConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // The switch settings are common to all types; the rest is refused per port type
        // (each variant carries `name` itself so unknown keys are named in the error).
        let mut table = toml::Table::deserialize(d)?;
        let mut common = toml::Table::new();
        for k in SwitchPortConfig::KEYS {
            if let Some(v) = table.remove(k) {
                common.insert(k.to_string(), v);
            }
        }
        let switch = SwitchPortConfig::deserialize(toml::Value::Table(common))
            .map_err(|e| D::Error::custom(e.message()))?;
        let rate_limit = table
            .remove("rate_limit")
            .map(|v| {
                RateLimitConfig::deserialize(v)
                    .map_err(|e| D::Error::custom(format!("rate_limit: {}", e.message())))
            })
            .transpose()?;
        let raw = RawPort::deserialize(toml::Value::Table(table))
            .map_err(|e| D::Error::custom(e.message()))?;
        let (name, kind) = match raw {
            RawPort::VhostUser {
                name,
                socket,
                mode,
                queues,
                mac,
                mtu,
            } => (
                name,
                PortKind::VhostUser {
                    socket,
                    mode,
                    queues,
                    mac,
                    mtu,
                },
            ),
            RawPort::Tap {
                name,
                ifname,
                queues,
            } => (name, PortKind::Tap { ifname, queues }),
            RawPort::Source {
                name,
                frame_size,
                src_mac,
                dst_mac,
            } => (
                name,
                PortKind::Source {
                    frame_size,
                    src_mac,
                    dst_mac,
                },
            ),
            RawPort::Sink { name } => (name, PortKind::Sink),
            RawPort::Dpdk {
                name,
                device,
                queues,
                rxq_size,
                txq_size,
                mtu,
                mbufs,
                lend_tx,
            } => (
                name,
                PortKind::Dpdk(DpdkPortConfig {
                    device,
                    queues,
                    rxq_size,
                    txq_size,
                    mtu,
                    mbufs,
                    lend_tx,
                }),
            ),
        };
        Ok(PortConfig {
            name,
            kind,
            switch,
            rate_limit,
        })
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum RawPort {
    VhostUser {
        name: String,
        socket: PathBuf,
        #[serde(default = "default_mode")]
        mode: String,
        #[serde(default = "one")]
        queues: u16,
        mac: Option<String>,
        #[serde(default = "default_mtu")]
        mtu: u16,
    },
    Tap {
        name: String,
        ifname: String,
        #[serde(default = "one")]
        queues: u16,
    },
    Source {
        name: String,
        #[serde(default = "default_frame")]
        frame_size: usize,
        src_mac: Option<String>,
        dst_mac: Option<String>,
    },
    Sink {
        name: String,
    },
    Dpdk {
        name: String,
        device: String,
        #[serde(default = "one")]
        queues: u16,
        #[serde(default = "default_ring")]
        rxq_size: u16,
        #[serde(default = "default_ring")]
        txq_size: u16,
        #[serde(default = "default_mtu")]
        mtu: u16,
        mbufs: Option<u32>,
        #[serde(default)]
        lend_tx: bool,
    },
}

fn default_ring() -> u16 {
    1024
}

/// A port on a DPDK poll-mode driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpdkPortConfig {
    /// DPDK device arguments: a virtual device made for this port and removed with it
    /// ("net_memif0,role=server,socket=/run/torii/memif.sock", "net_af_packet0,iface=eth1"),
    /// or a device DPDK already has (a PCI address from `[dpdk] allow`, a `[dpdk] vdevs`
    /// entry's name).
    pub device: String,
    /// Receive/transmit queue pairs; with more than one, RSS spreads received flows.
    pub queues: u16,
    /// Descriptors per receive and per transmit queue (powers of two).
    pub rxq_size: u16,
    pub txq_size: u16,
    pub mtu: u16,
    /// Packet buffers (mbufs) of the port's mempool; default: enough to fill every ring.
    pub mbufs: Option<u32>,
    /// Hand frames of 1 KiB and more to a virtual device without copying them into mbufs
    /// (DPDK external buffers pointing at Torii's packet). Off by default: measured no faster
    /// than the copy (docs/perf.md). PCI devices always get copies. (Received frames are
    /// never copied out of single-segment mbufs, whatever this says.)
    pub lend_tx: bool,
}

#[derive(Debug, Clone)]
pub enum PortKind {
    VhostUser {
        socket: PathBuf,
        mode: String,
        queues: u16,
        mac: Option<String>,
        mtu: u16,
    },
    Tap {
        ifname: String,
        queues: u16,
    },
    Source {
        frame_size: usize,
        /// The frames' source and destination MACs (unicast; defaults 02:00:00:00:00:01 and
        /// …:02).
        src_mac: Option<String>,
        dst_mac: Option<String>,
    },
    Sink,
    Dpdk(DpdkPortConfig),
}

fn default_mode() -> String {
    "server".into()
}
fn one() -> u16 {
    1
}
fn default_mtu() -> u16 {
    1500
}
fn default_frame() -> usize {
    60
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct XConnectConfig {
    pub ports: [String; 2],
    /// Index into `pmd_cpus`; default round-robin.
    pub pmd: Option<usize>,
}

/// A configuration error, naming the offending entry.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("port {0:?}: {1}")]
    Port(String, String),
    #[error("disk {0:?}: {1}")]
    Disk(String, String),
    #[error("xconnect {0}: {1}")]
    XConnect(usize, String),
    #[error("switch: {0}")]
    Switch(String),
    #[error("dataplane: {0}")]
    Dataplane(String),
    #[error("dpdk: {0}")]
    Dpdk(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            source: Box::new(source),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.dataplane;
        if d.pool_size < 256 || d.pool_size > 65536 {
            return Err(ConfigError::Dataplane(format!(
                "pool_size {} is outside 256..=65536",
                d.pool_size
            )));
        }
        let ncpu = host_cpus();
        for &c in &d.pmd_cpus {
            if c >= ncpu {
                return Err(ConfigError::Dataplane(format!(
                    "pmd_cpus: CPU {c} does not exist (this host has {ncpu})"
                )));
            }
        }
        for p in &d.landlock_paths {
            torii_vhost_user::landlock::check_operator_path(p)
                .map_err(|e| ConfigError::Dataplane(format!("landlock_paths: {e}")))?;
        }
        let mut names = HashSet::new();
        // The control socket is taken too: no port or disk may listen there.
        let mut sockets = HashSet::from([d.control_socket.clone()]);
        let mut ifnames = HashSet::new();
        let mut devices = HashSet::new();
        if let Some(x) = &self.dpdk {
            x.validate().map_err(ConfigError::Dpdk)?;
        }
        for p in &self.ports {
            let err = |m: String| ConfigError::Port(p.name.clone(), m);
            if !torii_vhost_user::valid_device_name(&p.name) {
                return Err(err(
                    "name must be 1 to 64 printable characters, no spaces or /".into(),
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(err("duplicate port name".into()));
            }
            match &p.kind {
                PortKind::VhostUser {
                    socket,
                    mode,
                    queues,
                    mac,
                    mtu,
                } => {
                    if !sockets.insert(socket.clone()) {
                        return Err(err(format!("socket {} used twice", socket.display())));
                    }
                    if mode != "server" && mode != "client" {
                        return Err(err(format!(
                            "mode {mode:?} is not \"server\" or \"client\""
                        )));
                    }
                    if *queues == 0 || *queues > torii_vhost_user_net::MAX_QUEUE_PAIRS {
                        return Err(err(format!(
                            "queues {queues} is outside 1..={}",
                            torii_vhost_user_net::MAX_QUEUE_PAIRS
                        )));
                    }
                    if let Some(m) = mac {
                        parse_mac(m).map_err(err)?;
                    }
                    if *mtu < 68 {
                        return Err(err(format!("mtu {mtu} is below 68")));
                    }
                }
                PortKind::Tap { ifname, queues } => {
                    if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '\0']) {
                        return Err(err(format!(
                            "ifname {ifname:?} is not a valid interface name"
                        )));
                    }
                    if !ifnames.insert(ifname.clone()) {
                        return Err(err(format!("ifname {ifname} used twice")));
                    }
                    if *queues == 0 || *queues > 16 {
                        return Err(err(format!("queues {queues} is outside 1..=16")));
                    }
                }
                PortKind::Source {
                    frame_size,
                    src_mac,
                    dst_mac,
                } => {
                    if !(60..=9000).contains(frame_size) {
                        return Err(err(format!("frame_size {frame_size} is outside 60..=9000")));
                    }
                    for m in [src_mac, dst_mac].into_iter().flatten() {
                        parse_mac(m).map_err(err)?;
                    }
                }
                PortKind::Sink => {}
                PortKind::Dpdk(c) => {
                    let dev = dpdk_device_name(&c.device);
                    if dev.is_empty()
                        || c.device.len() > 1024
                        || c.device
                            .contains(|ch: char| ch.is_whitespace() || ch == '\0')
                    {
                        return Err(err(format!(
                            "device {:?} is not DPDK device arguments",
                            c.device
                        )));
                    }
                    if !is_pci_address(dev) && !dev.starts_with("net_") {
                        return Err(err(format!(
                            "device {dev:?} is neither a PCI address nor a net_* virtual device"
                        )));
                    }
                    if !devices.insert(dev.to_string()) {
                        return Err(err(format!("device {dev} used twice")));
                    }
                    if !(1..=16).contains(&c.queues) {
                        return Err(err(format!("queues {} is outside 1..=16", c.queues)));
                    }
                    for (what, n) in [("rxq_size", c.rxq_size), ("txq_size", c.txq_size)] {
                        if !n.is_power_of_two() || !(64..=4096).contains(&n) {
                            return Err(err(format!(
                                "{what} {n} is not a power of two in 64..=4096"
                            )));
                        }
                    }
                    if !(68..=9000).contains(&c.mtu) {
                        return Err(err(format!("mtu {} is outside 68..=9000", c.mtu)));
                    }
                    if let Some(n) = c.mbufs.filter(|n| !(1024..=1 << 20).contains(n)) {
                        return Err(err(format!("mbufs {n} is outside 1024..=1048576")));
                    }
                    if !cfg!(feature = "dpdk") {
                        return Err(err(NO_DPDK.into()));
                    }
                }
            }
            p.switch.validate().map_err(err)?;
            if let Some(r) = &p.rate_limit {
                r.validate().map_err(err)?;
            }
        }
        let mut disks = HashSet::new();
        for k in &self.disks {
            let err = |m: String| ConfigError::Disk(k.name.clone(), m);
            if !disks.insert(k.name.as_str()) {
                return Err(err("duplicate disk name".into()));
            }
            if !sockets.insert(k.socket.clone()) {
                return Err(err(format!("socket {} used twice", k.socket.display())));
            }
            k.to_config().map_err(err)?;
        }
        let sw = &self.switch;
        if !(1..=1 << 20).contains(&sw.mac_table_size) {
            return Err(ConfigError::Switch(format!(
                "mac_table_size {} is outside 1..=1048576",
                sw.mac_table_size
            )));
        }
        if sw.mac_ageing_secs == 0 {
            return Err(ConfigError::Switch(
                "mac_ageing_secs must be at least 1".into(),
            ));
        }
        for p in &self.ports {
            if let Some(n) = p.switch.pmd.filter(|&n| n >= d.pmd_cpus.len().max(1)) {
                return Err(ConfigError::Port(
                    p.name.clone(),
                    format!("pmd {n} does not exist"),
                ));
            }
        }
        let mut used = HashSet::new();
        for (i, x) in self.xconnects.iter().enumerate() {
            if x.ports[0] == x.ports[1] {
                return Err(ConfigError::XConnect(
                    i,
                    "a port cannot be connected to itself".into(),
                ));
            }
            for p in &x.ports {
                if !names.contains(p.as_str()) {
                    return Err(ConfigError::XConnect(i, format!("unknown port {p:?}")));
                }
                if !used.insert(p.as_str()) {
                    return Err(ConfigError::XConnect(
                        i,
                        format!("port {p:?} is already in another cross-connect"),
                    ));
                }
            }
            for p in &x.ports {
                if self.ports.iter().any(|c| &c.name == p && c.switch.is_set()) {
                    return Err(ConfigError::XConnect(
                        i,
                        format!("port {p:?} has switch settings (vlan, trunk, mac_limit, pmd) but is cross-connected"),
                    ));
                }
            }
            if let Some(pmd) = x.pmd {
                if pmd >= d.pmd_cpus.len().max(1) {
                    return Err(ConfigError::XConnect(
                        i,
                        format!("pmd {pmd} does not exist"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`, refusing multicast addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("mac {s:?} is not six colon-separated bytes"));
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("mac {s:?}: {p:?} is not hex"))?;
    }
    if m[0] & 1 != 0 {
        return Err(format!("mac {s:?} is a multicast address"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [dataplane]
        pmd_mode = "poll"
        [[port]]
        name = "vm1"
        type = "vhost-user"
        socket = "/tmp/vm1.sock"
        queues = 2
        mac = "52:54:00:00:00:01"
        [[port]]
        name = "tap0"
        type = "tap"
        ifname = "torii0"
        [[xconnect]]
        ports = ["vm1", "tap0"]
    "#;

    const SWITCHED: &str = r#"
        [dataplane]
        [[port]]
        name = "vm1"
        type = "vhost-user"
        socket = "/tmp/vm1.sock"
        vlan = 100
        mac_limit = 8
        [[port]]
        name = "up"
        type = "tap"
        ifname = "torii0"
        trunk = [100, 200]
        native_vlan = 0
    "#;

    #[test]
    fn switch_ports_take_vlan_settings() {
        use crate::switch::vlan::{VlanMode, VlanSet};
        let c = Config::parse(SWITCHED).unwrap();
        assert_eq!(
            c.ports[0].switch.vlan_mode(),
            VlanMode::Access { vlan: 100 }
        );
        assert_eq!(c.ports[0].switch.mac_limit, 8);
        assert_eq!(
            c.ports[1].switch.vlan_mode(),
            VlanMode::Trunk {
                allowed: VlanSet::new(&[100, 200]),
                native: Some(0)
            }
        );
        assert_eq!(c.switch.mac_table_size, 8192);
    }

    const DPDK: &str = r#"
        [dpdk]
        memory_mib = 256
        allow = ["0000:03:00.0"]
        [[port]]
        name = "memif"
        type = "dpdk"
        device = "net_memif0,role=server,socket=/run/m.sock"
        [[port]]
        name = "nic"
        type = "dpdk"
        device = "0000:03:00.0"
        queues = 4
    "#;

    #[test]
    fn dpdk_ports_and_eal_settings_are_checked() {
        let c = Config::parse(DPDK).unwrap();
        let PortKind::Dpdk(nic) = &c.ports[1].kind else {
            panic!("{:?}", c.ports[1].kind)
        };
        assert_eq!(
            (nic.queues, nic.rxq_size, nic.mtu, nic.lend_tx),
            (4, 1024, 1500, false)
        );
        assert_eq!(dpdk_device_name("net_memif0,role=server"), "net_memif0");
        let cases = [
            (
                DPDK.replace("net_memif0,", "vhost0,"),
                "neither a PCI address",
            ),
            (
                DPDK.replace("net_memif0,role=server", "net_memif0, role=server"),
                "not DPDK device arguments",
            ),
            (
                DPDK.replace(
                    "\"0000:03:00.0\"\n        queues",
                    "\"net_memif0\"\n        queues",
                ),
                "device net_memif0 used twice",
            ),
            (DPDK.replace("queues = 4", "queues = 17"), "queues 17"),
            (
                DPDK.replace("queues = 4", "rxq_size = 1000"),
                "rxq_size 1000 is not a power of two",
            ),
            (
                DPDK.replace("queues = 4", "txq_size = 8192"),
                "txq_size 8192",
            ),
            (DPDK.replace("queues = 4", "mtu = 9600"), "mtu 9600"),
            (DPDK.replace("queues = 4", "mbufs = 10"), "mbufs 10"),
            (
                DPDK.replace("queues = 4", "vlan = 5\nqueus = 1"),
                "unknown field `queus`",
            ),
            (
                DPDK.replace("memory_mib = 256", "memory_mib = 16"),
                "dpdk: memory_mib 16",
            ),
            (
                DPDK.replace("[\"0000:03:00.0\"]", "[\"eth0\"]"),
                "dpdk: allow: \"eth0\" is not a PCI address",
            ),
            (
                DPDK.replace("memory_mib = 256", "cpus = [64]"),
                "dpdk: cpus: CPU 64 does not exist",
            ),
            (
                DPDK.replace("memory_mib = 256", "lcores = 2"),
                "unknown field `lcores`",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn rate_limits_are_per_port_and_checked() {
        let c = Config::parse(&GOOD.replace(
            "queues = 2",
            "queues = 2\nrate_limit = { pps = 100000, bps = 1_000_000_000 }",
        ))
        .unwrap();
        let r = c.ports[0].rate_limit.unwrap();
        assert_eq!(
            (r.pps, r.bps, r.burst_packets),
            (Some(100_000), Some(1_000_000_000), None)
        );
        // Defaults: a PMD burst or 10 ms of the rate; 64 KiB or 10 ms of the rate.
        let d = r.resolved();
        assert_eq!(
            (d.burst_packets, d.burst_bytes),
            (Some(1000), Some(1_250_000))
        );
        let slow = RateLimitConfig {
            pps: Some(3000),
            bps: Some(50_000_000),
            ..Default::default()
        };
        let d = slow.resolved();
        assert_eq!((d.burst_packets, d.burst_bytes), (Some(32), Some(65536)));
        assert_eq!(
            RateLimitConfig {
                bps: Some(8000),
                ..Default::default()
            }
            .resolved()
            .burst_packets,
            None
        );
        // On a switch port too, beside its switch settings.
        let c = Config::parse(&SWITCHED.replace(
            "mac_limit = 8",
            "mac_limit = 8\nrate_limit = { bps = 50_000_000, burst_bytes = 9000 }",
        ))
        .unwrap();
        assert_eq!(c.ports[0].rate_limit.unwrap().burst_bytes, Some(9000));
        assert_eq!(c.ports[1].rate_limit, None);
        let with = |rl: &str| GOOD.replace("queues = 2", &format!("queues = 2\nrate_limit = {rl}"));
        let cases = [
            ("{}", "port \"vm1\": rate_limit: neither pps nor bps is set"),
            ("{ pps = 0 }", "rate_limit: pps 0 would stop the port"),
            ("{ bps = 0 }", "rate_limit: bps 0 would stop the port"),
            (
                "{ pps = 1_000_000_001 }",
                "pps 1000000001 is above 1000000000",
            ),
            ("{ bps = 999 }", "bps 999 is below 1000"),
            ("{ bps = 2_000_000_000_000 }", "bps 2000000000000 is above"),
            ("{ pps = -5 }", "rate_limit: invalid value: integer `-5`"),
            ("{ pps = 1e6 }", "rate_limit: invalid type: floating point"),
            (
                "{ pps = 10, burst_packets = 0 }",
                "burst_packets 0 is outside 1..=",
            ),
            (
                "{ bps = 10000, burst_packets = 5 }",
                "burst_packets needs pps",
            ),
            ("{ pps = 10, burst_bytes = 5000 }", "burst_bytes needs bps"),
            (
                "{ bps = 10000, burst_bytes = 10 }",
                "burst_bytes 10 is outside 64..=",
            ),
            ("{ pps = 10, ppps = 5 }", "rate_limit: unknown field `ppps`"),
            ("100", "rate_limit: invalid type: integer `100`"),
        ];
        for (rl, want) in cases {
            let e = Config::parse(&with(rl)).unwrap_err().to_string();
            assert!(e.contains(want), "{rl}: {e:?} should mention {want:?}");
        }
    }

    #[test]
    fn accepts_a_good_config() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.dataplane.pmd_mode, PmdMode::Poll);
    }

    #[test]
    fn rejects_bad_configs_with_the_reason() {
        let cases = [
            (GOOD.replace("queues = 2", "queues = 0"), "queues 0"),
            (
                GOOD.replace("\"tap0\"]", "\"nope\"]"),
                "unknown port \"nope\"",
            ),
            (GOOD.replace("52:54", "53:54"), "multicast"),
            (GOOD.replace("torii0", "a/b"), "not a valid interface name"),
            (
                GOOD.replace("name = \"tap0\"", "name = \"vm1\""),
                "duplicate port name",
            ),
            (
                GOOD.replace("type = \"tap\"", "type = \"tapx\""),
                "unknown variant",
            ),
            (GOOD.replace("pmd_mode", "pmd_mood"), "unknown field"),
            (
                GOOD.replace("queues = 2", "queus = 2"),
                "unknown field `queus`",
            ),
            (
                GOOD.replace("[\"vm1\", \"tap0\"]", "[\"vm1\", \"vm1\"]"),
                "itself",
            ),
            (
                GOOD.replace("queues = 2", "queues = 2\nvlan = 10"),
                "has switch settings",
            ),
            (
                SWITCHED.replace("vlan = 100", "vlan = 4095"),
                "vlan 4095 is outside",
            ),
            (
                SWITCHED.replace("vlan = 100", "vlan = 100\ntrunk = [1]"),
                "exclude each other",
            ),
            (
                SWITCHED.replace("trunk = [100, 200]", "trunk = []"),
                "lists no VLAN",
            ),
            (
                SWITCHED.replace("vlan = 100", "vlan = 100\nnative_vlan = 5"),
                "native_vlan needs trunk",
            ),
            (
                SWITCHED.replace("vlan = 100", "vlan = \"x\""),
                "invalid type",
            ),
            (
                SWITCHED.replace("vlan = 100", "vlna = 100"),
                "unknown field `vlna`",
            ),
            (
                SWITCHED.replace("mac_limit = 8", "mac_limit = 8\npmd = 3"),
                "pmd 3 does not exist",
            ),
            (
                SWITCHED.replace("[dataplane]", "[switch]\nmac_table_size = 0\n[dataplane]"),
                "mac_table_size 0",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }
}
