//! Cloud Hypervisor and Firecracker cannot run on a machine without KVM, so their API requests
//! are not run here: every request Torii generates for them is checked against the VMMs'
//! documented API schemas instead, and the HTTP client and hybrid vsock handshake against small
//! fake servers.
//!
//! The schema objects are mirrored below as serde structs (every documented property, its type,
//! required or not, enums with their documented values; `deny_unknown_fields`), so a body with
//! an unknown or misspelt field, a wrong type, a missing required field or an undocumented enum
//! value does not deserialize. Constraints the schemas (and the VMMs' validation code) document
//! beyond types are checked on the parsed values. Sources:
//!
//! - Cloud Hypervisor: `vmm/src/api/openapi/cloud-hypervisor.yaml` of cloud-hypervisor/
//!   cloud-hypervisor v53.0 (9ed824d6d08df3e96f7d5f50795d9449ac99f431); the objects used here
//!   are the same on main at ae44c2971c83dd2b1bd704fa81102ec0dec4e7d4. Constraints from
//!   `VmConfig::validate` and friends in `vmm/src/config.rs` of the same commits.
//! - Firecracker: `src/firecracker/swagger/firecracker.yaml` of firecracker-microvm/firecracker
//!   v1.16.1 (2038188f145fb81b8d098147a10e9d9f392fd22f); main at
//!   81b38b9dad6056d7a48073e95ac5a9aed51cb2ab only adds `Transparent` to `huge_pages`.
//!   Constraints from `src/vmm/src/vmm_config/` and the API parsers in
//!   `src/firecracker/src/api_server/request/` of v1.16.1.
//! - Both serve their API with firecracker-microvm/micro-http (main at
//!   7975fe0e59000e8c41cb1d58fbd39ffa102e5b27): a 204 answer has no Content-Length and the
//!   connection is kept open; the fake API server below answers the same way.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use torii_runtime::cloud_hypervisor::{self as ch_gen, Paths};
use torii_runtime::firecracker as fc_gen;
use torii_runtime::http::{self, Request};
use torii_runtime::spec::{Sandbox, SandboxSpec};
use torii_vfio::fake::FakeTree;

/// A schema object Torii never sends: it is not mirrored, and a body that holds it fails (mirror
/// it before generating it).
#[derive(Debug)]
pub struct NotMirrored;

impl<'de> Deserialize<'de> for NotMirrored {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "a schema object Torii does not generate (not mirrored in this test)",
        ))
    }
}

/// Cloud Hypervisor's schema objects (`components/schemas` of cloud-hypervisor.yaml, v53.0).
/// `integer` without a format is i64; where the VMM's own config struct is narrower (its serde
/// parse is what answers the request) that type is used and named.
// The mirrors' fields are there to be deserialized: an unread field still checks its type.
#[allow(dead_code)]
mod ch {
    use super::NotMirrored;
    use serde::Deserialize;

    /// `VmConfig` (required: payload).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VmConfig {
        pub cpus: Option<CpusConfig>,
        pub memory: Option<MemoryConfig>,
        pub payload: PayloadConfig,
        pub rate_limit_groups: Option<Vec<NotMirrored>>,
        pub disks: Option<Vec<DiskConfig>>,
        pub net: Option<Vec<NetConfig>>,
        pub rng: Option<NotMirrored>,
        pub balloon: Option<NotMirrored>,
        pub fs: Option<Vec<NotMirrored>>,
        pub generic_vhost_user: Option<Vec<NotMirrored>>,
        pub pmem: Option<Vec<NotMirrored>>,
        pub serial: Option<SerialConfig>,
        pub console: Option<ConsoleConfig>,
        pub debug_console: Option<NotMirrored>,
        pub devices: Option<Vec<DeviceConfig>>,
        pub user_devices: Option<Vec<NotMirrored>>,
        pub vdpa: Option<Vec<NotMirrored>>,
        pub vsock: Option<VsockConfig>,
        pub numa: Option<Vec<NotMirrored>>,
        pub iommu: Option<bool>,
        pub watchdog: Option<bool>,
        pub rtc: Option<NotMirrored>,
        pub pvpanic: Option<bool>,
        pub pci_segments: Option<Vec<NotMirrored>>,
        pub platform: Option<NotMirrored>,
        pub tpm: Option<NotMirrored>,
        pub landlock_enable: Option<bool>,
        pub landlock_rules: Option<Vec<NotMirrored>>,
    }

    /// `CpusConfig` (required: boot_vcpus, max_vcpus, both minimum 1; u32 in the VMM).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CpusConfig {
        pub boot_vcpus: u32,
        pub max_vcpus: u32,
        pub topology: Option<NotMirrored>,
        pub kvm_hyperv: Option<bool>,
        /// u8 in the VMM.
        pub max_phys_bits: Option<u8>,
        pub nested: Option<bool>,
        pub affinity: Option<Vec<CpuAffinity>>,
        pub features: Option<NotMirrored>,
        pub core_scheduling: Option<CoreSchedulingMode>,
    }

    /// `CpuAffinity` (required: vcpu, host_cpus).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CpuAffinity {
        /// u32 in the VMM.
        pub vcpu: u32,
        /// usize in the VMM.
        pub host_cpus: Vec<u64>,
    }

    /// `CoreSchedulingMode`.
    #[derive(Debug, Deserialize)]
    pub enum CoreSchedulingMode {
        Vm,
        Vcpu,
        Off,
    }

    /// `MemoryConfig` (required: size).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MemoryConfig {
        /// int64 (u64 in the VMM).
        pub size: u64,
        pub hotplug_size: Option<u64>,
        pub hotplugged_size: Option<u64>,
        pub mergeable: Option<bool>,
        pub hotplug_method: Option<String>,
        pub shared: Option<bool>,
        pub hugepages: Option<bool>,
        pub hugepage_size: Option<u64>,
        pub prefault: Option<bool>,
        pub reserve: Option<bool>,
        pub thp: Option<bool>,
        pub zones: Option<Vec<NotMirrored>>,
    }

    /// `PayloadConfig` (nothing required by the schema; `VmConfig::validate` wants something
    /// bootable).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PayloadConfig {
        pub firmware: Option<String>,
        pub kernel: Option<String>,
        pub cmdline: Option<String>,
        pub initramfs: Option<String>,
        pub igvm: Option<String>,
        pub host_data: Option<String>,
    }

    /// `NetConfig`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct NetConfig {
        pub tap: Option<String>,
        pub ip: Option<String>,
        pub mask: Option<String>,
        pub mac: Option<String>,
        pub host_mac: Option<String>,
        /// integer; u16 in the VMM.
        pub mtu: Option<u16>,
        pub iommu: Option<bool>,
        /// Queues, not pairs (default 2); usize in the VMM.
        pub num_queues: Option<u64>,
        /// u16 in the VMM.
        pub queue_size: Option<u16>,
        pub vhost_user: Option<bool>,
        pub vhost_socket: Option<String>,
        /// `type: string, default: "Client"`; the VMM's `VhostMode` is Client | Server.
        pub vhost_mode: Option<VhostMode>,
        pub id: Option<String>,
        /// int16.
        pub pci_segment: Option<i16>,
        /// uint8.
        pub pci_device_id: Option<u8>,
        pub rate_limiter_config: Option<NotMirrored>,
        pub offload_tso: Option<bool>,
        pub offload_ufo: Option<bool>,
        pub offload_csum: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    pub enum VhostMode {
        Client,
        Server,
    }

    /// `DiskConfig`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct DiskConfig {
        pub path: Option<String>,
        pub readonly: Option<bool>,
        pub direct: Option<bool>,
        pub iommu: Option<bool>,
        /// Default 1; usize in the VMM.
        pub num_queues: Option<u64>,
        /// Default 128; u16 in the VMM.
        pub queue_size: Option<u16>,
        pub vhost_user: Option<bool>,
        pub vhost_socket: Option<String>,
        pub rate_limiter_config: Option<NotMirrored>,
        pub pci_segment: Option<i16>,
        pub pci_device_id: Option<u8>,
        pub id: Option<String>,
        pub serial: Option<String>,
        pub rate_limit_group: Option<String>,
        pub queue_affinity: Option<Vec<NotMirrored>>,
        pub backing_files: Option<bool>,
        pub sparse: Option<bool>,
        pub image_type: Option<ImageType>,
        pub lock_granularity: Option<LockGranularity>,
    }

    /// `ImageType`.
    #[derive(Debug, Deserialize)]
    pub enum ImageType {
        FixedVhd,
        Qcow2,
        Raw,
        Vhdx,
        Unknown,
    }

    /// `LockGranularity`.
    #[derive(Debug, Deserialize)]
    pub enum LockGranularity {
        ByteRange,
        Full,
    }

    /// `ConsoleMode`.
    #[derive(Debug, Deserialize, PartialEq)]
    pub enum ConsoleMode {
        Off,
        Pty,
        Tty,
        File,
        Socket,
        Null,
    }

    /// `SerialConfig` (required: mode).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SerialConfig {
        pub file: Option<String>,
        pub socket: Option<String>,
        pub mode: ConsoleMode,
    }

    /// `ConsoleConfig` (required: mode).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ConsoleConfig {
        pub file: Option<String>,
        pub socket: Option<String>,
        pub mode: ConsoleMode,
        pub iommu: Option<bool>,
        pub id: Option<String>,
        pub pci_segment: Option<i16>,
        pub pci_device_id: Option<u8>,
    }

    /// `DeviceConfig` (a VFIO device by its sysfs path).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct DeviceConfig {
        pub path: Option<String>,
        pub iommu: Option<bool>,
        pub pci_segment: Option<i16>,
        pub pci_device_id: Option<u8>,
        pub id: Option<String>,
        /// int8.
        pub x_nv_gpudirect_clique: Option<i8>,
        pub x_exclude_mmap_bars: Option<Vec<i64>>,
    }

    /// `VmRemoveDevice` (nothing required by the schema; the VMM's `VmRemoveDeviceData` has
    /// `id: String` without a default, so it is required in fact).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VmRemoveDevice {
        pub id: String,
    }

    /// `VsockConfig` (required: cid, minimum 3, u32 in the VMM; socket).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VsockConfig {
        pub cid: u32,
        pub socket: String,
        pub iommu: Option<bool>,
        pub pci_segment: Option<i16>,
        pub pci_device_id: Option<u8>,
        pub id: Option<String>,
    }
}

/// Firecracker's schema objects (`definitions` of firecracker.yaml, v1.16.1; its config structs
/// are `deny_unknown_fields` too).
// The mirrors' fields are there to be deserialized: an unread field still checks its type.
#[allow(dead_code)]
mod fc {
    use super::NotMirrored;
    use serde::Deserialize;

    /// `MachineConfiguration` (required: mem_size_mib, vcpu_count).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MachineConfiguration {
        pub cpu_template: Option<NotMirrored>,
        pub smt: Option<bool>,
        /// integer; usize in the VMM.
        pub mem_size_mib: u64,
        pub track_dirty_pages: Option<bool>,
        /// integer, 1..=32; u8 in the VMM.
        pub vcpu_count: u8,
        pub huge_pages: Option<HugePages>,
    }

    /// `MachineConfiguration.huge_pages` (main adds `Transparent`).
    #[derive(Debug, Deserialize, PartialEq)]
    pub enum HugePages {
        None,
        #[serde(rename = "2M")]
        Hugetlbfs2M,
    }

    /// `BootSource` (required: kernel_image_path).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct BootSource {
        pub boot_args: Option<String>,
        pub initrd_path: Option<String>,
        pub kernel_image_path: String,
    }

    /// `Drive` (required: drive_id, is_root_device). virtio-block fields (`is_read_only`,
    /// `path_on_host`, `rate_limiter`, `io_engine`) and the vhost-user-block one (`socket`)
    /// exclude each other.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Drive {
        pub drive_id: String,
        pub partuuid: Option<String>,
        pub is_root_device: bool,
        pub cache_type: Option<CacheType>,
        pub is_read_only: Option<bool>,
        pub path_on_host: Option<String>,
        pub rate_limiter: Option<NotMirrored>,
        pub io_engine: Option<IoEngine>,
        pub socket: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    pub enum CacheType {
        Unsafe,
        Writeback,
    }

    #[derive(Debug, Deserialize)]
    pub enum IoEngine {
        Sync,
        Async,
    }

    /// `NetworkInterface` (required: host_dev_name, iface_id).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct NetworkInterface {
        pub guest_mac: Option<String>,
        pub host_dev_name: String,
        pub iface_id: String,
        /// integer, 68..=65535; u16 in the VMM.
        pub mtu: Option<u16>,
        pub rx_rate_limiter: Option<NotMirrored>,
        pub tx_rate_limiter: Option<NotMirrored>,
    }

    /// `Vsock` (required: guest_cid, minimum 3, u32 in the VMM; uds_path).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Vsock {
        pub guest_cid: u32,
        pub uds_path: String,
        /// Deprecated.
        pub vsock_id: Option<String>,
    }

    /// `InstanceActionInfo` (required: action_type).
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct InstanceActionInfo {
        pub action_type: ActionType,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    pub enum ActionType {
        FlushMetrics,
        InstanceStart,
        SendCtrlAltDel,
    }
}

// ---------------------------------------------------------------------------------------------
// Checkers: a request → its parsed body, or why the VMM would refuse it.

/// No property in either schema is nullable: a `null` anywhere is a mistake.
fn no_nulls(v: &Value, at: &str) -> Result<(), String> {
    match v {
        Value::Null => Err(format!("{at}: null (no property is nullable)")),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| no_nulls(x, &format!("{at}[{i}]"))),
        Value::Object(o) => o
            .iter()
            .try_for_each(|(k, x)| no_nulls(x, &format!("{at}.{k}"))),
        _ => Ok(()),
    }
}

fn parse<T: DeserializeOwned>(r: &Request, object: &str) -> Result<T, String> {
    let body = r
        .body
        .as_ref()
        .ok_or_else(|| format!("{} {}: no body ({object} required)", r.method, r.path))?;
    no_nulls(body, object)?;
    // Through the wire form, as the VMM parses it.
    serde_json::from_str(&body.to_string())
        .map_err(|e| format!("{} {}: not a {object}: {e}: {body}", r.method, r.path))
}

fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(msg())
    }
}

/// Cloud Hypervisor's request, parsed.
#[derive(Debug)]
enum ChReq {
    Create(Box<ch::VmConfig>),
    Boot,
    Shutdown,
    AddDisk(Box<ch::DiskConfig>),
    RemoveDevice(ch::VmRemoveDevice),
    Info,
}

/// Checks one Cloud Hypervisor request: endpoint (servers: http://localhost/api/v1), method,
/// body, and the constraints `VmConfig::validate` enforces (for `vm.add-disk`, those that need
/// no VM: see [`check_ch_add_disk`]).
fn check_ch(r: &Request) -> Result<ChReq, String> {
    if r.path == "/api/v1/vm.info" {
        ensure(r.method == "GET" && r.body.is_none(), || {
            format!("{} {}: a GET without a body", r.method, r.path)
        })?;
        return Ok(ChReq::Info);
    }
    ensure(r.method == "PUT", || {
        format!("{} {}: every other endpoint used is PUT", r.method, r.path)
    })?;
    match r.path.as_str() {
        "/api/v1/vm.add-disk" => Ok(ChReq::AddDisk(Box::new(parse(r, "DiskConfig")?))),
        "/api/v1/vm.remove-device" => {
            let d: ch::VmRemoveDevice = parse(r, "VmRemoveDevice")?;
            ensure(!d.id.is_empty(), || "vm.remove-device: empty id".into())?;
            Ok(ChReq::RemoveDevice(d))
        }
        "/api/v1/vm.create" => {
            let c: ch::VmConfig = parse(r, "VmConfig")?;
            check_vm_config(&c)?;
            Ok(ChReq::Create(Box::new(c)))
        }
        "/api/v1/vm.boot" | "/api/v1/vmm.shutdown" => {
            ensure(r.body.is_none(), || format!("{}: takes no body", r.path))?;
            Ok(if r.path.ends_with("vm.boot") {
                ChReq::Boot
            } else {
                ChReq::Shutdown
            })
        }
        p => Err(format!("PUT {p}: not a documented endpoint")),
    }
}

fn check_vm_config(c: &ch::VmConfig) -> Result<(), String> {
    let p = &c.payload;
    ensure(
        p.kernel.is_some() || p.firmware.is_some() || p.igvm.is_some(),
        || "payload: nothing to boot".into(),
    )?;
    // Defaults of the VMM when absent: 1 vCPU, 512 MiB, not shared, no hugepages.
    let (boot, max) = c
        .cpus
        .as_ref()
        .map_or((1, 1), |x| (x.boot_vcpus, x.max_vcpus));
    ensure(boot >= 1 && max >= boot, || {
        format!("cpus: boot_vcpus {boot}, max_vcpus {max}")
    })?;
    if let Some(aff) = c.cpus.as_ref().and_then(|x| x.affinity.as_ref()) {
        let mut seen = BTreeSet::new();
        for a in aff {
            ensure(a.vcpu < max && seen.insert(a.vcpu), || {
                format!("cpus.affinity: vCPU {} unknown or repeated", a.vcpu)
            })?;
            ensure(!a.host_cpus.is_empty(), || {
                format!("cpus.affinity: vCPU {} on no host CPU", a.vcpu)
            })?;
        }
    }
    let (shared, hugepages) = match &c.memory {
        Some(m) => {
            let hp = m.hugepages.unwrap_or(false);
            ensure(m.size > 0 && m.size.is_multiple_of(1 << 20), || {
                format!("memory.size {} is not whole MiB", m.size)
            })?;
            if let Some(s) = m.hugepage_size {
                ensure(hp && s.is_power_of_two(), || {
                    format!("memory.hugepage_size {s}: needs hugepages and a power of 2")
                })?;
                ensure(m.size.is_multiple_of(s), || {
                    format!("memory.size is not a multiple of hugepage_size {s}")
                })?;
            }
            let sh = m.shared.unwrap_or(false);
            ensure(!(sh && m.mergeable.unwrap_or(false)), || {
                "memory: shared and mergeable".into()
            })?;
            (sh, hp)
        }
        None => (false, false),
    };
    // `backed_by_shared_memory`: vhost-user backends map guest memory.
    let shared_memory = shared || hugepages;
    let mut ids = BTreeSet::new();
    let mut id = |what: &str, id: &Option<String>| {
        ensure(
            id.as_ref()
                .is_none_or(|i| !i.is_empty() && ids.insert(i.clone())),
            || format!("{what}: id {id:?} empty or used twice"),
        )
    };
    for (i, n) in c.net.iter().flatten().enumerate() {
        let what = format!("net[{i}]");
        id(&what, &n.id)?;
        let vu = n.vhost_user.unwrap_or(false);
        // Torii always names its backend: a tap, or a vhost-user socket (else the VMM would
        // create a tap of its own).
        ensure(vu != n.tap.is_some(), || {
            format!("{what}: exactly one of tap and vhost_user")
        })?;
        if vu {
            ensure(shared_memory, || {
                format!("{what}: vhost-user needs shared memory")
            })?;
            ensure(
                n.vhost_socket.as_ref().is_some_and(|s| !s.is_empty()),
                || format!("{what}: vhost-user needs vhost_socket"),
            )?;
            ensure(
                n.rate_limiter_config.is_none() && !n.iommu.unwrap_or(false),
                || format!("{what}: no rate limiter or iommu with vhost-user"),
            )?;
        } else {
            ensure(n.vhost_socket.is_none() && n.vhost_mode.is_none(), || {
                format!("{what}: vhost_socket/vhost_mode without vhost_user")
            })?;
        }
        let q = n.num_queues.unwrap_or(2);
        ensure(q >= 2 && q.is_multiple_of(2), || {
            format!("{what}: num_queues {q} is not whole queue pairs")
        })?;
        ensure(q / 2 <= u64::from(boot), || {
            format!("{what}: {} queue pairs for {boot} boot vCPUs", q / 2)
        })?;
        let qs = n.queue_size.unwrap_or(256);
        ensure(qs.is_power_of_two(), || format!("{what}: queue_size {qs}"))?;
        if let Some(mtu) = n.mtu {
            ensure(mtu >= 1280, || format!("{what}: mtu {mtu} under 1280"))?;
        }
        for m in [&n.mac, &n.host_mac].into_iter().flatten() {
            torii_runtime::spec::parse_mac(m).map_err(|e| format!("{what}: mac: {e}"))?;
        }
    }
    for (i, d) in c.disks.iter().flatten().enumerate() {
        let what = format!("disks[{i}]");
        id(&what, &d.id)?;
        ensure(d.vhost_socket.is_none() || d.path.is_none(), || {
            format!("{what}: vhost_socket and path")
        })?;
        if d.vhost_user.unwrap_or(false) {
            ensure(shared_memory, || {
                format!("{what}: vhost-user needs shared memory")
            })?;
            ensure(
                d.vhost_socket.as_ref().is_some_and(|s| !s.is_empty()),
                || format!("{what}: vhost-user needs vhost_socket"),
            )?;
            ensure(
                d.rate_limiter_config.is_none()
                    && d.rate_limit_group.is_none()
                    && !d.iommu.unwrap_or(false),
                || format!("{what}: no rate limiter or iommu with vhost-user"),
            )?;
        } else {
            ensure(d.path.is_some(), || format!("{what}: no path"))?;
        }
        let q = d.num_queues.unwrap_or(1);
        ensure(q >= 1 && q <= u64::from(boot), || {
            format!("{what}: {q} queues for {boot} boot vCPUs")
        })?;
        let qs = d.queue_size.unwrap_or(128);
        ensure(qs.is_power_of_two() && qs > 2, || {
            format!("{what}: queue_size {qs}")
        })?;
    }
    // `validate_pci_device_id`: under 32 (`NUM_DEVICE_IDS`), not the root's 0; the device
    // manager reserves each, so two devices cannot ask for the same one.
    let mut pci_ids = BTreeSet::new();
    let asked = c
        .disks
        .iter()
        .flatten()
        .map(|d| ("disks", d.pci_device_id))
        .chain(c.net.iter().flatten().map(|n| ("net", n.pci_device_id)))
        .chain(
            c.devices
                .iter()
                .flatten()
                .map(|d| ("devices", d.pci_device_id)),
        )
        .chain(c.vsock.iter().map(|v| ("vsock", v.pci_device_id)));
    for (what, id) in asked {
        let Some(id) = id else { continue };
        ensure((1..32).contains(&id) && pci_ids.insert(id), || {
            format!("{what}: pci_device_id {id} reserved, out of range or used twice")
        })?;
    }
    for (i, d) in c.devices.iter().flatten().enumerate() {
        let what = format!("devices[{i}]");
        id(&what, &d.id)?;
        ensure(
            d.path
                .as_ref()
                .is_some_and(|p| p.starts_with("/sys/bus/pci/devices/")),
            || format!("{what}: path {:?} is not a sysfs PCI device", d.path),
        )?;
    }
    for (what, mode, file, socket) in [
        (
            "serial",
            c.serial.as_ref().map(|s| &s.mode),
            c.serial.as_ref().and_then(|s| s.file.as_ref()),
            c.serial.as_ref().and_then(|s| s.socket.as_ref()),
        ),
        (
            "console",
            c.console.as_ref().map(|s| &s.mode),
            c.console.as_ref().and_then(|s| s.file.as_ref()),
            c.console.as_ref().and_then(|s| s.socket.as_ref()),
        ),
    ] {
        ensure(
            mode != Some(&ch::ConsoleMode::File) || file.is_some(),
            || format!("{what}: mode File without file"),
        )?;
        ensure(
            mode != Some(&ch::ConsoleMode::Socket) || socket.is_some(),
            || format!("{what}: mode Socket without socket"),
        )?;
    }
    if let Some(v) = &c.vsock {
        id("vsock", &v.id)?;
        ensure(v.cid >= 3 && v.cid != u32::MAX, || {
            format!("vsock: cid {} is reserved", v.cid)
        })?;
        ensure(!v.socket.is_empty(), || "vsock: no socket".into())?;
    }
    Ok(())
}

/// Firecracker's request, parsed.
#[derive(Debug)]
enum FcReq {
    Machine(fc::MachineConfiguration),
    Boot(fc::BootSource),
    Drive(fc::Drive),
    Net(fc::NetworkInterface),
    Vsock(fc::Vsock),
    Action(fc::InstanceActionInfo),
}

/// Firecracker's `checked_id`: a path id is non-empty, alphanumeric or `_`.
fn fc_id(id: &str) -> Result<&str, String> {
    ensure(
        !id.is_empty() && id.chars().all(|c| c == '_' || c.is_alphanumeric()),
        || format!("{id:?} is not a Firecracker id"),
    )?;
    Ok(id)
}

/// Checks one Firecracker request: endpoint, method, body, and the documented constraints.
fn check_fc(r: &Request) -> Result<FcReq, String> {
    ensure(r.method == "PUT", || {
        format!("{} {}: every endpoint used is PUT", r.method, r.path)
    })?;
    let p = r.path.as_str();
    if p == "/machine-config" {
        let m: fc::MachineConfiguration = parse(r, "MachineConfiguration")?;
        ensure((1..=32).contains(&m.vcpu_count), || {
            format!("vcpu_count {} is not in 1..=32", m.vcpu_count)
        })?;
        ensure(
            !m.smt.unwrap_or(false) || m.vcpu_count == 1 || m.vcpu_count.is_multiple_of(2),
            || "smt: vcpu_count must be 1 or even".into(),
        )?;
        ensure(m.mem_size_mib > 0, || "mem_size_mib 0".into())?;
        ensure(
            m.huge_pages != Some(fc::HugePages::Hugetlbfs2M) || m.mem_size_mib.is_multiple_of(2),
            || "huge_pages 2M: mem_size_mib must be even".into(),
        )?;
        Ok(FcReq::Machine(m))
    } else if p == "/boot-source" {
        let b: fc::BootSource = parse(r, "BootSource")?;
        ensure(!b.kernel_image_path.is_empty(), || "no kernel".into())?;
        Ok(FcReq::Boot(b))
    } else if let Some(id) = p.strip_prefix("/drives/") {
        let d: fc::Drive = parse(r, "Drive")?;
        ensure(fc_id(id)? == d.drive_id, || {
            format!("drive_id {} in the body, {id} in the path", d.drive_id)
        })?;
        let virtio_fields = d.is_read_only.is_some()
            || d.path_on_host.is_some()
            || d.rate_limiter.is_some()
            || d.io_engine.is_some();
        match &d.socket {
            // vhost-user-block: `socket` and none of the virtio-block fields.
            Some(s) => ensure(!s.is_empty() && !virtio_fields, || {
                format!("drive {id}: vhost-user (socket) with virtio-block fields")
            })?,
            None => ensure(d.path_on_host.is_some() && d.is_read_only.is_some(), || {
                format!("drive {id}: virtio-block needs path_on_host and is_read_only")
            })?,
        }
        ensure(d.partuuid.is_none() || d.is_root_device, || {
            format!("drive {id}: partuuid on a non-root drive")
        })?;
        Ok(FcReq::Drive(d))
    } else if let Some(id) = p.strip_prefix("/network-interfaces/") {
        let n: fc::NetworkInterface = parse(r, "NetworkInterface")?;
        ensure(fc_id(id)? == n.iface_id, || {
            format!("iface_id {} in the body, {id} in the path", n.iface_id)
        })?;
        ensure(!n.host_dev_name.is_empty(), || "no host_dev_name".into())?;
        if let Some(mtu) = n.mtu {
            ensure(mtu >= 68, || format!("mtu {mtu} under 68"))?;
        }
        if let Some(m) = &n.guest_mac {
            torii_runtime::spec::parse_mac(m).map_err(|e| format!("guest_mac: {e}"))?;
        }
        Ok(FcReq::Net(n))
    } else if p == "/vsock" {
        let v: fc::Vsock = parse(r, "Vsock")?;
        ensure(v.guest_cid >= 3, || {
            format!("guest_cid {} under 3", v.guest_cid)
        })?;
        ensure(!v.uds_path.is_empty(), || "no uds_path".into())?;
        Ok(FcReq::Vsock(v))
    } else if p == "/actions" {
        Ok(FcReq::Action(parse(r, "InstanceActionInfo")?))
    } else {
        Err(format!("PUT {p}: not a documented endpoint"))
    }
}

/// Checks Firecracker's boot sequence: every request, the ids unique, `InstanceStart` last
/// and once, machine and boot source described before it.
fn check_fc_boot(rs: &[Request]) -> Result<Vec<FcReq>, String> {
    let parsed = rs.iter().map(check_fc).collect::<Result<Vec<_>, _>>()?;
    let starts: Vec<usize> = parsed
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            matches!(r, FcReq::Action(a) if a.action_type == fc::ActionType::InstanceStart)
        })
        .map(|(i, _)| i)
        .collect();
    ensure(starts == [parsed.len() - 1], || {
        format!("InstanceStart at {starts:?}, not last and once")
    })?;
    ensure(
        parsed.iter().any(|r| matches!(r, FcReq::Machine(_)))
            && parsed.iter().any(|r| matches!(r, FcReq::Boot(_))),
        || "no machine-config or boot-source".into(),
    )?;
    let paths: BTreeSet<&str> = rs.iter().map(|r| r.path.as_str()).collect();
    ensure(paths.len() == rs.len(), || "a resource is put twice".into())?;
    let roots = parsed
        .iter()
        .filter(|r| matches!(r, FcReq::Drive(d) if d.is_root_device))
        .count();
    ensure(roots <= 1, || "more than one root drive".into())?;
    Ok(parsed)
}

/// Cloud Hypervisor's boot sequence: `vm.create` with the config, then `vm.boot`.
fn check_ch_boot(rs: &[Request]) -> Result<ch::VmConfig, String> {
    let mut parsed = rs.iter().map(check_ch).collect::<Result<Vec<_>, _>>()?;
    ensure(
        parsed.len() == 2 && matches!(parsed[1], ChReq::Boot),
        || format!("not vm.create then vm.boot: {parsed:?}"),
    )?;
    parsed.truncate(1);
    match parsed.pop() {
        Some(ChReq::Create(c)) => Ok(*c),
        other => Err(format!("not vm.create first: {other:?}")),
    }
}

/// Checks `vm.add-disk` request `r` on the VM `vm.create` made with `config` as the VMM does:
/// the disk added to a copy of the configuration, which must still be valid.
fn check_ch_add_disk(config: &Value, r: &Request) -> Result<ch::DiskConfig, String> {
    let ChReq::AddDisk(d) = check_ch(r)? else {
        return Err(format!("{} {}: not vm.add-disk", r.method, r.path));
    };
    let mut c = config.clone();
    let disk = r.body.clone().unwrap_or_default();
    match c["disks"].as_array_mut() {
        Some(disks) => disks.push(disk),
        None => c["disks"] = Value::Array(vec![disk]),
    }
    check_ch(&Request::put("/api/v1/vm.create", Some(c)))?;
    Ok(*d)
}

// ---------------------------------------------------------------------------------------------
// Sandboxes from TOML specs in a temporary folder.

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> Dir {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "torii-vmm-api-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    // The spec checks that the guest image's files exist.
    std::fs::write(d.join("vmlinuz"), b"").unwrap();
    std::fs::write(d.join("initrd"), b"").unwrap();
    Dir(d)
}

/// `vm` goes in `[vm]` (after kernel and initramfs), `rest` after it.
fn sandbox_in(
    d: &Dir,
    hv: &str,
    vm: &str,
    rest: &str,
    sys: &torii_vfio::pci::Sysfs,
) -> Result<Sandbox, String> {
    let text = format!(
        "name = \"p1\"\nhypervisor = \"{hv}\"\n[vm]\nkernel = \"{0}/vmlinuz\"\n\
         initramfs = \"{0}/initrd\"\n{vm}\n{rest}",
        d.0.display()
    );
    let p = d.0.join("spec.toml");
    std::fs::write(&p, text).unwrap();
    SandboxSpec::load(&p)
        .and_then(|s| s.resolve(sys))
        .map_err(|e| e.to_string())
}

fn sandbox(d: &Dir, hv: &str, vm: &str, rest: &str) -> Sandbox {
    sandbox_in(d, hv, vm, rest, &torii_vfio::pci::Sysfs::default()).unwrap()
}

fn paths() -> Paths {
    Paths::new(Path::new("/run/torii/vms/p1"))
}

fn ch_config(sb: &Sandbox) -> ch::VmConfig {
    let rs = ch_gen::boot_requests(sb, &paths()).unwrap();
    check_ch_boot(&rs).unwrap_or_else(|e| panic!("{e}\n{rs:#?}"))
}

fn fc_requests(sb: &Sandbox) -> Vec<FcReq> {
    let rs = fc_gen::boot_requests(sb, &paths()).unwrap();
    check_fc_boot(&rs).unwrap_or_else(|e| panic!("{e}\n{rs:#?}"))
}

fn fc_refusal(sb: &Sandbox) -> String {
    match fc_gen::boot_requests(sb, &paths()) {
        Ok(r) => panic!("Firecracker requests for what it cannot do: {r:#?}"),
        Err(e) => e.to_string(),
    }
}

const VHOST_NET: &str =
    "[[interface]]\ntype = \"vhost-user\"\nsocket = \"/run/torii/p1-net0.sock\"\n\
     mac = \"02:00:00:00:00:01\"\nmtu = 9000\nqueues = 2\n";
const TAP: &str =
    "[[interface]]\ntype = \"tap\"\ntap = \"tap0\"\nmac = \"02:00:00:00:00:02\"\nmtu = 1500\n";
const TWO_DISKS: &str = "[[disk]]\nsocket = \"/run/torii/p1-disk0.sock\"\nmount = \"/data\"\n\
     [[disk]]\nsocket = \"/run/torii/p1-disk1.sock\"\nmount = \"/ro\"\nread_only = true\n";

// ---------------------------------------------------------------------------------------------
// Cloud Hypervisor.

#[test]
fn ch_minimal_one_vcpu() {
    let d = dir();
    let sb = sandbox(&d, "cloud-hypervisor", "vcpus = 1\nmemory_mib = 128", "");
    let c = ch_config(&sb);
    let cpus = c.cpus.unwrap();
    assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (1, 1));
    assert!(cpus.affinity.is_none());
    let m = c.memory.unwrap();
    assert_eq!(m.size, 128 << 20);
    assert_eq!(m.shared, Some(true));
    assert_eq!((m.hugepages, m.hugepage_size), (None, None));
    let p = c.payload;
    assert_eq!(p.kernel, Some(format!("{}/vmlinuz", d.0.display())));
    assert_eq!(p.initramfs, Some(format!("{}/initrd", d.0.display())));
    let cmdline = p.cmdline.unwrap();
    assert!(cmdline.contains("console=ttyS0"), "{cmdline}");
    assert!(cmdline.contains("torii.agent=vsock:1024"), "{cmdline}");
    let serial = c.serial.unwrap();
    assert_eq!(serial.mode, ch::ConsoleMode::File);
    assert_eq!(
        serial.file.as_deref(),
        Some("/run/torii/vms/p1/console.log")
    );
    assert_eq!(c.console.unwrap().mode, ch::ConsoleMode::Off);
    let v = c.vsock.unwrap();
    assert_eq!(
        (v.cid, v.socket.as_str()),
        (ch_gen::GUEST_CID, "/run/torii/vms/p1/vsock.sock")
    );
    assert!(c.net.is_none() && c.disks.is_none() && c.devices.is_none());
}

#[test]
fn ch_pinning_is_cpu_affinity() {
    let d = dir();
    let sb = sandbox(&d, "cloud-hypervisor", "vcpus = 2\npin = [1, 0]", "");
    let cpus = ch_config(&sb).cpus.unwrap();
    assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (2, 2));
    let aff: Vec<(u32, Vec<u64>)> = cpus
        .affinity
        .unwrap()
        .into_iter()
        .map(|a| (a.vcpu, a.host_cpus))
        .collect();
    assert_eq!(aff, [(0, vec![1]), (1, vec![0])]);
}

#[test]
fn ch_hugepages() {
    let d = dir();
    let sb = sandbox(
        &d,
        "cloud-hypervisor",
        "memory_mib = 512\nhugepages = true",
        TWO_DISKS,
    );
    let m = ch_config(&sb).memory.unwrap();
    assert_eq!(m.size, 512 << 20);
    assert_eq!(m.hugepages, Some(true));
    assert_eq!(m.hugepage_size, Some(2 << 20));
    assert_eq!(m.shared, Some(true));
}

#[test]
fn ch_vhost_user_net_with_two_queue_pairs_mac_and_mtu() {
    let d = dir();
    let sb = sandbox(&d, "cloud-hypervisor", "vcpus = 2", VHOST_NET);
    let c = ch_config(&sb);
    assert_eq!(c.memory.unwrap().shared, Some(true));
    let net = c.net.unwrap();
    assert_eq!(net.len(), 1);
    let n = &net[0];
    assert_eq!(n.vhost_user, Some(true));
    assert_eq!(n.vhost_socket.as_deref(), Some("/run/torii/p1-net0.sock"));
    // Torii's backends listen: Cloud Hypervisor connects.
    assert_eq!(n.vhost_mode, Some(ch::VhostMode::Client));
    // Queues, not pairs.
    assert_eq!(n.num_queues, Some(4));
    assert_eq!(n.mac.as_deref(), Some("02:00:00:00:00:01"));
    assert_eq!(n.mtu, Some(9000));
    assert_eq!(n.id.as_deref(), Some("net0"));
    assert!(n.tap.is_none());
}

#[test]
fn ch_queues_are_bounded_by_boot_vcpus_and_small_mtus_left_to_the_guest() {
    let d = dir();
    let net = "[[interface]]\ntype = \"vhost-user\"\nsocket = \"/n.sock\"\n\
               mac = \"02:00:00:00:00:01\"\nmtu = 1000\nqueues = 4\n";
    let sb = sandbox(
        &d,
        "cloud-hypervisor",
        "vcpus = 1",
        &format!("{net}[[disk]]\nsocket = \"/d.sock\"\nqueues = 4\n"),
    );
    let c = ch_config(&sb);
    let n = &c.net.unwrap()[0];
    assert_eq!(n.num_queues, Some(2));
    // Under Cloud Hypervisor's 1280: not sent (the agent sets it in the guest).
    assert_eq!(n.mtu, None);
    assert_eq!(c.disks.unwrap()[0].num_queues, Some(1));
}

#[test]
fn ch_tap() {
    let d = dir();
    let sb = sandbox(&d, "cloud-hypervisor", "", TAP);
    let net = ch_config(&sb).net.unwrap();
    let n = &net[0];
    assert_eq!(n.tap.as_deref(), Some("tap0"));
    assert_eq!(n.vhost_user, None);
    assert_eq!(n.num_queues, Some(2));
    assert_eq!(n.mac.as_deref(), Some("02:00:00:00:00:02"));
    assert_eq!(n.mtu, Some(1500));
}

#[test]
fn ch_two_vhost_user_disks_one_read_only() {
    let d = dir();
    let sb = sandbox(&d, "cloud-hypervisor", "", TWO_DISKS);
    let disks = ch_config(&sb).disks.unwrap();
    let got: Vec<_> = disks
        .iter()
        .map(|x| {
            (
                x.id.as_deref().unwrap(),
                x.vhost_user,
                x.vhost_socket.as_deref().unwrap(),
                x.readonly,
                x.num_queues,
                x.path.is_none(),
                x.pci_device_id,
            )
        })
        .collect();
    // Named and placed by their guest PCI slot, where the agent looks for them.
    assert_eq!(
        got,
        [
            (
                "disk10",
                Some(true),
                "/run/torii/p1-disk0.sock",
                Some(false),
                Some(1),
                true,
                Some(0x10)
            ),
            (
                "disk11",
                Some(true),
                "/run/torii/p1-disk1.sock",
                Some(true),
                Some(1),
                true,
                Some(0x11)
            ),
        ]
    );
}

#[test]
fn ch_everything_at_once_with_vfio() {
    let t = FakeTree::new();
    t.pf("0000:03:00.0", "ens1f0", 7, 1, 10);
    t.to_vfio("0000:03:10.0".parse().unwrap());
    let d = dir();
    let vfio =
        "[[interface]]\ntype = \"vfio\"\npci = \"0000:03:10.0\"\nmac = \"02:00:00:00:00:03\"\n";
    let sb = sandbox_in(
        &d,
        "cloud-hypervisor",
        "vcpus = 2\npin = [0, 1]\nmemory_mib = 256\nhugepages = true\ncmdline = \"loglevel=4\"",
        &format!("{VHOST_NET}{TAP}{vfio}{TWO_DISKS}"),
        &t.sysfs(),
    )
    .unwrap();
    let c = ch_config(&sb);
    assert_eq!(c.net.as_ref().unwrap().len(), 2);
    assert_eq!(c.disks.as_ref().unwrap().len(), 2);
    let dev = &c.devices.as_ref().unwrap()[0];
    assert_eq!(
        dev.path.as_deref(),
        Some("/sys/bus/pci/devices/0000:03:10.0/")
    );
    assert!(c.payload.cmdline.unwrap().ends_with(" loglevel=4"));
}

/// A disk to hot-plug into `sb`, in slot `slot`.
fn new_disk(slot: u8, queues: u16) -> torii_runtime::spec::Disk {
    torii_runtime::spec::DiskSpec {
        socket: PathBuf::from("/run/torii/p1-hot.sock"),
        queues,
        mount: Some("/c/hot".into()),
        fstype: "ext4".into(),
        options: String::new(),
        read_only: false,
    }
    .resolve(slot)
    .unwrap()
}

#[test]
fn ch_disk_hot_plug_is_vm_add_disk_and_unplug_vm_remove_device() {
    let d = dir();
    let sb = sandbox(&d, "cloud-hypervisor", "vcpus = 2", TWO_DISKS);
    let config = ch_gen::vm_config(&sb, &paths()).unwrap();
    // Four queues asked, two boot vCPUs: two queues (`TooManyQueues` otherwise).
    let hot = new_disk(0x12, 4);
    let r = ch_gen::add_disk_request(&hot, sb.vm.vcpus);
    let got = check_ch_add_disk(&config, &r).unwrap_or_else(|e| panic!("{e}\n{r:#?}"));
    assert_eq!(
        (
            got.id.as_deref(),
            got.vhost_user,
            got.vhost_socket.as_deref(),
            got.num_queues,
            got.pci_device_id,
            got.path.is_none()
        ),
        (
            Some("disk12"),
            Some(true),
            Some("/run/torii/p1-hot.sock"),
            Some(2),
            Some(0x12),
            true
        )
    );
    // The VMM would refuse a disk in a slot a boot disk has: same id, same PCI device.
    let clash = ch_gen::add_disk_request(&new_disk(0x11, 1), sb.vm.vcpus);
    let e = check_ch_add_disk(&config, &clash).unwrap_err();
    assert!(e.contains("used twice"), "{e}");

    // Hot-plugged or given at boot, a disk is removed by the id it was created with.
    for disk in [&hot, &sb.disks[0]] {
        let r = ch_gen::remove_disk_request(disk);
        match check_ch(&r) {
            Ok(ChReq::RemoveDevice(x)) => assert_eq!(x.id, ch_gen::disk_id(disk)),
            other => panic!("{other:?}: {r:?}"),
        }
    }
    assert_eq!(
        config["disks"][0]["id"],
        ch_gen::disk_id(&sb.disks[0]).as_str()
    );
    assert!(matches!(check_ch(&ch_gen::info_request()), Ok(ChReq::Info)));
}

/// A micro-http answer: 204, or 200 with a JSON body.
fn answer(body: Option<&Value>) -> String {
    match body {
        None => {
            "HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n".into()
        }
        Some(b) => {
            let b = b.to_string();
            format!(
                "HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        }
    }
}

#[test]
fn ch_vm_hot_plugs_and_waits_for_the_guest_to_eject_an_unplugged_disk() {
    use serde_json::json;
    use torii_runtime::vmm::hypervisor;
    let d = dir();
    // A stand-in for the VMM process: the fake API below answers for it.
    let vmm = d.0.join("fake-vmm");
    std::fs::write(&vmm, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sb = sandbox(
        &d,
        "cloud-hypervisor",
        &format!("vcpus = 2\nbinary = \"{}\"", vmm.display()),
        TWO_DISKS,
    );
    let run = d.0.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let hot = new_disk(0x12, 1);
    let id = ch_gen::disk_id(&hot);
    let info = |in_tree: bool, in_config: bool| {
        let mut tree = json!({ "disk10": { "id": "disk10" } });
        if in_tree {
            tree[&id] = json!({ "id": id, "pci_bdf": "0000:00:12.0" });
        }
        let disks = if in_config {
            json!([{ "id": "disk10" }, { "id": id }])
        } else {
            json!([{ "id": "disk10" }])
        };
        json!({ "config": { "disks": disks }, "state": "Running", "device_tree": tree })
    };
    let server = fake_api(
        &run.join("api.sock"),
        vec![
            answer(None), // vm.create
            answer(None), // vm.boot
            answer(Some(&json!({ "id": id, "bdf": "0000:00:12.0" }))),
            answer(Some(&info(true, true))),
            answer(None), // vm.remove-device: the guest is asked to eject it
            answer(Some(&info(true, false))),
            answer(Some(&info(false, false))),
            // Removing it again: it is gone already.
            answer(Some(&info(false, false))),
        ],
    );
    let mut vm = hypervisor(sb.hypervisor).launch(&sb, &run).expect("launch");
    vm.add_disk(&hot).expect("add_disk");
    vm.remove_disk(&hot).expect("remove_disk");
    vm.remove_disk(&hot).expect("remove_disk again");
    drop(vm);
    let got: Vec<String> = server
        .join()
        .unwrap()
        .iter()
        .map(|raw| parse_wire(raw).0)
        .collect();
    assert_eq!(
        got,
        [
            "PUT /api/v1/vm.create HTTP/1.1",
            "PUT /api/v1/vm.boot HTTP/1.1",
            "PUT /api/v1/vm.add-disk HTTP/1.1",
            "GET /api/v1/vm.info HTTP/1.1",
            "PUT /api/v1/vm.remove-device HTTP/1.1",
            "GET /api/v1/vm.info HTTP/1.1",
            "GET /api/v1/vm.info HTTP/1.1",
            "GET /api/v1/vm.info HTTP/1.1",
        ]
    );
}

#[test]
fn fc_refuses_disk_hot_plug() {
    let e = fc_gen::no_hotplug().to_string();
    assert!(
        e.contains("Firecracker cannot hot-plug vhost-user-blk disks"),
        "{e}"
    );
}

#[test]
fn ch_shutdown_is_vmm_shutdown() {
    let r = ch_gen::shutdown_request();
    assert!(matches!(check_ch(&r), Ok(ChReq::Shutdown)), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Firecracker.

#[test]
fn fc_minimal_one_vcpu() {
    let d = dir();
    let sb = sandbox(&d, "firecracker", "vcpus = 1\nmemory_mib = 128", "");
    let rs = fc_requests(&sb);
    let order: Vec<String> = fc_gen::boot_requests(&sb, &paths())
        .unwrap()
        .into_iter()
        .map(|r| r.path)
        .collect();
    assert_eq!(
        order,
        ["/machine-config", "/boot-source", "/vsock", "/actions"]
    );
    let FcReq::Machine(m) = &rs[0] else {
        panic!("{rs:?}")
    };
    assert_eq!((m.vcpu_count, m.mem_size_mib), (1, 128));
    assert_eq!(m.huge_pages, None);
    let FcReq::Boot(b) = &rs[1] else {
        panic!("{rs:?}")
    };
    assert_eq!(b.kernel_image_path, format!("{}/vmlinuz", d.0.display()));
    assert_eq!(
        b.initrd_path.as_deref(),
        Some(format!("{}/initrd", d.0.display()).as_str())
    );
    let args = b.boot_args.as_deref().unwrap();
    for want in [
        "console=ttyS0",
        "reboot=k",
        "pci=off",
        "torii.agent=vsock:1024",
    ] {
        assert!(args.split(' ').any(|a| a == want), "no {want} in {args}");
    }
    let FcReq::Vsock(v) = &rs[2] else {
        panic!("{rs:?}")
    };
    assert_eq!(
        (v.guest_cid, v.uds_path.as_str()),
        (ch_gen::GUEST_CID, "/run/torii/vms/p1/vsock.sock")
    );
}

#[test]
fn fc_hugepages() {
    let d = dir();
    let sb = sandbox(&d, "firecracker", "memory_mib = 512\nhugepages = true", "");
    let FcReq::Machine(m) = &fc_requests(&sb)[0] else {
        panic!()
    };
    assert_eq!(m.huge_pages, Some(fc::HugePages::Hugetlbfs2M));
    assert_eq!(m.mem_size_mib, 512);
}

#[test]
fn fc_tap_and_two_vhost_user_disks() {
    let d = dir();
    let sb = sandbox(&d, "firecracker", "vcpus = 2", &format!("{TAP}{TWO_DISKS}"));
    let rs = fc_gen::boot_requests(&sb, &paths()).unwrap();
    let parsed = check_fc_boot(&rs).unwrap_or_else(|e| panic!("{e}\n{rs:#?}"));
    let mut drives = Vec::new();
    let mut nets = Vec::new();
    for (r, p) in rs.iter().zip(&parsed) {
        match p {
            FcReq::Drive(x) => drives.push((r.path.as_str(), x)),
            FcReq::Net(x) => nets.push((r.path.as_str(), x)),
            _ => {}
        }
    }
    assert_eq!(drives.len(), 2);
    for (i, (path, x)) in drives.iter().enumerate() {
        assert_eq!(*path, format!("/drives/disk{i}"));
        assert_eq!(x.drive_id, format!("disk{i}"));
        assert!(!x.is_root_device);
        assert_eq!(
            x.socket.as_deref(),
            Some(format!("/run/torii/p1-disk{i}.sock").as_str())
        );
        // vhost-user-block: read-only comes from the backend, never `is_read_only`.
        assert_eq!(x.is_read_only, None);
    }
    assert_eq!(nets.len(), 1);
    let (path, n) = nets[0];
    assert_eq!(path, "/network-interfaces/net0");
    assert_eq!(n.iface_id, "net0");
    assert_eq!(n.host_dev_name, "tap0");
    assert_eq!(n.guest_mac.as_deref(), Some("02:00:00:00:00:02"));
}

#[test]
fn fc_refuses_what_it_cannot_do() {
    let d = dir();
    let e = fc_refusal(&sandbox(&d, "firecracker", "vcpus = 2", VHOST_NET));
    assert!(e.contains("interface[0]") && e.contains("tap"), "{e}");
    let e = fc_refusal(&sandbox(
        &d,
        "firecracker",
        "",
        "[[disk]]\nsocket = \"/d.sock\"\nqueues = 2\n",
    ));
    assert!(e.contains("disk[0]") && e.contains("one queue"), "{e}");
    let e = fc_refusal(&sandbox(&d, "firecracker", "vcpus = 2\npin = [0, 1]", ""));
    assert!(e.contains("pinning"), "{e}");
    let e = fc_refusal(&sandbox(
        &d,
        "firecracker",
        "",
        "[[interface]]\ntype = \"tap\"\ntap = \"tap0\"\nqueues = 2\n",
    ));
    assert!(
        e.contains("interface[0]") && e.contains("one queue pair"),
        "{e}"
    );
    let e = fc_refusal(&sandbox(&d, "firecracker", "vcpus = 33", ""));
    assert!(e.contains("vm.vcpus") && e.contains("32"), "{e}");
    let t = FakeTree::new();
    t.pf("0000:03:00.0", "ens1f0", 7, 1, 10);
    t.to_vfio("0000:03:10.0".parse().unwrap());
    let sb = sandbox_in(
        &d,
        "firecracker",
        "",
        "[[interface]]\ntype = \"vfio\"\npci = \"0000:03:10.0\"\n",
        &t.sysfs(),
    )
    .unwrap();
    let e = fc_refusal(&sb);
    assert!(e.contains("interface[0]") && e.contains("VFIO"), "{e}");
}

#[test]
fn fc_the_largest_machine_it_takes() {
    let d = dir();
    let sb = sandbox(&d, "firecracker", "vcpus = 32\nmemory_mib = 4096", "");
    let FcReq::Machine(m) = &fc_requests(&sb)[0] else {
        panic!()
    };
    assert_eq!(m.vcpu_count, 32);
}

#[test]
fn fc_stop_is_ctrl_alt_del() {
    let r = fc_gen::stop_request();
    match check_fc(&r) {
        Ok(FcReq::Action(a)) => assert_eq!(a.action_type, fc::ActionType::SendCtrlAltDel),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The checkers refuse what the VMMs refuse (so the tests above can fail).

/// A change that takes a body off its schema.
type Edit = Box<dyn Fn(&mut Value)>;

fn put(path: &str, body: Value) -> Request {
    Request::put(path, Some(body))
}

#[test]
fn the_checkers_refuse_bodies_off_the_schemas() {
    use serde_json::json;
    let d = dir();
    let sb = sandbox(
        &d,
        "cloud-hypervisor",
        "vcpus = 2",
        &format!("{VHOST_NET}{TWO_DISKS}"),
    );
    let good = ch_gen::vm_config(&sb, &paths()).unwrap();
    assert!(check_ch(&put("/api/v1/vm.create", good.clone())).is_ok());
    let bad_ch: Vec<(&str, Edit)> = vec![
        (
            "unknown field",
            Box::new(|c| c["cpus"]["boot_cpus"] = json!(1)),
        ),
        (
            "missing field `boot_vcpus`",
            Box::new(|c| {
                c["cpus"].as_object_mut().unwrap().remove("boot_vcpus");
            }),
        ),
        (
            "invalid type",
            Box::new(|c| c["memory"]["size"] = json!("256M")),
        ),
        (
            "unknown variant",
            Box::new(|c| c["console"]["mode"] = json!("off")),
        ),
        (
            "unknown variant",
            Box::new(|c| c["net"][0]["vhost_mode"] = json!("client")),
        ),
        ("null", Box::new(|c| c["net"][0]["mac"] = Value::Null)),
        (
            "not whole queue pairs",
            Box::new(|c| c["net"][0]["num_queues"] = json!(3)),
        ),
        (
            "boot vCPUs",
            Box::new(|c| c["net"][0]["num_queues"] = json!(6)),
        ),
        (
            "boot vCPUs",
            Box::new(|c| c["disks"][0]["num_queues"] = json!(3)),
        ),
        ("mtu 576", Box::new(|c| c["net"][0]["mtu"] = json!(576))),
        (
            "needs vhost_socket",
            Box::new(|c| {
                c["disks"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("vhost_socket");
            }),
        ),
        (
            "shared memory",
            Box::new(|c| c["memory"]["shared"] = json!(false)),
        ),
        (
            "used twice",
            Box::new(|c| c["disks"][1]["id"] = json!("net0")),
        ),
        ("reserved", Box::new(|c| c["vsock"]["cid"] = json!(2))),
        (
            "not a VmConfig",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("payload");
            }),
        ),
        (
            "does not generate",
            Box::new(|c| c["rng"] = json!({ "src": "/dev/urandom" })),
        ),
    ];
    for (want, f) in bad_ch {
        let mut c = good.clone();
        f(&mut c);
        let e = check_ch(&put("/api/v1/vm.create", c)).unwrap_err();
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    assert!(check_ch(&put(
        "/api/v1/vm.create",
        json!({ "payload": { "kernel": "/k" } })
    ))
    .is_ok());
    // Hot-plug requests, checked on the VM `good` made.
    let hot = ch_gen::add_disk_request(&new_disk(0x12, 1), 2);
    let hot_body = hot.body.clone().unwrap();
    assert!(check_ch_add_disk(&good, &hot).is_ok());
    let bad_hot: Vec<(&str, Edit)> = vec![
        ("unknown field", Box::new(|d| d["socket"] = json!("/s"))),
        ("boot vCPUs", Box::new(|d| d["num_queues"] = json!(3))),
        ("used twice", Box::new(|d| d["pci_device_id"] = json!(0x10))),
        ("reserved", Box::new(|d| d["pci_device_id"] = json!(0))),
        ("out of range", Box::new(|d| d["pci_device_id"] = json!(32))),
        (
            "needs vhost_socket",
            Box::new(|d| {
                d.as_object_mut().unwrap().remove("vhost_socket");
            }),
        ),
    ];
    for (want, f) in bad_hot {
        let mut d = hot_body.clone();
        f(&mut d);
        let e = check_ch_add_disk(&good, &put("/api/v1/vm.add-disk", d)).unwrap_err();
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    for (body, want) in [
        (json!({ "id": "disk10", "force": true }), "unknown field"),
        (json!({}), "missing field `id`"),
        (json!({ "id": "" }), "empty id"),
    ] {
        let e = check_ch(&put("/api/v1/vm.remove-device", body)).unwrap_err();
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    assert!(check_ch(&Request::put("/api/v1/vm.info", None))
        .unwrap_err()
        .contains("a GET without a body"));
    assert!(check_ch(&Request::put("/api/v1/vm.start", None))
        .unwrap_err()
        .contains("not a documented endpoint"));
    assert!(check_ch(&Request::put("/vm.boot", None))
        .unwrap_err()
        .contains("not a documented endpoint"));
    assert!(check_ch(&put("/api/v1/vm.boot", json!({})))
        .unwrap_err()
        .contains("no body"));

    let drive = json!({ "drive_id": "disk0", "is_root_device": false, "socket": "/d.sock" });
    assert!(check_fc(&put("/drives/disk0", drive.clone())).is_ok());
    let bad_fc: Vec<(&str, Request)> = vec![
        (
            "virtio-block fields",
            put("/drives/disk0", {
                let mut x = drive.clone();
                x["is_read_only"] = json!(true);
                x
            }),
        ),
        ("in the path", put("/drives/disk1", drive.clone())),
        (
            "not a Firecracker id",
            put(
                "/drives/disk-0",
                json!({
            "drive_id": "disk-0", "is_root_device": false, "socket": "/d.sock" }),
            ),
        ),
        (
            "missing field `is_root_device`",
            put(
                "/drives/disk0",
                json!({
            "drive_id": "disk0", "socket": "/d.sock" }),
            ),
        ),
        (
            "invalid type",
            put(
                "/machine-config",
                json!({ "vcpu_count": "2", "mem_size_mib": 256 }),
            ),
        ),
        (
            "1..=32",
            put(
                "/machine-config",
                json!({ "vcpu_count": 33, "mem_size_mib": 256 }),
            ),
        ),
        (
            "unknown variant",
            put(
                "/machine-config",
                json!({
            "vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2MB" }),
            ),
        ),
        (
            "must be even",
            put(
                "/machine-config",
                json!({
            "vcpu_count": 2, "mem_size_mib": 255, "huge_pages": "2M" }),
            ),
        ),
        (
            "unknown field",
            put(
                "/network-interfaces/net0",
                json!({
            "iface_id": "net0", "host_dev_name": "tap0", "num_queues": 2 }),
            ),
        ),
        (
            "in the path",
            put(
                "/network-interfaces/net0",
                json!({
            "iface_id": "net1", "host_dev_name": "tap0" }),
            ),
        ),
        (
            "unknown variant",
            put("/actions", json!({ "action_type": "InstanceStop" })),
        ),
        (
            "under 3",
            put("/vsock", json!({ "guest_cid": 2, "uds_path": "/v.sock" })),
        ),
        (
            "not a documented endpoint",
            put("/network-interface/net0", json!({})),
        ),
    ];
    for (want, r) in bad_fc {
        let e = check_fc(&r).map(|_| ()).unwrap_err();
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    let start = put("/actions", json!({ "action_type": "InstanceStart" }));
    let machine = put(
        "/machine-config",
        json!({ "vcpu_count": 1, "mem_size_mib": 128 }),
    );
    let boot = put("/boot-source", json!({ "kernel_image_path": "/k" }));
    assert!(check_fc_boot(&[machine.clone(), boot.clone(), start.clone()]).is_ok());
    assert!(check_fc_boot(&[machine, start, boot])
        .unwrap_err()
        .contains("not last"));
}

// ---------------------------------------------------------------------------------------------
// HTTP and the hybrid vsock.

/// Splits a request on the wire into its head and body; checks it is HTTP/1.1 with a
/// Content-Length that matches the body.
fn parse_wire(bytes: &[u8]) -> (String, Vec<String>, Vec<u8>) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of head");
    let head = std::str::from_utf8(&bytes[..end]).expect("head is not UTF-8");
    let body = bytes[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap().to_string();
    let headers: Vec<String> = lines.map(str::to_string).collect();
    for h in &headers {
        assert!(
            h.split_once(':')
                .is_some_and(|(k, _)| !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
            "bad header {h:?}"
        );
    }
    let lens: Vec<usize> = headers
        .iter()
        .filter_map(|h| h.split_once(':'))
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse().expect("Content-Length"))
        .collect();
    assert_eq!(lens, [body.len()], "Content-Length of {head}");
    (request_line, headers, body)
}

#[test]
fn requests_are_http_1_1_with_the_right_content_length() {
    let d = dir();
    // A non-ASCII path: Content-Length counts bytes.
    let sb = sandbox(
        &d,
        "cloud-hypervisor",
        "",
        "[[disk]]\nsocket = \"/run/torii/d\u{e9}j\u{e0}.sock\"\n",
    );
    let rs = ch_gen::boot_requests(&sb, &paths()).unwrap();
    let (line, headers, body) = parse_wire(&rs[0].to_bytes());
    assert_eq!(line, "PUT /api/v1/vm.create HTTP/1.1");
    assert!(headers
        .iter()
        .any(|h| h == "Content-Type: application/json"));
    assert!(headers.iter().any(|h| h.starts_with("Host: ")));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(Some(&v), rs[0].body.as_ref());
    let (line, headers, body) = parse_wire(&rs[1].to_bytes());
    assert_eq!(line, "PUT /api/v1/vm.boot HTTP/1.1");
    assert!(body.is_empty());
    assert!(!headers.iter().any(|h| h.starts_with("Content-Type")));
}

/// Reads one request from `s` (head, then Content-Length bytes).
fn read_request(s: &mut BufReader<UnixStream>) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut len = 0;
    loop {
        let mut line = String::new();
        assert!(s.read_line(&mut line).unwrap() > 0, "request cut short");
        raw.extend_from_slice(line.as_bytes());
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    raw.extend_from_slice(&body);
    raw
}

/// A fake VMM API on `sock` answering one request per connection with each of `answers` in
/// turn, as micro-http does: the connection stays open after the answer until the client
/// closes it. Returns the requests received.
fn fake_api(sock: &Path, answers: Vec<String>) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        for a in answers {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut rd = BufReader::new(s);
            got.push(read_request(&mut rd));
            rd.get_mut().write_all(a.as_bytes()).unwrap();
            // Keep-alive: wait for the client to close.
            let _ = rd.read_to_end(&mut Vec::new());
        }
        got
    })
}

#[test]
fn send_takes_a_204_without_content_length_and_reports_a_400_with_its_message() {
    let d = dir();
    let sock = d.0.join("api.sock");
    let fault = r#"{"fault_message":"The id from the path does not match the id from the body!"}"#;
    let server = fake_api(
        &sock,
        vec![
            // micro-http's 204: no Content-Length, Connection: keep-alive.
            "HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n".into(),
            format!(
                "HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{fault}",
                fault.len()
            ),
            "HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"version\":\"53\"}\n"
                .into(),
        ],
    );
    let timeout = Duration::from_secs(10);
    let r = Request::put(
        "/drives/disk0",
        Some(serde_json::json!({ "drive_id": "disk0", "is_root_device": false, "socket": "/d" })),
    );
    let t0 = Instant::now();
    let ok = http::send(&sock, &r, timeout);
    assert_eq!(ok.unwrap(), "");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "a 204 waited {:?} for a body",
        t0.elapsed()
    );
    let e = http::send(&sock, &r, timeout).unwrap_err().to_string();
    assert!(
        e.contains("400") && e.contains("does not match the id from the body"),
        "{e}"
    );
    let body = http::send(&sock, &Request::put("/api/v1/vmm.ping", None), timeout).unwrap();
    assert_eq!(body, "{\"version\":\"53\"}\n");
    let got = server.join().unwrap();
    assert_eq!(got[0], r.to_bytes());
    assert_eq!(got[1], r.to_bytes());
}

#[test]
fn hybrid_vsock_connect_hands_over_the_stream_after_the_ok_line() {
    let d = dir();
    let sock = d.0.join("vsock.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let read_connect = |s: &mut UnixStream| {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).unwrap() == 1 {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            String::from_utf8(line).unwrap()
        };
        // Nobody listens in the guest yet: the VMM closes the connection.
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(read_connect(&mut s), "CONNECT 1024\n");
        drop(s);
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(read_connect(&mut s), "CONNECT 1024\n");
        // The OK line and the guest's first bytes in one write.
        s.write_all(b"OK 1073741824\nhello from the guest").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    let mut s =
        http::hybrid_vsock_connect(&sock, 1024, Duration::from_secs(10), &mut || true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 20];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello from the guest");
    s.write_all(b"ping\n").unwrap();
    assert_eq!(&server.join().unwrap(), b"ping\n");
}

#[test]
fn hybrid_vsock_connect_gives_up_after_its_timeout() {
    let d = dir();
    let e = http::hybrid_vsock_connect(
        &d.0.join("none.sock"),
        1024,
        Duration::from_millis(300),
        &mut || true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vsock port 1024"), "{e}");
}
