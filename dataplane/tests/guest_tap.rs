//! A QEMU (TCG) guest's virtio-net on a Torii vhost-user port, cross-connected to a Torii tap
//! on the host (inside a network namespace made for the test): ping both ways, TCP transfers
//! both ways with checksum offload and TSO negotiated, two queue pairs, and the guest
//! reconnecting after a daemon restart.

mod common;

use std::time::Duration;

use common::{Daemon, Netns, OrFail};
use torii_perf::guest::Guest;
use torii_perf::{prereq, proc_util};

const HOST_IP: &str = "10.251.0.1";
const GUEST_IP: &str = "10.251.0.2";
const HOST_IP6: &str = "fd00:251::1";
const GUEST_IP6: &str = "fd00:251::2";
const MAC: &str = "52:54:00:12:34:56";
const T: Duration = Duration::from_secs(30);

fn prerequisites() {
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
}

fn config(sock: &std::path::Path, tap: &str, queues: u16) -> String {
    format!(
        r#"
[[port]]
name = "vm"
type = "vhost-user"
socket = "{}"
queues = {queues}
mac = "{MAC}"
[[port]]
name = "tap"
type = "tap"
ifname = "{tap}"
queues = {queues}
[[xconnect]]
ports = ["vm", "tap"]
"#,
        sock.display()
    )
}

fn boot(sock: &std::path::Path, queues: u16, smp: u32) -> Guest {
    common::boot_guest(sock, MAC, &format!("{GUEST_IP}/24"), queues, smp, &[])
}

fn ping_from_guest(g: &mut Guest) {
    common::ping_from(g, HOST_IP);
}

#[test]
fn guest_and_host_tap_ping_tcp_offloads_and_multiqueue() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-guest").or_fail("tmp dir");
    let sock = dir.join("vm.sock");
    let tap = common::ifname("g");
    let dp = Daemon::start(dir.path(), "", &config(&sock, &tap, 2));
    let ns = Netns::new("g");
    ns.adopt(&tap, &format!("{HOST_IP}/24"));

    let mut g = boot(&sock, 2, 2);
    dp.wait_port("vm", T, "guest connected", |p| p["connected"] == true);

    // Negotiated features (virtio 1.2 §5.1.3), as the guest driver sees them.
    let feats = g
        .run_ok("cat /sys/class/net/eth0/device/features", T)
        .or_fail("features");
    let bit = |b: usize| feats.as_bytes().get(b) == Some(&b'1');
    for (b, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (8, "GUEST_TSO6"),
        (12, "HOST_TSO6"),
        (15, "MRG_RXBUF"),
        (16, "STATUS"),
        (22, "MQ"),
        (29, "EVENT_IDX"),
        (32, "VERSION_1"),
    ] {
        assert!(bit(b), "feature {name} (bit {b}) not negotiated: {feats}");
    }
    let queues = g
        .run_ok("ls /sys/class/net/eth0/queues", T)
        .or_fail("queues");
    for q in ["rx-0", "rx-1", "tx-0", "tx-1"] {
        assert!(queues.contains(q), "guest has no {q}: {queues}");
    }

    // Ping both ways, from both guest CPUs so both TX queues carry traffic (XPS maps CPU n
    // to queue n).
    ping_from_guest(&mut g);
    g.run_ok(
        &format!("taskset 1 ping -c 2 -W 2 {HOST_IP} && taskset 2 ping -c 2 -W 2 {HOST_IP}"),
        T,
    )
    .or_fail("ping from each guest CPU");
    ns.exec(&format!("ping -c 3 -W 2 {GUEST_IP}"));

    // Guest → host: 4 MiB of random data over TCP, compared by SHA-256.
    common::upload_from_guest(&mut g, &ns.name, HOST_IP, 5001, 64);

    // Host → guest: 4 MiB the other way.
    common::download_to_guest(&mut g, &ns.name, GUEST_IP, 5002);

    // IPv6 (TSO6 from the guest): 2 MiB guest → host, compared by SHA-256.
    ns.exec(&format!("ip -6 addr add {HOST_IP6}/64 dev {tap} nodad"));
    g.run_ok(
        &format!("echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad && ip -6 addr add {GUEST_IP6}/64 dev eth0"),
        T,
    )
        .or_fail("guest IPv6 address");
    common::upload_from_guest(&mut g, &ns.name, HOST_IP6, 5003, 32);

    // TSO both ways: unsegmented super-frames crossed the port in each direction.
    let vm = dp.wait_settled("vm");
    assert!(
        vm["rx_gso_packets"].as_u64().unwrap() > 0,
        "no TSO from the guest: {vm}"
    );
    assert!(
        vm["tx_gso_packets"].as_u64().unwrap() > 0,
        "no TSO to the guest: {vm}"
    );
    // Both guest TX queues were used, and the per-queue counters add up.
    for k in ["rxq_packets", "rxq_bytes"] {
        let per_q = vm[k].as_array().unwrap();
        assert!(
            per_q.iter().all(|c| c.as_u64().unwrap() > 0),
            "a queue pair carried nothing: {vm}"
        );
    }
    let sum = |k: &str| -> u64 {
        vm[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("rxq_bytes"), vm["rx_bytes"].as_u64().unwrap(), "{vm}");
    assert_eq!(sum("txq_bytes"), vm["tx_bytes"].as_u64().unwrap(), "{vm}");
    assert_eq!(vm["rx_dropped_invalid"], 0);
    assert_eq!(vm["broken_queues"], serde_json::json!([]));
    g.poweroff(T).or_fail("poweroff");
}

#[test]
fn guest_reconnects_after_daemon_restart_and_new_guest_after_crash() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-guest-rc").or_fail("tmp dir");
    let sock = dir.join("vm.sock");
    let tap = common::ifname("r");
    let mut dp = Daemon::start(dir.path(), "", &config(&sock, &tap, 1));
    let ns = Netns::new("r");
    ns.adopt(&tap, &format!("{HOST_IP}/24"));
    let mut g = boot(&sock, 1, 1);
    ping_from_guest(&mut g);

    // Driver reset without a new connection (what a guest reboot does to the device): the
    // frontend stops the rings (GET_VRING_BASE) and sets them up again.
    g.run_ok(
        &format!(
            "rmmod virtio_net && insmod /mods/virtio_net.ko && sleep 1 && ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0"
        ),
        T,
    )
    .or_fail("reloading virtio_net");
    ping_from_guest(&mut g);
    assert_eq!(dp.counter("vm", "connections"), 1);

    // Daemon restart: QEMU (reconnect-ms) comes back by itself. The tap is the daemon's, so
    // it is made again and handed to the namespace again.
    dp.restart();
    ns.adopt(&tap, &format!("{HOST_IP}/24"));
    dp.wait_port("vm", T, "QEMU reconnected", |p| p["connected"] == true);
    ping_from_guest(&mut g);
    ns.exec(&format!("ping -c 2 -W 2 {GUEST_IP}"));

    // The VM dies; a new one on the same socket works.
    drop(g);
    dp.wait_port("vm", T, "disconnect noticed", |p| p["connected"] == false);
    let mut g = boot(&sock, 1, 1);
    ping_from_guest(&mut g);
    assert_eq!(dp.counter("vm", "connections"), 2);
    g.poweroff(T).or_fail("poweroff");
}
