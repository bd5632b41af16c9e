//! `torii-dpdk-bench`: Torii's vhost-user ⇄ DPDK memif cross-connect against dpdk-testpmd's
//! io forwarding between `net_vhost` and `net_memif`, interleaved and repeated. See
//! [`torii_perf::dpdk_bench`] for the method and `perf/run-dpdk-bench` for the wrapper that
//! builds everything first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use torii_perf::dpdk_bench::{self, Direction, DpdkRun, Forwarder, Options, Peers};
use torii_perf::{bench, prereq, proc_util};

/// Measure Torii forwarding between a vhost-user and a DPDK memif port against dpdk-testpmd
/// doing the same (forwarder on CPU 1, generator and sink on CPU 0). Needs root,
/// dpdk-testpmd, 2 CPUs, 768 free 2 MiB hugepages and torii-dataplane built with the `dpdk`
/// feature.
#[derive(Parser, Debug)]
#[command(name = "torii-dpdk-bench", version, args_override_self = true)]
struct Cli {
    /// Rounds; each runs both forwarders for every (direction, size), alternating which one
    /// goes first.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Per-second samples per run.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..))]
    secs: u32,
    /// Leading samples of a run discarded as warm-up (must be < --secs).
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Frame sizes: bytes without FCS, as testpmd's --txpkts.
    #[arg(long, value_delimiter = ',', default_values_t = [64u16, 512, 1518])]
    sizes: Vec<u16>,
    /// Directions to measure.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Direction::VhostToMemif, Direction::MemifToVhost])]
    directions: Vec<Direction>,
    /// How the generator and the sink run: `combined` is one testpmd on one lcore (null →
    /// generator port, sink port → null); `split` is a txonly and an rxonly testpmd, which on
    /// 2 CPUs take turns on CPU 0 and measure mostly the rings and the scheduler's time slice.
    #[arg(long, value_enum, default_value_t = Peers::Combined)]
    peers: Peers,
    /// A quick check: 1 round, 64 B only, 3 s per run, 1 warm-up sample.
    #[arg(long)]
    quick: bool,
    /// torii-dataplane binary, built with the `dpdk` feature [default:
    /// target/release/torii-dataplane of the workspace].
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// Another torii-dataplane build (with `dpdk`), measured too, interleaved, as
    /// `torii-baseline`: before/after comparisons in one run.
    #[arg(long)]
    baseline_dataplane: Option<PathBuf>,
    /// dpdk-testpmd binary [default: from PATH].
    #[arg(long)]
    testpmd: Option<PathBuf>,
    /// Results file (JSON) [default: perf/results/dpdk-latest.json of the workspace].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn check_prereqs(opts: &Options) -> anyhow::Result<()> {
    prereq::require_testpmd_bench(
        opts.testpmd.as_deref(),
        dpdk_bench::HUGEPAGES_NEEDED,
        "the forwarder to CPU 1 and the generator and sink to CPU 0",
    )?;
    check_dataplane(&opts.dataplane)
}

/// `torii-dataplane check` of the bench's configuration: refuses a build without DPDK.
fn check_dataplane(dataplane: &Path) -> anyhow::Result<()> {
    let tmp = proc_util::unique_tmp_dir("torii-dpdkb")?;
    let cfg = tmp.join("torii.toml");
    std::fs::write(&cfg, dpdk_bench::torii_config(tmp.path()))?;
    let out = std::process::Command::new(dataplane)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .with_context(|| format!("running {} check", dataplane.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} refuses the bench's configuration: {}\nbuild it with the dpdk feature: \
         cargo build --release -p torii-dataplane --features torii-dataplane/dpdk \
         (perf/run-dpdk-bench does)",
        dataplane.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

struct Meta {
    command_line: Vec<String>,
    started_unix: u64,
    host: bench::HostInfo,
    git_commit: Option<String>,
    git_dirty: Option<bool>,
}

fn results_json(
    meta: &Meta,
    opts: &Options,
    runs: &[DpdkRun],
    complete: bool,
) -> serde_json::Value {
    serde_json::json!({
        "tool": "torii-dpdk-bench",
        "command_line": meta.command_line,
        "date": bench::format_utc(meta.started_unix),
        "started_unix": meta.started_unix,
        "finished_unix": bench::unix_now(),
        "complete": complete,
        "host": meta.host,
        "git_commit": meta.git_commit,
        "git_dirty": meta.git_dirty,
        "options": opts,
        "method": {
            "forwarders": "torii: vhost-user port cross-connected to a dpdk port \
                           (net_memif, role=server); testpmd: io forwarding between \
                           net_vhost and net_memif (role=server)",
            "peers": {
                "ports": "virtio-user on the vhost-user socket, memif client on the memif socket",
                "combined": "one testpmd, one forwarding lcore, io forwarding over the chain \
                             net_null0 -> generator port -> (forwarder) -> sink port -> \
                             net_null0 (null makes the frames and frees them)",
                "split": "a txonly generator testpmd and an rxonly sink testpmd, both \
                          forwarding lcores on CPU 0 (they take turns)",
            },
            "measured_at": "the sink port's Rx-pps (testpmd periodic stats, 1 s), counted \
                            from the generator's start",
            "rate": "median of the per-second samples after the warm-up samples; summary: \
                     median over the rounds",
            "size": "frame bytes without FCS (testpmd --txpkts)",
            "placement": "forwarder on CPU 1 (Torii PMD in poll mode; testpmd forwarding \
                          lcore); the peers' forwarding lcores on CPU 0, their main lcores \
                          on CPU 1; Torii's DPDK threads and testpmd's main lcore on CPU 0",
        },
        "summary": dpdk_bench::summarize(opts, runs),
        "runs": runs,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TORII_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("torii-dpdk-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let mut cli = Cli::parse();
    if cli.quick {
        cli.rounds = 1;
        cli.sizes = vec![64];
        cli.secs = 3;
        cli.warmup = 1;
    }
    anyhow::ensure!(
        cli.warmup < cli.secs,
        "--warmup {} leaves no samples of --secs {}",
        cli.warmup,
        cli.secs
    );
    for &s in &cli.sizes {
        anyhow::ensure!(
            dpdk_bench::SIZE_RANGE.contains(&s),
            "frame size {s} is outside {}..={}",
            dpdk_bench::SIZE_RANGE.start(),
            dpdk_bench::SIZE_RANGE.end()
        );
    }
    let root = bench::workspace_root();
    let dataplane = match cli.dataplane {
        Some(p) => p,
        None => bench::find_dataplane(&root)?,
    };
    let out = cli.out.unwrap_or_else(|| dpdk_bench::default_out(&root));
    let opts = Options {
        rounds: cli.rounds,
        secs: cli.secs,
        warmup: cli.warmup,
        sizes: cli.sizes,
        directions: cli.directions,
        peers: cli.peers,
        dataplane,
        baseline: cli.baseline_dataplane,
        testpmd: cli.testpmd,
    };
    check_prereqs(&opts)?;
    bench::install_signal_handlers();

    let (git_commit, git_dirty) = bench::git_info(&root);
    let meta = Meta {
        command_line: std::env::args().collect(),
        started_unix: bench::unix_now(),
        host: bench::host_info(),
        git_commit,
        git_dirty,
    };
    let scenarios: Vec<(Direction, u16)> = opts
        .directions
        .iter()
        .flat_map(|&d| opts.sizes.iter().map(move |&s| (d, s)))
        .collect();
    let forwarders = if opts.baseline.is_some() { 3 } else { 2 };
    let total = scenarios.len() * opts.rounds as usize * forwarders;
    println!(
        "torii-dpdk-bench: {} rounds x {} (direction, size) x {forwarders} forwarders, {} s ({} warm-up) \
         each, {total} runs, {} peers; {} on {} CPUs, kernel {}; commit {}{}",
        opts.rounds,
        scenarios.len(),
        opts.secs,
        opts.warmup,
        opts.peers.as_str(),
        meta.host.cpu_model,
        meta.host.cpus,
        meta.host.kernel,
        meta.git_commit.as_deref().unwrap_or("?"),
        if meta.git_dirty == Some(true) {
            " (dirty)"
        } else {
            ""
        },
    );
    println!(
        "dataplane {}; results -> {}",
        opts.dataplane.display(),
        out.display()
    );
    println!("series: the sink's Mpps per second, warm-up samples in parentheses");

    let hugepages_baseline = bench::free_hugepages();
    let mut runs: Vec<DpdkRun> = Vec::new();
    'outer: for round in 0..opts.rounds {
        for (k, &(dir, size)) in scenarios.iter().enumerate() {
            let mut order = vec![Forwarder::Torii, Forwarder::Testpmd];
            if opts.baseline.is_some() {
                order.push(Forwarder::Baseline);
            }
            // Each forwarder goes first in turn.
            let len = order.len();
            order.rotate_left((round as usize + k) % len);
            for (i, f) in order.into_iter().enumerate() {
                if bench::interrupted() {
                    break 'outer;
                }
                let r = dpdk_bench::run_one(&opts, f, dir, size, round, i == 0, hugepages_baseline);
                println!(
                    "[{:>2}/{total}] {}",
                    runs.len() + 1,
                    dpdk_bench::run_line(&r)
                );
                for w in &r.warnings {
                    println!("        warning: {w}");
                }
                runs.push(r);
                bench::write_json(&out, &root, &results_json(&meta, &opts, &runs, false))?;
            }
        }
    }
    let interrupted = bench::interrupted();
    bench::write_json(
        &out,
        &root,
        &results_json(&meta, &opts, &runs, !interrupted),
    )?;
    println!();
    println!("median Mpps over the rounds (ok/total runs), min-max of the run rates:");
    println!();
    print!(
        "{}",
        dpdk_bench::summary_table(&dpdk_bench::summarize(&opts, &runs))
    );
    println!();
    println!("results: {}", out.display());
    if interrupted {
        eprintln!("torii-dpdk-bench: interrupted; partial results written");
        return Ok(ExitCode::from(130));
    }
    let failed = runs.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        println!(
            "{failed} of {} runs failed (see \"error\" and \"logs\" in the results)",
            runs.len()
        );
    }
    Ok(if failed == runs.len() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
