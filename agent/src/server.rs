//! One connection from the host: frames read in order, each request handled on its own
//! thread (a `wait_process` may take as long as the process runs), answers and events written
//! by one writer thread in the order they are produced.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::process::{Emit, Processes, StartParams};
use crate::protocol::{answer, read_frame, write_frame, FrameError, Request, RpcError};
use crate::{net, system};

/// Requests handled at once on one connection; more are answered `busy`.
pub const MAX_IN_FLIGHT: usize = 64;

/// What the agent serves from.
pub struct Agent {
    pub processes: Processes,
    /// PID 1 of the guest: reaps every orphan, may power the VM off.
    pub init: bool,
}

impl Agent {
    pub fn new(init: bool) -> Arc<Agent> {
        Arc::new(Agent {
            processes: Processes::new(init),
            init,
        })
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
        "shutdown" if agent.init => {
            // After the answer has gone out.
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(200));
                crate::init::power_off();
            });
            Ok(json!({}))
        }
        "shutdown" => Err(RpcError::new(
            "failed",
            "not the guest's init: nothing to power off",
        )),
        other => Err(RpcError::new(
            "unknown_method",
            format!("no method {other:?}"),
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

/// Serves one connection until the host closes it (`Ok`) or sends what cannot be read as
/// frames (`Err`, after an answer saying why).
pub fn serve(
    agent: Arc<Agent>,
    mut reader: impl Read,
    mut writer: impl Write + Send + 'static,
) -> Result<(), FrameError> {
    let (tx, rx) = mpsc::channel::<Value>();
    let out = std::thread::Builder::new()
        .name("agent-writer".into())
        .spawn(move || {
            for v in rx {
                let text = serde_json::to_vec(&v).expect("JSON");
                if write_frame(&mut writer, &text).is_err() {
                    break;
                }
            }
        })
        .expect("writer thread");
    let emit: Emit = {
        let tx = tx.clone();
        Arc::new(move |v| {
            let _ = tx.send(v);
        })
    };
    let in_flight = Arc::new(AtomicUsize::new(0));
    let result = loop {
        let frame = match read_frame(&mut reader) {
            Ok(f) => f,
            Err(FrameError::Eof) => break Ok(()),
            Err(e @ FrameError::Empty) => {
                let _ = tx.send(answer(None, Err(RpcError::new("bad_frame", e.to_string()))));
                continue;
            }
            Err(e) => {
                let _ = tx.send(answer(None, Err(RpcError::new("bad_frame", e.to_string()))));
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
                let _ = tx.send(answer(id, Err(RpcError::new("bad_request", e.to_string()))));
                continue;
            }
        };
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(answer(
                Some(req.id),
                Err(RpcError::new(
                    "busy",
                    format!("{MAX_IN_FLIGHT} requests in flight"),
                )),
            ));
            continue;
        }
        let tx_busy = tx.clone();
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
            let _ = tx.send(answer(Some(req.id), r));
        });
        if spawned.is_err() {
            // The closure (and its slot) went with the failed spawn.
            let _ = tx_busy.send(answer(
                Some(id),
                Err(RpcError::new("busy", "no thread for the request")),
            ));
        }
    };
    drop(tx);
    drop(emit);
    // Answers of requests still running are dropped with the connection; the writer ends
    // when the last sender goes.
    let _ = out;
    result
}
