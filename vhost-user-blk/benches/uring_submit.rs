//! io_uring submission batching of the virtio-blk engine, against one submit per operation in
//! the same run.
//!
//! Group `uring_submit`, cases `8` and `32` (operations per batch): 4 KiB reads, each at its
//! own offset into its own buffer, of a 1 MiB file whose pages are in the page cache, on a ring
//! of 64 entries with the file registered. The file is on a disk file system
//! (`CARGO_TARGET_TMPDIR`, under `target/`), not on tmpfs: for a file in memory the engine
//! does its I/O inline (`preadv2` per request) and submits nothing to io_uring at all.
//!
//! - `torii/<case>`: `Engine::push(Op::Read { .. })` per operation (a `Readv` on the
//!   registered file), one `Engine::submit()` for the batch (one `io_uring_enter`), then
//!   `Engine::reap` until every completion is in — what a worker does per poll round once the
//!   requests are parsed (the worker itself needs a vhost-user frontend; this is its
//!   submission path from the parsed request on).
//! - `reference/<case>`: the `io-uring` crate directly, on its own ring set up the same way:
//!   the same `Readv` entries, each pushed and submitted with its own `submit()`, then the
//!   same reaping.
//!
//! Buffered reads of cached pages complete inside the submitting syscall, so the time is the
//! submissions' (syscalls and the kernel's per-entry work), not the file system's.
//!
//!     cargo bench -p torii-vhost-user-blk --bench uring_submit

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use io_uring::{opcode, types, IoUring};
use torii_vhost_user_blk::engine::{Engine, Op, OpenFlags};

const DEPTH: u32 = 64;
const BLOCK: usize = 4096;
const FILE_LEN: usize = 1 << 20;

/// Buffers and their iovecs, one per operation of a batch.
struct Bufs {
    _mem: Vec<u8>,
    iov: Vec<[libc::iovec; 1]>,
}

impl Bufs {
    fn new(n: usize) -> Self {
        let mut mem = vec![0u8; n * BLOCK];
        let iov = mem
            .chunks_exact_mut(BLOCK)
            .map(|c| {
                [libc::iovec {
                    iov_base: c.as_mut_ptr().cast(),
                    iov_len: BLOCK,
                }]
            })
            .collect();
        Bufs { _mem: mem, iov }
    }
}

/// A 1 MiB file under the target directory, written (so its pages are cached).
fn scratch_file() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).expect("target tmp dir");
    let path = dir.join(format!("uring_submit-{}.img", std::process::id()));
    let mut f = File::create(&path).expect("scratch file");
    f.write_all(&vec![0x5a; FILE_LEN]).expect("scratch file");
    path
}

/// One batch through the engine: push all, submit once, reap all. Returns the bytes read.
#[inline(never)]
fn torii_batch(e: &mut Engine, bufs: &Bufs, out: &mut Vec<(u64, i32)>) -> i64 {
    for (i, iov) in bufs.iov.iter().enumerate() {
        let op = Op::Read {
            offset: (i * BLOCK) as u64,
            iovecs: iov,
        };
        // SAFETY: the iovec and the buffer it describes live in `bufs`, untouched by us, until
        // the completion is reaped below (before this function returns).
        if unsafe { e.push(op, i as u64) }.is_err() {
            break;
        }
    }
    if e.submit().is_err() {
        return -1;
    }
    reap_engine(e, out)
}

fn reap_engine(e: &mut Engine, out: &mut Vec<(u64, i32)>) -> i64 {
    out.clear();
    e.reap(out);
    while e.inflight() > 0 {
        if e.submit_and_wait(1).is_err() {
            break;
        }
        e.reap(out);
    }
    out.iter().map(|&(_, r)| i64::from(r)).sum()
}

/// The same batch with the io-uring crate, one `submit()` per operation.
#[inline(never)]
fn reference_batch(ring: &mut IoUring, bufs: &Bufs) -> i64 {
    let mut pushed = 0;
    for (i, iov) in bufs.iov.iter().enumerate() {
        let entry = opcode::Readv::new(types::Fixed(0), iov.as_ptr(), 1)
            .offset((i * BLOCK) as u64)
            .build()
            .user_data(i as u64);
        // SAFETY: as in `torii_batch`: the iovec and its buffer outlive the completion, which
        // is reaped below.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            break;
        }
        pushed += 1;
        if ring.submit().is_err() {
            break;
        }
    }
    let mut bytes = 0i64;
    let mut got = 0;
    loop {
        for cqe in ring.completion() {
            bytes += i64::from(cqe.result());
            got += 1;
        }
        if got >= pushed || ring.submit_and_wait(1).is_err() {
            break;
        }
    }
    bytes
}

fn uring_submit(c: &mut Criterion) {
    let path = scratch_file();
    let mut engine = Engine::open(&path, OpenFlags::default(), DEPTH).expect("engine");
    assert!(
        !engine.inline(),
        "{} is on a memory file system: the engine would not use io_uring",
        path.display()
    );
    let file = File::open(&path).expect("scratch file");
    let mut ring = IoUring::new(DEPTH).expect("io_uring");
    ring.submitter()
        .register_files(&[file.as_raw_fd()])
        .expect("register file");
    let mut out = Vec::with_capacity(DEPTH as usize);

    let mut g = c.benchmark_group("uring_submit");
    for n in [8usize, 32] {
        let bufs = Bufs::new(n);
        let want = (n * BLOCK) as i64;
        assert_eq!(torii_batch(&mut engine, &bufs, &mut out), want);
        assert_eq!(reference_batch(&mut ring, &bufs), want);

        let case = n.to_string();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("torii", &case), |b| {
            b.iter(|| black_box(torii_batch(&mut engine, &bufs, &mut out)))
        });
        g.bench_function(BenchmarkId::new("reference", &case), |b| {
            b.iter(|| black_box(reference_batch(&mut ring, &bufs)))
        });
    }
    g.finish();
    drop(engine);
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, uring_submit);
criterion_main!(benches);
