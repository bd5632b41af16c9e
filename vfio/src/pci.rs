//! The PCI model, read from sysfs under a configurable root (`/` on a host; a fake tree in
//! unit tests, as sriov-cni and sriov-network-device-plugin test theirs): devices with their
//! ids, class, driver, NUMA node and IOMMU group, PF ↔ VF links, SR-IOV counts and network
//! interfaces.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// A PCI address, `domain:bus:device.function` (`0000:03:10.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddr {
    /// 32 bits: VMD and some hypervisors put devices in domains above 0xffff.
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl Serialize for PciAddr {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PciAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for PciAddr {
    type Err = String;

    /// `0000:03:10.1`, or `03:10.1` in domain 0.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not a PCI address (domain:bus:device.function)");
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts[..] {
            [d, b, df] => (d, b, df),
            [b, df] => ("0", b, df),
            _ => return Err(bad()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let hex = |x: &str, digits: usize| {
            if x.is_empty() || x.len() > digits {
                return Err(bad());
            }
            u32::from_str_radix(x, 16).map_err(|_| bad())
        };
        let (domain, bus, device, function) =
            (hex(domain, 8)?, hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?);
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(PciAddr {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

/// Errors reading or changing sysfs; each names the device or file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("no PCI device {0}")]
    NoDevice(PciAddr),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, SysfsError>;

/// sysfs (and /dev) under a root directory.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
    /// How long the kernel may take to show a change (VFs created, a driver bound): probing
    /// a device can take seconds, under emulation more.
    settle: std::time::Duration,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new("/")
    }
}

/// A PCI device as sysfs shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PciDevice {
    pub addr: PciAddr,
    /// Vendor and device id (`0x8086`, `0x10ca`).
    pub vendor: u16,
    pub device: u16,
    /// Class code (`0x020000`: Ethernet controller).
    pub class: u32,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// `None`: no NUMA information (-1).
    pub numa_node: Option<u32>,
    pub iommu_group: Option<u32>,
    /// A VF: its PF.
    pub physfn: Option<PciAddr>,
    /// A PF: its SR-IOV counts and VFs by index.
    pub sriov: Option<Sriov>,
    /// Network interfaces of the device (in this network namespace).
    pub netdevs: Vec<String>,
}

/// SR-IOV capability of a PF.
#[derive(Clone, Debug, Serialize)]
pub struct Sriov {
    pub total_vfs: u32,
    pub num_vfs: u32,
    /// `(index, address)` of each VF, by index.
    pub vfs: Vec<(u32, PciAddr)>,
}

impl PciDevice {
    pub fn is_pf(&self) -> bool {
        self.sriov.is_some()
    }

    pub fn is_vf(&self) -> bool {
        self.physfn.is_some()
    }

    /// Class 0x02: network controller.
    pub fn is_network(&self) -> bool {
        self.class >> 16 == 0x02
    }
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs {
            root: root.into(),
            settle: std::time::Duration::from_secs(20),
        }
    }

    /// The same tree with another settle time (fake trees, where nothing ever settles).
    pub fn with_settle_time(mut self, d: std::time::Duration) -> Self {
        self.settle = d;
        self
    }

    pub fn settle_time(&self) -> std::time::Duration {
        self.settle
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/sys/bus/pci/devices`.
    pub fn pci_devices_dir(&self) -> PathBuf {
        self.root.join("sys/bus/pci/devices")
    }

    /// `<root>/sys/bus/pci/devices/<addr>`.
    pub fn device_dir(&self, addr: PciAddr) -> PathBuf {
        self.pci_devices_dir().join(addr.to_string())
    }

    pub fn class_net_dir(&self) -> PathBuf {
        self.root.join("sys/class/net")
    }

    pub fn iommu_groups_dir(&self) -> PathBuf {
        self.root.join("sys/kernel/iommu_groups")
    }

    pub fn pci_drivers_dir(&self) -> PathBuf {
        self.root.join("sys/bus/pci/drivers")
    }

    /// `<root>/dev/vfio`.
    pub fn dev_vfio_dir(&self) -> PathBuf {
        self.root.join("dev/vfio")
    }

    /// Every PCI device, by address.
    pub fn devices(&self) -> Result<Vec<PciDevice>> {
        let dir = self.pci_devices_dir();
        let mut addrs = Vec::new();
        for e in fs::read_dir(&dir).map_err(|source| io_err(&dir, source))? {
            let e = e.map_err(|source| io_err(&dir, source))?;
            if let Ok(a) = e.file_name().to_string_lossy().parse::<PciAddr>() {
                addrs.push(a);
            }
        }
        addrs.sort();
        addrs.into_iter().map(|a| self.device(a)).collect()
    }

    /// One PCI device.
    pub fn device(&self, addr: PciAddr) -> Result<PciDevice> {
        let dir = self.device_dir(addr);
        if !dir.exists() {
            return Err(SysfsError::NoDevice(addr));
        }
        let sriov = if dir.join("sriov_totalvfs").exists() {
            let mut vfs = Vec::new();
            for name in list_dir(&dir)? {
                if let Some(i) = name.strip_prefix("virtfn").and_then(|i| i.parse().ok()) {
                    if let Some(a) = link_name(&dir.join(&name)).and_then(|n| n.parse().ok()) {
                        vfs.push((i, a));
                    }
                }
            }
            vfs.sort();
            Some(Sriov {
                total_vfs: read_num(&dir.join("sriov_totalvfs"))?,
                num_vfs: read_num(&dir.join("sriov_numvfs"))?,
                vfs,
            })
        } else {
            None
        };
        let numa: i64 = read_opt(&dir.join("numa_node"))?
            .map(|s| parse(&dir.join("numa_node"), &s))
            .transpose()?
            .unwrap_or(-1);
        Ok(PciDevice {
            addr,
            vendor: read_hex(&dir.join("vendor"))? as u16,
            device: read_hex(&dir.join("device"))? as u16,
            class: read_hex(&dir.join("class"))?,
            driver: link_name(&dir.join("driver")),
            numa_node: u32::try_from(numa).ok(),
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
            physfn: link_name(&dir.join("physfn")).and_then(|n| n.parse().ok()),
            sriov,
            netdevs: match dir.join("net") {
                d if d.is_dir() => {
                    let mut n = list_dir(&d)?;
                    n.sort();
                    n
                }
                _ => Vec::new(),
            },
        })
    }

    /// The PCI device of network interface `ifname`.
    pub fn netdev_device(&self, ifname: &str) -> Result<PciAddr> {
        let link = self.class_net_dir().join(ifname).join("device");
        link_name(&link)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                SysfsError::Invalid(format!(
                    "{ifname}: no such network interface on a PCI device"
                ))
            })
    }

    /// The operational state of `ifname` (`up`, `down`, `unknown`, …).
    pub fn operstate(&self, ifname: &str) -> Option<String> {
        read_opt(&self.class_net_dir().join(ifname).join("operstate"))
            .ok()
            .flatten()
    }

    /// The devices in IOMMU group `group`.
    pub fn group_devices(&self, group: u32) -> Result<Vec<PciAddr>> {
        let dir = self
            .iommu_groups_dir()
            .join(group.to_string())
            .join("devices");
        let mut v: Vec<PciAddr> = list_dir(&dir)?
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        v.sort();
        Ok(v)
    }

    /// Writes `value` to `path` (a sysfs attribute), naming both in the error.
    pub fn write(&self, path: &Path, value: &str) -> Result<()> {
        fs::write(path, value).map_err(|source| SysfsError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(source.kind(), format!("writing {value:?}: {source}")),
        })
    }
}

fn io_err(path: &Path, source: io::Error) -> SysfsError {
    SysfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|s| io_err(dir, s))? {
        out.push(
            e.map_err(|s| io_err(dir, s))?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    Ok(out)
}

/// The last component of the symlink `path`'s target (`driver` → `igb`), if it is a link.
pub(crate) fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The trimmed content of `path`, `None` if it does not exist.
pub(crate) fn read_opt(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io_err(path, source)),
    }
}

fn read(path: &Path) -> Result<String> {
    read_opt(path)?.ok_or_else(|| io_err(path, io::ErrorKind::NotFound.into()))
}

fn parse<T: FromStr>(path: &Path, s: &str) -> Result<T> {
    s.parse().map_err(|_| SysfsError::Parse {
        path: path.to_path_buf(),
        content: s.to_string(),
    })
}

pub(crate) fn read_num(path: &Path) -> Result<u32> {
    let s = read(path)?;
    parse(path, &s)
}

fn read_hex(path: &Path) -> Result<u32> {
    let s = read(path)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| SysfsError::Parse {
        path: path.to_path_buf(),
        content: s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeTree;

    #[test]
    fn addresses_parse_and_print() {
        let a: PciAddr = "0000:03:10.1".parse().unwrap();
        assert_eq!((a.bus, a.device, a.function), (3, 0x10, 1));
        assert_eq!(a.to_string(), "0000:03:10.1");
        assert_eq!(
            "03:00.0".parse::<PciAddr>().unwrap().to_string(),
            "0000:03:00.0"
        );
        // A VMD domain has five digits.
        let v: PciAddr = "10000:e1:00.0".parse().unwrap();
        assert_eq!(
            (v.domain, v.to_string().as_str()),
            (0x10000, "10000:e1:00.0")
        );
        for bad in [
            "100000000:03:10.0",
            "",
            "0000:03:10",
            "0000:03:20.0",
            "0000:03:10.8",
            "x:03:10.0",
            "0000:003:10.0",
        ] {
            assert!(bad.parse::<PciAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_pf_with_vfs_reads_back() {
        let t = FakeTree::new();
        let pf = t.pf("0000:03:00.0", "ens1f0", 7, 2, 12);
        let s = t.sysfs();
        let d = s.device(pf).unwrap();
        assert!(d.is_pf() && d.is_network() && !d.is_vf());
        assert_eq!((d.vendor, d.device, d.class), (0x8086, 0x10c9, 0x020000));
        assert_eq!(d.driver.as_deref(), Some("igb"));
        assert_eq!(d.numa_node, None);
        assert_eq!(d.iommu_group, Some(12));
        assert_eq!(d.netdevs, ["ens1f0"]);
        let sr = d.sriov.unwrap();
        assert_eq!((sr.total_vfs, sr.num_vfs), (7, 2));
        assert_eq!(
            sr.vfs,
            [
                (0, "0000:03:10.0".parse().unwrap()),
                (1, "0000:03:10.2".parse().unwrap())
            ]
        );
        let vf = s.device("0000:03:10.2".parse().unwrap()).unwrap();
        assert_eq!(vf.physfn, Some(pf));
        assert_eq!(vf.driver.as_deref(), Some("igbvf"));
        assert_eq!(vf.netdevs, ["ens1f0v1"]);
        assert_eq!(s.netdev_device("ens1f0").unwrap(), pf);
        assert_eq!(s.devices().unwrap().len(), 3);
        assert!(matches!(
            s.device("0000:09:00.0".parse().unwrap()),
            Err(SysfsError::NoDevice(_))
        ));
    }
}
