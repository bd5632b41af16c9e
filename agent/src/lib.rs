//! Torii's guest agent: runs inside the pod's VM (as PID 1 of its initramfs, or as a service)
//! and answers the host over a framed JSON RPC on any byte stream — virtio-serial here, vsock
//! or a hybrid vsock where the VMM has them. The protocol is in docs/agent-protocol.md.
//!
//! - [`protocol`]: frames, requests, answers; limits on what the host may send.
//! - [`server`]: one connection: requests handled concurrently, one writer.
//! - [`transport`]: the virtio-serial port (served connection after connection), Unix sockets.
//! - [`process`]: processes with streamed output, stdin, wait and signals; reaping as PID 1.
//! - [`net`]: the guest's interfaces, routes and neighbours, through rtnetlink.
//! - [`block`]: the host's disks, found by serial or PCI address, mounted.
//! - [`filesystems`]: kernel file systems and binds in containers' roots; unmounting trees.
//! - [`hugepages`]: the huge page pool and hugetlbfs.
//! - [`system`]: guest metrics.
//! - [`init`]: what PID 1 does first (mounts, kernel modules) and last (power off).
//! - [`mounts`]: mount(2), mount options, paths inside a root, and the mount table.

pub mod block;
pub mod filesystems;
/// The body and seeds of the `agent_frames` fuzz target (fuzz/).
#[cfg(any(test, feature = "test-support"))]
pub mod fuzzing;
pub mod hugepages;
pub mod init;
pub mod mounts;
pub mod net;
pub mod process;
pub mod protocol;
pub mod server;
pub mod system;
pub mod transport;
