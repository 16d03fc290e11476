//! Dense softmax attention with an explicit `[seq_q, seq_k]` score matrix: the **test oracle**.
//!
//! Nothing in the library calls this on a hot path; efficient variants are compared against it.

use burn::tensor::{Bool, Tensor};

use crate::interface::{AttentionMode, AttnInput};
use crate::kernels::dense::masked_softmax_matmul;
use crate::mask::{DenseMask, causal_mask};

/// `softmax(q kᵀ · scale + mask) v`, with fully masked query rows set to zero.
///
/// # Shapes
/// - `q`: `[batch, heads, seq_q, d_k]`, `k`: `[batch, heads, seq_k, d_k]`,
///   `v`: `[batch, heads, seq_k, d_v]`
/// - `mask`: `[batch, heads, seq_q, seq_k]`, `true` = masked
/// - output: `[batch, heads, seq_q, d_v]`
pub fn dense_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    scale: f64,
) -> Tensor<4> {
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale); // [batch, heads, seq_q, seq_k]
    masked_softmax_matmul(scores, mask, v)
}

/// The full mask the oracle applies for `input` in `mode`: key padding, the bottom-right causal
/// mask in causal mode, and an optional variant pattern.
///
/// # Shapes
/// - output: `[batch, heads, seq_q, seq_k]`
pub fn oracle_mask(
    input: &AttnInput,
    mode: AttentionMode,
    pattern: Option<&DenseMask>,
) -> Option<Tensor<4, Bool>> {
    let [b, h, lq, lk, _, _] = input.dims();
    let device = input.query.device();
    let mut mask: Option<Tensor<4, Bool>> = None;
    let mut add = |m: Tensor<4, Bool>| {
        mask = Some(match mask.take() {
            Some(prev) => prev.bool_or(m),
            None => m,
        });
    };
    if let Some(pad) = &input.mask_pad_k {
        add(pad.clone().reshape([b, 1, 1, lk]).expand([b, h, lq, lk]));
    }
    if mode.is_causal() {
        add(causal_mask(lq, lk, &device)
            .reshape([1, 1, lq, lk])
            .expand([b, h, lq, lk]));
    }
    if let Some(p) = pattern {
        add(p.to_tensor(b, h, &device));
    }
    mask
}

/// Dense attention for `input` in `mode` under an optional pattern, scaled by `1/sqrt(d_k)`
/// unless `scale` is given.
///
/// # Shapes
/// - output: `[batch, heads, seq_q, d_v]`
pub fn oracle(
    input: &AttnInput,
    mode: AttentionMode,
    pattern: Option<&DenseMask>,
    scale: Option<f64>,
) -> Tensor<4> {
    let [_, _, _, _, dk, _] = input.dims();
    let mask = oracle_mask(input, mode, pattern);
    dense_attention(
        input.query.clone(),
        input.key.clone(),
        input.value.clone(),
        mask,
        scale.unwrap_or(1.0 / (dk as f64).sqrt()),
    )
}
