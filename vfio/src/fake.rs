//! Fake sysfs trees for tests: the files and links the kernel shows for PCI devices, PFs with
//! VFs, drivers, IOMMU groups and network interfaces, under a temporary root. The same code
//! runs against the real kernel in the SR-IOV rig (`vfio/tests/rig.rs`).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;
use std::io;

use crate::netlink::{VfControl, VfInfoReport, VfSetting, VlanProto};
use crate::pci::{PciAddr, Sysfs};

/// A temporary root with a fake `sys/`; removed on drop.
pub struct FakeTree {
    root: PathBuf,
}

impl Default for FakeTree {
    fn default() -> Self {
        Self::new()
    }
}

/// One fake PCI device.
pub struct FakeDevice<'a> {
    pub addr: &'a str,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub driver: Option<&'a str>,
    pub iommu_group: Option<u32>,
    pub netdev: Option<&'a str>,
}

impl FakeTree {
    pub fn new() -> FakeTree {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let root = std::env::temp_dir().join(format!(
            "torii-fake-sysfs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/class/net",
            "sys/kernel/iommu_groups",
            "dev/vfio",
        ] {
            fs::create_dir_all(root.join(d)).expect("fake sysfs dir");
        }
        fs::write(root.join("sys/bus/pci/drivers_probe"), "").expect("drivers_probe");
        FakeTree { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The tree, with a short settle time: no kernel acts on what is written here.
    pub fn sysfs(&self) -> Sysfs {
        Sysfs::new(&self.root).with_settle_time(std::time::Duration::from_millis(100))
    }

    fn write(&self, path: &Path, content: &str) {
        if let Some(p) = path.parent() {
            fs::create_dir_all(p).expect("fake dir");
        }
        fs::write(path, content).expect("fake file");
    }

    fn link(&self, from: &Path, to: &str) {
        let _ = fs::remove_file(from);
        if let Some(p) = from.parent() {
            fs::create_dir_all(p).expect("fake dir");
        }
        symlink(to, from).expect("fake link");
    }

    /// Adds a device; returns its address.
    pub fn device(&self, d: FakeDevice<'_>) -> PciAddr {
        let addr: PciAddr = d.addr.parse().expect("fake address");
        let dir = self.sysfs().device_dir(addr);
        fs::create_dir_all(&dir).expect("fake device dir");
        self.write(&dir.join("vendor"), &format!("0x{:04x}\n", d.vendor));
        self.write(&dir.join("device"), &format!("0x{:04x}\n", d.device));
        self.write(&dir.join("class"), &format!("0x{:06x}\n", d.class));
        self.write(&dir.join("numa_node"), "-1\n");
        self.write(&dir.join("driver_override"), "(null)\n");
        if let Some(drv) = d.driver {
            self.bind(addr, drv);
        }
        if let Some(g) = d.iommu_group {
            self.link(
                &dir.join("iommu_group"),
                &format!("../../../../kernel/iommu_groups/{g}"),
            );
            let gd = self
                .root
                .join(format!("sys/kernel/iommu_groups/{g}/devices"));
            self.link(
                &gd.join(addr.to_string()),
                &format!("../../../../bus/pci/devices/{addr}"),
            );
        }
        if let Some(n) = d.netdev {
            self.add_netdev(addr, n);
        }
        addr
    }

    /// Shows `ifname` as a network interface of `addr`.
    pub fn add_netdev(&self, addr: PciAddr, ifname: &str) {
        let dir = self.sysfs().device_dir(addr);
        fs::create_dir_all(dir.join("net").join(ifname)).expect("fake net dir");
        let cn = self.root.join("sys/class/net").join(ifname);
        fs::create_dir_all(&cn).expect("fake class/net");
        self.link(
            &cn.join("device"),
            &format!("../../../bus/pci/devices/{addr}"),
        );
        self.write(&cn.join("operstate"), "up\n");
    }

    /// Binds `addr` to `driver` (as the kernel's `driver` link shows it).
    pub fn bind(&self, addr: PciAddr, driver: &str) {
        let dir = self.sysfs().device_dir(addr);
        let drv = self.root.join("sys/bus/pci/drivers").join(driver);
        fs::create_dir_all(&drv).expect("fake driver dir");
        for f in ["bind", "unbind"] {
            if !drv.join(f).exists() {
                self.write(&drv.join(f), "");
            }
        }
        self.link(&dir.join("driver"), &format!("../../drivers/{driver}"));
    }

    /// Binds `addr` to vfio-pci as the kernel would after a rebind: the driver link changes
    /// and the network interface the old driver made goes.
    pub fn to_vfio(&self, addr: PciAddr) {
        let net = self.sysfs().device_dir(addr).join("net");
        if let Ok(rd) = fs::read_dir(&net) {
            for e in rd.flatten() {
                let _ = fs::remove_dir_all(self.root.join("sys/class/net").join(e.file_name()));
            }
        }
        let _ = fs::remove_dir_all(net);
        self.bind(addr, crate::bind::VFIO_PCI);
    }

    /// Unbinds `addr` from its driver.
    pub fn unbind(&self, addr: PciAddr) {
        let _ = fs::remove_file(self.sysfs().device_dir(addr).join("driver"));
    }

    /// An Intel 82576 (igb) PF at `addr` with interface `ifname`, `total` VFs possible and
    /// `num` enabled (at 0000:bb:10.0, 10.2, …, bound to igbvf, interfaces `<ifname>v<i>`),
    /// in IOMMU group `group` (VF i in group `group + 1 + i`).
    pub fn pf(&self, addr: &str, ifname: &str, total: u32, num: u32, group: u32) -> PciAddr {
        let pf = self.device(FakeDevice {
            addr,
            vendor: 0x8086,
            device: 0x10c9,
            class: 0x020000,
            driver: Some("igb"),
            iommu_group: Some(group),
            netdev: Some(ifname),
        });
        let dir = self.sysfs().device_dir(pf);
        self.write(&dir.join("sriov_totalvfs"), &format!("{total}\n"));
        self.write(&dir.join("sriov_numvfs"), &format!("{num}\n"));
        for i in 0..num {
            let va = format!("{:04x}:{:02x}:10.{}", pf.domain, pf.bus, 2 * i);
            let vf = self.device(FakeDevice {
                addr: &va,
                vendor: 0x8086,
                device: 0x10ca,
                class: 0x020000,
                driver: Some("igbvf"),
                iommu_group: Some(group + 1 + i),
                netdev: Some(&format!("{ifname}v{i}")),
            });
            self.link(&dir.join(format!("virtfn{i}")), &format!("../{vf}"));
            self.link(
                &self.sysfs().device_dir(vf).join("physfn"),
                &format!("../{pf}"),
            );
        }
        pf
    }

    /// The content of a file under the root (what the code under test wrote).
    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }
}

impl Drop for FakeTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A fake PF driver's VF table behind [`VfControl`]: it keeps what each VF is set to, records
/// every request in order, and refuses the settings named in `refuse` (as igb refuses `state`),
/// so the code above it can be tested on a fake sysfs tree.
#[derive(Debug, Default)]
pub struct FakeVfs {
    /// (PF interface, VF) → what the PF reports.
    pub vfs: BTreeMap<(String, u32), VfInfoReport>,
    /// `"<pf> vf <n> <setting> <value>"`, one per request taken or refused.
    pub log: Vec<String>,
    /// Setting names (`VfSetting::name`) the driver refuses.
    pub refuse: Vec<&'static str>,
}

impl FakeVfs {
    /// `n` VFs on PF `pf` as a driver shows them fresh: no MAC, no VLAN, spoof checking on,
    /// trust off, no rate limit, link state auto.
    pub fn with_pf(pf: &str, n: u32) -> FakeVfs {
        let mut f = FakeVfs::default();
        for vf in 0..n {
            f.vfs.insert(
                (pf.to_string(), vf),
                VfInfoReport {
                    vf,
                    mac: [0; 6],
                    vlan: 0,
                    qos: 0,
                    vlan_proto: VlanProto::Dot1Q,
                    spoofchk: Some(true),
                    trust: Some(false),
                    min_tx_rate: 0,
                    max_tx_rate: 0,
                    link_state: Some(crate::netlink::LinkState::Auto),
                },
            );
        }
        f
    }

    /// The VFs of `pf`, in order.
    pub fn reports(&self, pf: &str) -> Vec<VfInfoReport> {
        self.vfs
            .iter()
            .filter(|((p, _), _)| p == pf)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl VfControl for FakeVfs {
    fn pf_vfs(&mut self, pf: &str) -> io::Result<Vec<VfInfoReport>> {
        let v = self.reports(pf);
        if v.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no network interface {pf:?}"),
            ));
        }
        Ok(v)
    }

    fn set_pf_vf(&mut self, pf: &str, vf: u32, s: VfSetting) -> io::Result<()> {
        let entry = format!("{pf} vf {vf} {} {s:?}", s.name());
        if self.refuse.contains(&s.name()) {
            self.log.push(format!("{entry} refused"));
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let r = self
            .vfs
            .get_mut(&(pf.to_string(), vf))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        s.apply(r);
        self.log.push(entry);
        Ok(())
    }
}
