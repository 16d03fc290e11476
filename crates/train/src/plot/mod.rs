//! Line charts as PNG files: training curves and benchmark plots.
//!
//! The [`plotters`] crate draws the charts (lines, markers, grid, axes, legends) into an RGB
//! buffer, which the `png` crate encodes. Text is set in DejaVu Sans Mono, embedded in the
//! binary (`assets/`, Bitstream Vera licence): plotters' `ab_glyph` font support lays it out
//! and a thin backend wrapper (the `text` module) rasterises it with `ab_glyph`, so no system
//! fonts, fontconfig or C libraries are needed. This module picks the axis ranges and the
//! "nice" ticks itself; a log axis is drawn as a linear axis over log10 of the values.

use std::error::Error;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::FontRef;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::element::{Drawable, PointCollection};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::DrawingErrorKind;

mod text;
use text::TextBackend;

static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

/// The family the embedded font is registered as; plotters' own defaults use this name too.
const FONT: &str = "sans-serif";

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points `(x, y)`; non-finite points (and non-positive ones on a log axis) are skipped.
    pub points: Vec<(f64, f64)>,
    /// Whether to draw a marker at every point.
    pub markers: bool,
    /// Index into the palette, so that a line keeps its colour across charts; `None` colours
    /// the line by its position in the chart.
    pub color: Option<usize>,
}

/// An axis scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Base-10 logarithmic (positive values only).
    Log,
}

/// A chart: title, axis labels and scales, lines.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Scale of x.
    pub x_scale: Scale,
    /// Scale of y.
    pub y_scale: Scale,
    /// Lines.
    pub series: Vec<Series>,
    /// Where the legend goes.
    pub legend: Legend,
}

/// Where a chart draws its legend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Legend {
    /// Inside the plot area, top-right (few lines).
    #[default]
    Inside,
    /// In a column right of the plot area (many lines; the plot gets narrower).
    Right,
}

const PALETTE: [RGBColor; 18] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 128),
    RGBColor(128, 0, 0),
    RGBColor(0, 100, 0),
    RGBColor(255, 0, 255),
    RGBColor(80, 80, 0),
    RGBColor(0, 160, 160),
    RGBColor(255, 190, 0),
    RGBColor(0, 0, 0),
];
const INK: RGBColor = RGBColor(40, 40, 40);
const GRID: RGBColor = RGBColor(220, 220, 220);
const MINOR_GRID: RGBColor = RGBColor(240, 240, 240);

/// The tick step near `span / n` that is 1, 2, 2.5 or 5 times a power of ten.
fn nice_step(span: f64, n: usize) -> f64 {
    let raw = span.max(1e-12) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// "Nice" tick positions covering `[lo, hi]` (about `n` of them) and their step.
fn linear_ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let step = nice_step(hi - lo, n);
    let (first, last) = ((lo / step - 1e-9).ceil(), (hi / step + 1e-9).floor());
    let ticks = (first as i64..=last as i64)
        .map(|k| k as f64 * step)
        .collect();
    (ticks, step)
}

/// The label of tick `v` on an axis whose ticks are `step` apart: as many decimals as the step
/// needs, or scientific notation for very large or small values.
fn format_tick(v: f64, step: f64) -> String {
    let a = v.abs();
    if a < step * 1e-6 {
        return "0".into();
    }
    if !(1e-3..1e6).contains(&a) {
        let digits = (a.log10().floor() - step.log10().floor()).max(0.0) as usize;
        return format!("{v:.digits$e}");
    }
    let decimals = (0..12)
        .find(|&d| {
            let s = step * 10f64.powi(d);
            (s - s.round()).abs() < 1e-6 * s.max(1.0)
        })
        .unwrap_or(12) as usize;
    format!("{v:.decimals$}")
}

/// The ticks `m * 10^e` for the `mantissas` `m` and every `e` from a decade below `lo` to one
/// above `hi`, ascending, as `(exponent, value)`.
fn log_ticks(lo: f64, hi: f64, mantissas: &[u32]) -> Vec<(f64, f64)> {
    (lo.floor() as i32 - 1..=hi.ceil() as i32 + 1)
        .flat_map(|e| {
            mantissas.iter().map(move |&m| {
                let m = f64::from(m);
                (m.log10() + f64::from(e), m * 10f64.powi(e))
            })
        })
        .collect()
}

/// One axis: its range and ticks in axis space (log10 of the values on a log axis); plotters
/// maps it to pixels and draws its grid lines.
#[derive(Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    /// Labelled ticks (bold grid lines) and their labels.
    ticks: Vec<(f64, String)>,
    /// Unlabelled light grid lines.
    minor: Vec<f64>,
}

impl Axis {
    /// An axis of `scale` covering `values` (in axis space) with 5 % padding.
    fn fit(scale: Scale, values: impl Iterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-12 {
            lo -= 0.5;
            hi += 0.5;
        }
        let pad = (hi - lo) * 0.05;
        let (lo, hi) = (lo - pad, hi + pad);
        match scale {
            Scale::Linear => {
                let (ticks, step) = linear_ticks(lo, hi, 6);
                let ticks = ticks
                    .into_iter()
                    .map(|v| (v, format_tick(v, step)))
                    .collect();
                Self {
                    lo,
                    hi,
                    ticks,
                    minor: Vec::new(),
                }
            }
            Scale::Log => Self::log(lo, hi),
        }
    }

    /// A log axis over `[lo, hi]` (exponents): labelled ticks at powers of ten, or at 1, 2 and 5
    /// times them when the axis spans at most 2.5 decades (widened to the next such ticks if
    /// fewer than two fall inside), and light grid lines at the other digits.
    fn log(mut lo: f64, mut hi: f64) -> Self {
        let labelled: &[u32] = if hi - lo <= 2.5 { &[1, 2, 5] } else { &[1] };
        let inside =
            |lo: f64, hi: f64| move |t: &(f64, f64)| (lo - 1e-9..=hi + 1e-9).contains(&t.0);
        let candidates = log_ticks(lo, hi, labelled);
        if candidates.iter().copied().filter(inside(lo, hi)).count() < 2 {
            lo = candidates
                .iter()
                .rev()
                .find(|t| t.0 <= lo)
                .map_or(lo, |t| t.0);
            hi = candidates.iter().find(|t| t.0 >= hi).map_or(hi, |t| t.0);
        }
        let ticks = log_ticks(lo, hi, labelled)
            .into_iter()
            .filter(inside(lo, hi))
            .map(|(t, v)| (t, format_tick(v, v)))
            .collect();
        let minor = if hi - lo <= 5.0 {
            log_ticks(lo, hi, &[2, 3, 4, 5, 6, 7, 8, 9])
                .into_iter()
                .filter(inside(lo, hi))
                .map(|(t, _)| t)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            lo,
            hi,
            ticks,
            minor,
        }
    }

    /// The label of the tick at `t`.
    fn label(&self, t: f64) -> String {
        self.ticks
            .iter()
            .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
            .map(|(_, label)| label.clone())
            .unwrap_or_default()
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, t: &f64, (a, b): (i32, i32)) -> i32 {
        a + ((t - self.lo) / (self.hi - self.lo) * f64::from(b - a)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.minor.clone()
        } else {
            self.ticks.iter().map(|t| t.0).collect()
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// `v` in axis space, or `None` where the scale cannot show it.
fn to_axis(scale: Scale, v: f64) -> Option<f64> {
    let t = match scale {
        Scale::Log if v <= 0.0 => return None,
        Scale::Log => v.log10(),
        Scale::Linear => v,
    };
    t.is_finite().then_some(t)
}

/// Text in the embedded font.
fn text(size: f64) -> TextStyle<'static> {
    (FONT, size).into_font().color(&INK)
}

/// A line through points, 2 pixels wide and anti-aliased: two of plotters' anti-aliased 1-pixel
/// lines side by side for each segment. (Plotters fills a wider path as one polygon, without
/// anti-aliasing and with spikes where a noisy curve turns sharply.)
struct Polyline(Vec<(f64, f64)>, RGBColor);

impl<'a> PointCollection<'a, (f64, f64)> for &'a Polyline {
    type Point = &'a (f64, f64);
    type IntoIter = &'a [(f64, f64)];

    fn point_iter(self) -> Self::IntoIter {
        &self.0
    }
}

impl<DB: DrawingBackend> Drawable<DB> for Polyline {
    fn draw<I: Iterator<Item = (i32, i32)>>(
        &self,
        points: I,
        backend: &mut DB,
        _: (u32, u32),
    ) -> Result<(), DrawingErrorKind<DB::ErrorType>> {
        let points: Vec<(i32, i32)> = points.collect();
        for w in points.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            // The second line is one pixel across the segment's main direction.
            let (dx, dy) = if (y1 - y0).abs() > (x1 - x0).abs() {
                (1, 0)
            } else {
                (0, 1)
            };
            backend.draw_line((x0, y0), (x1, y1), &self.1)?;
            backend.draw_line((x0 + dx, y0 + dy), (x1 + dx, y1 + dy), &self.1)?;
        }
        Ok(())
    }
}

/// Draws `chart` into `cell`.
fn draw_chart(
    cell: &DrawingArea<TextBackend<'_>, Shift>,
    chart: &Chart,
) -> Result<(), Box<dyn Error>> {
    let (head, body) = cell.split_vertically(32);
    let centered = Pos::new(HPos::Center, VPos::Center);
    let middle = head.dim_in_pixel().0 as i32 / 2;
    head.draw_text(&chart.title, &text(16.0).pos(centered), (middle, 16))?;
    let legend_w = match chart.legend {
        Legend::Inside => 0,
        Legend::Right => {
            let mut w = 0;
            for s in &chart.series {
                w = w.max(body.estimate_text_size(&s.name, &text(12.0))?.0);
            }
            w as i32 + 44
        }
    };
    let (plot, side) = body.split_horizontally(body.dim_in_pixel().0 as i32 - legend_w);
    // The points of each line in axis space, without those the axes cannot show.
    let lines: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter_map(|&(x, y)| {
                    Some((to_axis(chart.x_scale, x)?, to_axis(chart.y_scale, y)?))
                })
                .collect()
        })
        .collect();
    let xa = Axis::fit(chart.x_scale, lines.iter().flatten().map(|p| p.0));
    let ya = Axis::fit(chart.y_scale, lines.iter().flatten().map(|p| p.1));
    let mut ctx = ChartBuilder::on(&plot)
        .margin(8)
        .margin_right(if chart.legend == Legend::Right { 8 } else { 20 })
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(xa.clone(), ya.clone())?;
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .axis_desc_style(text(13.0))
        .label_style(text(12.0))
        .x_label_formatter(&|t| xa.label(*t))
        .y_label_formatter(&|t| ya.label(*t))
        .bold_line_style(GRID)
        .light_line_style(MINOR_GRID)
        .axis_style(INK)
        .draw()?;

    let key_style = text(12.0).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (s, points)) in chart.series.iter().zip(lines).enumerate() {
        let color = PALETTE[s.color.unwrap_or(i) % PALETTE.len()];
        let marked = s.markers || points.len() == 1;
        let dots: Vec<Circle<(f64, f64), u32>> = if marked {
            points
                .iter()
                .map(|&p| Circle::new(p, 3, color.filled()))
                .collect()
        } else {
            Vec::new()
        };
        let line = ctx.draw_series([Polyline(points, color)])?;
        // The legend key: a short thick line with the series' marker (transparent if none).
        let marker = if marked {
            color.filled()
        } else {
            TRANSPARENT.filled()
        };
        let key = move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new([(0, 0), (20, 0)], color.stroke_width(3))
                + Circle::new((10, 0), 3, marker)
        };
        match chart.legend {
            Legend::Inside => {
                line.label(&s.name).legend(key);
            }
            Legend::Right => {
                let y = 18 + 18 * i as i32;
                side.draw(&key((6, y)))?;
                side.draw_text(&s.name, &key_style, (32, y))?;
            }
        }
        ctx.draw_series(dots)?;
    }
    if chart.legend == Legend::Inside && !chart.series.is_empty() {
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .margin(6)
            .legend_area_size(26)
            .label_font(text(12.0))
            .background_style(WHITE.mix(0.85))
            .border_style(GRID)
            .draw()?;
    }
    Ok(())
}

/// The embedded font, registered with plotters (once) for its text layout.
fn font() -> Result<FontRef<'static>, String> {
    static FONT_REF: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT_REF
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).ok()?;
            FontRef::try_from_slice(FONT_BYTES).ok()
        })
        .clone()
        .ok_or_else(|| "the embedded font does not parse".to_string())
}

/// Draws charts side by side (`columns` per row), each `size` pixels, into an RGB buffer of
/// `(width, height)` pixels.
fn render(
    charts: &[Chart],
    columns: usize,
    size: (usize, usize),
) -> Result<(Vec<u8>, u32, u32), String> {
    let font = font()?;
    let cols = columns.max(1).min(charts.len().max(1));
    let rows = charts.len().div_ceil(cols).max(1);
    let (width, height) = ((size.0 * cols) as u32, (size.1 * rows) as u32);
    let mut rgb = vec![255; width as usize * height as usize * 3];
    {
        let bitmap = BitMapBackend::with_buffer(&mut rgb, (width, height));
        let root = TextBackend::new(bitmap, font).into_drawing_area();
        for (chart, cell) in charts.iter().zip(root.split_evenly((rows, cols))) {
            draw_chart(&cell, chart).map_err(|e| format!("cannot draw {}: {e}", chart.title))?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok((rgb, width, height))
}

/// Draws charts side by side (`columns` per row) and saves the PNG.
///
/// # Errors
/// If the file cannot be written.
pub fn save_charts(charts: &[Chart], columns: usize, path: &Path) -> Result<(), String> {
    save_charts_sized(charts, columns, (640, 420), path)
}

/// [`save_charts`] with each chart `size = (width, height)` pixels.
///
/// # Errors
/// If the file cannot be written.
pub fn save_charts_sized(
    charts: &[Chart],
    columns: usize,
    size: (usize, usize),
    path: &Path,
) -> Result<(), String> {
    let (rgb, width, height) = render(charts, columns, size)?;
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&rgb))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(y_scale: Scale, legend: Legend) -> Chart {
        Chart {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            x_scale: Scale::Linear,
            y_scale,
            series: vec![Series {
                name: "train".into(),
                // NaN, zero and negative values must be skipped on the log axis.
                points: [(0.0, f64::NAN), (1.0, 0.0), (2.0, -1.0)]
                    .into_iter()
                    .chain((1..50).map(|i| (i as f64, 1.0 / i as f64)))
                    .collect(),
                markers: true,
                color: Some(3),
            }],
            legend,
        }
    }

    #[test]
    fn ticks_are_nice() {
        assert_eq!(
            linear_ticks(0.0, 1.0, 5),
            (vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0], 0.2)
        );
        assert_eq!(format_tick(2.5, 0.5), "2.5");
        assert_eq!(format_tick(1.25, 0.25), "1.25");
        assert_eq!(format_tick(0.6000000000000001, 0.2), "0.6");
        assert_eq!(format_tick(150000.0, 50000.0), "150000");
        assert_eq!(format_tick(1e6, 1e6), "1e6");
        assert_eq!(format_tick(1e-17, 0.5), "0");
        let labels = |a: Axis| a.ticks.into_iter().map(|t| t.1).collect::<Vec<_>>();
        let log =
            |lo: f64, hi: f64| labels(Axis::fit(Scale::Log, [lo.log10(), hi.log10()].into_iter()));
        assert_eq!(log(3.0, 40_000.0), ["10", "100", "1000", "10000"]);
        assert_eq!(log(256.0, 4096.0), ["500", "1000", "2000"]);
        assert_eq!(log(1300.0, 1700.0), ["1000", "2000"]);
        assert_eq!(log(2e-4, 3e-3), ["2e-4", "5e-4", "0.001", "0.002"]);
    }

    #[test]
    fn a_chart_has_ink_in_its_colour() {
        for (scale, legend) in [(Scale::Linear, Legend::Inside), (Scale::Log, Legend::Right)] {
            let (rgb, width, height) = render(&[chart(scale, legend)], 1, (320, 240)).unwrap();
            assert_eq!((width, height), (320, 240));
            let pixels: Vec<&[u8]> = rgb.chunks(3).collect();
            assert!(
                pixels
                    .iter()
                    .any(|p| p[0] < 100 && p[1] < 100 && p[2] < 100)
            );
            let RGBColor(r, g, b) = PALETTE[3];
            assert!(pixels.iter().any(|p| p == &[r, g, b]), "the line is drawn");
        }
    }

    #[test]
    fn a_written_png_decodes_to_the_grid_size() {
        let dir = std::env::temp_dir().join(format!("efformer-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.png");
        let charts = vec![chart(Scale::Log, Legend::Right); 3];
        save_charts_sized(&charts, 2, (300, 200), &path).unwrap();
        let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let info = png::Decoder::new(file).read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), (600, 400));
        std::fs::remove_dir_all(dir).ok();
    }
}
