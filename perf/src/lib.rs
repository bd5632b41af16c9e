//! Test and benchmark harness for Torii that drives **real** peers.
//!
//! * [`prereq`] — checks that make a test *fail* (never skip) with an
//!   actionable message when a prerequisite (root, QEMU, testpmd, hugepages,
//!   guest image) is missing.
//! * [`guest`] — boots a QEMU guest from the image built by `scripts/setup`
//!   and drives its serial-console shell (`run`, `run_ok`, `spawn_bg`, ...).
//! * [`testpmd`] — runs `dpdk-testpmd` as a vhost-user backend or a
//!   virtio-user frontend and parses its periodic and final statistics.
//! * [`proc_util`] — child-process guards, temporary directories and polling
//!   helpers shared by the above.
//! * [`bench`] — the `torii-bench` comparison of Torii against DPDK's vhost
//!   backend (run it with `perf/run-bench`).
//! * [`switch_bench`] — `torii-switch-bench`: the L2 switch's rate with 2, 8,
//!   32 ports against a cross-connect (`perf/run-switch-bench`).
//! * [`dpdk_bench`] — `torii-dpdk-bench`: Torii forwarding between a vhost-user and a DPDK
//!   memif port against dpdk-testpmd doing the same (`perf/run-dpdk-bench`).
//! * [`blk_client`], [`blk_job`] — a userspace virtio-blk driver over
//!   vhost-user (a VM without a VM) and fio-like jobs on it, with a verify
//!   mode: `torii-blk-client`, against any vhost-user-blk backend.
//! * [`blk_bench`] — `torii-blk-bench`: Torii's vhost-user-blk backend vs
//!   qemu-storage-daemon, same client and file, fio as the ceiling
//!   (`perf/run-blk-bench`).
//! * [`qsd`] — qemu-storage-daemon as the vhost-user-blk peer.
//!
//! Everything here is meant for tests running as root on a machine prepared
//! by `scripts/setup`. Set `TORII_KEEP_TMP=1` to keep temporary directories
//! (serial logs, testpmd logs, sockets) for post-mortem debugging.

pub mod bench;
pub mod blk_bench;
pub mod blk_client;
pub mod blk_job;
pub mod dpdk_bench;
pub mod fault;
pub mod guest;
pub mod prereq;
pub mod proc_util;
pub mod qsd;
pub mod regress;
pub mod sriov_rig;
pub mod svg;
pub mod switch_bench;
pub mod testpmd;

pub use guest::{ChardevMode, CmdOutput, Guest, GuestBuilder, GuestError};
pub use prereq::{GuestImage, PrereqError, QemuInfo};
pub use proc_util::{ChildGuard, ProcError, TmpDir};
pub use testpmd::{FinalStats, FwdMode, StatsSample, Testpmd, TestpmdBuilder, TestpmdError};

use std::sync::{Mutex, MutexGuard};

static HEAVY_LOCK: Mutex<()> = Mutex::new(());

/// Serialises CPU-heavy tests inside one test binary.
///
/// `cargo test` runs the tests of a binary on parallel threads; a TCG guest
/// and a pair of busy-polling testpmds competing for the same two cores make
/// both slow and flaky. Hold the returned guard for the duration of a test
/// that boots guests or runs testpmd. A poisoned lock (a previous test
/// panicked while holding it) is recovered transparently.
pub fn heavy_test_lock() -> MutexGuard<'static, ()> {
    HEAVY_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unwraps with the error's `Display`: the harness's errors carry the logs and install hints
/// that explain them, which a test failure should show.
pub trait OrFail<T> {
    fn or_fail(self, ctx: &str) -> T;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, ctx: &str) -> T {
        self.unwrap_or_else(|e| panic!("{ctx}: {e}"))
    }
}
