//! The sandbox spec (TOML or JSON): what a pod VM is made of, and [`Sandbox`], the same checked
//! whole and resolved (torii-cni's pod network files read, VFIO devices found in sysfs, PCI slots
//! given out) before anything is started.
//!
//! ```toml
//! name = "pod1"
//! hypervisor = "qemu"            # qemu | cloud-hypervisor | firecracker
//! netns = "/run/netns/pod1"      # optional: the VMM runs in the pod's network namespace
//!
//! [vm]
//! vcpus = 2
//! pin = [0, 1]                   # optional: the host CPU of each vCPU
//! memory_mib = 512
//! hugepages = false              # guest RAM from 2 MiB hugepages instead of memfd (both shared)
//! kernel = "/var/cache/torii/image/vmlinuz"
//! initramfs = "/var/cache/torii/image/initramfs.cpio.gz"
//! accel = "auto"                 # auto (KVM when /dev/kvm exists) | kvm | tcg
//!
//! [[interface]]
//! type = "pod-network"           # torii-cni's pod network file (vhost-user or tap)
//! file = "/run/torii/pods/<container>/eth0.json"
//!
//! [[interface]]
//! type = "vhost-user"            # or "tap" (tap = NAME) or "vfio" (pci = ADDR)
//! socket = "/run/torii/pod1-net1.sock"
//! mac = "52:54:00:00:00:02"
//! queues = 2
//! name = "net1"
//! addresses = ["10.1.0.2/24"]
//! routes = [{ dest = "10.2.0.0/16", gateway = "10.1.0.1" }]
//!
//! [[disk]]
//! socket = "/run/torii/pod1-disk.sock"
//! mount = "/data"                # optional: mounted by the agent
//! fstype = "ext4"
//!
//! [[neighbor]]
//! ip = "10.1.0.3"
//! mac = "52:54:00:00:00:03"
//! device = "net1"
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A spec that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    #[default]
    Qemu,
    CloudHypervisor,
    Firecracker,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The default guest image folder (`toriictl image build`'s default output).
pub const DEFAULT_IMAGE_DIR: &str = "/var/cache/torii/image";

/// The sandbox spec as written.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    pub name: String,
    #[serde(default)]
    pub hypervisor: HypervisorKind,
    /// The pod's network namespace: the VMM runs in it (a tap interface lives there).
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub vm: VmSpec,
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<InterfaceSpec>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSpec>,
    #[serde(default, rename = "neighbor")]
    pub neighbors: Vec<NeighborSpec>,
    #[serde(default)]
    pub agent: AgentSpec,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSpec {
    pub vcpus: u32,
    pub pin: Vec<usize>,
    pub memory_mib: u32,
    pub hugepages: bool,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Added to the kernel command line.
    pub cmdline: String,
    pub accel: Accel,
    /// The VMM binary (default: the hypervisor's usual name, looked up in PATH).
    pub binary: Option<PathBuf>,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            vcpus: 1,
            pin: Vec::new(),
            memory_mib: 256,
            hugepages: false,
            kernel: Path::new(DEFAULT_IMAGE_DIR).join("vmlinuz"),
            initramfs: Path::new(DEFAULT_IMAGE_DIR).join("initramfs.cpio.gz"),
            cmdline: String::new(),
            accel: Accel::Auto,
            binary: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterfaceKind {
    PodNetwork,
    VhostUser,
    Tap,
    Vfio,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSpec {
    #[serde(rename = "type")]
    pub kind: InterfaceKind,
    /// pod-network: torii-cni's pod network file.
    pub file: Option<PathBuf>,
    /// vhost-user: the backend's socket (the backend listens).
    pub socket: Option<PathBuf>,
    /// tap: the tap's name (in `netns`).
    pub tap: Option<String>,
    /// vfio: the PCI address of a device bound to vfio-pci.
    pub pci: Option<String>,
    pub mac: Option<String>,
    pub queues: Option<u16>,
    pub mtu: Option<u32>,
    /// The interface's name in the guest.
    pub name: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// From a tap's pod network file: the namespace its tap is in.
    #[serde(skip)]
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// `default` or a prefix.
    pub dest: String,
    pub gateway: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// A vhost-user-blk backend's socket (torii-vhost-user-blk, torii-dataplane's disks).
    pub socket: PathBuf,
    #[serde(default = "one")]
    pub queues: u16,
    /// Where the agent mounts it in the guest.
    pub mount: Option<String>,
    #[serde(default = "ext4")]
    pub fstype: String,
    #[serde(default)]
    pub options: String,
    #[serde(default)]
    pub read_only: bool,
}

impl DiskSpec {
    /// The disk in guest PCI slot `slot`, checked (errors start with the field: `.queues: …`).
    pub fn resolve(&self, slot: u8) -> Result<Disk, String> {
        if self.queues == 0 || self.queues > 64 {
            return Err(format!(".queues: {} is not in 1..=64", self.queues));
        }
        if let Some(m) = &self.mount {
            if !m.starts_with('/') || m.contains('\0') || m.split('/').any(|c| c == "..") {
                return Err(format!(".mount: {m:?} is not an absolute path"));
            }
        }
        if self.fstype.is_empty() || !self.fstype.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                ".fstype: {:?} is not a file system type",
                self.fstype
            ));
        }
        Ok(Disk {
            socket: self.socket.clone(),
            queues: self.queues,
            mount: self.mount.clone(),
            fstype: self.fstype.clone(),
            options: self.options.clone(),
            read_only: self.read_only,
            slot,
        })
    }
}

/// The first disk slot none of `taken` holds.
pub fn free_disk_slot(taken: &[u8]) -> Option<u8> {
    DISK_SLOTS.clone().find(|s| !taken.contains(s))
}

/// Checks that a vhost-user backend listens on `socket`: a connection is made (and closed
/// at once, which backends take as a frontend that went away). A socket file left by a backend
/// that is gone passes [`Sandbox::check_backends`] but not this; a VMM told to hot-plug a disk
/// whose backend does not listen may wait for it without end.
pub fn check_backend_socket(socket: &Path) -> Result<(), SpecError> {
    check_socket(socket).map_err(SpecError)?;
    std::os::unix::net::UnixStream::connect(socket)
        .map(drop)
        .map_err(|e| {
            SpecError(format!(
                "{}: {e} (no vhost-user backend listens on it)",
                socket.display()
            ))
        })
}

fn one() -> u16 {
    1
}

fn ext4() -> String {
    "ext4".into()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighborSpec {
    pub ip: String,
    pub mac: String,
    pub device: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSpec {
    /// The virtio-serial port's name (QEMU), or the vsock port (Cloud Hypervisor, Firecracker).
    pub port: String,
    pub vsock_port: u32,
    /// How long the guest may take from launch to the agent's first answer.
    pub timeout_s: u64,
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            port: "agent.0".into(),
            vsock_port: 1024,
            timeout_s: 120,
        }
    }
}

/// How the guest reaches a NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Backend {
    VhostUser { socket: PathBuf },
    Tap { ifname: String },
    Vfio { addr: String, group: PathBuf },
}

/// One NIC, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub backend: Backend,
    pub mac: Option<String>,
    pub queues: u16,
    pub mtu: Option<u32>,
    pub name: String,
    pub addresses: Vec<String>,
    pub routes: Vec<RouteSpec>,
    /// The guest PCI slot on bus 0.
    pub slot: u8,
    /// The network namespace the backend is in (a tap from torii-cni's tap mode).
    #[serde(skip)]
    pub netns: Option<PathBuf>,
}

/// One disk, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Disk {
    pub socket: PathBuf,
    pub queues: u16,
    pub mount: Option<String>,
    pub fstype: String,
    pub options: String,
    pub read_only: bool,
    pub slot: u8,
}

impl Disk {
    /// The disk's PCI address in the guest, by which the agent finds it.
    pub fn guest_pci(&self) -> String {
        format!("0000:00:{:02x}.0", self.slot)
    }
}

/// The guest PCI slot of the agent's virtio-serial controller.
pub const AGENT_SLOT: u8 = 0x03;
const NIC_SLOTS: std::ops::Range<u8> = 0x04..0x10;
const DISK_SLOTS: std::ops::Range<u8> = 0x10..0x1f;

/// A spec checked whole and resolved.
#[derive(Clone, Debug, Serialize)]
pub struct Sandbox {
    pub name: String,
    pub hypervisor: HypervisorKind,
    pub netns: Option<PathBuf>,
    pub vm: VmSpec,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    pub neighbors: Vec<NeighborSpec>,
    pub agent: AgentSpec,
}

impl Sandbox {
    /// What must hold when the VM starts, not when the spec is written: every vhost-user
    /// backend listens on its socket already (the VMM connects at start).
    pub fn check_backends(&self) -> Result<(), SpecError> {
        for (i, n) in self.nics.iter().enumerate() {
            if let Backend::VhostUser { socket } = &n.backend {
                check_socket(socket).map_err(|e| SpecError(format!("interface[{i}]: {e}")))?;
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            check_socket(&d.socket).map_err(|e| SpecError(format!("disk[{i}]: {e}")))?;
        }
        Ok(())
    }
}

impl SandboxSpec {
    /// Reads a spec: JSON when the file ends in `.json`, else TOML.
    pub fn load(path: &Path) -> Result<SandboxSpec, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError(format!("{}: {e}", path.display())))?;
        let r = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        r.map_err(|e| SpecError(format!("{}: {e}", path.display())))
    }

    /// Checks everything and resolves the interfaces, using `sys` for VFIO devices.
    pub fn resolve(&self, sys: &torii_vfio::pci::Sysfs) -> Result<Sandbox, SpecError> {
        check_name("name", &self.name)?;
        let vm = &self.vm;
        if vm.vcpus == 0 || vm.vcpus > 64 {
            return err(format!("vm.vcpus: {} is not in 1..=64", vm.vcpus));
        }
        if !vm.pin.is_empty() && vm.pin.len() != vm.vcpus as usize {
            return err(format!(
                "vm.pin: {} host CPUs for {} vCPUs (give one per vCPU, or none)",
                vm.pin.len(),
                vm.vcpus
            ));
        }
        if let Some(c) = vm.pin.iter().find(|&&c| !host_cpu_usable(c)) {
            return err(format!(
                "vm.pin: host CPU {c} is not one this process may run on"
            ));
        }
        if vm.memory_mib < 64 || vm.memory_mib > 1 << 20 {
            return err(format!(
                "vm.memory_mib: {} is not in 64..=1048576",
                vm.memory_mib
            ));
        }
        if vm.hugepages && !vm.memory_mib.is_multiple_of(2) {
            return err("vm.memory_mib: must be a multiple of 2 with hugepages");
        }
        for (what, p) in [("vm.kernel", &vm.kernel), ("vm.initramfs", &vm.initramfs)] {
            if !p.is_file() {
                return err(format!(
                    "{what}: {} is not a file (build the guest image: toriictl image build)",
                    p.display()
                ));
            }
        }
        if vm.cmdline.contains('\n') {
            return err("vm.cmdline: holds a newline");
        }
        if let Some(ns) = &self.netns {
            if !ns.exists() {
                return err(format!("netns: {} does not exist", ns.display()));
            }
        }
        if self.agent.port.is_empty()
            || self.agent.port.len() > 64
            || !self
                .agent
                .port
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return err(format!(
                "agent.port: {:?} is not a port name",
                self.agent.port
            ));
        }
        if self.agent.timeout_s == 0 {
            return err("agent.timeout_s: must be positive");
        }

        let mut nics = Vec::new();
        for (i, s) in self.interfaces.iter().enumerate() {
            let what = format!("interface[{i}]");
            let slot = NIC_SLOTS.clone().nth(i).ok_or_else(|| {
                SpecError(format!("{what}: at most {} interfaces", NIC_SLOTS.len()))
            })?;
            let mut nic =
                resolve_nic(s, i, slot, sys).map_err(|e| SpecError(format!("{what}: {e}")))?;
            if nic.mac.is_none() && !matches!(nic.backend, Backend::Vfio { .. }) {
                nic.mac = Some(derived_mac(&self.name, i));
            }
            if nics.iter().any(|n: &Nic| n.name == nic.name) {
                return err(format!("{what}: guest name {} is used twice", nic.name));
            }
            if nic.mac.is_some() && nics.iter().any(|n: &Nic| n.mac == nic.mac) {
                return err(format!(
                    "{what}: MAC {} is used twice",
                    nic.mac.as_deref().unwrap_or("")
                ));
            }
            nics.push(nic);
        }
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let what = format!("disk[{i}]");
            let slot = DISK_SLOTS
                .clone()
                .nth(i)
                .ok_or_else(|| SpecError(format!("{what}: at most {} disks", DISK_SLOTS.len())))?;
            disks.push(
                d.resolve(slot)
                    .map_err(|e| SpecError(format!("{what}{e}")))?,
            );
        }
        for (i, n) in self.neighbors.iter().enumerate() {
            n.ip.parse::<IpAddr>()
                .map_err(|_| SpecError(format!("neighbor[{i}].ip: {:?} is not an IP", n.ip)))?;
            parse_mac(&n.mac).map_err(|e| SpecError(format!("neighbor[{i}].mac: {e}")))?;
            if !nics.iter().any(|x| x.name == n.device) {
                return err(format!(
                    "neighbor[{i}].device: no interface named {}",
                    n.device
                ));
            }
        }
        // The VMM opens taps in their namespace: the spec's, or the one torii-cni's tap mode
        // made them in (all the same).
        let mut netns = self.netns.clone();
        for (i, n) in nics.iter().enumerate() {
            match (&netns, &n.netns) {
                (_, None) => {}
                (None, Some(ns)) => netns = Some(ns.clone()),
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => {
                    return err(format!(
                        "interface[{i}]: its tap is in {}, the VMM runs in {}",
                        b.display(),
                        a.display()
                    ))
                }
            }
        }
        Ok(Sandbox {
            name: self.name.clone(),
            hypervisor: self.hypervisor,
            netns,
            vm: vm.clone(),
            nics,
            disks,
            neighbors: self.neighbors.clone(),
            agent: self.agent.clone(),
        })
    }
}

fn check_name(what: &str, s: &str) -> Result<(), SpecError> {
    // It names the pod's folder: `.`, `..` and hidden names are not pods.
    if s.is_empty()
        || s.len() > 64
        || s.starts_with('.')
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return err(format!(
            "{what}: {s:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        ));
    }
    Ok(())
}

/// Whether this process may run on host CPU `cpu` (its affinity mask, which also leaves out
/// CPUs that do not exist).
fn host_cpu_usable(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: as above; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 || cpu >= 8 * size {
        return false;
    }
    // SAFETY: `cpu` is inside the set (checked above).
    unsafe { libc::CPU_ISSET(cpu, &set) }
}

/// A stable, locally administered unicast MAC for interface `index` of pod `name`: two pods
/// without configured MACs never share QEMU's default one.
pub fn derived_mac(name: &str, index: usize) -> String {
    // FNV-1a over the name and the index.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes().chain((index as u64).to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    let b = h.to_le_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// Parses a unicast MAC `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address"));
    }
    for (o, p) in m.iter_mut().zip(&parts) {
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a MAC address"));
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    if m[0] & 1 != 0 || m == [0; 6] {
        return Err(format!("{s} is not a unicast address"));
    }
    Ok(m)
}

fn check_prefix(s: &str) -> Result<(), String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("{s:?}: bad address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{s:?}: bad prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{s:?}: prefix length over {max}"));
    }
    Ok(())
}

fn check_route(r: &RouteSpec) -> Result<(), String> {
    if r.dest != "default" {
        check_prefix(&r.dest)?;
    }
    if let Some(g) = &r.gateway {
        g.parse::<IpAddr>()
            .map_err(|_| format!("route gateway {g:?} is not an IP"))?;
    }
    Ok(())
}

/// A vhost-user backend listens on `p` already (the VMM connects at start).
fn check_socket(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(p) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(format!("{} is not a socket", p.display())),
        Err(e) => Err(format!(
            "{}: {e} (is the vhost-user backend serving it?)",
            p.display()
        )),
    }
}

fn only(kind: &str, fields: &[(&str, bool)]) -> Result<(), String> {
    match fields.iter().find(|(_, set)| *set) {
        Some((f, _)) => Err(format!("`{f}` does not apply to a {kind} interface")),
        None => Ok(()),
    }
}

fn resolve_nic(
    s: &InterfaceSpec,
    index: usize,
    slot: u8,
    sys: &torii_vfio::pci::Sysfs,
) -> Result<Nic, String> {
    let mut s = s.clone();
    if s.kind == InterfaceKind::PodNetwork {
        let file = s
            .file
            .clone()
            .ok_or("a pod-network interface needs `file`")?;
        only(
            "pod-network",
            &[
                ("socket", s.socket.is_some()),
                ("tap", s.tap.is_some()),
                ("pci", s.pci.is_some()),
                ("mac", s.mac.is_some()),
                ("queues", s.queues.is_some()),
                ("mtu", s.mtu.is_some()),
                ("addresses", !s.addresses.is_empty()),
                ("routes", !s.routes.is_empty()),
            ],
        )?;
        let name = s.name.take();
        s = from_pod_network(&file)?;
        if name.is_some() {
            s.name = name;
        }
    } else if s.file.is_some() {
        return Err("`file` is only for a pod-network interface".into());
    }
    let backend = match s.kind {
        InterfaceKind::VhostUser => {
            only(
                "vhost-user",
                &[("tap", s.tap.is_some()), ("pci", s.pci.is_some())],
            )?;
            let socket = s
                .socket
                .clone()
                .ok_or("a vhost-user interface needs `socket`")?;
            Backend::VhostUser { socket }
        }
        InterfaceKind::Tap => {
            only(
                "tap",
                &[("socket", s.socket.is_some()), ("pci", s.pci.is_some())],
            )?;
            let ifname = s.tap.clone().ok_or("a tap interface needs `tap`")?;
            if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '\0', ',']) {
                return Err(format!("tap {ifname:?} is not an interface name"));
            }
            Backend::Tap { ifname }
        }
        InterfaceKind::Vfio => {
            only(
                "vfio",
                &[
                    ("socket", s.socket.is_some()),
                    ("tap", s.tap.is_some()),
                    ("queues", s.queues.is_some()),
                    ("mtu", s.mtu.is_some()),
                ],
            )?;
            let pci = s.pci.clone().ok_or("a vfio interface needs `pci`")?;
            let addr = pci.parse().map_err(|e| format!("pci {pci:?}: {e}"))?;
            let spec = torii_vfio::bind::passthrough_spec(sys, addr)
                .map_err(|e| format!("pci {pci}: {e}"))?;
            Backend::Vfio {
                addr: spec.addr.to_string(),
                group: spec.group_path,
            }
        }
        InterfaceKind::PodNetwork => return Err("a pod network file names a pod network".into()),
    };
    if let Some(m) = &s.mac {
        parse_mac(m)?;
    }
    let queues = s.queues.unwrap_or(1);
    if queues == 0 || queues > 16 {
        return Err(format!("queues: {queues} is not in 1..=16"));
    }
    if let Some(mtu) = s.mtu {
        if !(68..=65535).contains(&mtu) {
            return Err(format!("mtu: {mtu} is not in 68..=65535"));
        }
    }
    let name = s.name.clone().unwrap_or_else(|| format!("eth{index}"));
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0', ':']) {
        return Err(format!("name {name:?} is not an interface name"));
    }
    for a in &s.addresses {
        check_prefix(a)?;
    }
    for r in &s.routes {
        check_route(r)?;
    }
    if (!s.addresses.is_empty() || !s.routes.is_empty() || s.mtu.is_some()) && s.mac.is_none() {
        return Err("the agent finds the interface by its MAC: give `mac` to configure it".into());
    }
    Ok(Nic {
        backend,
        mac: s.mac.clone(),
        queues,
        mtu: s.mtu,
        name,
        addresses: s.addresses.clone(),
        routes: s.routes.clone(),
        slot,
        netns: s.netns.clone(),
    })
}

/// Reads torii-cni's pod network file (vhost-user or tap) as an interface spec.
pub fn from_pod_network(file: &Path) -> Result<InterfaceSpec, String> {
    let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let bad = |what: &str| format!("{}: {what}", file.display());
    let s = |k: &str| v[k].as_str().map(str::to_string);
    let kind = match v["type"].as_str() {
        Some("vhost-user") => InterfaceKind::VhostUser,
        Some("tap") => InterfaceKind::Tap,
        other => return Err(bad(&format!("type {other:?} is not vhost-user or tap"))),
    };
    let mut addresses = Vec::new();
    let mut gateways: Vec<IpAddr> = Vec::new();
    for ip in v["ips"].as_array().into_iter().flatten() {
        let a = ip["address"]
            .as_str()
            .ok_or_else(|| bad("an ip without address"))?;
        addresses.push(a.to_string());
        if let Some(g) = ip["gateway"].as_str() {
            gateways.push(g.parse().map_err(|_| bad(&format!("gateway {g:?}")))?);
        }
    }
    let mut routes = Vec::new();
    for r in v["routes"].as_array().into_iter().flatten() {
        let dst = r["dst"]
            .as_str()
            .ok_or_else(|| bad("a route without dst"))?;
        let dst_ip: IpAddr = dst
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| bad(&format!("route dst {dst:?}")))?;
        // A CNI route without gw goes through the interface's gateway of its family.
        let gateway = match r["gw"].as_str() {
            Some(g) => Some(g.to_string()),
            None => gateways
                .iter()
                .find(|g| g.is_ipv4() == dst_ip.is_ipv4())
                .map(|g| g.to_string()),
        };
        let dest = if dst == "0.0.0.0/0" || dst == "::/0" {
            if dst_ip.is_ipv4() {
                "default".to_string()
            } else {
                "::/0".to_string()
            }
        } else {
            dst.to_string()
        };
        routes.push(RouteSpec { dest, gateway });
    }
    Ok(InterfaceSpec {
        kind,
        file: None,
        socket: s("socket").map(PathBuf::from),
        tap: if kind == InterfaceKind::Tap {
            s("tap")
        } else {
            None
        },
        pci: None,
        mac: s("mac"),
        queues: v["queues"].as_u64().map(|q| q.min(u16::MAX as u64) as u16),
        mtu: v["mtu"].as_u64().map(|m| m.min(u32::MAX as u64) as u32),
        name: s("ifname"),
        addresses,
        routes,
        netns: if kind == InterfaceKind::Tap {
            s("netns").map(PathBuf::from)
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("torii-spec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vmlinuz"), b"k").unwrap();
        std::fs::write(d.join("initrd"), b"i").unwrap();
        Dir(d)
    }

    fn resolve(d: &Dir, body: &str) -> Result<Sandbox, SpecError> {
        resolve_with(d, "p", "", body)
    }

    /// A spec named `name`, with `vm` lines in its [vm] table and `body` after it.
    fn resolve_with(d: &Dir, name: &str, vm: &str, body: &str) -> Result<Sandbox, SpecError> {
        let text = format!(
            "name = \"{name}\"\n[vm]\n{vm}kernel = \"{0}/vmlinuz\"\ninitramfs = \"{0}/initrd\"\n{body}",
            d.0.display()
        );
        let p = d.0.join("spec.toml");
        std::fs::write(&p, text).unwrap();
        SandboxSpec::load(&p)?.resolve(&torii_vfio::pci::Sysfs::new(d.0.join("nosys")))
    }

    #[test]
    fn a_cni_pod_network_file_becomes_an_interface() {
        let d = dir("cni");
        std::fs::write(
            d.0.join("eth0.json"),
            r#"{"ifname": "eth0", "type": "vhost-user", "socket": "/run/torii/pods/c1/eth0.sock",
                "mode": "client", "mac": "02:00:00:aa:bb:01", "mtu": 1500, "queues": 2,
                "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
                        {"address": "fd00::5/64", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.9"}],
                "dns": {}}"#,
        )
        .unwrap();
        let sb = resolve(
            &d,
            &format!(
                "[[interface]]\ntype = \"pod-network\"\nfile = \"{}/eth0.json\"\n",
                d.0.display()
            ),
        )
        .unwrap();
        let n = &sb.nics[0];
        assert_eq!(
            n.backend,
            Backend::VhostUser {
                socket: "/run/torii/pods/c1/eth0.sock".into()
            }
        );
        assert_eq!((n.name.as_str(), n.queues, n.mtu), ("eth0", 2, Some(1500)));
        assert_eq!(n.addresses, ["10.1.0.5/24", "fd00::5/64"]);
        // A route without gw goes through the interface's gateway of its family.
        assert_eq!(
            n.routes,
            [
                RouteSpec {
                    dest: "default".into(),
                    gateway: Some("10.1.0.1".into())
                },
                RouteSpec {
                    dest: "10.9.0.0/16".into(),
                    gateway: Some("10.1.0.9".into())
                },
            ]
        );
        assert_eq!(n.slot, 4);
    }

    #[test]
    fn a_tap_pod_network_file_brings_its_namespace() {
        let d = dir("tapns");
        std::fs::create_dir_all(d.0.join("ns")).unwrap();
        let ns = d.0.join("ns/pod");
        std::fs::write(&ns, b"").unwrap();
        std::fs::write(
            d.0.join("net1.json"),
            format!(
                r#"{{"ifname": "net1", "type": "tap", "tap": "net1", "netns": "{}",
                    "mac": "02:00:00:aa:bb:02", "mtu": null, "queues": 2, "ips": [], "routes": []}}"#,
                ns.display()
            ),
        )
        .unwrap();
        let iface = format!(
            "[[interface]]\ntype = \"pod-network\"\nfile = \"{}/net1.json\"\n",
            d.0.display()
        );
        let sb = resolve(&d, &iface).unwrap();
        assert_eq!(sb.netns.as_deref(), Some(ns.as_path()));
        assert_eq!(
            sb.nics[0].backend,
            Backend::Tap {
                ifname: "net1".into()
            }
        );
        // A spec naming another namespace for the VMM is refused.
        let other = d.0.join("ns/other");
        std::fs::write(&other, b"").unwrap();
        let e = resolve(&d, &iface)
            .and_then(|_| {
                let text = format!(
                    "name = \"p\"\nnetns = \"{}\"\n[vm]\nkernel = \"{1}/vmlinuz\"\ninitramfs = \"{1}/initrd\"\n{iface}",
                    other.display(),
                    d.0.display()
                );
                std::fs::write(d.0.join("o.toml"), text).unwrap();
                SandboxSpec::load(&d.0.join("o.toml"))?.resolve(&torii_vfio::pci::Sysfs::default())
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("its tap is in"), "{e}");
    }

    #[test]
    fn bad_specs_are_refused_with_the_field_named() {
        let d = dir("bad");
        let cases = [
            ("[vm]\n", "duplicate key"), // a second [vm] table is a TOML error
            ("bogus = 1\n", "unknown field"),
            ("[[interface]]\ntype = \"vhost-user\"\n", "needs `socket`"),
            ("[[interface]]\ntype = \"tap\"\ntap = \"t0\"\nsocket = \"/x\"\n", "`socket` does not apply"),
            ("[[interface]]\ntype = \"vhost-user\"\nsocket = \"/x\"\naddresses = [\"10.0.0.1/24\"]\n", "give `mac`"),
            ("[[interface]]\ntype = \"vhost-user\"\nsocket = \"/x\"\nmac = \"01:00:00:00:00:01\"\n", "unicast"),
            ("[[interface]]\ntype = \"vhost-user\"\nsocket = \"/x\"\nmac = \"02:00:00:00:00:01\"\naddresses = [\"10.0.0.1/33\"]\n", "prefix length"),
            ("[[interface]]\ntype = \"vhost-user\"\nsocket = \"/x\"\nqueues = 0\n", "queues"),
            ("[[interface]]\ntype = \"vfio\"\npci = \"0000:00:01.0\"\n", "pci 0000:00:01.0"),
            ("[[interface]]\ntype = \"pod-network\"\nfile = \"/nonexistent.json\"\n", "nonexistent"),
            ("[[disk]]\nsocket = \"/x\"\nmount = \"data\"\n", "disk[0].mount"),
            ("[[disk]]\nsocket = \"/x\"\nfstype = \"ext4,foo\"\n", "fstype"),
            ("[[neighbor]]\nip = \"10.0.0.1\"\nmac = \"02:00:00:00:00:01\"\ndevice = \"eth0\"\n", "no interface named eth0"),
            ("[agent]\nport = \"a b\"\n", "agent.port"),
            ("[[interface]]\ntype = \"vhost-user\"\nsocket = \"/x\"\nmac = \"+2:00:00:00:00:01\"\n", "not a MAC"),
        ];
        for (body, want) in cases {
            let e = resolve(&d, body).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: {e}");
        }
        let e = resolve_with(&d, "p", "vcpus = 2\npin = [0]\n", "").unwrap_err();
        assert!(e.to_string().contains("vm.pin"), "{e}");
        let e = resolve_with(&d, "p", "pin = [1000]\n", "").unwrap_err();
        assert!(e.to_string().contains("host CPU 1000"), "{e}");
        let e = resolve(&d, "").map(|_| ()).and_then(|_| {
            let p = d.0.join("nokernel.toml");
            std::fs::write(&p, "name = \"p\"\n[vm]\nkernel = \"/nonexistent\"\n").unwrap();
            SandboxSpec::load(&p)?
                .resolve(&torii_vfio::pci::Sysfs::default())
                .map(|_| ())
        });
        assert!(e.unwrap_err().to_string().contains("toriictl image build"));
    }

    #[test]
    fn pod_names_cannot_climb_out_of_the_run_folder() {
        let d = dir("names");
        for name in [".", "..", ".hidden", "a/b", ""] {
            let e = resolve_with(&d, name, "", "").unwrap_err().to_string();
            assert!(e.starts_with("name:"), "{name:?}: {e}");
        }
    }

    #[test]
    fn a_missing_backend_socket_is_named_before_launch_and_macs_are_given() {
        let d = dir("sock");
        let sb = resolve(
            &d,
            "[[interface]]\ntype = \"vhost-user\"\nsocket = \"/nonexistent.sock\"\n\
             [[interface]]\ntype = \"tap\"\ntap = \"t0\"\n",
        )
        .unwrap();
        let e = sb.check_backends().unwrap_err().to_string();
        assert!(
            e.contains("interface[0]") && e.contains("/nonexistent.sock"),
            "{e}"
        );
        // Interfaces without a MAC get a stable, locally administered one each.
        let (a, b) = (
            sb.nics[0].mac.clone().unwrap(),
            sb.nics[1].mac.clone().unwrap(),
        );
        assert_ne!(a, b);
        assert!(a.starts_with("02:"), "{a}");
        assert_eq!(a, derived_mac("p", 0));
        parse_mac(&a).unwrap();
    }

    #[test]
    fn names_and_macs_are_unique_and_slots_run_out_clearly() {
        let d = dir("uniq");
        let two = "[[interface]]\ntype = \"vhost-user\"\nsocket = \"/a\"\nmac = \"02:00:00:00:00:01\"\n\
                   [[interface]]\ntype = \"vhost-user\"\nsocket = \"/b\"\nmac = \"02:00:00:00:00:01\"\n";
        assert!(resolve(&d, two)
            .unwrap_err()
            .to_string()
            .contains("used twice"));
        let many = "[[interface]]\ntype = \"vhost-user\"\nsocket = \"/a\"\n".repeat(13);
        assert!(resolve(&d, &many)
            .unwrap_err()
            .to_string()
            .contains("at most 12"));
        let sb = resolve(&d, &"[[disk]]\nsocket = \"/d\"\n".repeat(2)).unwrap();
        assert_eq!(sb.disks[1].guest_pci(), "0000:00:11.0");
    }
}
