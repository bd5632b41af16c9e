//! `torii-blk-bench`: Torii's vhost-user-blk backend vs qemu-storage-daemon (same client,
//! same file) with fio io_uring on the file as the ceiling, interleaved and repeated. See
//! [`torii_perf::blk_bench`]; `perf/run-blk-bench` builds everything first.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use torii_perf::bench;
use torii_perf::blk_bench::{self, default_cases, Case, Subject, Target};
use torii_perf::blk_job::Pattern;

#[derive(Parser, Debug)]
#[command(name = "torii-blk-bench", version)]
struct Cli {
    /// Rounds; each runs Torii, qemu-storage-daemon (io_uring and threads) and fio once per
    /// (file, case), in a rotating order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 4.0)]
    runtime: f64,
    /// Size of each test file in MiB.
    #[arg(long, default_value_t = 1024)]
    file_mib: u64,
    /// Directory of the tmpfs file.
    #[arg(long, default_value = "/dev/shm")]
    tmpfs_dir: PathBuf,
    /// Directory of the disk file (opened with O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    disk_dir: PathBuf,
    /// Only the tmpfs file.
    #[arg(long, conflicts_with = "disk_only")]
    tmpfs_only: bool,
    /// Only the disk file.
    #[arg(long)]
    disk_only: bool,
    /// Who to measure: torii, qsd, qsd-threads, fio.
    #[arg(long, value_delimiter = ',', value_parser = parse_subject,
          default_values = ["torii", "qsd", "qsd-threads", "fio"])]
    subjects: Vec<Subject>,
    /// Cases, as pattern:bs:iodepth (e.g. randread:4096:32) [default: randread and randwrite
    /// 4k qd1 and qd32, read and write 128k qd8].
    #[arg(long, value_delimiter = ',', value_parser = parse_case)]
    cases: Vec<Case>,
    /// Extra arguments for torii-vhost-user-blk (repeat the option), e.g.
    /// --torii-arg=--poll-mode --torii-arg=event.
    #[arg(long, allow_hyphen_values = true)]
    torii_arg: Vec<String>,
    /// torii-vhost-user-blk binary [default: target/release/torii-vhost-user-blk].
    #[arg(long)]
    torii: Option<PathBuf>,
    /// Results file (JSON) [default: perf/results/blk-latest.json].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_subject(s: &str) -> Result<Subject, String> {
    Ok(match s {
        "torii" => Subject::Torii,
        "qsd" => Subject::Qsd,
        "qsd-threads" => Subject::QsdThreads,
        "fio" => Subject::Fio,
        _ => return Err(format!("unknown subject {s}")),
    })
}

fn parse_case(s: &str) -> Result<Case, String> {
    let mut it = s.split(':');
    let (Some(p), Some(bs), Some(qd), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(format!("{s}: want pattern:bs:iodepth"));
    };
    let pattern = Pattern::parse(p).ok_or_else(|| format!("unknown pattern {p}"))?;
    let bs = bs.parse().map_err(|_| format!("bad bs {bs}"))?;
    let iodepth = qd.parse().map_err(|_| format!("bad iodepth {qd}"))?;
    Ok(Case {
        pattern,
        bs,
        iodepth,
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("torii-blk-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = bench::workspace_root();
    let torii = cli
        .torii
        .clone()
        .unwrap_or_else(|| root.join("target/release/torii-vhost-user-blk"));
    anyhow::ensure!(
        torii.exists(),
        "{} not found: cargo build --release -p torii-vhost-user-blk (perf/run-blk-bench does)",
        torii.display()
    );
    // The tree as built, before anyone edits it during a long run.
    let (commit, dirty) = bench::git_info(&root);
    let runtime = Duration::from_secs_f64(cli.runtime);
    let work = torii_perf::proc_util::unique_tmp_dir("torii-blk-bench")?;
    let mut targets = Vec::new();
    if !cli.disk_only {
        targets.push(Target {
            name: "tmpfs".into(),
            path: cli
                .tmpfs_dir
                .join(format!("torii-blk-bench-{}.img", std::process::id())),
            direct: false,
        });
    }
    if !cli.tmpfs_only {
        targets.push(Target {
            name: "disk".into(),
            path: cli
                .disk_dir
                .join(format!("torii-blk-bench-{}.img", std::process::id())),
            direct: true,
        });
    }
    struct Cleanup(Vec<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _cleanup = Cleanup(targets.iter().map(|t| t.path.clone()).collect());
    for t in &targets {
        eprintln!("preparing {} ({} MiB)", t.path.display(), cli.file_mib);
        blk_bench::prepare_file(&t.path, cli.file_mib)?;
    }
    let subjects = cli.subjects.clone();
    anyhow::ensure!(!subjects.is_empty(), "--subjects: nothing to measure");
    let cases = if cli.cases.is_empty() {
        default_cases()
    } else {
        cli.cases.clone()
    };
    let mut samples = Vec::new();
    for round in 0..cli.rounds {
        for t in &targets {
            for &case in &cases {
                for k in 0..subjects.len() {
                    let who = subjects[(k + round as usize) % subjects.len()];
                    let s = blk_bench::run_one(
                        who,
                        case,
                        t,
                        runtime,
                        (&torii, &cli.torii_arg),
                        work.path(),
                        round,
                    )?;
                    eprintln!(
                        "round {round} {:<6} {:<18} {:<6?} {:>9.0} IOPS p50 {:>6.1} p99 {:>7.1} us",
                        s.target, s.case, s.subject, s.iops, s.p50_us, s.p99_us
                    );
                    samples.push(s);
                }
            }
        }
    }
    let rows = blk_bench::summarize(&samples);
    println!("{}", blk_bench::table(&rows));
    let out = cli
        .out
        .unwrap_or_else(|| root.join("perf/results/blk-latest.json"));
    let json = serde_json::json!({
        "bench": "torii-blk-bench",
        "time": bench::format_utc(bench::unix_now()),
        "commit": commit,
        "dirty": dirty,
        "host": bench::host_info(),
        "rounds": cli.rounds,
        "runtime_s": cli.runtime,
        "file_mib": cli.file_mib,
        "targets": targets,
        "summary": rows,
        "samples": samples,
    });
    bench::write_json(&out, &root, &json)?;
    eprintln!("results: {}", out.display());
    Ok(())
}
