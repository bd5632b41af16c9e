//! The host's side of a torii-agent connection, for the tests: the agent served on a thread
//! (in a given network namespace, if asked) over a socketpair.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use torii_agent::protocol::{read_frame, write_frame};
use torii_agent::server::Agent;
use torii_agent::transport::serve_unix;

pub const T: Duration = Duration::from_secs(20);

/// The host's side of a connection to an agent served on a thread.
pub struct Host {
    pub s: UnixStream,
    pub rx: mpsc::Receiver<Value>,
    next: u64,
    /// Frames read while waiting for something else.
    pub seen: Vec<Value>,
    pub served: std::thread::JoinHandle<Result<(), String>>,
}

impl Host {
    pub fn start() -> Host {
        Host::start_in(None)
    }

    /// The agent served in the network namespace open at `netns` (its handler threads are
    /// made by the serving thread, so they are in it too).
    pub fn start_in(netns: Option<std::fs::File>) -> Host {
        Host::serving(Agent::new(false).unwrap(), netns)
    }

    /// `agent` served on a thread (in the network namespace open at `netns`, if any).
    pub fn serving(agent: Arc<Agent>, netns: Option<std::fs::File>) -> Host {
        let (a, b) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || {
            if let Some(ns) = netns {
                // SAFETY: setns on this thread only, with an fd it owns for the call.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns: {}", std::io::Error::last_os_error()));
                }
            }
            serve_unix(agent, b).map_err(|e| e.to_string())
        });
        Host::connect(a, served)
    }

    /// The host's side of connection `a`, served by `served`.
    pub fn connect(a: UnixStream, served: std::thread::JoinHandle<Result<(), String>>) -> Host {
        let (tx, rx) = mpsc::channel();
        let mut r = a.try_clone().unwrap();
        std::thread::spawn(move || {
            while let Ok(f) = read_frame(&mut r) {
                if tx.send(serde_json::from_slice(&f).unwrap()).is_err() {
                    break;
                }
            }
        });
        Host {
            s: a,
            rx,
            next: 1,
            seen: Vec::new(),
            served,
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        let f = serde_json::to_vec(&json!({"id": id, "method": method, "params": params})).unwrap();
        write_frame(&mut self.s, &f).unwrap();
        id
    }

    /// The next frame matching `f` (others are kept).
    pub fn expect(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.seen.iter().position(&f) {
            return self.seen.remove(i);
        }
        loop {
            let v = self.rx.recv_timeout(T).expect("an answer from the agent");
            if f(&v) {
                return v;
            }
            self.seen.push(v);
        }
    }

    pub fn answer(&mut self, id: u64) -> Value {
        self.expect(|v| v["id"] == id)
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params);
        let a = self.answer(id);
        assert!(a.get("error").is_none(), "{method}: {a}");
        a["result"].clone()
    }

    pub fn call_err(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params);
        let a = self.answer(id);
        assert!(a.get("result").is_none(), "{method} succeeded: {a}");
        a["error"].clone()
    }

    /// The output of `name` seen so far (taken out of `seen`): stdout and stderr.
    pub fn output(&mut self, name: &str) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(i) = self
            .seen
            .iter()
            .position(|v| v["event"] == "output" && v["process"] == name)
        {
            let v = self.seen.remove(i);
            let data = base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap())
                .unwrap();
            match v["stream"].as_str() {
                Some("stdout") => out.extend(data),
                _ => err.extend(data),
            }
        }
        (out, err)
    }

    /// Runs argv to its end: (stdout, stderr, exit).
    pub fn run(&mut self, argv: &[&str], stdin: Option<&[u8]>) -> (String, String, Value) {
        self.run_with(json!({ "argv": argv }), stdin)
    }

    /// [`Host::run`] with any `start_process` parameters (`stdin` is set from `stdin`).
    pub fn run_with(&mut self, mut params: Value, stdin: Option<&[u8]>) -> (String, String, Value) {
        params["stdin"] = json!(stdin.is_some());
        let p = self.call("start_process", params);
        let name = p["process"].as_str().unwrap().to_string();
        if let Some(data) = stdin {
            self.call(
                "write_stdin",
                json!({"process": name, "data": base64::engine::general_purpose::STANDARD.encode(data)}),
            );
            self.call("close_stdin", json!({"process": name}));
        }
        let exit = self.call("wait_process", json!({"process": name}));
        // All output was sent before the answer to the wait.
        let mut out: HashMap<String, Vec<u8>> = HashMap::new();
        while let Some(i) = self
            .seen
            .iter()
            .position(|v| v["event"] == "output" && v["process"] == name.as_str())
        {
            let v = self.seen.remove(i);
            out.entry(v["stream"].as_str().unwrap().into())
                .or_default()
                .extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(v["data"].as_str().unwrap())
                        .unwrap(),
                );
        }
        while let Ok(v) = self.rx.try_recv() {
            assert!(
                v["process"] != name.as_str(),
                "output after the wait's answer: {v}"
            );
            self.seen.push(v);
        }
        let s = |k: &str| {
            String::from_utf8_lossy(out.get(k).map(|v| &v[..]).unwrap_or(b"")).into_owned()
        };
        (s("stdout"), s("stderr"), exit)
    }
}
