//! The quick mode of every torii-perf scenario group, end to end against the real peers
//! (dpdk-testpmd, qemu-storage-daemon, fio, host-local, QEMU guests, containerd, criterion).
//! The numbers are not speeds to assert (debug builds, a busy machine): each scenario must run
//! and give valid numbers — samples, a positive median, a ratio to its peer.

use std::path::{Path, PathBuf};
use std::process::Command;

use torii_perf::regress::groups;
use torii_perf::regress::results::Results;
use torii_perf::{heavy_test_lock, OrFail};

/// The binaries of this build: cargo builds every workspace binary for a workspace test run.
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_torii-perf"))
        .parent()
        .expect("target directory")
        .to_path_buf();
    for b in [
        "torii-dataplane",
        "torii-vhost-user-blk",
        "torii-cni",
        "toriictl",
        "containerd-shim-torii-v2",
    ] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: build the workspace first (cargo build --workspace --all-features, or run scripts/test)",
            dir.join(b).display()
        );
    }
    dir
}

fn quick(group: &str) {
    let _lock = heavy_test_lock();
    torii_perf::prereq::require_root().or_fail("prerequisite");
    let root = torii_perf::bench::workspace_root();
    let image = root.join("target/torii-image");
    if matches!(group, "boot" | "shim") {
        assert!(
            image.join("vmlinuz").is_file(),
            "{}: no pod VM image; build it with scripts/image (scripts/test does)",
            image.display()
        );
    }
    let tmp = torii_perf::proc_util::unique_tmp_dir("torii-perf-quick").or_fail("tmp dir");
    let out = tmp.join(format!("{group}.json"));
    let report = tmp.join("report");
    let status = Command::new(env!("CARGO_BIN_EXE_torii-perf"))
        .args([
            "run",
            "--quick",
            "--only",
            group,
            "--micro-profile",
            "dev",
            "--bin-dir",
        ])
        .arg(bin_dir())
        .arg("--image")
        .arg(&image)
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .current_dir(&root)
        .status()
        .or_fail("starting torii-perf");
    let r = Results::load(&out).or_fail("results");
    assert!(
        status.success(),
        "torii-perf run --quick --only {group}: {status}; groups: {:?}",
        r.groups
            .iter()
            .map(|g| (&g.name, &g.error))
            .collect::<Vec<_>>()
    );
    assert!(r.quick && r.git_commit.is_some() && r.machine.cpus > 0);
    let g = groups::group(group).or_fail("group");
    for id in (g.scenarios)() {
        let s = r.scenario(&id).unwrap_or_else(|| {
            panic!(
                "{id} was not measured; got {:?}",
                r.scenarios.iter().map(|s| &s.id).collect::<Vec<_>>()
            )
        });
        let bad = s.invalid();
        assert!(bad.is_empty(), "{bad:?}");
    }
    assert!(report.join("index.html").is_file(), "no report");
}

#[test]
fn quick_net() {
    quick("net");
}

#[test]
fn quick_dpdk() {
    quick("dpdk");
}

#[test]
fn quick_switch() {
    quick("switch");
}

#[test]
fn quick_blk() {
    quick("blk");
}

#[test]
fn quick_cni() {
    quick("cni");
}

#[test]
fn quick_boot() {
    quick("boot");
}

#[test]
fn quick_shim() {
    quick("shim");
}

#[test]
fn quick_micro() {
    quick("micro");
}
