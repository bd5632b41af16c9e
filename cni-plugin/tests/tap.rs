//! The tap mode against the real kernel and a real VM: torii-cni makes a multiqueue tap in a
//! pod's network namespace, tc-redirected to a veth on a host bridge; QEMU (TCG), started in
//! that namespace as a VM launcher starts it, opens the tap with two queues; the guest, given
//! the address IPAM chose, and the host ping each other across the bridge. ADD, CHECK and DEL
//! in every version, STATUS and GC; DEL after the pod's namespace went; ADDs that cannot be done (the pod has
//! an interface of that name, the bridge name is taken by something else) leave nothing.

mod common;

use std::time::Duration;

use common::{prerequisites, Rig};
use serde_json::{json, Value};
use torii_perf::guest::GuestBuilder;
use torii_perf::proc_util;
use torii_perf::OrFail;

const T: Duration = Duration::from_secs(60);

/// The rig's configuration in tap mode on `bridge`, two queues.
fn tap_conf(r: &Rig, version: &str, bridge: &str) -> Value {
    let mut c = r.conf(version);
    c["mode"] = json!("tap");
    c["bridge"] = json!(bridge);
    c["queues"] = json!(2);
    c["mtu"] = json!(1400);
    c
}

/// `ip` output, or "" when the command fails.
fn ip(args: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("ip {args}")])
        .output()
        .or_fail("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The links of namespace `ns` (a /run/netns path), names only.
fn pod_links(ns: &str) -> Vec<String> {
    let name = ns.trim_start_matches("/run/netns/");
    ip(&format!("-n {name} -o link show"))
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

/// The bridge's ports on the host.
fn bridge_ports(bridge: &str) -> Vec<String> {
    ip(&format!("-o link show master {bridge}"))
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

#[test]
fn tap_mode_wires_a_vm_to_the_host_bridge() {
    prerequisites();
    torii_perf::prereq::require_qemu().or_fail("prerequisite");
    torii_perf::prereq::guest_image().or_fail("prerequisite");
    let mut r = Rig::start("torii-cni-tap", "");
    let bridge = Bridge(format!("ttb{}", std::process::id() % 100_000));
    let br = bridge.0.clone();

    // ADD, CHECK, DEL in every version, no VM: the links as promised, nothing left after.
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let ns = r.netns();
        let conf = tap_conf(&r, version, &br);
        let add = r.cni("ADD", Some("c0"), Some("net1"), Some(&ns), &conf);
        assert!(add.ok, "{version} ADD: {add:?}");
        let res = &add.json;
        let host_veth = res["interfaces"][0]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(host_veth.starts_with("tvh"), "{res}");
        assert!(res["interfaces"][0].get("sandbox").is_none(), "{res}");
        assert_eq!(res["interfaces"][1]["name"], "net1", "{res}");
        assert_eq!(res["interfaces"][1]["sandbox"], ns.as_str(), "{res}");
        assert_eq!(res["ips"][0]["interface"], 1, "{res}");
        let links = pod_links(&ns);
        assert!(links.iter().any(|l| l == "net1"), "{links:?}");
        assert!(links.iter().any(|l| l.starts_with("tvp")), "{links:?}");
        let tap = ip(&format!(
            "-n {} -d link show net1",
            ns.trim_start_matches("/run/netns/")
        ));
        assert!(
            tap.contains("tun type tap") && tap.contains("multi_queue") && tap.contains("mtu 1400"),
            "{tap}"
        );
        assert_eq!(bridge_ports(&br), vec![host_veth.clone()]);
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = res.clone();
        let check = r.cni("CHECK", Some("c0"), Some("net1"), Some(&ns), &check_conf);
        assert!(check.ok, "{version} CHECK: {check:?}");
        if version == "1.1.0" {
            // Without its redirect the tap carries nothing: CHECK says so.
            let name = ns.trim_start_matches("/run/netns/");
            proc_util::sh(&format!("tc -n {name} qdisc del dev net1 ingress"));
            let check = r.cni("CHECK", Some("c0"), Some("net1"), Some(&ns), &check_conf);
            assert!(
                !check.ok && check.stdout.contains("net1: its frames are not redirected"),
                "{check:?}"
            );
        }
        let del = r.cni("DEL", Some("c0"), Some("net1"), Some(&ns), &check_conf);
        assert!(del.ok, "{version} DEL: {del:?}");
        assert_eq!(pod_links(&ns), vec!["lo".to_string()]);
        assert!(bridge_ports(&br).is_empty());
        assert!(r.files("pods").is_empty() && r.files("state/tnet").is_empty());
        assert!(r.ipam_leases().is_empty());
        let del2 = r.cni("DEL", Some("c0"), Some("net1"), Some(&ns), &conf);
        assert!(del2.ok, "{version} second DEL: {del2:?}");
    }

    // STATUS needs no data plane in this mode; GC removes what is not in valid-attachments.
    let conf = tap_conf(&r, "1.1.0", &br);
    let status = r.cni("STATUS", None, None, None, &conf);
    assert!(status.ok, "STATUS: {status:?}");
    let (ns_keep, ns_stale) = (r.netns(), r.netns());
    assert!(
        r.cni("ADD", Some("keep"), Some("net1"), Some(&ns_keep), &conf)
            .ok
    );
    assert!(
        r.cni("ADD", Some("stale"), Some("net1"), Some(&ns_stale), &conf)
            .ok
    );
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "net1"}]);
    let out = r.cni("GC", None, None, None, &gc);
    assert!(out.ok, "GC: {out:?}");
    assert_eq!(pod_links(&ns_stale), vec!["lo".to_string()]);
    assert_eq!(bridge_ports(&br).len(), 1);
    assert_eq!(r.ipam_leases().len(), 1);
    assert!(
        r.cni("DEL", Some("keep"), Some("net1"), Some(&ns_keep), &conf)
            .ok
    );
    assert!(bridge_ports(&br).is_empty() && r.ipam_leases().is_empty());

    // A VM on it: QEMU in the pod's namespace opens the tap with two queues; the guest and
    // the host (the gateway address on the bridge) ping each other.
    let ns = r.netns();
    let add = r.cni("ADD", Some("vm1"), Some("net1"), Some(&ns), &conf);
    assert!(add.ok, "ADD: {add:?}");
    let guest_ip = add.json["ips"][0]["address"]
        .as_str()
        .expect("an address")
        .to_string();
    let mac = add.json["interfaces"][1]["mac"]
        .as_str()
        .expect("a MAC")
        .to_string();
    let pod_file: Value = serde_json::from_str(
        &std::fs::read_to_string(
            r.files("pods")
                .iter()
                .find(|f| f.ends_with("net1.json"))
                .expect("the pod network file"),
        )
        .or_fail("pod file"),
    )
    .or_fail("pod file JSON");
    assert_eq!(pod_file["type"], "tap", "{pod_file}");
    assert_eq!(pod_file["tap"], "net1", "{pod_file}");
    assert_eq!(pod_file["queues"], 2, "{pod_file}");
    assert_eq!(pod_file["mac"], mac.as_str(), "{pod_file}");
    proc_util::sh(&format!("ip addr add 10.77.0.1/24 dev {br}"));
    let mut g = GuestBuilder::new()
        .memory_mib(256)
        .netns(&ns)
        .net_tap("net1", &mac, 2)
        .spawn()
        .or_fail("starting QEMU in the pod's namespace");
    g.wait_ready(Duration::from_secs(90)).or_fail("guest boot");
    let attached = ip(&format!(
        "-n {} -d link show net1",
        ns.trim_start_matches("/run/netns/")
    ));
    // Both queues attached; the guest, with one vCPU, uses one pair and QEMU disables the
    // other.
    let count = |key: &str| -> u32 {
        let mut words = attached.split_whitespace();
        words
            .find(|w| *w == key)
            .and_then(|_| words.next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        count("numqueues") + count("numdisabled"),
        2,
        "QEMU did not open both queues: {attached}"
    );
    g.run_ok(
        &format!("ip link set eth0 mtu 1400 up && ip addr add {guest_ip} dev eth0"),
        T,
    )
    .or_fail("guest address");
    let out = g
        .run(
            "i=0; until ping -c 1 -W 2 10.77.0.1 >/dev/null; do i=$((i+1)); [ $i -ge 15 ] && break; done; ping -c 3 -W 2 10.77.0.1",
            T,
        )
        .or_fail("ping from the guest");
    assert!(
        out.stdout.contains(" 0% packet loss"),
        "guest -> host: {}",
        out.stdout
    );
    let addr = guest_ip.split('/').next().unwrap_or_default();
    let host_ping = std::process::Command::new("ping")
        .args(["-c", "3", "-W", "2", addr])
        .output()
        .or_fail("ping");
    assert!(
        host_ping.status.success(),
        "host -> guest: {}",
        String::from_utf8_lossy(&host_ping.stdout)
    );
    g.poweroff(T).or_fail("guest poweroff");
    let del = r.cni("DEL", Some("vm1"), Some("net1"), Some(&ns), &conf);
    assert!(del.ok, "DEL: {del:?}");
    assert_eq!(pod_links(&ns), vec!["lo".to_string()]);
    assert!(bridge_ports(&br).is_empty());

    // The pod's namespace goes first: the kernel takes the tap and both veth ends with it;
    // DEL releases the address and the record.
    let ns = r.netns();
    let add = r.cni("ADD", Some("gone"), Some("net1"), Some(&ns), &conf);
    assert!(add.ok, "ADD: {add:?}");
    proc_util::sh(&format!(
        "ip netns del {}",
        ns.trim_start_matches("/run/netns/")
    ));
    let del = r.cni("DEL", Some("gone"), Some("net1"), None, &conf);
    assert!(del.ok, "DEL after the namespace: {del:?}");
    assert!(bridge_ports(&br).is_empty());
    assert!(r.files("pods").is_empty() && r.files("state/tnet").is_empty());
    assert!(r.ipam_leases().is_empty());

    // ADDs that cannot be done change nothing: the pod has an interface of the tap's name
    // (another plugin's: it stays), or the bridge's name is taken by something else.
    let ns = r.netns();
    let name = ns.trim_start_matches("/run/netns/").to_string();
    proc_util::sh(&format!("ip -n {name} tuntap add net1 mode tap"));
    let host_links = ip("-o link show").lines().count();
    let add = r.cni("ADD", Some("clash"), Some("net1"), Some(&ns), &conf);
    assert_eq!(add.code(), Some(7), "{add:?}");
    assert!(
        add.stdout.contains("already has an interface net1"),
        "{add:?}"
    );
    // The runtime's DEL after the failed ADD (no record) leaves the other tap alone.
    let del = r.cni("DEL", Some("clash"), Some("net1"), Some(&ns), &conf);
    assert!(del.ok, "{del:?}");
    assert!(
        pod_links(&ns).iter().any(|l| l == "net1"),
        "another plugin's tap was deleted"
    );
    let other = format!("ttd{}", std::process::id() % 100_000);
    proc_util::sh(&format!("ip link add {other} type veth peer name {other}p"));
    let _other = Bridge(other.clone());
    let bad = tap_conf(&r, "1.1.0", &other);
    let add = r.cni("ADD", Some("clash"), Some("net2"), Some(&ns), &bad);
    assert_eq!(add.code(), Some(101), "{add:?}");
    assert!(add.stdout.contains("is not a bridge"), "{add:?}");
    assert_eq!(pod_links(&ns).len(), 2, "{:?}", pod_links(&ns));
    // An IPAM plugin that is not there: code 50 (not available), before anything is made.
    let mut no_ipam = tap_conf(&r, "1.1.0", &br);
    no_ipam["ipam"]["type"] = json!("no-such-ipam");
    let add = r.cni("ADD", Some("clash"), Some("net3"), Some(&ns), &no_ipam);
    assert_eq!(add.code(), Some(50), "{add:?}");
    assert_eq!(pod_links(&ns).len(), 2, "{:?}", pod_links(&ns));
    // Nothing new on the host but the test's own veth pair.
    assert_eq!(ip("-o link show").lines().count(), host_links + 2);
    assert!(r.files("pods").is_empty() && r.files("state/tnet").is_empty());
    assert!(r.ipam_leases().is_empty());
}
