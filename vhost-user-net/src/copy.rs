//! Copies of packet bytes. Most frames on an NFV data path are small, and for them a call into
//! the C library's `memcpy` (a call, a size dispatch, a return) costs about as much as the copy.
//! Like DPDK's `rte_memcpy`, copies of 16 to 128 bytes are done inline with 16-byte loads and
//! stores, the last chunks overlapping the first ones instead of a byte-wise tail.

use std::ptr;

/// Copies `src` into `dst`, which must have the same length.
///
/// # Panics
/// If the lengths differ (as `copy_from_slice`).
#[inline(always)]
pub fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_bytes: length mismatch");
    // SAFETY: both slices are valid for `src.len()` bytes, and a `&mut` slice cannot overlap a
    // shared one.
    unsafe { copy_raw(dst.as_mut_ptr(), src.as_ptr(), src.len()) }
}

/// Copies `len` bytes from `src` to `dst`.
///
/// # Safety
/// `src..src+len` must be valid for reads, `dst..dst+len` valid for writes, and the two ranges
/// must not overlap. Another thread (a guest) may write either range meanwhile: the bytes copied
/// are then some mix of old and new, as with `memcpy`, and are only ever parsed from the copy.
#[inline(always)]
pub unsafe fn copy_raw(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY (all `chunk` calls): every chunk starts at or after 0 and ends at or before `len`.
    unsafe {
        match len {
            16..=32 => {
                chunk(dst, src, 0);
                chunk(dst, src, len - 16);
            }
            33..=64 => {
                chunk(dst, src, 0);
                chunk(dst, src, 16);
                chunk(dst, src, len - 32);
                chunk(dst, src, len - 16);
            }
            65..=128 => {
                for off in [0, 16, 32, 48] {
                    chunk(dst, src, off);
                }
                for off in [64, 48, 32, 16] {
                    chunk(dst, src, len - off);
                }
            }
            _ => ptr::copy_nonoverlapping(src, dst, len),
        }
    }
}

/// Copies the 16 bytes at `off`.
///
/// # Safety
/// As [`copy_raw`], for `off..off+16`.
#[inline(always)]
unsafe fn chunk(dst: *mut u8, src: *const u8, off: usize) {
    // SAFETY: the caller's range; unaligned accesses of a byte array are allowed.
    unsafe {
        let v = ptr::read_unaligned(src.add(off) as *const [u8; 16]);
        ptr::write_unaligned(dst.add(off) as *mut [u8; 16], v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_copies_exactly_its_bytes() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..=260 {
            for shift in [0, 1, 7] {
                let mut dst = vec![0xeeu8; 300];
                copy_bytes(&mut dst[shift..shift + len], &src[shift..shift + len]);
                assert_eq!(
                    &dst[shift..shift + len],
                    &src[shift..shift + len],
                    "len {len}"
                );
                assert!(dst[..shift].iter().all(|&b| b == 0xee), "before, len {len}");
                assert!(
                    dst[shift + len..].iter().all(|&b| b == 0xee),
                    "after, len {len}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn lengths_must_match() {
        copy_bytes(&mut [0u8; 4], &[1u8; 5]);
    }
}
