//! Torii's poll-mode data plane. The data path reads top to bottom:
//! `port` (rx_burst) → `pmd` (cross-connect, or `switch`: VLAN, MAC learning, flooding;
//! offload fixups) → `port` (tx_burst); `packet` holds the preallocated buffers they pass
//! around; `ratelimit` bounds what a port may take in. `config` and `daemon` are the control
//! path.

pub mod api;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod gso;
pub mod offload;
pub mod packet;
pub mod pmd;
pub mod port;
pub mod ratelimit;
pub mod sandbox;
pub mod switch;
