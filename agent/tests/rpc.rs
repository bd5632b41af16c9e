//! torii-agent's RPC over a socketpair, as the host drives it: version and health, processes
//! with streamed output, stdin, exit codes and signals, and hostile input — bad frames, bad
//! JSON, unknown methods and fields, a huge length, a flood of requests — answered with errors,
//! never a crash.

mod common;

use base64::Engine as _;
use common::Host;
use serde_json::{json, Value};

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
