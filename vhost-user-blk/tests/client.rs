//! Torii's backend driven by the userspace virtio-blk driver of `torii-perf` (a VM without a
//! VM), checked against qemu-storage-daemon on the same file: data written through one reads
//! back through the other, both answer the same requests with the same status, and a hostile
//! driver's chains break only their own queue.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{image, Backend, OrFail};
use torii_perf::blk_client::{
    BlkClient, ClientConfig, Completion, DriverQueue, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};
use torii_perf::blk_job::{run_spec, Pattern, RunSpec};
use torii_perf::proc_util;
use torii_perf::qsd::{Qsd, QsdAio};

fn spec(pattern: Pattern, seed: u64, numjobs: u16) -> RunSpec {
    RunSpec {
        pattern,
        bs: 4096,
        iodepth: 16,
        numjobs,
        runtime: Duration::from_secs(1),
        size: 16 << 20,
        seed,
        queue_size: 128,
        segments: 1,
    }
}

fn verify(
    socket: &Path,
    pattern: Pattern,
    seed: u64,
    numjobs: u16,
) -> torii_perf::blk_job::RunReport {
    run_spec(socket, &spec(pattern, seed, numjobs)).or_fail("client run")
}

/// Data written by the client through Torii reads back through qemu-storage-daemon and the
/// other way round, with direct chains and with indirect scatter-gather tables; both report
/// the same capacity; a check with the wrong seed finds every block wrong (the client's
/// check is real). The image on a disk file system: requests go through io_uring.
#[test]
fn verify_through_torii_and_qemu_storage_daemon_agree() {
    let dir = proc_util::unique_tmp_dir("torii-blk-peer").or_fail("tmp dir");
    agree_with_qsd(dir.path(), dir.path(), false);
}

/// The same with the image on tmpfs, where Torii does each request inline.
#[test]
fn verify_on_tmpfs_through_torii_and_qemu_storage_daemon_agree() {
    let dir = proc_util::unique_tmp_dir("torii-blk-shm").or_fail("tmp dir");
    let shm = proc_util::unique_dir_in(Path::new("/dev/shm"), "torii-blk").or_fail("/dev/shm");
    agree_with_qsd(dir.path(), shm.path(), true);
}

fn agree_with_qsd(dir: &Path, image_dir: &Path, inline: bool) {
    let _heavy = torii_perf::heavy_test_lock();
    let img = image(image_dir, "disk.img", 32);

    let mut be = Backend::start(dir, &img, &["--queues", "2"]);
    let t = verify(&be.socket, Pattern::Verify, 7, 2);
    assert_eq!(
        (t.errors, t.mismatches),
        (0, 0),
        "verify through Torii: {t:?}"
    );
    assert_eq!(t.ios, 2 * (16 << 20) / 4096, "{t:?}");
    // The client's memfd memory is registered with io_uring (fixed-buffer reads and writes);
    // on tmpfs requests are done inline instead.
    let log = be.log_text();
    assert!(!log.contains("not registered with io_uring"), "log:\n{log}");
    assert_eq!(log.contains("requests done inline"), inline, "log:\n{log}");
    be.stop();

    let q = qsd(dir, &img, 2);
    let qsock = q.socket.clone();
    let c = verify(&qsock, Pattern::Check, 7, 2);
    assert_eq!(
        (c.errors, c.mismatches),
        (0, 0),
        "Torii's data through qsd: {c:?}"
    );
    assert_eq!(c.capacity_bytes, t.capacity_bytes);
    let wrong = verify(&qsock, Pattern::Check, 8, 2);
    assert_eq!(
        wrong.mismatches, wrong.ios,
        "a wrong seed must fail every block"
    );
    // Scatter-gather requests (indirect tables, 8 data buffers each) both ways too.
    let w = verify_sg(&qsock, Pattern::Verify, 9);
    assert_eq!(
        (w.errors, w.mismatches),
        (0, 0),
        "verify through qsd: {w:?}"
    );
    drop(q);

    let mut be = Backend::start(dir, &img, &["--queues", "2"]);
    let c = verify_sg(&be.socket, Pattern::Check, 9);
    assert_eq!(
        (c.errors, c.mismatches),
        (0, 0),
        "qsd's data through Torii: {c:?}"
    );
    let w = verify_sg(&be.socket, Pattern::Verify, 10);
    assert_eq!(
        (w.errors, w.mismatches),
        (0, 0),
        "scatter-gather through Torii: {w:?}"
    );
    be.stop();
}

/// `verify` with each request's data in 8 pieces of an indirect table (scatter-gather).
fn verify_sg(socket: &Path, pattern: Pattern, seed: u64) -> torii_perf::blk_job::RunReport {
    let s = RunSpec {
        segments: 8,
        bs: 32 << 10,
        ..spec(pattern, seed, 1)
    };
    run_spec(socket, &s).or_fail("client run")
}

/// qemu-storage-daemon (aio=io_uring, buffered) exporting `img` with `queues` queues on
/// `dir`/qsd.sock.
fn qsd(dir: &Path, img: &Path, queues: u16) -> Qsd {
    Qsd::start(
        img,
        &dir.join("qsd.sock"),
        queues,
        QsdAio::IoUring,
        false,
        &dir.join("qsd.log"),
    )
    .or_fail("qemu-storage-daemon")
}

/// A TCP port free on 127.0.0.1 right now (for a metrics endpoint).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .or_fail("free port")
        .port()
}

/// Submits one request on `q` and waits for its completion.
fn one(q: &mut DriverQueue, kind: u32, sector: u64, len: u32) -> Completion {
    q.queue(0, kind, sector, len);
    q.publish();
    wait_one(q, Duration::from_secs(5)).unwrap_or_else(|| panic!("no completion for {kind}"))
}

fn wait_one(q: &mut DriverQueue, timeout: Duration) -> Option<Completion> {
    let end = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < end {
        q.poll(&mut out);
        if let Some(c) = out.pop() {
            return Some(c);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    None
}

/// The statuses of a list of requests (virtio 1.2 §5.2.6), from the backend on `socket`.
fn statuses(socket: &Path) -> Vec<(String, u8)> {
    let cfg = ClientConfig {
        queues: 1,
        queue_size: 64,
        slots: 4,
        max_bytes: 8192,
        segments: 1,
    };
    let mut client = BlkClient::connect(socket, &cfg).or_fail("connect");
    let cap = client.info().capacity_sectors;
    let mut q = client.take_queues().pop().expect("queue");
    let mut out = Vec::new();
    let mut check = |what: &str, kind: u32, sector: u64, len: u32| {
        let c = one(&mut q, kind, sector, len);
        out.push((what.to_string(), c.status));
    };
    check("read in range", T_IN, 8, 4096);
    check("write in range", T_OUT, 8, 4096);
    check("flush", T_FLUSH, 0, 0);
    check("read past the end", T_IN, cap - 4, 4096);
    check("write past the end", T_OUT, cap, 512);
    check("unknown type", 99, 0, 512);
    check("get id", T_GET_ID, 0, 20);
    drop(q);
    out
}

/// The body of an HTTP GET of `/metrics` on `addr`.
fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).or_fail("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .or_fail("metrics request");
    let mut out = String::new();
    s.read_to_string(&mut out).or_fail("metrics response");
    assert!(out.starts_with("HTTP/1.1 200"), "metrics: {out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Torii answers like qemu-storage-daemon: OK in range, IOERR past the end, UNSUPP for an
/// unknown type; GET_ID gives the serial; the metrics count it all.
#[test]
fn statuses_match_qemu_storage_daemon() {
    let _heavy = torii_perf::heavy_test_lock();
    let dir = proc_util::unique_tmp_dir("torii-blk-status").or_fail("tmp dir");
    let img = image(dir.path(), "disk.img", 8);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut be = Backend::start(
        dir.path(),
        &img,
        &["--serial", "abc123", "--metrics-listen", &metrics],
    );
    let torii = statuses(&be.socket);

    // GET_ID fills the buffer with the serial.
    let cfg = ClientConfig {
        queues: 1,
        queue_size: 64,
        slots: 1,
        max_bytes: 4096,
        segments: 1,
    };
    let mut client = BlkClient::connect(&be.socket, &cfg).or_fail("connect");
    let mut q = client.take_queues().pop().expect("queue");
    q.data(0)[..20].fill(0xee);
    let c = one(&mut q, T_GET_ID, 0, 20);
    assert_eq!(c.status, 0);
    assert_eq!(&q.data(0)[..7], b"abc123\0");
    drop(q);
    drop(client);
    // The metrics count what was done: every request, by operation and status.
    let text = http_get(&metrics);
    for line in [
        "torii_blk_requests_total{export=\"blk0\",queue=\"0\",op=\"read\"} 1",
        "torii_blk_requests_total{export=\"blk0\",queue=\"0\",op=\"write\"} 1",
        "torii_blk_requests_total{export=\"blk0\",queue=\"0\",op=\"flush\"} 1",
        "torii_blk_requests_total{export=\"blk0\",queue=\"0\",op=\"get_id\"} 2",
        "torii_blk_bytes_total{export=\"blk0\",queue=\"0\",dir=\"read\"} 4096",
        "torii_blk_bytes_total{export=\"blk0\",queue=\"0\",dir=\"write\"} 4096",
        "torii_blk_errors_total{export=\"blk0\",queue=\"0\",status=\"ioerr\"} 2",
        "torii_blk_errors_total{export=\"blk0\",queue=\"0\",status=\"unsupp\"} 1",
        "torii_blk_inflight{export=\"blk0\",queue=\"0\"} 0",
        "torii_blk_connections_total{export=\"blk0\"} 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no `{line}` in metrics:\n{text}"
        );
    }
    be.stop();

    let peer = qsd(dir.path(), &img, 1);
    let theirs = statuses(&peer.socket);
    let expect = [0u8, 0, 0, 1, 1, 2, 0];
    let got: Vec<u8> = torii.iter().map(|(_, s)| *s).collect();
    assert_eq!(got, expect, "Torii: {torii:?}");
    assert_eq!(torii, theirs, "Torii and qemu-storage-daemon disagree");
}

/// Hostile chains: each breaks its queue (reported, nothing completed), never the daemon;
/// the other queue keeps serving, and the next connection starts clean.
#[test]
fn hostile_chains_break_only_their_queue() {
    let _heavy = torii_perf::heavy_test_lock();
    let dir = proc_util::unique_tmp_dir("torii-blk-hostile").or_fail("tmp dir");
    let img = image(dir.path(), "disk.img", 8);
    let mut be = Backend::start(dir.path(), &img, &["--queues", "2"]);
    type Attack = fn(&mut DriverQueue);
    let attacks: [(&str, Attack); 6] = [
        ("no status byte", |q| {
            q.set_header(0, T_IN, 0);
            let (hdr, _, _) = q.slot_addrs(0);
            q.queue_raw(0, &[(0, hdr, 16, 0, 0)]);
        }),
        ("no header", |q| {
            let (_, _, st) = q.slot_addrs(0);
            q.queue_raw(0, &[(0, st, 1, 2, 0)]);
        }),
        ("buffer outside guest memory", |q| {
            q.set_header(0, T_IN, 0);
            let (hdr, _, st) = q.slot_addrs(0);
            let far = q.memory_len() + 4096;
            q.queue_raw(
                0,
                &[(0, hdr, 16, 1, 1), (1, far, 4096, 3, 2), (2, st, 1, 2, 0)],
            );
        }),
        ("descriptor loop", |q| {
            q.set_header(0, T_IN, 0);
            let (hdr, data, _) = q.slot_addrs(0);
            q.queue_raw(0, &[(0, hdr, 16, 1, 1), (1, data, 512, 3, 0)]);
        }),
        ("head out of range", |q| q.queue_raw(5000, &[])),
        ("avail index far ahead", |q| q.publish_raw_idx(1000)),
    ];
    for (what, attack) in attacks {
        let cfg = ClientConfig {
            queues: 2,
            queue_size: 64,
            slots: 4,
            max_bytes: 4096,
            segments: 1,
        };
        let mut client = BlkClient::connect(&be.socket, &cfg).or_fail("connect");
        let mut qs = client.take_queues();
        let mut q1 = qs.pop().expect("queue 1");
        let mut q0 = qs.pop().expect("queue 0");
        let before = be.log_text().matches("virtqueue broken").count();
        attack(&mut q0);
        q0.publish();
        let broken =
            proc_util::wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
                be.log_text().matches("virtqueue broken").count() > before
            });
        assert!(
            broken,
            "{what}: queue 0 not reported broken; log:\n{}",
            be.log_text()
        );
        assert!(
            wait_one(&mut q0, Duration::from_millis(200)).is_none(),
            "{what}: the broken queue completed something"
        );
        // The other queue still serves.
        q1.data(0)[..4096].fill(0x11);
        assert_eq!(
            one(&mut q1, T_OUT, 64, 4096).status,
            0,
            "{what}: queue 1 write"
        );
        q1.data(0)[..4096].fill(0);
        assert_eq!(
            one(&mut q1, T_IN, 64, 4096).status,
            0,
            "{what}: queue 1 read"
        );
        assert!(
            q1.data(0)[..4096].iter().all(|&b| b == 0x11),
            "{what}: queue 1 data"
        );
        drop((q0, q1));
        client.close(2);
    }
    // A new connection finds both queues working.
    let r = verify(&be.socket, Pattern::Verify, 3, 2);
    assert_eq!((r.errors, r.mismatches), (0, 0), "after the attacks: {r:?}");
    be.stop();
}

#[test]
fn a_frontend_that_truncates_guest_memory_breaks_its_queues_not_the_daemon() {
    let _heavy = torii_perf::heavy_test_lock();
    let dir = proc_util::unique_tmp_dir("torii-blk-truncate").or_fail("tmp dir");
    let img = image(dir.path(), "disk.img", 8);
    // Polling workers read queue 1's ring as soon as its memory is gone.
    let mut be = Backend::start(dir.path(), &img, &["--queues", "2", "--poll-mode", "poll"]);
    let cfg = ClientConfig {
        queues: 2,
        queue_size: 64,
        slots: 4,
        max_bytes: 4096,
        segments: 1,
    };
    let mut client = BlkClient::connect(&be.socket, &cfg).or_fail("connect");
    let mut qs = client.take_queues();
    let q1 = qs.pop().expect("queue 1");
    let mut q0 = qs.pop().expect("queue 0");
    q0.data(0)[..4096].fill(0x22);
    assert_eq!(one(&mut q0, T_OUT, 8, 4096).status, 0, "write before");
    // The frontend keeps queue 0's part of the memory and drops queue 1's.
    client
        .truncate_memory(client.queue_area_len())
        .or_fail("ftruncate");
    let reported =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            be.log_text().contains("truncated by the frontend")
        });
    assert!(
        reported,
        "truncated memory not reported; log:\n{}",
        be.log_text()
    );
    // The whole memory table is suspect: queue 0 completes nothing either.
    q0.queue(0, T_IN, 8, 4096);
    q0.publish();
    assert!(
        wait_one(&mut q0, Duration::from_millis(300)).is_none(),
        "a queue of the truncated memory completed a request"
    );
    // Queue 1's memory is gone in this process too: it is dropped without a look.
    drop((q0, q1));
    client.close(2);
    // The daemon lives on: a new connection reads what was written before, and both
    // queues serve.
    let mut again = BlkClient::connect(&be.socket, &cfg).or_fail("reconnect");
    let mut q = again.take_queues().swap_remove(0);
    assert_eq!(one(&mut q, T_IN, 8, 4096).status, 0, "read after");
    assert!(q.data(0)[..4096].iter().all(|&b| b == 0x22), "data after");
    drop(q);
    again.close(2);
    let r = verify(&be.socket, Pattern::Verify, 5, 2);
    assert_eq!(
        (r.errors, r.mismatches),
        (0, 0),
        "after the truncation: {r:?}"
    );
    be.stop();
}

/// A frontend that shrinks the inflight region's file under a polling worker (a region of its
/// own: the one the backend makes is sealed at its size): the write whose record faults
/// completes (guest memory and rings are sound), then the queue is reported broken, since a
/// reconnect could no longer recover its requests. The daemon lives on, and a new connection
/// reads every acknowledged write.
#[test]
fn a_frontend_that_truncates_its_inflight_region_breaks_its_queue_not_the_daemon() {
    let _heavy = torii_perf::heavy_test_lock();
    let dir = proc_util::unique_tmp_dir("torii-blk-inflight-truncate").or_fail("tmp dir");
    let img = image(dir.path(), "disk.img", 8);
    let mut be = Backend::start(dir.path(), &img, &["--poll-mode", "poll"]);
    let cfg = ClientConfig {
        queues: 1,
        queue_size: 64,
        slots: 4,
        max_bytes: 4096,
        segments: 1,
    };
    // The region the backend makes is sealed at its size; a frontend may send back a region
    // of its own making instead, which it can shrink.
    let mut client = BlkClient::connect_with_own_inflight(&be.socket, &cfg).or_fail("connect");
    let mut q = client.take_queues().swap_remove(0);
    q.data(0)[..4096].fill(0x33);
    assert_eq!(one(&mut q, T_OUT, 8, 4096).status, 0, "write before");
    assert!(
        !be.log_text().contains("inflight region"),
        "{}",
        be.log_text()
    );

    client.truncate_inflight(0).or_fail("ftruncate");
    q.data(0)[..4096].fill(0x44);
    assert_eq!(one(&mut q, T_OUT, 16, 4096).status, 0, "write after");
    let reported =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            be.log_text()
                .contains("inflight region was truncated by the frontend")
        });
    assert!(
        reported,
        "truncated inflight region not reported; log:\n{}",
        be.log_text()
    );
    q.queue(0, T_IN, 8, 4096);
    q.publish();
    assert!(
        wait_one(&mut q, Duration::from_millis(300)).is_none(),
        "the broken queue completed a request"
    );
    drop(q);
    client.close(1);

    let mut again = BlkClient::connect_with_inflight(&be.socket, &cfg).or_fail("reconnect");
    let e = again
        .truncate_inflight(0)
        .expect_err("the backend's region shrank");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let mut q = again.take_queues().swap_remove(0);
    for (sector, fill) in [(8, 0x33), (16, 0x44)] {
        assert_eq!(one(&mut q, T_IN, sector, 4096).status, 0, "read {sector}");
        assert!(
            q.data(0)[..4096].iter().all(|&b| b == fill),
            "data at sector {sector}"
        );
    }
    drop(q);
    again.close(1);
    be.stop();
}

/// A loop device over an image, detached when dropped.
struct LoopDev(String);

impl LoopDev {
    fn attach(img: &Path) -> LoopDev {
        let losetup = torii_perf::prereq::require_binary("losetup", "apt-get install mount")
            .or_fail("losetup");
        let out = std::process::Command::new(losetup)
            .args(["--find", "--show"])
            .arg(img)
            .output()
            .or_fail("losetup");
        assert!(
            out.status.success(),
            "losetup failed (root and loop devices needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// A block device is exported like a file (capacity from the device, O_DIRECT): the client's
/// verify passes, and the pattern is in the image behind the loop device.
#[test]
fn block_device_export() {
    let _heavy = torii_perf::heavy_test_lock();
    torii_perf::prereq::require_root().or_fail("root");
    let dir = proc_util::unique_tmp_dir("torii-blk-bdev").or_fail("tmp dir");
    let img = image(dir.path(), "backing.img", 32);
    let dev = LoopDev::attach(&img);
    let mut be = Backend::start(dir.path(), Path::new(&dev.0), &["--direct"]);
    let r = verify(&be.socket, Pattern::Verify, 5, 1);
    assert_eq!(
        (r.errors, r.mismatches),
        (0, 0),
        "verify on {}: {r:?}",
        dev.0
    );
    assert_eq!(r.capacity_bytes, 32 << 20);
    be.stop();
    drop(dev);
    let data = std::fs::read(&img).or_fail("backing file");
    let mut want = vec![0u8; 4096];
    for off in (0..16u64 << 20).step_by(4096) {
        torii_perf::blk_job::fill_pattern(&mut want, 5, off);
        assert!(
            data[off as usize..off as usize + 4096] == want[..],
            "block at {off} not in the backing file"
        );
    }
}

/// A configuration file with two exports: both served by one daemon (one read-write, one
/// read-only), both in the metrics; a file whose second export cannot start leaves nothing
/// behind.
#[test]
fn config_file_serves_several_exports_all_or_nothing() {
    use std::process::{Command, Stdio};
    let _heavy = torii_perf::heavy_test_lock();
    let dir = proc_util::unique_tmp_dir("torii-blk-config").or_fail("tmp dir");
    let (a, b) = (image(dir.path(), "a.img", 8), image(dir.path(), "b.img", 4));
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let port = free_port();
    let config = |b_file: &Path| {
        format!(
            "[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n\
             [[export]]\nname = \"a\"\nsocket = \"{}\"\nfile = \"{}\"\nqueues = 2\n\
             [[export]]\nname = \"b\"\nsocket = \"{}\"\nfile = \"{}\"\nread_only = true\n",
            sa.display(),
            a.display(),
            sb.display(),
            b_file.display()
        )
    };
    let path = dir.join("blk.toml");
    let spawn = |text: String| {
        std::fs::write(&path, text).or_fail("config");
        Command::new(env!("CARGO_BIN_EXE_torii-vhost-user-blk"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .or_fail("spawn")
    };

    // A missing file for export b: the daemon fails, and a's socket is gone again.
    let out = spawn(config(&dir.join("missing.img")))
        .wait_with_output()
        .or_fail("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("export b") && err.contains("missing.img"),
        "{err}"
    );
    assert!(!sa.exists() && !sb.exists(), "a socket was left behind");

    let child = spawn(config(&b));
    let mut guard = proc_util::ChildGuard::new(child, "torii-vhost-user-blk");
    assert!(
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            sa.exists() && sb.exists()
        }),
        "sockets not created"
    );
    let r = verify(&sa, Pattern::Verify, 11, 2);
    assert_eq!((r.errors, r.mismatches), (0, 0), "export a: {r:?}");
    // Export b is read-only: writes fail, reads work.
    let cfg = ClientConfig {
        queues: 1,
        queue_size: 64,
        slots: 1,
        max_bytes: 4096,
        segments: 1,
    };
    let mut client = BlkClient::connect(&sb, &cfg).or_fail("connect b");
    assert!(client.info().read_only);
    let mut q = client.take_queues().pop().expect("queue");
    assert_eq!(
        one(&mut q, T_OUT, 0, 4096).status,
        1,
        "write to read-only b"
    );
    assert_eq!(one(&mut q, T_IN, 0, 4096).status, 0, "read from b");
    drop(q);
    drop(client);
    let text = http_get(&format!("127.0.0.1:{port}"));
    assert!(
        text.contains("torii_blk_connections_total{export=\"a\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("torii_blk_errors_total{export=\"b\",queue=\"0\",status=\"ioerr\"} 1"),
        "{text}"
    );
    guard.signal(libc::SIGTERM).or_fail("SIGTERM");
    let st = guard
        .wait_timeout(Duration::from_secs(10))
        .or_fail("wait")
        .expect("the daemon did not stop");
    assert!(st.success());
    assert!(!sa.exists() && !sb.exists(), "sockets left behind");
}

/// Every poll mode serves correctly: poll, event (sleeps on kicks and completions from the
/// first idle round, so every request goes through a guest kick) and adaptive, each with
/// buffered and O_DIRECT I/O.
#[test]
fn every_poll_mode_serves_verify() {
    let _heavy = torii_perf::heavy_test_lock();
    let dir = proc_util::unique_tmp_dir("torii-blk-modes").or_fail("tmp dir");
    let img = image(dir.path(), "disk.img", 32);
    for mode in ["poll", "event", "adaptive"] {
        for direct in [false, true] {
            let mut args = vec!["--queues", "2", "--poll-mode", mode];
            if direct {
                args.push("--direct");
            }
            let mut be = Backend::start(dir.path(), &img, &args);
            let r = verify(&be.socket, Pattern::Verify, 21, 2);
            assert_eq!(
                (r.errors, r.mismatches),
                (0, 0),
                "{mode} direct={direct}: {r:?}"
            );
            be.stop();
        }
    }
}
