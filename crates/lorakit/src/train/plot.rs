//! Loss-curve plot: a PNG with the training loss per step as a line and the evaluation
//! losses as points.
//!
//! Text (title, axis names, tick labels, legend) needs a TrueType/OpenType font, which
//! plotters' pure-Rust `ab_glyph` renderer takes from a file loaded at run time: the file
//! named by the environment variable `LORAKIT_PLOT_FONT` if set, else the first of a list
//! of common system locations (DejaVu Sans from Debian's `fonts-dejavu-core`, Liberation,
//! Noto, macOS and Windows fonts). When none can be loaded the plot is still drawn, with
//! axes and grid lines but without any text, rather than failing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic_via_path;

/// Image size in pixels.
pub const PLOT_WIDTH: u32 = 900;
pub const PLOT_HEIGHT: u32 = 500;

/// The font family name under which the loaded font is registered with plotters.
const FAMILY: &str = "sans-serif";

/// Environment variable naming a `.ttf`/`.otf` file to use for the plot's text.
pub const FONT_ENV: &str = "LORAKIT_PLOT_FONT";

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Loads and registers a font once per process; returns the file used, if any.
pub fn plot_font() -> Option<&'static Path> {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(|| {
        let from_env = std::env::var_os(FONT_ENV).map(PathBuf::from);
        from_env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
            .find(|path| {
                let Ok(bytes) = std::fs::read(path) else {
                    return false;
                };
                // plotters keeps fonts for the life of the process and wants `'static`
                // bytes: leaking the one font we register is intended.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
            })
    })
    .as_deref()
}

/// Draws the loss curve to `path` (a PNG of [`PLOT_WIDTH`] × [`PLOT_HEIGHT`] pixels,
/// written atomically). `train` and `eval` are `(step, loss)` pairs; points with a
/// non-finite loss are skipped (a diverged run still shows its finite part).
///
/// Errors: [`Error::Invalid`] when there is no finite point at all in either series
/// (an empty plot would only hide a mistake), [`Error::Io`] naming `path` when drawing
/// or writing fails.
pub fn plot_loss_curve(
    path: &Path,
    train: &[(u64, f64)],
    eval: &[(u64, f64)],
    title: &str,
) -> Result<()> {
    let finite = |s: &[(u64, f64)]| -> Vec<(f64, f64)> {
        s.iter()
            .filter(|(_, l)| l.is_finite())
            .map(|&(step, l)| (step as f64, l))
            .collect()
    };
    let train = finite(train);
    let eval = finite(eval);
    if train.is_empty() && eval.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no finite loss values to plot",
            path.display()
        )));
    }
    draw(path, &train, &eval, title, plot_font().is_some())
}

/// Draws finite, non-empty series; without text when `with_text` is false.
fn draw(
    path: &Path,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    title: &str,
    with_text: bool,
) -> Result<()> {
    let (x_range, y_range) = ranges(train.iter().chain(eval));
    let drawing_error = |e: &dyn std::fmt::Display| {
        Error::io(
            path,
            io::Error::other(format!("drawing the loss plot: {e}")),
        )
    };

    write_atomic_via_path(path, |tmp| {
        let root = BitMapBackend::new(tmp, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| drawing_error(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if with_text {
            builder
                .caption(title, (FAMILY, 24))
                .x_label_area_size(50)
                .y_label_area_size(70);
        }
        let mut chart = builder
            .build_cartesian_2d(x_range.clone(), y_range.clone())
            .map_err(|e| drawing_error(&e))?;

        if with_text {
            // Steps are integers: over a short range ask for at most one label per step.
            let x_labels = ((x_range.end - x_range.start).floor() as usize + 1).clamp(2, 10);
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss")
                .label_style((FAMILY, 15))
                .axis_desc_style((FAMILY, 17))
                .light_line_style(RGBColor(243, 243, 243))
                .bold_line_style(RGBColor(205, 205, 205))
                .x_labels(x_labels)
                .x_label_formatter(&|&x| step_label(x))
                .draw()
                .map_err(|e| drawing_error(&e))?;
        } else {
            // Grid and frame by hand: plotters' mesh always draws tick labels (text).
            let grid = ShapeStyle::from(&RGBColor(215, 215, 215)).stroke_width(1);
            for i in 0..=10 {
                let x = x_range.start + (x_range.end - x_range.start) * f64::from(i) / 10.0;
                chart
                    .draw_series(LineSeries::new(
                        [(x, y_range.start), (x, y_range.end)],
                        grid,
                    ))
                    .map_err(|e| drawing_error(&e))?;
            }
            for i in 0..=8 {
                let y = y_range.start + (y_range.end - y_range.start) * f64::from(i) / 8.0;
                chart
                    .draw_series(LineSeries::new(
                        [(x_range.start, y), (x_range.end, y)],
                        grid,
                    ))
                    .map_err(|e| drawing_error(&e))?;
            }
            let frame = [
                (x_range.start, y_range.start),
                (x_range.end, y_range.start),
                (x_range.end, y_range.end),
                (x_range.start, y_range.end),
                (x_range.start, y_range.start),
            ];
            chart
                .draw_series(LineSeries::new(frame, BLACK.stroke_width(1)))
                .map_err(|e| drawing_error(&e))?;
        }

        let train_color = RGBColor(31, 119, 180);
        let eval_color = RGBColor(214, 39, 40);
        if !train.is_empty() {
            let series = chart
                .draw_series(LineSeries::new(
                    train.iter().copied(),
                    train_color.stroke_width(2),
                ))
                .map_err(|e| drawing_error(&e))?;
            if with_text {
                series.label("train loss").legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], train_color.stroke_width(2))
                });
            }
            // A single training point is invisible as a line: mark it.
            if train.len() == 1 {
                chart
                    .draw_series(
                        train
                            .iter()
                            .map(|&p| Circle::new(p, 3, train_color.filled())),
                    )
                    .map_err(|e| drawing_error(&e))?;
            }
        }
        if !eval.is_empty() {
            let series = chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 5, eval_color.filled())))
                .map_err(|e| drawing_error(&e))?;
            if with_text {
                series
                    .label("eval loss")
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, eval_color.filled()));
            }
        }
        if with_text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FAMILY, 15))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .draw()
                .map_err(|e| drawing_error(&e))?;
        }
        root.present().map_err(|e| drawing_error(&e))?;
        Ok(())
    })
}

/// A step-axis tick label: integers as such, anything else with one decimal.
fn step_label(x: f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round())
    } else {
        format!("{x:.1}")
    }
}

/// Axis ranges covering all points with a little padding; never empty.
fn ranges<'a>(
    points: impl Iterator<Item = &'a (f64, f64)>,
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = if y1 > y0 {
        (y1 - y0) * 0.05
    } else {
        (y0.abs() * 0.1).max(0.5)
    };
    (x0..x1, (y0 - pad)..(y1 + pad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lorakit-plot-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Checks the PNG signature and reads width and height from the IHDR chunk.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (w, h)
    }

    fn loss_curve(n: u64) -> Vec<(u64, f64)> {
        (1..=n)
            .map(|s| {
                (
                    s,
                    2.5 * (-(s as f64) / 40.0).exp() + 0.6 + 0.08 * ((s as f64) * 1.7).sin(),
                )
            })
            .collect()
    }

    #[test]
    fn writes_png_of_requested_size() {
        let dir = scratch("ok");
        let path = dir.join("loss.png");
        let train = loss_curve(200);
        let eval: Vec<(u64, f64)> = (1..=4)
            .map(|i| (i * 50, train[(i * 50 - 1) as usize].1 + 0.1))
            .collect();
        plot_loss_curve(&path, &train, &eval, "LoRA fine-tuning: loss").unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), (PLOT_WIDTH, PLOT_HEIGHT));
        // Overwrite in place, training series only, with a NaN that must be skipped.
        let mut train = loss_curve(10);
        train.push((11, f64::NAN));
        plot_loss_curve(&path, &train, &[], "short run").unwrap();
        assert_eq!(
            png_size(&fs::read(&path).unwrap()),
            (PLOT_WIDTH, PLOT_HEIGHT)
        );
        // Single points, eval only.
        plot_loss_curve(&path, &[(1, 3.0)], &[], "one step").unwrap();
        plot_loss_curve(&path, &[], &[(5, 1.0)], "eval only").unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("loss.png")],
            "no temporary files left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn draws_without_text_when_no_font() {
        let dir = scratch("nofont");
        let path = dir.join("loss.png");
        let train: Vec<(f64, f64)> = loss_curve(100)
            .into_iter()
            .map(|(s, l)| (s as f64, l))
            .collect();
        draw(
            &path,
            &train,
            &[(50.0, 1.5), (100.0, 1.0)],
            "ignored",
            false,
        )
        .unwrap();
        assert_eq!(
            png_size(&fs::read(&path).unwrap()),
            (PLOT_WIDTH, PLOT_HEIGHT)
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_series_is_an_error() {
        let dir = scratch("empty");
        let path = dir.join("loss.png");
        let msg = plot_loss_curve(&path, &[], &[], "nothing")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no finite loss values"), "{msg}");
        assert!(msg.contains("loss.png"), "{msg}");
        let msg = plot_loss_curve(&path, &[(1, f64::NAN)], &[(2, f64::INFINITY)], "nan")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no finite loss values"), "{msg}");
        assert!(!path.exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_directory_is_an_error_naming_the_path() {
        let dir = scratch("missing");
        let path = dir.join("no-such-dir").join("loss.png");
        let msg = plot_loss_curve(&path, &loss_curve(5), &[], "x")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("loss.png"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
