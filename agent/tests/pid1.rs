//! torii-agent's processes as PID 1 has them: one reaper waits for every child (this test
//! process is made a child subreaper, so orphans come to it as they would to PID 1). Quick
//! exits, failed execs and orphans racing the reaper: every status goes where it belongs, no
//! spawn fails for the reaper's sake, no zombie is left.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Host;
use serde_json::json;
use torii_agent::process::Processes;
use torii_agent::server::{Agent, Roots};

/// A directory removed however the test ends.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// This process's children (all its threads'), from /proc.
fn children() -> Vec<String> {
    let mut v = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = t.unwrap().path().join("children");
        if let Ok(c) = std::fs::read_to_string(p) {
            v.extend(c.split_whitespace().map(str::to_string));
        }
    }
    v
}

#[test]
fn the_reaper_and_spawns_do_not_race() {
    // SAFETY: prctl(2) PR_SET_CHILD_SUBREAPER takes no pointers.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    // `init` stays false: `shutdown` must never power this machine off.
    let agent = Arc::new(Agent {
        processes: Processes::new(true).unwrap(),
        init: false,
        roots: Roots::default(),
    });
    let mut h = Host::serving(agent, None);
    let dir =
        TempDir(std::env::temp_dir().join(format!("torii-agent-pid1-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let script = dir.0.join("broken");
    // Found and executable, yet its exec fails: its interpreter is missing.
    std::fs::write(&script, "#!/no/such/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // Many at once: quick exits, failed execs, exits that leave orphans behind.
    let mut starts = Vec::new();
    for i in 0..60 {
        let argv = match i % 3 {
            0 => json!(["sh", "-c", format!("exit {}", i % 50)]),
            1 => json!([script]),
            _ => json!(["sh", "-c", "sleep 0.1 & exit 0"]),
        };
        starts.push((i, h.send("start_process", json!({ "argv": argv }))));
    }
    let mut waits = Vec::new();
    for (i, id) in starts {
        let a = h.answer(id);
        if i % 3 == 1 {
            let e = &a["error"];
            assert_eq!(e["code"], "failed", "{a}");
            assert!(
                e["message"].as_str().unwrap().contains("No such file"),
                "{a}"
            );
            continue;
        }
        let name = a["result"]["process"]
            .as_str()
            .expect("started")
            .to_string();
        waits.push((i, h.send("wait_process", json!({ "process": name }))));
    }
    for (i, id) in waits {
        let a = h.answer(id);
        let code = if i % 3 == 0 { i % 50 } else { 0 };
        assert_eq!(
            a["result"],
            json!({"exit_code": code, "signal": null}),
            "{i}: {a}"
        );
    }
    // The orphans were reaped too.
    let t = Instant::now();
    while !children().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "children left: {:?}",
            children()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
