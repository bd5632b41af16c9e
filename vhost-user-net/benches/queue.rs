//! CPU cost of the data path per burst, single-threaded over in-process guest memory: no
//! second core, no cross-core cache traffic, so the numbers are stable and show what the code
//! itself costs (the two-core comparison with DPDK is `perf/run-bench`). Each iteration also
//! includes the test driver re-posting the burst's chains (a few small writes per chain).
//!
//!     cargo bench -p torii-vhost-user-net --features test-support --bench queue

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use torii_vhost_user_net::testing::VecBuf;
use torii_vhost_user_net::testing::{
    rx, tx, Config, Desc, TestDevice, VecPool, DESC_F_WRITE, F_CSUM, F_MRG_RXBUF, F_VERSION_1,
};
use torii_vhost_user_net::{FromGuest, ToGuest, VirtioNetHdr};

const BURST: u16 = 32;
const SIZE: u16 = 256;

/// A device whose queue `q` has one descriptor per slot, each pointing at its own buffer of
/// `len` bytes (device-writable for RX), ready to be made available again and again.
fn device(q_is_rx: bool, len: u32) -> TestDevice {
    let mut cfg = Config::new(F_VERSION_1 | F_MRG_RXBUF | F_CSUM);
    cfg.queue_size = SIZE;
    cfg.data_size = u64::from(SIZE) * 2048 * 2;
    let mut d = TestDevice::new(&cfg);
    let q = if q_is_rx { rx(0) } else { tx(0) };
    for i in 0..SIZE {
        let a = d.driver.alloc(2048);
        if !q_is_rx {
            // virtio-net header (all zero: no offloads) + a frame
            d.driver.write(a + 12, &vec![0xabu8; len as usize - 12]);
        }
        let flags = if q_is_rx { DESC_F_WRITE } else { 0 };
        d.driver.set_desc(q, i, Desc::new(a, len, flags, 0));
    }
    d
}

fn from_guest(c: &mut Criterion) {
    for frame in [64u32, 1518] {
        let mut d = device(false, frame + 12);
        let mut pool = VecPool::new(64, 2048);
        let mut out = Vec::with_capacity(BURST as usize);
        let mut next = 0u16;
        let mut g = c.benchmark_group("from_guest");
        g.throughput(Throughput::Elements(u64::from(BURST)));
        g.bench_function(format!("{frame}B x{BURST}"), |b| {
            b.iter(|| {
                for _ in 0..BURST {
                    d.driver.make_available(tx(0), next % SIZE);
                    next = next.wrapping_add(1);
                }
                let st = burst_from_guest(&mut d, &mut pool, &mut out);
                assert_eq!(st.packets, BURST as usize);
            })
        });
        g.finish();
    }
}

fn to_guest(c: &mut Criterion) {
    for frame in [64usize, 1518] {
        let mut d = device(true, 2048);
        let mut pool = VecPool::new(64, 2048);
        let payload = vec![0xcdu8; frame];
        let mut pkts = Vec::with_capacity(BURST as usize);
        let mut next = 0u16;
        let mut g = c.benchmark_group("to_guest");
        g.throughput(Throughput::Elements(u64::from(BURST)));
        g.bench_function(format!("{frame}B x{BURST}"), |b| {
            b.iter(|| {
                for _ in 0..BURST {
                    d.driver.make_available(rx(0), next % SIZE);
                    next = next.wrapping_add(1);
                    pkts.push(pool.packet(VirtioNetHdr::default(), &payload));
                }
                let st = burst_to_guest(&mut d, &mut pool, &mut pkts);
                assert_eq!(st.packets, BURST as usize);
            })
        });
        g.finish();
    }
}

// The measured work, kept out of line so that a profiler (`valgrind --tool=callgrind` on the
// bench binary with `--bench --profile-time N`) can count its instructions apart from the
// driver's.
#[inline(never)]
fn burst_from_guest(d: &mut TestDevice, pool: &mut VecPool, out: &mut Vec<VecBuf>) -> FromGuest {
    let st = d.queues.from_guest(0, BURST as usize, pool, out);
    for p in out.drain(..) {
        torii_vhost_user_net::BufPool::free(pool, p);
    }
    st
}

#[inline(never)]
fn burst_to_guest(d: &mut TestDevice, pool: &mut VecPool, pkts: &mut Vec<VecBuf>) -> ToGuest {
    d.queues.to_guest(0, pkts, pool)
}

criterion_group!(benches, from_guest, to_guest);
criterion_main!(benches);
