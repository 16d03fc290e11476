//! The CubeCL kernels of [the block-sparse attention](super): the element rule, the forward
//! and the three backward kernels. Each kernel lists the tensors it reads, since a CubeCL
//! launch struct cannot hold tensors.

use cubecl::prelude::*;

use crate::kernels::cube::{absorb, dot};

/// Below this a running maximum is "no key yet".
const NONE_SEEN: f32 = -3.0e38;

/// The element rule's kind, as compile-time flags of the kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct RuleFlags {
    pub(super) causal: bool,
    pub(super) band: bool,
    pub(super) explicit: bool,
    pub(super) positions: bool,
    pub(super) positions_causal: bool,
    pub(super) self_score: bool,
}

/// Runtime sizes and settings shared by the kernels.
#[derive(CubeType, CubeLaunch)]
pub(super) struct Sizes {
    pub(super) heads: usize,
    pub(super) seq_q: usize,
    pub(super) seq_k: usize,
    pub(super) block: usize,
    pub(super) query_blocks: usize,
    pub(super) key_blocks: usize,
    pub(super) per_block: usize,
    pub(super) plan_heads: usize,
    pub(super) extra: usize,
    pub(super) bias_batch: usize,
    pub(super) bias_heads: usize,
    pub(super) offset: usize,
    pub(super) left: usize,
    pub(super) right: usize,
    pub(super) scale: f32,
    pub(super) self_score: f32,
    pub(super) no_key_lse: f32,
}

/// The plan head of head `hd`.
#[cube]
fn plan_head(hd: usize, sizes: &Sizes) -> usize {
    let mut hp = hd;
    if sizes.plan_heads == 1 {
        hp = 0;
    }
    hp
}

/// Whether query `i` (row `r` of query block `qb`) sees key `j`, read from slot column `col`
/// (`slot · b + offset in block`) of its plan, batch `b`, head row `bh`, plan head `hp`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn sees(
    explicit: &Tensor<f32>,
    query_pos: &Tensor<f32>,
    key_pos: &Tensor<f32>,
    key_bias: &Tensor<f32>,
    sizes: &Sizes,
    bh: usize,
    b: usize,
    hp: usize,
    qb: usize,
    r: usize,
    i: usize,
    j: usize,
    col: usize,
    #[comptime] flags: RuleFlags,
    #[comptime] key_masked: bool,
) -> bool {
    let mut ok = j < sizes.seq_k;
    if ok && flags.causal && j > i + sizes.offset {
        ok = false;
    }
    if ok && flags.band && (j + sizes.left < i || j > i + sizes.right) {
        ok = false;
    }
    if ok && flags.explicit {
        let width = sizes.per_block * sizes.block;
        let at = ((hp * sizes.query_blocks + qb) * sizes.block + r) * width + col;
        if explicit[at] > 0.5 {
            ok = false;
        }
    }
    if ok && flags.positions {
        let kp = key_pos[bh * sizes.seq_k + j];
        if kp < 0.0 {
            ok = false;
        }
        if flags.positions_causal && kp > query_pos[bh * sizes.seq_q + i] {
            ok = false;
        }
    }
    if ok && key_masked && key_bias[b * sizes.seq_k + j] < NONE_SEEN {
        ok = false;
    }
    ok
}

/// The additive key bias of key `j` in batch `b` (0 unless `key_masked`; hidden keys, at
/// `−∞`, never reach it).
#[cube]
fn key_bias_of(
    key_bias: &Tensor<f32>,
    sizes: &Sizes,
    b: usize,
    j: usize,
    #[comptime] key_masked: bool,
) -> f32 {
    let mut bias = f32::new(0.0);
    if key_masked {
        bias = key_bias[b * sizes.seq_k + j];
    }
    bias
}

/// Whether key `j` is the query's own position and scores the self score instead of `q·k`.
#[cube]
fn own(
    query_pos: &Tensor<f32>,
    key_pos: &Tensor<f32>,
    sizes: &Sizes,
    bh: usize,
    i: usize,
    j: usize,
    #[comptime] flags: RuleFlags,
) -> bool {
    let mut is_own = false.runtime();
    if flags.positions && flags.self_score {
        is_own = key_pos[bh * sizes.seq_k + j] == query_pos[bh * sizes.seq_q + i];
    }
    is_own
}

/// The additive bias of extra key `g` for query `i` (0 unless `extra_masked`).
#[cube]
fn extra_bias_of(
    extra_bias: &Tensor<f32>,
    sizes: &Sizes,
    b: usize,
    hd: usize,
    i: usize,
    g: usize,
    #[comptime] extra_masked: bool,
) -> f32 {
    let mut bias = f32::new(0.0);
    if extra_masked {
        let mut bb = b;
        if sizes.bias_batch == 1 {
            bb = 0;
        }
        let mut hh = hd;
        if sizes.bias_heads == 1 {
            hh = 0;
        }
        bias = extra_bias[((bb * sizes.bias_heads + hh) * sizes.seq_q + i) * sizes.extra + g];
    }
    bias
}

/// The key block id of slot `s` of query block `qb` in plan head `hp`, or `key_blocks` for an
/// empty slot.
#[cube]
fn slot_block(ids: &Tensor<f32>, sizes: &Sizes, hp: usize, qb: usize, s: usize) -> usize {
    let id = ids[(hp * sizes.query_blocks + qb) * sizes.per_block + s];
    let mut kb = sizes.key_blocks;
    if id >= 0.0 {
        kb = usize::cast_from(id);
    }
    kb
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    extra_k: &Tensor<f32>,
    extra_v: &Tensor<f32>,
    ids: &Tensor<f32>,
    explicit: &Tensor<f32>,
    query_pos: &Tensor<f32>,
    key_pos: &Tensor<f32>,
    key_bias: &Tensor<f32>,
    extra_bias: &Tensor<f32>,
    out: &mut Tensor<f32>,
    stats: &mut Tensor<f32>,
    sizes: Sizes,
    rows: usize,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
    #[comptime] flags: RuleFlags,
    #[comptime] key_masked: bool,
    #[comptime] extra_masked: bool,
    #[comptime] packed: bool,
) {
    let row = ABSOLUTE_POS;
    if row >= rows {
        terminate!();
    }
    let i = row % sizes.seq_q;
    let bh = row / sizes.seq_q;
    let b = bh / sizes.heads;
    let hd = bh % sizes.heads;
    let hp = plan_head(hd, &sizes);
    let qb = i / sizes.block;
    let r = i % sizes.block;
    // d_v weighted sums, then the running maximum and sum (see `absorb`).
    let mut acc = Array::<f32>::new(d_v + 2);
    for e in 0..d_v {
        acc[e] = 0.0f32;
    }
    acc[d_v] = f32::new(NONE_SEEN);
    acc[d_v + 1] = f32::new(0.0);
    for s in 0..sizes.per_block {
        let kb = slot_block(ids, &sizes, hp, qb, s);
        if kb < sizes.key_blocks {
            for o in 0..sizes.block {
                let j = kb * sizes.block + o;
                if sees(
                    explicit,
                    query_pos,
                    key_pos,
                    key_bias,
                    &sizes,
                    bh,
                    b,
                    hp,
                    qb,
                    r,
                    i,
                    j,
                    s * sizes.block + o,
                    flags,
                    key_masked,
                ) {
                    let mut score = sizes.scale
                        * dot(q, k, row * d_k, (bh * sizes.seq_k + j) * d_k, d_k)
                        + key_bias_of(key_bias, &sizes, b, j, key_masked);
                    if own(query_pos, key_pos, &sizes, bh, i, j, flags) {
                        score = sizes.self_score;
                    }
                    absorb(&mut acc, score, v, (bh * sizes.seq_k + j) * d_v, d_v);
                }
            }
        }
    }
    for g in 0..sizes.extra {
        let bias = extra_bias_of(extra_bias, &sizes, b, hd, i, g, extra_masked);
        if bias > NONE_SEEN {
            let score =
                sizes.scale * dot(q, extra_k, row * d_k, (bh * sizes.extra + g) * d_k, d_k) + bias;
            absorb(&mut acc, score, extra_v, (bh * sizes.extra + g) * d_v, d_v);
        }
    }
    let max = acc[d_v];
    let sum = acc[d_v + 1];
    let stride = comptime!(if packed { d_v + 1 } else { d_v });
    let out_at = row * stride;
    let mut inv = f32::new(0.0);
    if sum > 0.0 {
        inv = 1.0 / sum;
    }
    for e in 0..d_v {
        out[out_at + e] = acc[e] * inv;
    }
    if packed {
        let mut lse = sizes.no_key_lse;
        if sum > 0.0 {
            lse = max + sum.ln();
        }
        out[out_at + d_v] = lse;
    }
    stats[row * 2] = max;
    stats[row * 2 + 1] = sum;
}

/// `dq` per query row, and the row term `Dᵢ = dOᵢ·Oᵢ − dlseᵢ` the key side reads.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_dq_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    extra_k: &Tensor<f32>,
    extra_v: &Tensor<f32>,
    ids: &Tensor<f32>,
    explicit: &Tensor<f32>,
    query_pos: &Tensor<f32>,
    key_pos: &Tensor<f32>,
    key_bias: &Tensor<f32>,
    extra_bias: &Tensor<f32>,
    out: &Tensor<f32>,
    stats: &Tensor<f32>,
    d_out: &Tensor<f32>,
    dq: &mut Tensor<f32>,
    term: &mut Tensor<f32>,
    sizes: Sizes,
    rows: usize,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
    #[comptime] flags: RuleFlags,
    #[comptime] key_masked: bool,
    #[comptime] extra_masked: bool,
    #[comptime] packed: bool,
) {
    let row = ABSOLUTE_POS;
    if row >= rows {
        terminate!();
    }
    let i = row % sizes.seq_q;
    let bh = row / sizes.seq_q;
    let b = bh / sizes.heads;
    let hd = bh % sizes.heads;
    let hp = plan_head(hd, &sizes);
    let qb = i / sizes.block;
    let r = i % sizes.block;
    let stride = comptime!(if packed { d_v + 1 } else { d_v });
    let o_at = row * stride;
    let mut t = dot(d_out, out, o_at, o_at, d_v);
    if packed {
        t -= d_out[o_at + d_v];
    }
    term[row] = t;
    let max = stats[row * 2];
    let sum = stats[row * 2 + 1];
    let mut acc = Array::<f32>::new(d_k);
    for d in 0..d_k {
        acc[d] = 0.0f32;
    }
    if sum > 0.0 {
        let inv = 1.0 / sum;
        for s in 0..sizes.per_block {
            let kb = slot_block(ids, &sizes, hp, qb, s);
            if kb < sizes.key_blocks {
                for o in 0..sizes.block {
                    let j = kb * sizes.block + o;
                    if sees(
                        explicit,
                        query_pos,
                        key_pos,
                        key_bias,
                        &sizes,
                        bh,
                        b,
                        hp,
                        qb,
                        r,
                        i,
                        j,
                        s * sizes.block + o,
                        flags,
                        key_masked,
                    ) && !own(query_pos, key_pos, &sizes, bh, i, j, flags)
                    {
                        let k_at = (bh * sizes.seq_k + j) * d_k;
                        let score = sizes.scale * dot(q, k, row * d_k, k_at, d_k)
                            + key_bias_of(key_bias, &sizes, b, j, key_masked);
                        let p = (score - max).exp() * inv;
                        let dp = dot(d_out, v, o_at, (bh * sizes.seq_k + j) * d_v, d_v);
                        let ds = p * (dp - t);
                        for d in 0..d_k {
                            acc[d] += ds * k[k_at + d];
                        }
                    }
                }
            }
        }
        for g in 0..sizes.extra {
            let bias = extra_bias_of(extra_bias, &sizes, b, hd, i, g, extra_masked);
            if bias > NONE_SEEN {
                let k_at = (bh * sizes.extra + g) * d_k;
                let score = sizes.scale * dot(q, extra_k, row * d_k, k_at, d_k) + bias;
                let p = (score - max).exp() * inv;
                let dp = dot(d_out, extra_v, o_at, (bh * sizes.extra + g) * d_v, d_v);
                let ds = p * (dp - t);
                for d in 0..d_k {
                    acc[d] += ds * extra_k[k_at + d];
                }
            }
        }
    }
    for d in 0..d_k {
        dq[row * d_k + d] = acc[d] * sizes.scale;
    }
}

/// `dk`, `dv` per key row, over the query blocks whose plan lists its key block.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_dkv_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    explicit: &Tensor<f32>,
    query_pos: &Tensor<f32>,
    key_pos: &Tensor<f32>,
    key_bias: &Tensor<f32>,
    inverse_start: &Tensor<f32>,
    inverse: &Tensor<f32>,
    stats: &Tensor<f32>,
    d_out: &Tensor<f32>,
    term: &Tensor<f32>,
    dk: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
    sizes: Sizes,
    key_rows: usize,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
    #[comptime] flags: RuleFlags,
    #[comptime] key_masked: bool,
    #[comptime] packed: bool,
) {
    let key_row = ABSOLUTE_POS;
    if key_row >= key_rows {
        terminate!();
    }
    let j = key_row % sizes.seq_k;
    let bh = key_row / sizes.seq_k;
    let b = bh / sizes.heads;
    let hd = bh % sizes.heads;
    let hp = plan_head(hd, &sizes);
    let kb = j / sizes.block;
    let o = j % sizes.block;
    let stride = comptime!(if packed { d_v + 1 } else { d_v });
    let mut acc_k = Array::<f32>::new(d_k);
    for d in 0..d_k {
        acc_k[d] = 0.0f32;
    }
    let mut acc_v = Array::<f32>::new(d_v);
    for e in 0..d_v {
        acc_v[e] = 0.0f32;
    }
    let k_at = key_row * d_k;
    let v_at = key_row * d_v;
    let list = hp * sizes.key_blocks + kb;
    let first = usize::cast_from(inverse_start[list]);
    let last = usize::cast_from(inverse_start[list + 1]);
    for entry in first..last {
        let code = usize::cast_from(inverse[entry]);
        let qb = code / sizes.per_block;
        let s = code % sizes.per_block;
        for r in 0..sizes.block {
            let i = qb * sizes.block + r;
            if i < sizes.seq_q {
                let row = bh * sizes.seq_q + i;
                let sum = stats[row * 2 + 1];
                if sum > 0.0
                    && sees(
                        explicit,
                        query_pos,
                        key_pos,
                        key_bias,
                        &sizes,
                        bh,
                        b,
                        hp,
                        qb,
                        r,
                        i,
                        j,
                        s * sizes.block + o,
                        flags,
                        key_masked,
                    )
                {
                    let is_own = own(query_pos, key_pos, &sizes, bh, i, j, flags);
                    let mut score = sizes.self_score;
                    if !is_own {
                        score = sizes.scale * dot(q, k, row * d_k, k_at, d_k)
                            + key_bias_of(key_bias, &sizes, b, j, key_masked);
                    }
                    let p = (score - stats[row * 2]).exp() / sum;
                    let o_at = row * stride;
                    for e in 0..d_v {
                        acc_v[e] += p * d_out[o_at + e];
                    }
                    if !is_own {
                        let dp = dot(d_out, v, o_at, v_at, d_v);
                        let ds = p * (dp - term[row]);
                        for d in 0..d_k {
                            acc_k[d] += ds * q[row * d_k + d];
                        }
                    }
                }
            }
        }
    }
    for d in 0..d_k {
        dk[k_at + d] = acc_k[d] * sizes.scale;
    }
    for e in 0..d_v {
        dv[v_at + e] = acc_v[e];
    }
}

/// The extra keys' gradients, one unit per `(head row, extra key)` over every query.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_extra_kernel(
    q: &Tensor<f32>,
    extra_k: &Tensor<f32>,
    extra_v: &Tensor<f32>,
    extra_bias: &Tensor<f32>,
    stats: &Tensor<f32>,
    d_out: &Tensor<f32>,
    term: &Tensor<f32>,
    d_extra_k: &mut Tensor<f32>,
    d_extra_v: &mut Tensor<f32>,
    sizes: Sizes,
    extra_rows: usize,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
    #[comptime] extra_masked: bool,
    #[comptime] packed: bool,
) {
    let extra_row = ABSOLUTE_POS;
    if extra_row >= extra_rows {
        terminate!();
    }
    let g = extra_row % sizes.extra;
    let bh = extra_row / sizes.extra;
    let b = bh / sizes.heads;
    let hd = bh % sizes.heads;
    let stride = comptime!(if packed { d_v + 1 } else { d_v });
    let mut acc_k = Array::<f32>::new(d_k);
    for d in 0..d_k {
        acc_k[d] = 0.0f32;
    }
    let mut acc_v = Array::<f32>::new(d_v);
    for e in 0..d_v {
        acc_v[e] = 0.0f32;
    }
    let k_at = extra_row * d_k;
    let v_at = extra_row * d_v;
    for i in 0..sizes.seq_q {
        let row = bh * sizes.seq_q + i;
        let sum = stats[row * 2 + 1];
        let bias = extra_bias_of(extra_bias, &sizes, b, hd, i, g, extra_masked);
        if sum > 0.0 && bias > NONE_SEEN {
            let score = sizes.scale * dot(q, extra_k, row * d_k, k_at, d_k) + bias;
            let p = (score - stats[row * 2]).exp() / sum;
            let o_at = row * stride;
            for e in 0..d_v {
                acc_v[e] += p * d_out[o_at + e];
            }
            let dp = dot(d_out, extra_v, o_at, v_at, d_v);
            let ds = p * (dp - term[row]);
            for d in 0..d_k {
                acc_k[d] += ds * q[row * d_k + d];
            }
        }
    }
    for d in 0..d_k {
        d_extra_k[k_at + d] = acc_k[d] * sizes.scale;
    }
    for e in 0..d_v {
        d_extra_v[v_at + e] = acc_v[e];
    }
}
