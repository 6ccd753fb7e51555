//! A trace of named spans, written as Chrome trace-event JSON (open it in Perfetto).
//!
//! `let _s = trace.span("forward");` records from now until `_s` is dropped. A disabled trace
//! (the default) records nothing and costs one branch per span.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceEvent {
    pub name: Cow<'static, str>,
    /// Process lane in the viewer: one per rank/device.
    pub pid: u32,
    /// Thread lane: the compute stream, a communication thread, ...
    pub tid: u32,
    pub start_us: f64,
    pub dur_us: f64,
}

struct Inner {
    origin: Instant,
    /// The wall clock at `origin`, in microseconds since the Unix epoch: what lines up the
    /// traces of separate processes (exactly on one machine; across machines, as well as their
    /// clocks agree).
    origin_unix_us: f64,
    events: Mutex<Vec<TraceEvent>>,
}

#[derive(Clone, Default)]
pub struct Trace {
    inner: Option<Arc<Inner>>,
    pid: u32,
    tid: u32,
}

/// Records a span when dropped.
pub struct Span<'a> {
    trace: &'a Trace,
    name: Cow<'static, str>,
    start: Option<Instant>,
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let (Some(inner), Some(start)) = (&self.trace.inner, self.start) {
            let event = TraceEvent {
                name: std::mem::take(&mut self.name),
                pid: self.trace.pid,
                tid: self.trace.tid,
                start_us: start.duration_since(inner.origin).as_secs_f64() * 1e6,
                dur_us: start.elapsed().as_secs_f64() * 1e6,
            };
            inner.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
        }
    }
}

impl Trace {
    /// A trace that records nothing.
    pub fn disabled() -> Trace {
        Trace::default()
    }

    pub fn enabled() -> Trace {
        Trace {
            inner: Some(Arc::new(Inner {
                origin: Instant::now(),
                origin_unix_us: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e6),
                events: Mutex::new(Vec::new()),
            })),
            pid: 0,
            tid: 0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The same trace (same clock, same event list), recording into another lane.
    pub fn lane(&self, pid: u32, tid: u32) -> Trace {
        Trace { inner: self.inner.clone(), pid, tid }
    }

    pub fn span(&self, name: impl Into<Cow<'static, str>>) -> Span<'_> {
        match self.inner {
            Some(_) => Span { trace: self, name: name.into(), start: Some(Instant::now()) },
            None => Span { trace: self, name: Cow::Borrowed(""), start: None },
        }
    }

    /// Microseconds since the trace began (`None` when disabled): for spans timed by another
    /// clock, such as a GPU's events, to be placed on this one.
    pub fn now_us(&self) -> Option<f64> {
        self.inner.as_ref().map(|inner| inner.origin.elapsed().as_secs_f64() * 1e6)
    }

    /// When the trace began, in microseconds since the Unix epoch (`None` when disabled).
    pub fn origin_unix_us(&self) -> Option<f64> {
        self.inner.as_ref().map(|inner| inner.origin_unix_us)
    }

    /// Adds another process's events (their own lanes), recorded on a trace that began at
    /// `origin_unix_us` ([`Trace::origin_unix_us`]), placed on this trace's clock: how rank 0
    /// merges every rank's trace into one file.
    pub fn merge(&self, events: Vec<TraceEvent>, origin_unix_us: f64) {
        if let Some(inner) = &self.inner {
            let shift = origin_unix_us - inner.origin_unix_us;
            let mut mine = inner.events.lock().unwrap_or_else(|e| e.into_inner());
            mine.extend(events.into_iter().map(|e| TraceEvent { start_us: e.start_us + shift, ..e }));
        }
    }

    /// Adds a span measured elsewhere, in this lane.
    pub fn record(&self, name: impl Into<Cow<'static, str>>, start_us: f64, dur_us: f64) {
        if let Some(inner) = &self.inner {
            let event = TraceEvent { name: name.into(), pid: self.pid, tid: self.tid, start_us, dur_us };
            inner.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
        }
    }

    pub fn events(&self) -> Vec<TraceEvent> {
        match &self.inner {
            Some(inner) => inner.events.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            None => Vec::new(),
        }
    }

    /// Chrome trace-event format: complete events (`"ph": "X"`) with microsecond times.
    pub fn to_chrome_json(&self) -> String {
        let events: Vec<serde_json::Value> = self
            .events()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name, "ph": "X", "pid": e.pid, "tid": e.tid,
                    "ts": e.start_us, "dur": e.dur_us,
                })
            })
            .collect();
        serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" }).to_string()
    }

    pub fn write_chrome_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_chrome_json())
    }

    /// The time span of the last event called `name` in lane (pid, tid), if any.
    pub fn last_span(&self, name: &str, pid: u32, tid: u32) -> Option<(f64, f64)> {
        self.events()
            .iter()
            .filter(|e| e.name == name && e.pid == pid && e.tid == tid)
            .max_by(|a, b| a.start_us.total_cmp(&b.start_us))
            .map(|e| (e.start_us, e.start_us + e.dur_us))
    }

    /// The window from the earliest start to the latest end of the last span called `name` in
    /// each lane that has one: the last step of every rank, say, which do not begin at the same
    /// instant.
    pub fn last_spans(&self, name: &str) -> Option<(f64, f64)> {
        let events = self.events();
        let mut lanes: Vec<(u32, u32)> = events.iter().filter(|e| e.name == name).map(|e| (e.pid, e.tid)).collect();
        lanes.sort();
        lanes.dedup();
        lanes
            .iter()
            .filter_map(|&(pid, tid)| self.last_span(name, pid, tid))
            .reduce(|(a0, a1), (b0, b1)| (a0.min(b0), a1.max(b1)))
    }

    // ANCHOR: to_svg
    /// A timeline of the events that lie within [from_us, to_us] as an SVG: one row per lane, one
    /// box per span (a span nested in a longer one of its lane is drawn thinner, on top), a time
    /// axis with round ticks, and a legend of the colours. An event that crosses an edge of the
    /// window (the tail of the step before, the evaluation after) is left out rather than cut.
    /// A box is labelled only where its label fits inside it, with its duration where that fits
    /// too; its hover title always has both.
    pub fn to_svg(&self, from_us: f64, to_us: f64, lane_names: impl Fn(u32, u32) -> String) -> String {
        // A microsecond of slack: the window is often one of these events' own span.
        let inside = |e: &TraceEvent| e.start_us >= from_us - 1.0 && e.start_us + e.dur_us <= to_us + 1.0;
        let mut events: Vec<TraceEvent> = self.events().into_iter().filter(inside).collect();
        // Longer spans first, so that a span's children are drawn on top of it.
        events.sort_by(|a, b| b.dur_us.total_cmp(&a.dur_us));
        let mut lanes: Vec<(u32, u32)> = events.iter().map(|e| (e.pid, e.tid)).collect();
        lanes.sort();
        lanes.dedup();

        let plot_w = SVG_WIDTH - SVG_LANE_LABEL_W - SVG_MARGIN;
        let x = |us: f64| SVG_LANE_LABEL_W + (us - from_us) / (to_us - from_us).max(1e-9) * plot_w;
        let axis_y = SVG_MARGIN + lanes.len() as f64 * SVG_ROW_H + 4.0;
        // The header, with the height, is written last: the legend may take more than one line.
        let mut svg = String::new();
        let contains = |o: &TraceEvent, e: &TraceEvent| {
            (o.pid, o.tid) == (e.pid, e.tid)
                && o.dur_us > e.dur_us
                && o.start_us <= e.start_us
                && o.start_us + o.dur_us >= e.start_us + e.dur_us
        };
        let mut kinds_seen = vec![false; SPAN_KINDS.len()];
        for (row, &(pid, tid)) in lanes.iter().enumerate() {
            let y = SVG_MARGIN + row as f64 * SVG_ROW_H;
            svg += &format!(
                "<text x=\"4\" y=\"{:.1}\">{}</text>\n",
                y + SVG_ROW_H / 2.0 + 4.0,
                xml_escape(&lane_names(pid, tid))
            );
            for e in events.iter().filter(|e| (e.pid, e.tid) == (pid, tid)) {
                let (x0, x1) = (x(e.start_us), x(e.start_us + e.dur_us));
                let depth = events.iter().filter(|o| contains(o, e)).count() as f64;
                let is_parent = events.iter().any(|c| contains(e, c));
                let (top, h) = (y + 2.0 + 5.0 * depth, (SVG_ROW_H - 4.0 - 10.0 * depth).max(4.0));
                let kind = span_kind(&e.name);
                kinds_seen[kind] = true;
                let ms = e.dur_us / 1000.0;
                let width = (x1 - x0).max(0.5);
                svg += &format!(
                    "<g><rect x=\"{x0:.1}\" y=\"{top:.1}\" width=\"{width:.1}\" height=\"{h:.1}\" fill=\"{}\" stroke=\"#555\" stroke-width=\"0.5\"/><title>{} ({ms:.2} ms)</title>",
                    SPAN_KINDS[kind].1,
                    xml_escape(&e.name),
                );
                // A parent is covered by its children: its name is in the legend, not on it.
                if let Some(label) = (!is_parent).then(|| fit_label(&e.name, ms, width)).flatten() {
                    svg += &format!(
                        "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                        x0 + SVG_LABEL_PAD,
                        top + h / 2.0 + 4.0,
                        xml_escape(&label)
                    );
                }
                svg += "</g>\n";
            }
        }

        // The time axis: a tick at every multiple of a round interval, one label for the axis.
        let span_ms = (to_us - from_us) / 1000.0;
        let tick = round_interval(span_ms / 10.0);
        let decimals = (-tick.log10().floor()).max(0.0) as usize;
        svg += &format!(
            "<line x1=\"{:.1}\" y1=\"{axis_y:.1}\" x2=\"{:.1}\" y2=\"{axis_y:.1}\" stroke=\"#555\"/>\n",
            x(from_us),
            x(to_us)
        );
        let mut k = 0.0;
        while k * tick <= span_ms * (1.0 + 1e-9) {
            let tx = x(from_us + k * tick * 1000.0);
            svg += &format!(
                "<line x1=\"{tx:.1}\" y1=\"{axis_y:.1}\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"#555\"/><text class=\"tick\" x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.decimals$}</text>\n",
                axis_y + 4.0,
                axis_y + 16.0,
                k * tick
            );
            k += 1.0;
        }
        svg += &format!(
            "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time from the start of the window (ms)</text>\n",
            SVG_LANE_LABEL_W + plot_w / 2.0,
            axis_y + 32.0
        );

        // The legend: the colours that appear, in a fixed order, in lines that fit the width.
        let (mut lx, mut legend_y) = (SVG_LANE_LABEL_W, axis_y + 48.0);
        svg += "<g class=\"legend\">";
        for &(_, colour, meaning) in SPAN_KINDS.iter().zip(&kinds_seen).filter(|(_, seen)| **seen).map(|(k, _)| k) {
            let entry_w = 16.0 + label_width(meaning) + 16.0;
            if lx + entry_w > SVG_WIDTH && lx > SVG_LANE_LABEL_W {
                (lx, legend_y) = (SVG_LANE_LABEL_W, legend_y + 18.0);
            }
            svg += &format!(
                "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{colour}\" stroke=\"#555\" stroke-width=\"0.5\"/><text x=\"{:.1}\" y=\"{legend_y:.1}\">{meaning}</text>",
                legend_y - 10.0,
                lx + 16.0
            );
            lx += entry_w;
        }
        svg += "</g>\n</svg>\n";
        let header = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{SVG_WIDTH}\" height=\"{:.0}\" font-family=\"sans-serif\" font-size=\"{SVG_FONT}\">\n",
            legend_y + 16.0
        );
        header + &svg
    }
    // ANCHOR_END: to_svg
}

// The book's text column is 750 px wide: at this width the figure is drawn at its own size.
const SVG_WIDTH: f64 = 750.0;
const SVG_LANE_LABEL_W: f64 = 150.0;
const SVG_MARGIN: f64 = 10.0;
const SVG_ROW_H: f64 = 34.0;
const SVG_FONT: f64 = 11.0;
const SVG_LABEL_PAD: f64 = 3.0;

/// What a span's first word says it is: (first word, colour, legend). The last is the rest.
const SPAN_KINDS: [(&str, &str, &str); 9] = [
    ("step", "#e8e8e8", "step"),
    ("forward", "#8ecae6", "forward"),
    ("backward", "#219ebc", "backward"),
    // A pipeline's deferred weight gradients (chapter 4's zb-h1): the backward's second half.
    ("weight", "#e76f51", "weight gradients"),
    ("optimizer", "#ffb703", "optimizer (AdamW)"),
    ("all-reduce", "#fb8500", "all-reduce"),
    ("eval", "#b5e48c", "evaluation"),
    ("save", "#cdb4db", "checkpoint"),
    ("", "#bbbbbb", "other"),
];

fn span_kind(name: &str) -> usize {
    let first = name.split(' ').next().unwrap_or("");
    SPAN_KINDS.iter().position(|k| k.0 == first).unwrap_or(SPAN_KINDS.len() - 1)
}

/// An upper estimate of the width of `text` in the SVG's font: no sans-serif glyph of its size
/// but the widest capitals (M, W) is wider than 0.62 em, and labels are mostly lower case.
fn label_width(text: &str) -> f64 {
    text.chars().count() as f64 * 0.62 * SVG_FONT
}

/// The longest of "name (d ms)", "name", the name without its first word ("bucket 3"), and its
/// last word ("3") that fits in a box `width` wide; none if not even that fits.
fn fit_label(name: &str, ms: f64, width: f64) -> Option<String> {
    let words: Vec<&str> = name.split(' ').collect();
    let candidates = [
        format!("{name} ({})", format_ms(ms)),
        name.to_string(),
        words[1.min(words.len() - 1)..].join(" "),
        words[words.len() - 1].to_string(),
    ];
    candidates.into_iter().find(|c| label_width(c) + 2.0 * SVG_LABEL_PAD <= width)
}

fn format_ms(ms: f64) -> String {
    if ms >= 10.0 { format!("{ms:.0} ms") } else { format!("{ms:.1} ms") }
}

/// The smallest of 1, 2, 5 times a power of ten that is at least `raw`.
fn round_interval(raw: f64) -> f64 {
    let raw = if raw.is_finite() && raw > 0.0 { raw } else { 1.0 };
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|&t| t >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * power)
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_nested_spans_in_lanes() {
        let trace = Trace::enabled();
        {
            let _outer = trace.span("step");
            let comm = trace.lane(0, 1);
            let _inner = comm.span(format!("layer {}", 3));
        }
        let events = trace.events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].name, "layer 3");
        assert_eq!(events[0].tid, 1);
        assert!(events[1].dur_us >= events[0].dur_us);
        let json: serde_json::Value = serde_json::from_str(&trace.to_chrome_json()).unwrap();
        assert_eq!(json["traceEvents"][1]["name"], "step");
        assert_eq!(json["traceEvents"][1]["ph"], "X");
    }

    #[test]
    fn renders_the_window_as_svg() {
        let trace = Trace::enabled();
        {
            let _step = trace.span("step");
            drop(trace.span("forward"));
            let comm = trace.lane(0, 1);
            drop(comm.span("all-reduce bucket 0"));
        }
        let (from, to) = trace.last_span("step", 0, 0).unwrap();
        let svg = trace.to_svg(from, to, |pid, tid| format!("rank {pid} lane {tid}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 3);
        assert!(svg.contains("rank 0 lane 1") && svg.contains("all-reduce bucket 0"));
        assert!(trace.last_span("backward", 0, 0).is_none());
    }

    /// Two ranks' steps at fixed times (microseconds), with the tail of the step before.
    fn two_rank_step() -> Trace {
        let trace = Trace::enabled();
        for rank in 0..2u32 {
            let (compute, comm) = (trace.lane(rank, 0), trace.lane(rank, 1));
            let skew = 700.0 * rank as f64;
            compute.record("optimizer", -3_000.0 + skew, 2_500.0); // the previous step's
            compute.record("step", skew, 192_850.0);
            compute.record("forward", 500.0 + skew, 76_940.0);
            compute.record("backward", 77_500.0 + skew, 111_320.0);
            compute.record("optimizer", 190_000.0 + skew, 2_270.0);
            if rank == 0 {
                compute.record("eval", 193_000.0, 250_000.0); // after its step, while rank 1 ends its own
            }
            for (bucket, start) in [(0, 110_000.0), (1, 140_000.0), (2, 165_000.0), (3, 188_900.0)] {
                comm.record(format!("all-reduce bucket {bucket}"), start + skew, 1_000.0 + 500.0 * bucket as f64);
            }
        }
        trace
    }

    fn attr(tag: &str, name: &str) -> f64 {
        let at = tag.find(&format!(" {name}=\"")).unwrap_or_else(|| panic!("no {name} in {tag}")) + name.len() + 3;
        tag[at..at + tag[at..].find('"').unwrap()].parse().unwrap()
    }

    #[test]
    fn a_label_is_drawn_only_inside_its_box() {
        let trace = two_rank_step();
        let (from, to) = trace.last_spans("step").unwrap();
        assert_eq!((from, to), (0.0, 700.0 + 192_850.0));
        let svg = trace.to_svg(from, to, |pid, tid| format!("rank {pid} lane {tid}"));
        let boxes: Vec<&str> = svg.lines().filter(|l| l.starts_with("<g><rect")).collect();
        assert_eq!(boxes.len(), 2 * 8, "{svg}");
        let mut labelled = Vec::new();
        for b in &boxes {
            let Some(text_at) = b.find("<text") else { continue };
            let label = &b[b[text_at..].find('>').unwrap() + text_at + 1..b.find("</text>").unwrap()];
            let (rect_x, rect_w, text_x) = (attr(b, "x"), attr(b, "width"), attr(&b[text_at..], "x"));
            assert!(text_x >= rect_x, "{b}");
            assert!(text_x + label_width(label) <= rect_x + rect_w, "label {label:?} overflows its box: {b}");
            labelled.push(label.to_string());
        }
        // Wide boxes carry their duration, narrow ones what fits or nothing; the step (a
        // parent) is in the legend instead. Every box keeps its full name as a hover title.
        assert!(labelled.contains(&"forward (77 ms)".to_string()), "{labelled:?}");
        assert!(labelled.contains(&"backward (111 ms)".to_string()), "{labelled:?}");
        assert!(!labelled.iter().any(|l| l.starts_with("step")), "{labelled:?}");
        assert!(!labelled.iter().any(|l| l.contains("all-reduce")), "{labelled:?}");
        assert_eq!(svg.matches("<title>all-reduce bucket 3 (2.50 ms)</title>").count(), 2);
    }

    #[test]
    fn the_step_before_is_left_out() {
        let trace = two_rank_step();
        let (from, to) = trace.last_spans("step").unwrap();
        let svg = trace.to_svg(from, to, |pid, tid| format!("rank {pid} lane {tid}"));
        assert_eq!(svg.matches("<title>optimizer (2.50 ms)").count(), 0);
        assert_eq!(svg.matches("<title>optimizer (2.27 ms)").count(), 2);
        assert!(!svg.contains("<title>eval"), "the evaluation after the step is not drawn");
        // And nothing drawn left of the window or past its right edge.
        for b in svg.lines().filter(|l| l.starts_with("<g><rect")) {
            let (x, w) = (attr(b, "x"), attr(b, "width"));
            assert!(x >= SVG_LANE_LABEL_W && x + w <= SVG_WIDTH - SVG_MARGIN + 0.1, "{b}");
        }
    }

    #[test]
    fn the_axis_has_round_ticks_one_label_and_a_legend() {
        let trace = two_rank_step();
        let (from, to) = trace.last_spans("step").unwrap();
        let svg = trace.to_svg(from, to, |pid, tid| format!("rank {pid} lane {tid}"));
        let ticks: Vec<f64> = svg
            .lines()
            .filter_map(|l| l.split("<text class=\"tick\"").nth(1))
            .map(|t| t[t.find('>').unwrap() + 1..t.find('<').unwrap()].parse().unwrap())
            .collect();
        // 193.55 ms: ticks every 20 ms from 0 to 180.
        assert_eq!(ticks, (0..10).map(|k| 20.0 * k as f64).collect::<Vec<_>>());
        assert_eq!(svg.matches("class=\"axis\"").count(), 1);
        assert_eq!(svg.matches(" ms</text>").count(), 0, "ticks carry no unit of their own");
        let legend = svg.lines().find(|l| l.starts_with("<g class=\"legend\">")).expect("a legend");
        for entry in ["step", "forward", "backward", "optimizer (AdamW)", "all-reduce"] {
            assert!(legend.contains(&format!(">{entry}</text>")), "no {entry} in {legend}");
        }
        assert!(!legend.contains("evaluation"), "only the colours that appear: {legend}");
        for entry in legend.split("<text x=\"").skip(1) {
            let x: f64 = entry[..entry.find('"').unwrap()].parse().unwrap();
            let text = &entry[entry.find('>').unwrap() + 1..entry.find("</text>").unwrap()];
            assert!(x + label_width(text) <= SVG_WIDTH, "legend entry {text:?} past the right edge");
        }
    }

    #[test]
    fn the_legend_wraps_within_the_width() {
        let trace = Trace::enabled();
        let names = [
            "step",
            "forward",
            "backward",
            "weight grads 0",
            "optimizer",
            "all-reduce 0",
            "eval",
            "save",
            "send activations",
        ];
        for (i, name) in names.iter().enumerate() {
            trace.lane(0, i as u32).record(*name, 0.0, 1_000.0);
        }
        let svg = trace.to_svg(0.0, 1_000.0, |_, tid| format!("lane {tid}"));
        let legend = svg.lines().find(|l| l.starts_with("<g class=\"legend\">")).expect("a legend");
        let mut rows = Vec::new();
        for entry in legend.split("<text x=\"").skip(1) {
            let x: f64 = entry[..entry.find('"').unwrap()].parse().unwrap();
            let text = &entry[entry.find('>').unwrap() + 1..entry.find("</text>").unwrap()];
            assert!(x + label_width(text) <= SVG_WIDTH, "legend entry {text:?} past the right edge");
            rows.push(attr(&format!(" x=\"{entry}"), "y"));
        }
        assert_eq!(rows.len(), SPAN_KINDS.len(), "every kind, \"other\" included: {legend}");
        assert!(rows.windows(2).any(|w| w[1] > w[0]), "nine entries take two lines: {legend}");
        let height = attr(svg.lines().next().unwrap(), "height");
        assert!(height >= rows.iter().fold(0.0, |m, &y| f64::max(m, y)), "the last line is inside the figure");
    }

    #[test]
    fn round_intervals() {
        assert_eq!(round_interval(24.2), 50.0);
        assert_eq!(round_interval(20.0), 20.0);
        assert_eq!(round_interval(0.13), 0.2);
        assert_eq!(round_interval(7.0), 10.0);
        assert_eq!(fit_label("all-reduce bucket 3", 2.5, 20.0), Some("3".to_string()));
        assert_eq!(fit_label("all-reduce bucket 3", 2.5, 5.0), None);
        assert_eq!(fit_label("a <b>", 2.5, 500.0).map(|l| xml_escape(&l)), Some("a &lt;b&gt; (2.5 ms)".to_string()));
    }

    #[test]
    fn disabled_trace_records_nothing() {
        let trace = Trace::disabled();
        drop(trace.span("x"));
        assert!(trace.events().is_empty());
    }
}
