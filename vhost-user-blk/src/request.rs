//! virtio-blk requests (virtio 1.2 §5.2.6): a 16-byte header the device reads, then data
//! buffers, then one status byte the device writes. Everything here is pure: it turns what the
//! driver wrote into a checked [`Request`] or the status to answer with, so that no I/O is ever
//! issued for an out-of-range, misaligned or malformed request.

/// Addressing unit of virtio-blk, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;
/// Length of one discard / write-zeroes segment.
pub const SEGMENT_LEN: usize = 16;
/// Length of the device id GET_ID returns.
pub const ID_LEN: usize = 20;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD as T_DISCARD, VIRTIO_BLK_T_FLUSH as T_FLUSH,
    VIRTIO_BLK_T_GET_ID as T_GET_ID, VIRTIO_BLK_T_IN as T_IN, VIRTIO_BLK_T_OUT as T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES as T_WRITE_ZEROES,
};
/// `flags` bit of a write-zeroes segment: the device may deallocate the range.
pub const FLAG_UNMAP: u32 = 1;

/// The status byte (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
}

/// Request types this device knows (others are answered UNSUPP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// What the device offers and how large it is: the limits every request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (a power of two ≥ 512): data requests must be aligned to it.
    pub block_size: u32,
    pub read_only: bool,
    /// FLUSH offered (VIRTIO_BLK_F_FLUSH).
    pub flush: bool,
    /// DISCARD offered, with its limits (config `max_discard_sectors`, `max_discard_seg`).
    pub discard: Option<(u32, u32)>,
    /// WRITE_ZEROES offered, with `max_write_zeroes_sectors`, `max_write_zeroes_seg`.
    pub write_zeroes: Option<(u32, u32)>,
    /// Largest data transfer of one request, in bytes.
    pub max_transfer: u64,
}

/// One discard / write-zeroes range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub sectors: u32,
    /// Write zeroes: the range may be deallocated (FLAG_UNMAP).
    pub unmap: bool,
}

/// A request that passed every check, ready to be issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at byte `offset` into the data buffers.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write `len` bytes from the data buffers at byte `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Write the device id into the data buffers (`len` bytes of them, at most 20).
    GetId {
        len: u64,
    },
    /// `count` segments, to be read from the data buffers with [`parse_segment`].
    Discard {
        count: u32,
    },
    WriteZeroes {
        count: u32,
    },
}

/// Whether the request's data buffers are device-writable (IN, GET_ID) rather than
/// device-readable: decides which buffers `data_len` of [`check`] counts.
pub fn device_writes_data(header: &[u8; HEADER_LEN]) -> bool {
    matches!(
        u32::from_le_bytes([header[0], header[1], header[2], header[3]]),
        T_IN | T_GET_ID
    )
}

/// Parses the header and checks the request against `limits`. `data_len` is the total length
/// of the data buffers: device-readable ones for OUT, DISCARD and WRITE_ZEROES, device-writable
/// ones for IN and GET_ID (the status byte not included). Errors are the status to answer
/// with, no I/O done: UNSUPP for what the device does not offer, IOERR for what is out of
/// range, misaligned or too large (as QEMU's virtio-blk answers).
pub fn check(header: &[u8; HEADER_LEN], data_len: u64, limits: &Limits) -> Result<Request, Status> {
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    match kind {
        T_IN | T_OUT => {
            let write = kind == T_OUT;
            if write && limits.read_only {
                return Err(Status::IoErr);
            }
            let offset = range(sector, data_len, limits)?;
            Ok(if write {
                Request::Write {
                    offset,
                    len: data_len,
                }
            } else {
                Request::Read {
                    offset,
                    len: data_len,
                }
            })
        }
        T_FLUSH if limits.flush => Ok(Request::Flush),
        T_GET_ID => Ok(Request::GetId {
            len: data_len.min(ID_LEN as u64),
        }),
        T_DISCARD | T_WRITE_ZEROES => {
            let (_, max_seg) = match kind {
                T_DISCARD => limits.discard,
                _ => limits.write_zeroes,
            }
            .ok_or(Status::Unsupp)?;
            if limits.read_only {
                return Err(Status::IoErr);
            }
            // Whole segments only, and not more than offered.
            let count = data_len / SEGMENT_LEN as u64;
            if !data_len.is_multiple_of(SEGMENT_LEN as u64)
                || count == 0
                || count > u64::from(max_seg)
            {
                return Err(Status::Unsupp);
            }
            let count = count as u32;
            Ok(if kind == T_DISCARD {
                Request::Discard { count }
            } else {
                Request::WriteZeroes { count }
            })
        }
        _ => Err(Status::Unsupp),
    }
}

/// The byte offset of a data request of `len` bytes at `sector`, if it is whole sectors,
/// aligned to the block size, not too large and inside the device.
fn range(sector: u64, len: u64, limits: &Limits) -> Result<u64, Status> {
    let bs = u64::from(limits.block_size.max(512));
    if !len.is_multiple_of(SECTOR_SIZE) || len > limits.max_transfer {
        return Err(Status::IoErr);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Status::IoErr)?;
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(Status::IoErr);
    }
    let end = sector.checked_add(len / SECTOR_SIZE).ok_or(Status::IoErr)?;
    if end > limits.capacity {
        return Err(Status::IoErr);
    }
    Ok(offset)
}

/// Parses and checks one segment of a DISCARD (`write_zeroes == false`) or WRITE_ZEROES
/// request (§5.2.6.2): inside the device, no larger than offered, no unknown flag bits, and
/// no UNMAP on a discard.
pub fn parse_segment(
    b: &[u8; SEGMENT_LEN],
    write_zeroes: bool,
    limits: &Limits,
) -> Result<Segment, Status> {
    let sector = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let sectors = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let flags = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    let (max_sectors, _) = if write_zeroes {
        limits.write_zeroes
    } else {
        limits.discard
    }
    .ok_or(Status::Unsupp)?;
    let allowed = if write_zeroes { FLAG_UNMAP } else { 0 };
    if flags & !allowed != 0 {
        return Err(Status::Unsupp);
    }
    if sectors > max_sectors {
        return Err(Status::IoErr);
    }
    let end = sector
        .checked_add(u64::from(sectors))
        .ok_or(Status::IoErr)?;
    if end > limits.capacity {
        return Err(Status::IoErr);
    }
    Ok(Segment {
        sector,
        sectors,
        unmap: flags & FLAG_UNMAP != 0,
    })
}

/// The GET_ID answer: the serial, truncated to 20 bytes, zero-padded (no terminator needed
/// when it fills them, §5.2.6).
pub fn device_id(serial: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let b = serial.as_bytes();
    let n = b.len().min(ID_LEN);
    id[..n].copy_from_slice(&b[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            capacity: 2048, // 1 MiB
            block_size: 512,
            read_only: false,
            flush: true,
            discard: Some((1024, 4)),
            write_zeroes: Some((2048, 1)),
            max_transfer: 128 * 1024,
        }
    }

    fn hdr(kind: u32, sector: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // ioprio: ignored
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn seg(sector: u64, sectors: u32, flags: u32) -> [u8; SEGMENT_LEN] {
        let mut s = [0u8; SEGMENT_LEN];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn reads_and_writes_inside_the_device() {
        let l = limits();
        assert_eq!(
            check(&hdr(T_IN, 8), 4096, &l),
            Ok(Request::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            check(&hdr(T_OUT, 2040), 4096, &l),
            Ok(Request::Write {
                offset: 2040 * 512,
                len: 4096
            })
        );
        // A zero-length read is allowed (nothing to do).
        assert_eq!(
            check(&hdr(T_IN, 2048), 0, &l),
            Ok(Request::Read {
                offset: 2048 * 512,
                len: 0
            })
        );
    }

    #[test]
    fn out_of_range_misaligned_and_oversized_are_io_errors() {
        let l = limits();
        assert_eq!(
            check(&hdr(T_IN, 2041), 4096, &l),
            Err(Status::IoErr),
            "past the end"
        );
        assert_eq!(
            check(&hdr(T_IN, 2048), 512, &l),
            Err(Status::IoErr),
            "at the end"
        );
        assert_eq!(
            check(&hdr(T_IN, u64::MAX), 512, &l),
            Err(Status::IoErr),
            "overflow"
        );
        assert_eq!(
            check(&hdr(T_IN, u64::MAX / 512), 1024, &l),
            Err(Status::IoErr)
        );
        assert_eq!(
            check(&hdr(T_IN, 0), 100, &l),
            Err(Status::IoErr),
            "not whole sectors"
        );
        assert_eq!(
            check(&hdr(T_IN, 0), 256 * 1024, &l),
            Err(Status::IoErr),
            "too large"
        );
        let l4k = Limits {
            block_size: 4096,
            ..l
        };
        assert_eq!(
            check(&hdr(T_IN, 1), 4096, &l4k),
            Err(Status::IoErr),
            "misaligned"
        );
        assert_eq!(
            check(&hdr(T_IN, 8), 512, &l4k),
            Err(Status::IoErr),
            "partial block"
        );
        assert!(check(&hdr(T_IN, 8), 4096, &l4k).is_ok());
    }

    #[test]
    fn read_only_refuses_every_write_kind() {
        let l = Limits {
            read_only: true,
            ..limits()
        };
        assert_eq!(check(&hdr(T_OUT, 0), 512, &l), Err(Status::IoErr));
        assert_eq!(check(&hdr(T_DISCARD, 0), 16, &l), Err(Status::IoErr));
        assert_eq!(check(&hdr(T_WRITE_ZEROES, 0), 16, &l), Err(Status::IoErr));
        assert!(check(&hdr(T_IN, 0), 512, &l).is_ok());
    }

    #[test]
    fn unoffered_and_unknown_requests_are_unsupported() {
        let none = Limits {
            flush: false,
            discard: None,
            write_zeroes: None,
            ..limits()
        };
        for t in [T_FLUSH, T_DISCARD, T_WRITE_ZEROES, 2, 10, 14, 0xffff_ffff] {
            assert_eq!(
                check(&hdr(t, 0), 16, &none),
                Err(Status::Unsupp),
                "type {t}"
            );
        }
        assert_eq!(check(&hdr(T_FLUSH, 0), 0, &limits()), Ok(Request::Flush));
        assert_eq!(
            check(&hdr(T_GET_ID, 0), 64, &none),
            Ok(Request::GetId { len: 20 })
        );
        assert_eq!(
            check(&hdr(T_GET_ID, 0), 8, &none),
            Ok(Request::GetId { len: 8 })
        );
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let l = limits();
        assert_eq!(
            check(&hdr(T_DISCARD, 0), 64, &l),
            Ok(Request::Discard { count: 4 })
        );
        assert_eq!(
            check(&hdr(T_DISCARD, 0), 80, &l),
            Err(Status::Unsupp),
            "5 > max_seg"
        );
        assert_eq!(
            check(&hdr(T_DISCARD, 0), 20, &l),
            Err(Status::Unsupp),
            "partial"
        );
        assert_eq!(
            check(&hdr(T_DISCARD, 0), 0, &l),
            Err(Status::Unsupp),
            "none"
        );
        assert_eq!(
            check(&hdr(T_WRITE_ZEROES, 0), 16, &l),
            Ok(Request::WriteZeroes { count: 1 })
        );
        assert_eq!(
            parse_segment(&seg(8, 8, 0), false, &l),
            Ok(Segment {
                sector: 8,
                sectors: 8,
                unmap: false
            })
        );
        assert_eq!(
            parse_segment(&seg(0, 8, FLAG_UNMAP), true, &l),
            Ok(Segment {
                sector: 0,
                sectors: 8,
                unmap: true
            })
        );
        assert_eq!(
            parse_segment(&seg(0, 8, FLAG_UNMAP), false, &l),
            Err(Status::Unsupp)
        );
        assert_eq!(parse_segment(&seg(0, 8, 2), true, &l), Err(Status::Unsupp));
        assert_eq!(
            parse_segment(&seg(0, 1025, 0), false, &l),
            Err(Status::IoErr)
        );
        assert_eq!(
            parse_segment(&seg(2047, 2, 0), false, &l),
            Err(Status::IoErr)
        );
        assert_eq!(
            parse_segment(&seg(u64::MAX, 2, 0), true, &l),
            Err(Status::IoErr)
        );
    }

    #[test]
    fn device_id_is_truncated_and_padded() {
        assert_eq!(&device_id("torii-disk0")[..12], b"torii-disk0\0");
        assert_eq!(
            device_id("abcdefghijklmnopqrstuvwxyz"),
            *b"abcdefghijklmnopqrst"
        );
    }

    #[test]
    fn any_header_gets_a_verdict_without_panicking() {
        // Pseudo-random headers, lengths and segments: each gets a verdict, none panics.
        let l = limits();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut h = [0u8; HEADER_LEN];
            h[..8].copy_from_slice(&x.to_le_bytes());
            h[8..].copy_from_slice(&x.rotate_left(17).to_le_bytes());
            h[0] = (x % 16) as u8;
            h[1] = 0;
            h[2] = 0;
            h[3] = 0;
            let _ = check(&h, x.rotate_left(5) % (1 << 20), &l);
            let mut s = [0u8; SEGMENT_LEN];
            s[..8].copy_from_slice(&x.rotate_left(9).to_le_bytes());
            s[8..].copy_from_slice(&x.to_le_bytes());
            let _ = parse_segment(&s, x & 1 == 0, &l);
        }
    }
}
