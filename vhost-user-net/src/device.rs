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

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::EventNotifier;

use crate::backend::{capture_vrings, GuestMem, NetBackend};
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
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("cannot start the control thread of {name}: {source}")]
    Thread { name: String, source: io::Error },
}

/// Largest number of queue pairs (vhost-user-backend keeps queue masks in a u64).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// The vrings and memory of one live frontend connection.
pub(crate) struct Connection {
    pub(crate) vrings: Vec<VringRwLock<GuestMem>>,
    pub(crate) mem: GuestMem,
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
    /// The generation the PMD has switched to (it no longer touches older connections).
    pub(crate) pmd_generation: AtomicU64,
    pub(crate) pmd_attached: AtomicBool,
    pub(crate) waker: Mutex<Option<EventNotifier>>,
    stop: AtomicBool,
    pub(crate) broken: Mutex<Vec<BrokenQueue>>,
    connections: AtomicU64,
    connected: AtomicBool,
}

impl DeviceShared {
    /// Wakes the PMD that polls this device, if it sleeps (adaptive mode).
    pub(crate) fn wake(&self) {
        if let Some(w) = self.waker.lock().unwrap().as_ref() {
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

    fn publish(&self, conn: Option<Arc<Connection>>) -> u64 {
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
                let l = Listener::new(&cfg.socket, true).map_err(|source| DeviceError::Listen {
                    path: cfg.socket.clone(),
                    source,
                })?;
                Some(l)
            }
            SocketMode::Client => None,
        };
        let shared = Arc::new(DeviceShared {
            name: cfg.name.clone(),
            mac: cfg.mac,
            mtu: cfg.mtu,
            queue_pairs: cfg.queue_pairs,
            link_up: AtomicBool::new(true),
            generation: AtomicU64::new(0),
            conn: Mutex::new(None),
            pmd_generation: AtomicU64::new(0),
            pmd_attached: AtomicBool::new(false),
            waker: Mutex::new(None),
            stop: AtomicBool::new(false),
            broken: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        });
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

    /// Sets the link status the driver sees (config space `status`, §5.1.4) and notifies it.
    pub fn set_link(&self, up: bool) {
        self.shared.link_up.store(up, Ordering::Release);
        if let Some(c) = self.shared.conn.lock().unwrap().as_ref() {
            c.backend.notify_config_change();
        }
    }

    /// Registers the eventfd the PMD sleeps on; the kick thread writes it.
    pub fn set_waker(&self, waker: Option<EventNotifier>) {
        *self.shared.waker.lock().unwrap() = waker;
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
fn control_loop(shared: Arc<DeviceShared>, cfg: NetDeviceConfig, mut listener: Option<Listener>) {
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
    listener: Option<&mut Listener>,
) -> Result<(), String> {
    let backend = Arc::new(NetBackend::new(shared.clone()).map_err(|e| e.to_string())?);
    let mem: GuestMem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let (daemon, vrings) =
        capture_vrings(|| VhostUserDaemon::new(cfg.name.clone(), backend.clone(), mem.clone()));
    let mut daemon = daemon.map_err(|e| format!("cannot create vhost-user daemon: {e}"))?;
    if vrings.len() != 2 * cfg.queue_pairs as usize {
        return Err(format!(
            "expected {} vrings, got {}",
            2 * cfg.queue_pairs,
            vrings.len()
        ));
    }
    match listener {
        Some(l) => daemon.start(l),
        None => daemon.start_client(&cfg.socket.to_string_lossy()),
    }
    .map_err(|e| {
        format!(
            "cannot start vhost-user session on {}: {e}",
            cfg.socket.display()
        )
    })?;

    shared.broken.lock().unwrap().clear();
    let conn = Arc::new(Connection {
        vrings,
        mem,
        backend: backend.clone(),
    });
    shared.publish(Some(conn));
    shared.connections.fetch_add(1, Ordering::AcqRel);
    shared.connected.store(true, Ordering::Release);
    tracing::info!(port = %cfg.name, socket = %cfg.socket.display(), "frontend connected");

    // Watch for a stop request while the protocol thread runs.
    let stopper = daemon.shutdown_handle();
    let shared2 = shared.clone();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let watcher = std::thread::Builder::new()
        .name(format!("vhu-{}-stop", cfg.name))
        .spawn(move || {
            while !done2.load(Ordering::Acquire) {
                if shared2.stop.load(Ordering::Acquire) {
                    if let Some(h) = &stopper {
                        h.shutdown();
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .map_err(|e| e.to_string())?;
    let result = daemon.wait();
    done.store(true, Ordering::Release);
    let _ = watcher.join();

    shared.connected.store(false, Ordering::Release);
    retire(shared);
    tracing::info!(port = %cfg.name, "frontend disconnected");
    drop(daemon);
    result.map_err(|e| e.to_string())
}

/// Unpublishes the connection and waits (bounded) until the PMD has let go of its vrings.
fn retire(shared: &DeviceShared) {
    let gen = shared.publish(None);
    let deadline = Instant::now() + Duration::from_secs(2);
    while shared.pmd_attached.load(Ordering::Acquire)
        && shared.pmd_generation.load(Ordering::Acquire) < gen
        && Instant::now() < deadline
    {
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
