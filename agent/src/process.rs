//! Processes the host asks the agent to run: started with their stdout and stderr streamed
//! to the host as events, stdin fed from the host, waited for (exit code or signal, after
//! all their output has been sent) and signalled.
//!
//! Exit statuses come from one place. As PID 1 the agent must reap every orphan the guest
//! makes, so one reaper thread calls `waitpid(-1)` and hands the statuses of our processes
//! over; otherwise (a service, or a test) a thread per process waits for exactly that pid, so
//! children of whoever else shares the process are left alone.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::protocol::RpcError;

/// How many processes the agent keeps track of at once (running, or exited and not yet
/// waited for).
pub const MAX_PROCESSES: usize = 1024;
/// The largest chunk of output sent in one event.
const CHUNK: usize = 64 << 10;

/// Sends an event to the host.
pub type Emit = Arc<dyn Fn(Value) + Send + Sync>;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn from_wait_status(st: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(st) {
            Exit::Signal(libc::WTERMSIG(st))
        } else {
            Exit::Code(libc::WEXITSTATUS(st))
        }
    }

    fn to_json(self) -> Value {
        match self {
            Exit::Code(c) => json!({ "exit_code": c, "signal": null }),
            Exit::Signal(s) => json!({ "exit_code": 128 + s, "signal": s }),
        }
    }
}

struct Proc {
    pid: i32,
    stdin: Option<ChildStdin>,
    exit: Option<Exit>,
    /// Output pipes still being read.
    readers: u32,
    waited: bool,
}

struct Table {
    procs: HashMap<String, Proc>,
    by_pid: HashMap<i32, String>,
}

struct Inner {
    table: Mutex<Table>,
    changed: Condvar,
    next: AtomicU64,
    reap_all: bool,
}

/// The agent's processes.
#[derive(Clone)]
pub struct Processes {
    inner: Arc<Inner>,
}

/// `start_process` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartParams {
    /// Program and arguments; the program is looked up in PATH.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries: the whole environment (default: PATH only).
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Keep a pipe to its stdin (fed with `write_stdin`); else it reads /dev/null.
    #[serde(default)]
    pub stdin: bool,
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::new("bad_params", msg)
}

impl Processes {
    /// `reap_all`: reap every child of this process (the agent is PID 1).
    pub fn new(reap_all: bool) -> Processes {
        let p = Processes {
            inner: Arc::new(Inner {
                table: Mutex::new(Table {
                    procs: HashMap::new(),
                    by_pid: HashMap::new(),
                }),
                changed: Condvar::new(),
                next: AtomicU64::new(1),
                reap_all,
            }),
        };
        if reap_all {
            let inner = p.inner.clone();
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reap_all_children(&inner))
                .expect("reaper thread");
        }
        p
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a process; its output goes to `emit` as `output` events. Returns its name and
    /// pid.
    pub fn start(&self, p: StartParams, emit: Emit) -> Result<Value, RpcError> {
        let Some(program) = p.argv.first() else {
            return Err(bad("argv is empty"));
        };
        if p.argv.iter().any(|a| a.contains('\0')) {
            return Err(bad("argv holds a NUL byte"));
        }
        let mut cmd = Command::new(program);
        cmd.args(&p.argv[1..])
            .stdin(if p.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear();
        match &p.env {
            Some(env) => {
                for kv in env {
                    let (k, v) = kv
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .ok_or_else(|| bad(format!("env entry {kv:?} is not KEY=VALUE")))?;
                    cmd.env(k, v);
                }
            }
            None => {
                cmd.env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                );
            }
        }
        if let Some(d) = &p.cwd {
            cmd.current_dir(d);
        }
        // Its own process group, so that a signal for it reaches what it starts too.
        cmd.process_group(0);
        let mut t = self.lock();
        if t.procs.len() >= MAX_PROCESSES {
            // Forget the ones that are done and were waited for.
            t.procs.retain(|_, p| !(p.waited && p.exit.is_some()));
            if t.procs.len() >= MAX_PROCESSES {
                return Err(RpcError::new(
                    "busy",
                    format!("{MAX_PROCESSES} processes are tracked already"),
                ));
            }
        }
        // Spawned under the table's lock: the reaper, which takes it to hand over a status,
        // cannot see the pid before it is in the table.
        let mut child = cmd
            .spawn()
            .map_err(|e| RpcError::new("failed", format!("{program}: {e}")))?;
        let pid = child.id() as i32;
        let name = format!("p{}", self.inner.next.fetch_add(1, Ordering::Relaxed));
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        t.procs.insert(
            name.clone(),
            Proc {
                pid,
                stdin: child.stdin.take(),
                exit: None,
                readers: 2,
                waited: false,
            },
        );
        t.by_pid.insert(pid, name.clone());
        drop(t);
        // The Child is dropped without a wait: its status is collected below, by pid.
        drop(child);
        for (stream, pipe) in [
            ("stdout", Box::new(out) as Box<dyn Read + Send>),
            ("stderr", Box::new(err)),
        ] {
            let (me, name, emit) = (self.clone(), name.clone(), emit.clone());
            std::thread::spawn(move || me.pump(&name, stream, pipe, &emit));
        }
        if !self.inner.reap_all {
            let me = self.clone();
            std::thread::spawn(move || {
                let mut st = 0;
                loop {
                    // SAFETY: waitpid on a pid this process spawned and nobody else waits for
                    // (not PID 1: no reaper); `st` outlives the call.
                    let r = unsafe { libc::waitpid(pid, &mut st, 0) };
                    if r == pid {
                        me.finish(pid, Exit::from_wait_status(st));
                        return;
                    }
                    if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                    {
                        // Reaped by someone else: the status is lost; say so as a signal 0.
                        me.finish(pid, Exit::Signal(0));
                        return;
                    }
                }
            });
        }
        Ok(json!({ "process": name, "pid": pid }))
    }

    /// Sends `pipe`'s content as `output` events until it ends.
    fn pump(&self, name: &str, stream: &str, mut pipe: Box<dyn Read + Send>, emit: &Emit) {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => emit(json!({
                    "event": "output",
                    "process": name,
                    "stream": stream,
                    "data": base64::engine::general_purpose::STANDARD.encode(&buf[..n]),
                })),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut t = self.lock();
        if let Some(p) = t.procs.get_mut(name) {
            p.readers -= 1;
        }
        drop(t);
        self.inner.changed.notify_all();
    }

    fn finish(&self, pid: i32, exit: Exit) {
        let mut t = self.lock();
        if let Some(name) = t.by_pid.remove(&pid) {
            if let Some(p) = t.procs.get_mut(&name) {
                p.exit = Some(exit);
                p.stdin = None;
            }
        }
        drop(t);
        self.inner.changed.notify_all();
    }

    /// Waits until `name` has exited and all its output was sent; its exit.
    pub fn wait(&self, name: &str) -> Result<Value, RpcError> {
        let mut t = self.lock();
        loop {
            let p = t
                .procs
                .get_mut(name)
                .ok_or_else(|| RpcError::new("not_found", format!("no process {name}")))?;
            if let (Some(e), 0) = (p.exit, p.readers) {
                p.waited = true;
                return Ok(e.to_json());
            }
            t = self
                .inner
                .changed
                .wait(t)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sends `signal` to `name`'s process group (a process that has exited: nothing to do).
    pub fn kill(&self, name: &str, signal: i32) -> Result<Value, RpcError> {
        if !(1..=64).contains(&signal) {
            return Err(bad(format!("signal {signal} is not 1..64")));
        }
        let t = self.lock();
        let p = t
            .procs
            .get(name)
            .ok_or_else(|| RpcError::new("not_found", format!("no process {name}")))?;
        if p.exit.is_none() {
            // SAFETY: kill(2) on the process group we made for this child, still ours: it has
            // not been reaped (the table's lock is held, and reaping takes it).
            if unsafe { libc::kill(-p.pid, signal) } != 0 {
                return Err(RpcError::new(
                    "failed",
                    format!("kill {name}: {}", std::io::Error::last_os_error()),
                ));
            }
        }
        Ok(json!({}))
    }

    /// Writes `data` to `name`'s stdin.
    pub fn write_stdin(&self, name: &str, data: &[u8]) -> Result<Value, RpcError> {
        // The pipe is taken out for the write, so a process that does not read blocks only
        // this request, not the table.
        let mut pipe = {
            let mut t = self.lock();
            let p = t
                .procs
                .get_mut(name)
                .ok_or_else(|| RpcError::new("not_found", format!("no process {name}")))?;
            p.stdin
                .take()
                .ok_or_else(|| RpcError::new("failed", format!("{name} has no open stdin")))?
        };
        let r = pipe.write_all(data);
        if let Some(p) = self.lock().procs.get_mut(name).filter(|p| p.exit.is_none()) {
            p.stdin = Some(pipe);
        }
        r.map(|_| json!({}))
            .map_err(|e| RpcError::new("failed", format!("{name} stdin: {e}")))
    }

    /// Closes `name`'s stdin.
    pub fn close_stdin(&self, name: &str) -> Result<Value, RpcError> {
        let mut t = self.lock();
        let p = t
            .procs
            .get_mut(name)
            .ok_or_else(|| RpcError::new("not_found", format!("no process {name}")))?;
        p.stdin = None;
        Ok(json!({}))
    }
}

/// As PID 1: reaps every child, handing our processes' statuses over.
fn reap_all_children(inner: &Arc<Inner>) {
    let me = Processes {
        inner: inner.clone(),
    };
    loop {
        let mut st = 0;
        // SAFETY: waitpid(-1) as the init process, the only waiter in it; `st` outlives it.
        let pid = unsafe { libc::waitpid(-1, &mut st, 0) };
        if pid > 0 {
            me.finish(pid, Exit::from_wait_status(st));
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            // No children: wait for a spawn (or look again shortly).
            let t = me.lock();
            let _ = inner
                .changed
                .wait_timeout(t, std::time::Duration::from_millis(100));
        }
    }
}
