//! torii-dataplane without root: as the unprivileged user `nobody`, with no capability at all
//! (and no way to gain one: no_new_privs), it serves vhost-user ports and disks — a DPDK
//! frontend's traffic and a disk client's writes go through — and with CAP_NET_ADMIN alone it
//! also makes tap ports; without it, a tap port is refused with a clear error that names the
//! capability.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, OrFail};
use torii_perf::blk_client::{BlkClient, ClientConfig};
use torii_perf::{prereq, proc_util};

const NOBODY: u32 = 65534;
const CAP_NET_ADMIN: u64 = 1 << 12;

/// `setpriv` running a program as `nobody` with exactly the capabilities `caps` (e.g.
/// `"+net_admin"`, or `""` for none) in its effective, inheritable, ambient and bounding sets.
fn as_nobody(caps: &str) -> Vec<String> {
    let set = format!("-all{}", if caps.is_empty() { "" } else { "," }) + caps;
    let mut v = vec![
        "setpriv".to_string(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        format!("--inh-caps={set}"),
        format!("--bounding-set={set}"),
    ];
    if !caps.is_empty() {
        v.push(format!("--ambient-caps={set}"));
    }
    v
}

/// A directory `nobody` owns (0750) under a fresh test directory.
fn nobody_dir(tag: &str) -> (proc_util::TmpDir, std::path::PathBuf) {
    let dir = proc_util::unique_tmp_dir(tag).or_fail("tmp dir");
    let run = dir.join("run");
    std::fs::create_dir(&run).or_fail("dir");
    std::os::unix::fs::chown(&run, Some(NOBODY), Some(NOBODY)).or_fail("chown");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).or_fail("chmod");
    (dir, run)
}

/// A field of `/proc/<pid>/status`.
fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .or_fail("status")
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

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

#[test]
fn nobody_without_capabilities_serves_vhost_user_ports_and_disks() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let (_dir, run) = nobody_dir("torii-lp");
    let (v_sock, d_sock, img) = (run.join("v.sock"), run.join("d.sock"), run.join("d.img"));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .or_fail("image");
    std::os::unix::fs::chown(&img, Some(NOBODY), Some(NOBODY)).or_fail("chown image");
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
    let cfg = ClientConfig {
        queues: 1,
        queue_size: 64,
        slots: 4,
        max_bytes: 4096,
        segments: 1,
    };
    let mut c = BlkClient::connect(&d_sock, &cfg).or_fail("connect to the disk");
    let mut q = c.take_queues().pop().expect("queue");
    let roundtrip = |q: &mut torii_perf::blk_client::DriverQueue, kind: u32| {
        q.queue(0, kind, 8, 4096);
        q.publish();
        let end = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while out.is_empty() && Instant::now() < end {
            q.poll(&mut out);
            std::thread::sleep(Duration::from_micros(100));
        }
        assert_eq!(out.first().map(|c| c.status), Some(0), "request {kind}");
    };
    q.data(0)[..4096].fill(0x5a);
    roundtrip(&mut q, 1);
    q.data(0)[..4096].fill(0);
    roundtrip(&mut q, 0);
    assert!(q.data(0)[..4096].iter().all(|&b| b == 0x5a), "read back");
    drop(q);
    drop(c);
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
    let cfg = run.join("tap.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\ncontrol_socket = \"{}\"\n{body}",
            run.join("control.sock").display()
        ),
    )
    .or_fail("config");
    let out = Command::new("setpriv")
        .args(as_nobody("").iter().skip(1))
        .arg(env!("CARGO_BIN_EXE_torii-dataplane"))
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .or_fail("running torii-dataplane");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a tap without CAP_NET_ADMIN: {err}");
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
