//! The Landlock file-system sandbox of `torii-vhost-user-blk` (docs/security.md#landlock):
//! with `--landlock enforce` (or `landlock = "enforce"` in `[daemon]`) the daemon serves its
//! exports (a client's writes read back) with no_new_privs set even without seccomp; an
//! export whose image or socket is outside what the settings imply is refused by the kernel
//! with an error that names Landlock and `landlock_paths` (shown in a process restricted by
//! the same code the daemon runs, since the daemon opens nothing after it starts); the rules
//! print; bad settings are refused.
//!
//! Needs a kernel with Landlock: without it these tests fail (they never skip).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{image, OrFail};
use torii_perf::blk_client::{write_and_read_back, ClientConfig};
use torii_perf::proc_util::{self, status_field, wait_until, ChildGuard};
use torii_vhost_user::landlock;
use torii_vhost_user_blk::{settings, BlkExport};

/// A disk client's layout: one queue, 4 KiB requests.
const SMALL: ClientConfig = ClientConfig {
    queues: 1,
    queue_size: 64,
    slots: 4,
    max_bytes: 4096,
    segments: 1,
};

const BIN: &str = env!("CARGO_BIN_EXE_torii-vhost-user-blk");

fn require_landlock() {
    if let Err(e) = landlock::kernel_abi() {
        panic!("prerequisite: a kernel with Landlock (CONFIG_SECURITY_LANDLOCK=y, landlock in the lsm= boot parameter): {e}");
    }
}

/// `<tmp>/{allowed,outside}`.
fn dirs(tag: &str) -> (proc_util::TmpDir, PathBuf, PathBuf) {
    let dir = proc_util::unique_tmp_dir(tag).or_fail("tmp dir");
    let (allowed, outside) = (dir.join("allowed"), dir.join("outside"));
    for d in [&allowed, &outside] {
        std::fs::create_dir(d).or_fail("dir");
    }
    (dir, allowed, outside)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn the_sandboxed_daemon_serves_its_exports() {
    require_landlock();
    let (_dir, allowed, _outside) = dirs("torii-blk-landlock");
    let (a_img, b_img) = (image(&allowed, "a.img", 8), image(&allowed, "b.img", 8));
    let (a_sock, b_sock) = (allowed.join("a.sock"), allowed.join("b.sock"));
    let (cfg, log) = (allowed.join("blk.toml"), allowed.join("blk.log"));
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nlandlock = \"enforce\"\nseccomp = \"off\"\n[[export]]\nname = \"a\"\nsocket = \"{}\"\nfile = \"{}\"\n[[export]]\nname = \"b\"\nsocket = \"{}\"\nfile = \"{}\"\nworkers = 2\nqueues = 2\n",
            a_sock.display(),
            a_img.display(),
            b_sock.display(),
            b_img.display()
        ),
    )
    .or_fail("config");
    let child = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .env("TORII_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).or_fail("log"))
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(&log)
                .or_fail("log"),
        )
        .spawn()
        .or_fail("spawning torii-vhost-user-blk");
    let mut child = ChildGuard::new(child, "torii-vhost-user-blk");
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        a_sock.exists() && b_sock.exists()
    });
    assert!(up, "no sockets; log:\n{}", read(&log));
    let text = read(&log);
    assert!(
        text.contains("file-system sandbox: Landlock ABI")
            && text.contains("no other thread was running")
            && text.contains("landlock=enforce"),
        "{text}"
    );
    write_and_read_back(&a_sock, &SMALL, 0x11).or_fail("export");
    write_and_read_back(&b_sock, &SMALL, 0x22).or_fail("export");
    // No seccomp filter, yet no_new_privs: Landlock set it to restrict the process.
    let pid = child.pid();
    assert_eq!(status_field(pid, "Seccomp:"), "0");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    child.signal(libc::SIGTERM).or_fail("SIGTERM");
    let st = child.wait_timeout(Duration::from_secs(10)).or_fail("wait");
    assert!(
        matches!(st, Some(s) if s.success()),
        "{st:?}: {}",
        read(&log)
    );
    assert!(!a_sock.exists() && !b_sock.exists(), "sockets left behind");

    // The command line's --landlock wins over the file, with the default seccomp too.
    let log2 = allowed.join("blk2.log");
    let child = Command::new(BIN)
        .args(["--socket", a_sock.to_str().unwrap()])
        .args(["--file", a_img.to_str().unwrap()])
        .args(["--landlock", "enforce"])
        .env("TORII_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log2).or_fail("log"))
        .spawn()
        .or_fail("spawning torii-vhost-user-blk");
    let mut child = ChildGuard::new(child, "torii-vhost-user-blk");
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            a_sock.exists()
        }),
        "{}",
        read(&log2)
    );
    write_and_read_back(&a_sock, &SMALL, 0x33).or_fail("export");
    assert!(read(&log2).contains("file-system sandbox: Landlock ABI"));
    assert!(read(&log2).contains("per-thread seccomp filters seccomp=enforce"));
    child.signal(libc::SIGTERM).or_fail("SIGTERM");
    let st = child.wait_timeout(Duration::from_secs(10)).or_fail("wait");
    assert!(
        matches!(st, Some(s) if s.success()),
        "{st:?}: {}",
        read(&log2)
    );
}

/// The environment variable that makes the test below its own child.
const CHILD: &str = "TORII_BLK_LANDLOCK_CHILD";

/// In a child process (this test binary run again): the daemon's settings, rules and
/// `landlock::restrict` as `main` applies them; then an export the settings name starts and
/// serves, and exports whose image or socket lies elsewhere are refused by the kernel with
/// the sandbox's error.
#[test]
fn exports_outside_the_sandbox_are_refused_with_a_landlock_error() {
    if let Ok(dir) = std::env::var(CHILD) {
        restricted_child(Path::new(&dir));
        return;
    }
    require_landlock();
    let (dir, _allowed, _outside) = dirs("torii-blk-landlock-child");
    let out = Command::new(std::env::current_exe().or_fail("test binary"))
        .args([
            "--exact",
            "exports_outside_the_sandbox_are_refused_with_a_landlock_error",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, dir.path())
        .output()
        .or_fail("running the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("child: every check passed"), "{text}");
}

fn restricted_child(dir: &Path) {
    let (allowed, outside) = (dir.join("allowed"), dir.join("outside"));
    let img = image(&allowed, "a.img", 8);
    let outside_img = image(&outside, "o.img", 8);
    let export = |name: &str, socket: &Path, file: &Path| {
        format!(
            "[[export]]\nname = \"{name}\"\nsocket = \"{}\"\nfile = \"{}\"\n",
            socket.display(),
            file.display()
        )
    };
    let s = settings::parse(&format!(
        "[daemon]\nlandlock = \"enforce\"\n{}",
        export("a", &allowed.join("a.sock"), &img)
    ))
    .or_fail("settings");
    let a = landlock::restrict(&s.landlock_rules(), settings::LANDLOCK_EXTEND)
        .or_fail("restricting this process");
    println!("child: {}", landlock::summary(&a));
    let mut exports = s.exports;
    let mut served = BlkExport::start(exports.remove(0)).or_fail("the allowed export");
    write_and_read_back(&allowed.join("a.sock"), &SMALL, 0x44).or_fail("export");
    served.stop();

    let refused = |text: String| {
        let cfg = settings::parse(&text).or_fail("settings").exports.remove(0);
        match BlkExport::start(cfg) {
            Ok(_) => panic!("started outside the sandbox: {text}"),
            Err(e) => e.to_string(),
        }
    };
    // An image outside.
    let e = refused(export("o", &allowed.join("o.sock"), &outside_img));
    assert!(
        e.contains("cannot open")
            && e.contains("denied by the Landlock sandbox")
            && e.contains(&format!("add {} (or its directory)", outside_img.display()))
            && e.contains("`landlock_paths` in [daemon] (or --landlock-path)"),
        "{e}"
    );
    // A socket outside, for an allowed image.
    let e = refused(export("o", &outside.join("o.sock"), &img));
    assert!(
        e.contains("cannot listen on vhost-user socket")
            && e.contains("denied by the Landlock sandbox")
            && e.contains(&format!("add {} to", outside.display())),
        "{e}"
    );
    assert!(!outside.join("o.sock").exists());
    // Any other file: the kernel refuses this whole process, not just the exports' code.
    let e = std::fs::read("/etc/passwd").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    println!("child: every check passed");
}

#[test]
fn the_rules_print_and_bad_settings_are_refused() {
    let (_dir, allowed, outside) = dirs("torii-blk-landlock-cli");
    let img = image(&allowed, "a.img", 1);
    let sock = allowed.join("a.sock");
    let o = Command::new(BIN)
        .args(["--socket", sock.to_str().unwrap()])
        .args(["--file", img.to_str().unwrap(), "--read-only"])
        .args(["--landlock-path", outside.to_str().unwrap()])
        .arg("--print-landlock")
        .output()
        .or_fail("--print-landlock");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    for want in [
        format!(
            "{}\n  remove-file make-sock resolve-unix\n  for: export \"blk0\" socket\n",
            allowed.display()
        ),
        format!(
            "{}\n  read-file\n  for: export \"blk0\" image\n",
            img.display()
        ),
        format!("{}\n  read-file write-file read-dir", outside.display()),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }
    assert!(!sock.exists(), "printing started the export");

    let fail = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(["--socket", sock.to_str().unwrap()])
            .args(["--file", img.to_str().unwrap()])
            .args(args)
            .output()
            .or_fail("torii-vhost-user-blk");
        assert!(!o.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = fail(&["--landlock", "log"]);
    assert!(e.contains("unknown landlock mode \"log\""), "{e}");
    let e = fail(&["--landlock-path", "relative/dir"]);
    assert!(
        e.contains("landlock_paths: relative/dir is not an absolute path"),
        "{e}"
    );
    let missing = outside.join("missing");
    let e = fail(&[
        "--landlock",
        "enforce",
        "--landlock-path",
        missing.to_str().unwrap(),
    ]);
    assert!(
        e.contains(&format!("landlock: cannot allow {}", missing.display())),
        "{e}"
    );
    assert!(!sock.exists(), "socket left behind");
}
