//! virtio-net header translation, against a plain copy of the same bytes in the same run.
//!
//! Group `header`, a burst of 32 12-byte headers (VERSION_1 layout) per iteration, cases by
//! what the headers ask for: `none` (all zero), `csum` (NEEDS_CSUM, TCP/IPv4 offsets) and
//! `tso4` (NEEDS_CSUM + GSO_TCPV4 with ECN, gso_size 1448):
//!
//! - `torii/<case>`: each header from guest bytes into packet metadata as
//!   `NetQueues::from_guest` does it (`VirtioNetHdr::parse`, the offloads it needs against those
//!   the driver negotiated, `validate` against the frame length), then back to guest bytes as
//!   `to_guest` does it (offloads against the receiver's, DATA_VALID dropped without
//!   GUEST_CSUM, `le_words` with `num_buffers` 1) into an output header.
//! - `reference/<case>`: each 12-byte header copied from the input to the output (the floor:
//!   no translation at all).
//!
//!     cargo bench -p torii-vhost-user-net --bench header

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use torii_vhost_user_net::hdr::{F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, HDR_LEN_MRG};
use torii_vhost_user_net::{Offloads, VirtioNetHdr};

const BURST: usize = 32;

type Wire = [u8; HDR_LEN_MRG];

/// The burst's headers on the wire and their frames' lengths.
fn headers(case: &str) -> (Vec<Wire>, Vec<usize>) {
    let (h, frame_len) = match case {
        "none" => (VirtioNetHdr::default(), 1514),
        "csum" => (
            VirtioNetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_NONE,
                csum_start: 34,
                csum_offset: 16,
                ..Default::default()
            },
            1514,
        ),
        _ => (
            VirtioNetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4 | GSO_ECN,
                hdr_len: 66,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
            },
            65_000,
        ),
    };
    let mut w = [0u8; HDR_LEN_MRG];
    h.write(&mut w, 1);
    (vec![w; BURST], vec![frame_len; BURST])
}

/// Guest bytes → metadata → guest bytes for the burst; returns the headers that went through.
#[inline(never)]
fn torii_translate(
    input: &[Wire],
    frame_lens: &[usize],
    meta: &mut [VirtioNetHdr],
    out: &mut [Wire],
    allowed: Offloads,
    accepts: Offloads,
) -> usize {
    // Guest TX: into packet metadata.
    let mut ok = 0;
    for ((w, &len), m) in input.iter().zip(frame_lens).zip(meta.iter_mut()) {
        let mut h = [0u8; 10];
        h.copy_from_slice(&w[..10]);
        let hdr = VirtioNetHdr::parse(&h);
        if !allowed.contains(hdr.required_offloads()) || hdr.validate(len).is_err() {
            continue;
        }
        *m = hdr;
        ok += 1;
    }
    // Guest RX: back out of it.
    for (m, o) in meta.iter().zip(out.iter_mut()) {
        if !accepts.contains(m.required_offloads()) {
            continue;
        }
        let mut h = *m;
        if !accepts.contains(Offloads::CSUM) {
            h.flags = 0;
        }
        let (lo, hi) = h.le_words(1);
        o[..8].copy_from_slice(&lo.to_le_bytes());
        o[8..].copy_from_slice(&hi.to_le_bytes());
    }
    ok
}

/// The floor: the same header bytes copied.
#[inline(never)]
fn reference_copy(input: &[Wire], out: &mut [Wire]) -> usize {
    for (i, o) in input.iter().zip(out.iter_mut()) {
        *o = *i;
    }
    input.len()
}

fn header(c: &mut Criterion) {
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Elements(BURST as u64));
    let all = Offloads::all();
    for case in ["none", "csum", "tso4"] {
        let (input, lens) = headers(case);
        let mut meta = vec![VirtioNetHdr::default(); BURST];
        let mut out = vec![[0u8; HDR_LEN_MRG]; BURST];
        assert_eq!(
            torii_translate(&input, &lens, &mut meta, &mut out, all, all),
            BURST
        );
        assert_eq!(out, input, "translation is not the identity");

        g.bench_function(BenchmarkId::new("torii", case), |b| {
            b.iter(|| {
                let n = torii_translate(
                    black_box(&input),
                    black_box(&lens),
                    &mut meta,
                    &mut out,
                    black_box(all),
                    black_box(all),
                );
                black_box((n, &out));
            })
        });
        g.bench_function(BenchmarkId::new("reference", case), |b| {
            b.iter(|| {
                let n = reference_copy(black_box(&input), &mut out);
                black_box((n, &out));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, header);
criterion_main!(benches);
