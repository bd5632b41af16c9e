//! The scenario groups: which tool measures them, how it is run (full or quick), and how its
//! own results file becomes [`Scenario`]s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::Value;

use super::results::{Better, Curve, Head, Scenario, Side};
use super::stats;

/// What `torii-perf` needs to start the tools.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The workspace (scripts, perf/, the bench sources for criterion).
    pub root: PathBuf,
    /// Where the built binaries are (torii-dataplane, torii-bench, ...).
    pub bin_dir: PathBuf,
    /// The pod VM image folder (scripts/image).
    pub image: PathBuf,
    pub quick: bool,
    /// Cargo profile the micro-benchmarks are built with (`bench`, or `dev` to reuse a test
    /// build).
    pub micro_profile: String,
}

/// A group of scenarios measured by one tool in one go.
pub struct Group {
    pub name: &'static str,
    pub what: &'static str,
    /// Against whom.
    pub peer: &'static str,
    /// The scenarios a default run produces.
    pub scenarios: fn() -> Vec<String>,
    /// The full and the quick run, in words.
    pub full: &'static str,
    pub quick: &'static str,
}

const SIZES: [u16; 3] = [64, 512, 1518];

fn cross<A: std::fmt::Display, B: std::fmt::Display>(p: &str, a: &[A], b: &[B]) -> Vec<String> {
    a.iter()
        .flat_map(|x| b.iter().map(move |y| format!("{p}.{x}.{y}")))
        .collect()
}

/// The blk cases a default run measures (names as torii-blk-bench writes them).
pub const BLK_CASES: [&str; 6] = [
    "randread 4k qd1",
    "randread 4k qd32",
    "randwrite 4k qd1",
    "randwrite 4k qd32",
    "read 128k qd8",
    "write 128k qd8",
];

/// Micro-benchmark groups: (criterion group, crate, bench target, cases).
pub const MICRO: [(&str, &str, &str, &[&str]); 4] = [
    (
        "chain_walk",
        "torii-vhost-user-net",
        "chain_walk",
        &["1desc", "4desc"],
    ),
    (
        "header",
        "torii-vhost-user-net",
        "header",
        &["none", "csum", "tso4"],
    ),
    (
        "switch_lookup",
        "torii-dataplane",
        "switch_lookup",
        &["16", "1024"],
    ),
    (
        "uring_submit",
        "torii-vhost-user-blk",
        "uring_submit",
        &["8", "32"],
    ),
];

fn slug(s: &str) -> String {
    s.replace(' ', "-")
}

/// Every group, in the order `run` takes them.
pub const GROUPS: [Group; 8] = [
    Group {
        name: "net",
        what: "vhost-user-net: guest TX, guest RX and guest-to-guest loopback, 64/512/1518 B",
        peer: "dpdk-testpmd net_vhost, the same virtio-user frontend",
        scenarios: || cross("net", &["guest-tx", "guest-rx", "loopback"], &SIZES),
        full: "torii-bench: 3 interleaved pairs x 8 s per path and size",
        quick: "torii-bench: 1 pair x 2 s per path and size",
    },
    Group {
        name: "dpdk",
        what: "a vhost-user port cross-connected to a DPDK memif port, both directions",
        peer: "dpdk-testpmd net_vhost <-> net_memif",
        scenarios: || cross("dpdk", &["vhost-to-memif", "memif-to-vhost"], &SIZES),
        full: "torii-dpdk-bench: 3 interleaved rounds x 6 s",
        quick: "torii-dpdk-bench: 1 round x 2 s",
    },
    Group {
        name: "switch",
        what: "the L2 switch with 2, 8 and 32 ports, 64 B, one PMD",
        peer: "Torii's cross-connect in the same run (the switch's own cost)",
        scenarios: || ["2", "8", "32"].iter().map(|n| format!("switch.ports-{n}")).collect(),
        full: "torii-switch-bench: 3 interleaved pairs x 6 s",
        quick: "torii-switch-bench: 1 pair x 2 s",
    },
    Group {
        name: "blk",
        what: "vhost-user-blk on tmpfs: 4k randread/randwrite QD1/QD32, 128k sequential; p99 at QD1",
        peer: "qemu-storage-daemon (aio=io_uring), the same client and file; fio io_uring as the ceiling",
        scenarios: || {
            let mut v: Vec<String> = BLK_CASES.iter().map(|c| format!("blk.tmpfs.{}", slug(c))).collect();
            v.extend(BLK_CASES.iter().filter(|c| c.ends_with("qd1")).map(|c| format!("blk.tmpfs.{}.p99", slug(c))));
            v
        },
        full: "torii-blk-bench: 3 interleaved rounds x 4 s per case, 1 GiB file",
        quick: "torii-blk-bench: 1 round x 1 s per case, 128 MiB file",
    },
    Group {
        name: "cni",
        what: "torii-cni ADD and DEL latency (vhost-user and tap modes, host-local IPAM)",
        peer: "the host-local IPAM plugin alone, interleaved cycle by cycle (the floor of every ADD)",
        scenarios: || cross("cni", &["add", "del"], &["vhost-user", "tap"]),
        full: "torii-cni-bench: 300 cycles",
        quick: "torii-cni-bench: 10 cycles",
    },
    Group {
        name: "boot",
        what: "pod VM boot to agent-ready (TCG) and the agent's idle RSS",
        peer: "a bare kernel boot of the same VM, interleaved; RSS is compared as an absolute budget",
        scenarios: || vec!["boot.agent-ready".into(), "boot.agent-rss".into()],
        full: "torii-boot-bench: 10 rounds",
        quick: "torii-boot-bench: 1 round",
    },
    Group {
        name: "shim",
        what: "ctr run --rm through containerd-shim-torii-v2, and a container hot-plugged into a running sandbox",
        peer: "toriictl run of the same pod VM (boot, command, teardown), interleaved",
        scenarios: || vec!["shim.ctr-run".into(), "shim.hotplug".into()],
        full: "perf/run-shim-bench: 5 rounds",
        quick: "perf/run-shim-bench: 1 round",
    },
    Group {
        name: "micro",
        what: "criterion micro-benchmarks: descriptor chain walk, header translation, switch lookup, io_uring submit batching",
        peer: "a reference implementation of the same operation in the same criterion run",
        scenarios: || {
            MICRO
                .iter()
                .flat_map(|(g, _, _, cases)| cases.iter().map(move |c| format!("micro.{g}.{c}")))
                .collect()
        },
        full: "cargo bench (release): 1 s warm-up, 3 s measurement per function",
        quick: "cargo bench: 0.1 s warm-up, 0.3 s measurement, 10 samples",
    },
];

/// The group called `name`.
pub fn group(name: &str) -> anyhow::Result<&'static Group> {
    GROUPS.iter().find(|g| g.name == name).with_context(|| {
        format!(
            "no group {name:?} (groups: {})",
            GROUPS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
        )
    })
}

/// A command of a group's run: program, arguments, extra environment.
#[derive(Debug, Clone)]
pub struct Step {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Step {
    fn new(program: PathBuf, args: &[&str]) -> Step {
        Step {
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        }
    }

    fn arg(mut self, a: impl AsRef<Path>) -> Step {
        self.args.push(a.as_ref().display().to_string());
        self
    }

    /// The command line, for the results file and progress output.
    pub fn command_line(&self) -> Vec<String> {
        let mut v: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        v.push(self.program.display().to_string());
        v.extend(self.args.iter().cloned());
        v
    }
}

/// A packet-rate tool run against a torii-dataplane: `repeat` (`--pairs` or `--rounds`) of
/// `full` = (repetitions, seconds per run) with 2 warm-up seconds, or one 2 s run with 1 when
/// `quick`.
fn rate_tool(
    tool: PathBuf,
    quick: bool,
    repeat: &str,
    full: (u32, u32),
    args: &[&str],
    dataplane: &Path,
    out: &Path,
) -> Step {
    let (n, secs, warmup) = if quick {
        (1, 2, 1)
    } else {
        (full.0, full.1, 2)
    };
    let mut s = Step::new(tool, args);
    for (k, v) in [(repeat, n), ("--secs", secs), ("--warmup", warmup)] {
        s = s.arg(k).arg(v.to_string());
    }
    s.arg("--dataplane").arg(dataplane).arg("--out").arg(out)
}

/// The tool run of `group` writing its own results to `out` (micro writes its criterion data
/// under `out` as a folder).
pub fn step(group: &str, ctx: &Ctx, out: &Path) -> anyhow::Result<Vec<Step>> {
    let b = |name: &str| ctx.bin_dir.join(name);
    let q = ctx.quick;
    let dataplane = b("torii-dataplane");
    Ok(match group {
        "net" => vec![rate_tool(
            b("torii-bench"),
            q,
            "--pairs",
            (3, 8),
            &["--paths=guest-tx,guest-rx,loopback", "--sizes=64,512,1518"],
            &dataplane,
            out,
        )],
        "dpdk" => vec![rate_tool(
            b("torii-dpdk-bench"),
            q,
            "--rounds",
            (3, 6),
            &["--sizes=64,512,1518"],
            &dataplane,
            out,
        )],
        "switch" => vec![rate_tool(
            b("torii-switch-bench"),
            q,
            "--pairs",
            (3, 6),
            &["--ports=2,8,32"],
            &dataplane,
            out,
        )],
        "blk" => {
            let timing: &[&str] = if q {
                &["--rounds", "1", "--runtime", "1", "--file-mib", "128"]
            } else {
                &["--rounds", "3", "--runtime", "4", "--file-mib", "1024"]
            };
            vec![Step::new(b("torii-blk-bench"), timing)
                // The tool's default cases are BLK_CASES.
                .arg("--tmpfs-only")
                .arg("--torii")
                .arg(b("torii-vhost-user-blk"))
                .arg("--out")
                .arg(out)]
        }
        "cni" => vec![Step::new(
            b("torii-cni-bench"),
            &["--cycles", if q { "10" } else { "300" }],
        )
        .arg("--modes=vhost-user,tap,host-local")
        .arg("--cni")
        .arg(b("torii-cni"))
        .arg("--dataplane")
        .arg(&dataplane)
        .arg("--out")
        .arg(out)],
        "boot" => vec![Step::new(
            b("torii-boot-bench"),
            &["--rounds", if q { "1" } else { "10" }],
        )
        .arg("--image")
        .arg(&ctx.image)
        .arg("--out")
        .arg(out)],
        "shim" => {
            let mut s = Step::new(
                ctx.root.join("perf/run-shim-bench"),
                &[if q { "1" } else { "5" }],
            );
            s.env = vec![
                ("TORII_BIN_DIR".into(), ctx.bin_dir.display().to_string()),
                ("TORII_IMAGE".into(), ctx.image.display().to_string()),
                ("TORII_OUT".into(), out.display().to_string()),
            ];
            vec![s]
        }
        "micro" => {
            let timing: &[&str] = if q {
                &[
                    "--warm-up-time",
                    "0.1",
                    "--measurement-time",
                    "0.3",
                    "--sample-size",
                    "10",
                ]
            } else {
                &["--warm-up-time", "1", "--measurement-time", "3"]
            };
            let mut benches: Vec<(&str, &str)> = MICRO.iter().map(|m| (m.1, m.2)).collect();
            benches.dedup();
            benches
                .into_iter()
                .map(|(krate, bench)| {
                    let mut s = Step::new(
                        "cargo".into(),
                        &["bench", "--quiet", "--profile", &ctx.micro_profile],
                    );
                    s.args.extend(
                        [
                            "-p",
                            krate,
                            "--bench",
                            bench,
                            "--all-features",
                            "--",
                            "--noplot",
                        ]
                        .map(String::from),
                    );
                    s.args.extend(timing.iter().map(|t| t.to_string()));
                    s.env = vec![("CRITERION_HOME".into(), out.display().to_string())];
                    s
                })
                .collect()
        }
        g => bail!("no group {g:?}"),
    })
}

// --- converting the tools' own results ---------------------------------------------------

fn get<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a Value> {
    v.get(key)
        .with_context(|| format!("no {key:?} in {}", short(v)))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(120).collect()
}

fn arr<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a Vec<Value>> {
    get(v, key)?
        .as_array()
        .with_context(|| format!("{key:?} is not an array"))
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(num).collect())
        .unwrap_or_default()
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
        None => String::new(),
    }
}

/// Series keyed by (case, who), each indexed by round: the runs of a tool's `runs` array.
type Rounds = BTreeMap<(String, String), BTreeMap<u64, Option<f64>>>;

fn collect_rounds(
    runs: &[Value],
    case: impl Fn(&Value) -> String,
    who: &str,
    round: &str,
    value: &str,
) -> Rounds {
    let mut m = Rounds::new();
    for r in runs {
        let ok = r.get("ok").and_then(Value::as_bool).unwrap_or(true)
            && r.get("error").is_none_or(Value::is_null);
        let v = if ok { r.get(value).and_then(num) } else { None };
        let round = r.get(round).and_then(Value::as_u64).unwrap_or(0);
        m.entry((case(r), text(r, who)))
            .or_default()
            .insert(round, v);
    }
    m
}

/// The series of `who` in `case`, aligned on the rounds of `rounds_of`.
fn aligned(
    m: &Rounds,
    case: &str,
    who: &str,
    rounds_of: &BTreeMap<u64, Option<f64>>,
) -> Vec<Option<f64>> {
    let s = m.get(&(case.to_string(), who.to_string()));
    rounds_of
        .keys()
        .map(|r| s.and_then(|s| s.get(r).copied().flatten()))
        .collect()
}

/// Who is compared in a case: the tool's names for the subject and the peer, and the peer's
/// label in the results.
struct Parties<'a> {
    subject: &'a str,
    peer: &'a str,
    peer_label: &'a str,
}

fn pairs_scenario(m: &Rounds, case: &str, who: Parties, head: Head) -> Option<Scenario> {
    let rounds = m.get(&(case.to_string(), who.subject.to_string()))?;
    Scenario::paired(
        head,
        ("torii", &aligned(m, case, who.subject, rounds)),
        (who.peer_label, &aligned(m, case, who.peer, rounds)),
    )
}

/// The cases of `m` in display order: by name, then by the number after the last dot.
fn cases(m: &Rounds) -> Vec<String> {
    let mut v: Vec<String> = m.keys().map(|k| k.0.clone()).collect();
    v.dedup();
    v.sort_by_key(|c| {
        let (name, _) = c.rsplit_once('.').unwrap_or((c, ""));
        (name.to_string(), size_of(c))
    });
    v
}

fn size_of(case: &str) -> u64 {
    case.rsplit('.')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The scenarios of a packet-rate tool's `runs` (torii-bench, torii-dpdk-bench): one per
/// (path, size), Torii against `peer` (the tool's name for it, its label), rounds paired by
/// the `round` field; `extra` adds other parties of a case.
fn packet_rates(
    raw: &Value,
    group: &str,
    (path, who, round): (&str, &str, &str),
    (peer, peer_label): (&str, &str),
    extra: impl Fn(&Rounds, &str, &mut Scenario),
) -> anyhow::Result<Vec<Scenario>> {
    let case = |r: &Value| format!("{}.{}", text(r, path), text(r, "size"));
    let m = collect_rounds(arr(raw, "runs")?, case, who, round, "mpps");
    let mut out = Vec::new();
    for c in cases(&m) {
        let (p, size) = c.split_once('.').unwrap_or((&c, ""));
        let title = format!("{p}, {size} B frames");
        let who = Parties {
            subject: "torii",
            peer,
            peer_label,
        };
        let head = Head::new(format!("{group}.{c}"), group, title, "Mpps", Better::Higher);
        if let Some(mut s) = pairs_scenario(&m, &c, who, head) {
            extra(&m, &c, &mut s);
            out.push(s.with_param("path", p).with_param("size", size_of(&c)));
        }
    }
    Ok(out)
}

/// Turns the results file of `group`'s tool into scenarios.
pub fn convert(group: &str, raw: &Value) -> anyhow::Result<Vec<Scenario>> {
    let mut out = Vec::new();
    match group {
        "net" => {
            out = packet_rates(
                raw,
                group,
                ("path", "backend", "pair"),
                ("dpdk", "dpdk net_vhost"),
                |_, _, _| {},
            )?
        }
        "dpdk" => {
            let peer = ("testpmd", "testpmd net_vhost/net_memif");
            out = packet_rates(
                raw,
                group,
                ("direction", "forwarder", "round"),
                peer,
                |m, c, s| {
                    if let Some(rounds) = m.get(&(c.to_string(), "torii-baseline".into())) {
                        let v: Vec<f64> = rounds.values().flatten().copied().collect();
                        s.extra.extend(Side::new("torii baseline build", &v));
                    }
                },
            )?;
        }
        "switch" => {
            let runs = arr(raw, "runs")?;
            let label = |r: &Value| {
                let s = r.get("scenario").cloned().unwrap_or(Value::Null);
                match (text(&s, "kind").as_str(), s.get("ports")) {
                    ("switch", Some(p)) => format!("ports-{p}"),
                    (k, _) => k.to_string(),
                }
            };
            let mut m = Rounds::new();
            for r in runs {
                let round = r.get("pair").and_then(Value::as_u64).unwrap_or(0);
                m.entry((label(r), String::new()))
                    .or_default()
                    .insert(round, r.get("mpps").and_then(num));
            }
            let xc = m
                .get(&("xconnect".to_string(), String::new()))
                .cloned()
                .unwrap_or_default();
            for ((case, _), rounds) in &m {
                if case == "xconnect" {
                    continue;
                }
                let peer: Vec<Option<f64>> = rounds
                    .keys()
                    .map(|r| xc.get(r).copied().flatten())
                    .collect();
                let subject: Vec<Option<f64>> = rounds.values().copied().collect();
                let ports: u64 = case.trim_start_matches("ports-").parse().unwrap_or(0);
                if let Some(s) = Scenario::paired(
                    Head::new(
                        format!("switch.{case}"),
                        group,
                        format!("L2 switch, {ports} ports, 64 B"),
                        "Mpps",
                        Better::Higher,
                    ),
                    ("torii switch", &subject),
                    ("torii cross-connect", &peer),
                ) {
                    out.push(s.with_param("ports", ports));
                }
            }
        }
        "blk" => out = convert_blk(raw)?,
        "cni" => {
            let modes = get(raw, "modes")?;
            let floor = modes.get("host-local");
            for op in ["add", "del"] {
                for mode in ["vhost-user", "tap"] {
                    let Some(m) = modes.get(mode) else { continue };
                    let key = format!("{op}_series_ms");
                    let subject: Vec<Option<f64>> =
                        nums(get(m, &key)?).into_iter().map(Some).collect();
                    let peer: Vec<Option<f64>> = floor
                        .map(|f| nums(f.get(&key).unwrap_or(&Value::Null)))
                        .unwrap_or_default()
                        .into_iter()
                        .map(Some)
                        .collect();
                    let title = format!("CNI {} ({mode} mode)", op.to_uppercase());
                    if let Some(mut s) = Scenario::paired(
                        Head::new(
                            format!("cni.{op}.{mode}"),
                            group,
                            title,
                            "ms",
                            Better::Lower,
                        ),
                        ("torii-cni", &subject),
                        ("host-local", &peer),
                    ) {
                        s.cdf = vec![Curve {
                            name: format!("torii-cni {mode}"),
                            points: stats::cdf(&s.subject.summary.samples, 100),
                        }];
                        if let Some(p) = &s.peer {
                            s.cdf.push(Curve {
                                name: "host-local".into(),
                                points: stats::cdf(&p.summary.samples, 100),
                            });
                        }
                        out.push(s.with_param("op", op).with_param("mode", mode));
                    }
                }
            }
        }
        "boot" => {
            let series = |k: &str| -> anyhow::Result<Vec<Option<f64>>> {
                Ok(nums(get(get(raw, k)?, "samples")?)
                    .into_iter()
                    .map(Some)
                    .collect())
            };
            out.extend(Scenario::paired(
                Head::new(
                    "boot.agent-ready",
                    group,
                    "pod VM boot to agent-ready (TCG)",
                    "ms",
                    Better::Lower,
                ),
                ("torii pod VM", &series("agent_ready_ms")?),
                ("bare kernel boot", &series("bare_kernel_ms")?),
            ));
            out.extend(Scenario::paired(
                Head::new(
                    "boot.agent-rss",
                    group,
                    "torii-agent idle RSS",
                    "KiB",
                    Better::Lower,
                ),
                ("torii-agent", &series("agent_rss_kib")?),
                ("", &[]),
            ));
        }
        "shim" => {
            let samples = get(raw, "samples")?;
            let series = |k: &str| -> anyhow::Result<Vec<Option<f64>>> {
                Ok(nums(get(samples, k)?)
                    .into_iter()
                    .map(|x| Some(x * 1e3))
                    .collect())
            };
            let floor = series("toriictl")?;
            out.extend(Scenario::paired(
                Head::new(
                    "shim.ctr-run",
                    group,
                    "ctr run --rm through the shim",
                    "ms",
                    Better::Lower,
                ),
                ("containerd-shim-torii-v2", &series("shim")?),
                ("toriictl run", &floor),
            ));
            out.extend(Scenario::paired(
                Head::new(
                    "shim.hotplug",
                    group,
                    "second container hot-plugged into a sandbox",
                    "ms",
                    Better::Lower,
                ),
                ("shim hot-plug", &series("hotplug")?),
                ("toriictl run", &floor),
            ));
        }
        "micro" => {
            for b in arr(raw, "benches")? {
                let (g, c) = (text(b, "group"), text(b, "case"));
                let subject: Vec<Option<f64>> =
                    nums(get(b, "torii_ns")?).into_iter().map(Some).collect();
                let peer: Vec<Option<f64>> = nums(get(b, "reference_ns")?)
                    .into_iter()
                    .map(Some)
                    .collect();
                // Criterion's samples are not paired: the ratio series stays empty.
                if let Some(mut s) = Scenario::paired(
                    Head::new(
                        format!("micro.{g}.{c}"),
                        group,
                        format!("{g} ({c})"),
                        "ns",
                        Better::Lower,
                    ),
                    ("torii", &subject),
                    ("reference", &peer),
                ) {
                    s.ratio_series.clear();
                    out.push(s.with_param("bench", g).with_param("case", c));
                }
            }
        }
        g => bail!("no group {g:?}"),
    }
    Ok(out)
}

fn convert_blk(raw: &Value) -> anyhow::Result<Vec<Scenario>> {
    let samples = arr(raw, "samples")?;
    let case = |r: &Value| format!("{}|{}", text(r, "target"), text(r, "case"));
    let iops = collect_rounds(samples, case, "subject", "round", "iops");
    let p99 = collect_rounds(samples, case, "subject", "round", "p99_us");
    let cases: std::collections::BTreeSet<String> = iops.keys().map(|k| k.0.clone()).collect();
    let mut out = Vec::new();
    for c in cases {
        let (target, name) = c.split_once('|').unwrap_or(("", &c));
        let id = format!("blk.{target}.{}", slug(name));
        let params = |s: Scenario| {
            let qd: u64 = name
                .rsplit("qd")
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            s.with_param("target", target)
                .with_param("case", name)
                .with_param("qd", qd)
                .with_param("pattern", name.split(' ').next().unwrap_or(""))
        };
        let Some(mut s) = pairs_scenario(
            &iops,
            &c,
            Parties {
                subject: "torii",
                peer: "qsd",
                peer_label: "qemu-storage-daemon",
            },
            Head::new(
                id.clone(),
                "blk",
                format!("{name} ({target})"),
                "IOPS",
                Better::Higher,
            ),
        ) else {
            continue;
        };
        for (who, label) in [
            ("fio", "fio io_uring (ceiling)"),
            ("qsd-threads", "qemu-storage-daemon aio=threads"),
        ] {
            if let Some(r) = iops.get(&(c.clone(), who.into())) {
                let v: Vec<f64> = r.values().flatten().copied().collect();
                s.extra.extend(Side::new(label, &v));
            }
        }
        s.cdf = blk_cdfs(samples, target, name);
        out.push(params(s));
        if name.ends_with("qd1") {
            if let Some(mut l) = pairs_scenario(
                &p99,
                &c,
                Parties {
                    subject: "torii",
                    peer: "qsd",
                    peer_label: "qemu-storage-daemon",
                },
                Head::new(
                    format!("{id}.p99"),
                    "blk",
                    format!("{name} ({target}), p99 latency"),
                    "µs",
                    Better::Lower,
                ),
            ) {
                l.cdf = blk_cdfs(samples, target, name);
                out.push(params(l).with_param("latency", "p99"));
            }
        }
    }
    Ok(out)
}

/// The latency CDF of each subject in a blk case, from its round with the median IOPS.
fn blk_cdfs(samples: &[Value], target: &str, case: &str) -> Vec<Curve> {
    let mut by_who: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for s in samples {
        if text(s, "target") == target && text(s, "case") == case && s.get("lat_cdf_us").is_some() {
            by_who.entry(text(s, "subject")).or_default().push(s);
        }
    }
    let mut curves = Vec::new();
    for (who, mut v) in by_who {
        v.sort_by(|a, b| {
            f64::total_cmp(
                &a.get("iops").and_then(num).unwrap_or(0.0),
                &b.get("iops").and_then(num).unwrap_or(0.0),
            )
        });
        let mid = v[v.len() / 2];
        let points: Vec<(f64, f64)> = mid
            .get("lat_cdf_us")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((num(p.get(1)?)?, num(p.get(0)?)?)))
                    .collect()
            })
            .unwrap_or_default();
        if !points.is_empty() {
            curves.push(Curve { name: who, points });
        }
    }
    curves
}
