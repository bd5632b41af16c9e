//! The I/O engine: one io_uring per queue worker over the exported file or block device.
//! Requests are pushed as they are parsed and submitted once per poll round (one syscall for
//! the whole batch); completions are reaped from the shared completion ring without a syscall.
//! The file is registered with the ring (no fd lookup per request).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
    /// Pushed and not yet completed.
    inflight: usize,
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
        let ring = IoUring::new(depth)?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let mut probe = io_uring::Probe::new();
        let vectored_fixed = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadvFixed::CODE)
            && probe.is_supported(opcode::WritevFixed::CODE);
        Ok(Engine {
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
            Op::WriteZeroes { offset, len, unmap } => fallocate(
                fd,
                offset,
                len,
                if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                },
            ),
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
        self.ring.submit_and_wait(want.min(self.inflight))
    }

    /// Submits and waits until a completion is ready, or at most `slice`: a timeout request
    /// is armed when none is pending (one timer per `slice` however many waits, instead of a
    /// timer per wait). Its completion is consumed here, never reaped as a request's.
    pub fn submit_and_wait_at_most(&mut self, slice: std::time::Duration) -> io::Result<usize> {
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
        !self.ring.completion().is_empty()
    }

    /// Appends the completions ready now, `(token, result)` with result the byte count or a
    /// negative errno, to `out`. No syscall.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
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

fn fallocate(fd: types::Fixed, offset: u64, len: u64, mode: i32) -> squeue::Entry {
    opcode::Fallocate::new(fd, len)
        .offset(offset)
        .mode(mode)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(len: u64) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!(
            "torii-blk-engine-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        (p, f)
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
        let (path, _f) = scratch(1 << 20);
        let mut e = Engine::open(&path, OpenFlags::default(), 64).unwrap();
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

    #[test]
    fn read_only_exports_fail_writes_with_an_errno() {
        let (path, _f) = scratch(4096);
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

    #[test]
    fn fixed_buffers_read_and_write() {
        let (path, _f) = scratch(1 << 20);
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

    #[test]
    fn vectored_fixed_buffers_when_the_kernel_has_them() {
        let (path, _f) = scratch(1 << 20);
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
            return;
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

    #[test]
    fn a_full_submission_ring_says_so() {
        let (path, _f) = scratch(4096);
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
