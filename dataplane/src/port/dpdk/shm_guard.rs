//! Survives a memif peer that goes away during a burst.
//!
//! DPDK 22.11's memif driver handles a peer's disconnect in its interrupt thread. It clears
//! the port's connected flag, then unmaps the peer's shared regions and frees its table of
//! them, right away. It does not wait for a receive or transmit burst that has already passed
//! the flag check. Such a burst then copies from or into memory that is gone, or follows the
//! freed table, and the fault would end the daemon and every other port with it. A peer is
//! another workload on the host, and it can exit or be killed at any moment.
//!
//! Bursts on such ports go through the C shim's guarded calls
//! (`torii_rx_burst_guarded` / `torii_tx_burst_guarded`). Each sets a thread-local jump point
//! around the driver's burst, with no system call. The shim's SIGSEGV and SIGBUS handler jumps
//! back to that point when a fault happens inside a guarded burst, and the burst is abandoned.
//! Every other fault goes to the handler that was there before (Rust's stack-overflow check,
//! `torii_vhost_user::guard`'s SIGBUS handler), or takes the default action.
//!
//! An abandoned burst delivers and sends nothing. The mbufs the driver had taken for it are
//! left where they are (at most one burst's worth per event): returning them could free
//! twice one that the driver already freed. The driver's queue is being torn down anyway, and
//! it is set up afresh when a peer connects again.

use std::sync::atomic::{AtomicU64, Ordering};

use torii_dpdk_sys as sys;

/// Installs the fault handlers of the guarded bursts, once DPDK is up and while rt_sigaction
/// is allowed (DPDK is initialised before the seccomp filters).
pub fn install() -> std::io::Result<()> {
    // SAFETY: installs the shim's handlers, which only jump back into a guarded burst's
    // own frame on the same thread or pass the signal on.
    if unsafe { sys::torii_burst_guard_install() } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A guarded burst faulted and was abandoned: counted in the device's `count` and logged
/// (cold).
#[cold]
pub fn abandoned(count: &AtomicU64, port: &str, what: &'static str, mbufs: usize) {
    count.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        port,
        what,
        mbufs,
        "a memif peer went away during a burst: the burst was abandoned (its mbufs, at most \
         {mbufs}, are not returned)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_inside_the_guard_abandons_the_call_and_can_happen_again() {
        install().unwrap();
        // SAFETY: a fresh anonymous mapping of two pages, the second unmapped again, as a
        // peer's region goes while a burst reads it.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                2 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            p.write(0x5a);
            assert_eq!(libc::munmap(p.add(4096) as *mut libc::c_void, 4096), 0);
            p
        };
        let mut fault = 0;
        // SAFETY: a mapped byte, read under the guard.
        let v = unsafe { sys::torii_guarded_read(base, &mut fault) };
        assert_eq!((v, fault), (0x5a, 0));
        // SAFETY: an unmapped byte: the guard catches the fault and reports it.
        let v = unsafe { sys::torii_guarded_read(base.add(4096), &mut fault) };
        assert_eq!((v, fault), (0, 1));
        // Again: leaving the handler by a jump left SIGSEGV unblocked.
        // SAFETY: as above.
        let v = unsafe { sys::torii_guarded_read(base.add(4096), &mut fault) };
        assert_eq!((v, fault), (0, 1));
        // SAFETY: unmaps the page left.
        unsafe { libc::munmap(base as *mut libc::c_void, 4096) };
    }
}
