//! What every Torii device daemon does the same way around its devices: logging setup and
//! waiting for a stop signal.

/// Logs to stderr, filtered by `TORII_LOG` (default `info`), with colours only on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TORII_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// SIGINT and SIGTERM, blocked so that only [`StopSignals::wait`] sees them. Block them
/// before starting any thread: threads inherit the mask.
pub struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    pub fn block() -> std::io::Result<Self> {
        // SAFETY: sigset_t is plain data, initialized by sigemptyset before use; the calls
        // only read and write it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if r != 0 {
                return Err(std::io::Error::from_raw_os_error(r));
            }
            Ok(StopSignals { set })
        }
    }

    /// Waits for one of them; returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialized signal set and `sig` a valid out pointer.
        unsafe { libc::sigwait(&self.set, &mut sig) };
        sig
    }
}

/// A Prometheus label value, escaped as the text format wants (`\\`, `\"`, `\n`).
pub fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Capability numbers (linux/capability.h) the daemons' error hints name.
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;

/// The process's effective capabilities (`CapEff`), read once and kept: the daemon reads them
/// before its sandboxes go on ([`crate::seccomp::init`]), which may refuse `/proc` later. None
/// if they could not be read.
pub fn capabilities() -> Option<u64> {
    static CAPS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *CAPS.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        u64::from_str_radix(hex.trim(), 16).ok()
    })
}

/// Whether the process lacks capability `cap` (or its capabilities could not be read).
pub fn lacks(cap: u32) -> bool {
    capabilities().is_none_or(|c| c & (1 << cap) == 0)
}

/// A listener's bind error on `addr`; a port below 1024 refused names the capability it needs.
pub fn bind_error(addr: std::net::SocketAddr, e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        std::io::Error::new(
            e.kind(),
            format!(
                "{e}: a port below 1024 needs CAP_NET_BIND_SERVICE (or a lower \
                 net.ipv4.ip_unprivileged_port_start)"
            ),
        )
    } else {
        e
    }
}

/// Serves `render()` as a Prometheus text exposition over HTTP on `addr` (every request gets
/// it), from a thread of its own. Bound before returning, so a bad address fails here.
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadClass::Metrics);
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                // The request itself does not matter, but all of its head is read (up to 8 KiB)
                // before answering: closing a socket with unread input resets the connection.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match s.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let body = render();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
        })?;
    Ok(bound)
}
