//! The I/O engine: one io_uring per queue worker over the exported file or block device.
//! Requests are pushed as they are parsed and submitted once per poll round (one syscall for
//! the whole batch); completions are reaped from the shared completion ring without a syscall.
//! The file is registered with the ring (no fd lookup per request).
//!
//! For a regular file on a memory file system (tmpfs, ramfs) requests are done inline
//! instead, with one positioned read/write syscall each, and their completions queued for the
//! next reap: such a file has no non-blocking reads, so io_uring would hand every request to
//! one of its worker threads (a context switch each way) only for that thread to do the same
//! copy, and the copy waits for no device (only for memory, if the pages were swapped out).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};

/// How the export is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenFlags {
    /// O_DIRECT: bypass the page cache (buffers and offsets must then be block aligned).
    pub direct: bool,
    pub read_only: bool,
}

/// One operation on the export. The `iovecs` of reads and writes point into guest memory.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    Read {
        offset: u64,
        iovecs: &'a [libc::iovec],
    },
    Write {
        offset: u64,
        iovecs: &'a [libc::iovec],
        /// Durable on completion (RWF_DSYNC): write-through cache mode.
        dsync: bool,
    },
    /// Read into one contiguous buffer inside registered buffer `index` (no page lookup
    /// per request).
    ReadFixed {
        offset: u64,
        buf: *mut u8,
        len: u32,
        index: u16,
    },
    /// Write from one contiguous buffer inside registered buffer `index`.
    WriteFixed {
        offset: u64,
        buf: *const u8,
        len: u32,
        index: u16,
        dsync: bool,
    },
    /// Vectored read into buffers all inside registered buffer `index` (kernel 6.15+, see
    /// [`Engine::vectored_fixed`]).
    ReadvFixed {
        offset: u64,
        iovecs: &'a [libc::iovec],
        index: u16,
    },
    /// Vectored write from buffers all inside registered buffer `index`.
    WritevFixed {
        offset: u64,
        iovecs: &'a [libc::iovec],
        index: u16,
        dsync: bool,
    },
    /// Make completed writes durable (fdatasync).
    Flush,
    /// Deallocate (FALLOC_FL_PUNCH_HOLE: reads return zeros afterwards).
    Discard { offset: u64, len: u64 },
    /// Zero a range: deallocating it if `unmap`, else keeping it allocated (ZERO_RANGE).
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// Completion token of the wait timeout (request tokens are below 2^32).
const TIMEOUT_TOKEN: u64 = u64::MAX;

/// The submission ring is full: submit (and reap) first.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// `io_uring_register` opcodes (linux/io_uring.h) a worker uses once the ring runs.
const REGISTER_BUFFERS: u8 = 0;
const UNREGISTER_BUFFERS: u8 = 1;
const REGISTER_EVENTFD: u8 = 4;

/// Limits `ring` to what the engine does — the reads, writes, syncs, discards and the timed
/// wait it submits on its one registered file, and the registrations a worker makes later
/// (guest memory as buffers, its completion eventfd) — and enables it. io_uring's operations
/// are not seen by seccomp: without this, a worker thread someone took over could open files
/// or sockets through its ring.
fn restrict(ring: &IoUring) -> io::Result<()> {
    let s = ring.submitter();
    s.register_restrictions(&mut [
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::ReadFixed::CODE),
        Restriction::sqe_op(opcode::WriteFixed::CODE),
        Restriction::sqe_op(opcode::ReadvFixed::CODE),
        Restriction::sqe_op(opcode::WritevFixed::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::Fallocate::CODE),
        Restriction::sqe_op(opcode::Timeout::CODE),
        Restriction::sqe_flags_allowed(squeue::Flags::FIXED_FILE.bits()),
        Restriction::register_op(REGISTER_BUFFERS),
        Restriction::register_op(UNREGISTER_BUFFERS),
        Restriction::register_op(REGISTER_EVENTFD),
    ])?;
    s.register_enable_rings()
}

/// An export on one io_uring.
pub struct Engine {
    ring: IoUring,
    file: File,
    capacity: u64,
    flags: OpenFlags,
    /// Registered buffers: (host address, length), by index.
    fixed: Vec<(usize, usize)>,
    /// The kernel has READV_FIXED / WRITEV_FIXED.
    vectored_fixed: bool,
    /// The armed wait timeout (see [`Engine::submit_and_wait_at_most`]).
    timeout: Box<types::Timespec>,
    timeout_armed: bool,
    depth: usize,
    /// Pushed and not yet completed (or, inline, not yet reaped).
    inflight: usize,
    /// Requests are done inline (memory file system).
    inline: bool,
    /// Inline completions not yet reaped, `(token, result)`.
    done: Vec<(u64, i32)>,
}

/// Whether `file` is a regular file that lives in memory (tmpfs, ramfs), where I/O is done
/// inline. A block device node is not: the file system that holds the node (devtmpfs, which
/// reports tmpfs's magic) says nothing of the device behind it.
fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    // SAFETY: statfs is plain data that fstatfs fills in; the fd is open for the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as u64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// The result of a syscall as io_uring reports it: the value, or minus the errno.
fn io_result(r: libc::ssize_t) -> i32 {
    if r < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        r.min(i32::MAX as libc::ssize_t) as i32
    }
}

/// io_uring_setup's ENOMEM: the ring's memory is charged to RLIMIT_MEMLOCK (about 100 KiB
/// at the default depth of 1024) unless the process has CAP_IPC_LOCK.
fn memlock_hint(e: io::Error, depth: u32) -> io::Error {
    if e.raw_os_error() == Some(libc::ENOMEM) {
        io::Error::new(
            e.kind(),
            format!(
                "io_uring ring of {depth} entries: {e}; its memory counts against \
                 RLIMIT_MEMLOCK: raise the limit (ulimit -l, LimitMEMLOCK=) or grant CAP_IPC_LOCK"
            ),
        )
    } else {
        e
    }
}

impl Engine {
    /// Opens `path` and a ring of `depth` entries (per queue worker).
    pub fn open(path: &Path, flags: OpenFlags, depth: u32) -> io::Result<Engine> {
        let mut o = OpenOptions::new();
        o.read(true).write(!flags.read_only);
        if flags.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let mut file = o.open(path)?;
        // Works for regular files and block devices alike.
        let capacity = file.seek(SeekFrom::End(0))?;
        let depth = depth.max(2);
        // Made disabled, so that what it may do is fixed before its first use.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(depth)
            .map_err(|e| memlock_hint(e, depth))?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let mut probe = io_uring::Probe::new();
        let vectored_fixed = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadvFixed::CODE)
            && probe.is_supported(opcode::WritevFixed::CODE);
        restrict(&ring)?;
        let inline = in_memory(&file);
        Ok(Engine {
            inline,
            done: Vec::with_capacity(depth as usize),
            ring,
            file,
            capacity,
            flags,
            fixed: Vec::new(),
            vectored_fixed,
            timeout: Box::new(types::Timespec::new()),
            timeout_armed: false,
            depth: depth as usize,
            inflight: 0,
        })
    }

    /// Size of the export in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// How the export was opened.
    pub fn flags(&self) -> OpenFlags {
        self.flags
    }

    /// Submission ring entries: at most this many requests should be in flight.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Requests pushed and not completed yet.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Whether requests are done inline, at push (memory file system).
    pub fn inline(&self) -> bool {
        self.inline
    }

    /// Does `op` now, with a syscall, and queues its completion.
    ///
    /// # Safety
    /// As for [`Engine::push`]: the memory the op reads or writes is valid.
    unsafe fn run_inline(&mut self, op: Op<'_>, token: u64) -> Result<(), Full> {
        if self.done.len() >= self.depth {
            return Err(Full);
        }
        let fd = self.file.as_raw_fd();
        let dsync_flag = |d: bool| if d { libc::RWF_DSYNC } else { 0 };
        let one = |buf: *const u8, len: u32| libc::iovec {
            iov_base: buf as *mut libc::c_void,
            iov_len: len as usize,
        };
        let rw = |write: bool, offset: u64, iov: &[libc::iovec], flags: i32| {
            let n = iov.len().min(libc::c_int::MAX as usize) as libc::c_int;
            // SAFETY: the iovecs describe memory the caller keeps valid (push's contract);
            // the kernel checks every address of it.
            let r = unsafe {
                if write {
                    libc::pwritev2(fd, iov.as_ptr(), n, offset as libc::off_t, flags)
                } else {
                    libc::preadv2(fd, iov.as_ptr(), n, offset as libc::off_t, flags)
                }
            };
            io_result(r)
        };
        let fallocate = |offset: u64, len: u64, mode: i32| {
            // SAFETY: plain syscall on our own fd.
            let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
            io_result(r as libc::ssize_t)
        };
        let result = match op {
            Op::Read { offset, iovecs } | Op::ReadvFixed { offset, iovecs, .. } => {
                rw(false, offset, iovecs, 0)
            }
            Op::Write {
                offset,
                iovecs,
                dsync,
            }
            | Op::WritevFixed {
                offset,
                iovecs,
                dsync,
                ..
            } => rw(true, offset, iovecs, dsync_flag(dsync)),
            Op::ReadFixed {
                offset, buf, len, ..
            } => rw(false, offset, &[one(buf, len)], 0),
            Op::WriteFixed {
                offset,
                buf,
                len,
                dsync,
                ..
            } => rw(true, offset, &[one(buf, len)], dsync_flag(dsync)),
            // SAFETY: plain syscall on our own fd.
            Op::Flush => io_result(unsafe { libc::fdatasync(fd) } as libc::ssize_t),
            Op::Discard { offset, len } => fallocate(
                offset,
                len,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            Op::WriteZeroes { offset, len, unmap } => fallocate(offset, len, zeroes_mode(unmap)),
        };
        self.done.push((token, result));
        self.inflight += 1;
        Ok(())
    }

    /// Queues `op`; its completion carries `token`. Nothing is submitted until [`submit`].
    ///
    /// # Safety
    /// For a read or write: the iovec array must stay valid until the next [`submit`] (the
    /// kernel takes its copy of it at submission), and the memory it describes until the
    /// completion with `token` has been reaped (for reads, not otherwise accessed by us
    /// meanwhile). For a fixed read or write: the buffer(s) must lie inside registered buffer
    /// `index`, and stay valid until the completion has been reaped.
    ///
    /// [`submit`]: Engine::submit
    pub unsafe fn push(&mut self, op: Op<'_>, token: u64) -> Result<(), Full> {
        if self.inline {
            // SAFETY: this function's contract, which covers the memory for longer.
            return unsafe { self.run_inline(op, token) };
        }
        let fd = types::Fixed(0);
        let entry = match op {
            Op::Read { offset, iovecs } => {
                opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(offset)
                    .build()
            }
            Op::Write {
                offset,
                iovecs,
                dsync,
            } => opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::ReadFixed {
                offset,
                buf,
                len,
                index,
            } => opcode::ReadFixed::new(fd, buf, len, index)
                .offset(offset)
                .build(),
            Op::WriteFixed {
                offset,
                buf,
                len,
                index,
                dsync,
            } => opcode::WriteFixed::new(fd, buf, len, index)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::ReadvFixed {
                offset,
                iovecs,
                index,
            } => opcode::ReadvFixed::new(fd, iovecs.as_ptr(), iovecs.len() as u32, index)
                .offset(offset)
                .build(),
            Op::WritevFixed {
                offset,
                iovecs,
                index,
                dsync,
            } => opcode::WritevFixed::new(fd, iovecs.as_ptr(), iovecs.len() as u32, index)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard { offset, len } => fallocate(
                fd,
                offset,
                len,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            Op::WriteZeroes { offset, len, unmap } => {
                fallocate(fd, offset, len, zeroes_mode(unmap))
            }
        }
        .user_data(token);
        // SAFETY: the entry references the registered file and, for reads and writes, the
        // iovec array and the memory it describes, which the caller keeps valid as long as
        // the kernel may use them (this function's contract).
        unsafe {
            self.ring.submission().push(&entry).map_err(|_| Full)?;
        }
        self.inflight += 1;
        Ok(())
    }

    /// Submits everything pushed since the last call: one syscall, or none if nothing was.
    pub fn submit(&mut self) -> io::Result<usize> {
        if self.ring.submission().is_empty() {
            return Ok(0);
        }
        self.ring.submit()
    }

    /// Submits and waits until at least `want` completions are ready (event mode).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        if !self.done.is_empty() {
            return self.submit();
        }
        self.ring.submit_and_wait(want.min(self.inflight))
    }

    /// Submits and waits until a completion is ready, or at most `slice`: a timeout request
    /// is armed when none is pending (one timer per `slice` however many waits, instead of a
    /// timer per wait). Its completion is consumed here, never reaped as a request's.
    pub fn submit_and_wait_at_most(&mut self, slice: std::time::Duration) -> io::Result<usize> {
        if !self.done.is_empty() {
            return self.submit();
        }
        if !self.timeout_armed {
            *self.timeout = types::Timespec::from(slice);
            let entry = opcode::Timeout::new(&*self.timeout)
                .build()
                .user_data(TIMEOUT_TOKEN);
            // SAFETY: the timespec is boxed in `self` and not changed while the timeout is
            // armed; the kernel copies it when the entry is submitted, just below.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.timeout_armed = true;
            }
        }
        self.ring.submit_and_wait(1)
    }

    /// Registers `bufs` (host address, length; at most 1 GiB each) as the ring's fixed
    /// buffers, replacing any registered before.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Engine::unregister_buffers`] (or the engine's end),
    /// and no request using them may be in flight when they are replaced.
    pub unsafe fn register_buffers(&mut self, bufs: &[(usize, usize)]) -> io::Result<()> {
        self.unregister_buffers();
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: the caller keeps the memory mapped while it is registered.
        unsafe { self.ring.submitter().register_buffers(&iov) }?;
        self.fixed = bufs.to_vec();
        Ok(())
    }

    /// Forgets the registered buffers (nothing using them may be in flight).
    pub fn unregister_buffers(&mut self) {
        if !self.fixed.is_empty() {
            let _ = self.ring.submitter().unregister_buffers();
            self.fixed.clear();
        }
    }

    /// The registered buffer holding `addr..addr+len`, if any.
    #[inline]
    pub fn fixed_index(&self, addr: usize, len: usize) -> Option<u16> {
        self.fixed
            .iter()
            .position(|&(a, l)| addr >= a && addr - a <= l && len <= l - (addr - a))
            .map(|i| i as u16)
    }

    /// Whether vectored fixed reads and writes are available (kernel 6.15+).
    pub fn vectored_fixed(&self) -> bool {
        self.vectored_fixed
    }

    /// The registered buffer holding every buffer of `iov`, if one does and the kernel can
    /// do vectored fixed I/O.
    #[inline]
    pub fn fixed_index_all(&self, iov: &[libc::iovec]) -> Option<u16> {
        if !self.vectored_fixed {
            return None;
        }
        let (first, rest) = iov.split_first()?;
        let i = self.fixed_index(first.iov_base as usize, first.iov_len)?;
        let (a, l) = self.fixed[i as usize];
        rest.iter()
            .all(|v| {
                let b = v.iov_base as usize;
                b >= a && b - a <= l && v.iov_len <= l - (b - a)
            })
            .then_some(i)
    }

    /// Has the kernel write `fd` (an eventfd) whenever it posts a completion, so that a
    /// sleeping worker wakes for completions as for guest kicks.
    pub fn register_eventfd(&self, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(fd)
    }

    /// Whether completions are waiting to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.done.is_empty() || !self.ring.completion().is_empty()
    }

    /// Appends the completions ready now, `(token, result)` with result the byte count or a
    /// negative errno, to `out`. No syscall.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        self.inflight = self.inflight.saturating_sub(self.done.len());
        out.append(&mut self.done);
        for cqe in self.ring.completion() {
            if cqe.user_data() == TIMEOUT_TOKEN {
                self.timeout_armed = false;
                continue;
            }
            out.push((cqe.user_data(), cqe.result()));
            self.inflight = self.inflight.saturating_sub(1);
        }
    }
}

/// The fallocate mode of WRITE_ZEROES: deallocate if `unmap`, else keep the range allocated.
fn zeroes_mode(unmap: bool) -> i32 {
    if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

fn fallocate(fd: types::Fixed, offset: u64, len: u64, mode: i32) -> squeue::Entry {
    opcode::Fallocate::new(fd, len)
        .offset(offset)
        .mode(mode)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the tests' files go: a disk file system (requests on io_uring) and tmpfs
    /// (requests inline); each test runs on both.
    fn dirs() -> [(std::path::PathBuf, bool); 2] {
        let shm = std::path::PathBuf::from("/dev/shm");
        assert!(
            shm.is_dir(),
            "/dev/shm (tmpfs) is needed for the inline-I/O tests"
        );
        [
            (
                std::env::temp_dir(),
                in_memory(&File::open(std::env::temp_dir()).unwrap()),
            ),
            (shm, true),
        ]
    }

    fn scratch(dir: &std::path::Path, len: u64) -> (std::path::PathBuf, File) {
        let p = dir.join(format!(
            "torii-blk-engine-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        (p, f)
    }

    /// The ring runs only the operations the engine submits: anything else (here a file
    /// open, which seccomp would never see) completes with EACCES, and so do registrations
    /// beyond the worker's.
    #[test]
    fn the_ring_refuses_operations_the_engine_does_not_make() {
        let (p, _f) = scratch(&std::env::temp_dir(), 4096);
        let mut e = Engine::open(&p, OpenFlags::default(), 8).unwrap();
        let path = std::ffi::CString::new("/etc/hostname").unwrap();
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(7);
        // SAFETY: `path` outlives the submission, which completes before this returns.
        unsafe { e.ring.submission().push(&open).unwrap() };
        e.ring.submit_and_wait(1).unwrap();
        let c = e.ring.completion().next().expect("a completion");
        assert_eq!((c.user_data(), c.result()), (7, -libc::EACCES));
        let probe = e.ring.submitter().register_files(&[0]);
        assert_eq!(
            probe.unwrap_err().raw_os_error(),
            Some(libc::EACCES),
            "a registration the worker does not make"
        );
        drop(e);
        std::fs::remove_file(p).unwrap();
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn iov(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    /// Submits and waits for every pushed request; returns the results by token.
    fn run(e: &mut Engine) -> Vec<(u64, i32)> {
        let mut out = Vec::new();
        while e.inflight() > 0 {
            e.submit_and_wait(1).unwrap();
            e.reap(&mut out);
        }
        out.sort();
        out
    }

    #[test]
    fn writes_read_back_and_discards_read_as_zeros() {
        for (dir, inline) in dirs() {
            let (path, _f) = scratch(&dir, 1 << 20);
            let mut e = Engine::open(&path, OpenFlags::default(), 64).unwrap();
            assert_eq!(e.inline(), inline, "{}", dir.display());
            assert_eq!(e.capacity(), 1 << 20);
            // Two writes in one batch, each from two buffers.
            let (mut a, mut b) = (vec![0xa5u8; 4096], vec![0x5au8; 4096]);
            let (mut c, mut d) = (vec![1u8; 512], vec![2u8; 1536]);
            let w1 = [iov(&mut a), iov(&mut b)];
            let w2 = [iov(&mut c), iov(&mut d)];
            // SAFETY: the buffers live until `run` has reaped both completions.
            unsafe {
                e.push(
                    Op::Write {
                        offset: 0,
                        iovecs: &w1,
                        dsync: false,
                    },
                    1,
                )
                .unwrap();
                e.push(
                    Op::Write {
                        offset: 65536,
                        iovecs: &w2,
                        dsync: true,
                    },
                    2,
                )
                .unwrap();
            }
            assert_eq!(run(&mut e), vec![(1, 8192), (2, 2048)]);
            // SAFETY: as above.
            unsafe { e.push(Op::Flush, 3).unwrap() };
            assert_eq!(run(&mut e), vec![(3, 0)]);
            let mut r = vec![0u8; 8192 + 2048];
            let (r1, r2) = r.split_at_mut(8192);
            let reads = [iov(r1)];
            let reads2 = [iov(r2)];
            // SAFETY: as above.
            unsafe {
                e.push(
                    Op::Read {
                        offset: 0,
                        iovecs: &reads,
                    },
                    4,
                )
                .unwrap();
                e.push(
                    Op::Read {
                        offset: 65536,
                        iovecs: &reads2,
                    },
                    5,
                )
                .unwrap();
            }
            assert_eq!(run(&mut e), vec![(4, 8192), (5, 2048)]);
            assert!(r[..4096].iter().all(|&x| x == 0xa5));
            assert!(r[4096..8192].iter().all(|&x| x == 0x5a));
            assert_eq!((r[8192], r[8192 + 512]), (1, 2));
            // Discard and write zeroes (with unmap): reads return zeros.
            // SAFETY: no buffers.
            unsafe {
                e.push(
                    Op::Discard {
                        offset: 0,
                        len: 4096,
                    },
                    6,
                )
                .unwrap();
                e.push(
                    Op::WriteZeroes {
                        offset: 65536,
                        len: 4096,
                        unmap: true,
                    },
                    7,
                )
                .unwrap();
            }
            assert_eq!(run(&mut e), vec![(6, 0), (7, 0)]);
            let mut z = vec![0xffu8; 4096];
            let zr = [iov(&mut z)];
            // SAFETY: as above.
            unsafe {
                e.push(
                    Op::Read {
                        offset: 0,
                        iovecs: &zr,
                    },
                    8,
                )
                .unwrap()
            };
            assert_eq!(run(&mut e), vec![(8, 4096)]);
            assert!(z.iter().all(|&x| x == 0));
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn only_regular_files_in_memory_are_done_inline() {
        // /dev is devtmpfs, which reports tmpfs's magic: its device nodes must not count.
        assert!(!in_memory(&File::open("/dev/null").unwrap()));
        let (path, f) = scratch(std::path::Path::new("/dev/shm"), 4096);
        assert!(in_memory(&f));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_exports_fail_writes_with_an_errno() {
        for (dir, _) in dirs() {
            let (path, _f) = scratch(&dir, 4096);
            let mut e = Engine::open(
                &path,
                OpenFlags {
                    read_only: true,
                    ..Default::default()
                },
                8,
            )
            .unwrap();
            let mut b = vec![1u8; 512];
            let w = [iov(&mut b)];
            // SAFETY: `b` lives until the completion is reaped.
            unsafe {
                e.push(
                    Op::Write {
                        offset: 0,
                        iovecs: &w,
                        dsync: false,
                    },
                    9,
                )
                .unwrap()
            };
            assert_eq!(run(&mut e), vec![(9, -libc::EBADF)]);
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn fixed_buffers_read_and_write() {
        for (dir, _) in dirs() {
            let (path, _f) = scratch(&dir, 1 << 20);
            let mut e = Engine::open(&path, OpenFlags::default(), 8).unwrap();
            let mut mem = vec![0u8; 64 << 10];
            let base = mem.as_mut_ptr() as usize;
            // SAFETY: `mem` outlives the engine's use of it (unregistered before it is dropped).
            unsafe { e.register_buffers(&[(base, mem.len())]).unwrap() };
            assert_eq!(e.fixed_index(base + 4096, 4096), Some(0));
            assert_eq!(e.fixed_index(base + (60 << 10), 8192), None);
            mem[..4096].fill(0x3c);
            // SAFETY: both buffers lie in the registered buffer and live until the completions
            // are reaped by `run`.
            unsafe {
                e.push(
                    Op::WriteFixed {
                        offset: 8192,
                        buf: mem.as_ptr(),
                        len: 4096,
                        index: 0,
                        dsync: false,
                    },
                    1,
                )
                .unwrap();
            }
            assert_eq!(run(&mut e), vec![(1, 4096)]);
            let dst = mem[8192..].as_mut_ptr();
            // SAFETY: as above.
            unsafe {
                e.push(
                    Op::ReadFixed {
                        offset: 8192,
                        buf: dst,
                        len: 4096,
                        index: 0,
                    },
                    2,
                )
                .unwrap();
            }
            assert_eq!(run(&mut e), vec![(2, 4096)]);
            assert!(mem[8192..12288].iter().all(|&b| b == 0x3c));
            e.unregister_buffers();
            assert_eq!(e.fixed_index(base, 1), None);
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn vectored_fixed_buffers_when_the_kernel_has_them() {
        for (dir, _) in dirs() {
            let (path, _f) = scratch(&dir, 1 << 20);
            let mut e = Engine::open(&path, OpenFlags::default(), 8).unwrap();
            let mut mem = vec![0u8; 64 << 10];
            let base = mem.as_mut_ptr() as usize;
            // SAFETY: `mem` outlives the engine's use of it (unregistered before it is dropped).
            unsafe { e.register_buffers(&[(base, mem.len())]).unwrap() };
            mem[..512].fill(1);
            mem[4096..5120].fill(2);
            let out = [
                libc::iovec {
                    iov_base: base as *mut libc::c_void,
                    iov_len: 512,
                },
                libc::iovec {
                    iov_base: (base + 4096) as *mut libc::c_void,
                    iov_len: 1024,
                },
            ];
            let outside = [
                out[0],
                libc::iovec {
                    iov_base: (base + (64 << 10)) as *mut libc::c_void,
                    iov_len: 512,
                },
            ];
            assert_eq!(e.fixed_index_all(&outside), None);
            if !e.vectored_fixed() {
                // Kernels before 6.15: requests fall back to readv/writev.
                assert_eq!(e.fixed_index_all(&out), None);
                continue;
            }
            assert_eq!(e.fixed_index_all(&out), Some(0));
            // SAFETY: the buffers lie in the registered buffer and live until `run` reaps.
            unsafe {
                e.push(
                    Op::WritevFixed {
                        offset: 0,
                        iovecs: &out,
                        index: 0,
                        dsync: false,
                    },
                    1,
                )
                .unwrap();
            }
            assert_eq!(run(&mut e), vec![(1, 1536)]);
            let back = [libc::iovec {
                iov_base: (base + 8192) as *mut libc::c_void,
                iov_len: 1536,
            }];
            // SAFETY: as above.
            unsafe {
                e.push(
                    Op::ReadvFixed {
                        offset: 0,
                        iovecs: &back,
                        index: 0,
                    },
                    2,
                )
                .unwrap();
            }
            assert_eq!(run(&mut e), vec![(2, 1536)]);
            assert!(mem[8192..8704].iter().all(|&b| b == 1));
            assert!(mem[8704..9728].iter().all(|&b| b == 2));
            e.unregister_buffers();
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn a_full_submission_ring_says_so() {
        for (dir, _) in dirs() {
            let (path, _f) = scratch(&dir, 4096);
            let mut e = Engine::open(&path, OpenFlags::default(), 2).unwrap();
            // SAFETY: flushes reference no memory.
            unsafe {
                e.push(Op::Flush, 1).unwrap();
                e.push(Op::Flush, 2).unwrap();
                assert_eq!(e.push(Op::Flush, 3), Err(Full));
            }
            assert_eq!(run(&mut e).len(), 2);
            std::fs::remove_file(path).unwrap();
        }
    }
}
