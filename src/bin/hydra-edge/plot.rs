//! The SVG learning curve (loss, and accuracy where there is one).

use std::path::Path;

use anyhow::{Result, anyhow};
use hydra_edge::train::EpochMetrics;
use plotters::prelude::*;

/// Draws the curve into memory, then writes it atomically (never in place).
pub fn learning_curve(m: &[EpochMetrics], path: &Path) -> Result<()> {
    let mut svg = String::new();
    draw(m, &mut svg)?;
    hydra_edge::export::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

fn draw(m: &[EpochMetrics], svg: &mut String) -> Result<()> {
    let root = SVGBackend::with_string(svg, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let n = m.len().max(1) as f64;
    let top = m
        .iter()
        .flat_map(|e| [Some(e.train_loss), e.eval_loss])
        .flatten()
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&root)
        .caption("hydra-edge training", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(1f64..n.max(2.0), 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    c.configure_mesh()
        .x_desc("epoch")
        .y_desc("loss / accuracy")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let series = |f: &dyn Fn(&EpochMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        m.iter().filter_map(|e| Some((e.epoch as f64 + 1.0, f(e)?))).collect()
    };
    for (name, pts, color) in [
        ("train loss", series(&|e| Some(e.train_loss)), RED),
        ("eval loss", series(&|e| e.eval_loss), MAGENTA),
        ("train accuracy", series(&|e| e.train_accuracy), BLUE),
        ("eval accuracy", series(&|e| e.eval_accuracy), GREEN),
    ] {
        if pts.is_empty() {
            continue;
        }
        c.draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
