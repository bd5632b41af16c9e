//! Per-port ingress rate limits against real sources: a DPDK guest (dpdk-testpmd
//! `net_virtio_user`, txonly) on a cross-connected vhost-user port limited in the config file,
//! and a generator port added to the switch through the API with a bit-rate limit. Over a
//! measured interval a limited port takes no more than rate × interval + burst (plus a small
//! tolerance for the clock), and more than nothing; what it does not take waits in the guest's
//! ring (nothing is dropped in Torii); limits are changed and lifted at runtime through the
//! control API and its CLI, and lifting one lets more than the limit through. No speed of the
//! machine is asserted.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, OrFail};
use serde_json::{json, Value};
use torii_dataplane::ctl;
use torii_perf::{prereq, proc_util};

/// The PMD's burst: a poll may take this many before the limiter sees it again.
const BURST: f64 = 32.0;
/// The limiter counts time in cycle-counter ticks measured against the system clock.
const CLOCK_TOLERANCE: f64 = 0.02;

/// One port as the API has it now.
fn port(sock: &Path, name: &str) -> Value {
    let r = ctl::request(sock, "GET", &format!("/v1/ports/{name}"), None).or_fail("GET port");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).or_fail("port JSON")
}

/// How much `field` of port `name` grew over about `secs` seconds, and the time between the
/// start of the first request and the end of the second: the counters were read somewhere
/// inside it, so rate × this interval bounds what a limit lets through.
fn measure(sock: &Path, name: &str, field: &str, secs: f64) -> (u64, f64) {
    let n = |v: &Value| {
        v[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {v}"))
    };
    let t0 = Instant::now();
    let a = n(&port(sock, name));
    std::thread::sleep(Duration::from_secs_f64(secs));
    let b = n(&port(sock, name));
    (b - a, t0.elapsed().as_secs_f64())
}

/// The most a limit of `rate` per second with `burst` lets through in `secs` seconds.
fn bound(rate: f64, burst: f64, secs: f64) -> f64 {
    rate * secs * (1.0 + CLOCK_TOLERANCE) + burst + BURST
}

#[test]
fn a_guest_is_held_to_its_packet_rate_and_lifting_the_limit_lets_more_through() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(512).or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-rl").or_fail("tmp dir");
    let v_sock = dir.join("v.sock");
    const PPS: u64 = 20_000;
    let dp = Daemon::start(
        dir.path(),
        "",
        &format!(
            r#"
[[port]]
name = "v"
type = "vhost-user"
socket = "{}"
rate_limit = {{ pps = {PPS} }}
[[port]]
name = "sink"
type = "sink"
[[xconnect]]
ports = ["v", "sink"]
"#,
            v_sock.display()
        ),
    );
    let sock = dp.control_socket();
    // Shown as configured, the burst resolved (10 ms of 20 kpps).
    assert_eq!(
        port(&sock, "v")["rate_limit"],
        json!({"pps": PPS, "burst_packets": 200})
    );
    assert!(
        dp.ctl_ok(&["ports"])
            .lines()
            .any(|l| l.starts_with("v ") && l.contains("20kpps")),
        "{}",
        dp.ctl_ok(&["ports"])
    );
    assert_eq!(port(&sock, "sink")["rate_limit"], Value::Null);

    // A DPDK guest sending 64 B frames as fast as it can.
    let mut tx = common::sender(&v_sock);
    dp.wait_port("v", Duration::from_secs(30), "traffic on v", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 0
    });

    let (got, secs) = measure(&sock, "v", "rx_packets", 2.0);
    let max = bound(PPS as f64, 200.0, secs);
    eprintln!("limited to {PPS} pps: {got} packets in {secs:.3} s (at most {max:.0})");
    assert!(got > 0, "nothing passed the limit in {secs:.3} s");
    assert!(
        got as f64 <= max,
        "{got} packets in {secs:.3} s: more than {PPS} pps allow ({max:.0})"
    );
    // Held back in the guest's ring, not dropped here: everything taken was delivered, and
    // the limit's counter shows the polls it skipped.
    let v = port(&sock, "v");
    let s = port(&sock, "sink");
    assert!(v["rx_rate_limited_rounds"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["rx_dropped_invalid"], 0, "{v}");
    assert_eq!(v["broken_queues"], json!([]), "{v}");
    let metrics = dp.ctl_ok(&["metrics"]);
    for want in [
        "torii_port_rate_limit_pps{port=\"v\",kind=\"vhost-user\"} 20000",
        "torii_port_rate_limit_burst_packets{port=\"v\",kind=\"vhost-user\"} 200",
        "# TYPE torii_port_rx_rate_limited_rounds_total counter",
        "torii_port_rx_rate_limited_rounds_total{port=\"v\",kind=\"vhost-user\"}",
    ] {
        assert!(
            metrics.contains(want),
            "{want:?} not in metrics:\n{metrics}"
        );
    }
    assert!(!metrics.contains("torii_port_rate_limit_pps{port=\"sink\""));

    // Changed at runtime to a bit rate (CLI): 64 B frames at 5.12 Mbit/s are 10 kpps.
    const BPS: u64 = 5_120_000;
    let out = dp.ctl_ok(&["rate-limit", "v", &format!("bps={BPS}"), "burst_bytes=4096"]);
    assert!(
        out.contains("rate limit 5120kbps  burst 4096 bytes"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let (bytes, secs) = measure(&sock, "v", "rx_bytes", 2.0);
    // One poll may overshoot the bits held by less than one frame.
    let max = bound(BPS as f64 / 8.0, 4096.0 + 64.0, secs);
    eprintln!("limited to {BPS} bit/s: {bytes} bytes in {secs:.3} s (at most {max:.0})");
    assert!(bytes > 0);
    assert!(
        bytes as f64 <= max,
        "{bytes} bytes in {secs:.3} s: more than {BPS} bit/s allow ({max:.0})"
    );

    // Lifted (API): more than the limit passes.
    let r = ctl::request(&sock, "DELETE", "/v1/ports/v/rate-limit", None).or_fail("DELETE");
    assert_eq!(r.status, 200, "{}", r.body);
    let shown: Value = serde_json::from_str(&r.body).or_fail("JSON");
    assert_eq!(shown["rate_limit"], Value::Null, "{shown}");
    std::thread::sleep(Duration::from_millis(200));
    let (bytes, secs) = measure(&sock, "v", "rx_bytes", 1.0);
    let limit = bound(BPS as f64 / 8.0, 4096.0 + 64.0, secs);
    eprintln!("unlimited: {bytes} bytes in {secs:.3} s (the limit allowed {limit:.0})");
    assert!(
        bytes as f64 > limit,
        "only {bytes} bytes in {secs:.3} s after the limit was lifted"
    );
    assert!(!dp.ctl_ok(&["metrics"]).contains("torii_port_rate_limit_"));

    // Everything the guest got into its ring was taken (but the ring's last 256), and
    // everything taken was delivered: the limit slowed the guest, Torii dropped nothing.
    let sent = tx.stop(Duration::from_secs(20)).or_fail("stopping testpmd");
    let v = dp.wait_settled("v");
    let s2 = dp.wait_settled("sink");
    let n = |p: &Value, f: &str| p[f].as_u64().unwrap();
    assert!(sent.tx_packets >= n(&v, "rx_packets"), "{sent:?} vs {v}");
    assert!(
        sent.tx_packets - n(&v, "rx_packets") <= 256,
        "{sent:?} vs {v}"
    );
    assert_eq!(
        n(&v, "rx_packets"),
        n(&s2, "tx_packets"),
        "v {v}\nsink {s2}"
    );
    assert!(n(&s2, "tx_packets") > n(&s, "tx_packets"));
}

#[test]
fn a_switch_port_added_with_a_bit_rate_is_limited_changed_and_lifted_at_runtime() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-rl-sw").or_fail("tmp dir");
    let dp = Daemon::start(
        dir.path(),
        "",
        "[[port]]\nname = \"drain\"\ntype = \"sink\"\n",
    );
    let sock = dp.control_socket();
    // A generator of 1000 B frames on the switch (flooded to the sink), 8 Mbit/s = 1 MB/s.
    let out = dp.ctl_ok(&[
        "add",
        "gen",
        "type=source",
        "frame_size=1000",
        "rate_limit={bps=8_000_000}",
    ]);
    assert!(out.contains("rate limit 8Mbps  burst 65536 bytes"), "{out}");
    dp.wait_port("drain", Duration::from_secs(10), "traffic", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > 0
    });
    let (bytes, secs) = measure(&sock, "gen", "rx_bytes", 2.0);
    let max = bound(1_000_000.0, 65536.0 + 1000.0, secs);
    eprintln!("8 Mbit/s: {bytes} bytes in {secs:.3} s (at most {max:.0})");
    assert!(bytes > 0);
    assert!(
        bytes as f64 <= max,
        "{bytes} bytes in {secs:.3} s: more than 8 Mbit/s allow ({max:.0})"
    );
    let (delivered, _) = measure(&sock, "drain", "tx_packets", 0.5);
    assert!(delivered > 0, "the switch delivers what the port takes");

    // Replaced through the API by a packet rate.
    let r = ctl::request(
        &sock,
        "PUT",
        "/v1/ports/gen/rate-limit",
        Some(&json!({"pps": 500, "burst_packets": 10})),
    )
    .or_fail("PUT");
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).or_fail("JSON");
    assert_eq!(v["rate_limit"], json!({"pps": 500, "burst_packets": 10}));
    std::thread::sleep(Duration::from_millis(100));
    let (got, secs) = measure(&sock, "gen", "rx_packets", 2.0);
    let max = bound(500.0, 10.0, secs);
    eprintln!("500 pps: {got} packets in {secs:.3} s (at most {max:.0})");
    assert!(got > 0);
    assert!(got as f64 <= max, "{got} packets in {secs:.3} s ({max:.0})");
    assert!(
        port(&sock, "gen")["rx_rate_limited_rounds"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Bad requests: a clear error each, and the limit stays as it was.
    let cases: [(&[&str], &str); 6] = [
        (&["rate-limit", "gen", "pps=0"], "pps 0 would stop the port"),
        (&["rate-limit", "gen", "bps=10"], "bps 10 is below 1000"),
        (
            &["rate-limit", "gen", "burst_packets=5"],
            "neither pps nor bps is set",
        ),
        (
            &["rate-limit", "gen", "pps=10", "colour=red"],
            "unknown field `colour`",
        ),
        (&["rate-limit", "nope", "pps=10"], "no port named \"nope\""),
        (
            &["add", "x", "type=sink", "rate_limit={pps=5,bursts=1}"],
            "rate_limit: unknown field `bursts`",
        ),
    ];
    for (args, want) in cases {
        let err = dp.ctl_err(args);
        assert!(
            err.contains(want),
            "ctl {args:?}: {err:?} should say {want:?}"
        );
    }
    assert_eq!(
        port(&sock, "gen")["rate_limit"],
        json!({"pps": 500, "burst_packets": 10})
    );

    // Lifted (CLI): more than the limit passes.
    let out = dp.ctl_ok(&["rate-limit", "gen", "off"]);
    assert!(!out.contains("rate limit"), "{out}");
    std::thread::sleep(Duration::from_millis(100));
    let (got, secs) = measure(&sock, "gen", "rx_packets", 1.0);
    let limit = bound(500.0, 10.0, secs);
    eprintln!("unlimited: {got} packets in {secs:.3} s (the limit allowed {limit:.0})");
    assert!(
        got as f64 > limit,
        "only {got} packets after the limit was lifted"
    );
    dp.ctl_ok(&["del", "gen"]);
}
