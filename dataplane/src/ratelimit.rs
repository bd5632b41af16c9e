//! Per-port ingress rate limiting: token buckets bounding what a port takes in from its
//! source — what a guest transmits into the switch or a cross-connect, what a tap's kernel
//! side or a NIC hands over.
//!
//! A limited port has a [`Limiter`] on the PMD that polls it (one per part of a port split
//! over several PMDs, each with its queues' share of the rate). Before polling one of the
//! port's queues, the PMD asks the limiter how many packets it may take
//! ([`Limiter::allow`]), polls at most that many and charges what it got
//! ([`Limiter::charge`]). The time is the cycle counter the PMD reads once per round anyway,
//! so limiting reads no clock; there is no lock, no allocation and no syscall, only integer
//! arithmetic on state the PMD owns. Packets beyond the allowance are not taken: they stay in
//! the guest's TX ring (its driver stops the queue when the ring is full, so the guest is
//! slowed, not dropped), in the tap's posted reads and then the kernel's queue, or in the NIC's
//! ring. Nothing is dropped by the limiter itself.
//!
//! A bucket counts in *units*: one token (a packet, or a bit) is `hz` units, and every clock
//! tick adds `rate` units, so a refill is one exact integer product — no rounding drift at any
//! rate and clock speed. Levels are 128-bit and clamped to ±2^100 units, so neither a long
//! idle gap nor huge settings can overflow. A packet bucket never goes below zero (no more
//! packets are polled than it holds); a bit bucket may, since a frame's length is known only
//! once it is taken: the debt is paid back by later refills, so the long-run rate is exact and
//! a burst may overshoot by at most the frames of one poll.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::port::Port;

/// Largest magnitude of a bucket level, in units: far from `i128`'s limits, so sums of a
/// level and one refill or one charge never overflow.
const MAX_UNITS: u128 = 1 << 100;

/// A token bucket: `rate` tokens per second of a `hz` clock, holding at most `burst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Units added per clock tick (= tokens per second).
    rate: u64,
    /// Units per token (= clock ticks per second).
    hz: u64,
    /// Most units held: the burst.
    cap: i128,
    /// Units held now; below zero is debt.
    level: i128,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens, refilled at `rate` tokens per second of a clock of
    /// `hz` ticks per second (zeros count as one).
    pub fn new(rate: u64, burst: u64, hz: u64) -> Self {
        let hz = hz.max(1);
        let cap = (u128::from(burst.max(1)) * u128::from(hz)).min(MAX_UNITS) as i128;
        TokenBucket {
            rate: rate.max(1),
            hz,
            cap,
            level: cap,
        }
    }

    /// Adds what `ticks` of time earned, up to the burst.
    #[inline]
    pub fn refill(&mut self, ticks: u64) {
        if self.level >= self.cap {
            return;
        }
        // At most (2^64 - 1)^2: fits.
        let add = u128::from(ticks) * u128::from(self.rate);
        // level ≥ -2^100 and cap ≤ 2^100.
        let room = (self.cap - self.level) as u128;
        self.level = if add >= room {
            self.cap
        } else {
            self.level + add as i128
        };
    }

    /// Whole tokens held, at most `max` (none while in debt).
    #[inline]
    pub fn tokens(&self, max: u64) -> u64 {
        let whole = match u64::try_from(self.level) {
            Ok(l) => l / self.hz,
            Err(_) if self.level <= 0 => 0,
            Err(_) => u64::try_from(self.level as u128 / u128::from(self.hz)).unwrap_or(u64::MAX),
        };
        whole.min(max)
    }

    /// Takes `n` tokens; below zero is debt that later refills pay back.
    #[inline]
    pub fn take(&mut self, n: u64) {
        let units = (u128::from(n) * u128::from(self.hz)).min(MAX_UNITS) as i128;
        self.level = (self.level - units).max(-(MAX_UNITS as i128));
    }

    /// Whether the bucket holds its whole burst.
    pub fn is_full(&self) -> bool {
        self.level >= self.cap
    }
}

/// A port's rate limit as the PMDs apply it: the configured rates with the bursts resolved
/// (see `config::RateLimitConfig`), and the clock they are counted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Packets per second.
    pub pps: Option<u64>,
    /// Bits per second (frame bytes × 8, without virtio-net header or FCS).
    pub bps: Option<u64>,
    /// Bucket sizes: packets, bytes.
    pub burst_packets: u64,
    pub burst_bytes: u64,
    /// Ticks per second of the PMD's clock ([`crate::pmd::cycles`]; see [`clock_hz`]).
    pub hz: u64,
}

impl RateLimit {
    /// The limiter of a port part polling `part` of the port's `whole` queues (its share of
    /// the rate and the burst), full at time `now`.
    pub fn limiter(&self, part: u16, whole: u16, now: u64) -> Limiter {
        let share = |v: u64| -> u64 {
            let (p, w) = (u128::from(part.max(1)), u128::from(whole.max(part).max(1)));
            ((u128::from(v) * p / w) as u64).max(1)
        };
        Limiter {
            packets: self
                .pps
                .map(|r| TokenBucket::new(share(r), share(self.burst_packets), self.hz)),
            bits: self.bps.map(|r| {
                TokenBucket::new(share(r), share(self.burst_bytes).saturating_mul(8), self.hz)
            }),
            last: now,
            // Unknown until the first burst: one frame, of the largest size.
            frame: crate::packet::MAX_FRAME as u64,
            next_queue: 0,
        }
    }

    /// The limiter for `port` (a whole port or a part of one) at time `now`.
    pub fn limiter_for(&self, port: &dyn Port, now: u64) -> Limiter {
        let whole = port.stats().rxq_packets.len().max(1) as u16;
        self.limiter(port.num_queues(), whole, now)
    }
}

/// The rate limit of one port (part) on its PMD: a packet bucket, a bit bucket, or both.
#[derive(Clone, Debug)]
pub struct Limiter {
    packets: Option<TokenBucket>,
    bits: Option<TokenBucket>,
    /// The clock at the last refill.
    last: u64,
    /// Mean frame length (bytes) of the last burst taken: how many frames the bits held
    /// are taken to pay for. When frames grow, one poll may take more than the bits held
    /// (at most a burst of frames); the debt is paid back before the next.
    frame: u64,
    /// The queue polled first next round: a limited port's queues take turns at being first,
    /// so that a small allowance is not always spent on the same queue.
    next_queue: u16,
}

impl Limiter {
    /// How many packets the port may take now, at most `max`. Refills to `now` first (a
    /// second call with the same `now` adds nothing).
    #[inline]
    pub fn allow(&mut self, now: u64, max: usize) -> usize {
        // Cycle counters of different CPUs may differ a little: time never runs backwards.
        let ticks = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let mut n = max as u64;
        if let Some(b) = &mut self.packets {
            b.refill(ticks);
            n = b.tokens(n);
        }
        if let Some(b) = &mut self.bits {
            b.refill(ticks);
            if n > 0 {
                let frame_bits = self.frame.saturating_mul(8);
                let bits = b.tokens(n.saturating_mul(frame_bits));
                // Whatever bits are held pay for one more frame: the debt, if it was longer,
                // is paid back before the next.
                n = bits.div_ceil(frame_bits).min(n);
            }
        }
        n as usize
    }

    /// Charges `packets` packets taken, `bytes` long in all.
    #[inline]
    pub fn charge(&mut self, packets: usize, bytes: usize) {
        if packets == 0 {
            return;
        }
        if let Some(b) = &mut self.packets {
            b.take(packets as u64);
        }
        if let Some(b) = &mut self.bits {
            b.take((bytes as u64).saturating_mul(8));
            self.frame = (bytes as u64 / packets as u64).max(1);
        }
    }

    /// Whether [`Self::charge`] needs the bytes taken (a bit rate is set).
    #[inline]
    pub fn counts_bytes(&self) -> bool {
        self.bits.is_some()
    }

    /// The queue of `n` to poll first this round; the next round starts at the one after.
    #[inline]
    pub fn first_queue(&mut self, n: u16) -> u16 {
        let q = if self.next_queue < n {
            self.next_queue
        } else {
            0
        };
        self.next_queue = q + 1;
        q
    }
}

/// Ticks per second of [`crate::pmd::cycles`]: the time-stamp counter's rate, measured once
/// against the monotonic clock (20 ms, on the first call — make it from a control thread,
/// not a PMD); elsewhere `cycles` counts nanoseconds.
pub fn clock_hz() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        if cfg!(target_arch = "x86_64") {
            calibrate()
        } else {
            1_000_000_000
        }
    })
}

fn calibrate() -> u64 {
    use crate::pmd::cycles;
    // A (time, cycles) pair read back to back: the tightest of a few, so that a preemption
    // between the two reads does not skew the measurement.
    let pair = || {
        (0..5)
            .map(|_| {
                let c0 = cycles();
                let t = Instant::now();
                let c1 = cycles();
                (c1.wrapping_sub(c0), t, c0 + c1.wrapping_sub(c0) / 2)
            })
            .min_by_key(|p| p.0)
            .map(|(_, t, c)| (t, c))
            .unwrap_or_else(|| (Instant::now(), cycles()))
    };
    let (t0, c0) = pair();
    std::thread::sleep(Duration::from_millis(20));
    let (t1, c1) = pair();
    let ns = t1.duration_since(t0).as_nanos().max(1);
    let hz = u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / ns;
    u64::try_from(hz).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nanosecond clock: every test below injects its own time.
    const NS: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn limit(pps: Option<u64>, bps: Option<u64>, bp: u64, bb: u64) -> RateLimit {
        RateLimit {
            pps,
            bps,
            burst_packets: bp,
            burst_bytes: bb,
            hz: NS,
        }
    }

    #[test]
    fn bucket_refills_at_its_rate_and_caps_at_its_burst() {
        let mut b = TokenBucket::new(1000, 10, NS);
        assert_eq!(b.tokens(u64::MAX), 10, "starts full");
        b.take(10);
        assert_eq!(b.tokens(u64::MAX), 0);
        // 1000/s: one token per millisecond, partial tokens kept.
        b.refill(MS / 2);
        assert_eq!(b.tokens(u64::MAX), 0);
        b.refill(MS / 2);
        assert_eq!(b.tokens(u64::MAX), 1);
        b.refill(5 * MS);
        assert_eq!(b.tokens(u64::MAX), 6);
        assert_eq!(b.tokens(4), 4, "at most max");
        // Never more than the burst.
        b.refill(NS);
        assert_eq!(b.tokens(u64::MAX), 10);
        assert!(b.is_full());
        // Exact over many small steps: 1000 steps of 1 µs at 1000/s make one token.
        b.take(10);
        for _ in 0..1000 {
            b.refill(1000);
        }
        assert_eq!(b.tokens(u64::MAX), 1);
    }

    #[test]
    fn fractional_rates_do_not_drift() {
        // 3 tokens per second on a 7 Hz clock: 3/7 of a token per tick, exactly.
        let mut b = TokenBucket::new(3, 1000, 7);
        b.take(1000);
        for _ in 0..7 * 100 {
            b.refill(1);
        }
        assert_eq!(b.tokens(u64::MAX), 300);
    }

    #[test]
    fn debt_is_paid_back_before_more_is_taken() {
        let mut b = TokenBucket::new(1000, 10, NS);
        b.take(30); // 20 beyond what it held
        assert_eq!(b.tokens(u64::MAX), 0);
        b.refill(20 * MS);
        assert_eq!(b.tokens(u64::MAX), 0, "20 ms pay back the debt only");
        b.refill(MS);
        assert_eq!(b.tokens(u64::MAX), 1);
    }

    #[test]
    fn long_idle_gaps_and_huge_values_do_not_overflow() {
        let mut b = TokenBucket::new(u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(
            b.tokens(u64::MAX),
            (MAX_UNITS / u128::from(u64::MAX)) as u64
        );
        b.take(u64::MAX);
        b.take(u64::MAX);
        assert_eq!(b.tokens(u64::MAX), 0);
        b.refill(u64::MAX);
        assert!(b.is_full());
        // An idle gap of the whole clock range, at the highest rate.
        let mut b = TokenBucket::new(u64::MAX, 32, NS);
        b.take(32);
        b.refill(u64::MAX);
        assert_eq!(b.tokens(u64::MAX), 32);
        // Slowest rate, fastest clock: one token per second still comes.
        let mut b = TokenBucket::new(1, 1, u64::MAX);
        b.take(1);
        b.refill(u64::MAX - 1);
        assert_eq!(b.tokens(1), 0);
        b.refill(1);
        assert_eq!(b.tokens(1), 1);
        // Zeros are taken as ones rather than dividing by zero.
        let mut b = TokenBucket::new(0, 0, 0);
        assert_eq!(b.tokens(9), 1);
        b.take(1);
        b.refill(1);
        assert_eq!(b.tokens(9), 1);
        // The limiter over the whole clock range (a clock that wraps is taken as standing).
        let mut l = limit(Some(u64::MAX), Some(u64::MAX), u64::MAX, u64::MAX).limiter(1, 1, 0);
        assert_eq!(l.allow(u64::MAX, 32), 32);
        l.charge(32, usize::MAX);
        assert_eq!(l.allow(0, 32), 0);
        assert_eq!(l.allow(u64::MAX, 32), 0);
    }

    #[test]
    fn pps_limit_takes_no_more_than_rate_times_time_plus_burst() {
        let mut l = limit(Some(10_000), None, 32, 0).limiter(1, 1, 0);
        // A source that always has more: poll every 10 µs for one second.
        let mut taken = 0;
        let mut t = 0;
        while t <= NS {
            let n = l.allow(t, 32);
            l.charge(n, n * 64);
            taken += n as u64;
            // The bound holds at every instant.
            assert!(taken <= 32 + 10_000 * t / NS, "{taken} at {t} ns");
            t += 10_000;
        }
        assert_eq!(taken, 32 + 10_000);
        // Idle: the bucket fills to its burst, not beyond.
        assert_eq!(l.allow(t + 10 * NS, 1000), 32);
    }

    #[test]
    fn bps_limit_counts_bits_and_pays_back_overshoot() {
        // 8 Mbit/s = 1 MB/s, 4 KiB burst; 1000-byte frames.
        let mut l = limit(None, Some(8_000_000), 0, 4096).limiter(1, 1, 0);
        let mut bytes = 0u64;
        let mut t = 0;
        while t <= NS {
            let n = l.allow(t, 32);
            l.charge(n, n * 1000);
            bytes += n as u64 * 1000;
            // Overshoot: less than one frame beyond the bucket.
            assert!(bytes <= 4096 + 1_000_000 * t / NS + 1000, "{bytes} at {t}");
            t += 100_000;
        }
        assert!(bytes >= 1_000_000, "{bytes}: the rate is reached");
        // The first poll takes one frame, to learn its length (64 bytes). Then the frames
        // grow: the 32 1000-byte frames one poll let in are paid back before anything more
        // passes, and the new length is learned.
        let mut l = limit(None, Some(8_000_000), 0, 4096).limiter(1, 1, 0);
        assert_eq!(l.allow(0, 32), 1);
        l.charge(1, 64);
        assert_eq!(l.allow(0, 32), 32);
        l.charge(32, 32_000);
        assert_eq!(l.allow(27 * MS, 32), 0, "27.9 KB of debt");
        assert_eq!(
            l.allow(29 * MS, 32),
            2,
            "1.1 KB held: one frame, and one on credit"
        );
    }

    #[test]
    fn both_limits_apply_the_stricter() {
        // 1000 pps and 800 kbit/s (100 1000-byte frames per second).
        let mut l = limit(Some(1000), Some(800_000), 1, 1000).limiter(1, 1, 0);
        let n = l.allow(0, 32);
        l.charge(n, 1000);
        let mut taken = 0;
        for ms in 1..=1000 {
            let n = l.allow(ms * MS, 32);
            l.charge(n, n * 1000);
            taken += n;
        }
        assert!((99..=101).contains(&taken), "{taken}: bits limit");
        // Small frames: the packet rate limits.
        let mut l = limit(Some(1000), Some(800_000), 1, 1000).limiter(1, 1, 0);
        let mut taken = 0;
        for ms in 0..=1000 {
            let n = l.allow(ms * MS, 32);
            l.charge(n, n * 60);
            taken += n;
        }
        assert_eq!(taken, 1001, "packet limit");
    }

    #[test]
    fn a_part_takes_its_share_and_queues_take_turns() {
        // Two of four queues: half the rate, half the burst.
        let mut l = limit(Some(4000), None, 64, 0).limiter(2, 4, 0);
        assert_eq!(l.allow(0, 100), 32);
        l.charge(32, 0);
        assert_eq!(l.allow(NS, 5000), 32, "burst 32");
        l.charge(32, 0);
        assert_eq!(
            l.allow(NS + NS / 2, 5000),
            32,
            "half of 2000 in 0.5 s, capped"
        );
        assert_eq!(l.first_queue(3), 0);
        assert_eq!(l.first_queue(3), 1);
        assert_eq!(l.first_queue(3), 2);
        assert_eq!(l.first_queue(3), 0);
        // Time never runs backwards (another CPU's counter a little behind).
        let mut l = limit(Some(1000), None, 1, 0).limiter(1, 1, 5 * MS);
        let n = l.allow(5 * MS, 1);
        l.charge(n, 0);
        assert_eq!(l.allow(MS, 1), 0);
        assert_eq!(l.allow(6 * MS, 1), 1);
    }

    #[test]
    fn the_clock_rate_is_measured() {
        let hz = clock_hz();
        // Measured again over a longer time, each end the tightest of a few reads (a
        // preemption between the two clocks would skew it).
        let pair = || {
            (0..20)
                .map(|_| {
                    let c0 = crate::pmd::cycles();
                    let t = Instant::now();
                    (crate::pmd::cycles() - c0, t, c0)
                })
                .min_by_key(|p| p.0)
                .map(|(_, t, c)| (t, c))
                .unwrap()
        };
        let (t0, c0) = pair();
        std::thread::sleep(Duration::from_millis(200));
        let (t1, c1) = pair();
        let measured = (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64();
        let err = (measured - hz as f64).abs() / hz as f64;
        assert!(err < 0.05, "clock_hz {hz}, measured again {measured}");
    }
}
