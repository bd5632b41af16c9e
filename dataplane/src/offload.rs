//! Software fallbacks for offloads a destination port cannot take (virtio 1.2 §5.1.6.2:
//! a partial checksum is completed over `csum_start..` and stored at `csum_start+csum_offset`).

use torii_vhost_user_net::hdr::F_NEEDS_CSUM;
use torii_vhost_user_net::NetBuf;

use crate::packet::Packet;
use crate::port::Offloads;

/// One's-complement sum of `data` (big-endian 16-bit words) added to `acc`.
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
        if acc > 0xffff_0000 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

/// Folds a 32-bit accumulator to 16 bits.
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// What happened to a packet on its way to a port that accepts `accepts`.
#[derive(Debug, PartialEq, Eq)]
pub enum Fixup {
    /// Fine as it is.
    AsIs,
    /// Its checksum was completed in software.
    SwCsum,
    /// It is a GSO super-frame the port cannot take: segment it in software ([`crate::gso`]).
    Segment,
    /// It cannot be made acceptable: drop it.
    Unsupported,
}

/// Makes `p` acceptable to a port that accepts `accepts`, in software where possible.
pub fn fixup(p: &mut Packet, accepts: Offloads) -> Fixup {
    let hdr = p.hdr();
    let need = hdr.required_offloads();
    if accepts.contains(need) {
        return Fixup::AsIs;
    }
    if hdr.is_gso() {
        // Segmentation completes every checksum too.
        return Fixup::Segment;
    }
    // Only CSUM is missing: complete it. The header was validated on receive, but the frame
    // may have been edited since, so check bounds again.
    let start = hdr.csum_start as usize;
    let at = start + hdr.csum_offset as usize;
    let data = p.data_mut();
    if at + 2 > data.len() {
        return Fixup::Unsupported;
    }
    // The partial checksum the sender left in place is the pseudo-header sum; sum16 over the
    // transport header + payload (including that field) gives the full checksum.
    let c = !fold(sum16(&data[start..], 0));
    data[at..at + 2].copy_from_slice(&c.to_be_bytes());
    p.hdr_mut().flags &= !F_NEEDS_CSUM;
    Fixup::SwCsum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::PacketPool;
    use torii_vhost_user_net::BufPool;

    /// A UDP/IPv4 datagram whose checksum field holds the pseudo-header sum, as a Linux guest
    /// with checksum offload sends it; completing it must give the RFC 768 checksum.
    #[test]
    fn completes_partial_udp_checksum() {
        let mut f = crate::port::null::udp_frame(60);
        let udp_len = (60 - 34) as u16;
        // pseudo header: src, dst, proto, udp length
        let mut ph = Vec::new();
        ph.extend_from_slice(&f[26..34]);
        ph.extend_from_slice(&[0, 17]);
        ph.extend_from_slice(&udp_len.to_be_bytes());
        let partial = fold(sum16(&ph, 0));
        f[40..42].copy_from_slice(&partial.to_be_bytes());
        let mut pool = PacketPool::new(1);
        let mut p = pool.alloc().unwrap();
        p.fill(&f);
        *p.hdr_mut() = torii_vhost_user_net::VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        assert_eq!(fixup(&mut p, Offloads::empty()), Fixup::SwCsum);
        // Verify: sum over pseudo header + UDP segment must fold to 0xffff.
        let mut all = ph.clone();
        all.extend_from_slice(&p.data()[34..]);
        assert_eq!(fold(sum16(&all, 0)), 0xffff);
        assert_eq!(fixup(&mut p, Offloads::empty()), Fixup::AsIs);
    }

    #[test]
    fn gso_to_a_port_without_tso_is_segmented() {
        let mut pool = PacketPool::new(1);
        let mut p = pool.alloc().unwrap();
        p.fill(&crate::port::null::udp_frame(1514));
        *p.hdr_mut() = torii_vhost_user_net::VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: torii_vhost_user_net::hdr::GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            hdr_len: 54,
        };
        assert_eq!(fixup(&mut p, Offloads::CSUM), Fixup::Segment);
        assert_eq!(fixup(&mut p, Offloads::CSUM | Offloads::TSO4), Fixup::AsIs);
    }
}
