//! Line charts as PNG files: training curves and benchmark plots.
//!
//! A small rasteriser (lines, markers, axes with "nice" ticks, linear or log scales, legend)
//! with text from an embedded DejaVu Sans Mono (`assets/`, Bitstream Vera licence), encoded by
//! the `png` crate. No system fonts or C libraries are needed.

use std::path::Path;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};

static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points `(x, y)`; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Whether to draw a marker at every point.
    pub markers: bool,
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

const PALETTE: [[u8; 3]; 18] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [0, 0, 128],
    [128, 0, 0],
    [0, 100, 0],
    [255, 0, 255],
    [80, 80, 0],
    [0, 160, 160],
    [255, 190, 0],
    [0, 0, 0],
];

/// An RGB image.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<[u8; 3]>,
    font: FontRef<'static>,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            pixels: vec![[255, 255, 255]; width * height],
            font: FontRef::try_from_slice(FONT_BYTES).expect("the embedded font parses"),
        }
    }

    fn blend(&mut self, x: i64, y: i64, color: [u8; 3], alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let p = &mut self.pixels[y as usize * self.width + x as usize];
        for c in 0..3 {
            p[c] = (p[c] as f32 * (1.0 - alpha) + color[c] as f32 * alpha).round() as u8;
        }
    }

    /// A line of the given width (Wu-style coverage by distance to the segment).
    pub fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: [u8; 3], width: f64) {
        let (minx, maxx) = (x0.min(x1) - width, x0.max(x1) + width);
        let (miny, maxy) = (y0.min(y1) - width, y0.max(y1) + width);
        let (dx, dy) = (x1 - x0, y1 - y0);
        let len2 = (dx * dx + dy * dy).max(1e-12);
        for y in miny.floor() as i64..=maxy.ceil() as i64 {
            for x in minx.floor() as i64..=maxx.ceil() as i64 {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let t = (((px - x0) * dx + (py - y0) * dy) / len2).clamp(0.0, 1.0);
                let (cx, cy) = (x0 + t * dx, y0 + t * dy);
                let d = ((px - cx).powi(2) + (py - cy).powi(2)).sqrt();
                let a = (width / 2.0 + 0.5 - d).clamp(0.0, 1.0);
                if a > 0.0 {
                    self.blend(x, y, color, a as f32);
                }
            }
        }
    }

    fn disc(&mut self, (cx, cy): (f64, f64), r: f64, color: [u8; 3]) {
        for y in (cy - r - 1.0).floor() as i64..=(cy + r + 1.0).ceil() as i64 {
            for x in (cx - r - 1.0).floor() as i64..=(cx + r + 1.0).ceil() as i64 {
                let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
                let a = (r + 0.5 - d).clamp(0.0, 1.0);
                if a > 0.0 {
                    self.blend(x, y, color, a as f32);
                }
            }
        }
    }

    /// The width of `text` in pixels at `size`.
    pub fn text_width(&self, text: &str, size: f32) -> f64 {
        let font = self.font.as_scaled(PxScale::from(size));
        text.chars()
            .map(|c| font.h_advance(font.glyph_id(c)) as f64)
            .sum()
    }

    /// Draws `text` with its top-left corner at `(x, y)`; `vertical` rotates it by 90°
    /// counter-clockwise (for y-axis labels), then `(x, y)` is its bottom-left corner.
    pub fn text(
        &mut self,
        text: &str,
        (x, y): (f64, f64),
        size: f32,
        color: [u8; 3],
        vertical: bool,
    ) {
        let scale = PxScale::from(size);
        let font = self.font.as_scaled(scale);
        let ascent = font.ascent();
        let mut caret = 0.0f32;
        let mut cover: Vec<(i64, i64, f32)> = Vec::new();
        for c in text.chars() {
            let id = font.glyph_id(c);
            let glyph = id.with_scale_and_position(scale, point(caret, ascent));
            caret += font.h_advance(id);
            if let Some(outline) = self.font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|gx, gy, v| {
                    cover.push((b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64, v));
                });
            }
        }
        for (gx, gy, v) in cover {
            let (px, py) = if vertical {
                (x as i64 + gy, y as i64 - gx)
            } else {
                (x as i64 + gx, y as i64 + gy)
            };
            self.blend(px, py, color, v.min(1.0));
        }
    }

    /// Writes the canvas as a PNG file.
    ///
    /// # Errors
    /// If the file cannot be written (the message names it).
    pub fn save_png(&self, path: &Path) -> Result<(), String> {
        let file = std::fs::File::create(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut encoder = png::Encoder::new(
            std::io::BufWriter::new(file),
            self.width as u32,
            self.height as u32,
        );
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let data: Vec<u8> = self.pixels.iter().flatten().copied().collect();
        writer
            .write_image_data(&data)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// "Nice" tick positions covering `[lo, hi]` (about `n` of them).
fn linear_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 || (v.fract() == 0.0) {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

struct Axis {
    scale: Scale,
    lo: f64,
    hi: f64,
}

impl Axis {
    fn fit(scale: Scale, values: impl Iterator<Item = f64>) -> Self {
        let vals: Vec<f64> = values
            .filter(|v| v.is_finite() && (scale == Scale::Linear || *v > 0.0))
            .map(|v| if scale == Scale::Log { v.log10() } else { v })
            .collect();
        let (mut lo, mut hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if (hi - lo).abs() < 1e-12 {
            lo -= 0.5;
            hi += 0.5;
        }
        let pad = (hi - lo) * 0.05;
        if scale == Scale::Log {
            (lo, hi) = (lo.floor(), hi.ceil());
        } else {
            (lo, hi) = (lo - pad, hi + pad);
        }
        Self { scale, lo, hi }
    }

    fn position(&self, v: f64) -> Option<f64> {
        let v = match self.scale {
            Scale::Log if v <= 0.0 => return None,
            Scale::Log => v.log10(),
            Scale::Linear => v,
        };
        v.is_finite().then(|| (v - self.lo) / (self.hi - self.lo))
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        match self.scale {
            Scale::Linear => linear_ticks(self.lo, self.hi, 6)
                .into_iter()
                .map(|v| ((v - self.lo) / (self.hi - self.lo), format_tick(v)))
                .collect(),
            Scale::Log => (self.lo as i64..=self.hi as i64)
                .map(|e| {
                    (
                        (e as f64 - self.lo) / (self.hi - self.lo),
                        format_tick(10f64.powi(e as i32)),
                    )
                })
                .collect(),
        }
    }
}

/// Draws `chart` into the rectangle `(x, y, w, h)` of `canvas`.
pub fn draw_chart(canvas: &mut Canvas, chart: &Chart, (x, y, w, h): (f64, f64, f64, f64)) {
    let ink = [40, 40, 40];
    let grid = [225, 225, 225];
    let legend_w = match chart.legend {
        Legend::Inside => 0.0,
        Legend::Right => {
            chart
                .series
                .iter()
                .map(|s| canvas.text_width(&s.name, 12.0))
                .fold(0.0, f64::max)
                + 40.0
        }
    };
    let (left, right, top, bottom) = (x + 70.0, x + w - 20.0 - legend_w, y + 34.0, y + h - 50.0);
    let title_w = canvas.text_width(&chart.title, 16.0);
    canvas.text(
        &chart.title,
        (x + (w - title_w) / 2.0, y + 8.0),
        16.0,
        ink,
        false,
    );
    let xa = Axis::fit(
        chart.x_scale,
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0)),
    );
    let ya = Axis::fit(
        chart.y_scale,
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1)),
    );
    let px = |t: f64| left + t * (right - left);
    let py = |t: f64| bottom - t * (bottom - top);
    for (t, label) in xa.ticks() {
        canvas.line((px(t), top), (px(t), bottom), grid, 1.0);
        let tw = canvas.text_width(&label, 12.0);
        canvas.text(&label, (px(t) - tw / 2.0, bottom + 6.0), 12.0, ink, false);
    }
    for (t, label) in ya.ticks() {
        canvas.line((left, py(t)), (right, py(t)), grid, 1.0);
        let tw = canvas.text_width(&label, 12.0);
        canvas.text(&label, (left - tw - 6.0, py(t) - 8.0), 12.0, ink, false);
    }
    canvas.line((left, bottom), (right, bottom), ink, 1.2);
    canvas.line((left, top), (left, bottom), ink, 1.2);
    let xw = canvas.text_width(&chart.x_label, 13.0);
    canvas.text(
        &chart.x_label,
        ((left + right - xw) / 2.0, bottom + 26.0),
        13.0,
        ink,
        false,
    );
    let yw = canvas.text_width(&chart.y_label, 13.0);
    canvas.text(
        &chart.y_label,
        (x + 6.0, (top + bottom + yw) / 2.0),
        13.0,
        ink,
        true,
    );

    for (i, s) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter_map(|&(a, b)| Some((px(xa.position(a)?), py(ya.position(b)?))))
            .collect();
        for w in pts.windows(2) {
            canvas.line(w[0], w[1], color, 2.0);
        }
        if s.markers || pts.len() == 1 {
            for &p in &pts {
                canvas.disc(p, 3.0, color);
            }
        }
        // Legend, one line per series: top-right inside the plot, or in the right column.
        let ly = top + 6.0 + 18.0 * i as f64;
        let lx = match chart.legend {
            Legend::Inside => right - canvas.text_width(&s.name, 12.0) - 30.0,
            Legend::Right => right + 14.0,
        };
        canvas.line((lx, ly + 8.0), (lx + 20.0, ly + 8.0), color, 3.0);
        canvas.text(&s.name, (lx + 24.0, ly), 12.0, ink, false);
    }
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
    let (cw, ch) = (size.0 as f64, size.1 as f64);
    let cols = columns.max(1).min(charts.len().max(1));
    let rows = charts.len().div_ceil(cols).max(1);
    let mut canvas = Canvas::new((cw * cols as f64) as usize, (ch * rows as f64) as usize);
    for (i, chart) in charts.iter().enumerate() {
        let (c, r) = (i % cols, i / cols);
        draw_chart(&mut canvas, chart, (c as f64 * cw, r as f64 * ch, cw, ch));
    }
    canvas.save_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice() {
        assert_eq!(
            linear_ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(format_tick(2.5), "2.5");
        assert_eq!(format_tick(1e6), "1e6");
    }

    #[test]
    fn a_chart_is_written_and_has_ink() {
        let dir = std::env::temp_dir().join(format!("efformer-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.png");
        let chart = Chart {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: vec![Series {
                name: "train".into(),
                points: (1..50).map(|i| (i as f64, 1.0 / i as f64)).collect(),
                markers: false,
            }],
            legend: Legend::Right,
        };
        save_charts(&[chart.clone(), chart], 2, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let mut canvas = Canvas::new(100, 40);
        canvas.text("Ag", (2.0, 2.0), 20.0, [0, 0, 0], false);
        assert!(
            canvas.pixels.iter().any(|p| p[0] < 128),
            "text must draw pixels"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
