//! The regression check on synthetic runs: a real regression is caught and named, noise
//! within the tolerance is not, and the tools' own files convert into scenarios.

use serde_json::json;

use super::compare::{compare, Baseline, Verdict};
use super::groups;
use super::results::{Better, Head, Machine, Results, Scenario, SCHEMA};

fn scenario(id: &str, group: &str, better: Better, subject: &[f64], peer: &[f64]) -> Scenario {
    let o = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
    Scenario::paired(
        Head::new(id, group, id, "Mpps", better),
        ("torii", &o(subject)),
        ("peer", &o(peer)),
    )
    .expect("samples")
}

fn results(quick: bool, scenarios: Vec<Scenario>) -> Results {
    Results {
        tool: "torii-perf".into(),
        schema: SCHEMA,
        quick,
        date: "2026-11-29T00:00:00Z".into(),
        started_unix: 1,
        finished_unix: 2,
        git_commit: Some("abc1234".into()),
        git_dirty: Some(false),
        machine: Machine::default(),
        command_line: vec!["torii-perf".into(), "run".into()],
        groups: Vec::new(),
        scenarios,
    }
}

/// A run of the net group where Torii's medians are `scale` times the baseline's.
fn net_run(scale: f64, peer_scale: f64) -> Results {
    results(
        false,
        vec![
            scenario(
                "net.guest-tx.64",
                "net",
                Better::Higher,
                &[19.2 * scale, 5.5, 19.8 * scale],
                &[18.5 * peer_scale, 18.9 * peer_scale, 5.7],
            ),
            scenario(
                "blk.tmpfs.randread-4k-qd1.p99",
                "blk",
                Better::Lower,
                &[30.0, 31.0, 29.0],
                &[40.0, 41.0, 39.0],
            ),
        ],
    )
}

#[test]
fn a_synthetic_regression_is_caught_and_named() {
    let base = Baseline::from_runs(&[net_run(1.0, 1.0)]).unwrap();
    // Torii 25 % slower while the peer, measured in the same run, is not.
    let c = compare(&net_run(0.75, 1.0), &base);
    let reg: Vec<&str> = c.regressions().iter().map(|l| l.id.as_str()).collect();
    assert_eq!(reg, ["net.guest-tx.64"]);
    assert!(!c.passed(false));
    assert!(c.to_string().contains("net.guest-tx.64") && c.to_string().contains("REGRESSION"));
}

#[test]
fn noise_within_tolerance_passes() {
    let base = Baseline::from_runs(&[net_run(1.0, 1.0)]).unwrap();
    // A slower machine: both sides 40 % slower, the ratio is what it was.
    assert!(compare(&net_run(0.6, 0.6), &base).passed(true));
    // Torii 8 % down with a 15 % tolerance.
    let c = compare(&net_run(0.92, 1.0), &base);
    assert!(c.passed(true), "{c}");
    assert!(c.lines.iter().all(|l| l.verdict == Verdict::Ok));
}

#[test]
fn lower_is_better_regresses_upwards() {
    let base = Baseline::from_runs(&[net_run(1.0, 1.0)]).unwrap();
    let mut r = net_run(1.0, 1.0);
    r.scenarios[1] = scenario(
        "blk.tmpfs.randread-4k-qd1.p99",
        "blk",
        Better::Lower,
        &[40.0, 41.0, 39.0],
        &[40.0, 41.0, 39.0],
    );
    let c = compare(&r, &base);
    assert_eq!(c.regressions().len(), 1);
    assert_eq!(c.regressions()[0].id, "blk.tmpfs.randread-4k-qd1.p99");
    // Faster than the baseline by more than the tolerance: reported, not a failure.
    r.scenarios[1] = scenario(
        "blk.tmpfs.randread-4k-qd1.p99",
        "blk",
        Better::Lower,
        &[20.0],
        &[40.0],
    );
    let c = compare(&r, &base);
    assert!(c.passed(true));
    assert!(c.lines.iter().any(|l| l.verdict == Verdict::Improved));
}

#[test]
fn missing_new_and_failed_groups() {
    let base = Baseline::from_runs(&[net_run(1.0, 1.0)]).unwrap();
    let mut r = net_run(1.0, 1.0);
    r.scenarios.truncate(1);
    r.scenarios.push(scenario(
        "switch.ports-2",
        "switch",
        Better::Higher,
        &[100.0],
        &[120.0],
    ));
    let c = compare(&r, &base);
    assert!(c.passed(false));
    assert!(!c.passed(true), "a missing scenario fails --require-all");
    assert!(c
        .lines
        .iter()
        .any(|l| l.id == "switch.ports-2" && l.verdict == Verdict::New));
    r.groups.push(super::results::GroupRun {
        name: "blk".into(),
        ok: false,
        error: Some("qsd did not start".into()),
        secs: 1.0,
        command: Vec::new(),
        raw: serde_json::Value::Null,
    });
    assert!(
        !compare(&r, &base).passed(false),
        "a failed group fails the check"
    );
}

#[test]
fn baseline_tolerance_widens_with_observed_noise() {
    // Three runs whose ratios spread ±20 %: the 15 % default would flag the baseline's own
    // runs, so the tolerance grows to 1.5 × 20 %.
    let runs: Vec<Results> = [1.0, 1.2, 0.8].iter().map(|s| net_run(*s, 1.0)).collect();
    let b = Baseline::from_runs(&runs).unwrap();
    let e = &b.scenarios["net.guest-tx.64"];
    assert_eq!(e.tolerance, 0.3);
    for r in &runs {
        assert!(
            compare(r, &b).passed(true),
            "a baseline run must pass its own baseline"
        );
    }
    // Quiet runs keep the group default, and a quick run cannot be a baseline.
    let quiet = Baseline::from_runs(&[net_run(1.0, 1.0), net_run(1.01, 1.0)]).unwrap();
    assert_eq!(quiet.scenarios["net.guest-tx.64"].tolerance, 0.15);
    assert!(Baseline::from_runs(&[results(true, Vec::new())]).is_err());
}

#[test]
fn absolute_scenarios_compare_their_value() {
    let o = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
    let rss = |kib: f64| {
        Scenario::paired(
            Head::new("boot.agent-rss", "boot", "rss", "KiB", Better::Lower),
            ("torii-agent", &o(&[kib])),
            ("", &[]),
        )
        .unwrap()
    };
    let b = Baseline::from_runs(&[results(false, vec![rss(1920.0)])]).unwrap();
    assert_eq!(b.scenarios["boot.agent-rss"].kind, "absolute");
    assert!(compare(&results(false, vec![rss(2000.0)]), &b).passed(true));
    assert!(!compare(&results(false, vec![rss(2600.0)]), &b).passed(true));
}

#[test]
fn net_tool_output_converts_with_paired_rounds() {
    let run = |backend: &str, pair: u64, mpps: f64, ok: bool| json!({"backend": backend, "path": "guest-tx", "size": 64, "pair": pair, "mpps": mpps, "ok": ok, "error": if ok { serde_json::Value::Null } else { json!("boom") }});
    let raw = json!({"runs": [
        run("torii", 0, 19.0, true), run("dpdk", 0, 18.0, true),
        run("dpdk", 1, 5.0, true), run("torii", 1, 5.5, true),
        run("torii", 2, 0.0, false), run("dpdk", 2, 18.5, true),
    ]});
    let s = groups::convert("net", &raw).unwrap();
    assert_eq!(s.len(), 1);
    let s = &s[0];
    assert_eq!(s.id, "net.guest-tx.64");
    assert_eq!(
        s.subject.summary.samples,
        vec![19.0, 5.5],
        "the failed run is left out"
    );
    assert_eq!(s.peer.as_ref().unwrap().summary.median, 18.0);
    assert_eq!(s.ratio_series.len(), 2);
    assert!((s.ratio.unwrap() - 12.25 / 18.0).abs() < 1e-9);
    assert!(s.invalid().is_empty());
}

#[test]
fn blk_tool_output_gives_iops_latency_and_cdfs() {
    let sample = |subject: &str, round: u64, iops: f64, p99: f64| {
        json!({"target": "tmpfs", "case": "randread 4k qd1", "subject": subject, "round": round, "iops": iops, "p99_us": p99,
               "lat_cdf_us": [[50.0, p99 / 2.0], [99.0, p99]]})
    };
    let raw = json!({"samples": [
        sample("torii", 0, 30000.0, 40.0), sample("qsd", 0, 20000.0, 60.0), sample("fio", 0, 35000.0, 30.0),
    ]});
    let s = groups::convert("blk", &raw).unwrap();
    let ids: Vec<&str> = s.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        ["blk.tmpfs.randread-4k-qd1", "blk.tmpfs.randread-4k-qd1.p99"]
    );
    assert_eq!(s[0].extra[0].name, "fio io_uring (ceiling)");
    assert_eq!(s[0].ratio, Some(1.5));
    assert_eq!(s[1].better, Better::Lower);
    assert_eq!(s[1].cdf.len(), 3);
    assert_eq!(s[1].cdf[0].points, vec![(15.0, 50.0), (30.0, 99.0)]);
}

#[test]
fn every_listed_group_has_steps_and_a_converter() {
    let ctx = groups::Ctx {
        root: "/r".into(),
        bin_dir: "/r/target/release".into(),
        image: "/r/target/torii-image".into(),
        quick: true,
        micro_profile: "dev".into(),
    };
    for g in &groups::GROUPS {
        let steps = groups::step(g.name, &ctx, std::path::Path::new("/tmp/x.json")).unwrap();
        assert!(!steps.is_empty(), "{}", g.name);
        assert!(!(g.scenarios)().is_empty(), "{}", g.name);
        // A converter exists (it refuses an empty file with a message, not a panic).
        assert!(groups::convert(g.name, &json!({})).is_err(), "{}", g.name);
    }
    assert!(groups::step("nope", &ctx, std::path::Path::new("/tmp/x")).is_err());
    let line = |g: &str, ctx: &groups::Ctx| {
        groups::step(g, ctx, std::path::Path::new("/o.json")).unwrap()[0]
            .command_line()
            .join(" ")
    };
    assert_eq!(
        line("net", &ctx),
        "/r/target/release/torii-bench --paths=guest-tx,guest-rx,loopback --sizes=64,512,1518 \
         --pairs 1 --secs 2 --warmup 1 --dataplane /r/target/release/torii-dataplane --out /o.json"
    );
    let full = groups::Ctx {
        quick: false,
        ..ctx
    };
    assert!(line("dpdk", &full).contains(" --rounds 3 --secs 6 --warmup 2 "));
}
