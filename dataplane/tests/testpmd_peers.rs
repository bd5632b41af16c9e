//! The data plane between real DPDK vhost-user frontends (dpdk-testpmd `net_virtio_user`):
//! packet accounting across a cross-connect, Torii as socket server and as socket client, a
//! frontend that dies and comes back, and a daemon restart while the frontend waits.

mod common;

use std::time::Duration;

use common::{Daemon, OrFail};
use torii_perf::testpmd::{FwdMode, Testpmd, TestpmdBuilder};
use torii_perf::{prereq, proc_util};

fn prerequisites() {
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(512).or_fail("prerequisite");
}

/// A virtio-user testpmd on `sock`; `server`: testpmd listens (Torii connects as client).
fn frontend(sock: &std::path::Path, mode: FwdMode, server: bool, main_lcore: u32) -> Testpmd {
    TestpmdBuilder::new()
        .virtio_user(sock, 1, server)
        .forward_mode(mode)
        .pkt_size(64)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", main_lcore)
        .spawn()
        .or_fail("starting testpmd")
}

/// An rxonly testpmd listening on `sock` (virtio-user `server=1`): Torii connects as client.
fn listening_receiver(sock: &std::path::Path) -> Testpmd {
    let rx = frontend(sock, FwdMode::RxOnly, true, 1);
    proc_util::wait_for_path(sock, Duration::from_secs(20)).or_fail("receiver socket");
    rx
}

#[test]
fn xconnect_counts_match_between_two_testpmds() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-xc").or_fail("tmp dir");
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));

    // Receiver listens (virtio-user server=1): Torii's port b is a vhost-user *client*.
    let mut rx = listening_receiver(&b_sock);
    let mut dp = Daemon::start(
        dir.path(),
        "",
        &common::vhost_pair_config(&a_sock, &b_sock, true),
    );
    dp.wait_port("b", Duration::from_secs(20), "b connected", |p| {
        p["connected"] == true
    });
    let mut tx = frontend(&a_sock, FwdMode::TxOnly, false, 0);
    dp.wait_port("a", Duration::from_secs(30), "traffic on a", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 100_000
    });
    let sent = tx.stop(Duration::from_secs(20)).or_fail("stopping sender");
    let a = dp.wait_settled("a");
    let b = dp.wait_settled("b");
    let got = rx
        .stop(Duration::from_secs(20))
        .or_fail("stopping receiver");
    // The PMD's own counters (published every few thousand rounds) catch up with the ports':
    // it received exactly what a did, and spent busy cycles on it.
    let a_rx = a["rx_packets"].as_u64().unwrap();
    let pmd_caught_up =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            dp.report()["pmds"][0]["packets"].as_u64() == Some(a_rx)
        });
    let pmd = dp.report()["pmds"][0].clone();
    assert!(pmd_caught_up, "PMD counters {pmd} vs a {a}");
    assert!(pmd["busy_cycles"].as_u64().unwrap() > 0, "{pmd}");
    assert!(pmd["cycles_per_packet"].as_f64().unwrap() > 0.0, "{pmd}");
    dp.stop();

    let n = |v: &serde_json::Value, f: &str| v[f].as_u64().unwrap();
    // Everything the sender enqueued was dequeued by Torii, except what was still in the
    // ring (at most its 256 entries) when the sender stopped its device.
    assert!(
        sent.tx_packets >= n(&a, "rx_packets"),
        "sender {sent:?} vs a {a}"
    );
    assert!(
        sent.tx_packets - n(&a, "rx_packets") <= 256,
        "sender {sent:?} vs a {a}"
    );
    // Every packet taken from a was either delivered on b or counted as a drop on b.
    assert_eq!(
        n(&a, "rx_packets"),
        n(&b, "tx_packets") + n(&b, "tx_dropped_no_room") + n(&b, "tx_dropped_offload"),
        "a {a}\nb {b}"
    );
    // And the receiver saw exactly what Torii delivered.
    assert_eq!(
        got.rx_packets,
        n(&b, "tx_packets"),
        "receiver {got:?} vs b {b}"
    );
    assert!(got.rx_packets > 0);
    assert_eq!(n(&a, "rx_dropped_invalid"), 0);
    assert_eq!(a["broken_queues"], serde_json::json!([]));
    assert_eq!(a["rx_bytes"], a["rx_packets"].as_u64().unwrap() * 64);
}

#[test]
fn frontend_restart_and_daemon_restart_resume_traffic() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-rc").or_fail("tmp dir");
    let (v_sock, p_sock) = (dir.join("v.sock"), dir.join("p.sock"));

    // p: Torii is the client of a waiting testpmd (server=1) and feeds it from a source.
    let mut rx = listening_receiver(&p_sock);
    let mut dp = Daemon::start(
        dir.path(),
        "",
        &format!(
            r#"
[[port]]
name = "src"
type = "source"
[[port]]
name = "p"
type = "vhost-user"
socket = "{}"
mode = "client"
[[port]]
name = "v"
type = "vhost-user"
socket = "{}"
[[port]]
name = "sink"
type = "sink"
[[xconnect]]
ports = ["src", "p"]
[[xconnect]]
ports = ["v", "sink"]
"#,
            p_sock.display(),
            v_sock.display()
        ),
    );
    dp.wait_port("p", Duration::from_secs(20), "p delivering", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > 0
    });

    // A frontend on v that dies without a goodbye (SIGKILL) and a new one in its place.
    let mut tx = frontend(&v_sock, FwdMode::TxOnly, false, 0);
    dp.wait_port("v", Duration::from_secs(30), "traffic on v", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 10_000
    });
    let p_before = dp.counter("p", "tx_packets");
    drop(tx); // kills testpmd
    dp.wait_port("v", Duration::from_secs(20), "v disconnected", |p| {
        p["connected"] == false
    });
    let v_after_kill = dp.counter("v", "rx_packets");
    // The other port kept going while v's frontend died.
    dp.wait_port("p", Duration::from_secs(10), "p still delivering", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > p_before
    });
    tx = frontend(&v_sock, FwdMode::TxOnly, false, 0);
    dp.wait_port(
        "v",
        Duration::from_secs(30),
        "traffic after reconnect",
        |p| p["rx_packets"].as_u64().unwrap_or(0) > v_after_kill + 10_000,
    );
    assert_eq!(dp.counter("v", "connections"), 2);
    assert_eq!(dp.port("v")["broken_queues"], serde_json::json!([]));
    tx.stop(Duration::from_secs(20)).or_fail("stopping sender");

    // Daemon restart: testpmd (server=1) waits, Torii reconnects to it as client.
    let rx_before = rx.samples().last().map_or(0, |s| s.rx_packets);
    dp.restart();
    dp.wait_port(
        "p",
        Duration::from_secs(30),
        "p delivering after restart",
        |p| p["connected"] == true && p["tx_packets"].as_u64().unwrap_or(0) > 10_000,
    );
    let resumed =
        proc_util::wait_until(Duration::from_secs(15), Duration::from_millis(500), || {
            rx.samples().last().map_or(0, |s| s.rx_packets) > rx_before + 10_000
        });
    assert!(
        resumed,
        "receiver saw no traffic after the daemon restart:\n{}",
        rx.log_tail(30)
    );
    dp.stop();
    rx.stop(Duration::from_secs(20))
        .or_fail("stopping receiver");
}

/// CPU time (user + system, in clock ticks) the process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).or_fail("reading stat");
    // Fields after the ")" of the command name: utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn adaptive_pmd_sleeps_when_idle_and_wakes_on_traffic() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-idle").or_fail("tmp dir");
    let sock = dir.join("v.sock");
    let dp = Daemon::start(
        dir.path(),
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
"#,
            sock.display()
        ),
    );
    // Idle: the PMD sleeps, so the whole daemon uses well under a tenth of a core.
    let pid = dp.pid();
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let idle = cpu_ticks(pid) - t0;
    assert!(idle < 30, "idle daemon used {idle} ticks (of 300) in 3 s");
    assert!(dp.report()["pmds"][0]["sleeps"].as_u64().unwrap() > 0);

    // A frontend that only kicks when asked to: traffic must wake the PMD.
    let mut tx = frontend(&sock, FwdMode::TxOnly, false, 0);
    dp.wait_port("v", Duration::from_secs(30), "traffic after sleep", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 100_000
    });
    tx.stop(Duration::from_secs(20)).or_fail("stopping sender");
}
