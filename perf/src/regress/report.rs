//! Charts of a results file (and of the history of earlier ones) as SVG files and an HTML page
//! in a folder.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::results::{Results, Scenario};
use crate::svg::{self, Bar, BarChart, BarGroup, LineChart, Series};

/// One chart written by [`write`].
#[derive(Debug, Clone)]
pub struct Chart {
    pub file: String,
    pub title: String,
    pub svg: String,
}

fn bar(s: &super::results::Side) -> Bar {
    Bar {
        value: s.summary.median,
        min: Some(s.summary.min),
        max: Some(s.summary.max),
    }
}

/// Subject, peer and extras of each scenario as bars, one group per scenario.
fn sides_chart(
    title: &str,
    y_label: &str,
    scenarios: &[&Scenario],
    label: impl Fn(&Scenario) -> String,
) -> Option<BarChart> {
    let first = scenarios.first()?;
    let mut series_names = vec![first.subject.name.clone()];
    series_names.extend(first.peer.iter().map(|p| p.name.clone()));
    for s in scenarios {
        for e in &s.extra {
            if !series_names.contains(&e.name) {
                series_names.push(e.name.clone());
            }
        }
    }
    let groups = scenarios
        .iter()
        .map(|s| {
            let mut bars = vec![Some(bar(&s.subject)), s.peer.as_ref().map(bar)];
            bars.resize(series_names.len(), None);
            for e in &s.extra {
                if let Some(i) = series_names.iter().position(|n| *n == e.name) {
                    bars[i] = Some(bar(e));
                }
            }
            BarGroup {
                label: label(s),
                bars,
            }
        })
        .collect();
    Some(BarChart {
        title: title.into(),
        y_label: y_label.into(),
        series_names,
        groups,
        reference_line: None,
    })
}

fn in_group<'a>(r: &'a Results, group: &str) -> Vec<&'a Scenario> {
    r.scenarios.iter().filter(|s| s.group == group).collect()
}

fn param(s: &Scenario, k: &str) -> String {
    match s.params.get(k) {
        Some(serde_json::Value::String(v)) => v.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

fn push_bars(out: &mut Vec<Chart>, file: &str, c: Option<BarChart>) {
    if let Some(c) = c.filter(|c| !c.groups.is_empty()) {
        out.push(Chart {
            file: file.into(),
            title: c.title.clone(),
            svg: svg::bar_chart(&c),
        });
    }
}

fn push_line(out: &mut Vec<Chart>, file: &str, c: LineChart) {
    if c.series.iter().any(|s| !s.points.is_empty()) {
        out.push(Chart {
            file: file.into(),
            title: c.title.clone(),
            svg: svg::line_chart(&c),
        });
    }
}

/// The charts of one results file, plus the ratio history over `history` (oldest first).
pub fn charts(r: &Results, history: &[Results]) -> Vec<Chart> {
    let mut out = Vec::new();
    let rev = r.label();
    // Throughput per packet size.
    for (group, what) in [
        ("net", "vhost-user-net vs DPDK net_vhost"),
        ("dpdk", "vhost-user ⇄ memif vs testpmd"),
    ] {
        let s = in_group(r, group);
        push_bars(
            &mut out,
            &format!("{group}-throughput.svg"),
            sides_chart(
                &format!("{what}: throughput per frame size ({rev})"),
                "Mpps (median, whiskers min–max)",
                &s,
                |s| format!("{} {} B", param(s, "path"), param(s, "size")),
            ),
        );
    }
    let s = in_group(r, "switch");
    push_bars(
        &mut out,
        "switch-throughput.svg",
        sides_chart(
            &format!("L2 switch vs cross-connect, 64 B ({rev})"),
            "Mpps",
            &s,
            |s| format!("{} ports", param(s, "ports")),
        ),
    );
    // IOPS per queue depth.
    let blk: Vec<&Scenario> = in_group(r, "blk")
        .into_iter()
        .filter(|s| !s.params.contains_key("latency"))
        .collect();
    let targets: std::collections::BTreeSet<String> =
        blk.iter().map(|s| param(s, "target")).collect();
    for (target, pattern) in targets
        .iter()
        .flat_map(|t| ["randread", "randwrite"].map(|p| (t, p)))
    {
        let of: Vec<&&Scenario> = blk
            .iter()
            .filter(|s| param(s, "pattern") == pattern && param(s, "target") == *target)
            .collect();
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in &of {
            let qd: f64 = param(s, "qd").parse().unwrap_or(0.0);
            for side in std::iter::once(&s.subject)
                .chain(s.peer.iter())
                .chain(s.extra.iter())
            {
                series
                    .entry(side.name.clone())
                    .or_default()
                    .push((qd, side.summary.median));
            }
        }
        push_line(
            &mut out,
            &format!("blk-iops-{target}-{pattern}.svg"),
            LineChart {
                title: format!(
                    "vhost-user-blk 4k {pattern} on {target}: IOPS per queue depth ({rev})"
                ),
                x_label: "queue depth".into(),
                y_label: "IOPS (median)".into(),
                x_log: true,
                step: false,
                x_tick_labels: None,
                y_from_zero: true,
                series: series
                    .into_iter()
                    .map(|(name, mut points)| {
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        Series { name, points }
                    })
                    .collect(),
            },
        );
    }
    let seq: Vec<&Scenario> = blk
        .iter()
        .copied()
        .filter(|s| param(s, "case").contains("128k"))
        .collect();
    push_bars(
        &mut out,
        "blk-seq.svg",
        sides_chart(
            &format!("vhost-user-blk 128k sequential ({rev})"),
            "IOPS",
            &seq,
            |s| param(s, "case"),
        ),
    );
    // Latency CDFs.
    for s in &r.scenarios {
        let want = (s.group == "blk" && s.params.contains_key("latency"))
            || (s.group == "cni" && param(s, "mode") == "vhost-user");
        if !want || s.cdf.is_empty() {
            continue;
        }
        push_line(
            &mut out,
            &format!("cdf-{}.svg", s.id.replace('.', "-")),
            LineChart {
                title: format!(
                    "{}: latency CDF ({rev})",
                    s.title.trim_end_matches(", p99 latency")
                ),
                x_label: format!("latency ({})", if s.group == "blk" { "µs" } else { "ms" }),
                y_label: "percentile".into(),
                x_log: true,
                step: true,
                x_tick_labels: None,
                y_from_zero: true,
                series: s
                    .cdf
                    .iter()
                    .map(|c| Series {
                        name: c.name.clone(),
                        points: c.points.clone(),
                    })
                    .collect(),
            },
        );
    }
    // Launch latencies against their floors.
    let launch: Vec<&Scenario> = r
        .scenarios
        .iter()
        .filter(|s| matches!(s.group.as_str(), "boot" | "shim") && s.peer.is_some())
        .collect();
    push_bars(
        &mut out,
        "launch.svg",
        sides_chart(
            &format!("pod launch against its floor ({rev})"),
            "ms",
            &launch,
            |s| s.id.clone(),
        ),
    );
    let cni = in_group(r, "cni");
    push_bars(
        &mut out,
        "cni.svg",
        sides_chart(
            &format!("CNI ADD/DEL against host-local alone ({rev})"),
            "ms",
            &cni,
            |s| format!("{} {}", param(s, "op"), param(s, "mode")),
        ),
    );
    // Micro-benchmarks as ratios (their units differ by orders of magnitude).
    let micro = in_group(r, "micro");
    if !micro.is_empty() {
        push_bars(
            &mut out,
            "micro.svg",
            Some(BarChart {
                title: format!("micro-benchmarks: Torii time / reference time ({rev})"),
                y_label: "ratio (lower is better)".into(),
                series_names: vec!["torii / reference".into()],
                groups: micro
                    .iter()
                    .map(|s| BarGroup {
                        label: s.id.trim_start_matches("micro.").to_string(),
                        bars: vec![s.ratio.map(|v| Bar {
                            value: v,
                            min: None,
                            max: None,
                        })],
                    })
                    .collect(),
                reference_line: Some((1.0, "reference".into())),
            }),
        );
    }
    // History of the ratios across revisions.
    let runs: Vec<&Results> = history.iter().chain(std::iter::once(r)).collect();
    if runs.len() > 1 {
        let ticks: Vec<(f64, String)> = runs
            .iter()
            .enumerate()
            .map(|(i, h)| (i as f64, h.label()))
            .collect();
        let groups: std::collections::BTreeSet<&str> =
            r.scenarios.iter().map(|s| s.group.as_str()).collect();
        for g in groups {
            let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for (i, h) in runs.iter().enumerate() {
                for s in h
                    .scenarios
                    .iter()
                    .filter(|s| s.group == g && s.peer.is_some())
                {
                    if let Some(v) = s.ratio {
                        series
                            .entry(s.id.trim_start_matches(&format!("{g}.")).to_string())
                            .or_default()
                            .push((i as f64, v));
                    }
                }
            }
            if series.values().all(|p| p.len() < 2) {
                continue;
            }
            push_line(
                &mut out,
                &format!("history-{g}.svg"),
                LineChart {
                    title: format!("{g}: ratio to the peer across revisions"),
                    x_label: "revision (oldest first)".into(),
                    y_label: "Torii / peer (median)".into(),
                    x_log: false,
                    step: false,
                    x_tick_labels: Some(ticks.clone()),
                    y_from_zero: true,
                    series: series
                        .into_iter()
                        .map(|(name, points)| Series { name, points })
                        .collect(),
                },
            );
        }
    }
    out
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// The HTML page: the run's description, every scenario in a table, the charts.
pub fn html(r: &Results, charts: &[Chart]) -> String {
    let e = svg::escape;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Torii perf {rev}</title>\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}td:first-child{{text-align:left}}</style>\
         </head><body>\n<h1>Torii perf run {rev}</h1>\n<p>{date}, {quick}machine: {cpus} CPUs ({cpu}), {mem} MiB, kernel {kernel}; {versions}</p>\n<p><code>{cmd}</code></p>\n",
        rev = e(&r.label()),
        date = e(&r.date),
        quick = if r.quick { "<b>quick smoke run (numbers not meaningful)</b>, " } else { "" },
        cpus = r.machine.cpus,
        cpu = e(&r.machine.cpu_model),
        mem = r.machine.memory_mib,
        kernel = e(&r.machine.kernel),
        versions = e(&r.machine.versions.values().cloned().collect::<Vec<_>>().join("; ")),
        cmd = e(&r.command_line.join(" ")),
    );
    for g in r.groups.iter().filter(|g| !g.ok) {
        let _ = writeln!(
            h,
            "<p><b>group {} failed:</b> {}</p>",
            e(&g.name),
            e(g.error.as_deref().unwrap_or(""))
        );
    }
    h.push_str("<table><tr><th>scenario</th><th>unit</th><th>Torii median</th><th>min</th><th>max</th><th>n</th><th>peer</th><th>peer median</th><th>ratio</th><th>better</th></tr>\n");
    for s in &r.scenarios {
        let m = &s.subject.summary;
        let (pn, pm) = s
            .peer
            .as_ref()
            .map_or((String::from("(absolute)"), String::new()), |p| {
                (p.name.clone(), fmt_num(p.summary.median))
            });
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:?}</td></tr>",
            e(&s.id), e(&s.unit), fmt_num(m.median), fmt_num(m.min), fmt_num(m.max), m.samples.len(),
            e(&pn), pm, s.ratio.map_or(String::new(), |v| format!("{v:.3}")), s.better
        );
    }
    h.push_str("</table>\n");
    for c in charts {
        let _ = writeln!(
            h,
            "<h2>{}</h2>\n<img src=\"{}\" alt=\"{}\">",
            e(&c.title),
            e(&c.file),
            e(&c.title)
        );
    }
    h.push_str("</body></html>\n");
    h
}

/// Writes the charts and index.html of `r` into `dir`; returns the chart files.
pub fn write(dir: &Path, r: &Results, history: &[Results]) -> anyhow::Result<Vec<Chart>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let charts = charts(r, history);
    for c in &charts {
        std::fs::write(dir.join(&c.file), &c.svg).with_context(|| format!("writing {}", c.file))?;
    }
    std::fs::write(dir.join("index.html"), html(r, &charts)).context("writing index.html")?;
    Ok(charts)
}
