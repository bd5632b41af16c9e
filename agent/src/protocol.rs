//! The wire format (docs/agent-protocol.md): frames of a 4-byte big-endian length and that
//! many bytes of UTF-8 JSON. The host sends requests (`{"id", "method", "params"}`); the agent
//! answers each once (`{"id", "result"}` or `{"id", "error": {"code", "message"}}`) and sends
//! events (`{"event", …}`) for running processes. Every input is untrusted: a length over
//! [`MAX_FRAME`] ends the connection (the stream cannot be resynchronised), anything else that
//! is wrong in a frame gets an error answer and the connection goes on.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 4 << 20;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    #[error("end of stream")]
    Eof,
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one frame's payload.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 {
        return Err(FrameError::Empty);
    }
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes one frame (length and payload in one write).
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    if payload.is_empty() || payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes", payload.len()),
        ));
    }
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// A request from the host.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: u64,
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

/// An error answer's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    /// One of the codes in docs/agent-protocol.md (`bad_frame`, `bad_request`,
    /// `unknown_method`, `bad_params`, `not_found`, `busy`, `failed`).
    pub code: String,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &str, message: impl Into<String>) -> RpcError {
        RpcError {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The answer to request `id` (`None`: a frame whose id could not be read).
pub fn answer(id: Option<u64>, r: Result<Value, RpcError>) -> Value {
    match r {
        Ok(v) => serde_json::json!({ "id": id, "result": v }),
        Err(e) => serde_json::json!({ "id": id, "error": e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{\"a\":1}").unwrap();
        write_frame(&mut buf, b"[]").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), b"{\"a\":1}");
        assert_eq!(read_frame(&mut r).unwrap(), b"[]");
        assert!(matches!(read_frame(&mut r), Err(FrameError::Eof)));
        // A huge length is refused before anything is allocated for it.
        let mut r = &[0xff, 0xff, 0xff, 0xff, 1, 2][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::TooLarge(_))));
        let mut r = &[0, 0, 0, 0][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Empty)));
        // A stream cut inside a frame is an error, not a clean end.
        let mut r = &[0, 0, 0, 9, b'{'][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        let mut r = &[0, 0][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        assert!(write_frame(&mut Vec::new(), b"").is_err());
    }
}
