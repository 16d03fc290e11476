//! Masked softmax over an explicit score matrix, then the weighted sum of values.
//!
//! The dense oracle ([`reference`](crate::reference)) and the variants whose *algorithm* is a
//! dense score matrix (Synthesizer, which synthesises one per layer) share it.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor};

/// `softmax(scores + mask) · v`, with fully masked query rows set to zero.
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
    // A large finite fill keeps fully masked rows finite (uniform); they are zeroed below.
    let weights = softmax(scores.mask_fill(mask.clone(), -1.0e30), 3);
    let empty_rows = mask.all_dim(3); // [batch, heads, seq_q, 1]
    let out = weights.matmul(v);
    let [b, h, lq, dv] = out.dims();
    out.mask_fill(empty_rows.expand([b, h, lq, dv]), 0.0)
}
