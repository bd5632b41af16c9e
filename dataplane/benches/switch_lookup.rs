//! The L2 switch's MAC table lookup, against `std::collections::HashMap` in the same run.
//!
//! Group `switch_lookup`, cases `16` and `1024` (entries): a table of that many (VLAN, MAC) →
//! port entries (4 VLANs, locally administered MACs, ports 0..64), and per iteration a burst
//! of 32 lookups, all hits, walking the keys in a fixed shuffled order (a cursor carries over
//! from one iteration to the next, so the 1024-entry table is visited whole):
//!
//! - `torii/<case>`: `MacTable::lookup(vlan, &mac)` (capacity = entries).
//! - `reference/<case>`: `HashMap<(u16, [u8; 6]), u16>::get(&(vlan, mac))` with the default
//!   hasher (SipHash-1-3), same keys, same values.
//!
//!     cargo bench -p torii-dataplane --bench switch_lookup

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use torii_dataplane::switch::mactable::{MacTable, PortId};

const BURST: usize = 32;

/// `n` distinct keys and their ports, in a shuffled (deterministic) order.
fn entries(n: usize) -> Vec<(u16, [u8; 6], PortId)> {
    let mut v: Vec<_> = (0..n as u32)
        .map(|i| {
            let b = i.to_be_bytes();
            let vlan = 100 + (i % 4) as u16;
            (
                vlan,
                [0x02, 0x42, b[0], b[1], b[2], b[3]],
                (i % 64) as PortId,
            )
        })
        .collect();
    // xorshift Fisher-Yates.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

#[inline(never)]
fn torii_lookup(t: &MacTable, keys: &[(u16, [u8; 6])], at: &mut usize) -> u32 {
    let mut sum = 0u32;
    for _ in 0..BURST {
        let (vlan, mac) = &keys[*at];
        *at += 1;
        if *at == keys.len() {
            *at = 0;
        }
        sum += u32::from(t.lookup(*vlan, mac).unwrap_or(PortId::MAX));
    }
    sum
}

#[inline(never)]
fn reference_lookup(
    t: &HashMap<(u16, [u8; 6]), PortId>,
    keys: &[(u16, [u8; 6])],
    at: &mut usize,
) -> u32 {
    let mut sum = 0u32;
    for _ in 0..BURST {
        let k = &keys[*at];
        *at += 1;
        if *at == keys.len() {
            *at = 0;
        }
        sum += u32::from(t.get(k).copied().unwrap_or(PortId::MAX));
    }
    sum
}

fn switch_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("switch_lookup");
    g.throughput(Throughput::Elements(BURST as u64));
    for n in [16usize, 1024] {
        let e = entries(n);
        let table = MacTable::new(n);
        for &(vlan, mac, port) in &e {
            table.learn(vlan, &mac, port, 0);
        }
        let map: HashMap<(u16, [u8; 6]), PortId> = e.iter().map(|&(v, m, p)| ((v, m), p)).collect();
        let keys: Vec<(u16, [u8; 6])> = e.iter().map(|&(v, m, _)| (v, m)).collect();
        assert_eq!(table.len(), n);
        for &(vlan, mac, port) in &e {
            assert_eq!(table.lookup(vlan, &mac), Some(port));
            assert_eq!(map.get(&(vlan, mac)), Some(&port));
        }
        let (mut a, mut b) = (0, 0);
        assert_eq!(
            torii_lookup(&table, &keys, &mut a),
            reference_lookup(&map, &keys, &mut b)
        );

        let case = n.to_string();
        let mut at = 0;
        g.bench_function(BenchmarkId::new("torii", &case), |bch| {
            bch.iter(|| black_box(torii_lookup(black_box(&table), &keys, &mut at)))
        });
        let mut at = 0;
        g.bench_function(BenchmarkId::new("reference", &case), |bch| {
            bch.iter(|| black_box(reference_lookup(black_box(&map), &keys, &mut at)))
        });
    }
    g.finish();
}

criterion_group!(benches, switch_lookup);
criterion_main!(benches);
