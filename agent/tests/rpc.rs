//! torii-agent's RPC over a socketpair, as the host drives it: version and health, processes
//! with streamed output, stdin, exit codes and signals, and hostile input — bad frames, bad
//! JSON, unknown methods and fields, a huge length, a flood of requests — answered with errors,
//! never a crash.

mod common;

use base64::Engine as _;
use common::Host;
use serde_json::{json, Value};
use torii_agent::protocol::{read_frame, write_frame};

#[test]
fn version_health_and_processes() {
    let mut h = Host::start();
    assert_eq!(h.call("version", json!({}))["protocol"], 1);
    assert_eq!(h.call("health", Value::Null)["status"], "serving");
    let (out, err, exit) = h.run(&["sh", "-c", "echo out; echo err >&2; exit 3"], None);
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(exit, json!({"exit_code": 3, "signal": null}));
    // Output larger than one event, byte-exact.
    let (out, _, exit) = h.run(&["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"], None);
    assert_eq!(out.len(), 300_000);
    assert!(out.bytes().all(|b| b == b'x'));
    assert_eq!(exit["exit_code"], 0);
    // Stdin from the host.
    let (out, _, _) = h.run(&["cat"], Some(b"hello from the host\n"));
    assert_eq!(out, "hello from the host\n");
    // Environment and working directory.
    let p = h.call(
        "start_process",
        json!({"argv": ["sh", "-c", "echo $GREETING; pwd"], "env": ["GREETING=hi", "PATH=/usr/bin:/bin"], "cwd": "/tmp"}),
    );
    let name = p["process"].as_str().unwrap().to_string();
    h.call("wait_process", json!({"process": name}));
    let outs: Vec<String> = h
        .seen
        .iter()
        .filter(|v| v["process"] == name.as_str())
        .map(|v| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(v["data"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        })
        .collect();
    assert_eq!(outs.concat(), "hi\n/tmp\n");
    // A signal: the exit says which.
    let p = h.call("start_process", json!({"argv": ["sleep", "30"]}));
    let name = p["process"].as_str().unwrap().to_string();
    h.call("kill_process", json!({"process": name, "signal": 9}));
    let exit = h.call("wait_process", json!({"process": name}));
    assert_eq!(exit, json!({"exit_code": 137, "signal": 9}));
    // Killing it again, once it is gone, is no error; an unknown process is.
    h.call("kill_process", json!({"process": name}));
    assert_eq!(
        h.call_err("wait_process", json!({"process": "p999"}))["code"],
        "not_found"
    );
    // A program that does not exist.
    let e = h.call_err("start_process", json!({"argv": ["/no/such/program"]}));
    assert_eq!(e["code"], "failed");
    assert!(
        e["message"].as_str().unwrap().contains("/no/such/program"),
        "{e}"
    );
    // Metrics.
    let m = h.call("metrics", json!({}));
    assert!(m["memory"]["MemTotal"].as_u64() > Some(0), "{m}");
    assert!(m["interfaces"]["lo"].is_object(), "{m}");
    // Not the guest's init: no power off.
    assert_eq!(h.call_err("shutdown", json!({}))["code"], "failed");
}

#[test]
fn hostile_input_gets_errors_and_the_agent_keeps_serving() {
    let mut h = Host::start();
    // Not JSON: an error with no id; the connection goes on.
    h.send_raw(&[0, 0, 0, 5, b'{', b'x', b'x', b'x', b'}']);
    let a = h.expect(|v| v["id"].is_null());
    assert_eq!(a["error"]["code"], "bad_request", "{a}");
    // An empty frame.
    h.send_raw(&[0, 0, 0, 0]);
    let a = h.expect(|v| v["id"].is_null());
    assert_eq!(a["error"]["code"], "bad_frame", "{a}");
    // JSON of the wrong shape, with an id: answered under that id.
    let f = br#"{"id": 77, "method": 5}"#;
    h.send_raw(&(f.len() as u32).to_be_bytes());
    h.send_raw(f);
    assert_eq!(h.answer(77)["error"]["code"], "bad_request");
    // An unknown method, unknown and wrong parameters.
    assert_eq!(
        h.call_err("format_disk", json!({}))["code"],
        "unknown_method"
    );
    assert_eq!(
        h.call_err("start_process", json!({"argv": []}))["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err("start_process", json!({"argv": ["true"], "color": 1}))["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err("start_process", json!({"argv": "true"}))["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err("start_process", json!({"argv": ["a\u{0}b"]}))["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err(
            "start_process",
            json!({"argv": ["true"], "env": ["NOEQUALS"]})
        )["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err("kill_process", json!({"process": "p1", "signal": 99}))["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err("write_stdin", json!({"process": "p1", "data": "!!"}))["code"],
        "bad_params"
    );
    // A flood: more requests in flight than allowed get `busy`; the rest are served.
    let p = h.call("start_process", json!({"argv": ["sleep", "2"]}));
    let name = p["process"].as_str().unwrap().to_string();
    let ids: Vec<u64> = (0..100)
        .map(|_| h.send("wait_process", json!({"process": name})))
        .collect();
    let answers: Vec<Value> = ids.iter().map(|id| h.answer(*id)).collect();
    let busy = answers
        .iter()
        .filter(|a| a["error"]["code"] == "busy")
        .count();
    let done = answers
        .iter()
        .filter(|a| a["result"]["exit_code"] == 0)
        .count();
    assert_eq!(busy + done, 100, "{answers:?}");
    assert!(busy > 0 && done >= 60, "busy {busy}, done {done}");
    // Still serving.
    assert_eq!(h.call("health", json!({}))["status"], "serving");
    // A length over the limit cannot be skipped: the agent answers why and ends the
    // connection, without reading (or allocating) the rest.
    h.send_raw(&[0x7f, 0xff, 0xff, 0xff]);
    let a = h.expect(|v| v["id"].is_null());
    assert_eq!(a["error"]["code"], "bad_frame", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit"),
        "{a}"
    );
    let r = h.served.join().unwrap();
    assert!(r.is_err());
}

#[test]
fn a_cut_connection_ends_the_session_cleanly() {
    let h = Host::start();
    let Host { s, served, .. } = h;
    // The host goes away between frames: the session ends without error.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(served.join().unwrap().is_ok());
}

fn b64(d: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(d)
}

/// A directory for one test, removed at the end.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("torii-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn programs_and_directories_are_checked_before_the_spawn() {
    let mut h = Host::start();
    let d = TempDir::new("exe");
    std::fs::write(d.0.join("data"), "not a program").unwrap();
    for (params, says) in [
        (json!({"argv": ["no-such-program"]}), "not found in PATH"),
        // The request's PATH is the one searched.
        (
            json!({"argv": ["sh", "-c", "true"], "env": [format!("PATH={}", d.0.display())]}),
            "not found in PATH",
        ),
        (json!({"argv": [d.0.join("data")]}), "not executable"),
        (json!({"argv": [&d.0]}), "not a regular file"),
        (json!({"argv": ["true"], "cwd": "/no/such/dir"}), "cwd"),
        (
            json!({"argv": ["true"], "cwd": d.0.join("data")}),
            "not a directory",
        ),
    ] {
        let e = h.call_err("start_process", params.clone());
        assert_eq!(e["code"], "failed", "{params}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(says),
            "{params}: {e}"
        );
    }
    // A relative program is taken in cwd; a process whose env has no PATH gets the default.
    std::fs::write(d.0.join("tool"), "#!/bin/sh\necho \"tool $PATH\"\n").unwrap();
    std::fs::set_permissions(
        d.0.join("tool"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let p = h.call(
        "start_process",
        json!({"argv": ["./tool"], "cwd": d.0, "env": ["A=1"]}),
    );
    let name = p["process"].as_str().unwrap().to_string();
    h.call("wait_process", json!({"process": name}));
    let (out, _) = h.output(&name);
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("tool /"), "{out}");
    for dir in ["/bin", "/sbin", "/usr/bin", "/usr/sbin"] {
        assert!(out.trim().split(':').any(|x| x == dir), "{out}");
    }
    // The program runs from where it was found, with argv[0] as given (multi-call binaries
    // go by it).
    let (out, _, _) = h.run(&["cat", "/proc/self/cmdline"], None);
    assert_eq!(out, "cat\0/proc/self/cmdline\0");
}

#[test]
fn kill_reaches_what_the_process_left_holding_its_output() {
    let mut h = Host::start();
    // The shell exits at once; the sleep it started keeps stdout open, so the wait lasts.
    let p = h.call(
        "start_process",
        json!({"argv": ["sh", "-c", "sleep 30 & echo started"]}),
    );
    let name = p["process"].as_str().unwrap().to_string();
    let pid = p["pid"].as_i64().unwrap();
    // Until the shell is gone (its /proc entry with it, once reaped).
    let t = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < common::T, "the shell did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let w = h.send("wait_process", json!({"process": name}));
    h.call("kill_process", json!({"process": name, "signal": 9}));
    // The shell's own exit, once the group's output is closed.
    assert_eq!(
        h.answer(w)["result"],
        json!({"exit_code": 0, "signal": null})
    );
    assert_eq!(h.output(&name).0, b"started\n");
    // All gone now: killing is no error.
    h.call("kill_process", json!({"process": name}));
}

#[test]
fn close_stdin_waits_for_a_blocked_write() {
    let mut h = Host::start();
    // Reads nothing for a while: a write of more than the pipe holds blocks meanwhile.
    let p = h.call(
        "start_process",
        json!({"argv": ["sh", "-c", "sleep 1; wc -c"], "stdin": true}),
    );
    let name = p["process"].as_str().unwrap().to_string();
    let data = vec![b'x'; 1 << 20];
    let w = h.send("write_stdin", json!({"process": name, "data": b64(&data)}));
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Sent while the write is blocked: applied after it, not lost.
    let c = h.send("close_stdin", json!({"process": name}));
    let (w, c) = (h.answer(w), h.answer(c));
    assert!(w.get("error").is_none(), "{w}");
    assert!(c.get("error").is_none(), "{c}");
    assert_eq!(
        h.call("wait_process", json!({"process": name}))["exit_code"],
        0
    );
    assert_eq!(
        String::from_utf8(h.output(&name).0).unwrap().trim(),
        "1048576"
    );
    // Closed: a write now is refused.
    assert_eq!(
        h.call_err("write_stdin", json!({"process": name, "data": "eA=="}))["code"],
        "failed"
    );
}

#[test]
fn echoed_input_is_cut_and_a_dead_writer_ends_the_reads() {
    let mut h = Host::start();
    // A method name that, quoted whole, would make an answer over the frame limit.
    let huge = "\"".repeat(3 << 19);
    let e = h.call_err(&huge, json!({}));
    assert_eq!(e["code"], "unknown_method");
    assert!(
        e["message"].as_str().unwrap().len() < 2048,
        "{}",
        e["message"].as_str().unwrap().len()
    );
    let e = h.call_err("start_process", json!({"argv": [huge]}));
    assert_eq!(e["code"], "failed");
    assert!(e["message"].as_str().unwrap().len() < 2048);
    assert_eq!(h.call("health", json!({}))["status"], "serving");
    // The host stops reading: the agent's next write fails, and it stops reading requests too
    // (the session ends) instead of reading what it cannot answer.
    h.s.shutdown(std::net::Shutdown::Read).unwrap();
    h.send("health", json!({}));
    let Host { served, .. } = h;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(served.join().unwrap()));
    let r = rx.recv_timeout(common::T).expect("the session to end");
    assert!(r.unwrap_err().contains("Broken pipe"));
}

#[test]
fn a_slow_host_slows_the_output_down() {
    // A bare connection: nothing is read until the test says so.
    let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let agent = torii_agent::server::Agent::new(false).unwrap();
    let served = std::thread::spawn(move || torii_agent::transport::serve_unix(agent, b));
    let d = TempDir::new("slow");
    let mark = d.0.join("done");
    let total = 20_000_000;
    let req = json!({"id": 1, "method": "start_process", "params": {"argv": ["sh", "-c",
        format!("head -c {total} /dev/zero; touch {}", mark.display())]}});
    write_frame(&mut a, &serde_json::to_vec(&req).unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    // With the host not reading, the queue filled and the output stopped being read.
    assert!(!mark.exists(), "all the output was buffered");
    let req = json!({"id": 2, "method": "wait_process", "params": {"process": "p1"}});
    write_frame(&mut a, &serde_json::to_vec(&req).unwrap()).unwrap();
    let mut got = 0;
    loop {
        let v: Value = serde_json::from_slice(&read_frame(&mut a).unwrap()).unwrap();
        if v["id"] == 2 {
            assert_eq!(v["result"]["exit_code"], 0, "{v}");
            break;
        }
        if v["event"] == "output" {
            got += base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap())
                .unwrap()
                .len();
        }
    }
    assert_eq!(got, total);
    assert!(mark.exists());
    a.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(served.join().unwrap().is_ok());
}

/// Starts a process that writes a line every 10 ms, forever.
fn chatty(h: &mut Host) -> String {
    let p = h.call(
        "start_process",
        json!({"argv": ["sh", "-c", "while :; do echo tick; sleep 0.01; done"]}),
    );
    let name = p["process"].as_str().unwrap().to_string();
    h.expect(|v| v["event"] == "output" && v["process"] == name.as_str());
    name
}

#[test]
fn a_new_connection_after_one_went_away_while_a_process_runs() {
    let d = TempDir::new("listen");
    let path = d.0.join("agent.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let agent = torii_agent::server::Agent::new(false).unwrap();
    std::thread::spawn(move || torii_agent::transport::serve_listener(&agent, &l, &|_| {}));
    let connect = || {
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        Host::connect(s, std::thread::spawn(|| Ok(())))
    };
    let mut h = connect();
    let name = chatty(&mut h);
    // The host goes away while the process runs and writes.
    drop(h);
    let mut h = connect();
    assert_eq!(h.call("health", json!({}))["status"], "serving");
    h.call("kill_process", json!({"process": name}));
    assert_eq!(
        h.call("wait_process", json!({"process": name})),
        json!({"exit_code": 143, "signal": 15})
    );
    // Its output went to the connection that started it, and is dropped with it.
    assert!(h.output(&name).0.is_empty());
}

#[test]
fn a_port_serves_one_host_after_another() {
    use std::os::unix::fs::OpenOptionsExt;
    // Two FIFOs behave as a virtio-serial port does: reads end (EOF, hang-up) while no host
    // is connected, and the agent opens them once.
    let d = TempDir::new("port");
    let (to_agent, from_agent) = (d.0.join("in"), d.0.join("out"));
    for f in [&to_agent, &from_agent] {
        let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
    let open = |p: &std::path::Path, read: bool, write: bool, flags: i32| {
        std::fs::OpenOptions::new()
            .read(read)
            .write(write)
            .custom_flags(flags)
            .open(p)
            .unwrap()
    };
    let port = torii_agent::transport::Port::from_files(
        open(&to_agent, true, false, libc::O_NONBLOCK),
        open(&from_agent, true, true, 0),
    )
    .unwrap();
    let agent = torii_agent::server::Agent::new(false).unwrap();
    std::thread::spawn(move || port.serve(&agent, &|_| {}));
    // The host reads everything the agent writes, across its connections.
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let mut out = open(&from_agent, true, false, 0);
    std::thread::spawn(move || {
        while let Ok(f) = read_frame(&mut out) {
            if tx.send(serde_json::from_slice(&f).unwrap()).is_err() {
                break;
            }
        }
    });
    let mut next_id = 0;
    let mut call = |w: &mut std::fs::File, method: &str, params: Value| -> Value {
        next_id += 1;
        let req = json!({"id": next_id, "method": method, "params": params});
        write_frame(w, &serde_json::to_vec(&req).unwrap()).unwrap();
        loop {
            let v = rx.recv_timeout(common::T).expect("an answer");
            if v["id"] == next_id {
                return v;
            }
            // Output after the second host's first answer would have leaked across.
            assert!(
                next_id <= 3 || v["event"] != "output",
                "output of the first host's process on the second: {v}"
            );
        }
    };
    let mut host = open(&to_agent, false, true, 0);
    let p = call(
        &mut host,
        "start_process",
        json!({"argv": ["sh", "-c", "while :; do echo tick; sleep 0.01; done"]}),
    );
    let name = p["result"]["process"].as_str().unwrap().to_string();
    assert_eq!(
        call(&mut host, "health", json!({}))["result"]["status"],
        "serving"
    );
    // The first host goes away; the next one is served on the same port.
    drop(host);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut host = open(&to_agent, false, true, 0);
    assert_eq!(
        call(&mut host, "health", json!({}))["result"]["status"],
        "serving"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    call(&mut host, "kill_process", json!({"process": name}));
    assert_eq!(
        call(&mut host, "wait_process", json!({"process": name}))["result"]["signal"],
        15
    );
}

#[test]
fn the_binary_says_ready_once_its_socket_listens() {
    use std::io::BufRead;
    let d = TempDir::new("bin");
    let path = d.0.join("agent.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_torii-agent"))
        .args(["--unix", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    err.read_line(&mut line).unwrap();
    assert_eq!(line, "torii-agent: ready\n");
    let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut h = Host::connect(s, std::thread::spawn(|| Ok(())));
    assert_eq!(h.call("version", json!({}))["protocol"], 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_process_runs_in_a_root_of_its_own() {
    let mut h = Host::start();
    // A minimal root: static busybox as /bin/busybox and /bin/sh, and an empty /work.
    let root = std::env::temp_dir().join(format!("torii-agent-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("work")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("work/marker"), "inside\n").unwrap();
    let r = root.to_str().unwrap();
    let (out, err, exit) = h.run_with(
        json!({"argv": ["sh", "-c", "pwd; /bin/busybox cat marker; /bin/busybox ls /"], "root": r, "cwd": "/work",
               "env": ["PATH=/bin"]}),
        None,
    );
    assert_eq!(exit["exit_code"], 0, "{err}");
    // Its / is the root given: only what was put there.
    assert_eq!(out, "/work\ninside\nbin\nwork\n");
    // The program is looked up inside the root, not on the host.
    let e = h.call_err(
        "start_process",
        json!({"argv": ["ip", "link"], "root": r, "env": ["PATH=/bin:/sbin:/usr/bin"]}),
    );
    assert_eq!(e["code"], "failed");
    assert!(e["message"].as_str().unwrap().contains("not found"), "{e}");
    // A program named by its absolute path, which only the root has, behind an absolute
    // symlink: both resolved inside the root (the host has no /opt/torii-only/echo).
    std::fs::create_dir_all(root.join("opt/torii-only")).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", root.join("opt/torii-only/echo")).unwrap();
    let (out, err, exit) = h.run_with(
        json!({"argv": ["/opt/torii-only/echo", "absolute"], "root": r}),
        None,
    );
    assert_eq!(exit["exit_code"], 0, "{err}");
    assert_eq!(out, "absolute\n");
    // A symlink that leads out of the root on the host leads nowhere inside it.
    std::os::unix::fs::symlink("/usr/bin/env", root.join("bin/env")).unwrap();
    let e = h.call_err("start_process", json!({"argv": ["/bin/env"], "root": r}));
    assert_eq!(e["code"], "failed", "{e}");
    // A relative root, one that is not there, a cwd outside what exists in it.
    let e = h.call_err("start_process", json!({"argv": ["sh"], "root": "rel"}));
    assert_eq!(e["code"], "bad_params");
    let e = h.call_err(
        "start_process",
        json!({"argv": ["sh"], "root": "/nonexistent-root"}),
    );
    assert_eq!(e["code"], "failed");
    let e = h.call_err(
        "start_process",
        json!({"argv": ["sh"], "root": r, "cwd": "/tmp"}),
    );
    assert_eq!(e["code"], "failed");
    let _ = std::fs::remove_dir_all(&root);
}

/// The agent's binary in a mount namespace of its own, private (nothing it mounts reaches the
/// host, and all of it goes with the process), serving on a Unix socket; killed on drop.
struct Isolated {
    child: std::process::Child,
    _dir: TempDir,
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Isolated {
    /// The agent in a mount namespace of its own (the tests run as root: scripts/test).
    fn start(tag: &str) -> (Isolated, Host) {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let dir = TempDir::new(tag);
        let path = dir.0.join("agent.sock");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_torii-agent"));
        cmd.arg("--unix")
            .arg(&path)
            .stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec the child only calls unshare(2) and mount(2), which
        // are async-signal-safe, with static C strings.
        unsafe {
            cmd.pre_exec(|| {
                let private = libc::MS_REC | libc::MS_PRIVATE;
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        private,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("the agent in a mount namespace of its own (run as root): {e}")
        });
        let mut line = String::new();
        std::io::BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "torii-agent: ready\n");
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let h = Host::connect(s, std::thread::spawn(|| Ok(())));
        (Isolated { child, _dir: dir }, h)
    }

    /// The agent's mounts at or below `dir`: (mount point, fstype, mount options, super
    /// options), in the order of its /proc/PID/mountinfo.
    fn mounts(&self, dir: &std::path::Path) -> Vec<(String, String, String, String)> {
        let dir = dir.to_str().unwrap();
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.child.id()))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.split_once(" - ")?;
                let a: Vec<&str> = a.split(' ').collect();
                let b: Vec<&str> = b.split(' ').collect();
                let point = a[4];
                (point == dir || point.starts_with(&format!("{dir}/"))).then(|| {
                    (
                        point.to_string(),
                        b[0].to_string(),
                        a[5].to_string(),
                        b.get(2).unwrap_or(&"").to_string(),
                    )
                })
            })
            .collect()
    }

    /// `path` as the agent sees it (through its mount namespace).
    fn seen(&self, path: &std::path::Path) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/proc/{}/root{}", self.child.id(), path.display()))
    }
}

#[test]
fn kernel_file_systems_and_binds_are_mounted_in_a_root_and_taken_down_together() {
    let (agent, mut h) = Isolated::start("mounts");
    let d = TempDir::new("mount-root");
    let top = std::fs::canonicalize(&d.0).unwrap();
    let rootfs = top.join("rootfs");
    let src = top.join("src");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("run")).unwrap();
    std::fs::create_dir_all(rootfs.join("var")).unwrap();
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello"), "hi\n").unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    // As in many images: /var/run is a symlink to /run.
    std::os::unix::fs::symlink("/run", rootfs.join("var/run")).unwrap();
    let (r, s) = (rootfs.to_str().unwrap(), src.to_str().unwrap());

    // The root file system is a mount of its own (as `mount_block` makes it): here a bind of
    // itself.
    let a = h.call("mount", json!({"source": r, "target": r, "fstype": "bind"}));
    assert_eq!(a, json!({"target": r}));
    // The OCI spec's mounts: the target given whole, or inside `root`.
    let proc_target = format!("{r}/proc");
    let a = h.call(
        "mount",
        json!({"source": "proc", "target": proc_target, "fstype": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
    );
    assert_eq!(a, json!({"target": proc_target}));
    for (source, target, fstype, options) in [
        (
            "tmpfs",
            "/dev",
            "tmpfs",
            json!(["nosuid", "strictatime", "mode=755", "size=65536k"]),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            json!([
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5"
            ]),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            json!(["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        ),
        (
            "mqueue",
            "/dev/mqueue",
            "mqueue",
            json!(["nosuid", "noexec", "nodev"]),
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            json!(["nosuid", "noexec", "nodev", "ro"]),
        ),
        (s, "/data", "none", json!(["rbind", "ro", "rprivate"])),
    ] {
        let a = h.call(
            "mount",
            json!({"source": source, "target": target, "fstype": fstype, "options": options, "root": r}),
        );
        assert_eq!(a, json!({"target": format!("{r}{target}")}));
    }
    // A file bound on a file: the target is made as an empty file.
    let hello = src.join("hello");
    h.call(
        "mount",
        json!({"source": hello, "target": "/etc/hostname", "fstype": "bind",
               "options": ["bind", "ro"], "root": r}),
    );
    // Through the image's symlink, inside the root: not the agent's own /run.
    let a = h.call(
        "mount",
        json!({"source": "tmpfs", "target": "/var/run/secrets", "fstype": "tmpfs", "root": r}),
    );
    assert_eq!(a, json!({"target": format!("{r}/run/secrets")}));

    let m = agent.mounts(&top);
    let find = |p: &str| {
        m.iter()
            .find(|x| x.0 == format!("{r}{p}"))
            .unwrap_or_else(|| panic!("{p} is not mounted: {m:?}"))
            .clone()
    };
    let (_, fstype, opts, _) = find("/proc");
    assert_eq!(fstype, "proc");
    assert!(opts.contains("nosuid,nodev,noexec"), "{opts}");
    let (_, fstype, _, sup) = find("/dev");
    assert_eq!(fstype, "tmpfs");
    assert!(
        sup.contains("size=65536k") && sup.contains("mode=755"),
        "{sup}"
    );
    let (_, fstype, _, sup) = find("/dev/pts");
    assert_eq!(fstype, "devpts");
    assert!(
        sup.contains("gid=5") && sup.contains("ptmxmode=666"),
        "{sup}"
    );
    assert_eq!(find("/dev/shm").1, "tmpfs");
    assert_eq!(find("/dev/mqueue").1, "mqueue");
    let (_, fstype, opts, _) = find("/sys");
    assert!(
        fstype == "sysfs" && opts.starts_with("ro,"),
        "{fstype} {opts}"
    );
    // The binds are read-only: the remount after the bind made them so.
    let (_, _, opts, _) = find("/data");
    assert!(opts.starts_with("ro,"), "{opts}");
    assert!(find("/etc/hostname").2.starts_with("ro,"));
    assert_eq!(find("/run/secrets").1, "tmpfs");
    assert_eq!(m.len(), 10, "{m:?}");
    let e = std::fs::write(agent.seen(&rootfs.join("data/new")), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert!(!src.join("new").exists());
    // A process in the root sees them.
    let (out, err, exit) = h.run_with(
        json!({"argv": ["sh", "-c", "cat /etc/hostname /data/hello; ls /dev/pts; test -d /proc/self/fd && echo proc"],
               "root": r, "env": ["PATH=/bin"]}),
        None,
    );
    assert_eq!(exit["exit_code"], 0, "{err}");
    assert_eq!(out, "hi\nhi\nptmx\nproc\n");

    // Checked before anything is done: nothing made for a request refused.
    for (params, code) in [
        (
            json!({"source": "x", "target": "/never", "fstype": "ext4", "root": r}),
            "bad_params",
        ),
        (
            json!({"source": "proc", "target": "/x/../never", "fstype": "proc", "root": r}),
            "bad_params",
        ),
        (
            json!({"source": "proc", "target": "never", "fstype": "proc", "root": r}),
            "bad_params",
        ),
        (
            json!({"source": s, "target": "/never", "fstype": "none", "root": r}),
            "bad_params",
        ),
        (
            json!({"source": format!("{s}/nope"), "target": "/never", "fstype": "bind", "root": r}),
            "not_found",
        ),
    ] {
        let e = h.call_err("mount", params.clone());
        assert_eq!(e["code"], code, "{params}: {e}");
    }
    assert!(!agent.seen(&rootfs.join("never")).exists());
    // The kernel's refusal, with its reason.
    let e = h.call_err(
        "mount",
        json!({"source": "tmpfs", "target": "/bad", "fstype": "tmpfs", "options": ["size=lots"], "root": r}),
    );
    assert_eq!(e["code"], "failed");
    assert!(
        e["message"].as_str().unwrap().contains("Invalid argument"),
        "{e}"
    );
    // Without mkdir, a missing target is not made.
    let e = h.call_err(
        "mount",
        json!({"source": "tmpfs", "target": "/missing", "fstype": "tmpfs", "mkdir": false, "root": r}),
    );
    assert_eq!(e["code"], "failed");

    // /dev has mounts on it: alone, it is busy.
    let dev = format!("{r}/dev");
    let e = h.call_err("unmount", json!({"target": dev}));
    assert_eq!(e["code"], "failed", "{e}");
    // Another tmpfs on top of /dev hides what is mounted on the first: those come out after
    // it.
    h.call(
        "mount",
        json!({"source": "tmpfs", "target": "/dev", "fstype": "tmpfs", "root": r}),
    );
    assert_eq!(agent.mounts(&top).len(), 11);
    // The whole tree, deepest first.
    assert_eq!(
        h.call("unmount", json!({"target": r, "recursive": true})),
        json!({})
    );
    assert_eq!(agent.mounts(&top), vec![]);
    for recursive in [true, false] {
        let e = h.call_err("unmount", json!({"target": r, "recursive": recursive}));
        assert_eq!(e["code"], "not_found", "{e}");
    }
    let e = h.call_err(
        "unmount",
        json!({"target": format!("{r}/nope"), "recursive": true}),
    );
    assert_eq!(e["code"], "not_found", "{e}");
}

#[test]
fn a_busy_tree_is_detached() {
    let (agent, mut h) = Isolated::start("detach");
    let d = TempDir::new("detach-root");
    let top = std::fs::canonicalize(&d.0).unwrap();
    let rootfs = top.join("rootfs");
    let r = rootfs.to_str().unwrap();
    // The root: a tmpfs, which busybox is put in through the agent's view.
    h.call(
        "mount",
        json!({"source": "tmpfs", "target": r, "fstype": "tmpfs"}),
    );
    std::fs::create_dir_all(agent.seen(&rootfs.join("bin"))).unwrap();
    std::fs::copy("/bin/busybox", agent.seen(&rootfs.join("bin/busybox"))).expect("busybox-static");
    h.call(
        "mount",
        json!({"source": "proc", "target": "/proc", "fstype": "proc", "root": r}),
    );
    // A process working in the root keeps it busy.
    let p = h.call(
        "start_process",
        json!({"argv": ["/bin/busybox", "sleep", "30"], "root": r, "cwd": "/proc"}),
    );
    let name = p["process"].as_str().unwrap().to_string();
    let e = h.call_err("unmount", json!({"target": r, "recursive": true}));
    assert_eq!(e["code"], "failed", "{e}");
    assert!(e["message"].as_str().unwrap().contains("busy"), "{e}");
    assert!(e["message"].as_str().unwrap().contains("left"), "{e}");
    h.call(
        "unmount",
        json!({"target": r, "recursive": true, "detach": true}),
    );
    assert_eq!(agent.mounts(&top), vec![]);
    h.call("kill_process", json!({"process": name, "signal": 9}));
    h.call("wait_process", json!({"process": name}));
}
