//! One vhost-user device endpoint: its socket (server or client mode), the life of each
//! frontend connection, and the hand-off of that connection's vrings to the data-path
//! threads that poll them.
//!
//! Threads: a control thread per device accepts or connects and runs the vhost-user protocol
//! (`protocol.rs`, `handler.rs`, which also start a kick thread), and on disconnect retires
//! the connection. The data path picks up a new connection by generation number, with no
//! lock on its per-burst path: each data-path handle has a [`HandleSlot`] through which the
//! control thread knows when every handle has let go of a retired connection.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::unix::net::{UnixListener, UnixStream};

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::VringRwLock;
use vmm_sys_util::event::EventNotifier;
use vmm_sys_util::eventfd::EventFd;

use crate::handler::ConnHandler;
use crate::inflight::InflightMap;
use crate::protocol::{Session, SessionEnd};
use crate::{DeviceModel, GuestMem};

/// Who listens on the vhost-user socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketMode {
    /// Torii listens; the frontend (QEMU `-chardev socket,path=..`) connects.
    Server,
    /// The frontend listens (QEMU `server=on`, DPDK virtio-user `server=1`); Torii connects and
    /// reconnects whenever the connection drops.
    Client,
}

/// Where and how a device meets its frontend.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    pub name: String,
    pub socket: PathBuf,
    pub mode: SocketMode,
    /// Client mode: how long to wait between connection attempts.
    pub reconnect_interval: Duration,
}

/// Errors when starting an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `hint`: empty, or why the Landlock sandbox refused it and how to allow it.
    #[error("cannot listen on vhost-user socket {path}: {source}{hint}")]
    Listen {
        path: PathBuf,
        source: io::Error,
        hint: String,
    },
    #[error("cannot start the control thread of {name}: {source}")]
    Thread { name: String, source: io::Error },
    #[error(transparent)]
    SocketDir(#[from] crate::sockdir::SockDirError),
}

/// The vrings, memory and negotiated state of one live frontend connection.
pub struct Connection {
    pub vrings: Vec<VringRwLock<GuestMem>>,
    pub mem: GuestMem,
    /// Bumped by the handler after every change of `mem`.
    pub mem_generation: Arc<AtomicU64>,
    acked_features: AtomicU64,
    backend_req: Mutex<Option<Backend>>,
    inflight: Mutex<Option<Arc<InflightMap>>>,
}

impl Connection {
    pub fn new(
        vrings: Vec<VringRwLock<GuestMem>>,
        mem: GuestMem,
        mem_generation: Arc<AtomicU64>,
    ) -> Self {
        Connection {
            vrings,
            mem,
            mem_generation,
            acked_features: AtomicU64::new(0),
            backend_req: Mutex::new(None),
            inflight: Mutex::new(None),
        }
    }

    /// Features the driver acknowledged (SET_FEATURES).
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Acquire)
    }

    /// Records the acknowledged features (the handler on SET_FEATURES; tests).
    pub fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.acked_features() & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// The inflight region the frontend set (SET_INFLIGHT_FD), if any.
    pub fn inflight(&self) -> Option<Arc<InflightMap>> {
        self.inflight.lock().unwrap().clone()
    }

    pub(crate) fn set_inflight(&self, map: Option<Arc<InflightMap>>) {
        *self.inflight.lock().unwrap() = map;
    }

    pub(crate) fn set_backend_req(&self, backend: Backend) {
        *self.backend_req.lock().unwrap() = Some(backend);
    }

    /// Tells the frontend to re-read the config space (BACKEND_REQ channel, if it set one).
    pub fn notify_config_change(&self) {
        if let Some(b) = self.backend_req.lock().unwrap().as_ref() {
            if let Err(e) = b.handle_config_change() {
                tracing::debug!("config change notification failed: {e}");
            }
        }
    }
}

/// A broken queue as reported to operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenQueue {
    pub queue: u16,
    pub reason: String,
}

/// One data-path handle's progress, for [`retire`].
#[derive(Default)]
pub struct HandleSlot {
    attached: AtomicBool,
    generation: AtomicU64,
}

/// Endpoint state shared by the control thread, the kick thread and the data path. `model` is
/// the device's own part.
pub struct EndpointShared<M> {
    pub name: String,
    pub model: M,
    /// Bumped on every connect and disconnect; the data path compares it once per burst.
    generation: AtomicU64,
    conn: Mutex<Option<Arc<Connection>>>,
    /// Per data-path handle: whether a thread polls it and the generation it has switched to
    /// (it no longer touches older connections).
    handles: Vec<HandleSlot>,
    /// Per handle: the eventfd its thread sleeps on.
    wakers: Mutex<Vec<Option<EventNotifier>>>,
    /// Per virtqueue: requests the data path has taken from the ring and not completed yet
    /// (devices that complete asynchronously keep this; GET_VRING_BASE waits for zero).
    queue_busy: Vec<AtomicU32>,
    /// Per virtqueue: bumped whenever the frontend stops or (re)starts the ring or replaces
    /// the inflight region, so a data path that keeps per-queue state knows to start over.
    queue_epoch: Vec<AtomicU64>,
    stop: AtomicBool,
    broken: Mutex<Vec<BrokenQueue>>,
    connections: AtomicU64,
    connected: AtomicBool,
}

impl<M: DeviceModel> EndpointShared<M> {
    /// State of a device with no connection yet, with `handles` data-path handle slots.
    pub fn new(name: String, model: M, handles: usize) -> Self {
        let handles = handles.max(1);
        EndpointShared {
            name,
            generation: AtomicU64::new(0),
            conn: Mutex::new(None),
            handles: (0..handles).map(|_| HandleSlot::default()).collect(),
            wakers: Mutex::new((0..handles).map(|_| None).collect()),
            queue_busy: (0..model.num_queues()).map(|_| AtomicU32::new(0)).collect(),
            queue_epoch: (0..model.num_queues()).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            broken: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            model,
        }
    }

    /// Records how many requests of virtqueue `queue` are in flight (data path).
    pub fn set_queue_busy(&self, queue: usize, requests: u32) {
        if let Some(b) = self.queue_busy.get(queue) {
            b.store(requests, Ordering::Release);
        }
    }

    /// The ring epoch of virtqueue `queue` (see [`EndpointShared::bump_queue_epoch`]).
    #[inline]
    pub fn queue_epoch(&self, queue: usize) -> u64 {
        self.queue_epoch
            .get(queue)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// The frontend stopped or started virtqueue `queue` (None: every queue) or changed what
    /// the data path keeps for it.
    pub(crate) fn bump_queue_epoch(&self, queue: Option<usize>) {
        for (i, e) in self.queue_epoch.iter().enumerate() {
            if queue.is_none_or(|q| q == i) {
                e.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Waits (bounded by `timeout`) until virtqueue `queue` has no request in flight; the
    /// vhost-user spec wants a stopped ring to be idle before GET_VRING_BASE is answered.
    pub(crate) fn wait_queue_idle(&self, queue: usize, timeout: Duration) -> bool {
        let Some(b) = self.queue_busy.get(queue) else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while b.load(Ordering::Acquire) != 0 {
            if Instant::now() >= deadline {
                return false;
            }
            self.wake();
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Number of data-path handle slots.
    pub fn handle_slots(&self) -> usize {
        self.handles.len()
    }

    /// The connection generation now; compare it once per burst.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Switches handle `slot` to generation `g` (read with [`Self::generation`]) and returns
    /// the connection to serve from now on. Marks the handle as polled, so the control thread
    /// waits for it on disconnect.
    pub fn attach(&self, slot: usize, g: u64) -> Option<Arc<Connection>> {
        let h = self.handles.get(slot)?;
        h.attached.store(true, Ordering::Release);
        let conn = self.conn.lock().unwrap().clone();
        h.generation.store(g, Ordering::Release);
        conn
    }

    /// Handle `slot` is no longer polled (its port moves or goes away).
    pub fn detach(&self, slot: usize) {
        if let Some(h) = self.handles.get(slot) {
            h.attached.store(false, Ordering::Release);
        }
        self.set_waker(slot, None);
    }

    /// The connection being served now, if any (control path).
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.conn.lock().unwrap().clone()
    }

    /// Registers the eventfd handle `slot`'s thread sleeps on; guest kicks write it.
    pub fn set_waker(&self, slot: usize, waker: Option<EventNotifier>) {
        if let Some(w) = self.wakers.lock().unwrap().get_mut(slot) {
            *w = waker;
        }
    }

    /// Wakes the threads that poll this device, if they sleep.
    pub fn wake(&self) {
        for w in self.wakers.lock().unwrap().iter().flatten() {
            let _ = w.notify();
        }
    }

    /// Records that `queue` is broken: the data path stops serving it until the next
    /// connection, and operators see why.
    pub fn report_broken(&self, queue: u16, reason: String) {
        tracing::error!(device = %self.name, queue, %reason, "virtqueue broken: stopped serving it");
        self.broken
            .lock()
            .unwrap()
            .push(BrokenQueue { queue, reason });
    }

    /// Makes `conn` (or no connection) the one the data path picks up next.
    pub fn publish(&self, conn: Option<Arc<Connection>>) -> u64 {
        let mut slot = self.conn.lock().unwrap();
        *slot = conn;
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether a frontend is connected right now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// How many frontend connections the device has served.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    /// Queues found broken since the current connection started.
    pub fn broken_queues(&self) -> Vec<BrokenQueue> {
        self.broken.lock().unwrap().clone()
    }
}

/// A running endpoint. Dropping it stops the control thread and closes the connection.
pub struct Endpoint<M: DeviceModel> {
    shared: Arc<EndpointShared<M>>,
    thread: Option<JoinHandle<()>>,
    /// Written once on stop: wakes the control thread at once from any wait.
    stop_event: Option<Arc<EventFd>>,
    socket: PathBuf,
    mode: SocketMode,
}

impl<M: DeviceModel> Endpoint<M> {
    /// Creates the socket (server mode) and starts the control thread for `shared`.
    pub fn start(cfg: EndpointConfig, shared: Arc<EndpointShared<M>>) -> Result<Self, StartError> {
        // Whoever can write the socket's directory could stand in for either side. A
        // client's frontend may make its directory later: then it is not checked.
        if cfg.mode == SocketMode::Server || crate::sockdir::dir_exists(&cfg.socket) {
            crate::sockdir::check(&cfg.socket)?;
        }
        let listener = match cfg.mode {
            SocketMode::Server => {
                use crate::landlock::{enforced, explain, Rights};
                let listen_err = |source: io::Error, need| StartError::Listen {
                    hint: explain(&source, &cfg.socket, need),
                    path: cfg.socket.clone(),
                    source,
                };
                // A socket file left by a previous instance would make bind fail.
                if let Ok(m) = std::fs::symlink_metadata(&cfg.socket) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        if let Err(e) = std::fs::remove_file(&cfg.socket) {
                            // Under the sandbox, say why rather than fail later with
                            // "address in use".
                            if enforced() && e.kind() == io::ErrorKind::PermissionDenied {
                                return Err(listen_err(e, Rights::REMOVE_FILE));
                            }
                        }
                    }
                }
                let l = UnixListener::bind(&cfg.socket)
                    .map_err(|source| listen_err(source, Rights::MAKE_SOCK))?;
                Some(l)
            }
            SocketMode::Client => None,
        };
        let thread_err = |source| StartError::Thread {
            name: shared.name.clone(),
            source,
        };
        let stop_event = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?);
        let s = shared.clone();
        let socket = cfg.socket.clone();
        let mode = cfg.mode;
        let stop = stop_event.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhu-{}", cfg.name))
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadClass::VhostUser);
                control_loop(s, cfg, listener, stop)
            })
            .map_err(thread_err)?;
        Ok(Endpoint {
            shared,
            thread: Some(thread),
            stop_event: Some(stop_event),
            socket,
            mode,
        })
    }

    /// An endpoint with no socket and no control thread; the caller publishes connections
    /// itself (in-process tests).
    pub fn detached(shared: Arc<EndpointShared<M>>) -> Self {
        Endpoint {
            shared,
            thread: None,
            stop_event: None,
            socket: PathBuf::new(),
            mode: SocketMode::Server,
        }
    }

    pub fn shared(&self) -> &Arc<EndpointShared<M>> {
        &self.shared
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn mode(&self) -> SocketMode {
        self.mode
    }

    /// Stops the control thread and drops the connection.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(e) = &self.stop_event {
            // Never read: once written it stays readable, so every later wait ends at once.
            let _ = e.write(1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<M: DeviceModel> Drop for Endpoint<M> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The control thread: one frontend connection after another until stopped.
fn control_loop<M: DeviceModel>(
    shared: Arc<EndpointShared<M>>,
    cfg: EndpointConfig,
    mut listener: Option<UnixListener>,
    stop: Arc<EventFd>,
) {
    while !shared.stop.load(Ordering::Acquire) {
        // Wait for a peer before creating the daemon (it starts a kick thread).
        let ready = match &listener {
            Some(l) => wait_readable(&[l.as_raw_fd(), stop.as_raw_fd()], None) == Some(0),
            None => {
                if cfg.socket.exists() {
                    true
                } else {
                    wait_readable(&[stop.as_raw_fd()], Some(cfg.reconnect_interval));
                    false
                }
            }
        };
        if !ready {
            continue;
        }
        if let Err(e) = serve_one(&shared, &cfg, listener.as_mut(), &stop) {
            tracing::warn!(device = %cfg.name, "vhost-user connection ended with error: {e}");
            if listener.is_none() {
                wait_readable(&[stop.as_raw_fd()], Some(cfg.reconnect_interval));
            }
        }
    }
    if listener.is_some() {
        let _ = std::fs::remove_file(&cfg.socket);
    }
}

/// Serves one connection from start to disconnect.
fn serve_one<M: DeviceModel>(
    shared: &Arc<EndpointShared<M>>,
    cfg: &EndpointConfig,
    listener: Option<&mut UnixListener>,
    stop: &Arc<EventFd>,
) -> Result<(), String> {
    let stream = match listener {
        Some(l) => l.accept().map(|(s, _)| s),
        None => UnixStream::connect(&cfg.socket),
    }
    .map_err(|e| format!("cannot connect on {}: {e}", cfg.socket.display()))?;
    let handler = ConnHandler::new(shared.clone()).map_err(|e| e.to_string())?;
    let parts = handler.connection();
    let conn = stream.try_clone().map_err(|e| e.to_string())?;
    let mut session = Session::new(stream, handler);

    // A stop request shuts the socket down, which ends the blocking receive in `run`; the
    // end of the session ends the watcher. Started before the connection is published, so a
    // failure here leaves nothing published.
    let done = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
    let (stop2, done2) = (stop.clone(), done.clone());
    let watcher = std::thread::Builder::new()
        .name(format!("vhu-{}-stop", cfg.name))
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadClass::Watcher);
            if wait_readable(&[stop2.as_raw_fd(), done2.as_raw_fd()], None) == Some(0) {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        })
        .map_err(|e| e.to_string())?;

    shared.broken.lock().unwrap().clear();
    shared.publish(Some(parts));
    shared.connections.fetch_add(1, Ordering::AcqRel);
    shared.connected.store(true, Ordering::Release);
    tracing::info!(device = %cfg.name, socket = %cfg.socket.display(), "frontend connected");

    let end = session.run();
    let result = match end {
        SessionEnd::Closed => Ok(()),
        SessionEnd::Io(_) if shared.stop.load(Ordering::Acquire) => Ok(()),
        e => Err(e.to_string()),
    };
    let _ = done.write(1);
    let _ = watcher.join();

    shared.connected.store(false, Ordering::Release);
    retire(shared);
    tracing::info!(device = %cfg.name, "frontend disconnected");
    // Dropping the session drops the ConnHandler: its kick thread and fds go with it.
    drop(session);
    result
}

/// Unpublishes the connection and waits (bounded) until every PMD has let go of its vrings.
fn retire<M: DeviceModel>(shared: &EndpointShared<M>) {
    let gen = shared.publish(None);
    let deadline = Instant::now() + Duration::from_secs(2);
    let behind = |h: &HandleSlot| {
        h.attached.load(Ordering::Acquire) && h.generation.load(Ordering::Acquire) < gen
    };
    while shared.handles.iter().any(behind) && Instant::now() < deadline {
        shared.wake();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until one of `fds` is readable (or `timeout`, if given, passes); the index of the
/// first readable one. Failed waits (a signal, no memory) are retried.
fn wait_readable(fds: &[i32], timeout: Option<Duration>) -> Option<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r < 0 {
            // Interrupted, or out of memory for the wait (the fds are ours and valid): wait
            // again, after a pause if it was not a signal.
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        return pfds
            .iter()
            .position(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0);
    }
}
