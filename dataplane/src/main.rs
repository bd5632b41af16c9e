//! `torii-dataplane`: runs the data plane described by a TOML file until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use torii_dataplane::config::Config;
use torii_dataplane::daemon::Dataplane;

#[derive(Parser)]
#[command(
    name = "torii-dataplane",
    version,
    about = "Torii poll-mode vhost-user data plane"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the data plane. SIGUSR1 prints the statistics; SIGINT/SIGTERM stop it.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TORII_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Check { config } => Config::load(&config)
            .map(|_| {
                println!("{}: ok", config.display());
            })
            .map_err(anyhow::Error::from),
        Cmd::Run { config } => run(config),
    };
    if let Err(e) = result {
        eprintln!("torii-dataplane: {e:#}");
        std::process::exit(1);
    }
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(&path)?;
    // Block the signals before any thread starts so only this thread takes them.
    let set = signal_set(&[libc::SIGINT, libc::SIGTERM, libc::SIGUSR1]);
    // SAFETY: `set` is a valid, initialised sigset_t.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let dp = Dataplane::start(&cfg)?;
    tracing::info!(config = %path.display(), "data plane running");
    loop {
        let sig = wait_signal(&set, Duration::from_secs(1));
        if let Some(f) = &cfg.dataplane.stats_file {
            let json = serde_json::to_string_pretty(&dp.report())?;
            let tmp = f.with_extension("tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, f);
            }
        }
        match sig {
            Some(libc::SIGUSR1) => print!("{}", dp.report().table()),
            Some(_) => break,
            None => {}
        }
    }
    let report = dp.report();
    dp.stop();
    print!("{}", report.table());
    Ok(())
}

fn signal_set(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data and sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: `set` is initialised and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}
