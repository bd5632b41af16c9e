//! `torii-perf`: Torii's perf regression runs. `perf/run` builds everything and runs it.
//!
//! ```text
//! torii-perf list                          the scenario groups, their peers and scenarios
//! torii-perf run [--quick] [--only net,blk] measure; results JSON (+ charts with --report)
//! torii-perf compare RESULTS               check against perf/baseline.json, non-zero on a regression
//! torii-perf baseline RESULTS...           make a baseline from full runs
//! torii-perf report RESULTS --out DIR      SVG charts and an HTML page, with the history
//! torii-perf import --group G FILE...      a results file from an older tool's own output
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use torii_perf::bench;
use torii_perf::regress::{self, compare, groups, report, results::Results};

#[derive(Parser, Debug)]
#[command(
    name = "torii-perf",
    version,
    about = "Torii's perf regression runs: every scenario against a peer in the same run"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The scenario groups, what they measure, their peers and scenario names.
    List,
    /// Measure. Groups run one after another, each against its peer in the same run.
    Run(RunArgs),
    /// Check a results file against the baseline; exits 1 naming each regression.
    Compare {
        results: PathBuf,
        #[arg(long, default_value = "perf/baseline.json")]
        baseline: PathBuf,
        /// A baseline scenario that was not measured fails the check too.
        #[arg(long)]
        require_all: bool,
    },
    /// Make a baseline from one or more full runs (the median of their ratios).
    Baseline {
        #[arg(required = true)]
        results: Vec<PathBuf>,
        #[arg(long, default_value = "perf/baseline.json")]
        out: PathBuf,
    },
    /// SVG charts and index.html of a results file, with the history of earlier full runs.
    /// With several files, later files' scenarios complete (or replace) the first's: a group
    /// measured again on its own joins the run it belongs to.
    Report {
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Folder of earlier results files (full runs) for the history charts.
        #[arg(long, default_value = "perf/history")]
        history: PathBuf,
        #[arg(long, default_value = "target/perf/report")]
        out: PathBuf,
    },
    /// A results file from one group tool's own JSON (e.g. an older perf/results/*.json).
    Import {
        #[arg(long)]
        group: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A smoke run: every scenario, briefly. The numbers show the scenarios work, not speed.
    #[arg(long)]
    quick: bool,
    /// Only these groups (see `list`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// All groups but these.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Where the built binaries are [default: target/release of the workspace].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The pod VM image folder (scripts/image).
    #[arg(long, default_value = "target/torii-image")]
    image: PathBuf,
    /// Cargo profile for the micro-benchmarks (`dev` reuses a test build).
    #[arg(long, default_value = "bench")]
    micro_profile: String,
    /// Results file [default: perf/history/DATE-REV.json for a full run,
    /// target/perf/quick.json for a quick one].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the charts and index.html to this folder.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Then compare with this baseline (exit 1 on a regression).
    #[arg(long)]
    baseline: Option<PathBuf>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("torii-perf: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn abs(root: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let root = bench::workspace_root();
    match cli.cmd {
        Cmd::List => {
            for g in &groups::GROUPS {
                println!(
                    "{}: {}\n  peer:  {}\n  full:  {}\n  quick: {}",
                    g.name, g.what, g.peer, g.full, g.quick
                );
                for s in (g.scenarios)() {
                    println!("    {s}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(a) => run(&root, a),
        Cmd::Compare {
            results,
            baseline,
            require_all,
        } => {
            let r = Results::load(&results)?;
            let b = compare::Baseline::load(&baseline)?;
            Ok(check(&r, &b, require_all))
        }
        Cmd::Baseline { results, out } => {
            let runs = results
                .iter()
                .map(|p| Results::load(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let b = compare::Baseline::from_runs(&runs)?;
            std::fs::write(&out, serde_json::to_string_pretty(&b)? + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}: {} scenarios from {} run(s)",
                out.display(),
                b.scenarios.len(),
                runs.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report {
            results,
            history,
            out,
        } => {
            let mut r = Results::load(&results[0])?;
            let mut h = load_history(&history, &r)?;
            for p in &results[1..] {
                let more = Results::load(p)?;
                h.retain(|x| x.started_unix != more.started_unix);
                r.merge(more);
            }
            let charts = report::write(&out, &r, &h)?;
            println!(
                "{}: index.html and {} charts ({} earlier runs in the history)",
                out.display(),
                charts.len(),
                h.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Import { group, files, out } => {
            let mut scenarios = Vec::new();
            let mut first: Option<serde_json::Value> = None;
            for f in &files {
                let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f)?)
                    .with_context(|| format!("{}: not JSON", f.display()))?;
                scenarios.extend(
                    groups::convert(&group, &raw).with_context(|| f.display().to_string())?,
                );
                first.get_or_insert(raw);
            }
            let raw = first.unwrap_or_default();
            let field = |k: &[&str]| {
                k.iter()
                    .find_map(|k| raw.get(*k).and_then(|v| v.as_str()).map(String::from))
            };
            let started = raw
                .get("started_unix")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let r = Results {
                tool: "torii-perf import".into(),
                schema: regress::results::SCHEMA,
                quick: false,
                date: field(&["date", "time", "when"]).unwrap_or_default(),
                started_unix: started,
                finished_unix: started,
                git_commit: field(&["git_commit", "commit"]),
                git_dirty: raw
                    .get("git_dirty")
                    .or(raw.get("dirty"))
                    .and_then(|v| v.as_bool()),
                machine: serde_json::from_value(raw.get("host").cloned().unwrap_or_default())
                    .unwrap_or_default(),
                command_line: vec![format!("imported from {group} tool output")],
                groups: Vec::new(),
                scenarios,
            };
            std::fs::write(&out, serde_json::to_string_pretty(&r)? + "\n")?;
            println!("{}: {} scenarios", out.display(), r.scenarios.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(r: &Results, b: &compare::Baseline, require_all: bool) -> ExitCode {
    let c = compare::compare(r, b);
    print!("{c}");
    if r.quick {
        println!("note: a --quick run: its ratios are not the full run's; expect noise");
    }
    if c.passed(require_all) {
        println!("no regression");
        ExitCode::SUCCESS
    } else {
        let names: Vec<&str> = c.regressions().iter().map(|l| l.id.as_str()).collect();
        if !names.is_empty() {
            println!("regressed: {}", names.join(", "));
        }
        if !c.failed_groups.is_empty() {
            println!("failed groups: {}", c.failed_groups.join(", "));
        }
        ExitCode::FAILURE
    }
}

/// Earlier full runs in `dir`, oldest first, without `current`.
fn load_history(dir: &Path, current: &Results) -> anyhow::Result<Vec<Results>> {
    let mut h = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(h);
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let r = Results::load(&p)?;
            if !r.quick && r.started_unix != current.started_unix {
                h.push(r);
            }
        }
    }
    h.sort_by_key(|r| r.started_unix);
    Ok(h)
}

fn run(root: &Path, a: RunArgs) -> anyhow::Result<ExitCode> {
    let mut names: Vec<&str> = groups::GROUPS.iter().map(|g| g.name).collect();
    for n in a.only.iter().chain(&a.skip) {
        groups::group(n)?;
    }
    if !a.only.is_empty() {
        names.retain(|n| a.only.iter().any(|o| o == n));
    }
    names.retain(|n| !a.skip.iter().any(|s| s == n));
    let ctx = groups::Ctx {
        root: root.to_path_buf(),
        bin_dir: abs(
            root,
            &a.bin_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("target/release")),
        ),
        image: abs(root, &a.image),
        quick: a.quick,
        micro_profile: a.micro_profile.clone(),
    };
    torii_perf::prereq::require_root()?;
    let r = regress::run(&ctx, &names, std::env::args().collect())?;
    let out = abs(
        root,
        &a.out.clone().unwrap_or_else(|| {
            if a.quick {
                PathBuf::from("target/perf/quick.json")
            } else {
                PathBuf::from(format!(
                    "perf/history/{}-{}.json",
                    r.date.replace(':', ""),
                    r.label()
                ))
            }
        }),
    );
    let value = serde_json::to_value(&r)?;
    bench::write_json(&out, root, &value)?;
    eprintln!("torii-perf: results in {}", out.display());
    // As written: paths inside the workspace made relative, for the report too.
    let r = Results::load(&out)?;
    if let Some(dir) = &a.report {
        let h = load_history(&root.join("perf/history"), &r)?;
        let charts = report::write(&abs(root, dir), &r, &h)?;
        eprintln!(
            "torii-perf: {} charts and index.html in {}",
            charts.len(),
            dir.display()
        );
    }
    let mut code = ExitCode::SUCCESS;
    if let Some(b) = &a.baseline {
        code = check(&r, &compare::Baseline::load(&abs(root, b))?, false);
    }
    if r.groups.iter().any(|g| !g.ok) {
        eprintln!(
            "torii-perf: failed groups: {}",
            r.groups
                .iter()
                .filter(|g| !g.ok)
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        code = ExitCode::FAILURE;
    }
    Ok(code)
}
