//! Exact attention on the cubecl backends (`wgpu`, `cuda`): the [`FusedAttention`] operation
//! as three CubeCL kernels, FlashAttention's algorithm without its tiling. The forward gives
//! every query row one unit that streams over the keys it sees with an online softmax, keeping
//! only the running maximum, the sum and a `d_v`-wide accumulator, and writes the output and
//! the row log-sum-exp; the backward recomputes each score from `q`, `k` and the log-sum-exp,
//! one unit per query row for `dq` and one per key row for `dk` and `dv`. Memory is O(N·d)
//! forward and backward (no N × N matrix is ever stored); time O(N²·d) like the CPU kernel,
//! but without shared-memory tiles, so it is a correct, memory-lean first version rather than
//! a fast one.
//!
//! Masks as on the CPU: key padding is an additive bias per key (0 or `-∞`), causality is
//! bottom-right aligned (query `i` of `seq_q` sees keys `j ≤ i + seq_k − seq_q`), and a query
//! that sees no key gets zeros and a log-sum-exp of [`NO_KEY_LSE`].
//!
//! [`FusedAttention`]: crate::kernels::fused::attention::FusedAttention

use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{absorb, dims4, dot, empty_like, launch_shape};

/// The log-sum-exp written for a query that sees no key (WGSL has no infinite literal): large
/// enough that `exp(s − NO_KEY_LSE)` is 0 for every score, so the backward gives it nothing.
pub const NO_KEY_LSE: f32 = 3.0e38;

/// Below this a running maximum is "no key yet" and a score a masked key.
const NONE_SEEN: f32 = -3.0e38;

/// The number of keys query `i` sees (causal: bottom-right aligned; every key otherwise).
#[cube]
fn keys_seen(i: usize, seq_q: usize, seq_k: usize, #[comptime] causal: bool) -> usize {
    let mut last = seq_k;
    if causal {
        // j ≤ i + seq_k − seq_q, written without a negative intermediate.
        last = 0;
        if i + seq_k + 1 > seq_q {
            last = i + seq_k + 1 - seq_q;
        }
        if last > seq_k {
            last = seq_k;
        }
    }
    last
}

/// The first query that sees key `j` (causal); 0 otherwise.
#[cube]
fn first_query(j: usize, seq_q: usize, seq_k: usize, #[comptime] causal: bool) -> usize {
    let mut first = 0;
    if causal && j + seq_q > seq_k {
        first = j + seq_q - seq_k;
    }
    first
}

/// `scale · q_i · k_j (+ bias_j)`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn score<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    bias: &Tensor<F>,
    q_at: usize,
    k_at: usize,
    bias_at: usize,
    scale: F,
    #[comptime] d_k: usize,
    #[comptime] masked: bool,
) -> F {
    let mut s = dot::<F>(q, k, q_at, k_at, d_k) * scale;
    if masked {
        s += bias[bias_at];
    }
    s
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    rows: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    scale: f32,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
    #[comptime] masked: bool,
    #[comptime] causal: bool,
    #[define(F)] _dtype: ElemType,
) {
    let row = ABSOLUTE_POS;
    if row >= rows {
        terminate!();
    }
    let i = row % seq_q;
    let bh = row / seq_q;
    let b = bh / heads;
    let scale = F::cast_from(scale);
    let none = F::new(NONE_SEEN);
    // d_v weighted sums, then the running maximum and sum (see `absorb`).
    let mut acc = Array::<F>::new(d_v + 2);
    for e in 0..d_v {
        acc[e] = F::new(0.0);
    }
    acc[d_v] = none;
    acc[d_v + 1] = F::new(0.0);
    let last = keys_seen(i, seq_q, seq_k, causal);
    for j in 0..last {
        let s = score::<F>(
            q,
            k,
            bias,
            row * d_k,
            (bh * seq_k + j) * d_k,
            b * seq_k + j,
            scale,
            d_k,
            masked,
        );
        if s > none {
            absorb::<F>(&mut acc, s, v, (bh * seq_k + j) * d_v, d_v);
        }
    }
    let max = acc[d_v];
    let sum = acc[d_v + 1];
    let out_at = row * d_v;
    if sum > F::new(0.0) {
        for e in 0..d_v {
            out[out_at + e] = acc[e] / sum;
        }
        lse[row] = max + sum.ln();
    } else {
        for e in 0..d_v {
            out[out_at + e] = F::new(0.0);
        }
        lse[row] = F::new(NO_KEY_LSE);
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<F>,
    out: &Tensor<F>,
    lse: &Tensor<F>,
    d_out: &Tensor<F>,
    dq: &mut Tensor<F>,
    rows: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    scale: f32,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
    #[comptime] masked: bool,
    #[comptime] causal: bool,
    #[define(F)] _dtype: ElemType,
) {
    let row = ABSOLUTE_POS;
    if row >= rows {
        terminate!();
    }
    let i = row % seq_q;
    let bh = row / seq_q;
    let b = bh / heads;
    let scale = F::cast_from(scale);
    let mut acc = Array::<F>::new(d_k);
    for d in 0..d_k {
        acc[d] = F::new(0.0);
    }
    let row_lse = lse[row];
    // D_i = dO_i · O_i, the row term of softmax's backward.
    let term = dot::<F>(d_out, out, row * d_v, row * d_v, d_v);
    let last = keys_seen(i, seq_q, seq_k, causal);
    for j in 0..last {
        let k_at = (bh * seq_k + j) * d_k;
        let s = score::<F>(
            q,
            k,
            bias,
            row * d_k,
            k_at,
            b * seq_k + j,
            scale,
            d_k,
            masked,
        );
        let p = (s - row_lse).exp();
        let dp = dot::<F>(d_out, v, row * d_v, (bh * seq_k + j) * d_v, d_v);
        let ds = p * (dp - term);
        for d in 0..d_k {
            acc[d] += ds * k[k_at + d];
        }
    }
    for d in 0..d_k {
        dq[row * d_k + d] = acc[d] * scale;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_dkv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<F>,
    out: &Tensor<F>,
    lse: &Tensor<F>,
    d_out: &Tensor<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    key_rows: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    scale: f32,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
    #[comptime] masked: bool,
    #[comptime] causal: bool,
    #[define(F)] _dtype: ElemType,
) {
    let key_row = ABSOLUTE_POS;
    if key_row >= key_rows {
        terminate!();
    }
    let j = key_row % seq_k;
    let bh = key_row / seq_k;
    let b = bh / heads;
    let scale = F::cast_from(scale);
    let mut acc_k = Array::<F>::new(d_k);
    for d in 0..d_k {
        acc_k[d] = F::new(0.0);
    }
    let mut acc_v = Array::<F>::new(d_v);
    for e in 0..d_v {
        acc_v[e] = F::new(0.0);
    }
    let k_at = key_row * d_k;
    let v_at = key_row * d_v;
    let first = first_query(j, seq_q, seq_k, causal);
    for i in first..seq_q {
        let row = bh * seq_q + i;
        let s = score::<F>(
            q,
            k,
            bias,
            row * d_k,
            k_at,
            b * seq_k + j,
            scale,
            d_k,
            masked,
        );
        let p = (s - lse[row]).exp();
        let o_at = row * d_v;
        for e in 0..d_v {
            acc_v[e] += p * d_out[o_at + e];
        }
        let dp = dot::<F>(d_out, v, o_at, v_at, d_v);
        let ds = p * (dp - dot::<F>(d_out, out, o_at, o_at, d_v));
        for d in 0..d_k {
            acc_k[d] += ds * q[row * d_k + d];
        }
    }
    for d in 0..d_k {
        dk[k_at + d] = acc_k[d] * scale;
    }
    for e in 0..d_v {
        dv[v_at + e] = acc_v[e];
    }
}

/// The forward: `(out [B, H, Nq, dv], lse [B, H, Nq])`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    key_bias: CubeTensor,
    masked: bool,
    causal: bool,
    scale: f32,
) -> (CubeTensor, CubeTensor) {
    let ([b, h, nq, dk], [_, _, nk, _], [_, _, _, dv]) = (dims4(&q), dims4(&k), dims4(&v));
    assert_eq!(q.dtype, DType::F32, "the cubecl attention runs on f32");
    let (q, k, v, bias) = (
        into_contiguous(q),
        into_contiguous(k),
        into_contiguous(v),
        into_contiguous(key_bias),
    );
    let out = empty_like(&q, &[b, h, nq, dv]);
    let lse = empty_like(&q, &[b, h, nq]);
    let rows = b * h * nq;
    if rows > 0 {
        let (count, dim) = launch_shape(&q, rows);
        forward_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            bias.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            rows,
            h,
            nq,
            nk,
            scale,
            dk,
            dv,
            masked,
            causal,
            dtype_to_storage_type(q.dtype),
        );
    }
    (out, lse)
}

/// The backward: `(dq, dk, dv)` for the output gradient `d_out` of a forward that gave `out`
/// and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    key_bias: CubeTensor,
    out: CubeTensor,
    lse: CubeTensor,
    d_out: CubeTensor,
    masked: bool,
    causal: bool,
    scale: f32,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let ([b, h, nq, dk], [_, _, nk, _], [_, _, _, dv]) = (dims4(&q), dims4(&k), dims4(&v));
    let [q, k, v, bias, out, lse, d_out] =
        [q, k, v, key_bias, out, lse, d_out].map(into_contiguous);
    let grad_q = empty_like(&q, &[b, h, nq, dk]);
    let grad_k = empty_like(&q, &[b, h, nk, dk]);
    let grad_v = empty_like(&q, &[b, h, nk, dv]);
    let dtype = dtype_to_storage_type(q.dtype);
    let rows = b * h * nq;
    if rows > 0 {
        let (count, dim) = launch_shape(&q, rows);
        backward_dq_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            bias.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            d_out.clone().into_tensor_arg(),
            grad_q.clone().into_tensor_arg(),
            rows,
            h,
            nq,
            nk,
            scale,
            dk,
            dv,
            masked,
            causal,
            dtype,
        );
    }
    let key_rows = b * h * nk;
    if key_rows > 0 {
        let (count, dim) = launch_shape(&q, key_rows);
        backward_dkv_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            bias.into_tensor_arg(),
            out.into_tensor_arg(),
            lse.into_tensor_arg(),
            d_out.into_tensor_arg(),
            grad_k.clone().into_tensor_arg(),
            grad_v.clone().into_tensor_arg(),
            key_rows,
            h,
            nq,
            nk,
            scale,
            dk,
            dv,
            masked,
            causal,
            dtype,
        );
    }
    (grad_q, grad_k, grad_v)
}
