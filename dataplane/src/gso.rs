//! Software segmentation: a GSO super-frame (virtio 1.2 §5.1.6.2, `gso_type` TCPV4, TCPV6 or
//! UDP) bound for a port that cannot take it (a guest that did not negotiate GUEST_TSO4, say)
//! is cut here into frames of at most `gso_size` payload bytes, each with its own IP length,
//! IPv4 identification and header checksum, TCP sequence number and flags, and a complete
//! transport checksum — what the kernel's GSO would have put on a wire. UDP super-frames (UFO)
//! become IP fragments of one datagram, as a NIC doing UFO sends them.
//!
//! The super-frame came from a guest: every header length and offset is checked against the
//! frame before use, and the number of segments is bounded ([`MAX_SEGS`]), so a hostile
//! `gso_size` of 1 costs a drop, not 64 Ki frames.

use std::sync::atomic::{AtomicU32, Ordering};

use torii_vhost_user_net::hdr::{GSO_TCPV4, GSO_TCPV6, GSO_UDP};
use torii_vhost_user_net::{BufPool, NetBuf, VirtioNetHdr};

use crate::offload::{fold, sum16};
use crate::packet::{Packet, PacketPool};

/// Identification of the next IPv6 datagram fragmented here (RFC 8200 §4.5).
static NEXT_FRAGMENT_ID: AtomicU32 = AtomicU32::new(1);

/// Most segments one super-frame may become (64 KiB at an MSS of 512 and a little more).
pub const MAX_SEGS: usize = 160;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_FRAGMENT: u8 = 44;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a super-frame was not segmented (it is dropped and counted).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    #[error("headers do not describe the frame (not Ethernet/IP/TCP or UDP as gso_type says)")]
    Malformed,
    #[error("gso_size {0} would make more than {MAX_SEGS} segments")]
    TooManySegments(u16),
    #[error("packet pool exhausted")]
    NoBuffers,
}

#[derive(Clone, Copy)]
enum L3 {
    V4,
    V6,
}

/// Where the headers of a super-frame are.
struct Layout {
    l3: L3,
    /// Offsets of the IP header and the transport header, and where the payload starts.
    ip: usize,
    l4: usize,
    payload: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn parse(f: &[u8], proto: u8) -> Result<Layout, GsoError> {
    let bad = GsoError::Malformed;
    if f.len() < 14 {
        return Err(bad);
    }
    let (mut ip, mut et) = (14, be16(f, 12));
    if et == ETH_P_8021Q || et == ETH_P_8021AD {
        if f.len() < 18 {
            return Err(bad);
        }
        (ip, et) = (18, be16(f, 16));
    }
    let (l3, l4) = match et {
        ETH_P_IPV4 => {
            let ihl = usize::from(*f.get(ip).ok_or(GsoError::Malformed)? & 0x0f) * 4;
            if f[ip] >> 4 != 4 || ihl < 20 || f.len() < ip + ihl || f[ip + 9] != proto {
                return Err(bad);
            }
            (L3::V4, ip + ihl)
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: Linux sends TSO6 without them.
            if f.len() < ip + 40 || f[ip] >> 4 != 6 || f[ip + 6] != proto {
                return Err(bad);
            }
            (L3::V6, ip + 40)
        }
        _ => return Err(bad),
    };
    let l4_len = if proto == IPPROTO_TCP {
        if f.len() < l4 + 20 {
            return Err(bad);
        }
        usize::from(f[l4 + 12] >> 4) * 4
    } else {
        8
    };
    if l4_len < 8 || f.len() < l4 + l4_len {
        return Err(bad);
    }
    Ok(Layout {
        l3,
        ip,
        l4,
        payload: l4 + l4_len,
    })
}

/// The pseudo-header sum (RFC 793 / RFC 8200 §8.1) for a transport segment of `len` bytes.
fn pseudo(f: &[u8], lay: &Layout, proto: u8, len: usize) -> u32 {
    let acc = match lay.l3 {
        L3::V4 => sum16(&f[lay.ip + 12..lay.ip + 20], 0),
        L3::V6 => sum16(&f[lay.ip + 8..lay.ip + 40], 0),
    };
    acc + u32::from(proto) + (len as u32 & 0xffff) + (len as u32 >> 16)
}

/// Sets the IPv4 header checksum of the header at `ip`.
fn ipv4_csum(f: &mut [u8], ip: usize) {
    let ihl = usize::from(f[ip] & 0x0f) * 4;
    put16(f, ip + 10, 0);
    let c = !fold(sum16(&f[ip..ip + ihl], 0));
    put16(f, ip + 10, c);
}

/// Sets the transport checksum at `l4 + off` over `l4..`.
fn l4_csum(f: &mut [u8], lay: &Layout, proto: u8, off: usize) {
    let len = f.len() - lay.l4;
    put16(f, lay.l4 + off, 0);
    let mut c = !fold(sum16(&f[lay.l4..], pseudo(f, lay, proto, len)));
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff; // RFC 768: a computed 0 is sent as all ones
    }
    put16(f, lay.l4 + off, c);
}

/// A fresh buffer holding `parts` one after the other, with no offload metadata.
fn build(pool: &mut PacketPool, parts: &[&[u8]]) -> Result<Packet, GsoError> {
    let mut p = pool.alloc().ok_or(GsoError::NoBuffers)?;
    let area = p.read_area(0);
    let mut at = 0;
    for part in parts {
        area[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    p.set_read(0, at, VirtioNetHdr::default());
    Ok(p)
}

/// Cuts `p` into segments appended to `out` (which should have room for [`MAX_SEGS`] more).
/// On error nothing is appended and every buffer taken is back in `pool`; `p` itself is left
/// to the caller either way.
pub fn segment(p: &Packet, pool: &mut PacketPool, out: &mut Vec<Packet>) -> Result<(), GsoError> {
    let start = out.len();
    let r = segment_into(p, pool, out);
    if r.is_err() {
        out.drain(start..).for_each(|s| pool.free(s));
    }
    r
}

fn segment_into(p: &Packet, pool: &mut PacketPool, out: &mut Vec<Packet>) -> Result<(), GsoError> {
    let h = p.hdr();
    let f = p.data();
    let proto = match h.gso_kind() {
        GSO_TCPV4 | GSO_TCPV6 => IPPROTO_TCP,
        GSO_UDP => IPPROTO_UDP,
        _ => return Err(GsoError::Malformed),
    };
    let lay = parse(f, proto)?;
    match (h.gso_kind(), lay.l3) {
        (GSO_TCPV4, L3::V4) | (GSO_TCPV6, L3::V6) => tcp(f, &lay, h.gso_size, pool, out),
        (GSO_UDP, _) => ufo(f, &lay, h.gso_size, pool, out),
        _ => Err(GsoError::Malformed),
    }
}

fn count(payload: usize, mss: usize, gso_size: u16) -> Result<usize, GsoError> {
    if mss == 0 {
        return Err(GsoError::TooManySegments(gso_size));
    }
    let n = payload.div_ceil(mss).max(1);
    if n > MAX_SEGS {
        return Err(GsoError::TooManySegments(gso_size));
    }
    Ok(n)
}

fn tcp(
    f: &[u8],
    lay: &Layout,
    mss: u16,
    pool: &mut PacketPool,
    out: &mut Vec<Packet>,
) -> Result<(), GsoError> {
    let hdrs = &f[..lay.payload];
    let data = &f[lay.payload..];
    let n = count(data.len(), usize::from(mss), mss)?;
    let seq0 = u32::from_be_bytes(f[lay.l4 + 4..lay.l4 + 8].try_into().unwrap_or_default());
    let flags = f[lay.l4 + 13];
    let id0 = be16(f, lay.ip + 4);
    let mss = usize::from(mss);
    // A super-frame without payload still goes out, as one frame (`count` is at least 1).
    for i in 0..n {
        let chunk = &data[(i * mss).min(data.len())..((i + 1) * mss).min(data.len())];
        let mut s = build(pool, &[hdrs, chunk])?;
        let d = s.data_mut();
        match lay.l3 {
            L3::V4 => {
                put16(d, lay.ip + 2, (d.len() - lay.ip) as u16);
                put16(d, lay.ip + 4, id0.wrapping_add(i as u16));
                ipv4_csum(d, lay.ip);
            }
            L3::V6 => put16(d, lay.ip + 4, (d.len() - lay.l4) as u16),
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        d[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut fl = flags;
        if i + 1 < n {
            fl &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            fl &= !TCP_CWR;
        }
        d[lay.l4 + 13] = fl;
        l4_csum(d, lay, IPPROTO_TCP, 16);
        out.push(s);
    }
    Ok(())
}

/// UFO: the datagram's checksum is computed over the whole of it, then the IP payload (UDP
/// header + data) is cut into fragments of `gso_size` bytes rounded down to 8 (RFC 791,
/// RFC 8200 §4.5).
fn ufo(
    f: &[u8],
    lay: &Layout,
    gso_size: u16,
    pool: &mut PacketPool,
    out: &mut Vec<Packet>,
) -> Result<(), GsoError> {
    // The whole datagram with its length and checksum set.
    let mut dgram = build(pool, &[f])?;
    let d = dgram.data_mut();
    let udp_len = d.len() - lay.l4;
    put16(d, lay.l4 + 4, udp_len as u16);
    l4_csum(d, lay, IPPROTO_UDP, 6);
    let r = fragment(dgram.data(), lay, gso_size, pool, out);
    pool.free(dgram);
    r
}

fn fragment(
    d: &[u8],
    lay: &Layout,
    gso_size: u16,
    pool: &mut PacketPool,
    out: &mut Vec<Packet>,
) -> Result<(), GsoError> {
    let frag = usize::from(gso_size) & !7;
    let body = &d[lay.l4..];
    let n = count(body.len(), frag, gso_size)?;
    if n == 1 {
        // Fits in one frame: no fragmentation.
        let mut s = build(pool, &[d])?;
        if let L3::V4 = lay.l3 {
            let s = s.data_mut();
            put16(s, lay.ip + 2, (s.len() - lay.ip) as u16);
            ipv4_csum(s, lay.ip);
        } else {
            let s = s.data_mut();
            put16(s, lay.ip + 4, (s.len() - lay.l4) as u16);
        }
        out.push(s);
        return Ok(());
    }
    let ident = match lay.l3 {
        L3::V4 => u32::from(be16(d, lay.ip + 4)),
        // The sender left us none to reuse: a fresh one per datagram.
        L3::V6 => NEXT_FRAGMENT_ID.fetch_add(1, Ordering::Relaxed),
    };
    for (i, chunk) in body.chunks(frag).enumerate() {
        let more = i + 1 < n;
        let offset = i * frag;
        let s = match lay.l3 {
            L3::V4 => {
                let mut s = build(pool, &[&d[..lay.l4], chunk])?;
                let s2 = s.data_mut();
                put16(s2, lay.ip + 2, (s2.len() - lay.ip) as u16);
                // Offset in 8-byte units, MF on all but the last; DF cleared.
                put16(
                    s2,
                    lay.ip + 6,
                    (offset / 8) as u16 | if more { 0x2000 } else { 0 },
                );
                ipv4_csum(s2, lay.ip);
                s
            }
            L3::V6 => {
                // IPv6 header, then a fragment header (next header: UDP), then the piece.
                let mut fh = [0u8; 8];
                fh[0] = IPPROTO_UDP;
                let off = ((offset / 8) as u16) << 3 | u16::from(more);
                fh[2..4].copy_from_slice(&off.to_be_bytes());
                fh[4..8].copy_from_slice(&ident.to_be_bytes());
                let mut s = build(pool, &[&d[..lay.l4], &fh, chunk])?;
                let s2 = s.data_mut();
                put16(s2, lay.ip + 4, (8 + chunk.len()) as u16);
                s2[lay.ip + 6] = IPPROTO_FRAGMENT;
                s
            }
        };
        out.push(s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use torii_vhost_user_net::hdr::F_NEEDS_CSUM;

    const MAC: [u8; 12] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Ethernet (optionally 802.1Q-tagged) + IPv4 or IPv6 + a TCP or UDP header + `data`, as
    /// a guest hands a super-frame over: lengths as if it were one packet, checksums unset.
    fn super_frame(v6: bool, tcp: bool, vlan: bool, data: &[u8]) -> Vec<u8> {
        let mut f = MAC.to_vec();
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        }
        let l4_len = if tcp { 20 } else { 8 };
        let proto = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
        if v6 {
            f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&((l4_len + data.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            f.extend_from_slice(&ip);
        } else {
            f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
            let tot = (20 + l4_len + data.len()).min(65535) as u16;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&tot.to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            f.extend_from_slice(&ip);
        }
        if tcp {
            let mut t = vec![0x9c, 0x40, 0x00, 0x50];
            t.extend_from_slice(&0xfffff000u32.to_be_bytes()); // seq, wraps during the test
            t.extend_from_slice(&7u32.to_be_bytes()); // ack
            t.extend_from_slice(&[0x50, 0x80 | 0x10 | 0x08 | 0x01, 0xff, 0xff, 0, 0, 0, 0]);
            f.extend_from_slice(&t);
        } else {
            let mut u = vec![0x30, 0x39, 0x00, 0x35];
            u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            f.extend_from_slice(&u);
        }
        f.extend_from_slice(data);
        f
    }

    fn packet(pool: &mut PacketPool, f: &[u8], gso_type: u8, gso_size: u16) -> Packet {
        let mut p = pool.alloc().unwrap();
        p.fill(f);
        *p.hdr_mut() = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            gso_size,
            ..Default::default()
        };
        p
    }

    /// Whether the transport checksum of `seg` (transport header at `l4`) verifies.
    fn l4_ok(seg: &[u8], ip: usize, l4: usize, v6: bool, proto: u8) -> bool {
        let len = seg.len() - l4;
        let mut acc = if v6 {
            sum16(&seg[ip + 8..ip + 40], 0)
        } else {
            sum16(&seg[ip + 12..ip + 20], 0)
        };
        acc += u32::from(proto) + len as u32;
        fold(sum16(&seg[l4..], acc)) == 0xffff
    }

    #[test]
    fn tcp4_segments_carry_the_stream_with_valid_headers() {
        let mut pool = PacketPool::new(16);
        let data = payload(4000);
        let p = packet(
            &mut pool,
            &super_frame(false, true, false, &data),
            GSO_TCPV4,
            1448,
        );
        let mut out = Vec::new();
        segment(&p, &mut pool, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let (ip, l4, pl) = (14, 34, 54);
        let mut joined = Vec::new();
        for (i, s) in out.iter().enumerate() {
            let d = s.data();
            assert_eq!(s.hdr(), VirtioNetHdr::default());
            assert_eq!(
                usize::from(be16(d, ip + 2)),
                d.len() - ip,
                "IPv4 total length"
            );
            assert_eq!(be16(d, ip + 4), 0x1234 + i as u16, "IPv4 id");
            assert_eq!(fold(sum16(&d[ip..l4], 0)), 0xffff, "IPv4 header checksum");
            let seq = u32::from_be_bytes(d[l4 + 4..l4 + 8].try_into().unwrap());
            assert_eq!(seq, 0xfffff000u32.wrapping_add(1448 * i as u32));
            let last = i == 2;
            assert_eq!(
                d[l4 + 13] & (TCP_FIN | TCP_PSH) != 0,
                last,
                "FIN/PSH on the last"
            );
            assert_eq!(d[l4 + 13] & TCP_CWR != 0, i == 0, "CWR on the first");
            assert!(
                l4_ok(d, ip, l4, false, IPPROTO_TCP),
                "TCP checksum of segment {i}"
            );
            assert!(d.len() - pl <= 1448);
            joined.extend_from_slice(&d[pl..]);
        }
        assert_eq!(joined, data);
        out.into_iter().for_each(|s| pool.free(s));
        pool.free(p);
        assert_eq!(pool.available(), 16);
    }

    #[test]
    fn tcp6_behind_a_vlan_tag() {
        let mut pool = PacketPool::new(8);
        let data = payload(3000);
        let p = packet(
            &mut pool,
            &super_frame(true, true, true, &data),
            GSO_TCPV6,
            1000,
        );
        let mut out = Vec::new();
        segment(&p, &mut pool, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let (ip, l4, pl) = (18, 58, 78);
        let mut joined = Vec::new();
        for s in &out {
            let d = s.data();
            assert_eq!(&d[12..16], &[0x81, 0x00, 0x00, 0x64], "tag kept");
            assert_eq!(usize::from(be16(d, ip + 4)), d.len() - l4, "payload length");
            assert!(l4_ok(d, ip, l4, true, IPPROTO_TCP));
            joined.extend_from_slice(&d[pl..]);
        }
        assert_eq!(joined, data);
    }

    /// Reassembles IPv4 fragments (offset, MF) and checks the datagram's UDP checksum.
    #[test]
    fn udp4_becomes_fragments_of_one_datagram() {
        let mut pool = PacketPool::new(16);
        let data = payload(5000);
        let f = super_frame(false, false, false, &data);
        let p = packet(&mut pool, &f, GSO_UDP, 1480);
        let mut out = Vec::new();
        segment(&p, &mut pool, &mut out).unwrap();
        assert_eq!(out.len(), 4); // 5008 bytes of UDP in pieces of 1480
        let (ip, l4) = (14, 34);
        let mut body = Vec::new();
        for (i, s) in out.iter().enumerate() {
            let d = s.data();
            assert_eq!(fold(sum16(&d[ip..l4], 0)), 0xffff);
            assert_eq!(be16(d, ip + 4), 0x1234, "one identification");
            let fo = be16(d, ip + 6);
            assert_eq!(usize::from(fo & 0x1fff) * 8, body.len(), "fragment offset");
            assert_eq!(
                fo & 0x2000 != 0,
                i + 1 < out.len(),
                "MF on all but the last"
            );
            body.extend_from_slice(&d[l4..]);
        }
        let mut whole = f[..l4].to_vec();
        whole.extend_from_slice(&body);
        assert_eq!(&whole[l4 + 8..], &data[..]);
        assert!(l4_ok(&whole, ip, l4, false, IPPROTO_UDP));
    }

    #[test]
    fn udp6_fragments_have_a_fragment_header() {
        let mut pool = PacketPool::new(8);
        let data = payload(3000);
        let f = super_frame(true, false, false, &data);
        let p = packet(&mut pool, &f, GSO_UDP, 1400);
        let mut out = Vec::new();
        segment(&p, &mut pool, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let (ip, l4) = (14, 54);
        let mut body = Vec::new();
        let mut ids = Vec::new();
        for (i, s) in out.iter().enumerate() {
            let d = s.data();
            assert_eq!(d[ip + 6], IPPROTO_FRAGMENT);
            assert_eq!(usize::from(be16(d, ip + 4)), d.len() - l4);
            assert_eq!(d[l4], IPPROTO_UDP);
            let off = be16(d, l4 + 2);
            assert_eq!(usize::from(off >> 3) * 8, body.len());
            assert_eq!(off & 1 != 0, i + 1 < out.len());
            ids.push(&d[l4 + 4..l4 + 8]);
            body.extend_from_slice(&d[l4 + 8..]);
        }
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
        let mut whole = f[..l4].to_vec();
        whole.extend_from_slice(&body);
        assert_eq!(&whole[l4 + 8..], &data[..]);
        assert!(l4_ok(&whole, ip, l4, true, IPPROTO_UDP));
    }

    #[test]
    fn hostile_super_frames_are_refused_without_leaking_buffers() {
        let mut pool = PacketPool::new(8);
        let f = super_frame(false, true, false, &payload(20000));
        let mut out = Vec::new();
        // A tiny gso_size: too many segments.
        let p = packet(&mut pool, &f, GSO_TCPV4, 1);
        assert_eq!(
            segment(&p, &mut pool, &mut out),
            Err(GsoError::TooManySegments(1))
        );
        pool.free(p);
        // gso_type says TCP over IPv6, the frame is IPv4.
        let p = packet(&mut pool, &f, GSO_TCPV6, 1448);
        assert_eq!(segment(&p, &mut pool, &mut out), Err(GsoError::Malformed));
        pool.free(p);
        // Headers cut short.
        let p = packet(&mut pool, &f[..40], GSO_TCPV4, 1448);
        assert_eq!(segment(&p, &mut pool, &mut out), Err(GsoError::Malformed));
        pool.free(p);
        // More segments (14) than buffers (7 left): all taken ones go back.
        let p = packet(&mut pool, &f, GSO_TCPV4, 1448);
        assert_eq!(segment(&p, &mut pool, &mut out), Err(GsoError::NoBuffers));
        pool.free(p);
        assert!(out.is_empty());
        assert_eq!(pool.available(), 8);
    }
}
