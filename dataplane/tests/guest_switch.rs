//! The L2 switch with VLANs, end to end: QEMU (TCG) guest A on a vhost-user access port of
//! VLAN 100, guest B on a vhost-user trunk carrying VLANs 100 and 200 tagged (its kernel has a
//! VLAN interface for each), and a host tap on VLAN 200 (in a network namespace made for the
//! test).
//!
//! - A and B ping each other: A sends untagged, the switch tags towards B's trunk and pops
//!   B's tags towards A (B's kernel only delivers tagged frames to its VLAN interfaces);
//! - the VLAN 200 tap reaches B's VLAN 200 interface;
//! - A cannot reach the VLAN 200 tap although both are on the same IP subnet.

mod common;

use std::time::Duration;

use common::{Daemon, Netns, OrFail};
use torii_perf::{prereq, proc_util};

const A_IP: &str = "10.253.0.1";
/// Guest B's VLAN 100 interface.
const B100_IP: &str = "10.253.0.2";
/// The VLAN 200 tap, on the same subnet as VLAN 100.
const TAP_IP: &str = "10.253.0.3";
/// VLAN 200's own subnet: the tap and guest B's VLAN 200 interface.
const TAP_NET200_IP: &str = "10.254.0.3";
const B200_IP: &str = "10.254.0.2";

fn config(a: &std::path::Path, b: &std::path::Path, tap: &str, a_queues: u16) -> String {
    format!(
        r#"
[switch]
mac_table_size = 1024
[[port]]
name = "vm-a"
type = "vhost-user"
socket = "{}"
mac = "52:54:00:53:00:01"
queues = {a_queues}
vlan = 100
mac_limit = 4
[[port]]
name = "vm-b"
type = "vhost-user"
socket = "{}"
mac = "52:54:00:53:00:02"
trunk = [100, 200]
[[port]]
name = "v200"
type = "tap"
ifname = "{tap}"
vlan = 200
"#,
        a.display(),
        b.display()
    )
}

#[test]
fn guests_on_vlans_ping_and_stay_isolated() {
    let _lock = torii_perf::heavy_test_lock();
    vlans_ping_and_stay_isolated("", &[]);
}

/// The same with two PMDs. Guest A has two queue pairs (and two vCPUs, so that its driver
/// enables both): its queues are spread over both PMDs; guest B's port goes to PMD 0 and the
/// tap to PMD 1, the least loaded at the time. Packets between ports on different PMDs go
/// through the destination's inbox (and wake a PMD that sleeps: adaptive mode).
#[test]
fn guests_on_two_pmds_reach_each_other() {
    let _lock = torii_perf::heavy_test_lock();
    vlans_ping_and_stay_isolated(
        "pmd_cpus = [0, 1]",
        &[("vm-a[0]", 0), ("vm-a[1]", 1), ("vm-b", 0), ("v200", 1)],
    );
}

fn vlans_ping_and_stay_isolated(dataplane: &str, placement: &[(&str, u64)]) {
    // With two PMDs, guest A has two queue pairs.
    let a_queues: u16 = if placement.is_empty() { 1 } else { 2 };
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-switch").or_fail("tmp dir");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let tap = common::ifname("v2");
    let dp = Daemon::start(dir.path(), dataplane, &config(&sa, &sb, &tap, a_queues));

    let ns = Netns::new("v200");
    ns.adopt(&tap, &format!("{TAP_IP}/24"));
    ns.exec(&format!("ip addr add {TAP_NET200_IP}/24 dev {tap}"));

    let mut a = common::boot_guest(
        &sa,
        "52:54:00:53:00:01",
        &format!("{A_IP}/24"),
        a_queues,
        u32::from(a_queues),
        &[],
    );
    let mut b = common::boot_guest(&sb, "52:54:00:53:00:02", "10.255.0.2/24", 1, 1, &[]);
    b.run_ok(
        &format!(
            "vconfig add eth0 100 && vconfig add eth0 200 \
             && ip addr add {B100_IP}/24 dev eth0.100 && ip link set eth0.100 up \
             && ip addr add {B200_IP}/24 dev eth0.200 && ip link set eth0.200 up"
        ),
        Duration::from_secs(30),
    )
    .or_fail("VLAN interfaces in guest B");

    // VLAN 100: untagged on A's access port, tagged on B's trunk.
    common::ping_from(&mut a, B100_IP);
    common::ping_from(&mut b, A_IP);
    // VLAN 200: the access tap and B's trunk.
    common::ping_from(&mut b, TAP_NET200_IP);
    let out = ns.exec(&format!("ping -c 3 -W 2 {B200_IP}"));
    assert!(
        out.contains(" 0% packet loss"),
        "VLAN 200 to the trunk:\n{out}"
    );

    // Isolation: same subnet, other VLAN.
    let out = a
        .run(&format!("ping -c 3 -W 1 {TAP_IP}"), Duration::from_secs(30))
        .or_fail("ping across VLANs");
    assert!(
        out.stdout.contains("100% packet loss"),
        "guest A (VLAN 100) reached the VLAN 200 tap:\n{}",
        out.stdout
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ping", "-c", "3", "-W", "1", A_IP,
        ])
        .output()
        .or_fail("ping");
    assert!(
        !out.status.success(),
        "the VLAN 200 tap reached guest A (VLAN 100):\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // B's VLAN interfaces received frames: they arrived tagged, each with its VLAN.
    for v in ["eth0.100", "eth0.200"] {
        let n = b
            .run_ok(
                &format!("cat /sys/class/net/{v}/statistics/rx_packets"),
                Duration::from_secs(10),
            )
            .or_fail("VLAN counters");
        assert!(
            n.trim().parse::<u64>().unwrap_or(0) > 0,
            "{v} received nothing"
        );
    }

    // The report: MACs learned per port and in total, VLAN settings, nothing dropped by VLAN
    // on the guests' ports.
    std::thread::sleep(Duration::from_millis(1500)); // the report is written once a second
    let r = dp.report();
    let port = |name: &str| dp.port(name);
    assert_eq!(port("vm-a")["macs"], 1, "{r}");
    assert_eq!(port("vm-a")["vlan"]["vlan"], 100, "{r}");
    assert_eq!(port("vm-b")["vlan"]["mode"], "trunk", "{r}");
    assert_eq!(
        port("vm-b")["vlan"]["allowed"],
        serde_json::json!([100, 200]),
        "{r}"
    );
    assert_eq!(port("vm-a")["rx_dropped_vlan"], 0, "{r}");
    // A and B on VLAN 100; B and the tap on VLAN 200.
    assert!(r["switch"]["mac_entries"].as_u64().unwrap_or(0) >= 4, "{r}");
    assert!(r["switch"]["learned"].as_u64().unwrap_or(0) >= 4, "{r}");
    assert!(port("vm-b")["tx_packets"].as_u64().unwrap_or(0) > 0, "{r}");
    for (name, pmd) in placement {
        let on = r["pmds"][*pmd as usize]["ports"].clone();
        assert!(
            on.as_array().is_some_and(|a| a.iter().any(|p| p == name)),
            "{name} should be polled by PMD {pmd}: {r}"
        );
    }
}
