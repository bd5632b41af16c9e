//! The Landlock file-system sandbox in the real daemon (docs/security.md#landlock): with
//! `landlock = "enforce"` torii-dataplane serves its configured vhost-user port (a
//! dpdk-testpmd virtio-user frontend's traffic), disk (a client's write reads back) and tap,
//! adds ports and disks at run time where the sandbox allows, and refuses — from inside the
//! process, with an error that names Landlock and `landlock_paths` — a port whose socket or a
//! disk whose image is anywhere else; the same with seccomp off (Landlock alone, which set
//! `no_new_privs`); DPDK initialised under the wider first layer and a memif port carrying a
//! testpmd peer's traffic; the rules print; bad settings are refused.
//!
//! Needs a kernel with Landlock: without it these tests fail (they never skip).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, OrFail};
use torii_perf::blk_client::{write_and_read_back, ClientConfig};
use torii_perf::proc_util::status_field;
use torii_perf::{prereq, proc_util};

/// A disk client's layout: one queue, 4 KiB requests.
const SMALL: ClientConfig = ClientConfig {
    queues: 1,
    queue_size: 64,
    slots: 4,
    max_bytes: 4096,
    segments: 1,
};

fn require_landlock() {
    if let Err(e) = torii_vhost_user::landlock::kernel_abi() {
        panic!("prerequisite: a kernel with Landlock (CONFIG_SECURITY_LANDLOCK=y, landlock in the lsm= boot parameter): {e}");
    }
}

fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(mib << 20))
        .or_fail("image file");
    p
}

/// `<tmp>/{allowed,outside}`: the daemon's files go in `allowed`; `outside` is a sibling
/// the configuration never names.
fn dirs(tag: &str) -> (proc_util::TmpDir, PathBuf, PathBuf) {
    let dir = proc_util::unique_tmp_dir(tag).or_fail("tmp dir");
    let (allowed, outside) = (dir.join("allowed"), dir.join("outside"));
    for d in [&allowed, &outside] {
        std::fs::create_dir(d).or_fail("dir");
    }
    (dir, allowed, outside)
}

/// Asserts that a refused request's error is the sandbox's, naming how to extend it.
fn assert_landlock_error(err: &str, path: &Path) {
    assert!(
        err.contains("Permission denied")
            && err.contains("denied by the Landlock sandbox")
            && err.contains(&path.display().to_string())
            && err.contains("`landlock_paths` in [dataplane]"),
        "not the sandbox's error: {err}"
    );
}

#[test]
fn the_sandboxed_daemon_serves_its_ports_and_disks_and_refuses_everything_else() {
    let _lock = torii_perf::heavy_test_lock();
    require_landlock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(256).or_fail("prerequisite");
    let (_dir, allowed, outside) = dirs("torii-landlock");
    let (v_sock, d_sock) = (allowed.join("v.sock"), allowed.join("d.sock"));
    let img = image(&allowed, "d.img", 16);
    let tap = common::ifname("ll");
    // Where disks added at run time keep their images: the operator's own entry.
    let images = allowed.join("images");
    std::fs::create_dir(&images).or_fail("dir");
    let mut dp = Daemon::start(
        &allowed,
        &format!(
            "landlock = \"enforce\"\nlandlock_paths = [\"{}\"]",
            images.display()
        ),
        &format!(
            "{}[[port]]\nname = \"tap\"\ntype = \"tap\"\nifname = \"{tap}\"\n",
            common::vhost_to_sink_and_disk(&v_sock, &d_sock, &img)
        ),
    );
    let log = dp.log_text();
    assert!(
        log.contains("file-system sandbox: Landlock ABI")
            && log.contains("enforced")
            && log.contains("landlock=enforce"),
        "{log}"
    );
    // Applied before any other thread of the daemon started: every thread has it.
    assert!(
        log.contains("no other thread was running") || log.contains("every thread restricted"),
        "{log}"
    );

    // (1) A DPDK frontend's traffic through the configured port, a disk client's write.
    let mut tx = common::sender(&v_sock);
    dp.wait_port("v", Duration::from_secs(30), "traffic on v", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 10_000
    });
    write_and_read_back(&d_sock, &SMALL, 0x5a).or_fail("disk");
    let sent = tx.stop(Duration::from_secs(20)).or_fail("stopping testpmd");
    assert!(sent.tx_packets > 10_000, "{sent:?}");

    // Where the sandbox allows, ports and disks come and go at run time (the disk on one of
    // tokio's blocking threads, started after the sandbox: it inherits it): a socket beside
    // the configured ones, an image where `landlock_paths` allows.
    dp.ctl_ok(&[
        "add",
        "v2",
        "type=vhost-user",
        &format!("socket=\"{}\"", allowed.join("v2.sock").display()),
    ]);
    assert!(allowed.join("v2.sock").exists());
    let img2 = image(&images, "d2.img", 8);
    dp.ctl_ok(&[
        "disk-add",
        "d2",
        &format!("socket=\"{}\"", allowed.join("d2.sock").display()),
        &format!("file=\"{}\"", img2.display()),
    ]);
    write_and_read_back(&allowed.join("d2.sock"), &SMALL, 0x77).or_fail("disk");
    dp.ctl_ok(&["disk-del", "d2"]);
    dp.ctl_ok(&["del", "v2"]);
    // A second tap: /dev/net/tun is allowed since the configuration has a tap.
    let tap2 = common::ifname("lm");
    dp.ctl_ok(&["add", "t2", "type=tap", &format!("ifname=\"{tap2}\"")]);
    dp.ctl_ok(&["del", "t2"]);

    // (2) Anywhere else, the kernel refuses the daemon itself: a socket in a directory the
    // configuration does not name, an image outside, an image beside the sockets (only
    // sockets and the stats file may be made there, nothing read), a socket outside for an
    // allowed image.
    let bad = outside.join("v3.sock");
    let err = dp.ctl_err(&[
        "add",
        "v3",
        "type=vhost-user",
        &format!("socket=\"{}\"", bad.display()),
    ]);
    assert_landlock_error(&err, &bad);
    assert!(
        err.contains(&format!("add {} to", outside.display())),
        "{err}"
    );
    assert!(!bad.exists());
    let outside_img = image(&outside, "o.img", 8);
    let err = dp.ctl_err(&[
        "disk-add",
        "o",
        &format!("socket=\"{}\"", allowed.join("o.sock").display()),
        &format!("file=\"{}\"", outside_img.display()),
    ]);
    assert_landlock_error(&err, &outside_img);
    let beside = image(&allowed, "beside.img", 8);
    let err = dp.ctl_err(&[
        "disk-add",
        "o",
        &format!("socket=\"{}\"", allowed.join("o.sock").display()),
        &format!("file=\"{}\"", beside.display()),
    ]);
    assert_landlock_error(&err, &beside);
    let err = dp.ctl_err(&[
        "disk-add",
        "o",
        &format!("socket=\"{}\"", outside.join("o.sock").display()),
        &format!("file=\"{}\"", img2.display()),
    ]);
    assert_landlock_error(&err, &outside.join("o.sock"));
    // Refused requests leave nothing, and the daemon serves on.
    let ports = dp.ctl_ok(&["ports"]);
    assert!(!ports.contains("v3") && ports.contains("tap"), "{ports}");
    assert!(!dp.ctl_ok(&["disks"]).contains(" o "));
    write_and_read_back(&d_sock, &SMALL, 0x33).or_fail("disk");

    // (3) What can be seen from outside: no_new_privs (Landlock needs it without
    // CAP_SYS_ADMIN; seccomp sets it too, hence the next test).
    assert_eq!(status_field(dp.pid(), "NoNewPrivs:"), "1");
    let log = dp.stop();
    assert!(!log.contains("seccomp: thread"), "{log}");
    for s in [&v_sock, &d_sock, &allowed.join("control.sock")] {
        assert!(!s.exists(), "{} left behind", s.display());
    }
}

/// Landlock alone (seccomp off): the daemon has no seccomp filter, yet no_new_privs is set
/// (by landlock_restrict_self's requirement) and the kernel refuses a socket outside the
/// sandbox; without `landlock`, the same request works.
#[test]
fn landlock_alone_refuses_and_off_allows() {
    require_landlock();
    let (_dir, allowed, outside) = dirs("torii-landlock-alone");
    let body = "[[port]]\nname = \"src\"\ntype = \"source\"\n[[port]]\nname = \"sink\"\ntype = \"sink\"\n[[xconnect]]\nports = [\"src\", \"sink\"]\n";
    let mut dp = Daemon::start(&allowed, "seccomp = \"off\"\nlandlock = \"enforce\"", body);
    let pid = dp.pid();
    assert_eq!(status_field(pid, "Seccomp:"), "0");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    let bad = outside.join("a.sock");
    let err = dp.ctl_err(&[
        "add",
        "a",
        "type=vhost-user",
        &format!("socket=\"{}\"", bad.display()),
    ]);
    assert_landlock_error(&err, &bad);
    // No tap in the configuration, so no /dev/net/tun: a tap added now is refused before the
    // kernel is even asked for an interface.
    let err = dp.ctl_err(&["add", "t", "type=tap", "ifname=\"tllnone0\""]);
    assert!(
        err.contains("cannot open /dev/net/tun")
            && err.contains("denied by the Landlock sandbox")
            && err
                .contains("add /dev/net/tun (or its directory) to `landlock_paths` in [dataplane]"),
        "{err}"
    );
    // The stats file is still written (beside it, then renamed: its directory is allowed).
    dp.wait_port("sink", Duration::from_secs(20), "traffic", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > 0
    });
    dp.stop();

    // Without the sandbox (the default) the same port is made.
    let second = allowed.join("second");
    std::fs::create_dir(&second).or_fail("dir");
    let mut dp = Daemon::start(&second, "seccomp = \"off\"", body);
    assert_eq!(status_field(dp.pid(), "NoNewPrivs:"), "0");
    dp.ctl_ok(&[
        "add",
        "a",
        "type=vhost-user",
        &format!("socket=\"{}\"", bad.display()),
    ]);
    assert!(bad.exists());
    assert!(!dp.log_text().contains("file-system sandbox"));
    dp.stop();
}

/// DPDK is initialised under the first, wider layer; its interrupt thread, started then,
/// is named in the log; a memif port carries a testpmd peer's traffic under the daemon's own
/// layer, and a memif port whose socket is outside is refused with a note on the sandbox.
#[test]
fn dpdk_under_the_sandbox_carries_memif_traffic() {
    let _lock = torii_perf::heavy_test_lock();
    require_landlock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(512).or_fail("prerequisite");
    let (_dir, allowed, outside) = dirs("torii-landlock-dpdk");
    let sock = allowed.join("memif.sock");
    let mut dp = Daemon::start(
        &allowed,
        "landlock = \"enforce\"",
        &format!(
            "[dpdk]\nmemory_mib = 256\n[[port]]\nname = \"m\"\ntype = \"dpdk\"\ndevice = \"net_memif0,role=server,socket={},socket-abstract=no\"\n[[port]]\nname = \"sink\"\ntype = \"sink\"\n[[xconnect]]\nports = [\"m\", \"sink\"]\n",
            sock.display()
        ),
    );
    let log = dp.log_text();
    assert!(
        log.contains("file-system sandbox, layer 1 (DPDK's initialisation): Landlock ABI"),
        "{log}"
    );
    assert!(log.contains("file-system sandbox: Landlock ABI"), "{log}");
    // The thread DPDK started under the first layer is named, unless TSYNC put every
    // thread under the second too.
    assert!(
        log.contains("(TSYNC needs ABI 8): eal-intr-thread")
            || log.contains("every thread restricted at once"),
        "{log}"
    );
    let mut peer = torii_perf::testpmd::TestpmdBuilder::new()
        .memif(&sock, false)
        .forward_mode(torii_perf::testpmd::FwdMode::TxOnly)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", 0)
        .spawn()
        .or_fail("starting testpmd (memif)");
    dp.wait_port(
        "m",
        Duration::from_secs(30),
        "traffic from the memif peer",
        |p| p["rx_packets"].as_u64().unwrap_or(0) > 10_000,
    );
    peer.stop(Duration::from_secs(20))
        .or_fail("stopping testpmd");
    let bad = outside.join("m2.sock");
    let err = dp.ctl_err(&[
        "add",
        "m2",
        "type=dpdk",
        &format!(
            "device=\"net_memif1,role=server,socket={},socket-abstract=no\"",
            bad.display()
        ),
    ]);
    assert!(
        err.contains("the Landlock sandbox is enforced")
            && err.contains("`landlock_paths` in [dataplane]"),
        "{err}"
    );
    assert!(!bad.exists());
    dp.stop();
}

/// `torii-dataplane landlock` prints the rules; `check` and `run` refuse bad settings with
/// the reason.
#[test]
fn the_rules_print_and_bad_settings_are_refused() {
    let (_dir, allowed, outside) = dirs("torii-landlock-cli");
    let cfg = allowed.join("dp.toml");
    let img = image(&allowed, "d.img", 1);
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\ncontrol_socket = \"{}\"\nlandlock = \"enforce\"\nlandlock_paths = [\"{}\"]\n[[disk]]\nname = \"d\"\nsocket = \"{}\"\nfile = \"{}\"\nread_only = true\n",
            allowed.join("c.sock").display(),
            outside.display(),
            allowed.join("d.sock").display(),
            img.display()
        ),
    )
    .or_fail("config");
    let bin = env!("CARGO_BIN_EXE_torii-dataplane");
    let o = Command::new(bin)
        .args(["landlock", "-c"])
        .arg(&cfg)
        .output()
        .or_fail("torii-dataplane landlock");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "landlock = \"enforce\": the daemon may touch only these paths".to_string(),
        format!(
            "{}\n  remove-file make-sock resolve-unix\n  for: control socket; disk \"d\" socket\n",
            allowed.display()
        ),
        format!("{}\n  read-file\n  for: disk \"d\" image\n", img.display()),
        format!("{}\n  read-file write-file read-dir", outside.display()),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }
    assert!(!text.contains("execute"), "{text}");

    let run = |text: &str, sub: &str| {
        std::fs::write(&cfg, text).or_fail("config");
        Command::new(bin)
            .args([sub, "-c"])
            .arg(&cfg)
            .output()
            .or_fail("torii-dataplane")
    };
    for (text, want) in [
        ("[dataplane]\nlandlock = \"log\"\n", "unknown variant `log`"),
        (
            "[dataplane]\nlandlock_paths = [\"run/torii\"]\n",
            "landlock_paths: run/torii is not an absolute path",
        ),
    ] {
        let o = run(text, "check");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{want}: {err}");
    }
    // A path the operator names must exist when the daemon starts.
    let missing = outside.join("missing");
    let o = run(
        &format!(
            "[dataplane]\ncontrol_socket = \"{}\"\nlandlock = \"enforce\"\nlandlock_paths = [\"{}\"]\n",
            allowed.join("c.sock").display(),
            missing.display()
        ),
        "run",
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(&format!("landlock: cannot allow {}", missing.display()))
            && err.contains("No such file"),
        "{err}"
    );
    assert!(
        !allowed.join("c.sock").exists(),
        "control socket left behind"
    );
}

/// Every sandbox at once, as a production unit would run the daemon: `nobody` without any
/// capability, seccomp enforced, Landlock enforced. A vhost-user frontend's traffic and a
/// disk client's write go through; a port outside the rules is refused by the sandbox, even
/// in a directory `nobody` owns.
#[test]
fn nobody_under_seccomp_and_landlock_serves_and_refuses() {
    let _lock = torii_perf::heavy_test_lock();
    require_landlock();
    let (_dir, run) = common::nobody_dir("torii-ll-nobody");
    let other = run.parent().expect("test dir").join("other");
    std::fs::create_dir(&other).or_fail("dir");
    std::os::unix::fs::chown(&other, Some(common::NOBODY), Some(common::NOBODY)).or_fail("chown");
    let (v_sock, d_sock, img) = (run.join("v.sock"), run.join("d.sock"), run.join("d.img"));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .or_fail("image");
    std::os::unix::fs::chown(&img, Some(common::NOBODY), Some(common::NOBODY)).or_fail("chown");
    let wrapper = common::as_nobody("");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut dp = common::Daemon::start_under(
        &wrapper,
        &run,
        "landlock = \"enforce\"\nseccomp = \"enforce\"",
        &common::vhost_to_sink_and_disk(&v_sock, &d_sock, &img),
    );
    let pid = dp.pid();
    assert_eq!(
        status_field(pid, "Uid:").split_whitespace().next(),
        Some("65534")
    );
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    let tx = common::sender(&v_sock);
    dp.wait_port("v", Duration::from_secs(30), "traffic on v", |p| {
        p["rx_packets"].as_u64().unwrap_or(0) > 10_000
    });
    drop(tx);
    write_and_read_back(&d_sock, &SMALL, 0x6b).or_fail("disk");
    let outside = other.join("v2.sock");
    let err = dp.ctl_err(&[
        "add",
        "v2",
        "type=vhost-user",
        &format!("socket=\"{}\"", outside.display()),
    ]);
    assert!(err.contains("denied by the Landlock sandbox"), "{err}");
    assert!(!outside.exists());
    dp.stop();
}
