//! Torii's virtio-blk device over vhost-user (virtio 1.2 §5.2). `config` is the device model
//! (features, config space, and the limits derived from them); `request` parses and checks
//! what a (hostile) driver asks for — header, data length, sector range, discard and
//! write-zeroes segments — and decides the status, before any I/O is issued; `inflight` keeps
//! the inflight-I/O region that lets a restarted backend resubmit what a crash interrupted;
//! `engine` issues the checked requests on an io_uring per queue worker.

pub mod config;
pub mod device;
pub mod engine;
pub mod request;
pub mod settings;
pub mod stats;
mod worker;

pub use device::{BlkExport, BlkModel, ExportConfig, ExportError};
pub use torii_vhost_user::SocketMode;
pub use worker::PollMode;

/// The fuzz target's body (`fuzz/`, `scripts/fuzz`): a request header, a data length, a list
/// of discard/write-zeroes segments and an inflight region, all from the fuzzer, through every
/// check. Properties: no panic; a request that passes the checks lies inside the device and is
/// block aligned; a segment that passes lies inside the device; inflight recovery returns each
/// in-flight head once, in range. Returns whether the input reached inflight recovery.
pub fn fuzz_requests(data: &[u8]) -> bool {
    use request::{check, parse_segment, Limits, Request, HEADER_LEN, SEGMENT_LEN};
    if data.len() < HEADER_LEN + 8 {
        return false;
    }
    let limits = Limits {
        capacity: u64::from(u32::from_le_bytes([data[0], data[1], data[2], 0])) + 1,
        block_size: 512 << (data[3] % 4),
        read_only: data[4] & 1 == 1,
        flush: data[4] & 2 == 2,
        discard: (data[4] & 4 == 4)
            .then_some((u32::from(data[5]) << 4, u32::from(data[6] % 8) + 1)),
        write_zeroes: (data[4] & 8 == 8).then_some((u32::from(data[5]) << 8, 1)),
        max_transfer: 1 << 20,
    };
    let header: [u8; HEADER_LEN] = data[8..8 + HEADER_LEN].try_into().unwrap_or_default();
    let rest = &data[8 + HEADER_LEN..];
    let data_len = u64::from(data[7]) * 512 + rest.len() as u64;
    if let Ok(Request::Read { offset, len } | Request::Write { offset, len }) =
        check(&header, data_len, &limits)
    {
        assert!(offset + len <= limits.capacity * 512);
        assert_eq!(offset % u64::from(limits.block_size), 0);
    }
    for seg in rest.chunks_exact(SEGMENT_LEN) {
        let seg: [u8; SEGMENT_LEN] = seg.try_into().unwrap_or_default();
        for wz in [false, true] {
            if let Ok(s) = parse_segment(&seg, wz, &limits) {
                assert!(s.sector + u64::from(s.sectors) <= limits.capacity);
            }
        }
    }
    let queue_size = 1u16 << (data[6] % 9);
    let mut region = rest.to_vec();
    region.resize(torii_vhost_user::inflight::queue_region_size(queue_size), 0);
    let Ok(mut q) = torii_vhost_user::QueueInflight::open(&mut region, queue_size) else {
        return false;
    };
    let heads = q.recover(u16::from_le_bytes([data[0], data[5]]));
    let mut seen = std::collections::HashSet::new();
    assert!(heads.iter().all(|&h| h < queue_size && seen.insert(h)));
    true
}

#[cfg(test)]
mod tests {
    /// The fuzz body on pseudo-random inputs, so its properties are checked by every test run.
    #[test]
    fn fuzz_body_on_pseudo_random_inputs() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut recovered = 0;
        for len in 0..4000usize {
            let mut data = Vec::with_capacity(len % 300);
            for _ in 0..len % 300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(x as u8);
            }
            if len % 7 == 0 && data.len() > 40 {
                // Some inputs with a valid inflight header (the region starts at byte 24), to
                // reach recovery.
                let qs = 1u16 << (data[6] % 9);
                data[32..34].copy_from_slice(&torii_vhost_user::inflight::VERSION.to_le_bytes());
                data[34..36].copy_from_slice(&qs.to_le_bytes());
            }
            recovered += usize::from(super::fuzz_requests(&data));
        }
        assert!(recovered > 100, "only {recovered} inputs reached recovery");
    }
}
