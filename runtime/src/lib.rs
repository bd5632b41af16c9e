//! Torii's pod VM runtime: a sandbox spec becomes a running VM whose guest side the agent
//! configures.
//!
//! - [`spec`]: the sandbox spec (TOML/JSON) and its resolution (torii-cni pod network files,
//!   VFIO devices, guest PCI slots), checked whole before anything starts.
//! - [`vmm`]: the [`vmm::Hypervisor`] trait and the VMM process guard; [`qemu`] (command line,
//!   QMP), [`cloud_hypervisor`] and [`firecracker`] (REST API requests over [`http`]).
//! - [`agent`]: the client of torii-agent's protocol.
//! - [`pod`]: a pod VM from launch to teardown.
//! - [`image`]: the guest image builder (kernel + initramfs with torii-agent as init).

pub mod agent;
pub mod cloud_hypervisor;
pub mod firecracker;
pub mod http;
pub mod image;
pub mod pod;
pub mod qemu;
pub mod shim;
pub mod spec;
pub mod vmm;
