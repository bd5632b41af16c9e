//! Fuzzing the vhost-user protocol: a hostile or buggy frontend must never crash the daemon.
//!
//! [`fuzz_messages`] decodes its input into a sequence of frontend messages (see [`decode`]
//! for the layout), sends them with their file descriptors over one end of a socket pair to a
//! [`Session`] on the other end, runs the session to its end and checks what the handler
//! promises: no panic, every guest memory region backed by its file up to its last byte (a
//! region mapped past the end of its file would SIGBUS), queue sizes and ring state within
//! bounds, negotiated features within what was offered, well-framed replies, and nothing left
//! behind (threads, file descriptors). [`fuzz_seeds`] gives well-formed inputs that follow real
//! frontends' message orders, so a fuzzer starts deep in the protocol.
//!
//! Compiled for this crate's unit tests and, with the `test-support` feature, for fuzz targets
//! and other crates' tests.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserVirtioFeatures;

use crate::endpoint::EndpointShared;
use crate::handler::ConnHandler;
use crate::protocol::{Session, SessionEnd};
use crate::{DeviceModel, ProtocolFeatures};

/// At most this many messages are decoded from one input.
pub const MAX_MESSAGES: usize = 128;
/// At most this many file descriptors are sent with one input.
pub const MAX_INPUT_FDS: usize = 256;
/// Granularity of memfd sizes in the encoding (at most `0x7fff` units, just under 2 MiB).
pub const MEMFD_UNIT: u32 = 64;

/// Header flags: protocol version 1, and the frontend wants a REPLY_ACK.
pub const F_VERSION: u8 = 0x1;
pub const F_NEED_REPLY: u8 = 0x8;

/// Queues of the device under test.
pub const QUEUES: usize = 4;
/// Its largest queue size.
pub const QUEUE_SIZE_MAX: usize = 256;
/// Its config space (writable).
pub const CONFIG: [u8; 16] = [
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x01, 0x00, 0x02, 0x00, 0xdc, 0x05, 0, 0, 0, 0,
];

/// Front-end request codes (vhost-user spec), as the encoding's request byte.
pub mod req {
    pub const GET_FEATURES: u8 = 1;
    pub const SET_FEATURES: u8 = 2;
    pub const SET_OWNER: u8 = 3;
    pub const RESET_OWNER: u8 = 4;
    pub const SET_MEM_TABLE: u8 = 5;
    pub const SET_LOG_BASE: u8 = 6;
    pub const SET_VRING_NUM: u8 = 8;
    pub const SET_VRING_ADDR: u8 = 9;
    pub const SET_VRING_BASE: u8 = 10;
    pub const GET_VRING_BASE: u8 = 11;
    pub const SET_VRING_KICK: u8 = 12;
    pub const SET_VRING_CALL: u8 = 13;
    pub const SET_VRING_ERR: u8 = 14;
    pub const GET_PROTOCOL_FEATURES: u8 = 15;
    pub const SET_PROTOCOL_FEATURES: u8 = 16;
    pub const GET_QUEUE_NUM: u8 = 17;
    pub const SET_VRING_ENABLE: u8 = 18;
    pub const SET_BACKEND_REQ_FD: u8 = 21;
    pub const GET_CONFIG: u8 = 24;
    pub const SET_CONFIG: u8 = 25;
    pub const GET_INFLIGHT_FD: u8 = 31;
    pub const SET_INFLIGHT_FD: u8 = 32;
    pub const RESET_DEVICE: u8 = 34;
    pub const GET_MAX_MEM_SLOTS: u8 = 36;
    pub const ADD_MEM_REG: u8 = 37;
    pub const REM_MEM_REG: u8 = 38;
}

/// Requests whose reply is a value, not a REPLY_ACK status.
const VALUE_REPLIES: [u8; 7] = [
    req::GET_FEATURES,
    req::GET_VRING_BASE,
    req::GET_PROTOCOL_FEATURES,
    req::GET_QUEUE_NUM,
    req::GET_CONFIG,
    req::GET_INFLIGHT_FD,
    req::GET_MAX_MEM_SLOTS,
];

/// A file descriptor sent with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzFd {
    /// A memfd of this many bytes (rounded up to [`MEMFD_UNIT`], at most `0x7fff` units).
    Memfd(u32),
    /// An eventfd with one event pending (a kick already made).
    Eventfd,
    /// One end of a socket pair whose other end is closed.
    Socket,
}

/// One frontend message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzMsg {
    /// The header's request code.
    pub code: u8,
    /// The header's flags word (see [`FuzzMsg::header_flags`] for its version bits).
    pub flags: u8,
    /// The header's size when it is not the payload's length.
    pub size: Option<u32>,
    /// Sent in two writes, the first ending inside the header (with the fds).
    pub split: bool,
    pub fds: Vec<FuzzFd>,
    pub payload: Vec<u8>,
}

impl FuzzMsg {
    /// A version-1 request with `payload`, no fds.
    pub fn new(code: u8, payload: impl Into<Vec<u8>>) -> Self {
        FuzzMsg {
            code,
            flags: F_VERSION,
            size: None,
            split: false,
            fds: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Asks for a REPLY_ACK.
    pub fn ack(mut self) -> Self {
        self.flags |= F_NEED_REPLY;
        self
    }

    pub fn fd(mut self, fd: FuzzFd) -> Self {
        self.fds.push(fd);
        self
    }

    /// The header's flags: `flags`, with version 1 unless its version bits are both set (an
    /// invalid version), so that few mutations die of a bad version at once.
    pub fn header_flags(&self) -> u8 {
        if self.flags & 0x3 == 0x3 {
            self.flags
        } else {
            self.flags & !0x3 | F_VERSION
        }
    }

    fn declared_size(&self) -> u32 {
        self.size.unwrap_or(self.payload.len() as u32)
    }
}

/// Encodes `msgs` as a [`fuzz_messages`] input (see [`decode`] for the layout).
pub fn encode(msgs: &[FuzzMsg]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let nfds = m.fds.len().min(63);
        let ctl = nfds as u8 | if m.size.is_some() { 0x40 } else { 0 } | u8::from(m.split) << 7;
        out.extend_from_slice(&[m.code, m.flags, ctl]);
        if let Some(s) = m.size {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let len = m.payload.len().min(u16::MAX as usize);
        out.extend_from_slice(&(len as u16).to_le_bytes());
        for fd in &m.fds[..nfds] {
            let v: u16 = match *fd {
                FuzzFd::Memfd(bytes) => bytes.div_ceil(MEMFD_UNIT).min(0x7fff) as u16,
                FuzzFd::Eventfd => 0x8000,
                FuzzFd::Socket => 0xc000,
            };
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&m.payload[..len]);
    }
    out
}

/// Decodes a [`fuzz_messages`] input: up to [`MAX_MESSAGES`] messages, each
///
/// ```text
/// u8  request code          the header's request
/// u8  flags                 the header's flags (0x08 NEED_REPLY); its version (bits 0-1)
///                           is sent as 1 unless both bits are set (an invalid version)
/// u8  ctl                   bits 0-5: fd count; bit 6: a declared size follows;
///                           bit 7: send the header in two writes
/// [u32 LE declared size]    the header's size, if ctl bit 6 (else: the payload's length)
/// u16 LE payload length L   bytes sent after the header (fewer if the input ends first)
/// fd count × u16 LE         0x0000-0x7fff: memfd of v × 64 bytes; 0x8000-0xbfff: eventfd
///                           with an event pending; 0xc000-0xffff: socket (peer closed)
/// L bytes                   payload
/// ```
///
/// Decoding stops at the first incomplete message header; at most [`MAX_INPUT_FDS`] fds in all.
pub fn decode(data: &[u8]) -> Vec<FuzzMsg> {
    let mut msgs = Vec::new();
    let mut rest = data;
    let mut fds_left = MAX_INPUT_FDS;
    while msgs.len() < MAX_MESSAGES && rest.len() >= 5 {
        let (code, flags, ctl) = (rest[0], rest[1], rest[2]);
        rest = &rest[3..];
        let size = if ctl & 0x40 != 0 {
            let Some(b) = rest.get(..4) else { break };
            let s = u32::from_le_bytes(b.try_into().unwrap());
            rest = &rest[4..];
            Some(s)
        } else {
            None
        };
        let Some(b) = rest.get(..2) else { break };
        let len = u16::from_le_bytes([b[0], b[1]]) as usize;
        rest = &rest[2..];
        let mut fds = Vec::new();
        for _ in 0..ctl & 0x3f {
            let Some(b) = rest.get(..2) else { break };
            let v = u16::from_le_bytes([b[0], b[1]]);
            rest = &rest[2..];
            if fds_left == 0 {
                continue;
            }
            fds_left -= 1;
            fds.push(match v {
                0..=0x7fff => FuzzFd::Memfd(u32::from(v) * MEMFD_UNIT),
                0x8000..=0xbfff => FuzzFd::Eventfd,
                _ => FuzzFd::Socket,
            });
        }
        let (payload, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        msgs.push(FuzzMsg {
            code,
            flags,
            size,
            split: ctl & 0x80 != 0,
            fds,
            payload: payload.to_vec(),
        });
    }
    msgs
}

/// The state of one vring after a session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    pub size: u16,
    /// Started (a kick fd received, not stopped with GET_VRING_BASE since).
    pub ready: bool,
    /// Enabled (SET_VRING_ENABLE, or SET_FEATURES without PROTOCOL_FEATURES).
    pub enabled: bool,
    /// Ready, and its three areas lie in guest memory: the data path can serve it.
    pub valid: bool,
    pub kick: bool,
    pub call: bool,
    pub next_avail: u16,
    /// Guest addresses of the descriptor table, avail ring and used ring.
    pub areas: (u64, u64, u64),
}

/// The handler's state after a session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandlerState {
    /// Guest memory regions: (guest address, length).
    pub regions: Vec<(u64, u64)>,
    pub acked_features: u64,
    pub acked_protocol: u64,
    pub queues: Vec<QueueState>,
    /// The queue size of the inflight region set, if any.
    pub inflight_queue_size: Option<u16>,
}

/// Why the session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FuzzEnd {
    /// The frontend closed the connection (the normal end of an input).
    Closed,
    /// A socket error, or the input ended inside a message.
    Io(String),
    /// A message the backend could not take: it ended the session.
    Malformed(String),
}

/// One reply the frontend received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u32,
    pub body: Vec<u8>,
    /// File descriptors received with it.
    pub fds: usize,
}

impl Reply {
    /// The body as one u64 (value replies of GET_FEATURES & co, REPLY_ACK statuses).
    pub fn u64(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.body.get(..8)?.try_into().ok()?))
    }

    /// Whether this is a REPLY_ACK status rather than a value.
    pub fn is_ack(&self) -> bool {
        !VALUE_REPLIES.iter().any(|&c| u32::from(c) == self.code)
    }
}

/// What one [`fuzz_messages`] run did.
#[derive(Clone, Debug)]
pub struct FuzzOutcome {
    /// Messages decoded from the input.
    pub messages: usize,
    /// Messages sent completely before the backend ended the session.
    pub sent: usize,
    pub end: FuzzEnd,
    pub replies: Vec<Reply>,
    pub state: HandlerState,
}

impl FuzzOutcome {
    /// REPLY_ACK statuses received: (request, status; 0 = success).
    pub fn acks(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.replies
            .iter()
            .filter(|r| r.is_ack())
            .map(|r| (r.code, r.u64().unwrap_or(u64::MAX)))
    }

    /// Requests refused with a non-zero REPLY_ACK.
    pub fn refused(&self) -> Vec<u32> {
        self.acks()
            .filter(|&(_, s)| s != 0)
            .map(|(c, _)| c)
            .collect()
    }

    /// Replies to request `code`.
    pub fn replies_to(&self, code: u8) -> impl Iterator<Item = &Reply> + '_ {
        self.replies
            .iter()
            .filter(move |r| r.code == u32::from(code))
    }
}

/// The device under test: a small virtio device with every feature the shared code handles
/// and a writable config space.
pub(crate) struct FuzzModel {
    config: Mutex<[u8; CONFIG.len()]>,
}

impl FuzzModel {
    pub(crate) fn new() -> Self {
        FuzzModel {
            config: Mutex::new(CONFIG),
        }
    }
}

/// Virtio features the test device offers.
pub fn offered_features() -> u64 {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
    // Plus two device bits (virtio-net MAC and MQ).
    1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << 5
        | 1 << 22
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Protocol features the test device offers.
pub fn offered_protocol_features() -> ProtocolFeatures {
    ProtocolFeatures::MQ
        | ProtocolFeatures::REPLY_ACK
        | ProtocolFeatures::CONFIG
        | ProtocolFeatures::INFLIGHT_SHMFD
        | ProtocolFeatures::CONFIGURE_MEM_SLOTS
        | ProtocolFeatures::BACKEND_REQ
}

impl DeviceModel for FuzzModel {
    fn num_queues(&self) -> usize {
        QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE_MAX
    }

    fn features(&self) -> u64 {
        offered_features()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        offered_protocol_features()
    }

    fn config(&self) -> Vec<u8> {
        self.config.lock().unwrap().to_vec()
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), &'static str> {
        // Indexes without checking: the shared code promises writes inside the config space.
        let o = offset as usize;
        self.config.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Sends the messages `data` encodes (see [`decode`]) to a fresh connection of a test device,
/// runs its session to the end and checks the properties the module documentation lists;
/// panics on a violation. Everything it creates (threads, fds, mappings) is gone when it
/// returns.
pub fn fuzz_messages(data: &[u8]) -> FuzzOutcome {
    let msgs = decode(data);
    let shared = Arc::new(EndpointShared::new("fuzz".into(), FuzzModel::new(), 1));
    let handler = ConnHandler::new(shared.clone()).expect("connection handler");
    let (backend, frontend) = UnixStream::pair().expect("socket pair");
    let messages = msgs.len();
    let wellformed = msgs.iter().all(|m| m.size.is_none());
    let codes: Vec<u32> = msgs.iter().map(|m| u32::from(m.code)).collect();
    let front = std::thread::Builder::new()
        .name("vhu-fuzz-front".into())
        .spawn(move || run_frontend(frontend, msgs))
        .expect("frontend thread");

    let mut session = Session::new(backend, handler);
    let end = match session.run() {
        SessionEnd::Closed => FuzzEnd::Closed,
        SessionEnd::Io(e) => FuzzEnd::Io(e.to_string()),
        SessionEnd::Malformed(e) => FuzzEnd::Malformed(e),
    };
    let state = session.handler().check_invariants();
    // Drops the handler (joining its kick thread) and closes the backend's end, which ends
    // the frontend thread's reading.
    drop(session);
    let log = match front.join() {
        Ok(log) => log,
        Err(p) => std::panic::resume_unwind(p),
    };
    // Only this function holds the endpoint now: the kick thread's closure is gone with it.
    assert_eq!(
        Arc::strong_count(&shared),
        1,
        "a thread of the connection outlived it"
    );

    let replies = parse_replies(&log);
    check_replies(&replies, &codes[..log.sent], wellformed);
    FuzzOutcome {
        messages,
        sent: log.sent,
        end,
        replies,
        state,
    }
}

/// What the frontend thread saw.
struct FrontendLog {
    /// Messages sent completely.
    sent: usize,
    /// Every byte received.
    bytes: Vec<u8>,
    /// Per receive that brought fds: (bytes received up to and including it, fd count).
    fd_chunks: Vec<(usize, usize)>,
}

/// A message being sent.
struct Outgoing {
    bytes: Vec<u8>,
    off: usize,
    /// Sent with the first write, then dropped (closed): the backend has its own copies.
    fds: Vec<OwnedFd>,
    /// End of the first write.
    first: usize,
}

pub(crate) fn make_fd(fd: FuzzFd) -> io::Result<OwnedFd> {
    let check = |r: i32| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: `r` is a fresh fd, owned by nothing else.
            Ok(unsafe { OwnedFd::from_raw_fd(r) })
        }
    };
    match fd {
        FuzzFd::Memfd(bytes) => {
            // SAFETY: the name is a NUL-terminated literal.
            let r = unsafe { libc::memfd_create(c"torii-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
            let fd = check(r)?;
            // SAFETY: `fd` is a valid memfd we own.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), libc::off_t::from(bytes)) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        }
        FuzzFd::Eventfd => {
            // SAFETY: no pointer arguments.
            check(unsafe { libc::eventfd(1, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
        }
        FuzzFd::Socket => {
            let (a, _b) = UnixStream::pair()?;
            Ok(a.into())
        }
    }
}

impl Outgoing {
    fn new(m: &FuzzMsg) -> Self {
        let mut bytes = Vec::with_capacity(12 + m.payload.len());
        bytes.extend_from_slice(&u32::from(m.code).to_le_bytes());
        bytes.extend_from_slice(&u32::from(m.header_flags()).to_le_bytes());
        bytes.extend_from_slice(&m.declared_size().to_le_bytes());
        bytes.extend_from_slice(&m.payload);
        // A fd that cannot be made (out of fds) is left out: not the backend's problem.
        let fds = m.fds.iter().filter_map(|&f| make_fd(f).ok()).collect();
        let first = if m.split { 5 } else { bytes.len() };
        Outgoing {
            bytes,
            off: 0,
            fds,
            first,
        }
    }

    /// Writes what the socket takes; true once the whole message is sent.
    fn send(&mut self, sock: &UnixStream) -> io::Result<bool> {
        let end = if self.off < self.first {
            self.first
        } else {
            self.bytes.len()
        };
        let n = send_with_fds(sock, &self.bytes[self.off..end], &self.fds)?;
        self.fds.clear();
        self.off += n;
        Ok(self.off == self.bytes.len())
    }
}

/// One non-blocking `sendmsg` of `buf` with `fds` as `SCM_RIGHTS`.
fn send_with_fds(sock: &UnixStream, buf: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    let mut cmsg = [0u64; 64]; // ≥ CMSG_SPACE(63 * 4)
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid starting value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &iov as *const libc::iovec as *mut libc::iovec;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
        mh.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        mh.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as _;
        // SAFETY: the control buffer holds 512 bytes, more than CMSG_SPACE of 63 fds;
        // CMSG_FIRSTHDR points into it and CMSG_DATA has room for `fds.len()` fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
            let data = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `mh` points at `iov` (into `buf`) and `cmsg`, both alive for the call.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &mh,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One non-blocking `recvmsg` into `buf`; fds received are closed, their count returned.
fn recv_closing_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, usize)> {
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid starting value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    let n = loop {
        // SAFETY: `mh` points at `iov` (into `buf`) and `cmsg`, both alive for the call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut mh,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = 0;
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel just filled, within
    // `msg_controllen`; every fd in it is new and owned here alone.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    drop(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    fds += 1;
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    assert_eq!(
        mh.msg_flags & libc::MSG_CTRUNC,
        0,
        "a reply carried more fds than any reply should"
    );
    Ok((n, fds))
}

/// The frontend: sends `msgs` while reading replies (so that neither side can block the
/// other), shuts its write half down after the last one, and reads until the backend closes.
fn run_frontend(sock: UnixStream, msgs: Vec<FuzzMsg>) -> FrontendLog {
    let mut log = FrontendLog {
        sent: 0,
        bytes: Vec::new(),
        fd_chunks: Vec::new(),
    };
    let mut next = msgs.iter();
    let mut out: Option<Outgoing> = None;
    let mut writing = true;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if writing && out.is_none() {
            match next.next() {
                Some(m) => out = Some(Outgoing::new(m)),
                None => {
                    let _ = sock.shutdown(std::net::Shutdown::Write);
                    writing = false;
                }
            }
        }
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN | if writing { libc::POLLOUT } else { 0 },
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            continue; // EINTR
        }
        if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match recv_closing_fds(&sock, &mut buf) {
                Ok((0, _)) => break,
                Ok((n, fds)) => {
                    log.bytes.extend_from_slice(&buf[..n]);
                    if fds > 0 {
                        log.fd_chunks.push((log.bytes.len(), fds));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
        if writing && p.revents & libc::POLLOUT != 0 {
            let o = out.as_mut().expect("a message to send");
            match o.send(&sock) {
                Ok(true) => {
                    log.sent += 1;
                    out = None;
                }
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The backend ended the session.
                Err(_) => {
                    writing = false;
                    out = None;
                }
            }
        }
    }
    log
}

/// Splits what the frontend received into replies; panics on a reply that is not well
/// framed.
fn parse_replies(log: &FrontendLog) -> Vec<Reply> {
    let b = &log.bytes;
    let mut replies = Vec::new();
    let mut ends = Vec::new();
    let mut off = 0;
    while off < b.len() {
        assert!(b.len() - off >= 12, "truncated reply header");
        let word = |i: usize| u32::from_le_bytes(b[off + i..off + i + 4].try_into().unwrap());
        let (code, flags, size) = (word(0), word(4), word(8) as usize);
        assert_eq!(flags, 0x5, "reply flags (version 1 | REPLY)");
        assert!(size <= 4096, "reply of {size} bytes");
        assert!(b.len() - off - 12 >= size, "truncated reply");
        replies.push(Reply {
            code,
            body: b[off + 12..off + 12 + size].to_vec(),
            fds: 0,
        });
        off += 12 + size;
        ends.push(off);
    }
    // Fds come with the last bytes of the receive that brought them.
    for &(end, n) in &log.fd_chunks {
        let i = ends.partition_point(|&e| e < end);
        assert!(i < replies.len(), "fds after the last reply");
        replies[i].fds += n;
    }
    replies
}

/// What every reply stream must look like.
fn check_replies(replies: &[Reply], sent: &[u32], wellformed: bool) {
    let mut requests = sent.iter();
    for r in replies {
        if wellformed {
            // Each reply answers one request sent, in order.
            assert!(
                requests.any(|&c| c == r.code),
                "reply to request {} never sent (or out of order)",
                r.code
            );
        }
        let expect_fds = usize::from(r.code == u32::from(req::GET_INFLIGHT_FD));
        assert_eq!(r.fds, expect_fds, "fds with the reply to {}", r.code);
        match r.code as u8 {
            _ if r.code > 255 => {}
            req::GET_FEATURES => assert_eq!(r.u64(), Some(offered_features())),
            req::GET_PROTOCOL_FEATURES => {
                assert_eq!(r.u64(), Some(offered_protocol_features().bits()))
            }
            req::GET_QUEUE_NUM => assert_eq!(r.u64(), Some(QUEUES as u64)),
            req::GET_MAX_MEM_SLOTS => {
                assert_eq!(r.u64(), Some(crate::handler::MAX_MEM_SLOTS))
            }
            req::GET_VRING_BASE => {
                assert_eq!(r.body.len(), 8);
                let index = u32::from_le_bytes(r.body[..4].try_into().unwrap());
                assert!((index as usize) < QUEUES, "GET_VRING_BASE of queue {index}");
            }
            req::GET_CONFIG => {
                assert!(r.body.len() >= 12);
                let size = u32::from_le_bytes(r.body[4..8].try_into().unwrap()) as usize;
                assert!(size <= crate::handler::MAX_CONFIG_SIZE);
                assert_eq!(r.body.len(), 12 + size);
            }
            req::GET_INFLIGHT_FD => {
                let info = crate::InflightInfo::parse(&r.body).expect("inflight reply");
                assert_eq!(info.mmap_offset, 0);
                assert!(info.queue_size as usize <= crate::MAX_QUEUE_SIZE);
                assert!(info.num_queues as usize <= crate::MAX_QUEUES);
            }
            _ => {
                assert_eq!(r.body.len(), 8, "REPLY_ACK of request {}", r.code);
                assert!(r.u64().unwrap() <= 1, "REPLY_ACK status");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds: message orders of real frontends.

/// Frontend virtual address of guest address 0 in the QEMU-like seeds.
const QEMU_UA: u64 = 0x7f3a_0000_0000;
/// Queue size the seeds use.
const SEED_QSIZE: u32 = 256;
/// Memory of the QEMU-like seeds.
const SEED_MEM: u32 = 1 << 20;

fn u64_msg(code: u8, v: u64) -> FuzzMsg {
    FuzzMsg::new(code, v.to_le_bytes())
}

fn vring_state(code: u8, index: u32, num: u32) -> FuzzMsg {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    FuzzMsg::new(code, p)
}

/// SET_VRING_ADDR with the ring of `index` at frontend address `base`: descriptors at `base`,
/// avail ring 4 KiB after, used ring 8 KiB after.
fn vring_addr(index: u32, base: u64) -> FuzzMsg {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes()); // flags
    for a in [base, base + 0x2000, base + 0x1000, 0] {
        // desc, used, avail, log
        p.extend_from_slice(&a.to_le_bytes());
    }
    FuzzMsg::new(req::SET_VRING_ADDR, p)
}

fn vring_fd(code: u8, index: u32) -> FuzzMsg {
    u64_msg(code, u64::from(index)).fd(FuzzFd::Eventfd)
}

/// A region as SET_MEM_TABLE and ADD/REM_MEM_REG carry it.
fn region(gpa: u64, size: u64, ua: u64, offset: u64) -> [u8; 32] {
    let mut r = [0u8; 32];
    for (i, v) in [gpa, size, ua, offset].into_iter().enumerate() {
        r[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    r
}

/// SET_MEM_TABLE of `regions`, each with a memfd of the given size.
fn mem_table(regions: &[([u8; 32], u32)]) -> FuzzMsg {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    let mut m = FuzzMsg::new(req::SET_MEM_TABLE, Vec::new());
    for (r, file) in regions {
        p.extend_from_slice(r);
        m = m.fd(FuzzFd::Memfd(*file));
    }
    m.payload = p;
    m
}

fn mem_reg(code: u8, r: [u8; 32]) -> FuzzMsg {
    let mut p = vec![0u8; 8];
    p.extend_from_slice(&r);
    FuzzMsg::new(code, p)
}

fn inflight(code: u8, mmap_size: u64, queues: u16, queue_size: u16) -> FuzzMsg {
    let info = crate::InflightInfo {
        mmap_size,
        mmap_offset: 0,
        num_queues: queues,
        queue_size,
    };
    FuzzMsg::new(code, info.to_bytes())
}

fn get_config(offset: u32, size: u32) -> FuzzMsg {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.resize(12 + size as usize, 0);
    FuzzMsg::new(req::GET_CONFIG, p)
}

fn set_config(offset: u32, data: &[u8]) -> FuzzMsg {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(data);
    FuzzMsg::new(req::SET_CONFIG, p)
}

/// Features a driver of the test device acks (everything offered).
fn driver_features(protocol: bool) -> u64 {
    let f = offered_features();
    if protocol {
        f
    } else {
        f & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
}

/// GET_FEATURES .. SET_PROTOCOL_FEATURES .. GET_QUEUE_NUM, as QEMU opens a connection.
fn qemu_hello(out: &mut Vec<FuzzMsg>) {
    out.push(FuzzMsg::new(req::GET_FEATURES, []));
    out.push(FuzzMsg::new(req::GET_PROTOCOL_FEATURES, []));
    out.push(u64_msg(
        req::SET_PROTOCOL_FEATURES,
        offered_protocol_features().bits(),
    ));
    out.push(FuzzMsg::new(req::GET_QUEUE_NUM, []));
    out.push(FuzzMsg::new(req::GET_MAX_MEM_SLOTS, []));
    out.push(
        FuzzMsg::new(req::SET_BACKEND_REQ_FD, [])
            .ack()
            .fd(FuzzFd::Socket),
    );
    out.push(FuzzMsg::new(req::SET_OWNER, []).ack());
}

/// vhost_dev_start: SET_FEATURES, SET_MEM_TABLE (one memfd), each ring, then enable.
fn qemu_start(out: &mut Vec<FuzzMsg>) {
    out.push(u64_msg(req::SET_FEATURES, driver_features(true)).ack());
    out.push(mem_table(&[(region(0, SEED_MEM.into(), QEMU_UA, 0), SEED_MEM)]).ack());
    for q in 0..QUEUES as u32 {
        out.push(vring_state(req::SET_VRING_NUM, q, SEED_QSIZE).ack());
        out.push(vring_state(req::SET_VRING_BASE, q, 0).ack());
        out.push(vring_addr(q, QEMU_UA + 0x10000 * u64::from(q + 1)).ack());
        out.push(vring_fd(req::SET_VRING_KICK, q).ack());
        out.push(vring_fd(req::SET_VRING_CALL, q).ack());
    }
    for q in 0..QUEUES as u32 {
        out.push(vring_state(req::SET_VRING_ENABLE, q, 1).ack());
    }
}

/// vhost_dev_stop: disable, then GET_VRING_BASE for each ring.
fn stop_all(out: &mut Vec<FuzzMsg>) {
    for q in 0..QUEUES as u32 {
        out.push(vring_state(req::SET_VRING_ENABLE, q, 0).ack());
    }
    for q in 0..QUEUES as u32 {
        out.push(vring_state(req::GET_VRING_BASE, q, 0));
    }
}

/// The named seeds: (name, messages).
pub fn seed_messages() -> Vec<(&'static str, Vec<FuzzMsg>)> {
    let mut seeds = Vec::new();

    // QEMU vhost-user-net with multiqueue: realize enables queue pair 0 before any
    // SET_FEATURES; then the guest driver starts the device.
    let mut m = Vec::new();
    qemu_hello(&mut m);
    m.push(vring_state(req::SET_VRING_ENABLE, 0, 1).ack());
    m.push(vring_state(req::SET_VRING_ENABLE, 1, 1).ack());
    m.push(FuzzMsg::new(req::GET_FEATURES, []));
    qemu_start(&mut m);
    seeds.push(("qemu-net", m.clone()));

    // ... and the guest shuts the device down (or QEMU migrates it).
    stop_all(&mut m);
    seeds.push(("qemu-net-stop", m));

    // QEMU vhost-user-blk: config space and inflight region before the start.
    let mut m = Vec::new();
    qemu_hello(&mut m);
    m.push(get_config(0, CONFIG.len() as u32));
    let need = crate::inflight::region_size(QUEUES as u16, SEED_QSIZE as u16);
    m.push(inflight(
        req::GET_INFLIGHT_FD,
        0,
        QUEUES as u16,
        SEED_QSIZE as u16,
    ));
    m.push(
        inflight(
            req::SET_INFLIGHT_FD,
            need as u64,
            QUEUES as u16,
            SEED_QSIZE as u16,
        )
        .ack()
        .fd(FuzzFd::Memfd(need as u32)),
    );
    qemu_start(&mut m);
    m.push(set_config(12, &[1]).ack());
    m.push(get_config(0, CONFIG.len() as u32));
    seeds.push(("qemu-blk", m));

    // DPDK virtio-user (net_virtio_user): SET_OWNER first, call fds before SET_FEATURES and
    // SET_MEM_TABLE, guest addresses are the process's virtual addresses, hugepage segments
    // map at file offsets; then NUM, BASE, ADDR, KICK per ring and queue pair 0 enabled.
    let dpdk_ua = 0x7f12_0000_0000u64;
    let dpdk_hello = |m: &mut Vec<FuzzMsg>| {
        m.push(FuzzMsg::new(req::SET_OWNER, []));
        m.push(FuzzMsg::new(req::GET_FEATURES, []));
        m.push(FuzzMsg::new(req::GET_PROTOCOL_FEATURES, []));
        m.push(u64_msg(
            req::SET_PROTOCOL_FEATURES,
            (ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK | ProtocolFeatures::CONFIG).bits(),
        ));
        m.push(FuzzMsg::new(req::GET_QUEUE_NUM, []));
        m.push(get_config(0, 6));
    };
    let dpdk_start = |m: &mut Vec<FuzzMsg>| {
        for q in 0..QUEUES as u32 {
            m.push(vring_fd(req::SET_VRING_CALL, q).ack());
        }
        m.push(u64_msg(req::SET_FEATURES, driver_features(true)).ack());
        m.push(
            mem_table(&[
                (region(dpdk_ua, 0x80000, dpdk_ua, 0x80000), 0x100000),
                (
                    region(dpdk_ua + 0x100000, 0x100000, dpdk_ua + 0x100000, 0),
                    0x100000,
                ),
            ])
            .ack(),
        );
        for q in 0..QUEUES as u32 {
            let base = dpdk_ua + 0x10000 * u64::from(q);
            m.push(vring_state(req::SET_VRING_NUM, q, SEED_QSIZE).ack());
            m.push(vring_state(req::SET_VRING_BASE, q, 0).ack());
            m.push(vring_addr(q, base).ack());
            m.push(vring_fd(req::SET_VRING_KICK, q).ack());
        }
        m.push(vring_state(req::SET_VRING_ENABLE, 0, 1).ack());
        m.push(vring_state(req::SET_VRING_ENABLE, 1, 1).ack());
    };
    let mut m = Vec::new();
    dpdk_hello(&mut m);
    dpdk_start(&mut m);
    seeds.push(("dpdk-virtio-user", m));

    // DPDK virtio-user reconnecting in server mode: rings disabled before the negotiation,
    // started, then stopped.
    let mut m = Vec::new();
    for q in 0..QUEUES as u32 {
        m.push(vring_state(req::SET_VRING_ENABLE, q, 0));
    }
    dpdk_hello(&mut m);
    dpdk_start(&mut m);
    stop_all(&mut m);
    seeds.push(("dpdk-reconnect-stop", m));

    // Memory hot-plug with CONFIGURE_MEM_SLOTS: regions added one by one, one removed and
    // another added, rings in the first.
    let mut m = Vec::new();
    qemu_hello(&mut m);
    m.push(u64_msg(req::SET_FEATURES, driver_features(true)).ack());
    let slot = |i: u64| region(i * 0x100000, 0x40000, QEMU_UA + i * 0x100000, 0);
    for i in 0..3 {
        m.push(
            mem_reg(req::ADD_MEM_REG, slot(i))
                .ack()
                .fd(FuzzFd::Memfd(0x40000)),
        );
    }
    m.push(mem_reg(req::REM_MEM_REG, slot(1)).ack());
    m.push(
        mem_reg(req::ADD_MEM_REG, slot(3))
            .ack()
            .fd(FuzzFd::Memfd(0x40000)),
    );
    for q in 0..QUEUES as u32 {
        m.push(vring_state(req::SET_VRING_NUM, q, SEED_QSIZE).ack());
        m.push(vring_state(req::SET_VRING_BASE, q, 0).ack());
        m.push(vring_addr(q, QEMU_UA + 0x10000 * u64::from(q)).ack());
        m.push(vring_fd(req::SET_VRING_KICK, q).ack());
        m.push(vring_fd(req::SET_VRING_CALL, q).ack());
        m.push(vring_state(req::SET_VRING_ENABLE, q, 1).ack());
    }
    seeds.push(("mem-slots", m));

    // A frontend without PROTOCOL_FEATURES: rings start enabled, no acks.
    let mut m = vec![
        FuzzMsg::new(req::SET_OWNER, []),
        FuzzMsg::new(req::GET_FEATURES, []),
        u64_msg(req::SET_FEATURES, driver_features(false)),
        mem_table(&[(region(0, SEED_MEM.into(), QEMU_UA, 0), SEED_MEM)]),
    ];
    for q in 0..QUEUES as u32 {
        m.push(vring_state(req::SET_VRING_NUM, q, SEED_QSIZE));
        m.push(vring_state(req::SET_VRING_BASE, q, 0));
        m.push(vring_addr(q, QEMU_UA + 0x10000 * u64::from(q + 1)));
        m.push(vring_fd(req::SET_VRING_KICK, q));
        m.push(vring_fd(req::SET_VRING_CALL, q));
    }
    seeds.push(("legacy", m));

    // A device reset and a second start on the same connection.
    let mut m = Vec::new();
    qemu_hello(&mut m);
    qemu_start(&mut m);
    m.push(FuzzMsg::new(req::RESET_DEVICE, []).ack());
    qemu_start(&mut m);
    seeds.push(("reset-restart", m));

    seeds
}

/// Well-formed [`fuzz_messages`] inputs that follow real frontends' message orders (QEMU net
/// and blk, DPDK virtio-user, memory hot-plug, a legacy frontend, a device reset).
pub fn fuzz_seeds() -> Vec<Vec<u8>> {
    seed_messages().iter().map(|(_, m)| encode(m)).collect()
}

/// A small deterministic pseudo-random generator (xorshift64) for mutating inputs in tests.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A mutation of `input` in the manner of a fuzzer: bit flips, interesting bytes, inserted,
/// deleted and duplicated ranges, splices from `other`.
pub fn mutate(rng: &mut XorShift, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(rng.next_u64() as u8);
            continue;
        }
        let i = rng.below(v.len());
        match rng.below(8) {
            0 => v[i] ^= 1 << rng.below(8),
            1 => v[i] = [0, 1, 0x7f, 0x80, 0xff, 0x40, 0x20, 8][rng.below(8)],
            2 => v[i] = rng.next_u64() as u8,
            3 => {
                let n = rng.below(16).min(v.len() - i);
                v.drain(i..i + n);
            }
            4 => {
                let n = 1 + rng.below(8);
                for _ in 0..n {
                    v.insert(i, rng.next_u64() as u8);
                }
            }
            5 => {
                let n = rng.below(64).min(v.len() - i);
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(v.len());
                v.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                let j = rng.below(other.len());
                let n = rng.below(256).min(other.len() - j);
                v.truncate(i);
                v.extend_from_slice(&other[j..j + n]);
            }
            _ => {
                // An interesting u32/u64 somewhere (sizes, offsets, indices).
                let vals: [u64; 8] = [
                    0,
                    u64::MAX,
                    0x1000,
                    0xfff,
                    1 << 20,
                    0x8000_0000,
                    u64::from(u32::MAX),
                    256,
                ];
                let b = vals[rng.below(vals.len())].to_le_bytes();
                let n = [4, 8][rng.below(2)].min(v.len() - i);
                v[i..i + n].copy_from_slice(&b[..n]);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that count fds and threads run one at a time with every other fuzzing test.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(msgs: &[FuzzMsg]) -> FuzzOutcome {
        fuzz_messages(&encode(msgs))
    }

    #[test]
    fn encoding_round_trips() {
        for (name, msgs) in seed_messages() {
            assert_eq!(decode(&encode(&msgs)), msgs, "{name}");
        }
        let m = FuzzMsg {
            code: 200,
            flags: 0x7,
            size: Some(5000),
            split: true,
            fds: vec![FuzzFd::Memfd(64), FuzzFd::Socket, FuzzFd::Eventfd],
            payload: vec![1, 2, 3],
        };
        assert_eq!(decode(&encode(std::slice::from_ref(&m))), vec![m]);
        assert!(decode(&[1, 1]).is_empty());
    }

    #[test]
    fn seeds_reach_the_state_they_aim_at() {
        let _g = serial();
        for (name, msgs) in seed_messages() {
            let o = run(&msgs);
            let s = &o.state;
            assert_eq!(o.end, FuzzEnd::Closed, "{name}");
            assert_eq!(o.sent, msgs.len(), "{name}");
            assert!(o.refused().is_empty(), "{name}: refused {:?}", o.refused());
            let acks = msgs
                .iter()
                .filter(|m| m.flags & F_NEED_REPLY != 0 && !VALUE_REPLIES.contains(&m.code))
                .count();
            assert_eq!(o.acks().count(), acks, "{name}: every ack asked for");
            let gets = msgs
                .iter()
                .filter(|m| VALUE_REPLIES.contains(&m.code))
                .count();
            assert_eq!(o.replies.len(), acks + gets, "{name}");
            let regions: usize = match name {
                "dpdk-virtio-user" | "dpdk-reconnect-stop" => 2,
                "mem-slots" => 3,
                _ => 1,
            };
            assert_eq!(s.regions.len(), regions, "{name}");
            assert_eq!(s.queues.len(), QUEUES, "{name}");
            let protocol = name != "legacy";
            assert_eq!(s.acked_features, driver_features(protocol), "{name}");
            let stopped = name.ends_with("-stop");
            for (i, q) in s.queues.iter().enumerate() {
                assert_eq!(q.size, SEED_QSIZE as u16, "{name} queue {i}");
                assert_eq!(q.ready, !stopped, "{name} queue {i}");
                assert_eq!(q.valid, !stopped, "{name} queue {i}");
                assert_eq!(q.kick, !stopped, "{name} queue {i}");
                let enabled = match name {
                    _ if stopped => false,
                    "dpdk-virtio-user" => i < 2,
                    _ => true,
                };
                assert_eq!(q.enabled, enabled, "{name} queue {i}");
            }
            if stopped {
                let bases: Vec<u32> = o
                    .replies_to(req::GET_VRING_BASE)
                    .map(|r| u32::from_le_bytes(r.body[..4].try_into().unwrap()))
                    .collect();
                assert_eq!(bases, [0, 1, 2, 3], "{name}");
            }
            if name == "qemu-blk" {
                assert_eq!(s.inflight_queue_size, Some(SEED_QSIZE as u16));
                let inflight: Vec<&Reply> = o.replies_to(req::GET_INFLIGHT_FD).collect();
                assert_eq!(inflight.len(), 1);
                assert_eq!(inflight[0].fds, 1);
                let cfg: Vec<&Reply> = o.replies_to(req::GET_CONFIG).collect();
                assert_eq!(cfg[0].body[12..], CONFIG);
                assert_eq!(cfg[1].body[12 + 12], 1, "SET_CONFIG took effect");
            }
        }
    }

    #[test]
    fn seeds_and_mutations_never_break_the_backend() {
        let _g = serial();
        let seeds = fuzz_seeds();
        for s in &seeds {
            fuzz_messages(s);
        }
        let mut rng = XorShift::new(0x7011_5eed);
        let mut ends = [0usize; 3];
        let mut deep = 0;
        for i in 0..3000 {
            let a = &seeds[i % seeds.len()];
            let b = &seeds[rng.below(seeds.len())];
            let mut input = mutate(&mut rng, a, b);
            // Now and then a mutation of a mutation, to get further from the seeds.
            if i % 3 == 0 {
                input = mutate(&mut rng, &input, b);
            }
            let o = fuzz_messages(&input);
            deep += usize::from(o.state.queues.iter().any(|q| q.valid));
            ends[match o.end {
                FuzzEnd::Closed => 0,
                FuzzEnd::Io(_) => 1,
                FuzzEnd::Malformed(_) => 2,
            }] += 1;
        }
        // The mutations must not all die at the first messages: many end normally, many with
        // a ring the data path could serve.
        assert!(ends[0] > 1000, "ends: {ends:?}");
        assert!(deep > 600, "{deep} with a valid ring");
    }

    /// Entries of /proc/self/fd, and those naming the fuzzer's and the inflight memfds.
    fn fds() -> (usize, usize) {
        let mut all = 0;
        let mut ours = 0;
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            all += 1;
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy();
                if t.starts_with("/memfd:torii-fuzz") || t.starts_with("/memfd:torii-inflight") {
                    ours += 1;
                }
            }
        }
        (all, ours)
    }

    /// Threads of this process named like the test device's kick thread.
    fn kick_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "kick-fuzz" || c.trim() == "vhu-fuzz-front")
            })
            .count()
    }

    #[test]
    fn nothing_is_left_behind() {
        let _g = serial();
        let seeds = fuzz_seeds();
        fuzz_messages(&seeds[0]); // lazily opened fds (if any) before counting
        let before = fds();
        let mut rng = XorShift::new(42);
        for i in 0..200 {
            let s = &seeds[i % seeds.len()];
            let input = if i < seeds.len() {
                s.clone()
            } else {
                mutate(&mut rng, s, &seeds[0])
            };
            fuzz_messages(&input);
        }
        assert_eq!(kick_threads(), 0, "threads left running");
        // Other tests of the crate may hold a few fds for a while: allow a little slack in the
        // total, none for the fuzzer's own memfds.
        let mut after = fds();
        for _ in 0..50 {
            if after.0 <= before.0 + 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            after = fds();
        }
        assert_eq!(after.1, before.1, "memfds leaked");
        assert!(
            after.0 <= before.0 + 4,
            "fds: {before:?} before, {after:?} after"
        );
    }

    fn ack_proto() -> FuzzMsg {
        u64_msg(
            req::SET_PROTOCOL_FEATURES,
            ProtocolFeatures::REPLY_ACK.bits(),
        )
    }

    #[test]
    fn memory_regions_not_backed_by_their_file_are_refused() {
        let _g = serial();
        let mib = 1u64 << 20;
        let bad = [
            // Larger than its memfd.
            mem_table(&[(region(0, mib, QEMU_UA, 0), 64 * 1024)]),
            // Inside the file's size but past its end from the offset.
            mem_table(&[(region(0, mib, QEMU_UA, 0x1000), mib as u32)]),
            // Offset + size overflowing.
            mem_table(&[(region(0, 0x2000, QEMU_UA, u64::MAX - 0xfff), mib as u32)]),
            // A file size not a multiple of pages: the last page is past the end.
            mem_table(&[(region(0, 0x2000, QEMU_UA, 0), 0x1040)]),
            // Not a regular file.
            mem_table(&[(region(0, 0x1000, QEMU_UA, 0), 0)]).tap(|m| m.fds = vec![FuzzFd::Eventfd]),
            mem_table(&[(region(0, 0x1000, QEMU_UA, 0), 0)]).tap(|m| m.fds = vec![FuzzFd::Socket]),
            // One good region, one bad: nothing is installed.
            mem_table(&[
                (region(0, 0x10000, QEMU_UA, 0), 0x10000),
                (region(0x10000, 0x20000, QEMU_UA + 0x10000, 0), 0x10000),
            ]),
            // Hot-plugged.
            mem_reg(req::ADD_MEM_REG, region(0, mib, QEMU_UA, 0)).fd(FuzzFd::Memfd(4096)),
        ];
        for m in bad {
            let msgs = [
                ack_proto(),
                m.clone().ack(),
                FuzzMsg::new(req::GET_FEATURES, []),
            ];
            let o = run(&msgs);
            assert_eq!(o.refused(), [u32::from(m.code)], "{m:?}");
            assert_eq!(o.end, FuzzEnd::Closed, "the session goes on");
            assert_eq!(o.replies_to(req::GET_FEATURES).count(), 1);
            assert!(o.state.regions.is_empty());
        }
        // Exactly backed: taken, at an offset too.
        let good = mem_table(&[(region(0, 0x1000, QEMU_UA, 0x1000), 0x2000)]).ack();
        let o = run(&[ack_proto(), good]);
        assert!(o.refused().is_empty());
        assert_eq!(o.state.regions, [(0, 0x1000)]);
    }

    trait Tap: Sized {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
    impl Tap for FuzzMsg {}

    #[test]
    fn unsorted_memory_tables_are_taken() {
        let _g = serial();
        let t = mem_table(&[
            (region(0x100000, 0x10000, QEMU_UA + 0x100000, 0), 0x10000),
            (region(0, 0x10000, QEMU_UA, 0), 0x10000),
        ])
        .ack();
        let o = run(&[ack_proto(), t]);
        assert!(o.refused().is_empty());
        assert_eq!(o.state.regions, [(0, 0x10000), (0x100000, 0x10000)]);
    }

    #[test]
    fn inflight_regions_not_backed_by_their_file_are_refused() {
        let _g = serial();
        let need = crate::inflight::region_size(2, 256) as u64;
        let proto = u64_msg(
            req::SET_PROTOCOL_FEATURES,
            (ProtocolFeatures::REPLY_ACK | ProtocolFeatures::INFLIGHT_SHMFD).bits(),
        );
        for fd in [
            FuzzFd::Memfd(need as u32 - 64),
            FuzzFd::Eventfd,
            FuzzFd::Socket,
        ] {
            let m = inflight(req::SET_INFLIGHT_FD, need, 2, 256).ack().fd(fd);
            let o = run(&[proto.clone(), m]);
            assert_eq!(o.refused(), [u32::from(req::SET_INFLIGHT_FD)], "{fd:?}");
            assert_eq!(o.state.inflight_queue_size, None);
        }
        let m = inflight(req::SET_INFLIGHT_FD, need, 2, 256)
            .ack()
            .fd(FuzzFd::Memfd(need as u32));
        let o = run(&[proto, m]);
        assert!(o.refused().is_empty());
        assert_eq!(o.state.inflight_queue_size, Some(256));
    }

    #[test]
    fn config_writes_stay_inside_the_config_space() {
        let _g = serial();
        let proto = u64_msg(
            req::SET_PROTOCOL_FEATURES,
            (ProtocolFeatures::REPLY_ACK | ProtocolFeatures::CONFIG).bits(),
        );
        let too_big = FuzzMsg {
            payload: {
                let mut p = set_config(0, &[0; 300]).payload;
                p[4..8].copy_from_slice(&300u32.to_le_bytes());
                p
            },
            ..set_config(0, &[])
        };
        for m in [
            set_config(10, &[0; 8]),
            set_config(16, &[1]),
            set_config(u32::MAX, &[1, 2, 3, 4]),
            set_config(u32::MAX - 1, &[]),
            too_big,
        ] {
            let o = run(&[
                proto.clone(),
                m.clone().ack(),
                get_config(0, CONFIG.len() as u32),
            ]);
            assert_eq!(o.refused(), [u32::from(req::SET_CONFIG)], "{m:?}");
            assert_eq!(o.end, FuzzEnd::Closed);
            let r = o.replies_to(req::GET_CONFIG).next().unwrap();
            assert_eq!(r.body[12..], CONFIG, "config unchanged");
        }
        let o = run(&[proto, set_config(14, &[7, 8]).ack(), get_config(12, 8)]);
        assert!(o.refused().is_empty());
        let r = o.replies_to(req::GET_CONFIG).next().unwrap();
        assert_eq!(r.body[12..], [0, 0, 7, 8, 0, 0, 0, 0]);
    }

    #[test]
    fn protocol_features_not_offered_are_refused() {
        let _g = serial();
        let all = u64_msg(req::SET_PROTOCOL_FEATURES, u64::MAX).ack();
        let o = run(&[ack_proto(), all]);
        assert_eq!(o.refused(), [u32::from(req::SET_PROTOCOL_FEATURES)]);
        assert_eq!(o.state.acked_protocol, ProtocolFeatures::REPLY_ACK.bits());
    }

    #[test]
    fn vring_indices_and_sizes_are_bounded() {
        let _g = serial();
        let mut msgs = vec![ack_proto()];
        let bad = [
            vring_state(req::SET_VRING_NUM, QUEUES as u32, 256),
            vring_state(req::SET_VRING_NUM, 0, 512), // above the device's maximum
            vring_state(req::SET_VRING_NUM, 0, 100),
            vring_state(req::SET_VRING_NUM, 0, 0),
            vring_state(req::SET_VRING_BASE, u32::MAX, 0),
            vring_state(req::SET_VRING_ENABLE, 64, 1),
            vring_fd(req::SET_VRING_KICK, 200),
            vring_fd(req::SET_VRING_CALL, 4),
            vring_fd(req::SET_VRING_ERR, 255),
            vring_addr(9, QEMU_UA),
        ];
        msgs.push(mem_table(&[(
            region(0, SEED_MEM.into(), QEMU_UA, 0),
            SEED_MEM,
        )]));
        msgs.extend(bad.iter().cloned().map(FuzzMsg::ack));
        let o = run(&msgs);
        assert_eq!(o.refused().len(), bad.len());
        assert_eq!(o.end, FuzzEnd::Closed);
        for q in &o.state.queues {
            assert_eq!(
                q.size, QUEUE_SIZE_MAX as u16,
                "the device's maximum, not 1024"
            );
            assert!(!q.ready && !q.kick);
        }
        // GET_VRING_BASE must be answered; for a vring that does not exist the session ends
        // instead.
        let o = run(&[
            vring_state(req::GET_VRING_BASE, QUEUES as u32, 0),
            FuzzMsg::new(req::GET_FEATURES, []),
        ]);
        assert!(matches!(o.end, FuzzEnd::Malformed(_)), "{:?}", o.end);
        assert!(o.replies.is_empty());
    }

    #[test]
    fn refused_ring_addresses_change_nothing() {
        let _g = serial();
        let misaligned = |off: usize| {
            let mut m = vring_addr(0, QEMU_UA);
            let v = u64::from_le_bytes(m.payload[off..off + 8].try_into().unwrap()) + 1;
            m.payload[off..off + 8].copy_from_slice(&v.to_le_bytes());
            m.ack()
        };
        // Memory ends 2 bytes into the used ring of this layout: its index is outside.
        let used_idx_outside = vring_addr(0, QEMU_UA + 0x1000).ack();
        let msgs = [
            ack_proto(),
            mem_table(&[(region(0, 0x3002, QEMU_UA, 0), 0x3040)]),
            vring_state(req::SET_VRING_NUM, 0, 16),
            vring_addr(0, QEMU_UA).ack(),
            misaligned(8),  // descriptors
            misaligned(16), // used ring
            misaligned(24), // avail ring
            used_idx_outside,
            vring_fd(req::SET_VRING_KICK, 0),
        ];
        let o = run(&msgs);
        assert_eq!(o.refused(), [u32::from(req::SET_VRING_ADDR); 4]);
        let q = &o.state.queues[0];
        assert_eq!(q.areas, (0, 0x1000, 0x2000), "the layout accepted first");
        assert!(q.ready && q.valid);
    }

    #[test]
    fn reset_owner_forgets_features_for_the_data_path_too() {
        let _g = serial();
        let o = run(&[
            u64_msg(req::SET_FEATURES, driver_features(true)),
            FuzzMsg::new(req::RESET_OWNER, []),
        ]);
        // check_invariants compares the handler's features with the data path's.
        assert_eq!(o.state.acked_features, 0);
    }
}
