//! The host's side of the torii-agent protocol (docs/agent-protocol.md) on any byte stream.
//!
//! One reader thread takes frames in order: answers go to the caller waiting for that id,
//! `output` events into one bounded channel (a guest that floods output is slowed down, not
//! buffered without bound). The guest is untrusted: frames over the protocol's limit, bad JSON
//! or an answer to an id never asked end the connection with an error, never a panic.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use torii_agent::protocol::{read_frame, write_frame, FrameError, RpcError};

/// Output events buffered before the reader waits for the consumer.
const EVENT_BACKLOG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Rpc(#[from] RpcError),
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("agent did not answer {method} within {timeout:?}")]
    Timeout { method: String, timeout: Duration },
    #[error("agent connection closed: {0}")]
    Closed(String),
}

/// Output of a guest process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub process: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub data: Vec<u8>,
}

type Answer = Result<Value, AgentError>;

struct Shared {
    pending: Mutex<HashMap<u64, mpsc::Sender<Answer>>>,
    /// Why the connection ended, once it has.
    closed: Mutex<Option<String>>,
}

/// A connection to one agent.
pub struct AgentClient {
    writer: Mutex<Box<dyn Write + Send>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: Mutex<Receiver<Output>>,
    reader: Option<JoinHandle<()>>,
    shutdown: Box<dyn Fn() + Send + Sync>,
}

/// An answer still to come.
pub struct Pending {
    method: String,
    rx: Receiver<Answer>,
}

impl Pending {
    /// Waits for the answer.
    pub fn wait(self, timeout: Duration) -> Result<Value, AgentError> {
        match self.rx.recv_timeout(timeout) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => Err(AgentError::Timeout {
                method: self.method,
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => {
                Err(AgentError::Closed("the reader stopped".into()))
            }
        }
    }

    /// The answer, if it has come.
    pub fn try_take(&self) -> Option<Result<Value, AgentError>> {
        match self.rx.try_recv() {
            Ok(a) => Some(a),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(Err(AgentError::Closed("the reader stopped".into())))
            }
        }
    }
}

fn fail_all(shared: &Shared, why: String) {
    *shared.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
    let pending = std::mem::take(&mut *shared.pending.lock().unwrap_or_else(|e| e.into_inner()));
    for (_, tx) in pending {
        let _ = tx.send(Err(AgentError::Closed(why.clone())));
    }
}

fn reader_loop(mut r: impl Read, shared: Arc<Shared>, events: SyncSender<Output>) {
    let why = loop {
        let frame = match read_frame(&mut r) {
            Ok(f) => f,
            Err(FrameError::Eof) => break "the agent went away".to_string(),
            Err(e) => break format!("reading a frame: {e}"),
        };
        let v: Value = match serde_json::from_slice(&frame) {
            Ok(v) => v,
            Err(e) => break format!("the agent sent a frame that is not JSON: {e}"),
        };
        if let Some(ev) = v.get("event") {
            if ev == "output" {
                let data = v["data"]
                    .as_str()
                    .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok());
                let (Some(process), Some(stream), Some(data)) =
                    (v["process"].as_str(), v["stream"].as_str(), data)
                else {
                    break "the agent sent a malformed output event".to_string();
                };
                // The consumer may be gone (nothing runs): output then has no reader.
                let _ = events.send(Output {
                    process: process.into(),
                    stream: stream.into(),
                    data,
                });
            }
            continue;
        }
        let Some(id) = v["id"].as_u64() else {
            // An answer to a frame the agent could not read: ours are all well-formed.
            break format!("the agent refused a frame: {}", v["error"]);
        };
        let tx = shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let Some(tx) = tx else {
            break format!("the agent answered request {id}, which is not in flight");
        };
        let a = match v.get("error") {
            None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
            Some(e) => match serde_json::from_value::<RpcError>(e.clone()) {
                Ok(e) => Err(AgentError::Rpc(e)),
                Err(_) => {
                    let why = "the agent sent a malformed error answer".to_string();
                    let _ = tx.send(Err(AgentError::Closed(why.clone())));
                    break why;
                }
            },
        };
        let _ = tx.send(a);
    };
    fail_all(&shared, why);
}

impl AgentClient {
    /// Talks to an agent over `stream`; `shutdown` ends the stream (wakes the reader).
    pub fn new<R, W>(r: R, w: W, shutdown: impl Fn() + Send + Sync + 'static) -> io::Result<Self>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
        });
        let (tx, rx) = mpsc::sync_channel(EVENT_BACKLOG);
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || reader_loop(r, s, tx))?;
        Ok(AgentClient {
            writer: Mutex::new(Box::new(w)),
            shared,
            next_id: AtomicU64::new(1),
            events: Mutex::new(rx),
            reader: Some(reader),
            shutdown: Box::new(shutdown),
        })
    }

    /// Over a Unix stream (QEMU's chardev socket, a hybrid vsock connection).
    pub fn unix(s: std::os::unix::net::UnixStream) -> io::Result<Self> {
        let r = s.try_clone()?;
        let w = s.try_clone()?;
        AgentClient::new(r, w, move || {
            let _ = s.shutdown(std::net::Shutdown::Both);
        })
    }

    /// Sends a request; the answer comes through the returned [`Pending`].
    pub fn send(&self, method: &str, params: Value) -> Result<Pending, AgentError> {
        if let Some(why) = self
            .shared
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(AgentError::Closed(why));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let frame = json!({ "id": id, "method": method, "params": params });
        let bytes = serde_json::to_vec(&frame).map_err(|e| io::Error::other(e.to_string()))?;
        let r = write_frame(
            &mut *self.writer.lock().unwrap_or_else(|e| e.into_inner()),
            &bytes,
        );
        if let Err(e) = r {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(e.into());
        }
        Ok(Pending {
            method: method.into(),
            rx,
        })
    }

    /// Sends a request and waits for its answer.
    pub fn call(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        self.send(method, params)?.wait(timeout)
    }

    /// The next output event, waiting up to `timeout`.
    pub fn next_output(&self, timeout: Duration) -> Option<Output> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(timeout)
            .ok()
    }

    /// Whether the connection has ended, and why.
    pub fn closed(&self) -> Option<String> {
        self.shared
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        (self.shutdown)();
        // The reader may be blocked handing an event over: drain until it ends.
        if let Some(h) = self.reader.take() {
            while !h.is_finished() {
                let _ = self
                    .events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .recv_timeout(Duration::from_millis(10));
            }
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A client and the far end of its stream, where a test plays the agent.
    fn pair() -> (AgentClient, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (AgentClient::unix(a).unwrap(), b)
    }

    fn request(s: &mut UnixStream) -> Value {
        serde_json::from_slice(&read_frame(s).unwrap()).unwrap()
    }

    fn send(s: &mut UnixStream, v: Value) {
        write_frame(s, v.to_string().as_bytes()).unwrap();
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn answers_and_output_reach_their_callers() {
        let (c, mut g) = pair();
        let p1 = c.send("version", Value::Null).unwrap();
        let p2 = c.send("health", Value::Null).unwrap();
        let (r1, r2) = (request(&mut g), request(&mut g));
        assert_eq!(
            (r1["method"].as_str(), r2["method"].as_str()),
            (Some("version"), Some("health"))
        );
        send(
            &mut g,
            json!({"event": "output", "process": "p1", "stream": "stdout", "data": "aGk="}),
        );
        // Answers in completion order, not request order.
        send(
            &mut g,
            json!({"id": r2["id"], "error": {"code": "busy", "message": "later"}}),
        );
        send(&mut g, json!({"id": r1["id"], "result": {"protocol": 1}}));
        assert_eq!(p1.wait(T).unwrap()["protocol"], 1);
        match p2.wait(T) {
            Err(AgentError::Rpc(e)) => assert_eq!(e.code, "busy"),
            r => panic!("{r:?}"),
        }
        let o = c.next_output(T).unwrap();
        assert_eq!(
            (o.process.as_str(), o.stream.as_str(), &o.data[..]),
            ("p1", "stdout", &b"hi"[..])
        );
    }

    #[test]
    fn a_hostile_agent_ends_the_connection_never_the_host() {
        type Misbehave = Box<dyn Fn(&mut UnixStream, &Value)>;
        let cases: Vec<Misbehave> = vec![
            // A length over the limit.
            Box::new(|g, _| g.write_all(&[0xff, 0xff, 0xff, 0xff, b'{']).unwrap()),
            // Not JSON.
            Box::new(|g, _| write_frame(g, b"\xff\xfe").unwrap()),
            // An answer to a request never made.
            Box::new(|g, _| send(g, json!({"id": 999, "result": {}}))),
            // Output that is not base64.
            Box::new(|g, _| {
                send(
                    g,
                    json!({"event": "output", "process": "p", "stream": "stdout", "data": "!!"}),
                )
            }),
            // A malformed error.
            Box::new(|g, r| send(g, json!({"id": r["id"], "error": 5}))),
            // The stream cut inside a frame.
            Box::new(|g, _| {
                g.write_all(&[0, 0, 0, 9, b'{']).unwrap();
                g.shutdown(std::net::Shutdown::Write).unwrap();
            }),
        ];
        for (i, bad) in cases.iter().enumerate() {
            let (c, mut g) = pair();
            let p = c.send("version", Value::Null).unwrap();
            let r = request(&mut g);
            bad(&mut g, &r);
            match p.wait(T) {
                Err(AgentError::Closed(_)) | Err(AgentError::Rpc(_)) => {}
                r => panic!("case {i}: {r:?}"),
            }
            assert!(c.closed().is_some(), "case {i}");
            assert!(matches!(
                c.send("health", Value::Null),
                Err(AgentError::Closed(_))
            ));
        }
    }

    #[test]
    fn a_flood_of_output_is_held_back_and_dropping_the_client_does_not_hang() {
        let (c, mut g) = pair();
        let flood = std::thread::spawn(move || {
            for _ in 0..10 * EVENT_BACKLOG {
                let ev =
                    json!({"event": "output", "process": "p", "stream": "stdout", "data": "eA=="});
                if write_frame(&mut g, ev.to_string().as_bytes()).is_err() {
                    return;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        drop(c);
        flood.join().unwrap();
    }

    #[test]
    fn a_silent_agent_times_out() {
        let (c, _g) = pair();
        match c.call("version", Value::Null, Duration::from_millis(100)) {
            Err(AgentError::Timeout { method, .. }) => assert_eq!(method, "version"),
            r => panic!("{r:?}"),
        }
    }
}
