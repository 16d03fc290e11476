//! Kernel (linear) attention on the cubecl backends (`wgpu`, `cuda`): the
//! [`FusedKernelAttention`] operation as CubeCL kernels, the chunked prefix sums of
//! [`crate::kernels::prefix_sum`] on the device.
//!
//! `out_i = φ(q_i)ᵀ S / φ(q_i)ᵀ z` with `S = Σ_j φ(k_j) v_jᵀ` and `z = Σ_j φ(k_j)` over the keys
//! query `i` sees. Positions are the keys' (query `i` sits at `p = i + seq_k − seq_q`, so
//! causality is bottom-right aligned) and are cut into chunks of `C`:
//!
//! - forward: one unit per `(head, chunk, feature, value column)` sums its chunk's state
//!   `[S | z]`; one unit per `(head, feature, column)` turns the chunk states into exclusive
//!   prefix sums; one unit per query row reads the state before its chunk and adds the keys of
//!   its own chunk up to its position (`φ(q_i)·φ(k_j)` recomputed). Bidirectional (and cross)
//!   attention sums its chunks' states into one that every query reads.
//! - backward: the same states again; one unit per query row writes `dq`, and the row's
//!   `g / den` and `−g·out / den` (`g` the output gradient); the query-side chunk sums of those
//!   become exclusive suffix sums, and one unit per key row writes `dk` and `dv` from the suffix
//!   after its chunk plus the queries of its own chunk at or after it.
//!
//! Cost: O(N·m·d_v + N·C·(m + d_v)) time; memory O(N/C · m · d_v) for the chunk states and
//! O(N·d_v) for the backward's row terms, never the N × m × d_v cumulative tensor or an N × N
//! matrix. Feature maps: the features themselves (`φ = id`, the caller zeroes padded keys) or
//! `φ = elu + 1` applied here, with padded keys weighted 0 through `keep [B, Nk]`. The
//! normaliser is floored at [`DENOMINATOR_FLOOR`] (a query that sees no key gets 0), and the
//! floor stops the gradient as `clamp_min` does. Untiled: each unit reads its rows from global
//! memory, a correct, memory-lean first version rather than a fast one.
//!
//! Over 600 lines on purpose: five kernels, each listing the tensors it reads (a CubeCL launch
//! struct cannot hold tensors), next to the host code that chains them forward and backward.
//!
//! [`FusedKernelAttention`]: crate::kernels::fused::linear::FusedKernelAttention

use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{dims_of, dims4, empty_like, launch_shape};

/// The floor of the normaliser `φ(q)·z` (as [`crate::kernels::prefix_sum::denominator_floor`]
/// for `f32`).
pub const DENOMINATOR_FLOOR: f32 = 1.0e-30;

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
fn chunk_sums_kernel<F: Float>(
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
fn scan_kernel<F: Float>(
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
fn total_kernel<F: Float>(
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
fn forward_rows_kernel<F: Float>(
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
fn backward_rows_kernel<F: Float>(
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
fn backward_keys_kernel<F: Float>(
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

/// Chunk length of bidirectional attention's partial states, summed into one afterwards (so no
/// unit sums a whole sequence alone).
const BIDIRECTIONAL_CHUNK: usize = 256;

/// The problem's sizes, and its chunks (bidirectional: partial states summed into chunk 0).
struct Plan {
    batch: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    m: usize,
    d_v: usize,
    causal: bool,
    chunk: usize,
    chunks: usize,
    masked: bool,
    elu: bool,
}

impl Plan {
    fn new(
        q: &CubeTensor,
        k: &CubeTensor,
        v: &CubeTensor,
        keep: &CubeTensor,
        opts: Options,
    ) -> Self {
        let ([b, h, nq, m], [kb, kh, nk, km], [vb, vh, vk, dv]) = (dims4(q), dims4(k), dims4(v));
        assert!(
            [kb, kh, km] == [b, h, m] && [vb, vh, vk] == [b, h, nk],
            "kernel attention: phi_q {:?}, phi_k {:?}, v {:?} disagree",
            [b, h, nq, m],
            [kb, kh, nk, km],
            [vb, vh, vk, dv]
        );
        assert_eq!(
            q.dtype,
            DType::F32,
            "the cubecl kernel attention runs on f32"
        );
        assert!(
            m > 0 && dv > 0,
            "the cubecl kernel attention needs non-empty widths, got m {m}, d_v {dv}"
        );
        if opts.masked {
            assert_eq!(
                dims_of(keep),
                [b, nk],
                "kernel attention: keep is [batch, seq_k]"
            );
        }
        let causal = opts.chunk > 0;
        assert!(
            !causal || nk >= nq,
            "causal kernel attention needs seq_k >= seq_q, got {nq} > {nk}"
        );
        let chunk = if causal {
            opts.chunk
        } else {
            BIDIRECTIONAL_CHUNK
        };
        Self {
            batch: b,
            heads: h,
            seq_q: nq,
            seq_k: nk,
            m,
            d_v: dv,
            causal,
            chunk,
            chunks: if causal { nk } else { nq.max(nk) }.div_ceil(chunk).max(1),
            masked: opts.masked,
            elu: opts.elu,
        }
    }

    /// Bidirectional attention has no query/key alignment; causal aligns the ends.
    fn offset(&self) -> usize {
        if self.causal {
            self.seq_k - self.seq_q
        } else {
            0
        }
    }
}

/// The operation's settings, as [`FusedKernelAttention`] passes them.
///
/// [`FusedKernelAttention`]: crate::kernels::fused::linear::FusedKernelAttention
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Whether `keep` weights the keys (`elu` features only).
    pub masked: bool,
    /// `φ = elu + 1` applied here (otherwise the inputs are the features).
    pub elu: bool,
    /// Causal chunk length; 0 for bidirectional.
    pub chunk: usize,
}

/// The chunk sums `[B·H, chunks, m, width + 1]` of `x` (features `φ(x)`, weighted by `keep`
/// when `masked`) against `y` and `last` (or ones), then scanned (exclusive, forwards or
/// backwards) when causal.
#[allow(clippy::too_many_arguments)]
fn chunk_states(
    plan: &Plan,
    x: &CubeTensor,
    keep: &CubeTensor,
    y: &CubeTensor,
    last: Option<&CubeTensor>,
    rows: usize,
    offset: usize,
    masked: bool,
    reverse: bool,
) -> CubeTensor {
    let bh = plan.batch * plan.heads;
    let width = plan.d_v;
    let sums = empty_like(x, &[bh, plan.chunks, plan.m, width + 1]);
    let units = bh * plan.chunks * plan.m * (width + 1);
    if units == 0 {
        return sums;
    }
    let dtype = dtype_to_storage_type(x.dtype);
    let (count, dim) = launch_shape(x, units);
    chunk_sums_kernel::launch(
        &x.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        keep.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        last.unwrap_or(keep).clone().into_tensor_arg(),
        sums.clone().into_tensor_arg(),
        units,
        plan.heads,
        rows,
        offset,
        plan.chunk,
        plan.chunks,
        plan.m,
        width,
        masked,
        plan.elu,
        last.is_none(),
        dtype,
    );
    let stride = plan.m * (width + 1);
    let units = bh * stride;
    let (count, dim) = launch_shape(x, units);
    if plan.causal {
        scan_kernel::launch(
            &x.client,
            count,
            dim,
            sums.clone().into_tensor_arg(),
            units,
            plan.chunks,
            stride,
            reverse,
            dtype,
        );
    } else if plan.chunks > 1 {
        total_kernel::launch(
            &x.client,
            count,
            dim,
            sums.clone().into_tensor_arg(),
            units,
            plan.chunks,
            stride,
            dtype,
        );
    }
    sums
}

/// The forward: `out [B, H, Nq, d_v]`. `keep` is `[B, Nk]` (read only when `masked`).
pub fn forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    keep: CubeTensor,
    opts: Options,
) -> CubeTensor {
    let plan = Plan::new(&q, &k, &v, &keep, opts);
    let [q, k, v, keep] = [q, k, v, keep].map(into_contiguous);
    let out = empty_like(&q, &[plan.batch, plan.heads, plan.seq_q, plan.d_v]);
    let rows = plan.batch * plan.heads * plan.seq_q;
    if rows == 0 {
        return out;
    }
    let state = chunk_states(
        &plan,
        &k,
        &keep,
        &v,
        None,
        plan.seq_k,
        0,
        plan.masked,
        false,
    );
    let (count, dim) = launch_shape(&q, rows);
    forward_rows_kernel::launch(
        &q.client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        keep.into_tensor_arg(),
        state.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows,
        plan.heads,
        plan.seq_q,
        plan.seq_k,
        plan.offset(),
        plan.chunk,
        plan.chunks,
        plan.m,
        plan.d_v,
        plan.masked,
        plan.elu,
        plan.causal,
        dtype_to_storage_type(q.dtype),
    );
    out
}

/// The backward: `(dq, dk, dv)` for the output gradient `d_out` of a forward that gave `out`.
pub fn backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    keep: CubeTensor,
    out: CubeTensor,
    d_out: CubeTensor,
    opts: Options,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let plan = Plan::new(&q, &k, &v, &keep, opts);
    let [q, k, v, keep, out, d_out] = [q, k, v, keep, out, d_out].map(into_contiguous);
    let (b, h, nq, nk, m, dv) = (
        plan.batch, plan.heads, plan.seq_q, plan.seq_k, plan.m, plan.d_v,
    );
    let grad_q = empty_like(&q, &[b, h, nq, m]);
    let grad_k = empty_like(&q, &[b, h, nk, m]);
    let grad_v = empty_like(&q, &[b, h, nk, dv]);
    let d_num = empty_like(&q, &[b, h, nq, dv]);
    let d_den = empty_like(&q, &[b, h, nq]);
    let dtype = dtype_to_storage_type(q.dtype);
    let rows = b * h * nq;
    if rows > 0 {
        let state = chunk_states(&plan, &k, &keep, &v, None, nk, 0, plan.masked, false);
        let (count, dim) = launch_shape(&q, rows);
        backward_rows_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            keep.clone().into_tensor_arg(),
            state.into_tensor_arg(),
            out.into_tensor_arg(),
            d_out.into_tensor_arg(),
            grad_q.clone().into_tensor_arg(),
            d_num.clone().into_tensor_arg(),
            d_den.clone().into_tensor_arg(),
            rows,
            h,
            nq,
            nk,
            plan.offset(),
            plan.chunk,
            plan.chunks,
            m,
            dv,
            plan.masked,
            plan.elu,
            plan.causal,
            dtype,
        );
    }
    let key_rows = b * h * nk;
    if key_rows > 0 {
        // Queries carry no key weight; with no query rows the sums are zeros.
        let after = chunk_states(
            &plan,
            &q,
            &keep,
            &d_num,
            Some(&d_den),
            nq,
            plan.offset(),
            false,
            true,
        );
        let (count, dim) = launch_shape(&q, key_rows);
        backward_keys_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            keep.into_tensor_arg(),
            after.into_tensor_arg(),
            d_num.into_tensor_arg(),
            d_den.into_tensor_arg(),
            grad_k.clone().into_tensor_arg(),
            grad_v.clone().into_tensor_arg(),
            key_rows,
            h,
            nq,
            nk,
            plan.offset(),
            plan.chunk,
            plan.chunks,
            m,
            dv,
            plan.masked,
            plan.elu,
            plan.causal,
            dtype,
        );
    }
    (grad_q, grad_k, grad_v)
}
