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
/// The most characters of an error message.
pub const MAX_MESSAGE: usize = 1024;
/// The most characters of the host's input quoted in an error message.
pub const MAX_QUOTE: usize = 256;

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
    /// An error; `message` is cut to [`MAX_MESSAGE`] characters.
    pub fn new(code: &str, message: impl Into<String>) -> RpcError {
        let message = message.into();
        RpcError {
            code: code.into(),
            message: match cut(&message, MAX_MESSAGE) {
                Some(short) => short,
                None => message,
            },
        }
    }
}

/// `s` cut to `n` characters and marked as such, if it is longer.
fn cut(s: &str, n: usize) -> Option<String> {
    s.char_indices()
        .nth(n)
        .map(|(i, _)| format!("{}…", &s[..i]))
}

/// The host's `s`, quoted for an error message: cut to [`MAX_QUOTE`] characters, escaped.
pub fn quote(s: &str) -> String {
    match cut(s, MAX_QUOTE) {
        Some(short) => format!("{short:?}"),
        None => format!("{s:?}"),
    }
}

/// The answer to request `id` (`None`: a frame whose id could not be read).
pub fn answer(id: Option<u64>, r: Result<Value, RpcError>) -> Value {
    match r {
        Ok(v) => serde_json::json!({ "id": id, "result": v }),
        Err(e) => serde_json::json!({ "id": id, "error": e }),
    }
}

/// The payload of the frame that sends `v`. An answer too large for a frame is replaced by a
/// `failed` answer for its id; an event too large for one is dropped (`None`).
pub fn encode(v: &Value) -> Option<Vec<u8>> {
    let why = match serde_json::to_vec(v) {
        Ok(b) if b.len() <= MAX_FRAME => return Some(b),
        Ok(b) => format!(
            "the answer ({} bytes) is over the frame limit of {MAX_FRAME}",
            b.len()
        ),
        Err(e) => format!("the answer could not be encoded: {e}"),
    };
    // Answers have an id (null for a frame whose id could not be read); events have none.
    let id = v.as_object()?.get("id")?.as_u64();
    serde_json::to_vec(&answer(id, Err(RpcError::new("failed", why)))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_quotes_are_bounded() {
        let long = "é".repeat(5000);
        let e = RpcError::new("failed", long.clone());
        assert_eq!(e.message.chars().count(), MAX_MESSAGE + 1);
        assert!(e.message.ends_with('…'));
        let q = quote(&format!("\"{long}"));
        assert!(q.chars().count() < MAX_QUOTE + 10, "{q}");
        assert!(q.starts_with("\"\\\"é"), "{q}");
        assert_eq!(quote("eth0"), "\"eth0\"");
        assert_eq!(RpcError::new("failed", "short").message, "short");
    }

    #[test]
    fn an_answer_over_the_frame_limit_becomes_an_error() {
        let ok = serde_json::json!({"id": 3, "result": {}});
        assert_eq!(encode(&ok).unwrap(), serde_json::to_vec(&ok).unwrap());
        let big = "x".repeat(MAX_FRAME);
        let a: Value = serde_json::from_slice(
            &encode(&answer(Some(9), Ok(Value::String(big.clone())))).unwrap(),
        )
        .unwrap();
        assert_eq!(a["id"], 9);
        assert_eq!(a["error"]["code"], "failed");
        assert!(a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over the frame limit"));
        // An event too large is dropped.
        assert!(encode(&serde_json::json!({"event": "output", "data": big})).is_none());
    }

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
