//! `torii-switch-bench`: the L2 switch's forwarding rate with several port counts against a
//! cross-connect, interleaved and repeated. See [`torii_perf::switch_bench`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use torii_perf::bench;
use torii_perf::switch_bench::{self, Scenario};

/// Measure the switch against a cross-connect on one PMD (CPU 1). Needs root and 2 CPUs.
#[derive(Parser, Debug)]
#[command(name = "torii-switch-bench", version)]
struct Cli {
    /// Rounds; each runs every scenario once, in a rotating order.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pairs: u32,
    /// Per-second samples per run.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..))]
    secs: u32,
    /// Leading samples discarded as warm-up (must be < --secs).
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Switch port counts (even, 2..=512).
    #[arg(long, value_delimiter = ',', default_values_t = [2u16, 8, 32])]
    ports: Vec<u16>,
    /// Frame size (bytes without FCS).
    #[arg(long, default_value_t = 64)]
    size: u16,
    /// torii-dataplane binary [default: target/release/torii-dataplane].
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// Results file (JSON) [default: perf/results/switch-latest.json].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("torii-switch-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.warmup < cli.secs, "--warmup must be below --secs");
    anyhow::ensure!(
        cli.ports
            .iter()
            .all(|&n| (2..=512).contains(&n) && n % 2 == 0),
        "--ports: each count must be even and within 2..=512"
    );
    anyhow::ensure!(
        (60..=1518).contains(&cli.size),
        "--size must be within 60..=1518"
    );
    torii_perf::prereq::require_root()?;
    anyhow::ensure!(
        std::thread::available_parallelism().map_or(1, |n| n.get()) > switch_bench::PMD_CPU,
        "the PMD is pinned to CPU {}: this host has too few CPUs",
        switch_bench::PMD_CPU
    );
    let root = bench::workspace_root();
    let dataplane = match cli.dataplane {
        Some(p) => p,
        None => bench::find_dataplane(&root)?,
    };
    let out = cli.out.unwrap_or_else(|| switch_bench::default_out(&root));
    let mut scenarios = vec![Scenario::Xconnect];
    scenarios.extend(cli.ports.iter().map(|&n| Scenario::Switch(n)));
    let (commit, dirty) = bench::git_info(&root);
    let host = bench::host_info();
    println!(
        "torii-switch-bench: {} rounds x {} scenarios x {} s ({} warm-up), {} B; {} on {} CPUs; commit {}{}",
        cli.pairs,
        scenarios.len(),
        cli.secs,
        cli.warmup,
        cli.size,
        host.cpu_model,
        host.cpus,
        commit.as_deref().unwrap_or("?"),
        if dirty == Some(true) { " (dirty)" } else { "" }
    );
    let started = bench::unix_now();
    let mut runs = Vec::new();
    for pair in 0..cli.pairs {
        let k = scenarios.len();
        for j in 0..k {
            let s = scenarios[(j + pair as usize) % k];
            let r = switch_bench::run_one(&dataplane, s, cli.size, cli.secs, cli.warmup, pair)?;
            println!(
                "[round {}] {:<10} {:>7.2} Mpps  {:>5.0} cyc/pkt  [{}]",
                pair + 1,
                s.label(),
                r.mpps,
                r.cycles_per_packet,
                r.series
                    .iter()
                    .enumerate()
                    .map(|(i, v)| if i < cli.warmup as usize {
                        format!("({v:.2})")
                    } else {
                        format!("{v:.2}")
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            runs.push(r);
        }
    }
    let summary = switch_bench::summarize(&scenarios, &runs);
    print!("{}", switch_bench::summary_table(&summary));
    bench::write_json(
        &out,
        &root,
        &serde_json::json!({
            "tool": "torii-switch-bench",
            "command_line": std::env::args().collect::<Vec<_>>(),
            "date": bench::format_utc(started),
            "host": host,
            "git_commit": commit,
            "git_dirty": dirty,
            "method": {
                "ports": "source ports (generator + consumer); on the switch port i sends from MAC i to MAC i^1",
                "rate": "sum of all ports' tx_packets per second (stats file), median after warm-up",
                "placement": "one PMD, poll mode, CPU 1",
            },
            "summary": summary,
            "runs": runs,
        }),
    )?;
    println!("results: {}", out.display());
    Ok(())
}
