//! Binding a device to vfio-pci for VM passthrough and back to its original driver, the IOMMU
//! group viability check, and the passthrough spec a VMM needs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::pci::{link_name, read_opt, PciAddr, Result, Sysfs, SysfsError};

pub const VFIO_PCI: &str = "vfio-pci";

/// Drivers that may hold a device of a group that is handed to VFIO: they do no DMA of their
/// own (or manage it for VFIO), as the kernel's DMA-ownership check sees them.
const GROUP_SAFE_DRIVERS: [&str; 3] = [VFIO_PCI, "pci-stub", "pcieport"];

/// What a VMM needs to pass a device through.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PassthroughSpec {
    pub addr: PciAddr,
    pub iommu_group: u32,
    /// The legacy VFIO group node, `/dev/vfio/<group>`.
    pub group_path: PathBuf,
    /// The device's IOMMUFD character device (`/dev/vfio/devices/vfioN`), where the kernel
    /// has one.
    pub cdev_path: Option<PathBuf>,
    pub numa_node: Option<u32>,
}

/// Checks that every device in `addr`'s IOMMU group is unbound or held by a driver that lets
/// VFIO own the group's DMA.
pub fn check_group_viable(sys: &Sysfs, addr: PciAddr) -> Result<u32> {
    check_group(sys, addr, false)
}

/// The group check; `others_only`: `addr` itself is left out (it is about to be bound).
fn check_group(sys: &Sysfs, addr: PciAddr, others_only: bool) -> Result<u32> {
    let d = sys.device(addr)?;
    let group = d.iommu_group.ok_or_else(|| {
        SysfsError::Invalid(format!(
            "{addr}: no IOMMU group (is the IOMMU enabled: intel_iommu=on / amd_iommu=on?)"
        ))
    })?;
    for other in sys.group_devices(group)? {
        if others_only && other == addr {
            continue;
        }
        let drv = link_name(&sys.device_dir(other).join("driver"));
        if let Some(drv) = drv.filter(|d| !GROUP_SAFE_DRIVERS.contains(&d.as_str())) {
            return Err(SysfsError::Invalid(format!(
                "{addr}: IOMMU group {group} not viable: {other} still bound to {drv}"
            )));
        }
    }
    Ok(group)
}

/// What binding to vfio-pci changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// It was bound to vfio-pci already; nothing changed.
    Already,
    /// It was taken from this driver.
    From(String),
    /// It had no driver.
    FromUnbound,
}

impl Bound {
    /// The driver to give the device back to (`None`: leave it unbound, or with vfio-pci).
    pub fn previous_driver(&self) -> Option<&str> {
        match self {
            Bound::From(d) => Some(d),
            Bound::Already | Bound::FromUnbound => None,
        }
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Already => write!(f, "already bound to vfio-pci"),
            Bound::From(d) => write!(f, "bound to vfio-pci (was {d})"),
            Bound::FromUnbound => write!(f, "bound to vfio-pci (was unbound)"),
        }
    }
}

/// Binds `addr` to vfio-pci (driver_override, unbind, drivers_probe) and says what it had.
/// The rest of its IOMMU group is checked first, so a group that could not be handed to a VM
/// changes nothing; on a failure later the device is given back to its driver.
pub fn bind_vfio(sys: &Sysfs, addr: PciAddr) -> Result<Bound> {
    let d = sys.device(addr)?;
    if d.driver.as_deref() == Some(VFIO_PCI) {
        return Ok(Bound::Already);
    }
    check_group(sys, addr, true)?;
    let original = d.driver.clone();
    let dir = sys.device_dir(addr);
    sys.write(&dir.join("driver_override"), VFIO_PCI)?;
    let r = (|| {
        if original.is_some() {
            sys.write(&dir.join("driver/unbind"), &addr.to_string())?;
        }
        sys.write(
            &sys.root().join("sys/bus/pci/drivers_probe"),
            &addr.to_string(),
        )?;
        wait_driver(sys, addr, Some(VFIO_PCI))
    })();
    if let Err(e) = r {
        // Give the device back; the first error is the one to report.
        let _ = rebind(sys, addr, original.as_deref());
        return Err(e);
    }
    Ok(original.map_or(Bound::FromUnbound, Bound::From))
}

/// Unbinds `addr` from whatever holds it, clears its driver_override and binds it to
/// `driver` (none: leave it unbound).
pub fn rebind(sys: &Sysfs, addr: PciAddr, driver: Option<&str>) -> Result<()> {
    let dir = sys.device_dir(addr);
    if dir.join("driver").exists() || link_name(&dir.join("driver")).is_some() {
        sys.write(&dir.join("driver/unbind"), &addr.to_string())?;
    }
    // An empty line clears the override.
    sys.write(&dir.join("driver_override"), "\n")?;
    if let Some(drv) = driver {
        sys.write(
            &sys.pci_drivers_dir().join(drv).join("bind"),
            &addr.to_string(),
        )?;
    }
    wait_driver(sys, addr, driver)
}

/// The driver override of `addr`, if one is set.
pub fn driver_override(sys: &Sysfs, addr: PciAddr) -> Result<Option<String>> {
    Ok(read_opt(&sys.device_dir(addr).join("driver_override"))?
        .filter(|s| !s.is_empty() && s != "(null)"))
}

fn wait_driver(sys: &Sysfs, addr: PciAddr, want: Option<&str>) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let now = link_name(&sys.device_dir(addr).join("driver"));
        if now.as_deref() == want {
            return Ok(());
        }
        if t0.elapsed() > sys.settle_time() {
            return Err(SysfsError::Invalid(format!(
                "{addr}: expected driver {}, found {} after {:?}",
                want.unwrap_or("none"),
                now.as_deref().unwrap_or("none"),
                sys.settle_time()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The passthrough spec of `addr`, which must be bound to vfio-pci in a viable group.
pub fn passthrough_spec(sys: &Sysfs, addr: PciAddr) -> Result<PassthroughSpec> {
    let d = sys.device(addr)?;
    if d.driver.as_deref() != Some(VFIO_PCI) {
        return Err(SysfsError::Invalid(format!(
            "{addr}: bound to {}, not vfio-pci",
            d.driver.as_deref().unwrap_or("no driver")
        )));
    }
    let group = check_group_viable(sys, addr)?;
    let vfio_dev = sys.device_dir(addr).join("vfio-dev");
    let cdev_path = std::fs::read_dir(&vfio_dev).ok().and_then(|mut it| {
        it.find_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().into_owned();
            n.starts_with("vfio")
                .then(|| sys.root().join("dev/vfio/devices").join(n))
        })
    });
    Ok(PassthroughSpec {
        addr,
        iommu_group: group,
        group_path: sys.dev_vfio_dir().join(group.to_string()),
        cdev_path,
        numa_node: d.numa_node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeDevice, FakeTree};

    #[test]
    fn group_viability_names_the_blocking_device() {
        let t = FakeTree::new();
        let pf = t.pf("0000:03:00.0", "ens1f0", 7, 2, 10);
        let vf: PciAddr = "0000:03:10.0".parse().unwrap();
        let s = t.sysfs();
        // A VF alone in its group, bound to igbvf: its own driver blocks it.
        let e = check_group_viable(&s, vf).unwrap_err().to_string();
        assert_eq!(
            e,
            "0000:03:10.0: IOMMU group 11 not viable: 0000:03:10.0 still bound to igbvf"
        );
        t.bind(vf, VFIO_PCI);
        assert_eq!(check_group_viable(&s, vf).unwrap(), 11);
        // A broken group: a second function shares the group and is bound to igb.
        t.device(FakeDevice {
            addr: "0000:03:10.1",
            vendor: 0x8086,
            device: 0x10c9,
            class: 0x020000,
            driver: Some("igb"),
            iommu_group: Some(11),
            netdev: None,
        });
        let e = check_group_viable(&s, vf).unwrap_err().to_string();
        assert!(e.ends_with("0000:03:10.1 still bound to igb"), "{e}");
        // Binding into that group is refused before anything is written.
        t.bind(vf, "igbvf");
        let e = bind_vfio(&s, vf).unwrap_err().to_string();
        assert!(e.ends_with("0000:03:10.1 still bound to igb"), "{e}");
        assert_eq!(driver_override(&s, vf).unwrap(), None);
        assert_eq!(t.read("sys/bus/pci/drivers/igbvf/unbind"), "");
        t.bind(vf, VFIO_PCI);
        // Bound already: nothing is written, and the caller is told so.
        assert_eq!(bind_vfio(&s, vf).unwrap(), Bound::Already);
        assert_eq!(Bound::Already.previous_driver(), None);
        assert_eq!(driver_override(&s, vf).unwrap(), None);
        // Bridges and stubs do not block, nor does an unbound device.
        t.bind("0000:03:10.1".parse().unwrap(), "pcieport");
        assert!(check_group_viable(&s, vf).is_ok());
        t.unbind("0000:03:10.1".parse().unwrap());
        assert!(check_group_viable(&s, vf).is_ok());
        let spec = passthrough_spec(&s, vf).unwrap();
        assert_eq!(spec.group_path, t.root().join("dev/vfio/11"));
        assert_eq!(spec.cdev_path, None);
        // A kernel with IOMMUFD shows the device's character device under vfio-dev/.
        std::fs::create_dir_all(s.device_dir(vf).join("vfio-dev/vfio3")).unwrap();
        let spec = passthrough_spec(&s, vf).unwrap();
        assert_eq!(
            spec.cdev_path,
            Some(t.root().join("dev/vfio/devices/vfio3"))
        );
        let e = passthrough_spec(&s, pf).unwrap_err().to_string();
        assert_eq!(e, "0000:03:00.0: bound to igb, not vfio-pci");
    }

    #[test]
    fn a_device_without_a_group_is_refused_with_the_reason() {
        let t = FakeTree::new();
        let a = t.device(FakeDevice {
            addr: "0000:07:00.0",
            vendor: 0x8086,
            device: 0x1533,
            class: 0x020000,
            driver: None,
            iommu_group: None,
            netdev: None,
        });
        let e = check_group_viable(&t.sysfs(), a).unwrap_err().to_string();
        assert!(e.contains("no IOMMU group"), "{e}");
    }

    #[test]
    fn a_failed_bind_writes_the_override_and_gives_the_device_back() {
        // The fake has no kernel to bind the device: the bind times out, and the device is
        // handed back to its driver through that driver's `bind` file.
        let t = FakeTree::new();
        t.pf("0000:03:00.0", "ens1f0", 7, 1, 10);
        let vf: PciAddr = "0000:03:10.0".parse().unwrap();
        let s = t.sysfs();
        let e = bind_vfio(&s, vf).unwrap_err().to_string();
        assert!(e.contains("expected driver vfio-pci, found igbvf"), "{e}");
        assert_eq!(t.read("sys/bus/pci/drivers/igbvf/unbind"), "0000:03:10.0");
        assert_eq!(t.read("sys/bus/pci/drivers_probe"), "0000:03:10.0");
        assert_eq!(t.read("sys/bus/pci/drivers/igbvf/bind"), "0000:03:10.0");
        assert_eq!(driver_override(&s, vf).unwrap(), None);
    }
}
