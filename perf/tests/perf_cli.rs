//! `torii-perf compare` and `baseline` as a CI job runs them: the exit status and the named
//! regression, on synthetic results files.

use std::process::Command;

use torii_perf::regress::results::{Better, Head, Machine, Results, Scenario, SCHEMA};
use torii_perf::OrFail;

fn results(torii: &[f64], peer: &[f64]) -> Results {
    let o = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
    let s = |id: &str, t: &[f64], p: &[f64]| {
        Scenario::paired(
            Head::new(id, "net", id, "Mpps", Better::Higher),
            ("torii", &o(t)),
            ("dpdk net_vhost", &o(p)),
        )
        .expect("samples")
    };
    Results {
        tool: "torii-perf".into(),
        schema: SCHEMA,
        quick: false,
        date: "2026-11-29T00:00:00Z".into(),
        started_unix: 1,
        finished_unix: 2,
        git_commit: Some("0000000".into()),
        git_dirty: Some(false),
        machine: Machine::default(),
        command_line: vec!["synthetic".into()],
        groups: Vec::new(),
        scenarios: vec![
            s("net.guest-tx.64", torii, peer),
            s("net.guest-rx.64", &[10.0, 10.5, 9.5], &[10.0, 10.0, 10.0]),
        ],
    }
}

fn torii_perf(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_torii-perf"))
        .args(args)
        .output()
        .or_fail("torii-perf");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn compare_exits_non_zero_naming_the_regression() {
    let tmp = torii_perf::proc_util::unique_tmp_dir("torii-perf-cli").or_fail("tmp");
    let write = |name: &str, r: &Results| {
        let p = tmp.join(name);
        std::fs::write(&p, serde_json::to_string(r).unwrap()).unwrap();
        p.display().to_string()
    };
    let base_run = write(
        "base.json",
        &results(&[19.0, 19.5, 5.5], &[18.5, 18.0, 18.8]),
    );
    let baseline = tmp.join("baseline.json").display().to_string();
    let (ok, out) = torii_perf(&["baseline", &base_run, "--out", &baseline]);
    assert!(ok, "{out}");

    // Noise: Torii 5 % down, the peer 3 % up.
    let noisy = write(
        "noisy.json",
        &results(&[18.0, 18.5, 5.0], &[19.0, 18.5, 19.4]),
    );
    let (ok, out) = torii_perf(&["compare", &noisy, "--baseline", &baseline, "--require-all"]);
    assert!(ok, "noise within tolerance must pass:\n{out}");
    assert!(out.contains("no regression"), "{out}");

    // A regression: Torii at 70 % of its ratio.
    let slow = write(
        "slow.json",
        &results(&[13.3, 13.6, 5.0], &[18.5, 18.0, 18.8]),
    );
    let (ok, out) = torii_perf(&["compare", &slow, "--baseline", &baseline]);
    assert!(!ok, "a 30 % regression must fail:\n{out}");
    assert!(out.contains("regressed: net.guest-tx.64"), "{out}");
    assert!(
        !out.contains("regressed: net.guest-tx.64, net.guest-rx.64"),
        "{out}"
    );

    // A broken file is an error, not a pass.
    let (ok, out) = torii_perf(&["compare", &baseline, "--baseline", &baseline]);
    assert!(
        !ok && out.contains("not a torii-perf results file"),
        "{out}"
    );
}

#[test]
fn list_names_every_group_and_scenario() {
    let (ok, out) = torii_perf(&["list"]);
    assert!(ok, "{out}");
    for id in [
        "net.loopback.1518",
        "blk.tmpfs.randwrite-4k-qd1",
        "cni.add.vhost-user",
        "boot.agent-ready",
        "micro.switch_lookup.1024",
        "shim.ctr-run",
        "dpdk.vhost-to-memif.64",
        "switch.ports-32",
    ] {
        assert!(out.contains(id), "{id} missing:\n{out}");
    }
}
