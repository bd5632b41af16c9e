//! Survives a memif peer that goes away during a burst.
//!
//! DPDK 22.11's memif driver handles a peer's disconnect in its interrupt thread. It clears
//! the port's connected flag and unmaps the peer's shared regions right away, without waiting
//! for a receive or transmit burst that already passed the flag check. Such a burst then copies
//! from (or into) memory that is gone. The SIGSEGV would end the daemon, and every other port
//! with it. A peer is another workload on the host, and it can exit or be killed at any moment.
//!
//! Bursts on such ports run inside [`burst`], which marks the thread. The SIGSEGV handler only
//! acts on a fault at an unmapped address (SEGV_MAPERR) from a marked thread. It maps a
//! private zero page there with MAP_FIXED_NOREPLACE, which never replaces an existing mapping,
//! and returns, so the copy goes on against zeros. The burst's packets are garbage. Their
//! count is bounded, and they only happen in the one burst that raced the disconnect: the
//! driver sees the flag cleared on its next call. After the burst, the thread unmaps the pages
//! it was given and counts the event. Any other SIGSEGV goes to the handler that was there
//! before (Rust's stack-overflow check), or takes the default action.
//!
//! The handler reads only thread-local cells and atomics, and calls mmap(2) and munmap(2),
//! both async-signal-safe and both in every seccomp class's list.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Most pages one burst may be given: a burst of 32 frames of 2 KiB buffers spans about 16,
/// plus the ring's. Past that, the fault takes the normal path.
const MAX_PAGES: usize = 64;
const PAGE: usize = 4096;
/// `si_code` of a fault at an address with no mapping (asm-generic/siginfo.h).
const SEGV_MAPERR: libc::c_int = 1;

thread_local! {
    static IN_BURST: Cell<bool> = const { Cell::new(false) };
    static PATCHED: Cell<usize> = const { Cell::new(0) };
    static PAGES: [Cell<usize>; MAX_PAGES] = const { [const { Cell::new(0) }; MAX_PAGES] };
}

/// Bursts that ran into a peer's unmapped memory and were carried through.
static SURVIVED: AtomicU64 = AtomicU64::new(0);

/// The SIGSEGV disposition found at install, to pass other faults on to.
struct Previous(libc::sigaction);
// SAFETY: a plain C struct of a function address, flags and a signal mask; only read.
unsafe impl Sync for Previous {}
// SAFETY: as above.
unsafe impl Send for Previous {}

static PREVIOUS: OnceLock<Previous> = OnceLock::new();

type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs the SIGSEGV handler, once per process; call it while rt_sigaction is allowed
/// (DPDK is initialised before the seccomp filters).
pub fn install() -> std::io::Result<()> {
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    // SAFETY: zeroed sigaction structs are valid; the handler only makes async-signal-safe
    // calls; the old disposition is read into `old`.
    let old = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsegv as Handler as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGSEGV, &sa, &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        old
    };
    let _ = PREVIOUS.set(Previous(old));
    Ok(())
}

/// Runs one burst of a port whose driver maps a peer's memory, with the thread marked for
/// the handler; afterwards, gives back the zero pages the handler mapped during it, if any.
#[inline]
pub fn burst<R>(f: impl FnOnce() -> R) -> R {
    IN_BURST.with(|b| b.set(true));
    let r = f();
    IN_BURST.with(|b| b.set(false));
    if PATCHED.with(Cell::get) != 0 {
        release();
    }
    r
}

/// Bursts carried through a peer's disconnect so far (all ports).
pub fn survived() -> u64 {
    SURVIVED.load(Ordering::Relaxed)
}

#[cold]
fn release() {
    let n = PATCHED.with(|p| p.replace(0));
    PAGES.with(|pages| {
        for p in &pages[..n.min(MAX_PAGES)] {
            // SAFETY: unmaps a page the handler mapped on this thread during the burst that
            // just ended; the driver no longer refers to it (the peer's regions are gone).
            unsafe { libc::munmap(p.replace(0) as *mut libc::c_void, PAGE) };
        }
    });
    SURVIVED.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        pages = n,
        "a memif peer went away during a burst: its unmapped memory read as zeros for that burst"
    );
}

extern "C" fn on_sigsegv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == SEGV_MAPERR && IN_BURST.with(Cell::get) {
        let n = PATCHED.with(Cell::get);
        if n < MAX_PAGES {
            let page = addr & !(PAGE - 1);
            // SAFETY: maps a new private page at an address nothing is mapped at (the fault
            // says so, and NOREPLACE refuses otherwise); nothing else is touched.
            let r = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if r as usize == page {
                PAGES.with(|p| p[n].set(page));
                PATCHED.with(|p| p.set(n + 1));
                return;
            }
            if r != libc::MAP_FAILED {
                // A kernel that took NOREPLACE as a hint put it elsewhere: not ours to use.
                // SAFETY: unmaps the page just mapped.
                unsafe { libc::munmap(r, PAGE) };
            }
        }
    }
    pass_on(sig, info, ctx);
}

/// Hands a fault that is not ours to the previous handler, or restores the default action
/// (the faulting access then raises it again).
fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    match PREVIOUS.get() {
        Some(Previous(old)) if old.sa_sigaction > libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous SA_SIGINFO handler, called as the kernel would.
                let h: Handler = unsafe { std::mem::transmute(old.sa_sigaction) };
                h(sig, info, ctx);
            } else {
                // SAFETY: the previous plain handler, called as the kernel would.
                let h: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                h(sig);
            }
        }
        // SAFETY: signal(2) is async-signal-safe.
        _ => unsafe {
            libc::signal(sig, libc::SIG_DFL);
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_reading_unmapped_memory_gets_zeros_and_gives_them_back() {
        install().unwrap();
        // SAFETY: a fresh anonymous mapping of three pages, filled, then its middle page
        // unmapped, as a peer's region goes while a burst reads it.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            std::ptr::write_bytes(p, 0x5a, 3 * PAGE);
            assert_eq!(libc::munmap(p.add(PAGE) as *mut libc::c_void, PAGE), 0);
            p
        };
        let before = survived();
        let sum: u64 = burst(|| {
            (0..3 * PAGE)
                // SAFETY: inside the three pages; the middle one faults and is patched.
                .map(|i| u64::from(unsafe { base.add(i).read_volatile() }))
                .sum()
        });
        assert_eq!(sum, 2 * PAGE as u64 * 0x5a, "the gone page reads as zeros");
        assert_eq!(survived(), before + 1);
        assert_eq!(PATCHED.with(Cell::get), 0);
        // The zero page went with the burst: the address is free again.
        // SAFETY: probes the middle page with NOREPLACE, then unmaps everything.
        unsafe {
            let probe = libc::mmap(
                base.add(PAGE) as *mut libc::c_void,
                PAGE,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            assert_eq!(probe as usize, base as usize + PAGE);
            libc::munmap(base as *mut libc::c_void, 3 * PAGE);
        }
    }
}
