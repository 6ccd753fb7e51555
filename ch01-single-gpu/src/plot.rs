//! Pictures of a run, as SVG: the loss curves (`--plot`, with another run's `--metrics` file laid
//! over them by `--plot-compare`) and the memory at the peak by ledger category, per rank
//! (`--plot-memory`). They are drawn from a [`RunReport`], so every chapter draws the same way,
//! and the book's figures are these files (`scripts/book-figures`).

use crate::report::RunReport;
use kernels::Category;
use kernels::memory::format_bytes;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: not a --metrics line (one JSON object with step and loss): {source}")]
    NotMetrics { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("{0} holds no steps: it is not a --metrics file of a run")]
    NoSteps(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("drawing failed: {0}")]
    Draw(String),
}

fn draw_error<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

/// One run's losses as drawn: the training loss at every step, the validation loss at each
/// evaluation; `label` names the run in the legend.
#[derive(Clone, Debug, PartialEq)]
pub struct LossCurves {
    pub label: String,
    pub train: Vec<(f64, f64)>,
    pub val: Vec<(f64, f64)>,
}

/// What `--plot-compare` reads of each `--metrics` line; other fields are ignored.
#[derive(serde::Deserialize)]
struct MetricsLine {
    step: u64,
    loss: Option<f32>,
    val_loss: Option<f32>,
}

impl LossCurves {
    pub fn from_report(report: &RunReport) -> LossCurves {
        LossCurves {
            label: report.chapter.clone(),
            train: report.steps.iter().map(|s| (s.step as f64, s.loss as f64)).collect(),
            val: report.val_losses.iter().map(|v| (v.step as f64, v.loss as f64)).collect(),
        }
    }

    /// A run's `--metrics` file (JSON lines), labelled with the file's name.
    pub fn from_metrics_file(path: &Path) -> Result<LossCurves, PlotError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read { path: path.into(), source })?;
        let label = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        let mut curves = LossCurves { label, train: Vec::new(), val: Vec::new() };
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let m: MetricsLine = serde_json::from_str(line).map_err(|source| PlotError::NotMetrics {
                path: path.into(),
                line: i + 1,
                source,
            })?;
            // A non-finite loss is written as null: it has no point on the curve.
            if let Some(loss) = m.loss {
                curves.train.push((m.step as f64, loss as f64));
            }
            if let Some(val) = m.val_loss {
                curves.val.push((m.step as f64, val as f64));
            }
        }
        if curves.train.is_empty() {
            return Err(PlotError::NoSteps(path.into()));
        }
        Ok(curves)
    }
}

/// Both ends of the values, widened when they coincide (a one-step run).
fn span(values: impl Iterator<Item = f64>, pad: f64) -> std::ops::Range<f64> {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    let margin = ((hi - lo) * pad).max(1e-3 * hi.abs().max(1.0));
    lo - margin..hi + margin
}

const WIDTH: u32 = 720;
const HEIGHT: u32 = 420;
/// The run drawn on top, then the runs compared with it (wide and pale, so that a curve lying
/// exactly on another shows as a thin line inside a band).
const COLOURS: [(RGBColor, RGBColor); 3] = [
    (RGBColor(31, 119, 180), RGBColor(255, 127, 14)),
    (RGBColor(160, 160, 160), RGBColor(110, 110, 110)),
    (RGBColor(140, 200, 140), RGBColor(60, 140, 60)),
];

type Root<'b> = DrawingArea<SVGBackend<'b>, Shift>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// An SVG document of one captioned chart over `x` by `y`, drawn by `draw`, which says where
/// the legend goes (if there is one).
fn svg_chart(
    caption: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    draw: impl FnOnce(&Root<'_>, &mut Chart<'_, '_>) -> Result<Option<SeriesLabelPosition>, PlotError>,
) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x, y)
            .map_err(draw_error)?;
        if let Some(position) = draw(&root, &mut chart)? {
            chart
                .configure_series_labels()
                .position(position)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(draw_error)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// The loss curves of `runs` as an SVG document: step on x, loss (nats per token) on y; the
/// first run drawn last, on top. Legend entries are "LABEL train" and "LABEL validation".
pub fn loss_chart(runs: &[LossCurves]) -> Result<String, PlotError> {
    let points = || runs.iter().flat_map(|r| r.train.iter().chain(&r.val));
    let (steps, losses) = (span(points().map(|p| p.0), 0.0), span(points().map(|p| p.1), 0.05));
    svg_chart("loss", steps, losses, |_, chart| {
        chart
            .configure_mesh()
            .light_line_style(RGBColor(240, 240, 240))
            .x_label_formatter(&|step| format!("{step:.0}"))
            .x_desc("step")
            .y_desc("loss (nats per token)")
            .draw()
            .map_err(draw_error)?;
        for (i, run) in runs.iter().enumerate().rev() {
            let (train_colour, val_colour) = COLOURS[i.min(COLOURS.len() - 1)];
            let width = if i == 0 { 1 } else { 4 };
            let train = train_colour.stroke_width(width);
            chart
                .draw_series(LineSeries::new(run.train.iter().copied(), train))
                .map_err(draw_error)?
                .label(format!("{} train", run.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], train));
            let val = val_colour.stroke_width(width + 1);
            chart
                .draw_series(LineSeries::new(run.val.iter().copied(), val).point_size(3))
                .map_err(draw_error)?
                .label(format!("{} validation", run.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], val));
        }
        Ok(Some(SeriesLabelPosition::UpperRight))
    })
}

const MIB: f64 = 1024.0 * 1024.0;

/// The memory of every rank at its peak, by ledger category, as an SVG bar chart in MiB: one
/// group of bars per category (categories no rank uses are left out), one bar per rank (with
/// its size written above it when there is one rank).
pub fn memory_chart(report: &RunReport) -> Result<String, PlotError> {
    let at_peak = |rank: usize, c: Category| report.ranks[rank].memory.at_peak.get(&c).copied().unwrap_or(0);
    let ranks = 0..report.ranks.len();
    let categories: Vec<Category> =
        Category::ALL.into_iter().filter(|&c| ranks.clone().any(|r| at_peak(r, c) > 0)).collect();
    let highest = ranks.clone().flat_map(|r| categories.iter().map(move |&c| at_peak(r, c))).max().unwrap_or(0);
    let n = report.ranks.len().max(1);
    let caption = match report.ranks.as_slice() {
        [one] => format!("memory at the peak, by category: {} in all", format_bytes(one.memory.peak_total)),
        _ => format!("memory at each rank's peak, by category ({n} ranks)"),
    };
    // Category i spans [i, i + 1) on x; its bars sit in the middle 80%.
    let (x, y) = (0.0..categories.len().max(1) as f64, 0.0..(highest as f64 / MIB * 1.15).max(1e-3));
    svg_chart(&caption, x, y, |root, chart| {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(0)
            .y_desc("MiB")
            .draw()
            .map_err(draw_error)?;
        // The category names under their groups, placed in pixels below the x axis.
        for (i, c) in categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            let style = ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
            root.draw(&Text::new(c.to_string(), (x, y + 8), style)).map_err(draw_error)?;
        }
        let width = 0.8 / n as f64;
        for rank in ranks.clone() {
            let colour = if n == 1 { COLOURS[0].0.to_rgba() } else { Palette99::pick(rank).to_rgba() };
            let bars = categories.iter().enumerate().map(|(i, &c)| {
                let left = i as f64 + 0.1 + rank as f64 * width;
                let mib = at_peak(rank, c) as f64 / MIB;
                Rectangle::new([(left, 0.0), (left + width, mib)], colour.filled())
            });
            let series = chart.draw_series(bars).map_err(draw_error)?;
            if n > 1 {
                series
                    .label(format!("rank {}", report.ranks[rank].rank))
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
            }
            // Sizes only where there is room: above the bars of a single rank.
            let sizes = categories.iter().enumerate().filter(|_| n == 1).map(|(i, &c)| {
                let centre = i as f64 + 0.1 + (rank as f64 + 0.5) * width;
                let bytes = at_peak(rank, c);
                let style = ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
                Text::new(format_bytes(bytes), (centre, bytes as f64 / MIB), style)
            });
            chart.draw_series(sizes).map_err(draw_error)?;
        }
        Ok((n > 1).then_some(SeriesLabelPosition::UpperLeft))
    })
}

/// Writes an SVG document.
pub fn write_svg(path: &Path, svg: &str) -> Result<(), PlotError> {
    std::fs::write(path, svg).map_err(|source| PlotError::Write { path: path.into(), source })
}
