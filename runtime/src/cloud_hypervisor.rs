//! Cloud Hypervisor: the VM is described to its REST API (HTTP/1.1 on the Unix socket given
//! with `--api-socket`): `PUT /api/v1/vm.create` with a `VmConfig`, then `PUT /api/v1/vm.boot`.
//! The agent is reached over the hybrid vsock (`CONNECT <port>` on the vsock's Unix socket).
//!
//! Cloud Hypervisor cannot run on a machine without KVM; the requests are checked against its
//! documented API schema in the tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::http::{self, Request};
use crate::spec::{Backend, HypervisorKind, Sandbox};
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
    let disks: Vec<Value> = sb
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            json!({
                "id": format!("disk{i}"),
                "vhost_user": true,
                "vhost_socket": d.socket,
                // At most one queue per boot vCPU (`TooManyQueues`).
                "num_queues": u32::from(d.queues).min(vm.vcpus),
                "queue_size": 128,
                "readonly": d.read_only,
            })
        })
        .collect();
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
