//! Block-sparse attention, tiled like FlashAttention-2 but over a [`BlockPlan`], on `f32`
//! slices: the fused form of [`crate::kernels::block_sparse`].
//!
//! - A query block (`b` rows) visits the key blocks its plan lists, in place in `K` and `V`
//!   (nothing is gathered or copied), then the extra (global) keys if any. Each visit is one
//!   GEMM for the scores, the [`ElementRule`] and the masks applied to that block only, an
//!   online-softmax update and one GEMM into the output. Only the output and the row
//!   log-sum-exp are written: O(N·d) memory, O(N·m·b·d) time for m key blocks per query block.
//! - Backward: per `(batch, head)`, the same visits in the same order recompute the
//!   probabilities from the log-sum-exp; five GEMMs per visit give `dQ`, `dK`, `dV` (and the
//!   extra keys' gradients).
//! - Masks: the rule (causal, band or explicit) per element, key padding as an additive bias
//!   per key, the extra keys' own mask as a bias per (query, extra key). A query that sees no
//!   key gets zeros, as in [`super::flash`].
//! - Row statistics: each row's shift (near its maximum) and sum of exponentials, kept apart
//!   rather than as one log-sum-exp, so that the backward's probabilities stay exact when the
//!   scores are large (Reformer's self score −1e5: `lse = −1e5 + ln 2` has an f32 rounding
//!   error of 4e-3, which became a 0.4% error in the probabilities).
//! - Threads: rayon over `(batch, head, query block)` forward and `(batch, head)` backward;
//!   every GEMM is single-threaded.
//!
//! Over 600 lines on purpose: the backward must visit the same blocks, apply the same rules
//! (causal, band, explicit, by position with the self score) and recompute the same
//! probabilities as the forward; one file keeps the visit machinery they share next to both.

use rayon::prelude::*;

use super::flash::{absorb_tile_row, with_scratch};
use super::gemm::{Mat, MatMut, gemm};
use super::simd::RowOps;
use super::zeros;
use crate::kernels::block_sparse::{BlockPlan, ElementRule};

/// The problem: `[batch, heads, seq, width]` row-major tensors, and `extra` keys per head.
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
    /// Extra keys every query sees besides its plan (0 for none).
    pub extra: usize,
}

/// The plan, the rule inside planned blocks and the score scale.
#[derive(Clone, Copy, Debug)]
pub struct Pattern<'a> {
    /// Key blocks per query block.
    pub plan: &'a BlockPlan,
    /// Which positions inside a planned key block a query sees.
    pub rule: &'a ElementRule,
    /// Score scale (1 when the queries come scaled).
    pub scale: f32,
    /// The original positions of [`ElementRule::Positions`] (required with that rule).
    pub positions: Option<Positions<'a>>,
}

/// The host side of [`ElementRule::Positions`]: each query's and key's original position,
/// `[batch·heads, seq_q]` and `[batch·heads, seq_k]` row-major (negative keys are hidden).
#[derive(Clone, Copy, Debug)]
pub struct Positions<'a> {
    /// Of the queries.
    pub query: &'a [i64],
    /// Of the keys.
    pub key: &'a [i64],
    /// Hide keys after the query.
    pub causal: bool,
    /// The score of a query against its own position, replacing `q·k` (zero gradient).
    pub self_score: Option<f32>,
}

/// The extra keys' mask as an additive bias `[batch or 1, heads or 1, seq_q, extra]`
/// (0 = visible, `-∞` = masked).
#[derive(Clone, Copy, Debug)]
pub struct ExtraBias<'a> {
    /// The bias, row-major.
    pub data: &'a [f32],
    /// Its batch dimension: 1 or the batch size.
    pub batch: usize,
    /// Its head dimension: 1 or the heads.
    pub heads: usize,
}

/// Inputs of one call, all row-major: `q [B, H, Nq, Dk]`, `k [B, H, Nk, Dk]`,
/// `v [B, H, Nk, Dv]`, the key bias `[B, Nk]`, the extra keys `[B, H, G, Dk]` and values
/// `[B, H, G, Dv]` (empty when `G = 0`) and their mask.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Additive key bias (padding), if any key is padded.
    pub key_bias: Option<&'a [f32]>,
    /// Extra keys.
    pub extra_k: &'a [f32],
    /// Extra values.
    pub extra_v: &'a [f32],
    /// The extra keys' mask, if any.
    pub extra_bias: Option<ExtraBias<'a>>,
}

impl Inputs<'_> {
    fn check(&self, s: &Shape, pattern: &Pattern<'_>) {
        let bh = s.batch * s.heads;
        assert_eq!(self.q.len(), bh * s.seq_q * s.d_k, "block-sparse: q size");
        assert_eq!(self.k.len(), bh * s.seq_k * s.d_k, "block-sparse: k size");
        assert_eq!(self.v.len(), bh * s.seq_k * s.d_v, "block-sparse: v size");
        assert_eq!(
            self.extra_k.len(),
            bh * s.extra * s.d_k,
            "block-sparse: extra k size"
        );
        assert_eq!(
            self.extra_v.len(),
            bh * s.extra * s.d_v,
            "block-sparse: extra v size"
        );
        if let Some(b) = self.key_bias {
            assert_eq!(b.len(), s.batch * s.seq_k, "block-sparse: key bias size");
        }
        if let Some(e) = self.extra_bias {
            assert!(
                (e.batch == 1 || e.batch == s.batch) && (e.heads == 1 || e.heads == s.heads),
                "block-sparse: extra mask [{}, {}] against batch {} × heads {}",
                e.batch,
                e.heads,
                s.batch,
                s.heads
            );
            assert_eq!(
                e.data.len(),
                e.batch * e.heads * s.seq_q * s.extra,
                "block-sparse: extra mask size"
            );
        }
        let plan = pattern.plan;
        assert!(
            plan.query_blocks * plan.block >= s.seq_q,
            "block plan covers {} queries, input has {}",
            plan.query_blocks * plan.block,
            s.seq_q
        );
        assert!(
            plan.key_blocks * plan.block >= s.seq_k,
            "block plan covers {} keys, input has {}",
            plan.key_blocks * plan.block,
            s.seq_k
        );
        assert!(
            plan.heads == 1 || plan.heads == s.heads,
            "plan for {} heads, input has {}",
            plan.heads,
            s.heads
        );
        if let ElementRule::Positions(_) = pattern.rule {
            let p = pattern
                .positions
                .expect("the positions rule needs the positions on the host");
            assert_eq!(
                p.query.len(),
                bh * s.seq_q,
                "block-sparse: query positions size"
            );
            assert_eq!(
                p.key.len(),
                bh * s.seq_k,
                "block-sparse: key positions size"
            );
        }
        if let ElementRule::Explicit(mask) = pattern.rule {
            assert_eq!(
                mask.len(),
                plan.heads * plan.query_blocks * plan.block * plan.per_block * plan.block,
                "explicit mask must be [plan heads, query blocks, b, m·b]"
            );
        }
    }

    /// The slices of head `bh` (of `batch · heads`).
    fn head(&self, s: &Shape, bh: usize) -> Head<'_> {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let q = s.seq_q;
        Head {
            bh,
            head: h,
            q: &self.q[bh * q * s.d_k..(bh + 1) * q * s.d_k],
            k: &self.k[bh * s.seq_k * s.d_k..(bh + 1) * s.seq_k * s.d_k],
            v: &self.v[bh * s.seq_k * s.d_v..(bh + 1) * s.seq_k * s.d_v],
            key_bias: self.key_bias.map(|x| &x[b * s.seq_k..(b + 1) * s.seq_k]),
            extra_k: &self.extra_k[bh * s.extra * s.d_k..(bh + 1) * s.extra * s.d_k],
            extra_v: &self.extra_v[bh * s.extra * s.d_v..(bh + 1) * s.extra * s.d_v],
            extra_bias: self.extra_bias.map(|e| {
                let slab = (b % e.batch) * e.heads + h % e.heads;
                &e.data[slab * q * s.extra..(slab + 1) * q * s.extra]
            }),
        }
    }
}

/// The slices of one `(batch, head)`.
struct Head<'a> {
    /// Index in `batch · heads`.
    bh: usize,
    head: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    key_bias: Option<&'a [f32]>,
    extra_k: &'a [f32],
    extra_v: &'a [f32],
    /// `[seq_q, extra]`.
    extra_bias: Option<&'a [f32]>,
}

/// One visit of a query block: planned key block `slot` at keys `[k0, k1)`, or the extra keys.
#[derive(Clone, Copy, Debug)]
enum Visit {
    Keys { slot: usize, k0: usize, k1: usize },
    Extra,
}

/// The visits of query block `qb` in head `h`, in order.
fn visits(shape: &Shape, plan: &BlockPlan, h: usize, qb: usize) -> impl Iterator<Item = Visit> {
    let b = plan.block;
    let seq_k = shape.seq_k;
    (0..plan.per_block)
        .filter_map(move |slot| {
            let k0 = plan.get(h, qb, slot)? * b;
            (k0 < seq_k).then(|| Visit::Keys {
                slot,
                k0,
                k1: (k0 + b).min(seq_k),
            })
        })
        .chain((shape.extra > 0).then_some(Visit::Extra))
}

impl Visit {
    fn cols(&self, shape: &Shape) -> usize {
        match *self {
            Visit::Keys { k0, k1, .. } => k1 - k0,
            Visit::Extra => shape.extra,
        }
    }

    /// Keys and values of this visit in head `head`.
    fn keys<'a>(&self, shape: &Shape, head: &Head<'a>) -> (&'a [f32], &'a [f32]) {
        match *self {
            Visit::Keys { k0, k1, .. } => (
                &head.k[k0 * shape.d_k..k1 * shape.d_k],
                &head.v[k0 * shape.d_v..k1 * shape.d_v],
            ),
            Visit::Extra => (head.extra_k, head.extra_v),
        }
    }

    /// The additive bias of query `i`'s row.
    fn bias<'a>(&self, shape: &Shape, head: &Head<'a>, i: usize) -> Option<&'a [f32]> {
        match *self {
            Visit::Keys { k0, k1, .. } => head.key_bias.map(|x| &x[k0..k1]),
            Visit::Extra => head
                .extra_bias
                .map(|x| &x[i * shape.extra..(i + 1) * shape.extra]),
        }
    }

    /// Sets the positions of query `i`'s score row the rule hides to `-∞` (and, by position,
    /// its own position to the self score).
    fn mask_row(&self, at: Site<'_>, row: &mut [f32]) {
        let Visit::Keys { slot, k0, .. } = *self else {
            return;
        };
        let Site {
            pattern,
            head,
            qb,
            i,
            ..
        } = at;
        let cols = row.len();
        match pattern.rule {
            ElementRule::Positions(_) => {
                let (qp, keys, p) = positions(at, k0, cols);
                for (x, &kp) in row.iter_mut().zip(keys) {
                    if kp < 0 || (p.causal && kp > qp) {
                        *x = f32::NEG_INFINITY;
                    } else if kp == qp
                        && let Some(score) = p.self_score
                    {
                        *x = score / pattern.scale;
                    }
                }
            }
            ElementRule::All => {}
            ElementRule::Causal { offset } => {
                let limit = (i + offset + 1).saturating_sub(k0).min(cols);
                row[limit..].fill(f32::NEG_INFINITY);
            }
            ElementRule::Band { left, right } => {
                let lo = i.saturating_sub(*left).saturating_sub(k0).min(cols);
                let hi = (i + right + 1).saturating_sub(k0).clamp(lo, cols);
                row[..lo].fill(f32::NEG_INFINITY);
                row[hi..].fill(f32::NEG_INFINITY);
            }
            ElementRule::Explicit(mask) => {
                let plan = pattern.plan;
                let (b, m) = (plan.block, plan.per_block);
                let ph = if plan.heads == 1 { 0 } else { head.head };
                let r = i - qb * b;
                let start = (((ph * plan.query_blocks + qb) * b + r) * m + slot) * b;
                for (x, &hidden) in row.iter_mut().zip(&mask[start..start + cols]) {
                    if hidden {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Where a score row lies: the problem, the head, the query block and the query.
#[derive(Clone, Copy)]
struct Site<'a> {
    shape: &'a Shape,
    pattern: &'a Pattern<'a>,
    head: &'a Head<'a>,
    qb: usize,
    i: usize,
}

/// Query `i`'s position, the positions of keys `[k0, k0 + cols)` and the rule's settings.
fn positions<'a>(at: Site<'a>, k0: usize, cols: usize) -> (i64, &'a [i64], Positions<'a>) {
    let p = at
        .pattern
        .positions
        .expect("the positions rule needs the positions on the host");
    let (bh, s) = (at.head.bh, at.shape);
    let keys = &p.key[bh * s.seq_k + k0..bh * s.seq_k + k0 + cols];
    (p.query[bh * s.seq_q + at.i], keys, p)
}

impl Visit {
    /// Zeroes the score gradients of the positions whose score is a constant (the self score).
    fn zero_fixed(&self, at: Site<'_>, grad: &mut [f32]) {
        let Visit::Keys { k0, .. } = *self else {
            return;
        };
        if !matches!(at.pattern.rule, ElementRule::Positions(_)) {
            return;
        }
        let (qp, keys, p) = positions(at, k0, grad.len());
        if p.self_score.is_some() {
            for (g, &kp) in grad.iter_mut().zip(keys) {
                if kp == qp {
                    *g = 0.0;
                }
            }
        }
    }
}

/// The widest visit: the scratch row width.
fn widest(shape: &Shape, plan: &BlockPlan) -> usize {
    plan.block.max(shape.extra).max(1)
}

/// Forward: writes `out [B, H, Nq, Dv]` and the row statistics `stats [B, H, Nq, 2]`
/// (shift, sum of `exp(score − shift)`; `(+∞, 0)` for a row that sees no key).
///
/// # Panics
/// If a slice's size does not match `shape` or the plan does not cover it.
pub fn forward(
    inputs: Inputs<'_>,
    shape: Shape,
    pattern: Pattern<'_>,
    out: &mut [f32],
    stats: &mut [f32],
) {
    inputs.check(&shape, &pattern);
    let Shape { seq_q, d_v, .. } = shape;
    let bh_total = shape.batch * shape.heads;
    assert_eq!(out.len(), bh_total * seq_q * d_v, "block-sparse: out size");
    assert_eq!(
        stats.len(),
        2 * bh_total * seq_q,
        "block-sparse: stats size"
    );
    if seq_q == 0 || d_v == 0 {
        for s in stats.chunks_mut(2) {
            s.copy_from_slice(&[f32::INFINITY, 0.0]);
        }
        return;
    }
    let ops = RowOps::detect();
    let b = pattern.plan.block.max(1);
    out.par_chunks_mut(seq_q * d_v)
        .zip(stats.par_chunks_mut(2 * seq_q))
        .enumerate()
        .for_each(|(bh, (out, stats))| {
            let head = inputs.head(&shape, bh);
            out.par_chunks_mut(b * d_v)
                .zip(stats.par_chunks_mut(2 * b))
                .enumerate()
                .for_each(|(qb, (o, l))| {
                    with_scratch(l.len() / 2 * widest(&shape, pattern.plan), |scores| {
                        forward_block(&ops, &shape, &pattern, &head, qb, o, l, scores)
                    })
                });
        });
}

/// One query block of one head, with its score buffer (`rows × widest`).
#[allow(clippy::too_many_arguments)]
fn forward_block(
    ops: &RowOps,
    shape: &Shape,
    pattern: &Pattern<'_>,
    head: &Head<'_>,
    qb: usize,
    out: &mut [f32],
    stats: &mut [f32],
    scores: &mut [f32],
) {
    let (d_k, d_v) = (shape.d_k, shape.d_v);
    let rows = stats.len() / 2;
    let q0 = qb * pattern.plan.block;
    let q = &head.q[q0 * d_k..(q0 + rows) * d_k];
    let width = widest(shape, pattern.plan);
    // Each row's shift starts as a guess: 0 for the first row, then the row above's.
    let mut shift = vec![0.0f32; rows];
    let mut sum = vec![0.0f32; rows];
    out.fill(0.0);
    for visit in visits(shape, pattern.plan, head.head, qb) {
        let cols = visit.cols(shape);
        let (k, v) = visit.keys(shape, head);
        gemm(
            MatMut::rows(scores, rows, cols, width),
            Mat::rows(q, rows, d_k, d_k),
            Mat::transposed(k, d_k, cols, d_k),
            0.0,
            1.0,
        );
        for r in 0..rows {
            let i = q0 + r;
            let row = &mut scores[r * width..r * width + cols];
            let at = Site {
                shape,
                pattern,
                head,
                qb,
                i,
            };
            visit.mask_row(at, row);
            if r > 0 && sum[r] == 0.0 {
                shift[r] = shift[r - 1];
            }
            let q_row = &q[r * d_k..(r + 1) * d_k];
            absorb_tile_row(
                ops,
                row,
                pattern.scale,
                visit.bias(shape, head, i),
                &mut out[r * d_v..(r + 1) * d_v],
                (&mut shift[r], &mut sum[r]),
                |row| {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = ops.dot(q_row, &k[j * d_k..(j + 1) * d_k]);
                    }
                    visit.mask_row(at, row);
                },
            );
        }
        gemm(
            MatMut::rows(out, rows, d_v, d_v),
            Mat::rows(scores, rows, cols, width),
            Mat::rows(v, cols, d_v, d_v),
            1.0,
            1.0,
        );
    }
    for r in 0..rows {
        let row = &mut out[r * d_v..(r + 1) * d_v];
        if sum[r] > 0.0 {
            ops.scale(row, 1.0 / sum[r]);
            stats[2 * r..2 * r + 2].copy_from_slice(&[shift[r], sum[r]]);
        } else {
            row.fill(0.0);
            stats[2 * r..2 * r + 2].copy_from_slice(&[f32::INFINITY, 0.0]);
        }
    }
}

/// The gradients of one call: `dq`, `dk`, `dv` like the inputs, and the extra keys' and
/// values' (`[B, H, G, Dk]`, `[B, H, G, Dv]`).
#[derive(Debug)]
pub struct Grads {
    /// Of the queries.
    pub dq: Vec<f32>,
    /// Of the keys.
    pub dk: Vec<f32>,
    /// Of the values.
    pub dv: Vec<f32>,
    /// Of the extra keys.
    pub d_extra_k: Vec<f32>,
    /// Of the extra values.
    pub d_extra_v: Vec<f32>,
}

/// Each row's log-sum-exp from the forward's `stats` (`+∞` where a row sees no key).
pub fn log_sum_exp(stats: &[f32]) -> Vec<f32> {
    stats
        .chunks(2)
        .map(|s| {
            if s[1] > 0.0 {
                s[0] + s[1].ln()
            } else {
                f32::INFINITY
            }
        })
        .collect()
}

/// The gradients of the forward whose output and row statistics were `out` and `stats`, for the
/// output gradient `d_out` and, when the log-sum-exp is an output too, its gradient `d_lse`
/// (`[B, H, Nq]`; it enters as `Dᵢ = Σⱼ dOᵢⱼ Oᵢⱼ − dlseᵢ`, since `∂lseᵢ/∂Sᵢⱼ = Pᵢⱼ`).
///
/// # Panics
/// If a slice's size does not match `shape` or the plan does not cover it.
pub fn backward(
    inputs: Inputs<'_>,
    shape: Shape,
    pattern: Pattern<'_>,
    out: &[f32],
    stats: &[f32],
    d_out: &[f32],
    d_lse: Option<&[f32]>,
) -> Grads {
    inputs.check(&shape, &pattern);
    let Shape {
        seq_q,
        seq_k,
        d_k,
        d_v,
        extra,
        ..
    } = shape;
    let bh_total = shape.batch * shape.heads;
    assert_eq!(
        out.len(),
        bh_total * seq_q * d_v,
        "block-sparse backward: out size"
    );
    assert_eq!(d_out.len(), out.len(), "block-sparse backward: d_out size");
    assert_eq!(
        stats.len(),
        2 * bh_total * seq_q,
        "block-sparse backward: stats size"
    );
    if let Some(d) = d_lse {
        assert_eq!(
            d.len(),
            bh_total * seq_q,
            "block-sparse backward: d_lse size"
        );
    }
    let ops = RowOps::detect();
    let per_head: Vec<Grads> = (0..bh_total)
        .into_par_iter()
        .map(|bh| {
            let head = inputs.head(&shape, bh);
            let g = HeadGrads {
                out: &out[bh * seq_q * d_v..(bh + 1) * seq_q * d_v],
                stats: &stats[2 * bh * seq_q..2 * (bh + 1) * seq_q],
                d_out: &d_out[bh * seq_q * d_v..(bh + 1) * seq_q * d_v],
                d_lse: d_lse.map(|d| &d[bh * seq_q..(bh + 1) * seq_q]),
            };
            backward_head(&ops, &shape, &pattern, &head, &g)
        })
        .collect();
    let mut grads = Grads {
        dq: Vec::with_capacity(bh_total * seq_q * d_k),
        dk: Vec::with_capacity(bh_total * seq_k * d_k),
        dv: Vec::with_capacity(bh_total * seq_k * d_v),
        d_extra_k: Vec::with_capacity(bh_total * extra * d_k),
        d_extra_v: Vec::with_capacity(bh_total * extra * d_v),
    };
    for g in per_head {
        grads.dq.extend(g.dq);
        grads.dk.extend(g.dk);
        grads.dv.extend(g.dv);
        grads.d_extra_k.extend(g.d_extra_k);
        grads.d_extra_v.extend(g.d_extra_v);
    }
    grads
}

/// The forward results and output gradient of one head.
struct HeadGrads<'a> {
    out: &'a [f32],
    stats: &'a [f32],
    d_out: &'a [f32],
    d_lse: Option<&'a [f32]>,
}

fn backward_head(
    ops: &RowOps,
    shape: &Shape,
    pattern: &Pattern<'_>,
    head: &Head<'_>,
    g: &HeadGrads<'_>,
) -> Grads {
    let Shape {
        seq_q,
        seq_k,
        d_k,
        d_v,
        extra,
        ..
    } = *shape;
    let mut grads = Grads {
        dq: zeros(seq_q * d_k),
        dk: zeros(seq_k * d_k),
        dv: zeros(seq_k * d_v),
        d_extra_k: vec![0.0; extra * d_k],
        d_extra_v: vec![0.0; extra * d_v],
    };
    if seq_q == 0 {
        return grads;
    }
    // D_i = Σ_j dO_ij O_ij − dlse_i.
    let d: Vec<f32> = (0..seq_q)
        .map(|i| {
            let d = ops.dot(
                &g.d_out[i * d_v..(i + 1) * d_v],
                &g.out[i * d_v..(i + 1) * d_v],
            );
            d - g.d_lse.map_or(0.0, |x| x[i])
        })
        .collect();
    let b = pattern.plan.block.max(1);
    let width = widest(shape, pattern.plan);
    with_scratch(2 * b * width, |buf| {
        let (probs, grad) = buf.split_at_mut(b * width);
        for qb in 0..seq_q.div_ceil(b) {
            let q0 = qb * b;
            let rows = b.min(seq_q - q0);
            let q = &head.q[q0 * d_k..(q0 + rows) * d_k];
            let d_o = &g.d_out[q0 * d_v..(q0 + rows) * d_v];
            for visit in visits(shape, pattern.plan, head.head, qb) {
                let cols = visit.cols(shape);
                let (k, v) = visit.keys(shape, head);
                // P = exp(S·scale + bias - shift) / sum, zero where masked.
                gemm(
                    MatMut::rows(probs, rows, cols, width),
                    Mat::rows(q, rows, d_k, d_k),
                    Mat::transposed(k, d_k, cols, d_k),
                    0.0,
                    1.0,
                );
                for r in 0..rows {
                    let i = q0 + r;
                    let row = &mut probs[r * width..r * width + cols];
                    let at = Site {
                        shape,
                        pattern,
                        head,
                        qb,
                        i,
                    };
                    visit.mask_row(at, row);
                    let (shift, sum) = (g.stats[2 * i], g.stats[2 * i + 1]);
                    ops.exp_affine(row, pattern.scale, visit.bias(shape, head, i), shift);
                    if sum > 0.0 {
                        ops.scale(row, 1.0 / sum);
                    }
                }
                // dP = dO Vᵀ, then dS = P ⊙ (dP - D).
                gemm(
                    MatMut::rows(grad, rows, cols, width),
                    Mat::rows(d_o, rows, d_v, d_v),
                    Mat::transposed(v, d_v, cols, d_v),
                    0.0,
                    1.0,
                );
                for r in 0..rows {
                    let row = &mut grad[r * width..r * width + cols];
                    ops.softmax_grad(row, &probs[r * width..r * width + cols], d[q0 + r]);
                    let at = Site {
                        shape,
                        pattern,
                        head,
                        qb,
                        i: q0 + r,
                    };
                    visit.zero_fixed(at, row);
                }
                let (dk, dv) = match visit {
                    Visit::Keys { k0, k1, .. } => (
                        &mut grads.dk[k0 * d_k..k1 * d_k],
                        &mut grads.dv[k0 * d_v..k1 * d_v],
                    ),
                    Visit::Extra => (&mut grads.d_extra_k[..], &mut grads.d_extra_v[..]),
                };
                // dV += Pᵀ dO; dK += dSᵀ Q · scale; dQ += dS K · scale.
                gemm(
                    MatMut::rows(dv, cols, d_v, d_v),
                    Mat::transposed(probs, cols, rows, width),
                    Mat::rows(d_o, rows, d_v, d_v),
                    1.0,
                    1.0,
                );
                gemm(
                    MatMut::rows(dk, cols, d_k, d_k),
                    Mat::transposed(grad, cols, rows, width),
                    Mat::rows(q, rows, d_k, d_k),
                    1.0,
                    pattern.scale,
                );
                gemm(
                    MatMut::rows(&mut grads.dq[q0 * d_k..], rows, d_k, d_k),
                    Mat::rows(grad, rows, cols, width),
                    Mat::rows(k, cols, d_k, d_k),
                    1.0,
                    pattern.scale,
                );
            }
        }
    });
    grads
}
