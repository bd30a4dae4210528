//! Heatmaps of φ grids (values in [0, 1]) as PNG panels side by side, in the spirit of the
//! paper's figures 3 and 4: row i (top = 1) against column j (left = 1), dark = 0, yellow = 1.

use std::io;
use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic_via_path;
use crate::train::plot::plot_font;

/// One grid to draw: `values` is [rows, cols] row-major.
pub struct Panel<'a> {
    pub title: String,
    pub rows: usize,
    pub cols: usize,
    pub values: &'a [f64],
}

const FAMILY: &str = "sans-serif";

/// A viridis-like colour for v ∈ [0, 1] (clamped), by linear interpolation of five stops.
fn colour(v: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = v * 4.0;
    let k = (x.floor() as usize).min(3);
    let t = x - k as f64;
    let (a, b) = (STOPS[k], STOPS[k + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Draws the panels left to right with a shared colour bar (0 → 1) into `path`, atomically.
pub fn plot_heatmaps(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    if panels.is_empty()
        || panels
            .iter()
            .any(|p| p.rows == 0 || p.cols == 0 || p.values.len() != p.rows * p.cols)
    {
        return Err(Error::Invalid(format!(
            "{}: heatmap panels must be non-empty grids",
            path.display()
        )));
    }
    let with_text = plot_font().is_some();
    let panel_w = 420u32;
    let width = panel_w * panels.len() as u32 + 90;
    let height = 420u32;
    let err = |e: &dyn std::fmt::Display| {
        Error::io(path, io::Error::other(format!("drawing the heatmap: {e}")))
    };
    write_atomic_via_path(path, |tmp| {
        let root = BitMapBackend::new(tmp, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = if with_text {
            root.titled(title, (FAMILY, 20)).map_err(|e| err(&e))?
        } else {
            root
        };
        let (body, bar) = root.split_horizontally(panel_w * panels.len() as u32);
        let areas = body.split_evenly((1, panels.len()));
        for (area, p) in areas.iter().zip(panels) {
            let mut b = ChartBuilder::on(area);
            b.margin(12);
            if with_text {
                b.caption(&p.title, (FAMILY, 15))
                    .x_label_area_size(30)
                    .y_label_area_size(35);
            }
            // y grows downwards so that i = 1 is the top row, as in the paper.
            let mut chart = b
                .build_cartesian_2d(0.5f64..p.cols as f64 + 0.5, p.rows as f64 + 0.5..0.5f64)
                .map_err(|e| err(&e))?;
            if with_text {
                chart
                    .configure_mesh()
                    .disable_mesh()
                    .x_desc("j")
                    .y_desc("i")
                    .x_labels(p.cols.min(8))
                    .y_labels(p.rows.min(8))
                    .x_label_formatter(&|x| format!("{}", x.round()))
                    .y_label_formatter(&|y| format!("{}", y.round()))
                    .label_style((FAMILY, 12))
                    .draw()
                    .map_err(|e| err(&e))?;
            }
            chart
                .draw_series((0..p.rows).flat_map(|i| {
                    (0..p.cols).map(move |j| {
                        let (x, y) = (j as f64 + 1.0, i as f64 + 1.0);
                        Rectangle::new(
                            [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                            colour(p.values[i * p.cols + j]).filled(),
                        )
                    })
                }))
                .map_err(|e| err(&e))?;
        }
        // Colour bar: 0 at the bottom, 1 at the top.
        let mut b = ChartBuilder::on(&bar);
        b.margin(12).margin_top(40);
        if with_text {
            b.y_label_area_size(35);
        }
        let mut chart = b
            .build_cartesian_2d(0.0f64..1.0, 0.0f64..1.0)
            .map_err(|e| err(&e))?;
        if with_text {
            chart
                .configure_mesh()
                .disable_mesh()
                .disable_x_axis()
                .y_labels(6)
                .label_style((FAMILY, 12))
                .draw()
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series((0..100).map(|k| {
                let v = k as f64 / 100.0;
                Rectangle::new([(0.0, v), (1.0, v + 0.01)], colour(v + 0.005).filled())
            }))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_ends() {
        assert_eq!(colour(0.0), RGBColor(68, 1, 84));
        assert_eq!(colour(1.0), RGBColor(253, 231, 37));
        assert_eq!(colour(f64::NAN), colour(0.0));
    }

    #[test]
    fn writes_png() {
        let dir = std::env::temp_dir().join(format!("lorakit-heatmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.png");
        let v: Vec<f64> = (0..8 * 64).map(|k| (k % 64) as f64 / 63.0).collect();
        let p = |t: &str| Panel {
            title: t.into(),
            rows: 8,
            cols: 64,
            values: &v,
        };
        plot_heatmaps(&path, "test", &[p("a"), p("b")]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], b"\x89PNG");
        assert!(plot_heatmaps(&path, "bad", &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
