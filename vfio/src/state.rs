//! A VF's whole state — what its PF enforces (admin MAC, VLAN, QoS, protocol, spoof check,
//! trust, rates, link state), its own interface (name, effective MAC, MTU) and its driver —
//! saved before it is handed out and restored exactly when it comes back, so nothing of one
//! tenant's configuration is left for the next.

use std::time::Instant;

use netlink_packet_route::link::LinkAttribute;
use serde::{Deserialize, Serialize};

use crate::bind::{driver_override, rebind};
use crate::netlink::{ifindex, Netlink, VfControl, VfInfoReport, VfSetting};
use crate::pci::{PciAddr, Sysfs};

/// Everything restored of a VF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfState {
    pub pf: PciAddr,
    pub pf_ifname: String,
    pub vf: u32,
    pub addr: PciAddr,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    /// The VF's interface in this namespace, if its driver makes one.
    pub ifname: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: Option<bool>,
    /// What the PF enforces.
    pub admin: VfInfoReport,
}

/// Why a save or restore failed; names the VF (`VF 1 of ens1f0 (0000:03:10.2)`) and the step.
#[derive(Debug, thiserror::Error)]
#[error("{who}: {what}")]
pub struct StateError {
    pub who: String,
    pub what: String,
}

fn netdev_of(sys: &Sysfs, addr: PciAddr) -> Option<String> {
    sys.device(addr).ok()?.netdevs.into_iter().next()
}

/// An interface's MAC, MTU and whether it is up.
fn link_info(nl: &mut Netlink, ifname: &str) -> std::io::Result<([u8; 6], u32, bool)> {
    use netlink_packet_route::link::LinkFlags;
    let l = nl.link(ifindex(ifname)?)?;
    let up = l.header.flags.contains(LinkFlags::Up);
    let (mut mac, mut mtu) = ([0u8; 6], 0);
    for a in &l.attributes {
        match a {
            LinkAttribute::Address(m) if m.len() == 6 => mac.copy_from_slice(m),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    Ok((mac, mtu, up))
}

impl VfState {
    /// Reads VF `vf` of the PF whose interface is `pf_ifname`: what the PF enforces through
    /// `ctl`, the VF's own interface (if it has one) through the kernel.
    pub fn save(
        sys: &Sysfs,
        ctl: &mut dyn VfControl,
        pf_ifname: &str,
        vf: u32,
    ) -> Result<VfState, StateError> {
        let err0 = |what: String| StateError {
            who: format!("VF {vf} of {pf_ifname}"),
            what,
        };
        let pf = sys
            .netdev_device(pf_ifname)
            .map_err(|e| err0(e.to_string()))?;
        let pfd = sys.device(pf).map_err(|e| err0(e.to_string()))?;
        let addr = pfd
            .sriov
            .as_ref()
            .and_then(|s| s.vfs.iter().find(|(i, _)| *i == vf).map(|(_, a)| *a))
            .ok_or_else(|| err0(format!("{pf} has no VF {vf}")))?;
        let fail = |what: String| StateError {
            who: format!("VF {vf} of {pf_ifname} ({addr})"),
            what,
        };
        let d = sys.device(addr).map_err(|e| fail(e.to_string()))?;
        let admin = ctl
            .pf_vfs(pf_ifname)
            .map_err(|e| fail(format!("reading VF info of {pf_ifname}: {e}")))?
            .into_iter()
            .find(|r| r.vf == vf)
            .ok_or_else(|| fail(format!("{pf_ifname} reports no VF {vf}")))?;
        let ifname = d.netdevs.first().cloned();
        let (mac, mtu, up) = match &ifname {
            Some(n) => {
                let mut nl = Netlink::open().map_err(|e| fail(format!("netlink: {e}")))?;
                let (m, t, u) = link_info(&mut nl, n).map_err(|e| fail(format!("{n}: {e}")))?;
                (Some(m), Some(t), Some(u))
            }
            None => (None, None, None),
        };
        Ok(VfState {
            pf,
            pf_ifname: pf_ifname.into(),
            vf,
            addr,
            driver: d.driver,
            driver_override: driver_override(sys, addr).map_err(|e| fail(e.to_string()))?,
            ifname,
            mac,
            mtu,
            up,
            admin,
        })
    }

    /// The state of device `d` if it is a VF whose PF has an interface (what an allocation
    /// restores on release); `None` for other devices.
    pub fn save_device(
        sys: &Sysfs,
        ctl: &mut dyn VfControl,
        d: &crate::pci::PciDevice,
    ) -> Result<Option<VfState>, StateError> {
        let Some(pf) = d.physfn else {
            return Ok(None);
        };
        let err = |what: String| StateError {
            who: format!("{} (VF of {pf})", d.addr),
            what,
        };
        let pfd = sys.device(pf).map_err(|e| err(e.to_string()))?;
        let Some(pf_if) = pfd.netdevs.first() else {
            return Err(err(format!("its PF {pf} has no network interface")));
        };
        let index = pfd
            .sriov
            .iter()
            .flat_map(|s| &s.vfs)
            .find(|(_, a)| *a == d.addr)
            .map(|(i, _)| *i)
            .ok_or_else(|| err(format!("{pf} does not list it as a VF")))?;
        VfState::save(sys, ctl, pf_if, index).map(Some)
    }

    /// Puts the VF back as it was saved: what the PF enforces, then its driver (and
    /// override), then its interface's name, MTU, MAC and state. Every step is tried, whatever
    /// failed before it; the error names each step that failed.
    ///
    /// igb (and others) report the VF's current MAC as its admin MAC, whichever side set it, so
    /// a MAC the VF chose itself is put back as an administrative one: the safe way round, as
    /// it never loosens what the tenant may change.
    pub fn restore(&self, sys: &Sysfs, ctl: &mut dyn VfControl) -> Result<(), StateError> {
        let mut failed: Vec<String> = Vec::new();
        // The PF by its PCI address: its interface may have been renamed since the save.
        let pf_ifname = netdev_of(sys, self.pf).unwrap_or_else(|| self.pf_ifname.clone());
        self.restore_admin(ctl, &pf_ifname, &mut failed);
        // The driver after what the PF enforces, so that it probes the VF as it will stay;
        // the interface it makes last.
        let now = sys.device(self.addr);
        if now.as_ref().map(|d| d.driver.clone()).ok() != Some(self.driver.clone()) {
            if let Err(e) = rebind(sys, self.addr, self.driver.as_deref()) {
                failed.push(format!("driver: {e}"));
            }
        }
        // The saved override, or none: a leftover one must not stay for the next tenant.
        let current = driver_override(sys, self.addr).ok().flatten();
        if current != self.driver_override {
            let value = self.driver_override.as_deref().unwrap_or("\n");
            let path = sys.device_dir(self.addr).join("driver_override");
            if let Err(e) = sys.write(&path, value) {
                failed.push(format!("driver_override: {e}"));
            }
        }
        if let Some(name) = &self.ifname {
            if let Err(e) =
                Netlink::open().and_then(|mut nl| self.restore_netdev(sys, &mut nl, name))
            {
                failed.push(format!("interface {name}: {e}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(StateError {
                who: format!("VF {} of {} ({})", self.vf, self.pf_ifname, self.addr),
                what: format!("restore failed: {}", failed.join("; ")),
            })
        }
    }

    /// What the PF enforces, each setting sent only when it differs from what the PF shows now
    /// (drivers that cannot set a link state show the saved "auto").
    fn restore_admin(&self, ctl: &mut dyn VfControl, pf: &str, failed: &mut Vec<String>) {
        let a = &self.admin;
        let mut settings = vec![
            VfSetting::Mac(a.mac),
            VfSetting::Vlan(a.vlan, a.qos, a.vlan_proto),
            VfSetting::Rate {
                min: a.min_tx_rate,
                max: a.max_tx_rate,
            },
        ];
        settings.extend(a.spoofchk.map(VfSetting::SpoofChk));
        settings.extend(a.trust.map(VfSetting::Trust));
        settings.extend(a.link_state.map(VfSetting::LinkState));
        let current = match ctl.pf_vfs(pf) {
            Ok(v) => v.into_iter().find(|r| r.vf == self.vf),
            Err(e) => {
                failed.push(format!("PF {} ({pf}): {e}", self.pf));
                return;
            }
        };
        for s in settings {
            if current.as_ref().is_some_and(|c| s.shown_by(c)) {
                continue;
            }
            if let Err(e) = ctl.set_pf_vf(pf, self.vf, s) {
                failed.push(format!("{}: {e}", s.name()));
            }
        }
    }

    /// The VF's interface: back under its name (a rebound driver names it anew), with its
    /// MAC and MTU.
    fn restore_netdev(&self, sys: &Sysfs, nl: &mut Netlink, name: &str) -> std::io::Result<()> {
        let t0 = Instant::now();
        let current = loop {
            if let Some(n) = netdev_of(sys, self.addr) {
                break n;
            }
            if t0.elapsed() > sys.settle_time() {
                return Err(std::io::Error::other(format!(
                    "no interface appeared for {} after {:?}",
                    self.addr,
                    sys.settle_time()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let i = ifindex(&current)?;
        let (mac, mtu, up) = link_info(nl, &current)?;
        let mut is_up = up;
        // The name and MTU while the link is down.
        let mut attrs = Vec::new();
        if current != name {
            attrs.push(LinkAttribute::IfName(name.to_string()));
        }
        if let Some(t) = self.mtu.filter(|t| *t != mtu) {
            attrs.push(LinkAttribute::Mtu(t));
        }
        if !attrs.is_empty() {
            nl.set_up(i, false)?;
            is_up = false;
            nl.set_link(i, attrs)?;
        }
        // The MAC with the link up: a VF that its PF has just reconfigured is reset and
        // refuses a MAC change (EADDRNOTAVAIL) until its driver, running, has talked to the PF
        // again; retry for a while.
        if let Some(m) = self.mac.filter(|m| *m != mac) {
            if !is_up {
                nl.set_up(i, true)?;
                is_up = true;
            }
            let t0 = Instant::now();
            loop {
                match nl.set_link(i, vec![LinkAttribute::Address(m.to_vec())]) {
                    Ok(()) => break,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EADDRNOTAVAIL | libc::EBUSY | libc::EAGAIN)
                        ) && t0.elapsed() < sys.settle_time() =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let want = self.up.unwrap_or(false);
        if want != is_up {
            nl.set_up(i, want)?;
        }
        Ok(())
    }
}
