//! Baselines and the regression check: a committed ratio (or absolute budget) per scenario
//! with its tolerance, and the verdict for a new results file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::results::{Better, Results, SCHEMA};
use super::stats;

/// One scenario's committed reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expect {
    /// The ratio to the peer (or, for an absolute scenario, the value) the baseline run had.
    pub value: f64,
    pub better: Better,
    /// How far `value` may move the wrong way before it is a regression, relative (0.15 =
    /// 15 %).
    pub tolerance: f64,
    /// `ratio` (to the peer in the same run) or `absolute`.
    pub kind: String,
}

/// The committed baseline (perf/baseline.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub schema: u32,
    /// Where the values come from: revisions, dates, and the command.
    pub source: Vec<String>,
    pub scenarios: BTreeMap<String, Expect>,
}

/// The tolerance a group gets when the baseline runs do not show more noise than this.
pub fn default_tolerance(group: &str) -> f64 {
    match group {
        // One PMD on a dedicated CPU against a peer in the same run: stable ratios.
        "switch" => 0.10,
        "net" | "dpdk" | "blk" => 0.15,
        "boot" | "micro" => 0.20,
        // Latencies of process launches, dominated by the kernel and the scheduler.
        "cni" | "shim" => 0.25,
        _ => 0.20,
    }
}

/// Largest tolerance a baseline gives: past it a comparison would say nothing.
pub const MAX_TOLERANCE: f64 = 0.5;

impl Baseline {
    /// A baseline from one or more full runs: each scenario's value is the median of its
    /// runs' values, and its tolerance is the group's default, widened to 1.5 times the
    /// largest relative distance of a run from that median when the runs disagree more.
    pub fn from_runs(runs: &[Results]) -> anyhow::Result<Baseline> {
        anyhow::ensure!(!runs.is_empty(), "no results to make a baseline from");
        if let Some(q) = runs.iter().find(|r| r.quick) {
            anyhow::bail!(
                "the run of {} is a --quick smoke run: a baseline needs full runs",
                q.date
            );
        }
        let mut values: BTreeMap<String, (Vec<f64>, Better, String, String)> = BTreeMap::new();
        for r in runs {
            for s in &r.scenarios {
                if let Some(v) = s.compared_value() {
                    let kind = if s.peer.is_some() {
                        "ratio"
                    } else {
                        "absolute"
                    };
                    values
                        .entry(s.id.clone())
                        .or_insert_with(|| (Vec::new(), s.better, kind.into(), s.group.clone()))
                        .0
                        .push(v);
                }
            }
        }
        let scenarios = values
            .into_iter()
            .filter_map(|(id, (v, better, kind, group))| {
                let value = stats::median(&v)?;
                let spread = v
                    .iter()
                    .map(|x| ((x - value) / value).abs())
                    .fold(0.0, f64::max);
                let tolerance = default_tolerance(&group)
                    .max(1.5 * spread)
                    .min(MAX_TOLERANCE);
                let tolerance = (tolerance * 100.0).round() / 100.0;
                Some((
                    id,
                    Expect {
                        value,
                        better,
                        tolerance,
                        kind,
                    },
                ))
            })
            .collect();
        Ok(Baseline {
            schema: SCHEMA,
            source: runs
                .iter()
                .map(|r| format!("{} at {} ({})", r.label(), r.date, r.command_line.join(" ")))
                .collect(),
            scenarios,
        })
    }

    pub fn load(path: &Path) -> anyhow::Result<Baseline> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let b: Baseline = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a torii-perf baseline", path.display()))?;
        anyhow::ensure!(
            b.schema == SCHEMA,
            "{}: baseline schema {}",
            path.display(),
            b.schema
        );
        Ok(b)
    }
}

/// The verdict for one scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Within tolerance.
    Ok,
    /// Better than the baseline by more than the tolerance (the baseline may be updated).
    Improved,
    /// Worse than the baseline by more than the tolerance.
    Regressed,
    /// In the baseline, not in the results (not run, or it failed).
    Missing,
    /// In the results, not in the baseline.
    New,
}

/// One line of a comparison.
#[derive(Debug, Clone)]
pub struct Line {
    pub id: String,
    pub verdict: Verdict,
    pub baseline: Option<f64>,
    pub current: Option<f64>,
    /// The worst acceptable value.
    pub limit: Option<f64>,
    pub kind: String,
}

/// A comparison of a results file against a baseline.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub lines: Vec<Line>,
    /// Groups whose tool failed in the run.
    pub failed_groups: Vec<String>,
}

/// Compares `results` with `baseline`.
pub fn compare(results: &Results, baseline: &Baseline) -> Comparison {
    let mut lines = Vec::new();
    for (id, e) in &baseline.scenarios {
        let current = results.scenario(id).and_then(|s| s.compared_value());
        let (limit, better_limit) = match e.better {
            Better::Higher => (e.value * (1.0 - e.tolerance), e.value * (1.0 + e.tolerance)),
            Better::Lower => (e.value * (1.0 + e.tolerance), e.value * (1.0 - e.tolerance)),
        };
        let verdict = match current {
            None => Verdict::Missing,
            Some(c) => match e.better {
                Better::Higher if c < limit => Verdict::Regressed,
                Better::Lower if c > limit => Verdict::Regressed,
                Better::Higher if c > better_limit => Verdict::Improved,
                Better::Lower if c < better_limit => Verdict::Improved,
                _ => Verdict::Ok,
            },
        };
        lines.push(Line {
            id: id.clone(),
            verdict,
            baseline: Some(e.value),
            current,
            limit: Some(limit),
            kind: e.kind.clone(),
        });
    }
    for s in &results.scenarios {
        if !baseline.scenarios.contains_key(&s.id) {
            lines.push(Line {
                id: s.id.clone(),
                verdict: Verdict::New,
                baseline: None,
                current: s.compared_value(),
                limit: None,
                kind: if s.peer.is_some() {
                    "ratio"
                } else {
                    "absolute"
                }
                .into(),
            });
        }
    }
    Comparison {
        lines,
        failed_groups: results
            .groups
            .iter()
            .filter(|g| !g.ok)
            .map(|g| g.name.clone())
            .collect(),
    }
}

impl Comparison {
    pub fn regressions(&self) -> Vec<&Line> {
        self.lines
            .iter()
            .filter(|l| l.verdict == Verdict::Regressed)
            .collect()
    }

    /// Whether the run passes: no regression and no failed group; with `require_all`, no
    /// baseline scenario missing either.
    pub fn passed(&self, require_all: bool) -> bool {
        self.regressions().is_empty()
            && self.failed_groups.is_empty()
            && (!require_all || self.lines.iter().all(|l| l.verdict != Verdict::Missing))
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.3}"))
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<34} {:>9} {:>9} {:>9}  verdict",
            "scenario", "baseline", "now", "limit"
        )?;
        for l in &self.lines {
            let verdict = match l.verdict {
                Verdict::Ok => "ok".to_string(),
                Verdict::Improved => "improved (consider updating the baseline)".into(),
                Verdict::Regressed => format!("REGRESSION ({})", l.kind),
                Verdict::Missing => "not measured".into(),
                Verdict::New => "new (not in the baseline)".into(),
            };
            writeln!(
                f,
                "{:<34} {:>9} {:>9} {:>9}  {verdict}",
                l.id,
                fmt_opt(l.baseline),
                fmt_opt(l.current),
                fmt_opt(l.limit)
            )?;
        }
        for g in &self.failed_groups {
            writeln!(f, "group {g}: its tool FAILED in this run")?;
        }
        Ok(())
    }
}
