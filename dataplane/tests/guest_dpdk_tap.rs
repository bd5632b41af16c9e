//! A QEMU (TCG) guest's virtio-net on a Torii vhost-user port, cross-connected to a DPDK
//! `net_tap` port whose kernel interface is in a network namespace: TCP both ways, checked by
//! SHA-256, with the guest's checksum and TSO requests carried to DPDK as mbuf offload flags
//! (net_tap segments and checksums them) instead of being done by Torii in software: first
//! with `lend_tx = true` (the guest's frames lent to DPDK as external buffers), then with the
//! default (copied into mbuf chains).

mod common;

use std::time::Duration;

use common::{Daemon, Netns, OrFail};
use torii_perf::{prereq, proc_util};

const HOST_IP: &str = "10.252.0.1";
const GUEST_IP: &str = "10.252.0.2";
const MAC: &str = "52:54:00:12:34:57";
const T: Duration = Duration::from_secs(30);

fn config(sock: &std::path::Path, tap: &str, lend_tx: bool) -> String {
    format!(
        "[dpdk]\nmemory_mib = 256\n[[port]]\nname = \"vm\"\ntype = \"vhost-user\"\nsocket = \"{}\"\nmac = \"{MAC}\"\n[[port]]\nname = \"tap\"\ntype = \"dpdk\"\ndevice = \"net_tap0,iface={tap}\"\nlend_tx = {lend_tx}\n[[xconnect]]\nports = [\"vm\", \"tap\"]\n",
        sock.display()
    )
}

/// The guest's super-frames went to DPDK whole, with segmentation and checksum requests.
fn offloads_carried(dp: &Daemon) {
    let vm = dp.wait_settled("vm");
    let port = dp.wait_settled("tap");
    assert!(
        vm["rx_gso_packets"].as_u64().unwrap() > 0,
        "no TSO from the guest: {vm}"
    );
    assert!(
        port["tx_gso_packets"].as_u64().unwrap() > 0,
        "no TSO request to DPDK: {port}"
    );
    assert_eq!(port["sw_gso"], 0, "segmented in software: {port}");
    assert_eq!(port["tx_dropped_offload"], 0, "{port}");
    assert_eq!(port["tx_errors"], 0, "{port}");
}

#[test]
fn guest_tcp_through_a_dpdk_tap_port_with_offloads() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
    prereq::require_hugepages(128).or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-gdt").or_fail("tmp dir");
    let sock = dir.join("vm.sock");
    let tap = common::ifname("gd");
    let dp = Daemon::start(dir.path(), "", &config(&sock, &tap, true));
    let ns = Netns::new("gd");
    ns.adopt(&tap, &format!("{HOST_IP}/24"));
    let mut g = common::boot_guest(&sock, MAC, &format!("{GUEST_IP}/24"), 1, 1, &[]);
    dp.wait_port("vm", T, "guest connected", |p| p["connected"] == true);
    common::ping_from(&mut g, HOST_IP);

    // Guest → host: 4 MiB over TCP (TSO4 super-frames from the guest).
    common::upload_from_guest(&mut g, &ns.name, HOST_IP, 5001, 64);

    // Host → guest: 4 MiB the other way.
    common::download_to_guest(&mut g, &ns.name, GUEST_IP, 5002);

    offloads_carried(&dp);

    // Copies instead of loans (the default): a new daemon on the same socket (the guest reconnects), its
    // tap moved into the namespace again.
    drop(dp);
    let dir2 = proc_util::unique_tmp_dir("torii-gdt2").or_fail("tmp dir");
    let dp = Daemon::start(dir2.path(), "", &config(&sock, &tap, false));
    ns.adopt(&tap, &format!("{HOST_IP}/24"));
    dp.wait_port("vm", T, "guest reconnected", |p| p["connected"] == true);
    common::ping_from(&mut g, HOST_IP);
    common::upload_from_guest(&mut g, &ns.name, HOST_IP, 5003, 64);
    offloads_carried(&dp);
}
