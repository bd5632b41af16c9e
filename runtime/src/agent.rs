//! The host's side of the torii-agent protocol (docs/agent-protocol.md) on any byte stream.
//!
//! One reader thread takes frames in order: answers go to the caller waiting for that id,
//! `output` events into one channel bounded in bytes (a guest that floods output is held back,
//! not buffered without bound). The guest is untrusted: frames over the protocol's limit, bad JSON
//! or an answer to an id never asked end the connection with an error, never a panic.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use torii_agent::protocol::{read_frame, write_frame, FrameError, RpcError};

/// Output bytes buffered before the reader waits for the consumer (a hostile guest's flood
/// is held back in the guest, not in the host's memory).
const EVENT_BYTES: usize = 8 << 20;
/// Requests whose caller stopped waiting, remembered so that their late answers are passed
/// over (older ones are forgotten: their answers then end the connection).
const ABANDONED: usize = 1024;
/// How long a write to the agent may block (a guest that stops reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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

#[derive(Default)]
struct Calls {
    pending: HashMap<u64, mpsc::Sender<Answer>>,
    abandoned: VecDeque<u64>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

struct Shared {
    calls: Mutex<Calls>,
    /// Output bytes in the event channel.
    queued: AtomicUsize,
    shutdown: Box<dyn Fn() + Send + Sync>,
}

impl Shared {
    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the connection: every caller still waiting is told why, later sends fail.
    fn fail_all(&self, why: String) {
        let pending = {
            let mut c = self.calls();
            c.closed.get_or_insert(why.clone());
            std::mem::take(&mut c.pending)
        };
        for (_, tx) in pending {
            let _ = tx.send(Err(AgentError::Closed(why.clone())));
        }
        (self.shutdown)();
    }

    /// Forgets request `id`, whose caller no longer waits.
    fn abandon(&self, id: u64) {
        let mut c = self.calls();
        if c.pending.remove(&id).is_some() {
            if c.abandoned.len() == ABANDONED {
                c.abandoned.pop_front();
            }
            c.abandoned.push_back(id);
        }
    }
}

/// A connection to one agent.
pub struct AgentClient {
    writer: Mutex<Box<dyn Write + Send>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: Mutex<Receiver<Output>>,
    reader: Option<JoinHandle<()>>,
}

/// An answer still to come.
pub struct Pending {
    id: u64,
    method: String,
    rx: Receiver<Answer>,
    shared: Arc<Shared>,
}

impl Pending {
    /// Waits for the answer.
    pub fn wait(self, timeout: Duration) -> Result<Value, AgentError> {
        match self.rx.recv_timeout(timeout) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                self.shared.abandon(self.id);
                Err(AgentError::Timeout {
                    method: self.method,
                    timeout,
                })
            }
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
                // Held back while the consumer is behind (the guest's output waits in the
                // guest), unless the connection is being torn down.
                while shared.queued.load(Ordering::Acquire) > EVENT_BYTES {
                    if shared.calls().closed.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                shared.queued.fetch_add(data.len(), Ordering::AcqRel);
                let mut o = Output {
                    process: process.into(),
                    stream: stream.into(),
                    data,
                };
                // Held back too while the channel is full of small events; dropped once the
                // connection is being torn down or nobody reads.
                loop {
                    match events.try_send(o) {
                        Err(TrySendError::Full(back)) if shared.calls().closed.is_none() => {
                            o = back;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        _ => break,
                    }
                }
            }
            continue;
        }
        let Some(id) = v["id"].as_u64() else {
            // An answer to a frame the agent could not read: ours are all well-formed.
            break format!("the agent refused a frame: {}", v["error"]);
        };
        let tx = {
            let mut c = shared.calls();
            match c.pending.remove(&id) {
                Some(tx) => Some(tx),
                None if c.abandoned.contains(&id) => None,
                None => {
                    drop(c);
                    break format!("the agent answered request {id}, which is not in flight");
                }
            }
        };
        let Some(tx) = tx else { continue };
        let a = match v.get("error") {
            None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
            Some(e) => match serde_json::from_value::<RpcError>(e.clone()) {
                Ok(e) => Err(AgentError::Rpc(e)),
                Err(_) => {
                    // Its caller hears why with everyone else's, once the end is recorded.
                    shared.calls().pending.insert(id, tx);
                    break "the agent sent a malformed error answer".to_string();
                }
            },
        };
        let _ = tx.send(a);
    };
    shared.fail_all(why);
}

/// Events the channel holds at most (each also counts against [`EVENT_BYTES`]).
const EVENT_SLOTS: usize = 4096;

impl AgentClient {
    /// Talks to an agent over `r` and `w`; `shutdown` ends the stream (wakes the reader).
    pub fn new<R, W>(r: R, w: W, shutdown: impl Fn() + Send + Sync + 'static) -> io::Result<Self>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let shared = Arc::new(Shared {
            calls: Mutex::new(Calls::default()),
            queued: AtomicUsize::new(0),
            shutdown: Box::new(shutdown),
        });
        let (tx, rx) = mpsc::sync_channel(EVENT_SLOTS);
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
        })
    }

    /// Over a Unix stream (QEMU's chardev socket, a hybrid vsock connection). A write that
    /// blocks for [`WRITE_TIMEOUT`] (a guest that stops reading) ends the connection.
    pub fn unix(s: std::os::unix::net::UnixStream) -> io::Result<Self> {
        s.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let r = s.try_clone()?;
        let w = s.try_clone()?;
        AgentClient::new(r, w, move || {
            let _ = s.shutdown(std::net::Shutdown::Both);
        })
    }

    /// Sends a request; the answer comes through the returned [`Pending`].
    pub fn send(&self, method: &str, params: Value) -> Result<Pending, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            // Checked and entered under one lock: the reader's end cannot come in between.
            let mut c = self.shared.calls();
            if let Some(why) = c.closed.clone() {
                return Err(AgentError::Closed(why));
            }
            c.pending.insert(id, tx);
        }
        let frame = json!({ "id": id, "method": method, "params": params });
        let bytes = serde_json::to_vec(&frame).map_err(|e| io::Error::other(e.to_string()))?;
        let r = write_frame(
            &mut *self.writer.lock().unwrap_or_else(|e| e.into_inner()),
            &bytes,
        );
        if let Err(e) = r {
            self.shared.calls().pending.remove(&id);
            // A write that failed or timed out leaves the stream mid-frame: it is over.
            self.shared.fail_all(format!("writing to the agent: {e}"));
            return Err(e.into());
        }
        Ok(Pending {
            id,
            method: method.into(),
            rx,
            shared: self.shared.clone(),
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
        let o = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(timeout)
            .ok()?;
        self.shared.queued.fetch_sub(o.data.len(), Ordering::AcqRel);
        Some(o)
    }

    /// Whether the connection has ended, and why.
    pub fn closed(&self) -> Option<String> {
        self.shared.calls().closed.clone()
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.shared
            .fail_all("the host closed the connection".into());
        // The reader may be holding an event back: the connection's end releases it.
        if let Some(h) = self.reader.take() {
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
        // 64 KiB events: the host holds 8 MiB of them, then stops reading the stream.
        let chunk = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 64 << 10]);
        let sent = Arc::new(AtomicUsize::new(0));
        let n = sent.clone();
        let flood = std::thread::spawn(move || {
            for _ in 0..1000 {
                let ev =
                    json!({"event": "output", "process": "p", "stream": "stdout", "data": chunk});
                if write_frame(&mut g, ev.to_string().as_bytes()).is_err() {
                    return;
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        // 8 MiB held, plus what the socket buffers: far from the 1000 events (64 MB) sent.
        let held = sent.load(Ordering::Relaxed);
        assert!(held < 400, "{held} events taken while nobody read");
        // Reading lets the rest through.
        let mut got = 0;
        while got < 1000 {
            let o = c.next_output(T).expect("output");
            assert_eq!(o.data.len(), 64 << 10);
            got += 1;
        }
        flood.join().unwrap();
        // And a client dropped while a flood is held back does not hang.
        let (c, mut g) = pair();
        let flood = std::thread::spawn(move || {
            for _ in 0..1000 {
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
    fn late_answers_to_abandoned_requests_are_passed_over() {
        let (c, mut g) = pair();
        assert!(matches!(
            c.call("slow", Value::Null, Duration::from_millis(50)),
            Err(AgentError::Timeout { .. })
        ));
        let r1 = request(&mut g);
        send(&mut g, json!({"id": r1["id"], "result": {}}));
        let p = c.send("version", Value::Null).unwrap();
        let r2 = request(&mut g);
        send(&mut g, json!({"id": r2["id"], "result": {"protocol": 1}}));
        assert_eq!(p.wait(T).unwrap()["protocol"], 1);
        assert!(c.closed().is_none());
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
