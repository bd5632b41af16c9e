//! `containerd-shim-torii-v2`: containerd's shim v2 for Torii pod VMs.
//!
//! containerd runs `containerd-shim-torii-v2 start` for each container; the first container of
//! a sandbox (grouped by the `io.kubernetes.cri.sandbox-id` annotation) starts a shim server,
//! later ones get its address. The server answers the Task API v2 over ttrpc
//! ([`service::Service`]); `delete` cleans up after a shim that died. See docs/containerd.md.

pub mod config;
pub mod io;
pub mod oci;
pub mod rootfs;
pub mod service;

use std::path::Path;
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config, ExitSignal, Flags, StartOpts};

use config::{ShimConfig, SANDBOX_ID};

/// The runtime's name: `ctr run --runtime io.containerd.torii.v2`.
pub const RUNTIME: &str = "io.containerd.torii.v2";

struct Shim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

/// The sandbox of the container whose bundle is `bundle`.
fn sandbox_of(bundle: &Path, id: &str) -> Result<String, String> {
    let spec = oci::Spec::load(bundle)?;
    let sandbox = spec.annotations.get(SANDBOX_ID).cloned();
    let sandbox = sandbox.unwrap_or_else(|| id.to_string());
    service::check_id(SANDBOX_ID, &sandbox)?;
    Ok(sandbox)
}

fn shim_err(e: impl std::fmt::Display) -> containerd_shim::Error {
    containerd_shim::Error::Other(e.to_string())
}

impl containerd_shim::Shim for Shim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // containerd runs `start` in the container's bundle.
        let grouping = sandbox_of(Path::new("."), &opts.id).map_err(shim_err)?;
        let (_, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// After a shim died: what it left of this container on the host goes.
    fn delete_shim(&mut self) -> Result<api::DeleteResponse, containerd_shim::Error> {
        let bundle = Path::new(".");
        let root = oci::Spec::load(bundle)
            .map(|s| s.root_path(bundle))
            .unwrap_or_else(|_| bundle.join("rootfs"));
        if let Err(e) = rootfs::unmount(&root) {
            containerd_shim::warn!("{e}");
        }
        // The dead shim's socket (its address is in the bundle), unless a shim serves it.
        if let Ok(address) = containerd_shim::util::read_address() {
            let path = address.trim_start_matches("unix://");
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
        if let (Ok(cfg), Ok(sandbox)) = (ShimConfig::load(), sandbox_of(bundle, &self.id)) {
            let dir = cfg.state_dir.join(&sandbox);
            if crate::pod::pod_alive(&dir, &sandbox) {
                // The sandbox's VM still runs (another shim serves it): only this one's files.
                for ext in ["img", "sock", "log"] {
                    let _ = std::fs::remove_file(dir.join(format!("{}.{ext}", self.id)));
                }
            } else {
                // Its VM went with the shim: so does everything of the sandbox.
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(api::DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim_protos::protobuf::MessageField::some(
                containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        close_on_exec();
        let sandbox = sandbox_of(Path::new("."), &self.id).unwrap_or_else(|_| self.id.clone());
        let service =
            service::Service::new(&self.namespace, &sandbox, publisher, self.exit.clone());
        end_on_signals(service.clone());
        service
    }
}

/// SIGTERM or SIGINT ends the shim in order ([`service::Service::terminate`]); a second one
/// while that is under way ends it at once. The shim crate
/// catches both and only logs them, so a shim whose containerd is gone would otherwise outlive
/// every polite request to stop.
fn end_on_signals(service: service::Service) {
    let mut signals = match signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            containerd_shim::error!("SIGTERM handler: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("terminate".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if let Some(sig) = signals.next() {
                containerd_shim::info!("signal {sig}: stopping the sandbox");
                let stopping = service.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name("terminating".into())
                    .spawn(move || stopping.terminate())
                {
                    containerd_shim::error!("terminate thread: {e}");
                    std::process::exit(128 + sig);
                }
            }
            // A second request while the first is under way: now (the VMM and the disk
            // backends die with the shim, PR_SET_PDEATHSIG).
            if let Some(sig) = signals.next() {
                containerd_shim::warn!("signal {sig} again: exiting at once");
                std::process::exit(128 + sig);
            }
        });
    if let Err(e) = spawned {
        containerd_shim::error!("SIGTERM thread: {e}");
    }
}

/// Marks every descriptor the shim inherited or the shim crate opened (the ttrpc listener,
/// the log FIFO) close-on-exec: the VMM and the disk backends must not hold them, or a dead
/// shim's socket would still take connections while they live.
fn close_on_exec() {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = fds
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl(2) F_GETFD/F_SETFD only changes the descriptor's flags; a descriptor
        // that is no longer open (the directory's own) fails harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// The binary's entry point.
pub fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!(
            "containerd-shim-torii-v2:\n  Runtime: {RUNTIME}\n  Version: {}",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    let config = Config {
        // The shim reaps its own children (the VMM, the disk backends): a reaper of every
        // child would take their exits from under them.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<Shim>(RUNTIME, Some(config));
}
