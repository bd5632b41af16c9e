//! The results file of `torii-perf run`: every scenario as the subject (Torii) against the peer
//! measured in the same run, with the per-sample series, and the machine and revision it ran
//! on.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::stats::{self, Summary};

/// Version of the results and baseline formats.
pub const SCHEMA: u32 = 1;

/// Which way is better for a value (and for its ratio to the peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// One measured party of a scenario: Torii, the peer, or another reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// Who: `torii`, `dpdk net_vhost`, `qemu-storage-daemon`, ...
    pub name: String,
    #[serde(flatten)]
    pub summary: Summary,
}

impl Side {
    /// A side from its samples (`None` when no sample is a number).
    pub fn new(name: impl Into<String>, samples: &[f64]) -> Option<Side> {
        Some(Side {
            name: name.into(),
            summary: Summary::of(samples)?,
        })
    }
}

/// A curve of a chart: a latency CDF as (latency, percentile) points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What a scenario is, before it is measured.
#[derive(Debug, Clone)]
pub struct Head {
    pub id: String,
    pub group: String,
    pub title: String,
    pub unit: String,
    pub better: Better,
}

impl Head {
    pub fn new(
        id: impl Into<String>,
        group: &str,
        title: impl Into<String>,
        unit: &str,
        better: Better,
    ) -> Head {
        Head {
            id: id.into(),
            group: group.to_string(),
            title: title.into(),
            unit: unit.to_string(),
            better,
        }
    }
}

/// One headline number: the subject against the peer of the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Stable name, e.g. `net.guest-tx.64`: what baselines are keyed by.
    pub id: String,
    /// The group (and benchmark tool) it comes from.
    pub group: String,
    pub title: String,
    /// Unit of the subject's and the peer's values (`Mpps`, `IOPS`, `ms`, ...).
    pub unit: String,
    pub better: Better,
    pub subject: Side,
    /// The peer of the same run; `None` for an absolute quantity that does not depend on the
    /// machine's speed (memory), compared as is.
    pub peer: Option<Side>,
    /// Other references of the same run (the fio ceiling, an older build, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<Side>,
    /// subject median / peer median: what is compared against the baseline.
    pub ratio: Option<f64>,
    /// The ratios of the rounds, each subject run against the peer run it was paired with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ratio_series: Vec<f64>,
    /// What the scenario was run with (path, frame size, queue depth, ...), for charts.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Latency CDFs of the parties, where the tool records latencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf: Vec<Curve>,
}

impl Scenario {
    /// A scenario from the subject's and the peer's series, paired round by round (`None`
    /// marks a failed round).
    pub fn paired(
        head: Head,
        (subject_name, subject): (&str, &[Option<f64>]),
        (peer_name, peer): (&str, &[Option<f64>]),
    ) -> Option<Scenario> {
        let flat = |v: &[Option<f64>]| v.iter().flatten().copied().collect::<Vec<_>>();
        let subject_side = Side::new(subject_name, &flat(subject))?;
        let peer_side = Side::new(peer_name, &flat(peer));
        let ratio = peer_side
            .as_ref()
            .and_then(|p| stats::ratio(subject_side.summary.median, p.summary.median));
        Some(Scenario {
            id: head.id,
            group: head.group,
            title: head.title,
            unit: head.unit,
            better: head.better,
            ratio,
            ratio_series: stats::paired_ratios(subject, peer),
            subject: subject_side,
            peer: peer_side,
            extra: Vec::new(),
            params: serde_json::Map::new(),
            cdf: Vec::new(),
        })
    }

    /// The value compared against the baseline: the ratio, or the subject's median for an
    /// absolute scenario.
    pub fn compared_value(&self) -> Option<f64> {
        match self.peer {
            Some(_) => self.ratio,
            None => Some(self.subject.summary.median),
        }
    }

    /// Adds a parameter (builder style).
    pub fn with_param(mut self, k: &str, v: impl Into<serde_json::Value>) -> Scenario {
        self.params.insert(k.to_string(), v.into());
        self
    }

    /// Problems that make the numbers unusable (a test's "valid numbers" check).
    pub fn invalid(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let mut side = |what: &str, s: &Side| {
            let m = &s.summary;
            if m.samples.is_empty() || m.samples.iter().any(|x| !x.is_finite() || *x < 0.0) {
                bad.push(format!("{}: {what} has missing or broken samples", self.id));
            }
            if !(m.median > 0.0 && m.min <= m.median && m.median <= m.max) {
                bad.push(format!(
                    "{}: {what} median {} outside (0, max]",
                    self.id, m.median
                ));
            }
        };
        side("subject", &self.subject);
        if let Some(p) = &self.peer {
            side("peer", p);
            if !self.ratio.is_some_and(|r| r.is_finite() && r > 0.0) {
                bad.push(format!("{}: no ratio", self.id));
            }
        }
        bad
    }
}

/// How one group's tool ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRun {
    pub name: String,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    pub secs: f64,
    /// The command that ran it.
    pub command: Vec<String>,
    /// The tool's own results file, kept whole.
    #[serde(default)]
    pub raw: serde_json::Value,
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_mib: u64,
    pub hostname: String,
    /// Versions of the peers and tools (QEMU, DPDK, fio, rustc).
    #[serde(default)]
    pub versions: std::collections::BTreeMap<String, String>,
}

impl Machine {
    /// Describes this machine.
    pub fn probe() -> Machine {
        let h = crate::bench::host_info();
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024);
        let first_line = |prog: &str, args: &[&str]| {
            Command::new(prog)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(|l| l.trim().to_string())
                })
        };
        let mut versions = std::collections::BTreeMap::new();
        for (k, prog, args) in [
            ("qemu", "qemu-system-x86_64", &["--version"][..]),
            ("dpdk", "pkg-config", &["--modversion", "libdpdk"][..]),
            ("fio", "fio", &["--version"][..]),
            ("rustc", "rustc", &["--version"][..]),
        ] {
            if let Some(v) = first_line(prog, args) {
                versions.insert(k.to_string(), v);
            }
        }
        Machine {
            kernel: h.kernel,
            cpu_model: h.cpu_model,
            cpus: h.cpus,
            memory_mib,
            hostname: h.hostname,
            versions,
        }
    }
}

/// A `torii-perf run` results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub tool: String,
    pub schema: u32,
    /// A `--quick` smoke run: its numbers say the scenarios work, not how fast.
    pub quick: bool,
    pub date: String,
    pub started_unix: u64,
    pub finished_unix: u64,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub machine: Machine,
    pub command_line: Vec<String>,
    pub groups: Vec<GroupRun>,
    pub scenarios: Vec<Scenario>,
}

impl Results {
    pub fn load(path: &Path) -> anyhow::Result<Results> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let r: Results = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a torii-perf results file", path.display()))?;
        anyhow::ensure!(
            r.schema == SCHEMA,
            "{}: results schema {} (this torii-perf reads {SCHEMA})",
            path.display(),
            r.schema
        );
        Ok(r)
    }

    /// Takes `other`'s scenarios (replacing those of the same id) and its groups (replacing
    /// a failed run of the same group).
    pub fn merge(&mut self, other: Results) {
        for s in other.scenarios {
            self.scenarios.retain(|x| x.id != s.id);
            self.scenarios.push(s);
        }
        for g in other.groups {
            self.groups.retain(|x| x.name != g.name || x.ok);
            self.groups.push(g);
        }
    }

    pub fn scenario(&self, id: &str) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| s.id == id)
    }

    /// A short label for charts: the revision, or the date.
    pub fn label(&self) -> String {
        let rev = self.git_commit.clone().unwrap_or_else(|| "?".into());
        let dirty = if self.git_dirty == Some(true) {
            "+"
        } else {
            ""
        };
        format!("{}{dirty}", rev)
    }
}
