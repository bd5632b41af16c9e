//! Offload metadata between DPDK mbufs and virtio-net headers (the data plane's `Packet`
//! carries the latter): checksum status on receive, checksum and TCP segmentation requests on
//! transmit.

use torii_dpdk_sys as sys;
use torii_vhost_user_net::hdr::{F_DATA_VALID, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
use torii_vhost_user_net::{Offloads, VirtioNetHdr};

/// The virtio-net header of a received mbuf with flags `ol_flags`: a transport checksum the
/// device verified is passed on as DATA_VALID when the peer takes checksum offload (a guest
/// that acked GUEST_CSUM can skip its own check); anything else carries no metadata.
#[inline]
pub fn rx_hdr(ol_flags: u64, accepted: Offloads) -> VirtioNetHdr {
    let mut h = VirtioNetHdr::default();
    if accepted.contains(Offloads::CSUM)
        && ol_flags & sys::TORII_RTE_MBUF_F_RX_L4_CKSUM_MASK
            == sys::TORII_RTE_MBUF_F_RX_L4_CKSUM_GOOD
    {
        h.flags = F_DATA_VALID;
    }
    h
}

/// What an mbuf must say for the device to complete a checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxMeta {
    pub ol_flags: u64,
    pub l2_len: u16,
    pub l3_len: u16,
    /// TCP segmentation: the TCP header's length and the segment size (0 otherwise).
    pub l4_len: u16,
    pub tso_segsz: u16,
}

/// The mbuf request for a frame whose header asks for a partial checksum to be completed
/// (NEEDS_CSUM from `csum_start`, stored at `csum_offset`): DPDK wants it by protocol —
/// IPv4/IPv6, TCP/UDP, and the L2 and L3 header lengths — where virtio gives offsets. The
/// field already holds the pseudo-header sum, as DPDK expects. A TCP GSO super-frame
/// (TCPV4/TCPV6) becomes a segmentation request: the TCP header length and segment size, and
/// the frame is patched as DPDK wants it — the pseudo-header sum without the length (which
/// differs per segment), and for IPv4 a zero header checksum with IP checksum offload. None
/// if the frame is not plain Ethernet (up to two VLAN tags) + IPv4/IPv6 + TCP/UDP with
/// `csum_start` right after the IP header(s): the caller then completes the checksum (or
/// segments) in software.
pub fn tx_meta(hdr: &VirtioNetHdr, frame: &mut [u8]) -> Option<TxMeta> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return None;
    }
    let mut l2 = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(l2)?, *frame.get(l2 + 1)?]);
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        l2 += 4;
        ethertype = u16::from_be_bytes([*frame.get(l2)?, *frame.get(l2 + 1)?]);
    }
    let l2 = l2 + 2;
    let (ip_flag, min_l3) = match ethertype {
        0x0800 => (sys::TORII_RTE_MBUF_F_TX_IPV4, 20),
        0x86dd => (sys::TORII_RTE_MBUF_F_TX_IPV6, 40),
        _ => return None,
    };
    let start = hdr.csum_start as usize;
    let l3 = start.checked_sub(l2)?;
    if l3 < min_l3 || l3 > 511 || l2 > 127 {
        return None;
    }
    let l4_flag = match hdr.csum_offset {
        16 => sys::TORII_RTE_MBUF_F_TX_TCP_CKSUM,
        6 => sys::TORII_RTE_MBUF_F_TX_UDP_CKSUM,
        _ => return None,
    };
    if start + hdr.csum_offset as usize + 2 > frame.len() {
        return None;
    }
    let mut m = TxMeta {
        ol_flags: ip_flag | l4_flag,
        l2_len: l2 as u16,
        l3_len: l3 as u16,
        l4_len: 0,
        tso_segsz: 0,
    };
    let kind = hdr.gso_kind();
    if kind == GSO_TCPV4 || kind == GSO_TCPV6 {
        let v4 = ethertype == 0x0800;
        if (kind == GSO_TCPV4) != v4
            || l4_flag != sys::TORII_RTE_MBUF_F_TX_TCP_CKSUM
            || hdr.gso_size == 0
        {
            return None;
        }
        let l4 = ((*frame.get(start + 12)? >> 4) as usize) * 4;
        if l4 < 20 || start + l4 > frame.len() {
            return None;
        }
        // The pseudo-header without its length: addresses and protocol.
        let (src, dst) = if v4 {
            (l2 + 12, l2 + 16)
        } else {
            (l2 + 8, l2 + 24)
        };
        let alen = if v4 { 4 } else { 16 };
        let sum = crate::offload::sum16(&frame[src..src + alen], 6);
        let sum = crate::offload::sum16(&frame[dst..dst + alen], sum);
        frame[start + 16..start + 18].copy_from_slice(&crate::offload::fold(sum).to_be_bytes());
        if v4 {
            frame[l2 + 10..l2 + 12].fill(0);
            m.ol_flags |= sys::TORII_RTE_MBUF_F_TX_IP_CKSUM;
        }
        m.ol_flags |= sys::TORII_RTE_MBUF_F_TX_TCP_SEG;
        m.l4_len = l4 as u16;
        m.tso_segsz = hdr.gso_size;
    } else if hdr.is_gso() {
        return None;
    }
    Some(m)
}

/// The offloads a device with enabled transmit offloads `tx` takes: checksums only when both
/// TCP and UDP ones are there (a virtio peer cannot be told one without the other); TCP
/// segmentation on top of them for IPv6, and for IPv4 when the device also does IP header
/// checksums. UDP fragmentation (UFO) stays in software (`gso.rs`).
pub fn tx_offloads(tx: u64) -> Offloads {
    let both = sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_CKSUM | sys::TORII_RTE_ETH_TX_OFFLOAD_UDP_CKSUM;
    if tx & both != both {
        return Offloads::empty();
    }
    let mut o = Offloads::CSUM;
    if tx & sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_TSO != 0 {
        o |= Offloads::TSO6;
        if tx & sys::TORII_RTE_ETH_TX_OFFLOAD_IPV4_CKSUM != 0 {
            o |= Offloads::TSO4;
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ethertype: u16, tags: usize, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        let mut at = 12;
        for _ in 0..tags {
            f[at..at + 2].copy_from_slice(&0x8100u16.to_be_bytes());
            at += 4;
        }
        f[at..at + 2].copy_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn csum(start: u16, offset: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: start,
            csum_offset: offset,
            ..Default::default()
        }
    }

    #[test]
    fn partial_checksums_map_to_mbuf_requests() {
        let m = tx_meta(&csum(34, 16), &mut frame(0x0800, 0, 80)).unwrap();
        assert_eq!(
            m,
            TxMeta {
                ol_flags: sys::TORII_RTE_MBUF_F_TX_IPV4 | sys::TORII_RTE_MBUF_F_TX_TCP_CKSUM,
                l2_len: 14,
                l3_len: 20,
                l4_len: 0,
                tso_segsz: 0
            }
        );
        let m = tx_meta(&csum(58, 6), &mut frame(0x86dd, 1, 80)).unwrap();
        assert_eq!(
            m.ol_flags,
            sys::TORII_RTE_MBUF_F_TX_IPV6 | sys::TORII_RTE_MBUF_F_TX_UDP_CKSUM
        );
        assert_eq!((m.l2_len, m.l3_len), (18, 40));
    }

    #[test]
    fn what_dpdk_cannot_express_is_left_to_software() {
        // No request, not IP, csum_start inside the IP header, an unknown field offset,
        // a field past the end, a runt.
        let none = VirtioNetHdr::default();
        assert_eq!(tx_meta(&none, &mut frame(0x0800, 0, 80)), None);
        assert_eq!(tx_meta(&csum(34, 16), &mut frame(0x0806, 0, 80)), None);
        assert_eq!(tx_meta(&csum(20, 16), &mut frame(0x0800, 0, 80)), None);
        assert_eq!(tx_meta(&csum(34, 10), &mut frame(0x0800, 0, 80)), None);
        assert_eq!(tx_meta(&csum(34, 16), &mut frame(0x0800, 0, 51)), None);
        assert_eq!(tx_meta(&csum(34, 16), &mut [0u8; 13]), None);
    }

    #[test]
    fn tcp_super_frames_become_segmentation_requests() {
        // IPv4/TCP: 10.0.0.1 → 10.0.0.2, a 32-byte TCP header (data offset 8).
        let mut f = frame(0x0800, 0, 2000);
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[24..26].copy_from_slice(&[0xab, 0xcd]);
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34 + 12] = 8 << 4;
        let mut h = csum(34, 16);
        h.gso_type = GSO_TCPV4;
        h.gso_size = 1448;
        let m = tx_meta(&h, &mut f).unwrap();
        assert_eq!(
            m.ol_flags,
            sys::TORII_RTE_MBUF_F_TX_IPV4
                | sys::TORII_RTE_MBUF_F_TX_TCP_CKSUM
                | sys::TORII_RTE_MBUF_F_TX_IP_CKSUM
                | sys::TORII_RTE_MBUF_F_TX_TCP_SEG
        );
        assert_eq!(
            (m.l2_len, m.l3_len, m.l4_len, m.tso_segsz),
            (14, 20, 32, 1448)
        );
        assert_eq!(
            &f[24..26],
            &[0, 0],
            "IPv4 header checksum left to the device"
        );
        // 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 6 (TCP), no length.
        assert_eq!(&f[50..52], &0x1409u16.to_be_bytes());
        // A TCPV4 request on an IPv6 frame, a UDP super-frame, no segment size: software.
        let mut v6 = frame(0x86dd, 0, 200);
        assert_eq!(tx_meta(&h, &mut v6), None);
        let mut u = csum(34, 6);
        u.gso_type = torii_vhost_user_net::hdr::GSO_UDP;
        u.gso_size = 1000;
        assert_eq!(tx_meta(&u, &mut f), None);
        h.gso_size = 0;
        assert_eq!(tx_meta(&h, &mut f), None);
    }

    #[test]
    fn device_capabilities_map_to_offloads() {
        let csum =
            sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_CKSUM | sys::TORII_RTE_ETH_TX_OFFLOAD_UDP_CKSUM;
        let tso = sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_TSO;
        let ip = sys::TORII_RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
        assert_eq!(tx_offloads(0), Offloads::empty());
        assert_eq!(
            tx_offloads(sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_CKSUM | tso),
            Offloads::empty()
        );
        assert_eq!(tx_offloads(csum), Offloads::CSUM);
        assert_eq!(tx_offloads(csum | tso), Offloads::CSUM | Offloads::TSO6);
        assert_eq!(
            tx_offloads(csum | tso | ip),
            Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6
        );
    }

    #[test]
    fn verified_checksums_pass_only_to_peers_that_take_them() {
        let good = sys::TORII_RTE_MBUF_F_RX_L4_CKSUM_GOOD;
        assert_eq!(rx_hdr(good, Offloads::CSUM).flags, F_DATA_VALID);
        assert_eq!(rx_hdr(good, Offloads::empty()).flags, 0);
        assert_eq!(
            rx_hdr(sys::TORII_RTE_MBUF_F_RX_L4_CKSUM_BAD, Offloads::CSUM).flags,
            0
        );
        assert_eq!(rx_hdr(0, Offloads::CSUM).flags, 0);
    }
}
