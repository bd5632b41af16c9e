//! The virtio-blk device model: the features it offers and its config space (virtio 1.2
//! §5.2.3–§5.2.4), from one description of the export. The request checks
//! ([`crate::request::Limits`]) come from the same description, so what the driver is told and
//! what the device enforces cannot disagree.

use crate::request::Limits;

/// Feature bits (§5.2.3).
pub mod feature {
    pub const SIZE_MAX: u32 = 1;
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const CONFIG_WCE: u32 = 11;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
}

/// Length of the config space this device exposes (up to `write_zeroes_may_unmap` and its
/// padding; the secure-erase fields are not offered).
pub const CONFIG_LEN: usize = 60;
/// Offset of `writeback`, the one field a driver may write (with CONFIG_WCE).
const WRITEBACK_OFFSET: usize = 32;

/// What is exported and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkDevice {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (power of two, 512..=65536) and physical block size as its log2
    /// multiple.
    pub blk_size: u32,
    pub physical_block_exp: u8,
    /// Largest segment in bytes, most segments per request.
    pub size_max: u32,
    pub seg_max: u32,
    pub read_only: bool,
    /// Write-back cache on (FLUSH needed for durability); the driver may switch it.
    pub writeback: bool,
    pub num_queues: u16,
    /// DISCARD: (max sectors per segment, max segments, sector alignment).
    pub discard: Option<(u32, u32, u32)>,
    /// WRITE_ZEROES: (max sectors per segment, max segments, may unmap).
    pub write_zeroes: Option<(u32, u32, bool)>,
}

impl BlkDevice {
    /// The features offered (device-specific bits; VERSION_1 and ring features are the
    /// transport's).
    pub fn features(&self) -> u64 {
        use feature::*;
        let mut f = [SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE]
            .iter()
            .fold(0u64, |f, b| f | 1 << b);
        if self.read_only {
            f |= 1 << RO;
        }
        if self.num_queues > 1 {
            f |= 1 << MQ;
        }
        if self.discard.is_some() && !self.read_only {
            f |= 1 << DISCARD;
        }
        if self.write_zeroes.is_some() && !self.read_only {
            f |= 1 << WRITE_ZEROES;
        }
        f
    }

    /// `struct virtio_blk_config`, little endian.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(0, &self.capacity.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // geometry (16..20) left zero: GEOMETRY is not offered.
        put(20, &self.blk_size.to_le_bytes());
        put(24, &[self.physical_block_exp, 0]);
        // min_io_size in logical blocks; opt_io_size left 0 (no preference).
        put(26, &1u16.to_le_bytes());
        put(WRITEBACK_OFFSET, &[u8::from(self.writeback), 0]);
        put(34, &self.num_queues.to_le_bytes());
        if let Some((sectors, segs, align)) = self.discard {
            put(36, &sectors.to_le_bytes());
            put(40, &segs.to_le_bytes());
            put(44, &align.to_le_bytes());
        }
        if let Some((sectors, segs, unmap)) = self.write_zeroes {
            put(48, &sectors.to_le_bytes());
            put(52, &segs.to_le_bytes());
            put(56, &[u8::from(unmap)]);
        }
        c
    }

    /// GET_CONFIG: `size` bytes at `offset`, or None if that is outside the config space.
    pub fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let (o, n) = (offset as usize, size as usize);
        let end = o.checked_add(n)?;
        (end <= CONFIG_LEN).then(|| self.config_space()[o..end].to_vec())
    }

    /// SET_CONFIG: only `writeback` is writable (§5.2.5, CONFIG_WCE); anything else is
    /// refused and changes nothing.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> bool {
        match (offset as usize, data) {
            (WRITEBACK_OFFSET, [v]) if *v <= 1 => {
                self.writeback = *v == 1;
                true
            }
            _ => false,
        }
    }

    /// What requests are checked against.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity,
            block_size: self.blk_size,
            read_only: self.read_only,
            flush: true,
            discard: self.discard.map(|(s, n, _)| (s, n)),
            write_zeroes: self.write_zeroes.map(|(s, n, _)| (s, n)),
            max_transfer: u64::from(self.size_max) * u64::from(self.seg_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> BlkDevice {
        BlkDevice {
            capacity: 2 * 1024 * 1024, // 1 GiB
            blk_size: 4096,
            physical_block_exp: 0,
            size_max: 65536,
            seg_max: 126,
            read_only: false,
            writeback: true,
            num_queues: 2,
            discard: Some((65536, 1, 8)),
            write_zeroes: Some((65536, 1, true)),
        }
    }

    #[test]
    fn config_space_layout() {
        let c = dev().config_space();
        let le32 = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            2 * 1024 * 1024
        );
        assert_eq!((le32(8), le32(12), le32(20)), (65536, 126, 4096));
        assert_eq!(c[32], 1, "writeback");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
        assert_eq!((le32(36), le32(40), le32(44)), (65536, 1, 8));
        assert_eq!((le32(48), le32(52), c[56]), (65536, 1, 1));
        assert_eq!(dev().read_config(34, 2), Some(vec![2, 0]));
        assert_eq!(dev().read_config(58, 4), None, "past the end");
        assert_eq!(dev().read_config(u32::MAX, 2), None, "overflow");
    }

    #[test]
    fn features_follow_the_export() {
        use feature::*;
        let f = dev().features();
        for b in [MQ, DISCARD, WRITE_ZEROES, FLUSH, CONFIG_WCE, BLK_SIZE] {
            assert!(f & 1 << b != 0, "bit {b}");
        }
        assert!(f & 1 << RO == 0);
        let ro = BlkDevice {
            read_only: true,
            num_queues: 1,
            ..dev()
        };
        let f = ro.features();
        assert!(f & 1 << RO != 0);
        assert!(f & (1 << MQ | 1 << DISCARD | 1 << WRITE_ZEROES) == 0);
        assert!(ro.limits().read_only);
    }

    #[test]
    fn only_writeback_is_writable() {
        let mut d = dev();
        assert!(d.write_config(32, &[0]));
        assert!(!d.writeback);
        assert_eq!(d.config_space()[32], 0);
        for (off, data) in [(32u32, &[2u8][..]), (32, &[0, 0]), (0, &[1]), (34, &[1])] {
            let before = d.clone();
            assert!(!d.write_config(off, data), "{off} {data:?}");
            assert_eq!(d, before);
        }
    }

    #[test]
    fn limits_match_what_the_driver_is_told() {
        let l = dev().limits();
        assert_eq!(l.capacity, 2 * 1024 * 1024);
        assert_eq!(l.max_transfer, 65536 * 126);
        assert_eq!(l.discard, Some((65536, 1)));
        assert_eq!(l.write_zeroes, Some((65536, 1)));
    }
}
