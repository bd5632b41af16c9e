//! Offload metadata between DPDK mbufs and virtio-net headers (the data plane's `Packet`
//! carries the latter): checksum status on receive, checksum requests on transmit.

use torii_dpdk_sys as sys;
use torii_vhost_user_net::hdr::{F_DATA_VALID, F_NEEDS_CSUM};
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
}

/// The mbuf request for a frame whose header asks for a partial checksum to be completed
/// (NEEDS_CSUM from `csum_start`, stored at `csum_offset`): DPDK wants it by protocol —
/// IPv4/IPv6, TCP/UDP, and the L2 and L3 header lengths — where virtio gives offsets. The
/// field already holds the pseudo-header sum, as DPDK expects. None if the frame is not
/// plain Ethernet (up to two VLAN tags) + IPv4/IPv6 + TCP/UDP with `csum_start` right after
/// the IP header(s): the caller then completes the checksum in software.
pub fn tx_meta(hdr: &VirtioNetHdr, frame: &[u8]) -> Option<TxMeta> {
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
    Some(TxMeta {
        ol_flags: ip_flag | l4_flag,
        l2_len: l2 as u16,
        l3_len: l3 as u16,
    })
}

/// The offloads a device with enabled transmit offloads `tx` takes: checksums only when both
/// TCP and UDP ones are there (a virtio peer cannot be told one without the other).
/// Segmentation stays in software (`gso.rs`) for now.
pub fn tx_offloads(tx: u64) -> Offloads {
    let both = sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_CKSUM | sys::TORII_RTE_ETH_TX_OFFLOAD_UDP_CKSUM;
    if tx & both == both {
        Offloads::CSUM
    } else {
        Offloads::empty()
    }
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
        let m = tx_meta(&csum(34, 16), &frame(0x0800, 0, 80)).unwrap();
        assert_eq!(
            m,
            TxMeta {
                ol_flags: sys::TORII_RTE_MBUF_F_TX_IPV4 | sys::TORII_RTE_MBUF_F_TX_TCP_CKSUM,
                l2_len: 14,
                l3_len: 20
            }
        );
        let m = tx_meta(&csum(58, 6), &frame(0x86dd, 1, 80)).unwrap();
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
        assert_eq!(tx_meta(&none, &frame(0x0800, 0, 80)), None);
        assert_eq!(tx_meta(&csum(34, 16), &frame(0x0806, 0, 80)), None);
        assert_eq!(tx_meta(&csum(20, 16), &frame(0x0800, 0, 80)), None);
        assert_eq!(tx_meta(&csum(34, 10), &frame(0x0800, 0, 80)), None);
        assert_eq!(tx_meta(&csum(34, 16), &frame(0x0800, 0, 51)), None);
        assert_eq!(tx_meta(&csum(34, 16), &[0u8; 13]), None);
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
