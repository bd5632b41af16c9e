//! Firecracker: the VM is described to its API (HTTP/1.1 on `--api-sock`) one resource at a
//! time — `/machine-config`, `/boot-source`, `/drives/{id}` (vhost-user-blk through `socket`),
//! `/network-interfaces/{id}` (taps), `/vsock` — then `PUT /actions` `InstanceStart`. The agent
//! is reached over the hybrid vsock.
//!
//! Firecracker has no vhost-user-net and no PCI passthrough: a sandbox that asks for them is
//! refused before anything starts. It cannot run on a machine without KVM; the requests are
//! checked against its documented API schema in the tests.

use std::path::Path;

use serde_json::json;

use crate::cloud_hypervisor::{Paths, RestVm, GUEST_CID};
use crate::http::Request;
use crate::spec::{Backend, HypervisorKind, Sandbox};
use crate::vmm::{find_binary, Hypervisor, Vm, VmmError};

pub struct Firecracker;

/// The most vCPUs Firecracker takes (`MachineConfiguration.vcpu_count`, maximum 32).
pub const MAX_VCPUS: u32 = 32;

/// The API requests that describe and start the VM of `sb`.
pub fn boot_requests(sb: &Sandbox, paths: &Paths) -> Result<Vec<Request>, VmmError> {
    let vm = &sb.vm;
    if !vm.pin.is_empty() {
        return Err(VmmError::Launch(
            "Firecracker: vCPU pinning is done by a jailer/cgroup, not through its API".into(),
        ));
    }
    if vm.vcpus > MAX_VCPUS {
        return Err(VmmError::Launch(format!(
            "vm.vcpus: Firecracker takes at most {MAX_VCPUS} vCPUs, not {}",
            vm.vcpus
        )));
    }
    let mut machine = json!({ "vcpu_count": vm.vcpus, "mem_size_mib": vm.memory_mib });
    if vm.hugepages {
        machine["huge_pages"] = json!("2M");
    }
    let mut r = vec![
        Request::put("/machine-config", Some(machine)),
        Request::put(
            "/boot-source",
            Some(json!({
                "kernel_image_path": vm.kernel,
                "initrd_path": vm.initramfs,
                "boot_args": crate::qemu::kernel_cmdline(sb, &format!("vsock:{}", sb.agent.vsock_port))
                    .replace("console=ttyS0", "console=ttyS0 reboot=k pci=off"),
            })),
        ),
    ];
    for (i, d) in sb.disks.iter().enumerate() {
        if d.queues != 1 {
            return Err(VmmError::Launch(format!(
                "disk[{i}]: Firecracker's vhost-user-blk has one queue"
            )));
        }
        let id = format!("disk{i}");
        // A vhost-user drive has `socket` and none of the virtio-block fields: Firecracker
        // refuses `is_read_only` with `socket` (`InvalidBlockConfig`). A read-only disk is
        // read-only through its backend (VIRTIO_BLK_F_RO) and the agent's read-only mount.
        r.push(Request::put(
            format!("/drives/{id}"),
            Some(json!({
                "drive_id": id,
                "is_root_device": false,
                "socket": d.socket,
            })),
        ));
    }
    for (i, n) in sb.nics.iter().enumerate() {
        let Backend::Tap { ifname } = &n.backend else {
            return Err(VmmError::Launch(format!(
                "interface[{i}]: Firecracker takes tap interfaces only (no vhost-user-net, no VFIO)"
            )));
        };
        if n.queues != 1 {
            return Err(VmmError::Launch(format!(
                "interface[{i}]: Firecracker's virtio-net has one queue pair"
            )));
        }
        let id = format!("net{i}");
        let mut v = json!({ "iface_id": id, "host_dev_name": ifname });
        if let Some(m) = &n.mac {
            v["guest_mac"] = json!(m);
        }
        r.push(Request::put(format!("/network-interfaces/{id}"), Some(v)));
    }
    r.push(Request::put(
        "/vsock",
        Some(json!({ "guest_cid": GUEST_CID, "uds_path": paths.vsock })),
    ));
    r.push(Request::put(
        "/actions",
        Some(json!({ "action_type": "InstanceStart" })),
    ));
    Ok(r)
}

/// What a disk hot-plug on Firecracker answers: drives are described before `InstanceStart`
/// only (`PUT /drives/{id}` is pre-boot only; a vhost-user drive cannot be updated either).
pub fn no_hotplug() -> VmmError {
    VmmError::Launch(
        "Firecracker cannot hot-plug vhost-user-blk disks: its drives are given before the VM \
         starts"
            .into(),
    )
}

/// The request that asks the guest to stop (Ctrl-Alt-Del: the only power request for x86).
pub fn stop_request() -> Request {
    Request::put("/actions", Some(json!({ "action_type": "SendCtrlAltDel" })))
}

impl Hypervisor for Firecracker {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Firecracker
    }

    fn launch(&self, sb: &Sandbox, dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        let paths = Paths::new(dir);
        let requests = boot_requests(sb, &paths)?;
        let bin = match &sb.vm.binary {
            Some(b) => b.clone(),
            None => find_binary("firecracker")
                .ok_or_else(|| VmmError::Launch("firecracker not found in PATH".into()))?,
        };
        // The guest's serial console is Firecracker's stdout: it goes to the log.
        let console = paths.log.clone();
        Ok(Box::new(RestVm::launch(
            bin,
            "--api-sock",
            sb,
            paths,
            &requests,
            stop_request(),
            console,
        )?))
    }
}
