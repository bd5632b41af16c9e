//! Just enough HTTP/1.1 over a Unix socket for the VMMs' REST APIs (one request per
//! connection, `Connection: close`), and the hybrid vsock handshake Cloud Hypervisor and
//! Firecracker share.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::vmm::{io_err, VmmError};

/// One API request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Value>,
}

impl Request {
    pub fn put(path: impl Into<String>, body: Option<Value>) -> Request {
        Request {
            method: "PUT",
            path: path.into(),
            body,
        }
    }

    /// The request as sent on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self
            .body
            .as_ref()
            .map(|b| b.to_string())
            .unwrap_or_default();
        let mut s = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
            self.method, self.path
        );
        if self.body.is_some() {
            s.push_str("Content-Type: application/json\r\n");
        }
        s.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.push_str(&body);
        s.into_bytes()
    }
}

/// Sends `r` to the API on `socket`; the body of a 2xx answer, else an error with the VMM's
/// message.
pub fn send(socket: &Path, r: &Request, timeout: Duration) -> Result<String, VmmError> {
    let what = format!("{} {}", r.method, r.path);
    let mut s =
        UnixStream::connect(socket).map_err(io_err(format!("{what}: {}", socket.display())))?;
    s.set_read_timeout(Some(timeout))
        .map_err(io_err(what.clone()))?;
    s.write_all(&r.to_bytes()).map_err(io_err(what.clone()))?;
    let mut rd = BufReader::new(s.take(1 << 20));
    let mut status = String::new();
    rd.read_line(&mut status).map_err(io_err(what.clone()))?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| VmmError::Api(format!("{what}: not an HTTP answer: {status:?}")))?;
    let mut len = None;
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h).map_err(io_err(what.clone()))? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = Vec::new();
    // 1xx, 204 and 304 answers have no body (RFC 9112 6.3). micro-http, the HTTP server of
    // both VMMs, answers 204 without Content-Length and keeps the connection open: reading
    // to the end would wait for the timeout.
    let bodyless = code < 200 || code == 204 || code == 304;
    match len {
        _ if bodyless => {}
        Some(n) => {
            body.resize(n.min(1 << 20), 0);
            rd.read_exact(&mut body).map_err(io_err(what.clone()))?;
        }
        None => {
            rd.read_to_end(&mut body).map_err(io_err(what.clone()))?;
        }
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    if !(200..300).contains(&code) {
        return Err(VmmError::Api(format!(
            "{what}: HTTP {code}: {}",
            body.trim()
        )));
    }
    Ok(body)
}

/// Connects to guest vsock `port` through the VMM's hybrid vsock socket (`CONNECT <port>\n`,
/// answered `OK <host port>\n`), retrying while the guest has nobody listening yet and
/// `alive()` (the VMM still runs).
pub fn hybrid_vsock_connect(
    socket: &Path,
    port: u32,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<UnixStream, VmmError> {
    let end = Instant::now() + timeout;
    loop {
        let r = (|| -> std::io::Result<Option<UnixStream>> {
            let mut s = UnixStream::connect(socket)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            // Byte by byte: nothing after the line may be taken from the stream.
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.len() < 64 && s.read(&mut b)? == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            s.set_read_timeout(None)?;
            Ok(line.starts_with(b"OK ").then_some(s))
        })();
        if let Ok(Some(s)) = r {
            return Ok(s);
        }
        if !alive() {
            return Err(VmmError::Launch(format!(
                "the VMM exited before its guest's agent listened on vsock port {port}"
            )));
        }
        if Instant::now() >= end {
            return Err(VmmError::Launch(format!(
                "no agent on vsock port {port} through {} within {timeout:?}",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
