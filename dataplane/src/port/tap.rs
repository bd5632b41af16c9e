//! Tap port: a Linux tap device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, one fd per queue with
//! `IFF_MULTI_QUEUE`), driven through one io_uring per queue. Reads are kept posted so the
//! kernel fills our buffers as frames arrive; completions are reaped from the shared CQ ring
//! without a syscall, and new reads and writes are submitted once per burst.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};
use torii_vhost_user::landlock::Rights;
use torii_vhost_user_net::hdr::{HDR_LEN_LEGACY, HDR_LEN_MRG};
use torii_vhost_user_net::{BufPool, Offloads, VirtioNetHdr};

use super::{Port, PortStats};
use crate::packet::{Packet, PacketPool, SharedPool};

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

/// The TUN/TAP device every tap queue is opened from.
pub const TUN: &str = "/dev/net/tun";

/// Errors creating a tap port.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap interface name {0:?} is empty, longer than 15 bytes or has a NUL")]
    BadName(String),
    #[error("cannot open /dev/net/tun (is the tun module loaded?): {0}{hint}", hint = sandbox_hint(.0, Rights::DEVICE))]
    Open(io::Error),
    #[error("TUNSETIFF {ifname} failed: {source}{hint}{sandbox}", hint = setiff_hint(source), sandbox = sandbox_hint(source, Rights::IOCTL_DEV))]
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

/// Why the Landlock sandbox refused `/dev/net/tun` (what it needs: `need`), if it did.
fn sandbox_hint(e: &io::Error, need: Rights) -> String {
    torii_vhost_user::landlock::explain(e, std::path::Path::new(TUN), need)
}

/// What a TUNSETIFF error most likely means.
fn setiff_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => " (making a tap needs CAP_NET_ADMIN)",
        Some(libc::EBUSY | libc::EINVAL) => {
            " (the name is taken by another kind of device, or by a tap with other flags)"
        }
        _ => "",
    }
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
    /// Reads completed and not yet handed out (a burst was full, or the port's rate limit
    /// held them back), oldest first: slot and length. Their packets stay in `rx_slots`, so
    /// no read is posted in their place meanwhile — the kernel keeps further frames in the
    /// tap's queue. At most `RX_DEPTH`.
    done: VecDeque<(u16, u32)>,
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
    /// The pool its buffers come from (known once polled): what it still holds when dropped
    /// goes back there.
    home: Option<Arc<SharedPool>>,
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
            home: None,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    fn open_queue(ifname: &str, multi: bool) -> Result<TapQueue, TapError> {
        let path = CString::new(TUN).expect("static path");
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
        // Made disabled, so that what it may do is fixed before its first use.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build((RX_DEPTH + TX_DEPTH) as u32)
            .map_err(TapError::Uring)?;
        // SAFETY: eventfd has no pointer arguments.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(TapError::Uring(io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh fd we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let sub = ring.submitter();
        sub.register_eventfd(eventfd.as_raw_fd())
            .map_err(TapError::Uring)?;
        // A tap queue reads, writes and cancels, nothing else: io_uring's operations are not
        // seen by seccomp, so a PMD thread that someone took over cannot open files or
        // sockets through the ring (no later registration either).
        sub.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::AsyncCancel::CODE),
        ])
        .map_err(TapError::Uring)?;
        sub.register_enable_rings().map_err(TapError::Uring)?;
        Ok(TapQueue {
            fd,
            ring,
            rx_slots: (0..RX_DEPTH).map(|_| None).collect(),
            tx_slots: (0..TX_DEPTH).map(|_| None).collect(),
            tx_free: (0..TX_DEPTH as u16).rev().collect(),
            done: VecDeque::with_capacity(RX_DEPTH),
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

    /// Remembers the pool the port's buffers come from.
    #[inline]
    fn remember(&mut self, pool: &PacketPool) {
        if self.home.is_none() {
            self.home = Some(pool.shared().clone());
        }
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

    /// Takes every completion: finished writes give their packets back to `pool`, finished
    /// reads are parked in `done` (oldest first), failed or short reads freed. Returns the
    /// bad reads and the failed writes.
    fn reap(&mut self, pool: &mut PacketPool) -> (usize, usize) {
        let (mut bad, mut tx_err) = (0, 0);
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            let res = cqe.result();
            if ud & TX_TAG != 0 {
                let i = (ud & !TX_TAG) as usize;
                if let Some(p) = self.tx_slots.get_mut(i).and_then(Option::take) {
                    pool.free(p);
                    self.tx_free.push(i as u16);
                }
                if res < 0 {
                    tx_err += 1;
                }
                continue;
            }
            let Some(slot) = self.rx_slots.get_mut(ud as usize) else {
                continue;
            };
            if slot.is_none() {
                continue;
            }
            if res < VNET_HDR as i32 {
                bad += 1;
                if let Some(p) = slot.take() {
                    pool.free(p);
                }
                continue;
            }
            // One read per slot at a time: never more than RX_DEPTH parked.
            self.done.push_back((ud as u16, res as u32));
        }
        (bad, tx_err)
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
        self.remember(pool);
        let Some(tq) = self.queues.get_mut(q as usize) else {
            return;
        };
        let (bad, tx_err) = tq.reap(pool);
        let (mut n, mut bytes) = (0, 0);
        while n < max {
            let Some((slot, len)) = tq.done.pop_front() else {
                break;
            };
            let Some(mut p) = tq.rx_slots.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            let area = p.read_area(VNET_HDR);
            let mut h = [0u8; HDR_LEN_LEGACY];
            h.copy_from_slice(&area[..HDR_LEN_LEGACY]);
            let hdr = VirtioNetHdr::parse(&h);
            p.set_read(VNET_HDR, len as usize, hdr);
            bytes += p.len();
            n += 1;
            out.push(p);
        }
        tq.post_reads(pool);
        tq.submit();
        self.stats.rx(self.qids[q as usize], n, bytes);
        PortStats::add(&self.stats.rx_dropped_invalid, bad);
        PortStats::add(&self.stats.tx_errors, tx_err);
    }

    fn tx_burst(&mut self, q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
        self.remember(pool);
        let Some(tq) = self.queues.get_mut(q as usize) else {
            PortStats::add(&self.stats.tx_dropped_no_room, pkts.len());
            pkts.drain(..).for_each(|p| pool.free(p));
            return;
        };
        if tq.tx_free.len() < pkts.len() {
            // Finished writes are otherwise reaped by `rx_burst`, which a rate-limited port
            // may not get for a while.
            let (bad, tx_err) = tq.reap(pool);
            PortStats::add(&self.stats.rx_dropped_invalid, bad);
            PortStats::add(&self.stats.tx_errors, tx_err);
        }
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
        // Reads held back (parked) are work too: no completion will announce them.
        self.queues
            .iter_mut()
            .any(|q| !q.done.is_empty() || !q.ring.completion().is_empty())
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
                    home: self.home.clone(),
                }) as Box<dyn Port>
            })
            .collect();
        self.qids.clear();
        Some(parts)
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        // Posted reads point into our packets: cancel them, then wait for every outstanding
        // completion before the buffers go back to the pool (parked reads are done already).
        for q in &mut self.queues {
            let outstanding = q.rx_slots.iter().filter(|s| s.is_some()).count()
                + q.tx_slots.iter().filter(|s| s.is_some()).count()
                - q.done.len();
            if outstanding == 0 {
                give_back(q, self.home.as_deref());
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
            } else {
                give_back(q, self.home.as_deref());
            }
        }
    }
}

/// The packets a queue still holds go back to `home`, the pool they came from: a tap that is
/// removed does not shrink the pool by its posted reads.
fn give_back(q: &mut TapQueue, home: Option<&SharedPool>) {
    q.done.clear();
    for s in q.rx_slots.iter_mut().chain(q.tx_slots.iter_mut()) {
        if let (Some(p), Some(h)) = (s.take(), home) {
            h.give_back(p);
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A tap of its own (needs root: CAP_NET_ADMIN and /dev/net/tun) with IPv6 off, so that
    /// the kernel sends nothing on it by itself.
    fn tap(tag: &str, queues: u16) -> TapPort {
        const DEFAULT: &str = "/proc/sys/net/ipv6/conf/default/disable_ipv6";
        // The default applies to interfaces made while it is set: one test at a time sets it,
        // and puts back what the host had.
        static HOST_SETTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let ifname = format!("tt{tag}{}", std::process::id() % 100_000);
        let _one = HOST_SETTING.lock().unwrap_or_else(|e| e.into_inner());
        let before = std::fs::read_to_string(DEFAULT).unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(DEFAULT, "1");
        let t = TapPort::open("t", &ifname, queues);
        let _ = std::fs::write(DEFAULT, before.trim());
        t.unwrap_or_else(|e| panic!("tap {ifname} (run as root, with the tun module): {e}"))
    }

    /// Sends `n` frames into the tap's kernel side (a packet socket on its interface): they
    /// arrive on the tap's queues as reads.
    fn inject(ifname: &str, n: usize) {
        let name = CString::new(ifname).unwrap();
        // SAFETY: plain calls with valid arguments; the fd is closed below.
        unsafe {
            let idx = libc::if_nametoindex(name.as_ptr());
            assert!(idx > 0, "no interface {ifname}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_ifindex = idx as i32;
            sa.sll_halen = 6;
            let frame = crate::port::null::udp_frame(64);
            for _ in 0..n {
                let r = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(r, frame.len() as isize, "{}", io::Error::last_os_error());
            }
            libc::close(fd);
        }
    }

    #[test]
    fn held_back_reads_wait_in_order_while_writes_complete() {
        let pool = SharedPool::new(1024);
        pool.populate(1024);
        let mut pp = PacketPool::attach(pool);
        let mut t = tap("h", 1);
        let mut out = Vec::new();
        // Posts the reads; nothing has arrived.
        t.rx_burst(0, &mut pp, &mut out, 32);
        assert!(out.is_empty());
        inject(&t.ifname, 10);
        // Polled with no allowance (a rate limit): the reads complete and wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.queues[0].done.len() < 10 && Instant::now() < deadline {
            t.rx_burst(0, &mut pp, &mut out, 0);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(out.is_empty());
        assert_eq!(t.queues[0].done.len(), 10, "reads completed and parked");
        assert!(
            t.arm_wakeup(),
            "an adaptive PMD must not sleep on parked reads"
        );
        // Meanwhile the port keeps sending (more than its writes in flight), without drops:
        // finished writes are reaped by the sends themselves.
        let frame = crate::port::null::udp_frame(60);
        for _ in 0..(3 * TX_DEPTH / BURST_T) {
            let mut pkts: Vec<Packet> = (0..BURST_T)
                .map(|_| {
                    let mut p = pp.alloc().expect("pool");
                    p.fill(&frame);
                    p
                })
                .collect();
            t.tx_burst(0, &mut pp, &mut pkts);
            std::thread::sleep(Duration::from_millis(2));
        }
        let st = t.stats().snapshot();
        assert_eq!(st.tx_packets, 3 * TX_DEPTH as u64);
        assert_eq!(st.tx_dropped_no_room, 0, "{st:?}");
        // Handed out a few at a time, in order of arrival; none lost.
        t.rx_burst(0, &mut pp, &mut out, 4);
        assert_eq!(out.len(), 4);
        t.rx_burst(0, &mut pp, &mut out, 32);
        assert_eq!(out.len(), 10);
        assert!(out.iter().all(|p| p.len() == 64));
        out.drain(..).for_each(|p| pp.free(p));
    }

    /// A tap queue's ring reads, writes and cancels, nothing else: an operation seccomp would
    /// not see (here a file open) completes with EACCES.
    #[test]
    fn the_ring_refuses_operations_the_tap_does_not_make() {
        let mut t = tap("ur", 1);
        let ring = &mut t.queues[0].ring;
        let path = CString::new("/etc/hostname").unwrap();
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(u64::MAX - 1);
        // SAFETY: `path` outlives the submission, which completes before this returns.
        unsafe { ring.submission().push(&open).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let c = ring
            .completion()
            .find(|c| c.user_data() == u64::MAX - 1)
            .expect("the open's completion");
        assert_eq!(c.result(), -libc::EACCES);
    }

    #[test]
    fn a_dropped_tap_gives_its_buffers_back_to_the_pool() {
        let pool = SharedPool::new(512);
        pool.populate(512);
        let mut pp = PacketPool::attach(pool);
        let mut t = tap("d", 2);
        let mut out = Vec::new();
        t.rx_burst(0, &mut pp, &mut out, 32);
        t.rx_burst(1, &mut pp, &mut out, 32);
        assert_eq!(pp.available(), 512 - 2 * RX_DEPTH, "reads posted");
        // Some arrive and wait (held back), the rest stay posted.
        inject(&t.ifname, 5);
        std::thread::sleep(Duration::from_millis(50));
        t.rx_burst(0, &mut pp, &mut out, 0);
        t.rx_burst(1, &mut pp, &mut out, 0);
        let parked: usize = t.queues.iter().map(|q| q.done.len()).sum();
        assert_eq!(parked, 5);
        drop(t);
        assert_eq!(pp.available(), 512, "every buffer is back");
    }

    const BURST_T: usize = crate::port::BURST;
}
