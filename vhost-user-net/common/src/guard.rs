//! Survives a frontend that truncates the files behind guest memory.
//!
//! Guest memory and the inflight region are mappings of files the frontend owns (memfds,
//! hugetlbfs files). Their length is checked when they are mapped, but the frontend can
//! shrink a file afterwards, and the next access past its new end raises SIGBUS. The default
//! action of SIGBUS ends the process, and with it every other port and disk.
//!
//! This module keeps a fixed table of the mappings it guards. Its SIGBUS handler checks
//! whether the faulting address lies in one of them. If it does, the handler maps a private
//! zero page over the faulting page, marks the mapping faulted, counts the fault and returns,
//! and the access is retried against the zero page. The data path sees the fault count move
//! ([`faults`]) and checks its memory table ([`faulted`]). It then reports the device's queues
//! broken (see `ring::RingMaps`), and every other device keeps serving. A SIGBUS anywhere
//! else takes the default action.
//!
//! The handler only reads atomics and calls mmap(2), both async-signal-safe. mmap is in
//! every seccomp class's list, and the handler takes no locks and allocates nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};

/// Most mappings guarded at once, across all connections: 128 connections at the 32 memory
/// regions a connection may have, or fewer with their previous memory tables and inflight
/// regions. A mapping beyond that is not guarded: a truncation of it still ends the process,
/// as before, and a warning says so when it is mapped.
pub const SLOTS: usize = 4096;

/// One guarded mapping. `seq` is odd while the slot is being written, so the handler never
/// acts on a start from one mapping and a length from another.
struct Slot {
    seq: AtomicU64,
    used: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    page: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    seq: AtomicU64::new(0),
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// SIGBUS faults caught in guarded mappings since the process started.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// SIGBUS faults caught in guarded mappings so far. The data path compares it once per
/// burst; it moves only when a frontend truncated memory under the daemon.
#[inline(always)]
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// Installs the SIGBUS handler (once per process). A daemon calls this at start, before its
/// seccomp filters, which may not allow rt_sigaction on every thread. [`Guard::new`] calls it
/// too, for programs that never did.
pub fn install() -> std::io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler and flags are set
        // below, and the mask is emptied with sigemptyset.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as Handler as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sigemptyset on a valid sigset, then sigaction(2) with a valid struct and a
        // handler that only does async-signal-safe work.
        let ok = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0
        };
        INSTALLED.store(ok, Ordering::Release);
    });
    if INSTALLED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "installing the SIGBUS handler failed",
        ))
    }
}

/// A guarded mapping: its slot in the table, released on drop. Drop it before the mapping is
/// unmapped.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Guards `len` bytes mapped at `start` from `file`'s pages of `page` bytes (4096, or the
    /// huge page size of a hugetlbfs file). `None` if the table is full.
    pub fn new(start: usize, len: usize, page: usize) -> Option<Guard> {
        if start == 0 || len == 0 || !page.is_power_of_two() || install().is_err() {
            return None;
        }
        let slot = TABLE.iter().position(|s| {
            s.used
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })?;
        let s = &TABLE[slot];
        s.seq.fetch_add(1, Ordering::AcqRel);
        s.start.store(start, Ordering::Relaxed);
        s.len.store(len, Ordering::Relaxed);
        s.page.store(page, Ordering::Relaxed);
        s.faulted.store(false, Ordering::Relaxed);
        s.seq.fetch_add(1, Ordering::Release);
        Some(Guard { slot })
    }

    /// Guards a mapping of `file`, with the file's page size.
    pub fn for_file(start: usize, len: usize, file: &std::fs::File) -> Option<Guard> {
        let guard = Guard::new(start, len, page_size(file));
        if guard.is_none() {
            tracing::warn!(
                slots = SLOTS,
                "guest memory mapping not guarded against truncation: the table is full"
            );
        }
        guard
    }

    /// Whether a SIGBUS was caught in this mapping.
    pub fn faulted(&self) -> bool {
        TABLE[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.seq.fetch_add(1, Ordering::AcqRel);
        s.start.store(0, Ordering::Relaxed);
        s.len.store(0, Ordering::Relaxed);
        s.faulted.store(false, Ordering::Relaxed);
        s.seq.fetch_add(1, Ordering::Release);
        s.used.store(false, Ordering::Release);
    }
}

/// The page size of mappings of `file`: its block size when that is a huge page size
/// (hugetlbfs reports the huge page size), else 4096.
fn page_size(file: &std::fs::File) -> usize {
    use std::os::unix::fs::MetadataExt;
    let blk = file.metadata().map(|m| m.blksize()).unwrap_or(4096) as usize;
    if blk.is_power_of_two() && (4096..=1 << 30).contains(&blk) {
        blk
    } else {
        4096
    }
}

/// Whether a SIGBUS was caught in a guarded mapping overlapping `len` bytes at `start`.
pub fn faulted(start: usize, len: usize) -> bool {
    let end = start.saturating_add(len);
    TABLE.iter().any(|s| {
        let before = s.seq.load(Ordering::Acquire);
        let (a, l, hit) = (
            s.start.load(Ordering::Relaxed),
            s.len.load(Ordering::Relaxed),
            s.faulted.load(Ordering::Acquire),
        );
        before & 1 == 0
            && s.seq.load(Ordering::Acquire) == before
            && hit
            && a != 0
            && a < end
            && start < a.saturating_add(l)
    })
}

/// A guest memory mapping the daemon made of a frontend's file, guarded, as vm-memory's
/// bitmap of its region (the only per-region value vm-memory lets a region own): dropped with
/// the region, it releases the guard and then unmaps, so a slot never outlives its mapping.
/// Regions made by vm-memory itself (anonymous memory in tests) carry an empty one.
#[derive(Debug, Default)]
pub struct Owned {
    map: Option<(usize, usize, Option<Guard>)>,
}

impl Owned {
    /// Maps `len` bytes of `file` at `offset`, shared and read-write, and guards them. The
    /// caller has checked that the file backs all of them.
    pub fn map(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Owned> {
        use std::os::fd::AsRawFd;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::other("mapping offset out of range"))?;
        // SAFETY: a new shared mapping of the file at an address the kernel picks; nothing
        // else is affected. It is unmapped exactly once, by `Drop`.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let guard = Guard::for_file(addr as usize, len, file);
        Ok(Owned {
            map: Some((addr as usize, len, guard)),
        })
    }

    /// Where the mapping is (None for an empty one).
    pub fn addr(&self) -> Option<*mut u8> {
        self.map.as_ref().map(|m| m.0 as *mut u8)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some((addr, len, guard)) = self.map.take() {
            drop(guard);
            // SAFETY: unmaps the mapping made in `map`, once; the region that held this was
            // the last user of it.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

impl WithBitmapSlice<'_> for Owned {
    type S = ();
}

impl Bitmap for Owned {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

impl NewBitmap for Owned {
    fn with_len(_len: usize) -> Self {
        Owned::default()
    }
}

/// The guarded mapping holding `addr`: its start, length and page size, read consistently.
fn lookup(addr: usize) -> Option<(&'static Slot, usize, usize, usize)> {
    for s in TABLE.iter() {
        let before = s.seq.load(Ordering::Acquire);
        if before & 1 == 1 {
            continue;
        }
        let start = s.start.load(Ordering::Relaxed);
        let len = s.len.load(Ordering::Relaxed);
        let page = s.page.load(Ordering::Relaxed);
        if s.seq.load(Ordering::Acquire) != before || start == 0 {
            continue;
        }
        if addr >= start && addr - start < len && page.is_power_of_two() {
            return Some((s, start, len, page));
        }
    }
    None
}

type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// The SIGBUS handler: a fault past the end of a guarded mapping's file gets a private zero
/// page, so the access is retried against it. Any other SIGBUS takes the default action.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some((slot, start, len, page)) = lookup(addr) {
            let at = start + ((addr - start) & !(page - 1));
            let n = page.min(start + len - at);
            // SAFETY: replaces the faulting page of a mapping this process made of a
            // frontend's file, inside the bounds registered for it, with private anonymous
            // memory. Nothing else can live in those addresses while the mapping does.
            let r = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    n,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                FAULTS.fetch_add(1, Ordering::Release);
                return;
            }
        }
    }
    // Not a guarded mapping's: the default action, as without the handler. Returning to the
    // faulting access raises it again; a SIGBUS sent by another process is raised once more.
    // SAFETY: signal(2) and raise(3) are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        if code <= 0 {
            libc::raise(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: a NUL-terminated name; the fd is new and ours.
        let file = unsafe {
            std::fs::File::from_raw_fd(libc::memfd_create(
                c"torii-guard-test".as_ptr(),
                libc::MFD_CLOEXEC,
            ))
        };
        file.set_len(len).unwrap();
        file
    }

    fn map(file: &std::fs::File, len: usize) -> *mut u8 {
        // SAFETY: a new shared mapping of the file, at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    /// The table is process-wide: one test at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_marked_faulted() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let len = 4 * 4096;
        let file = memfd(len as u64);
        let p = map(&file, len);
        // SAFETY: inside the mapping, backed by the file.
        unsafe { p.add(3 * 4096).write_volatile(7) };
        let guard = Guard::for_file(p as usize, len, &file).unwrap();
        assert!(!guard.faulted());
        let before = faults();
        // The frontend keeps one page.
        file.set_len(4096).unwrap();
        // SAFETY: inside the mapping; past the file's end now, so it faults and is caught.
        let (first, last) = unsafe {
            (
                p.add(2 * 4096 + 5).read_volatile(),
                p.add(3 * 4096).read_volatile(),
            )
        };
        assert_eq!((first, last), (0, 0));
        assert!(guard.faulted());
        assert!(faults() >= before + 2);
        assert!(faulted(p as usize, len));
        // The page still backed by the file is left alone.
        // SAFETY: inside the mapping and the file.
        unsafe { p.write_volatile(9) };
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&file, &mut b, 0).unwrap();
        assert_eq!(b[0], 9);
        drop(guard);
        assert!(!faulted(p as usize, len));
        // SAFETY: unmaps our own mapping.
        unsafe { libc::munmap(p.cast(), len) };
    }

    #[test]
    fn an_owned_mapping_takes_its_entry_with_it() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let len = 2 * 4096;
        let file = memfd(len as u64);
        let owned = Owned::map(&file, 0, len).unwrap();
        let p = owned.addr().unwrap();
        file.set_len(0).unwrap();
        // SAFETY: inside the mapping; past the file's end, so the guard catches it.
        assert_eq!(unsafe { p.add(4096).read_volatile() }, 0);
        assert!(faulted(p as usize, len));
        drop(owned);
        // The entry went first, then the memory: nothing is guarded there now, and the file
        // is no longer mapped there. (Other tests' threads may map something new at the same
        // address meanwhile, so the check is on what is mapped, not whether anything is.)
        assert!(!faulted(p as usize, len));
        let (start, end) = (p as usize, p as usize + len);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let left: Vec<&str> = maps
            .lines()
            .filter(|line| {
                let range = line.split_whitespace().next().unwrap_or("");
                let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
                let a = usize::from_str_radix(a, 16).unwrap_or(0);
                let b = usize::from_str_radix(b, 16).unwrap_or(0);
                a < end && start < b && line.contains("torii-guard-test")
            })
            .collect();
        assert!(left.is_empty(), "still mapped: {left:?}");
    }

    #[test]
    fn slots_are_reused_and_bounded() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // Other tests of this crate map guest memory meanwhile, and hold some slots.
        let guards: Vec<Guard> = (1..=SLOTS + 1)
            .map_while(|i| Guard::new(i << 20, 4096, 4096))
            .collect();
        assert!(
            (SLOTS / 2..SLOTS + 1).contains(&guards.len()),
            "{}",
            guards.len()
        );
        drop(guards);
        assert!(Guard::new(1 << 40, 4096, 4096).is_some());
        assert!(Guard::new(0, 4096, 4096).is_none());
        assert!(Guard::new(4096, 4096, 3000).is_none());
    }
}
