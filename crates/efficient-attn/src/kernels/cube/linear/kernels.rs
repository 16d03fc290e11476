//! The CubeCL kernels of [the kernel attention](super): the feature map, the chunk sums and
//! their scans, and the row kernels forward and backward. Each kernel lists the tensors it
//! reads, since a CubeCL launch struct cannot hold tensors.

use cubecl::prelude::*;

use super::DENOMINATOR_FLOOR;

/// φ(x): `x`, or `elu(x) + 1`.
#[cube]
fn phi<F: Float>(x: F, #[comptime] elu: bool) -> F {
    let mut y = x;
    if elu {
        if x > F::new(0.0) {
            y = x + F::new(1.0);
        } else {
            y = x.exp();
        }
    }
    y
}

/// dφ/dx at `x`.
#[cube]
fn phi_slope<F: Float>(x: F, #[comptime] elu: bool) -> F {
    let mut s = F::new(1.0);
    if elu && x <= F::new(0.0) {
        s = x.exp();
    }
    s
}

/// The weight of key `j` of batch `b`: `keep[b, j]` (1 or 0) when `masked`, 1 otherwise.
#[cube]
fn key_weight<F: Float>(
    keep: &Tensor<F>,
    b: usize,
    seq_k: usize,
    j: usize,
    #[comptime] masked: bool,
) -> F {
    let mut w = F::new(1.0);
    if masked {
        w = keep[b * seq_k + j];
    }
    w
}

/// The lowest position in chunk `c` that holds a row (rows sit at `offset..offset + rows`).
#[cube]
fn chunk_start(c: usize, chunk: usize, offset: usize) -> usize {
    let mut start = c * chunk;
    if start < offset {
        start = offset;
    }
    start
}

/// One past the highest position of chunk `c` (at most `len`).
#[cube]
fn chunk_end(c: usize, chunk: usize, len: usize) -> usize {
    let mut end = (c + 1) * chunk;
    if end > len {
        end = len;
    }
    end
}

/// `sums[h, c, a, col] = Σ_r w_r φ(x[h, r, a]) · y[h, r, col]` over the rows `r` whose
/// position `r + offset` falls in chunk `c`; column `width` is `Σ_r w_r φ(x[h, r, a]) · last_r`
/// with `last_r` 1 (`last_is_one`) or `last[h, r]`. `w_r` is the key weight when `masked`.
/// Keys: `x = k`, `y = v` (the state `[S | z]`); queries: `x = q`, `y = g / den`,
/// `last = −g·out / den` (the backward's `[dS | dz]`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn chunk_sums_kernel<F: Float>(
    x: &Tensor<F>,
    keep: &Tensor<F>,
    y: &Tensor<F>,
    last: &Tensor<F>,
    sums: &mut Tensor<F>,
    units: usize,
    heads: usize,
    rows: usize,
    offset: usize,
    chunk: usize,
    chunks: usize,
    #[comptime] m: usize,
    #[comptime] width: usize,
    #[comptime] masked: bool,
    #[comptime] elu: bool,
    #[comptime] last_is_one: bool,
    #[define(F)] _dtype: ElemType,
) {
    let u = ABSOLUTE_POS;
    if u >= units {
        terminate!();
    }
    let col = u % (width + 1);
    let a = (u / (width + 1)) % m;
    let c = (u / ((width + 1) * m)) % chunks;
    let h = u / ((width + 1) * m * chunks);
    let b = h / heads;
    let mut acc = F::new(0.0);
    let start = chunk_start(c, chunk, offset);
    let end = chunk_end(c, chunk, offset + rows);
    for p in start..end {
        let r = p - offset;
        let f =
            key_weight::<F>(keep, b, rows, r, masked) * phi::<F>(x[(h * rows + r) * m + a], elu);
        let mut t = F::new(1.0);
        if col < width {
            t = y[(h * rows + r) * width + col];
        } else if !last_is_one {
            t = last[h * rows + r];
        }
        acc += f * t;
    }
    sums[u] = acc;
}

/// In place, over the chunks of every `(head, a, col)`: exclusive prefix sums (`reverse`
/// false: the state of the chunks before) or exclusive suffix sums (the chunks after).
#[cube(launch)]
pub(super) fn scan_kernel<F: Float>(
    sums: &mut Tensor<F>,
    units: usize,
    chunks: usize,
    #[comptime] stride: usize,
    #[comptime] reverse: bool,
    #[define(F)] _dtype: ElemType,
) {
    let u = ABSOLUTE_POS;
    if u >= units {
        terminate!();
    }
    let h = u / stride;
    let at = u % stride;
    let mut running = F::new(0.0);
    for step in 0..chunks {
        let mut c = step;
        if reverse {
            c = chunks - 1 - step;
        }
        let idx = (h * chunks + c) * stride + at;
        let t = sums[idx];
        sums[idx] = running;
        running += t;
    }
}

/// In place, over the chunks of every `(head, a, col)`: the sum of all chunks, into chunk 0
/// (bidirectional attention's one state).
#[cube(launch)]
pub(super) fn total_kernel<F: Float>(
    sums: &mut Tensor<F>,
    units: usize,
    chunks: usize,
    #[comptime] stride: usize,
    #[define(F)] _dtype: ElemType,
) {
    let u = ABSOLUTE_POS;
    if u >= units {
        terminate!();
    }
    let h = u / stride;
    let at = u % stride;
    let mut total = F::new(0.0);
    for c in 0..chunks {
        total += sums[(h * chunks + c) * stride + at];
    }
    sums[h * chunks * stride + at] = total;
}

/// `out_i = num / max(den, floor)` for every query row: the state before the row's chunk
/// (the whole state when not `causal`) plus, causally, the keys of its chunk up to it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_rows_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keep: &Tensor<F>,
    state: &Tensor<F>,
    out: &mut Tensor<F>,
    units: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    offset: usize,
    chunk: usize,
    chunks: usize,
    #[comptime] m: usize,
    #[comptime] d_v: usize,
    #[comptime] masked: bool,
    #[comptime] elu: bool,
    #[comptime] causal: bool,
    #[define(F)] _dtype: ElemType,
) {
    let row = ABSOLUTE_POS;
    if row >= units {
        terminate!();
    }
    let i = row % seq_q;
    let h = row / seq_q;
    let b = h / heads;
    let p = i + offset;
    let mut c = 0usize.runtime();
    if causal {
        c = p / chunk;
    }
    let mut fq = Array::<F>::new(m);
    for a in 0..m {
        fq[a] = phi::<F>(q[row * m + a], elu);
    }
    let mut num = Array::<F>::new(d_v);
    for e in 0..d_v {
        num[e] = F::new(0.0);
    }
    let mut den = F::new(0.0);
    let base = (h * chunks + c) * m * (d_v + 1);
    for a in 0..m {
        let at = base + a * (d_v + 1);
        for e in 0..d_v {
            num[e] += fq[a] * state[at + e];
        }
        den += fq[a] * state[at + d_v];
    }
    if causal {
        for j in c * chunk..p + 1 {
            let w = key_weight::<F>(keep, b, seq_k, j, masked);
            let mut s = F::new(0.0);
            for a in 0..m {
                s += fq[a] * phi::<F>(k[(h * seq_k + j) * m + a], elu);
            }
            s *= w;
            for e in 0..d_v {
                num[e] += s * v[(h * seq_k + j) * d_v + e];
            }
            den += s;
        }
    }
    let floor = F::new(DENOMINATOR_FLOOR);
    if den < floor {
        den = floor;
    }
    for e in 0..d_v {
        out[row * d_v + e] = num[e] / den;
    }
}

/// For every query row: `dq`, and the row terms `g / den` (`d_num`) and `−g·out / den`
/// (`d_den`, 0 where the floor held) the key side sums.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_rows_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keep: &Tensor<F>,
    state: &Tensor<F>,
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    dq: &mut Tensor<F>,
    d_num: &mut Tensor<F>,
    d_den: &mut Tensor<F>,
    units: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    offset: usize,
    chunk: usize,
    chunks: usize,
    #[comptime] m: usize,
    #[comptime] d_v: usize,
    #[comptime] masked: bool,
    #[comptime] elu: bool,
    #[comptime] causal: bool,
    #[define(F)] _dtype: ElemType,
) {
    let row = ABSOLUTE_POS;
    if row >= units {
        terminate!();
    }
    let i = row % seq_q;
    let h = row / seq_q;
    let b = h / heads;
    let p = i + offset;
    let mut c = 0usize.runtime();
    if causal {
        c = p / chunk;
    }
    let mut fq = Array::<F>::new(m);
    for a in 0..m {
        fq[a] = phi::<F>(q[row * m + a], elu);
    }
    // The normaliser again.
    let base = (h * chunks + c) * m * (d_v + 1);
    let mut den = F::new(0.0);
    for a in 0..m {
        den += fq[a] * state[base + a * (d_v + 1) + d_v];
    }
    if causal {
        for j in c * chunk..p + 1 {
            let w = key_weight::<F>(keep, b, seq_k, j, masked);
            let mut s = F::new(0.0);
            for a in 0..m {
                s += fq[a] * phi::<F>(k[(h * seq_k + j) * m + a], elu);
            }
            den += w * s;
        }
    }
    let floor = F::new(DENOMINATOR_FLOOR);
    let mut dd = F::new(0.0);
    let mut g_out = F::new(0.0);
    for e in 0..d_v {
        g_out += d_out[row * d_v + e] * out[row * d_v + e];
    }
    if den >= floor {
        dd = F::new(0.0) - g_out / den;
    } else {
        den = floor;
    }
    let mut dn = Array::<F>::new(d_v);
    for e in 0..d_v {
        dn[e] = d_out[row * d_v + e] / den;
        d_num[row * d_v + e] = dn[e];
    }
    d_den[row] = dd;
    // dφ(q_i) = S dn + z dd (+ Σ over its chunk's keys φ(k_j) (dn·v_j + dd)).
    let mut g = Array::<F>::new(m);
    for a in 0..m {
        let at = base + a * (d_v + 1);
        let mut t = state[at + d_v] * dd;
        for e in 0..d_v {
            t += state[at + e] * dn[e];
        }
        g[a] = t;
    }
    if causal {
        for j in c * chunk..p + 1 {
            let w = key_weight::<F>(keep, b, seq_k, j, masked);
            let mut t = dd;
            for e in 0..d_v {
                t += dn[e] * v[(h * seq_k + j) * d_v + e];
            }
            t *= w;
            for a in 0..m {
                g[a] += t * phi::<F>(k[(h * seq_k + j) * m + a], elu);
            }
        }
    }
    for a in 0..m {
        let x = q[row * m + a];
        dq[row * m + a] = g[a] * phi_slope::<F>(x, elu);
    }
}

/// For every key row: `dk` and `dv` from the query-side sums after its chunk (all of them when
/// not `causal`) plus, causally, the queries of its chunk at or after it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_keys_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keep: &Tensor<F>,
    after: &Tensor<F>,
    d_num: &Tensor<F>,
    d_den: &Tensor<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    units: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    offset: usize,
    chunk: usize,
    chunks: usize,
    #[comptime] m: usize,
    #[comptime] d_v: usize,
    #[comptime] masked: bool,
    #[comptime] elu: bool,
    #[comptime] causal: bool,
    #[define(F)] _dtype: ElemType,
) {
    let key_row = ABSOLUTE_POS;
    if key_row >= units {
        terminate!();
    }
    let j = key_row % seq_k;
    let h = key_row / seq_k;
    let b = h / heads;
    let mut c = 0usize.runtime();
    if causal {
        c = j / chunk;
    }
    let w = key_weight::<F>(keep, b, seq_k, j, masked);
    let mut fk = Array::<F>::new(m);
    for a in 0..m {
        fk[a] = w * phi::<F>(k[key_row * m + a], elu);
    }
    let mut gv = Array::<F>::new(d_v);
    for e in 0..d_v {
        gv[e] = F::new(0.0);
    }
    let mut gk = Array::<F>::new(m);
    let base = (h * chunks + c) * m * (d_v + 1);
    for a in 0..m {
        let at = base + a * (d_v + 1);
        let mut t = after[at + d_v];
        for e in 0..d_v {
            t += after[at + e] * v[key_row * d_v + e];
            gv[e] += fk[a] * after[at + e];
        }
        gk[a] = t;
    }
    if causal {
        let mut first = j;
        if first < offset {
            first = offset;
        }
        for p in first..chunk_end(c, chunk, seq_k) {
            let row = h * seq_q + p - offset;
            let mut s = F::new(0.0);
            let mut t = d_den[row];
            for e in 0..d_v {
                t += d_num[row * d_v + e] * v[key_row * d_v + e];
            }
            for a in 0..m {
                let fq = phi::<F>(q[row * m + a], elu);
                s += fq * fk[a];
                gk[a] += t * fq;
            }
            for e in 0..d_v {
                gv[e] += s * d_num[row * d_v + e];
            }
        }
    }
    for a in 0..m {
        dk[key_row * m + a] = gk[a] * w * phi_slope::<F>(k[key_row * m + a], elu);
    }
    for e in 0..d_v {
        dv[key_row * d_v + e] = gv[e];
    }
}
