//! The virtio-net packet header (virtio 1.2 §5.1.6 "Device Operation") and the offload
//! features it carries. The same layout is the Linux tap "vnet header" (`IFF_VNET_HDR`), so this
//! is also the translation point between a guest and a tap.

use virtio_bindings::virtio_net as vn;

/// A tiny bitflags: enough for one small set type without another dependency.
macro_rules! bitflags_lite {
    ($(#[$m:meta])* $name:ident : $t:ty { $($flag:ident = $v:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name($t);
        #[allow(dead_code)]
        impl $name {
            $(pub const $flag: $name = $name($v);)*
            pub const fn empty() -> Self { $name(0) }
            pub const fn all() -> Self { $name(0 $(| $v)*) }
            pub const fn bits(self) -> $t { self.0 }
            pub const fn from_bits_truncate(b: $t) -> Self { $name(b & Self::all().0) }
            pub const fn contains(self, o: Self) -> bool { self.0 & o.0 == o.0 }
            pub const fn intersects(self, o: Self) -> bool { self.0 & o.0 != 0 }
            pub const fn is_empty(self) -> bool { self.0 == 0 }
        }
        impl std::ops::BitOr for $name { type Output = Self; fn bitor(self, o: Self) -> Self { $name(self.0 | o.0) } }
        impl std::ops::BitOrAssign for $name { fn bitor_assign(&mut self, o: Self) { self.0 |= o.0 } }
        impl std::ops::BitAnd for $name { type Output = Self; fn bitand(self, o: Self) -> Self { $name(self.0 & o.0) } }
    };
}

/// Size of the header on the wire when `VIRTIO_F_VERSION_1` or `VIRTIO_NET_F_MRG_RXBUF` is
/// negotiated (§5.1.6: `num_buffers` is always present then).
pub const HDR_LEN_MRG: usize = 12;
/// Size of the legacy header without `num_buffers`.
pub const HDR_LEN_LEGACY: usize = 10;

/// `flags`: the checksum is partial, complete it from `csum_start` and store at `csum_offset`.
pub const F_NEEDS_CSUM: u8 = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `flags`: the checksum has been validated (receive direction only).
pub const F_DATA_VALID: u8 = vn::VIRTIO_NET_HDR_F_DATA_VALID as u8;

/// `gso_type` values (§5.1.6).
pub const GSO_NONE: u8 = vn::VIRTIO_NET_HDR_GSO_NONE as u8;
pub const GSO_TCPV4: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const GSO_UDP: u8 = vn::VIRTIO_NET_HDR_GSO_UDP as u8;
pub const GSO_TCPV6: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const GSO_ECN: u8 = vn::VIRTIO_NET_HDR_GSO_ECN as u8;

/// The offload metadata of one packet, independent of where it came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Parses the first 10 bytes (little endian, as VERSION_1 mandates and as a tap uses with
    /// `TUNSETVNETLE`/x86). `num_buffers` is not part of the metadata.
    pub fn parse(b: &[u8; HDR_LEN_LEGACY]) -> Self {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// Writes the header; when `out` is 12 bytes long `num_buffers` goes in the last two.
    pub fn write(&self, out: &mut [u8], num_buffers: u16) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        if out.len() >= HDR_LEN_MRG {
            out[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        }
    }

    /// The 12-byte header (with `num_buffers`) as two little-endian words: bytes 0..8 and
    /// 8..12, for storing in two moves. The first 10 bytes are the legacy header.
    #[inline]
    pub fn le_words(&self, num_buffers: u16) -> (u64, u32) {
        let lo = u64::from(self.flags)
            | u64::from(self.gso_type) << 8
            | u64::from(self.hdr_len) << 16
            | u64::from(self.gso_size) << 32
            | u64::from(self.csum_start) << 48;
        let hi = u32::from(self.csum_offset) | u32::from(num_buffers) << 16;
        (lo, hi)
    }

    /// Moves the frame offsets (`csum_start`, and `hdr_len` of a GSO frame) by `delta` bytes:
    /// a VLAN tag was inserted (+4) or removed (-4) in front of them.
    pub fn shift_offsets(&mut self, delta: i32) {
        let shift = |v: u16| (i32::from(v) + delta).clamp(0, i32::from(u16::MAX)) as u16;
        if self.needs_csum() {
            self.csum_start = shift(self.csum_start);
        }
        if self.is_gso() && self.hdr_len != 0 {
            self.hdr_len = shift(self.hdr_len);
        }
    }

    /// The segmentation kind without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    pub fn is_gso(&self) -> bool {
        self.gso_kind() != GSO_NONE
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    /// Which offloads a receiver must accept to take this packet as it is.
    pub fn required_offloads(&self) -> Offloads {
        let mut need = Offloads::empty();
        if self.needs_csum() {
            need |= Offloads::CSUM;
        }
        match self.gso_kind() {
            GSO_TCPV4 => need |= Offloads::TSO4,
            GSO_TCPV6 => need |= Offloads::TSO6,
            GSO_UDP => need |= Offloads::UFO,
            _ => {}
        }
        if self.is_gso() && self.gso_type & GSO_ECN != 0 {
            need |= Offloads::ECN;
        }
        need
    }

    /// Checks the header against the packet it describes, so that a hostile guest cannot make a
    /// peer (a tap, the kernel, another guest) act on offsets outside the frame.
    pub fn validate(&self, frame_len: usize) -> Result<(), HdrError> {
        if self.needs_csum() {
            let end = self.csum_start as usize + self.csum_offset as usize + 2;
            if end > frame_len {
                return Err(HdrError::CsumOutOfFrame);
            }
        }
        match self.gso_kind() {
            GSO_NONE => Ok(()),
            GSO_TCPV4 | GSO_TCPV6 | GSO_UDP => {
                if self.gso_size == 0 {
                    Err(HdrError::ZeroGsoSize)
                } else if !self.needs_csum() {
                    // §5.1.6.2: a GSO packet must ask for checksum offload too.
                    Err(HdrError::GsoWithoutCsum)
                } else {
                    Ok(())
                }
            }
            _ => Err(HdrError::UnknownGsoType(self.gso_type)),
        }
    }
}

/// Why a packet header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HdrError {
    #[error("checksum start/offset point past the end of the frame")]
    CsumOutOfFrame,
    #[error("GSO packet with gso_size 0")]
    ZeroGsoSize,
    #[error("GSO packet without NEEDS_CSUM")]
    GsoWithoutCsum,
    #[error("unknown gso_type {0:#x}")]
    UnknownGsoType(u8),
}

bitflags_lite! {
    /// Offloads a port can take on transmit (what packets it accepts carrying partial checksums or
    /// GSO), expressed once so virtio features and tap `TUN_F_*` flags map onto it.
    Offloads: u8 {
        CSUM = 1,
        TSO4 = 2,
        TSO6 = 4,
        UFO = 8,
        ECN = 16,
    }
}

impl Offloads {
    /// What a driver that acked `features` accepts on its receive queues (§5.1.3 GUEST_*).
    pub fn guest_rx_from_features(features: u64) -> Offloads {
        Self::from_feature_bits(
            features,
            [
                vn::VIRTIO_NET_F_GUEST_CSUM,
                vn::VIRTIO_NET_F_GUEST_TSO4,
                vn::VIRTIO_NET_F_GUEST_TSO6,
                vn::VIRTIO_NET_F_GUEST_UFO,
                vn::VIRTIO_NET_F_GUEST_ECN,
            ],
        )
    }

    /// What a driver that acked `features` may ask of the device on transmit (§5.1.3: CSUM,
    /// HOST_TSO4/6, HOST_UFO, HOST_ECN). A header asking for more is refused (§5.1.6.2.1: the
    /// driver must not set NEEDS_CSUM or a gso_type it did not negotiate).
    pub fn guest_tx_from_features(features: u64) -> Offloads {
        Self::from_feature_bits(
            features,
            [
                vn::VIRTIO_NET_F_CSUM,
                vn::VIRTIO_NET_F_HOST_TSO4,
                vn::VIRTIO_NET_F_HOST_TSO6,
                vn::VIRTIO_NET_F_HOST_UFO,
                vn::VIRTIO_NET_F_HOST_ECN,
            ],
        )
    }

    /// `bits` are the feature bits for CSUM, TSO4, TSO6, UFO and ECN of one direction; the
    /// segmentation offloads count only with checksum offload (§5.1.3.1).
    fn from_feature_bits(features: u64, bits: [u32; 5]) -> Offloads {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        if !has(bits[0]) {
            return Offloads::empty();
        }
        let mut o = Offloads::CSUM;
        for (bit, flag) in
            bits[1..]
                .iter()
                .zip([Offloads::TSO4, Offloads::TSO6, Offloads::UFO, Offloads::ECN])
        {
            if has(*bit) {
                o |= flag;
            }
        }
        o
    }

    /// Tap `TUNSETOFFLOAD` flags that make the kernel hand us only what `self` accepts.
    pub fn to_tun_flags(self) -> u32 {
        const TUN_F_CSUM: u32 = 0x01;
        const TUN_F_TSO4: u32 = 0x02;
        const TUN_F_TSO6: u32 = 0x04;
        const TUN_F_TSO_ECN: u32 = 0x08;
        const TUN_F_UFO: u32 = 0x10;
        let mut f = 0;
        if self.contains(Offloads::CSUM) {
            f |= TUN_F_CSUM;
            if self.contains(Offloads::TSO4) {
                f |= TUN_F_TSO4;
            }
            if self.contains(Offloads::TSO6) {
                f |= TUN_F_TSO6;
            }
            if self.contains(Offloads::ECN) && self.intersects(Offloads::TSO4 | Offloads::TSO6) {
                f |= TUN_F_TSO_ECN;
            }
            if self.contains(Offloads::UFO) {
                f |= TUN_F_UFO;
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_num_buffers() {
        let h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut b = [0u8; HDR_LEN_MRG];
        h.write(&mut b, 3);
        assert_eq!(&b[10..12], &3u16.to_le_bytes());
        assert_eq!(VirtioNetHdr::parse(b[..10].try_into().unwrap()), h);
        // The two-word form stores the same bytes.
        let (lo, hi) = h.le_words(3);
        assert_eq!(&b[..8], &lo.to_le_bytes());
        assert_eq!(&b[8..12], &hi.to_le_bytes());
        assert_eq!(
            h.required_offloads(),
            Offloads::CSUM | Offloads::TSO4 | Offloads::ECN
        );
    }

    #[test]
    fn validate_rejects_bad_headers() {
        let mut h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 100,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(h.validate(60), Err(HdrError::CsumOutOfFrame));
        assert_eq!(h.validate(118), Ok(()));
        h.gso_type = GSO_TCPV4;
        assert_eq!(h.validate(2000), Err(HdrError::ZeroGsoSize));
        h.gso_size = 1448;
        assert_eq!(h.validate(2000), Ok(()));
        h.flags = 0;
        assert_eq!(h.validate(2000), Err(HdrError::GsoWithoutCsum));
        h.gso_type = 0x7;
        assert_eq!(h.validate(2000), Err(HdrError::UnknownGsoType(7)));
    }

    #[test]
    fn guest_offloads_follow_features() {
        let f = (1u64 << vn::VIRTIO_NET_F_GUEST_CSUM) | (1u64 << vn::VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(
            Offloads::guest_rx_from_features(f),
            Offloads::CSUM | Offloads::TSO6
        );
        let f = (1u64 << vn::VIRTIO_NET_F_CSUM) | (1u64 << vn::VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            Offloads::guest_tx_from_features(f),
            Offloads::CSUM | Offloads::TSO4
        );
        assert!(Offloads::guest_tx_from_features(1u64 << vn::VIRTIO_NET_F_HOST_TSO4).is_empty());
        // TSO without CSUM is not a valid driver choice; nothing is accepted then.
        let f = 1u64 << vn::VIRTIO_NET_F_GUEST_TSO4;
        assert!(Offloads::guest_rx_from_features(f).is_empty());
        assert_eq!((Offloads::CSUM | Offloads::TSO4).to_tun_flags(), 0x3);
        assert_eq!(Offloads::TSO4.to_tun_flags(), 0);
    }
}
