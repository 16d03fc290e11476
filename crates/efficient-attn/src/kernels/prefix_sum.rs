//! The kernelised-attention engine shared by the Linear Transformer and Performer:
//! `out_i = φ(q_i)ᵀ S / φ(q_i)ᵀ z` with `S = Σ_j φ(k_j) v_jᵀ`, `z = Σ_j φ(k_j)` over the keys
//! query `i` may see.
//!
//! Three forms compute the same thing:
//! - [`bidirectional`]: one `[m, d_v]` state for all queries, O(N·m·d_v);
//! - [`causal_chunked`]: chunks of `C` positions; inside a chunk a masked `C × C` product,
//!   across chunks an exclusive prefix sum of per-chunk states. O(N·C·m + N·m·d_v) time and
//!   O(N/C · m · d_v) memory: never the N × m × d_v cumulative tensor;
//! - [`KernelState::step`]: the recurrence, O(m·d_v) per token, for decoding.
//!
//! [`masked_quadratic`] is the masked N × N form, kept as the oracle the other two are tested
//! against.
//!
//! Feature maps must be non-negative. Padded keys must have zero features (the callers zero
//! them), so they add nothing to S or z.

use burn::tensor::{Bool, DType, Tensor};

use crate::kernels::fused;

/// A floor for the normaliser, so that a query that sees no key gets 0 instead of 0/0.
pub fn denominator_floor(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1.0e-7,
        _ => 1.0e-30,
    }
}

/// Zeroes the feature rows of padded keys.
///
/// # Shapes
/// - `phi_k`: `[batch, heads, seq_k, m]`, `pad`: `[batch, seq_k]`
/// - output: `[batch, heads, seq_k, m]`
pub fn zero_padded(phi_k: Tensor<4>, pad: Option<&Tensor<2, Bool>>) -> Tensor<4> {
    match pad {
        None => phi_k,
        Some(pad) => {
            let [b, h, l, m] = phi_k.dims();
            let mask = pad.clone().reshape([b, 1, l, 1]).expand([b, h, l, m]);
            phi_k.mask_fill(mask, 0.0)
        }
    }
}

/// Every query sees every key: the fused operation on Flex and the cubecl backends,
/// [`bidirectional_composed`] elsewhere.
///
/// # Shapes
/// - `phi_q`: `[batch, heads, seq_q, m]`, `phi_k`: `[batch, heads, seq_k, m]`,
///   `v`: `[batch, heads, seq_k, d_v]`
/// - output: `[batch, heads, seq_q, d_v]`
pub fn bidirectional(phi_q: Tensor<4>, phi_k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    if fused::attention_runs_fused(&phi_q) {
        return fused::linear::kernel_attention(phi_q, phi_k, v, None);
    }
    bidirectional_composed(phi_q, phi_k, v)
}

/// [`bidirectional`] as Burn tensor operations: what runs where the fused operation does not,
/// and its oracle.
///
/// # Shapes
/// - as [`bidirectional`]
pub fn bidirectional_composed(phi_q: Tensor<4>, phi_k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let floor = denominator_floor(phi_q.dtype());
    let kv = phi_k.clone().swap_dims(2, 3).matmul(v); // [batch, heads, m, d_v]
    let z = phi_k.sum_dim(2).swap_dims(2, 3); // [batch, heads, m, 1]
    let num = phi_q.clone().matmul(kv); // [batch, heads, seq_q, d_v]
    let den = phi_q.matmul(z).clamp_min(floor); // [batch, heads, seq_q, 1]
    num.div(den)
}

/// Causal (bottom-right aligned: query `i` sees keys `j <= i + seq_k - seq_q`), in chunks of
/// `chunk` positions: the fused operation on Flex and the cubecl backends,
/// [`causal_chunked_composed`] elsewhere. See
/// the [module docs](self).
///
/// # Shapes
/// - `phi_q`: `[batch, heads, seq_q, m]`, `phi_k`: `[batch, heads, seq_k, m]`,
///   `v`: `[batch, heads, seq_k, d_v]`, with `seq_k >= seq_q`
/// - output: `[batch, heads, seq_q, d_v]`
pub fn causal_chunked(phi_q: Tensor<4>, phi_k: Tensor<4>, v: Tensor<4>, chunk: usize) -> Tensor<4> {
    assert!(chunk > 0, "chunk must be positive");
    if fused::attention_runs_fused(&phi_q) {
        return fused::linear::kernel_attention(phi_q, phi_k, v, Some(chunk));
    }
    causal_chunked_composed(phi_q, phi_k, v, chunk)
}

/// [`causal_chunked`] as Burn tensor operations: what runs where the fused operation does
/// not, and its oracle.
///
/// # Shapes
/// - as [`causal_chunked`]
pub fn causal_chunked_composed(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    chunk: usize,
) -> Tensor<4> {
    let [b, h, lq, m] = phi_q.dims();
    let lk = phi_k.dims()[2];
    let dv = v.dims()[3];
    assert!(
        lk >= lq,
        "causal kernel attention needs seq_k >= seq_q, got {lq} > {lk}"
    );
    assert!(chunk > 0, "chunk must be positive");
    let device = phi_q.device();
    let dtype = phi_q.dtype();
    let floor = denominator_floor(dtype);
    if lq == 0 {
        return Tensor::zeros([b, h, 0, dv], (&device, dtype));
    }

    // Keys before the first query's position form a prefix every query sees.
    let offset = lk - lq;
    let (prefix_kv, prefix_z) = if offset > 0 {
        let pk = phi_k.clone().narrow(2, 0, offset);
        let pv = v.clone().narrow(2, 0, offset);
        (
            Some(pk.clone().swap_dims(2, 3).matmul(pv)), // [batch, heads, m, d_v]
            Some(pk.sum_dim(2)),                         // [batch, heads, 1, m]
        )
    } else {
        (None, None)
    };
    let phi_k = phi_k.narrow(2, offset, lq);
    let v = v.narrow(2, offset, lq);

    // Pad to whole chunks: zero features add nothing, padded queries are dropped at the end.
    let c = chunk.min(lq);
    let nc = lq.div_ceil(c);
    let padded = nc * c;
    let pad_to = |t: Tensor<4>| {
        let [b, h, l, d] = t.dims();
        if l == padded {
            t
        } else {
            let zeros = Tensor::zeros([b, h, padded - l, d], (&device, dtype));
            Tensor::cat(vec![t, zeros], 2)
        }
    };
    let q5 = pad_to(phi_q).reshape([b, h, nc, c, m]); // [batch, heads, chunks, C, m]
    let k5 = pad_to(phi_k).reshape([b, h, nc, c, m]); // [batch, heads, chunks, C, m]
    let v5 = pad_to(v).reshape([b, h, nc, c, dv]); // [batch, heads, chunks, C, d_v]

    // Inside each chunk: the masked C × C product.
    let within = Tensor::<2>::ones([c, c], (&device, dtype))
        .tril(0)
        .reshape([1, 1, 1, c, c]);
    let a = q5.clone().matmul(k5.clone().swap_dims(3, 4)).mul(within); // [batch, heads, chunks, C, C]
    let mut num = a.clone().matmul(v5.clone()); // [batch, heads, chunks, C, d_v]
    let mut den = a.sum_dim(4); // [batch, heads, chunks, C, 1]

    // Across chunks: the exclusive prefix sum of per-chunk states.
    let kv = k5.clone().swap_dims(3, 4).matmul(v5); // [batch, heads, chunks, m, d_v]
    let z = k5.sum_dim(3); // [batch, heads, chunks, 1, m]
    let mut kv_before = kv.clone().cumsum(2).sub(kv); // [batch, heads, chunks, m, d_v]
    let mut z_before = z.clone().cumsum(2).sub(z); // [batch, heads, chunks, 1, m]
    if let (Some(pkv), Some(pz)) = (prefix_kv, prefix_z) {
        kv_before = kv_before.add(pkv.reshape([b, h, 1, m, dv]));
        z_before = z_before.add(pz.reshape([b, h, 1, 1, m]));
    }
    num = num.add(q5.clone().matmul(kv_before));
    den = den.add(q5.matmul(z_before.swap_dims(3, 4))); // [batch, heads, chunks, C, 1]

    let out = num.div(den.clamp_min(floor)).reshape([b, h, padded, dv]);
    if padded == lq {
        out
    } else {
        out.narrow(2, 0, lq)
    }
}

#[cfg(feature = "testing")]
/// Kernel attention with an explicit `[seq_q, seq_k]` product and an optional mask
/// (`true` = masked): the oracle for [`bidirectional`], [`causal_chunked`] and
/// [`KernelState::step`]. O(N²·m) time and O(N²) memory.
///
/// # Shapes
/// - `phi_q`: `[batch, heads, seq_q, m]`, `phi_k`: `[batch, heads, seq_k, m]`,
///   `v`: `[batch, heads, seq_k, d_v]`, mask: `[batch, heads, seq_q, seq_k]`
/// - output: `[batch, heads, seq_q, d_v]`
pub fn masked_quadratic(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
) -> Tensor<4> {
    let floor = denominator_floor(phi_q.dtype());
    let a = phi_q.matmul(phi_k.swap_dims(2, 3)); // [batch, heads, seq_q, seq_k]
    let a = match mask {
        Some(mask) => a.mask_fill(mask, 0.0),
        None => a,
    };
    let den = a.clone().sum_dim(3).clamp_min(floor);
    a.matmul(v).div(den)
}

/// The recurrent state of causal kernel attention for one layer: `S = Σ φ(k) vᵀ` and
/// `z = Σ φ(k)` over the tokens seen so far. Its size does not grow with the sequence.
#[derive(Clone, Debug)]
pub struct KernelState {
    /// `[batch, heads, m, d_v]`.
    pub kv: Tensor<4>,
    /// `[batch, heads, 1, m]`.
    pub z: Tensor<4>,
}

impl KernelState {
    /// The empty state.
    pub fn new(
        batch: usize,
        heads: usize,
        features: usize,
        d_v: usize,
        device: &burn::tensor::Device,
    ) -> Self {
        Self {
            kv: Tensor::zeros([batch, heads, features, d_v], device),
            z: Tensor::zeros([batch, heads, 1, features], device),
        }
    }

    /// Adds one token and returns its output.
    ///
    /// # Shapes
    /// - `phi_q`, `phi_k`: `[batch, heads, 1, m]`, `v`: `[batch, heads, 1, d_v]`
    /// - output: `[batch, heads, 1, d_v]`
    pub fn step(&mut self, phi_q: Tensor<4>, phi_k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let floor = denominator_floor(phi_q.dtype());
        self.kv = self.kv.clone().add(phi_k.clone().swap_dims(2, 3).matmul(v));
        self.z = self.z.clone().add(phi_k);
        let num = phi_q.clone().matmul(self.kv.clone()); // [batch, heads, 1, d_v]
        let den = phi_q
            .matmul(self.z.clone().swap_dims(2, 3))
            .clamp_min(floor); // [batch, heads, 1, 1]
        num.div(den)
    }
}
