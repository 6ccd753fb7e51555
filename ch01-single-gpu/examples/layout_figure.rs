//! Draws the flat parameter buffer of a model as an SVG, from the layout itself: one bar for the
//! whole buffer with a segment per part of the model (the embeddings, each block, the head), and
//! below it one block's twelve tensors, each a named range of the buffer with its shape and how
//! it splits across tensor-parallel ranks. The book's figure of "all parameters in one buffer".
//!
//!     cargo run --release -p ch01-single-gpu --example layout_figure -- small book/src/figures/ch01-param-layout.svg

use anyhow::Context;
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::params::{ParamLayout, ParamSpec, Part, Placement};
use std::fmt::Write;

const WIDTH: f64 = 750.0;
const MARGIN: f64 = 10.0;

fn part_colour(part: Part) -> &'static str {
    match part {
        Part::Embeddings => "#8fb8de",
        Part::Block(l) if l % 2 == 0 => "#f2b880",
        Part::Block(_) => "#f7d3ae",
        Part::Head => "#a8d5a2",
    }
}

fn placement_name(spec: &ParamSpec) -> &'static str {
    match (spec.placement, spec.shape.len()) {
        (Placement::Replicated, _) => "replicated",
        (Placement::Split { groups: 3, .. }, _) => "split by heads (q, k, v)",
        (Placement::Split { .. }, 1) => "split with its matmul's columns",
        (Placement::Split { axis: 0, .. }, _) => "split by rows",
        (Placement::Split { .. }, _) => "split by columns",
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The whole buffer: a segment per part, labelled where the label fits (~6 px per character).
fn buffer_bar(svg: &mut String, layout: &ParamLayout, y: f64) -> std::fmt::Result {
    let scale = (WIDTH - 2.0 * MARGIN) / layout.total as f64;
    let mut parts: Vec<(Part, usize, usize)> = Vec::new(); // (part, start, end) in floats
    for spec in &layout.specs {
        match parts.last_mut() {
            Some((part, _, end)) if *part == spec.part => *end = spec.range().end,
            _ => parts.push((spec.part, spec.offset, spec.range().end)),
        }
    }
    for (part, start, end) in parts {
        let (x, w) = (MARGIN + start as f64 * scale, (end - start) as f64 * scale);
        let name = match part {
            Part::Embeddings => "wte, wpe".to_string(),
            Part::Block(l) => format!("h.{l}"),
            Part::Head => "ln_f".to_string(),
        };
        let title = format!("{name}: floats {start}..{end}");
        writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{y}" width="{w:.1}" height="28" fill="{}" stroke="grey" stroke-width="0.5"><title>{}</title></rect>"#,
            part_colour(part),
            escape(&title)
        )?;
        if w > 6.5 * name.len() as f64 + 4.0 {
            writeln!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{name}</text>"#, x + w / 2.0, y + 18.0)?;
        }
    }
    Ok(())
}

/// One block's tensors as rows: name, shape, floats, placement, and a bar of its share.
fn block_rows(svg: &mut String, specs: &[ParamSpec], y0: f64) -> std::fmt::Result {
    let total: usize = specs.iter().map(ParamSpec::numel).sum();
    let bar_x = 480.0;
    let bar_w = WIDTH - MARGIN - bar_x;
    for (i, spec) in specs.iter().enumerate() {
        let y = y0 + 18.0 * i as f64;
        let shape = spec.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" × ");
        let w = bar_w * spec.numel() as f64 / total as f64;
        writeln!(svg, r#"<text x="{MARGIN}" y="{:.1}">{}</text>"#, y + 12.0, escape(&spec.name))?;
        writeln!(svg, r#"<text x="190" y="{:.1}">[{shape}]</text>"#, y + 12.0)?;
        writeln!(svg, r#"<text x="290" y="{:.1}" fill="dimgrey">{}</text>"#, y + 12.0, placement_name(spec))?;
        writeln!(
            svg,
            r#"<rect x="{bar_x}" y="{:.1}" width="{:.1}" height="14" fill="{}"><title>{}: offset {}, {} floats</title></rect>"#,
            y + 1.0,
            w.max(0.5),
            part_colour(spec.part),
            escape(&spec.name),
            spec.offset,
            spec.numel()
        )?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [preset, out] = args.as_slice() else {
        anyhow::bail!("usage: layout_figure PRESET OUT.svg (e.g. small book/src/figures/ch01-param-layout.svg)")
    };
    let cfg = ModelConfig::preset(preset, 256)?;
    let layout = ParamLayout::new(&cfg);
    let block = layout.part_tensors(Part::Block(0));
    let rows = block.len() as f64;
    let height = 100.0 + 18.0 * rows + 8.0;
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    )?;
    writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#)?;
    let title =
        format!("The `{preset}` model's {} parameters in one buffer (byte tokenizer, vocabulary 256)", layout.total);
    writeln!(svg, r#"<text x="{MARGIN}" y="18" font-size="13">{}</text>"#, escape(&title))?;
    buffer_bar(&mut svg, &layout, 28.0)?;
    let ends = format!(
        "blue: the embeddings wte {:?} and wpe {:?}, first; then the blocks; green, at the very end: ln_f",
        layout.specs[0].shape, layout.specs[1].shape
    );
    writeln!(svg, r#"<text x="{MARGIN}" y="70" fill="dimgrey">{}</text>"#, escape(&ends))?;
    let first = &layout.specs[block.start];
    let last = &layout.specs[block.end - 1];
    let zoom = format!(
        "h.0, floats {}..{}: twelve named views, each a range of the buffer, and how tensor parallelism splits it",
        first.offset,
        last.range().end
    );
    writeln!(svg, r#"<text x="{MARGIN}" y="92" font-size="12">{}</text>"#, escape(&zoom))?;
    block_rows(&mut svg, &layout.specs[block], 100.0)?;
    writeln!(svg, "</svg>")?;
    std::fs::write(out, svg).with_context(|| format!("cannot write {out}"))?;
    Ok(())
}
