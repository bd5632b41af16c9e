//! Per-queue counters of an export and their Prometheus text form.
//!
//! Each queue has one writer, the worker serving it, which counts into plain integers as
//! requests complete and stores the running totals into these atomics once per round, so the
//! data path does no atomic read-modify-write per request. Readers (the metrics endpoint) may
//! see a round's counts a round late.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use torii_vhost_user::daemon::label_value;

/// What a queue's requests did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    /// Bytes moved by successful reads and writes.
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Requests answered IOERR and UNSUPP.
    pub io_errors: u64,
    pub unsupported: u64,
    /// Requests taken and not completed.
    pub inflight: u64,
}

const FIELDS: usize = 11;

impl Counters {
    /// Adds `o`'s counts to these (to sum queues).
    pub fn add(&mut self, o: &Counters) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(o.to_array()) {
            *x += y;
        }
        *self = Counters::from_array(a);
    }

    fn to_array(self) -> [u64; FIELDS] {
        [
            self.reads,
            self.writes,
            self.flushes,
            self.discards,
            self.write_zeroes,
            self.get_ids,
            self.read_bytes,
            self.written_bytes,
            self.io_errors,
            self.unsupported,
            self.inflight,
        ]
    }

    fn from_array(a: [u64; FIELDS]) -> Self {
        Counters {
            reads: a[0],
            writes: a[1],
            flushes: a[2],
            discards: a[3],
            write_zeroes: a[4],
            get_ids: a[5],
            read_bytes: a[6],
            written_bytes: a[7],
            io_errors: a[8],
            unsupported: a[9],
            inflight: a[10],
        }
    }
}

/// The published counters of one queue.
#[derive(Default)]
pub struct QueueStats {
    values: [AtomicU64; FIELDS],
}

impl QueueStats {
    /// Publishes `c` (the single writer's running totals).
    pub fn store(&self, c: &Counters) {
        for (slot, v) in self.values.iter().zip(c.to_array()) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    pub fn load(&self) -> Counters {
        Counters::from_array(std::array::from_fn(|i| {
            self.values[i].load(Ordering::Relaxed)
        }))
    }
}

/// What the metrics endpoint reports of an export.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExportReport {
    pub name: String,
    pub connected: bool,
    pub connections: u64,
    pub broken_queues: usize,
    pub queues: Vec<Counters>,
}

/// The Prometheus text exposition of `reports`.
pub fn prometheus(reports: &[ExportReport]) -> String {
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        };
    let per_export = |f: fn(&ExportReport) -> u64| {
        reports
            .iter()
            .map(move |r| (format!("export=\"{}\"", label_value(&r.name)), f(r)))
    };
    let per_queue = |f: fn(&Counters) -> u64, extra: &'static str| {
        reports.iter().flat_map(move |r| {
            r.queues.iter().enumerate().map(move |(q, c)| {
                let name = label_value(&r.name);
                (format!("export=\"{name}\",queue=\"{q}\"{extra}"), f(c))
            })
        })
    };
    family(
        "torii_blk_connected",
        "gauge",
        "Whether a frontend is connected.",
        &mut per_export(|r| u64::from(r.connected)),
    );
    family(
        "torii_blk_connections_total",
        "counter",
        "Frontend connections served.",
        &mut per_export(|r| r.connections),
    );
    family(
        "torii_blk_broken_queues",
        "gauge",
        "Queues stopped for a malformed ring since the connection started.",
        &mut per_export(|r| r.broken_queues as u64),
    );
    family(
        "torii_blk_requests_total",
        "counter",
        "Requests completed, by operation.",
        &mut per_queue(|c| c.reads, ",op=\"read\"")
            .chain(per_queue(|c| c.writes, ",op=\"write\""))
            .chain(per_queue(|c| c.flushes, ",op=\"flush\""))
            .chain(per_queue(|c| c.discards, ",op=\"discard\""))
            .chain(per_queue(|c| c.write_zeroes, ",op=\"write_zeroes\""))
            .chain(per_queue(|c| c.get_ids, ",op=\"get_id\"")),
    );
    family(
        "torii_blk_bytes_total",
        "counter",
        "Bytes read and written by successful requests.",
        &mut per_queue(|c| c.read_bytes, ",dir=\"read\"")
            .chain(per_queue(|c| c.written_bytes, ",dir=\"write\"")),
    );
    family(
        "torii_blk_errors_total",
        "counter",
        "Requests answered with an error status.",
        &mut per_queue(|c| c.io_errors, ",status=\"ioerr\"")
            .chain(per_queue(|c| c.unsupported, ",status=\"unsupp\"")),
    );
    family(
        "torii_blk_inflight",
        "gauge",
        "Requests taken from the ring and not completed.",
        &mut per_queue(|c| c.inflight, ""),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_round_trip_and_render() {
        let s = QueueStats::default();
        let c = Counters {
            reads: 3,
            read_bytes: 12288,
            io_errors: 1,
            inflight: 2,
            ..Default::default()
        };
        s.store(&c);
        assert_eq!(s.load(), c);
        let text = prometheus(&[ExportReport {
            name: "d0".into(),
            connected: true,
            connections: 1,
            broken_queues: 0,
            queues: vec![c],
        }]);
        assert!(
            text.contains("torii_blk_requests_total{export=\"d0\",queue=\"0\",op=\"read\"} 3\n")
        );
        assert!(
            text.contains("torii_blk_bytes_total{export=\"d0\",queue=\"0\",dir=\"read\"} 12288\n")
        );
        assert!(
            text.contains("torii_blk_errors_total{export=\"d0\",queue=\"0\",status=\"ioerr\"} 1\n")
        );
        assert!(text.contains("torii_blk_inflight{export=\"d0\",queue=\"0\"} 2\n"));
        assert!(text.contains("torii_blk_connected{export=\"d0\"} 1\n"));
        assert!(text.contains("# TYPE torii_blk_requests_total counter\n"));
    }
}
