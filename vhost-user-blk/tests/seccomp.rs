//! Per-thread seccomp filters in the real `torii-vhost-user-blk` (docs/security.md):
//! with the default mode every thread has a filter (`Seccomp: 2` in
//! `/proc/<pid>/task/*/status`), the threads that narrow the control filter with their own
//! class have two (the watchers three), I/O and metrics work, and the daemon stops cleanly.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{image, OrFail};
use torii_perf::blk_client::{BlkClient, ClientConfig};
use torii_perf::blk_job::{run_spec, Pattern, RunSpec};
use torii_perf::fault;
use torii_perf::proc_util::{self, wait_until, ChildGuard};

const BIN: &str = env!("CARGO_BIN_EXE_torii-vhost-user-blk");

/// Starts the daemon with `args`, its output in `log`; waits for `socket`.
fn spawn(args: &[&str], log: &Path, socket: &Path) -> ChildGuard {
    let out = std::fs::File::create(log).or_fail("log");
    let child = Command::new(BIN)
        .args(args)
        .env("TORII_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().or_fail("log"))
        .stderr(out)
        .spawn()
        .or_fail("spawning torii-vhost-user-blk");
    let child = ChildGuard::new(child, "torii-vhost-user-blk");
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        socket.exists()
    });
    assert!(up, "no socket; log:\n{}", read(log));
    child
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// SIGTERM; the daemon must exit cleanly.
fn stop(mut c: ChildGuard, log: &Path) {
    c.signal(libc::SIGTERM).or_fail("SIGTERM");
    let st = c.wait_timeout(Duration::from_secs(10)).or_fail("waiting");
    assert!(
        matches!(st, Some(s) if s.success()),
        "exit {st:?}; log:\n{}",
        read(log)
    );
}

#[test]
fn every_thread_is_filtered_and_io_and_metrics_work() {
    let dir = proc_util::unique_tmp_dir("torii-blk-seccomp").or_fail("tmp dir");
    let d = dir.path();
    let img = image(d, "disk.img", 32);
    let (socket, log, cfg) = (d.join("sc.sock"), d.join("blk.log"), d.join("blk.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nmetrics_listen = \"127.0.0.1:0\"\n[[export]]\nname = \"sc\"\nsocket = \"{}\"\nfile = \"{}\"\nqueues = 2\nworkers = 2\n",
            socket.display(),
            img.display()
        ),
    )
    .or_fail("config");
    let child = spawn(&["--config", cfg.to_str().unwrap()], &log, &socket);
    assert!(
        read(&log).contains("per-thread seccomp filters seccomp=enforce"),
        "{}",
        read(&log)
    );

    // Data written reads back, through both workers' io_urings.
    let spec = RunSpec {
        pattern: Pattern::Verify,
        bs: 4096,
        iodepth: 16,
        numjobs: 2,
        runtime: Duration::from_secs(1),
        size: 16 << 20,
        seed: 5,
        queue_size: 128,
        segments: 1,
    };
    let r = run_spec(&socket, &spec).or_fail("client run");
    assert_eq!((r.errors, r.mismatches), (0, 0), "{r:?}");
    assert!(r.ios > 0, "{r:?}");

    // A connection keeps every kind of thread alive while we look.
    let client = BlkClient::connect(
        &socket,
        &ClientConfig {
            queues: 2,
            queue_size: 128,
            slots: 8,
            max_bytes: 4096,
            segments: 1,
        },
    )
    .or_fail("client");
    // Threads a connection starts may still be starting: wait for their names and filters.
    let want = [
        "torii-vhost-use",
        "vhu-sc",
        "kick-sc",
        "vhu-sc-stop",
        "blk-sc-0",
        "blk-sc-1",
        "metrics",
    ];
    let pid = child.pid();
    let ts = fault::started_and_filtered(pid, &want);
    for (name, mode, filters) in &ts {
        assert_eq!(
            *mode, 2,
            "thread {name} runs without a seccomp filter: {ts:?}"
        );
        let want = match name.as_str() {
            "torii-vhost-use" => 1,
            n if n.starts_with("kick-") || n.ends_with("-stop") => 3,
            _ => 2,
        };
        assert_eq!(*filters, want, "thread {name}: {ts:?}");
    }

    // The metrics thread serves under its filter.
    let text = read(&log);
    let addr = text
        .lines()
        .find_map(|l| l.split("bound=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{text}"));
    let mut s = std::net::TcpStream::connect(addr).or_fail("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .or_fail("metrics request");
    let mut body = String::new();
    s.read_to_string(&mut body).or_fail("metrics answer");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("sc"), "{body}");

    drop(client);
    stop(child, &log);
    let text = read(&log);
    assert!(!text.contains("seccomp: thread"), "{text}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn off_installs_nothing_and_the_lists_print() {
    let dir = proc_util::unique_tmp_dir("torii-blk-seccomp-off").or_fail("tmp dir");
    let d = dir.path();
    let img = image(d, "disk.img", 8);
    let (socket, log) = (d.join("off.sock"), d.join("off.log"));
    let args = [
        "--socket",
        socket.to_str().unwrap(),
        "--file",
        img.to_str().unwrap(),
        "--seccomp",
        "off",
    ];
    let child = spawn(&args, &log, &socket);
    let ts = fault::seccomp_threads(child.pid());
    assert!(ts.iter().all(|t| t.1 == 0 && t.2 == 0), "{ts:?}");
    stop(child, &log);

    let o = Command::new(BIN)
        .args(["--socket", "/nonexistent/x.sock", "--file", "/dev/null"])
        .args(["--seccomp", "strict"])
        .output()
        .or_fail("bad mode");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("strict"), "{err}");

    let o = Command::new(BIN)
        .arg("--print-seccomp")
        .output()
        .or_fail("--print-seccomp");
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for class in ["control", "vhost-user", "watcher", "io-worker", "metrics"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{class} (")) && l.ends_with(" system calls")),
            "{class} missing:\n{text}"
        );
    }
    // No PMDs or taps in this daemon.
    assert!(
        !text.contains("pmd (") && !text.contains("TUNSETIFF"),
        "{text}"
    );
    assert!(text.contains("  io_uring_enter\n"), "{text}");
}
