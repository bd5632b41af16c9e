//! `torii-vhost-user-blk`: exports a raw image file or block device as a vhost-user-blk
//! device, served by io_uring queue workers. Stops cleanly (socket removed, in-flight I/O
//! completed) on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use torii_vhost_user::daemon::StopSignals;
use torii_vhost_user_blk::{device, stats, BlkExport, ExportConfig, PollMode, SocketMode};

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
    /// vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Connect to the socket (the frontend listens) instead of listening on it.
    #[arg(long)]
    client: bool,
    /// Raw image file or block device to export.
    #[arg(long)]
    file: PathBuf,
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
}

fn main() -> std::process::ExitCode {
    torii_vhost_user::daemon::init_logging();
    let a = Args::parse();
    // Block the stop signals before any thread starts, so that only `wait` below sees them.
    let signals = match StopSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("torii-vhost-user-blk: cannot block signals: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cfg = ExportConfig {
        name: a.name,
        socket: a.socket,
        mode: if a.client {
            SocketMode::Client
        } else {
            SocketMode::Server
        },
        path: a.file,
        read_only: a.read_only,
        direct: a.direct,
        num_queues: a.queues,
        workers: a.workers,
        block_size: a.block_size,
        serial: a.serial,
        writeback: !a.writethrough,
        poll: match a.poll_mode {
            Mode::Poll => PollMode::Poll,
            Mode::Event => PollMode::Event,
            Mode::Adaptive => PollMode::Adaptive(Duration::from_micros(a.poll_us)),
        },
        reconnect_interval: Duration::from_millis(500),
    };
    let socket = cfg.socket.clone();
    let mut export = match BlkExport::start(cfg) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("torii-vhost-user-blk: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(addr) = a.metrics_listen {
        let shared = export.shared().clone();
        let render = move || stats::prometheus(&[device::report(&shared)]);
        match torii_vhost_user::daemon::serve_metrics(addr, render) {
            Ok(bound) => tracing::info!(%bound, "metrics"),
            Err(e) => {
                eprintln!("torii-vhost-user-blk: cannot serve metrics on {addr}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    tracing::info!(socket = %socket.display(), "serving");
    let sig = signals.wait();
    tracing::info!(signal = sig, "stopping");
    export.stop();
    std::process::ExitCode::SUCCESS
}
