//! VF configuration through rtnetlink on the PF (the attributes `ip link set PF vf N …` sends),
//! read back through RTM_GETLINK with the VF extension mask. The client itself, and moves
//! between network namespaces, are `torii-netlink`'s (re-exported here).

use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::link::{
    LinkAttribute, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac, VfInfoRate,
    VfInfoSpoofCheck, VfInfoTrust, VfLinkState, VfVlan, VfVlanInfo, VlanProtocol,
};
use netlink_packet_route::RouteNetlinkMessage;
use serde::{Deserialize, Serialize};
pub use torii_netlink::{ifindex, in_netns, move_from_netns, move_to_netns, Netlink};

/// A VF's link state as the PF enforces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Follows the PF's link.
    Auto,
    Enable,
    Disable,
}

/// The VLAN tag protocol of a VF VLAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum VlanProto {
    #[default]
    #[serde(rename = "802.1Q")]
    Dot1Q,
    #[serde(rename = "802.1ad")]
    Dot1Ad,
}

/// What the PF reports of one VF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfInfoReport {
    pub vf: u32,
    /// The administrative MAC (all zeros: none set).
    pub mac: [u8; 6],
    pub vlan: u16,
    pub qos: u8,
    pub vlan_proto: VlanProto,
    /// `None`: the driver does not report it.
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    /// Mbit/s; 0 is no limit.
    pub min_tx_rate: u32,
    pub max_tx_rate: u32,
    pub link_state: Option<LinkState>,
}

/// One VF setting to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfSetting {
    Mac([u8; 6]),
    /// VLAN id (0: none), priority, protocol.
    Vlan(u16, u8, VlanProto),
    SpoofChk(bool),
    Trust(bool),
    /// Minimum and maximum TX rate, Mbit/s (0: no limit). Both go in one attribute.
    Rate {
        min: u32,
        max: u32,
    },
    LinkState(LinkState),
}

impl VfSetting {
    /// The `ip link` spelling of the setting's name.
    pub fn name(&self) -> &'static str {
        match self {
            VfSetting::Mac(_) => "mac",
            VfSetting::Vlan(..) => "vlan",
            VfSetting::SpoofChk(_) => "spoofchk",
            VfSetting::Trust(_) => "trust",
            VfSetting::Rate { .. } => "rate",
            VfSetting::LinkState(_) => "state",
        }
    }

    /// `r` as a driver that takes this setting shows it afterwards (what a fake PF does).
    pub fn apply(&self, r: &mut VfInfoReport) {
        match *self {
            VfSetting::Mac(m) => r.mac = m,
            VfSetting::Vlan(v, q, p) => {
                r.vlan = v;
                r.qos = if v == 0 { 0 } else { q };
                r.vlan_proto = if v == 0 { VlanProto::Dot1Q } else { p };
            }
            VfSetting::SpoofChk(b) => r.spoofchk = Some(b),
            VfSetting::Trust(b) => r.trust = Some(b),
            VfSetting::Rate { min, max } => {
                r.min_tx_rate = min;
                r.max_tx_rate = max;
            }
            VfSetting::LinkState(s) => r.link_state = Some(s),
        }
    }

    /// Whether `r` shows this setting applied.
    pub fn shown_by(&self, r: &VfInfoReport) -> bool {
        match *self {
            VfSetting::Mac(m) => r.mac == m,
            VfSetting::Vlan(v, q, p) => {
                r.vlan == v && (v == 0 || (r.qos == q && r.vlan_proto == p))
            }
            VfSetting::SpoofChk(b) => r.spoofchk == Some(b),
            VfSetting::Trust(b) => r.trust == Some(b),
            VfSetting::Rate { min, max } => r.min_tx_rate == min && r.max_tx_rate == max,
            VfSetting::LinkState(s) => r.link_state == Some(s),
        }
    }

    fn attribute(&self, vf: u32) -> VfInfo {
        match *self {
            VfSetting::Mac(m) => VfInfo::Mac(VfInfoMac::new(vf, &m)),
            VfSetting::Vlan(v, q, p) => VfInfo::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
                vf,
                u32::from(v),
                u32::from(q),
                match p {
                    VlanProto::Dot1Q => VlanProtocol::Ieee8021Q,
                    VlanProto::Dot1Ad => VlanProtocol::Ieee8021Ad,
                },
            ))]),
            VfSetting::SpoofChk(b) => VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, b)),
            VfSetting::Trust(b) => VfInfo::Trust(VfInfoTrust::new(vf, b)),
            VfSetting::Rate { min, max } => VfInfo::Rate(VfInfoRate::new(vf, min, max)),
            VfSetting::LinkState(s) => VfInfo::LinkState(VfInfoLinkState::new(
                vf,
                match s {
                    LinkState::Auto => VfLinkState::Auto,
                    LinkState::Enable => VfLinkState::Enable,
                    LinkState::Disable => VfLinkState::Disable,
                },
            )),
        }
    }
}

/// VF requests on a PF's link (an interface index).
pub trait VfLinks {
    /// What PF `pf` reports of its VFs.
    fn vfs(&mut self, pf: u32) -> io::Result<Vec<VfInfoReport>>;
    /// Applies one setting to VF `vf` of PF `pf`; the kernel's (driver's) refusal is the error.
    fn set_vf(&mut self, pf: u32, vf: u32, s: VfSetting) -> io::Result<()>;
}

impl VfLinks for Netlink {
    fn vfs(&mut self, pf: u32) -> io::Result<Vec<VfInfoReport>> {
        let l = self.link(pf)?;
        let mut out = Vec::new();
        for a in &l.attributes {
            if let LinkAttribute::VfInfoList(list) = a {
                out.extend(list.iter().filter_map(report));
            }
        }
        out.sort_by_key(|r| r.vf);
        Ok(out)
    }

    fn set_vf(&mut self, pf: u32, vf: u32, s: VfSetting) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = pf;
        m.attributes
            .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![
                s.attribute(vf)
            ])]));
        self.call(RouteNetlinkMessage::SetLink(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(|_| ())
    }
}

fn report(info: &LinkVfInfo) -> Option<VfInfoReport> {
    let mut r = VfInfoReport {
        vf: u32::MAX,
        mac: [0; 6],
        vlan: 0,
        qos: 0,
        vlan_proto: VlanProto::Dot1Q,
        spoofchk: None,
        trust: None,
        min_tx_rate: 0,
        max_tx_rate: 0,
        link_state: None,
    };
    for a in &info.0 {
        match a {
            VfInfo::Mac(m) => {
                r.vf = m.vf_id;
                r.mac.copy_from_slice(&m.mac[..6]);
            }
            VfInfo::Vlan(v) => {
                r.vlan = v.vlan_id as u16;
                r.qos = v.qos as u8;
            }
            VfInfo::VlanList(list) => {
                for v in list.iter().filter_map(|v| match v {
                    VfVlan::Info(i) => Some(i),
                    _ => None,
                }) {
                    r.vlan = v.vlan_id as u16;
                    r.qos = v.qos as u8;
                    r.vlan_proto = match v.protocol {
                        VlanProtocol::Ieee8021Ad => VlanProto::Dot1Ad,
                        _ => VlanProto::Dot1Q,
                    };
                }
            }
            VfInfo::SpoofCheck(s) => r.spoofchk = Some(s.enabled),
            VfInfo::Trust(t) => r.trust = Some(t.enabled),
            VfInfo::Rate(x) => {
                r.min_tx_rate = x.min_tx_rate;
                r.max_tx_rate = x.max_tx_rate;
            }
            VfInfo::LinkState(s) => {
                r.link_state = match s.state {
                    VfLinkState::Auto => Some(LinkState::Auto),
                    VfLinkState::Enable => Some(LinkState::Enable),
                    VfLinkState::Disable => Some(LinkState::Disable),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    (r.vf != u32::MAX).then_some(r)
}

/// The VF settings a PF's driver holds, reached through the PF's interface: [`Netlink`] on a
/// real kernel; in tests on fake sysfs trees, a fake PF that records what it is asked
/// (`fake::FakeVfs`).
pub trait VfControl {
    /// What the PF whose interface is `pf` reports of its VFs.
    fn pf_vfs(&mut self, pf: &str) -> io::Result<Vec<VfInfoReport>>;
    /// Applies one setting to VF `vf` of that PF; the driver's refusal is the error.
    fn set_pf_vf(&mut self, pf: &str, vf: u32, s: VfSetting) -> io::Result<()>;
}

/// Shared, so that a test can look at a fake after the code under test has used it.
impl<T: VfControl + ?Sized> VfControl for std::sync::Arc<std::sync::Mutex<T>> {
    fn pf_vfs(&mut self, pf: &str) -> io::Result<Vec<VfInfoReport>> {
        self.lock().unwrap_or_else(|e| e.into_inner()).pf_vfs(pf)
    }

    fn set_pf_vf(&mut self, pf: &str, vf: u32, s: VfSetting) -> io::Result<()> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_pf_vf(pf, vf, s)
    }
}

impl VfControl for Netlink {
    fn pf_vfs(&mut self, pf: &str) -> io::Result<Vec<VfInfoReport>> {
        let i = ifindex(pf)?;
        self.vfs(i)
    }

    fn set_pf_vf(&mut self, pf: &str, vf: u32, s: VfSetting) -> io::Result<()> {
        let i = ifindex(pf)?;
        self.set_vf(i, vf, s)
    }
}
