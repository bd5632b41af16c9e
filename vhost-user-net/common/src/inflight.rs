//! Inflight I/O tracking for split virtqueues (vhost-user protocol, "Inflight I/O tracking",
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`). The backend records in a memory region the
//! frontend keeps (its fd survives a backend crash) which requests it has taken from the avail
//! ring and not yet completed; a restarted backend reads the region back and resubmits them in
//! their original order, so no request acknowledged to the guest is lost and none is left
//! hanging.
//!
//! Layout of one queue's region (little endian, 64-byte aligned per queue):
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc_num × { u8 inflight | u8 padding[5] | u16 next | u64 counter }
//! ```
//!
//! A queue's region is any byte buffer ([`QueueRegion`], a slice of the frontend's shared
//! memory, in the daemon; a `Vec` in tests); every index into it is bounds-checked, since a
//! frontend may hand us any fd.

/// Region version this code writes.
pub const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC: usize = 16;
/// Each queue's region starts at a multiple of this.
pub const ALIGN: usize = 64;

/// Bytes of one queue's region for a queue of `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * queue_size as usize).div_ceil(ALIGN) * ALIGN
}

/// Bytes of the whole region for `queues` queues (what GET_INFLIGHT_FD allocates).
pub fn region_size(queues: u16, queue_size: u16) -> usize {
    queues as usize * queue_region_size(queue_size)
}

/// Why a region cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum InflightError {
    /// Shorter than the queue size needs.
    TooSmall { need: usize, got: usize },
    /// Written by an incompatible backend, or for another queue size.
    Mismatch { version: u16, desc_num: u16 },
}

impl std::fmt::Display for InflightError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InflightError::TooSmall { need, got } => {
                write!(f, "inflight region of {got} bytes, {need} needed")
            }
            InflightError::Mismatch { version, desc_num } => write!(
                f,
                "inflight region has version {version} and {desc_num} descriptors"
            ),
        }
    }
}

/// One queue's inflight region.
pub struct QueueInflight<B> {
    mem: B,
    desc_num: u16,
    /// Submission order of the next request.
    counter: u64,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> QueueInflight<B> {
    /// The memory the queue's part lives in.
    pub fn memory(&self) -> &B {
        &self.mem
    }

    /// A fresh region (GET_INFLIGHT_FD: the frontend has just allocated it, zeroed): writes
    /// the header.
    pub fn init(mut mem: B, queue_size: u16) -> Result<Self, InflightError> {
        let need = queue_region_size(queue_size);
        let m = mem.as_mut();
        if m.len() < need {
            return Err(InflightError::TooSmall { need, got: m.len() });
        }
        m[..need].fill(0);
        m[8..10].copy_from_slice(&VERSION.to_le_bytes());
        m[10..12].copy_from_slice(&queue_size.to_le_bytes());
        Ok(QueueInflight {
            mem,
            desc_num: queue_size,
            counter: 1,
        })
    }

    /// A region a previous backend wrote (SET_INFLIGHT_FD after a restart).
    pub fn open(mem: B, queue_size: u16) -> Result<Self, InflightError> {
        let need = queue_region_size(queue_size);
        let m = mem.as_ref();
        if m.len() < need {
            return Err(InflightError::TooSmall { need, got: m.len() });
        }
        let version = u16::from_le_bytes([m[8], m[9]]);
        let desc_num = u16::from_le_bytes([m[10], m[11]]);
        if version != VERSION || desc_num != queue_size {
            return Err(InflightError::Mismatch { version, desc_num });
        }
        let mut q = QueueInflight {
            mem,
            desc_num,
            counter: 0,
        };
        // Saturating: a region from a hostile frontend may hold any counter.
        q.counter = (0..desc_num)
            .map(|i| q.counter_of(i))
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        Ok(q)
    }

    fn desc(&self, i: u16) -> usize {
        HEADER + DESC * i as usize
    }

    fn counter_of(&self, i: u16) -> u64 {
        let d = self.desc(i) + 8;
        u64::from_le_bytes(self.mem.as_ref()[d..d + 8].try_into().unwrap_or([0; 8]))
    }

    fn set_inflight(&mut self, i: u16, v: bool) {
        let d = self.desc(i);
        self.mem.as_mut()[d] = u8::from(v);
    }

    pub fn is_inflight(&self, i: u16) -> bool {
        i < self.desc_num && self.mem.as_ref()[self.desc(i)] == 1
    }

    fn used_idx(&self) -> u16 {
        u16::from_le_bytes([self.mem.as_ref()[14], self.mem.as_ref()[15]])
    }

    /// A request with head descriptor `head` was taken from the avail ring (before any I/O).
    pub fn start(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let d = self.desc(head);
        self.mem.as_mut()[d + 8..d + 16].copy_from_slice(&self.counter.to_le_bytes());
        self.counter = self.counter.saturating_add(1);
        // The counter before the flag: a crash in between leaves the request not in flight.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.set_inflight(head, true);
    }

    /// Before a batch of completions is published in the used ring: chains `heads` through
    /// `next` from `last_batch_head`, so that a restart can tell which entries the used ring
    /// may already show as done.
    pub fn prepare_batch(&mut self, heads: &[u16]) {
        let mut last = u16::from_le_bytes([self.mem.as_ref()[12], self.mem.as_ref()[13]]);
        let n = self.desc_num;
        for &h in heads.iter().filter(|&&h| h < n) {
            let d = self.desc(h);
            self.mem.as_mut()[d + 6..d + 8].copy_from_slice(&last.to_le_bytes());
            last = h;
        }
        self.mem.as_mut()[12..14].copy_from_slice(&last.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }

    /// After the batch is in the used ring and its index is `used_idx`: the requests are
    /// done.
    pub fn finish_batch(&mut self, heads: &[u16], used_idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let n = self.desc_num;
        for &h in heads.iter().filter(|&&h| h < n) {
            self.set_inflight(h, false);
        }
        self.mem.as_mut()[14..16].copy_from_slice(&used_idx.to_le_bytes());
    }

    /// After a restart: repairs the last batch if the crash came between publishing it and
    /// recording it (`ring_used_idx`, read from the used ring, is ahead of the region's), then
    /// returns the heads still in flight, oldest first — to be resubmitted.
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        let recorded = self.used_idx();
        if recorded != ring_used_idx {
            // The last batch reached the used ring: its entries are done.
            let batch = ring_used_idx.wrapping_sub(recorded).min(self.desc_num);
            let mut h = u16::from_le_bytes([self.mem.as_ref()[12], self.mem.as_ref()[13]]);
            for _ in 0..batch {
                if h >= self.desc_num {
                    break;
                }
                self.set_inflight(h, false);
                let d = self.desc(h);
                h = u16::from_le_bytes([self.mem.as_ref()[d + 6], self.mem.as_ref()[d + 7]]);
            }
            self.mem.as_mut()[14..16].copy_from_slice(&ring_used_idx.to_le_bytes());
        }
        let mut v: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&i| self.is_inflight(i))
            .map(|i| (self.counter_of(i), i))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| i).collect()
    }
}

/// The payload of GET_INFLIGHT_FD / SET_INFLIGHT_FD (`struct VhostUserInflight`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightInfo {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightInfo {
    /// Length on the wire (two u64, two u16, padded to 8).
    pub const LEN: usize = 24;

    pub fn parse(b: &[u8]) -> Option<Self> {
        let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
        let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
        Some(InflightInfo {
            mmap_size: u64_at(0)?,
            mmap_offset: u64_at(8)?,
            num_queues: u16_at(16)?,
            queue_size: u16_at(18)?,
        })
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }
}

/// The inflight region of a connection, mapped shared from the frontend's fd. Each queue's
/// part is handed out at most once at a time ([`InflightMap::take_queue`]), to the one
/// data-path thread serving that queue.
pub struct InflightMap {
    addr: *mut u8,
    len: usize,
    queue_size: u16,
    taken: Vec<std::sync::atomic::AtomicBool>,
    /// Released before the region is unmapped.
    guard: Option<crate::guard::Guard>,
}

// SAFETY: the mapping is plain shared memory; access to each queue's part is exclusive
// through `taken`, and the map itself is only read (addresses, sizes) after creation.
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// GET_INFLIGHT_FD: a new memfd for `queues` queues of `queue_size`, every queue's header
    /// written.
    pub fn create(queues: u16, queue_size: u16) -> std::io::Result<(Self, std::fs::File)> {
        use std::os::fd::FromRawFd;
        if queues == 0 || queues as usize > crate::MAX_QUEUES || !valid_queue_size(queue_size) {
            return Err(std::io::Error::other(format!(
                "inflight region for {queues} queues of {queue_size}"
            )));
        }
        let len = region_size(queues, queue_size);
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe {
            libc::memfd_create(
                c"torii-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh fd we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // Sealed at its size: the frontend that gets this file cannot shrink it under the
        // daemon (a region of its own making, sent with SET_INFLIGHT_FD, still can: the guard
        // covers that).
        // SAFETY: fcntl on our own fd; F_ADD_SEALS takes an int of seal flags.
        if unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let map = Self::map(&file, 0, len, queue_size, queues)?;
        let size = queue_region_size(queue_size);
        for q in 0..queues as usize {
            // SAFETY: queue `q`'s part lies inside the `len` bytes just mapped, and nothing
            // else refers to the new mapping yet.
            let part = unsafe { std::slice::from_raw_parts_mut(map.addr.add(q * size), size) };
            QueueInflight::init(part, queue_size)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok((map, file))
    }

    /// SET_INFLIGHT_FD: maps the region the frontend describes in `info`.
    pub fn open(file: std::fs::File, info: &InflightInfo) -> std::io::Result<Self> {
        let bad = |what: &str| std::io::Error::other(format!("inflight region: {what}"));
        if info.num_queues == 0
            || info.num_queues as usize > crate::MAX_QUEUES
            || !valid_queue_size(info.queue_size)
        {
            return Err(bad("queue count or size"));
        }
        let need = region_size(info.num_queues, info.queue_size);
        let len = usize::try_from(info.mmap_size).map_err(|_| bad("size"))?;
        if len < need {
            return Err(bad("smaller than its queues need"));
        }
        let file_len = file.metadata()?.len();
        if info
            .mmap_offset
            .checked_add(info.mmap_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad("outside its file"));
        }
        Self::map(
            &file,
            info.mmap_offset,
            need,
            info.queue_size,
            info.num_queues,
        )
    }

    fn map(
        file: &std::fs::File,
        offset: u64,
        len: usize,
        queue_size: u16,
        queues: u16,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: a new shared mapping of `len` bytes of `file`; nothing else is mapped at the
        // address the kernel picks. The file's length was checked to cover it; a frontend
        // that shrinks it later gets zero pages instead (`crate::guard`), as with guest memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(InflightMap {
            addr: addr.cast(),
            len,
            queue_size,
            taken: (0..queues).map(|_| Default::default()).collect(),
            guard: crate::guard::Guard::for_file(addr as usize, len, file),
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The queue size the region was made for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Whether the frontend truncated the region's file under the mapping (a SIGBUS was caught
    /// in it: what the daemon wrote since went to zero pages, not to the frontend).
    pub fn faulted(&self) -> bool {
        self.guard
            .as_ref()
            .is_some_and(crate::guard::Guard::faulted)
    }

    /// Exclusive access to queue `q`'s part, until the returned [`QueueRegion`] is dropped.
    /// None if `q` is out of range or its part is taken.
    pub fn take_queue(map: &std::sync::Arc<Self>, q: u16) -> Option<QueueRegion> {
        use std::sync::atomic::Ordering;
        let flag = map.taken.get(q as usize)?;
        if flag.swap(true, Ordering::AcqRel) {
            return None;
        }
        let size = queue_region_size(map.queue_size);
        Some(QueueRegion {
            map: map.clone(),
            offset: q as usize * size,
            len: size,
        })
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        self.guard = None;
        // SAFETY: unmaps exactly the mapping made in `map`; no `QueueRegion` outlives the map
        // (each holds a reference to it).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn valid_queue_size(n: u16) -> bool {
    n.is_power_of_two() && n as usize <= crate::MAX_QUEUE_SIZE
}

/// One queue's part of an [`InflightMap`], held by the thread serving the queue.
pub struct QueueRegion {
    map: std::sync::Arc<InflightMap>,
    offset: usize,
    len: usize,
}

impl QueueRegion {
    /// Whether the region this part belongs to was truncated ([`InflightMap::faulted`]).
    pub fn faulted(&self) -> bool {
        self.map.faulted()
    }
}

impl AsRef<[u8]> for QueueRegion {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `offset + len` is inside the mapping (queue index checked in `take_queue`),
        // which lives as long as `map` is held.
        unsafe { std::slice::from_raw_parts(self.map.addr.add(self.offset), self.len) }
    }
}

impl AsMut<[u8]> for QueueRegion {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`; the part is exclusively ours (`take_queue`'s flag), so no
        // other reference into it exists in this process.
        unsafe { std::slice::from_raw_parts_mut(self.map.addr.add(self.offset), self.len) }
    }
}

impl Drop for QueueRegion {
    fn drop(&mut self) {
        let q = self.offset / queue_region_size(self.map.queue_size);
        self.map.taken[q].store(false, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_the_daemon_makes_cannot_change_size() {
        let (map, file) = InflightMap::create(2, 128).unwrap();
        let len = file.metadata().unwrap().len();
        assert_eq!(len, region_size(2, 128) as u64);
        for to in [0, len / 2, len * 2] {
            let e = file.set_len(to).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "set_len({to})");
        }
        assert_eq!(file.metadata().unwrap().len(), len);
        assert!(!map.faulted());
    }

    #[test]
    fn sizes_are_aligned() {
        assert_eq!(queue_region_size(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_size(128) % ALIGN, 0);
        assert_eq!(region_size(2, 256), 2 * queue_region_size(256));
    }

    #[test]
    fn completed_requests_are_not_resubmitted_unfinished_ones_are_in_order() {
        let mut mem = vec![0u8; queue_region_size(8)];
        {
            let mut q = QueueInflight::init(&mut mem, 8).unwrap();
            for h in [3, 1, 6, 0] {
                q.start(h);
            }
            q.prepare_batch(&[1]);
            q.finish_batch(&[1], 1);
        }
        // Restart: 3, 6, 0 were still in flight, in that order.
        let mut q = QueueInflight::open(&mut mem, 8).unwrap();
        assert_eq!(q.recover(1), vec![3, 6, 0]);
        // New requests after the restart sort after the old ones.
        q.start(5);
        assert_eq!(q.recover(1), vec![3, 6, 0, 5]);
    }

    #[test]
    fn a_batch_published_but_not_recorded_counts_as_done() {
        let mut mem = vec![0u8; queue_region_size(8)];
        {
            let mut q = QueueInflight::init(&mut mem, 8).unwrap();
            for h in [2, 4, 7] {
                q.start(h);
            }
            // Crash after the used ring showed heads 2 and 4 (used idx 2) but before
            // finish_batch.
            q.prepare_batch(&[2, 4]);
        }
        let mut q = QueueInflight::open(&mut mem, 8).unwrap();
        assert_eq!(q.recover(2), vec![7]);
        // And if the crash came before the used ring was written, all three are redone.
        let mut mem2 = vec![0u8; queue_region_size(8)];
        {
            let mut q = QueueInflight::init(&mut mem2, 8).unwrap();
            for h in [2, 4, 7] {
                q.start(h);
            }
            q.prepare_batch(&[2, 4]);
        }
        let mut q = QueueInflight::open(&mut mem2, 8).unwrap();
        assert_eq!(q.recover(0), vec![2, 4, 7]);
    }

    #[test]
    fn hostile_regions_are_refused_or_contained() {
        let mut small = vec![0u8; 32];
        assert!(matches!(
            QueueInflight::init(&mut small, 8),
            Err(InflightError::TooSmall { .. })
        ));
        let mut mem = vec![0u8; queue_region_size(8)];
        assert!(matches!(
            QueueInflight::open(&mut mem, 8),
            Err(InflightError::Mismatch { version: 0, .. })
        ));
        // Garbage batch links and a used index far ahead: bounded, no panic.
        let mut q = QueueInflight::init(&mut mem, 8).unwrap();
        q.start(1);
        q.mem[12..14].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(q.recover(0x8000), vec![1]);
        q.start(200); // out of range: ignored
                      // A counter at the top of the range: no overflow on reopen or on the next start.
        let d = q.desc(3) + 8;
        q.mem[d..d + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        q.prepare_batch(&[9, 1]);
        q.finish_batch(&[9, 1], 3);
        assert!(q.recover(3).is_empty());
        let mut q = QueueInflight::open(&mut mem, 8).unwrap();
        q.start(2);
        q.start(4);
        assert_eq!(q.recover(3), vec![2, 4]);
    }
}
