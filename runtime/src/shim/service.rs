//! The Task API v2 of one shim, which serves every container of one sandbox: the first
//! container's Create boots the sandbox's VM, later ones hot-plug their root file system into
//! it, and the last one's Delete stops it.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::Status;
use serde_json::{json, Value};

use super::config::{ShimConfig, GUEST_ROOTS};
use super::io::{Exited, Sinks, Supervisor};
use super::oci;
use super::rootfs::{self, Backend};
use crate::agent::AgentClient;
use crate::pod::Pod;
use crate::spec::{Disk, DiskSpec};

/// How long an agent call may take (TCG is slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest may take to power off before the VMM is stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn failed(msg: impl ToString) -> ttrpc::Error {
    err(Code::FAILED_PRECONDITION, msg)
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    })
}

/// Runs closures on one long-lived thread. Processes the shim starts (the VMM, the disk
/// backends) die with the thread that started them (PR_SET_PDEATHSIG), and ttrpc's request
/// threads come and go.
struct Launcher {
    tx: Mutex<Sender<Box<dyn FnOnce() + Send>>>,
}

impl Launcher {
    fn start() -> Launcher {
        let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        // The thread lives as long as the shim (the sender is never dropped before exit).
        let spawned = std::thread::Builder::new()
            .name("launcher".into())
            .spawn(move || {
                for f in rx {
                    f();
                }
            });
        if let Err(e) = spawned {
            containerd_shim::error!("launcher thread: {e}");
        }
        Launcher { tx: Mutex::new(tx) }
    }

    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job = Box::new(move || {
            let _ = rtx.send(f());
        });
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| "the launcher thread is gone".to_string())?;
        rrx.recv()
            .map_err(|_| "the launcher thread is gone".to_string())
    }
}

/// A container's or an exec's process.
struct Proc {
    spec: oci::Process,
    stdin: String,
    stdout: String,
    stderr: String,
    /// Opened at create, handed to the stdio thread at start.
    sinks: Option<Sinks>,
    /// The agent's name for it, once started.
    guest: Option<String>,
    pid: u32,
    status: Status,
    exit: Option<Exited>,
}

impl Proc {
    fn new(spec: oci::Process, stdin: &str, stdout: &str, stderr: &str) -> Result<Proc, String> {
        spec.check()?;
        Ok(Proc {
            sinks: Some(Sinks::open(stdout, stderr)?),
            spec,
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            guest: None,
            pid: 0,
            status: Status::CREATED,
            exit: None,
        })
    }
}

struct Container {
    bundle: PathBuf,
    /// Where its root file system is mounted in the guest.
    guest_root: String,
    /// The disk holding it, and its backend.
    disk: Option<Disk>,
    backend: Option<Backend>,
    init: Proc,
    execs: HashMap<String, Proc>,
}

/// The sandbox's VM.
struct Vm {
    pod: Mutex<Pod>,
    agent: Arc<AgentClient>,
    stdio: Supervisor,
    /// Where the sandbox's own disks (configuration, `io.torii.disks`) are mounted in the
    /// guest: bound at the same place in each container.
    volumes: Vec<String>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
}

struct Inner {
    sandbox: String,
    config: Result<ShimConfig, String>,
    state: Mutex<State>,
    /// Signalled when a process ends.
    exited: Condvar,
    /// Create and Delete, one at a time (they boot, hot-plug and stop).
    lifecycle: Mutex<Option<Arc<Vm>>>,
    events: Mutex<Sender<(&'static str, Box<dyn MessageDyn + Send>)>>,
    launcher: Launcher,
    exit: Arc<ExitSignal>,
    /// The guest's OOM kill count when last seen.
    oom_kills: AtomicU64,
    /// OOM checks under way: the VM stays up until they have asked it.
    oom_checks: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

#[derive(Clone)]
pub struct Service(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service {
    pub fn new(
        namespace: &str,
        sandbox: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        let (tx, rx) = mpsc::channel::<(&'static str, Box<dyn MessageDyn + Send>)>();
        let ns = namespace.to_string();
        let spawned = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for (topic, ev) in rx {
                    let ctx = containerd_shim::Context::default();
                    if let Err(e) = publisher.publish(ctx, topic, &ns, ev) {
                        containerd_shim::warn!("publishing {topic}: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            containerd_shim::error!("events thread: {e}");
        }
        Service(Arc::new(Inner {
            sandbox: sandbox.into(),
            config: ShimConfig::load(),
            state: Mutex::new(State::default()),
            exited: Condvar::new(),
            lifecycle: Mutex::new(None),
            events: Mutex::new(tx),
            launcher: Launcher::start(),
            exit,
            oom_kills: AtomicU64::new(0),
            oom_checks: Mutex::new(Vec::new()),
        }))
    }
}

impl Service {
    /// The shim was told to end (SIGTERM, SIGINT), as when its containerd is gone for good and
    /// an operator or init stops what is left: the sandbox VM is stopped (the guest syncs its
    /// file systems), every container's disk backend and files go, and the shim exits. If
    /// containerd comes back, it finds the shim gone and runs `delete` for each container.
    pub fn terminate(&self) {
        let inner = &self.0;
        let mut slot = lock(&inner.lifecycle);
        inner.stop_vm(&mut slot);
        let containers = std::mem::take(&mut lock(&inner.state).containers);
        let n = containers.len();
        // Their disk backends stop as they are dropped.
        drop(containers);
        inner.exited.notify_all();
        containerd_shim::info!("terminated: the sandbox VM and {n} container(s) stopped");
        inner.exit.signal();
    }
}

impl Inner {
    fn publish(&self, topic: &'static str, ev: Box<dyn MessageDyn + Send>) {
        let _ = lock(&self.events).send((topic, ev));
    }

    fn config(&self) -> Result<&ShimConfig, ttrpc::Error> {
        self.config.as_ref().map_err(failed)
    }

    /// The folder of this sandbox's container images and sockets.
    fn files_dir(&self, cfg: &ShimConfig) -> PathBuf {
        cfg.state_dir.join(&self.sandbox)
    }

    fn with_proc<R>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Container, &mut Proc) -> Result<R, ttrpc::Error>,
    ) -> Result<R, ttrpc::Error> {
        let mut st = lock(&self.state);
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))?;
        if exec_id.is_empty() {
            let mut init = std::mem::replace(&mut c.init, placeholder());
            let r = f(c, &mut init);
            c.init = init;
            r
        } else {
            let mut p = c.execs.remove(exec_id).ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of container {id} not found"),
                )
            })?;
            let r = f(c, &mut p);
            c.execs.insert(exec_id.to_string(), p);
            r
        }
    }

    /// A process ended: recorded, waiters woken, containerd told. When a container's init ends,
    /// what it left running (its execs) is killed through `agent`, as runc does.
    fn on_exit(
        self: &Arc<Self>,
        agent: Option<&Arc<AgentClient>>,
        id: &str,
        exec_id: &str,
        e: Exited,
    ) {
        let mut orphans = Vec::new();
        let pid = self
            .with_proc(id, exec_id, |c, p| {
                p.status = Status::STOPPED;
                p.exit = Some(e);
                if exec_id.is_empty() {
                    orphans.extend(
                        c.execs
                            .values()
                            .filter(|x| x.status == Status::RUNNING)
                            .filter_map(|x| x.guest.clone()),
                    );
                }
                Ok(p.pid)
            })
            .unwrap_or(0);
        self.exited.notify_all();
        if let Some(a) = agent {
            for g in orphans {
                let _ = a.send("kill_process", json!({ "process": g, "signal": 9 }));
            }
            if e.status == 128 + libc::SIGKILL as u32 {
                // Not on this (the stdio) thread: the answer could queue behind output.
                let (me, a, id) = (self.clone(), a.clone(), id.to_string());
                let spawned = std::thread::Builder::new()
                    .name("oom-check".into())
                    .spawn(move || me.check_oom(&a, &id));
                match spawned {
                    Ok(t) => {
                        let mut checks = lock(&self.oom_checks);
                        checks.retain(|t| !t.is_finished());
                        checks.push(t);
                    }
                    Err(e) => containerd_shim::warn!("oom check thread: {e}"),
                }
            }
        }
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.into(),
                id: if exec_id.is_empty() { id } else { exec_id }.into(),
                pid,
                exit_status: e.status,
                exited_at: timestamp(e.at),
                ..Default::default()
            }),
        );
    }

    /// A process of container `id` was killed: if the guest kernel's OOM killer did it (its
    /// count of OOM kills went up), containerd is told.
    fn check_oom(&self, agent: &AgentClient, id: &str) {
        let Ok(m) = agent.call("metrics", Value::Null, CALL_TIMEOUT) else {
            return;
        };
        let kills = m["oom_kills"].as_u64().unwrap_or(0);
        if self.oom_kills.fetch_max(kills, Ordering::Relaxed) < kills {
            self.publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: id.into(),
                    ..Default::default()
                }),
            );
        }
    }

    fn create(self: &Arc<Self>, req: &api::CreateTaskRequest) -> Result<u32, ttrpc::Error> {
        let cfg = self.config()?;
        check_id("container id", &req.id).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "Torii cannot restore a checkpoint",
            ));
        }
        let mut vm_slot = lock(&self.lifecycle);
        let r = self.create_locked(cfg, req, &mut vm_slot);
        if r.is_err() && vm_slot.is_none() {
            // The sandbox's first container: nothing of the sandbox is left.
            let _ = std::fs::remove_dir_all(self.files_dir(cfg));
        }
        r
    }

    fn create_locked(
        self: &Arc<Self>,
        cfg: &ShimConfig,
        req: &api::CreateTaskRequest,
        vm_slot: &mut Option<Arc<Vm>>,
    ) -> Result<u32, ttrpc::Error> {
        if lock(&self.state).containers.contains_key(&req.id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = oci::Spec::load(&bundle).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let process = spec.process.clone().unwrap_or_default();
        let mut init = Proc::new(process, &req.stdin, &req.stdout, &req.stderr)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        if req.terminal {
            init.spec.terminal = true;
            init.spec
                .check()
                .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        }
        let root = spec.root_path(&bundle);
        let dir = self.files_dir(cfg);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        // The image is made from the snapshot, which need not stay mounted afterwards.
        let mounted = rootfs::mount(&req.rootfs, &root).map_err(failed)?;
        let image = dir.join(format!("{}.img", req.id));
        let built = rootfs::build_image(&root, &image, cfg.rootfs_free_mib, &req.id);
        if mounted {
            if let Err(e) = rootfs::unmount(&root) {
                containerd_shim::warn!("{e}");
            }
        }
        built.map_err(failed)?;
        let (bin, mode, socket, id) = (
            cfg.blk_backend.clone(),
            cfg.blk_poll_mode.clone(),
            dir.join(format!("{}.sock", req.id)),
            req.id.clone(),
        );
        let img = image.clone();
        let backend = match self
            .launcher
            .run(move || Backend::start(&bin, &mode, &img, &socket, &id))
            .and_then(|r| r)
        {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&image);
                return Err(failed(e));
            }
        };
        let guest_root = format!("{GUEST_ROOTS}/{}", req.id);
        let disk_spec = DiskSpec {
            socket: backend.socket.clone(),
            queues: 1,
            mount: Some(guest_root.clone()),
            fstype: "ext4".into(),
            options: String::new(),
            read_only: spec.root.as_ref().is_some_and(|r| r.readonly),
        };
        let (vm, disk) = match vm_slot.as_ref() {
            Some(vm) => {
                let disk = lock(&vm.pod)
                    .add_disk(&disk_spec)
                    .map_err(|e| failed(format!("hot-plugging the root file system: {e}")))?;
                (vm.clone(), disk)
            }
            None => {
                let vm = self.boot(cfg, &spec, disk_spec)?;
                let disk = lock(&vm.pod).sandbox.disks.last().cloned();
                let disk = disk.ok_or_else(|| failed("the VM has no root file system disk"))?;
                *vm_slot = Some(vm.clone());
                (vm, disk)
            }
        };
        let mut c = Container {
            bundle,
            guest_root,
            disk: Some(disk),
            backend: Some(backend),
            init,
            execs: HashMap::new(),
        };
        let mounted = mount_oci(&vm.agent, &c.guest_root, &spec.mounts)
            .and_then(|()| bind_volumes(&vm.agent, &c.guest_root, &vm.volumes));
        if let Err(e) = mounted {
            let last = lock(&self.state).containers.is_empty();
            self.remove(&vm, &mut c);
            if last {
                self.stop_vm(vm_slot);
            }
            return Err(failed(e));
        }
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        lock(&self.state).containers.insert(req.id.clone(), c);
        Ok(0)
    }

    /// Boots the sandbox's VM with the first container's root file system.
    fn boot(
        self: &Arc<Self>,
        cfg: &ShimConfig,
        spec: &oci::Spec,
        rootfs: DiskSpec,
    ) -> Result<Arc<Vm>, ttrpc::Error> {
        let mut sb = cfg
            .sandbox_spec(&self.sandbox, &spec.annotations)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let volumes = sb.disks.iter().filter_map(|d| d.mount.clone()).collect();
        sb.disks.push(rootfs);
        let sb = sb
            .resolve(&torii_vfio::pci::Sysfs::default())
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        // The VM's folder goes in the sandbox's: `<state_dir>/<sandbox>/<sandbox>/`.
        let run_dir = self.files_dir(cfg);
        let pod = self
            .launcher
            .run(move || Pod::start(sb, &run_dir, None))
            .map_err(failed)?
            .map_err(|e| failed(format!("starting the sandbox VM: {e}")))?;
        pod.configure()
            .map_err(|e| failed(format!("configuring the sandbox VM: {e}")))?;
        let agent = pod.agent_handle();
        let stdio = Supervisor::start(agent.clone()).map_err(failed)?;
        Ok(Arc::new(Vm {
            pod: Mutex::new(pod),
            agent,
            stdio,
            volumes,
        }))
    }

    /// Takes a container out of the guest: its mounts, its disk, its backend and image.
    fn remove(&self, vm: &Vm, c: &mut Container) {
        let r = vm.agent.call(
            "unmount",
            json!({ "target": c.guest_root, "recursive": true }),
            CALL_TIMEOUT,
        );
        if let Err(e) = r {
            containerd_shim::warn!("unmounting {}: {e}", c.guest_root);
        }
        if let Some(d) = c.disk.take() {
            if let Err(e) = lock(&vm.pod).remove_disk(&d) {
                containerd_shim::warn!("unplugging {}: {e}", d.socket.display());
            }
        }
        drop(c.backend.take());
    }

    fn stop_vm(&self, slot: &mut Option<Arc<Vm>>) {
        let Some(vm) = slot.take() else { return };
        let checks = std::mem::take(&mut *lock(&self.oom_checks));
        for t in checks {
            let _ = t.join();
        }
        match Arc::try_unwrap(vm) {
            Ok(vm) => {
                let Vm {
                    pod, stdio, agent, ..
                } = vm;
                let pod = pod.into_inner().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = pod.stop(STOP_TIMEOUT) {
                    containerd_shim::warn!("stopping the sandbox VM: {e}");
                }
                drop(agent);
                drop(stdio);
            }
            Err(_) => containerd_shim::error!("the sandbox VM is still in use; left to exit"),
        }
        if let Ok(cfg) = self.config() {
            let _ = std::fs::remove_dir_all(self.files_dir(cfg));
        }
    }

    fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, ttrpc::Error> {
        let vm = lock(&self.lifecycle)
            .clone()
            .ok_or_else(|| failed("the sandbox VM is not running"))?;
        let (params, sinks, stdin) = self.with_proc(id, exec_id, |c, p| {
            // The sinks go with the first Start: a second one finds none.
            if p.status != Status::CREATED || p.sinks.is_none() {
                return Err(failed(format!(
                    "{} is {:?}, not created",
                    what(id, exec_id),
                    p.status
                )));
            }
            let mut params = json!({
                "argv": p.spec.args,
                "cwd": p.spec.cwd(),
                "root": c.guest_root,
                "stdin": !p.stdin.is_empty(),
            });
            if !p.spec.env.is_empty() {
                params["env"] = json!(p.spec.env);
            }
            Ok((params, p.sinks.take().unwrap_or_default(), p.stdin.clone()))
        })?;
        let answer = vm.agent.call("start_process", params, CALL_TIMEOUT);
        let answer = answer
            .map_err(|e| e.to_string())
            .and_then(|a| match a["process"].as_str() {
                Some(g) if !g.is_empty() => Ok(a),
                _ => Err("the agent's answer names no process".to_string()),
            });
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // Never ran: ends now with the status of a command that cannot be run.
                let never = Exited {
                    status: 127,
                    at: SystemTime::now(),
                };
                self.on_exit(None, id, exec_id, never);
                return Err(failed(format!("starting {}: {e}", what(id, exec_id))));
            }
        };
        let guest = answer["process"].as_str().unwrap_or_default().to_string();
        let pid = answer["pid"].as_u64().unwrap_or(0) as u32;
        self.with_proc(id, exec_id, |_, p| {
            p.guest = Some(guest.clone());
            p.pid = pid;
            p.status = Status::RUNNING;
            Ok(())
        })?;
        if !stdin.is_empty() {
            let (agent, g) = (vm.agent.clone(), guest.clone());
            let spawned = std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || pump_stdin(&agent, &g, Path::new(&stdin)));
            if let Err(e) = spawned {
                containerd_shim::warn!("stdin thread: {e}");
            }
        }
        // Published before the process is watched: its exit comes after its start.
        if exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: id.into(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        let (me, agent) = (self.clone(), vm.agent.clone());
        let (i, x) = (id.to_string(), exec_id.to_string());
        let done = Box::new(move |e| me.on_exit(Some(&agent), &i, &x, e));
        vm.stdio.watch(&vm.agent, &guest, sinks, done);
        Ok(pid)
    }

    fn delete(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
    ) -> Result<api::DeleteResponse, ttrpc::Error> {
        let mut slot = lock(&self.lifecycle);
        let mut st = lock(&self.state);
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))?;
        let p = if exec_id.is_empty() {
            &c.init
        } else {
            c.execs.get(exec_id).ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of container {id} not found"),
                )
            })?
        };
        if p.status == Status::RUNNING {
            return Err(failed(format!(
                "{} is running: kill it first",
                what(id, exec_id)
            )));
        }
        let exit = p.exit.unwrap_or(Exited {
            status: 0,
            at: SystemTime::now(),
        });
        let resp = api::DeleteResponse {
            pid: p.pid,
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        };
        if !exec_id.is_empty() {
            c.execs.remove(exec_id);
            drop(st);
            self.exited.notify_all();
            return Ok(resp);
        }
        if c.execs.values().any(|x| x.status == Status::RUNNING) {
            return Err(failed(format!("container {id} still has running execs")));
        }
        let mut c = st.containers.remove(id).ok_or_else(|| failed("gone"))?;
        let last = st.containers.is_empty();
        drop(st);
        // A Wait on it ends (not found).
        self.exited.notify_all();
        if last {
            // The VM goes with everything in it, before the disks' backends (the guest syncs
            // its file systems on the way down).
            self.stop_vm(&mut slot);
        } else if let Some(vm) = slot.clone() {
            self.remove(&vm, &mut c);
        }
        drop(c);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.into(),
                id: id.into(),
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                ..Default::default()
            }),
        );
        Ok(resp)
    }
}

fn what(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("exec {exec_id} of container {id}")
    }
}

fn placeholder() -> Proc {
    Proc {
        spec: oci::Process::default(),
        stdin: String::new(),
        stdout: String::new(),
        stderr: String::new(),
        sinks: None,
        guest: None,
        pid: 0,
        status: Status::UNKNOWN,
        exit: None,
    }
}

/// containerd's ids and the sandbox annotation name folders: letters, digits, `.`, `_`, `-`,
/// not starting with `.`, at most 76 bytes (containerd's own rule).
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {id:?}: letters, digits, '.', '_', '-' only, at most 76, not starting with '.'"
        ))
    }
}

/// The OCI spec's kernel file systems, made inside the container's root in the guest. The
/// guest is the container's own VM: `/dev` is the guest's (bound), not a bare tmpfs. Binds of
/// host paths cannot reach the guest and are passed over.
fn mount_oci(agent: &AgentClient, root: &str, mounts: &[oci::Mount]) -> Result<(), String> {
    // /dev first: the mounts below it go on top.
    let mut ordered: Vec<&oci::Mount> = mounts.iter().collect();
    ordered.sort_by_key(|m| m.destination.matches('/').count());
    for m in ordered {
        let (source, fstype, options): (&str, &str, Vec<String>) =
            match (m.kind.as_str(), m.destination.as_str()) {
                (_, "/dev") => ("/dev", "bind", vec!["rbind".into(), "rprivate".into()]),
                (_, "/dev/pts") => continue,
                ("proc", _) | ("sysfs", _) | ("tmpfs", _) | ("mqueue", _) => {
                    (m.kind.as_str(), m.kind.as_str(), m.options.clone())
                }
                _ => {
                    containerd_shim::info!(
                        "mount {} ({}) is not made in the guest",
                        m.destination,
                        m.kind
                    );
                    continue;
                }
            };
        // `root`: the target is resolved inside the container's root, so that an image's
        // symlinks (`/var/run` → `/run`) cannot put a mount elsewhere in the guest.
        let params = json!({
            "source": source,
            "target": m.destination,
            "root": root,
            "fstype": fstype,
            "options": options,
        });
        agent
            .call("mount", params, CALL_TIMEOUT)
            .map_err(|e| format!("mounting {} in the guest: {e}", m.destination))?;
    }
    Ok(())
}

/// Binds the sandbox's disks, mounted in the guest, at the same paths in a container's root.
fn bind_volumes(agent: &AgentClient, root: &str, volumes: &[String]) -> Result<(), String> {
    for v in volumes {
        let params = json!({
            "source": v,
            "target": v,
            "root": root,
            "fstype": "bind",
            "options": ["rbind", "rprivate"],
        });
        agent
            .call("mount", params, CALL_TIMEOUT)
            .map_err(|e| format!("binding the sandbox's disk {v} in the container: {e}"))?;
    }
    Ok(())
}

/// Copies containerd's stdin FIFO to a guest process, then closes its stdin.
fn pump_stdin(agent: &AgentClient, guest: &str, fifo: &Path) {
    // Blocks until containerd opens the writing end (or CloseIO does, to end it).
    match std::fs::File::open(fifo) {
        Ok(f) => crate::pod::pump_stdin(agent, guest, Box::new(f)),
        Err(e) => containerd_shim::warn!("{}: {e}", fifo.display()),
    }
}

impl containerd_shim::Task for Service {
    fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.0.state)
            .containers
            .get(&req.id)
            .map_or(0, |c| c.init.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.0.create(&req)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = self.0.start(&req.id, &req.exec_id)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        self.0.with_proc(&req.id, &req.exec_id, |c, p| {
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: c.bundle.display().to_string(),
                pid: p.pid,
                status: p.status.into(),
                stdin: p.stdin.clone(),
                stdout: p.stdout.clone(),
                stderr: p.stderr.clone(),
                terminal: false,
                exit_status: p.exit.map_or(0, |e| e.status),
                exited_at: p.exit.map_or_else(MessageField::none, |e| timestamp(e.at)),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let inner = &self.0;
        let mut st = lock(&inner.state);
        loop {
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            let p = if req.exec_id.is_empty() {
                Some(&c.init)
            } else {
                c.execs.get(&req.exec_id)
            };
            let p = p.ok_or_else(|| err(Code::NOT_FOUND, what(&req.id, &req.exec_id)))?;
            if let Some(e) = p.exit {
                return Ok(api::WaitResponse {
                    exit_status: e.status,
                    exited_at: timestamp(e.at),
                    ..Default::default()
                });
            }
            st = inner.exited.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let inner = &self.0;
        let signal = req.signal;
        if !(1..=64).contains(&signal) {
            return Err(err(Code::INVALID_ARGUMENT, format!("signal {signal}")));
        }
        let guest = inner.with_proc(&req.id, &req.exec_id, |_, p| match p.status {
            Status::RUNNING => Ok(p.guest.clone()),
            Status::CREATED => Ok(None),
            _ => Err(err(Code::NOT_FOUND, "process already finished")),
        })?;
        let Some(guest) = guest else {
            // Never started: it ends as if killed.
            let killed = Exited {
                status: 128 + signal,
                at: SystemTime::now(),
            };
            inner.on_exit(None, &req.id, &req.exec_id, killed);
            return Ok(api::Empty::default());
        };
        let vm = lock(&inner.lifecycle)
            .clone()
            .ok_or_else(|| failed("no VM"))?;
        match vm.agent.call(
            "kill_process",
            json!({ "process": guest, "signal": signal }),
            CALL_TIMEOUT,
        ) {
            Ok(_) => Ok(api::Empty::default()),
            Err(crate::agent::AgentError::Rpc(e)) if e.code == "not_found" => {
                Err(err(Code::NOT_FOUND, "process already finished"))
            }
            Err(e) => Err(failed(format!(
                "signalling {}: {e}",
                what(&req.id, &req.exec_id)
            ))),
        }
    }

    fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let inner = &self.0;
        check_id("exec id", &req.exec_id).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let mut spec =
            oci::Process::from_json(&req.spec.value).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        spec.terminal |= req.terminal;
        {
            let st = lock(&inner.state);
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    what(&req.id, &req.exec_id) + " exists",
                ));
            }
            if c.init.status != Status::RUNNING {
                return Err(failed(format!("container {} is not running", req.id)));
            }
        }
        // Opening the FIFOs may wait for containerd: not under the lock.
        let p = Proc::new(spec, &req.stdin, &req.stdout, &req.stderr)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let mut st = lock(&inner.state);
        let c = st
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
        c.execs.insert(req.exec_id.clone(), p);
        drop(st);
        inner.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        self.0.delete(&req.id, &req.exec_id)
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let st = lock(&self.0.state);
        let c = st
            .containers
            .get(&req.id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
        let processes = std::iter::once(&c.init)
            .chain(c.execs.values())
            .filter(|p| p.status == Status::RUNNING)
            .map(|p| containerd_shim_protos::types::task::ProcessInfo {
                pid: p.pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let stdin = self
            .0
            .with_proc(&req.id, &req.exec_id, |_, p| Ok(p.stdin.clone()))?;
        if req.stdin && !stdin.is_empty() {
            // A writer that comes and goes: the stdin thread's open returns, and its reads end
            // once containerd's own end is closed too.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&stdin);
        }
        Ok(api::Empty::default())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        self.0.with_proc(&req.id, &req.exec_id, |_, _| Ok(()))?;
        Err(failed("Torii processes have no terminal to resize"))
    }

    fn update(&self, _: &TtrpcContext, _: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "a Torii pod's resources (vCPUs, memory) are fixed when its VM boots",
        ))
    }

    fn pause(&self, _: &TtrpcContext, _: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(err(Code::UNIMPLEMENTED, "Torii does not pause containers"))
    }

    fn resume(&self, _: &TtrpcContext, _: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "Torii does not pause or resume containers",
        ))
    }

    fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "Torii does not checkpoint containers",
        ))
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let inner = &self.0;
        if !lock(&inner.state).containers.contains_key(&req.id) {
            return Err(err(
                Code::NOT_FOUND,
                format!("container {} not found", req.id),
            ));
        }
        let vm = lock(&inner.lifecycle)
            .clone()
            .ok_or_else(|| failed("no VM"))?;
        let m = vm
            .agent
            .call("metrics", Value::Null, CALL_TIMEOUT)
            .map_err(|e| failed(format!("guest metrics: {e}")))?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics(&m)))
            .map_err(|e| failed(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let inner = &self.0;
        if lock(&inner.state).containers.is_empty() {
            let mut slot = lock(&inner.lifecycle);
            inner.stop_vm(&mut slot);
            inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

/// The guest's metrics (the agent's `metrics`) as containerd's cgroup v1 metrics: the sandbox
/// VM's memory and its interfaces.
fn metrics(m: &Value) -> containerd_shim_protos::cgroups::metrics::Metrics {
    use containerd_shim_protos::cgroups::metrics::{MemoryEntry, MemoryStat, Metrics, NetworkStat};
    let mem = |k: &str| m["memory"][k].as_u64().unwrap_or(0);
    let (total, available) = (mem("MemTotal"), mem("MemAvailable"));
    let network = m["interfaces"]
        .as_object()
        .map(|ifs| {
            ifs.iter()
                .map(|(name, s)| {
                    let n = |k: &str| s[k].as_u64().unwrap_or(0);
                    NetworkStat {
                        name: name.clone(),
                        rx_bytes: n("rx_bytes"),
                        rx_packets: n("rx_packets"),
                        rx_errors: n("rx_errors"),
                        rx_dropped: n("rx_dropped"),
                        tx_bytes: n("tx_bytes"),
                        tx_packets: n("tx_packets"),
                        tx_errors: n("tx_errors"),
                        tx_dropped: n("tx_dropped"),
                        ..Default::default()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Metrics {
        memory: MessageField::some(MemoryStat {
            usage: MessageField::some(MemoryEntry {
                usage: total.saturating_sub(available),
                limit: total,
                ..Default::default()
            }),
            total_rss: total.saturating_sub(available),
            ..Default::default()
        }),
        network,
        ..Default::default()
    }
}
