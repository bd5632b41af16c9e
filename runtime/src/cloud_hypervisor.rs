//! Cloud Hypervisor: the VM is described to its REST API (HTTP/1.1 on the Unix socket given
//! with `--api-socket`): `PUT /api/v1/vm.create` with a `VmConfig`, then `PUT /api/v1/vm.boot`.
//! The agent is reached over the hybrid vsock (`CONNECT <port>` on the vsock's Unix socket).
//!
//! Cloud Hypervisor cannot run on a machine without KVM; the requests are checked against its
//! documented API schema in the tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::{self, Request};
use crate::spec::{Backend, Disk, HypervisorKind, Sandbox};
use crate::vmm::{find_binary, Hypervisor, Vm, VmmError, VmmProcess};

pub struct CloudHypervisor;

/// The guest's vsock context id (any value over 2; the guest has one vsock device).
pub const GUEST_CID: u32 = 3;

pub struct Paths {
    pub api: PathBuf,
    pub vsock: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            api: dir.join("api.sock"),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            log: dir.join("vmm.log"),
        }
    }
}

/// The smallest MTU Cloud Hypervisor's virtio-net takes (`virtio_devices::net::MIN_MTU`).
pub const CH_MIN_MTU: u32 = 1280;

/// The `VmConfig` of `sb`.
pub fn vm_config(sb: &Sandbox, paths: &Paths) -> Result<Value, VmmError> {
    let vm = &sb.vm;
    let mut cpus = json!({ "boot_vcpus": vm.vcpus, "max_vcpus": vm.vcpus });
    if !vm.pin.is_empty() {
        cpus["affinity"] = vm
            .pin
            .iter()
            .enumerate()
            .map(|(i, c)| json!({ "vcpu": i, "host_cpus": [c] }))
            .collect();
    }
    let mut memory = json!({
        "size": u64::from(vm.memory_mib) << 20,
        // vhost-user backends map guest memory: it must be shared.
        "shared": true,
    });
    if vm.hugepages {
        memory["hugepages"] = json!(true);
        memory["hugepage_size"] = json!(2u64 << 20);
    }
    let cmdline = crate::qemu::kernel_cmdline(sb, &format!("vsock:{}", sb.agent.vsock_port));
    let mut net = Vec::new();
    let mut devices = Vec::new();
    for (i, n) in sb.nics.iter().enumerate() {
        let mut v = match &n.backend {
            Backend::VhostUser { socket } => json!({
                "vhost_user": true,
                "vhost_socket": socket,
                "vhost_mode": "Client",
            }),
            Backend::Tap { ifname } => json!({ "tap": ifname }),
            Backend::Vfio { addr, .. } => {
                devices.push(json!({
                    "path": format!("/sys/bus/pci/devices/{addr}/"),
                    "id": format!("vfio{i}"),
                }));
                continue;
            }
        };
        v["id"] = json!(format!("net{i}"));
        // Cloud Hypervisor counts queues, not pairs, and refuses more pairs than boot vCPUs
        // (`TooManyQueues`): the guest then uses fewer pairs than the backend offers, as a
        // guest that does not enable multiqueue would.
        v["num_queues"] = json!(2 * u32::from(n.queues).min(vm.vcpus));
        v["queue_size"] = json!(256);
        if let Some(m) = &n.mac {
            v["mac"] = json!(m);
        }
        // Cloud Hypervisor refuses an MTU under virtio's 1280 (`InvalidMtu`); a smaller one is
        // set by the agent in the guest only.
        if let Some(mtu) = n.mtu.filter(|&m| m >= CH_MIN_MTU) {
            v["mtu"] = json!(mtu);
        }
        net.push(v);
    }
    let disks: Vec<Value> = sb.disks.iter().map(|d| disk_config(d, vm.vcpus)).collect();
    let mut c = json!({
        "cpus": cpus,
        "memory": memory,
        "payload": {
            "kernel": vm.kernel,
            "initramfs": vm.initramfs,
            "cmdline": cmdline,
        },
        "serial": { "mode": "File", "file": paths.console },
        "console": { "mode": "Off" },
        "vsock": { "cid": GUEST_CID, "socket": paths.vsock },
    });
    if !net.is_empty() {
        c["net"] = json!(net);
    }
    if !disks.is_empty() {
        c["disks"] = json!(disks);
    }
    if !devices.is_empty() {
        c["devices"] = json!(devices);
    }
    Ok(c)
}

/// The API requests that create and boot the VM of `sb`.
pub fn boot_requests(sb: &Sandbox, paths: &Paths) -> Result<Vec<Request>, VmmError> {
    Ok(vec![
        Request::put("/api/v1/vm.create", Some(vm_config(sb, paths)?)),
        Request::put("/api/v1/vm.boot", None),
    ])
}

/// The id of a disk's device, named by its slot: the same at boot and hot-plugged, so either
/// can be removed.
pub fn disk_id(d: &Disk) -> String {
    format!("disk{:02x}", d.slot)
}

/// The `DiskConfig` of vhost-user-blk disk `d` in a VM of `vcpus` boot vCPUs: in its guest PCI
/// slot (`pci_device_id`), where the agent looks for it.
pub fn disk_config(d: &Disk, vcpus: u32) -> Value {
    json!({
        "id": disk_id(d),
        "vhost_user": true,
        "vhost_socket": d.socket,
        // At most one queue per boot vCPU (`TooManyQueues`).
        "num_queues": u32::from(d.queues).min(vcpus),
        "queue_size": 128,
        "readonly": d.read_only,
        "pci_device_id": d.slot,
    })
}

/// The request that hot-plugs disk `d` into the running VM of `vcpus` boot vCPUs (answered
/// with its `PciDeviceInfo`).
pub fn add_disk_request(d: &Disk, vcpus: u32) -> Request {
    Request::put("/api/v1/vm.add-disk", Some(disk_config(d, vcpus)))
}

/// The request that unplugs disk `d`: Cloud Hypervisor asks the guest to eject it (ACPI) and
/// answers at once; the device leaves the device tree when the guest has let go of it.
pub fn remove_disk_request(d: &Disk) -> Request {
    Request::put(
        "/api/v1/vm.remove-device",
        Some(json!({ "id": disk_id(d) })),
    )
}

/// The request for the VM's `VmInfo` (its configuration and device tree).
pub fn info_request() -> Request {
    Request {
        method: "GET",
        path: "/api/v1/vm.info".into(),
        body: None,
    }
}

/// How long the guest may take to let go of an unplugged disk.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(20);

/// The request that ends the VMM.
pub fn shutdown_request() -> Request {
    Request::put("/api/v1/vmm.shutdown", None)
}

/// A VM whose VMM is driven through a REST API and reached over a hybrid vsock (Cloud
/// Hypervisor, Firecracker): the VMM started with `api_flag <socket>`, `requests` sent in
/// order; `stop` is what asks the VMM to end it; `console` where the guest's console goes.
pub(crate) struct RestVm {
    proc: VmmProcess,
    paths: Paths,
    port: u32,
    stop: Request,
    console: PathBuf,
    kind: HypervisorKind,
    vcpus: u32,
}

impl RestVm {
    pub(crate) fn launch(
        bin: PathBuf,
        api_flag: &str,
        sb: &Sandbox,
        paths: Paths,
        requests: &[Request],
        stop: Request,
        console: PathBuf,
    ) -> Result<RestVm, VmmError> {
        let mut cmd = Command::new(bin);
        cmd.arg(api_flag).arg(&paths.api);
        let mut proc = VmmProcess::spawn(cmd, &paths.log, sb.netns.as_deref())?;
        proc.wait_socket(&paths.api, Duration::from_secs(10))?;
        for r in requests {
            http::send(&paths.api, r, Duration::from_secs(30))?;
        }
        Ok(RestVm {
            proc,
            paths,
            port: sb.agent.vsock_port,
            stop,
            console,
            kind: sb.hypervisor,
            vcpus: sb.vm.vcpus,
        })
    }
}

impl Vm for RestVm {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn agent_stream(
        &mut self,
        timeout: Duration,
    ) -> Result<std::os::unix::net::UnixStream, VmmError> {
        let proc = &mut self.proc;
        http::hybrid_vsock_connect(&self.paths.vsock, self.port, timeout, &mut || {
            !proc.exited()
        })
    }

    fn stop(&mut self, timeout: Duration) -> Result<(), VmmError> {
        let r = http::send(&self.paths.api, &self.stop, timeout).map(|_| ());
        if !self.proc.wait_exit(timeout) {
            self.proc.kill();
        }
        // A VMM that cannot be asked any more was killed: stopped all the same.
        r.or_else(|e| match e {
            VmmError::Io { .. } => Ok(()),
            e => Err(e),
        })
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.proc.wait_exit(timeout)
    }

    fn console_tail(&mut self) -> String {
        crate::vmm::file_tail(&self.console, 20)
    }

    fn add_disk(&mut self, d: &Disk) -> Result<(), VmmError> {
        if self.kind != HypervisorKind::CloudHypervisor {
            return Err(crate::firecracker::no_hotplug());
        }
        http::send(
            &self.paths.api,
            &add_disk_request(d, self.vcpus),
            Duration::from_secs(30),
        )?;
        Ok(())
    }

    fn remove_disk(&mut self, d: &Disk) -> Result<(), VmmError> {
        if self.kind != HypervisorKind::CloudHypervisor {
            return Err(crate::firecracker::no_hotplug());
        }
        let id = disk_id(d);
        let (mut present, configured) = self.device_state(&id)?;
        // Configured: not asked yet (asked, it is out of the configuration but still in the
        // device tree until the guest ejects it).
        if present && configured {
            http::send(
                &self.paths.api,
                &remove_disk_request(d),
                Duration::from_secs(30),
            )?;
        }
        let end = Instant::now() + UNPLUG_TIMEOUT;
        while present {
            if Instant::now() >= end {
                return Err(VmmError::Api(format!(
                    "vm.remove-device {id}: the guest did not eject the disk in slot {:#04x} \
                     within {UNPLUG_TIMEOUT:?}",
                    d.slot
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
            present = self.device_state(&id)?.0;
        }
        Ok(())
    }
}

impl RestVm {
    /// Whether device `id` is in the VM's device tree, and whether in its disk configuration.
    fn device_state(&self, id: &str) -> Result<(bool, bool), VmmError> {
        let body = http::send(&self.paths.api, &info_request(), Duration::from_secs(30))?;
        let info: Value = serde_json::from_str(&body)
            .map_err(|e| VmmError::Api(format!("GET /api/v1/vm.info: {e}")))?;
        let present = info["device_tree"].get(id).is_some();
        let configured = info["config"]["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["id"] == id);
        Ok((present, configured))
    }
}

impl Hypervisor for CloudHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::CloudHypervisor
    }

    fn launch(&self, sb: &Sandbox, dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        let bin = match &sb.vm.binary {
            Some(b) => b.clone(),
            None => find_binary("cloud-hypervisor")
                .ok_or_else(|| VmmError::Launch("cloud-hypervisor not found in PATH".into()))?,
        };
        let paths = Paths::new(dir);
        let requests = boot_requests(sb, &paths)?;
        let console = paths.console.clone();
        Ok(Box::new(RestVm::launch(
            bin,
            "--api-socket",
            sb,
            paths,
            &requests,
            shutdown_request(),
            console,
        )?))
    }
}
