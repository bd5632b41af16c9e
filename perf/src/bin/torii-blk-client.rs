//! `torii-blk-client`: fio-like jobs against any vhost-user-blk backend socket, through
//! Torii's userspace virtio-blk driver (no VM). Prints a summary line and, with --json, the
//! report as JSON. Exits non-zero if a request failed or (verify, check) data read back
//! wrong.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use torii_perf::blk_job::{run_spec, Pattern, RunSpec};

#[derive(Parser, Debug)]
#[command(name = "torii-blk-client", version)]
struct Cli {
    /// vhost-user-blk socket of the backend.
    #[arg(long)]
    socket: PathBuf,
    /// randread, randwrite, read, write, verify (write a pattern, read it back) or check (read
    /// back a pattern written earlier with the same seed).
    #[arg(long, default_value = "randread", value_parser = parse_pattern)]
    rw: Pattern,
    /// Bytes per request.
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// Requests in flight per job.
    #[arg(long, default_value_t = 32)]
    iodepth: u16,
    /// Jobs, one queue and one thread each.
    #[arg(long, default_value_t = 1)]
    numjobs: u16,
    /// Seconds to run (timed patterns).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Bytes of the device to use, from its start (0: all); K, M, G suffixes.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    size: u64,
    /// Seed of the offsets and the verify data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Descriptors per queue.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Data descriptors per request; more than one sends each request as an indirect table
    /// with the data buffer cut in that many pieces (scatter-gather, as a guest does).
    #[arg(long, default_value_t = 1)]
    segments: u16,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    Pattern::parse(s).ok_or_else(|| format!("unknown pattern {s}"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s}"))
}

fn main() -> ExitCode {
    let c = Cli::parse();
    let spec = RunSpec {
        pattern: c.rw,
        bs: c.bs,
        iodepth: c.iodepth,
        numjobs: c.numjobs,
        runtime: Duration::from_secs_f64(c.runtime),
        size: c.size,
        seed: c.seed,
        queue_size: c.queue_size,
        segments: c.segments,
    };
    let r = match run_spec(&c.socket, &spec) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("torii-blk-client: {e}");
            return ExitCode::FAILURE;
        }
    };
    if c.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        println!(
            "{:?} bs={} qd={} jobs={}: {:.0} IOPS {:.1} MB/s lat p50 {:.1} p99 {:.1} p99.9 {:.1} us, {} ios, {} errors, {} mismatches",
            r.pattern, r.bs, r.iodepth, r.numjobs, r.iops, r.mbps, r.lat_p50_us, r.lat_p99_us,
            r.lat_p999_us, r.ios, r.errors, r.mismatches
        );
    }
    if r.errors > 0 || r.mismatches > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
