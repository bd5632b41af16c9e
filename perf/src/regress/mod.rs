//! `torii-perf`: the perf regression runs. Every scenario group is measured by its tool
//! (torii-bench, torii-blk-bench, ..., criterion) against a peer in the same run; the tools'
//! results become one file of [`Scenario`](results::Scenario)s (medians, extremes, the
//! per-sample series, ratios to the peer), which [`compare`] checks against the committed
//! baseline of ratios and [`report`] draws.

pub mod compare;
pub mod groups;
pub mod report;
pub mod results;
pub mod stats;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use groups::{Ctx, Step};
use results::{GroupRun, Machine, Results, SCHEMA};

/// Runs `names` (groups) one after another and gathers their scenarios. A group whose tool
/// fails is recorded as failed and the run goes on with the next.
pub fn run(ctx: &Ctx, names: &[&str], command_line: Vec<String>) -> anyhow::Result<Results> {
    let started_unix = crate::bench::unix_now();
    let (git_commit, git_dirty) = crate::bench::git_info(&ctx.root);
    let work = crate::proc_util::unique_tmp_dir("torii-perf").context("temporary directory")?;
    let t_all = Instant::now();
    let mut groups = Vec::new();
    let mut scenarios = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let g = groups::group(name)?;
        let mode = if ctx.quick { g.quick } else { g.full };
        eprintln!(
            "torii-perf [{}/{}] {name}: {} — {mode} (elapsed {:.0} s)",
            i + 1,
            names.len(),
            g.what,
            t_all.elapsed().as_secs_f64()
        );
        let out = work.path().join(format!("{name}.json"));
        let t0 = Instant::now();
        let steps = groups::step(name, ctx, &out)?;
        let command: Vec<String> = steps
            .iter()
            .flat_map(|s| {
                let mut c = s.command_line();
                c.push(";".into());
                c
            })
            .collect();
        let outcome = run_steps(&steps, &ctx.root)
            .and_then(|()| read_raw(name, &out))
            .and_then(|raw| Ok((groups::convert(name, &raw)?, raw)));
        let secs = t0.elapsed().as_secs_f64();
        match outcome {
            Ok((s, raw)) => {
                let ok = !s.is_empty();
                eprintln!(
                    "torii-perf [{}/{}] {name}: {} scenarios in {secs:.0} s",
                    i + 1,
                    names.len(),
                    s.len()
                );
                for sc in &s {
                    eprintln!("    {}", line(sc));
                }
                scenarios.extend(s);
                groups.push(GroupRun {
                    name: name.to_string(),
                    ok,
                    error: (!ok).then(|| "the tool produced no scenario".to_string()),
                    secs,
                    command,
                    raw: strip_raw(raw),
                });
            }
            Err(e) => {
                eprintln!(
                    "torii-perf [{}/{}] {name}: FAILED after {secs:.0} s: {e:#}",
                    i + 1,
                    names.len()
                );
                groups.push(GroupRun {
                    name: name.to_string(),
                    ok: false,
                    error: Some(format!("{e:#}")),
                    secs,
                    command,
                    raw: Value::Null,
                });
            }
        }
    }
    Ok(Results {
        tool: "torii-perf".into(),
        schema: SCHEMA,
        quick: ctx.quick,
        date: crate::bench::format_utc(started_unix),
        started_unix,
        finished_unix: crate::bench::unix_now(),
        git_commit,
        git_dirty,
        machine: Machine::probe(),
        command_line,
        groups,
        scenarios,
    })
}

/// One scenario in a line, for progress output.
pub fn line(s: &results::Scenario) -> String {
    let peer = s.peer.as_ref().map_or(String::new(), |p| {
        format!(
            " vs {} {:.4} → ratio {:.3}",
            p.name,
            p.summary.median,
            s.ratio.unwrap_or(f64::NAN)
        )
    });
    format!(
        "{:<30} {} {:.4} {} (min {:.4}, max {:.4}, n={}){peer}",
        s.id,
        s.subject.name,
        s.subject.summary.median,
        s.unit,
        s.subject.summary.min,
        s.subject.summary.max,
        s.subject.summary.samples.len()
    )
}

fn run_steps(steps: &[Step], root: &Path) -> anyhow::Result<()> {
    for s in steps {
        let status = Command::new(&s.program)
            .args(&s.args)
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .current_dir(root)
            .status()
            .with_context(|| format!("starting {}", s.program.display()))?;
        anyhow::ensure!(
            status.success(),
            "`{}` failed ({status})",
            s.command_line().join(" ")
        );
    }
    Ok(())
}

fn read_raw(group: &str, out: &Path) -> anyhow::Result<Value> {
    if group == "micro" {
        return criterion_raw(out);
    }
    let text = std::fs::read_to_string(out)
        .with_context(|| format!("the tool wrote no results to {}", out.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", out.display()))
}

/// The tools' files keep every run's logs and configuration; the summary here keeps what
/// explains the numbers (method, options, per-run values) and drops the bulk.
fn strip_raw(mut raw: Value) -> Value {
    if let Some(runs) = raw.get_mut("runs").and_then(Value::as_array_mut) {
        for r in runs {
            if let Some(o) = r.as_object_mut() {
                for k in [
                    "logs",
                    "backend_setup",
                    "forwarder_setup",
                    "frontend_args",
                    "peers",
                ] {
                    o.remove(k);
                }
            }
        }
    }
    raw
}

/// Collects criterion's per-sample times (`<group>/<function>/new/{benchmark,sample}.json`
/// under CRITERION_HOME) into `{benches: [{group, case, torii_ns, reference_ns}]}`.
pub fn criterion_raw(home: &Path) -> anyhow::Result<Value> {
    let mut found: std::collections::BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> =
        Default::default();
    for bench in walk(home, "benchmark.json") {
        if bench.parent().and_then(Path::file_name) != Some("new".as_ref()) {
            continue;
        }
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(&bench)?)?;
        let full = meta
            .get("full_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // "<group>/<torii|reference>/<case>"
        let parts: Vec<&str> = full.splitn(3, '/').collect();
        let [group, who, case] = parts[..] else {
            continue;
        };
        let sample: Value = serde_json::from_str(
            &std::fs::read_to_string(bench.with_file_name("sample.json"))
                .with_context(|| format!("sample.json next to {}", bench.display()))?,
        )?;
        let f = |k: &str| -> Vec<f64> {
            sample
                .get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let per_iter: Vec<f64> = f("times")
            .iter()
            .zip(f("iters"))
            .filter(|(_, n)| *n > 0.0)
            .map(|(t, n)| t / n)
            .collect();
        let e = found
            .entry((group.to_string(), case.to_string()))
            .or_default();
        match who {
            "torii" => e.0 = per_iter,
            "reference" => e.1 = per_iter,
            _ => {}
        }
    }
    anyhow::ensure!(
        !found.is_empty(),
        "criterion wrote no benchmark under {}",
        home.display()
    );
    Ok(json!({
        "tool": "criterion",
        "benches": found.into_iter().map(|((group, case), (t, r))| json!({
            "group": group, "case": case, "torii_ns": t, "reference_ns": r,
        })).collect::<Vec<_>>(),
    }))
}

fn walk(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p, name));
        } else if p.file_name() == Some(name.as_ref()) {
            out.push(p);
        }
    }
    out
}
