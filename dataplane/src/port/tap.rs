//! Tap port: a Linux tap device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, one fd per queue with
//! `IFF_MULTI_QUEUE`), driven through one io_uring per queue. Reads are kept posted so the
//! kernel fills our buffers as frames arrive; completions are reaped from the shared CQ ring
//! without a syscall, and new reads and writes are submitted once per burst.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use torii_vhost_user_net::hdr::{HDR_LEN_LEGACY, HDR_LEN_MRG};
use torii_vhost_user_net::{BufPool, Offloads, VirtioNetHdr};

use super::{Port, PortStats};
use crate::packet::{Packet, PacketPool};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;

/// Reads kept posted per queue.
const RX_DEPTH: usize = 64;
/// Writes in flight per queue.
const TX_DEPTH: usize = 128;
const TX_TAG: u64 = 1 << 63;
/// Every vnet header we exchange with the tap is 12 bytes (`TUNSETVNETHDRSZ`).
const VNET_HDR: usize = HDR_LEN_MRG;

/// Errors creating a tap port.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap interface name {0:?} is empty, longer than 15 bytes or has a NUL")]
    BadName(String),
    #[error("cannot open /dev/net/tun (is the tun module loaded?): {0}")]
    Open(io::Error),
    #[error("TUNSETIFF {ifname} failed (EPERM: making a tap needs CAP_NET_ADMIN; EBUSY or EINVAL: the name is taken by another kind of device): {source}")]
    SetIff { ifname: String, source: io::Error },
    #[error("tap {ifname}: {what} failed: {source}")]
    Ioctl {
        ifname: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("io_uring setup failed (kernel without io_uring?): {0}")]
    Uring(io::Error),
    #[error("queues must be 1..=16, got {0}")]
    Queues(u16),
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

struct TapQueue {
    fd: OwnedFd,
    ring: IoUring,
    rx_slots: Vec<Option<Packet>>,
    tx_slots: Vec<Option<Packet>>,
    tx_free: Vec<u16>,
    eventfd: OwnedFd,
    dirty: bool,
}

/// A tap device with its queues.
pub struct TapPort {
    name: String,
    ifname: String,
    queues: Vec<TapQueue>,
    /// The device's queue number of each of `queues` (for the per-queue counters).
    qids: Vec<u16>,
    stats: Arc<PortStats>,
    rx_offloads: Offloads,
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: callers pass a request whose argument type matches `arg` and which lives for the
    // duration of the call.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl TapPort {
    /// Creates (or attaches to) tap `ifname` with `queues` queues, brings it up, and posts
    /// receive buffers from `pool`.
    pub fn open(name: &str, ifname: &str, queues: u16) -> Result<Self, TapError> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
            return Err(TapError::BadName(ifname.to_string()));
        }
        if queues == 0 || queues > 16 {
            return Err(TapError::Queues(queues));
        }
        let mut qs = Vec::with_capacity(queues as usize);
        for _ in 0..queues {
            qs.push(Self::open_queue(ifname, queues > 1)?);
        }
        set_link_up(ifname).map_err(|source| TapError::Ioctl {
            ifname: ifname.to_string(),
            what: "SIOCSIFFLAGS(IFF_UP)",
            source,
        })?;
        Ok(TapPort {
            name: name.to_string(),
            ifname: ifname.to_string(),
            queues: qs,
            qids: (0..queues).collect(),
            stats: Arc::new(PortStats::with_queues(queues)),
            rx_offloads: Offloads::empty(),
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    fn open_queue(ifname: &str, multi: bool) -> Result<TapQueue, TapError> {
        let path = CString::new("/dev/net/tun").expect("static path");
        // io_uring honours O_NONBLOCK by returning EAGAIN instead of waiting, so the fd is
        // blocking: io_uring then waits for readiness itself.
        // SAFETY: `path` is a valid NUL-terminated string.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(TapError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | if multi { IFF_MULTI_QUEUE } else { 0 },
            _pad: [0; 22],
        };
        req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        ioctl_ptr(fd.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::SetIff {
            ifname: ifname.to_string(),
            source,
        })?;
        let ioctl_err = |what| {
            move |source| TapError::Ioctl {
                ifname: ifname.to_string(),
                what,
                source,
            }
        };
        let mut hdr_sz: libc::c_int = VNET_HDR as libc::c_int;
        ioctl_ptr(fd.as_raw_fd(), TUNSETVNETHDRSZ, &mut hdr_sz)
            .map_err(ioctl_err("TUNSETVNETHDRSZ"))?;
        // TUNSETOFFLOAD takes its argument by value.
        // SAFETY: plain integer argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(ioctl_err("TUNSETOFFLOAD")(io::Error::last_os_error()));
        }
        let ring = IoUring::new((RX_DEPTH + TX_DEPTH) as u32).map_err(TapError::Uring)?;
        // SAFETY: eventfd has no pointer arguments.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(TapError::Uring(io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh fd we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(TapError::Uring)?;
        Ok(TapQueue {
            fd,
            ring,
            rx_slots: (0..RX_DEPTH).map(|_| None).collect(),
            tx_slots: (0..TX_DEPTH).map(|_| None).collect(),
            tx_free: (0..TX_DEPTH as u16).rev().collect(),
            eventfd,
            dirty: false,
        })
    }

    fn set_offloads(&mut self, o: Offloads) {
        let flags = o.to_tun_flags() as libc::c_ulong;
        for q in &self.queues {
            // SAFETY: plain integer argument.
            if unsafe { libc::ioctl(q.fd.as_raw_fd(), TUNSETOFFLOAD, flags) } < 0 {
                tracing::warn!(port = %self.name, "TUNSETOFFLOAD {flags:#x}: {}", io::Error::last_os_error());
            }
        }
        self.rx_offloads = o;
    }
}

impl TapQueue {
    /// Posts reads into every empty receive slot.
    fn post_reads(&mut self, pool: &mut PacketPool) {
        for (i, slot) in self.rx_slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let Some(mut p) = pool.alloc() else { return };
            let area = p.read_area(VNET_HDR);
            let sqe = opcode::Read::new(
                types::Fd(self.fd.as_raw_fd()),
                area.as_mut_ptr(),
                area.len() as u32,
            )
            .build()
            .user_data(i as u64);
            // SAFETY: the buffer belongs to the packet parked in `rx_slots[i]` until its
            // completion is reaped, and the packet's heap buffer does not move.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                pool.free(p);
                return;
            }
            *slot = Some(p);
            self.dirty = true;
        }
    }

    fn submit(&mut self) {
        if self.dirty {
            // One syscall per burst, however many reads and writes were queued.
            let _ = self.ring.submit();
            self.dirty = false;
        }
    }
}

impl Port for TapPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "tap"
    }

    fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    fn rx_burst(&mut self, q: u16, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        let Some(tq) = self.queues.get_mut(q as usize) else {
            return;
        };
        let (mut n, mut bytes, mut bad, mut tx_done, mut tx_err) = (0, 0, 0, 0, 0);
        {
            let mut cq = tq.ring.completion();
            cq.sync();
            while n < max {
                let Some(cqe) = cq.next() else { break };
                let ud = cqe.user_data();
                let res = cqe.result();
                if ud & TX_TAG != 0 {
                    let i = (ud & !TX_TAG) as usize;
                    if let Some(p) = tq.tx_slots.get_mut(i).and_then(Option::take) {
                        pool.free(p);
                        tq.tx_free.push(i as u16);
                    }
                    if res < 0 {
                        tx_err += 1;
                    } else {
                        tx_done += 1;
                    }
                    continue;
                }
                let Some(mut p) = tq.rx_slots.get_mut(ud as usize).and_then(Option::take) else {
                    continue;
                };
                if res < VNET_HDR as i32 {
                    bad += 1;
                    pool.free(p);
                    continue;
                }
                let len = res as usize;
                let area = p.read_area(VNET_HDR);
                let mut h = [0u8; HDR_LEN_LEGACY];
                h.copy_from_slice(&area[..HDR_LEN_LEGACY]);
                let hdr = VirtioNetHdr::parse(&h);
                p.set_read(VNET_HDR, len, hdr);
                bytes += p.len();
                n += 1;
                out.push(p);
            }
        }
        let _ = tx_done;
        tq.post_reads(pool);
        tq.submit();
        self.stats.rx(self.qids[q as usize], n, bytes);
        PortStats::add(&self.stats.rx_dropped_invalid, bad);
        PortStats::add(&self.stats.tx_errors, tx_err);
    }

    fn tx_burst(&mut self, q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
        let Some(tq) = self.queues.get_mut(q as usize) else {
            PortStats::add(&self.stats.tx_dropped_no_room, pkts.len());
            pkts.drain(..).for_each(|p| pool.free(p));
            return;
        };
        let (mut sent, mut bytes, mut no_room) = (0, 0, 0);
        for mut p in pkts.drain(..) {
            let Some(slot) = tq.tx_free.pop() else {
                no_room += 1;
                pool.free(p);
                continue;
            };
            let hdr = torii_vhost_user_net::NetBuf::hdr(&p);
            let len = p.len();
            let Some(area) = p.with_prefix(VNET_HDR) else {
                tq.tx_free.push(slot);
                no_room += 1;
                pool.free(p);
                continue;
            };
            hdr.write(&mut area[..VNET_HDR], 0);
            let sqe = opcode::Write::new(
                types::Fd(tq.fd.as_raw_fd()),
                area.as_ptr(),
                area.len() as u32,
            )
            .build()
            .user_data(TX_TAG | slot as u64);
            // SAFETY: the packet is parked in `tx_slots[slot]` until its completion is reaped.
            if unsafe { tq.ring.submission().push(&sqe) }.is_err() {
                tq.tx_free.push(slot);
                no_room += 1;
                pool.free(p);
                continue;
            }
            tq.tx_slots[slot as usize] = Some(p);
            tq.dirty = true;
            sent += 1;
            bytes += len;
        }
        tq.submit();
        self.stats.tx(self.qids[q as usize], sent, bytes);
        PortStats::add(&self.stats.tx_dropped_no_room, no_room);
    }

    fn tx_offloads(&self) -> Offloads {
        // The kernel segments and checksums whatever a vnet header asks for.
        Offloads::all()
    }

    fn set_rx_offloads(&mut self, accepted: Offloads) {
        if accepted != self.rx_offloads {
            self.set_offloads(accepted);
        }
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    fn arm_wakeup(&mut self) -> bool {
        self.queues
            .iter_mut()
            .any(|q| !q.ring.completion().is_empty())
    }

    fn wakeup_fds(&self) -> Vec<RawFd> {
        self.queues.iter().map(|q| q.eventfd.as_raw_fd()).collect()
    }

    fn queue_id(&self, q: u16) -> u16 {
        self.qids.get(q as usize).copied().unwrap_or(q)
    }

    fn split(&mut self, groups: &[Vec<u16>]) -> Option<Vec<Box<dyn Port>>> {
        let mut all: Vec<u16> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        let whole = self.qids.iter().enumerate().all(|(i, &q)| q as usize == i);
        if !whole || all != self.qids || groups.iter().any(|g| g.is_empty()) {
            return None;
        }
        let mut slots: Vec<Option<TapQueue>> = self.queues.drain(..).map(Some).collect();
        let parts = groups
            .iter()
            .map(|g| {
                Box::new(TapPort {
                    name: self.name.clone(),
                    ifname: self.ifname.clone(),
                    // Queue q of the device was at index q: `qids` was 0..n.
                    queues: g.iter().filter_map(|&q| slots[q as usize].take()).collect(),
                    qids: g.clone(),
                    stats: self.stats.clone(),
                    rx_offloads: self.rx_offloads,
                }) as Box<dyn Port>
            })
            .collect();
        self.qids.clear();
        Some(parts)
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        // Posted reads point into our packets: close the fds first so the kernel cancels them,
        // then wait for every outstanding completion before the buffers are freed.
        for q in &mut self.queues {
            let outstanding = q.rx_slots.iter().filter(|s| s.is_some()).count()
                + q.tx_slots.iter().filter(|s| s.is_some()).count();
            if outstanding == 0 {
                continue;
            }
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(u64::MAX);
            // SAFETY: a cancel request references no buffer.
            let _ = unsafe { q.ring.submission().push(&cancel) };
            let mut left = outstanding;
            let mut spins = 0;
            while left > 0 && spins < 100 {
                let _ = q.ring.submit_and_wait(1);
                for cqe in q.ring.completion() {
                    if cqe.user_data() != u64::MAX {
                        left = left.saturating_sub(1);
                    }
                }
                spins += 1;
            }
            if left > 0 {
                // The kernel still holds buffers: leak them rather than free memory it may
                // write to.
                for s in q.rx_slots.iter_mut().chain(q.tx_slots.iter_mut()) {
                    if let Some(p) = s.take() {
                        std::mem::forget(p);
                    }
                }
            }
        }
    }
}

/// Sets IFF_UP on `ifname`.
pub fn set_link_up(ifname: &str) -> io::Result<()> {
    // SAFETY: socket has no pointer arguments.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
    req.flags |= libc::IFF_UP as i16;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
}
