//! One vhost-user-net device: the shared endpoint (socket, connections, hand-off to the data
//! path, from `torii-vhost-user`) with the virtio-net model, and the data-path handle the PMD
//! polls ([`NetQueues`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use torii_vhost_user::{Endpoint, EndpointConfig, EndpointShared, StartError};

pub use torii_vhost_user::{BrokenQueue, SocketMode};

use crate::backend::NetModel;
use crate::queue::NetQueues;

/// Device state shared by the control thread, the kick thread and the PMDs.
pub(crate) type DeviceShared = EndpointShared<NetModel>;

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
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Largest number of queue pairs.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// A running device. Dropping it stops the control thread and closes the connection.
pub struct VhostUserNetDevice {
    endpoint: Endpoint<NetModel>,
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
        // One data-path handle slot per queue pair (see `NetQueues::handle_for`).
        let shared = Arc::new(DeviceShared::new(
            cfg.name.clone(),
            NetModel::new(cfg.mac, cfg.mtu, cfg.queue_pairs),
            cfg.queue_pairs as usize,
        ));
        let queues = NetQueues::new(shared.clone());
        let endpoint = Endpoint::start(
            EndpointConfig {
                name: cfg.name,
                socket: cfg.socket,
                mode: cfg.mode,
                reconnect_interval: cfg.reconnect_interval,
            },
            shared,
        )?;
        Ok((VhostUserNetDevice { endpoint }, queues))
    }

    /// A device handle with no socket and no control thread; the caller publishes connections
    /// itself (see the `testing` module).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn detached(shared: Arc<DeviceShared>) -> Self {
        VhostUserNetDevice {
            endpoint: Endpoint::detached(shared),
        }
    }

    fn shared(&self) -> &DeviceShared {
        self.endpoint.shared()
    }

    pub fn name(&self) -> &str {
        self.endpoint.name()
    }

    pub fn socket(&self) -> &Path {
        self.endpoint.socket()
    }

    pub fn mode(&self) -> SocketMode {
        self.endpoint.mode()
    }

    /// Whether a frontend is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared().is_connected()
    }

    /// How many frontend connections the device has served.
    pub fn connections(&self) -> u64 {
        self.shared().connections()
    }

    /// Queues found broken since the current connection started.
    pub fn broken_queues(&self) -> Vec<BrokenQueue> {
        self.shared().broken_queues()
    }

    /// The virtio-net config space (mac, status, queue pairs, mtu) the driver reads.
    pub fn config_space(&self) -> [u8; 12] {
        self.shared().model.config_space()
    }

    /// The link status set by [`Self::set_link`] (up unless set down).
    pub fn link_up(&self) -> bool {
        self.shared().model.link_up.load(Ordering::Acquire)
    }

    /// Sets the link status the driver sees (config space `status`, §5.1.4) and notifies it.
    pub fn set_link(&self, up: bool) {
        self.shared().model.link_up.store(up, Ordering::Release);
        if let Some(c) = self.shared().connection() {
            c.notify_config_change();
        }
    }

    /// Stops the control thread and drops the connection.
    pub fn stop(&mut self) {
        self.endpoint.stop();
    }
}
