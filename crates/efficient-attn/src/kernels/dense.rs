//! Masked softmax over an explicit score matrix, then the weighted sum of values.
//!
//! The dense oracle ([`reference`](crate::reference)) and the variants whose *algorithm* is a
//! dense score matrix (Synthesizer, which synthesises one per layer) share it.

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
