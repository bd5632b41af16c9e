//! Torii's CNI plugin (CNI spec 1.1.0; 1.0.0 and 0.4.0 too), for telco Kubernetes (Multus
//! secondary networks) and plain CNI runtimes. Our own types: the published crates lack GC,
//! STATUS, `socketPath` and `pciID`.
//!
//! - [`config`]: the `CNI_*` environment and the network configuration, checked whole.
//! - [`types`]: errors with the spec's codes, results in each version's form.
//! - [`delegate`]: IPAM plugins run from `CNI_PATH`.
//! - [`state`]: per-attachment records, written atomically before anything is made.
//! - [`plugin`]: ADD, DEL, CHECK, STATUS, GC, VERSION; the `vhost-user` mode (a port on
//!   torii-dataplane through its control API).
//! - [`sriov`]: the `sriov` mode (a VF through torii-vfio: in the pod, or on vfio-pci).
//! - [`tap`]: the `tap` mode (a tap in the pod, tc-redirected to a veth on a host bridge).

pub mod config;
pub mod delegate;
/// The body and seeds of the `cni_input` fuzz target (fuzz/).
#[cfg(any(test, feature = "test-support"))]
pub mod fuzzing;
pub mod plugin;
pub mod sriov;
pub mod state;
pub mod tap;
pub mod types;
