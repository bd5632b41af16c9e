//! Device selectors, as sriov-network-device-plugin's resource config spells them:
//! `vendors`, `devices`, `drivers`, `pfNames` (with VF index ranges, `ens1f0#0-3`),
//! `pciAddresses`, `rootDevices`. Every selector given must match (one of its entries);
//! an empty selector matches everything. The candidates are the network devices that can be
//! handed out: VFs, and PFs that have no VFs enabled.

use serde::{Deserialize, Serialize};

use crate::pci::{PciAddr, PciDevice};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selectors {
    /// Vendor ids, hex (`8086`).
    #[serde(default)]
    pub vendors: Vec<String>,
    /// Device ids, hex (`10ca`).
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub drivers: Vec<String>,
    /// PF interface names, optionally with a VF index range: `ens1f0`, `ens1f0#2-5`, `ens1f0#3`.
    #[serde(default)]
    pub pf_names: Vec<String>,
    #[serde(default)]
    pub pci_addresses: Vec<String>,
    /// PF addresses: their VFs.
    #[serde(default)]
    pub root_devices: Vec<String>,
}

/// A `pfNames` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PfName {
    name: String,
    vfs: Option<(u32, u32)>,
}

fn parse_pf_name(s: &str) -> Result<PfName, String> {
    let Some((name, range)) = s.split_once('#') else {
        return Ok(PfName {
            name: s.to_string(),
            vfs: None,
        });
    };
    let bad = || format!("pfNames entry {s:?}: expected NAME, NAME#N or NAME#FIRST-LAST");
    let num = |x: &str| x.trim().parse::<u32>().map_err(|_| bad());
    let (a, b) = match range.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(range)?, num(range)?),
    };
    if name.is_empty() || a > b {
        return Err(bad());
    }
    Ok(PfName {
        name: name.to_string(),
        vfs: Some((a, b)),
    })
}

fn parse_hex_id(kind: &str, s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{kind} {s:?} is not a hex id"))
}

/// Selectors checked and parsed once.
#[derive(Clone, Debug)]
pub struct Selector {
    vendors: Vec<u16>,
    devices: Vec<u16>,
    drivers: Vec<String>,
    pf_names: Vec<PfName>,
    addresses: Vec<PciAddr>,
    roots: Vec<PciAddr>,
}

impl Selectors {
    /// Checks every entry; the error names the one that is wrong.
    pub fn compile(&self) -> Result<Selector, String> {
        let addrs = |v: &[String]| {
            v.iter()
                .map(|a| a.parse::<PciAddr>())
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Selector {
            vendors: self
                .vendors
                .iter()
                .map(|v| parse_hex_id("vendor", v))
                .collect::<Result<_, _>>()?,
            devices: self
                .devices
                .iter()
                .map(|v| parse_hex_id("device", v))
                .collect::<Result<_, _>>()?,
            drivers: self.drivers.clone(),
            pf_names: self
                .pf_names
                .iter()
                .map(|p| parse_pf_name(p))
                .collect::<Result<_, _>>()?,
            addresses: addrs(&self.pci_addresses)?,
            roots: addrs(&self.root_devices)?,
        })
    }
}

impl Selector {
    /// The devices of `all` (every PCI device, as [`crate::pci::Sysfs::devices`] lists them)
    /// that are candidates and match, in address order.
    pub fn select<'a>(&self, all: &'a [PciDevice]) -> Vec<&'a PciDevice> {
        all.iter()
            .filter(|d| d.is_network() && d.sriov.as_ref().is_none_or(|s| s.num_vfs == 0))
            .filter(|d| self.matches(d, all))
            .collect()
    }

    fn matches(&self, d: &PciDevice, all: &[PciDevice]) -> bool {
        let any = |empty: bool, hit: bool| empty || hit;
        let pf = d.physfn.and_then(|p| all.iter().find(|x| x.addr == p));
        let vf_index = pf.and_then(|pf| {
            pf.sriov
                .as_ref()?
                .vfs
                .iter()
                .find(|(_, a)| *a == d.addr)
                .map(|(i, _)| *i)
        });
        any(self.vendors.is_empty(), self.vendors.contains(&d.vendor))
            && any(self.devices.is_empty(), self.devices.contains(&d.device))
            && any(
                self.drivers.is_empty(),
                d.driver.as_ref().is_some_and(|x| self.drivers.contains(x)),
            )
            && any(self.addresses.is_empty(), self.addresses.contains(&d.addr))
            && any(
                self.roots.is_empty(),
                d.physfn.is_some_and(|p| self.roots.contains(&p)),
            )
            && any(
                self.pf_names.is_empty(),
                self.pf_names.iter().any(|p| {
                    let Some(pf) = pf else { return false };
                    pf.netdevs.contains(&p.name)
                        && match (p.vfs, vf_index) {
                            (None, _) => true,
                            (Some((a, b)), Some(i)) => (a..=b).contains(&i),
                            (Some(_), None) => false,
                        }
                }),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeDevice, FakeTree};

    fn tree() -> FakeTree {
        let t = FakeTree::new();
        t.pf("0000:03:00.0", "ens1f0", 7, 4, 10);
        t.pf("0000:04:00.0", "ens2f0", 7, 2, 20);
        // A NIC without SR-IOV, and a PF with none enabled: candidates themselves.
        t.device(FakeDevice {
            addr: "0000:05:00.0",
            vendor: 0x15b3,
            device: 0x1017,
            class: 0x020000,
            driver: Some("mlx5_core"),
            iommu_group: Some(30),
            netdev: Some("ens3"),
        });
        t.pf("0000:06:00.0", "ens4", 7, 0, 40);
        // Not a network device.
        t.device(FakeDevice {
            addr: "0000:00:04.0",
            vendor: 0x1234,
            device: 0x11e8,
            class: 0x00ff00,
            driver: None,
            iommu_group: Some(3),
            netdev: None,
        });
        t
    }

    fn pick(t: &FakeTree, json: &str) -> Vec<String> {
        let all = t.sysfs().devices().unwrap();
        let s: Selectors = serde_json::from_str(json).unwrap();
        s.compile()
            .unwrap()
            .select(&all)
            .iter()
            .map(|d| d.addr.to_string())
            .collect()
    }

    #[test]
    fn selectors_pick_what_the_device_plugin_would() {
        let t = tree();
        assert_eq!(pick(&t, "{}").len(), 4 + 2 + 1 + 1);
        assert_eq!(
            pick(&t, r#"{"pfNames": ["ens1f0#1-2"]}"#),
            ["0000:03:10.2", "0000:03:10.4"]
        );
        assert_eq!(pick(&t, r#"{"pfNames": ["ens2f0"]}"#).len(), 2);
        assert_eq!(
            pick(&t, r#"{"pfNames": ["ens1f0#3", "ens2f0#0"]}"#),
            ["0000:03:10.6", "0000:04:10.0"]
        );
        assert_eq!(
            pick(
                &t,
                r#"{"rootDevices": ["0000:04:00.0"], "drivers": ["igbvf"]}"#
            ),
            ["0000:04:10.0", "0000:04:10.2"]
        );
        assert_eq!(pick(&t, r#"{"vendors": ["15b3"]}"#), ["0000:05:00.0"]);
        assert_eq!(
            pick(&t, r#"{"devices": ["10c9"]}"#),
            ["0000:06:00.0"],
            "only the PF without VFs"
        );
        assert_eq!(
            pick(&t, r#"{"pciAddresses": ["0000:03:10.0", "0000:00:04.0"]}"#),
            ["0000:03:10.0"]
        );
        assert!(pick(&t, r#"{"vendors": ["8086"], "drivers": ["vfio-pci"]}"#).is_empty());
    }

    #[test]
    fn bad_selectors_name_the_entry() {
        for (json, want) in [
            (r#"{"pfNames": ["ens1f0#3-1"]}"#, "ens1f0#3-1"),
            (r##"{"pfNames": ["#1"]}"##, "#1"),
            (r#"{"vendors": ["xyz"]}"#, "vendor \"xyz\""),
            (r#"{"pciAddresses": ["0000:03"]}"#, "0000:03"),
        ] {
            let s: Selectors = serde_json::from_str(json).unwrap();
            let e = s.compile().unwrap_err();
            assert!(e.contains(want), "{e} does not name {want}");
        }
        assert!(serde_json::from_str::<Selectors>(r#"{"pfname": []}"#).is_err());
    }
}
