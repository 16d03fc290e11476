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
//! [`FusedKernelAttention`]: crate::kernels::fused::linear::FusedKernelAttention

use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use self::kernels::{
    backward_keys_kernel, backward_rows_kernel, chunk_sums_kernel, forward_rows_kernel,
    scan_kernel, total_kernel,
};
use super::{dims_of, dims4, empty_like, launch_shape};

/// The floor of the normaliser `φ(q)·z` (as [`crate::kernels::prefix_sum::denominator_floor`]
/// for `f32`).
pub const DENOMINATOR_FLOOR: f32 = 1.0e-30;

mod kernels;

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
        // The CPU path's shape check: a kernel reading past a buffer would not panic.
        crate::kernels::fused::linear::shape_of(&dims_of(q), &dims_of(k), &dims_of(v));
        let ([b, h, nq, m], [_, _, nk, _], [_, _, _, dv]) = (dims4(q), dims4(k), dims4(v));
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
