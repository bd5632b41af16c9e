//! End-to-end checks of the harness against real peers: a QEMU guest and a
//! pair of dpdk-testpmd processes. Missing prerequisites fail the tests.

use std::time::{Duration, Instant};

use torii_perf::guest::GuestBuilder;
use torii_perf::testpmd::{FwdMode, TestpmdBuilder};
use torii_perf::{prereq, proc_util};

use torii_perf::OrFail;

#[test]
fn guest_boots_and_runs_commands() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    let image = prereq::guest_image().or_fail("prerequisite");
    let t0 = Instant::now();

    let mut g = GuestBuilder::new()
        .image(image)
        .spawn()
        .or_fail("spawning guest");
    assert!(g.is_running());
    g.wait_ready(Duration::from_secs(40))
        .or_fail("waiting for guest");
    eprintln!("guest ready after {:?}", t0.elapsed());

    let t = Duration::from_secs(10);
    let uname = g.run("uname -r", t).or_fail("uname -r");
    assert_eq!(uname.rc, 0, "uname output: {:?}", uname.stdout);
    let release = uname.stdout.trim();
    assert!(!release.is_empty() && !release.contains('\n'), "{uname:?}");
    let ver_file = prereq::guest_dir().join("kernel.ver");
    if let Ok(expected) = std::fs::read_to_string(&ver_file) {
        assert_eq!(
            release,
            expected.trim(),
            "guest kernel vs {}",
            ver_file.display()
        );
    }

    let hello = g.run("echo hello", t).or_fail("echo hello");
    assert_eq!((hello.rc, hello.stdout.as_str()), (0, "hello\n"));

    let f = g.run("false", t).or_fail("false");
    assert_eq!((f.rc, f.stdout.as_str()), (1, ""));
    assert!(g
        .run_ok(
            "exit_code_test() { echo oops; return 3; }; exit_code_test",
            t
        )
        .is_err());

    // stderr is merged, multi-line output and output without a final newline.
    let mixed = g
        .run("echo out; echo err >&2; printf 'a\\nb'", t)
        .or_fail("mixed output");
    assert_eq!((mixed.rc, mixed.stdout.as_str()), (0, "out\nerr\na\nb\n"));

    // A background job finishing must not kill the console shell.
    g.spawn_bg("sleep 1 > /dev/null 2>&1").or_fail("spawn_bg");
    std::thread::sleep(Duration::from_millis(1500));
    let alive = g.run_ok("echo alive", t).or_fail("shell after bg job");
    assert_eq!(alive, "alive\n");

    let st = g.poweroff(Duration::from_secs(15)).or_fail("poweroff");
    assert!(st.success(), "QEMU exit status {st}");
    assert!(!g.is_running());
    eprintln!("guest test took {:?}", t0.elapsed());
}

#[test]
fn testpmd_vhost_virtio_user_pair() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    // Two testpmds with -m 512 each.
    prereq::require_hugepages(512).or_fail("prerequisite");
    let t0 = Instant::now();

    let dir = proc_util::unique_tmp_dir("torii-pair").or_fail("tmp dir");
    let sock = dir.join("vhu0.sock");

    let mut backend = TestpmdBuilder::new()
        .vhost(&sock, 1)
        .forward_mode(FwdMode::RxOnly)
        .pkt_size(64)
        .lcores("0,1", 0)
        .spawn()
        .or_fail("spawning backend testpmd");
    proc_util::wait_for_path(&sock, Duration::from_secs(20))
        .map_err(|e| format!("{e}; backend log:\n{}", backend.log_tail(40)))
        .or_fail("backend socket");
    backend
        .wait_for_log("start packet forwarding", Duration::from_secs(20))
        .or_fail("backend start");

    let mut frontend = TestpmdBuilder::new()
        .virtio_user(&sock, 1, false)
        .forward_mode(FwdMode::TxOnly)
        .pkt_size(64)
        .lcores("0,1", 1)
        .spawn()
        .or_fail("spawning frontend testpmd");
    frontend
        .wait_for_log("start packet forwarding", Duration::from_secs(20))
        .or_fail("frontend start");
    backend
        .wait_for_log("new device, handle is", Duration::from_secs(10))
        .or_fail("vhost-user connection");

    std::thread::sleep(Duration::from_secs(3));

    let front = frontend
        .stop(Duration::from_secs(15))
        .or_fail("stopping frontend");
    let back = backend
        .stop(Duration::from_secs(15))
        .or_fail("stopping backend");
    eprintln!("frontend {front:?}\nbackend {back:?}");
    assert!(back.rx_packets > 0, "backend received nothing: {back:?}");
    assert!(
        front.tx_packets >= back.rx_packets,
        "backend received more than the frontend sent: {front:?} vs {back:?}"
    );
    assert!(
        !backend.samples().is_empty(),
        "no periodic stats in backend log"
    );
    assert!(!std::path::Path::new("/var/run/dpdk")
        .join(backend.file_prefix())
        .exists());
    eprintln!("testpmd pair test took {:?}", t0.elapsed());
}
