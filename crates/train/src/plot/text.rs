//! A bitmap backend that sets text itself.
//!
//! Plotters 0.3.7 rasterises `ab_glyph` text by placing each glyph's outline at the pen
//! position, dropping the glyph's left side bearing, so narrow glyphs sit at the left of their
//! cell ("0.01" reads "0. 01", "cuda:0" reads "cuda: 0"). [`TextBackend`] wraps plotters'
//! [`BitMapBackend`] and draws text with `ab_glyph` directly, each outline at its own pixel
//! bounds; everything else goes to the wrapped backend.
//!
//! Text still takes its box from plotters' font layout (the advances and kerning summed, a
//! height of the size / 1.24), so that the anchors, the label areas and plotters' own layout of
//! legend lines agree with what is drawn.

use ab_glyph::{Font, FontRef, ScaleFont, point};
use plotters::prelude::{BitMapBackend, DrawingBackend};
use plotters_backend::DrawingErrorKind;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendStyle, BackendTextStyle};

/// [`BitMapBackend`] with text set in one font, glyphs placed by their outline bounds.
pub(super) struct TextBackend<'a> {
    inner: BitMapBackend<'a>,
    font: FontRef<'static>,
}

impl<'a> TextBackend<'a> {
    /// `inner`, drawing all text in `font` (whatever family a text style names).
    pub(super) fn new(inner: BitMapBackend<'a>, font: FontRef<'static>) -> Self {
        Self { inner, font }
    }
}

/// The wrapped backend's error.
type Error = <BitMapBackend<'static> as DrawingBackend>::ErrorType;
/// What the drawing methods return.
type Drawn = Result<(), DrawingErrorKind<Error>>;

impl DrawingBackend for TextBackend<'_> {
    type ErrorType = Error;

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Drawn {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let ((x0, y0), (x1, y1)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (w, h) = (x1 - x0, y1 - y0);
        // The box's top-left corner, relative to the anchor, before rotation.
        let left = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Center => -w / 2,
            HPos::Right => -w,
        };
        let top = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let font = self.font.as_scaled(style.size() as f32);
        // The span from ascent to descent centred in the box, on a whole pixel so that the
        // horizontal strokes stay sharp.
        let baseline = ((h as f32 + font.ascent() + font.descent()) / 2.0).round();
        let transform = style.transform();
        let mut result = Ok(());
        let (mut caret, mut previous) = (0.0, None);
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(previous) = previous {
                caret += font.kern(previous, id);
            }
            previous = Some(id);
            let glyph = id.with_scale_and_position(font.scale(), point(caret, baseline));
            caret += font.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue;
            };
            let min = outline.px_bounds().min;
            outline.draw(|gx, gy, coverage| {
                let (x, y) = transform.transform(
                    left + min.x as i32 + gx as i32,
                    top + min.y as i32 + gy as i32,
                );
                let alpha = color.alpha * f64::from(coverage.min(1.0));
                if result.is_ok() {
                    // The bitmap skips the pixels outside it.
                    let point = (pos.0 + x, pos.1 + y);
                    result = self
                        .inner
                        .draw_pixel(point, BackendColor { alpha, ..color });
                }
            });
            if result.is_err() {
                break;
            }
        }
        result
    }

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Drawn {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Drawn {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Drawn {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Drawn {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Drawn {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Drawn {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Drawn {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Drawn {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Drawn {
        self.inner.blit_bitmap(pos, size, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_narrow_glyph_sits_in_the_middle_of_its_cell() {
        let font = super::super::font().unwrap();
        let advance = font.as_scaled(20.0).h_advance(font.glyph_id('.'));
        let (width, height) = (40, 30);
        let mut rgb = vec![255; width * height * 3];
        let bitmap = BitMapBackend::with_buffer(&mut rgb, (width as u32, height as u32));
        let mut backend = TextBackend::new(bitmap, font);
        backend
            .draw_text(".", &super::super::text(20.0), (10, 0))
            .unwrap();
        drop(backend);
        let inked: Vec<usize> = (0..width)
            .filter(|x| (0..height).any(|y| rgb[(y * width + x) * 3] < 128))
            .collect();
        let middle = (inked[0] + inked[inked.len() - 1] + 1) as f32 / 2.0;
        // Plotters 0.3.7 puts the dot at the left edge of its cell, at x = 10.
        assert!((middle - (10.0 + advance / 2.0)).abs() <= 1.0, "{inked:?}");
    }
}
