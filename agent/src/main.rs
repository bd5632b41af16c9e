//! `torii-agent`: the guest agent.
//!
//!     torii-agent --serial NAME|PATH   virtio-serial port (/dev/virtio-ports/NAME), reopened
//!                                      whenever the host goes away
//!     torii-agent --unix PATH          listen on a Unix socket, one connection at a time
//!     torii-agent --stdio              stdin/stdout (tests, debugging)
//!
//! As PID 1 it mounts the kernel file systems, reaps every orphan, takes its transport from
//! the kernel command line (`torii.agent=serial:NAME`, default `serial:agent.0`) and powers
//! the VM off when asked to (`shutdown`) or when it can no longer serve.

use std::fs::OpenOptions;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use torii_agent::server::{serve, Agent};
use torii_agent::{init, protocol::FrameError};

enum Transport {
    Serial(PathBuf),
    Unix(PathBuf),
    Stdio,
}

fn serial_path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new("/dev/virtio-ports").join(name)
    }
}

fn parse(args: &[String]) -> Result<Transport, String> {
    match args {
        [flag, v] if flag == "--serial" => Ok(Transport::Serial(serial_path(v))),
        [flag, v] if flag == "--unix" => Ok(Transport::Unix(PathBuf::from(v))),
        [flag] if flag == "--stdio" => Ok(Transport::Stdio),
        _ => Err("usage: torii-agent --serial NAME|PATH | --unix PATH | --stdio".into()),
    }
}

fn log(msg: &str) {
    eprintln!("torii-agent: {msg}");
}

fn run(agent: Arc<Agent>, t: Transport) -> Result<(), String> {
    match t {
        Transport::Stdio => {
            serve(agent, std::io::stdin(), std::io::stdout()).map_err(|e| e.to_string())
        }
        Transport::Unix(p) => {
            let _ = std::fs::remove_file(&p);
            let l = UnixListener::bind(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            for c in l.incoming() {
                let c = c.map_err(|e| e.to_string())?;
                let w = c.try_clone().map_err(|e| e.to_string())?;
                if let Err(e) = serve(agent.clone(), c, w) {
                    log(&format!("connection ended: {e}"));
                }
            }
            Ok(())
        }
        Transport::Serial(p) => loop {
            // The port reads EOF while no host is connected: open it again and wait.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let w = f.try_clone().map_err(|e| e.to_string())?;
            match serve(agent.clone(), f, w) {
                Ok(()) => std::thread::sleep(Duration::from_millis(100)),
                Err(FrameError::Io(e)) => {
                    log(&format!("{}: {e}", p.display()));
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => log(&format!("host sent {e}; waiting for the next connection")),
            }
        },
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
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let spec =
            init::cmdline_value(&cmdline, "torii.agent").unwrap_or_else(|| "serial:agent.0".into());
        match spec.split_once(':') {
            Some(("serial", name)) => Transport::Serial(serial_path(name)),
            Some(("unix", path)) => Transport::Unix(PathBuf::from(path)),
            _ => {
                log(&format!(
                    "torii.agent={spec}: expected serial:NAME or unix:PATH"
                ));
                Transport::Serial(serial_path("agent.0"))
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
    let agent = Agent::new(pid1);
    let r = run(agent, transport);
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
