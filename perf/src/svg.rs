//! A small, dependency-free SVG chart renderer for benchmark reports.
//!
//! The output is a self-contained SVG document (no scripts, no external references, no
//! element ids, so several charts can be inlined into one HTML page) with `width`/`height`
//! and a `viewBox`, a white background (readable in dark-mode GitHub markdown too) and
//! colours from the Okabe-Ito palette, which stays distinguishable for colour-blind readers;
//! line series additionally get distinct marker shapes.
//!
//! * [`line_chart`] — lines or step functions (latency CDFs), linear or log10 x axis,
//!   numeric "nice" ticks or categorical ticks (git revisions in a history chart).
//! * [`bar_chart`] — grouped bars with optional min..max whiskers, value labels and a
//!   dashed reference line.
//!
//! Invalid input never produces `NaN` in the output: non-finite values are skipped (and
//! non-positive x values on a log axis), degenerate ranges are widened and a chart with
//! nothing to draw says "no data".

use std::fmt::Write as _;

/// One line of a [`LineChart`]: `(x, y)` points, drawn in order of increasing x.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart; see [`line_chart`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// log10 x axis (e.g. latency CDF in µs, or queue depth).
    pub x_log: bool,
    /// Draw as a step function (CDFs): each y holds until the next point's x.
    pub step: bool,
    /// Categorical x ticks `(position, label)` (e.g. git revisions in a history chart);
    /// `None` = numeric nice ticks.
    pub x_tick_labels: Option<Vec<(f64, String)>>,
    /// Always include y = 0 in the y axis.
    pub y_from_zero: bool,
    pub series: Vec<Series>,
}

/// One bar: `value`, with an optional whisker from `min` to `max` (noise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub value: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// A group of bars under one x label; one entry per [`BarChart::series_names`],
/// `None` = missing (drawn as a grey "n/a").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BarGroup {
    pub label: String,
    pub bars: Vec<Option<Bar>>,
}

/// A grouped bar chart; see [`bar_chart`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub series_names: Vec<String>,
    pub groups: Vec<BarGroup>,
    /// A dashed horizontal line, e.g. at ratio 1.0 labelled "peer" (the label goes in the
    /// legend).
    pub reference_line: Option<(f64, String)>,
}

const W: f64 = 720.0;
const H: f64 = 400.0;
const MARGIN: f64 = 12.0;
const TITLE_SIZE: f64 = 16.0;
const LABEL_SIZE: f64 = 12.0;
const TICK_SIZE: f64 = 11.0;
const LEGEND_SIZE: f64 = 12.0;
const VALUE_SIZE: f64 = 10.0;
const TEXT: &str = "#222222";
const AXIS: &str = "#555555";
const GRID: &str = "#e4e4e4";
const MINOR_GRID: &str = "#f1f1f1";
/// Longest category label (x ticks, bar groups) before it is cut with "…".
const MAX_CATEGORY_CHARS: usize = 22;

/// Okabe-Ito, ordered so that the first colours contrast best on white (yellow last).
const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442",
];
/// After the palette is used up, series repeat colours with these dash patterns.
const DASHES: [&str; 4] = ["", "6 3", "2 2", "8 3 2 3"];

fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

fn dash(i: usize) -> &'static str {
    DASHES[(i / PALETTE.len()) % DASHES.len()]
}

/// Escapes `s` for XML text and (double- or single-quoted) attribute values. Characters
/// XML 1.0 cannot carry (most C0 controls, U+FFFE, U+FFFF) are dropped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Numbers and ticks
// ---------------------------------------------------------------------------------------

/// A coordinate for the SVG: one decimal, never `NaN`/`inf`, no `-0`.
fn n(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    let mut r = (v.clamp(-1e6, 1e6) * 10.0).round() / 10.0;
    if r == 0.0 {
        r = 0.0; // turns -0 into 0
    }
    format!("{r}")
}

const SI: [(f64, &str); 5] = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];

/// `v` with 3 significant digits (SI suffix from 1000 on), e.g. `0.987`, `12.3`, `1.23k`.
fn fmt_sig(v: f64) -> String {
    if !v.is_finite() {
        return "?".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e18).contains(&a) {
        return format!("{v:.2e}");
    }
    let (unit, suffix) = SI
        .iter()
        .copied()
        .find(|&(u, _)| a >= u * 0.9995)
        .unwrap_or((1.0, ""));
    let x = v / unit;
    let mag = x.abs().log10().floor() as i32;
    let mut decimals = (2 - mag).max(0) as usize;
    let mut s = format!("{x:.decimals$}");
    // 9.996 rounds to "10.00": one digit too many.
    if decimals > 0
        && s.trim_start_matches('-').parse::<f64>().unwrap_or(0.0) >= 10f64.powi(mag + 1)
    {
        decimals -= 1;
        s = format!("{x:.decimals$}");
    }
    s + suffix
}

/// "Nice" ticks (multiples of 1, 2 or 5 × 10^k) covering `lo..=hi` with about `target`
/// intervals; the first and last tick enclose the range. Degenerate and non-finite ranges
/// are widened to something sensible, so at least two ticks are always returned.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() {
        (lo.min(hi), lo.max(hi))
    } else {
        (0.0, 1.0)
    };
    if hi - lo <= hi.abs().max(lo.abs()) * 1e-12 || !(hi - lo).is_finite() {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        if lo == 0.0 {
            hi = 1.0;
        } else {
            lo -= pad;
            hi += pad;
        }
        if !(hi - lo).is_finite() || hi - lo <= 0.0 {
            lo = 0.0;
            hi = 1.0;
        }
    }
    let step = nice_step((hi - lo) / target.max(1) as f64);
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    let count = ((last - first) as usize).clamp(1, 1000);
    (0..=count)
        .map(|i| {
            let t = (first + i as f64) * step;
            if t.abs() < step * 1e-9 {
                0.0
            } else {
                t
            }
        })
        .collect()
}

fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let m = if r < 1.5 {
        1.0
    } else if r < 3.0 {
        2.0
    } else if r < 7.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Labels for linear ticks: as many decimals as the step needs, SI suffix for large values.
fn linear_tick_labels(ticks: &[f64]) -> Vec<String> {
    let step = if ticks.len() >= 2 {
        (ticks[1] - ticks[0]).abs()
    } else {
        1.0
    };
    let max_abs = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let (unit, suffix) = if max_abs >= 1e4 {
        SI.iter()
            .copied()
            .find(|&(u, _)| max_abs >= u)
            .unwrap_or((1.0, ""))
    } else {
        (1.0, "")
    };
    if max_abs >= 1e18 || (max_abs > 0.0 && max_abs < 1e-4) {
        return ticks.iter().map(|t| format!("{t:.1e}")).collect();
    }
    let decimals = (-((step / unit).log10() + 1e-9).floor()).max(0.0) as usize;
    ticks
        .iter()
        .map(|&t| {
            if t == 0.0 {
                "0".into()
            } else {
                format!("{:.*}{suffix}", decimals, t / unit)
            }
        })
        .collect()
}

/// A log10 tick: value, whether it is labelled, and whether it is a decade (the other
/// ticks only get a faint grid line).
#[derive(Debug, Clone, Copy, PartialEq)]
struct LogTick {
    value: f64,
    labelled: bool,
    major: bool,
}

/// Ticks for a log10 axis over the data range `lo..=hi` (both > 0). Decades are labelled,
/// and 2 and 5 too when the data spans under two decades. The axis is the data range,
/// widened to a labelled tick just outside it when that is close, and to whole decades
/// when fewer than three labelled ticks would be inside. Returns the axis range and the
/// ticks inside it.
fn log_ticks(lo: f64, hi: f64) -> ((f64, f64), Vec<LogTick>) {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > 0.0 {
        (lo.min(hi).max(1e-300), lo.max(hi).min(1e300))
    } else {
        (1.0, 10.0)
    };
    let minor_labels = (hi / lo).log10() < 2.0;
    let d0 = (lo.log10() + 1e-9).floor() as i32;
    let d1 = ((hi.log10() - 1e-9).ceil() as i32).max(d0 + 1);
    let all = |d0: i32, d1: i32| -> Vec<LogTick> {
        let mut ticks = Vec::new();
        for d in d0..=d1 {
            let base = 10f64.powi(d);
            ticks.push(LogTick {
                value: base,
                labelled: true,
                major: true,
            });
            if d == d1 || d1 - d0 > 8 {
                continue;
            }
            for m in 2..=9 {
                let labelled = minor_labels && (m == 2 || m == 5);
                ticks.push(LogTick {
                    value: base * m as f64,
                    labelled,
                    major: false,
                });
            }
        }
        ticks
    };
    let ticks = all(d0, d1);
    let eps = 1e-9;
    let inside = |a: f64, b: f64| -> Vec<LogTick> {
        ticks
            .iter()
            .copied()
            .filter(|t| t.value >= a * (1.0 - eps) && t.value <= b * (1.0 + eps))
            .collect()
    };
    // Snap each end outwards to a labelled tick within 10% of the span (in log space).
    let snap = (hi / lo).log10().max(0.0) * 0.1;
    let labelled = || ticks.iter().filter(|t| t.labelled).map(|t| t.value);
    let a = labelled()
        .filter(|&v| v <= lo && (lo / v).log10() <= snap)
        .fold(lo, f64::min);
    let b = labelled()
        .filter(|&v| v >= hi && (v / hi).log10() <= snap)
        .fold(hi, f64::max);
    let ticks_in = inside(a, b);
    if ticks_in.iter().filter(|t| t.labelled).count() >= 3 {
        return ((a, b), ticks_in);
    }
    let (a, b) = (10f64.powi(d0), 10f64.powi(d1));
    ((a, b), inside(a, b))
}

fn log_tick_label(v: f64) -> String {
    if !(v.is_finite() && v > 0.0) {
        return "?".into();
    }
    if !(1e-4..1e18).contains(&v) {
        return format!("{v:.0e}");
    }
    if v >= 1e3 {
        let (unit, suffix) = SI
            .iter()
            .copied()
            .find(|&(u, _)| v >= u * 0.9995)
            .unwrap_or((1.0, ""));
        return format!("{}{suffix}", (v / unit).round());
    }
    if v >= 1.0 {
        return format!("{}", v.round());
    }
    let decimals = (-(v.log10() + 1e-9).floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// Maps data values to pixels along one axis.
#[derive(Debug, Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    p0: f64,
    p1: f64,
    log: bool,
}

impl Scale {
    fn map(&self, v: f64) -> f64 {
        let (v, lo, hi) = if self.log {
            (
                v.max(f64::MIN_POSITIVE).log10(),
                self.lo.log10(),
                self.hi.log10(),
            )
        } else {
            (v, self.lo, self.hi)
        };
        let span = hi - lo;
        let f = if span.is_finite() && span.abs() > 0.0 {
            (v - lo) / span
        } else {
            0.5
        };
        let p = self.p0 + f * (self.p1 - self.p0);
        if p.is_finite() {
            p
        } else {
            self.p0
        }
    }
}

// ---------------------------------------------------------------------------------------
// Text measuring
// ---------------------------------------------------------------------------------------

/// Estimated width of `s` in a sans-serif font of `size` px (a little generous, so
/// estimates err towards more space rather than overlap).
fn text_w(s: &str, size: f64) -> f64 {
    let em: f64 = s
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '\'' | '|' | '!' | 'I' | ' ' => 0.32,
            'f' | 't' | 'r' | '(' | ')' | '[' | ']' | '-' => 0.42,
            'm' | 'w' | 'M' | 'W' | '%' | '@' => 0.9,
            c if c.is_ascii_uppercase() => 0.72,
            c if c.is_ascii() => 0.6,
            _ => 0.8,
        })
        .sum();
    em * size
}

/// `s` cut with "…" so that it fits in `max_w` px.
fn fit(s: &str, max_w: f64, size: f64) -> String {
    if text_w(s, size) <= max_w {
        return s.to_string();
    }
    let mut out = String::new();
    let budget = max_w - text_w("…", size);
    for c in s.chars() {
        let mut next = out.clone();
        next.push(c);
        if text_w(&next, size) > budget {
            break;
        }
        out = next;
    }
    out.push('…');
    out
}

/// `s` shortened to `max_chars` by cutting out its middle: categories such as
/// `test-case-12` or `rev-abc1234` tend to differ at the end.
fn fit_chars(s: &str, max_chars: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= max_chars {
        return s.to_string();
    }
    let keep = max_chars.saturating_sub(1);
    let tail = keep / 2;
    let head = keep - tail;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

// ---------------------------------------------------------------------------------------
// SVG writer
// ---------------------------------------------------------------------------------------

struct Svg {
    s: String,
}

impl Svg {
    fn new() -> Self {
        let mut s = String::with_capacity(16 * 1024);
        let _ = write!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\" fill=\"{TEXT}\">\n\
             <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>\n",
            w = n(W),
            h = n(H),
        );
        Svg { s }
    }

    fn finish(mut self) -> String {
        self.s.push_str("</svg>\n");
        self.s
    }

    /// Text at (x, y); `anchor` is start/middle/end; `extra` are additional (trusted)
    /// attributes; the text itself is escaped.
    fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, extra: &str, text: &str) {
        let _ = writeln!(
            self.s,
            "<text x=\"{}\" y=\"{}\" font-size=\"{}\" text-anchor=\"{anchor}\"{extra}>{}</text>",
            n(x),
            n(y),
            n(size),
            escape(text)
        );
    }

    /// Text rotated by `angle` degrees around its anchor point.
    fn text_rot(&mut self, x: f64, y: f64, size: f64, anchor: &str, angle: f64, text: &str) {
        let extra = format!(" transform=\"rotate({} {} {})\"", n(angle), n(x), n(y));
        self.text(x, y, size, anchor, &extra, text);
    }

    #[allow(clippy::too_many_arguments)]
    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, width: f64, extra: &str) {
        let _ = writeln!(
            self.s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{stroke}\" stroke-width=\"{}\"{extra}/>",
            n(x1),
            n(y1),
            n(x2),
            n(y2),
            n(width)
        );
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, extra: &str) {
        let _ = writeln!(
            self.s,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{fill}\"{extra}/>",
            n(x),
            n(y),
            n(w.max(0.0)),
            n(h.max(0.0))
        );
    }

    fn marker(&mut self, shape: usize, x: f64, y: f64, fill: &str) {
        let d = match shape % 4 {
            0 => {
                let _ = writeln!(
                    self.s,
                    "<circle cx=\"{}\" cy=\"{}\" r=\"3.2\" fill=\"{fill}\"/>",
                    n(x),
                    n(y)
                );
                return;
            }
            1 => format!("M{} {}h6v6h-6z", n(x - 3.0), n(y - 3.0)),
            2 => format!("M{} {}l4 4l-4 4l-4 -4z", n(x), n(y - 4.0)),
            _ => format!("M{} {}l4 7h-8z", n(x), n(y - 4.5)),
        };
        let _ = writeln!(self.s, "<path d=\"{d}\" fill=\"{fill}\"/>");
    }

    fn title(&mut self, title: &str) {
        if !title.is_empty() {
            // Bold glyphs are about 15% wider than `text_w` assumes.
            let t = fit(title, (W - 2.0 * MARGIN) / 1.15, TITLE_SIZE);
            self.text(
                W / 2.0,
                24.0,
                TITLE_SIZE,
                "middle",
                " font-weight=\"bold\"",
                &t,
            );
        }
    }

    fn no_data(mut self, title: &str) -> String {
        self.title(title);
        let _ = writeln!(
            self.s,
            "<rect x=\"{}\" y=\"40\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"{GRID}\"/>",
            n(MARGIN),
            n(W - 2.0 * MARGIN),
            n(H - 40.0 - MARGIN)
        );
        self.text(
            W / 2.0,
            H / 2.0 + 10.0,
            14.0,
            "middle",
            " fill=\"#888888\"",
            "no data",
        );
        self.finish()
    }
}

// ---------------------------------------------------------------------------------------
// Legend
// ---------------------------------------------------------------------------------------

enum Swatch {
    /// Line (colour, dash) with an optional marker shape.
    Line(&'static str, &'static str, Option<usize>),
    /// Filled box.
    Box(&'static str),
    /// Dashed grey reference line.
    Reference,
}

struct LegendItem {
    label: String,
    swatch: Swatch,
}

const SWATCH_W: f64 = 22.0;
const LEGEND_ROW: f64 = 17.0;

/// Lays the legend out in centred rows between `left` and `right` starting at `top`, draws
/// it and returns the height used.
fn draw_legend(svg: &mut Svg, items: &[LegendItem], left: f64, right: f64, top: f64) -> f64 {
    if items.is_empty() {
        return 0.0;
    }
    let avail = (right - left).max(50.0);
    let gap = 18.0;
    // (label, width) per item, then rows of item indices
    let fitted: Vec<(String, f64)> = items
        .iter()
        .map(|it| {
            let label = fit(&it.label, avail - SWATCH_W - 6.0, LEGEND_SIZE);
            let w = SWATCH_W + 5.0 + text_w(&label, LEGEND_SIZE);
            (label, w)
        })
        .collect();
    let mut rows: Vec<Vec<usize>> = vec![Vec::new()];
    let mut row_w = 0.0;
    for (i, (_, w)) in fitted.iter().enumerate() {
        let cur = rows.last_mut().expect("one row");
        if !cur.is_empty() && row_w + gap + w > avail {
            rows.push(vec![i]);
            row_w = *w;
        } else {
            row_w += if cur.is_empty() { *w } else { gap + w };
            cur.push(i);
        }
    }
    for (r, row) in rows.iter().enumerate() {
        let total: f64 =
            row.iter().map(|&i| fitted[i].1).sum::<f64>() + gap * (row.len() - 1) as f64;
        let mut x = left + (avail - total).max(0.0) / 2.0;
        let cy = top + r as f64 * LEGEND_ROW + LEGEND_ROW / 2.0;
        for &i in row {
            match items[i].swatch {
                Swatch::Line(c, d, marker) => {
                    let extra = dash_attr(d);
                    svg.line(x, cy, x + SWATCH_W, cy, c, 2.0, &extra);
                    if let Some(m) = marker {
                        svg.marker(m, x + SWATCH_W / 2.0, cy, c);
                    }
                }
                Swatch::Box(c) => svg.rect(x + 5.0, cy - 6.0, 12.0, 12.0, c, ""),
                Swatch::Reference => svg.line(
                    x,
                    cy,
                    x + SWATCH_W,
                    cy,
                    AXIS,
                    1.5,
                    " stroke-dasharray=\"5 3\"",
                ),
            }
            svg.text(
                x + SWATCH_W + 5.0,
                cy + 4.0,
                LEGEND_SIZE,
                "start",
                "",
                &fitted[i].0,
            );
            x += fitted[i].1 + gap;
        }
    }
    rows.len() as f64 * LEGEND_ROW
}

fn dash_attr(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(" stroke-dasharray=\"{d}\"")
    }
}

// ---------------------------------------------------------------------------------------
// X tick labels
// ---------------------------------------------------------------------------------------

/// How a row of x labels is drawn so that they do not overlap.
struct XLabelPlan {
    rotate: bool,
    /// Draw every `every`-th label (counting back from the last one).
    every: usize,
    /// Vertical space the labels need below the axis.
    height: f64,
    labels: Vec<String>,
}

const ROT: f64 = 45.0;

/// `spacing` is the smallest distance in px between neighbouring label positions.
fn plan_x_labels(labels: &[String], spacing: f64, allow_rotate: bool) -> XLabelPlan {
    let labels: Vec<String> = labels
        .iter()
        .map(|l| {
            if allow_rotate {
                fit_chars(l, MAX_CATEGORY_CHARS)
            } else {
                l.clone()
            }
        })
        .collect();
    let max_w = labels
        .iter()
        .map(|l| text_w(l, TICK_SIZE))
        .fold(0.0, f64::max);
    let spacing = if spacing.is_finite() && spacing > 0.0 {
        spacing
    } else {
        W
    };
    let horizontal = |every: usize| XLabelPlan {
        rotate: false,
        every,
        height: TICK_SIZE + 6.0,
        labels: labels.clone(),
    };
    if max_w + 6.0 <= spacing || labels.len() <= 1 {
        return horizontal(1);
    }
    if !allow_rotate {
        return horizontal(((max_w + 6.0) / spacing).ceil().max(1.0) as usize);
    }
    // Rotated labels are parallel lines `spacing * sin(ROT)` apart; they need a line height.
    let sin = ROT.to_radians().sin();
    let every = ((TICK_SIZE * 1.3) / (spacing * sin)).ceil().max(1.0) as usize;
    XLabelPlan {
        rotate: true,
        every,
        height: max_w * sin + TICK_SIZE * sin + 8.0,
        labels,
    }
}

impl XLabelPlan {
    fn shown(&self, i: usize) -> bool {
        let last = self.labels.len().saturating_sub(1);
        (last - i.min(last)) % self.every == 0
    }

    /// How far the first shown label reaches left of its anchor.
    fn left_overhang(&self) -> f64 {
        match self.labels.first() {
            Some(l) if self.rotate => text_w(l, TICK_SIZE) * ROT.to_radians().cos() + 4.0,
            Some(l) => text_w(l, TICK_SIZE) / 2.0,
            None => 0.0,
        }
    }

    fn draw(&self, svg: &mut Svg, xs: &[f64], axis_y: f64) {
        for (i, (label, &x)) in self.labels.iter().zip(xs).enumerate() {
            if !self.shown(i) {
                continue;
            }
            if self.rotate {
                svg.text_rot(x + 3.0, axis_y + 12.0, TICK_SIZE, "end", -ROT, label);
            } else {
                svg.text(x, axis_y + TICK_SIZE + 5.0, TICK_SIZE, "middle", "", label);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared frame: y axis, axis labels
// ---------------------------------------------------------------------------------------

/// Left edge of the plot for y tick labels `labels` and an optional rotated y axis label.
fn plot_left_for(labels: &[String], y_label: &str) -> f64 {
    let tick_w = labels
        .iter()
        .map(|l| text_w(l, TICK_SIZE))
        .fold(0.0, f64::max);
    let axis_label = if y_label.is_empty() {
        0.0
    } else {
        LABEL_SIZE + 8.0
    };
    (MARGIN + axis_label + tick_w + 8.0).max(40.0)
}

fn draw_y_axis(svg: &mut Svg, ys: &Scale, ticks: &[f64], labels: &[String], left: f64, right: f64) {
    for (&t, label) in ticks.iter().zip(labels) {
        let y = ys.map(t);
        svg.line(left, y, right, y, GRID, 1.0, "");
        svg.text(left - 6.0, y + 4.0, TICK_SIZE, "end", "", label);
    }
}

fn draw_axis_labels(
    svg: &mut Svg,
    x_label: &str,
    y_label: &str,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
) {
    if !y_label.is_empty() {
        let t = fit(y_label, bottom - top + 20.0, LABEL_SIZE);
        svg.text_rot(
            MARGIN + LABEL_SIZE - 2.0,
            (top + bottom) / 2.0,
            LABEL_SIZE,
            "middle",
            -90.0,
            &t,
        );
    }
    if !x_label.is_empty() {
        let t = fit(x_label, right - left, LABEL_SIZE);
        svg.text(
            (left + right) / 2.0,
            H - MARGIN + 2.0,
            LABEL_SIZE,
            "middle",
            "",
            &t,
        );
    }
}

fn finite_range(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    vals.filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

// ---------------------------------------------------------------------------------------
// Line chart
// ---------------------------------------------------------------------------------------

/// An x tick of a line chart: value, label (`None` = unlabelled minor tick), and whether
/// it is major (a stronger grid line).
type XTick = (f64, Option<String>, bool);

/// Gap in px between the line chart's frame and the extremes of its data.
const INSET: f64 = 8.0;

/// Series with more valid points than this are drawn without markers.
const MAX_MARKERS: usize = 40;

/// Renders `c` as an SVG document.
///
/// Points of each series are sorted by x. Points with a non-finite coordinate (or x ≤ 0 on
/// a log axis) are skipped and break the line there.
pub fn line_chart(c: &LineChart) -> String {
    let mut svg = Svg::new();
    let x_ok = |x: f64| x.is_finite() && (!c.x_log || x > 0.0);
    // Per series: points sorted by x, None where a point is invalid (a break in the line).
    let series: Vec<Vec<Option<(f64, f64)>>> = c
        .series
        .iter()
        .map(|s| {
            let mut pts = s.points.clone();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            pts.into_iter()
                .map(|(x, y)| (x_ok(x) && y.is_finite()).then_some((x, y)))
                .collect()
        })
        .collect();
    let valid = || series.iter().flatten().flatten();
    let Some((mut ylo, mut yhi)) = finite_range(valid().map(|p| p.1)) else {
        return svg.no_data(&c.title);
    };
    svg.title(&c.title);
    if c.y_from_zero {
        ylo = ylo.min(0.0);
        yhi = yhi.max(0.0);
    }
    let yticks = nice_ticks(ylo, yhi, 5);
    let ylabels = linear_tick_labels(&yticks);

    // x domain and ticks.
    let cats: Option<Vec<(f64, String)>> = c
        .x_tick_labels
        .as_ref()
        .map(|v| v.iter().filter(|(x, _)| x_ok(*x)).cloned().collect());
    let data_x = finite_range(valid().map(|p| p.0)).expect("valid points exist");
    let (xlo, xhi, xticks): (f64, f64, Vec<XTick>) = if c.x_log {
        let (mut lo, mut hi) = data_x;
        if let Some(cats) = &cats {
            if let Some((a, b)) = finite_range(cats.iter().map(|c| c.0)) {
                lo = lo.min(a);
                hi = hi.max(b);
            }
        }
        let ((lo, hi), ticks) = log_ticks(lo, hi);
        let ticks = match &cats {
            Some(cats) => cats
                .iter()
                .map(|(x, l)| (*x, Some(l.clone()), true))
                .collect(),
            None => ticks
                .into_iter()
                .map(|t| {
                    (
                        t.value,
                        t.labelled.then(|| log_tick_label(t.value)),
                        t.major,
                    )
                })
                .collect(),
        };
        (lo, hi, ticks)
    } else if let Some(cats) = &cats {
        let (lo, hi) = finite_range(cats.iter().map(|c| c.0).chain([data_x.0, data_x.1]))
            .expect("data x is finite");
        let pad = if cats.len() > 1 && hi > lo {
            (hi - lo) / (cats.len() - 1) as f64 / 2.0
        } else {
            0.5
        };
        let pad = if pad.is_finite() && pad > 0.0 {
            pad
        } else {
            0.5
        };
        (
            lo - pad,
            hi + pad,
            cats.iter()
                .map(|(x, l)| (*x, Some(l.clone()), true))
                .collect(),
        )
    } else {
        let t = nice_ticks(data_x.0, data_x.1, 7);
        let labels = linear_tick_labels(&t);
        let (lo, hi) = (t[0], t[t.len() - 1]);
        (
            lo,
            hi,
            t.into_iter()
                .zip(labels)
                .map(|(v, l)| (v, Some(l), true))
                .collect(),
        )
    };

    // Horizontal layout.
    let mut left = plot_left_for(&ylabels, &c.y_label);
    let right = W - MARGIN - 8.0;
    let labelled: Vec<(f64, String)> = xticks
        .iter()
        .filter_map(|(v, l, _)| l.clone().map(|l| (*v, l)))
        .collect();
    let label_texts: Vec<String> = labelled.iter().map(|l| l.1.clone()).collect();
    let xs_probe = Scale {
        lo: xlo,
        hi: xhi,
        p0: left + INSET,
        p1: right - INSET,
        log: c.x_log,
    };
    let spacing = |xs: &Scale| {
        let mut px: Vec<f64> = labelled.iter().map(|(v, _)| xs.map(*v)).collect();
        px.sort_by(f64::total_cmp);
        px.windows(2)
            .map(|w| w[1] - w[0])
            .fold(f64::INFINITY, f64::min)
    };
    let plan = plan_x_labels(&label_texts, spacing(&xs_probe), cats.is_some());
    if let Some((v, _)) = labelled.first() {
        let overhang = plan.left_overhang() - (xs_probe.map(*v) - left);
        left = left.max(MARGIN + overhang);
    }
    let plan = plan_x_labels(
        &label_texts,
        spacing(&Scale {
            p0: left + INSET,
            ..xs_probe
        }),
        cats.is_some(),
    );

    // Vertical layout.
    let legend_items: Vec<LegendItem> = c
        .series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n_valid = series[i].iter().flatten().count();
            let marker = (n_valid == 1 || (!c.step && n_valid <= MAX_MARKERS)).then_some(i);
            LegendItem {
                label: s.name.clone(),
                swatch: Swatch::Line(color(i), dash(i), marker),
            }
        })
        .filter(|it| !it.label.is_empty())
        .collect();
    let legend_top = if c.title.is_empty() { MARGIN } else { 36.0 };
    let legend_h = draw_legend(&mut svg, &legend_items, left, right, legend_top);
    let top = legend_top + legend_h + 10.0;
    let x_label_h = if c.x_label.is_empty() {
        0.0
    } else {
        LABEL_SIZE + 8.0
    };
    let bottom = (H - MARGIN - x_label_h - plan.height).max(top + 60.0);

    // Data sits a few px inside the frame so that lines and markers at the extremes do
    // not merge with the axes.
    let xs = Scale {
        lo: xlo,
        hi: xhi,
        p0: left + INSET,
        p1: right - INSET,
        log: c.x_log,
    };
    let ys = Scale {
        lo: yticks[0],
        hi: yticks[yticks.len() - 1],
        p0: bottom - INSET,
        p1: top + INSET,
        log: false,
    };

    // Grid and axes.
    for (v, l, major) in &xticks {
        let x = xs.map(*v);
        if *major || l.is_some() {
            svg.line(x, top, x, bottom, GRID, 1.0, "");
        } else {
            svg.line(x, top, x, bottom, MINOR_GRID, 1.0, "");
        }
    }
    draw_y_axis(&mut svg, &ys, &yticks, &ylabels, left, right);
    svg.line(left, top, left, bottom, AXIS, 1.0, "");
    svg.line(left, bottom, right, bottom, AXIS, 1.0, "");
    for (v, _) in &labelled {
        let x = xs.map(*v);
        svg.line(x, bottom, x, bottom + 4.0, AXIS, 1.0, "");
    }
    let label_px: Vec<f64> = labelled.iter().map(|(v, _)| xs.map(*v)).collect();
    plan.draw(&mut svg, &label_px, bottom);
    draw_axis_labels(&mut svg, &c.x_label, &c.y_label, left, right, top, bottom);

    // Data.
    for (i, pts) in series.iter().enumerate() {
        let mut d = String::new();
        let mut pen_down = false;
        for p in pts {
            match p {
                None => pen_down = false,
                Some((x, y)) => {
                    let (px, py) = (xs.map(*x), ys.map(*y));
                    if !pen_down {
                        let _ = write!(d, "M{} {}", n(px), n(py));
                        pen_down = true;
                    } else if c.step {
                        let _ = write!(d, "H{}V{}", n(px), n(py));
                    } else {
                        let _ = write!(d, "L{} {}", n(px), n(py));
                    }
                }
            }
        }
        if !d.is_empty() {
            let _ = writeln!(
                svg.s,
                "<path d=\"{d}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-linejoin=\"round\"{}/>",
                color(i),
                dash_attr(dash(i))
            );
        }
        let n_valid = pts.iter().flatten().count();
        if n_valid == 1 || (!c.step && n_valid <= MAX_MARKERS) {
            for (x, y) in pts.iter().flatten() {
                svg.marker(i, xs.map(*x), ys.map(*y), color(i));
            }
        }
    }
    svg.finish()
}

// ---------------------------------------------------------------------------------------
// Bar chart
// ---------------------------------------------------------------------------------------

fn valid_bar(b: &Option<Bar>) -> Option<Bar> {
    b.filter(|b| b.value.is_finite()).map(|b| Bar {
        value: b.value,
        min: b.min.filter(|v| v.is_finite()),
        max: b.max.filter(|v| v.is_finite()),
    })
}

/// Renders `c` as an SVG document. Bars start at 0; each gets its value (3 significant
/// digits) above it, and a whisker when `min`/`max` are given. Missing bars (and bars with
/// a non-finite value) show a grey "n/a".
pub fn bar_chart(c: &BarChart) -> String {
    let mut svg = Svg::new();
    let n_series = c
        .groups
        .iter()
        .map(|g| g.bars.len())
        .max()
        .unwrap_or(0)
        .max(c.series_names.len());
    let bars = || {
        c.groups
            .iter()
            .flat_map(|g| g.bars.iter().filter_map(valid_bar))
    };
    if c.groups.is_empty() || bars().next().is_none() {
        return svg.no_data(&c.title);
    }
    svg.title(&c.title);
    let reference = c.reference_line.as_ref().filter(|r| r.0.is_finite());
    let extent = finite_range(
        bars()
            .flat_map(|b| [Some(b.value), b.min, b.max])
            .flatten()
            .chain(reference.map(|r| r.0))
            .chain([0.0]),
    )
    .expect("0 is finite");
    let (dlo, dhi) = extent;

    let right = W - MARGIN - 8.0;
    let legend_items: Vec<LegendItem> = (0..n_series)
        .map(|i| LegendItem {
            label: c.series_names.get(i).cloned().unwrap_or_default(),
            swatch: Swatch::Box(color(i)),
        })
        .chain(reference.map(|r| LegendItem {
            label: r.1.clone(),
            swatch: Swatch::Reference,
        }))
        .filter(|it| !it.label.is_empty())
        .collect();

    // Layout: the plot's width depends on the y tick labels, which depend on the headroom
    // the value labels need, which depends on the bar width. Two passes settle it.
    let group_labels: Vec<String> = c.groups.iter().map(|g| g.label.clone()).collect();
    let mut left = plot_left_for(&linear_tick_labels(&nice_ticks(dlo, dhi, 5)), &c.y_label);
    let mut yticks = Vec::new();
    let mut layout = None;
    for _ in 0..2 {
        let group_w = (right - left) / c.groups.len() as f64;
        let inner = group_w * if n_series == 1 { 0.6 } else { 0.8 };
        let bar_w = inner / n_series.max(1) as f64;
        let plan = plan_x_labels(&group_labels, group_w, true);
        let first_center = left + group_w / 2.0;
        left = left.max(MARGIN + plan.left_overhang() - (first_center - left));

        // Value labels: horizontal if they fit over the bar, else rotated, else left out.
        let labels: Vec<String> = bars().map(|b| fmt_sig(b.value)).collect();
        let widest = labels
            .iter()
            .map(|l| text_w(l, VALUE_SIZE))
            .fold(text_w("n/a", 9.0), f64::max);
        let slot = bar_w + if n_series == 1 { group_w - inner } else { 0.0 };
        let value_mode = if widest + 6.0 <= slot {
            ValueLabels::Horizontal
        } else if bar_w >= VALUE_SIZE * 0.9 {
            ValueLabels::Rotated
        } else {
            ValueLabels::None
        };
        let label_px = match value_mode {
            ValueLabels::Horizontal => VALUE_SIZE + 6.0,
            ValueLabels::Rotated => widest + 8.0,
            ValueLabels::None => 4.0,
        };

        let legend_top = if c.title.is_empty() { MARGIN } else { 36.0 };
        let legend_rows_h = legend_height(&legend_items, left, right);
        let top = legend_top + legend_rows_h + 10.0;
        let bottom = (H - MARGIN - plan.height).max(top + 60.0);
        let plot_h = bottom - top;
        let label_px = label_px.min(plot_h * 0.4);
        // Widen the value range so that labels fit in `label_px` beyond the extreme bars.
        let span = (dhi - dlo).max(f64::MIN_POSITIVE);
        let pad = span * label_px / (plot_h - 2.0 * label_px).max(1.0);
        let lo = if dlo < 0.0 { dlo - pad } else { dlo };
        let hi = if dhi > 0.0 || dlo >= 0.0 {
            dhi + pad
        } else {
            dhi
        };
        yticks = nice_ticks(lo, hi, 5);
        let new_left = plot_left_for(&linear_tick_labels(&yticks), &c.y_label).max(left);
        let settled = (new_left - left).abs() < 0.5;
        left = new_left;
        layout = Some((
            group_w, inner, bar_w, plan, value_mode, legend_top, top, bottom,
        ));
        if settled {
            break;
        }
    }
    let (group_w, inner, bar_w, plan, value_mode, legend_top, top, bottom) =
        layout.expect("laid out");
    let group_w = group_w.min((right - left) / c.groups.len() as f64);
    let bar_w = bar_w.min(inner / n_series.max(1) as f64);

    draw_legend(&mut svg, &legend_items, left, right, legend_top);
    let ylabels = linear_tick_labels(&yticks);
    let ys = Scale {
        lo: yticks[0],
        hi: yticks[yticks.len() - 1],
        p0: bottom,
        p1: top,
        log: false,
    };
    draw_y_axis(&mut svg, &ys, &yticks, &ylabels, left, right);
    let centers: Vec<f64> = (0..c.groups.len())
        .map(|g| left + group_w * (g as f64 + 0.5))
        .collect();
    plan.draw(&mut svg, &centers, bottom);
    draw_axis_labels(&mut svg, "", &c.y_label, left, right, top, bottom);

    let y0 = ys.map(0.0);
    let gap = if bar_w > 4.0 { 1.0 } else { 0.0 };
    // Value labels go on top of everything (their white halo keeps them readable on the
    // reference line).
    let mut labels = Svg { s: String::new() };
    for (g, group) in c.groups.iter().enumerate() {
        let start = centers[g] - inner / 2.0;
        for i in 0..n_series {
            let cx = start + bar_w * (i as f64 + 0.5);
            let Some(bar) = group.bars.get(i).and_then(valid_bar) else {
                value_label(
                    &mut labels,
                    value_mode,
                    cx,
                    y0 - 3.0,
                    false,
                    9.0,
                    " fill=\"#999999\"",
                    "n/a",
                );
                continue;
            };
            let yv = ys.map(bar.value);
            svg.rect(
                cx - bar_w / 2.0 + gap / 2.0,
                yv.min(y0),
                bar_w - gap,
                (yv - y0).abs(),
                color(i),
                "",
            );
            // The whisker spans value, min and max whichever way round they come.
            let ends = [Some(bar.value), bar.min, bar.max];
            let (wlo, whi) =
                finite_range(ends.into_iter().flatten()).unwrap_or((bar.value, bar.value));
            if whi > wlo {
                let cap = (bar_w * 0.4).clamp(2.0, 8.0);
                let (a, b) = (ys.map(wlo), ys.map(whi));
                svg.line(cx, a, cx, b, "#333333", 1.2, "");
                svg.line(cx - cap / 2.0, a, cx + cap / 2.0, a, "#333333", 1.2, "");
                svg.line(cx - cap / 2.0, b, cx + cap / 2.0, b, "#333333", 1.2, "");
            }
            let label = fmt_sig(bar.value);
            if bar.value >= 0.0 {
                value_label(
                    &mut labels,
                    value_mode,
                    cx,
                    ys.map(whi) - 4.0,
                    false,
                    VALUE_SIZE,
                    "",
                    &label,
                );
            } else {
                value_label(
                    &mut labels,
                    value_mode,
                    cx,
                    ys.map(wlo) + 4.0,
                    true,
                    VALUE_SIZE,
                    "",
                    &label,
                );
            }
        }
    }
    if let Some((v, _)) = reference {
        let y = ys.map(*v);
        svg.line(left, y, right, y, AXIS, 1.5, " stroke-dasharray=\"6 4\"");
    }
    svg.line(left, top, left, bottom, AXIS, 1.0, "");
    svg.line(left, y0, right, y0, AXIS, 1.0, "");
    svg.s.push_str(&labels.s);
    svg.finish()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ValueLabels {
    Horizontal,
    Rotated,
    None,
}

/// Draws a value label whose near edge is at `y` (above it, or below it if `below`).
#[allow(clippy::too_many_arguments)]
fn value_label(
    svg: &mut Svg,
    mode: ValueLabels,
    cx: f64,
    y: f64,
    below: bool,
    size: f64,
    extra: &str,
    text: &str,
) {
    let halo = format!("{extra} stroke=\"#ffffff\" stroke-width=\"3\" paint-order=\"stroke\"");
    match mode {
        ValueLabels::Horizontal => {
            let y = if below { y + size } else { y };
            svg.text(cx, y, size, "middle", &halo, text);
        }
        ValueLabels::Rotated => {
            let x = cx + size * 0.35;
            let anchor = if below { "end" } else { "start" };
            let extra = format!("{halo} transform=\"rotate(-90 {} {})\"", n(x), n(y));
            svg.text(x, y, size, anchor, &extra, text);
        }
        ValueLabels::None => {}
    }
}

fn legend_height(items: &[LegendItem], left: f64, right: f64) -> f64 {
    let mut scratch = Svg { s: String::new() };
    draw_legend(&mut scratch, items, left, right, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal well-formedness check: balanced tags, quoted attributes, valid entity
    /// references, exactly one root element.
    fn check_xml(s: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut roots = 0;
        let mut rest = s;
        let check_text = |t: &str| {
            let mut parts = t.split('&');
            parts.next();
            for p in parts {
                let ok = ["amp;", "lt;", "gt;", "quot;", "apos;"]
                    .iter()
                    .any(|e| p.starts_with(e))
                    || (p.starts_with('#') && p.contains(';'));
                assert!(ok, "bad entity in {t:?}");
            }
            assert!(!t.contains('<'), "raw < in {t:?}");
        };
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open]);
            if !stack.is_empty() || rest[..open].trim().is_empty() {
            } else {
                panic!("text outside the root: {:?}", &rest[..open]);
            }
            let close = rest[open..].find('>').expect("unterminated tag") + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
            let name = &body[..name_end];
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "bad tag {tag:?}"
            );
            // attributes: name="value" ...
            let mut attrs = body[name_end..].trim();
            while !attrs.is_empty() {
                let eq = attrs
                    .find('=')
                    .unwrap_or_else(|| panic!("attribute without value in {tag:?}"));
                let aname = attrs[..eq].trim();
                assert!(
                    aname
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'),
                    "{tag:?}"
                );
                let after = &attrs[eq + 1..];
                assert!(after.starts_with('"'), "unquoted attribute in {tag:?}");
                let end = after[1..].find('"').expect("unterminated attribute") + 1;
                check_text(&after[1..end]);
                attrs = after[end + 1..].trim_start();
            }
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name.to_string());
            }
        }
        assert!(rest.trim().is_empty(), "trailing text {rest:?}");
        assert!(stack.is_empty(), "unclosed {stack:?}");
        assert_eq!(roots, 1);
        assert!(!s.contains("NaN"), "NaN in output");
        assert!(!s.contains("inf"), "inf in output");
    }

    fn assert_ticks(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }

    fn series(name: &str, pts: &[(f64, f64)]) -> Series {
        Series {
            name: name.into(),
            points: pts.to_vec(),
        }
    }

    fn bar(v: f64) -> Option<Bar> {
        Some(Bar {
            value: v,
            min: None,
            max: None,
        })
    }

    #[test]
    fn escape_xml() {
        assert_eq!(escape("a<b&\"c\"'>"), "a&lt;b&amp;&quot;c&quot;&apos;&gt;");
        assert_eq!(escape("x\u{1}y\u{FFFF}µ"), "xyµ");
    }

    #[test]
    fn nice_linear_ticks() {
        assert_ticks(
            &nice_ticks(0.0, 97.0, 5),
            &[0.0, 20.0, 40.0, 60.0, 80.0, 100.0],
        );
        assert_ticks(&nice_ticks(0.0, 1.0, 5), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_ticks(&nice_ticks(3.2, 7.9, 5), &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert_ticks(
            &nice_ticks(-12.0, 33.0, 5),
            &[-20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0],
        );
        assert_ticks(
            &nice_ticks(0.0, 2.4e6, 5),
            &[0.0, 0.5e6, 1e6, 1.5e6, 2e6, 2.5e6],
        );
        // degenerate ranges
        assert_ticks(&nice_ticks(0.0, 0.0, 5), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let t = nice_ticks(5.0, 5.0, 5);
        assert!(t[0] < 5.0 && *t.last().unwrap() > 5.0, "{t:?}");
        let t = nice_ticks(f64::NAN, f64::INFINITY, 5);
        assert!(t.len() >= 2 && t.iter().all(|v| v.is_finite()));
        assert_eq!(linear_tick_labels(&nice_ticks(0.0, 1.0, 5))[1], "0.2");
        assert_eq!(linear_tick_labels(&nice_ticks(0.0, 2.4e6, 5))[1], "0.5M");
        assert_eq!(linear_tick_labels(&nice_ticks(0.0, 97.0, 5))[5], "100");
    }

    #[test]
    fn log_axis_ticks() {
        let (range, ticks) = log_ticks(3.0, 30000.0);
        assert_eq!(range, (3.0, 30000.0));
        let labelled: Vec<f64> = ticks
            .iter()
            .filter(|t| t.labelled)
            .map(|t| t.value)
            .collect();
        assert_ticks(&labelled, &[10.0, 100.0, 1e3, 1e4]);
        let names: Vec<String> = labelled.iter().map(|v| log_tick_label(*v)).collect();
        assert_eq!(names, ["10", "100", "1k", "10k"]);
        // unlabelled minor ticks inside the range: 3..9, 20..90, ...; 30000 is one
        assert!(ticks.iter().any(|t| t.value == 3.0 && !t.labelled));
        assert!(ticks.iter().all(|t| (3.0..=30000.0).contains(&t.value)));
        // an end close to a decade snaps to it
        let (range, _) = log_ticks(1.2, 9000.0);
        assert_eq!(range, (1.0, 10000.0));
        // under two decades: 2 and 5 labelled too
        let (_, ticks) = log_ticks(15.0, 700.0);
        let labelled: Vec<f64> = ticks
            .iter()
            .filter(|t| t.labelled)
            .map(|t| t.value)
            .collect();
        assert_ticks(&labelled, &[20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
        // a single value, or a narrow range, spans whole decades
        assert_eq!(log_ticks(100.0, 100.0).0, (100.0, 1000.0));
        let (range, ticks) = log_ticks(150.0, 400.0);
        assert_eq!(range, (100.0, 1000.0));
        let labelled: Vec<f64> = ticks
            .iter()
            .filter(|t| t.labelled)
            .map(|t| t.value)
            .collect();
        assert_ticks(&labelled, &[100.0, 200.0, 500.0, 1000.0]);
        assert_eq!(log_tick_label(0.05), "0.05");
    }

    #[test]
    fn significant_digits() {
        assert_eq!(fmt_sig(0.98765), "0.988");
        assert_eq!(fmt_sig(1.0), "1.00");
        assert_eq!(fmt_sig(12.345), "12.3");
        assert_eq!(fmt_sig(9.996), "10.0");
        assert_eq!(fmt_sig(1234.5), "1.23k");
        assert_eq!(fmt_sig(-14_200_000.0), "-14.2M");
        assert_eq!(fmt_sig(999.7), "1.00k");
    }

    #[test]
    fn line_chart_escapes_and_is_well_formed() {
        let c = LineChart {
            title: "t <&> \"q\"".into(),
            x_label: "x & y".into(),
            y_label: "<y>".into(),
            series: vec![series("a<b&\"c\"", &[(1.0, 2.0), (2.0, 3.0), (3.0, 1.0)])],
            ..Default::default()
        };
        let svg = line_chart(&c);
        check_xml(&svg);
        assert!(svg.contains("a&lt;b&amp;&quot;c&quot;"));
        assert!(!svg.contains("a<b"));
        assert!(svg.contains("t &lt;&amp;&gt; &quot;q&quot;"));
        assert!(svg.contains("width=\"720\"") && svg.contains("viewBox=\"0 0 720 400\""));
        assert!(svg.contains("font-family=\"sans-serif\""));
        assert!(!svg.contains("<script") && !svg.contains("href"));
    }

    #[test]
    fn line_chart_degenerate_inputs() {
        let bad = [
            vec![],
            vec![series("empty", &[])],
            vec![series("nan", &[(f64::NAN, 1.0), (1.0, f64::INFINITY)])],
        ];
        for s in bad {
            let svg = line_chart(&LineChart {
                title: "empty".into(),
                series: s,
                ..Default::default()
            });
            check_xml(&svg);
            assert!(svg.contains("no data"), "{svg}");
        }
        // only non-positive x on a log axis → no data
        let svg = line_chart(&LineChart {
            x_log: true,
            series: vec![series("neg", &[(-1.0, 1.0), (0.0, 2.0)])],
            ..Default::default()
        });
        check_xml(&svg);
        assert!(svg.contains("no data"));

        let cases = [
            // single point
            LineChart {
                series: vec![series("one", &[(5.0, 5.0)])],
                ..Default::default()
            },
            LineChart {
                x_log: true,
                step: true,
                series: vec![series("one", &[(5.0, 5.0)])],
                ..Default::default()
            },
            // all equal
            LineChart {
                series: vec![series("flat", &[(1.0, 3.0), (1.0, 3.0), (1.0, 3.0)])],
                ..Default::default()
            },
            LineChart {
                y_from_zero: true,
                series: vec![series("zero", &[(0.0, 0.0), (1.0, 0.0)])],
                ..Default::default()
            },
            // mixed garbage on a log axis
            LineChart {
                x_log: true,
                step: true,
                series: vec![series(
                    "cdf",
                    &[
                        (-3.0, 0.1),
                        (0.0, 0.2),
                        (f64::NAN, 0.3),
                        (10.0, 0.5),
                        (f64::INFINITY, 0.7),
                        (1e3, 1.0),
                    ],
                )],
                ..Default::default()
            },
            // huge and tiny values
            LineChart {
                series: vec![series("big", &[(0.0, 1e300), (1.0, -1e300)])],
                ..Default::default()
            },
            LineChart {
                series: vec![series("tiny", &[(0.0, 1e-300), (1e-300, 0.0)])],
                ..Default::default()
            },
            // categorical ticks, including one with a label only
            LineChart {
                x_tick_labels: Some(vec![(0.0, "v1".into())]),
                series: vec![series("h", &[(0.0, 1.0)])],
                ..Default::default()
            },
        ];
        for c in cases {
            let svg = line_chart(&c);
            check_xml(&svg);
            assert!(!svg.contains("no data"), "{c:?}");
            assert!(svg.contains("<path") || svg.contains("<circle"), "{c:?}");
        }
    }

    #[test]
    fn log_line_chart_has_decade_labels() {
        let pts: Vec<(f64, f64)> = (0..50)
            .map(|i| (3.0 * 1.2f64.powi(i), i as f64 / 49.0))
            .collect();
        let svg = line_chart(&LineChart {
            x_log: true,
            step: true,
            series: vec![series("p", &pts)],
            ..Default::default()
        });
        check_xml(&svg);
        for l in [">10<", ">100<", ">1k<", ">10k<"] {
            assert!(svg.contains(l), "missing tick label {l}");
        }
        assert!(svg.contains("H"), "step path");
    }

    #[test]
    fn bar_chart_missing_and_whiskers() {
        let c = BarChart {
            title: "bars".into(),
            y_label: "Mpps".into(),
            series_names: vec!["torii".into(), "a<b&\"c\"".into()],
            groups: vec![
                BarGroup {
                    label: "64B".into(),
                    bars: vec![
                        Some(Bar {
                            value: 10.0,
                            min: Some(9.0),
                            max: Some(11.5),
                        }),
                        None,
                    ],
                },
                BarGroup {
                    label: "1500B".into(),
                    bars: vec![bar(2.5), bar(f64::NAN)],
                },
                BarGroup {
                    label: "short".into(),
                    bars: vec![bar(1.0)],
                },
            ],
            reference_line: Some((1.0, "peer".into())),
        };
        let svg = bar_chart(&c);
        check_xml(&svg);
        assert!(svg.contains("a&lt;b&amp;&quot;c&quot;"));
        assert_eq!(svg.matches(">n/a<").count(), 3, "two missing, one NaN");
        assert!(svg.contains(">10.0<") && svg.contains(">2.50<"));
        assert!(svg.contains(">peer<") && svg.contains("stroke-dasharray"));
        // whisker: a vertical line plus two caps
        assert!(svg.matches("stroke=\"#333333\"").count() >= 3);
    }

    #[test]
    fn bar_chart_degenerate_inputs() {
        for c in [
            BarChart::default(),
            BarChart {
                groups: vec![BarGroup {
                    label: "g".into(),
                    bars: vec![None],
                }],
                ..Default::default()
            },
            BarChart {
                groups: vec![BarGroup {
                    label: "g".into(),
                    bars: vec![bar(f64::INFINITY)],
                }],
                ..Default::default()
            },
        ] {
            let svg = bar_chart(&c);
            check_xml(&svg);
            assert!(svg.contains("no data"));
        }
        for c in [
            BarChart {
                groups: vec![BarGroup {
                    label: "zero".into(),
                    bars: vec![bar(0.0)],
                }],
                ..Default::default()
            },
            BarChart {
                series_names: vec!["s".into()],
                groups: vec![
                    BarGroup {
                        label: "neg".into(),
                        bars: vec![Some(Bar {
                            value: -3.0,
                            min: Some(-4.0),
                            max: Some(f64::NAN),
                        })],
                    },
                    BarGroup {
                        label: "pos".into(),
                        bars: vec![bar(1e9)],
                    },
                ],
                reference_line: Some((f64::NAN, "bad".into())),
                ..Default::default()
            },
            BarChart {
                series_names: (0..12).map(|i| format!("s{i}")).collect(),
                groups: (0..40)
                    .map(|g| BarGroup {
                        label: format!("a very long group label {g}"),
                        bars: (0..12).map(|i| bar((g * i) as f64)).collect(),
                    })
                    .collect(),
                ..Default::default()
            },
        ] {
            let svg = bar_chart(&c);
            check_xml(&svg);
            assert!(!svg.contains("no data"));
            assert!(!svg.contains(">bad<"));
        }
    }

    /// Writes sample charts to the temp dir (`/tmp/svg-sample-*.svg`) for looking at.
    #[test]
    fn render_samples() {
        let dir = std::env::temp_dir();
        for (name, svg) in samples() {
            check_xml(&svg);
            std::fs::write(dir.join(format!("svg-sample-{name}.svg")), svg).expect("write sample");
        }
    }

    fn samples() -> Vec<(&'static str, String)> {
        let noisy = |v: f64, n: f64| {
            Some(Bar {
                value: v,
                min: Some(v * (1.0 - n)),
                max: Some(v * (1.0 + n)),
            })
        };
        let bars = bar_chart(&BarChart {
            title: "Forwarding rate relative to DPDK vhost (higher is better)".into(),
            y_label: "rate / peer".into(),
            series_names: vec![
                "torii 1 queue".into(),
                "torii 2 queues".into(),
                "torii 4 queues".into(),
            ],
            groups: vec![
                BarGroup {
                    label: "64B io".into(),
                    bars: vec![noisy(1.12, 0.03), noisy(1.31, 0.05), noisy(1.42, 0.08)],
                },
                BarGroup {
                    label: "64B mac".into(),
                    bars: vec![noisy(1.05, 0.02), noisy(1.18, 0.04), None],
                },
                BarGroup {
                    label: "512B io".into(),
                    bars: vec![noisy(0.97, 0.01), noisy(1.02, 0.03), noisy(1.04, 0.02)],
                },
                BarGroup {
                    label: "1500B io".into(),
                    bars: vec![noisy(0.93, 0.04), noisy(0.99, 0.02), noisy(1.0, 0.01)],
                },
                BarGroup {
                    label: "imix".into(),
                    bars: vec![noisy(1.08, 0.02), bar(1.21), noisy(1.25, 0.06)],
                },
            ],
            reference_line: Some((1.0, "peer (dpdk vhost)".into())),
        });
        // Log-normal-ish latency CDFs.
        let cdf = |median: f64, spread: f64, tail: f64| {
            let n = 400;
            let mut v: Vec<f64> = (1..n)
                .map(|i| {
                    let p = i as f64 / n as f64;
                    let z = (p / (1.0 - p)).ln() * spread;
                    median * z.exp() * if p > 0.99 { tail } else { 1.0 }
                })
                .collect();
            v.sort_by(f64::total_cmp);
            v.iter()
                .enumerate()
                .map(|(i, &x)| (x, (i + 1) as f64 / v.len() as f64))
                .collect::<Vec<_>>()
        };
        let cdfs = line_chart(&LineChart {
            title: "4k randread latency CDF, iodepth 32".into(),
            x_label: "latency (µs)".into(),
            y_label: "fraction of I/Os".into(),
            x_log: true,
            step: true,
            x_tick_labels: None,
            y_from_zero: true,
            series: vec![
                series("torii", &cdf(40.0, 0.35, 3.0)),
                series("qemu-storage-daemon", &cdf(65.0, 0.4, 4.0)),
                series("fio (host, ceiling)", &cdf(22.0, 0.25, 2.0)),
            ],
        });
        let revs: Vec<(f64, String)> = (0..24)
            .map(|i| {
                (
                    i as f64,
                    format!("{:07x}", 0x1a2b3c4u32.wrapping_mul(i + 7) & 0xfffffff),
                )
            })
            .collect();
        let history = line_chart(&LineChart {
            title: "64B io rate over history".into(),
            x_label: "revision".into(),
            y_label: "Mpps".into(),
            x_tick_labels: Some(revs),
            y_from_zero: true,
            series: vec![
                series(
                    "torii",
                    &(0..24)
                        .map(|i| (i as f64, 10.0 + (i as f64 * 0.7).sin()))
                        .collect::<Vec<_>>(),
                ),
                series(
                    "peer",
                    &(0..24)
                        .map(|i| (i as f64, 9.0 + (i as f64 * 0.3).cos() * 0.5))
                        .collect::<Vec<_>>(),
                ),
            ],
            ..Default::default()
        });
        let many = bar_chart(&BarChart {
            title: "many groups".into(),
            y_label: "Gbit/s".into(),
            series_names: vec!["torii".into(), "dpdk".into()],
            groups: (0..16)
                .map(|g| BarGroup {
                    label: format!("test-case-number-{g}"),
                    bars: vec![
                        bar(1000.0 + 137.0 * g as f64),
                        noisy(1200.0 - 41.0 * g as f64, 0.05),
                    ],
                })
                .collect(),
            reference_line: None,
        });
        let empty = line_chart(&LineChart {
            title: "empty".into(),
            ..Default::default()
        });
        let negative = bar_chart(&BarChart {
            title: "Change against the previous run, a title long enough that it has to be cut off at the edge"
                .into(),
            y_label: "change (%)".into(),
            series_names: vec!["rx".into(), "tx".into()],
            groups: vec![
                BarGroup { label: "64B".into(), bars: vec![noisy(-12.5, 0.2), bar(3.1)] },
                BarGroup { label: "1500B".into(), bars: vec![bar(8.25), noisy(-0.4, 0.5)] },
                BarGroup { label: "9000B".into(), bars: vec![bar(0.0), None] },
            ],
            reference_line: Some((0.0, "".into())),
        });
        let qd = line_chart(&LineChart {
            title: "IOPS by queue depth".into(),
            x_label: "iodepth".into(),
            y_label: "IOPS".into(),
            x_log: true,
            y_from_zero: true,
            series: (0..10)
                .map(|s| {
                    let pts: Vec<(f64, f64)> = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
                        .iter()
                        .map(|&q| (q, 20_000.0 * (s + 1) as f64 * (1.0 - (-q / 16.0f64).exp())))
                        .collect();
                    series(&format!("backend number {s}"), &pts)
                })
                .collect(),
            ..Default::default()
        });
        let linear = line_chart(&LineChart {
            title: "single points and a flat line".into(),
            x_label: "threads".into(),
            y_label: "".into(),
            series: vec![
                series("one point", &[(3.0, 0.5)]),
                series(
                    "flat",
                    &[
                        (1.0, 0.5),
                        (2.0, 0.5),
                        (4.0, 0.5),
                        (f64::NAN, 1.0),
                        (6.0, 0.5),
                        (7.0, 0.6),
                    ],
                ),
            ],
            ..Default::default()
        });
        vec![
            ("bars", bars),
            ("cdf", cdfs),
            ("history", history),
            ("many", many),
            ("empty", empty),
            ("negative", negative),
            ("qd", qd),
            ("linear", linear),
        ]
    }
}
