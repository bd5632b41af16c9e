//! The virtio-net device model as vhost-user sees it: offered features, protocol features and
//! the config space (§5.1.3, §5.1.4), expressed through `vhost-user-backend`'s
//! `VhostUserBackend` trait. Protocol messages are handled in `handler.rs`; sockets and
//! connection lifetimes in `device.rs`; packets in `queue.rs`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::DeviceShared;

/// Guest memory as the data path sees it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Largest queue the device accepts. 1024 lets a driver without MRG_RXBUF post 64 KiB receive
/// buffers as chains of 4 KiB pages.
pub const MAX_QUEUE_SIZE: usize = 1024;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Virtio features the device offers (§5.1.3). MQ is offered without CTRL_VQ on purpose: with
/// vhost-user the control queue is emulated by the frontend (QEMU, DPDK virtio-user), which
/// enables queue pairs with SET_VRING_ENABLE.
pub fn offered_features(queue_pairs: u16) -> u64 {
    // IN_ORDER (§2.7.9): the data path always uses chains in the order they were made
    // available, dropped packets and multi-chain (MRG_RXBUF) packets included.
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(virtio_bindings::virtio_config::VIRTIO_F_IN_ORDER)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(vn::VIRTIO_NET_F_MAC)
        | bit(vn::VIRTIO_NET_F_STATUS)
        | bit(vn::VIRTIO_NET_F_MTU)
        | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
        | bit(vn::VIRTIO_NET_F_CSUM)
        | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
        | bit(vn::VIRTIO_NET_F_HOST_TSO4)
        | bit(vn::VIRTIO_NET_F_HOST_TSO6)
        | bit(vn::VIRTIO_NET_F_HOST_ECN)
        | bit(vn::VIRTIO_NET_F_HOST_UFO)
        | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
        | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
        | bit(vn::VIRTIO_NET_F_GUEST_ECN)
        | bit(vn::VIRTIO_NET_F_GUEST_UFO)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if queue_pairs > 1 {
        f |= bit(vn::VIRTIO_NET_F_MQ);
    }
    f
}

/// Per connection backend. A fresh one is made for every frontend connection so that nothing
/// of a previous guest (features, vrings, memory) leaks into the next.
pub struct NetBackend {
    shared: Arc<DeviceShared>,
    acked: AtomicU64,
    event_idx: std::sync::atomic::AtomicBool,
    backend_req: Mutex<Option<Backend>>,
}

impl NetBackend {
    pub(crate) fn new(shared: Arc<DeviceShared>) -> io::Result<Self> {
        Ok(NetBackend {
            shared,
            acked: AtomicU64::new(0),
            event_idx: Default::default(),
            backend_req: Mutex::new(None),
        })
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Tells the frontend to re-read the config space (link status changed).
    pub(crate) fn notify_config_change(&self) {
        if let Some(b) = self.backend_req.lock().unwrap().as_ref() {
            if let Err(e) = b.handle_config_change() {
                tracing::debug!(port = %self.shared.name, "config change notification failed: {e}");
            }
        }
    }

    fn config_space(&self) -> [u8; 12] {
        self.shared.config_space()
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        2 * self.shared.queue_pairs as usize
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        offered_features(self.shared.queue_pairs)
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut p = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.shared.queue_pairs > 1 {
            p |= VhostUserProtocolFeatures::MQ;
        }
        p
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        c[start..end].to_vec()
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The data path reads memory through the same GuestMemoryAtomic, which the handler has
        // already updated; nothing is cached here.
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.backend_req.lock().unwrap() = Some(backend);
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[VringRwLock<GuestMem>],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Kicks are watched by the connection's handler (see handler.rs), not here.
        Ok(())
    }
}
