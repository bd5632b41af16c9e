//! fio-like jobs on [`DriverQueue`]s: random or sequential reads and writes at a queue depth,
//! for a time or a number of I/Os, with per-request latency; and a verify mode that writes a
//! pattern derived from (seed, offset) and reads it back.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::blk_client::{Completion, DriverQueue, T_IN, T_OUT};

/// Sector of virtio-blk addressing.
const SECTOR: u64 = 512;

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    RandRead,
    RandWrite,
    Read,
    Write,
    /// Writes every block of the job's range with the seed's pattern (in a shuffled order),
    /// then reads every block back (in another order) and checks it.
    Verify,
    /// Only the read-and-check half of `Verify` (data written earlier, e.g. through another
    /// backend).
    Check,
}

impl Pattern {
    pub fn parse(s: &str) -> Option<Pattern> {
        Some(match s {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "verify" => Pattern::Verify,
            "check" => Pattern::Check,
            _ => return None,
        })
    }
}

/// One job, run on one queue.
#[derive(Clone, Debug)]
pub struct Job {
    pub pattern: Pattern,
    /// Bytes per request (a multiple of 512).
    pub bs: u32,
    pub iodepth: u16,
    /// Run for this long (timed patterns); verify and check run to the end of the range.
    pub runtime: Duration,
    /// The job's byte range on the device.
    pub offset: u64,
    pub size: u64,
    /// Seed of random offsets and of verify data.
    pub seed: u64,
}

/// What a job did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobResult {
    pub ios: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    /// Requests whose status was not OK.
    pub errors: u64,
    /// Verify/check: blocks that read back wrong.
    pub mismatches: u64,
    #[serde(skip)]
    pub latency: Histogram,
}

impl JobResult {
    pub fn merge(&mut self, o: &JobResult) {
        self.ios += o.ios;
        self.bytes += o.bytes;
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
        self.errors += o.errors;
        self.mismatches += o.mismatches;
        self.latency.merge(&o.latency);
    }

    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed_s.max(1e-9)
    }

    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed_s.max(1e-9) / 1e6
    }
}

/// The percentiles of a latency CDF (`lat_cdf_us` of reports and samples; fio is given the
/// same list).
pub const CDF_PERCENTILES: [f64; 15] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.9, 99.99,
];

/// Latency histogram in nanoseconds: 64 linear buckets per power of two (≤ 1.6 % error).
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; 64 * 60],
            count: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 64 {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros() as usize;
        let sub = ((v >> (exp - 6)) & 63) as usize;
        ((exp - 5) * 64 + sub).min(64 * 60 - 1)
    }

    fn lower_bound(i: usize) -> u64 {
        if i < 64 {
            return i as u64;
        }
        let exp = i / 64 + 5;
        let sub = (i % 64) as u64;
        (1u64 << exp) | (sub << (exp - 6))
    }

    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
    }

    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
    }

    /// The latency below which `p` percent of the samples lie, in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let want = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Self::lower_bound(i) as f64 / 1000.0;
            }
        }
        0.0
    }

    /// (percentile, latency in µs) at each of `percentiles` (ascending), in one pass; the
    /// latencies are [`Histogram::percentile_us`]'s, so never decreasing. Empty without
    /// samples.
    pub fn cdf_us(&self, percentiles: &[f64]) -> Vec<[f64; 2]> {
        if self.count == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(percentiles.len());
        let mut buckets = self.buckets.iter().enumerate();
        let (mut i, mut seen) = (0usize, 0u64);
        for &p in percentiles {
            let want = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
            while seen < want {
                let Some((k, n)) = buckets.next() else { break };
                (i, seen) = (k, seen + n);
            }
            out.push([p, Self::lower_bound(i) as f64 / 1000.0]);
        }
        out
    }
}

/// splitmix64: the verify pattern and the random offsets.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern of the block at byte `offset`: 8-byte words of
/// mix(seed, offset, word index); the first word is the offset itself, so a block read from
/// the wrong place is told apart from corrupt data.
pub fn fill_pattern(buf: &mut [u8], seed: u64, offset: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = if i == 0 {
            offset
        } else {
            mix(seed ^ mix(offset.wrapping_add(i as u64)))
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn matches_pattern(buf: &[u8], seed: u64, offset: u64) -> bool {
    buf.chunks_exact(8).enumerate().all(|(i, w)| {
        let v = if i == 0 {
            offset
        } else {
            mix(seed ^ mix(offset.wrapping_add(i as u64)))
        };
        w == v.to_le_bytes()
    })
}

/// The order blocks are visited in by verify passes: a full-period step through the
/// `blocks` (an odd step modulo a power of two, skipping indices past the end).
struct Shuffle {
    blocks: u64,
    modulus: u64,
    step: u64,
    at: u64,
    left: u64,
}

impl Shuffle {
    fn new(blocks: u64, seed: u64) -> Self {
        let modulus = blocks.next_power_of_two().max(1);
        Shuffle {
            blocks,
            modulus,
            step: ((mix(seed) | 1) % modulus.max(2)) | 1,
            at: mix(seed ^ 1) % modulus,
            left: blocks,
        }
    }
}

impl Iterator for Shuffle {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        loop {
            self.at = (self.at + self.step) & (self.modulus - 1);
            if self.at < self.blocks {
                self.left -= 1;
                return Some(self.at);
            }
        }
    }
}

/// Where the next request goes and what it is.
enum Next {
    Io { kind: u32, offset: u64 },
    Done,
}

/// Runs `job` on `q` until its time is up or, for verify/check, its range is done.
pub fn run(q: &mut DriverQueue, job: &Job) -> JobResult {
    let mut res = JobResult::default();
    let bs = u64::from(job.bs);
    let blocks = (job.size / bs).max(1);
    let depth = job.iodepth.min(q.slots()).max(1);
    match job.pattern {
        Pattern::Verify => {
            let w = run_pass(
                q,
                job,
                depth,
                &mut Shuffle::new(blocks, job.seed).map(|b| (T_OUT, b)),
                &mut res,
            );
            let mut r = Shuffle::new(blocks, job.seed ^ 0x5555).map(|b| (T_IN, b));
            let rres = run_pass(q, job, depth, &mut r, &mut res);
            res.elapsed_s = w + rres;
        }
        Pattern::Check => {
            let mut r = Shuffle::new(blocks, job.seed ^ 0x5555).map(|b| (T_IN, b));
            res.elapsed_s = run_pass(q, job, depth, &mut r, &mut res);
        }
        p => {
            let deadline = Instant::now() + job.runtime;
            let kind = if matches!(p, Pattern::RandRead | Pattern::Read) {
                T_IN
            } else {
                T_OUT
            };
            let random = matches!(p, Pattern::RandRead | Pattern::RandWrite);
            let mut n = 0u64;
            let mut rng = job.seed;
            let mut gen = std::iter::from_fn(move || {
                if n % 64 == 0 && Instant::now() >= deadline {
                    return None;
                }
                let b = if random {
                    rng = mix(rng);
                    rng % blocks
                } else {
                    n % blocks
                };
                n += 1;
                Some((kind, b))
            });
            res.elapsed_s = run_pass(q, job, depth, &mut gen, &mut res);
        }
    }
    res
}

/// Keeps `depth` requests in flight, taking them from `next` until it ends; returns the
/// seconds it took.
fn run_pass(
    q: &mut DriverQueue,
    job: &Job,
    depth: u16,
    next: &mut dyn Iterator<Item = (u32, u64)>,
    res: &mut JobResult,
) -> f64 {
    let bs = u64::from(job.bs);
    let verify = matches!(job.pattern, Pattern::Verify | Pattern::Check);
    let mut free: Vec<u16> = (0..depth).rev().collect();
    let mut started = vec![Instant::now(); depth as usize];
    let mut what = vec![(0u32, 0u64); depth as usize];
    let mut done: Vec<Completion> = Vec::with_capacity(depth as usize);
    let mut inflight = 0usize;
    let mut exhausted = false;
    let t0 = Instant::now();
    loop {
        while !exhausted {
            let Some(slot) = free.pop() else { break };
            let n = match next.next() {
                Some((kind, block)) => Next::Io {
                    kind,
                    offset: job.offset + block * bs,
                },
                None => Next::Done,
            };
            match n {
                Next::Io { kind, offset } => {
                    if verify && kind == T_OUT {
                        fill_pattern(&mut q.data(slot)[..job.bs as usize], job.seed, offset);
                    }
                    q.queue(slot, kind, offset / SECTOR, job.bs);
                    what[slot as usize] = (kind, offset);
                    started[slot as usize] = Instant::now();
                    inflight += 1;
                }
                Next::Done => {
                    free.push(slot);
                    exhausted = true;
                }
            }
        }
        q.publish();
        if inflight == 0 {
            break;
        }
        done.clear();
        q.poll(&mut done);
        if done.is_empty() {
            std::hint::spin_loop();
            continue;
        }
        let now = Instant::now();
        for c in &done {
            let s = c.slot as usize;
            if s >= what.len() {
                res.errors += 1;
                continue;
            }
            res.latency
                .record(now.duration_since(started[s]).as_nanos() as u64);
            res.ios += 1;
            res.bytes += bs;
            if c.status != 0 {
                res.errors += 1;
            } else if verify
                && what[s].0 == T_IN
                && !matches_pattern(&q.data(c.slot)[..job.bs as usize], job.seed, what[s].1)
            {
                res.mismatches += 1;
            }
            free.push(c.slot);
            inflight -= 1;
        }
    }
    t0.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_visits_every_block_once() {
        for blocks in [1u64, 2, 3, 100, 1024, 1000] {
            let mut v: Vec<u64> = Shuffle::new(blocks, 42).collect();
            v.sort_unstable();
            assert_eq!(v, (0..blocks).collect::<Vec<_>>());
        }
    }

    #[test]
    fn pattern_depends_on_offset_and_seed() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        fill_pattern(&mut a, 1, 4096);
        assert!(matches_pattern(&a, 1, 4096));
        assert!(!matches_pattern(&a, 2, 4096));
        assert!(!matches_pattern(&a, 1, 8192));
        fill_pattern(&mut b, 1, 8192);
        assert_ne!(a, b);
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile_us(50.0);
        assert!((490.0..=510.0).contains(&p50), "{p50}");
        let p99 = h.percentile_us(99.0);
        assert!((970.0..=1000.0).contains(&p99), "{p99}");
    }

    #[test]
    fn cdf_matches_percentiles_and_is_monotonic() {
        let mut h = Histogram::default();
        assert!(h.cdf_us(&CDF_PERCENTILES).is_empty());
        // A long tail: mostly ~10 µs, a few slow ones up to 5 ms.
        let mut z = 7u64;
        for _ in 0..100_000 {
            z = mix(z);
            let ns = if z % 1000 == 0 {
                1_000_000 + z % 4_000_000
            } else {
                8_000 + z % 4_000
            };
            h.record(ns);
        }
        let cdf = h.cdf_us(&CDF_PERCENTILES);
        assert_eq!(cdf.len(), CDF_PERCENTILES.len());
        for (pair, p) in cdf.iter().zip(CDF_PERCENTILES) {
            assert_eq!(pair[0], p);
            assert_eq!(pair[1], h.percentile_us(p), "p{p}");
        }
        for w in cdf.windows(2) {
            assert!(w[0][0] < w[1][0] && w[0][1] <= w[1][1], "{w:?}");
        }
        assert!(cdf[0][1] >= 7.8 && cdf[12][1] < 12.1, "{cdf:?}");
        assert!(cdf[14][1] >= 1000.0, "{cdf:?}");
    }

    #[test]
    fn cdf_of_one_sample() {
        let mut h = Histogram::default();
        h.record(5_000);
        let cdf = h.cdf_us(&[1.0, 50.0, 99.99]);
        let lat = h.percentile_us(50.0);
        assert!((4.9..=5.0).contains(&lat), "{lat}");
        assert_eq!(cdf, vec![[1.0, lat], [50.0, lat], [99.99, lat]]);
    }
}

/// A whole run: connect to `socket`, start `numjobs` queues and run `job` on each (job k on
/// its own k-th slice of the range for sequential and verify patterns, on all of it for
/// random ones), one thread per queue.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub pattern: Pattern,
    pub bs: u32,
    pub iodepth: u16,
    pub numjobs: u16,
    pub runtime: Duration,
    /// Byte range to use, from the start of the device (0: all of it).
    pub size: u64,
    pub seed: u64,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Data descriptors per request (more than one: an indirect table).
    pub segments: u16,
}

/// The merged result of a run and the device's size.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub pattern: Pattern,
    pub bs: u32,
    pub iodepth: u16,
    pub numjobs: u16,
    pub capacity_bytes: u64,
    pub ios: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    pub mbps: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    /// (percentile, latency in µs) at [`CDF_PERCENTILES`].
    pub lat_cdf_us: Vec<[f64; 2]>,
    pub errors: u64,
    pub mismatches: u64,
}

/// Runs `spec` against the vhost-user-blk backend on `socket`.
pub fn run_spec(
    socket: &std::path::Path,
    spec: &RunSpec,
) -> Result<RunReport, crate::blk_client::ClientError> {
    use crate::blk_client::{BlkClient, ClientConfig, ClientError};
    if spec.bs == 0 || u64::from(spec.bs) % SECTOR != 0 {
        return Err(ClientError::Setup(format!(
            "bs {} is not whole sectors",
            spec.bs
        )));
    }
    let cfg = ClientConfig {
        queues: spec.numjobs.max(1),
        queue_size: spec.queue_size,
        slots: spec.iodepth.min(spec.queue_size / 3).max(1),
        max_bytes: spec.bs,
        segments: spec.segments,
    };
    let mut client = BlkClient::connect(socket, &cfg)?;
    let info = client.info();
    let capacity = info.capacity_sectors * SECTOR;
    let size = if spec.size == 0 {
        capacity
    } else {
        spec.size.min(capacity)
    };
    let jobs = u64::from(cfg.queues);
    let slice = (size / jobs) / u64::from(spec.bs) * u64::from(spec.bs);
    if slice == 0 {
        return Err(ClientError::Setup(format!(
            "{size} bytes do not give {jobs} jobs a {} byte block each",
            spec.bs
        )));
    }
    let per_job = matches!(
        spec.pattern,
        Pattern::Read | Pattern::Write | Pattern::Verify | Pattern::Check
    );
    let queues = client.take_queues();
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(k, mut q)| {
            let job = Job {
                pattern: spec.pattern,
                bs: spec.bs,
                iodepth: spec.iodepth,
                runtime: spec.runtime,
                offset: if per_job { k as u64 * slice } else { 0 },
                size: if per_job { slice } else { size },
                seed: spec.seed,
            };
            std::thread::spawn(move || (run(&mut q, &job), q))
        })
        .collect();
    let mut total = JobResult::default();
    let mut back = Vec::new();
    for h in handles {
        let (r, q) = h
            .join()
            .map_err(|_| ClientError::Setup("job thread panicked".into()))?;
        total.merge(&r);
        back.push(q);
    }
    drop(back);
    client.close(cfg.queues);
    Ok(RunReport {
        pattern: spec.pattern,
        bs: spec.bs,
        iodepth: spec.iodepth,
        numjobs: cfg.queues,
        capacity_bytes: capacity,
        ios: total.ios,
        bytes: total.bytes,
        elapsed_s: total.elapsed_s,
        iops: total.iops(),
        mbps: total.mbps(),
        lat_p50_us: total.latency.percentile_us(50.0),
        lat_p99_us: total.latency.percentile_us(99.0),
        lat_p999_us: total.latency.percentile_us(99.9),
        lat_cdf_us: total.latency.cdf_us(&CDF_PERCENTILES),
        errors: total.errors,
        mismatches: total.mismatches,
    })
}
