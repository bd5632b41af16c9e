//! Pieces of the fault-injection tests (a daemon SIGKILLed under load, frontends that die
//! without a goodbye): a disk client that writes numbered blocks until its backend is gone and
//! records what was acknowledged, the check that every acknowledged block reads back, and what
//! a process holds (file descriptors, threads, memory) once it has settled.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::blk_client::{BlkClient, ClientConfig, DriverQueue};
use crate::OrFail;

/// Bytes per block written and checked.
pub const BLOCK: u32 = 4096;
/// virtio-blk request types and status (virtio 1.2 §5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const S_OK: u8 = 0;

/// One queue, one block per request.
pub fn client_config() -> ClientConfig {
    ClientConfig {
        queues: 1,
        queue_size: 64,
        slots: 8,
        max_bytes: BLOCK,
        segments: 1,
    }
}

/// The pattern of block `n`: derived from its number alone, so a block written twice holds
/// the same bytes and a block never written (zeros) or written elsewhere does not match.
pub fn pattern(n: u64, buf: &mut [u8]) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = n.rotate_left(17) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x7019;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// The one completion of `q`, waited for at most `timeout`; None when the backend is gone.
pub fn completion(q: &mut DriverQueue, timeout: Duration) -> Option<u8> {
    let end = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < end {
        q.poll(&mut out);
        if let Some(c) = out.pop() {
            return Some(c.status);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    None
}

/// The blocks writers write (numbers taken in turn, wrapping at the image's size) and those
/// the backend acknowledged.
pub struct Ledger {
    next: AtomicU64,
    blocks: u64,
    acked: Mutex<Vec<u64>>,
}

impl Ledger {
    /// A ledger for an image of `blocks` blocks.
    pub fn new(blocks: u64) -> Arc<Ledger> {
        Arc::new(Ledger {
            next: AtomicU64::new(0),
            blocks,
            acked: Mutex::new(Vec::new()),
        })
    }

    /// The blocks acknowledged so far.
    pub fn acked(&self) -> Vec<u64> {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A disk client writing one block at a time on its own thread until told to stop or until
/// its backend stops answering (300 ms).
pub struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), String>>,
}

impl Writer {
    pub fn start(socket: &Path, ledger: Arc<Ledger>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (socket, s) = (socket.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut c = BlkClient::connect(&socket, &client_config()).map_err(|e| e.to_string())?;
            let mut q = c.take_queues().pop().ok_or("no queue")?;
            while !s.load(Ordering::Relaxed) {
                let n = ledger.next.fetch_add(1, Ordering::Relaxed) % ledger.blocks;
                pattern(n, &mut q.data(0)[..BLOCK as usize]);
                q.queue(0, T_OUT, n * u64::from(BLOCK / 512), BLOCK);
                q.publish();
                match completion(&mut q, Duration::from_millis(300)) {
                    Some(S_OK) => ledger
                        .acked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(n),
                    Some(st) => return Err(format!("write of block {n}: status {st}")),
                    None => return Ok(()),
                }
            }
            Ok(())
        });
        Writer { stop, thread }
    }

    /// Stops the writer (if its backend has not gone already) and says how it ended.
    pub fn finish(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| Err("the writer panicked".into()))
    }
}

/// Reads every block of `blocks` back through a new connection to `socket` and checks its
/// pattern.
pub fn verify(socket: &Path, blocks: &[u64]) {
    let mut c = BlkClient::connect(socket, &client_config()).or_fail("connect to verify");
    let mut q = c.take_queues().pop().expect("a queue");
    let mut want = vec![0u8; BLOCK as usize];
    for &n in blocks {
        q.queue(0, T_IN, n * u64::from(BLOCK / 512), BLOCK);
        q.publish();
        let st = completion(&mut q, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no answer reading block {n}"));
        assert_eq!(st, S_OK, "reading block {n}");
        pattern(n, &mut want);
        assert!(
            q.data(0)[..BLOCK as usize] == want[..],
            "acknowledged write of block {n} lost"
        );
    }
}

/// What a process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

pub fn footprint(pid: u32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Footprint {
        fds,
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

/// The footprint once the teardown of the last connection (a frontend's, a control
/// request's) has finished: the same descriptor and thread counts over half a second. A leak
/// stays; a teardown in progress does not.
pub fn steady(pid: u32) -> Footprint {
    let mut last = footprint(pid);
    let mut same = 0;
    let end = Instant::now() + Duration::from_secs(10);
    while same < 5 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let now = footprint(pid);
        same = if (now.fds, now.threads) == (last.fds, last.threads) {
            same + 1
        } else {
            0
        };
        last = now;
    }
    last
}

/// The Unix sockets in `dir`, sorted.
pub fn sockets_in(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .or_fail("listing a test directory")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Live processes whose command line contains every one of `needles`.
pub fn processes_with(needles: &[&str]) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                        let c = String::from_utf8_lossy(&c);
                        needles.iter().all(|n| c.contains(n))
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

/// Free 2 MiB hugepages now.
pub fn hugepages_free() -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").or_fail("meminfo");
    crate::prereq::parse_hugepages_2m(&m).or_fail("meminfo").1
}

/// Each thread of `pid`: its name, its seccomp mode (`Seccomp:`, 2 = filtered) and its number
/// of filters (`Seccomp_filters:`), sorted by name.
pub fn seccomp_threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).or_fail("task dir") {
        let t = t.or_fail("task entry").path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|| panic!("{k} missing from {}", t.display()))
        };
        let n = |k: &str| field(k).parse::<u32>().or_fail(k);
        v.push((field("Name:"), n("Seccomp:"), n("Seccomp_filters:")));
    }
    v.sort();
    v
}

/// [`seccomp_threads`] once every thread named in `want` runs and every watcher (`kick-*`,
/// `*-stop`, which a connection starts) has installed its filter (its third): at most 10 s.
pub fn started_and_filtered(pid: u32, want: &[&str]) -> Vec<(String, u32, u32)> {
    let started = |ts: &[(String, u32, u32)]| {
        want.iter().all(|w| ts.iter().any(|t| t.0 == *w))
            && ts
                .iter()
                .all(|t| !(t.0.starts_with("kick-") || t.0.ends_with("-stop")) || t.2 == 3)
    };
    crate::proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        started(&seccomp_threads(pid))
    });
    let ts = seccomp_threads(pid);
    assert!(started(&ts), "threads missing or not yet filtered: {ts:?}");
    ts
}
