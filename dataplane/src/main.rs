//! `torii-dataplane`: runs the data plane described by a TOML file until SIGINT/SIGTERM, serving
//! the control API on a Unix socket; `ctl` is the API's command-line client.

use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use torii_dataplane::api;
use torii_dataplane::config::Config;
use torii_dataplane::ctl::{self, CtlCmd};
use torii_dataplane::daemon::Dataplane;
use torii_vhost_user::seccomp;

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
    /// Print the seccomp allowlist of each thread class (docs/security.md).
    Seccomp,
    /// Talk to a running data plane through its control API.
    Ctl {
        /// The daemon's control socket.
        #[arg(short, long, default_value = ctl::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the API's JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
}

fn main() {
    torii_vhost_user::daemon::init_logging();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Check { config } => Config::load(&config)
            .map(|_| {
                println!("{}: ok", config.display());
            })
            .map_err(anyhow::Error::from),
        Cmd::Run { config } => run(config),
        Cmd::Seccomp => {
            print!("{}", seccomp::describe(seccomp_options()));
            Ok(())
        }
        Cmd::Ctl { socket, json, cmd } => ctl::run(&socket, json, cmd),
    };
    if let Err(e) = result {
        eprintln!("torii-dataplane: {e:#}");
        std::process::exit(1);
    }
}

/// Binds the control socket: refuses one a live daemon answers on and a directory others can
/// write (`sockdir`), replaces a stale one, and leaves it readable and writable by owner and
/// group only.
fn bind_control(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "control socket {} is in use by another daemon",
            path.display()
        );
    }
    // Whoever could write the socket's directory could stand in for the API.
    torii_vhost_user::sockdir::prepare(path)?;
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// What the seccomp lists can cover in this build (the lists `seccomp` prints).
fn seccomp_options() -> seccomp::Options {
    seccomp::Options::dataplane(cfg!(feature = "dpdk"))
}

/// Sets the seccomp mode for every thread and installs the control class's filter on the
/// whole process, before any other thread of Torii's starts (each then narrows it with its
/// own class). DPDK, if the configuration uses it, is initialised first: its initialisation
/// loads drivers and maps memory in ways no filter allows later (its threads get the filter
/// with the rest of the process).
fn start_seccomp(cfg: &Config) -> anyhow::Result<()> {
    use torii_dataplane::config::PortKind;
    let mode = cfg.dataplane.seccomp;
    let uses_dpdk = cfg!(feature = "dpdk")
        && (cfg.dpdk.is_some()
            || cfg
                .ports
                .iter()
                .any(|p| matches!(p.kind, PortKind::Dpdk(_))));
    // DPDK's drivers need more of the control thread (any ioctl, bpf, packet sockets): only
    // when this configuration uses DPDK.
    seccomp::init(mode, seccomp::Options::dataplane(uses_dpdk))?;
    #[cfg(feature = "dpdk")]
    {
        if mode != seccomp::Mode::Off && uses_dpdk {
            torii_dataplane::port::dpdk::eal::init(&cfg.dpdk.clone().unwrap_or_default())
                .map_err(anyhow::Error::msg)?;
        }
    }
    seccomp::enter_process(seccomp::ThreadClass::Control)?;
    tracing::info!(seccomp = %mode, "per-thread seccomp filters");
    Ok(())
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(&path)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg, path))
}

async fn serve(cfg: Config, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term, mut usr1) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
        signal(SignalKind::user_defined1())?,
    );
    // The socket before the ports: a second daemon on the same socket fails without touching
    // the first one's ports.
    let control = bind_control(&cfg.dataplane.control_socket)?;
    let metrics = match cfg.dataplane.metrics_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| {
            // Nothing of this daemon is left: its control socket goes too.
            let _ = std::fs::remove_file(&cfg.dataplane.control_socket);
            let e = torii_vhost_user::daemon::bind_error(a, e);
            anyhow::anyhow!("metrics_listen {a}: {e}")
        })?),
        None => None,
    };
    let dp = match start_seccomp(&cfg).and_then(|()| Dataplane::start(&cfg)) {
        Ok(d) => Arc::new(Mutex::new(d)),
        Err(e) => {
            let _ = std::fs::remove_file(&cfg.dataplane.control_socket);
            return Err(e);
        }
    };
    tokio::spawn(axum::serve(control, api::router(dp.clone())).into_future());
    if let Some(l) = metrics {
        tokio::spawn(axum::serve(l, api::metrics_router(dp.clone())).into_future());
    }
    tracing::info!(
        config = %path.display(),
        control = %cfg.dataplane.control_socket.display(),
        "data plane running"
    );
    let report = || dp.lock().unwrap_or_else(|e| e.into_inner()).report();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(f) = &cfg.dataplane.stats_file {
                    let json = serde_json::to_string_pretty(&report())?;
                    let tmp = f.with_extension("tmp");
                    if std::fs::write(&tmp, json).is_ok() {
                        let _ = std::fs::rename(&tmp, f);
                    }
                }
            }
            _ = usr1.recv() => print!("{}", report().table()),
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&cfg.dataplane.control_socket);
    let final_report = report();
    // The API's tasks still hold the data plane: stop it in place (PMDs joined, devices
    // stopped) under the lock, so a request that comes now finds it stopped, not half-torn.
    dp.lock().unwrap_or_else(|e| e.into_inner()).stop();
    print!("{}", final_report.table());
    Ok(())
}
