//! Performer's positive random features (FAVOR+), forward and backward, on `f32` slices:
//! `φ(x) = exp(ω x̂ + o − [‖x̂‖²/2] − shift) / √m` with `x̂ = x·d^(-1/4)`, for every row of
//! every (batch, head) slice.
//!
//! One task per (batch, head): a GEMM for `ω x̂`, then vectorised row passes for the offset,
//! the norm term, the stabilising shift (per row, per slice, or none) and `exp`; padded rows
//! are zero. The shift is a constant of the backward (it cancels in attention's ratio, and the
//! composed implementation detaches it), so `∂φ/∂logit = φ` and the backward is one GEMM
//! (`dx = d^(-1/4)·(dφ ⊙ φ) ω`) plus the norm term's `−rowsum(dφ ⊙ φ)·x/√d`.

use rayon::prelude::*;

use super::gemm::{Mat, MatMut, gemm};
use super::simd::RowOps;
use super::zeros;

/// The stabilising shift subtracted from every logit before `exp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shift {
    /// Each row's maximum (queries: it cancels in the attention ratio).
    Row,
    /// The maximum over the slice's unpadded rows (keys, bidirectional).
    Slice,
    /// None (causal keys, whose logits are `≤ 0` by the offset).
    None,
}

/// The map: `omega [m, d]`, an additive `offset [m]`, whether `‖x̂‖²/2` is subtracted, the
/// shift, and `keep [batch, seq]` (1 = a real row, 0 = padded, whose features are zero).
#[derive(Clone, Copy, Debug)]
pub struct Map<'a> {
    /// Random directions, row-major `[m, d]`.
    pub omega: &'a [f32],
    /// Added to every logit, per feature (`±‖ω_i‖²/2` in causal mode).
    pub offset: Option<&'a [f32]>,
    /// Whether `‖x̂‖²/2` is subtracted (keys; for queries it cancels in the ratio).
    pub norm_term: bool,
    /// The stabiliser.
    pub shift: Shift,
    /// Which rows are real, if any are padded.
    pub keep: Option<&'a [f32]>,
}

/// `x [batch, heads, seq, d]` → `φ [batch, heads, seq, m]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Rows per slice.
    pub seq: usize,
    /// Input width.
    pub d: usize,
    /// Features.
    pub m: usize,
}

impl Shape {
    fn check(&self, map: &Map<'_>, x: &[f32]) {
        assert_eq!(
            x.len(),
            self.batch * self.heads * self.seq * self.d,
            "favor: x size"
        );
        assert_eq!(map.omega.len(), self.m * self.d, "favor: omega size");
        if let Some(o) = map.offset {
            assert_eq!(o.len(), self.m, "favor: offset size");
        }
        if let Some(k) = map.keep {
            assert_eq!(k.len(), self.batch * self.seq, "favor: keep size");
        }
    }

    fn keep_row(&self, map: &Map<'_>, slice: usize, row: usize) -> bool {
        map.keep
            .is_none_or(|k| k[(slice / self.heads) * self.seq + row] != 0.0)
    }
}

/// Forward: writes `phi [batch, heads, seq, m]`.
///
/// # Panics
/// If the sizes disagree.
pub fn forward(map: Map<'_>, shape: Shape, x: &[f32], phi: &mut [f32]) {
    shape.check(&map, x);
    let Shape { seq, d, m, .. } = shape;
    assert_eq!(phi.len(), x.len() / d.max(1) * m, "favor: phi size");
    if seq * m == 0 {
        return;
    }
    let ops = RowOps::detect();
    let x_scale = (d as f32).powf(-0.25);
    let out_scale = 1.0 / (m as f32).sqrt();
    phi.par_chunks_mut(seq * m)
        .zip(x.par_chunks(seq * d))
        .enumerate()
        .for_each(|(s, (phi, x))| {
            gemm(
                MatMut::rows(phi, seq, m, m),
                Mat::rows(x, seq, d, d),
                Mat::transposed(map.omega, d, m, d),
                0.0,
                x_scale,
            );
            // Each row's maximum of `ω x̂ + o`, and its norm term.
            let mut row_max = vec![0.0f32; seq];
            let mut norm = vec![0.0f32; seq];
            for (r, row) in phi.chunks_mut(m).enumerate() {
                row_max[r] = ops.scale_bias_max(row, 1.0, map.offset);
                if map.norm_term {
                    let xr = &x[r * d..(r + 1) * d];
                    norm[r] = 0.5 * x_scale * x_scale * ops.dot(xr, xr);
                }
            }
            let slice_max = (map.shift == Shift::Slice).then(|| {
                (0..seq)
                    .filter(|&r| shape.keep_row(&map, s, r))
                    .map(|r| row_max[r] - norm[r])
                    .fold(f32::NEG_INFINITY, f32::max)
            });
            for (r, row) in phi.chunks_mut(m).enumerate() {
                if !shape.keep_row(&map, s, r) {
                    row.fill(0.0);
                    continue;
                }
                let shift = match map.shift {
                    // The norm term is constant along the row: it cancels with the row's own.
                    Shift::Row => row_max[r],
                    Shift::Slice => norm[r] + slice_max.unwrap_or(0.0),
                    Shift::None => norm[r],
                };
                ops.exp_sum(row, shift);
                ops.scale(row, out_scale);
            }
        });
}

/// Backward of [`forward`]: `dx [batch, heads, seq, d]` for the output gradient `dphi`,
/// given the forward's output `phi`.
///
/// # Panics
/// If the sizes disagree.
pub fn backward(map: Map<'_>, shape: Shape, x: &[f32], phi: &[f32], dphi: &[f32]) -> Vec<f32> {
    shape.check(&map, x);
    let Shape { seq, d, m, .. } = shape;
    assert_eq!(phi.len(), dphi.len(), "favor backward: dphi size");
    assert_eq!(
        phi.len(),
        x.len() / d.max(1) * m,
        "favor backward: phi size"
    );
    let mut dx = zeros(x.len());
    if seq * m * d == 0 {
        return dx;
    }
    let x_scale = (d as f32).powf(-0.25);
    dx.par_chunks_mut(seq * d)
        .zip(x.par_chunks(seq * d))
        .zip(phi.par_chunks(seq * m).zip(dphi.par_chunks(seq * m)))
        .for_each(|((dx, x), (phi, dphi))| {
            // d logit = dφ ⊙ φ (zero on padded rows, whose φ is zero).
            let dl: Vec<f32> = dphi.iter().zip(phi).map(|(g, p)| g * p).collect();
            gemm(
                MatMut::rows(dx, seq, d, d),
                Mat::rows(&dl, seq, m, m),
                Mat::rows(map.omega, m, d, d),
                0.0,
                x_scale,
            );
            if map.norm_term {
                let factor = x_scale * x_scale;
                for ((dx, x), dl) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dl.chunks(m)) {
                    let total: f32 = dl.iter().sum();
                    for (g, v) in dx.iter_mut().zip(x) {
                        *g -= total * factor * v;
                    }
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32, spread: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1009) as f32 / 504.0 - 1.0)
                    * spread
            })
            .collect()
    }

    /// φ in f64 from the definition, for one slice.
    fn reference(map: &Map<'_>, shape: Shape, x: &[f32], slice: usize) -> Vec<f64> {
        let Shape { seq, d, m, .. } = shape;
        let xs = (d as f64).powf(-0.25);
        let x = &x[slice * seq * d..(slice + 1) * seq * d];
        let keep = |r: usize| shape.keep_row(map, slice, r);
        let logits: Vec<Vec<f64>> = (0..seq)
            .map(|r| {
                let xr: Vec<f64> = x[r * d..(r + 1) * d]
                    .iter()
                    .map(|&v| v as f64 * xs)
                    .collect();
                let norm = if map.norm_term {
                    xr.iter().map(|v| v * v).sum::<f64>() / 2.0
                } else {
                    0.0
                };
                (0..m)
                    .map(|i| {
                        let w = &map.omega[i * d..(i + 1) * d];
                        let dot: f64 = xr.iter().zip(w).map(|(a, b)| a * *b as f64).sum();
                        dot + map.offset.map_or(0.0, |o| o[i] as f64) - norm
                    })
                    .collect()
            })
            .collect();
        let slice_max = (0..seq)
            .filter(|&r| keep(r))
            .flat_map(|r| logits[r].iter().copied())
            .fold(f64::NEG_INFINITY, f64::max);
        let mut out = Vec::new();
        for (r, row) in logits.iter().enumerate() {
            let shift = match map.shift {
                Shift::Row => row.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                Shift::Slice => slice_max,
                Shift::None => 0.0,
            };
            for &l in row {
                out.push(if keep(r) {
                    (l - shift).exp() / (m as f64).sqrt()
                } else {
                    0.0
                });
            }
        }
        out
    }

    #[test]
    fn features_match_the_definition_and_the_backward_finite_differences() {
        let shape = Shape {
            batch: 2,
            heads: 2,
            seq: 9,
            d: 5,
            m: 19,
        };
        let n = shape.batch * shape.heads * shape.seq * shape.d;
        let x = values(n, 1, 1.5);
        let omega = values(shape.m * shape.d, 2, 1.2);
        let offset = values(shape.m, 3, 0.5);
        let keep: Vec<f32> = (0..shape.batch * shape.seq)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 })
            .collect();
        let w = values(n / shape.d * shape.m, 4, 1.0);
        for (norm_term, shift, offset, keep) in [
            (false, Shift::Row, None, None),
            (true, Shift::Slice, None, Some(&keep[..])),
            (true, Shift::None, Some(&offset[..]), None),
            (false, Shift::Row, Some(&offset[..]), Some(&keep[..])),
        ] {
            let map = Map {
                omega: &omega,
                offset,
                norm_term,
                shift,
                keep,
            };
            let mut phi = vec![0.0; n / shape.d * shape.m];
            forward(map, shape, &x, &mut phi);
            let slices = shape.batch * shape.heads;
            let per = shape.seq * shape.m;
            for s in 0..slices {
                let want = reference(&map, shape, &x, s);
                for (got, want) in phi[s * per..(s + 1) * per].iter().zip(want) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-5 * want.abs().max(1e-3),
                        "{shift:?}: {got} vs {want}"
                    );
                }
            }
            let dx = backward(map, shape, &x, &phi, &w);
            // The loss Σ w ⊙ φ with the shift pinned at its unperturbed value (the backward
            // treats it as a constant): unshifted features of the perturbed input, scaled by
            // the unperturbed e^(-shift).
            let pinned = |xp: &[f32]| -> f64 {
                (0..slices)
                    .map(|s| {
                        let base = reference(&map, shape, &x, s);
                        let moved = reference(
                            &Map {
                                shift: Shift::None,
                                ..map
                            },
                            shape,
                            xp,
                            s,
                        );
                        let unshifted = reference(
                            &Map {
                                shift: Shift::None,
                                ..map
                            },
                            shape,
                            &x,
                            s,
                        );
                        // base = unshifted · e^(-shift): scale the moved features alike.
                        moved
                            .iter()
                            .zip(base.iter().zip(&unshifted))
                            .zip(&w[s * per..(s + 1) * per])
                            .map(|((mv, (b, u)), w)| {
                                let ratio = if *u == 0.0 { 0.0 } else { b / u };
                                mv * ratio * *w as f64
                            })
                            .sum::<f64>()
                    })
                    .sum()
            };
            let h = 1e-3f32;
            for i in [0, 4, 7, 33, n / 2, n - 1] {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                let want = (pinned(&xp) - pinned(&xm)) / (2.0 * h as f64);
                assert!(
                    (dx[i] as f64 - want).abs() < 2e-3 * want.abs().max(1e-2),
                    "{shift:?}, dx[{i}]: {} vs {want}",
                    dx[i]
                );
            }
        }
    }
}
