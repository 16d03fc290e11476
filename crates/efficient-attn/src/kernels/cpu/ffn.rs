//! The position-wise feed-forward block `y = act(x W₁ + b₁) W₂ + b₂` (with an optional dropout
//! mask on the activation), forward and backward, on `f32` slices.
//!
//! Three multi-threaded GEMMs forward (two, plus the bias-and-activation pass fused and split
//! over rows), five backward; the pre-activation `z` is what the backward keeps (the
//! activation is recomputed from it). Everything element-wise runs on all threads, vectorised.

use rayon::prelude::*;

use super::gemm::{Mat, MatMut, gemm_parallel};
use super::simd::{Activation, RowOps};
use super::zeros;

/// The block's sizes: `rows` positions of width `d_model`, hidden width `d_ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Positions (batch × sequence).
    pub rows: usize,
    /// Model width.
    pub d_model: usize,
    /// Hidden width.
    pub d_ff: usize,
}

/// The parameters and input, row-major: `x [rows, d_model]`, `w1 [d_model, d_ff]`,
/// `b1 [d_ff]`, `w2 [d_ff, d_model]`, `b2 [d_model]`, `mask [rows, d_ff]`.
#[derive(Clone, Copy, Debug)]
pub struct Block<'a> {
    /// Input.
    pub x: &'a [f32],
    /// First weight.
    pub w1: &'a [f32],
    /// First bias.
    pub b1: Option<&'a [f32]>,
    /// Second weight.
    pub w2: &'a [f32],
    /// Second bias.
    pub b2: Option<&'a [f32]>,
    /// Dropout mask on the activation (0 or `1/(1-p)`), if any.
    pub mask: Option<&'a [f32]>,
    /// Activation.
    pub activation: Activation,
}

impl Block<'_> {
    fn check(&self, d: &Dims) {
        assert_eq!(self.x.len(), d.rows * d.d_model, "feed-forward: x size");
        assert_eq!(self.w1.len(), d.d_model * d.d_ff, "feed-forward: w1 size");
        assert_eq!(self.w2.len(), d.d_ff * d.d_model, "feed-forward: w2 size");
        if let Some(b) = self.b1 {
            assert_eq!(b.len(), d.d_ff, "feed-forward: b1 size");
        }
        if let Some(b) = self.b2 {
            assert_eq!(b.len(), d.d_model, "feed-forward: b2 size");
        }
        if let Some(m) = self.mask {
            assert_eq!(m.len(), d.rows * d.d_ff, "feed-forward: mask size");
        }
    }
}

/// Rows per element-wise task.
const ROWS_PER_TASK: usize = 64;

/// Forward: writes `y [rows, d_model]` and the pre-activation `z [rows, d_ff]`.
///
/// # Panics
/// If a slice's size does not match `dims`.
pub fn forward(block: Block<'_>, dims: Dims, y: &mut [f32], z: &mut [f32]) {
    block.check(&dims);
    let Dims {
        rows,
        d_model,
        d_ff,
    } = dims;
    assert_eq!(y.len(), rows * d_model, "feed-forward: y size");
    assert_eq!(z.len(), rows * d_ff, "feed-forward: z size");
    let ops = RowOps::detect();
    gemm_parallel(
        MatMut::rows(z, rows, d_ff, d_ff),
        Mat::rows(block.x, rows, d_model, d_model),
        Mat::rows(block.w1, d_model, d_ff, d_ff),
        0.0,
        1.0,
    );
    let mut a = zeros(rows * d_ff);
    let chunk = ROWS_PER_TASK * d_ff;
    z.par_chunks_mut(chunk)
        .zip(a.par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(t, (z, a))| {
            for (r, (z, a)) in z.chunks_mut(d_ff).zip(a.chunks_mut(d_ff)).enumerate() {
                let row = t * ROWS_PER_TASK + r;
                let mask = block.mask.map(|m| &m[row * d_ff..(row + 1) * d_ff]);
                ops.bias_activation(z, a, block.b1, mask, block.activation);
            }
        });
    match block.b2 {
        Some(b2) => y
            .par_chunks_mut(d_model)
            .for_each(|row| row.copy_from_slice(b2)),
        None => y.fill(0.0),
    }
    gemm_parallel(
        MatMut::rows(y, rows, d_model, d_model),
        Mat::rows(&a, rows, d_ff, d_ff),
        Mat::rows(block.w2, d_ff, d_model, d_model),
        1.0,
        1.0,
    );
}

/// The gradients of [`forward`]: `(dx, dw1, db1, dw2, db2)` for the output gradient `dy`,
/// given the forward's pre-activation `z`.
pub struct Grads {
    /// `[rows, d_model]`.
    pub dx: Vec<f32>,
    /// `[d_model, d_ff]`.
    pub dw1: Vec<f32>,
    /// `[d_ff]`.
    pub db1: Vec<f32>,
    /// `[d_ff, d_model]`.
    pub dw2: Vec<f32>,
    /// `[d_model]`.
    pub db2: Vec<f32>,
}

/// Backward of [`forward`].
///
/// # Panics
/// If a slice's size does not match `dims`.
pub fn backward(block: Block<'_>, dims: Dims, z: &[f32], dy: &[f32]) -> Grads {
    block.check(&dims);
    let Dims {
        rows,
        d_model,
        d_ff,
    } = dims;
    assert_eq!(z.len(), rows * d_ff, "feed-forward backward: z size");
    assert_eq!(dy.len(), rows * d_model, "feed-forward backward: dy size");
    let ops = RowOps::detect();
    // da = dy W₂ᵀ, then the activation (recomputed) and dz = da ⊙ mask ⊙ act'(z) in place.
    let mut a = zeros(rows * d_ff);
    let mut g = zeros(rows * d_ff);
    gemm_parallel(
        MatMut::rows(&mut g, rows, d_ff, d_ff),
        Mat::rows(dy, rows, d_model, d_model),
        Mat::transposed(block.w2, d_model, d_ff, d_model),
        0.0,
        1.0,
    );
    let chunk = ROWS_PER_TASK * d_ff;
    a.par_chunks_mut(chunk)
        .zip(g.par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(t, (a, g))| {
            for (r, (a, g)) in a.chunks_mut(d_ff).zip(g.chunks_mut(d_ff)).enumerate() {
                let row = t * ROWS_PER_TASK + r;
                let span = row * d_ff..(row + 1) * d_ff;
                let mask = block.mask.map(|m| &m[span.clone()]);
                ops.activation_grad(&z[span], a, g, mask, block.activation);
            }
        });
    // dW₂ = aᵀ dy, dW₁ = xᵀ dz, dx = dz W₁ᵀ.
    let mut dw2 = vec![0.0f32; d_ff * d_model];
    gemm_parallel(
        MatMut::rows(&mut dw2, d_ff, d_model, d_model),
        Mat::transposed(&a, d_ff, rows, d_ff),
        Mat::rows(dy, rows, d_model, d_model),
        0.0,
        1.0,
    );
    let mut dw1 = vec![0.0f32; d_model * d_ff];
    gemm_parallel(
        MatMut::rows(&mut dw1, d_model, d_ff, d_ff),
        Mat::transposed(block.x, d_model, rows, d_model),
        Mat::rows(&g, rows, d_ff, d_ff),
        0.0,
        1.0,
    );
    let mut dx = zeros(rows * d_model);
    gemm_parallel(
        MatMut::rows(&mut dx, rows, d_model, d_model),
        Mat::rows(&g, rows, d_ff, d_ff),
        Mat::transposed(block.w1, d_ff, d_model, d_ff),
        0.0,
        1.0,
    );
    Grads {
        dx,
        dw1,
        db1: column_sums(&ops, &g, d_ff),
        dw2,
        db2: column_sums(&ops, dy, d_model),
    }
}

/// The sums of the columns of a row-major matrix of width `width`.
fn column_sums(ops: &RowOps, m: &[f32], width: usize) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    m.par_chunks(ROWS_PER_TASK * width)
        .map(|block| {
            let mut acc = vec![0.0f32; width];
            for row in block.chunks(width) {
                ops.add(&mut acc, row);
            }
            acc
        })
        .reduce(
            || vec![0.0f32; width],
            |mut a, b| {
                ops.add(&mut a, &b);
                a
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gelu(x: f64) -> f64 {
        // Φ from erf by the series in simd's tests is enough here: compare in f64 with the
        // f32 kernel at 1e-5.
        let erf = |x: f64| {
            if x.abs() > 4.0 {
                return x.signum();
            }
            let (mut term, mut sum) = (x, x);
            for n in 1..120 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
    }

    #[test]
    fn forward_matches_a_naive_loop_with_biases_and_a_mask() {
        let dims = Dims {
            rows: 70,
            d_model: 6,
            d_ff: 9,
        };
        let val = |n: usize, s: u32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ s) % 997) as f32 / 498.0 - 1.0)
                .collect()
        };
        let (x, w1, b1, w2, b2) = (
            val(70 * 6, 1),
            val(6 * 9, 2),
            val(9, 3),
            val(9 * 6, 4),
            val(6, 5),
        );
        let mask: Vec<f32> = (0..70 * 9)
            .map(|i| if i % 7 == 0 { 0.0 } else { 1.25 })
            .collect();
        let block = Block {
            x: &x,
            w1: &w1,
            b1: Some(&b1),
            w2: &w2,
            b2: Some(&b2),
            mask: Some(&mask),
            activation: Activation::Gelu,
        };
        let mut y = vec![0.0; 70 * 6];
        let mut z = vec![0.0; 70 * 9];
        forward(block, dims, &mut y, &mut z);
        for r in 0..70 {
            let hidden: Vec<f64> = (0..9)
                .map(|f| {
                    let pre: f64 = b1[f] as f64
                        + (0..6)
                            .map(|c| (x[r * 6 + c] * w1[c * 9 + f]) as f64)
                            .sum::<f64>();
                    gelu(pre) * mask[r * 9 + f] as f64
                })
                .collect();
            for c in 0..6 {
                let want: f64 = b2[c] as f64
                    + (0..9)
                        .map(|f| hidden[f] * w2[f * 6 + c] as f64)
                        .sum::<f64>();
                assert!(
                    (y[r * 6 + c] as f64 - want).abs() < 1e-5,
                    "{} vs {want}",
                    y[r * 6 + c]
                );
            }
        }
    }
}
