//! One vhost-user-net device: its socket (server or client mode), the life of each frontend
//! connection, and the hand-off of that connection's vrings to the PMD that polls them.
//!
//! Threads: a control thread per device accepts or connects, runs the vhost-user protocol
//! (through `vhost-user-backend`, which also starts one kick thread), and on disconnect retires
//! the connection. The data path ([`NetQueues`](crate::NetQueues)) is owned by a PMD thread and
//! picks up a new connection by generation number, with no lock on the per-burst path.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::unix::net::{UnixListener, UnixStream};

use vhost_user_backend::VringRwLock;
use vmm_sys_util::event::EventNotifier;

use crate::backend::{GuestMem, NetBackend};
use crate::handler::ConnHandler;
use crate::protocol::{Session, SessionEnd};
use crate::queue::NetQueues;

/// Who listens on the vhost-user socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketMode {
    /// Torii listens; the frontend (QEMU `-chardev socket,path=..`) connects.
    Server,
    /// The frontend listens (QEMU `server=on`, DPDK virtio-user `server=1`); Torii connects and
    /// reconnects whenever the connection drops.
    Client,
}

/// Static configuration of a device.
#[derive(Clone, Debug)]
pub struct NetDeviceConfig {
    pub name: String,
    pub socket: PathBuf,
    pub mode: SocketMode,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub queue_pairs: u16,
    /// Client mode: how long to wait between connection attempts.
    pub reconnect_interval: Duration,
}

/// Errors when starting a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue_pairs must be between 1 and {max}, got {got}")]
    QueuePairs { got: u16, max: u16 },
    #[error("mtu {0} is outside 68..=65535")]
    Mtu(u16),
    #[error("cannot listen on vhost-user socket {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot start the control thread of {name}: {source}")]
    Thread { name: String, source: io::Error },
}

/// Largest number of queue pairs (vhost-user-backend keeps queue masks in a u64).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// The vrings and memory of one live frontend connection.
pub(crate) struct Connection {
    pub(crate) vrings: Vec<VringRwLock<GuestMem>>,
    pub(crate) mem: GuestMem,
    /// Bumped by the handler after every change of `mem`.
    pub(crate) mem_generation: Arc<AtomicU64>,
    pub(crate) backend: Arc<NetBackend>,
}

/// A broken queue as reported to operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenQueue {
    pub queue: u16,
    pub reason: String,
}

/// Device state shared by the control thread, the kick thread and the PMD.
pub struct DeviceShared {
    pub(crate) name: String,
    pub(crate) mac: [u8; 6],
    pub(crate) mtu: u16,
    pub(crate) queue_pairs: u16,
    pub(crate) link_up: AtomicBool,
    /// Bumped on every connect and disconnect; the PMD compares it once per burst.
    pub(crate) generation: AtomicU64,
    pub(crate) conn: Mutex<Option<Arc<Connection>>>,
    /// Per data-path handle (at most one per queue pair, see [`NetQueues`]): whether a PMD
    /// polls it and the generation it has switched to (it no longer touches older
    /// connections).
    pub(crate) handles: Vec<HandleSlot>,
    /// Per handle: the eventfd its PMD sleeps on.
    pub(crate) wakers: Mutex<Vec<Option<EventNotifier>>>,
    stop: AtomicBool,
    pub(crate) broken: Mutex<Vec<BrokenQueue>>,
    connections: AtomicU64,
    connected: AtomicBool,
}

impl DeviceShared {
    /// The virtio-net config space (§5.1.4) as the driver reads it with GET_CONFIG.
    pub(crate) fn config_space(&self) -> [u8; 12] {
        // struct virtio_net_config (§5.1.4): mac[6], status, max_virtqueue_pairs, mtu.
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up.load(Ordering::Acquire) {
            virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// State of a device with no connection yet.
    pub(crate) fn new(name: String, mac: [u8; 6], mtu: u16, queue_pairs: u16) -> Self {
        DeviceShared {
            name,
            mac,
            mtu,
            queue_pairs,
            link_up: AtomicBool::new(true),
            generation: AtomicU64::new(0),
            conn: Mutex::new(None),
            handles: (0..queue_pairs.max(1))
                .map(|_| HandleSlot::default())
                .collect(),
            wakers: Mutex::new((0..queue_pairs.max(1)).map(|_| None).collect()),
            stop: AtomicBool::new(false),
            broken: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }

    /// Wakes the PMDs that poll this device, if they sleep (adaptive mode).
    pub(crate) fn wake(&self) {
        for w in self.wakers.lock().unwrap().iter().flatten() {
            let _ = w.notify();
        }
    }

    pub(crate) fn report_broken(&self, queue: u16, reason: String) {
        tracing::error!(port = %self.name, queue, %reason, "virtqueue broken: stopped serving it");
        self.broken
            .lock()
            .unwrap()
            .push(BrokenQueue { queue, reason });
    }

    /// Makes `conn` (or no connection) the one the PMD picks up on its next `refresh`.
    pub(crate) fn publish(&self, conn: Option<Arc<Connection>>) -> u64 {
        let mut slot = self.conn.lock().unwrap();
        *slot = conn;
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// A running device. Dropping it stops the control thread and closes the connection.
pub struct VhostUserNetDevice {
    shared: Arc<DeviceShared>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
    mode: SocketMode,
}

impl VhostUserNetDevice {
    /// Validates `cfg`, creates the socket (server mode) and starts the control thread. Returns
    /// the device handle and the data-path handle for the PMD.
    pub fn start(cfg: NetDeviceConfig) -> Result<(Self, NetQueues), DeviceError> {
        if cfg.queue_pairs == 0 || cfg.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(DeviceError::QueuePairs {
                got: cfg.queue_pairs,
                max: MAX_QUEUE_PAIRS,
            });
        }
        if cfg.mtu < 68 {
            return Err(DeviceError::Mtu(cfg.mtu));
        }
        let listener = match cfg.mode {
            SocketMode::Server => {
                // A socket file left by a previous instance would make bind fail.
                if let Ok(m) = std::fs::symlink_metadata(&cfg.socket) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(&cfg.socket);
                    }
                }
                let l = UnixListener::bind(&cfg.socket).map_err(|source| DeviceError::Listen {
                    path: cfg.socket.clone(),
                    source,
                })?;
                Some(l)
            }
            SocketMode::Client => None,
        };
        let shared = Arc::new(DeviceShared::new(
            cfg.name.clone(),
            cfg.mac,
            cfg.mtu,
            cfg.queue_pairs,
        ));
        let queues = NetQueues::new(shared.clone());
        let s = shared.clone();
        let socket = cfg.socket.clone();
        let mode = cfg.mode;
        let thread = std::thread::Builder::new()
            .name(format!("vhu-{}", cfg.name))
            .spawn(move || control_loop(s, cfg, listener))
            .map_err(|source| DeviceError::Thread {
                name: shared.name.clone(),
                source,
            })?;
        Ok((
            VhostUserNetDevice {
                shared,
                thread: Some(thread),
                socket,
                mode,
            },
            queues,
        ))
    }

    /// A device handle with no socket and no control thread; the caller publishes connections
    /// itself (see the `testing` module).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn detached(shared: Arc<DeviceShared>) -> Self {
        VhostUserNetDevice {
            shared,
            thread: None,
            socket: PathBuf::new(),
            mode: SocketMode::Server,
        }
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

    /// Whether a frontend is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// How many frontend connections the device has served.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Queues found broken since the current connection started.
    pub fn broken_queues(&self) -> Vec<BrokenQueue> {
        self.shared.broken.lock().unwrap().clone()
    }

    /// The virtio-net config space (mac, status, queue pairs, mtu) the driver reads.
    pub fn config_space(&self) -> [u8; 12] {
        self.shared.config_space()
    }

    /// The link status set by [`Self::set_link`] (up unless set down).
    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::Acquire)
    }

    /// Sets the link status the driver sees (config space `status`, §5.1.4) and notifies it.
    pub fn set_link(&self, up: bool) {
        self.shared.link_up.store(up, Ordering::Release);
        if let Some(c) = self.shared.conn.lock().unwrap().as_ref() {
            c.backend.notify_config_change();
        }
    }

    /// Stops the control thread and drops the connection.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VhostUserNetDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The control thread: one frontend connection after another until stopped.
fn control_loop(
    shared: Arc<DeviceShared>,
    cfg: NetDeviceConfig,
    mut listener: Option<UnixListener>,
) {
    let poll_interval = Duration::from_millis(100);
    while !shared.stop.load(Ordering::Acquire) {
        // Wait for a peer before creating the daemon (it starts a kick thread).
        let ready = match &listener {
            Some(l) => wait_readable(l.as_raw_fd(), poll_interval),
            None => {
                if cfg.socket.exists() {
                    true
                } else {
                    sleep_unless_stopped(&shared, cfg.reconnect_interval);
                    false
                }
            }
        };
        if !ready {
            continue;
        }
        if let Err(e) = serve_one(&shared, &cfg, listener.as_mut()) {
            tracing::warn!(port = %cfg.name, "vhost-user connection ended with error: {e}");
            if listener.is_none() {
                sleep_unless_stopped(&shared, cfg.reconnect_interval);
            }
        }
    }
    if listener.is_some() {
        let _ = std::fs::remove_file(&cfg.socket);
    }
}

/// Serves one connection from start to disconnect.
fn serve_one(
    shared: &Arc<DeviceShared>,
    cfg: &NetDeviceConfig,
    listener: Option<&mut UnixListener>,
) -> Result<(), String> {
    let stream = match listener {
        Some(l) => l.accept().map(|(s, _)| s),
        None => UnixStream::connect(&cfg.socket),
    }
    .map_err(|e| format!("cannot connect on {}: {e}", cfg.socket.display()))?;
    let handler = ConnHandler::new(shared.clone()).map_err(|e| e.to_string())?;
    let parts = handler.parts();
    let conn = stream.try_clone().map_err(|e| e.to_string())?;
    let mut session = Session::new(stream, handler);

    shared.broken.lock().unwrap().clear();
    shared.publish(Some(Arc::new(parts)));
    shared.connections.fetch_add(1, Ordering::AcqRel);
    shared.connected.store(true, Ordering::Release);
    tracing::info!(port = %cfg.name, socket = %cfg.socket.display(), "frontend connected");

    // A stop request shuts the socket down, which ends the blocking receive in `run`.
    let shared2 = shared.clone();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let watcher = std::thread::Builder::new()
        .name(format!("vhu-{}-stop", cfg.name))
        .spawn(move || {
            while !done2.load(Ordering::Acquire) {
                if shared2.stop.load(Ordering::Acquire) {
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .map_err(|e| e.to_string())?;
    let end = session.run();
    let result = match end {
        SessionEnd::Closed => Ok(()),
        SessionEnd::Io(_) if shared.stop.load(Ordering::Acquire) => Ok(()),
        e => Err(e.to_string()),
    };
    done.store(true, Ordering::Release);
    let _ = watcher.join();

    shared.connected.store(false, Ordering::Release);
    retire(shared);
    tracing::info!(port = %cfg.name, "frontend disconnected");
    // Dropping the session drops the ConnHandler: its kick thread and fds go with it.
    drop(session);
    result
}

/// One data-path handle's progress, for [`retire`].
#[derive(Default)]
pub(crate) struct HandleSlot {
    pub(crate) attached: AtomicBool,
    pub(crate) generation: AtomicU64,
}

/// Unpublishes the connection and waits (bounded) until every PMD has let go of its vrings.
fn retire(shared: &DeviceShared) {
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

fn sleep_unless_stopped(shared: &DeviceShared, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !shared.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    r > 0 && pfd.revents & libc::POLLIN != 0
}
