//! Guest processes' stdio and exits: one thread per sandbox takes the agent's output events
//! and writes each to its process's FIFOs (from containerd), and sees each watched process end
//! (its `wait_process` answer, which comes after all its output) and says so.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{AgentClient, Output, Pending};

/// Output held for processes not yet watched (it may come before `start_process`'s answer).
const EARLY_BYTES: usize = 16 << 20;

/// How a watched process ended: its exit status (128 + signal when killed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exited {
    pub status: u32,
    pub at: std::time::SystemTime,
}

/// Where a process's output goes.
#[derive(Default)]
pub struct Sinks {
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

impl Sinks {
    /// Opens containerd's stdout and stderr FIFOs (empty: not wanted). The same path for
    /// both (a log file or a terminal-less `ctr`) gets one file.
    pub fn open(stdout: &str, stderr: &str) -> Result<Sinks, String> {
        let open = |p: &str| -> Result<Option<File>, String> {
            if p.is_empty() {
                return Ok(None);
            }
            open_writer(Path::new(p)).map_err(|e| format!("{p}: {e}"))
        };
        let out = open(stdout)?;
        let err = if stderr == stdout && out.is_some() {
            out.as_ref()
                .map(File::try_clone)
                .transpose()
                .map_err(|e| format!("{stderr}: {e}"))?
        } else {
            open(stderr)?
        };
        Ok(Sinks {
            stdout: out,
            stderr: err,
        })
    }

    fn write(&mut self, o: &Output) {
        let sink = if o.stream == "stderr" {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        // A reader that went away (a detached `ctr`) loses the output, nothing else.
        if let Some(f) = sink {
            if f.write_all(&o.data).is_err() {
                *sink = None;
            }
        }
    }
}

/// How long a FIFO may stay without a reader at create (containerd opens its end first).
const READER_WAIT: Duration = Duration::from_secs(5);

/// Opens `path` for writing without hanging on a FIFO nobody reads: none within
/// [`READER_WAIT`] means no output is wanted. The file is then blocking (output is written
/// whole, in order).
fn open_writer(path: &Path) -> std::io::Result<Option<File>> {
    let end = Instant::now() + READER_WAIT;
    let f = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    // SAFETY: fcntl(2) on a descriptor `f` owns.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let set = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    if set < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(f))
}

type Done = Box<dyn FnOnce(Exited) + Send>;

struct Watch {
    guest: String,
    sinks: Sinks,
    wait: Pending,
    done: Done,
}

/// The sandbox's stdio thread.
pub struct Supervisor {
    tx: Option<Sender<Watch>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    pub fn start(agent: Arc<AgentClient>) -> Result<Supervisor, String> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("stdio".into())
            .spawn(move || run(&agent, rx))
            .map_err(|e| format!("stdio thread: {e}"))?;
        Ok(Supervisor {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Watches guest process `guest` (asking the agent for its exit): its output goes to
    /// `sinks`, then `done` is called once with how it ended.
    pub fn watch(&self, agent: &AgentClient, guest: &str, sinks: Sinks, done: Done) {
        let wait = match agent.send("wait_process", serde_json::json!({ "process": guest })) {
            Ok(w) => w,
            Err(_) => return done(lost()),
        };
        let w = Watch {
            guest: guest.to_string(),
            sinks,
            wait,
            done,
        };
        if let Some(Err(mpsc::SendError(w))) = self.tx.as_ref().map(|tx| tx.send(w)) {
            (w.done)(lost());
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // The thread ends once every watched process has ended (or the agent is gone).
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The end of a process whose VM went away: SIGKILL's status.
fn lost() -> Exited {
    Exited {
        status: 128 + libc::SIGKILL as u32,
        at: std::time::SystemTime::now(),
    }
}

fn exited(answer: &serde_json::Value) -> Exited {
    let status = answer["exit_code"]
        .as_u64()
        .filter(|c| *c <= 255)
        .map_or(255, |c| c as u32);
    Exited {
        status,
        at: std::time::SystemTime::now(),
    }
}

fn run(agent: &AgentClient, rx: Receiver<Watch>) {
    let mut watched: HashMap<String, Watch> = HashMap::new();
    let mut early: Vec<Output> = Vec::new();
    let mut early_bytes = 0usize;
    let mut open = true;
    loop {
        loop {
            match rx.try_recv() {
                Ok(mut w) => {
                    for o in early.iter().filter(|o| o.process == w.guest) {
                        w.sinks.write(o);
                    }
                    early.retain(|o| o.process != w.guest);
                    early_bytes = early.iter().map(|o| o.data.len()).sum();
                    watched.insert(w.guest.clone(), w);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !open && watched.is_empty() {
            return;
        }
        let mut route =
            |watched: &mut HashMap<String, Watch>, o: Output| match watched.get_mut(&o.process) {
                Some(w) => w.sinks.write(&o),
                None if early_bytes + o.data.len() <= EARLY_BYTES => {
                    early_bytes += o.data.len();
                    early.push(o);
                }
                None => {}
            };
        let t = Instant::now();
        if let Some(o) = agent.next_output(Duration::from_millis(20)) {
            route(&mut watched, o);
        }
        let ended: Vec<(String, Exited)> = watched
            .iter()
            .filter_map(|(id, w)| {
                w.wait
                    .try_take()
                    .map(|a| (id.clone(), a.as_ref().map_or_else(|_| lost(), exited)))
            })
            .collect();
        if !ended.is_empty() {
            // A process's output all came before its wait answer: take what is queued.
            while let Some(o) = agent.next_output(Duration::ZERO) {
                route(&mut watched, o);
            }
        }
        for (id, e) in ended {
            if let Some(w) = watched.remove(&id) {
                drop(w.sinks);
                (w.done)(e);
            }
        }
        if agent.closed().is_some() {
            for (_, w) in watched.drain() {
                (w.done)(lost());
            }
            if !open {
                return;
            }
        }
        // next_output returns at once when the connection is gone: don't spin.
        if let Some(rest) = Duration::from_millis(20).checked_sub(t.elapsed()) {
            if agent.closed().is_some() {
                std::thread::sleep(rest);
            }
        }
    }
}
