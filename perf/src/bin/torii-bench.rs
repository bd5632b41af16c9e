//! `torii-bench`: Torii vs DPDK's vhost backend (`dpdk-testpmd` `net_vhost`),
//! both driven by the same `dpdk-testpmd` `net_virtio_user` frontend,
//! interleaved and repeated. See [`torii_perf::bench`] for the method and
//! `perf/run-bench` for the wrapper that builds everything first.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use torii_perf::bench::{self, Backend, BenchOptions, Direction, RunResult};
use torii_perf::prereq;

/// Compare Torii with DPDK's vhost-user backend through the same virtio-user
/// frontend: guest-tx, guest-rx and loopback (guest A to guest B through the
/// backend). Needs root, dpdk-testpmd, 2 CPUs and 512 free 2 MiB hugepages.
#[derive(Parser, Debug)]
#[command(name = "torii-bench", version, args_override_self = true)]
struct Cli {
    /// Pairs of runs (one per backend, alternating which goes first) per
    /// (path, size).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pairs: u32,
    /// Per-second samples per run (≈ run length in seconds).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..))]
    secs: u32,
    /// Leading samples of a run discarded as warm-up (must be < --secs).
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Packet sizes: frame bytes without FCS, as testpmd's --txpkts.
    #[arg(long, value_delimiter = ',', default_values_t = [64u16, 512, 1518])]
    sizes: Vec<u16>,
    /// Paths to measure.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Direction::GuestTx, Direction::GuestRx, Direction::Loopback])]
    paths: Vec<Direction>,
    /// torii-dataplane binary [default: target/release/torii-dataplane of
    /// the workspace].
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// dpdk-testpmd binary [default: from PATH].
    #[arg(long)]
    testpmd: Option<PathBuf>,
    /// Results file (JSON) [default: perf/results/latest.json of the
    /// workspace].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn check_prereqs(opts: &BenchOptions) -> anyhow::Result<()> {
    prereq::require_testpmd_bench(
        opts.testpmd.as_deref(),
        bench::HUGEPAGES_NEEDED,
        "the backend to CPU 1 and the frontend to CPU 0",
    )?;
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
    opts: &BenchOptions,
    runs: &[RunResult],
    complete: bool,
) -> serde_json::Value {
    let summary = bench::summarize(opts, runs);
    serde_json::json!({
        "tool": "torii-bench",
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
            "measured_at": "frontend testpmd periodic stats: Tx-pps of the txonly frontend \
                            (guest-tx), Rx-pps of the rxonly frontend (guest-rx), Rx-pps of \
                            port 2 (virtio-user B) of the loopback frontend (loopback: the \
                            A-to-B rate only)",
            "rate": "median of the per-second samples after the warm-up samples",
            "size": "frame bytes without FCS (testpmd --txpkts; Torii source frame_size)",
            "gbps": "pps * size * 8 / 1e9",
            "placement": "backend busy-poller on CPU 1, frontend forwarding lcore on CPU 0",
            "frontend_vdev": "net_virtio_user,queues=1,mrg_rxbuf=0,in_order=1",
            "loopback": "VM to VM through the backend. Frontend: one testpmd, one forwarding \
                         lcore, io forwarding, --port-topology=chained over net_null0 (port 0, \
                         its receive makes size-byte frames), virtio-user A (port 1) and \
                         virtio-user B (port 2): null -> A tx (into the backend), B rx -> null \
                         tx (freed); A rx -> B tx carries nothing, as no backend sends to A. \
                         Backend: Torii with vhost-user ports vhu0 (A) and vhu1 (B) \
                         cross-connected, or testpmd with net_vhost0 (A) and net_vhost1 (B) in \
                         io forwarding (paired). frontend_final sums the frontend's three ports \
                         (its rx includes the null port's generated frames).",
        },
        "summary": summary,
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
            eprintln!("torii-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.warmup < cli.secs,
        "--warmup {} leaves no samples of --secs {}",
        cli.warmup,
        cli.secs
    );
    for &s in &cli.sizes {
        anyhow::ensure!(
            bench::SIZE_RANGE.contains(&s),
            "packet size {s} is outside {}..={}",
            bench::SIZE_RANGE.start(),
            bench::SIZE_RANGE.end()
        );
    }
    let root = bench::workspace_root();
    let dataplane = match cli.dataplane {
        Some(p) => p,
        None => bench::find_dataplane(&root)?,
    };
    anyhow::ensure!(
        prereq::find_binary(&dataplane.display().to_string()).is_some(),
        "--dataplane {} is not an executable; build it with: cargo build --release -p torii-dataplane",
        dataplane.display()
    );
    let out = cli
        .out
        .unwrap_or_else(|| root.join("perf/results/latest.json"));
    let opts = BenchOptions {
        pairs: cli.pairs,
        secs: cli.secs,
        warmup: cli.warmup,
        sizes: cli.sizes,
        paths: cli.paths,
        dataplane,
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
    let total = opts.paths.len() * opts.sizes.len() * opts.pairs as usize * 2;
    println!(
        "torii-bench: {} pairs x {} s ({} warm-up) per (path, size), {total} runs; \
         {} on {} CPUs, kernel {}; commit {}{}",
        opts.pairs,
        opts.secs,
        opts.warmup,
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
    println!("series: frontend Mpps per second, warm-up samples in parentheses");

    let hugepages_baseline = bench::free_hugepages();
    let mut runs: Vec<RunResult> = Vec::new();
    'outer: for &dir in &opts.paths {
        for &size in &opts.sizes {
            for pair in 0..opts.pairs {
                let order = if pair % 2 == 0 {
                    [Backend::Torii, Backend::Dpdk]
                } else {
                    [Backend::Dpdk, Backend::Torii]
                };
                for (i, backend) in order.into_iter().enumerate() {
                    if bench::interrupted() {
                        break 'outer;
                    }
                    let r =
                        bench::run_one(&opts, backend, dir, size, pair, i == 0, hugepages_baseline);
                    println!("[{:>2}/{total}] {}", runs.len() + 1, bench::run_line(&r));
                    for w in &r.warnings {
                        println!("        warning: {w}");
                    }
                    runs.push(r);
                    bench::write_json(&out, &root, &results_json(&meta, &opts, &runs, false))?;
                }
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
    println!("median Mpps per backend (ok/total runs), Gbps of the median, min-max Mpps:");
    print!("{}", bench::summary_table(&bench::summarize(&opts, &runs)));
    println!("results: {}", out.display());
    if interrupted {
        eprintln!("torii-bench: interrupted; partial results written");
        return Ok(ExitCode::from(130));
    }
    let failed = runs.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        println!(
            "{failed} of {} runs failed (see \"error\" in the results)",
            runs.len()
        );
    }
    Ok(if failed == runs.len() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
