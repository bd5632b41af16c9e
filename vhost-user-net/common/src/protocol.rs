//! vhost-user message framing on the back-end side (vhost-user spec, "Message
//! specification"): a 12-byte header (request, flags, size), a payload of at most
//! [`MAX_PAYLOAD`] bytes, file descriptors as `SCM_RIGHTS` ancillary data. Each request is
//! handed to the connection's [`ConnHandler`]; replies and REPLY_ACK acks go back here.
//!
//! The frontend (the VMM) is less hostile than the guest but still untrusted input: sizes,
//! counts and indices are checked before use and a malformed message ends the session, never
//! the daemon.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;

use crate::handler::{ConnHandler, MemRegion, MAX_CONFIG_SIZE, MAX_MEM_SLOTS};
use crate::inflight::InflightInfo;
use crate::DeviceModel;

const HDR_LEN: usize = 12;
/// Largest payload accepted (the spec's messages are all far smaller).
const MAX_PAYLOAD: usize = 4096;
/// Largest number of fds taken with one message.
const MAX_FDS: usize = 32;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const REGION_LEN: usize = 32;

/// Front-end request codes (vhost-user spec, "Front-end message types").
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SEND_RARP: u32 = 19;
    pub const NET_SET_MTU: u32 = 20;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const RESET_DEVICE: u32 = 34;
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionEnd {
    #[error("frontend closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
}

struct Msg {
    code: u32,
    flags: u32,
    payload: Vec<u8>,
    files: Vec<File>,
}

impl Msg {
    fn u32_at(&self, off: usize) -> Result<u32, SessionEnd> {
        self.payload
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| {
                SessionEnd::Malformed(format!("request {}: payload too short", self.code))
            })
    }

    fn u64_at(&self, off: usize) -> Result<u64, SessionEnd> {
        self.payload
            .get(off..off + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| {
                SessionEnd::Malformed(format!("request {}: payload too short", self.code))
            })
    }

    fn region_at(&self, off: usize) -> Result<MemRegion, SessionEnd> {
        Ok(MemRegion {
            gpa: self.u64_at(off)?,
            size: self.u64_at(off + 8)?,
            user_addr: self.u64_at(off + 16)?,
            mmap_offset: self.u64_at(off + 24)?,
        })
    }
}

/// One frontend connection being served.
pub(crate) struct Session<M: DeviceModel> {
    stream: UnixStream,
    handler: ConnHandler<M>,
}

impl<M: DeviceModel> Session<M> {
    pub(crate) fn new(stream: UnixStream, handler: ConnHandler<M>) -> Self {
        Session { stream, handler }
    }

    /// The protocol state, for checks after a session (tests, fuzzing).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn handler(&self) -> &ConnHandler<M> {
        &self.handler
    }

    /// Serves requests until the frontend goes away or a message is malformed.
    pub(crate) fn run(&mut self) -> SessionEnd {
        loop {
            let msg = match self.recv() {
                Ok(m) => m,
                Err(e) => return e,
            };
            if let Err(e) = self.dispatch(msg) {
                return e;
            }
        }
    }

    fn recv(&mut self) -> Result<Msg, SessionEnd> {
        let mut hdr = [0u8; HDR_LEN];
        let (n, files) = recv_with_fds(&self.stream, &mut hdr)?;
        if n == 0 {
            return Err(SessionEnd::Closed);
        }
        if n < HDR_LEN {
            self.stream.read_exact(&mut hdr[n..])?;
        }
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let (code, flags, size) = (word(0), word(4), word(8) as usize);
        if flags & 0x3 != VERSION {
            return Err(SessionEnd::Malformed(format!(
                "unsupported version in flags {flags:#x}"
            )));
        }
        if size > MAX_PAYLOAD {
            return Err(SessionEnd::Malformed(format!(
                "request {code}: payload of {size} bytes"
            )));
        }
        let mut payload = vec![0u8; size];
        self.stream.read_exact(&mut payload)?;
        Ok(Msg {
            code,
            flags,
            payload,
            files,
        })
    }

    fn reply(&mut self, code: u32, body: &[u8]) -> Result<(), SessionEnd> {
        self.stream.write_all(&reply_bytes(code, body))?;
        Ok(())
    }

    /// A reply carrying one file descriptor (GET_INFLIGHT_FD).
    fn reply_with_fd(&mut self, code: u32, body: &[u8], fd: &File) -> Result<(), SessionEnd> {
        send_with_fd(&self.stream, &reply_bytes(code, body), fd)?;
        Ok(())
    }

    /// REPLY_ACK: a u64 status for requests that asked for one (0 = success).
    fn ack(&mut self, msg: &Msg, r: crate::handler::Result<()>) -> Result<(), SessionEnd> {
        if let Err(e) = &r {
            tracing::warn!(request = msg.code, "vhost-user request refused: {e}");
        }
        let acked = self
            .handler
            .acked_protocol()
            .contains(VhostUserProtocolFeatures::REPLY_ACK);
        if msg.flags & NEED_REPLY != 0 && acked {
            let status: u64 = if r.is_ok() { 0 } else { 1 };
            self.reply(msg.code, &status.to_le_bytes())?;
        }
        Ok(())
    }

    fn vring_fd(&self, msg: &mut Msg) -> Result<(u8, Option<File>), SessionEnd> {
        let v = msg.u64_at(0)?;
        let index = (v & 0xff) as u8;
        let no_fd = v & 0x100 != 0;
        let file = if no_fd { None } else { msg.files.pop() };
        if !no_fd && file.is_none() {
            return Err(SessionEnd::Malformed(format!(
                "request {}: missing fd",
                msg.code
            )));
        }
        Ok((index, file))
    }

    fn dispatch(&mut self, mut msg: Msg) -> Result<(), SessionEnd> {
        tracing::trace!(
            request = msg.code,
            len = msg.payload.len(),
            "vhost-user request"
        );
        let h = &mut self.handler;
        match msg.code {
            req::GET_FEATURES => {
                let f = h.get_features().unwrap_or(0);
                self.reply(msg.code, &f.to_le_bytes())
            }
            req::SET_FEATURES => {
                let r = h.set_features(msg.u64_at(0)?);
                self.ack(&msg, r)
            }
            req::SET_OWNER => self.ack(&msg, Ok(())),
            req::RESET_OWNER => {
                let r = h.reset_owner();
                self.ack(&msg, r)
            }
            req::RESET_DEVICE => {
                let r = h.reset_device();
                self.ack(&msg, r)
            }
            req::SET_MEM_TABLE => {
                let n = msg.u32_at(0)? as usize;
                if n as u64 > MAX_MEM_SLOTS || n != msg.files.len() {
                    return Err(SessionEnd::Malformed(format!(
                        "SET_MEM_TABLE: {n} regions, {} fds",
                        msg.files.len()
                    )));
                }
                let regions = (0..n)
                    .map(|i| msg.region_at(8 + i * REGION_LEN))
                    .collect::<Result<Vec<_>, _>>()?;
                let files = std::mem::take(&mut msg.files);
                let r = self.handler.set_mem_table(&regions, files);
                self.ack(&msg, r)
            }
            req::SET_VRING_NUM => {
                let r = h.set_vring_num(msg.u32_at(0)?, msg.u32_at(4)?);
                self.ack(&msg, r)
            }
            req::SET_VRING_ADDR => {
                // struct vhost_vring_addr: index, flags, desc, used, avail, log
                let r = h.set_vring_addr(
                    msg.u32_at(0)?,
                    msg.u64_at(8)?,
                    msg.u64_at(16)?,
                    msg.u64_at(24)?,
                );
                self.ack(&msg, r)
            }
            req::SET_VRING_BASE => {
                let r = h.set_vring_base(msg.u32_at(0)?, msg.u32_at(4)?);
                self.ack(&msg, r)
            }
            req::GET_VRING_BASE => {
                let index = msg.u32_at(0)?;
                let base = h
                    .get_vring_base(index)
                    .map_err(|e| SessionEnd::Malformed(e.to_string()))?;
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&index.to_le_bytes());
                body[4..].copy_from_slice(&u32::from(base).to_le_bytes());
                self.reply(msg.code, &body)
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                let (index, file) = self.vring_fd(&mut msg)?;
                let h = &mut self.handler;
                let r = match msg.code {
                    req::SET_VRING_KICK => h.set_vring_kick(index, file),
                    req::SET_VRING_CALL => h.set_vring_call(index, file),
                    _ => h.set_vring_err(index, file),
                };
                self.ack(&msg, r)
            }
            req::GET_PROTOCOL_FEATURES => {
                let f = h.get_protocol_features();
                self.reply(msg.code, &f.bits().to_le_bytes())
            }
            req::SET_PROTOCOL_FEATURES => {
                let r = h.set_protocol_features(msg.u64_at(0)?);
                self.ack(&msg, r)
            }
            req::GET_QUEUE_NUM => {
                let n = h.get_queue_num();
                self.reply(msg.code, &n.to_le_bytes())
            }
            req::SET_VRING_ENABLE => {
                let r = h.set_vring_enable(msg.u32_at(0)?, msg.u32_at(4)? != 0);
                self.ack(&msg, r)
            }
            // Net only, and nothing to do: Torii's switch learns MACs from traffic, and an MTU
            // is the guest's business.
            req::SEND_RARP | req::NET_SET_MTU => self.ack(&msg, Ok(())),
            req::SET_BACKEND_REQ_FD => {
                let Some(f) = msg.files.pop() else {
                    return Err(SessionEnd::Malformed(
                        "SET_BACKEND_REQ_FD without fd".into(),
                    ));
                };
                // SAFETY: the fd was just received with SCM_RIGHTS and is owned by `f` alone.
                let stream =
                    unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f)) };
                h.set_backend_req_fd(Backend::from_stream(stream));
                self.ack(&msg, Ok(()))
            }
            req::GET_CONFIG => {
                // struct { offset, size, flags, payload[size] }
                let (offset, size) = (msg.u32_at(0)?, msg.u32_at(4)?);
                // Exactly `size` bytes (at most 256): zeros past the end of the config space.
                let cfg = h.get_config(offset, size);
                let mut body = msg.payload[..12.min(msg.payload.len())].to_vec();
                body.resize(12, 0);
                body[4..8].copy_from_slice(&(cfg.len() as u32).to_le_bytes());
                body.extend_from_slice(&cfg);
                self.reply(msg.code, &body)
            }
            req::SET_CONFIG => {
                let (offset, size) = (msg.u32_at(0)?, msg.u32_at(4)? as usize);
                if size > MAX_CONFIG_SIZE {
                    let r = Err(crate::handler::Error::InvalidParam("SET_CONFIG size"));
                    return self.ack(&msg, r);
                }
                let data = msg.payload.get(12..12 + size).ok_or_else(|| {
                    SessionEnd::Malformed("SET_CONFIG: payload shorter than its size".into())
                })?;
                let r = self.handler.set_config(offset, data);
                self.ack(&msg, r)
            }
            req::GET_INFLIGHT_FD => {
                let info = InflightInfo::parse(&msg.payload).ok_or_else(|| {
                    SessionEnd::Malformed("GET_INFLIGHT_FD: short payload".into())
                })?;
                match self.handler.get_inflight_fd(&info) {
                    Ok((reply, file)) => self.reply_with_fd(msg.code, &reply.to_bytes(), &file),
                    Err(e) => Err(SessionEnd::Malformed(format!("GET_INFLIGHT_FD: {e}"))),
                }
            }
            req::SET_INFLIGHT_FD => {
                let info = InflightInfo::parse(&msg.payload).ok_or_else(|| {
                    SessionEnd::Malformed("SET_INFLIGHT_FD: short payload".into())
                })?;
                let Some(f) = msg.files.pop() else {
                    return Err(SessionEnd::Malformed("SET_INFLIGHT_FD without fd".into()));
                };
                let r = self.handler.set_inflight_fd(&info, f);
                self.ack(&msg, r)
            }
            req::GET_MAX_MEM_SLOTS => self.reply(msg.code, &MAX_MEM_SLOTS.to_le_bytes()),
            req::ADD_MEM_REG | req::REM_MEM_REG => {
                // struct { padding u64, region }
                let region = msg.region_at(8)?;
                let r = if msg.code == req::ADD_MEM_REG {
                    let Some(f) = msg.files.pop() else {
                        return Err(SessionEnd::Malformed("ADD_MEM_REG without fd".into()));
                    };
                    self.handler.add_mem_region(&region, f)
                } else {
                    self.handler.remove_mem_region(&region)
                };
                self.ack(&msg, r)
            }
            other => {
                // Not negotiated, so a well-behaved frontend never sends it.
                tracing::warn!(request = other, "unsupported vhost-user request");
                self.ack(&msg, Err(crate::handler::Error::Unsupported("request")))
            }
        }
    }
}

fn reply_bytes(code: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HDR_LEN + body.len());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// `sendmsg` of `buf` with `fd` as `SCM_RIGHTS` ancillary data.
fn send_with_fd(stream: &UnixStream, buf: &[u8], fd: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut cmsg = [0u64; 4]; // ≥ CMSG_SPACE(4)
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid starting value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    mh.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
    // SAFETY: the control buffer holds CMSG_SPACE(4) bytes, enough for one header and one fd;
    // CMSG_FIRSTHDR points into it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd.as_raw_fd());
    }
    loop {
        // SAFETY: `mh` points at `iov` (into `buf`) and `cmsg`, both alive for the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            if n as usize != buf.len() {
                return Err(io::Error::other("short write of a reply"));
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recvmsg` into `buf`, taking any `SCM_RIGHTS` file descriptors along.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<File>)> {
    use std::os::fd::AsRawFd;
    const CMSG_BUF: usize = 512; // ≥ CMSG_SPACE(MAX_FDS * 4)
    let mut cmsg = [0u64; CMSG_BUF / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid starting value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.as_mut_ptr().cast();
    mh.msg_controllen = CMSG_BUF as _;
    let n = loop {
        // SAFETY: `mh` points at `iov` (into `buf`) and `cmsg`, both alive for the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut files = Vec::new();
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel just filled, within
    // `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // Every received fd is owned here, so extra ones are closed, not leaked.
                    files.push(File::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if files.len() > MAX_FDS {
        return Err(io::Error::other("too many file descriptors"));
    }
    if mh.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("control data truncated"));
    }
    Ok((n, files))
}
