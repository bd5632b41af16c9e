//! `torii-switch-bench`: the L2 switch's forwarding rate with 2, 8, 32… ports against a plain
//! cross-connect, on one PMD, in the same run, interleaved and repeated.
//!
//! Every port is a `source` (a generator that also consumes what it is sent): on the switch,
//! port *i* sends 64 B frames from MAC *i* to MAC *i xor 1*, so after the first burst every
//! frame is a learned unicast to its partner; the baseline cross-connects two sources. The
//! rate is what all ports consumed per second (the sum of their `tx_packets`), read from the
//! stats file Torii rewrites every second; the PMD's cycles per packet come from the same file.
//! No frontend is involved: this measures the switch's own cost per packet.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;

use crate::bench::median;
use crate::proc_util::{self, ChildGuard};

/// The PMD's CPU (the other one runs this harness).
pub const PMD_CPU: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "ports", rename_all = "kebab-case")]
pub enum Scenario {
    /// Two sources cross-connected.
    Xconnect,
    /// This many sources on the switch.
    Switch(u16),
}

impl Scenario {
    pub fn label(self) -> String {
        match self {
            Scenario::Xconnect => "xconnect".into(),
            Scenario::Switch(n) => format!("switch-{n}"),
        }
    }
}

fn mac(i: u16) -> String {
    format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff)
}

/// Torii's configuration for one run.
pub fn config(s: Scenario, size: u16, dir: &Path) -> String {
    let mut c = format!(
        "[dataplane]\npmd_cpus = [{PMD_CPU}]\npmd_mode = \"poll\"\nstats_file = \"{}\"\ncontrol_socket = \"{}\"\n\n",
        dir.join("stats.json").display(),
        dir.join("control.sock").display()
    );
    let port = |i: u16| {
        format!(
            "[[port]]\nname = \"s{i}\"\ntype = \"source\"\nframe_size = {size}\nsrc_mac = \"{}\"\ndst_mac = \"{}\"\n",
            mac(i),
            mac(i ^ 1)
        )
    };
    match s {
        Scenario::Xconnect => {
            c += &port(0);
            c += &port(1);
            c += "[[xconnect]]\nports = [\"s0\", \"s1\"]\n";
        }
        Scenario::Switch(n) => {
            c += &format!("[switch]\nmac_table_size = {}\n", 4 * n.max(16));
            for i in 0..n {
                c += &port(i);
            }
        }
    }
    c
}

/// One run's result.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchRun {
    pub scenario: Scenario,
    pub pair: u32,
    /// Mpps per second, warm-up samples included (the first `warmup`).
    pub series: Vec<f64>,
    pub mpps: f64,
    pub cycles_per_packet: f64,
}

/// (sum of every port's tx_packets, PMD cycles per packet) of a stats file.
fn read_stats(path: &Path) -> Option<(u64, f64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let tx = v["ports"]
        .as_array()?
        .iter()
        .map(|p| p["tx_packets"].as_u64().unwrap_or(0))
        .sum();
    Some((
        tx,
        v["pmds"][0]["cycles_per_packet"].as_f64().unwrap_or(0.0),
        m,
    ))
}

/// Runs Torii with scenario `s` for `secs` per-second samples (after one to start).
pub fn run_one(
    dataplane: &Path,
    s: Scenario,
    size: u16,
    secs: u32,
    warmup: u32,
    pair: u32,
) -> anyhow::Result<SwitchRun> {
    let dir = proc_util::unique_tmp_dir("torii-swbench")?;
    let cfg = dir.join("dataplane.toml");
    std::fs::write(&cfg, config(s, size, dir.path()))?;
    let log = std::fs::File::create(dir.join("dataplane.log"))?;
    let child = std::process::Command::new(dataplane)
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", dataplane.display()))?;
    let mut guard = ChildGuard::new(child, "torii-dataplane");
    let stats = dir.join("stats.json");
    let mut last: Option<(u64, SystemTime)> = None;
    let mut series = Vec::new();
    let mut cyc = 0.0;
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs) * 2 + 20);
    while series.len() < secs as usize {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no stats from torii-dataplane; log:\n{}",
            std::fs::read_to_string(dir.join("dataplane.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
        let Some((tx, c, t)) = read_stats(&stats) else {
            continue;
        };
        match last {
            Some((_, lt)) if lt == t => continue,
            Some((ltx, lt)) => {
                let dt = t.duration_since(lt).unwrap_or_default().as_secs_f64();
                if dt > 0.0 {
                    series.push(tx.saturating_sub(ltx) as f64 / dt / 1e6);
                    cyc = c;
                }
            }
            None => {}
        }
        last = Some((tx, t));
    }
    let _ = guard.signal(libc::SIGINT);
    if !matches!(guard.wait_timeout(Duration::from_secs(10)), Ok(Some(_))) {
        let _ = guard.kill();
    }
    let used: Vec<f64> = series.iter().skip(warmup as usize).copied().collect();
    Ok(SwitchRun {
        scenario: s,
        pair,
        mpps: median(&used).unwrap_or(0.0),
        series,
        cycles_per_packet: cyc,
    })
}

/// One row of the summary.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchSummary {
    pub scenario: Scenario,
    pub median_mpps: f64,
    pub min_mpps: f64,
    pub max_mpps: f64,
    pub median_cycles_per_packet: f64,
    /// median_mpps / the cross-connect's median_mpps.
    pub ratio_to_xconnect: Option<f64>,
}

pub fn summarize(scenarios: &[Scenario], runs: &[SwitchRun]) -> Vec<SwitchSummary> {
    let of = |s: Scenario| runs.iter().filter(move |r| r.scenario == s);
    let xc = median(&of(Scenario::Xconnect).map(|r| r.mpps).collect::<Vec<_>>());
    scenarios
        .iter()
        .map(|&s| {
            let m: Vec<f64> = of(s).map(|r| r.mpps).collect();
            let med = median(&m).unwrap_or(0.0);
            SwitchSummary {
                scenario: s,
                median_mpps: med,
                min_mpps: m.iter().copied().fold(f64::INFINITY, f64::min),
                max_mpps: m.iter().copied().fold(0.0, f64::max),
                median_cycles_per_packet: median(
                    &of(s).map(|r| r.cycles_per_packet).collect::<Vec<_>>(),
                )
                .unwrap_or(0.0),
                ratio_to_xconnect: xc.filter(|x| *x > 0.0).map(|x| med / x),
            }
        })
        .collect()
}

pub fn summary_table(rows: &[SwitchSummary]) -> String {
    let mut s = format!(
        "{:<10} {:>8} {:>15} {:>9} {:>10}\n",
        "scenario", "Mpps", "min-max", "cyc/pkt", "vs xconn"
    );
    for r in rows {
        s += &format!(
            "{:<10} {:>8.2} {:>15} {:>9.0} {:>10}\n",
            r.scenario.label(),
            r.median_mpps,
            format!("{:.2}-{:.2}", r.min_mpps, r.max_mpps),
            r.median_cycles_per_packet,
            r.ratio_to_xconnect
                .map_or("-".into(), |x| format!("{x:.3}"))
        );
    }
    s
}

/// Where results go by default.
pub fn default_out(root: &Path) -> PathBuf {
    root.join("perf/results/switch-latest.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_ports_send_to_their_partner() {
        let c = config(Scenario::Switch(4), 64, Path::new("/x"));
        assert_eq!(c.matches("[[port]]").count(), 4);
        assert!(c.contains("name = \"s3\"\ntype = \"source\"\nframe_size = 64\nsrc_mac = \"02:00:00:00:00:03\"\ndst_mac = \"02:00:00:00:00:02\""));
        assert!(!c.contains("xconnect"));
        let x = config(Scenario::Xconnect, 64, Path::new("/x"));
        assert!(x.contains("ports = [\"s0\", \"s1\"]"));
    }

    #[test]
    fn summary_relates_to_the_cross_connect() {
        let run = |s, mpps| SwitchRun {
            scenario: s,
            pair: 0,
            series: vec![],
            mpps,
            cycles_per_packet: 100.0,
        };
        let rows = summarize(
            &[Scenario::Xconnect, Scenario::Switch(2)],
            &[
                run(Scenario::Xconnect, 20.0),
                run(Scenario::Switch(2), 10.0),
                run(Scenario::Xconnect, 22.0),
                run(Scenario::Switch(2), 12.0),
            ],
        );
        assert_eq!(rows[1].ratio_to_xconnect, Some(0.5238095238095238));
        assert_eq!((rows[0].min_mpps, rows[0].max_mpps), (20.0, 22.0));
        assert!(summary_table(&rows).contains("switch-2"));
    }
}
