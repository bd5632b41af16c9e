//! Attachments at work and at scale: two pods' vhost-user interfaces carry dpdk-testpmd
//! traffic through the data plane's switch; 1000 ADD/DEL cycles leak no port, socket, file,
//! address, descriptor or thread; 32 parallel ADDs never share an address.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{prerequisites, OrFail, Rig};
use serde_json::Value;
use torii_perf::testpmd::{FwdMode, Testpmd, TestpmdBuilder};
use torii_perf::{prereq, proc_util};

fn frontend(sock: &str, mode: FwdMode, main_lcore: u32) -> Testpmd {
    TestpmdBuilder::new()
        .virtio_user(sock, 1, false)
        .forward_mode(mode)
        .pkt_size(64)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", main_lcore)
        .spawn()
        .or_fail("starting testpmd")
}

fn port_counter(r: &Rig, port: &str, field: &str) -> u64 {
    torii_dataplane::ctl::request(
        &r.control_socket(),
        "GET",
        &format!("/v1/ports/{port}"),
        None,
    )
    .ok()
    .and_then(|resp| serde_json::from_str::<Value>(&resp.body).ok())
    .and_then(|v| v[field].as_u64())
    .unwrap_or(0)
}

#[test]
fn two_pods_exchange_packets_over_their_vhost_user_attachments() {
    prerequisites();
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(512).or_fail("prerequisite");
    let _heavy = torii_perf::heavy_test_lock();
    let mut r = Rig::start("torii-cni-e2e", "");
    let conf = r.conf("1.1.0");
    let (ns_a, ns_b) = (r.netns(), r.netns());
    let a = r.cni("ADD", Some("poda"), Some("net1"), Some(&ns_a), &conf);
    let b = r.cni("ADD", Some("podb"), Some("net1"), Some(&ns_b), &conf);
    assert!(a.ok && b.ok, "{a:?}\n{b:?}");
    let sock = |o: &common::Out| {
        o.json["interfaces"][0]["socketPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ports = r.ports();
    let port_of = |cid: &str| ports.iter().find(|p| p.starts_with(cid)).unwrap().clone();
    let (pa, pb) = (port_of("poda"), port_of("podb"));

    let mut rx = frontend(&sock(&b), FwdMode::RxOnly, 1);
    let mut tx = frontend(&sock(&a), FwdMode::TxOnly, 0);
    let flowing =
        proc_util::wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            port_counter(&r, &pb, "tx_packets") > 10_000
        });
    let sent = tx
        .stop(Duration::from_secs(20))
        .or_fail("stopping the sender");
    let got = rx
        .stop(Duration::from_secs(20))
        .or_fail("stopping the receiver");
    assert!(
        flowing,
        "no traffic from {pa} to {pb}: a rx {} b tx {}",
        port_counter(&r, &pa, "rx_packets"),
        port_counter(&r, &pb, "tx_packets")
    );
    assert!(
        sent.tx_packets > 0 && got.rx_packets > 0,
        "{sent:?} {got:?}"
    );
    assert!(got.rx_packets <= sent.tx_packets);

    for (cid, ns) in [("poda", &ns_a), ("podb", &ns_b)] {
        assert!(r.cni("DEL", Some(cid), Some("net1"), Some(ns), &conf).ok);
    }
    assert!(r.ports().is_empty());
    assert!(r.files("pods").is_empty());
}

fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).map(|rd| rd.count()).unwrap_or(0);
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn a_thousand_add_del_cycles_leak_nothing() {
    prerequisites();
    let _heavy = torii_perf::heavy_test_lock();
    let mut r = Rig::start("torii-cni-cycles", "");
    let conf = r.conf("1.1.0");
    let ns = r.netns();
    // One cycle first, so that whatever the data plane sets up once is there before counting.
    assert!(
        r.cni("ADD", Some("warm"), Some("net1"), Some(&ns), &conf)
            .ok
    );
    assert!(
        r.cni("DEL", Some("warm"), Some("net1"), Some(&ns), &conf)
            .ok
    );
    let before = fds_and_threads(r.dataplane_pid());
    let netns_before = std::fs::read_dir("/run/netns")
        .map(|d| d.count())
        .unwrap_or(0);
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for i in 0..1000 {
        let cid = format!("cycle{i}");
        let t0 = Instant::now();
        let a = r.cni("ADD", Some(&cid), Some("net1"), Some(&ns), &conf);
        adds.push(t0.elapsed());
        assert!(a.ok, "cycle {i} ADD: {a:?}");
        let t0 = Instant::now();
        let d = r.cni("DEL", Some(&cid), Some("net1"), Some(&ns), &conf);
        dels.push(t0.elapsed());
        assert!(d.ok, "cycle {i} DEL: {d:?}");
    }
    assert!(r.ports().is_empty(), "ports left: {:?}", r.ports());
    assert!(r.files("pods").is_empty(), "{:?}", r.files("pods"));
    assert!(
        r.files("state/tnet").is_empty(),
        "{:?}",
        r.files("state/tnet")
    );
    assert!(r.ipam_leases().is_empty(), "{:?}", r.ipam_leases());
    let netns_after = std::fs::read_dir("/run/netns")
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(netns_before, netns_after, "network namespaces left");
    // Ports leave asynchronously (their threads are joined): give them a moment.
    let settled =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            fds_and_threads(r.dataplane_pid()) == before
        });
    assert!(
        settled,
        "data plane fds/threads {before:?} before, {:?} after",
        fds_and_threads(r.dataplane_pid())
    );
    adds.sort();
    dels.sort();
    // Timings are reported, not asserted (docs/perf.md records them).
    eprintln!(
        "CNI vhost-user ADD: median {:?} p99 {:?}; DEL: median {:?} p99 {:?} (1000 cycles, host-local IPAM)",
        percentile(&adds, 0.5),
        percentile(&adds, 0.99),
        percentile(&dels, 0.5),
        percentile(&dels, 0.99)
    );
}

#[test]
fn parallel_adds_never_share_an_address() {
    prerequisites();
    let _heavy = torii_perf::heavy_test_lock();
    let mut r = Rig::start("torii-cni-par", "");
    let conf = Arc::new(r.conf("1.1.0"));
    let ns = Arc::new(r.netns());
    let r = Arc::new(r);
    let run = |command: &'static str| {
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let (r, conf, ns) = (r.clone(), conf.clone(), ns.clone());
                std::thread::spawn(move || {
                    r.cni(
                        command,
                        Some(&format!("par{i}")),
                        Some("net1"),
                        Some(&ns),
                        &conf,
                    )
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("CNI thread"))
            .collect::<Vec<_>>()
    };
    let adds = run("ADD");
    let mut ips: Vec<String> = adds
        .iter()
        .map(|o| {
            assert!(o.ok, "{o:?}");
            o.json["ips"][0]["address"].as_str().unwrap().to_string()
        })
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 32, "addresses shared: {ips:?}");
    let mut socks: Vec<String> = adds
        .iter()
        .map(|o| {
            o.json["interfaces"][0]["socketPath"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    socks.sort();
    socks.dedup();
    assert_eq!(socks.len(), 32);
    assert_eq!(r.ports().len(), 32);
    for d in run("DEL") {
        assert!(d.ok, "{d:?}");
    }
    assert!(r.ports().is_empty());
    assert!(r.ipam_leases().is_empty());
    assert!(r.files("state/tnet").is_empty());
}
