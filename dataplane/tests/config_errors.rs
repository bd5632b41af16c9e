//! A bad configuration gets a clear error and leaves nothing behind: no socket, no tap.

mod common;

use std::process::Command;

use common::OrFail;
use torii_perf::{prereq, proc_util};

fn run(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_torii-dataplane"))
        .args(["run", "-c"])
        .arg(config)
        .output()
        .or_fail("running torii-dataplane");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn link_exists(ifname: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{ifname}")).exists()
}

#[test]
fn failing_port_tears_down_the_ports_made_before_it() {
    prereq::require_root().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-cfg").or_fail("tmp dir");
    let sock = dir.join("a.sock");
    let tap = common::ifname("c");
    let cfg = dir.join("bad.toml");
    // Valid on paper; the third port fails when created: "lo" is not a tap.
    std::fs::write(
        &cfg,
        format!(
            r#"
[dataplane]
control_socket = "{ctl}"
[[port]]
name = "a"
type = "vhost-user"
socket = "{}"
[[port]]
name = "t"
type = "tap"
ifname = "{tap}"
[[port]]
name = "bad"
type = "tap"
ifname = "lo"
"#,
            sock.display(),
            ctl = dir.join("control.sock").display()
        ),
    )
    .or_fail("writing config");
    let (ok, err) = run(&cfg);
    assert!(!ok, "daemon accepted a config whose port cannot be made");
    assert!(
        err.contains("port \"bad\"") && err.contains("lo"),
        "unclear error: {err}"
    );
    assert!(!sock.exists(), "socket of port a left behind");
    assert!(!link_exists(&tap), "tap {tap} left behind");
}

#[test]
fn failing_disk_tears_down_the_ports_and_disks_made_before_it() {
    prereq::require_root().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-cfg-disk").or_fail("tmp dir");
    let (sock, good_sock, bad_sock) =
        (dir.join("a.sock"), dir.join("d1.sock"), dir.join("d2.sock"));
    let img = dir.join("d1.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .or_fail("image");
    let tap = common::ifname("cd");
    let cfg = dir.join("bad.toml");
    // Valid on paper; the second disk's file does not exist.
    std::fs::write(
        &cfg,
        format!(
            r#"
[dataplane]
control_socket = "{ctl}"
[[port]]
name = "a"
type = "vhost-user"
socket = "{}"
[[port]]
name = "t"
type = "tap"
ifname = "{tap}"
[[disk]]
name = "d1"
socket = "{}"
file = "{}"
[[disk]]
name = "d2"
socket = "{}"
file = "{}/missing.img"
"#,
            sock.display(),
            good_sock.display(),
            img.display(),
            bad_sock.display(),
            dir.path().display(),
            ctl = dir.join("control.sock").display()
        ),
    )
    .or_fail("writing config");
    let (ok, err) = run(&cfg);
    assert!(!ok, "daemon accepted a disk whose file does not exist");
    assert!(
        err.contains("disk \"d2\"") && err.contains("missing.img"),
        "unclear error: {err}"
    );
    for s in [&sock, &good_sock, &bad_sock] {
        assert!(!s.exists(), "socket {} left behind", s.display());
    }
    assert!(!link_exists(&tap), "tap {tap} left behind");
}

#[test]
fn a_socket_in_a_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    prereq::require_root().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-cfg-open").or_fail("tmp dir");
    let open = dir.join("open");
    std::fs::create_dir(&open).or_fail("dir");
    // Sticky or not: anyone could bind a socket of theirs under a free name first.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).or_fail("chmod");
    let (good, bad) = (dir.join("a.sock"), open.join("b.sock"));
    let tap = common::ifname("co");
    let cfg = dir.join("open.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\ncontrol_socket = \"{ctl}\"\n\
             [[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n\
             [[port]]\nname = \"t\"\ntype = \"tap\"\nifname = \"{tap}\"\n\
             [[port]]\nname = \"b\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n",
            good.display(),
            bad.display(),
            ctl = dir.join("control.sock").display()
        ),
    )
    .or_fail("writing config");
    let (ok, err) = run(&cfg);
    assert!(!ok, "daemon listened in a world-writable directory");
    assert!(
        err.contains("port \"b\"") && err.contains("writable by other users"),
        "unclear error: {err}"
    );
    for s in [&good, &bad] {
        assert!(!s.exists(), "socket {} left behind", s.display());
    }
    assert!(!link_exists(&tap), "tap {tap} left behind");

    // The control socket too.
    let cfg2 = dir.join("open-ctl.toml");
    std::fs::write(
        &cfg2,
        format!(
            "[dataplane]\ncontrol_socket = \"{}\"\n",
            open.join("control.sock").display()
        ),
    )
    .or_fail("writing config");
    let (ok, err) = run(&cfg2);
    assert!(!ok, "control socket in a world-writable directory");
    assert!(
        err.contains("writable by other users"),
        "unclear error: {err}"
    );
    assert!(!open.join("control.sock").exists());
}

#[test]
fn invalid_configs_are_refused_before_anything_is_made() {
    let dir = proc_util::unique_tmp_dir("torii-cfg2").or_fail("tmp dir");
    let sock = dir.join("s.sock");
    let cases = [
        (
            format!("[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"{}\"\nqueus = 2\n", sock.display()),
            "unknown field `queus`",
        ),
        (
            format!(
                "[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n[[xconnect]]\nports = [\"a\", \"b\"]\n",
                sock.display()
            ),
            "unknown port \"b\"",
        ),
        ("[dataplane]\npmd_cpus = [4096]\n".to_string(), "CPU 4096 does not exist"),
        (
            format!(
                "[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"{0}\"\n[[disk]]\nname = \"d\"\nsocket = \"{0}\"\nfile = \"/dev/null\"\n",
                sock.display()
            ),
            "disk \"d\": socket",
        ),
        (
            format!("[[disk]]\nname = \"d\"\nsocket = \"{}\"\nfile = \"x.img\"\nqueues = 0\n", sock.display()),
            "queues must be between 1",
        ),
        (
            format!("[[disk]]\nname = \"d\"\nsocket = \"{}\"\nfile = \"x.img\"\nsize = 1\n", sock.display()),
            "unknown field `size`",
        ),
        ("this is not toml".to_string(), "TOML parse error"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let cfg = dir.join(format!("c{i}.toml"));
        std::fs::write(&cfg, text).or_fail("writing config");
        let (ok, err) = run(&cfg);
        assert!(!ok, "case {i} accepted");
        assert!(
            err.contains(want),
            "case {i}: {err:?} does not say {want:?}"
        );
        assert!(!sock.exists(), "case {i} created the socket");
        let check = Command::new(env!("CARGO_BIN_EXE_torii-dataplane"))
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .or_fail("check");
        assert!(!check.status.success(), "check accepted case {i}");
    }
}
