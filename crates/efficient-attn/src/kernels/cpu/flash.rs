//! Exact attention, tiled (FlashAttention-2, Dao 2023, arXiv:2307.08691), on `f32` slices.
//!
//! - Forward: for each `(batch, head)` and tile of `tile_q` queries, the key tiles are visited
//!   in order; scores `S = Q Kᵀ` of a tile come from one GEMM, the online softmax keeps a row
//!   shift `m` (in place of the running maximum: guessed, then moved only when a tile exceeds
//!   it by a fixed headroom, so a tile usually costs one pass) and sum `l`, rescaling the
//!   output accumulator when `m` moves,
//!   and `O += P V` is a second GEMM. Only `O` and the row log-sum-exp `lse = m + ln l` are
//!   written: O(N·d) memory.
//! - Backward: for each `(batch, head)`, `D = rowsum(dO ⊙ O)`; then for each key tile, for each
//!   query tile that sees it, the scores are recomputed, `P = exp(S - lse)`, and
//!   `dV += Pᵀ dO`, `dS = P ⊙ (dO Vᵀ - D)`, `dQ += dS K · scale`, `dK += dSᵀ Q · scale`: five
//!   GEMMs per tile pair, no N × N buffer.
//! - Masks: key padding as an additive bias per key (0 or `-∞`); causality bottom-right
//!   aligned (query `i` sees key `j ≤ i + seq_k - seq_q`): key tiles entirely in the future of
//!   a query tile are skipped, tiles entirely in its past are unmasked, and only the diagonal
//!   tiles limit each row. A query that sees no key gets zeros and `lse = +∞` (so its
//!   backward contributes nothing).
//! - Threads: rayon over `(batch, head, query tile)` forward and `(batch, head)` backward;
//!   every GEMM is single-threaded.
//!
//! Over 600 lines on purpose: forward, backward, the tile walk they share, the online-softmax
//! row steps the block-sparse kernel reuses (`absorb_tile_row`, `finish_rows`) and their
//! tests against the definition belong together.

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm::{Mat, MatMut, gemm};
use super::simd::RowOps;

/// The problem: `[batch, heads, seq, width]` row-major tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Queries.
    pub seq_q: usize,
    /// Keys and values.
    pub seq_k: usize,
    /// Query/key width.
    pub d_k: usize,
    /// Value width.
    pub d_v: usize,
}

impl Shape {
    fn heads_total(&self) -> usize {
        self.batch * self.heads
    }
}

/// Scale, causality and tile sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Score scale (usually `1/√d_k`).
    pub scale: f32,
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// Queries per tile.
    pub tile_q: usize,
    /// Keys per tile.
    pub tile_k: usize,
}

impl Params {
    /// The last key query `i` may see, plus one (`seq_k` when not causal).
    fn key_limit(&self, shape: &Shape, i: usize) -> usize {
        if self.causal {
            (i + 1 + shape.seq_k)
                .saturating_sub(shape.seq_q)
                .min(shape.seq_k)
        } else {
            shape.seq_k
        }
    }
}

/// Inputs of one call: `q [B, H, Nq, Dk]`, `k [B, H, Nk, Dk]`, `v [B, H, Nk, Dv]`, and the
/// key bias `[B, Nk]` (0 = visible, `-∞` = padded), all row-major.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Additive key bias, if any key is padded.
    pub key_bias: Option<&'a [f32]>,
}

impl Inputs<'_> {
    fn check(&self, shape: &Shape) {
        let Shape {
            batch,
            heads,
            seq_q,
            seq_k,
            d_k,
            d_v,
        } = *shape;
        let bh = batch * heads;
        assert_eq!(self.q.len(), bh * seq_q * d_k, "flash attention: q size");
        assert_eq!(self.k.len(), bh * seq_k * d_k, "flash attention: k size");
        assert_eq!(self.v.len(), bh * seq_k * d_v, "flash attention: v size");
        if let Some(b) = self.key_bias {
            assert_eq!(b.len(), batch * seq_k, "flash attention: key bias size");
        }
    }

    /// The slices of head `bh` (of `batch · heads`).
    fn head(&self, shape: &Shape, bh: usize) -> Inputs<'_> {
        let Shape {
            heads,
            seq_q,
            seq_k,
            d_k,
            d_v,
            ..
        } = *shape;
        Inputs {
            q: &self.q[bh * seq_q * d_k..(bh + 1) * seq_q * d_k],
            k: &self.k[bh * seq_k * d_k..(bh + 1) * seq_k * d_k],
            v: &self.v[bh * seq_k * d_v..(bh + 1) * seq_k * d_v],
            key_bias: self
                .key_bias
                .map(|b| &b[(bh / heads) * seq_k..(bh / heads + 1) * seq_k]),
        }
    }
}

thread_local! {
    /// Per-thread scratch (score tiles), reused across calls: fresh buffers this large would
    /// be zero pages faulted in on every tile.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a per-thread scratch slice of at least `len` elements (contents unspecified).
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.take();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        let r = f(&mut buf[..len]);
        cell.replace(buf);
        r
    })
}

/// The key tiles a query tile `[q0, q1)` sees: `(start, end, needs a per-row causal limit)`.
fn key_tiles(
    shape: &Shape,
    p: &Params,
    q0: usize,
    q1: usize,
) -> impl Iterator<Item = (usize, usize, bool)> {
    let seen = p.key_limit(shape, q1 - 1); // keys [0, seen) are visible to the last row
    let first_row_limit = p.key_limit(shape, q0);
    let tile = p.tile_k;
    (0..seen.div_ceil(tile)).map(move |t| {
        let k0 = t * tile;
        let k1 = (k0 + tile).min(shape.seq_k);
        (k0, k1, p.causal && k1 > first_row_limit)
    })
}

/// Forward: writes `out [B, H, Nq, Dv]` and `lse [B, H, Nq]`.
///
/// # Panics
/// If a slice's size does not match `shape`.
pub fn forward(inputs: Inputs<'_>, shape: Shape, params: Params, out: &mut [f32], lse: &mut [f32]) {
    inputs.check(&shape);
    let Shape {
        seq_q, d_k, d_v, ..
    } = shape;
    assert_eq!(
        out.len(),
        shape.heads_total() * seq_q * d_v,
        "flash attention: out size"
    );
    assert_eq!(
        lse.len(),
        shape.heads_total() * seq_q,
        "flash attention: lse size"
    );
    if seq_q == 0 || d_v == 0 {
        return;
    }
    let ops = RowOps::detect();
    let tq = params.tile_q.max(1);
    out.par_chunks_mut(seq_q * d_v)
        .zip(lse.par_chunks_mut(seq_q))
        .enumerate()
        .for_each(|(bh, (out, lse))| {
            let Inputs {
                q,
                k,
                v,
                key_bias: bias,
            } = inputs.head(&shape, bh);
            out.par_chunks_mut(tq * d_v)
                .zip(lse.par_chunks_mut(tq))
                .enumerate()
                .for_each(|(t, (o, l))| {
                    let q0 = t * tq;
                    let rows = l.len();
                    let q_tile = &q[q0 * d_k..(q0 + rows) * d_k];
                    forward_tile(&ops, &shape, &params, q0, q_tile, k, v, bias, o, l);
                });
        });
}

/// How far a tile's scores may rise above a row's shift before the row takes a new shift:
/// probabilities stay below `e^HEADROOM` (≈ 2.6·10¹⁰), so sums and output accumulators of any
/// realistic length stay finite in `f32`, with the same relative precision as with the
/// running maximum.
const HEADROOM: f32 = 24.0;

/// How far below a guessed shift the first scores of a row may lie: `exp` keeps values down
/// to `e^-87`, so the largest of them keep at least 27 orders of `e` of range below them
/// (terms smaller than `e^-27` of the row's largest are below `f32` precision anyway).
const FLOOR: f32 = 60.0;

/// One online-softmax step of a query row over a tile of keys: turns the tile's scores `row`
/// (scaled by `scale`, plus the key `bias`) into unnormalised probabilities `exp(s - shift)`
/// and adds them to the row's running `sum`.
///
/// The shift plays the part of FlashAttention's running maximum but moves rarely: while the
/// row has no probability mass (`sum == 0`) it is a guess (the caller's: 0, or the previous
/// row's shift), and afterwards it changes only when a tile's maximum exceeds it by more than
/// [`HEADROOM`]. So the usual step is one pass over the tile that exponentiates and watches
/// the maximum together. When the guess or the shift does not fit the tile, the row's raw
/// scores are rebuilt by `raw` (an exponentiated row cannot be undone exactly), the output
/// accumulator `out` and the sum are rescaled to the new shift, and the tile is redone. A
/// fully masked tile leaves zeros. Shared by the dense and the block-sparse kernels.
pub(super) fn absorb_tile_row(
    ops: &RowOps,
    row: &mut [f32],
    scale: f32,
    bias: Option<&[f32]>,
    out: &mut [f32],
    (shift, sum): (&mut f32, &mut f32),
    raw: impl FnOnce(&mut [f32]),
) {
    let (tile_sum, tile_max) = ops.exp_affine_sum_max(row, scale, bias, *shift);
    let fresh = *sum == 0.0;
    let fits = tile_max <= *shift + HEADROOM && (!fresh || tile_max >= *shift - FLOOR);
    if tile_max == f32::NEG_INFINITY {
        return;
    }
    if fits {
        if fresh && tile_max < *shift {
            // A guess above the row's first scores: move the shift down to their maximum so
            // the probabilities (as small as e^-60) do not reach `P·V` as subnormals. Exact:
            // the factor is at most e^60 and the output accumulator is still zero.
            let lift = super::simd::exp(*shift - tile_max);
            ops.scale(row, lift);
            *sum = tile_sum * lift;
            *shift = tile_max;
        } else {
            *sum += tile_sum;
        }
        return;
    }
    raw(row);
    let tile_max = ops.scale_bias_max(row, scale, bias);
    let new_shift = if fresh { tile_max } else { shift.max(tile_max) };
    let tile_sum = ops.exp_sum(row, new_shift);
    if !fresh && *shift != new_shift {
        let correction = super::simd::exp(*shift - new_shift);
        ops.scale(out, correction);
        *sum *= correction;
    }
    *sum += tile_sum;
    *shift = new_shift;
}

/// Ends the online softmax of `rows` query rows: divides each output row (width `d_v`) by its
/// sum and writes its log-sum-exp (`shift + ln sum`); a row that saw no key gets zeros and a
/// log-sum-exp of +∞.
pub(super) fn finish_rows(
    ops: &RowOps,
    out: &mut [f32],
    d_v: usize,
    shift: &[f32],
    sum: &[f32],
    lse: &mut [f32],
) {
    for r in 0..lse.len() {
        let row = &mut out[r * d_v..(r + 1) * d_v];
        if sum[r] > 0.0 {
            ops.scale(row, 1.0 / sum[r]);
            lse[r] = shift[r] + sum[r].ln();
        } else {
            row.fill(0.0);
            lse[r] = f32::INFINITY;
        }
    }
}

/// One query tile of one head: rows `[q0, q0 + lse.len())`.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    ops: &RowOps,
    shape: &Shape,
    p: &Params,
    q0: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let rows = lse.len();
    let tk = p.tile_k.max(1);
    with_scratch(rows * tk, |scores| {
        forward_rows(ops, shape, p, q0, q, k, v, bias, out, lse, scores)
    });
}

/// [`forward_tile`] with its score buffer (`rows × tile_k`).
#[allow(clippy::too_many_arguments)]
fn forward_rows(
    ops: &RowOps,
    shape: &Shape,
    p: &Params,
    q0: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
    scores: &mut [f32],
) {
    let (d_k, d_v) = (shape.d_k, shape.d_v);
    let rows = lse.len();
    let tk = p.tile_k.max(1);
    // Each row's shift starts as a guess: 0 for the first row, then the row above's.
    let mut shift = vec![0.0f32; rows];
    let mut sum = vec![0.0f32; rows];
    out.fill(0.0);
    for (k0, k1, diagonal) in key_tiles(shape, p, q0, q0 + rows) {
        let cols = k1 - k0;
        gemm(
            MatMut::rows(scores, rows, cols, tk),
            Mat::rows(q, rows, d_k, d_k),
            Mat::transposed(&k[k0 * d_k..], d_k, cols, d_k),
            0.0,
            1.0,
        );
        let tile_bias = bias.map(|b| &b[k0..k1]);
        for r in 0..rows {
            let row = &mut scores[r * tk..r * tk + cols];
            let visible = if diagonal {
                p.key_limit(shape, q0 + r).saturating_sub(k0).min(cols)
            } else {
                cols
            };
            let (seen, future) = row.split_at_mut(visible);
            future.fill(0.0);
            if r > 0 && sum[r] == 0.0 {
                shift[r] = shift[r - 1];
            }
            let q_row = &q[r * d_k..(r + 1) * d_k];
            absorb_tile_row(
                ops,
                seen,
                p.scale,
                tile_bias,
                &mut out[r * d_v..(r + 1) * d_v],
                (&mut shift[r], &mut sum[r]),
                |seen| {
                    for (j, s) in seen.iter_mut().enumerate() {
                        *s = ops.dot(q_row, &k[(k0 + j) * d_k..(k0 + j + 1) * d_k]);
                    }
                },
            );
        }
        gemm(
            MatMut::rows(out, rows, d_v, d_v),
            Mat::rows(scores, rows, cols, tk),
            Mat::rows(&v[k0 * d_v..], cols, d_v, d_v),
            1.0,
            1.0,
        );
    }
    finish_rows(ops, out, d_v, &shift, &sum, lse);
}

/// Gradients `dq [B, H, Nq, Dk]`, `dk [B, H, Nk, Dk]`, `dv [B, H, Nk, Dv]` of the forward
/// whose output and log-sum-exp were `out` and `lse`, for the output gradient `d_out`.
///
/// # Panics
/// If a slice's size does not match `shape`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    inputs: Inputs<'_>,
    shape: Shape,
    params: Params,
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    inputs.check(&shape);
    let Shape {
        seq_q,
        seq_k,
        d_k,
        d_v,
        ..
    } = shape;
    let bh_total = shape.heads_total();
    assert_eq!(
        out.len(),
        bh_total * seq_q * d_v,
        "flash backward: out size"
    );
    assert_eq!(d_out.len(), out.len(), "flash backward: d_out size");
    assert_eq!(lse.len(), bh_total * seq_q, "flash backward: lse size");
    assert_eq!(dq.len(), bh_total * seq_q * d_k, "flash backward: dq size");
    assert_eq!(dk.len(), bh_total * seq_k * d_k, "flash backward: dk size");
    assert_eq!(dv.len(), bh_total * seq_k * d_v, "flash backward: dv size");
    let ops = RowOps::detect();
    dq.par_chunks_mut(seq_q * d_k.max(1))
        .zip(dk.par_chunks_mut(seq_k * d_k.max(1)))
        .zip(dv.par_chunks_mut(seq_k * d_v.max(1)))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| {
            let heads = HeadGrads {
                out: &out[bh * seq_q * d_v..(bh + 1) * seq_q * d_v],
                lse: &lse[bh * seq_q..(bh + 1) * seq_q],
                d_out: &d_out[bh * seq_q * d_v..(bh + 1) * seq_q * d_v],
            };
            backward_head(
                &ops,
                &shape,
                &params,
                inputs.head(&shape, bh),
                heads,
                dq,
                dk,
                dv,
            );
        });
}

/// The forward results and output gradient of one head.
struct HeadGrads<'a> {
    out: &'a [f32],
    lse: &'a [f32],
    d_out: &'a [f32],
}

#[allow(clippy::too_many_arguments)]
fn backward_head(
    ops: &RowOps,
    shape: &Shape,
    p: &Params,
    head: Inputs<'_>,
    g: HeadGrads<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Shape {
        seq_q, seq_k, d_v, ..
    } = *shape;
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    if seq_q == 0 || seq_k == 0 {
        return;
    }
    // D_i = Σ_j dO_ij O_ij.
    let d: Vec<f32> = (0..seq_q)
        .map(|i| {
            ops.dot(
                &g.d_out[i * d_v..(i + 1) * d_v],
                &g.out[i * d_v..(i + 1) * d_v],
            )
        })
        .collect();
    let (tq, tk) = (p.tile_q.max(1), p.tile_k.max(1));
    with_scratch(2 * tq * tk, |buf| {
        let (probs, grad) = buf.split_at_mut(tq * tk);
        backward_tiles(ops, shape, p, head, &g, &d, dq, dk, dv, probs, grad);
    });
}

/// The tile loops of [`backward_head`] with its two `tile_q × tile_k` buffers.
#[allow(clippy::too_many_arguments)]
fn backward_tiles(
    ops: &RowOps,
    shape: &Shape,
    p: &Params,
    head: Inputs<'_>,
    g: &HeadGrads<'_>,
    d: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    probs: &mut [f32],
    grad: &mut [f32],
) {
    let Shape {
        seq_q,
        seq_k,
        d_k,
        d_v,
        ..
    } = *shape;
    let (tq, tk) = (p.tile_q.max(1), p.tile_k.max(1));
    let Inputs {
        q,
        k,
        v,
        key_bias: bias,
    } = head;
    for k0 in (0..seq_k).step_by(tk) {
        let cols = tk.min(seq_k - k0);
        let k_tile = &k[k0 * d_k..(k0 + cols) * d_k];
        let v_tile = &v[k0 * d_v..(k0 + cols) * d_v];
        let tile_bias = bias.map(|b| &b[k0..k0 + cols]);
        // Query tiles that see key k0: causal rows i with limit(i) > k0.
        let first_q = if p.causal {
            (k0 + seq_q).saturating_sub(seq_k).min(seq_q)
        } else {
            0
        };
        let first_tile = first_q / tq * tq;
        for q0 in (first_tile..seq_q).step_by(tq) {
            let rows = tq.min(seq_q - q0);
            let q_tile = &q[q0 * d_k..(q0 + rows) * d_k];
            let do_tile = &g.d_out[q0 * d_v..(q0 + rows) * d_v];
            // P = exp(S·scale + bias - lse), zero beyond each row's causal limit.
            gemm(
                MatMut::rows(probs, rows, cols, tk),
                Mat::rows(q_tile, rows, d_k, d_k),
                Mat::transposed(k_tile, d_k, cols, d_k),
                0.0,
                1.0,
            );
            for r in 0..rows {
                let limit = p.key_limit(shape, q0 + r).saturating_sub(k0).min(cols);
                let row = &mut probs[r * tk..r * tk + cols];
                let (seen, future) = row.split_at_mut(limit);
                ops.exp_affine(seen, p.scale, tile_bias, g.lse[q0 + r]);
                future.fill(0.0);
            }
            // dV += Pᵀ dO.
            gemm(
                MatMut::rows(&mut dv[k0 * d_v..], cols, d_v, d_v),
                Mat::transposed(probs, cols, rows, tk),
                Mat::rows(do_tile, rows, d_v, d_v),
                1.0,
                1.0,
            );
            // dP = dO Vᵀ, then dS = P ⊙ (dP - D).
            gemm(
                MatMut::rows(grad, rows, cols, tk),
                Mat::rows(do_tile, rows, d_v, d_v),
                Mat::transposed(v_tile, d_v, cols, d_v),
                0.0,
                1.0,
            );
            for r in 0..rows {
                ops.softmax_grad(
                    &mut grad[r * tk..r * tk + cols],
                    &probs[r * tk..r * tk + cols],
                    d[q0 + r],
                );
            }
            // dQ += dS K · scale; dK += dSᵀ Q · scale.
            gemm(
                MatMut::rows(&mut dq[q0 * d_k..], rows, d_k, d_k),
                Mat::rows(grad, rows, cols, tk),
                Mat::rows(k_tile, cols, d_k, d_k),
                1.0,
                p.scale,
            );
            gemm(
                MatMut::rows(&mut dk[k0 * d_k..], cols, d_k, d_k),
                Mat::transposed(grad, cols, rows, tk),
                Mat::rows(q_tile, rows, d_k, d_k),
                1.0,
                p.scale,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense attention in f64 with the same masks: `(out, lse)`.
    fn dense(inputs: &Inputs<'_>, shape: &Shape, p: &Params) -> (Vec<f64>, Vec<f64>) {
        let Shape {
            batch,
            heads,
            seq_q,
            seq_k,
            d_k,
            d_v,
        } = *shape;
        let mut out = vec![0.0; batch * heads * seq_q * d_v];
        let mut lse = vec![f64::INFINITY; batch * heads * seq_q];
        for bh in 0..batch * heads {
            let Inputs {
                q,
                k,
                v,
                key_bias: bias,
            } = inputs.head(shape, bh);
            for i in 0..seq_q {
                let scores: Vec<f64> = (0..seq_k)
                    .map(|j| {
                        let masked = j >= p.key_limit(shape, i)
                            || bias.is_some_and(|b| b[j] == f32::NEG_INFINITY);
                        if masked {
                            f64::NEG_INFINITY
                        } else {
                            (0..d_k)
                                .map(|t| q[i * d_k + t] as f64 * k[j * d_k + t] as f64)
                                .sum::<f64>()
                                * p.scale as f64
                        }
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                lse[bh * seq_q + i] = m + z.ln();
                for c in 0..d_v {
                    out[(bh * seq_q + i) * d_v + c] =
                        (0..seq_k).map(|j| w[j] / z * v[j * d_v + c] as f64).sum();
                }
            }
        }
        (out, lse)
    }

    /// The kernel's output and log-sum-exp equal [`dense`]'s within 1e-5 (relative beyond 1);
    /// a row that sees no key has `lse = +∞` on both sides.
    fn forward_matches_dense(inputs: &Inputs<'_>, shape: &Shape, params: &Params) {
        let mut out = vec![0.0; shape.heads_total() * shape.seq_q * shape.d_v];
        let mut lse = vec![0.0; shape.heads_total() * shape.seq_q];
        forward(*inputs, *shape, *params, &mut out, &mut lse);
        let (want, want_lse) = dense(inputs, shape, params);
        for (x, y) in out.iter().zip(&want) {
            assert!((*x as f64 - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
        for (x, y) in lse.iter().zip(&want_lse) {
            assert!(
                (*x as f64 - y).abs() < 1e-5 * (1.0 + y.abs())
                    || (x.is_infinite() && y.is_infinite()),
                "lse {x} vs {y}"
            );
        }
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    #[test]
    fn forward_equals_dense_attention_with_padding_causality_and_ragged_tiles() {
        for (causal, seq_q, seq_k) in [
            (false, 13, 13),
            (true, 13, 13),
            (true, 5, 17),
            (false, 7, 19),
        ] {
            let shape = Shape {
                batch: 2,
                heads: 3,
                seq_q,
                seq_k,
                d_k: 8,
                d_v: 6,
            };
            let q = data(2 * 3 * seq_q * 8, 1);
            let k = data(2 * 3 * seq_k * 8, 2);
            let v = data(2 * 3 * seq_k * 6, 3);
            let bias: Vec<f32> = (0..2 * seq_k)
                .map(|j| {
                    if j >= seq_k && j % seq_k >= seq_k - 3 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let inputs = Inputs {
                q: &q,
                k: &k,
                v: &v,
                key_bias: Some(&bias),
            };
            let params = Params {
                scale: 0.35,
                causal,
                tile_q: 4,
                tile_k: 5,
            };
            forward_matches_dense(&inputs, &shape, &params);
        }
    }

    /// Scores that climb by more than the headroom from tile to tile (each later tile restarts
    /// its row from recomputed raw scores), that start far above the first guess and fall
    /// (later tiles underflow against the first tile's shift), and that lie far or moderately
    /// below the guess everywhere give the dense result, with and without padding and
    /// causality.
    #[test]
    fn forward_survives_scores_far_above_and_below_the_first_tile() {
        let (seq, heads) = (23, 4);
        let shape = Shape {
            batch: 1,
            heads,
            seq_q: seq,
            seq_k: seq,
            d_k: 2,
            d_v: 3,
        };
        let q: Vec<f32> = (0..heads * seq)
            .flat_map(|i| [1.0, 0.1 * (i % 3) as f32])
            .collect();
        // Head 0: scores climbing 9 per key (36 per tile of 4); head 1: falling as fast from
        // 207; head 2: about -150 everywhere (below the floor: rebuilt); head 3: about -30
        // (within the floor: the shift moves down to them).
        let k: Vec<f32> = (0..heads * seq)
            .flat_map(|i| {
                let j = (i % seq) as f32;
                let x = match i / seq {
                    0 => 9.0 * j,
                    1 => 9.0 * (seq as f32 - j),
                    2 => -150.0 + 0.5 * j,
                    _ => -30.0 + 0.5 * j,
                };
                [x, 1.0]
            })
            .collect();
        let v = data(heads * seq * 3, 4);
        let bias: Vec<f32> = (0..seq)
            .map(|j| if j == seq - 1 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        for causal in [false, true] {
            for key_bias in [None, Some(bias.as_slice())] {
                let inputs = Inputs {
                    q: &q,
                    k: &k,
                    v: &v,
                    key_bias,
                };
                let params = Params {
                    scale: 1.0,
                    causal,
                    tile_q: 5,
                    tile_k: 4,
                };
                forward_matches_dense(&inputs, &shape, &params);
            }
        }
    }
}
