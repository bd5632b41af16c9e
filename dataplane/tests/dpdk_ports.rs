//! `dpdk` ports against real peers: a dpdk-testpmd net_memif peer, the kernel at the other end
//! of veth pairs through net_af_packet, and a vhost-user ⇄ memif path between two testpmds.
//! Needs torii-dataplane built with the `dpdk` feature (`scripts/test` builds every feature).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::{sh, Daemon, Netns, OrFail};
use torii_perf::testpmd::{FwdMode, Testpmd, TestpmdBuilder};
use torii_perf::{prereq, proc_util};

const DPDK: &str = "[dpdk]\nmemory_mib = 256\n";

fn prerequisites() {
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    // Torii's DPDK and one or two testpmds.
    prereq::require_hugepages(768).or_fail("prerequisite");
}

/// A testpmd with one memif port, the client of Torii's memif server on `sock`.
fn memif_peer(sock: &Path, mode: FwdMode, main_lcore: u32) -> Testpmd {
    let mut t = TestpmdBuilder::new()
        .memif(sock, false)
        .forward_mode(mode)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", main_lcore)
        .spawn()
        .or_fail("starting testpmd (memif)");
    t.wait_for_log("start packet forwarding", Duration::from_secs(30))
        .or_fail("testpmd start");
    t
}

fn memif_port(name: &str, n: u32, sock: &Path) -> String {
    format!(
        "[[port]]\nname = \"{name}\"\ntype = \"dpdk\"\ndevice = \"net_memif{n},role=server,socket={},socket-abstract=no\"\n",
        sock.display()
    )
}

fn wait_link(dp: &Daemon, port: &str) {
    dp.wait_port(port, Duration::from_secs(30), "DPDK link up", |p| {
        p["dpdk"]["link_up"] == true
    });
}

/// Proof 1: pings from a network namespace go out a tap, through Torii to its memif port,
/// and are answered by testpmd's memif port (icmpecho answers ARP and ICMP). Every packet
/// is accounted for the same way on both sides of the memif link.
#[test]
fn memif_port_exchanges_traffic_with_a_testpmd_memif_peer() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-memif").or_fail("tmp dir");
    let sock = dir.join("memif.sock");
    let tap = common::ifname("mf");
    let body = format!(
        "{DPDK}{}[[port]]\nname = \"tap\"\ntype = \"tap\"\nifname = \"{tap}\"\n[[xconnect]]\nports = [\"tap\", \"memif\"]\n",
        memif_port("memif", 0, &sock)
    );
    let mut dp = Daemon::start(dir.path(), "", &body);
    let port = dp.port("memif");
    assert_eq!(port["kind"], "dpdk", "{port}");
    assert_eq!(port["dpdk"]["driver"], "net_memif", "{port}");
    let ns = Netns::new("memif");
    ns.exec("sysctl -qw net.ipv6.conf.all.disable_ipv6=1");
    ns.adopt(&tap, "10.91.0.1/24");
    let mut peer = memif_peer(&sock, FwdMode::IcmpEcho, 0);
    wait_link(&dp, "memif");

    let out = ns.exec("ping -c 20 -i 0.05 -W 2 10.91.0.2");
    assert!(
        out.contains(" 0% packet loss"),
        "ping through memif:\n{out}"
    );
    let memif = dp.wait_settled("memif");
    let tap_port = dp.wait_settled("tap");
    let seen = peer
        .stop(Duration::from_secs(20))
        .or_fail("stopping testpmd");
    let n = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap_or(u64::MAX);
    // ARP + 20 echo requests one way, ARP answer + 20 replies back.
    assert!(n(&memif, "tx_packets") >= 21, "{memif}");
    // What the kernel sent before the peer connected was dropped and counted.
    assert_eq!(
        n(&memif, "tx_packets") + n(&memif, "tx_dropped_no_room"),
        n(&tap_port, "rx_packets"),
        "tap → memif: {tap_port}\n{memif}"
    );
    assert_eq!(
        seen.rx_total,
        n(&memif, "tx_packets"),
        "testpmd received what Torii sent: {seen:?}\n{memif}"
    );
    assert_eq!(
        seen.tx_packets,
        n(&memif, "rx_packets"),
        "Torii received what testpmd sent: {seen:?}\n{memif}"
    );
    assert_eq!(
        n(&memif, "rx_packets"),
        n(&tap_port, "tx_packets"),
        "memif → tap: {tap_port}\n{memif}"
    );
    for k in ["rx_dropped_invalid", "rx_dropped_no_buffer", "tx_errors"] {
        assert_eq!(n(&memif, k), 0, "{k}: {memif}");
    }
    // DPDK's own counters agree with the port's, and reach Prometheus.
    assert_eq!(memif["dpdk"]["tx_packets"], memif["tx_packets"], "{memif}");
    assert_eq!(memif["dpdk"]["rx_packets"], memif["rx_packets"], "{memif}");
    let metrics = dp.ctl_ok(&["metrics"]);
    for line in [
        // The peer has gone: the link is down.
        "torii_port_link_up{port=\"memif\",kind=\"dpdk\"} 0",
        "torii_port_dpdk_rx_missed_total{port=\"memif\",kind=\"dpdk\"} 0",
        // (A burst the peer's graceful departure cut short would count: only the line is
        // certain.)
        "torii_port_dpdk_bursts_abandoned_total{port=\"memif\",kind=\"dpdk\"} ",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    dp.stop();
}

/// A veth pair whose far end is in `ns` with `cidr`; the near end (up, in the root namespace)
/// is for Torii's af_packet port. The far end checksums in software: a packet socket sees
/// frames as the kernel built them, and with transmit checksum offload on, a veth hands over
/// frames whose checksum is still to be done (DPDK's af_packet PMD has no vnet header).
struct Veth {
    near: String,
}

impl Veth {
    fn new(tag: &str, ns: &Netns, cidr: &str) -> Veth {
        let near = common::ifname(tag);
        let far = format!("{near}p");
        let _ = sh(&format!("ip link del {near} 2>/dev/null; true"));
        sh(&format!(
            "ip link add {near} type veth peer name {far} && ip link set {far} netns {n} && ip link set {near} up && ip -n {n} addr add {cidr} dev {far} && ip -n {n} link set {far} up",
            n = ns.name
        ));
        ns.exec(&format!("ethtool -K {far} tx off"));
        Veth { near }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.near])
            .output();
    }
}

/// A deterministic byte stream (xorshift), so the receiver can check every byte.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Proof 2: two net_af_packet ports on Torii's switch, each on a veth pair whose other end is
/// the kernel in its own namespace: ping, then a TCP transfer checked byte by byte.
#[test]
fn af_packet_ports_carry_ping_and_tcp_between_kernel_namespaces() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    prereq::require_binary("ethtool", "apt-get install ethtool").or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-afp").or_fail("tmp dir");
    let (ns1, ns2) = (Netns::new("afp1"), Netns::new("afp2"));
    let (v1, v2) = (
        Veth::new("a1", &ns1, "10.92.0.1/24"),
        Veth::new("a2", &ns2, "10.92.0.2/24"),
    );
    let body = format!(
        "{DPDK}[[port]]\nname = \"k1\"\ntype = \"dpdk\"\ndevice = \"net_af_packet0,iface={}\"\n[[port]]\nname = \"k2\"\ntype = \"dpdk\"\ndevice = \"net_af_packet1,iface={}\"\n",
        v1.near, v2.near
    );
    let mut dp = Daemon::start(dir.path(), "", &body);
    assert_eq!(dp.port("k1")["dpdk"]["driver"], "net_af_packet");

    let out = ns1.exec("ping -c 5 -i 0.2 -W 2 10.92.0.2");
    assert!(
        out.contains(" 0% packet loss"),
        "ping over af_packet:\n{out}"
    );

    const LEN: usize = 8 << 20;
    let listener = common::in_netns(&ns2.name, || {
        let l = TcpListener::bind("10.92.0.2:5201").or_fail("bind");
        let (mut s, _) = l.accept().or_fail("accept");
        let mut got = Vec::with_capacity(LEN);
        s.read_to_end(&mut got).or_fail("receive");
        got
    });
    std::thread::sleep(Duration::from_millis(300));
    let sender = common::in_netns(&ns1.name, || {
        let mut s =
            TcpStream::connect_timeout(&"10.92.0.2:5201".parse().unwrap(), Duration::from_secs(10))
                .or_fail("connect");
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(&pattern(LEN)).or_fail("send");
    });
    sender.join().expect("sender thread");
    let got = listener.join().expect("receiver thread");
    assert_eq!(got.len(), LEN, "bytes received");
    assert!(
        got == pattern(LEN),
        "the received stream differs from what was sent"
    );
    let k1 = dp.wait_settled("k1");
    assert!(k1["rx_packets"].as_u64().unwrap() > 1000, "{k1}");
    assert_eq!(k1["rx_dropped_invalid"], 0, "{k1}");
    dp.stop();
}

/// Proof 3: testpmd virtio-user → Torii vhost-user port ⇄ Torii memif port → testpmd memif
/// (rxonly): every packet the frontend sent is forwarded or counted as dropped, and the memif
/// peer received exactly what Torii sent it.
#[test]
fn vhost_user_to_memif_path_between_two_testpmds() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-v2m").or_fail("tmp dir");
    let (vsock, msock) = (dir.join("vhost.sock"), dir.join("memif.sock"));
    let body = format!(
        "{DPDK}[[port]]\nname = \"vm\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n{}[[xconnect]]\nports = [\"vm\", \"memif\"]\n",
        vsock.display(),
        memif_port("memif", 0, &msock)
    );
    let mut dp = Daemon::start(dir.path(), "", &body);
    let mut rx = memif_peer(&msock, FwdMode::RxOnly, 1);
    wait_link(&dp, "memif");
    let mut tx = TestpmdBuilder::new()
        .virtio_user(&vsock, 1, false)
        .forward_mode(FwdMode::TxOnly)
        .pkt_size(64)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", 0)
        .spawn()
        .or_fail("starting testpmd (virtio-user)");
    dp.wait_port(
        "memif",
        Duration::from_secs(30),
        "traffic out of memif",
        |p| p["tx_packets"].as_u64().unwrap_or(0) > 100_000,
    );
    let sent = tx
        .stop(Duration::from_secs(20))
        .or_fail("stopping the sender");
    let vm = dp.wait_settled("vm");
    let memif = dp.wait_settled("memif");
    let got = rx
        .stop(Duration::from_secs(20))
        .or_fail("stopping the receiver");
    let n = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap_or(u64::MAX);
    // Torii took every packet the frontend enqueued, except what was still in the ring (at
    // most its 256 entries) when the frontend stopped its device.
    let taken = n(&vm, "rx_packets");
    assert!(
        taken <= sent.tx_packets && sent.tx_packets - taken <= 256,
        "Torii took what the frontend sent: {sent:?}\n{vm}"
    );
    assert_eq!(
        n(&memif, "tx_packets") + n(&memif, "tx_dropped_no_room"),
        n(&vm, "rx_packets"),
        "every packet forwarded or counted: {vm}\n{memif}"
    );
    assert_eq!(
        got.rx_total,
        n(&memif, "tx_packets"),
        "the memif peer got what Torii sent: {got:?}\n{memif}"
    );
    assert!(got.rx_total > 100_000, "{got:?}");
    dp.stop();
}

/// Ports come and go at runtime (the device is made and removed with the port, so the same
/// vdev can be made again), and a device DPDK cannot make is refused with DPDK's reason,
/// leaving the running ports alone.
#[test]
fn dpdk_ports_are_added_and_removed_at_runtime() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-dpdk-rt").or_fail("tmp dir");
    let sock = dir.join("memif.sock");
    let mut dp = Daemon::start(
        dir.path(),
        "",
        &format!("{DPDK}[[port]]\nname = \"sink\"\ntype = \"sink\"\n"),
    );
    let device = format!(
        "device=\"net_memif0,role=server,socket={},socket-abstract=no\"",
        sock.display()
    );
    for round in 0..2 {
        dp.ctl_ok(&["add", "m0", "type=\"dpdk\"", &device]);
        let mut peer = memif_peer(&sock, FwdMode::TxOnly, 0);
        wait_link(&dp, "m0");
        dp.wait_port(
            "m0",
            Duration::from_secs(30),
            "traffic from the peer",
            |p| p["rx_packets"].as_u64().unwrap_or(0) > 1000,
        );
        peer.stop(Duration::from_secs(20))
            .or_fail("stopping testpmd");
        dp.ctl_ok(&["del", "m0"]);
        assert!(
            !dp.ctl_ok(&["ports"]).contains("m0"),
            "round {round}: port still listed"
        );
    }
    let e = dp.ctl_err(&[
        "add",
        "bad",
        "type=\"dpdk\"",
        "device=\"net_nosuchdriver0\"",
    ]);
    assert!(e.contains("net_nosuchdriver0"), "{e}");
    let e = dp.ctl_err(&[
        "add",
        "bad",
        "type=\"dpdk\"",
        "device=\"net_memif1,role=nonsense\"",
    ]);
    assert!(e.contains("net_memif1"), "{e}");
    assert!(!dp.ctl_ok(&["ports"]).contains("bad"));
    // The bad memif left nothing behind: its name can be used for a good one.
    dp.ctl_ok(&[
        "add",
        "m1",
        "type=\"dpdk\"",
        &device.replace("net_memif0", "net_memif1"),
    ]);
    dp.ctl_ok(&["del", "m1"]);
    dp.stop();
}

/// A two-queue memif port is split over two PMDs, one queue each, and both queues carry
/// the peer's traffic (testpmd sends on two queues).
#[test]
fn multiqueue_dpdk_port_is_spread_over_pmds() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-dpdk-mq").or_fail("tmp dir");
    let sock = dir.join("memif.sock");
    let body = format!(
        "{DPDK}{}queues = 2\n[[port]]\nname = \"sink\"\ntype = \"sink\"\n",
        memif_port("mq", 0, &sock)
    );
    let mut dp = Daemon::start(dir.path(), "pmd_cpus = [0, 1]", &body);
    let mut peer = TestpmdBuilder::new()
        .memif(&sock, false)
        .queues(2)
        .forward_mode(FwdMode::TxOnly)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", 0)
        .spawn()
        .or_fail("starting testpmd (memif, 2 queues)");
    wait_link(&dp, "mq");
    dp.wait_port(
        "mq",
        Duration::from_secs(30),
        "traffic on both queues",
        |p| {
            p["rxq_packets"]
                .as_array()
                .is_some_and(|q| q.len() == 2 && q.iter().all(|n| n.as_u64().unwrap_or(0) > 20_000))
        },
    );
    peer.stop(Duration::from_secs(20))
        .or_fail("stopping testpmd");
    let pmds = dp.report()["pmds"].clone();
    let polling: Vec<Vec<String>> = pmds
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let names = p["ports"].as_array().unwrap().iter();
            names
                .filter_map(|n| n.as_str().filter(|n| n.starts_with("mq")).map(String::from))
                .collect()
        })
        .collect();
    assert_eq!(
        polling,
        vec![vec!["mq[0]"], vec!["mq[1]"]],
        "each PMD polls a queue of mq: {pmds}"
    );
    dp.stop();
}

/// Two more kinds of DPDK driver on the switch: net_af_xdp on a veth pair (an XDP socket) and
/// net_tap (a kernel tap DPDK makes, moved into a namespace): the namespaces ping each other
/// through Torii.
#[test]
fn af_xdp_and_tap_ports_carry_ping() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    prereq::require_binary("ethtool", "apt-get install ethtool").or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-xdp").or_fail("tmp dir");
    let (ns1, ns2) = (Netns::new("xdp1"), Netns::new("xdp2"));
    let v = Veth::new("x1", &ns1, "10.93.0.1/24");
    let tap = common::ifname("dt");
    let body = format!(
        "{DPDK}[[port]]\nname = \"xdp\"\ntype = \"dpdk\"\ndevice = \"net_af_xdp0,iface={}\"\n[[port]]\nname = \"tap\"\ntype = \"dpdk\"\ndevice = \"net_tap0,iface={tap}\"\n",
        v.near
    );
    let mut dp = Daemon::start(dir.path(), "", &body);
    assert_eq!(dp.port("xdp")["dpdk"]["driver"], "net_af_xdp");
    assert_eq!(dp.port("tap")["dpdk"]["driver"], "net_tap");
    ns2.adopt(&tap, "10.93.0.2/24");
    let out = ns1.exec("ping -c 5 -i 0.2 -W 2 10.93.0.2");
    assert!(
        out.contains(" 0% packet loss"),
        "ping over af_xdp and tap:\n{out}"
    );
    let xdp = dp.wait_settled("xdp");
    assert!(xdp["rx_packets"].as_u64().unwrap() >= 5, "{xdp}");
    assert!(dp.port("tap")["rx_packets"].as_u64().unwrap() >= 5);
    dp.stop();
}

/// DPDK as `nobody` without any capability: EAL starts (in-memory, hugepages from memfds),
/// and a memif port carries a vhost-user frontend's traffic to a testpmd memif peer.
#[test]
fn dpdk_ports_need_no_capability() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let (_dir, run) = common::nobody_dir("torii-dpdk-nobody");
    let (v_sock, m_sock) = (run.join("v.sock"), run.join("memif.sock"));
    let body = format!(
        "{DPDK}[[port]]\nname = \"v\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n{}\
         [[xconnect]]\nports = [\"v\", \"memif\"]\n",
        v_sock.display(),
        memif_port("memif", 0, &m_sock)
    );
    let wrapper = common::as_nobody("");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut dp = Daemon::start_under(&wrapper, &run, "", &body);
    let status = std::fs::read_to_string(format!("/proc/{}/status", dp.pid())).or_fail("status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().next().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), common::NOBODY.to_string());
    assert_eq!(field("CapEff:"), "0000000000000000");
    let mut peer = memif_peer(&m_sock, FwdMode::RxOnly, 0);
    wait_link(&dp, "memif");
    let tx = common::sender(&v_sock);
    dp.wait_port(
        "memif",
        Duration::from_secs(30),
        "traffic out of memif",
        |p| p["tx_packets"].as_u64().unwrap_or(0) > 10_000,
    );
    drop(tx);
    let seen = peer
        .stop(Duration::from_secs(20))
        .or_fail("stopping testpmd");
    assert!(seen.rx_total > 10_000, "testpmd received {seen:?}");
    dp.stop();
}

/// net_af_packet as `nobody`: refused without CAP_NET_RAW (its packet socket) and with it alone
/// (starting sets the interface's MAC address and promiscuous mode: CAP_NET_ADMIN), each time
/// with an error that names the capability; with both and nothing else its ports carry ping
/// between two kernel namespaces.
#[test]
fn an_af_packet_port_needs_cap_net_raw_and_cap_net_admin_and_nothing_more() {
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_NET_RAW: u64 = 1 << 13;
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    prereq::require_binary("ethtool", "apt-get install ethtool").or_fail("prerequisite");
    let (_dir, run) = common::nobody_dir("torii-afp-nobody");
    let (ns1, ns2) = (Netns::new("afr1"), Netns::new("afr2"));
    let (v1, v2) = (
        Veth::new("r1", &ns1, "10.93.0.1/24"),
        Veth::new("r2", &ns2, "10.93.0.2/24"),
    );
    let body = format!(
        "{DPDK}[[port]]\nname = \"k1\"\ntype = \"dpdk\"\ndevice = \"net_af_packet0,iface={}\"\n[[port]]\nname = \"k2\"\ntype = \"dpdk\"\ndevice = \"net_af_packet1,iface={}\"\n",
        v1.near, v2.near
    );
    for (caps, named, held) in [
        ("", "CAP_NET_RAW", None),
        ("+net_raw", "CAP_NET_ADMIN", Some("CAP_NET_RAW")),
    ] {
        let err = common::refused(&common::as_nobody(caps), &run, &body);
        assert!(
            err.contains("port \"k1\"") && err.contains(named),
            "with {caps:?}, unclear error: {err}"
        );
        // A capability the daemon holds is not blamed.
        assert!(
            held.is_none_or(|c| !err.contains(c)),
            "with {caps:?}: {err}"
        );
    }

    let wrapper = common::as_nobody("+net_raw,+net_admin");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut dp = Daemon::start_under(&wrapper, &run, "", &body);
    let cap_eff = proc_util::status_field(dp.pid(), "CapEff:");
    assert_eq!(
        u64::from_str_radix(&cap_eff, 16).or_fail("CapEff"),
        CAP_NET_RAW | CAP_NET_ADMIN
    );
    let out = ns1.exec("ping -c 5 -i 0.2 -W 2 10.93.0.2");
    assert!(
        out.contains(" 0% packet loss"),
        "ping over af_packet as nobody:\n{out}"
    );
    dp.stop();
}

/// A memif peer killed while traffic flows both ways, 12 times: DPDK's memif driver unmaps the
/// peer's regions from its interrupt thread while a burst may be copying from or into them
/// (`shm_guard`). The data plane lives through every one, and serves the next peer.
#[test]
fn memif_peers_killed_under_traffic_do_not_take_the_data_plane_down() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-memif-kill").or_fail("tmp dir");
    let (v_sock, m_sock) = (dir.join("v.sock"), dir.join("memif.sock"));
    let body = format!(
        "{DPDK}[[port]]\nname = \"v\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n{}\
         [[xconnect]]\nports = [\"v\", \"memif\"]\n",
        v_sock.display(),
        memif_port("memif", 0, &m_sock)
    );
    let mut dp = Daemon::start(dir.path(), "", &body);
    // Into the memif port: Torii writes into each peer's regions.
    let tx = common::sender(&v_sock);
    let mut last = 0;
    for round in 0..12 {
        // Out of it: Torii reads from them.
        let mut peer = memif_peer(&m_sock, FwdMode::TxOnly, 0);
        wait_link(&dp, "memif");
        dp.wait_port("memif", Duration::from_secs(30), "traffic both ways", |p| {
            p["rx_packets"].as_u64().unwrap_or(0) > last + 1000
                && p["tx_packets"].as_u64().unwrap_or(0) > 0
        });
        // SAFETY: kill(2) on this test's testpmd.
        assert_eq!(unsafe { libc::kill(peer.pid() as i32, libc::SIGKILL) }, 0);
        let _ = peer.stop(Duration::from_secs(10));
        dp.wait_port("memif", Duration::from_secs(30), "link down", |p| {
            p["dpdk"]["link_up"] == false
        });
        let p = dp.port("memif");
        last = p["rx_packets"].as_u64().unwrap_or(0);
        assert!(p["kind"] == "dpdk", "round {round}: {p}");
    }
    drop(tx);
    // The live count (the stats file may be a second old).
    let metrics = dp.ctl_ok(&["metrics"]);
    let counted: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("torii_port_dpdk_bursts_abandoned_total{port=\"memif\",kind=\"dpdk\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no abandoned-burst count in\n{metrics}"));
    let log = dp.stop();
    let survived = log.matches("a memif peer went away during a burst").count();
    assert_eq!(
        counted, survived as u64,
        "abandoned bursts counted and logged"
    );
    eprintln!("bursts carried through a peer's disconnect: {survived} in 12 kills");
}
