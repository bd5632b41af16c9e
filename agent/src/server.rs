//! One connection from the host: frames read in order, each request handled on its own
//! thread (a `wait_process` may take as long as the process runs), answers and events written
//! by one writer thread in the order they are produced, through a bounded queue (a slow host
//! slows the processes' output down rather than filling the agent's memory).

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::process::{Emit, Processes, StartParams};
use crate::protocol::{
    answer, encode, quote, read_frame, write_frame, FrameError, Request, RpcError,
};
use crate::{block, filesystems, hugepages, net, system};

/// Requests handled at once on one connection; more are answered `busy`.
pub const MAX_IN_FLIGHT: usize = 64;
/// Frames (answers and events) queued for the host on one connection; the processes' output
/// waits when it is full.
pub const QUEUE: usize = 64;
/// How long the end of a connection waits for what is queued to be written.
pub const FLUSH: Duration = Duration::from_secs(1);

/// Where the agent finds the kernel's file systems: the real ones, or a fake tree in tests.
#[derive(Clone, Debug)]
pub struct Roots {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// devtmpfs (`/dev`).
    pub dev: PathBuf,
    /// The mount table (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// How long a device the host names may take to appear.
    pub patience: Duration,
}

impl Default for Roots {
    fn default() -> Roots {
        Roots {
            sys: "/sys".into(),
            dev: "/dev".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            patience: Duration::from_secs(5),
        }
    }
}

/// What the agent serves from.
pub struct Agent {
    pub processes: Processes,
    /// PID 1 of the guest: may power the VM off.
    pub init: bool,
    pub roots: Roots,
}

impl Agent {
    /// `init`: the agent is PID 1 (reaps every orphan, may power the VM off).
    pub fn new(init: bool) -> io::Result<Arc<Agent>> {
        Ok(Arc::new(Agent {
            processes: Processes::new(init)?,
            init,
            roots: Roots::default(),
        }))
    }
}

fn params<T: DeserializeOwned>(v: Value) -> Result<T, RpcError> {
    let v = if v.is_null() { json!({}) } else { v };
    serde_json::from_value(v).map_err(|e| RpcError::new("bad_params", e.to_string()))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessRef {
    process: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KillParams {
    process: String,
    #[serde(default = "sigterm")]
    signal: i32,
}

fn sigterm() -> i32 {
    libc::SIGTERM
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinParams {
    process: String,
    /// Base64.
    data: String,
}

/// Handles one request.
pub fn handle(agent: &Agent, method: &str, p: Value, emit: &Emit) -> Result<Value, RpcError> {
    match method {
        "version" => Ok(json!({
            "agent": "torii-agent",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
        })),
        "health" => Ok(json!({ "status": "serving" })),
        "start_process" => {
            let sp: StartParams = params(p)?;
            agent.processes.start(sp, emit.clone())
        }
        "wait_process" => agent.processes.wait(&params::<ProcessRef>(p)?.process),
        "kill_process" => {
            let k: KillParams = params(p)?;
            agent.processes.kill(&k.process, k.signal)
        }
        "write_stdin" => {
            let s: StdinParams = params(p)?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(&s.data)
                .map_err(|e| RpcError::new("bad_params", format!("data: {e}")))?;
            agent.processes.write_stdin(&s.process, &data)
        }
        "close_stdin" => agent
            .processes
            .close_stdin(&params::<ProcessRef>(p)?.process),
        "metrics" => system::metrics(),
        "list_interfaces" => net::list_interfaces(),
        "update_interface" => net::update_interface(params(p)?),
        "list_routes" => net::list_routes(),
        "update_routes" => net::update_routes(params(p)?),
        "add_arp_neighbors" => net::add_arp_neighbors(params(p)?),
        "mount_block" => block::mount_block(params(p)?, &agent.roots),
        "mount" => filesystems::mount(params(p)?),
        "unmount" => filesystems::unmount(params(p)?, &agent.roots),
        "setup_hugepages" => hugepages::setup(params(p)?, &agent.roots),
        "shutdown" if agent.init => {
            // After the answer has gone out.
            std::thread::Builder::new()
                .name("power-off".into())
                .spawn(|| {
                    std::thread::sleep(Duration::from_millis(200));
                    crate::init::power_off();
                })
                .map_err(|e| RpcError::new("failed", format!("no thread to power off: {e}")))?;
            Ok(json!({}))
        }
        "shutdown" => Err(RpcError::new(
            "failed",
            "not the guest's init: nothing to power off",
        )),
        other => Err(RpcError::new(
            "unknown_method",
            format!("no method {}", quote(other)),
        )),
    }
}

/// An in-flight slot, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the writer is given.
enum Out {
    Frame(Value),
    /// The connection is over.
    Stop,
}

/// The connection's queue as the processes started on it see it: detached when the connection
/// ends, after which their events are dropped.
#[derive(Clone)]
struct Sink(Arc<Mutex<Option<SyncSender<Out>>>>);

impl Sink {
    fn send(&self, v: Value) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Waits while the queue is full, without the lock.
        if let Some(tx) = tx {
            let _ = tx.send(Out::Frame(v));
        }
    }

    fn detach(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Serves one connection until the host closes it (`Ok`), sends what cannot be read as
/// frames (`Err`, after an answer saying why) or can no longer be written to (`Err`).
///
/// `shutdown` must end the reads and writes in progress on the connection (`shutdown(2)` of a
/// socket): it is called when a write fails, so that no more requests are read that could not
/// be answered, and when the connection ends, after what was queued for the host was written
/// (or [`FLUSH`] went by). Then the writer is joined. The events that processes started on
/// this connection make after its end are dropped.
pub fn serve<R: Read, W: Write + Send + 'static>(
    agent: Arc<Agent>,
    mut reader: R,
    mut writer: W,
    shutdown: impl Fn() + Send + Sync + 'static,
) -> Result<(), FrameError> {
    let (tx, rx) = mpsc::sync_channel::<Out>(QUEUE);
    let shutdown = Arc::new(shutdown);
    // Disconnected when the writer is done.
    let (done_tx, done) = mpsc::channel::<()>();
    let out = {
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("agent-writer".into())
            .spawn(move || -> io::Result<()> {
                let _done = done_tx;
                while let Ok(Out::Frame(v)) = rx.recv() {
                    let Some(payload) = encode(&v) else {
                        continue;
                    };
                    if let Err(e) = write_frame(&mut writer, &payload) {
                        shutdown();
                        return Err(e);
                    }
                }
                Ok(())
            })?
    };
    let sink = Sink(Arc::new(Mutex::new(Some(tx.clone()))));
    let emit: Emit = {
        let sink = sink.clone();
        Arc::new(move |v| sink.send(v))
    };
    let send = |v: Value| {
        let _ = tx.send(Out::Frame(v));
    };
    let in_flight = Arc::new(AtomicUsize::new(0));
    let result = loop {
        let frame = match read_frame(&mut reader) {
            Ok(f) => f,
            Err(FrameError::Eof) => break Ok(()),
            Err(e @ FrameError::Empty) => {
                send(answer(None, Err(RpcError::new("bad_frame", e.to_string()))));
                continue;
            }
            Err(e) => {
                send(answer(None, Err(RpcError::new("bad_frame", e.to_string()))));
                break Err(e);
            }
        };
        let req: Request = match serde_json::from_slice(&frame) {
            Ok(r) => r,
            Err(e) => {
                // The id, if the frame is an object that has one.
                let id = serde_json::from_slice::<Value>(&frame)
                    .ok()
                    .and_then(|v| v["id"].as_u64());
                send(answer(id, Err(RpcError::new("bad_request", e.to_string()))));
                continue;
            }
        };
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            send(answer(
                Some(req.id),
                Err(RpcError::new(
                    "busy",
                    format!("{MAX_IN_FLIGHT} requests in flight"),
                )),
            ));
            continue;
        }
        // The slot is given back however the handler ends (or if it never starts); a handler
        // that panics is answered, not left hanging.
        let slot = Slot(in_flight.clone());
        let (agent, tx, emit) = (agent.clone(), tx.clone(), emit.clone());
        let id = req.id;
        let spawned = std::thread::Builder::new().spawn(move || {
            let _slot = slot;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handle(&agent, &req.method, req.params, &emit)
            }))
            .unwrap_or_else(|_| Err(RpcError::new("failed", "the handler panicked")));
            let _ = tx.send(Out::Frame(answer(Some(req.id), r)));
        });
        if spawned.is_err() {
            // The closure (and its slot) went with the failed spawn.
            send(answer(
                Some(id),
                Err(RpcError::new("busy", "no thread for the request")),
            ));
        }
    };
    // What is queued still goes out, then the connection is closed — without waiting more
    // than FLUSH for a host that does not read. Events from then on, and answers of requests
    // still running, are dropped.
    sink.detach();
    let deadline = Instant::now() + FLUSH;
    let mut stop = Out::Stop;
    loop {
        match tx.try_send(stop) {
            Err(TrySendError::Full(s)) if Instant::now() < deadline => {
                stop = s;
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => break,
        }
    }
    drop(tx);
    let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    shutdown();
    match out.join() {
        Ok(Err(e)) if result.is_ok() => Err(FrameError::Io(e)),
        _ => result,
    }
}
