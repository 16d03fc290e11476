//! The element-wise row operations of the fused kernels (online softmax, activations, layer
//! normalisation), vectorised.
//!
//! Each operation is written once as plain Rust over slices (a polynomial `exp` the compiler
//! vectorises, per-lane partial sums and maxima so that reductions vectorise without
//! reassociating floating-point sums) and compiled three times: for AVX-512, for AVX2 + FMA,
//! and for the baseline target. [`RowOps::detect`] picks the widest the CPU supports, once per
//! kernel call; the portable build is the fallback on other CPUs and architectures.
//!
//! Over 600 lines on purpose: this is one of the two files allowed `unsafe` (calling a
//! `#[target_feature]` function after the feature check), so every row operation lives here
//! rather than next to the kernel that uses it.

/// Lanes of the partial sums and maxima (one AVX-512 register of `f32`).
const LANES: usize = 16;

/// `exp(x)` for `x ≤ 88`, within 2 ulp on `[-87.3, 88]`; `0` below `-87.3` (so `-∞`, a masked
/// score, gives exactly 0). Cody–Waite range reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`,
/// then a degree-6 polynomial of `e^r` and the exponent bits of `2^n`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// `a·b + c`, fused into one instruction when `FMA` (only in code compiled with the `fma`
/// target feature: elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// [`exp`], its polynomial in fused multiply-adds when `FMA`.
#[inline(always)]
fn exp_with<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.0);
    // `t`'s low mantissa bits hold the integer n: no float-to-int conversion (which does not
    // vectorise, `as` being saturating).
    let t = madd::<FMA>(clamped, LOG2E, ROUND);
    let n = t - ROUND;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, clamped));
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 5e-1);
    let e = madd::<FMA>(p * r, r, r) + 1.0;
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if x < -87.3 { 0.0 } else { e * scale }
}

/// `row[j] = row[j]·scale + bias[j]` (the bias is 0 or `-∞` per key), returning the row's
/// maximum (`-∞` if every entry is masked).
#[inline(always)]
fn scale_bias_max_generic(row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    match bias {
        Some(bias) => {
            let bias = &bias[..row.len()];
            let mut chunks = row.chunks_exact_mut(LANES);
            let mut bias_chunks = bias.chunks_exact(LANES);
            for (c, b) in (&mut chunks).zip(&mut bias_chunks) {
                for l in 0..LANES {
                    c[l] = c[l] * scale + b[l];
                    lanes[l] = lanes[l].max(c[l]);
                }
            }
            for (x, b) in chunks
                .into_remainder()
                .iter_mut()
                .zip(bias_chunks.remainder())
            {
                *x = *x * scale + b;
                lanes[0] = lanes[0].max(*x);
            }
        }
        None => {
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    c[l] *= scale;
                    lanes[l] = lanes[l].max(c[l]);
                }
            }
            for x in chunks.into_remainder() {
                *x *= scale;
                lanes[0] = lanes[0].max(*x);
            }
        }
    }
    lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `row[j] = exp(row[j] - shift)`, returning the sum of the new row.
#[inline(always)]
fn exp_sum_generic<const FMA: bool>(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_with::<FMA>(c[l] - shift);
            lanes[l] += c[l];
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_with::<FMA>(*x - shift);
        lanes[0] += *x;
    }
    lanes.iter().sum()
}

/// `row[j] = exp(row[j]·scale + bias[j] - shift)`: the probabilities of a row whose
/// log-sum-exp `shift` is known (the backward pass).
#[inline(always)]
fn exp_affine_generic<const FMA: bool>(
    row: &mut [f32],
    scale: f32,
    bias: Option<&[f32]>,
    shift: f32,
) {
    match bias {
        Some(bias) => {
            let bias = &bias[..row.len()];
            for (x, b) in row.iter_mut().zip(bias) {
                *x = exp_with::<FMA>(*x * scale + b - shift);
            }
        }
        None => {
            for x in row.iter_mut() {
                *x = exp_with::<FMA>(*x * scale - shift);
            }
        }
    }
}

/// `row[j] = exp(row[j]·scale + bias[j] - shift)`, returning the sum of the new row and the
/// maximum of `row[j]·scale + bias[j]` (the online softmax's one-pass step when `shift` is
/// already known to be close to the row's maximum).
#[inline(always)]
fn exp_affine_sum_max_generic<const FMA: bool>(
    row: &mut [f32],
    scale: f32,
    bias: Option<&[f32]>,
    shift: f32,
) -> (f32, f32) {
    let mut sums = [0.0f32; LANES];
    let mut maxes = [f32::NEG_INFINITY; LANES];
    match bias {
        Some(bias) => {
            let bias = &bias[..row.len()];
            let mut chunks = row.chunks_exact_mut(LANES);
            let mut bias_chunks = bias.chunks_exact(LANES);
            for (c, b) in (&mut chunks).zip(&mut bias_chunks) {
                for l in 0..LANES {
                    let x = c[l] * scale + b[l];
                    maxes[l] = maxes[l].max(x);
                    c[l] = exp_with::<FMA>(x - shift);
                    sums[l] += c[l];
                }
            }
            for (c, b) in chunks
                .into_remainder()
                .iter_mut()
                .zip(bias_chunks.remainder())
            {
                let x = *c * scale + b;
                maxes[0] = maxes[0].max(x);
                *c = exp_with::<FMA>(x - shift);
                sums[0] += *c;
            }
        }
        None => {
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    let x = c[l] * scale;
                    maxes[l] = maxes[l].max(x);
                    c[l] = exp_with::<FMA>(x - shift);
                    sums[l] += c[l];
                }
            }
            for c in chunks.into_remainder() {
                let x = *c * scale;
                maxes[0] = maxes[0].max(x);
                *c = exp_with::<FMA>(x - shift);
                sums[0] += *c;
            }
        }
    }
    (
        sums.iter().sum(),
        maxes.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    )
}

/// `dp[j] = p[j]·(dp[j] - d)`: the softmax gradient of a row, with `d = Σ dO ⊙ O`.
#[inline(always)]
fn softmax_grad_generic(dp: &mut [f32], p: &[f32], d: f32) {
    let p = &p[..dp.len()];
    for (g, p) in dp.iter_mut().zip(p) {
        *g = p * (*g - d);
    }
}

/// `Σ a[j]·b[j]`.
#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let b = &b[..a.len()];
    let mut ac = a.chunks_exact(LANES);
    let mut bc = b.chunks_exact(LANES);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// `row[j] *= factor`.
#[inline(always)]
fn scale_generic(row: &mut [f32], factor: f32) {
    for x in row.iter_mut() {
        *x *= factor;
    }
}

/// `erf(x)`, within 4e-7 absolute in f32 (Abramowitz & Stegun 7.1.26, 1.5e-7 in exact
/// arithmetic, with the sign restored),
/// branch-free so that it vectorises.
#[cfg(test)]
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with::<false>(x)
}

/// [`erf`], its exponential in fused multiply-adds when `FMA`.
#[inline(always)]
fn erf_with<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_with::<FMA>(-a * a);
    f32::from_bits(y.to_bits() | (x.to_bits() & 0x8000_0000))
}

/// The activation of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·Φ(x)` with the exact (erf) normal CDF, as `torch.nn.GELU()` and Burn's `gelu`.
    Gelu,
    /// `max(x, 0)`.
    Relu,
}

/// `z += bias; a = act(z)` (a dropout `mask`, 0 or `1/(1-p)` per element, multiplies `a`).
#[inline(always)]
fn bias_activation_generic<const FMA: bool>(
    z: &mut [f32],
    a: &mut [f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    act: Activation,
) {
    let n = z.len();
    let a = &mut a[..n];
    if let Some(bias) = bias {
        let bias = &bias[..n];
        for (x, b) in z.iter_mut().zip(bias) {
            *x += b;
        }
    }
    match act {
        Activation::Gelu => {
            for (y, x) in a.iter_mut().zip(z.iter()) {
                *y = 0.5 * x * (1.0 + erf_with::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        Activation::Relu => {
            for (y, x) in a.iter_mut().zip(z.iter()) {
                *y = x.max(0.0);
            }
        }
    }
    if let Some(mask) = mask {
        let mask = &mask[..n];
        for (y, m) in a.iter_mut().zip(mask) {
            *y *= m;
        }
    }
}

/// `a = act(z)·mask` (the forward's activation, recomputed) and `g = g·mask·act'(z)` (the
/// gradient of the pre-activation from that of the activation).
#[inline(always)]
fn activation_grad_generic<const FMA: bool>(
    z: &[f32],
    a: &mut [f32],
    g: &mut [f32],
    mask: Option<&[f32]>,
    act: Activation,
) {
    let n = z.len();
    let (a, g) = (&mut a[..n], &mut g[..n]);
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    match act {
        Activation::Gelu => {
            for ((y, d), x) in a.iter_mut().zip(g.iter_mut()).zip(z) {
                let cdf = 0.5 * (1.0 + erf_with::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = INV_SQRT_2PI * exp_with::<FMA>(-0.5 * x * x);
                *y = x * cdf;
                *d *= cdf + x * pdf;
            }
        }
        Activation::Relu => {
            for ((y, d), x) in a.iter_mut().zip(g.iter_mut()).zip(z) {
                *y = x.max(0.0);
                *d = if *x > 0.0 { *d } else { 0.0 };
            }
        }
    }
    if let Some(mask) = mask {
        let mask = &mask[..n];
        for ((y, d), m) in a.iter_mut().zip(g.iter_mut()).zip(mask) {
            *y *= m;
            *d *= m;
        }
    }
}

/// `acc += row`.
#[inline(always)]
fn add_generic(acc: &mut [f32], row: &[f32]) {
    let row = &row[..acc.len()];
    for (a, r) in acc.iter_mut().zip(row) {
        *a += r;
    }
}

/// `Σ row[j]`, with per-lane partial sums.
#[inline(always)]
fn sum_generic(row: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Layer normalisation of one row: `y = (x - μ)·r·γ + β` with `r = 1/√(σ² + eps)` (two passes:
/// the mean, then the biased variance about it); returns `(μ, r)`.
#[inline(always)]
fn layer_norm_generic(
    x: &[f32],
    y: &mut [f32],
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
) -> (f32, f32) {
    let n = x.len();
    let (y, gamma) = (&mut y[..n], &gamma[..n]);
    let mean = sum_generic(x) / n as f32;
    for (y, x) in y.iter_mut().zip(x) {
        *y = x - mean;
    }
    let var = dot_generic(y, y) / n as f32;
    let rstd = 1.0 / (var + eps).sqrt();
    match beta {
        Some(beta) => {
            let beta = &beta[..n];
            for ((y, g), b) in y.iter_mut().zip(gamma).zip(beta) {
                *y = *y * rstd * g + b;
            }
        }
        None => {
            for (y, g) in y.iter_mut().zip(gamma) {
                *y = *y * rstd * g;
            }
        }
    }
    (mean, rstd)
}

/// The gradient of [`layer_norm_generic`] for one row: with `x̂ = (x - μ)·r` and `g = dy·γ`,
/// `dx = r·(g - mean(g) - x̂·mean(g·x̂))`; adds `dy·x̂` to `dgamma` and `dy` to `dbeta`.
/// `dx` is scratch until the end.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_grad_generic(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    (mean, rstd): (f32, f32),
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let n = x.len();
    let (dy, gamma, dx) = (&dy[..n], &gamma[..n], &mut dx[..n]);
    let (dgamma, dbeta) = (&mut dgamma[..n], &mut dbeta[..n]);
    // dx holds x̂ first.
    for (h, x) in dx.iter_mut().zip(x) {
        *h = (x - mean) * rstd;
    }
    let mut sum_g = [0.0f32; LANES];
    let mut sum_gh = [0.0f32; LANES];
    let mut chunks = dx.chunks_exact(LANES).zip(dy.chunks_exact(LANES));
    let mut gammas = gamma.chunks_exact(LANES);
    for ((h, d), g) in (&mut chunks).zip(&mut gammas) {
        for l in 0..LANES {
            let gl = d[l] * g[l];
            sum_g[l] += gl;
            sum_gh[l] += gl * h[l];
        }
    }
    let tail = n - n % LANES;
    let (mut a, mut b) = (sum_g.iter().sum::<f32>(), sum_gh.iter().sum::<f32>());
    for j in tail..n {
        let gl = dy[j] * gamma[j];
        a += gl;
        b += gl * dx[j];
    }
    let (a, b) = (a / n as f32, b / n as f32);
    for ((((h, d), g), dg), db) in dx
        .iter_mut()
        .zip(dy)
        .zip(gamma)
        .zip(dgamma.iter_mut())
        .zip(dbeta.iter_mut())
    {
        *dg += d * *h;
        *db += d;
        *h = rstd * (d * g - a - *h * b);
    }
}

/// Declares one set of row operations compiled with `$features` (or for the baseline target
/// when no features are given).
macro_rules! row_ops {
    ($module:ident, $fma:literal $(, $features:literal)?) => {
        mod $module {
            const FMA: bool = $fma;
            $(#[target_feature(enable = $features)])?
            pub(super) fn scale_bias_max(row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
                super::scale_bias_max_generic(row, scale, bias)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn exp_sum(row: &mut [f32], shift: f32) -> f32 {
                super::exp_sum_generic::<FMA>(row, shift)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn exp_affine(row: &mut [f32], scale: f32, bias: Option<&[f32]>, shift: f32) {
                super::exp_affine_generic::<FMA>(row, scale, bias, shift)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn exp_affine_sum_max(
                row: &mut [f32],
                scale: f32,
                bias: Option<&[f32]>,
                shift: f32,
            ) -> (f32, f32) {
                super::exp_affine_sum_max_generic::<FMA>(row, scale, bias, shift)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn softmax_grad(dp: &mut [f32], p: &[f32], d: f32) {
                super::softmax_grad_generic(dp, p, d)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
                super::dot_generic(a, b)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn scale(row: &mut [f32], factor: f32) {
                super::scale_generic(row, factor)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn bias_activation(
                z: &mut [f32],
                a: &mut [f32],
                bias: Option<&[f32]>,
                mask: Option<&[f32]>,
                act: super::Activation,
            ) {
                super::bias_activation_generic::<FMA>(z, a, bias, mask, act)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn activation_grad(
                z: &[f32],
                a: &mut [f32],
                g: &mut [f32],
                mask: Option<&[f32]>,
                act: super::Activation,
            ) {
                super::activation_grad_generic::<FMA>(z, a, g, mask, act)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn add(acc: &mut [f32], row: &[f32]) {
                super::add_generic(acc, row)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn layer_norm(
                x: &[f32],
                y: &mut [f32],
                gamma: &[f32],
                beta: Option<&[f32]>,
                eps: f32,
            ) -> (f32, f32) {
                super::layer_norm_generic(x, y, gamma, beta, eps)
            }
            $(#[target_feature(enable = $features)])?
            pub(super) fn layer_norm_grad(
                x: &[f32],
                dy: &[f32],
                gamma: &[f32],
                stats: (f32, f32),
                dx: &mut [f32],
                dgamma: &mut [f32],
                dbeta: &mut [f32],
            ) {
                super::layer_norm_grad_generic(x, dy, gamma, stats, dx, dgamma, dbeta)
            }
        }
    };
}

row_ops!(portable, false);
#[cfg(target_arch = "x86_64")]
row_ops!(avx2, true, "avx2,fma");
#[cfg(target_arch = "x86_64")]
row_ops!(avx512, true, "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma");

/// `n` zeros written by every rayon thread, each a `memset` of its own part of a fresh
/// allocation (a parallel `collect` of zeros stores element by element, 3–4% of a training
/// step at N = 1,024 in `perf`; one `vec![0.0; n]` zeroes on the calling thread alone).
pub fn parallel_zeros(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(1 << 15)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the first `n` elements of the capacity were each written above.
    unsafe { v.set_len(n) };
    v
}

/// A fresh `rows × row_len` buffer whose row `r` is a copy of `source(r)` (each `row_len`
/// long), written by every rayon thread without zero-filling first: the copy behind
/// [`crate::kernels::fused`]'s head split and merge, where Flex's own strided copy moves
/// elements one at a time.
///
/// # Panics
/// If a row `source` returns is not `row_len` long.
pub fn gather_rows<'a, F>(rows: usize, row_len: usize, source: F) -> Vec<f32>
where
    F: Fn(usize) -> &'a [f32] + Sync,
{
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let n = rows * row_len;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    if row_len > 0 {
        let per_task = (1usize << 14).div_ceil(row_len).max(1);
        v.spare_capacity_mut()[..n]
            .par_chunks_mut(per_task * row_len)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (i, dst) in chunk.chunks_mut(row_len).enumerate() {
                    let src = source(t * per_task + i);
                    assert_eq!(src.len(), row_len, "gather_rows: row length");
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = MaybeUninit::new(*s);
                    }
                }
            });
    }
    // SAFETY: every one of the first `n` elements was written above (each chunk's rows are
    // `row_len` long and the assert checked every source row's length).
    unsafe { v.set_len(n) };
    v
}

/// Which build of the row operations runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The baseline target.
    Portable,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 (F, BW, DQ, VL).
    Avx512,
}

/// The row operations of the widest instruction set the CPU supports.
#[derive(Clone, Copy, Debug)]
pub struct RowOps {
    level: Level,
}

impl RowOps {
    /// Detects the CPU's instruction sets (cached by the standard library).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma");
            if avx512 {
                return Self {
                    level: Level::Avx512,
                };
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Self { level: Level::Avx2 };
            }
        }
        Self::portable()
    }

    /// The baseline build (for tests comparing builds).
    pub fn portable() -> Self {
        Self {
            level: Level::Portable,
        }
    }
}

/// Forwards a call to the build `self.level` selects.
macro_rules! dispatch {
    ($self:ident, $op:ident($($arg:expr),*)) => {
        match $self.level {
            Level::Portable => portable::$op($($arg),*),
            // SAFETY: `detect` selects these levels only when the CPU reports every feature
            // their functions are compiled with.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { avx2::$op($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { avx512::$op($($arg),*) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => portable::$op($($arg),*),
        }
    };
}

impl RowOps {
    /// `row = row·scale + bias`; returns the maximum (`-∞` if all masked).
    pub fn scale_bias_max(&self, row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
        dispatch!(self, scale_bias_max(row, scale, bias))
    }

    /// `row = exp(row - shift)`; returns the sum.
    pub fn exp_sum(&self, row: &mut [f32], shift: f32) -> f32 {
        dispatch!(self, exp_sum(row, shift))
    }

    /// `row = exp(row·scale + bias - shift)`.
    pub fn exp_affine(&self, row: &mut [f32], scale: f32, bias: Option<&[f32]>, shift: f32) {
        dispatch!(self, exp_affine(row, scale, bias, shift))
    }

    /// `row = exp(row·scale + bias - shift)`; returns the sum of the new row and the maximum
    /// of `row·scale + bias`.
    pub fn exp_affine_sum_max(
        &self,
        row: &mut [f32],
        scale: f32,
        bias: Option<&[f32]>,
        shift: f32,
    ) -> (f32, f32) {
        dispatch!(self, exp_affine_sum_max(row, scale, bias, shift))
    }

    /// `dp = p ⊙ (dp - d)`.
    pub fn softmax_grad(&self, dp: &mut [f32], p: &[f32], d: f32) {
        dispatch!(self, softmax_grad(dp, p, d))
    }

    /// `Σ a ⊙ b`.
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        dispatch!(self, dot(a, b))
    }

    /// `row *= factor`.
    pub fn scale(&self, row: &mut [f32], factor: f32) {
        dispatch!(self, scale(row, factor))
    }

    /// `z += bias; a = act(z)·mask`.
    pub fn bias_activation(
        &self,
        z: &mut [f32],
        a: &mut [f32],
        bias: Option<&[f32]>,
        mask: Option<&[f32]>,
        act: Activation,
    ) {
        dispatch!(self, bias_activation(z, a, bias, mask, act))
    }

    /// `a = act(z)·mask; g = g·mask·act'(z)`.
    pub fn activation_grad(
        &self,
        z: &[f32],
        a: &mut [f32],
        g: &mut [f32],
        mask: Option<&[f32]>,
        act: Activation,
    ) {
        dispatch!(self, activation_grad(z, a, g, mask, act))
    }

    /// `acc += row`.
    pub fn add(&self, acc: &mut [f32], row: &[f32]) {
        dispatch!(self, add(acc, row))
    }

    /// Layer normalisation of one row, `y = (x - μ)/√(σ² + eps)·γ + β`; returns `(μ, 1/√(σ² + eps))`.
    pub fn layer_norm(
        &self,
        x: &[f32],
        y: &mut [f32],
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
    ) -> (f32, f32) {
        dispatch!(self, layer_norm(x, y, gamma, beta, eps))
    }

    /// The gradient of [`layer_norm`](Self::layer_norm) for one row given its `(μ, 1/√(σ² + eps))`:
    /// writes `dx`, adds `dy·x̂` to `dgamma` and `dy` to `dbeta`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_grad(
        &self,
        x: &[f32],
        dy: &[f32],
        gamma: &[f32],
        stats: (f32, f32),
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        dispatch!(
            self,
            layer_norm_grad(x, dy, gamma, stats, dx, dgamma, dbeta)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_masked_scores_give_zero() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        let mut worst = 0.0f64;
        for i in -300..=300 {
            let x = i as f64 * 0.01;
            worst = worst.max((erf(x as f32) as f64 - series_erf(x)).abs());
        }
        assert!(worst < 4e-7, "erf error {worst:e}");
        // Beyond 3, erf is within erfc(3) = 2.2e-5 of ±1.
        for x in [3.5f32, 5.0, 9.0, -4.0, -20.0] {
            assert!(
                (erf(x) - x.signum()).abs() < 2.3e-5,
                "erf({x}) = {}",
                erf(x)
            );
        }
    }

    /// erf in f64 by its Taylor series `2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))` (|x| ≤ 3).
    fn series_erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn every_build_agrees_with_the_portable_one() {
        let ops = [RowOps::detect(), RowOps::portable()];
        let row: Vec<f32> = (0..77)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
            .collect();
        let bias: Vec<f32> = (0..77)
            .map(|i| if i % 5 == 0 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let results: Vec<(Vec<f32>, f32, f32)> = ops
            .iter()
            .map(|o| {
                let mut r = row.clone();
                let max = o.scale_bias_max(&mut r, 0.5, Some(&bias));
                let sum = o.exp_sum(&mut r, max);
                (r, max, sum)
            })
            .collect();
        let (a, b) = (&results[0], &results[1]);
        assert_eq!(a.1, b.1);
        assert!((a.2 - b.2).abs() < 1e-5 * b.2);
        for (x, y) in a.0.iter().zip(&b.0) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-30), "{x} vs {y}");
        }
        assert!(
            a.0.iter().step_by(5).all(|p| *p == 0.0),
            "masked keys are 0"
        );
        // The one-pass step (exp against a shift, watching the maximum) agrees too, and with
        // the two passes above.
        let one_pass: Vec<(Vec<f32>, f32, f32)> = ops
            .iter()
            .map(|o| {
                let mut r = row.clone();
                let (sum, max) = o.exp_affine_sum_max(&mut r, 0.5, Some(&bias), a.1);
                (r, max, sum)
            })
            .collect();
        for (x, y) in [(&one_pass[0], &one_pass[1]), (&one_pass[0], a)] {
            assert_eq!(x.1, y.1);
            assert!((x.2 - y.2).abs() < 1e-5 * y.2);
            for (p, q) in x.0.iter().zip(&y.0) {
                assert!((p - q).abs() <= 1e-6 * q.abs().max(1e-30), "{p} vs {q}");
            }
        }
    }
}
