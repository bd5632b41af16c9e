//! The SR-IOV and VFIO rig: a QEMU (TCG) q35 guest with an emulated VT-d (`intel-iommu`), an
//! SR-IOV capable `igb` NIC (82576, 7 VFs) behind a PCIe root port and QEMU's `edu` DMA test
//! device, booting the project's 6.12 guest kernel with the igb, igbvf and VFIO modules. The
//! host's `/` is shared read-only and the guest chroots into it, so it runs this build's
//! binaries and the host's tools against a real kernel and real (emulated) hardware.

use std::time::Duration;

use crate::guest::{Guest, GuestBuilder};
use crate::OrFail;

/// How long one command in the guest may take.
const T: Duration = Duration::from_secs(120);

pub struct SriovRig {
    guest: Guest,
}

impl SriovRig {
    /// Boots the rig and prepares the chroot (the guest's own proc, sys and dev; a writable
    /// `/run`, with `/run/rig` for scratch files; the host's `/tmp` stays visible, since the
    /// build under test may live there).
    pub fn boot() -> SriovRig {
        let mut g = GuestBuilder::new()
            .memory_mib(1024)
            .smp(1)
            .host_root_share(true)
            .append("torii.mods=sriov intel_iommu=on iommu=pt")
            .early_qemu_arg("-machine")
            .early_qemu_arg("q35")
            .early_qemu_arg("-device")
            .early_qemu_arg("intel-iommu,intremap=on")
            // An igb PF (SR-IOV needs PCIe: a root port) whose link partner reaches nothing.
            .extra_qemu_arg("-netdev")
            .extra_qemu_arg("user,id=n1,restrict=on")
            .extra_qemu_arg("-device")
            .extra_qemu_arg("pcie-root-port,id=rp1,chassis=1")
            .extra_qemu_arg("-device")
            .extra_qemu_arg("igb,bus=rp1,netdev=n1,mac=52:54:00:00:10:01")
            .extra_qemu_arg("-device")
            .extra_qemu_arg("edu")
            .spawn()
            .or_fail("starting QEMU");
        g.wait_ready(Duration::from_secs(180)).or_fail("guest boot");
        let mods = g.run("test -f /mods/sriov.order", T).or_fail("guest");
        assert_eq!(
            mods.rc, 0,
            "the guest image has no igb/igbvf/VFIO modules: run scripts/setup to rebuild it"
        );
        g.run_ok(
            "mount -t proc proc /host/proc && mount -t sysfs sysfs /host/sys && \
             mount -t devtmpfs devtmpfs /host/dev && mount -t tmpfs tmpfs /host/run && \
             mkdir -p /host/run/rig",
            T,
        )
        .or_fail("chroot mounts");
        SriovRig { guest: g }
    }

    /// Runs a bash script in the chroot; returns (exit code, stdout, stderr).
    pub fn chroot(&mut self, cmd: &str) -> (i32, String, String) {
        use base64::Engine as _;
        let script = base64::engine::general_purpose::STANDARD.encode(cmd);
        let out = self
            .guest
            .run(
                &format!(
                    "echo {script} | base64 -d > /host/run/rig/c.sh; PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin chroot /host /bin/bash /run/rig/c.sh 2>/tmp/err; rc=$?; echo TORII-STDERR; cat /tmp/err; (exit $rc)"
                ),
                T,
            )
            .or_fail(cmd);
        let (stdout, stderr) = out
            .stdout
            .split_once("TORII-STDERR\n")
            .unwrap_or((&out.stdout, ""));
        (out.rc, stdout.to_string(), stderr.to_string())
    }

    /// Runs a bash script in the chroot that must succeed; its stdout.
    pub fn ok(&mut self, cmd: &str) -> String {
        let (rc, out, err) = self.chroot(cmd);
        assert_eq!(rc, 0, "`{cmd}` failed: {out}\nstderr: {err}");
        out
    }

    /// The igb PF: (PCI address, interface), brought up.
    pub fn pf(&mut self) -> (String, String) {
        let out = self.ok(
            "for n in /sys/class/net/*; do [ \"$(basename $(readlink $n/device/driver) 2>/dev/null)\" = igb ] && echo $(basename $(readlink $n/device)) $(basename $n); done; true",
        );
        let mut it = out.split_whitespace();
        let (Some(addr), Some(ifname)) = (it.next(), it.next()) else {
            panic!("no igb PF in the rig: {out}");
        };
        let (addr, ifname) = (addr.to_string(), ifname.to_string());
        self.ok(&format!("ip link set {ifname} up"));
        (addr, ifname)
    }
}
