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

use crate::process::{CheckedStart, Emit, Processes, Signal, StartParams};
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

/// Parameters of shape `W`, decoded, then checked into `C` (`W`'s checked form, made only by
/// its `TryFrom<W>`).
fn checked<W: DeserializeOwned, C: TryFrom<W, Error = RpcError>>(v: Value) -> Result<C, RpcError> {
    params::<W>(v)?.try_into()
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
    Signal::TERM.number()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinParams {
    process: String,
    /// Base64.
    data: String,
}

/// A request's method with its parameters decoded and checked: everything about it that can be
/// checked without touching the system (the parameters' shapes, base64, addresses, MACs,
/// names, ranges, paths, mount types and options, …) is, and is carried in the modules'
/// checked types, which only their `TryFrom` of the wire's shape makes. [`Call::run`] executes
/// it — and only the checks that need the system (a process, interface, device, disk,
/// directory or page size that is there or not) happen there.
pub enum Call {
    Version,
    Health,
    StartProcess(CheckedStart),
    WaitProcess {
        process: String,
    },
    KillProcess {
        process: String,
        /// SIGTERM if not given.
        signal: Signal,
    },
    WriteStdin {
        process: String,
        /// Decoded from the request's base64.
        data: Vec<u8>,
    },
    CloseStdin {
        process: String,
    },
    Metrics,
    ListInterfaces,
    UpdateInterface(net::CheckedInterface),
    ListRoutes,
    UpdateRoutes(net::CheckedRoutes),
    AddArpNeighbors(net::CheckedNeighbors),
    MountBlock(block::CheckedMountBlock),
    Mount(filesystems::CheckedMount),
    Unmount(filesystems::CheckedUnmount),
    SetupHugepages(hugepages::CheckedHugepages),
    /// Refused in [`Call::run`] unless the agent is the guest's init.
    Shutdown,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Call({})", self.method())
    }
}

impl Call {
    /// Decodes `method`'s parameters `p` (`null` is `{}`) and checks them: `unknown_method`,
    /// or `bad_params` naming what is wrong — or, for a `start_process` whose program name is
    /// empty, `failed` (as resolving the program has always answered). Methods that take no
    /// parameters ignore them.
    pub fn decode(method: &str, p: Value) -> Result<Call, RpcError> {
        Ok(match method {
            "version" => Call::Version,
            "health" => Call::Health,
            "start_process" => Call::StartProcess(checked::<StartParams, _>(p)?),
            "wait_process" => Call::WaitProcess {
                process: params::<ProcessRef>(p)?.process,
            },
            "kill_process" => {
                let k: KillParams = params(p)?;
                Call::KillProcess {
                    process: k.process,
                    signal: Signal::new(k.signal)?,
                }
            }
            "write_stdin" => {
                let s: StdinParams = params(p)?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&s.data)
                    .map_err(|e| RpcError::new("bad_params", format!("data: {e}")))?;
                Call::WriteStdin {
                    process: s.process,
                    data,
                }
            }
            "close_stdin" => Call::CloseStdin {
                process: params::<ProcessRef>(p)?.process,
            },
            "metrics" => Call::Metrics,
            "list_interfaces" => Call::ListInterfaces,
            "update_interface" => Call::UpdateInterface(checked::<net::UpdateInterface, _>(p)?),
            "list_routes" => Call::ListRoutes,
            "update_routes" => Call::UpdateRoutes(checked::<net::UpdateRoutes, _>(p)?),
            "add_arp_neighbors" => Call::AddArpNeighbors(checked::<net::AddNeighbors, _>(p)?),
            "mount_block" => Call::MountBlock(checked::<block::MountBlock, _>(p)?),
            "mount" => Call::Mount(checked::<filesystems::Mount, _>(p)?),
            "unmount" => Call::Unmount(checked::<filesystems::Unmount, _>(p)?),
            "setup_hugepages" => Call::SetupHugepages(checked::<hugepages::Hugepages, _>(p)?),
            "shutdown" => Call::Shutdown,
            other => {
                return Err(RpcError::new(
                    "unknown_method",
                    format!("no method {}", quote(other)),
                ))
            }
        })
    }

    /// The method's name, as the host sends it.
    pub fn method(&self) -> &'static str {
        match self {
            Call::Version => "version",
            Call::Health => "health",
            Call::StartProcess(_) => "start_process",
            Call::WaitProcess { .. } => "wait_process",
            Call::KillProcess { .. } => "kill_process",
            Call::WriteStdin { .. } => "write_stdin",
            Call::CloseStdin { .. } => "close_stdin",
            Call::Metrics => "metrics",
            Call::ListInterfaces => "list_interfaces",
            Call::UpdateInterface(_) => "update_interface",
            Call::ListRoutes => "list_routes",
            Call::UpdateRoutes(_) => "update_routes",
            Call::AddArpNeighbors(_) => "add_arp_neighbors",
            Call::MountBlock(_) => "mount_block",
            Call::Mount(_) => "mount",
            Call::Unmount(_) => "unmount",
            Call::SetupHugepages(_) => "setup_hugepages",
            Call::Shutdown => "shutdown",
        }
    }

    /// Executes the call: starts processes, mounts, changes interfaces and routes, powers off.
    pub fn run(self, agent: &Agent, emit: &Emit) -> Result<Value, RpcError> {
        match self {
            Call::Version => Ok(json!({
                "agent": "torii-agent",
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": 1,
            })),
            Call::Health => Ok(json!({ "status": "serving" })),
            Call::StartProcess(sp) => agent.processes.start(sp, emit.clone()),
            Call::WaitProcess { process } => agent.processes.wait(&process),
            Call::KillProcess { process, signal } => agent.processes.kill(&process, signal),
            Call::WriteStdin { process, data } => agent.processes.write_stdin(&process, &data),
            Call::CloseStdin { process } => agent.processes.close_stdin(&process),
            Call::Metrics => system::metrics(),
            Call::ListInterfaces => net::list_interfaces(),
            Call::UpdateInterface(u) => net::update_interface(u),
            Call::ListRoutes => net::list_routes(),
            Call::UpdateRoutes(u) => net::update_routes(u),
            Call::AddArpNeighbors(a) => net::add_arp_neighbors(a),
            Call::MountBlock(m) => block::mount_block(m, &agent.roots),
            Call::Mount(m) => filesystems::mount(m),
            Call::Unmount(u) => filesystems::unmount(u, &agent.roots),
            Call::SetupHugepages(h) => hugepages::setup(h, &agent.roots),
            Call::Shutdown if agent.init => {
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
            Call::Shutdown => Err(RpcError::new(
                "failed",
                "not the guest's init: nothing to power off",
            )),
        }
    }
}

/// Handles one request: [`Call::decode`], then [`Call::run`].
pub fn handle(agent: &Agent, method: &str, p: Value, emit: &Emit) -> Result<Value, RpcError> {
    Call::decode(method, p)?.run(agent, emit)
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

/// What [`next_incoming`] read from the host.
#[derive(Debug)]
pub enum Incoming {
    /// A request, to handle.
    Request(Request),
    /// A frame that is not a request (empty, not JSON, not of a request's shape): the answer
    /// to send for it (under its id, if it has one that can be read); the connection goes on.
    Refused(Value),
    /// The host closed the stream between frames.
    End,
    /// The stream cannot be read on (a length over the limit, a frame cut short, a read
    /// error): the answer to send, then the connection ends with the error.
    Broken(Value, FrameError),
}

/// Reads the next frame from the host and makes it a request, as [`serve`] does.
pub fn next_incoming(reader: &mut impl Read) -> Incoming {
    let frame = match read_frame(reader) {
        Ok(f) => f,
        Err(FrameError::Eof) => return Incoming::End,
        Err(e @ FrameError::Empty) => {
            return Incoming::Refused(answer(None, Err(RpcError::new("bad_frame", e.to_string()))))
        }
        Err(e) => {
            return Incoming::Broken(
                answer(None, Err(RpcError::new("bad_frame", e.to_string()))),
                e,
            )
        }
    };
    match serde_json::from_slice::<Request>(&frame) {
        Ok(r) => Incoming::Request(r),
        Err(e) => {
            // The id, if the frame is an object that has one.
            let id = serde_json::from_slice::<Value>(&frame)
                .ok()
                .and_then(|v| v["id"].as_u64());
            Incoming::Refused(answer(id, Err(RpcError::new("bad_request", e.to_string()))))
        }
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
        let req = match next_incoming(&mut reader) {
            Incoming::Request(r) => r,
            Incoming::Refused(a) => {
                send(a);
                continue;
            }
            Incoming::End => break Ok(()),
            Incoming::Broken(a, e) => {
                send(a);
                break Err(e);
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
