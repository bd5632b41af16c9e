//! Descriptor chain walk of the guest-TX path, against rust-vmm's own walk in the same run.
//!
//! Group `chain_walk`, cases `1desc` and `4desc` (descriptors per chain), a burst of 32 chains
//! made available once in a split queue of 256 in one 1 MiB guest memory region:
//!
//! - `torii/<case>`: what `NetQueues::from_guest` does before it copies — the ring view of the
//!   queue (`RingMaps::get_in`, translated once and then cached, as per burst), the avail index
//!   (`pending`), the prefetch of the heads, and per chain its head (`head`) and its walk
//!   (`SplitRing::walk`, every field checked, each buffer translated to a host address and
//!   prefetched) into the burst's `Seg`s; then `next_avail` moves past the burst.
//! - `reference/<case>`: virtio-queue's `Queue::iter` (`AvailIter`) popping the same chains
//!   and its `DescriptorChain` iterator walking them, each buffer translated with
//!   `GuestMemory::get_slice` into the same `Seg`s.
//!
//! Neither writes the used ring; each iteration rewinds `next_avail` to the burst's start.
//!
//!     cargo bench -p torii-vhost-user-net --bench chain_walk

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use torii_vhost_user::ring::{RingMaps, Seg, MAX_CHAIN};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const QUEUE_SIZE: u16 = 256;
const BURST: u16 = 32;
const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x1_0000;
/// Bytes per chain: a virtio-net header and a 1518-byte frame.
const CHAIN_BYTES: u32 = 12 + 1518;
const F_NEXT: u16 = 1;

/// Guest memory holding a queue whose first `BURST` avail entries are chains of `per_chain`
/// device-readable descriptors, and the queue as the frontend configured it.
fn setup(per_chain: u16) -> (Arc<torii_vhost_user::MemTable>, Queue) {
    let mem = torii_vhost_user::MemTable::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("guest memory");
    let seg_len = CHAIN_BYTES / u32::from(per_chain);
    let mut buf = DATA;
    for c in 0..BURST {
        let head = c * per_chain;
        for k in 0..per_chain {
            let idx = head + k;
            let last = k + 1 == per_chain;
            let len = if last {
                CHAIN_BYTES - seg_len * u32::from(per_chain - 1)
            } else {
                seg_len
            };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&buf.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let flags = if last { 0 } else { F_NEXT };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(idx + 1).to_le_bytes());
            mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(idx)))
                .expect("descriptor");
            buf += 2048;
        }
        mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(c)))
            .expect("avail entry");
    }
    mem.write_obj(BURST.to_le(), GuestAddress(AVAIL + 2))
        .expect("avail idx");
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.try_set_size(QUEUE_SIZE).expect("size");
    q.try_set_desc_table_address(GuestAddress(DESC))
        .expect("desc");
    q.try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail");
    q.try_set_used_ring_address(GuestAddress(USED))
        .expect("used");
    q.set_ready(true);
    (Arc::new(mem), q)
}

/// Gathers the burst as `NetQueues::from_guest` does; returns the number of chains.
#[inline(never)]
fn torii_walk(
    maps: &mut RingMaps,
    mem: &Arc<torii_vhost_user::MemTable>,
    queue: &mut Queue,
    segs: &mut Vec<Seg>,
    chains: &mut Vec<(u16, usize, usize)>,
) -> usize {
    let Ok(ring) = maps.get_in(mem, 1, 1, queue) else {
        return 0;
    };
    let next = queue.next_avail();
    let n = match ring.pending(next) {
        Ok(n) => n.min(BURST),
        Err(_) => return 0,
    };
    segs.clear();
    chains.clear();
    ring.prefetch_heads(next, n);
    for i in 0..n {
        let start = segs.len();
        let walked = ring.head(next.wrapping_add(i)).and_then(|head| {
            ring.walk(head, false, segs)
                .map(|fits| fits.then_some(head))
        });
        match walked {
            Ok(Some(head)) => chains.push((head, start, segs.len())),
            _ => break,
        }
    }
    queue.set_next_avail(next.wrapping_add(chains.len() as u16));
    chains.len()
}

/// The same burst through virtio-queue's `AvailIter` and `DescriptorChain`.
#[inline(never)]
fn reference_walk(
    mem: &torii_vhost_user::MemTable,
    queue: &mut Queue,
    segs: &mut Vec<Seg>,
    chains: &mut Vec<(u16, usize, usize)>,
) -> usize {
    segs.clear();
    chains.clear();
    let Ok(iter) = queue.iter(mem) else {
        return 0;
    };
    for chain in iter.take(usize::from(BURST)) {
        let head = chain.head_index();
        let start = segs.len();
        for d in chain {
            let host = mem
                .get_slice(d.addr(), d.len() as usize)
                .map_or(0, |s| s.ptr_guard().as_ptr() as usize);
            segs.push(Seg {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
                host,
            });
        }
        chains.push((head, start, segs.len()));
    }
    chains.len()
}

fn chain_walk(c: &mut Criterion) {
    let mut g = c.benchmark_group("chain_walk");
    g.throughput(Throughput::Elements(u64::from(BURST)));
    for per_chain in [1u16, 4] {
        let case = format!("{per_chain}desc");
        let (mem, mut queue) = setup(per_chain);
        let mut maps = RingMaps::new(2);
        let mut segs = Vec::with_capacity(2 * MAX_CHAIN);
        let mut chains = Vec::with_capacity(usize::from(QUEUE_SIZE));

        // Both walks see the same chains.
        let n = torii_walk(&mut maps, &mem, &mut queue, &mut segs, &mut chains);
        let ours: Vec<_> = segs.iter().map(|s| (s.addr, s.len, s.write)).collect();
        assert_eq!(n, usize::from(BURST));
        assert_eq!(ours.len(), usize::from(BURST * per_chain));
        assert!(segs.iter().all(|s| s.host != 0));
        queue.set_next_avail(0);
        let n = reference_walk(&mem, &mut queue, &mut segs, &mut chains);
        let theirs: Vec<_> = segs.iter().map(|s| (s.addr, s.len, s.write)).collect();
        assert_eq!(n, usize::from(BURST));
        assert_eq!(ours, theirs);
        queue.set_next_avail(0);

        g.bench_function(BenchmarkId::new("torii", &case), |b| {
            b.iter(|| {
                let n = torii_walk(&mut maps, &mem, &mut queue, &mut segs, &mut chains);
                queue.set_next_avail(0);
                black_box((n, &segs));
            })
        });
        g.bench_function(BenchmarkId::new("reference", &case), |b| {
            b.iter(|| {
                let n = reference_walk(&mem, &mut queue, &mut segs, &mut chains);
                queue.set_next_avail(0);
                black_box((n, &segs));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, chain_walk);
criterion_main!(benches);
