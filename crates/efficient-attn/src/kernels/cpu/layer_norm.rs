//! Layer normalisation over the last axis, forward and backward, on `f32` slices.
//!
//! Each row is normalised in two vectorised passes (mean, then variance about it) and its
//! `(mean, 1/√(var + eps))` kept for the backward, which is one pass per row plus the column
//! sums of `dγ` and `dβ`; rows are split over all threads.

use rayon::prelude::*;

use super::simd::RowOps;
use super::zeros;

/// Rows per task.
const ROWS_PER_TASK: usize = 32;

/// The input and parameters, row-major: `x [rows, width]`, `gamma [width]`, `beta [width]`.
#[derive(Clone, Copy, Debug)]
pub struct Norm<'a> {
    /// Input.
    pub x: &'a [f32],
    /// Scale γ.
    pub gamma: &'a [f32],
    /// Shift β, if any.
    pub beta: Option<&'a [f32]>,
    /// Added to the variance.
    pub eps: f32,
}

impl Norm<'_> {
    fn width(&self) -> usize {
        let width = self.gamma.len();
        assert!(
            width > 0 && self.x.len().is_multiple_of(width),
            "layer norm: x has {} values, not rows of {width}",
            self.x.len()
        );
        if let Some(beta) = self.beta {
            assert_eq!(beta.len(), width, "layer norm: beta size");
        }
        width
    }
}

/// Forward: writes `y [rows, width]` and `stats [rows, 2]` (each row's mean and
/// `1/√(var + eps)`).
///
/// # Panics
/// If the sizes disagree.
pub fn forward(norm: Norm<'_>, y: &mut [f32], stats: &mut [f32]) {
    let width = norm.width();
    let rows = norm.x.len() / width;
    assert_eq!(y.len(), norm.x.len(), "layer norm: y size");
    assert_eq!(stats.len(), 2 * rows, "layer norm: stats size");
    let ops = RowOps::detect();
    let chunk = ROWS_PER_TASK * width;
    norm.x
        .par_chunks(chunk)
        .zip(y.par_chunks_mut(chunk))
        .zip(stats.par_chunks_mut(2 * ROWS_PER_TASK))
        .for_each(|((x, y), stats)| {
            for ((x, y), s) in x
                .chunks(width)
                .zip(y.chunks_mut(width))
                .zip(stats.chunks_mut(2))
            {
                let (mean, rstd) = ops.layer_norm(x, y, norm.gamma, norm.beta, norm.eps);
                s[0] = mean;
                s[1] = rstd;
            }
        });
}

/// The gradients of [`forward`]: `dx [rows, width]`, `dgamma [width]`, `dbeta [width]`.
pub struct Grads {
    /// Input gradient.
    pub dx: Vec<f32>,
    /// γ gradient.
    pub dgamma: Vec<f32>,
    /// β gradient.
    pub dbeta: Vec<f32>,
}

/// Backward of [`forward`] for the output gradient `dy`, given the forward's `stats`.
///
/// # Panics
/// If the sizes disagree.
pub fn backward(norm: Norm<'_>, stats: &[f32], dy: &[f32]) -> Grads {
    let width = norm.width();
    let rows = norm.x.len() / width;
    assert_eq!(dy.len(), norm.x.len(), "layer norm backward: dy size");
    assert_eq!(stats.len(), 2 * rows, "layer norm backward: stats size");
    let ops = RowOps::detect();
    let chunk = ROWS_PER_TASK * width;
    let mut dx = zeros(norm.x.len());
    let zeros = || (vec![0.0f32; width], vec![0.0f32; width]);
    let (dgamma, dbeta) = norm
        .x
        .par_chunks(chunk)
        .zip(dy.par_chunks(chunk))
        .zip(dx.par_chunks_mut(chunk))
        .zip(stats.par_chunks(2 * ROWS_PER_TASK))
        .fold(zeros, |(mut dgamma, mut dbeta), (((x, dy), dx), stats)| {
            for (((x, dy), dx), s) in x
                .chunks(width)
                .zip(dy.chunks(width))
                .zip(dx.chunks_mut(width))
                .zip(stats.chunks(2))
            {
                ops.layer_norm_grad(x, dy, norm.gamma, (s[0], s[1]), dx, &mut dgamma, &mut dbeta);
            }
            (dgamma, dbeta)
        })
        .reduce(zeros, |(mut g1, mut b1), (g2, b2)| {
            ops.add(&mut g1, &g2);
            ops.add(&mut b1, &b2);
            (g1, b1)
        });
    Grads { dx, dgamma, dbeta }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1009) as f32 / 300.0 - 1.5)
            .collect()
    }

    /// Layer norm of one row in f64, from its definition.
    fn reference(x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> Vec<f64> {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        x.iter()
            .zip(gamma.iter().zip(beta))
            .map(|(&v, (&g, &b))| (v as f64 - mean) / (var + eps).sqrt() * g as f64 + b as f64)
            .collect()
    }

    #[test]
    fn forward_matches_the_definition_and_backward_matches_finite_differences() {
        let (rows, width) = (70, 37);
        let x = values(rows * width, 1);
        let gamma = values(width, 2);
        let beta = values(width, 3);
        let norm = Norm {
            x: &x,
            gamma: &gamma,
            beta: Some(&beta),
            eps: 1e-5,
        };
        let mut y = vec![0.0; rows * width];
        let mut stats = vec![0.0; 2 * rows];
        forward(norm, &mut y, &mut stats);
        for r in 0..rows {
            let row = r * width..(r + 1) * width;
            let want = reference(&x[row.clone()], &gamma, &beta, 1e-5);
            for (got, want) in y[row].iter().zip(want) {
                assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
            }
        }
        // The loss Σ w ⊙ y, its gradients against central differences of the f64 reference.
        let w = values(rows * width, 4);
        let grads = backward(norm, &stats, &w);
        let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
            (0..rows)
                .map(|r| {
                    let row = r * width..(r + 1) * width;
                    reference(&x[row.clone()], gamma, beta, 1e-5)
                        .iter()
                        .zip(&w[row])
                        .map(|(y, w)| y * *w as f64)
                        .sum::<f64>()
                })
                .sum()
        };
        let h = 1e-2f32;
        let check = |got: f32, plus: f64, minus: f64| {
            let want = (plus - minus) / (2.0 * h as f64);
            assert!(
                (got as f64 - want).abs() < 2e-3 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        };
        for i in [0, 5, 36, 37, 800, rows * width - 1] {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            check(
                grads.dx[i],
                loss(&xp, &gamma, &beta),
                loss(&xm, &gamma, &beta),
            );
        }
        for j in [0, 17, 36] {
            let (mut gp, mut gm) = (gamma.clone(), gamma.clone());
            gp[j] += h;
            gm[j] -= h;
            check(grads.dgamma[j], loss(&x, &gp, &beta), loss(&x, &gm, &beta));
            let (mut bp, mut bm) = (beta.clone(), beta.clone());
            bp[j] += h;
            bm[j] -= h;
            check(grads.dbeta[j], loss(&x, &gamma, &bp), loss(&x, &gamma, &bm));
        }
    }
}
