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
use torii_dataplane::sandbox;
use torii_vhost_user::{landlock, seccomp};

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
    /// Print the Landlock rules a configuration produces (docs/security.md): the paths the
    /// daemon may touch with `landlock = "enforce"`, with their rights and reasons.
    Landlock {
        #[arg(short, long)]
        config: PathBuf,
    },
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
        Cmd::Landlock { config } => Config::load(&config)
            .map(|cfg| print!("{}", describe_landlock(&cfg)))
            .map_err(anyhow::Error::from),
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

/// What `torii-dataplane landlock` prints: the daemon's rules, and the first layer DPDK's
/// initialisation runs under when the configuration uses DPDK.
fn describe_landlock(cfg: &Config) -> String {
    let rules = sandbox::rules(cfg);
    let mut s = match cfg.dataplane.landlock {
        landlock::Mode::Enforce => {
            "landlock = \"enforce\": the daemon may touch only these paths, with these rights:\n"
        }
        landlock::Mode::Off => {
            "landlock = \"off\" (no sandbox); with \"enforce\" the daemon could touch only these paths, with these rights:\n"
        }
    }
    .to_string();
    s.push_str(&landlock::describe(&rules));
    if sandbox::uses_dpdk(cfg) {
        s.push_str("\nDPDK's initialisation runs first under a wider layer, those rules and:\n");
        s.push_str(&landlock::describe(&sandbox::dpdk_init_extra()));
    }
    s
}

/// Sets up the sandboxes before any thread of Torii's starts: the Landlock file-system
/// sandbox (if enforced) on the main thread, which every later thread inherits, then the
/// seccomp mode for every thread and the control class's filter on the whole process (each
/// thread then narrows it with its own class). DPDK, if the configuration uses it, is
/// initialised in between: its initialisation loads drivers and maps memory in ways no
/// filter allows later (its threads get the filter with the rest of the process), and reads
/// far more of the file system than the daemon's own Landlock rules allow, so it runs under
/// a wider first layer (`sandbox::dpdk_init_rules`) and the daemon's rules follow.
fn start_sandbox(cfg: &Config) -> anyhow::Result<()> {
    let mode = cfg.dataplane.seccomp;
    let enforce_landlock = cfg.dataplane.landlock == landlock::Mode::Enforce;
    let uses_dpdk = sandbox::uses_dpdk(cfg);
    // DPDK's drivers need more of the control thread (any ioctl, bpf, packet sockets): only
    // when this configuration uses DPDK.
    seccomp::init(mode, seccomp::Options::dataplane(uses_dpdk))?;
    let rules = sandbox::rules(cfg);
    #[cfg(feature = "dpdk")]
    {
        use std::os::unix::fs::DirBuilderExt;
        use torii_dataplane::port::dpdk::eal;
        if (mode != seccomp::Mode::Off || enforce_landlock) && uses_dpdk {
            let dpdk = cfg.dpdk.clone().unwrap_or_default();
            if enforce_landlock {
                // DPDK makes its runtime directory even with --in-memory: made here, so
                // that the first layer need not let it make directories.
                let dir = eal::runtime_dir(&dpdk);
                if let Err(e) = std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                {
                    tracing::warn!("DPDK's runtime directory {}: {e}", dir.display());
                }
                let a = landlock::restrict(&sandbox::dpdk_init_rules(&rules), sandbox::EXTEND)?;
                tracing::info!(
                    "file-system sandbox, layer 1 (DPDK's initialisation): {}",
                    landlock::summary(&a)
                );
            }
            eal::init(&dpdk).map_err(anyhow::Error::msg)?;
        }
    }
    if enforce_landlock {
        let a = landlock::restrict(&rules, sandbox::EXTEND)?;
        tracing::info!(landlock = %cfg.dataplane.landlock, "file-system sandbox: {}", landlock::summary(&a));
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
    let dp = match start_sandbox(&cfg).and_then(|()| Dataplane::start(&cfg)) {
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
