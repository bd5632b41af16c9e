//! A pod VM from start to end: launched, its agent waited for, its guest side configured
//! through the agent, commands run with their output streamed, and everything torn down (the
//! VMM stopped and reaped, its folder and sockets removed) on [`Pod::stop`] or on drop.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::agent::{AgentClient, AgentError, Output};
use crate::spec::{check_backend_socket, free_disk_slot, Disk, DiskSpec, Sandbox, SpecError};
use crate::vmm::{hypervisor, Vm, VmmError};

/// Where pods keep their sockets and logs: `<RUN_DIR>/<name>/`.
pub const RUN_DIR: &str = "/run/torii/vms";
/// How long an agent call that configures the guest may take (TCG is slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a hot-plugged disk may take to show in the guest.
const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// Output taken while waiting for `start_process`'s answer, at most.
const MAX_EARLY_OUTPUT: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("{context}: {source}")]
    Agent {
        context: String,
        #[source]
        source: AgentError,
    },
    #[error("{0}")]
    Other(String),
    /// A signal came while the pod was being made ready.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
}

fn agent_err(context: impl Into<String>) -> impl FnOnce(AgentError) -> PodError {
    let context = context.into();
    move |source| PodError::Agent { context, source }
}

/// How a guest process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + the signal.
    pub code: i32,
    pub signal: Option<i32>,
}

/// The folder of a pod: made for it alone (a lock inside it is held for the pod's life),
/// removed when it ends.
struct RunDir {
    path: PathBuf,
    _lock: File,
}

fn flock(f: &File, how: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock(2) on a descriptor `f` owns.
    if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl RunDir {
    fn create(base: &Path, name: &str) -> Result<RunDir, PodError> {
        let path = base.join(name);
        let io = |e: std::io::Error| PodError::Other(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(base).map_err(io)?;
        // Pods are made and found stale one at a time.
        let base_lock = File::open(base).map_err(io)?;
        flock(&base_lock, libc::LOCK_EX).map_err(io)?;
        if path.exists() {
            // Left by a runtime that died, unless its lock is still held.
            if pod_alive(base, name) {
                return Err(PodError::Other(format!(
                    "a pod named {name} is running ({})",
                    path.display()
                )));
            }
            std::fs::remove_dir_all(&path).map_err(io)?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io)?;
        let lock = File::create(path.join("lock")).map_err(io)?;
        flock(&lock, libc::LOCK_EX | libc::LOCK_NB).map_err(io)?;
        Ok(RunDir { path, _lock: lock })
    }
}

/// Whether pod `name` of `run_dir` runs: the lock its runtime holds for its life is held.
pub fn pod_alive(run_dir: &Path, name: &str) -> bool {
    File::open(run_dir.join(name).join("lock"))
        .map(|f| flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err())
        .unwrap_or(false)
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running pod VM.
pub struct Pod {
    pub sandbox: Sandbox,
    // Field order is drop order: the agent connection, then the VMM, then the folder.
    agent: Arc<AgentClient>,
    vm: Box<dyn Vm>,
    dir: RunDir,
    /// From the VMM's start to the agent's first answer.
    pub boot_to_agent: Duration,
}

impl Pod {
    /// Launches the VM of `sb` (its folder under `run_dir`) and waits for its agent. A signal
    /// number stored in `abort` meanwhile gives up (the VM is torn down).
    pub fn start(sb: Sandbox, run_dir: &Path, abort: Option<&AtomicI32>) -> Result<Pod, PodError> {
        sb.check_backends()?;
        let dir = RunDir::create(run_dir, &sb.name)?;
        let t0 = Instant::now();
        let timeout = Duration::from_secs(sb.agent.timeout_s);
        let mut vm = hypervisor(sb.hypervisor).launch(&sb, &dir.path)?;
        let stream = vm.agent_stream(timeout)?;
        let agent = Arc::new(
            AgentClient::unix(stream)
                .map_err(|e| PodError::Other(format!("agent connection: {e}")))?,
        );
        let pending = agent
            .send("version", Value::Null)
            .map_err(agent_err("agent"))?;
        let version = loop {
            let tail = |vm: &mut Box<dyn Vm>, what: &str| {
                PodError::Other(format!("{what}; guest console:\n{}", vm.console_tail()))
            };
            if let Some(a) = pending.try_take() {
                break a.map_err(|e| tail(&mut vm, &format!("agent: {e}")))?;
            }
            if vm.wait_exit(Duration::ZERO) {
                return Err(tail(&mut vm, "the VM stopped before its agent answered"));
            }
            if t0.elapsed() > timeout {
                return Err(tail(
                    &mut vm,
                    &format!("the agent did not answer within {timeout:?}"),
                ));
            }
            if let Some(sig) = abort.map(|a| a.load(Ordering::Relaxed)).filter(|&s| s > 0) {
                return Err(PodError::Interrupted(sig));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if version["protocol"] != 1 {
            return Err(PodError::Other(format!(
                "the guest agent speaks protocol {}, not 1",
                version["protocol"]
            )));
        }
        Ok(Pod {
            sandbox: sb,
            agent,
            vm,
            dir,
            boot_to_agent: t0.elapsed(),
        })
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The agent connection, to share with threads that outlive a borrow of the pod.
    pub fn agent_handle(&self) -> Arc<AgentClient> {
        self.agent.clone()
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The pod's folder (sockets, console log).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    fn call(&self, method: &str, params: Value, what: &str) -> Result<Value, PodError> {
        self.agent
            .call(method, params, CALL_TIMEOUT)
            .map_err(agent_err(what))
    }

    /// Configures the guest through the agent: each interface (found by MAC: name, MTU,
    /// addresses, up), the routes, the neighbours, the disks' mounts.
    pub fn configure(&self) -> Result<(), PodError> {
        let sb = &self.sandbox;
        for n in &sb.nics {
            let Some(mac) = &n.mac else { continue };
            let mut p = json!({ "mac": mac, "name": n.name, "addresses": n.addresses, "up": true });
            if let Some(mtu) = n.mtu {
                p["mtu"] = json!(mtu);
            }
            self.call("update_interface", p, &format!("interface {}", n.name))?;
        }
        let routes: Vec<Value> = sb
            .nics
            .iter()
            .flat_map(|n| {
                n.routes
                    .iter()
                    .map(|r| json!({ "dest": r.dest, "gateway": r.gateway, "device": n.name }))
            })
            .collect();
        let devices: Vec<&str> = sb
            .nics
            .iter()
            .filter(|n| n.mac.is_some())
            .map(|n| n.name.as_str())
            .collect();
        if !routes.is_empty() {
            self.call(
                "update_routes",
                json!({ "routes": routes, "devices": devices }),
                "routes",
            )?;
        }
        if !sb.neighbors.is_empty() {
            self.call(
                "add_arp_neighbors",
                json!({ "neighbors": sb.neighbors }),
                "neighbours",
            )?;
        }
        for d in &sb.disks {
            self.mount_disk(d)?;
        }
        Ok(())
    }

    /// Hot-plugs vhost-user-blk disk `spec` into the first free disk slot (the slots of the
    /// disks in `sandbox.disks` are taken) and, when it has a mount point, mounts it in the
    /// guest. Its backend must listen. On failure nothing of it is left in the VM (or, if it
    /// could not be unplugged again, it is in `sandbox.disks`, as attached).
    pub fn add_disk(&mut self, spec: &DiskSpec) -> Result<Disk, PodError> {
        let taken: Vec<u8> = self.sandbox.disks.iter().map(|d| d.slot).collect();
        let slot = free_disk_slot(&taken).ok_or_else(|| {
            PodError::Other(format!("no free disk slot: {} disks attached", taken.len()))
        })?;
        let disk = spec
            .resolve(slot)
            .map_err(|e| PodError::Spec(SpecError(format!("disk{e}"))))?;
        check_backend_socket(&disk.socket)?;
        self.vm.add_disk(&disk).map_err(|e| {
            PodError::Other(format!(
                "hot-plugging the disk of {} into slot {slot:#04x}: {e}",
                disk.socket.display()
            ))
        })?;
        if let Err(e) = self.mount_new_disk(&disk) {
            if let Err(u) = self.vm.remove_disk(&disk) {
                self.sandbox.disks.push(disk);
                return Err(PodError::Other(format!("{e}; and unplugging it: {u}")));
            }
            return Err(e);
        }
        self.sandbox.disks.push(disk.clone());
        Ok(disk)
    }

    /// Unmounts disk `disk` in the guest (what is mounted at or below its mount point, when it
    /// has one; nothing mounted is fine) and hot-unplugs it, whether hot-plugged or given at
    /// start. Its processes must be gone: a busy mount is an error, and the disk stays.
    pub fn remove_disk(&mut self, disk: &Disk) -> Result<(), PodError> {
        let i = self
            .sandbox
            .disks
            .iter()
            .position(|d| d.slot == disk.slot && d.socket == disk.socket)
            .ok_or_else(|| {
                PodError::Other(format!(
                    "no disk of {} in slot {:#04x}",
                    disk.socket.display(),
                    disk.slot
                ))
            })?;
        // As it was attached (the caller's copy may differ in what it mounts).
        let disk = self.sandbox.disks[i].clone();
        if let Some(target) = &disk.mount {
            match self.agent.call(
                "unmount",
                json!({ "target": target, "recursive": true }),
                CALL_TIMEOUT,
            ) {
                Ok(_) => {}
                Err(AgentError::Rpc(e)) if e.code == "not_found" => {}
                Err(e) => return Err(agent_err(format!("unmounting {target}"))(e)),
            }
        }
        self.vm.remove_disk(&disk).map_err(|e| {
            PodError::Other(format!(
                "unplugging the disk of {} from slot {:#04x}: {e}",
                disk.socket.display(),
                disk.slot
            ))
        })?;
        self.sandbox.disks.remove(i);
        Ok(())
    }

    fn mount_disk(&self, d: &Disk) -> Result<(), PodError> {
        let Some(target) = &d.mount else {
            return Ok(());
        };
        self.call(
            "mount_block",
            json!({
                "source": { "pci": d.guest_pci() },
                "target": target,
                "fstype": d.fstype,
                "options": d.options,
                "read_only": d.read_only,
            }),
            &format!("disk at {target}"),
        )?;
        Ok(())
    }

    /// Mounts a disk just hot-plugged: the guest finds it when it has handled the hot-plug
    /// event, which under TCG may take longer than the agent waits for a device (5 s).
    fn mount_new_disk(&self, d: &Disk) -> Result<(), PodError> {
        let end = Instant::now() + HOTPLUG_TIMEOUT;
        loop {
            match self.mount_disk(d) {
                Err(PodError::Agent {
                    source: AgentError::Rpc(e),
                    ..
                }) if e.code == "not_found" && Instant::now() < end => {}
                r => return r,
            }
        }
    }

    /// Runs `argv` in the guest; its output goes to `out` as it comes. `stdin`, when given, is
    /// copied to the process (then closed). While it runs, a signal number stored in `signal`
    /// is sent to the process (and the slot cleared).
    pub fn exec(
        &self,
        argv: &[String],
        env: &[String],
        stdin: Option<Box<dyn Read + Send>>,
        signal: Option<&AtomicI32>,
        out: &mut dyn FnMut(Output),
    ) -> Result<ExitStatus, PodError> {
        let mut p = json!({ "argv": argv, "stdin": stdin.is_some() });
        if !env.is_empty() {
            p["env"] = json!(env);
        }
        // Nothing here blocks on an answer: output keeps being taken meanwhile, or the guest's
        // output could hold the answer back behind it.
        let agent = &self.agent;
        let start = agent
            .send("start_process", p)
            .map_err(agent_err("starting the command"))?;
        let (mut early, mut early_bytes) = (Vec::new(), 0usize);
        let t0 = Instant::now();
        let started = loop {
            if let Some(a) = start.try_take() {
                break a.map_err(agent_err("starting the command"))?;
            }
            if t0.elapsed() > CALL_TIMEOUT {
                return Err(PodError::Other(format!(
                    "the agent did not answer start_process within {CALL_TIMEOUT:?}"
                )));
            }
            if let Some(o) = agent.next_output(Duration::from_millis(20)) {
                // Output may come before the answer that names its process.
                early_bytes += o.data.len();
                if early_bytes > MAX_EARLY_OUTPUT {
                    return Err(PodError::Other(
                        "the agent sent output for no known process".into(),
                    ));
                }
                early.push(o);
            }
        };
        let id = started["process"]
            .as_str()
            .ok_or_else(|| PodError::Other(format!("start_process answered {started}")))?
            .to_string();
        for o in early.into_iter().filter(|o| o.process == id) {
            out(o);
        }
        if let Some(input) = stdin {
            // Detached: host input may never end; the pump stops at its next chunk once the
            // process is gone.
            let (a, id) = (self.agent.clone(), id.clone());
            std::thread::Builder::new()
                .name("stdin-pump".into())
                .spawn(move || pump_stdin(&a, &id, input))
                .map_err(|e| PodError::Other(format!("stdin thread: {e}")))?;
        }
        let wait = agent
            .send("wait_process", json!({ "process": id }))
            .map_err(agent_err("waiting for the command"))?;
        let mut kills = Vec::new();
        loop {
            if let Some(a) = wait.try_take() {
                // Its output all came before this answer: drain what is queued.
                while let Some(o) = agent.next_output(Duration::ZERO) {
                    if o.process == id {
                        out(o);
                    }
                }
                let v = a.map_err(agent_err("waiting for the command"))?;
                let code = v["exit_code"]
                    .as_i64()
                    .filter(|c| (0..=255).contains(c))
                    .ok_or_else(|| PodError::Other(format!("wait_process answered {v}")))?;
                let signal = v["signal"].as_i64().map(|s| s as i32);
                return Ok(ExitStatus {
                    code: code as i32,
                    signal,
                });
            }
            if let Some(sig) = signal
                .map(|s| s.swap(0, Ordering::Relaxed))
                .filter(|&s| s > 0)
            {
                let k = agent
                    .send("kill_process", json!({ "process": id, "signal": sig }))
                    .map_err(agent_err("signalling the command"))?;
                kills.push(k);
            }
            // A refused signal (the process had just ended) changes nothing: the wait says how
            // it ended.
            kills.retain(|k| k.try_take().is_none());
            if let Some(o) = agent.next_output(Duration::from_millis(20)) {
                if o.process == id {
                    out(o);
                }
            }
        }
    }

    /// Stops the pod: the guest powers off through its agent; a VM that does not stop within
    /// `timeout` is stopped by the VMM, then killed. The folder goes with it.
    pub fn stop(mut self, timeout: Duration) -> Result<(), PodError> {
        let asked = self
            .agent
            .call("shutdown", Value::Null, Duration::from_secs(5))
            .is_ok();
        if !(asked && self.vm.wait_exit(timeout)) {
            self.vm.stop(Duration::from_secs(5))?;
        }
        Ok(())
    }
}

/// Copies host input to a guest process's stdin, then closes it.
pub(crate) fn pump_stdin(agent: &AgentClient, id: &str, mut input: Box<dyn Read + Send>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
        let r = agent.call(
            "write_stdin",
            json!({ "process": id, "data": data }),
            CALL_TIMEOUT,
        );
        if r.is_err() {
            return;
        }
    }
    let _ = agent.call("close_stdin", json!({ "process": id }), CALL_TIMEOUT);
}
