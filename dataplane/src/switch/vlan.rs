//! VLAN membership of a switch port (IEEE 802.1Q): an access port carries one VLAN untagged,
//! a trunk carries a list of VLANs tagged and optionally one (its native VLAN) untagged.
//!
//! VLAN 0 is the untagged segment: the VLAN of access ports configured without one, so that
//! ports with no VLAN settings form one plain L2 network.

use serde::Serialize;

/// Highest usable VLAN id (4095 is reserved).
pub const MAX_VID: u16 = 4094;

/// A set of VLAN ids, one bit each.
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet(Box<[u64; 64]>);

impl VlanSet {
    pub fn new(vids: &[u16]) -> Self {
        let mut s = VlanSet(Box::new([0; 64]));
        for &v in vids {
            s.0[(v as usize & 0xfff) / 64] |= 1 << (v % 64);
        }
        s
    }

    #[inline]
    pub fn contains(&self, vid: u16) -> bool {
        self.0[(vid as usize & 0xfff) / 64] & (1 << (vid % 64)) != 0
    }

    pub fn vids(&self) -> Vec<u16> {
        (0..=MAX_VID).filter(|&v| self.contains(v)).collect()
    }
}

impl std::fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.vids()).finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VlanMode {
    /// Untagged frames belong to `vlan`; tagged ones are dropped (except priority tags, VID 0).
    Access { vlan: u16 },
    /// Tagged frames of `allowed` VLANs; untagged (and priority-tagged) frames belong to
    /// `native`, or are dropped without one.
    Trunk {
        allowed: VlanSet,
        native: Option<u16>,
    },
}

impl Default for VlanMode {
    fn default() -> Self {
        VlanMode::Access { vlan: 0 }
    }
}

/// How a frame leaves a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    Untagged,
    Tagged,
}

/// A port's VLAN settings, for reports.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum VlanReport {
    Access {
        vlan: u16,
    },
    Trunk {
        allowed: Vec<u16>,
        native: Option<u16>,
    },
}

impl VlanMode {
    /// The VLAN of a frame received with outer tag VID `vid` (None: untagged); None if the
    /// port does not take it.
    #[inline]
    pub fn ingress(&self, vid: Option<u16>) -> Option<u16> {
        match (self, vid) {
            (VlanMode::Access { vlan }, None | Some(0)) => Some(*vlan),
            (VlanMode::Access { .. }, Some(_)) => None,
            (VlanMode::Trunk { native, .. }, None | Some(0)) => *native,
            (VlanMode::Trunk { allowed, .. }, Some(v)) => allowed.contains(v).then_some(v),
        }
    }

    /// Whether frames of `vlan` leave this port, and how.
    #[inline]
    pub fn egress(&self, vlan: u16) -> Option<Egress> {
        match self {
            VlanMode::Access { vlan: v } => (*v == vlan).then_some(Egress::Untagged),
            VlanMode::Trunk { native, .. } if *native == Some(vlan) => Some(Egress::Untagged),
            VlanMode::Trunk { allowed, .. } => allowed.contains(vlan).then_some(Egress::Tagged),
        }
    }

    pub fn report(&self) -> VlanReport {
        match self {
            VlanMode::Access { vlan } => VlanReport::Access { vlan: *vlan },
            VlanMode::Trunk { allowed, native } => VlanReport::Trunk {
                allowed: allowed.vids(),
                native: *native,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_port() {
        let a = VlanMode::Access { vlan: 100 };
        assert_eq!(a.ingress(None), Some(100));
        assert_eq!(a.ingress(Some(0)), Some(100), "priority tag");
        assert_eq!(
            a.ingress(Some(100)),
            None,
            "tagged frames are not for access ports"
        );
        assert_eq!(a.egress(100), Some(Egress::Untagged));
        assert_eq!(a.egress(200), None);
    }

    #[test]
    fn trunk_port() {
        let t = VlanMode::Trunk {
            allowed: VlanSet::new(&[100, 200, 4094]),
            native: None,
        };
        assert_eq!(t.ingress(Some(200)), Some(200));
        assert_eq!(t.ingress(Some(4094)), Some(4094));
        assert_eq!(t.ingress(Some(300)), None);
        assert_eq!(t.ingress(None), None, "no native VLAN");
        assert_eq!(t.egress(100), Some(Egress::Tagged));
        assert_eq!(t.egress(0), None);
        let n = VlanMode::Trunk {
            allowed: VlanSet::new(&[100]),
            native: Some(0),
        };
        assert_eq!(n.ingress(None), Some(0));
        assert_eq!(n.egress(0), Some(Egress::Untagged));
        assert_eq!(n.egress(100), Some(Egress::Tagged));
        assert_eq!(format!("{:?}", VlanSet::new(&[7, 64, 63])), "[7, 63, 64]");
    }
}
