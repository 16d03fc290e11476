//! Masked softmax over an explicit score matrix, then the weighted sum of values.
//!
//! The dense oracle ([`reference`](crate::reference)) and the variants whose *algorithm* is a
//! dense score matrix (Synthesizer, which synthesises one per layer) share it.
//! [`padded_attention`] serves the few rows a sparse pattern lets see the whole sequence.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor};

/// `softmax(scores + mask) · v`, with fully masked query rows set to zero.
///
/// Masked scores become −∞, so their `exp` is the math library's exact-zero fast path (a large
/// finite fill such as −1e30 underflows instead, which costs a slow path and an `errno` write per
/// element: 8% of Longformer's forward on `flex` before this form). The row maximum is clamped to
/// a finite value, so a fully masked row gives `exp(−∞) = 0` everywhere and a zero output with no
/// extra pass. Normalisation divides the `[.., d_v]` product rather than the `[.., seq_k]` weights.
///
/// # Shapes
/// - scores: `[batch, heads, seq_q, seq_k]`, mask: same (`true` = masked), v: `[batch, heads, seq_k, d_v]`
/// - output: `[batch, heads, seq_q, d_v]`
pub fn masked_softmax_matmul(
    scores: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    v: Tensor<4>,
) -> Tensor<4> {
    let Some(mask) = mask else {
        return softmax(scores, 3).matmul(v);
    };
    let scores = scores.mask_fill(mask, f64::NEG_INFINITY);
    let max = scores.clone().max_dim(3).clamp_min(f32::MIN).detach(); // [batch, heads, seq_q, 1]
    let weights = scores.sub(max).exp(); // unnormalised, exactly 0 where masked
    let denominator = weights.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    weights.matmul(v).div(denominator)
}

/// Exact attention over every key but the padded ones: `softmax(q kᵀ · scale + pad) v`, for
/// the rows a pattern gives the whole sequence (BigBird's and ETC's global rows, Longformer's
/// global tokens) and attention over a short projected sequence (Linformer). On `f32` Flex tensors (and
/// cubecl ones with the `cube` feature) the fused FlashAttention kernel (no `[seq_q, seq_k]` scores stored for the backward); elsewhere
/// [`masked_softmax_matmul`].
///
/// # Shapes
/// - q: `[batch, heads, seq_q, d_k]`, k: `[batch, heads, seq_k, d_k]`,
///   v: `[batch, heads, seq_k, d_v]`, key_pad: `[batch, seq_k]` (`true` = padded)
/// - output: `[batch, heads, seq_q, d_v]`
pub fn padded_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_pad: Option<&Tensor<2, Bool>>,
    scale: f64,
) -> Tensor<4> {
    if crate::kernels::fused::flash_runs_fused(&q) {
        return crate::kernels::fused::flash_attention(
            q,
            k,
            v,
            key_pad,
            false,
            scale,
            crate::kernels::fused::DEFAULT_TILES,
        );
    }
    let [b, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale); // [batch, heads, seq_q, seq_k]
    let mask = key_pad.map(|p| p.clone().reshape([b, 1, 1, lk]).expand([b, h, lq, lk]));
    masked_softmax_matmul(scores, mask, v)
}
