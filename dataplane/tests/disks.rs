//! Disks (vhost-user-blk exports) served by the data plane process beside its ports, from
//! the config file and through the control API, driven by `torii-perf`'s userspace
//! virtio-blk driver: data written reads back (also after a daemon restart), counters and
//! metrics count it, and a disk that cannot start is refused with nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, OrFail};
use serde_json::Value;
use torii_perf::blk_job::{run_spec, Pattern, RunReport, RunSpec};
use torii_perf::{prereq, proc_util};

fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(mib << 20))
        .or_fail("image file");
    p
}

/// 4 KiB random I/O over the first 8 MiB, one job per queue.
fn run(socket: &Path, pattern: Pattern, seed: u64, numjobs: u16) -> RunReport {
    let spec = RunSpec {
        pattern,
        bs: 4096,
        iodepth: 8,
        numjobs,
        runtime: Duration::from_secs(1),
        size: 8 << 20,
        seed,
        queue_size: 128,
        segments: 1,
    };
    let r = run_spec(socket, &spec).or_fail("client run");
    assert_eq!(
        (r.errors, r.mismatches),
        (0, 0),
        "{pattern:?} seed {seed}: {r:?}"
    );
    r
}

fn disk(dp: &Daemon, name: &str) -> Value {
    serde_json::from_str(&dp.ctl_ok(&["--json", "disk", name])).or_fail("disk JSON")
}

fn disk_names(dp: &Daemon) -> Vec<String> {
    let v: Value = serde_json::from_str(&dp.ctl_ok(&["--json", "disks"])).or_fail("disks JSON");
    v.as_array()
        .expect("disks array")
        .iter()
        .map(|k| k["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn disks_are_served_beside_ports_and_managed_through_the_api() {
    prereq::require_root().or_fail("prerequisite");
    let _heavy = torii_perf::heavy_test_lock();
    let dir = proc_util::unique_tmp_dir("torii-disks").or_fail("tmp dir");
    let d = dir.path();
    let img1 = image(d, "d1.img", 16);
    let (vm1, d1) = (d.join("vm1.sock"), d.join("d1.sock"));
    let mut dp = Daemon::start(
        d,
        "",
        &format!(
            r#"
[[port]]
name = "vm1"
type = "vhost-user"
socket = "{}"
[[disk]]
name = "d1"
socket = "{}"
file = "{}"
queues = 2
serial = "torii-d1"
"#,
            vm1.display(),
            d1.display(),
            img1.display()
        ),
    );

    // Written through the disk (8 MiB, split between the two jobs), read back, counted per
    // queue and in total.
    let w = run(&d1, Pattern::Verify, 11, 2);
    assert_eq!(w.ios, 2 * 2048, "{w:?}");
    // Workers publish their counts once per round: the last round's may lag a little.
    proc_util::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        disk(&dp, "d1")["total"]["reads"] == 2048
    });
    let k = disk(&dp, "d1");
    let total = &k["total"];
    assert_eq!(total["writes"], 2048, "{k}");
    assert_eq!(total["reads"], 2048, "{k}");
    assert_eq!(total["written_bytes"], 8 << 20, "{k}");
    assert_eq!(k["queues"][1]["writes"], 1024, "{k}");
    assert_eq!(k["queues"].as_array().map(Vec::len), Some(2), "{k}");
    assert_eq!(k["connections"], 1, "{k}");
    let table = dp.ctl_ok(&["disks"]);
    for want in ["DISK", "d1", "2048", "8388608"] {
        assert!(table.contains(want), "{want:?} not in\n{table}");
    }
    let detail = dp.ctl_ok(&["disk", "d1"]);
    assert!(
        detail.contains("QUEUE") && detail.contains(&img1.display().to_string()),
        "{detail}"
    );
    let metrics = dp.ctl_ok(&["metrics"]);
    for want in [
        "torii_blk_requests_total{export=\"d1\",queue=\"0\",op=\"write\"}",
        "torii_port_rx_packets_total{port=\"vm1\"",
    ] {
        assert!(
            metrics.contains(want),
            "{want:?} not in metrics:\n{metrics}"
        );
    }

    // A disk that cannot start is refused and leaves no socket.
    let d2 = d.join("d2.sock");
    let missing = d.join("missing.img");
    let s2 = format!("socket={}", d2.display());
    let err = dp.ctl_err(&[
        "disk-add",
        "d2",
        &s2,
        &format!("file={}", missing.display()),
    ]);
    assert!(err.contains("missing.img"), "unclear error: {err}");
    assert!(!d2.exists(), "socket of a failed disk left behind");
    let err = dp.ctl_err(&[
        "disk-add",
        "d2",
        &format!("socket={}", vm1.display()),
        &format!("file={}", img1.display()),
    ]);
    assert!(err.contains("used twice"), "unclear error: {err}");
    let err = dp.ctl_err(&["disk-add", "d1", &s2, &format!("file={}", img1.display())]);
    assert!(err.contains("already exists"), "unclear error: {err}");
    // Nobody takes over the control socket.
    let err = dp.ctl_err(&[
        "disk-add",
        "d2",
        &format!("socket={}", dp.control_socket().display()),
        &format!("file={}", img1.display()),
    ]);
    assert!(err.contains("used twice"), "unclear error: {err}");
    let err = dp.ctl_err(&["disk-add", "d2", &s2, "file=x.img", "queues=99"]);
    assert!(
        err.contains("queues must be between 1"),
        "unclear error: {err}"
    );
    assert_eq!(disk_names(&dp), ["d1"]);

    // A disk added at runtime serves; a read-only one refuses writes; removing it removes its
    // socket.
    let img2 = image(d, "d2.img", 16);
    let out = dp.ctl_ok(&["disk-add", "d2", &s2, &format!("file={}", img2.display())]);
    assert!(out.contains("disk d2"), "{out}");
    run(&d2, Pattern::Verify, 12, 1);
    dp.ctl_ok(&["disk-del", "d2"]);
    assert!(!d2.exists(), "socket of a removed disk left behind");
    let err = dp.ctl_err(&["disk", "d2"]);
    assert!(err.contains("no disk named \"d2\""), "{err}");
    dp.ctl_ok(&[
        "disk-add",
        "d2",
        &s2,
        &format!("file={}", img2.display()),
        "read_only=true",
    ]);
    run(&d2, Pattern::Check, 12, 1);
    let spec = RunSpec {
        pattern: Pattern::Verify,
        bs: 4096,
        iodepth: 1,
        numjobs: 1,
        runtime: Duration::from_secs(1),
        size: 1 << 20,
        seed: 1,
        queue_size: 16,
        segments: 1,
    };
    let r = run_spec(&d2, &spec).or_fail("client run");
    assert!(r.errors > 0, "a read-only disk took writes: {r:?}");
    assert_eq!(disk(&dp, "d2")["total"]["written_bytes"], 0);
    assert_eq!(disk_names(&dp), ["d1", "d2"]);

    // The config file's disk comes back after a restart with its data; the runtime one does
    // not (the API changes the running daemon, not its file).
    dp.restart();
    run(&d1, Pattern::Check, 11, 2);
    assert_eq!(disk_names(&dp), ["d1"]);
    let log = dp.stop();
    assert!(
        !d1.exists() && !vm1.exists(),
        "sockets left after stop:\n{log}"
    );
}

/// A QEMU guest whose virtio-net port and virtio-blk disk are both served by one
/// `torii-dataplane` process: it pings the host through the switch, and what it writes to
/// its disk is in the image file, byte for byte.
#[test]
fn a_guest_gets_its_port_and_its_disk_from_one_process() {
    let _heavy = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-disk-guest").or_fail("tmp dir");
    let d = dir.path();
    let img = image(d, "root.img", 32);
    let (vm, disk_sock) = (d.join("vm.sock"), d.join("root.sock"));
    let tap = common::ifname("dk");
    let dp = Daemon::start(
        d,
        "",
        &format!(
            r#"
[[port]]
name = "vm"
type = "vhost-user"
socket = "{}"
mac = "52:54:00:00:00:31"
[[port]]
name = "tap"
type = "tap"
ifname = "{tap}"
[[disk]]
name = "root"
socket = "{}"
file = "{}"
queues = 2
serial = "pod-root"
"#,
            vm.display(),
            disk_sock.display(),
            img.display()
        ),
    );
    let ns = common::Netns::new("dk");
    ns.adopt(&tap, "10.253.0.1/24");
    let b = torii_perf::guest::GuestBuilder::new()
        .memory_mib(512)
        .smp(2)
        .net_vhost_user(
            &vm,
            "52:54:00:00:00:31",
            1,
            torii_perf::guest::ChardevMode::Client {
                reconnect_ms: Some(1000),
            },
        )
        .blk_vhost_user(&disk_sock, 2);
    let mut g = common::start_guest(b, "10.253.0.2/24");
    let t = Duration::from_secs(60);
    common::ping_from(&mut g, "10.253.0.1");
    let serial = g.run_ok("cat /sys/block/vda/serial", t).or_fail("serial");
    assert_eq!(serial.trim(), "pod-root");
    let mq = g.run_ok("ls /sys/block/vda/mq", t).or_fail("mq");
    assert_eq!(mq.split_whitespace().count(), 2, "blk-mq queues: {mq}");
    let written = g
        .run_ok(
            "dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null && dd if=/tmp/d of=/dev/vda bs=1M oflag=direct 2>/dev/null && sync && sha256sum /tmp/d",
            t,
        )
        .or_fail("guest write");
    let read = g
        .run_ok(
            "dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum",
            t,
        )
        .or_fail("guest read");
    let sum = |s: &str| s.split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(sum(&written), sum(&read), "guest read back other data");
    let host = proc_util::sh(&format!("head -c 4194304 {} | sha256sum", img.display()));
    assert_eq!(sum(&written), sum(&host), "the image file has other data");
    let k = disk(&dp, "root");
    assert!(
        k["total"]["written_bytes"].as_u64() >= Some(4 << 20),
        "disk counters: {k}"
    );
    let port: Value =
        serde_json::from_str(&dp.ctl_ok(&["--json", "show", "vm"])).or_fail("port JSON");
    assert!(port["rx_packets"].as_u64() > Some(0), "port: {port}");
    drop(g);
}
