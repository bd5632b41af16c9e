//! Processes the host asks the agent to run: started with their stdout and stderr streamed
//! to the host as events, stdin fed from the host, waited for (exit code or signal, after
//! all their output has been sent) and signalled.
//!
//! Exit statuses come from one place. As PID 1 the agent must reap every orphan the guest
//! makes, so one reaper thread waits for any child; otherwise (a service, or a test) a thread
//! per process waits for exactly that pid, so children of whoever else shares the process are
//! left alone. Either way a child is first seen to have exited without being reaped
//! (`waitid(WNOWAIT)`), then reaped with the table's lock held: a pid in the table with no exit
//! recorded is a live child or a zombie, never a reused pid. The table's lock is not held
//! across a spawn: the slot is reserved, the child spawned, then entered in the table; until
//! then the reaper leaves a child it does not know unreaped (so a quick exit is not lost, and
//! std's own wait for a child that failed to exec finds it).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::protocol::{quote, RpcError};

/// How many processes the agent keeps track of at once (running, or exited and not yet
/// waited for).
pub const MAX_PROCESSES: usize = 1024;
/// The largest chunk of output sent in one event.
const CHUNK: usize = 64 << 10;
/// Where programs are looked up when the request's environment has no PATH (and the PATH
/// such a process gets).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// A process's stdin pipe while it is open. Writes and the close take its lock in turn: a
/// close waits for a write under way.
type Stdin = Arc<Mutex<Option<ChildStdin>>>;

struct Proc {
    pid: i32,
    stdin: Stdin,
    exit: Option<Exit>,
    /// Output pipes still being read.
    readers: u32,
    waited: bool,
}

struct Table {
    procs: HashMap<String, Proc>,
    by_pid: HashMap<i32, String>,
    /// Spawns under way: their slots are reserved, their children not in the table yet.
    spawning: usize,
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
    /// `KEY=VALUE` entries: the whole environment (PATH added if missing).
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Keep a pipe to its stdin (fed with `write_stdin`); else it reads /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// A directory to run it in as its root (chroot): a container's root file system. The
    /// program is looked up in PATH inside it, and `cwd` is inside it (default `/`).
    #[serde(default)]
    pub root: Option<String>,
}

/// `start_process`, checked: a program name, no NUL anywhere, the environment's entries
/// split (with PATH), an absolute `root`. Made only by its `TryFrom<StartParams>`, in
/// [`crate::server::Call::decode`]; that the root, `cwd` and the program are there is for
/// [`Processes::start`] to find out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedStart {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: bool,
    root: Option<String>,
}

impl TryFrom<StartParams> for CheckedStart {
    type Error = RpcError;

    fn try_from(p: StartParams) -> Result<CheckedStart, RpcError> {
        let Some(program) = p.argv.first() else {
            return Err(bad("argv is empty"));
        };
        if p.argv.iter().any(|a| a.contains('\0')) {
            return Err(bad("argv holds a NUL byte"));
        }
        let mut env = Vec::new();
        for kv in p.env.iter().flatten() {
            let (k, v) = kv
                .split_once('=')
                .filter(|(k, _)| !k.is_empty() && !kv.contains('\0'))
                .ok_or_else(|| bad(format!("env entry {} is not KEY=VALUE", quote(kv))))?;
            env.push((k.to_string(), v.to_string()));
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        match &p.root {
            Some(r) if r.contains(['\0', ':']) => {
                return Err(bad(format!("root {} holds a NUL byte or ':'", quote(r))))
            }
            Some(r) if !r.starts_with('/') => {
                return Err(bad(format!("root {} is not an absolute path", quote(r))))
            }
            _ => {}
        }
        if p.cwd.as_ref().is_some_and(|d| d.contains('\0')) {
            return Err(bad("cwd holds a NUL byte"));
        }
        // Resolving the program fails on this before it looks anything up, with these words.
        if let Err(e) = program_name(program) {
            return Err(failed(match &p.root {
                Some(r) => format!("in root {r}: {e}"),
                None => e,
            }));
        }
        Ok(CheckedStart {
            argv: p.argv,
            env,
            cwd: p.cwd,
            stdin: p.stdin,
            root: p.root,
        })
    }
}

impl CheckedStart {
    /// Program and arguments: at least the program, whose name is not empty; no NUL.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The whole environment, in order: keys neither empty nor holding `=`, no NUL; PATH in
    /// it.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The program: `argv[0]`.
    pub fn program(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }

    /// Where the program is looked for: the environment's last PATH.
    pub fn path(&self) -> &str {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str())
    }

    /// Its working directory (relative to the agent's, or to `/` in a root); no NUL.
    pub fn cwd(&self) -> Option<&str> {
        self.cwd.as_deref()
    }

    pub fn stdin(&self) -> bool {
        self.stdin
    }

    /// The directory it is chrooted into: absolute, with no NUL or `:`.
    pub fn root(&self) -> Option<&str> {
        self.root.as_deref()
    }
}

/// A signal `kill_process` sends: 1 to 64. Made only by [`Signal::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal(i32);

impl Signal {
    pub const KILL: Signal = Signal(libc::SIGKILL);
    pub const TERM: Signal = Signal(libc::SIGTERM);

    /// Signal `n`: `bad_params` outside 1..64.
    pub fn new(n: i32) -> Result<Signal, RpcError> {
        if !(1..=64).contains(&n) {
            return Err(bad(format!("signal {n} is not 1..64")));
        }
        Ok(Signal(n))
    }

    pub fn number(self) -> i32 {
        self.0
    }
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::new("bad_params", msg)
}

fn failed(msg: impl Into<String>) -> RpcError {
    RpcError::new("failed", msg)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `p` is a regular file with an execute bit (following symlinks); why not.
fn executable(p: &Path) -> Result<(), String> {
    let m = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if !m.is_file() {
        return Err("not a regular file".into());
    }
    if m.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}

/// Whether `program` can name a program at all (not empty); why not.
fn program_name(program: &str) -> Result<(), String> {
    if program.is_empty() {
        return Err("the program name is empty".into());
    }
    Ok(())
}

/// The executable `program` names: a path if it holds a `/` (relative to `dir`, which is
/// absolute), else the first executable `program` in `path`'s absolute entries. The path is
/// not canonicalised: a multi-call binary still sees the name it was called by.
pub fn resolve_program(program: &str, path: &str, dir: &Path) -> Result<PathBuf, String> {
    program_name(program)?;
    if program.contains('/') {
        let p = dir.join(program);
        return executable(&p)
            .map(|()| p)
            .map_err(|e| format!("{}: {e}", quote(program)));
    }
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p).is_ok())
        .ok_or_else(|| format!("{}: not found in PATH {}", quote(program), quote(path)))
}

/// [`resolve_program`] for a process chrooted into `root`: `program`, `path` and `dir` are as
/// it sees them, and each candidate is looked up inside `root`, its symlinks (absolute ones
/// included) resolved there, never in the agent's own file system.
fn resolve_program_in(
    root: &Path,
    program: &str,
    path: &str,
    dir: &Path,
) -> Result<PathBuf, String> {
    program_name(program)?;
    let root_fd = crate::mounts::open_dir(root).map_err(|e| e.to_string())?;
    let executable_in = |p: &Path| -> Result<(), String> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = crate::mounts::open_in(root_fd.as_fd(), p, crate::mounts::Create::Nothing)
            .map_err(|e| e.to_string())?;
        executable(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())))
    };
    if program.contains('/') {
        let p = dir.join(program);
        return executable_in(&p)
            .map(|()| p)
            .map_err(|e| format!("{}: {e}", quote(program)));
    }
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(program))
        .find(|p| executable_in(p).is_ok())
        .ok_or_else(|| format!("{}: not found in PATH {}", quote(program), quote(path)))
}

/// Blocks until a child (`P_PID` `id`, or `P_ALL`) has exited, leaving it unreaped; its pid.
fn exited(idtype: libc::idtype_t, id: libc::id_t) -> io::Result<i32> {
    loop {
        // SAFETY: siginfo_t is plain data, for which all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid(2) writes into `info`, which outlives the call; WNOWAIT leaves the
        // child as it is.
        let r = unsafe { libc::waitid(idtype, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            // SAFETY: waitid(WEXITED) without WNOHANG returned a child: si_pid is set.
            return Ok(unsafe { info.si_pid() });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reaps `pid` if it has exited (without blocking); its exit. Called with the table's lock
/// held.
fn reap(pid: i32) -> Option<Exit> {
    let mut st = 0;
    // SAFETY: waitpid(2) writes the status into `st`, which outlives the call.
    let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
    (r == pid).then(|| Exit::from_wait_status(st))
}

impl Processes {
    /// `reap_all`: reap every child of this process (the agent is PID 1).
    pub fn new(reap_all: bool) -> io::Result<Processes> {
        let p = Processes {
            inner: Arc::new(Inner {
                table: Mutex::new(Table {
                    procs: HashMap::new(),
                    by_pid: HashMap::new(),
                    spawning: 0,
                }),
                changed: Condvar::new(),
                next: AtomicU64::new(1),
                reap_all,
            }),
        };
        if reap_all {
            let me = p.clone();
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || me.reap_all_children())?;
        }
        Ok(p)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.inner.table)
    }

    fn notify(&self) {
        self.inner.changed.notify_all();
    }

    /// Starts a process; its output goes to `emit` as `output` events. Returns its name and
    /// pid.
    pub fn start(&self, p: CheckedStart, emit: Emit) -> Result<Value, RpcError> {
        let (program, path) = (p.program(), p.path());
        // With a root, paths are checked under it here and used as they are inside it.
        let root = match &p.root {
            None => None,
            Some(r) => match std::fs::metadata(r) {
                Ok(m) if m.is_dir() => Some(PathBuf::from(r)),
                Ok(_) => return Err(failed(format!("root {}: not a directory", quote(r)))),
                Err(e) => return Err(failed(format!("root {}: {e}", quote(r)))),
            },
        };
        let under = |p: &Path| match &root {
            Some(r) => r.join(p.strip_prefix("/").unwrap_or(p)),
            None => p.to_path_buf(),
        };
        let here = match root {
            Some(_) => PathBuf::from("/"),
            None => std::env::current_dir().map_err(|e| failed(format!("the agent's cwd: {e}")))?,
        };
        let dir = match &p.cwd {
            Some(d) => {
                let dir = here.join(d);
                match std::fs::metadata(under(&dir)) {
                    Ok(m) if m.is_dir() => dir,
                    Ok(_) => return Err(failed(format!("cwd {}: not a directory", quote(d)))),
                    Err(e) => return Err(failed(format!("cwd {}: {e}", quote(d)))),
                }
            }
            None => here,
        };
        // Resolved here, so that the spawn itself should not fail: a failed exec makes std
        // wait for the child, which as PID 1 is the reaper's business.
        let exe = match &root {
            None => resolve_program(program, path, &dir).map_err(failed)?,
            // The path as the process sees it after the chroot, checked inside the root.
            Some(r) => resolve_program_in(r, program, path, &dir)
                .map_err(|e| failed(format!("in root {}: {e}", r.display())))?,
        };
        let mut cmd = Command::new(&exe);
        cmd.arg0(program)
            .args(p.argv.iter().skip(1))
            .stdin(if p.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            // Its own process group, so that a signal for it reaches what it starts too.
            .process_group(0);
        match &root {
            None => {
                cmd.current_dir(&dir);
            }
            Some(r) => {
                let c = |p: &Path| {
                    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()))
                        .map_err(|_| bad("a path holds a NUL byte"))
                };
                let (croot, cdir) = (c(r)?, c(&dir)?);
                // SAFETY: the closure runs in the child between fork and exec and only calls
                // chroot(2) and chdir(2), which are async-signal-safe, on C strings made before
                // the fork.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::chroot(croot.as_ptr()) != 0 || libc::chdir(cdir.as_ptr()) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }

        // Reserve the slot, spawn without the lock, then enter the child in the table.
        {
            let mut t = self.lock();
            if t.procs.len() + t.spawning >= MAX_PROCESSES {
                // Forget the ones that are done and were waited for.
                t.procs.retain(|_, p| !(p.waited && p.exit.is_some()));
                if t.procs.len() + t.spawning >= MAX_PROCESSES {
                    return Err(RpcError::new(
                        "busy",
                        format!("{MAX_PROCESSES} processes are tracked already"),
                    ));
                }
            }
            t.spawning += 1;
        }
        let spawned = cmd.spawn();
        let mut t = self.lock();
        t.spawning -= 1;
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                drop(t);
                self.notify();
                return Err(failed(format!("{}: {e}", quote(program))));
            }
        };
        let pid = child.id() as i32;
        let name = format!("p{}", self.inner.next.fetch_add(1, Ordering::Relaxed));
        let pipes = [
            (
                "stdout",
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
            (
                "stderr",
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
        ];
        t.procs.insert(
            name.clone(),
            Proc {
                pid,
                stdin: Arc::new(Mutex::new(child.stdin.take())),
                exit: None,
                readers: 2,
                waited: false,
            },
        );
        t.by_pid.insert(pid, name.clone());
        drop(t);
        self.notify();
        // The Child is dropped without a wait: its status is collected by pid.
        drop(child);

        let mut lost = false;
        for (stream, pipe) in pipes {
            let (me, n, emit) = (self.clone(), name.clone(), emit.clone());
            let spawned = pipe.map(|pipe| {
                std::thread::Builder::new()
                    .name(format!("{name}-{stream}"))
                    .spawn(move || me.pump(&n, stream, pipe, &emit))
            });
            if !matches!(spawned, Some(Ok(_))) {
                // The pipe went with the closure: nobody reads that stream.
                self.reader_done(&name);
                lost = true;
            }
        }
        let mut unwaited = false;
        if !self.inner.reap_all {
            let me = self.clone();
            unwaited = std::thread::Builder::new()
                .name(format!("{name}-wait"))
                .spawn(move || me.wait_for(pid))
                .is_err();
        }
        if lost || unwaited {
            let _ = self.kill(&name, Signal::KILL);
            if unwaited {
                // Nobody else would reap it.
                self.wait_for(pid);
            }
            if let Some(p) = self.lock().procs.get_mut(&name) {
                // Nobody will wait for it: forget it once it is gone.
                p.waited = true;
            }
            return Err(failed(format!(
                "{}: no thread to follow it (killed)",
                quote(program)
            )));
        }
        Ok(json!({ "process": name, "pid": pid }))
    }

    /// Sends `pipe`'s content as `output` events until it ends.
    fn pump(&self, name: &str, stream: &str, mut pipe: Box<dyn Read + Send>, emit: &Emit) {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                // Blocks while the connection's queue is full.
                Ok(n) => emit(json!({
                    "event": "output",
                    "process": name,
                    "stream": stream,
                    "data": base64::engine::general_purpose::STANDARD.encode(&buf[..n]),
                })),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.reader_done(name);
    }

    fn reader_done(&self, name: &str) {
        if let Some(p) = self.lock().procs.get_mut(name) {
            p.readers = p.readers.saturating_sub(1);
        }
        self.notify();
    }

    /// Records `pid`'s exit (if it is one of ours). Called with the table's lock held, right
    /// after the reap.
    fn record(t: &mut Table, pid: i32, exit: Exit) {
        let Some(name) = t.by_pid.remove(&pid) else {
            return;
        };
        if let Some(p) = t.procs.get_mut(&name) {
            p.exit = Some(exit);
            // Its stdin is closed now, or after the write under way.
            if let Ok(mut s) = p.stdin.try_lock() {
                *s = None;
            }
        }
    }

    /// Not PID 1: waits for our child `pid` and records its exit.
    fn wait_for(&self, pid: i32) {
        let seen = exited(libc::P_PID, pid as libc::id_t);
        let mut t = self.lock();
        // Reaped by someone else (a status lost): said as signal 0.
        let exit = seen.ok().and_then(reap).unwrap_or(Exit::Signal(0));
        Self::record(&mut t, pid, exit);
        drop(t);
        self.notify();
    }

    /// As PID 1: reaps every child, recording our processes' exits.
    fn reap_all_children(&self) {
        loop {
            match exited(libc::P_ALL, 0) {
                Ok(pid) => {
                    let mut t = self.lock();
                    // It may be the child of a spawn under way: leave it until it is in the
                    // table or the spawns are over.
                    while t.spawning > 0 && !t.by_pid.contains_key(&pid) {
                        t = match self
                            .inner
                            .changed
                            .wait_timeout(t, Duration::from_millis(100))
                        {
                            Ok((t, _)) => t,
                            Err(e) => e.into_inner().0,
                        };
                    }
                    // Gone already if its spawn's own wait took it.
                    if let Some(exit) = reap(pid) {
                        Self::record(&mut t, pid, exit);
                    }
                    drop(t);
                    self.notify();
                }
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    // No children: wait for a spawn (or look again shortly).
                    let t = self.lock();
                    let _ = self
                        .inner
                        .changed
                        .wait_timeout(t, Duration::from_millis(100));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits until `name` has exited and all its output was sent; its exit.
    pub fn wait(&self, name: &str) -> Result<Value, RpcError> {
        let mut t = self.lock();
        loop {
            let p = t.procs.get_mut(name).ok_or_else(|| not_found(name))?;
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

    /// Sends `signal` to `name`'s process group: while it runs, or after it exited while
    /// what it started still holds its output pipes.
    pub fn kill(&self, name: &str, signal: Signal) -> Result<Value, RpcError> {
        let t = self.lock();
        let p = t.procs.get(name).ok_or_else(|| not_found(name))?;
        // The group's id is its leader's pid. While no exit is recorded the leader is not
        // reaped (reaping happens under the lock held here), so the id is still its own. Once
        // reaped, the id stays its group's as long as a member is left — and members may be
        // what still holds the pipes (`readers`). Nobody left: ESRCH, nothing to do.
        if p.exit.is_none() || p.readers > 0 {
            // SAFETY: kill(2) takes no pointers.
            if unsafe { libc::kill(-p.pid, signal.0) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(failed(format!("kill {name}: {e}")));
                }
            }
        }
        Ok(json!({}))
    }

    fn stdin_of(&self, name: &str) -> Result<Stdin, RpcError> {
        let t = self.lock();
        Ok(t.procs
            .get(name)
            .ok_or_else(|| not_found(name))?
            .stdin
            .clone())
    }

    /// Writes `data` to `name`'s stdin (after any write or close under way). A process that
    /// does not read blocks only this request, and a close that comes meanwhile.
    pub fn write_stdin(&self, name: &str, data: &[u8]) -> Result<Value, RpcError> {
        let stdin = self.stdin_of(name)?;
        let mut s = lock(&stdin);
        let pipe = s
            .as_mut()
            .ok_or_else(|| failed(format!("{name} has no open stdin")))?;
        let r = pipe.write_all(data);
        let exited = self.lock().procs.get(name).is_none_or(|p| p.exit.is_some());
        if r.is_err() || exited {
            // Nobody reads it any more.
            *s = None;
        }
        r.map(|()| json!({}))
            .map_err(|e| failed(format!("{name} stdin: {e}")))
    }

    /// Closes `name`'s stdin, after a write under way.
    pub fn close_stdin(&self, name: &str) -> Result<Value, RpcError> {
        let stdin = self.stdin_of(name)?;
        *lock(&stdin) = None;
        Ok(json!({}))
    }
}

fn not_found(name: &str) -> RpcError {
    RpcError::new("not_found", format!("no process {}", quote(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_resolved_to_executables() {
        let root = Path::new("/");
        let sh = resolve_program("sh", DEFAULT_PATH, root).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        // Relative entries of PATH are skipped.
        assert!(resolve_program("sh", "bin:usr/bin", root).is_err());
        let e = resolve_program("no-such-program", DEFAULT_PATH, root).unwrap_err();
        assert!(e.contains("not found in PATH"), "{e}");
        let dir = std::env::temp_dir().join(format!("torii-agent-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("data"), "").unwrap();
        std::fs::write(dir.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(dir.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = resolve_program("tool", &format!("/no/such:{}", dir.display()), root);
        let data = resolve_program("data", &dir.display().to_string(), root);
        let not_exe = resolve_program(&dir.join("data").display().to_string(), "", root);
        let a_dir = resolve_program(&dir.display().to_string(), "", root);
        // A path with a `/` is taken relative to the directory given.
        let relative = resolve_program("./tool", "", &dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found.unwrap(), dir.join("tool"));
        assert!(data.unwrap_err().contains("not found"));
        assert!(not_exe.unwrap_err().contains("not executable"));
        assert!(a_dir.unwrap_err().contains("not a regular file"));
        assert_eq!(relative.unwrap(), dir.join("./tool"));
        assert!(resolve_program("/no/such", "", root).is_err());
        assert!(resolve_program("", DEFAULT_PATH, root).is_err());
        for d in ["/bin", "/sbin", "/usr/bin", "/usr/sbin"] {
            assert!(DEFAULT_PATH.split(':').any(|x| x == d), "{d}");
        }
    }

    /// What `start_process` and `kill_process` refuse without looking at the system is
    /// refused by [`Call::decode`], with the words (and codes) they used to answer with when
    /// run.
    #[test]
    fn decode_refuses_what_needs_no_system() {
        use crate::server::Call;
        for (method, params, code, message) in [
            (
                "start_process",
                json!({"argv": []}),
                "bad_params",
                "argv is empty",
            ),
            (
                "start_process",
                json!({"argv": ["sh", "a\0b"]}),
                "bad_params",
                "argv holds a NUL byte",
            ),
            (
                "start_process",
                json!({"argv": ["true"], "env": ["A=1", "NOEQUALS"]}),
                "bad_params",
                "env entry \"NOEQUALS\" is not KEY=VALUE",
            ),
            (
                "start_process",
                json!({"argv": ["true"], "env": ["=x"]}),
                "bad_params",
                "env entry \"=x\" is not KEY=VALUE",
            ),
            (
                "start_process",
                json!({"argv": ["true"], "env": ["A=\0"]}),
                "bad_params",
                "env entry \"A=\\0\" is not KEY=VALUE",
            ),
            (
                "start_process",
                json!({"argv": ["true"], "root": "rel"}),
                "bad_params",
                "root \"rel\" is not an absolute path",
            ),
            (
                "start_process",
                json!({"argv": ["true"], "root": "/a:b"}),
                "bad_params",
                "root \"/a:b\" holds a NUL byte or ':'",
            ),
            (
                "start_process",
                json!({"argv": ["true"], "root": "/r\0"}),
                "bad_params",
                "root \"/r\\0\" holds a NUL byte or ':'",
            ),
            (
                "start_process",
                json!({"argv": ["true"], "cwd": "/tmp\0"}),
                "bad_params",
                "cwd holds a NUL byte",
            ),
            // Resolving the program answered `failed` for an empty name: it still does.
            (
                "start_process",
                json!({"argv": ["", "x"]}),
                "failed",
                "the program name is empty",
            ),
            (
                "start_process",
                json!({"argv": [""], "root": "/r"}),
                "failed",
                "in root /r: the program name is empty",
            ),
            (
                "kill_process",
                json!({"process": "p1", "signal": 99}),
                "bad_params",
                "signal 99 is not 1..64",
            ),
            (
                "kill_process",
                json!({"process": "p1", "signal": 0}),
                "bad_params",
                "signal 0 is not 1..64",
            ),
            (
                "kill_process",
                json!({"process": "p1", "signal": -9}),
                "bad_params",
                "signal -9 is not 1..64",
            ),
            (
                "kill_process",
                json!({"process": "p1", "signal": 65}),
                "bad_params",
                "signal 65 is not 1..64",
            ),
        ] {
            let e = Call::decode(method, params.clone()).unwrap_err();
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                (code, message),
                "{method} {params}"
            );
        }
        // Decoded: PATH added when missing, the last one counts; SIGTERM by default.
        let start = |p: Value| match Call::decode("start_process", p) {
            Ok(Call::StartProcess(s)) => s,
            other => panic!("{other:?}"),
        };
        let s = start(json!({"argv": ["true"], "env": ["A=1=2"]}));
        assert_eq!(s.path(), DEFAULT_PATH);
        assert_eq!(
            s.env(),
            [
                ("A".to_string(), "1=2".to_string()),
                ("PATH".to_string(), DEFAULT_PATH.to_string())
            ]
        );
        let s = start(json!({"argv": ["true"], "env": ["PATH=/a", "PATH=/b"]}));
        assert_eq!((s.path(), s.env().len()), ("/b", 2));
        let s = start(json!({"argv": ["true"], "root": "/", "cwd": "work"}));
        assert_eq!(
            (s.program(), s.root(), s.cwd()),
            ("true", Some("/"), Some("work"))
        );
        for (signal, want) in [(None, libc::SIGTERM), (Some(1), 1), (Some(64), 64)] {
            let mut p = json!({"process": "p1"});
            if let Some(n) = signal {
                p["signal"] = json!(n);
            }
            match Call::decode("kill_process", p) {
                Ok(Call::KillProcess { signal, .. }) => assert_eq!(signal.number(), want),
                other => panic!("{other:?}"),
            }
        }
    }
}
