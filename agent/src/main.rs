//! `torii-agent`: the guest agent.
//!
//!     torii-agent --serial NAME|PATH   a virtio-serial port, by its name (found in sysfs) or
//!                                      its device; opened once, each host connection served
//!                                      in turn
//!     torii-agent --unix PATH          listen on a Unix socket, one connection at a time
//!     torii-agent --vsock PORT         listen on a vsock port (vhost-vsock, or the hybrid
//!                                      vsock of Cloud Hypervisor and Firecracker)
//!     torii-agent --stdio              stdin/stdout (tests, debugging)
//!
//! As PID 1 it mounts the kernel file systems, loads the kernel modules listed in
//! /lib/modules/torii.order, reaps every orphan, takes its transport from the kernel command
//! line (`torii.agent=serial:NAME`, `vsock:PORT` or `unix:PATH`; default `serial:agent.0`) and powers the VM off when asked
//! to (`shutdown`) or when it can no longer serve. Once its transport is open it says
//! `torii-agent: ready` on stderr (the console).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use torii_agent::server::{serve, Agent};
use torii_agent::{init, transport};

enum Transport {
    Serial(String),
    Unix(PathBuf),
    Vsock(u32),
    Stdio,
}

/// How long the port may take to show up.
const PORT_PATIENCE: Duration = Duration::from_secs(10);

fn parse(args: &[String]) -> Result<Transport, String> {
    match args {
        [flag, v] if flag == "--serial" => Ok(Transport::Serial(v.clone())),
        [flag, v] if flag == "--unix" => Ok(Transport::Unix(PathBuf::from(v))),
        [flag, v] if flag == "--vsock" => v
            .parse()
            .map(Transport::Vsock)
            .map_err(|_| format!("--vsock {v}: not a port number")),
        [flag] if flag == "--stdio" => Ok(Transport::Stdio),
        _ => Err(
            "usage: torii-agent --serial NAME|PATH | --unix PATH | --vsock PORT | --stdio".into(),
        ),
    }
}

fn log(msg: &str) {
    eprintln!("torii-agent: {msg}");
}

/// Serves until the transport fails (returns why) or, on stdio, the host goes.
fn run(agent: Arc<Agent>, t: Transport) -> Result<(), String> {
    match t {
        Transport::Stdio => {
            log("ready");
            serve(agent, std::io::stdin(), std::io::stdout(), || {}).map_err(|e| e.to_string())
        }
        Transport::Unix(p) => {
            let _ = std::fs::remove_file(&p);
            let l = UnixListener::bind(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            log("ready");
            Err(transport::serve_listener(&agent, &l, &log).to_string())
        }
        Transport::Vsock(port) => {
            let l = transport::VsockListener::bind(port)
                .map_err(|e| format!("vsock port {port}: {e}"))?;
            log("ready");
            Err(format!("vsock port {port}: {}", l.serve(&agent, &log)))
        }
        Transport::Serial(name) => {
            let port =
                transport::open_port(&name, Path::new("/sys"), Path::new("/dev"), PORT_PATIENCE)
                    .map_err(|e| e.to_string())?;
            log("ready");
            Err(format!("{name}: {}", port.serve(&agent, &log)))
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // SAFETY: getpid(2) has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    let transport = if pid1 && args.is_empty() {
        if let Err(e) = init::setup() {
            log(&e.to_string());
        }
        for e in init::load_modules(Path::new("/lib/modules"), init::finit_module) {
            log(&format!("kernel module {e}"));
        }
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let spec =
            init::cmdline_value(&cmdline, "torii.agent").unwrap_or_else(|| "serial:agent.0".into());
        match spec.split_once(':') {
            Some(("serial", name)) => Transport::Serial(name.into()),
            Some(("unix", path)) => Transport::Unix(PathBuf::from(path)),
            Some(("vsock", port)) if port.parse::<u32>().is_ok() => {
                Transport::Vsock(port.parse().unwrap_or(1024))
            }
            _ => {
                log(&format!(
                    "torii.agent={spec}: expected serial:NAME, vsock:PORT or unix:PATH"
                ));
                Transport::Serial("agent.0".into())
            }
        }
    } else {
        match parse(&args) {
            Ok(t) => t,
            Err(e) => {
                log(&e);
                return ExitCode::from(2);
            }
        }
    };
    let r = Agent::new(pid1)
        .map_err(|e| format!("starting: {e}"))
        .and_then(|agent| run(agent, transport));
    if pid1 {
        if let Err(e) = &r {
            log(e);
        }
        log(&format!("powering off: {}", init::power_off()));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(&e);
            ExitCode::FAILURE
        }
    }
}
