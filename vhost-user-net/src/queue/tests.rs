//! Data-path tests over in-process guest memory (see [`crate::testing`]).

use super::*;
use crate::hdr::{F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_UDP};
use crate::testing::*;

const V1: u64 = F_VERSION_1;

fn device(features: u64) -> TestDevice {
    TestDevice::new(&Config::new(features))
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

/// `h` as the driver puts it in front of a frame, `len` (10 or 12) bytes long.
fn hdr_bytes(h: VirtioNetHdr, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    h.write(&mut b, 0);
    b
}

fn csum_hdr() -> VirtioNetHdr {
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    }
}

fn receive(d: &mut TestDevice, pool: &mut VecPool) -> (FromGuest, Vec<VecBuf>) {
    let mut out = Vec::with_capacity(32);
    let st = d.queues.from_guest(0, 32, pool, &mut out);
    (st, out)
}

fn send(d: &mut TestDevice, pool: &mut VecPool, pkts: &[(VirtioNetHdr, Vec<u8>)]) -> ToGuest {
    let mut v: Vec<_> = pkts.iter().map(|(h, f)| pool.packet(*h, f)).collect();
    let st = d.queues.to_guest(0, &mut v, pool);
    assert!(v.is_empty());
    st
}

fn one(n: usize) -> FromGuest {
    FromGuest {
        packets: 1,
        bytes: n,
        ..Default::default()
    }
}

// ---- guest TX (§5.1.6.2) ----

#[test]
fn from_guest_header_in_its_own_descriptor() {
    let mut d = device(V1 | F_CSUM);
    let mut pool = VecPool::new(8, 2048);
    let f = frame(100);
    let head = d.driver.add_tx(0, &[&hdr_bytes(csum_hdr(), 12), &f]);
    let (st, out) = receive(&mut d, &mut pool);
    assert_eq!(st, one(100));
    assert_eq!(out[0].frame(), &f[..]);
    assert_eq!(out[0].hdr(), csum_hdr());
    assert_eq!(d.driver.take_used(tx(0)), vec![(head as u32, 0)]);
    assert!(d.broken_queues().is_empty());
}

#[test]
fn from_guest_header_split_across_descriptors() {
    let mut d = device(V1 | F_MRG_RXBUF | F_CSUM);
    let mut pool = VecPool::new(8, 2048);
    let f = frame(300);
    let mut pkt = hdr_bytes(csum_hdr(), 12);
    pkt.extend_from_slice(&f);
    let head = d
        .driver
        .add_tx(0, &[&pkt[..3], &pkt[3..11], &pkt[11..40], &pkt[40..]]);
    let (st, out) = receive(&mut d, &mut pool);
    assert_eq!(st, one(300));
    assert_eq!(out[0].frame(), &f[..]);
    assert_eq!(out[0].hdr(), csum_hdr());
    assert_eq!(d.driver.take_used(tx(0)), vec![(head as u32, 0)]);
}

#[test]
fn from_guest_indirect_table() {
    let mut d = device(V1 | F_INDIRECT_DESC | F_CSUM | F_HOST_TSO4);
    let mut pool = VecPool::new(8, 2048);
    let f = frame(1514);
    let gso = VirtioNetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        hdr_len: 54,
        ..csum_hdr()
    };
    let h = hdr_bytes(gso, 12);
    let head = d
        .driver
        .add_tx_indirect(0, &[&h[..7], &h[7..], &f[..54], &f[54..]]);
    let (st, out) = receive(&mut d, &mut pool);
    assert_eq!(
        st,
        FromGuest {
            gso: 1,
            ..one(1514)
        }
    );
    assert_eq!(out[0].frame(), &f[..]);
    assert_eq!(out[0].hdr(), gso);
    assert_eq!(d.driver.take_used(tx(0)), vec![(head as u32, 0)]);
}

#[test]
fn from_guest_legacy_header_is_10_bytes() {
    // Neither VERSION_1 nor MRG_RXBUF: no num_buffers field (§5.1.6, legacy interface).
    let mut d = device(F_CSUM);
    let mut pool = VecPool::new(8, 2048);
    let f = frame(64);
    d.driver.add_tx(0, &[&hdr_bytes(csum_hdr(), 10), &f]);
    let (st, out) = receive(&mut d, &mut pool);
    assert_eq!(st, one(64));
    assert_eq!(out[0].frame(), &f[..]);
}

#[test]
fn from_guest_offloads_the_driver_did_not_negotiate_are_dropped() {
    // §5.1.6.2.1: NEEDS_CSUM needs CSUM, a gso_type needs its HOST_* feature.
    let gso = VirtioNetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        hdr_len: 54,
        ..csum_hdr()
    };
    for (features, hdr) in [(V1, csum_hdr()), (V1 | F_CSUM, gso)] {
        let mut d = device(features);
        let mut pool = VecPool::new(8, 2048);
        let f = frame(200);
        d.driver.add_tx(0, &[&hdr_bytes(hdr, 12), &f]);
        let (st, out) = receive(&mut d, &mut pool);
        assert_eq!(
            (st.packets, st.dropped_invalid),
            (0, 1),
            "{hdr:?} with {features:#x}"
        );
        assert!(out.is_empty());
        assert!(d.broken_queues().is_empty());
    }
}

#[test]
fn from_guest_bad_packets_are_dropped_not_fatal() {
    let mut d = device(V1);
    let mut pool = VecPool::new(8, MAX_FRAME + 16);
    let bad_csum = VirtioNetHdr {
        csum_start: 90,
        ..csum_hdr()
    };
    let gso_without_csum = VirtioNetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        ..Default::default()
    };
    let h = hdr_bytes(VirtioNetHdr::default(), 12);
    let big = frame(MAX_FRAME + 1);
    let mut heads = vec![
        d.driver.add_tx(0, &[&h[..8]]),                               // runt
        d.driver.add_tx(0, &[&hdr_bytes(bad_csum, 12), &frame(100)]), // csum past the end
        d.driver
            .add_tx(0, &[&hdr_bytes(gso_without_csum, 12), &frame(2000)]),
        d.driver.add_tx(0, &[&h, &big]), // one byte past MAX_FRAME
    ];
    // A descriptor claiming 4 GiB: too long, so never read (no address check needed).
    let a = d.driver.alloc(64);
    heads.push(d.driver.add_chain(tx(0), &[(a, u32::MAX, false)]));
    heads.push(d.driver.add_tx(0, &[&h, &big[..MAX_FRAME]])); // the largest accepted
    let (st, out) = receive(&mut d, &mut pool);
    assert_eq!(
        st,
        FromGuest {
            packets: 1,
            bytes: MAX_FRAME,
            dropped_invalid: 5,
            gso: 0,
        }
    );
    assert_eq!(out[0].frame(), &big[..MAX_FRAME]);
    let used: Vec<_> = heads.iter().map(|&h| (h as u32, 0)).collect();
    assert_eq!(d.driver.take_used(tx(0)), used);
    assert!(d.broken_queues().is_empty());
}

#[test]
fn from_guest_frame_larger_than_buffer_is_dropped() {
    let mut d = device(V1);
    let mut pool = VecPool::new(8, 1600);
    let h = hdr_bytes(VirtioNetHdr::default(), 12);
    d.driver.add_tx(0, &[&h, &frame(1601)]);
    d.driver.add_tx(0, &[&h, &frame(1600)]);
    let (st, out) = receive(&mut d, &mut pool);
    assert_eq!((st.packets, st.dropped_invalid), (1, 1));
    assert_eq!(out[0].frame().len(), 1600);
}

#[test]
fn from_guest_respects_burst_and_pool() {
    let mut d = device(V1);
    let mut pool = VecPool::new(2, 2048);
    let h = hdr_bytes(VirtioNetHdr::default(), 12);
    let heads: Vec<u16> = (0..4)
        .map(|i| d.driver.add_tx(0, &[&h, &frame(60 + i)]))
        .collect();
    let mut out = Vec::with_capacity(8);
    // Burst of 1.
    let st = d.queues.from_guest(0, 1, &mut pool, &mut out);
    assert_eq!(st.packets, 1);
    assert_eq!(d.next_avail(tx(0)), 1);
    // The pool runs dry after one more: the third chain stays available.
    let st = d.queues.from_guest(0, 32, &mut pool, &mut out);
    assert_eq!(st.packets, 1);
    assert_eq!(d.next_avail(tx(0)), 2);
    assert_eq!(
        d.driver.take_used(tx(0)),
        vec![(heads[0] as u32, 0), (heads[1] as u32, 0)]
    );
    out.drain(..).for_each(|b| pool.free(b));
    let st = d.queues.from_guest(0, 32, &mut pool, &mut out);
    assert_eq!(st.packets, 2);
    assert_eq!(out[0].frame(), &frame(62)[..]);
    assert_eq!(out[1].frame(), &frame(63)[..]);
}

#[test]
fn from_guest_in_order_writes_only_the_last_used_element() {
    // §2.7.9: with IN_ORDER the device may write one used element for a batch; the driver
    // takes every chain up to it as used.
    let mut d = device(V1 | F_IN_ORDER);
    let mut pool = VecPool::new(8, 2048);
    let h = hdr_bytes(VirtioNetHdr::default(), 12);
    let heads: Vec<u16> = (0..3)
        .map(|i| d.driver.add_tx(0, &[&h, &frame(60 + i)]))
        .collect();
    let used = d.driver.layout(tx(0)).used;
    for i in 0..3 {
        d.driver.write(used + 4 + 8 * i, &[0xff; 8]);
    }
    let (st, _) = receive(&mut d, &mut pool);
    assert_eq!(st.packets, 3);
    assert_eq!(d.driver.used_idx(tx(0)), 3);
    assert_eq!(d.driver.used_elem(tx(0), 2), (heads[2] as u32, 0));
    // The first two slots were left as they were.
    assert_eq!(d.driver.used_elem(tx(0), 0), (u32::MAX, u32::MAX));
    assert_eq!(d.driver.used_elem(tx(0), 1), (u32::MAX, u32::MAX));
}

#[test]
fn memory_table_change_takes_effect_at_the_next_burst() {
    // The PMD keeps the memory table and ring translations between bursts; a new table from
    // the frontend must not leave it reading through the old one.
    let mut d = device(V1);
    let mut pool = VecPool::new(8, 2048);
    let h = hdr_bytes(VirtioNetHdr::default(), 12);
    d.driver.add_tx(0, &[&h, &frame(60)]);
    assert_eq!(receive(&mut d, &mut pool).0.packets, 1);
    // The next packet's buffers are in the data region, which then leaves the table.
    d.driver.add_tx(0, &[&h, &frame(60)]);
    d.remove_data_region();
    assert_eq!(receive(&mut d, &mut pool).0.packets, 0);
    let why = d.broken_reason(tx(0)).expect("queue reported broken");
    assert!(why.contains("outside guest memory"), "{why}");
}

// ---- guest RX (§5.1.6.3, §5.1.6.4) ----

#[test]
fn to_guest_packet_fits_one_chain() {
    let mut d = device(V1);
    let mut pool = VecPool::new(8, 2048);
    let (head, addrs) = d.driver.add_rx(0, &[1536]);
    let f = frame(100);
    let st = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), f.clone())]);
    assert_eq!((st.packets, st.bytes), (1, 100));
    assert_eq!(d.driver.take_used(rx(0)), vec![(head as u32, 112)]);
    let got = d.driver.read(addrs[0], 112);
    // num_buffers is 1 without MRG_RXBUF (§5.1.6.4).
    assert_eq!(got[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(got[12..], f[..]);
    assert_eq!(pool.outstanding(), 0);
}

#[test]
fn to_guest_chain_of_several_descriptors() {
    let mut d = device(V1);
    let mut pool = VecPool::new(8, 2048);
    let (head, addrs) = d.driver.add_rx(0, &[12, 50, 1000]);
    let f = frame(500);
    send(&mut d, &mut pool, &[(VirtioNetHdr::default(), f.clone())]);
    assert_eq!(d.driver.take_used(rx(0)), vec![(head as u32, 512)]);
    let mut got = d.driver.read(addrs[1], 50);
    got.extend(d.driver.read(addrs[2], 450));
    assert_eq!(got, f);
}

#[test]
fn to_guest_mergeable_spans_chains() {
    let mut d = device(V1 | F_MRG_RXBUF);
    let mut pool = VecPool::new(8, 4096);
    let chains: Vec<_> = (0..4).map(|_| d.driver.add_rx(0, &[1536])).collect();
    let f = frame(4000);
    let st = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), f.clone())]);
    assert_eq!((st.packets, st.bytes), (1, 4000));
    // 4012 bytes: 1536 + 1536 + 940 (§5.1.6.4.2: num_buffers = 3).
    let lens = [1536, 1536, 940];
    let used = d.driver.take_used(rx(0));
    assert_eq!(
        used,
        (0..3)
            .map(|i| (chains[i].0 as u32, lens[i]))
            .collect::<Vec<_>>()
    );
    let mut got = Vec::new();
    for (c, len) in chains.iter().zip(lens) {
        got.extend(d.driver.read(c.1[0], len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(got[12..], f[..]);
    // The fourth chain is still there.
    assert_eq!(d.next_avail(rx(0)), 3);
    let st = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), frame(10))]);
    assert_eq!(st.packets, 1);
    assert_eq!(d.driver.take_used(rx(0)), vec![(chains[3].0 as u32, 22)]);
    assert_eq!(d.driver.read(chains[3].1[0] + 10, 2), [1, 0]);
}

#[test]
fn to_guest_num_buffers_split_across_chains() {
    let mut d = device(V1 | F_MRG_RXBUF);
    let mut pool = VecPool::new(8, 4096);
    // The first chain ends in the middle of num_buffers (bytes 10 and 11).
    let c0 = d.driver.add_rx(0, &[11]);
    let c1 = d.driver.add_rx(0, &[1536]);
    let c2 = d.driver.add_rx(0, &[1536]);
    d.driver.write(c1.1[0], &[0xee, 0xee]);
    let f = frame(1600);
    send(&mut d, &mut pool, &[(VirtioNetHdr::default(), f.clone())]);
    let used = d.driver.take_used(rx(0));
    assert_eq!(
        used,
        vec![(c0.0 as u32, 11), (c1.0 as u32, 1536), (c2.0 as u32, 65)]
    );
    assert_eq!(d.driver.read(c0.1[0] + 10, 1), [3]);
    assert_eq!(d.driver.read(c1.1[0], 1), [0]);
    assert_eq!(d.driver.read(c1.1[0] + 1, 1535), f[..1535]);
}

#[test]
fn to_guest_too_big_without_mrg_rxbuf_keeps_the_chain() {
    let mut d = device(V1);
    let mut pool = VecPool::new(8, 4096);
    let (head, addrs) = d.driver.add_rx(0, &[1536]);
    let st = send(
        &mut d,
        &mut pool,
        &[
            (VirtioNetHdr::default(), frame(2000)),
            (VirtioNetHdr::default(), frame(100)),
        ],
    );
    assert_eq!((st.packets, st.dropped_unsupported), (1, 1));
    // The big packet did not consume the chain: the small one went into it.
    assert_eq!(d.driver.take_used(rx(0)), vec![(head as u32, 112)]);
    assert_eq!(d.driver.read(addrs[0] + 12, 100), frame(100));
    assert!(d.broken_queues().is_empty());
}

#[test]
fn to_guest_empty_ring_loses_no_chain() {
    let mut d = device(V1 | F_MRG_RXBUF);
    let mut pool = VecPool::new(8, 4096);
    let st = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), frame(60))]);
    assert_eq!(st.dropped_no_buffer, 1);
    // Two chains are not enough for 4012 bytes: both go back to the ring.
    let a = d.driver.add_rx(0, &[1536]);
    let b = d.driver.add_rx(0, &[1536]);
    let st = send(
        &mut d,
        &mut pool,
        &[
            (VirtioNetHdr::default(), frame(4000)),
            (VirtioNetHdr::default(), frame(60)),
        ],
    );
    assert_eq!((st.packets, st.dropped_no_buffer), (0, 2));
    assert_eq!(d.next_avail(rx(0)), 0);
    assert!(d.driver.take_used(rx(0)).is_empty());
    let c = d.driver.add_rx(0, &[1536]);
    let st = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), frame(4000))]);
    assert_eq!(st.packets, 1);
    assert_eq!(
        d.driver.take_used(rx(0)),
        vec![(a.0 as u32, 1536), (b.0 as u32, 1536), (c.0 as u32, 940)]
    );
    assert_eq!(pool.outstanding(), 0);
}

#[test]
fn to_guest_gso_needs_guest_tso4() {
    let gso = VirtioNetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        hdr_len: 54,
        ..csum_hdr()
    };
    let mut d = device(V1 | F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO6);
    let mut pool = VecPool::new(8, 4096);
    d.driver.add_rx(0, &[4096]);
    let st = send(&mut d, &mut pool, &[(gso, frame(3000))]);
    assert_eq!((st.packets, st.dropped_unsupported), (0, 1));
    assert_eq!(d.next_avail(rx(0)), 0);

    let mut d = device(V1 | F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4);
    let (_, addrs) = d.driver.add_rx(0, &[4096]);
    let st = send(&mut d, &mut pool, &[(gso, frame(3000))]);
    assert_eq!(st.packets, 1);
    let h: [u8; 10] = d.driver.read(addrs[0], 10).try_into().unwrap();
    assert_eq!(VirtioNetHdr::parse(&h), gso);
}

#[test]
fn to_guest_checksum_flags_follow_guest_csum() {
    let valid = VirtioNetHdr {
        flags: F_DATA_VALID,
        ..Default::default()
    };
    // Without GUEST_CSUM, DATA_VALID is cleared (§5.1.6.4.1) and NEEDS_CSUM is refused.
    let mut d = device(V1);
    let mut pool = VecPool::new(8, 2048);
    let (_, a) = d.driver.add_rx(0, &[1536]);
    d.driver.write(a[0], &[0xff]);
    let st = send(
        &mut d,
        &mut pool,
        &[(csum_hdr(), frame(100)), (valid, frame(100))],
    );
    assert_eq!((st.packets, st.dropped_unsupported), (1, 1));
    assert_eq!(d.driver.read(a[0], 1), [0]);
    assert_eq!(d.next_avail(rx(0)), 1);

    let mut d = device(V1 | F_GUEST_CSUM);
    let (_, a) = d.driver.add_rx(0, &[1536]);
    let (_, b) = d.driver.add_rx(0, &[1536]);
    let st = send(
        &mut d,
        &mut pool,
        &[(valid, frame(100)), (csum_hdr(), frame(100))],
    );
    assert_eq!(st.packets, 2);
    assert_eq!(d.driver.read(a[0], 1), [F_DATA_VALID]);
    let h: [u8; 10] = d.driver.read(b[0], 10).try_into().unwrap();
    assert_eq!(VirtioNetHdr::parse(&h), csum_hdr());
}

#[test]
fn to_guest_legacy_header_has_no_num_buffers() {
    let mut d = device(0);
    let mut pool = VecPool::new(8, 2048);
    let (head, addrs) = d.driver.add_rx(0, &[1536]);
    let f = frame(60);
    send(&mut d, &mut pool, &[(VirtioNetHdr::default(), f.clone())]);
    assert_eq!(d.driver.take_used(rx(0)), vec![(head as u32, 70)]);
    assert_eq!(d.driver.read(addrs[0] + 10, 60), f);
}

#[test]
fn validate_header_edges() {
    let h = csum_hdr(); // checksum field at 50..52
    assert!(h.validate(52).is_ok());
    assert_eq!(h.validate(51), Err(crate::hdr::HdrError::CsumOutOfFrame));
    let gso = |gso_type| VirtioNetHdr {
        gso_type,
        gso_size: 1400,
        ..csum_hdr()
    };
    assert!(gso(GSO_TCPV4 | GSO_ECN).validate(3000).is_ok());
    assert!(gso(GSO_UDP).validate(3000).is_ok());
    assert_eq!(
        gso(5).validate(3000),
        Err(crate::hdr::HdrError::UnknownGsoType(5))
    );
    assert_eq!(
        gso(GSO_UDP | GSO_ECN).required_offloads(),
        Offloads::CSUM | Offloads::UFO | Offloads::ECN
    );
    // ECN on a non-GSO packet means nothing and requires nothing.
    assert!(gso(GSO_NONE | GSO_ECN).validate(3000).is_ok());
    assert_eq!(
        VirtioNetHdr {
            gso_type: GSO_ECN,
            ..Default::default()
        }
        .required_offloads(),
        Offloads::empty()
    );
}

// ---- hostile rings ----

/// Which path a hostile-ring test drives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Guest TX, `from_guest`.
    Tx,
    /// Guest RX, `to_guest`.
    Rx,
}

impl Dir {
    fn queue(self) -> u16 {
        match self {
            Dir::Tx => tx(0),
            Dir::Rx => rx(0),
        }
    }
}

/// Runs one burst on the corrupted queue of `dir` and checks that it is reported broken with a
/// reason containing `why`, that the other queue of the pair still works, and that the broken
/// queue is left alone afterwards (no packet, no guest memory write, no new report).
fn assert_breaks(d: &mut TestDevice, dir: Dir, why: &str) {
    let mut pool = VecPool::new(8, 4096);
    let q = dir.queue();
    let before = d.next_avail(q);
    match dir {
        Dir::Tx => {
            let (st, out) = receive(d, &mut pool);
            assert_eq!(st.packets, 0);
            assert!(out.is_empty());
        }
        Dir::Rx => {
            let st = send(d, &mut pool, &[(VirtioNetHdr::default(), frame(100))]);
            assert_eq!(st.dropped_no_buffer, 1);
        }
    }
    assert_eq!(pool.outstanding(), 0);
    let reason = d.broken_reason(q).expect("queue not reported broken");
    assert!(reason.contains(why), "reason {reason:?} lacks {why:?}");
    assert_eq!(d.broken_queues().len(), 1);
    assert!(d.next_avail(q).wrapping_sub(before) <= 1);

    // The other queue still works.
    match dir {
        Dir::Tx => {
            d.driver.add_rx(0, &[1536]);
            let st = send(d, &mut pool, &[(VirtioNetHdr::default(), frame(100))]);
            assert_eq!(st.packets, 1);
        }
        Dir::Rx => {
            d.driver
                .add_tx(0, &[&hdr_bytes(VirtioNetHdr::default(), 12), &frame(100)]);
            let (st, out) = receive(d, &mut pool);
            assert_eq!(st, one(100));
            out.into_iter().for_each(|b| pool.free(b));
        }
    }

    // The broken queue stays stopped even with a well-formed chain posted.
    match dir {
        Dir::Tx => {
            d.driver
                .add_tx(0, &[&hdr_bytes(VirtioNetHdr::default(), 12), &frame(60)]);
        }
        Dir::Rx => {
            d.driver.add_rx(0, &[1536]);
        }
    }
    let mem = d.driver.snapshot();
    let avail = d.next_avail(q);
    for _ in 0..2 {
        match dir {
            Dir::Tx => {
                let (st, out) = receive(d, &mut pool);
                assert_eq!(st, FromGuest::default());
                assert!(out.is_empty());
            }
            Dir::Rx => {
                let st = send(d, &mut pool, &[(VirtioNetHdr::default(), frame(60))]);
                assert_eq!(
                    st,
                    ToGuest {
                        dropped_no_buffer: 1,
                        ..Default::default()
                    }
                );
            }
        }
        if dir == Dir::Tx {
            // Notification suppression skips it too (§2.7.10).
            assert!(!d.queues.set_tx_notifications(true));
        }
    }
    assert_eq!(d.next_avail(q), avail);
    assert!(mem == d.driver.snapshot(), "broken queue {q} was touched");
    assert_eq!(d.broken_queues().len(), 1);
    assert_eq!(pool.outstanding(), 0);
}

const CUT: &str = "cut short";
const OUTSIDE: &str = "outside guest memory";

/// A valid first descriptor for `dir` (header-sized) whose chain continues at `next`.
fn first(d: &mut TestDevice, dir: Dir, next: u16) -> Desc {
    let a = d.driver.alloc(64);
    let w = if dir == Dir::Rx { DESC_F_WRITE } else { 0 };
    Desc::new(a, 12, DESC_F_NEXT | w, next)
}

fn write_flag(dir: Dir) -> u16 {
    if dir == Dir::Rx {
        DESC_F_WRITE
    } else {
        0
    }
}

#[test]
fn descriptor_loop() {
    for dir in [Dir::Tx, Dir::Rx] {
        let mut d = device(V1);
        let q = dir.queue();
        let [i, j] = d.driver.take_descs(q, 2)[..] else {
            unreachable!()
        };
        let a = first(&mut d, dir, j);
        d.driver.set_desc(q, i, a);
        d.driver.set_desc(q, j, Desc { next: i, ..a }); // back to the head
        d.driver.make_available(q, i);
        assert_breaks(&mut d, dir, CUT);
    }
}

#[test]
fn descriptor_self_loop_in_a_tiny_queue() {
    for dir in [Dir::Tx, Dir::Rx] {
        let mut d = TestDevice::new(&Config {
            queue_size: 1,
            ..Config::new(V1)
        });
        let q = dir.queue();
        let a = first(&mut d, dir, 0);
        d.driver.set_desc(q, 0, a);
        d.driver.make_available(q, 0);
        let mut pool = VecPool::new(4, 2048);
        match dir {
            Dir::Tx => assert_eq!(receive(&mut d, &mut pool).0.packets, 0),
            Dir::Rx => {
                let st = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), frame(9))]);
                assert_eq!(st.dropped_no_buffer, 1);
            }
        }
        assert!(d.broken_reason(q).unwrap().contains(CUT));
    }
}

#[test]
fn next_index_out_of_range() {
    for dir in [Dir::Tx, Dir::Rx] {
        let mut d = device(V1);
        let q = dir.queue();
        let size = d.driver.layout(q).size;
        let i = d.driver.take_descs(q, 1)[0];
        let a = first(&mut d, dir, size);
        d.driver.set_desc(q, i, a);
        d.driver.make_available(q, i);
        assert_breaks(&mut d, dir, CUT);
    }
}

#[test]
fn head_index_out_of_range() {
    for dir in [Dir::Tx, Dir::Rx] {
        let mut d = device(V1);
        let q = dir.queue();
        let size = d.driver.layout(q).size;
        d.driver.make_available(q, size + 3);
        assert_breaks(&mut d, dir, CUT);
    }
}

#[test]
fn buffer_outside_guest_memory() {
    for dir in [Dir::Tx, Dir::Rx] {
        // In the hole between the regions, straddling the end of region 1, and wrapping past
        // the top of the address space.
        for (addr, len) in [
            (HOLE, 64),
            (DATA_BASE + Config::new(0).data_size - 4, 64),
            (u64::MAX - 3, 64),
        ] {
            let mut d = device(V1);
            let q = dir.queue();
            let h = d.driver.alloc(12);
            let w = write_flag(dir);
            d.driver
                .add_chain(q, &[(h, 12, w != 0), (addr, len, w != 0)]);
            assert_breaks(&mut d, dir, OUTSIDE);
        }
    }
}

#[test]
fn wrong_direction_descriptor() {
    let mut d = device(V1);
    let a = d.driver.alloc(100);
    d.driver.add_chain(tx(0), &[(a, 12, false), (a, 88, true)]);
    assert_breaks(
        &mut d,
        Dir::Tx,
        "device-writable descriptor in a transmit chain",
    );

    let mut d = device(V1);
    let a = d.driver.alloc(100);
    d.driver.add_chain(rx(0), &[(a, 12, true), (a, 88, false)]);
    assert_breaks(
        &mut d,
        Dir::Rx,
        "device-readable descriptor in a receive chain",
    );
}

#[test]
fn avail_idx_too_far_ahead() {
    for dir in [Dir::Tx, Dir::Rx] {
        let mut d = device(V1);
        let q = dir.queue();
        let size = d.driver.layout(q).size;
        d.driver.set_avail_idx(q, size + 1);
        assert_breaks(&mut d, dir, "avail ring");
    }
}

#[test]
fn bad_indirect_tables() {
    type Corrupt = fn(&mut TestDevice, Dir) -> Desc;
    let cases: [(&str, Corrupt); 5] = [
        ("length not a multiple of 16", |d, _| {
            Desc::new(d.driver.alloc_scratch(32), 24, DESC_F_INDIRECT, 0)
        }),
        ("empty table", |d, _| {
            Desc::new(d.driver.alloc_scratch(32), 0, DESC_F_INDIRECT, 0)
        }),
        ("table outside memory", |_, _| {
            Desc::new(HOLE, 32, DESC_F_INDIRECT, 0)
        }),
        ("nested indirect", |d, dir| {
            let t = d.driver.alloc_scratch(32);
            let inner = d.driver.alloc_scratch(16);
            let a = d.driver.alloc(64);
            d.driver
                .write_desc_at(inner, 0, Desc::new(a, 64, write_flag(dir), 0));
            d.driver
                .write_desc_at(t, 0, Desc::new(a, 12, DESC_F_NEXT | write_flag(dir), 1));
            d.driver
                .write_desc_at(t, 1, Desc::new(inner, 16, DESC_F_INDIRECT, 0));
            Desc::new(t, 32, DESC_F_INDIRECT, 0)
        }),
        ("loop inside the table", |d, dir| {
            let t = d.driver.alloc_scratch(32);
            let a = d.driver.alloc(64);
            let w = DESC_F_NEXT | write_flag(dir);
            d.driver.write_desc_at(t, 0, Desc::new(a, 12, w, 1));
            d.driver.write_desc_at(t, 1, Desc::new(a, 12, w, 0));
            Desc::new(t, 32, DESC_F_INDIRECT, 0)
        }),
    ];
    for (name, corrupt) in cases {
        for dir in [Dir::Tx, Dir::Rx] {
            let mut d = device(V1 | F_INDIRECT_DESC);
            let q = dir.queue();
            let head = d.driver.take_descs(q, 1)[0];
            let desc = corrupt(&mut d, dir);
            d.driver.set_desc(q, head, desc);
            d.driver.make_available(q, head);
            eprintln!("indirect case: {name}");
            assert_breaks(&mut d, dir, CUT);
        }
    }
}

#[test]
fn used_ring_outside_guest_memory() {
    for dir in [Dir::Tx, Dir::Rx] {
        let mut d = device(V1);
        let q = dir.queue();
        let l = d.driver.layout(q);
        d.set_ring_addresses(q, l.desc, l.avail, HOLE);
        match dir {
            Dir::Tx => {
                d.driver
                    .add_tx(0, &[&hdr_bytes(VirtioNetHdr::default(), 12), &frame(60)]);
            }
            Dir::Rx => {
                d.driver.add_rx(0, &[1536]);
            }
        }
        assert_breaks(&mut d, dir, "not inside guest memory");
    }
}

#[test]
fn avail_ring_straddling_the_end_of_memory() {
    // `avail->idx` is readable but `avail->ring[]` is not (§2.7.6 puts both in one area).
    for dir in [Dir::Tx, Dir::Rx] {
        let mut d = device(V1);
        let q = dir.queue();
        let l = d.driver.layout(q);
        let end = (d.driver.snapshot().len() as u64) - Config::new(0).data_size;
        d.set_ring_addresses(q, l.desc, end - 4, l.used);
        d.driver.write(end - 2, &1u16.to_le_bytes());
        assert_breaks(&mut d, dir, "not inside guest memory");
    }
}

// ---- the fuzz body, on deterministic inputs (what CI runs; see fuzz/ for the real fuzzer) ----

#[test]
fn fuzz_body_on_pseudo_random_inputs() {
    let mut rng = XorShift::new(0x746f_7269_695f_6675);
    let mut total = FuzzOutcome::default();
    let mut broken = 0;
    for i in 0..400 {
        let input = match i % 4 {
            0 => fuzz_seed(&mut rng),
            1 | 2 => {
                let mut v = fuzz_seed(&mut rng);
                for _ in 0..1 + rng.below(16) {
                    // Half of the changes land in the rings (start of region 0).
                    let at = if rng.below(2) == 0 {
                        FUZZ_HEADER + rng.below(1024) as usize
                    } else {
                        rng.below(v.len() as u64) as usize
                    };
                    v[at] = rng.next_u64() as u8;
                }
                v
            }
            _ => {
                let mut v = vec![0u8; rng.below(9000) as usize];
                rng.fill(&mut v);
                v
            }
        };
        let o = fuzz_descriptor_chains(&input);
        if i % 4 == 0 {
            // Unmodified seeds are well-formed rings.
            assert!(o.broken.is_empty(), "seed {i} broke a queue: {o:?}");
            assert!(o.received > 0, "seed {i} received nothing: {o:?}");
        }
        total.received += o.received;
        total.delivered += o.delivered;
        total.dropped += o.dropped;
        broken += o.broken.len();
    }
    // The inputs reach the success paths and the failure paths.
    assert!(total.received > 100, "{total:?}");
    assert!(total.delivered > 50, "{total:?}");
    assert!(total.dropped > 0, "{total:?}");
    assert!(broken > 50, "{broken}");
}

// ---- interrupts (§2.7.10) ----

/// An eventfd as SET_VRING_CALL hands it over, and a way to read (and reset) its counter.
fn call_fd() -> (std::fs::File, impl Fn() -> u64) {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: eventfd has no pointer arguments; the fd is owned by the File below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh eventfd nothing else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    let reader = f.try_clone().unwrap();
    (f, move || {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from a non-blocking eventfd.
        let n = unsafe { libc::read(reader.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    })
}

#[test]
fn interrupts_follow_used_event_and_no_interrupt_flag() {
    // EVENT_IDX (§2.7.10.2): interrupt when used_event is crossed, not otherwise.
    let mut d = device(V1 | F_EVENT_IDX);
    let (call, calls) = call_fd();
    d.set_call(tx(0), Some(call));
    let l = d.driver.layout(tx(0));
    let used_event_at = l.avail + 4 + 2 * u64::from(l.size);
    let mut pool = VecPool::new(8, 2048);
    let a = d.driver.alloc(112);
    d.driver.write(used_event_at, &0u16.to_le_bytes());
    d.driver.add_chain(tx(0), &[(a, 112, false)]);
    assert_eq!(receive(&mut d, &mut pool).0.packets, 1);
    assert_eq!(
        calls(),
        1,
        "used_event 0 crossed by used idx 1: interrupt expected"
    );
    d.driver.write(used_event_at, &100u16.to_le_bytes());
    d.driver.add_chain(tx(0), &[(a, 112, false)]);
    assert_eq!(receive(&mut d, &mut pool).0.packets, 1);
    assert_eq!(calls(), 0, "used_event 100 not reached: no interrupt");

    // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT in the avail flags suppresses it.
    let mut d = device(V1);
    let (call, calls) = call_fd();
    d.set_call(tx(0), Some(call));
    let l = d.driver.layout(tx(0));
    let a = d.driver.alloc(112);
    d.driver.add_chain(tx(0), &[(a, 112, false)]);
    assert_eq!(receive(&mut d, &mut pool).0.packets, 1);
    assert_eq!(calls(), 1);
    d.driver.write(l.avail, &1u16.to_le_bytes());
    d.driver.add_chain(tx(0), &[(a, 112, false)]);
    assert_eq!(receive(&mut d, &mut pool).0.packets, 1);
    assert_eq!(calls(), 0, "NO_INTERRUPT set: no interrupt");
    assert!(d.broken_queues().is_empty());
}

#[test]
fn link_down_stops_both_directions_and_shows_in_the_config_space() {
    let mut d = device(F_VERSION_1);
    let mut pool = VecPool::new(8, 2048);
    let status = |d: &TestDevice| {
        let c = d.device.config_space();
        u16::from_le_bytes([c[6], c[7]])
    };
    assert_eq!(status(&d), 1, "VIRTIO_NET_S_LINK_UP");
    d.device.set_link(false);
    assert_eq!(status(&d), 0);
    d.driver
        .add_tx(0, &[&hdr_bytes(VirtioNetHdr::default(), 60)]);
    d.driver.add_rx(0, &[2048]);
    let (r, out) = receive(&mut d, &mut pool);
    assert_eq!((r.packets, out.len()), (0, 0), "guest TX stays in the ring");
    let s = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), frame(60))]);
    assert_eq!((s.packets, s.dropped_no_buffer), (0, 1));
    assert_eq!(d.driver.used_idx(rx(0)), 0, "nothing delivered");
    d.device.set_link(true);
    let (r, out) = receive(&mut d, &mut pool);
    assert_eq!(
        (r.packets, out.len()),
        (1, 1),
        "the packet left waiting goes out"
    );
    let s = send(&mut d, &mut pool, &[(VirtioNetHdr::default(), frame(60))]);
    assert_eq!(s.packets, 1);
    assert!(d.broken_queues().is_empty());
}
