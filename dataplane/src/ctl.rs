//! `torii-dataplane ctl`: the control API's command-line client. Human-readable tables by
//! default, the API's JSON with `--json`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};

/// The default control socket.
pub const DEFAULT_SOCKET: &str = "/run/torii/dataplane.sock";

#[derive(Subcommand, Debug)]
pub enum CtlCmd {
    /// API and daemon version.
    Version,
    /// List ports with their counters.
    Ports,
    /// One port in detail.
    Show { name: String },
    /// Add a switch port: `add vm3 type=vhost-user socket=/run/vm3.sock vlan=100` (the keys of
    /// a `[[port]]` entry of the config file; values in TOML syntax, e.g. `trunk=[100,200]`).
    Add {
        name: String,
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Remove a switch port.
    Del { name: String },
    /// Replace a switch port's settings: `set vm3 trunk=[100,200] native_vlan=0 mac_limit=8`
    /// (what is not given is cleared).
    Set { name: String, settings: Vec<String> },
    /// Limit what a port takes in (what its guest sends): `rate-limit vm3 pps=100000
    /// bps=1_000_000_000 burst_packets=64` (`pps` and/or `bps`; bursts default to a PMD
    /// burst or 10 ms of the rate); `rate-limit vm3 off` lifts the limit.
    RateLimit {
        name: String,
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Set a vhost-user port's link status.
    Link {
        name: String,
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
    /// Move switch port queues between PMDs so that their measured load is even.
    Rebalance,
    /// The switch's MAC table.
    Macs,
    /// PMD threads: busy/idle cycles, cycles per packet.
    Pmds,
    /// List disks (vhost-user-blk exports) with their counters.
    Disks,
    /// One disk in detail, per queue.
    Disk { name: String },
    /// Start a disk: `disk-add vm3-root socket=/run/vm3-root.sock file=/var/lib/vm3/root.img
    /// queues=2 direct=true` (the keys of a `[[disk]]` entry of the config file).
    DiskAdd {
        name: String,
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Stop a disk.
    DiskDel { name: String },
    /// Everything, as the stats file has it.
    Stats,
    /// Prometheus metrics text.
    Metrics,
}

/// A response of the API.
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request over the Unix socket `socket` (the connection is closed after it).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Response> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to {} (is torii-dataplane running, and may you open its socket?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    // One write (not one per formatted piece: each would wake the server), one read buffer.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: torii\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::with_capacity(4096);
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `key=value` pairs as a JSON object; values are TOML (`100`, `[1,2]`, `"x"`), or a bare
/// string.
pub fn settings(pairs: &[String]) -> anyhow::Result<Value> {
    let mut obj = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("{p:?} is not key=value"))?;
        let value: Value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
            Ok(mut t) => serde_json::to_value(t.remove("v")).unwrap_or(Value::Null),
            Err(_) => Value::String(v.to_string()),
        };
        obj.insert(k.trim().to_string(), value);
    }
    Ok(Value::Object(obj))
}

/// Runs one command against `socket`, printing the result.
pub fn run(socket: &Path, json_out: bool, cmd: CtlCmd) -> anyhow::Result<()> {
    let (method, path, body) = match &cmd {
        CtlCmd::Version => ("GET", "/v1/version".to_string(), None),
        CtlCmd::Ports => ("GET", "/v1/ports".into(), None),
        CtlCmd::Show { name } => ("GET", format!("/v1/ports/{name}"), None),
        CtlCmd::Add { name, settings: s } => {
            ("PUT", format!("/v1/ports/{name}"), Some(settings(s)?))
        }
        CtlCmd::Del { name } => ("DELETE", format!("/v1/ports/{name}"), None),
        CtlCmd::Set { name, settings: s } => (
            "PUT",
            format!("/v1/ports/{name}/switch"),
            Some(settings(s)?),
        ),
        CtlCmd::RateLimit { name, settings: s } if s.len() == 1 && s[0] == "off" => {
            ("DELETE", format!("/v1/ports/{name}/rate-limit"), None)
        }
        CtlCmd::RateLimit { name, settings: s } => (
            "PUT",
            format!("/v1/ports/{name}/rate-limit"),
            Some(settings(s)?),
        ),
        CtlCmd::Link { name, state } => (
            "PUT",
            format!("/v1/ports/{name}/link"),
            Some(json!({ "up": state == "up" })),
        ),
        CtlCmd::Rebalance => ("POST", "/v1/rebalance".into(), None),
        CtlCmd::Macs => ("GET", "/v1/mac-table".into(), None),
        CtlCmd::Pmds => ("GET", "/v1/pmds".into(), None),
        CtlCmd::Disks => ("GET", "/v1/disks".into(), None),
        CtlCmd::Disk { name } => ("GET", format!("/v1/disks/{name}"), None),
        CtlCmd::DiskAdd { name, settings: s } => {
            ("PUT", format!("/v1/disks/{name}"), Some(settings(s)?))
        }
        CtlCmd::DiskDel { name } => ("DELETE", format!("/v1/disks/{name}"), None),
        CtlCmd::Stats => ("GET", "/v1/stats".into(), None),
        CtlCmd::Metrics => ("GET", "/metrics".into(), None),
    };
    let r = request(socket, method, &path, body.as_ref())?;
    if !(200..300).contains(&r.status) {
        let msg = serde_json::from_str::<Value>(&r.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(r.body);
        bail!("{msg} (HTTP {})", r.status);
    }
    if matches!(cmd, CtlCmd::Metrics) {
        print!("{}", r.body);
        return Ok(());
    }
    let v: Value = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&r.body).context("response is not JSON")?
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match cmd {
        CtlCmd::Ports => print!("{}", ports_table(v.as_array().map_or(&[][..], |a| a))),
        CtlCmd::Show { .. }
        | CtlCmd::Add { .. }
        | CtlCmd::Set { .. }
        | CtlCmd::RateLimit { .. } => {
            print!("{}", port_detail(&v))
        }
        CtlCmd::Macs => print!("{}", macs_table(v.as_array().map_or(&[][..], |a| a))),
        CtlCmd::Pmds => print!("{}", pmds_table(v.as_array().map_or(&[][..], |a| a))),
        CtlCmd::Version => println!(
            "torii-dataplane {} (API v{})",
            v["version"].as_str().unwrap_or("?"),
            v["api"]
        ),
        CtlCmd::Del { name } => println!("port {name} removed"),
        CtlCmd::Rebalance => {
            let moved = v["moved"].as_array().map_or(&[][..], |a| a);
            if moved.is_empty() {
                println!("balanced: nothing moved");
            }
            for m in moved {
                println!("moved {}", n(m));
            }
        }
        CtlCmd::Link { name, state } => println!("port {name}: link {state}"),
        CtlCmd::Disks => print!("{}", disks_table(v.as_array().map_or(&[][..], |a| a))),
        CtlCmd::Disk { .. } | CtlCmd::DiskAdd { .. } => print!("{}", disk_detail(&v)),
        CtlCmd::DiskDel { name } => println!("disk {name} removed"),
        CtlCmd::Stats | CtlCmd::Metrics => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(())
}

fn n(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn vlan_text(v: &Value) -> String {
    match v["mode"].as_str() {
        Some("access") => match v["vlan"].as_u64() {
            Some(0) | None => "untagged".into(),
            Some(x) => format!("access {x}"),
        },
        Some("trunk") => {
            let ids: Vec<String> = v["allowed"]
                .as_array()
                .map(|a| a.iter().map(n).collect())
                .unwrap_or_default();
            let native = v["native"]
                .as_u64()
                .map(|x| format!(" native {x}"))
                .unwrap_or_default();
            format!("trunk {}{native}", ids.join(","))
        }
        _ => "xconnect".into(),
    }
}

/// `n` with an SI prefix when it is a whole number of them (100000 → 100k).
fn si(n: u64) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000_000_000 == 0 => format!("{}T", n / 1_000_000_000_000),
        n if n % 1_000_000_000 == 0 => format!("{}G", n / 1_000_000_000),
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// A port's rate limit, short: `100kpps`, `1Gbps`, `100kpps,1Gbps`; `-` for none.
fn rate_text(r: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(p) = r["pps"].as_u64() {
        parts.push(format!("{}pps", si(p)));
    }
    if let Some(b) = r["bps"].as_u64() {
        parts.push(format!("{}bps", si(b)));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn link(p: &Value) -> &'static str {
    if p["link_up"] == false {
        return "off";
    }
    match p["connected"].as_bool() {
        Some(true) => "up",
        Some(false) => "down",
        None => "-",
    }
}

pub fn ports_table(ports: &[Value]) -> String {
    let mut s = format!(
        "{:<14} {:<10} {:<4} {:<18} {:>5} {:<14} {:>12} {:>12} {:>12} {:>12} {:>9}\n",
        "PORT",
        "KIND",
        "LINK",
        "VLAN",
        "MACS",
        "RATE_LIMIT",
        "RX_PKTS",
        "RX_DROP",
        "TX_PKTS",
        "TX_DROP",
        "ERRORS"
    );
    for p in ports {
        let rx_drop = [
            "rx_dropped_invalid",
            "rx_dropped_vlan",
            "rx_dropped_mac_limit",
            "rx_dropped_no_buffer",
        ]
        .iter()
        .map(|k| p[*k].as_u64().unwrap_or(0))
        .sum::<u64>();
        let tx_drop = ["tx_dropped_no_room", "tx_dropped_offload"]
            .iter()
            .map(|k| p[*k].as_u64().unwrap_or(0))
            .sum::<u64>();
        s += &format!(
            "{:<14} {:<10} {:<4} {:<18} {:>5} {:<14} {:>12} {:>12} {:>12} {:>12} {:>9}\n",
            n(&p["name"]),
            n(&p["kind"]),
            link(p),
            vlan_text(&p["vlan"]),
            n(&p["macs"]),
            rate_text(&p["rate_limit"]),
            n(&p["rx_packets"]),
            rx_drop,
            n(&p["tx_packets"]),
            tx_drop,
            n(&p["tx_errors"]),
        );
    }
    s
}

const DISK_COLUMNS: [&str; 6] = [
    "reads",
    "writes",
    "read_bytes",
    "written_bytes",
    "io_errors",
    "inflight",
];

fn disk_counters(c: &Value) -> String {
    format!(
        "{:>12} {:>12} {:>14} {:>14} {:>9} {:>8}",
        n(&c[DISK_COLUMNS[0]]),
        n(&c[DISK_COLUMNS[1]]),
        n(&c[DISK_COLUMNS[2]]),
        n(&c[DISK_COLUMNS[3]]),
        n(&c[DISK_COLUMNS[4]]),
        n(&c[DISK_COLUMNS[5]]),
    )
}

fn disk_header(first: &str) -> String {
    let c = DISK_COLUMNS.map(str::to_uppercase);
    format!(
        "{first:<14} {:<4} {:>12} {:>12} {:>14} {:>14} {:>9} {:>8}\n",
        "LINK", c[0], c[1], c[2], c[3], c[4], c[5]
    )
}

pub fn disks_table(disks: &[Value]) -> String {
    let mut s = disk_header("DISK");
    for k in disks {
        s += &format!(
            "{:<14} {:<4} {}\n",
            n(&k["name"]),
            link(k),
            disk_counters(&k["total"])
        );
    }
    s
}

pub fn disk_detail(k: &Value) -> String {
    let mut s = format!(
        "disk {}  link {}  file {}{}{}  socket {}  connections {}\n",
        n(&k["name"]),
        link(k),
        n(&k["file"]),
        if k["read_only"] == true {
            " (read-only)"
        } else {
            ""
        },
        if k["direct"] == true {
            " (O_DIRECT)"
        } else {
            ""
        },
        n(&k["socket"]),
        n(&k["connections"]),
    );
    s += &disk_header("QUEUE");
    for (q, c) in k["queues"]
        .as_array()
        .map_or(&[][..], |a| a)
        .iter()
        .enumerate()
    {
        s += &format!("{q:<14} {:<4} {}\n", "", disk_counters(c));
    }
    for b in k["broken_queues"].as_array().map_or(&[][..], |a| a) {
        s += &format!("broken: {}\n", n(b));
    }
    s
}

pub fn port_detail(p: &Value) -> String {
    let mut s = format!(
        "port {}  kind {}  link {}  vlan {}  macs {}\n",
        n(&p["name"]),
        n(&p["kind"]),
        link(p),
        vlan_text(&p["vlan"]),
        n(&p["macs"])
    );
    let r = &p["rate_limit"];
    if r.is_object() {
        let mut line = format!("rate limit {}", rate_text(r));
        if let Some(b) = r["burst_packets"].as_u64() {
            line += &format!("  burst {b} packets");
        }
        if let Some(b) = r["burst_bytes"].as_u64() {
            line += &format!("  burst {b} bytes");
        }
        s += &format!("{line}\n");
    }
    for k in [
        "rx_packets",
        "rx_bytes",
        "rx_dropped_invalid",
        "rx_dropped_vlan",
        "rx_dropped_mac_limit",
        "rx_dropped_no_buffer",
        "rx_rate_limited_rounds",
        "tx_packets",
        "tx_bytes",
        "tx_dropped_no_room",
        "tx_dropped_offload",
        "tx_errors",
        "sw_csum",
        "sw_gso",
        "rx_gso_packets",
        "tx_gso_packets",
    ] {
        s += &format!("  {k:<22} {}\n", n(&p[k]));
    }
    let nq = p["rxq_packets"].as_array().map_or(0, |a| a.len());
    if nq > 0 {
        s += &format!(
            "  {:<6} {:>14} {:>16} {:>14} {:>16} {:>14}\n",
            "queue", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_cycles"
        );
    }
    for q in 0..nq {
        s += &format!(
            "  {:<6} {:>14} {:>16} {:>14} {:>16} {:>14}\n",
            q,
            n(&p["rxq_packets"][q]),
            n(&p["rxq_bytes"][q]),
            n(&p["txq_packets"][q]),
            n(&p["txq_bytes"][q]),
            n(&p["rxq_cycles"][q]),
        );
    }
    for b in p["broken_queues"].as_array().into_iter().flatten() {
        s += &format!("  BROKEN {}\n", n(b));
    }
    s
}

pub fn macs_table(macs: &[Value]) -> String {
    let mut s = format!("{:<6} {:<18} {:<14} {:>6}\n", "VLAN", "MAC", "PORT", "AGE");
    for m in macs {
        s += &format!(
            "{:<6} {:<18} {:<14} {:>6}\n",
            n(&m["vlan"]),
            n(&m["mac"]),
            n(&m["port"]),
            n(&m["age"])
        );
    }
    s
}

pub fn pmds_table(pmds: &[Value]) -> String {
    let mut s = format!(
        "{:<4} {:<4} {:>7} {:>14} {:>10} {:>10}  PORTS\n",
        "PMD", "CPU", "BUSY%", "PACKETS", "CYC/PKT", "SLEEPS"
    );
    for p in pmds {
        let busy = p["busy_cycles"].as_f64().unwrap_or(0.0);
        let idle = p["idle_cycles"].as_f64().unwrap_or(0.0);
        let ports: Vec<String> = p["ports"]
            .as_array()
            .map(|a| a.iter().map(n).collect())
            .unwrap_or_default();
        s += &format!(
            "{:<4} {:<4} {:>7.1} {:>14} {:>10.0} {:>10}  {}\n",
            n(&p["id"]),
            n(&p["cpu"]),
            100.0 * busy / (busy + idle).max(1.0),
            n(&p["packets"]),
            p["cycles_per_packet"].as_f64().unwrap_or(0.0),
            n(&p["sleeps"]),
            ports.join(",")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_toml_values() {
        let v = settings(&[
            "type=vhost-user".into(),
            "socket=/run/a.sock".into(),
            "vlan=100".into(),
            "trunk=[1, 2]".into(),
            "mac=\"52:54:00:00:00:01\"".into(),
        ])
        .unwrap();
        assert_eq!(
            v,
            json!({"type": "vhost-user", "socket": "/run/a.sock", "vlan": 100,
                   "trunk": [1, 2], "mac": "52:54:00:00:00:01"})
        );
        assert!(settings(&["novalue".into()]).is_err());
    }

    #[test]
    fn rate_limits_are_shown_short() {
        assert_eq!(rate_text(&Value::Null), "-");
        assert_eq!(rate_text(&json!({"pps": 100000})), "100kpps");
        assert_eq!(
            rate_text(&json!({"pps": 1500, "bps": 2_500_000_000u64})),
            "1500pps,2500Mbps"
        );
        assert_eq!(rate_text(&json!({"bps": 1_000_000_000_000u64})), "1Tbps");
        let table = ports_table(&[json!({"name": "vm1", "kind": "vhost-user",
            "rate_limit": {"bps": 1_000_000_000u64, "burst_bytes": 125000}})]);
        assert!(
            table.contains("RATE_LIMIT") && table.contains("1Gbps"),
            "{table}"
        );
        let detail = port_detail(&json!({"name": "vm1", "rate_limit":
            {"pps": 1000, "burst_packets": 32}, "rx_rate_limited_rounds": 7}));
        assert!(
            detail.contains("rate limit 1kpps  burst 32 packets"),
            "{detail}"
        );
        assert!(detail.contains("rx_rate_limited_rounds"), "{detail}");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
