//! Per-thread seccomp filters in the real daemon (docs/security.md): with the
//! default mode every thread of a running `torii-dataplane` has a filter (`Seccomp: 2` in
//! `/proc/<pid>/task/*/status`), the threads that narrow the control filter with their own
//! class have two, and traffic still flows through a vhost-user port (a dpdk-testpmd
//! virtio-user frontend), a tap, a source/sink pair and a disk; the daemon stops cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, OrFail};
use torii_perf::blk_job::{run_spec, Pattern, RunSpec};
use torii_perf::{fault, prereq, proc_util};

fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(mib << 20))
        .or_fail("image file");
    p
}

#[test]
fn every_thread_is_filtered_and_traffic_flows() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(256).or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-seccomp").or_fail("tmp dir");
    let d = dir.path();
    let (v_sock, d_sock) = (d.join("v.sock"), d.join("d.sock"));
    let img = image(d, "d.img", 16);
    let tap = common::ifname("sc");
    let mut dp = Daemon::start(
        d,
        "pmd_mode = \"adaptive\"",
        &format!(
            r#"
[[port]]
name = "v"
type = "vhost-user"
socket = "{}"
[[port]]
name = "sink"
type = "sink"
[[xconnect]]
ports = ["v", "sink"]
[[port]]
name = "src"
type = "source"
[[port]]
name = "tap"
type = "tap"
ifname = "{tap}"
[[xconnect]]
ports = ["src", "tap"]
[[disk]]
name = "d"
socket = "{}"
file = "{}"
queues = 2
workers = 2
"#,
            v_sock.display(),
            d_sock.display(),
            img.display()
        ),
    );
    assert!(
        dp.log_text()
            .contains("per-thread seccomp filters seccomp=enforce"),
        "{}",
        dp.log_text()
    );

    // A frontend sends into v; the source sends into the tap (io_uring writes from the PMD).
    let mut tx = common::sender(&v_sock);
    dp.wait_port("v", Duration::from_secs(30), "traffic on v", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 10_000
    });
    dp.wait_port("tap", Duration::from_secs(20), "traffic to the tap", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > 1_000
    });
    // The disk's workers do I/O (and register the client's memory) under their filter.
    let spec = RunSpec {
        pattern: Pattern::Verify,
        bs: 4096,
        iodepth: 8,
        numjobs: 2,
        runtime: Duration::from_secs(1),
        size: 8 << 20,
        seed: 3,
        queue_size: 128,
        segments: 1,
    };
    let r = run_spec(&d_sock, &spec).or_fail("disk I/O");
    assert_eq!((r.errors, r.mismatches), (0, 0), "{r:?}");

    // Now, with every kind of thread running (the disk's connection is gone, so connect
    // again and keep it while looking), every one has a filter.
    let client = torii_perf::blk_client::BlkClient::connect(
        &d_sock,
        &torii_perf::blk_client::ClientConfig {
            queues: 2,
            queue_size: 128,
            slots: 8,
            max_bytes: 4096,
            segments: 1,
        },
    )
    .or_fail("disk client");
    // Threads a connection starts may still be starting: wait for their names and filters.
    let want = [
        "torii-dataplane",
        "pmd0",
        "vhu-v",
        "kick-v",
        "vhu-v-stop",
        "vhu-d",
        "kick-d",
        "vhu-d-stop",
        "blk-d-0",
        "blk-d-1",
        "mac-ager",
    ];
    let pid = dp.pid();
    let ts = fault::started_and_filtered(pid, &want);
    for (name, mode, filters) in &ts {
        assert_eq!(
            *mode, 2,
            "thread {name} runs without a seccomp filter: {ts:?}"
        );
        // The control filter for all; each class's own on top of it (watchers: the endpoint
        // thread's too).
        let want = match name.as_str() {
            // The main thread, and tokio's blocking threads that inherit its filter only.
            "torii-dataplane" | "tokio-runtime-w" => 1,
            n if n.starts_with("kick-") || n.ends_with("-stop") => 3,
            _ => 2,
        };
        assert_eq!(*filters, want, "thread {name}: {ts:?}");
    }
    drop(client);

    let sent = tx.stop(Duration::from_secs(20)).or_fail("stopping testpmd");
    assert!(sent.tx_packets > 10_000, "{sent:?}");
    let v = dp.wait_settled("v");
    assert_eq!(v["broken_queues"], serde_json::json!([]), "{v}");
    // The stats and the API still answer under the control filter.
    assert!(dp.ctl_ok(&["ports"]).contains("tap"));
    let log = dp.stop();
    assert!(!log.contains("seccomp: thread"), "{log}");
}

#[test]
fn off_installs_nothing_and_a_bad_mode_is_refused() {
    let dir = proc_util::unique_tmp_dir("torii-seccomp-off").or_fail("tmp dir");
    let mut dp = Daemon::start(
        dir.path(),
        "seccomp = \"off\"",
        "[[port]]\nname = \"src\"\ntype = \"source\"\n[[port]]\nname = \"sink\"\ntype = \"sink\"\n[[xconnect]]\nports = [\"src\", \"sink\"]\n",
    );
    dp.wait_port("sink", Duration::from_secs(20), "traffic", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > 0
    });
    let ts = fault::seccomp_threads(dp.pid());
    assert!(ts.iter().all(|t| t.1 == 0 && t.2 == 0), "{ts:?}");
    assert!(ts.iter().any(|t| t.0 == "pmd0"), "{ts:?}");
    dp.stop();

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[dataplane]\nseccomp = \"strict\"\n").or_fail("config");
    let o = Command::new(env!("CARGO_BIN_EXE_torii-dataplane"))
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .or_fail("torii-dataplane check");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("strict"), "{err}");
}

/// `torii-dataplane seccomp` prints every class the daemon has, with its count and calls.
#[test]
fn the_allowlists_print() {
    let o = Command::new(env!("CARGO_BIN_EXE_torii-dataplane"))
        .arg("seccomp")
        .output()
        .or_fail("torii-dataplane seccomp");
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for class in [
        "control",
        "vhost-user",
        "watcher",
        "pmd",
        "io-worker",
        "metrics",
        "housekeeping",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{class} (")) && l.ends_with(" system calls")),
            "{class} missing:\n{text}"
        );
    }
    assert!(text.contains("  io_uring_enter\n"), "{text}");
    assert!(!text.contains("  execve"), "{text}");
}
