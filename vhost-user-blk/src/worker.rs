//! A queue worker: one thread and one io_uring serving a fixed set of an export's virtqueues.
//!
//! Each round it takes the requests the driver made available on its queues, checks them
//! (`request.rs`), pushes their I/O to the ring and submits the whole round with one syscall;
//! then it reaps what completed, writes the status bytes and publishes the used entries of
//! each queue at once (one used-index store, one interrupt at most). Requests complete out of
//! order, in the order the file system finishes them.
//!
//! Guest memory under I/O: the kernel reads and writes guest buffers until a request
//! completes, so the worker keeps the memory table its requests were translated under
//! (`io_mem`) and, when the frontend changes the table or the connection goes away, first
//! waits for every request in flight to complete.
//!
//! Inflight tracking (vhost-user INFLIGHT_SHMFD): each request is recorded in the frontend's
//! inflight region from the moment it is taken until its used entry is published; when a
//! queue starts and the region holds requests a killed predecessor left unfinished, they are
//! resubmitted first, oldest first.
//!
//! The guest is hostile: every chain is walked with its addresses and lengths checked
//! (`torii_vhost_user::ring`), a request without a readable header or a writable status byte,
//! or a head reused while its request is in flight, breaks only that queue.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use torii_vhost_user::ring::{
    publish_used_batch, set_notification, RingError, RingMaps, Seg, MAX_CHAIN,
};
use torii_vhost_user::{
    new_event_consumer_and_notifier, Connection, EventConsumer, EventFlag, InflightMap,
    QueueInflight, QueueRegion,
};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

use crate::device::BlkShared;
use crate::engine::{Engine, Op};
use crate::request::{
    check, device_writes_data, parse_segment, Request, Status, HEADER_LEN, SECTOR_SIZE, SEGMENT_LEN,
};
use crate::stats::Counters;

/// How a worker waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Busy-poll the rings and the completion queue: lowest latency, one core per worker.
    Poll,
    /// Sleep until a guest kick or an I/O completion (eventfds).
    Event,
    /// Poll while busy; sleep after this long without work.
    Adaptive(Duration),
}

/// After a spin for a completion ran out: how many waits block in the kernel before spinning
/// is tried again.
const BLOCKING_WAITS: u32 = 256;

/// Longest wait for a completion before the rings are looked at again.
const WAIT_SLICE: Duration = Duration::from_millis(2);

/// Most iovecs one request may have (IOV_MAX).
const MAX_IOV: usize = 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SlotOp {
    #[default]
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

/// A request in flight, by head descriptor index.
#[derive(Default)]
struct Slot {
    busy: bool,
    op: SlotOp,
    /// Host address of the status byte.
    status: usize,
    /// Bytes the device writes into the chain when the request succeeds (status included).
    written: u32,
    /// Result the engine must return for success (the transfer length; 0 for the rest).
    expect: u64,
    /// The data buffers; read by the kernel at submission.
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs are plain addresses into guest memory; a worker is built on one thread
// and moved once to the thread that runs it, which is the only one to use them.
unsafe impl Send for Slot {}

struct QueueState {
    /// Virtqueue index.
    vq: u16,
    started: bool,
    /// The ring epoch the queue was started in; when the frontend stops, restarts or
    /// re-describes the ring, the queue is started over (once nothing is in flight).
    epoch: u64,
    broken: bool,
    /// Requests in the engine.
    pending: u32,
    slots: Vec<Slot>,
    inflight: Option<QueueInflight<QueueRegion>>,
    /// `guard::faults()` when the inflight region was last looked at.
    faults_seen: u64,
    /// Completed this round: (head, bytes written).
    done: Vec<(u16, u32)>,
    heads: Vec<u16>,
    /// Running totals, published to the export's `QueueStats` once per round.
    counters: Counters,
}

impl QueueState {
    fn new(vq: u16) -> Self {
        QueueState {
            vq,
            started: false,
            epoch: 0,
            broken: false,
            pending: 0,
            slots: Vec::new(),
            inflight: None,
            faults_seen: 0,
            done: Vec::with_capacity(crate::device::MAX_QUEUE_SIZE as usize),
            heads: Vec::with_capacity(crate::device::MAX_QUEUE_SIZE as usize),
            counters: Counters::default(),
        }
    }

    /// Forgets everything of the previous connection (nothing may be in flight).
    fn reset(&mut self) {
        self.started = false;
        self.broken = false;
        self.pending = 0;
        self.slots.iter_mut().for_each(|s| s.busy = false);
        self.inflight = None;
        self.done.clear();
    }
}

/// What a request needs from its worker besides its queue.
struct Ctx<'a> {
    mem: &'a torii_vhost_user::MemTable,
    engine: &'a mut Engine,
    model: &'a crate::device::BlkModel,
    token: u64,
}

pub(crate) struct Worker {
    shared: Arc<BlkShared>,
    slot: usize,
    queues: Vec<QueueState>,
    engine: Engine,
    depth: usize,
    conn: Option<Arc<Connection>>,
    seen_generation: u64,
    /// The memory table the requests in flight were translated under, and its generation.
    io_mem: Option<Arc<torii_vhost_user::MemTable>>,
    io_generation: u64,
    maps: RingMaps,
    segs: Vec<Seg>,
    cqes: Vec<(u64, i32)>,
    mode: PollMode,
    /// Adaptive mode: waits for completions that block without spinning first.
    blocking_waits: u32,
    /// The export is opened with O_DIRECT.
    direct: bool,
    stop: Arc<AtomicBool>,
    wake: EventConsumer,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<BlkShared>,
        slot: usize,
        queues: Vec<u16>,
        engine: Engine,
        mode: PollMode,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let (wake, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        // Completions wake the worker like guest kicks do.
        engine.register_eventfd(notifier.as_raw_fd())?;
        shared.set_waker(slot, Some(notifier));
        let nq = torii_vhost_user::MAX_QUEUES;
        Ok(Worker {
            depth: engine.depth(),
            direct: engine.flags().direct,
            shared,
            slot,
            queues: queues.into_iter().map(QueueState::new).collect(),
            engine,
            conn: None,
            seen_generation: 0,
            io_mem: None,
            io_generation: 0,
            maps: RingMaps::new(nq),
            segs: Vec::with_capacity(MAX_CHAIN),
            cqes: Vec::with_capacity(256),
            mode,
            blocking_waits: 0,
            stop,
            wake,
        })
    }

    pub(crate) fn run(mut self) {
        let mut last_work = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            self.refresh();
            let Some(conn) = self.conn.clone() else {
                self.sleep(Duration::from_millis(1));
                continue;
            };
            self.sync_mem(&conn);
            let mut work = 0;
            for i in 0..self.queues.len() {
                work += self.take(i, &conn);
            }
            if let Err(e) = self.engine.submit() {
                tracing::error!(device = %self.shared.name, "io_uring submit: {e}");
            }
            work += self.complete(&conn);
            if work > 0 {
                last_work = Instant::now();
                continue;
            }
            if self.engine.inflight() > 0 && self.mode != PollMode::Poll {
                // Nothing to take, I/O in flight. Adaptive with direct I/O: spin for the next
                // completion while completions keep coming within the poll window (lowest
                // latency); once a spin runs out, wait in the kernel for the next
                // BLOCKING_WAITS waits. Buffered I/O always waits in the kernel: on file
                // systems without non-blocking reads it runs in io_uring's own workers, which
                // spinning on their CPU would only keep from running. (On tmpfs requests are
                // done inline: nothing is ever in flight there.)
                let spin = match self.mode {
                    PollMode::Adaptive(d) if self.direct && self.blocking_waits == 0 => d,
                    _ => Duration::ZERO,
                };
                if last_work.elapsed() < spin {
                    continue;
                }
                self.blocking_waits = if spin > Duration::ZERO {
                    BLOCKING_WAITS
                } else {
                    self.blocking_waits.saturating_sub(1)
                };
                // Wait for a completion, but look at the rings again after WAIT_SLICE at the
                // latest: a slow request (a flush, a stalled device) must not keep the new
                // requests of any queue waiting longer than that.
                if let Err(e) = self.engine.submit_and_wait_at_most(WAIT_SLICE) {
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        tracing::error!(device = %self.shared.name, "io_uring wait: {e}");
                    }
                }
                continue;
            }
            let idle = match self.mode {
                PollMode::Poll => false,
                PollMode::Event => true,
                PollMode::Adaptive(d) => last_work.elapsed() >= d,
            };
            if idle {
                self.sleep_until_kicked(&conn);
            }
        }
        self.drain();
        self.shared.detach(self.slot);
    }

    /// Picks up a new connection (or its end): in-flight requests of the old one complete
    /// first.
    fn refresh(&mut self) {
        let g = self.shared.generation();
        if g == self.seen_generation {
            return;
        }
        self.drain();
        self.maps.clear();
        self.engine.unregister_buffers();
        self.io_mem = None;
        self.queues.iter_mut().for_each(QueueState::reset);
        for q in &self.queues {
            self.shared.set_queue_busy(q.vq as usize, 0);
        }
        self.conn = self.shared.attach(self.slot, g);
        self.seen_generation = g;
    }

    /// Moves to the connection's current memory table, after the requests in flight under the
    /// previous one have completed.
    fn sync_mem(&mut self, conn: &Connection) {
        let g = conn.mem_generation.load(Ordering::Acquire);
        if self.io_mem.is_some() && g == self.io_generation {
            return;
        }
        self.drain();
        self.engine.unregister_buffers();
        let mem = conn.mem.memory().into_inner();
        self.register_memory(&mem);
        self.io_mem = Some(mem);
        self.io_generation = g;
    }

    /// Registers the guest memory regions of `mem` as the ring's fixed buffers (in pieces of
    /// at most 1 GiB, the kernel's limit), so that single-buffer reads and writes skip the
    /// page lookup of every request. Memory io_uring cannot pin (file-backed other than
    /// shmem or hugetlbfs) is simply not registered.
    fn register_memory(&mut self, mem: &torii_vhost_user::MemTable) {
        const PIECE: usize = 1 << 30;
        let mut bufs = Vec::new();
        for r in mem.iter() {
            let Ok(s) = r.get_slice(vm_memory::MemoryRegionAddress(0), r.len() as usize) else {
                continue;
            };
            let (base, len) = (s.ptr_guard_mut().as_ptr() as usize, r.len() as usize);
            bufs.extend(
                (0..len)
                    .step_by(PIECE)
                    .map(|o| (base + o, PIECE.min(len - o))),
            );
        }
        if bufs.is_empty() || bufs.len() > u16::MAX as usize {
            return;
        }
        // SAFETY: `mem` becomes `io_mem`, which keeps these mappings alive until the buffers
        // are unregistered (connection or table change, after a drain) or the engine ends;
        // nothing is in flight (the caller drained).
        if let Err(e) = unsafe { self.engine.register_buffers(&bufs) } {
            tracing::info!(device = %self.shared.name, "guest memory not registered with io_uring ({e}): per-request page lookups");
        }
    }

    /// Waits for every request in flight and completes it.
    fn drain(&mut self) {
        let Some(conn) = self.conn.clone() else {
            return;
        };
        while self.engine.inflight() > 0 {
            if let Err(e) = self.engine.submit_and_wait(1) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(device = %self.shared.name, "io_uring wait: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            self.complete(&conn);
        }
    }

    /// Takes the requests made available on local queue `i`; returns how many.
    fn take(&mut self, i: usize, conn: &Connection) -> usize {
        let Worker {
            queues,
            maps,
            segs,
            engine,
            io_mem,
            io_generation,
            shared,
            depth,
            ..
        } = self;
        let q = &mut queues[i];
        let Some(mem) = io_mem.as_ref() else { return 0 };
        let Some(vring) = conn.vrings.get(q.vq as usize) else {
            return 0;
        };
        if q.broken {
            return 0;
        }
        let epoch = shared.queue_epoch(q.vq as usize);
        if q.started && epoch != q.epoch {
            if q.pending > 0 {
                // Let what is in flight complete first.
                return 0;
            }
            q.started = false;
            q.inflight = None;
        }
        let mut state = vring.get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) {
            return 0;
        }
        let queue = state.get_queue_mut();
        let ring = match maps.get_in(mem, *io_generation, q.vq as usize, queue) {
            Ok(r) => r,
            // The frontend changed the memory table after this round loaded it (the rings
            // may already lie in the new one): the next round loads it and looks again.
            Err(_) if conn.mem_generation.load(Ordering::Acquire) != *io_generation => return 0,
            Err(e) => return broken(shared, q, e),
        };
        let mut ctx = Ctx {
            mem,
            engine,
            model: &shared.model,
            token: 0,
        };
        let mut taken = 0;
        if !q.started {
            if q.pending > 0 {
                return 0;
            }
            q.epoch = epoch;
            let resubmit = match start_queue(q, conn, queue.size(), ring.used_idx(), &shared.name) {
                Ok(heads) => heads,
                Err(e) => return broken(shared, q, e),
            };
            for (k, head) in resubmit.iter().enumerate() {
                segs.clear();
                let r = walk(&ring, *head, segs)
                    .and_then(|()| submit_chain(q, i, *head, segs, &mut ctx));
                if let Err(e) = r {
                    return broken(shared, q, e);
                }
                taken = k + 1;
            }
            if !resubmit.is_empty() {
                let next = ring.used_idx().wrapping_add(resubmit.len() as u16);
                queue.set_next_avail(next);
            }
        }
        let next = queue.next_avail();
        let room = depth.saturating_sub(ctx.engine.inflight());
        let n = match ring.pending(next) {
            Ok(n) => (n as usize).min(room),
            Err(e) => return broken(shared, q, e),
        };
        let mut consumed = 0u16;
        let mut err = None;
        for k in 0..n as u16 {
            let r = ring.head(next.wrapping_add(k)).and_then(|head| {
                segs.clear();
                walk(&ring, head, segs)?;
                submit_chain(q, i, head, segs, &mut ctx)
            });
            match r {
                Ok(()) => consumed += 1,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        queue.set_next_avail(next.wrapping_add(consumed));
        drop(state);
        shared.set_queue_busy(q.vq as usize, q.pending);
        if consumed > 0 {
            publish_stats(shared, q);
        }
        if let Some(e) = err {
            broken(shared, q, e);
        }
        taken + consumed as usize
    }

    /// Reaps completions and publishes every queue's completed requests; returns how many.
    fn complete(&mut self, conn: &Connection) -> usize {
        self.cqes.clear();
        self.engine.reap(&mut self.cqes);
        for &(token, res) in &self.cqes {
            let (i, head) = ((token >> 16) as usize, (token & 0xffff) as usize);
            let Some(q) = self.queues.get_mut(i) else {
                continue;
            };
            let Some(slot) = q.slots.get_mut(head) else {
                continue;
            };
            if !slot.busy {
                continue;
            }
            let status = result_status(slot, res);
            // SAFETY: `slot.status` was translated under `io_mem`, which is kept (and so
            // mapped) until every request taken under it has completed; it is the last byte
            // of a device-writable buffer the walk checked to lie in guest memory.
            unsafe { std::ptr::write_volatile(slot.status as *mut u8, status as u8) };
            slot.busy = false;
            q.pending -= 1;
            count(&mut q.counters, Some(slot.op), status, slot.expect);
            let written = if status == Status::Ok {
                slot.written
            } else {
                1
            };
            q.done.push((head as u16, written));
        }
        let mut n = 0;
        for i in 0..self.queues.len() {
            n += self.publish(i, conn);
        }
        n
    }

    /// Publishes local queue `i`'s completed requests in its used ring.
    fn publish(&mut self, i: usize, conn: &Connection) -> usize {
        let Worker {
            queues,
            maps,
            io_mem,
            io_generation,
            shared,
            ..
        } = self;
        let q = &mut queues[i];
        let n = q.done.len();
        if n == 0 {
            return 0;
        }
        let (Some(mem), Some(vring)) = (io_mem.as_ref(), conn.vrings.get(q.vq as usize)) else {
            q.done.clear();
            return 0;
        };
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let ring = match maps.get_in(mem, *io_generation, q.vq as usize, queue) {
            Ok(r) => r,
            Err(e) => {
                drop(state);
                q.done.clear();
                return broken(shared, q, e);
            }
        };
        q.heads.clear();
        q.heads.extend(q.done.iter().map(|&(h, _)| h));
        if let Some(inf) = q.inflight.as_mut() {
            inf.prepare_batch(&q.heads);
        }
        let notify = publish_used_batch(&ring, queue, &q.done, false);
        if let Some(inf) = q.inflight.as_mut() {
            inf.finish_batch(&q.heads, queue.next_used());
        }
        if notify {
            let _ = state.signal_used_queue();
        }
        drop(state);
        q.done.clear();
        shared.set_queue_busy(q.vq as usize, q.pending);
        publish_stats(shared, q);
        // The frontend may have truncated the inflight region under the queue: the records of
        // this batch went to zero pages. The completions are published (guest memory and rings
        // are sound), and then the queue is broken, as a reconnect could not recover it.
        let faults = torii_vhost_user::guard::faults();
        if faults != q.faults_seen {
            q.faults_seen = faults;
            if q.inflight.as_ref().is_some_and(|i| i.memory().faulted()) {
                q.inflight = None;
                broken(shared, q, RingError::InflightTruncated);
            }
        }
        n
    }

    /// Event mode: asks the driver for kicks and sleeps until one, a completion or a timeout;
    /// returns at once if work arrived meanwhile.
    fn sleep_until_kicked(&mut self, conn: &Connection) {
        let mut more = self.engine.has_completions();
        for q in self.queues.iter().filter(|q| q.started && !q.broken) {
            if let Some(v) = conn.vrings.get(q.vq as usize) {
                // An error here is reported by the next round on that queue.
                more |= set_notification(v, true).unwrap_or(true);
            }
        }
        if !more && !self.engine.has_completions() {
            self.sleep(Duration::from_millis(100));
        }
        for q in self.queues.iter().filter(|q| q.started && !q.broken) {
            if let Some(v) = conn.vrings.get(q.vq as usize) {
                let _ = set_notification(v, false);
            }
        }
    }

    /// Sleeps on the wake eventfd (kicks, completions, connection changes) for at most `d`.
    fn sleep(&self, d: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        unsafe { libc::poll(&mut pfd, 1, d.as_millis() as i32) };
        let _ = self.wake.consume();
    }
}

/// Counts a completed request: its operation (None: refused before it was known), status and,
/// for a successful read or write, its bytes.
fn count(c: &mut Counters, op: Option<SlotOp>, status: Status, bytes: u64) {
    match op {
        Some(SlotOp::Read) => c.reads += 1,
        Some(SlotOp::Write) => c.writes += 1,
        Some(SlotOp::Flush) => c.flushes += 1,
        Some(SlotOp::Discard) => c.discards += 1,
        Some(SlotOp::WriteZeroes) => c.write_zeroes += 1,
        Some(SlotOp::GetId) => c.get_ids += 1,
        None => {}
    }
    match (status, op) {
        (Status::Ok, Some(SlotOp::Read)) => c.read_bytes += bytes,
        (Status::Ok, Some(SlotOp::Write)) => c.written_bytes += bytes,
        (Status::Ok, _) => {}
        (Status::IoErr, _) => c.io_errors += 1,
        (Status::Unsupp, _) => c.unsupported += 1,
    }
}

/// Publishes a queue's running totals (and what it has in flight) for the metrics endpoint.
fn publish_stats(shared: &BlkShared, q: &mut QueueState) {
    q.counters.inflight = u64::from(q.pending);
    if let Some(s) = shared.model.stats().get(q.vq as usize) {
        s.store(&q.counters);
    }
}

/// Marks a queue broken (reported once); the rest of the export keeps serving.
fn broken(shared: &BlkShared, q: &mut QueueState, e: RingError) -> usize {
    if !q.broken {
        q.broken = true;
        shared.report_broken(q.vq, e.to_string());
    }
    0
}

/// Walks the chain at `head` into `segs` (a chain longer than [`MAX_CHAIN`] is broken).
fn walk(
    ring: &torii_vhost_user::ring::SplitRing<'_>,
    head: u16,
    segs: &mut Vec<Seg>,
) -> Result<(), RingError> {
    if ring.walk_mixed(head, segs)? {
        Ok(())
    } else {
        Err(RingError::Chain(head))
    }
}

/// A queue starts serving (ready and enabled, nothing in flight): sizes its request table,
/// opens its part of the inflight region and returns the requests a previous backend left in
/// flight, oldest first. A region the frontend truncated (read as zeros) breaks the queue:
/// what it held cannot be recovered.
fn start_queue(
    q: &mut QueueState,
    conn: &Connection,
    size: u16,
    used_idx: u16,
    name: &str,
) -> Result<Vec<u16>, RingError> {
    q.started = true;
    if q.slots.len() != size as usize {
        q.slots = (0..size).map(|_| Slot::default()).collect();
    }
    q.inflight = None;
    let Some(map) = conn.inflight() else {
        return Ok(Vec::new());
    };
    let opened = InflightMap::take_queue(&map, q.vq)
        .ok_or_else(|| "queue outside the region".to_string())
        .and_then(|r| QueueInflight::open(r, size).map_err(|e| e.to_string()));
    q.faults_seen = torii_vhost_user::guard::faults();
    if map.faulted() {
        return Err(RingError::InflightTruncated);
    }
    Ok(match opened {
        Ok(mut inf) => {
            let heads = inf.recover(used_idx);
            if !heads.is_empty() {
                tracing::info!(
                    device = name,
                    queue = q.vq,
                    requests = heads.len(),
                    "resubmitting requests left in flight by the previous backend"
                );
            }
            q.inflight = Some(inf);
            heads
        }
        Err(e) => {
            tracing::warn!(device = name, queue = q.vq, "inflight region not used: {e}");
            Vec::new()
        }
    })
}

/// Checks the request in `segs` (chain `head` of local queue `i`) and issues it, or completes
/// it at once (errors, GET_ID). Errors break the queue: the chain has no readable header or
/// no writable status byte, or its head is already in flight.
fn submit_chain(
    q: &mut QueueState,
    i: usize,
    head: u16,
    segs: &[Seg],
    ctx: &mut Ctx<'_>,
) -> Result<(), RingError> {
    let slot = q
        .slots
        .get_mut(head as usize)
        .ok_or(RingError::Chain(head))?;
    if slot.busy {
        return Err(RingError::Request(head, "head reused while in flight"));
    }
    let (mut readable, mut writable) = (0u64, 0u64);
    for s in segs {
        *(if s.write {
            &mut writable
        } else {
            &mut readable
        }) += u64::from(s.len);
    }
    if readable < HEADER_LEN as u64 || writable < 1 {
        return Err(RingError::Request(head, "no header or no status byte"));
    }
    let mut header = [0u8; HEADER_LEN];
    copy_from_chain(ctx.mem, segs, false, 0, &mut header)?;
    slot.status = byte_addr(ctx.mem, segs, true, writable - 1)?;
    let writes = device_writes_data(&header);
    let data_len = if writes {
        writable - 1
    } else {
        readable - HEADER_LEN as u64
    };
    if let Some(inf) = q.inflight.as_mut() {
        inf.start(head);
    }
    let limits = ctx.model.limits();
    ctx.token = (i as u64) << 16 | u64::from(head);
    let issued = match check(&header, data_len, &limits) {
        Err(status) => Err((status, None)),
        Ok(Request::Read { offset, len }) => {
            data_iov(ctx.mem, segs, true, 0, len, &mut slot.iov)?;
            slot.op = SlotOp::Read;
            slot.expect = len;
            slot.written = len as u32 + 1;
            let op = match fixed(ctx.engine, &slot.iov) {
                Fixed::One(buf, index) => Op::ReadFixed {
                    offset,
                    buf: buf.cast(),
                    len: len as u32,
                    index,
                },
                Fixed::All(index) => Op::ReadvFixed {
                    offset,
                    iovecs: &slot.iov,
                    index,
                },
                Fixed::No => Op::Read {
                    offset,
                    iovecs: &slot.iov,
                },
            };
            // SAFETY: the iovecs live in `slot.iov`, untouched until the completion; they
            // point into guest memory under `io_mem`, which is kept until it completes.
            Ok(unsafe { ctx.engine.push(op, ctx.token) })
        }
        Ok(Request::Write { offset, len }) => {
            data_iov(ctx.mem, segs, false, HEADER_LEN as u64, len, &mut slot.iov)?;
            slot.op = SlotOp::Write;
            slot.expect = len;
            slot.written = 1;
            let dsync = !ctx.model.writeback();
            let op = match fixed(ctx.engine, &slot.iov) {
                Fixed::One(buf, index) => Op::WriteFixed {
                    offset,
                    buf: buf.cast_const().cast(),
                    len: len as u32,
                    index,
                    dsync,
                },
                Fixed::All(index) => Op::WritevFixed {
                    offset,
                    iovecs: &slot.iov,
                    index,
                    dsync,
                },
                Fixed::No => Op::Write {
                    offset,
                    iovecs: &slot.iov,
                    dsync,
                },
            };
            // SAFETY: as for reads.
            Ok(unsafe { ctx.engine.push(op, ctx.token) })
        }
        Ok(Request::Flush) => {
            slot.op = SlotOp::Flush;
            slot.expect = 0;
            slot.written = 1;
            // SAFETY: no buffers.
            Ok(unsafe { ctx.engine.push(Op::Flush, ctx.token) })
        }
        Ok(Request::GetId { len }) => {
            let id = ctx.model.serial();
            copy_to_chain(ctx.mem, segs, 0, &id[..len as usize])?;
            slot.written = len as u32 + 1;
            slot.op = SlotOp::GetId;
            Err((Status::Ok, Some(SlotOp::GetId)))
        }
        Ok(r @ (Request::Discard { .. } | Request::WriteZeroes { .. })) => {
            let wz = matches!(r, Request::WriteZeroes { .. });
            let mut raw = [0u8; SEGMENT_LEN];
            copy_from_chain(ctx.mem, segs, false, HEADER_LEN as u64, &mut raw)?;
            let op = if wz {
                SlotOp::WriteZeroes
            } else {
                SlotOp::Discard
            };
            match parse_segment(&raw, wz, &limits) {
                Err(status) => Err((status, Some(op))),
                Ok(s) => {
                    let (offset, len) =
                        (s.sector * SECTOR_SIZE, u64::from(s.sectors) * SECTOR_SIZE);
                    slot.op = if wz {
                        SlotOp::WriteZeroes
                    } else {
                        SlotOp::Discard
                    };
                    slot.expect = 0;
                    slot.written = 1;
                    let op = if wz {
                        Op::WriteZeroes {
                            offset,
                            len,
                            unmap: s.unmap,
                        }
                    } else {
                        Op::Discard { offset, len }
                    };
                    // SAFETY: no buffers.
                    Ok(unsafe { ctx.engine.push(op, ctx.token) })
                }
            }
        }
    };
    match issued {
        Ok(Ok(())) => {
            slot.busy = true;
            q.pending += 1;
        }
        // The caller leaves room for every request it takes; a full ring is an I/O error.
        Ok(Err(_full)) => {
            let op = q.slots[head as usize].op;
            complete_now(q, head, Status::IoErr, Some(op))
        }
        Err((status, op)) => complete_now(q, head, status, op),
    }
    Ok(())
}

/// Which registered buffer, if any, a transfer's buffers lie in.
enum Fixed {
    /// One buffer, inside registered buffer `.1`.
    One(*mut libc::c_void, u16),
    /// Several, all inside one registered buffer (vectored fixed I/O).
    All(u16),
    No,
}

#[inline]
fn fixed(engine: &Engine, iov: &[libc::iovec]) -> Fixed {
    match iov {
        [one] => match engine.fixed_index(one.iov_base as usize, one.iov_len) {
            Some(i) => Fixed::One(one.iov_base, i),
            None => Fixed::No,
        },
        _ => engine.fixed_index_all(iov).map_or(Fixed::No, Fixed::All),
    }
}

/// Completes a request without I/O (its status byte's address is in its slot); `op` is None
/// for a request refused before its operation was known.
fn complete_now(q: &mut QueueState, head: u16, status: Status, op: Option<SlotOp>) {
    count(&mut q.counters, op, status, 0);
    let slot = &q.slots[head as usize];
    // SAFETY: as in `Worker::complete`: the status byte was checked to lie in guest memory
    // under `io_mem`, which is mapped for this whole round.
    unsafe { std::ptr::write_volatile(slot.status as *mut u8, status as u8) };
    let written = if status == Status::Ok {
        slot.written
    } else {
        1
    };
    q.done.push((head, written));
}

/// The status of a completed request from the engine's result.
fn result_status(slot: &Slot, res: i32) -> Status {
    match (slot.op, res) {
        (SlotOp::Discard | SlotOp::WriteZeroes, r) if r == -libc::EOPNOTSUPP => Status::Unsupp,
        (_, r) if r < 0 => Status::IoErr,
        // A short transfer is an error (the range was checked to lie inside the export).
        (SlotOp::Read | SlotOp::Write, r) if r as u64 == slot.expect => Status::Ok,
        (SlotOp::Read | SlotOp::Write | SlotOp::GetId, _) => Status::IoErr,
        (SlotOp::Flush | SlotOp::Discard | SlotOp::WriteZeroes, _) => Status::Ok,
    }
}

/// Calls `f(host, len)` for each piece of guest range `addr..addr+len` (one piece when it lies
/// in one region, which the walk already translated as `host`).
fn pieces(
    mem: &torii_vhost_user::MemTable,
    seg: &Seg,
    skip: u64,
    take: u64,
    mut f: impl FnMut(usize, usize) -> Result<(), RingError>,
) -> Result<(), RingError> {
    if seg.host != 0 {
        return f(seg.host + skip as usize, take as usize);
    }
    // A buffer across regions (rare): one piece per region.
    let mut addr = seg.addr + skip;
    let mut left = take;
    while left > 0 {
        let bad = RingError::Address(seg.addr, seg.len);
        let r = mem.find_region(GuestAddress(addr)).ok_or(bad.clone())?;
        let off = addr - r.start_addr().0;
        let n = left.min(r.len() - off);
        let slice = r
            .get_slice(vm_memory::MemoryRegionAddress(off), n as usize)
            .map_err(|_| bad)?;
        f(slice.ptr_guard_mut().as_ptr() as usize, n as usize)?;
        addr += n;
        left -= n;
    }
    Ok(())
}

/// Visits `take` bytes of the chain's buffers of one direction, after skipping `skip` bytes
/// of them, piece by piece.
fn visit(
    mem: &torii_vhost_user::MemTable,
    segs: &[Seg],
    write: bool,
    mut skip: u64,
    mut take: u64,
    mut f: impl FnMut(usize, usize) -> Result<(), RingError>,
) -> Result<(), RingError> {
    for s in segs.iter().filter(|s| s.write == write) {
        if take == 0 {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        pieces(mem, s, skip, n, &mut f)?;
        skip = 0;
        take -= n;
    }
    Ok(())
}

/// The iovecs of `len` data bytes (device-writable ones if `write`) after `skip` bytes.
fn data_iov(
    mem: &torii_vhost_user::MemTable,
    segs: &[Seg],
    write: bool,
    skip: u64,
    len: u64,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), RingError> {
    iov.clear();
    visit(mem, segs, write, skip, len, |host, n| {
        if iov.len() == MAX_IOV {
            return Err(RingError::Request(0, "more than 1024 data buffers"));
        }
        iov.push(libc::iovec {
            iov_base: host as *mut libc::c_void,
            iov_len: n,
        });
        Ok(())
    })
}

/// The host address of the byte `at` bytes into the chain's buffers of one direction.
fn byte_addr(
    mem: &torii_vhost_user::MemTable,
    segs: &[Seg],
    write: bool,
    at: u64,
) -> Result<usize, RingError> {
    let mut addr = None;
    visit(mem, segs, write, at, 1, |host, _| {
        addr = Some(host);
        Ok(())
    })?;
    addr.ok_or(RingError::Request(0, "status byte missing"))
}

/// Copies bytes of the chain's buffers of one direction, from `skip` on, into `dst`.
fn copy_from_chain(
    mem: &torii_vhost_user::MemTable,
    segs: &[Seg],
    write: bool,
    skip: u64,
    dst: &mut [u8],
) -> Result<(), RingError> {
    let mut at = 0;
    visit(mem, segs, write, skip, dst.len() as u64, |host, n| {
        for (k, b) in dst[at..at + n].iter_mut().enumerate() {
            // SAFETY: `host..host+n` lies in guest memory (checked by the walk or `pieces`)
            // mapped under `io_mem`; volatile since the guest may write it concurrently.
            *b = unsafe { std::ptr::read_volatile((host + k) as *const u8) };
        }
        at += n;
        Ok(())
    })
}

/// Copies `src` into the device-writable buffers from `skip` on.
fn copy_to_chain(
    mem: &torii_vhost_user::MemTable,
    segs: &[Seg],
    skip: u64,
    src: &[u8],
) -> Result<(), RingError> {
    let mut at = 0;
    visit(mem, segs, true, skip, src.len() as u64, |host, n| {
        for (k, b) in src[at..at + n].iter().enumerate() {
            // SAFETY: as in `copy_from_chain`, for a device-writable buffer.
            unsafe { std::ptr::write_volatile((host + k) as *mut u8, *b) };
        }
        at += n;
        Ok(())
    })
}
