//! `toriictl`: pod VMs on Torii.
//!
//!     toriictl run SPEC [-i] [-e K=V]... -- CMD [ARG]...
//!         boots the sandbox of SPEC, waits for its agent, configures the guest (interfaces,
//!         routes, neighbours, disk mounts), runs CMD with its output streamed, exits with its
//!         exit code, and tears the VM down
//!     toriictl plan SPEC      the resolved sandbox and the VMM's command line or API requests
//!     toriictl image build    the guest kernel + initramfs with torii-agent as init

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use torii_runtime::image::{self, ImageConfig};
use torii_runtime::pod::{ExitStatus, Pod, PodError, RUN_DIR};
use torii_runtime::spec::{HypervisorKind, SandboxSpec, DEFAULT_IMAGE_DIR};
use torii_runtime::{cloud_hypervisor, firecracker, qemu};

#[derive(Parser)]
#[command(name = "toriictl", version, about = "Pod VMs on Torii")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a pod VM, configure it through its agent, run a command in it, tear it down.
    Run {
        /// The sandbox spec (TOML, or JSON when it ends in .json).
        spec: PathBuf,
        /// Copy this process's stdin to the command's.
        #[arg(short, long)]
        interactive: bool,
        /// The command's environment (K=V; PATH is added when not given).
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// Folder of the pods' sockets and logs.
        #[arg(long, default_value = RUN_DIR)]
        run_dir: PathBuf,
        /// Write timings and the exit status here as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Say what happens, on stderr.
        #[arg(short, long)]
        verbose: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the resolved sandbox and what the VMM is given.
    Plan { spec: PathBuf },
    /// The guest image.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build vmlinuz, initramfs.cpio.gz and manifest.json.
    Build {
        #[arg(long, default_value = DEFAULT_IMAGE_DIR)]
        out: PathBuf,
        /// An unpacked linux-image package (default: the bookworm-backports kernel, fetched).
        #[arg(long)]
        kernel_root: Option<PathBuf>,
        /// A statically linked torii-agent (default: next to toriictl, the static target's).
        #[arg(long)]
        agent: Option<PathBuf>,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Modules to add (besides the default virtio/ext4/vsock set).
        #[arg(long = "module")]
        modules: Vec<String>,
    },
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::Relaxed);
}

fn forward_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// The static torii-agent built beside this toriictl.
fn default_agent() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    // target/<profile>/toriictl -> target/x86_64-unknown-linux-gnu/<profile>/torii-agent
    let profile = me.parent().and_then(|p| p.file_name()).unwrap_or_default();
    me.parent()
        .and_then(|p| p.parent())
        .map(|t| {
            t.join("x86_64-unknown-linux-gnu")
                .join(profile)
                .join("torii-agent")
        })
        .unwrap_or_default()
}

fn plan(spec: &Path) -> Result<(), String> {
    let s = SandboxSpec::load(spec).map_err(|e| e.to_string())?;
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .map_err(|e| e.to_string())?;
    let dir = PathBuf::from(RUN_DIR).join(&sb.name);
    let api = |r: Vec<torii_runtime::http::Request>| {
        let r: Vec<_> = r
            .iter()
            .map(|r| json!({ "method": r.method, "path": r.path, "body": r.body }))
            .collect();
        json!({ "requests": r })
    };
    let vmm = match sb.hypervisor {
        HypervisorKind::Qemu => json!({ "args": qemu::args(&sb, &qemu::Paths::new(&dir)) }),
        HypervisorKind::CloudHypervisor => api(cloud_hypervisor::boot_requests(
            &sb,
            &cloud_hypervisor::Paths::new(&dir),
        )
        .map_err(|e| e.to_string())?),
        HypervisorKind::Firecracker => api(firecracker::boot_requests(
            &sb,
            &cloud_hypervisor::Paths::new(&dir),
        )
        .map_err(|e| e.to_string())?),
    };
    let out = json!({ "sandbox": sb, "vmm": vmm });
    println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    spec: &Path,
    interactive: bool,
    env: Vec<String>,
    run_dir: &Path,
    report: Option<PathBuf>,
    verbose: bool,
    command: Vec<String>,
) -> Result<i32, String> {
    let say = |m: &str| {
        if verbose {
            eprintln!("toriictl: {m}");
        }
    };
    let s = SandboxSpec::load(spec).map_err(|e| e.to_string())?;
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .map_err(|e| e.to_string())?;
    forward_signals();
    say(&format!("booting {} ({:?})", sb.name, sb.hypervisor));
    let pod = match Pod::start(sb, run_dir, Some(&SIGNAL)) {
        Ok(p) => p,
        Err(PodError::Interrupted(sig)) => return Ok(128 + sig),
        Err(e) => return Err(e.to_string()),
    };
    say(&format!(
        "agent ready {:.2} s after launch (VMM pid {})",
        pod.boot_to_agent.as_secs_f64(),
        pod.vmm_pid()
    ));
    let result = (|| {
        pod.configure().map_err(|e| e.to_string())?;
        say("guest configured");
        // A signal that came while the guest was being configured: the command never starts.
        let sig = SIGNAL.swap(0, Ordering::Relaxed);
        if sig > 0 {
            return Ok(ExitStatus {
                code: 128 + sig,
                signal: Some(sig),
            });
        }
        let mut env = env;
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/bin:/sbin:/usr/bin:/usr/sbin".into());
        }
        let stdin: Option<Box<dyn std::io::Read + Send>> = if interactive {
            Some(Box::new(std::io::stdin()))
        } else {
            None
        };
        pod.exec(&command, &env, stdin, Some(&SIGNAL), &mut |o| {
            let _ = if o.stream == "stderr" {
                std::io::stderr().write_all(&o.data)
            } else {
                let mut so = std::io::stdout().lock();
                so.write_all(&o.data).and_then(|_| so.flush())
            };
        })
        .map_err(|e| e.to_string())
    })();
    let boot = pod.boot_to_agent;
    say("stopping");
    let stopped = pod.stop(Duration::from_secs(10)).map_err(|e| e.to_string());
    let status = result?;
    stopped?;
    if let Some(r) = report {
        let v = json!({
            "boot_to_agent_ms": boot.as_secs_f64() * 1e3,
            "exit_code": status.code,
            "signal": status.signal,
        });
        std::fs::write(&r, v.to_string()).map_err(|e| format!("{}: {e}", r.display()))?;
    }
    Ok(status.code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run {
            spec,
            interactive,
            env,
            run_dir,
            report,
            verbose,
            command,
        } => run(&spec, interactive, env, &run_dir, report, verbose, command),
        Cmd::Plan { spec } => plan(&spec).map(|_| 0),
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    out,
                    kernel_root,
                    agent,
                    busybox,
                    modules,
                },
        } => {
            let mut all: Vec<String> = image::MODULES.iter().map(|m| m.to_string()).collect();
            all.extend(modules);
            let cfg = ImageConfig {
                out: out.clone(),
                kernel_root,
                agent: agent.unwrap_or_else(default_agent),
                busybox,
                modules: all,
            };
            image::build(&cfg).map_err(|e| e.to_string()).map(|m| {
                println!(
                    "toriictl: image in {}: kernel {}, initramfs {}, modules {}",
                    out.display(),
                    m.kernel_version,
                    &m.initramfs_sha256[..16],
                    m.modules.join(" ")
                );
                0
            })
        }
    };
    match r {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("toriictl: {e}");
            ExitCode::from(125)
        }
    }
}
