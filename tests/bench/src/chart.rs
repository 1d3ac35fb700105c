//! The PNG chart: for every cell, Strata's IOPS and CPU per request as a
//! ratio to qsd, with the break-even line at 1.

use std::path::Path;

use anyhow::{anyhow, Context as _};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::suite::Cell;

/// Where the system's DejaVu font lives on Debian (fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws the chart to `out`.
pub fn draw(cells: &[Cell], out: &Path) -> anyhow::Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (install fonts-dejavu-core)"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;

    let rows = cells.len().max(1);
    let height = 120 + 26 * rows as u32;
    let root = BitMapBackend::new(out, (1400, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("drawing: {e}"))?;
    let (left, right) = root.split_horizontally(760);
    let labels: Vec<String> = cells
        .iter()
        .map(|c| format!("{} {}", c.target.name(), c.workload.label()))
        .collect();
    panel(
        &left,
        "IOPS, Strata / qsd (higher is better)",
        cells.iter().map(|c| c.strata.iops / c.qsd.iops).collect(),
        Some(&labels),
        &BLUE,
    )?;
    panel(
        &right,
        "CPU per request, Strata / qsd (lower is better)",
        cells
            .iter()
            .map(|c| c.strata.cpu_ns / c.qsd.cpu_ns)
            .collect(),
        None,
        &RED,
    )?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", out.display()))?;
    Ok(())
}

/// One horizontal bar chart of ratios; row labels on the left if given.
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    values: Vec<f64>,
    labels: Option<&[String]>,
    color: &RGBColor,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing: {e}");
    let n = values.len();
    let max = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(if labels.is_some() { 260 } else { 10 })
        .build_cartesian_2d(0f64..max, (0..n).into_segmented())
        .map_err(err)?;
    // Row 0 is drawn at the bottom; put the first cell at the top.
    let label = |y: &SegmentValue<usize>| match (labels, y) {
        (Some(l), SegmentValue::CenterOf(i)) if *i < n => l[n - 1 - i].clone(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&label)
        .label_style(("sans-serif", 14))
        .x_desc("ratio")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            Histogram::horizontal(&chart)
                .style(color.mix(0.7).filled())
                .margin(3)
                .data(
                    values
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| (n - 1 - i, v.max(0.0))),
                ),
        )
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
            BLACK.stroke_width(2),
        ))
        .map_err(err)?;
    Ok(())
}
