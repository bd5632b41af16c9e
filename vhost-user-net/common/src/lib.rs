//! Torii's device-independent vhost-user backend, shared by the virtio-net and virtio-blk
//! devices: message framing (`protocol`), the per-connection protocol state — guest memory
//! map, vrings, features, inflight region — (`handler`), the socket and connection lifecycle
//! and the hand-off of each connection to the data path (`endpoint`), checked split-ring
//! access for the data path (`ring`) and inflight I/O tracking (`inflight`); the daemons'
//! sandboxes: per-thread seccomp filters (`seccomp`) and an optional Landlock file-system
//! sandbox (`landlock`).
//!
//! A device plugs in through [`DeviceModel`]: the features and protocol features it offers,
//! its queue count and its config space. Everything else is the same for every device.

pub mod daemon;
mod endpoint;
#[cfg(any(test, feature = "test-support"))]
pub mod fuzzing;
pub mod guard;
mod handler;
pub mod inflight;
pub mod landlock;
mod protocol;
pub mod ring;
pub mod seccomp;
pub mod sockdir;

pub use endpoint::{
    BrokenQueue, Connection, Endpoint, EndpointConfig, EndpointShared, HandleSlot, SocketMode,
    StartError,
};
pub use inflight::{InflightError, InflightInfo, InflightMap, QueueInflight, QueueRegion};
pub use vhost::vhost_user::message::VhostUserProtocolFeatures as ProtocolFeatures;
pub use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// A memory table: guest memory regions, each a mapping the daemon owns (`guard::Owned`).
pub type MemTable = GuestMemoryMmap<guard::Owned>;

/// Guest memory as the data path sees it.
pub type GuestMem = GuestMemoryAtomic<MemTable>;

/// Largest queue any device accepts. 1024 lets a net driver without MRG_RXBUF post 64 KiB
/// receive buffers as chains of 4 KiB pages.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Largest number of virtqueues of one device.
pub const MAX_QUEUES: usize = 64;

/// What makes a vhost-user device a particular device: its features, queues and config
/// space. Called from the connection's control thread, never from the data path.
pub trait DeviceModel: Send + Sync + 'static {
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;

    /// Largest queue size accepted with SET_VRING_NUM (a power of two).
    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    /// Virtio features offered, transport bits (VERSION_1, ring features) and
    /// VHOST_USER_F_PROTOCOL_FEATURES included.
    fn features(&self) -> u64;

    /// Protocol features offered. REPLY_ACK is always added; INFLIGHT_SHMFD is handled by the
    /// shared code when the device offers it.
    fn protocol_features(&self) -> ProtocolFeatures;

    /// The whole config space as the driver reads it now.
    fn config(&self) -> Vec<u8>;

    /// SET_CONFIG: writes `data` at `offset`. Devices with a read-only config space refuse.
    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), &'static str> {
        let _ = (offset, data);
        Err("the config space is read-only")
    }
}

/// Whether `name` may name a device (a port, a disk): 1 to 64 printable ASCII characters
/// without spaces or `/`. It ends up in thread names, socket-adjacent logs, metrics labels
/// and API paths.
pub fn valid_device_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_names_are_printable_and_short() {
        for good in ["vm1", "pod.net1.0a1b2c3d", "a_b-c:d", &"x".repeat(64)] {
            assert!(super::valid_device_name(good), "{good:?}");
        }
        for bad in ["", "a b", "a/b", "a\0b", "é", &"x".repeat(65)] {
            assert!(!super::valid_device_name(bad), "{bad:?}");
        }
    }
}
