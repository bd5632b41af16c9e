//! torii-dataplane without root: as the unprivileged user `nobody`, with no capability at all
//! (and no way to gain one: no_new_privs), it serves vhost-user ports and disks — a DPDK
//! frontend's traffic and a disk client's writes go through — and with CAP_NET_ADMIN alone it
//! also makes tap ports; without it, a tap port is refused with a clear error that names the
//! capability. Metrics on a port below 1024 need CAP_NET_BIND_SERVICE alone, and disks
//! need CAP_IPC_LOCK (or a memlock limit the size of the guest's memory) only to register
//! guest memory with io_uring.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{as_nobody, nobody_dir, Daemon, OrFail, NOBODY};
use torii_perf::blk_client::{write_and_read_back, ClientConfig};
use torii_perf::proc_util::status_field;

/// A disk client's layout with a little over 2 MiB of memory.
const BIG: ClientConfig = ClientConfig {
    queues: 1,
    queue_size: 64,
    slots: 16,
    max_bytes: 128 << 10,
    segments: 1,
};
use torii_perf::prereq;

const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

fn caps_effective(pid: u32) -> u64 {
    u64::from_str_radix(&status_field(pid, "CapEff:"), 16).or_fail("CapEff")
}

fn prerequisites() {
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(256).or_fail("prerequisite");
    if Command::new("setpriv").arg("--version").output().is_err() {
        panic!("prerequisite: setpriv is missing: apt-get install util-linux");
    }
}

/// A disk image of 16 MiB that `nobody` owns, in `run`.
fn nobody_image(run: &Path) -> std::path::PathBuf {
    let img = run.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .or_fail("image");
    std::os::unix::fs::chown(&img, Some(NOBODY), Some(NOBODY)).or_fail("chown image");
    img
}

#[test]
fn nobody_without_capabilities_serves_vhost_user_ports_and_disks() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let (_dir, run) = nobody_dir("torii-lp");
    let (v_sock, d_sock, img) = (run.join("v.sock"), run.join("d.sock"), nobody_image(&run));
    let wrapper = as_nobody("");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut dp = Daemon::start_under(
        &wrapper,
        &run,
        "",
        &common::vhost_to_sink_and_disk(&v_sock, &d_sock, &img),
    );
    let pid = dp.pid();
    // setpriv execs the daemon: the pid is the daemon's.
    assert!(
        status_field(pid, "Name:").starts_with("torii-dataplan"),
        "{}",
        status_field(pid, "Name:")
    );
    let nobody = NOBODY.to_string();
    assert_eq!(
        status_field(pid, "Uid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [nobody.as_str(); 4]
    );
    assert_eq!(caps_effective(pid), 0, "the daemon has capabilities");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");

    // A DPDK frontend's packets go through the port.
    let tx = common::sender(&v_sock);
    dp.wait_port("v", Duration::from_secs(30), "traffic on v", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 10_000
    });
    drop(tx);

    // A disk client's write reads back.
    write_and_read_back(&d_sock, &BIG, 0x5a).or_fail("disk");
    dp.stop();
}

/// A tap port as `nobody`: refused without CAP_NET_ADMIN (the error names it, and no tap is
/// left), made with it and nothing else, and gone with the daemon.
#[test]
fn a_tap_port_needs_cap_net_admin_and_nothing_more() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let (_dir, run) = nobody_dir("torii-lp-tap");
    let tap = common::ifname("lp");
    let body = format!("[[port]]\nname = \"t\"\ntype = \"tap\"\nifname = \"{tap}\"\n");

    // Without the capability: refused, with the reason and the capability named.
    let err = common::refused(&as_nobody(""), &run, &body);
    assert!(
        err.contains("port \"t\"") && err.contains("CAP_NET_ADMIN"),
        "unclear error: {err}"
    );
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists());

    // With CAP_NET_ADMIN alone.
    let wrapper = as_nobody("+net_admin");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut dp = Daemon::start_under(&wrapper, &run, "", &body);
    assert_eq!(caps_effective(dp.pid()), CAP_NET_ADMIN);
    assert!(Path::new(&format!("/sys/class/net/{tap}")).exists());
    dp.stop();
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists());
}

/// `metrics_listen` on a port below 1024: refused as `nobody` without capabilities, with an
/// error that names CAP_NET_BIND_SERVICE; served with that capability alone.
#[test]
fn a_metrics_port_below_1024_needs_cap_net_bind_service() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .or_fail("ip_unprivileged_port_start")
        .trim()
        .parse()
        .or_fail("ip_unprivileged_port_start");
    assert!(
        start > 600,
        "net.ipv4.ip_unprivileged_port_start is {start}: every port is unprivileged here, set it back to 1024"
    );
    let port = (500..start.min(1024))
        .rev()
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below 1024");
    let (_dir, run) = nobody_dir("torii-lp-low");
    let listen = format!("metrics_listen = \"127.0.0.1:{port}\"\n");
    let err = common::refused(&as_nobody(""), &run, &listen);
    assert!(
        err.contains("metrics_listen") && err.contains("CAP_NET_BIND_SERVICE"),
        "unclear error: {err}"
    );
    assert!(!run.join("control.sock").exists(), "control socket left");

    let wrapper = as_nobody("+net_bind_service");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut dp = Daemon::start_under(&wrapper, &run, &listen, "");
    assert_eq!(caps_effective(dp.pid()), CAP_NET_BIND_SERVICE);
    let body = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).or_fail("connect");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .or_fail("request");
        let mut b = String::new();
        s.read_to_string(&mut b).or_fail("response");
        b
    };
    let status = body.lines().next().unwrap_or_default();
    assert!(
        status.starts_with("HTTP/1.") && status.contains(" 200"),
        "{body}"
    );
    dp.stop();
}

/// Disks as `nobody` with a memlock limit (1 MiB) below the guest's memory: guest memory cannot
/// be registered with io_uring, which the daemon says once, and I/O goes through all the
/// same. With CAP_IPC_LOCK alone, the limit does not apply and the memory is registered.
#[test]
fn disks_need_memlock_or_cap_ipc_lock_only_for_registered_guest_memory() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    const NOT_REGISTERED: &str = "guest memory not registered with io_uring";
    // Under 64 KiB not even a worker's ring fits: refused, and the error says why.
    {
        let (_dir, run) = nobody_dir("torii-lp-memlock");
        let (v_sock, d_sock, img) = (run.join("v.sock"), run.join("d.sock"), nobody_image(&run));
        let mut wrapper = vec!["prlimit".to_string(), "--memlock=65536:65536".into()];
        wrapper.extend(as_nobody(""));
        let err = common::refused(
            &wrapper,
            &run,
            &common::vhost_to_sink_and_disk(&v_sock, &d_sock, &img),
        );
        assert!(
            err.contains("disk \"d\"")
                && err.contains("RLIMIT_MEMLOCK")
                && err.contains("CAP_IPC_LOCK"),
            "unclear error: {err}"
        );
        assert!(
            !d_sock.exists() && !run.join("control.sock").exists(),
            "left behind"
        );
    }
    for (caps, registered) in [("", false), ("+ipc_lock", true)] {
        let (_dir, run) = nobody_dir("torii-lp-memlock");
        let (v_sock, d_sock, img) = (run.join("v.sock"), run.join("d.sock"), nobody_image(&run));
        let mut wrapper = vec!["prlimit".to_string(), "--memlock=1048576:1048576".into()];
        wrapper.extend(as_nobody(caps));
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut dp = Daemon::start_under(
            &wrapper,
            &run,
            "",
            &common::vhost_to_sink_and_disk(&v_sock, &d_sock, &img),
        );
        assert_eq!(
            status_field(dp.pid(), "Uid:").split_whitespace().next(),
            Some("65534")
        );
        write_and_read_back(&d_sock, &BIG, 0x5a).or_fail("disk");
        let log = dp.stop();
        assert_eq!(
            !log.contains(NOT_REGISTERED),
            registered,
            "capabilities {caps:?}, memlock 1 MiB; log:\n{log}"
        );
    }
}
