//! PMD (poll-mode driver) workers: one thread per configured CPU, each owning its ports and a
//! packet pool, forwarding bursts between cross-connected ports. No locks, no allocation and
//! no syscalls per packet; in adaptive mode an idle PMD sleeps in epoll until a port wakes it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use torii_vhost_user_net::{
    new_event_consumer_and_notifier, BufPool, EventFlag, EventNotifier, NetBuf,
};

use crate::offload::{fixup, Fixup};
use crate::packet::{Packet, PacketPool, SharedPool};
use crate::port::{Port, PortStats, BURST};
use crate::ratelimit::{Limiter, RateLimit};
use crate::switch::mactable::PortId;
use crate::switch::vlan::VlanMode;
use crate::switch::{PortLink, Switch, SwitchPort};

/// How a PMD waits when it has nothing to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PmdMode {
    /// Busy-poll forever: lowest latency, one core at 100 %.
    Poll,
    /// Poll while there is traffic; after a run of empty rounds, enable guest notifications and
    /// sleep until a kick or a tap completion arrives.
    #[default]
    Adaptive,
}

/// Empty poll rounds before an adaptive PMD goes to sleep (a few tens of microseconds).
const IDLE_ROUNDS_BEFORE_SLEEP: u32 = 2048;
/// Upper bound on one sleep, so a lost wakeup costs at most this much latency.
const MAX_SLEEP_MS: i32 = 100;

/// Two ports whose traffic is forwarded to each other.
pub struct XConnect {
    pub a: Box<dyn Port>,
    pub b: Box<dyn Port>,
    /// The ports' ids (for commands), and their rate limits on what they take in.
    pub ids: [PortId; 2],
    pub limits: [Option<Limiter>; 2],
}

/// PMD counters, published every few thousand rounds. Cycles are time-stamp counter ticks
/// (nanoseconds where there is no TSC); time asleep counts as neither busy nor idle.
#[derive(Default)]
pub struct PmdStats {
    pub busy_rounds: AtomicU64,
    pub idle_rounds: AtomicU64,
    pub sleeps: AtomicU64,
    /// Cycles spent in rounds that moved packets, and in rounds that found none.
    pub busy_cycles: AtomicU64,
    pub idle_cycles: AtomicU64,
    /// Packets received from all ports in busy rounds.
    pub packets: AtomicU64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PmdStatsSnapshot {
    pub id: usize,
    pub cpu: Option<usize>,
    pub busy_rounds: u64,
    pub idle_rounds: u64,
    pub sleeps: u64,
    pub busy_cycles: u64,
    pub idle_cycles: u64,
    pub packets: u64,
    /// Busy cycles per packet received: the PMD's cost per packet, whatever the offered load.
    pub cycles_per_packet: f64,
    /// Measured rate of the cycle counter, to turn cycles into time.
    pub cycles_per_sec: f64,
    /// The ports it polls (every queue of each).
    pub ports: Vec<String>,
}

/// How others wake a PMD: its eventfd, and whether it is (about to be) asleep. A PMD that
/// queues packets into another PMD's port inbox pokes it once per burst; the poke costs one
/// load unless the owner sleeps (adaptive mode), and then one eventfd write.
pub struct PmdWake {
    asleep: AtomicBool,
    notifier: EventNotifier,
}

impl PmdWake {
    pub fn new() -> io::Result<(Arc<PmdWake>, torii_vhost_user_net::EventConsumer)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok((
            Arc::new(PmdWake {
                asleep: AtomicBool::new(false),
                notifier,
            }),
            consumer,
        ))
    }

    /// Wakes the PMD if it sleeps. Call after queueing work for it.
    #[inline]
    pub fn poke(&self) {
        // Pairs with the fence in `Worker::sleep`: either the PMD sees the work when it checks
        // before sleeping, or this sees `asleep`.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) {
            let _ = self.notifier.notify();
        }
    }
}

/// A change the control thread asks a PMD to make between two rounds.
pub enum PmdCommand {
    /// Start polling a switch port.
    AddSwitchPort(SwitchPort),
    /// Stop polling a switch port and hand it back (to be dropped off the data path).
    RemoveSwitchPort(PortId, mpsc::SyncSender<Option<Box<dyn Port>>>),
    /// A switch port another PMD polls: send to it through its inbox.
    AddRemote(Arc<PortLink>, VlanMode),
    /// Forget a port another PMD polls; answer once nothing more will be queued for it.
    RemoveRemote(PortId, mpsc::SyncSender<()>),
    SetVlan(PortId, VlanMode),
    /// Limit what a port (switched or cross-connected) takes in, or lift its limit.
    SetRateLimit(PortId, Option<RateLimit>),
}

/// A running PMD thread.
pub struct PmdHandle {
    pub id: usize,
    pub cpu: Option<usize>,
    stop: Arc<AtomicBool>,
    waker: EventNotifier,
    wake: Arc<PmdWake>,
    commands: mpsc::Sender<PmdCommand>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<PmdStats>,
    /// When the PMD started, in time and in cycles.
    started: (std::time::Instant, u64),
}

impl PmdHandle {
    pub fn snapshot(&self) -> PmdStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (busy_cycles, packets) = (l(&self.stats.busy_cycles), l(&self.stats.packets));
        let secs = self.started.0.elapsed().as_secs_f64();
        PmdStatsSnapshot {
            id: self.id,
            cpu: self.cpu,
            busy_rounds: l(&self.stats.busy_rounds),
            idle_rounds: l(&self.stats.idle_rounds),
            sleeps: l(&self.stats.sleeps),
            busy_cycles,
            idle_cycles: l(&self.stats.idle_cycles),
            packets,
            cycles_per_packet: busy_cycles as f64 / packets.max(1) as f64,
            cycles_per_sec: if secs > 0.0 {
                cycles().wrapping_sub(self.started.1) as f64 / secs
            } else {
                0.0
            },
            ports: Vec::new(),
        }
    }

    /// How to wake this PMD.
    pub fn wake(&self) -> Arc<PmdWake> {
        self.wake.clone()
    }

    /// Queues `cmd` for the PMD and wakes it if it sleeps. False if the PMD has stopped.
    pub fn command(&self, cmd: PmdCommand) -> bool {
        let sent = self.commands.send(cmd).is_ok();
        let _ = self.waker.notify();
        sent
    }

    /// Stops the thread; its ports are dropped with it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PmdHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts PMD `id` on `cpu` with the given cross-connects and its part of the switch. It adds
/// `pool_size` packets to the shared pool (made on its own CPU).
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    id: usize,
    cpu: Option<usize>,
    mode: PmdMode,
    pool: (Arc<SharedPool>, usize),
    wake: (Arc<PmdWake>, torii_vhost_user_net::EventConsumer),
    xconnects: Vec<XConnect>,
    switch: Switch,
) -> io::Result<PmdHandle> {
    let (wake_state, consumer) = wake;
    let notifier = wake_state.notifier.try_clone()?;
    let handle_wake = wake_state.clone();
    let (commands, cmd_rx) = mpsc::channel();
    let mut w = Worker {
        xconnects,
        switch,
        commands: cmd_rx,
        pool: PacketPool::attach(pool.0.clone()),
        batches: Batches::new(),
        stats: Arc::new(PmdStats::default()),
        wake: consumer,
        waker: notifier.try_clone()?,
        wake_state,
    };
    w.for_each_port(|p| p.set_waker(&notifier));
    let stop = Arc::new(AtomicBool::new(false));
    let stats = w.stats.clone();
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("pmd{id}"))
        .spawn(move || {
            if let Some(c) = cpu {
                if let Err(e) = pin_to_cpu(c) {
                    tracing::warn!(pmd = id, cpu = c, "cannot pin PMD: {e}");
                }
            }
            // The buffers are allocated on the PMD's thread (and so, first touched, on its
            // NUMA node).
            pool.0.populate(pool.1);
            // Set up: from here on, a PMD's short list.
            torii_vhost_user::seccomp::enter(torii_vhost_user::seccomp::ThreadClass::Pmd);
            w.run(mode, &s);
        })?;
    Ok(PmdHandle {
        id,
        cpu,
        stop,
        waker: notifier,
        wake: handle_wake,
        commands,
        thread: Some(thread),
        stats,
        started: (std::time::Instant::now(), cycles()),
    })
}

struct Worker {
    xconnects: Vec<XConnect>,
    switch: Switch,
    commands: mpsc::Receiver<PmdCommand>,
    pool: PacketPool,
    batches: Batches,
    stats: Arc<PmdStats>,
    wake: torii_vhost_user_net::EventConsumer,
    /// The notifier of `wake`, for ports added later.
    waker: EventNotifier,
    wake_state: Arc<PmdWake>,
}

impl Worker {
    fn run(&mut self, mode: PmdMode, stop: &AtomicBool) {
        let mut fds = vec![self.wake.as_raw_fd()];
        self.for_each_port(|p| fds.extend(p.wakeup_fds()));
        let epoll = match Epoll::new(&fds) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!("epoll setup failed, PMD will busy-poll: {e}");
                None
            }
        };
        let (mut busy, mut idle, mut idle_run) = (0u64, 0u64, 0u32);
        let mut c = Cycles::default();
        let mut t0 = cycles();
        let mut epoll = epoll;
        while !stop.load(Ordering::Relaxed) {
            // An empty channel is one atomic load.
            while let Ok(cmd) = self.commands.try_recv() {
                self.apply(cmd, &mut epoll);
            }
            let mut work = 0;
            for xc in &mut self.xconnects {
                xc.a.poll_start();
                xc.b.poll_start();
                xc.a.set_rx_offloads(xc.b.tx_offloads());
                xc.b.set_rx_offloads(xc.a.tx_offloads());
                // The round's start (the cycle count read after the last round) is the rate
                // limiters' clock: no extra read.
                let [la, lb] = &mut xc.limits;
                let (pool, b) = (&mut self.pool, &mut self.batches);
                work += forward(&mut *xc.a, &mut *xc.b, pool, b, la.as_mut(), t0);
                work += forward(&mut *xc.b, &mut *xc.a, pool, b, lb.as_mut(), t0);
            }
            work += self.switch.poll(&mut self.pool, &mut self.batches);
            let t1 = cycles();
            if work > 0 {
                busy += 1;
                idle_run = 0;
                c.busy += t1.wrapping_sub(t0);
                c.packets += work as u64;
            } else {
                idle += 1;
                idle_run += 1;
                c.idle += t1.wrapping_sub(t0);
                if mode == PmdMode::Adaptive && idle_run >= IDLE_ROUNDS_BEFORE_SLEEP {
                    if let Some(ep) = &epoll {
                        self.sleep(ep, stop);
                    }
                    idle_run = 0;
                }
            }
            // A sleep is neither busy nor idle time.
            t0 = cycles();
            if (busy + idle) & 0xfff == 0 {
                self.publish(&mut busy, &mut idle, &mut c);
            }
        }
        self.publish(&mut busy, &mut idle, &mut c);
    }

    fn publish(&self, busy: &mut u64, idle: &mut u64, c: &mut Cycles) {
        self.stats.busy_rounds.fetch_add(*busy, Ordering::Relaxed);
        self.stats.idle_rounds.fetch_add(*idle, Ordering::Relaxed);
        self.stats.busy_cycles.fetch_add(c.busy, Ordering::Relaxed);
        self.stats.idle_cycles.fetch_add(c.idle, Ordering::Relaxed);
        self.stats.packets.fetch_add(c.packets, Ordering::Relaxed);
        *busy = 0;
        *idle = 0;
        *c = Cycles::default();
    }

    fn sleep(&mut self, ep: &Epoll, stop: &AtomicBool) {
        let mut pending = false;
        self.for_each_port(|p| pending |= p.arm_wakeup());
        self.wake_state.asleep.store(true, Ordering::Relaxed);
        // Pairs with the fence in `PmdWake::poke`.
        std::sync::atomic::fence(Ordering::SeqCst);
        pending |= self.switch.inbox_pending();
        if !pending && !stop.load(Ordering::Acquire) {
            self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            ep.wait(MAX_SLEEP_MS);
        }
        self.wake_state.asleep.store(false, Ordering::Relaxed);
        self.for_each_port(|p| p.disarm_wakeup());
    }

    #[cold]
    fn apply(&mut self, cmd: PmdCommand, epoll: &mut Option<Epoll>) {
        let sw = &mut self.switch;
        match cmd {
            PmdCommand::AddSwitchPort(mut p) => {
                p.port.set_waker(&self.waker);
                if let Some(ep) = epoll {
                    for fd in p.port.wakeup_fds() {
                        if let Err(e) = ep.add(fd) {
                            tracing::warn!(port = p.port.name(), "epoll: {e}");
                        }
                    }
                }
                sw.add_port(p);
            }
            PmdCommand::RemoveSwitchPort(id, reply) => {
                let p = sw.remove_port(id, &mut self.pool);
                if let (Some(ep), Some(p)) = (epoll.as_ref(), &p) {
                    for fd in p.wakeup_fds() {
                        ep.del(fd);
                    }
                }
                let _ = reply.send(p);
            }
            PmdCommand::AddRemote(link, vlan) => sw.add_remote(link, vlan),
            PmdCommand::RemoveRemote(id, ack) => {
                sw.remove_remote(id);
                let _ = ack.send(());
            }
            PmdCommand::SetVlan(id, v) => sw.set_vlan(id, v),
            PmdCommand::SetRateLimit(id, r) => {
                let now = cycles();
                for xc in &mut self.xconnects {
                    for (k, port) in [&xc.a, &xc.b].into_iter().enumerate() {
                        if xc.ids[k] == id {
                            xc.limits[k] = r.map(|r| r.limiter_for(&**port, now));
                        }
                    }
                }
                sw.set_rate_limit(id, r, now);
            }
        }
    }

    /// Calls `f` on every port this PMD polls.
    fn for_each_port(&mut self, mut f: impl FnMut(&mut dyn Port)) {
        for xc in &mut self.xconnects {
            f(&mut *xc.a);
            f(&mut *xc.b);
        }
        self.switch.ports_mut().for_each(|p| f(&mut **p));
    }
}

/// Cycle counts not yet published.
#[derive(Default)]
struct Cycles {
    busy: u64,
    idle: u64,
    packets: u64,
}

/// A cheap, monotonic cycle count: the time-stamp counter (no syscall, a few tens of cycles),
/// or nanoseconds since an arbitrary start elsewhere.
#[inline]
pub fn cycles() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: RDTSC has no preconditions and touches no memory.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

/// Buffers a PMD reuses every round, allocated once.
pub(crate) struct Batches {
    /// One burst as received.
    pub rx: Vec<Packet>,
    pub fx: Fixups,
}

/// Scratch space of the software offload fallbacks.
pub(crate) struct Fixups {
    /// Packets after software fixups, sent a burst at a time.
    tx: Vec<Packet>,
    /// The segments of one GSO super-frame.
    segs: Vec<Packet>,
}

impl Batches {
    pub fn new() -> Self {
        Batches {
            rx: Vec::with_capacity(BURST),
            fx: Fixups {
                tx: Vec::with_capacity(BURST),
                segs: Vec::with_capacity(crate::gso::MAX_SEGS),
            },
        }
    }
}

/// Sends all of `pkts` (at most a burst) on queue `q` of `dst`, completing in software the
/// offloads `dst` cannot take.
#[inline]
pub(crate) fn transmit(
    dst: &mut dyn Port,
    q: u16,
    pkts: &mut Vec<Packet>,
    pool: &mut PacketPool,
    fx: &mut Fixups,
) {
    let accepts = dst.tx_offloads();
    if pkts
        .iter()
        .any(|p| !accepts.contains(p.hdr().required_offloads()))
    {
        send_with_fixups(pkts, fx, dst, q, accepts, pool);
    } else {
        dst.tx_burst(q, pool, pkts);
    }
    pkts.clear();
}

/// Moves one burst per queue from `src` to `dst`, no more than `limit` lets `src` take at
/// time `now`. Returns the packets received.
fn forward(
    src: &mut dyn Port,
    dst: &mut dyn Port,
    pool: &mut PacketPool,
    b: &mut Batches,
    mut limit: Option<&mut Limiter>,
    now: u64,
) -> usize {
    let mut total = 0;
    let dq = dst.num_queues().max(1);
    let nq = src.num_queues();
    // A limited port's queues take turns at being polled first.
    let first = limit.as_deref_mut().map_or(0, |l| l.first_queue(nq));
    for k in 0..nq {
        let q = if first + k < nq {
            first + k
        } else {
            first + k - nq
        };
        // Pull only what the destination can take: under overload packets then wait (or are
        // dropped) where they are, instead of being copied here only to be dropped. A peer
        // with no room at all still gets a burst, dropped and counted there, so that a guest
        // that stopped reading cannot keep the source's queue — and an adaptive PMD — busy.
        let room = match dst.tx_room(q % dq, BURST) {
            0 => BURST,
            r => r.min(BURST),
        };
        let max = match limit.as_deref_mut() {
            None => room,
            Some(l) => match allowance(src, l, now, room) {
                Some(n) => n,
                None => continue,
            },
        };
        src.rx_burst(q, pool, &mut b.rx, max);
        if let Some(l) = limit.as_deref_mut() {
            charge(src, l, &b.rx, max, room);
        }
        if b.rx.is_empty() {
            continue;
        }
        total += b.rx.len();
        transmit(dst, q % dq, &mut b.rx, pool, &mut b.fx);
    }
    total
}

/// How many packets a rate-limited `src` may take now, at most `room`; None if its limit
/// allows none (counted: the poll is skipped, its packets wait). Out of line, as `charge`:
/// the poll of a port without a limit stays one branch longer, no more.
#[inline(never)]
pub(crate) fn allowance(src: &dyn Port, l: &mut Limiter, now: u64, room: usize) -> Option<usize> {
    match l.allow(now, room) {
        0 => {
            PortStats::add(&src.stats().rx_rate_limited_rounds, 1);
            None
        }
        n => Some(n),
    }
}

/// Charges `src`'s limiter for the packets it just took (`rx`); a poll the limit cut short
/// (`max` < `room`) that got all it was allowed is counted.
#[inline(never)]
pub(crate) fn charge(src: &dyn Port, l: &mut Limiter, rx: &[Packet], max: usize, room: usize) {
    let bytes = if l.counts_bytes() {
        rx.iter().map(|p| p.len()).sum()
    } else {
        0
    };
    l.charge(rx.len(), bytes);
    if max < room && rx.len() == max {
        PortStats::add(&src.stats().rx_rate_limited_rounds, 1);
    }
}

/// Sends `pkts` to a destination that lacks an offload some of its packets need: checksums
/// are completed and GSO super-frames segmented in software (in order, a burst at a time);
/// what cannot be fixed is dropped and counted.
#[cold]
fn send_with_fixups(
    pkts: &mut Vec<Packet>,
    b: &mut Fixups,
    dst: &mut dyn Port,
    q: u16,
    accepts: crate::port::Offloads,
    pool: &mut PacketPool,
) {
    let (mut sw, mut gso, mut dropped) = (0, 0, 0);
    let emit = |p: Packet, tx: &mut Vec<Packet>, dst: &mut dyn Port, pool: &mut PacketPool| {
        tx.push(p);
        if tx.len() == BURST {
            dst.tx_burst(q, pool, tx);
        }
    };
    for mut p in pkts.drain(..) {
        match fixup(&mut p, accepts) {
            Fixup::AsIs => emit(p, &mut b.tx, dst, pool),
            Fixup::SwCsum => {
                sw += 1;
                emit(p, &mut b.tx, dst, pool);
            }
            Fixup::Segment => {
                let r = crate::gso::segment(&p, pool, &mut b.segs);
                BufPool::free(pool, p);
                match r {
                    Ok(()) => {
                        gso += 1;
                        for s in b.segs.drain(..) {
                            emit(s, &mut b.tx, dst, pool);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(port = dst.name(), "software GSO: {e}");
                        dropped += 1;
                    }
                }
            }
            Fixup::Unsupported => {
                BufPool::free(pool, p);
                dropped += 1;
            }
        }
    }
    if !b.tx.is_empty() {
        dst.tx_burst(q, pool, &mut b.tx);
    }
    let stats = dst.stats();
    PortStats::add(&stats.sw_csum, sw);
    PortStats::add(&stats.sw_gso, gso);
    PortStats::add(&stats.tx_dropped_offload, dropped);
}

/// The PMD's sleeping place: its own eventfd plus every port's wakeup fds.
struct Epoll {
    fd: std::os::fd::OwnedFd,
}

impl Epoll {
    fn new(fds: &[RawFd]) -> io::Result<Self> {
        // SAFETY: epoll_create1 has no pointer arguments.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let ep = Epoll { fd };
        for &f in fds {
            ep.add(f)?;
        }
        Ok(ep)
    }

    fn add(&self, f: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: f as u64,
        };
        // SAFETY: `ev` is valid for the call; `f` is an fd owned by a port or the PMD.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, f, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Forgets `f` (before its port closes it).
    fn del(&self, f: RawFd) {
        // SAFETY: no event pointer is needed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                f,
                std::ptr::null_mut(),
            )
        };
    }

    fn wait(&self, timeout_ms: i32) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: `evs` has room for 8 events.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), 8, timeout_ms) };
        for ev in evs.iter().take(n.max(0) as usize) {
            drain_eventfd(ev.u64 as RawFd);
        }
    }
}

fn drain_eventfd(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into `v` from a non-blocking eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cpu out of range",
        ));
    }
    // SAFETY: CPU_SET writes within `set`, as cpu < CPU_SETSIZE was checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
