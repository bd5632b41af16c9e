//! Two QEMU (TCG) guests on cross-connected Torii vhost-user ports. Guest A negotiates TSO and
//! sends TCP super-frames; guest B's virtio-net is told not to offer GUEST_TSO4/6 (as a DPDK
//! application or a guest with those offloads off would be), so Torii must segment in
//! software: B's kernel then checks every segment's IP and TCP headers and checksums, and the
//! data must arrive intact (SHA-256) over IPv4 and IPv6.

mod common;

use std::time::Duration;

use common::{Daemon, OrFail};
use torii_perf::guest::Guest;
use torii_perf::{prereq, proc_util};

const A_IP: &str = "10.252.0.1";
const B_IP: &str = "10.252.0.2";
const A_IP6: &str = "fd00:252::1";
const B_IP6: &str = "fd00:252::2";
const T: Duration = Duration::from_secs(30);

/// The guest's negotiated virtio feature bits (virtio 1.2 §5.1.3) as a '0'/'1' string.
fn features(g: &mut Guest) -> String {
    g.run_ok("cat /sys/class/net/eth0/device/features", T)
        .or_fail("features")
        .trim()
        .to_string()
}

fn has(feats: &str, bit: usize) -> bool {
    feats.as_bytes().get(bit) == Some(&b'1')
}

/// Sends `mib` MiB of random data from `from` to `to_ip:port` (where `to` listens) over TCP
/// and compares SHA-256 sums.
fn transfer(dp: &Daemon, from: &mut Guest, to: &mut Guest, to_ip: &str, port: u16, mib: u32) {
    // busybox nc half-closes when its stdin ends, and a sender that sees the FIN stops: give
    // the listener a stdin that stays open and silent.
    to.spawn_bg(&format!("sleep 600 | nc -l -p {port} > /tmp/in{port}"))
        .or_fail("listener");
    let want = from
        .run_ok(
            &format!(
                "dd if=/dev/urandom of=/tmp/out{port} bs=64k count={} 2>/dev/null && sha256sum /tmp/out{port}",
                mib * 16
            ),
            T,
        )
        .or_fail("make the file");
    // Retry the connect until the listener is up (it was started in the background).
    from.run_ok(
        &format!(
            "i=0; until nc {to_ip} {port} < /tmp/out{port}; do i=$((i+1)); [ $i -ge 20 ] && exit 1; sleep 0.5; done"
        ),
        Duration::from_secs(180),
    )
    .or_fail("send");
    let size = (mib << 20).to_string();
    let done = proc_util::wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        to.run(&format!("stat -c %s /tmp/in{port}"), T)
            .map(|o| o.stdout.trim() == size)
            .unwrap_or(false)
    });
    assert!(
        done,
        "transfer incomplete: {:?}\nreceiver: {:?}\nsender: {:?}\nreport: {}\ndaemon log:\n{}",
        to.run(&format!("ls -l /tmp/in{port}"), T),
        to.run("grep -E '^(Ip|Tcp):' /proc/net/snmp", T),
        from.run("grep -E '^(Ip|Tcp):' /proc/net/snmp", T),
        dp.report(),
        dp.log_text()
    );
    let got = to
        .run_ok(&format!("sha256sum /tmp/in{port}"), T)
        .or_fail("sha256");
    assert_eq!(
        got.split_whitespace().next(),
        want.split_whitespace().next(),
        "data corrupted on the way"
    );
}

#[test]
fn tso_guest_to_guest_without_tso_is_segmented_in_software() {
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-pair").or_fail("tmp dir");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let dp = Daemon::start(dir.path(), "", &common::vhost_pair_config(&sa, &sb, false));
    let mut a = common::boot_guest(&sa, "52:54:00:00:52:01", &format!("{A_IP}/24"), 1, 1, &[]);
    let mut b = common::boot_guest(
        &sb,
        "52:54:00:00:52:02",
        &format!("{B_IP}/24"),
        1,
        1,
        &[
            "guest_tso4=off",
            "guest_tso6=off",
            "guest_ecn=off",
            "guest_ufo=off",
        ],
    );

    // A sends TSO super-frames; B cannot take them.
    let (fa, fb) = (features(&mut a), features(&mut b));
    assert!(has(&fa, 11) && has(&fa, 12), "A lacks HOST_TSO4/6: {fa}");
    assert!(!has(&fb, 7) && !has(&fb, 8), "B has GUEST_TSO4/6: {fb}");

    common::ping_from(&mut a, B_IP);

    transfer(&dp, &mut a, &mut b, B_IP, 5001, 4);
    // And back: B sends plain frames, A takes them as they are.
    transfer(&dp, &mut b, &mut a, A_IP, 5002, 1);

    // IPv6: TSO6 super-frames segmented the same way.
    for (g, ip) in [(&mut a, A_IP6), (&mut b, B_IP6)] {
        g.run_ok(
            &format!("echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad && ip -6 addr add {ip}/64 dev eth0"),
            T,
        )
        .or_fail("IPv6 address");
    }
    transfer(&dp, &mut a, &mut b, B_IP6, 5003, 2);

    // The stats file is rewritten once a second: the last transfer may not be in it yet.
    dp.wait_port("a", Duration::from_secs(20), "super-frames from A", |p| {
        p["rx_gso_packets"].as_u64() > Some(0)
    });
    dp.wait_port(
        "b",
        Duration::from_secs(20),
        "frames segmented for B",
        |p| p["sw_gso"].as_u64() > Some(0),
    );
    let (pa, pb) = (dp.port("a"), dp.port("b"));
    assert_eq!(pb["tx_dropped_offload"], 0, "{pb}");
    assert_eq!(pb["broken_queues"], serde_json::json!([]));
    assert_eq!(pa["broken_queues"], serde_json::json!([]));
}
