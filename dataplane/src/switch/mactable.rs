//! The switch's MAC learning table: (VLAN, MAC) → port, shared by every PMD without locks.
//!
//! A fixed array of slots, each two atomic words (the key and the value), allocated once with
//! twice the configured capacity. A key hashes to a window of [`WINDOW`] consecutive slots;
//! lookups read the whole window (no early stop, so removals need no tombstones) and confirm a
//! hit by reading the key again after the value, like a sequence lock. Learning writes only
//! when something changed: a MAC seen again on the same port within the same second costs no
//! store, so the table's cache lines are not bounced between PMDs per packet. Ageing and
//! flushes run on the control thread.
//!
//! Limits: the table never holds more than `capacity` entries and a port never more than its
//! MAC limit; a MAC that cannot be learned is flooded to (and counted), never a reason to drop.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Slots a key may live in, from its hash on.
const WINDOW: usize = 16;
/// Port ids the table keeps per-port counts and limits for.
pub const MAX_PORTS: usize = 4096;
/// Key of an empty slot, and of a slot being filled (a real key always has bit 63 set).
const EMPTY: u64 = 0;
const BUSY: u64 = 1;
/// Value of a slot being removed.
const DEAD: u64 = u64::MAX;

/// A switch-wide port number.
pub type PortId = u16;

struct Slot {
    key: AtomicU64,
    /// `port << 32 | last seen (seconds)`.
    val: AtomicU64,
}

/// What learning a source address did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// Already known on this port (at most a timestamp refresh).
    Known,
    New,
    /// Known on another port before: moved here.
    Moved,
    /// The table holds `capacity` entries.
    TableFull,
    /// The port holds its limit of MACs.
    PortLimit,
}

/// One entry, for reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MacEntry {
    pub vlan: u16,
    pub mac: [u8; 6],
    pub port: PortId,
    /// Seconds since the MAC was last seen.
    pub age: u32,
}

pub struct MacTable {
    slots: Box<[Slot]>,
    mask: usize,
    capacity: usize,
    len: AtomicUsize,
    per_port: Box<[AtomicU32]>,
    /// Per-port MAC limits; 0 = none.
    limits: Box<[AtomicU32]>,
}

#[inline]
fn key(vlan: u16, mac: &[u8; 6]) -> u64 {
    let m = u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]);
    1 << 63 | u64::from(vlan & 0xfff) << 48 | m
}

#[inline]
fn hash(k: u64) -> usize {
    // Fibonacci hashing: the multiply spreads MACs that differ in their last bytes.
    (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize
}

#[inline]
fn val(port: PortId, now: u32) -> u64 {
    u64::from(port) << 32 | u64::from(now)
}

#[inline]
fn val_port(v: u64) -> PortId {
    (v >> 32) as PortId
}

impl MacTable {
    /// A table for at most `capacity` (≥ 1) entries.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let n = (2 * capacity).next_power_of_two().max(WINDOW);
        MacTable {
            slots: (0..n)
                .map(|_| Slot {
                    key: AtomicU64::new(EMPTY),
                    val: AtomicU64::new(0),
                })
                .collect(),
            mask: n - 1,
            capacity,
            len: AtomicUsize::new(0),
            per_port: (0..MAX_PORTS).map(|_| AtomicU32::new(0)).collect(),
            limits: (0..MAX_PORTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// MACs currently learned on `port`.
    pub fn port_count(&self, port: PortId) -> u32 {
        self.per_port
            .get(port as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Limits `port` to `limit` MACs (0: no limit). Entries above a lowered limit stay until
    /// they age out.
    pub fn set_port_limit(&self, port: PortId, limit: u32) {
        if let Some(l) = self.limits.get(port as usize) {
            l.store(limit, Ordering::Relaxed);
        }
    }

    #[inline]
    fn window(&self, k: u64) -> impl Iterator<Item = &Slot> {
        let h = hash(k);
        (0..WINDOW).map(move |i| &self.slots[(h + i) & self.mask])
    }

    /// The slot holding `k` and its value.
    #[inline]
    fn find(&self, k: u64) -> Option<(&Slot, u64)> {
        for s in self.window(k) {
            if s.key.load(Ordering::Acquire) == k {
                let v = s.val.load(Ordering::Acquire);
                // Still ours after reading the value: the value belongs to `k`.
                if v != DEAD && s.key.load(Ordering::Acquire) == k {
                    return Some((s, v));
                }
            }
        }
        None
    }

    /// The port `mac` on `vlan` was learned on.
    #[inline]
    pub fn lookup(&self, vlan: u16, mac: &[u8; 6]) -> Option<PortId> {
        self.find(key(vlan, mac)).map(|(_, v)| val_port(v))
    }

    /// Records that `mac` on `vlan` was seen on `port` at `now` (seconds).
    #[inline]
    pub fn learn(&self, vlan: u16, mac: &[u8; 6], port: PortId, now: u32) -> Learned {
        let k = key(vlan, mac);
        let new = val(port, now);
        if let Some((slot, old)) = self.find(k) {
            if old == new {
                return Learned::Known;
            }
            // Compare-and-swap: a concurrent move or removal wins, and this packet's update is
            // dropped (the next one from the MAC redoes it); per-port counts stay exact.
            let swap = |slot: &Slot| {
                slot.val
                    .compare_exchange(old, new, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            };
            let from = val_port(old);
            if from == port {
                swap(slot);
                return Learned::Known;
            }
            if !self.charge(port) {
                return Learned::PortLimit;
            }
            if !swap(slot) {
                self.uncharge(port);
                return Learned::Known;
            }
            self.uncharge(from);
            return Learned::Moved;
        }
        self.insert(k, port, new)
    }

    #[cold]
    fn insert(&self, k: u64, port: PortId, new: u64) -> Learned {
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Learned::TableFull;
        }
        if !self.charge(port) {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Learned::PortLimit;
        }
        for s in self.window(k) {
            // Claim the slot, then the value, then the key: a reader that finds the key finds
            // its value.
            if s.key.load(Ordering::Relaxed) == EMPTY
                && s.key
                    .compare_exchange(EMPTY, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                s.val.store(new, Ordering::Release);
                s.key.store(k, Ordering::Release);
                self.drop_duplicate(k, s);
                return Learned::New;
            }
        }
        // The window is full (hash clustering): as if the table were.
        self.len.fetch_sub(1, Ordering::AcqRel);
        self.uncharge(port);
        Learned::TableFull
    }

    /// Two PMDs that learn the same MAC at once can both insert it: the one whose slot comes
    /// later in the window removes its own. A slot still being filled before ours may be the
    /// other copy, so wait (briefly, bounded) for it; if it takes longer, a duplicate stays,
    /// harmless — lookups use the first, both age out.
    fn drop_duplicate(&self, k: u64, ours: &Slot) {
        for s in self.window(k) {
            if std::ptr::eq(s, ours) {
                return;
            }
            let mut spins = 0;
            let mut key = s.key.load(Ordering::Acquire);
            while key == BUSY && spins < 1000 {
                std::hint::spin_loop();
                spins += 1;
                key = s.key.load(Ordering::Acquire);
            }
            if key == k && s.val.load(Ordering::Acquire) != DEAD {
                self.remove_slot(ours, k);
                return;
            }
        }
    }

    /// Removes the entry in `s` if it still holds `k`. Marking the value dead first makes the
    /// removal exclusive with moves (which compare-and-swap the value) and other removals.
    fn remove_slot(&self, s: &Slot, k: u64) -> bool {
        let mut v = s.val.load(Ordering::Acquire);
        loop {
            if v == DEAD || s.key.load(Ordering::Acquire) != k {
                return false;
            }
            match s
                .val
                .compare_exchange(v, DEAD, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => v = now,
            }
        }
        s.key.store(EMPTY, Ordering::Release);
        self.len.fetch_sub(1, Ordering::AcqRel);
        self.uncharge(val_port(v));
        true
    }

    fn charge(&self, port: PortId) -> bool {
        let (Some(c), Some(l)) = (
            self.per_port.get(port as usize),
            self.limits.get(port as usize),
        ) else {
            return false;
        };
        let limit = l.load(Ordering::Relaxed);
        if c.fetch_add(1, Ordering::AcqRel) >= limit && limit != 0 {
            c.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn uncharge(&self, port: PortId) {
        if let Some(c) = self.per_port.get(port as usize) {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Removes the entries that match `f(vlan, port, last_seen)`; returns how many.
    fn remove_where(&self, f: impl Fn(u16, PortId, u32) -> bool) -> usize {
        let mut n = 0;
        for s in self.slots.iter() {
            let k = s.key.load(Ordering::Acquire);
            let v = s.val.load(Ordering::Acquire);
            if k >> 63 == 0 || v == DEAD {
                continue;
            }
            if f((k >> 48) as u16 & 0xfff, val_port(v), v as u32) && self.remove_slot(s, k) {
                n += 1;
            }
        }
        n
    }

    /// Removes entries not seen for more than `max_age` seconds at `now`.
    pub fn age(&self, now: u32, max_age: u32) -> usize {
        self.remove_where(|_, _, seen| now.wrapping_sub(seen) > max_age)
    }

    /// Removes every entry of `port` (the port was removed or moved to another VLAN).
    pub fn flush_port(&self, port: PortId) -> usize {
        self.remove_where(|_, p, _| p == port)
    }

    /// Every entry, sorted by VLAN and MAC.
    pub fn entries(&self, now: u32) -> Vec<MacEntry> {
        let mut v: Vec<MacEntry> = self
            .slots
            .iter()
            .filter_map(|s| {
                let k = s.key.load(Ordering::Acquire);
                let v = s.val.load(Ordering::Acquire);
                (k >> 63 == 1 && v != DEAD && s.key.load(Ordering::Acquire) == k).then(|| {
                    let b = k.to_be_bytes();
                    MacEntry {
                        vlan: (k >> 48) as u16 & 0xfff,
                        mac: [b[2], b[3], b[4], b[5], b[6], b[7]],
                        port: val_port(v),
                        age: now.wrapping_sub(v as u32),
                    }
                })
            })
            .collect();
        v.sort_by_key(|e| (e.vlan, e.mac));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(i: u32) -> [u8; 6] {
        let b = i.to_be_bytes();
        [2, 0, b[0], b[1], b[2], b[3]]
    }

    #[test]
    fn learns_looks_up_and_moves() {
        let t = MacTable::new(16);
        assert_eq!(t.lookup(1, &mac(1)), None);
        assert_eq!(t.learn(1, &mac(1), 3, 10), Learned::New);
        assert_eq!(t.learn(1, &mac(1), 3, 10), Learned::Known);
        assert_eq!(t.lookup(1, &mac(1)), Some(3));
        // Same MAC on another VLAN is another entry.
        assert_eq!(t.lookup(2, &mac(1)), None);
        assert_eq!(t.learn(1, &mac(1), 4, 11), Learned::Moved);
        assert_eq!(t.lookup(1, &mac(1)), Some(4));
        assert_eq!((t.len(), t.port_count(3), t.port_count(4)), (1, 0, 1));
    }

    #[test]
    fn size_limit_and_port_limit_hold() {
        let t = MacTable::new(8);
        for i in 0..8 {
            assert_eq!(t.learn(0, &mac(i), 1, 0), Learned::New, "mac {i}");
        }
        assert_eq!(t.learn(0, &mac(100), 1, 0), Learned::TableFull);
        assert_eq!(t.len(), 8);
        t.flush_port(1);
        assert!(t.is_empty());
        t.set_port_limit(2, 3);
        for i in 0..3 {
            assert_eq!(t.learn(0, &mac(i), 2, 0), Learned::New);
        }
        assert_eq!(t.learn(0, &mac(3), 2, 0), Learned::PortLimit);
        assert_eq!(t.lookup(0, &mac(3)), None);
        // Moving onto a full port is refused too; the entry stays where it was.
        t.learn(0, &mac(50), 5, 0);
        assert_eq!(t.learn(0, &mac(50), 2, 0), Learned::PortLimit);
        assert_eq!(t.lookup(0, &mac(50)), Some(5));
        assert_eq!(t.port_count(2), 3);
    }

    #[test]
    fn ageing_removes_only_old_entries() {
        let t = MacTable::new(64);
        t.learn(0, &mac(1), 1, 100);
        t.learn(0, &mac(2), 1, 200);
        assert_eq!(t.age(300, 150), 1);
        assert_eq!(t.lookup(0, &mac(1)), None);
        assert_eq!(t.lookup(0, &mac(2)), Some(1));
        let e = t.entries(300);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].mac, e[0].age, e[0].port), (mac(2), 100, 1));
        // A freed slot is reused, and lookups still see keys past it.
        t.learn(0, &mac(3), 2, 300);
        assert_eq!(t.lookup(0, &mac(3)), Some(2));
        assert_eq!(t.port_count(1), 1);
    }

    #[test]
    fn threads_learning_at_once_keep_counts_exact() {
        let t = std::sync::Arc::new(MacTable::new(4096));
        let hs: Vec<_> = (0..4u16)
            .map(|p| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for round in 0..50 {
                        for i in 0..500 {
                            // Every thread learns the same MACs: inserts and moves race.
                            t.learn(7, &mac(i), p, round);
                        }
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(t.len(), 500);
        let counts: u32 = (0..4).map(|p| t.port_count(p)).sum();
        assert_eq!(counts, 500);
        assert_eq!(t.entries(0).len(), 500);
        assert_eq!(
            t.flush_port(0) + t.flush_port(1) + t.flush_port(2) + t.flush_port(3),
            500
        );
        assert!(t.is_empty());
    }
}
