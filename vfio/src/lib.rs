//! Torii's SR-IOV and VFIO library, used by the CNI plugin and the runtime, and its operator
//! CLI `torii-vfio`.
//!
//! - [`pci`]: the PCI model read from sysfs (under a configurable root, so tests use fake
//!   trees); [`select`]: device selectors as sriov-network-device-plugin spells them.
//! - [`sriov`]: creating and removing VFs; [`netlink`]: VF settings on the PF over rtnetlink,
//!   moving interfaces between network namespaces; [`state`]: a VF's whole state saved and
//!   restored.
//! - [`bind`]: vfio-pci binding, IOMMU group viability, the passthrough spec; [`device`]:
//!   VFIO access (regions, interrupts, BAR mapping, DMA).

pub mod alloc;
pub mod bind;
pub mod device;
pub mod netlink;
pub mod pci;
pub mod select;
pub mod sriov;
pub mod state;

#[cfg(any(test, feature = "test-support"))]
pub mod fake;
