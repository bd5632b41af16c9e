//! Torii's virtio-net device over vhost-user (virtio 1.2 §5.1, vhost-user protocol), on the
//! rust-vmm crates. `backend` speaks the protocol, `device` owns the socket and connection
//! lifecycle, `queue` is the data path a PMD thread polls.

mod backend;
pub mod copy;
mod device;
mod handler;
pub mod hdr;
mod protocol;
mod queue;
mod ring;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use backend::{offered_features, GuestMem, MAX_QUEUE_SIZE};
pub use device::{
    BrokenQueue, DeviceError, NetDeviceConfig, SocketMode, VhostUserNetDevice, MAX_QUEUE_PAIRS,
};
pub use hdr::{Offloads, VirtioNetHdr};
pub use queue::{BufPool, FromGuest, NetBuf, NetQueues, ToGuest, MAX_FRAME};
pub use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
