//! The virtio-net device model as vhost-user sees it: offered features, protocol features and
//! the config space (§5.1.3, §5.1.4). The protocol itself, guest memory and rings are
//! `torii-vhost-user`'s; sockets and connection lifetimes in `device.rs`; packets in
//! `queue.rs`.

use std::sync::atomic::{AtomicBool, Ordering};

use torii_vhost_user::{DeviceModel, ProtocolFeatures};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use torii_vhost_user::{GuestMem, MAX_QUEUE_SIZE};

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

/// The virtio-net device: what the driver is offered and reads in the config space.
pub struct NetModel {
    pub(crate) mac: [u8; 6],
    pub(crate) mtu: u16,
    pub(crate) queue_pairs: u16,
    pub(crate) link_up: AtomicBool,
}

impl NetModel {
    pub(crate) fn new(mac: [u8; 6], mtu: u16, queue_pairs: u16) -> Self {
        NetModel {
            mac,
            mtu,
            queue_pairs,
            link_up: AtomicBool::new(true),
        }
    }

    /// The virtio-net config space (§5.1.4): mac[6], status, max_virtqueue_pairs, mtu.
    pub(crate) fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up.load(Ordering::Acquire) {
            vn::VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }
}

impl DeviceModel for NetModel {
    fn num_queues(&self) -> usize {
        2 * self.queue_pairs as usize
    }

    fn features(&self) -> u64 {
        offered_features(self.queue_pairs)
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        let mut p = ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::BACKEND_REQ
            | ProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.queue_pairs > 1 {
            p |= ProtocolFeatures::MQ;
        }
        p
    }

    fn config(&self) -> Vec<u8> {
        self.config_space().to_vec()
    }

    fn set_config(&self, _offset: u32, _data: &[u8]) -> Result<(), &'static str> {
        Err("virtio-net config space is read-only (§5.1.4)")
    }
}
