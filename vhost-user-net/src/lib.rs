//! Torii's virtio-net device over vhost-user (virtio 1.2 §5.1), on `torii-vhost-user` (the
//! protocol, guest memory, rings and connection lifecycle every Torii device shares) and the
//! rust-vmm crates. `backend` is the device model (features, config space), `device` the
//! device handle, `queue` the data path a PMD thread polls.

mod backend;
pub mod copy;
mod device;
pub mod hdr;
mod queue;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use backend::{offered_features, GuestMem, NetModel, MAX_QUEUE_SIZE};
pub use device::{
    BrokenQueue, DeviceError, NetDeviceConfig, SocketMode, VhostUserNetDevice, MAX_QUEUE_PAIRS,
};
pub use hdr::{Offloads, VirtioNetHdr};
pub use queue::{BufPool, FromGuest, NetBuf, NetQueues, ToGuest, MAX_FRAME};
pub use torii_vhost_user::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
