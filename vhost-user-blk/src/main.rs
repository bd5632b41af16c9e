//! `torii-vhost-user-blk`: exports raw image files or block devices as vhost-user-blk devices,
//! served by io_uring queue workers — one export from the command line, or any number from a
//! configuration file (`--config`, see `settings.rs`). Stops cleanly (sockets removed,
//! in-flight I/O completed) on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use torii_vhost_user::daemon::StopSignals;
use torii_vhost_user::{landlock, seccomp};
use torii_vhost_user_blk::{
    device, settings, stats, BlkExport, ExportConfig, PollMode, SocketMode,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Busy-poll rings and completions (one core per worker).
    Poll,
    /// Sleep until a guest kick or an I/O completion.
    Event,
    /// Poll while busy, sleep after --poll-us without work.
    Adaptive,
}

#[derive(Parser, Debug)]
#[command(version, about = "Torii vhost-user-blk backend (io_uring)")]
struct Args {
    /// Configuration file with any number of [[export]] sections (instead of the options
    /// below, which describe one export).
    #[arg(long, conflicts_with_all = ["socket", "file"])]
    config: Option<PathBuf>,
    /// vhost-user socket.
    #[arg(long, required_unless_present_any = ["config", "print_seccomp"])]
    socket: Option<PathBuf>,
    /// Connect to the socket (the frontend listens) instead of listening on it.
    #[arg(long)]
    client: bool,
    /// Raw image file or block device to export.
    #[arg(long, required_unless_present_any = ["config", "print_seccomp"])]
    file: Option<PathBuf>,
    /// Export read-only (writes, discards and write-zeroes fail with IOERR).
    #[arg(long)]
    read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// Number of virtqueues.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Queue worker threads, each with its own io_uring (at most --queues).
    #[arg(long, default_value_t = 1)]
    workers: u16,
    /// Logical block size in bytes.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Physical block size in bytes [default: the logical block size].
    #[arg(long)]
    physical_block_size: Option<u32>,
    /// Serial number returned by GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "torii")]
    serial: String,
    /// Start in write-through mode (every write durable on completion) instead of
    /// write-back; the guest driver can switch (CONFIG_WCE).
    #[arg(long)]
    writethrough: bool,
    #[arg(long, value_enum, default_value_t = Mode::Adaptive)]
    poll_mode: Mode,
    /// Adaptive mode: microseconds without work before a worker sleeps.
    #[arg(long, default_value_t = 200)]
    poll_us: u64,
    /// Name used in logs and metrics.
    #[arg(long, default_value = "blk0")]
    name: String,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Per-thread seccomp filters: enforce, log (the kernel logs what enforce would refuse)
    /// or off [default: the file's `seccomp`, else enforce].
    #[arg(long)]
    seccomp: Option<seccomp::Mode>,
    /// Print each thread class's seccomp allowlist and exit.
    #[arg(long)]
    print_seccomp: bool,
    /// Landlock file-system sandbox: off, or enforce (the daemon may then touch only its
    /// exports' images and socket directories, and --landlock-path) [default: the file's
    /// `landlock`, else off].
    #[arg(long)]
    landlock: Option<landlock::Mode>,
    /// A path the Landlock sandbox allows besides the exports' own (repeatable; added to
    /// the file's `landlock_paths`).
    #[arg(long = "landlock-path", value_name = "PATH")]
    landlock_paths: Vec<PathBuf>,
    /// Print the Landlock rules the exports (and --landlock-path) produce and exit.
    #[arg(long)]
    print_landlock: bool,
}

/// The exports and metrics address the command line asks for.
fn settings(a: Args) -> Result<settings::Settings, String> {
    if let Some(path) = &a.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut s = settings::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        s.metrics_listen = a.metrics_listen.or(s.metrics_listen);
        s.seccomp = a.seccomp.unwrap_or(s.seccomp);
        s.landlock = a.landlock.unwrap_or(s.landlock);
        s.landlock_paths.extend(a.landlock_paths);
        check_landlock_paths(&s.landlock_paths)?;
        return Ok(s);
    }
    let (Some(socket), Some(path)) = (a.socket, a.file) else {
        return Err("--socket and --file are needed without --config".into());
    };
    check_landlock_paths(&a.landlock_paths)?;
    Ok(settings::Settings {
        metrics_listen: a.metrics_listen,
        seccomp: a.seccomp.unwrap_or_default(),
        landlock: a.landlock.unwrap_or_default(),
        landlock_paths: a.landlock_paths,
        exports: vec![ExportConfig {
            name: a.name,
            socket,
            mode: if a.client {
                SocketMode::Client
            } else {
                SocketMode::Server
            },
            path,
            read_only: a.read_only,
            direct: a.direct,
            num_queues: a.queues,
            workers: a.workers,
            block_size: a.block_size,
            physical_block_size: a.physical_block_size.unwrap_or(a.block_size),
            serial: a.serial,
            writeback: !a.writethrough,
            poll: match a.poll_mode {
                Mode::Poll => PollMode::Poll,
                Mode::Event => PollMode::Event,
                Mode::Adaptive => PollMode::Adaptive(Duration::from_micros(a.poll_us)),
            },
            reconnect_interval: Duration::from_millis(500),
        }],
    })
}

fn check_landlock_paths(paths: &[PathBuf]) -> Result<(), String> {
    for p in paths {
        landlock::check_operator_path(p).map_err(|e| format!("landlock_paths: {e}"))?;
    }
    Ok(())
}

/// Restricts the process to what `s` needs, before any thread starts (so every thread
/// inherits it): the exports' images and socket directories and `landlock_paths`.
fn start_landlock(s: &settings::Settings) -> Result<(), String> {
    if s.landlock == landlock::Mode::Off {
        return Ok(());
    }
    let a = landlock::restrict(&s.landlock_rules(), settings::LANDLOCK_EXTEND)
        .map_err(|e| e.to_string())?;
    tracing::info!(landlock = %s.landlock, "file-system sandbox: {}", landlock::summary(&a));
    Ok(())
}

fn main() -> ExitCode {
    torii_vhost_user::daemon::init_logging();
    let args = Args::parse();
    if args.print_seccomp {
        print!("{}", seccomp::describe(seccomp::Options::blk()));
        return ExitCode::SUCCESS;
    }
    let print_landlock = args.print_landlock;
    let s = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("torii-vhost-user-blk: {e}");
            return ExitCode::FAILURE;
        }
    };
    if print_landlock {
        print!("{}", landlock::describe(&s.landlock_rules()));
        return ExitCode::SUCCESS;
    }
    // Block the stop signals before any thread starts, so that only `wait` below sees them.
    let signals = match StopSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("torii-vhost-user-blk: cannot block signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The file-system sandbox before any thread starts: every thread inherits it.
    if let Err(e) = start_landlock(&s) {
        eprintln!("torii-vhost-user-blk: {e}");
        return ExitCode::FAILURE;
    }
    // Every thread this one starts runs under the control filter and narrows it with its
    // own class.
    let filters = seccomp::init(s.seccomp, seccomp::Options::blk())
        .and_then(|()| seccomp::enter_process(seccomp::ThreadClass::Control));
    if let Err(e) = filters {
        eprintln!("torii-vhost-user-blk: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!(seccomp = %s.seccomp, "per-thread seccomp filters");
    // All or nothing: if one export fails, those already started are stopped (their sockets
    // removed) when `exports` is dropped.
    let mut exports = Vec::new();
    for cfg in s.exports {
        let (name, socket) = (cfg.name.clone(), cfg.socket.clone());
        match BlkExport::start(cfg) {
            Ok(e) => {
                tracing::info!(export = %name, socket = %socket.display(), "serving");
                exports.push(e);
            }
            Err(e) => {
                eprintln!("torii-vhost-user-blk: export {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(addr) = s.metrics_listen {
        let shared: Vec<_> = exports.iter().map(|e| e.shared().clone()).collect();
        let render = move || {
            let reports: Vec<_> = shared.iter().map(|s| device::report(s)).collect();
            stats::prometheus(&reports)
        };
        match torii_vhost_user::daemon::serve_metrics(addr, render) {
            Ok(bound) => tracing::info!(%bound, "metrics"),
            Err(e) => {
                eprintln!("torii-vhost-user-blk: cannot serve metrics on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let sig = signals.wait();
    tracing::info!(signal = sig, "stopping");
    for e in &mut exports {
        e.stop();
    }
    ExitCode::SUCCESS
}
