//! The control API and its CLI (`torii-dataplane ctl`) against a running daemon: reading
//! ports, PMDs, MACs and metrics; adding, changing and removing switch ports at runtime; bad
//! requests answered with a clear error and nothing changed; and 64 vhost-user ports created
//! and deleted while dpdk-testpmd traffic runs through another port, with no fd, thread or
//! socket left behind.

mod common;

use std::time::Duration;

use common::{Daemon, OrFail};
use serde_json::Value;
use torii_dataplane::ctl;
use torii_perf::testpmd::{FwdMode, TestpmdBuilder};
use torii_perf::{prereq, proc_util};

fn names(dp: &Daemon) -> Vec<String> {
    let v: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "ports"])).or_fail("ports JSON");
    v.as_array()
        .expect("ports array")
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn api_and_cli_manage_switch_ports_and_refuse_bad_requests() {
    prereq::require_root().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-api").or_fail("tmp dir");
    let tap = common::ifname("api");
    let dp = Daemon::start(
        dir.path(),
        "",
        &format!(
            r#"
[[port]]
name = "vm1"
type = "vhost-user"
socket = "{d}/vm1.sock"
vlan = 100
[[port]]
name = "up"
type = "tap"
ifname = "{tap}"
trunk = [100, 200]
[[port]]
name = "gen"
type = "source"
[[port]]
name = "drain"
type = "sink"
[[xconnect]]
ports = ["gen", "drain"]
"#,
            d = dir.path().display()
        ),
    );
    let sock = dp.control_socket();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .or_fail("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "control socket mode {mode:o}");

    assert!(dp.ctl_ok(&["version"]).contains("(API v1)"));
    let table = dp.ctl_ok(&["ports"]);
    for want in ["PORT", "vm1", "access 100", "trunk 100,200", "xconnect"] {
        assert!(table.contains(want), "{want:?} not in\n{table}");
    }
    assert!(dp.ctl_ok(&["pmds"]).contains("CYC/PKT"));
    assert!(dp.ctl_ok(&["macs"]).starts_with("VLAN"));
    let before = names(&dp);
    assert_eq!(before, ["vm1", "up", "gen", "drain"]);

    // Add a vhost-user port on the switch, change it, remove it.
    let vm3 = dir.join("vm3.sock");
    let out = dp.ctl_ok(&[
        "add",
        "vm3",
        "type=vhost-user",
        &format!("socket={}", vm3.display()),
        "vlan=200",
        "mac_limit=4",
    ]);
    assert!(out.contains("vm3") && out.contains("access 200"), "{out}");
    assert!(vm3.exists(), "the new port listens");
    let out = dp.ctl_ok(&["set", "vm3", "trunk=[100, 300]", "native_vlan=0"]);
    assert!(out.contains("trunk 100,300 native 0"), "{out}");
    let v: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "show", "vm3"])).or_fail("JSON");
    assert_eq!(v["vlan"]["allowed"], serde_json::json!([100, 300]));
    let shown = dp.ctl_ok(&["show", "vm3"]);
    for want in ["rx_dropped_vlan", "queue", "rx_bytes", "rx_cycles"] {
        assert!(shown.contains(want), "{want:?} not in\n{shown}");
    }
    dp.ctl_ok(&["link", "vm3", "down"]);
    let v: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "show", "vm3"])).or_fail("JSON");
    assert_eq!(v["link_up"], false, "{v}");
    assert!(dp
        .ctl_ok(&["ports"])
        .lines()
        .any(|l| l.starts_with("vm3") && l.contains(" off ")));
    dp.ctl_ok(&["link", "vm3", "up"]);
    let metrics = dp.ctl_ok(&["metrics"]);
    for want in [
        "# TYPE torii_port_rx_packets_total counter",
        "torii_port_tx_packets_total{port=\"vm3\",kind=\"vhost-user\"} 0",
        "torii_port_rxq_packets_total{port=\"vm1\",kind=\"vhost-user\",queue=\"0\"}",
        "torii_port_txq_bytes_total{port=\"vm1\",kind=\"vhost-user\",queue=\"0\"}",
        "torii_switch_mac_capacity 8192",
        "torii_pmd_busy_cycles_total{pmd=\"0\"",
    ] {
        assert!(
            metrics.contains(want),
            "{want:?} not in metrics:\n{metrics}"
        );
    }
    dp.ctl_ok(&["del", "vm3"]);
    assert!(!vm3.exists(), "the removed port's socket is gone");
    assert_eq!(names(&dp), before);

    // Bad requests: a clear error each, and nothing changes.
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["add".into(), "vm1".into(), "type=sink".into()],
            "already exists",
        ),
        (
            vec![
                "add".into(),
                "x".into(),
                "type=sink".into(),
                "vlan=4095".into(),
            ],
            "vlan 4095 is outside 1..=4094",
        ),
        (
            vec![
                "add".into(),
                "x".into(),
                "type=sink".into(),
                "colour=red".into(),
            ],
            "unknown field `colour`",
        ),
        (
            vec!["add".into(), "x".into(), "type=warp".into()],
            "unknown variant `warp`",
        ),
        (
            vec![
                "add".into(),
                "x".into(),
                "type=vhost-user".into(),
                format!("socket={}/vm1.sock", dir.path().display()),
            ],
            "used twice",
        ),
        (
            vec![
                "add".into(),
                "x".into(),
                "type=vhost-user".into(),
                "socket=/nonexistent-dir/x.sock".into(),
            ],
            "x.sock",
        ),
        (vec!["del".into(), "nope".into()], "no port named \"nope\""),
        (vec!["del".into(), "gen".into()], "cross-connected"),
        (
            vec!["set".into(), "drain".into(), "vlan=5".into()],
            "cross-connected",
        ),
        (
            vec![
                "set".into(),
                "vm1".into(),
                "vlan=5".into(),
                "trunk=[6]".into(),
            ],
            "exclude each other",
        ),
        (
            vec!["link".into(), "up".into(), "down".into()],
            "only vhost-user ports",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = dp.ctl_err(&args);
        assert!(
            err.contains(want),
            "ctl {args:?}: {err:?} should say {want:?}"
        );
        assert_eq!(names(&dp), before, "ctl {args:?} changed the ports");
    }
    assert!(
        !std::path::Path::new("/nonexistent-dir").exists(),
        "a failed add left a directory behind"
    );
    let v: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "show", "vm1"])).or_fail("JSON");
    assert_eq!(v["vlan"]["vlan"], 100, "a refused set changed vm1: {v}");

    // Raw HTTP: unknown paths and malformed bodies.
    let r = ctl::request(&sock, "GET", "/v2/ports", None).or_fail("request");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("\"error\""), "{}", r.body);
    let r = ctl::request(
        &sock,
        "PUT",
        "/v1/ports/y",
        Some(&Value::String("x".into())),
    )
    .or_fail("request");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("expected a JSON object"), "{}", r.body);
    let r = ctl::request(
        &sock,
        "PUT",
        "/v1/ports/y",
        Some(&serde_json::json!({"name": "z", "type": "sink"})),
    )
    .or_fail("request");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = ctl::request(
        &sock,
        "PUT",
        "/v1/ports/vm1/link",
        Some(&serde_json::json!({"up": 1})),
    )
    .or_fail("request");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(names(&dp), before);

    // A second daemon on the same control socket is refused and leaves the first alone.
    let other = proc_util::unique_tmp_dir("torii-api2").or_fail("tmp dir");
    let cfg = other.join("dp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\ncontrol_socket = \"{}\"\n[[port]]\nname = \"s\"\ntype = \"vhost-user\"\nsocket = \"{}/s.sock\"\n",
            sock.display(),
            other.path().display()
        ),
    )
    .or_fail("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_torii-dataplane"))
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .or_fail("second daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another daemon"), "{err}");
    assert!(
        !other.join("s.sock").exists(),
        "the refused daemon made a port"
    );
    assert_eq!(names(&dp), before);
}

/// Open file descriptors and threads of process `pid`.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let n = |p: String| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    (n(format!("/proc/{pid}/fd")), n(format!("/proc/{pid}/task")))
}

#[test]
fn sixty_four_ports_come_and_go_under_traffic() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(512).or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-churn").or_fail("tmp dir");
    let tp_sock = dir.join("tp.sock");
    // Two PMDs: the new ports are spread over both, so every add and remove also goes through
    // the PMD that does not poll the port.
    let dp = Daemon::start(
        dir.path(),
        "pmd_cpus = [0, 1]",
        &format!(
            "[[port]]\nname = \"tp\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n\
             [[port]]\nname = \"drain\"\ntype = \"sink\"\n\
             [[xconnect]]\nports = [\"tp\", \"drain\"]\n",
            tp_sock.display()
        ),
    );
    let mut tx = TestpmdBuilder::new()
        .virtio_user(&tp_sock, 1, false)
        .forward_mode(FwdMode::TxOnly)
        .pkt_size(64)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", 0)
        .spawn()
        .or_fail("starting testpmd");
    dp.wait_port("drain", Duration::from_secs(30), "traffic", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > 10_000
    });
    // Let the connection's threads and fds settle before the baseline.
    std::thread::sleep(Duration::from_secs(1));
    let base = fds_and_threads(dp.pid());
    let sent = |dp: &Daemon| dp.counter("drain", "tx_packets");

    let mut last = sent(&dp);
    let socks: Vec<_> = (0..64).map(|i| dir.join(format!("p{i}.sock"))).collect();
    for (i, s) in socks.iter().enumerate() {
        let vlan = format!("vlan={}", 1 + i % 4);
        dp.ctl_ok(&[
            "add",
            &format!("p{i}"),
            "type=vhost-user",
            &format!("socket={}", s.display()),
            &vlan,
        ]);
    }
    assert!(socks.iter().all(|s| s.exists()), "every new port listens");
    assert_eq!(names(&dp).len(), 66);
    let pmds: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "pmds"])).or_fail("JSON");
    let polled = |k: usize| pmds[k]["ports"].as_array().map_or(0, |a| a.len());
    assert_eq!(polled(0) + polled(1), 66, "{pmds}");
    assert!(
        polled(1) >= 32,
        "new ports go to the less loaded PMD: {pmds}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mid = sent(&dp);
    assert!(
        mid > last,
        "traffic stalled while ports were added: {last} -> {mid}"
    );
    last = mid;
    for i in 0..64 {
        dp.ctl_ok(&["del", &format!("p{i}")]);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let end = sent(&dp);
    assert!(
        end > last,
        "traffic stalled while ports were removed: {last} -> {end}"
    );
    assert_eq!(names(&dp), ["tp", "drain"]);
    assert!(
        socks.iter().all(|s| !s.exists()),
        "a removed port's socket is left"
    );

    // Nothing leaked: the daemon's fds and threads are back where they were (the control
    // threads of removed ports wind down asynchronously: allow them a moment).
    let settled =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            fds_and_threads(dp.pid()) == base
        });
    assert!(
        settled,
        "fds/threads before {base:?}, after {:?}",
        fds_and_threads(dp.pid())
    );
    let tp = dp.port("tp");
    assert_eq!(tp["broken_queues"], serde_json::json!([]), "{tp}");
    assert_eq!(tp["rx_dropped_invalid"], 0, "{tp}");
    tx.stop(Duration::from_secs(20)).or_fail("stopping testpmd");
}

/// Ports placed when others were still there become unbalanced when those go: removing a
/// port rebalances (by measured load, as `rebalance` does), and the traffic goes on.
#[test]
fn rebalance_evens_the_load_after_ports_leave() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-rebal").or_fail("tmp dir");
    // Four generators: s0 and s2 go to PMD 0, s1 and s3 to PMD 1; s0 and s2 send to each
    // other, s1 and s3 too (unknown once a partner is gone: flooded to the others).
    let mut body = String::new();
    for (i, peer) in [(0, 2), (1, 3), (2, 0), (3, 1)] {
        body += &format!(
            "[[port]]\nname = \"s{i}\"\ntype = \"source\"\nsrc_mac = \"02:00:00:00:00:0{i}\"\ndst_mac = \"02:00:00:00:00:0{peer}\"\n"
        );
    }
    let dp = Daemon::start(dir.path(), "pmd_cpus = [0, 1]", &body);
    let polled = |dp: &Daemon| -> Vec<Vec<String>> {
        let v: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "pmds"])).or_fail("JSON");
        v.as_array()
            .expect("pmds")
            .iter()
            .map(|p| {
                p["ports"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    };
    assert_eq!(polled(&dp), [vec!["s0", "s2"], vec!["s1", "s3"]]);
    // Four equal loads: whatever a rebalance does (the first seconds' measurements are
    // noisy), it leaves two on each PMD.
    std::thread::sleep(Duration::from_millis(1500));
    dp.ctl_ok(&["rebalance"]);
    let now = polled(&dp);
    assert_eq!((now[0].len(), now[1].len()), (2, 2), "{now:?}");
    // The two on PMD 1 leave: PMD 0 would keep two loaded ports and PMD 1 none, so the
    // removal rebalances by itself.
    for p in &now[1] {
        dp.ctl_ok(&["del", p]);
    }
    let after = polled(&dp);
    assert_eq!((after[0].len(), after[1].len()), (1, 1), "{after:?}");
    // The two left keep loading each other across the two PMDs.
    let (x, y) = (after[0][0].clone(), after[1][0].clone());
    let tx = |dp: &Daemon, p: &str| dp.counter(p, "tx_packets");
    let (a0, b0) = (tx(&dp, &x), tx(&dp, &y));
    std::thread::sleep(Duration::from_millis(2500));
    let (a1, b1) = (tx(&dp, &x), tx(&dp, &y));
    assert!(a1 > a0 && b1 > b0, "{x} {a0} -> {a1}, {y} {b0} -> {b1}");
    let v: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "show", &x])).or_fail("JSON");
    assert!(v["rxq_cycles"][0].as_u64().unwrap_or(0) > 0, "{v}");
    // Balanced now: nothing to move.
    let out = dp.ctl_ok(&["rebalance"]);
    assert!(out.contains("nothing moved"), "{out} {:?}", polled(&dp));
}
