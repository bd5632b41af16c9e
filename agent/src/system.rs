//! What the guest reports about itself: memory, per-interface counters, the agent's own
//! footprint. Read from /proc, which the agent mounts when it is PID 1.

use serde_json::{json, Map, Value};

use crate::protocol::RpcError;

fn read(path: &str) -> Result<String, RpcError> {
    std::fs::read_to_string(path).map_err(|e| RpcError::new("failed", format!("{path}: {e}")))
}

/// `key: value kB` lines (meminfo, status) as bytes.
fn kib_fields(text: &str, keys: &[&str]) -> Map<String, Value> {
    let mut m = Map::new();
    for l in text.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if keys.contains(&k) {
            if let Some(n) = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            {
                m.insert(k.to_string(), json!(n * 1024));
            }
        }
    }
    m
}

/// /proc/net/dev: each interface's byte, packet, error and drop counters.
pub fn interface_counters(text: &str) -> Map<String, Value> {
    let mut m = Map::new();
    for l in text.lines().skip(2) {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        let n: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if n.len() < 16 {
            continue;
        }
        m.insert(
            name.trim().to_string(),
            json!({
                "rx_bytes": n[0], "rx_packets": n[1], "rx_errors": n[2], "rx_dropped": n[3],
                "tx_bytes": n[8], "tx_packets": n[9], "tx_errors": n[10], "tx_dropped": n[11],
            }),
        );
    }
    m
}

/// /proc/vmstat's `oom_kill`: processes the kernel's OOM killer has killed since boot.
pub fn oom_kills(vmstat: &str) -> u64 {
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The `metrics` answer.
pub fn metrics() -> Result<Value, RpcError> {
    let mem = kib_fields(
        &read("/proc/meminfo")?,
        &["MemTotal", "MemFree", "MemAvailable", "HugePages_Total"],
    );
    let me = kib_fields(&read("/proc/self/status")?, &["VmRSS", "VmHWM"]);
    Ok(json!({
        "memory": mem,
        "agent": me,
        "interfaces": interface_counters(&read("/proc/net/dev")?),
        "oom_kills": oom_kills(&read("/proc/vmstat")?),
        "loadavg": read("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_parses() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n  eth0: 5000 40 1 2 0 0 0 3 7000 50 0 4 0 0 0 0\n";
        let m = interface_counters(t);
        assert_eq!(m["eth0"]["rx_packets"], 40);
        assert_eq!(m["eth0"]["tx_dropped"], 4);
        assert_eq!(m["lo"]["tx_bytes"], 100);
        assert!(interface_counters("garbage\n\nx: 1 2\n").is_empty());
    }

    #[test]
    fn oom_kills_parse() {
        assert_eq!(oom_kills("pgfault 10\noom_kill 3\nx 1\n"), 3);
        assert_eq!(oom_kills("pgfault 10\n"), 0);
    }
}
