//! The `sriov` mode: a VF (from `deviceID`, as Multus passes it, or the config), allocated
//! through torii-vfio (one owner per VF, its state saved), configured on its PF, then either
//! moved into the pod's namespace as `CNI_IFNAME` with the IPAM addresses (netdev mode) or
//! bound to vfio-pci for a VM (vfio mode). Undoing puts the VF back exactly as it was.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use torii_vfio::alloc::{AllocError, Allocator, Owner};
use torii_vfio::bind;
use torii_vfio::netlink::{self, ifindex, Netlink, VfControl, VfSetting};
use torii_vfio::pci::{PciAddr, Sysfs};
use torii_vfio::select::Selectors;
use torii_vfio::state::VfState;

use crate::config::{Env, NetConf, SriovConf};
use crate::types::{AddResult, CniError, CniResult, Code};

fn setup(what: String) -> CniError {
    CniError::new(Code::Setup, what)
}

/// What the sriov mode works on: sysfs and the PFs' VF settings. The kernel's
/// ([`Host::kernel`]), or in tests a fake sysfs tree and a fake PF driver ([`Host::new`]).
/// The VF's own interface (netdev mode) is always the kernel's.
pub struct Host {
    sys: Sysfs,
    vfs: Option<Box<dyn VfControl>>,
}

impl Host {
    /// The running kernel: /sys, and rtnetlink opened when first needed.
    pub fn kernel() -> Host {
        Host {
            sys: Sysfs::default(),
            vfs: None,
        }
    }

    pub fn new(sys: Sysfs, vfs: Box<dyn VfControl>) -> Host {
        Host {
            sys,
            vfs: Some(vfs),
        }
    }

    fn sys(&self) -> &Sysfs {
        &self.sys
    }

    /// Sysfs and the VF control, borrowed together.
    fn parts(&mut self) -> CniResult<(&Sysfs, &mut dyn VfControl)> {
        if self.vfs.is_none() {
            let nl = Netlink::open().map_err(|e| setup(format!("netlink: {e}")))?;
            self.vfs = Some(Box::new(nl));
        }
        let vfs = self.vfs.as_deref_mut().expect("opened above");
        Ok((&self.sys, vfs))
    }
}

/// The tag of this attachment's allocations: only they are this attachment's to release.
fn owner_tag(conf: &NetConf, container_id: &str, ifname: &str) -> String {
    format!("{}/{container_id}/{ifname}", conf.name)
}

/// VF allocations are the node's, not a network's: kept beside the networks' state (a
/// leading dot: no network is named so).
fn allocator(conf: &NetConf) -> CniResult<Allocator> {
    Allocator::new(conf.state_dir.join(".vfio")).map_err(|e| setup(e.to_string()))
}

/// The VF the attachment asks for.
pub fn device(conf: &NetConf, s: &SriovConf) -> CniResult<PciAddr> {
    conf.runtime
        .device_id
        .as_deref()
        .map(|d| {
            d.parse::<PciAddr>().map_err(|e| {
                CniError::new(Code::InvalidConfig, format!("runtimeConfig.deviceID: {e}"))
            })
        })
        .transpose()?
        .or(s.device)
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "sriov mode needs a VF: deviceID in runtimeConfig (Multus) or in the config",
            )
        })
}

/// Takes the VF for the pod, applies the settings on its PF. Returns the VF's saved state.
pub fn claim(
    host: &mut Host,
    env: &Env,
    conf: &NetConf,
    s: &SriovConf,
    device: PciAddr,
) -> CniResult<VfState> {
    let (sys, ctl) = host.parts()?;
    let d = sys.device(device).map_err(|e| setup(e.to_string()))?;
    if d.physfn.is_none() {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("deviceID {device} is not an SR-IOV VF"),
        ));
    }
    let netns = env.netns.as_deref().expect("checked for ADD");
    let owner = Owner::of_netns(netns, &owner_tag(conf, env.container_id(), env.ifname()))
        .map_err(|e| CniError::new(Code::UnknownContainer, e.to_string()))?;
    let select = Selectors {
        pci_addresses: vec![device.to_string()],
        ..Default::default()
    }
    .compile()
    .map_err(|e| CniError::new(Code::InvalidConfig, e))?;
    let al = allocator(conf)?;
    let a = al
        .allocate(sys, &select, &owner, |d| {
            VfState::save_device(sys, &mut *ctl, d).map_err(|e| e.to_string())
        })
        .map_err(|e| match e {
            AllocError::NoneFree { busy: 1.., .. } => CniError::new(
                Code::TryAgainLater,
                format!("VF {device} is being allocated or released by another call"),
            ),
            AllocError::NoneFree {
                unreadable: 1.., ..
            } => setup(format!(
                "VF {device} has an allocation record that cannot be read: {}",
                al.get(device)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            )),
            AllocError::NoneFree { .. } => {
                let holder = al
                    .get(device)
                    .ok()
                    .flatten()
                    .map(|a| format!("{} ({})", a.owner.netns.display(), a.owner.tag))
                    .unwrap_or_default();
                setup(format!("VF {device} is already allocated to {holder}"))
            }
            e => setup(e.to_string()),
        })?;
    let saved = a
        .saved
        .clone()
        .ok_or_else(|| setup(format!("{device}: no state saved")))?;
    for setting in &s.settings {
        ctl.set_pf_vf(&saved.pf_ifname, saved.vf, *setting)
            .map_err(|e| {
                setup(format!(
                    "VF {} of {}: the driver refused {}: {e}",
                    saved.vf,
                    saved.pf_ifname,
                    setting.name()
                ))
            })?;
    }
    Ok(saved)
}

fn prefix_addr(cidr: &str) -> CniResult<(IpAddr, u8)> {
    let bad = || CniError::new(Code::Decode, format!("IPAM address {cidr:?} is not CIDR"));
    let (a, p) = cidr.split_once('/').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?))
}

/// Netdev mode: the VF's interface into the pod's namespace as `ifname`, with its MAC, MTU,
/// the IPAM addresses and routes, up.
pub fn plug_netdev(
    host: &Host,
    netns: &Path,
    saved: &VfState,
    ifname: &str,
    mac: Option<[u8; 6]>,
    mtu: Option<u32>,
    result: &AddResult,
) -> CniResult<()> {
    let current = host
        .sys()
        .device(saved.addr)
        .ok()
        .and_then(|d| d.netdevs.into_iter().next())
        .ok_or_else(|| {
            setup(format!(
                "VF {} has no network interface (driver {})",
                saved.addr,
                saved.driver.as_deref().unwrap_or("none")
            ))
        })?;
    let ns = File::open(netns).map_err(|e| setup(format!("{}: {e}", netns.display())))?;
    netlink::move_to_netns(&current, &ns, ifname)
        .map_err(|e| setup(format!("moving {current} into {}: {e}", netns.display())))?;
    let ips: Vec<(IpAddr, u8)> = result
        .ips
        .iter()
        .map(|i| prefix_addr(&i.address))
        .collect::<CniResult<_>>()?;
    let routes: Vec<(IpAddr, u8, Option<IpAddr>)> = result
        .routes
        .iter()
        .filter_map(|r| {
            let (d, p) = prefix_addr(r["dst"].as_str()?).ok()?;
            let gw = r["gw"].as_str().and_then(|g| g.parse().ok()).or_else(|| {
                result.ips.iter().find_map(|i| {
                    i.gateway
                        .as_deref()
                        .and_then(|g| g.parse::<IpAddr>().ok())
                        .filter(|g| g.is_ipv4() == d.is_ipv4())
                })
            });
            Some((d, p, gw))
        })
        .collect();
    let name = ifname.to_string();
    netlink::in_netns(&ns, move || {
        let i = ifindex(&name)?;
        let mut nl = Netlink::open()?;
        let mut attrs = Vec::new();
        if let Some(m) = mac {
            attrs.push(netlink_packet_route::link::LinkAttribute::Address(
                m.to_vec(),
            ));
        }
        if let Some(t) = mtu {
            attrs.push(netlink_packet_route::link::LinkAttribute::Mtu(t));
        }
        if !attrs.is_empty() {
            nl.set_link(i, attrs)?;
        }
        nl.set_up(i, true)?;
        for (a, p) in ips {
            nl.add_address(i, a, p)?;
        }
        for (d, p, gw) in routes {
            nl.add_route(d, p, gw, i)?;
        }
        Ok(())
    })
    .map_err(|e| setup(format!("configuring {ifname} in {}: {e}", netns.display())))
}

/// Puts the VF back: its interface out of the pod's namespace (if both still exist; a
/// namespace that is gone has given it back to the host already), then everything its
/// allocation saved. An attachment that never got the VF (another pod holds it, or the ADD
/// failed first) has nothing to undo.
pub fn release(
    host: &mut Host,
    conf: &NetConf,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
    device: &str,
    vfio: bool,
) -> CniResult<()> {
    let device: PciAddr = device
        .parse()
        .map_err(|e: String| CniError::new(Code::Decode, e))?;
    let al = allocator(conf)?;
    let Some(a) = al
        .get(device)
        .map_err(|e| setup(e.to_string()))?
        .filter(|a| a.owner.tag == owner_tag(conf, container_id, ifname))
    else {
        return Ok(());
    };
    if !vfio {
        if let Some(ns) = netns.and_then(|p| File::open(p).ok()) {
            // Back under a temporary name (the restore gives it its own), if the pod's
            // interface of that name is this VF: an ADD that failed early must not take
            // another plugin's.
            let ours = device.to_string();
            let name = ifname.to_string();
            let is_ours = netlink::in_netns(&ns, move || {
                let l = Netlink::open()?.link(ifindex(&name)?)?;
                Ok(l.attributes.iter().any(|a| {
                    matches!(a, netlink_packet_route::link::LinkAttribute::ParentDevName(p) if *p == ours)
                }))
            })
            .unwrap_or(false);
            if is_ours {
                let temp = format!("tv{}", device.to_string().replace([':', '.'], ""));
                let temp = &temp[..temp.len().min(15)];
                netlink::move_from_netns(&ns, ifname, temp)
                    .map_err(|e| setup(format!("moving {ifname} out of the pod: {e}")))?;
            }
        }
    }
    let (sys, ctl) = host.parts()?;
    let tag = a.owner.tag.clone();
    al.release(a.addr, |a| {
        // Released and handed to another pod since the listing: not ours to restore.
        if a.owner.tag != tag {
            return Err(format!("re-allocated to {}", a.owner.tag));
        }
        a.saved
            .as_ref()
            .map_or(Ok(()), |s| s.restore(sys, ctl).map_err(|e| e.to_string()))
    })
    .map(|_| ())
    .map_err(|e| setup(e.to_string()))
}

/// Vfio mode: the VF to vfio-pci, its group checked.
pub fn bind_vfio(host: &Host, device: PciAddr) -> CniResult<()> {
    let sys = host.sys();
    bind::bind_vfio(sys, device).map_err(|e| setup(e.to_string()))?;
    bind::passthrough_spec(sys, device)
        .map(|_| ())
        .map_err(|e| setup(e.to_string()))
}

/// CHECK: the VF is still this pod's, and where the attachment put it.
pub fn check(host: &Host, conf: &NetConf, env: &Env, device: &str, vfio: bool) -> CniResult<()> {
    let device: PciAddr = device
        .parse()
        .map_err(|e: String| CniError::new(Code::Decode, e))?;
    let al = allocator(conf)?;
    let a = al
        .get(device)
        .map_err(|e| setup(e.to_string()))?
        .ok_or_else(|| setup(format!("VF {device} is not allocated")))?;
    if Some(a.owner.netns.as_path()) != env.netns.as_deref() || !a.owner.is_alive() {
        return Err(setup(format!(
            "VF {device} belongs to {}, not this pod",
            a.owner.netns.display()
        )));
    }
    let sys = host.sys();
    if vfio {
        let d = sys.device(device).map_err(|e| setup(e.to_string()))?;
        if d.driver.as_deref() != Some(bind::VFIO_PCI) {
            return Err(setup(format!(
                "VF {device} is bound to {}, not vfio-pci",
                d.driver.as_deref().unwrap_or("no driver")
            )));
        }
        return Ok(());
    }
    let ns = File::open(env.netns.as_deref().expect("checked for CHECK"))
        .map_err(|e| setup(e.to_string()))?;
    let name = env.ifname().to_string();
    netlink::in_netns(&ns, move || ifindex(&name).map(|_| ()))
        .map_err(|e| setup(format!("{} in the pod: {e}", env.ifname())))
}

/// The MAC among `settings`, if one is set.
pub fn setting_mac(settings: &[VfSetting]) -> Option<[u8; 6]> {
    settings.iter().find_map(|s| match s {
        VfSetting::Mac(m) => Some(*m),
        _ => None,
    })
}
