//! The top layouts as one SVG: memory per rank by category, and the step split into compute,
//! exposed communication and bubble.

use super::{Plan, Problem};
use plotters::prelude::*;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 420;

fn draw_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plan: {e:?}")
}

fn label(p: &Plan) -> String {
    let l = &p.layout;
    let chunks = if l.chunks > 1 { format!(" v{}", l.chunks) } else { String::new() };
    format!("{},{},{}{chunks} z{} {}", l.dp, l.tp, l.pp, l.zero.number(), &l.recompute.to_string()[..1])
}

/// Stacked bars, one per plan: `parts` of each, with their names and colours.
fn stacked(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    unit: &str,
    plans: &[&Plan],
    parts: &[(&str, RGBColor)],
    values: impl Fn(&Plan) -> Vec<f64>,
) -> anyhow::Result<()> {
    let highest = plans.iter().map(|p| values(p).iter().sum::<f64>()).fold(0.0, f64::max).max(1e-9);
    let n = plans.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // Room above the bars for the legend, a row a part.
        .build_cartesian_2d(0.0..n as f64, 0.0..highest * (1.25 + 0.09 * parts.len() as f64))
        .map_err(draw_error)?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(unit).draw().map_err(draw_error)?;
    for (i, p) in plans.iter().enumerate() {
        // In pixels of the whole document; `area` draws in its own.
        let ((x, y), (left, top)) = (chart.backend_coord(&(i as f64 + 0.5, 0.0)), area.get_base_pixel());
        let (x, y) = (x - left, y - top);
        let style = ("sans-serif", 11).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Top,
        ));
        area.draw(&Text::new(label(p), (x, y + 6), style)).map_err(draw_error)?;
    }
    for (k, &(name, colour)) in parts.iter().enumerate() {
        let bars = plans.iter().enumerate().map(|(i, p)| {
            let v = values(p);
            let below: f64 = v[..k].iter().sum();
            Rectangle::new([(i as f64 + 0.15, below), (i as f64 + 0.85, below + v[k])], colour.filled())
        });
        chart
            .draw_series(bars)
            .map_err(draw_error)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

/// The SVG document for `plans` (fastest first). Bars are labelled "dp,tp,pp [vCHUNKS] zZERO R"
/// (R: the recompute mode's initial).
pub fn chart(problem: &Problem, plans: &[&Plan]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        // One colour a category, in `Memory::named`'s order.
        let colours = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(214, 39, 40),
            RGBColor(148, 103, 189),
            RGBColor(140, 140, 140),
            RGBColor(188, 189, 34),
        ];
        let names = plans.first().map(|p| p.memory.named().map(|(name, _)| name));
        let memory: Vec<(&str, RGBColor)> = names.into_iter().flatten().zip(colours).collect();
        let caption = format!("memory per rank (GB; {} GB each)", problem.gpu.memory_bytes / 1e9);
        stacked(&left, &caption, "GB", plans, &memory, |p| p.memory.named().map(|(_, b)| b / 1e9).to_vec())?;
        let time = [
            ("compute", RGBColor(31, 119, 180)),
            ("exposed communication", RGBColor(255, 127, 14)),
            ("bubble", RGBColor(160, 160, 160)),
        ];
        stacked(&right, "step time (s)", "seconds", plans, &time, |p| match p.time {
            Some(t) => vec![t.compute_seconds, t.exposed_comm_seconds, t.bubble_seconds],
            None => vec![0.0; 3],
        })?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}
