//! Nyströmformer: softmax attention through m landmarks and an iterative pseudo-inverse.
//!
//! - Paper: Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating
//!   Self-Attention", arXiv:2102.03902.
//! - Computation: with Q and K scaled by d^(-1/4), landmarks Q̃, K̃ are the means of m
//!   contiguous segments of the sequence (over unpadded tokens only);
//!   `F = softmax(Q K̃ᵀ)` (N×m), `A = softmax(Q̃ K̃ᵀ)` (m×m), `B = softmax(Q̃ Kᵀ)` (m×N, padded
//!   keys masked), and `out = F · pinv(A) · (B V)`, with `pinv` by the Newton–Schulz iteration
//!   `Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ)))` from `Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)`.
//!   An optional depthwise convolution over V along the sequence (one kernel per head) is added
//!   as a skip connection (mlpen LRA: kernel 35; lucidrains: 33).
//! - Cost: O(N·m·d + m³·iterations) time, O(N·m) memory.
//! - Exact: no. With m = N landmarks (one token per segment) and enough iterations it equals
//!   full attention (tested with 30 iterations, tolerance 1e-4).
//! - Modes: bidirectional. Causal is a configuration error: segment means mix future tokens
//!   into every landmark (mlpen/Nystromformer issue #7; xformers #107, #751). Cross is a
//!   configuration error too (the paper defines self-attention landmarks only).
//! - Deviations: `Z₀`'s norms are taken per matrix (the reference takes the maximum over the
//!   whole batch, which couples examples: mlpen issue #3). Segments of a length that is not a
//!   multiple of m differ in size by at most one token (the reference pads the front instead).
//!   A landmark whose segment is all padding is switched off: its column of F is masked and
//!   its row and column of A are replaced by the identity, so padding changes nothing.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::activation::softmax;
use burn::tensor::module::conv1d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};

/// Configuration of [`NystromformerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct NystromformerAttentionConfig {
    /// Number of landmarks (paper/LRA: m = 64).
    pub landmarks: usize,
    /// Newton–Schulz iterations of the pseudo-inverse (paper: 6).
    pub pinv_iterations: usize,
    /// Kernel width of the depthwise convolution skip on V; `None` for no skip
    /// (mlpen LRA: 35, lucidrains: 33).
    pub conv_kernel: Option<usize>,
}

impl Default for NystromformerAttentionConfig {
    fn default() -> Self {
        Self {
            landmarks: 64,
            pinv_iterations: 6,
            conv_kernel: None,
        }
    }
}

impl NystromformerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "nystromformer",
        paper: "Xiong et al. 2021, Nystromformer, arXiv:2102.03902",
        modes: &[AttentionMode::Bidirectional],
        time: "O(N·m·d + m³·iterations)",
        memory: "O(N·m)",
        exactness: Exactness::Approximate(
            "Nyström low-rank; exact with m = N and enough pinv iterations",
        ),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for NystromformerAttentionConfig {
    type Core = NystromformerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<NystromformerAttention, ConfigError> {
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "landmarks are means over segments that include future tokens (and are defined for self-attention only)",
        )?;
        ConfigError::check_nonzero("landmarks", self.landmarks)?;
        let conv = match self.conv_kernel {
            Some(0) => {
                return Err(ConfigError::InvalidField {
                    field: "conv_kernel",
                    expected: "a positive odd width, or no value for no convolution".into(),
                    got: "0".into(),
                });
            }
            Some(w) if w % 2 == 0 => {
                return Err(ConfigError::InvalidField {
                    field: "conv_kernel",
                    expected: "an odd width (the convolution is centred)".into(),
                    got: w.to_string(),
                });
            }
            Some(w) => {
                let bound = 1.0 / (w as f64).sqrt();
                Some(
                    Initializer::Uniform {
                        min: -bound,
                        max: bound,
                    }
                    .init([dims.heads, 1, w], device),
                )
            }
            None => None,
        };
        Ok(NystromformerAttention {
            conv,
            mode,
            landmarks: self.landmarks,
            pinv_iterations: self.pinv_iterations,
        })
    }
}

/// Nyström attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct NystromformerAttention {
    /// Depthwise convolution weights over V, `[heads, 1, kernel]`, if configured.
    pub conv: Option<Param<Tensor<3>>>,
    #[module(skip)]
    mode: AttentionMode,
    landmarks: usize,
    pinv_iterations: usize,
}

/// The Moore–Penrose pseudo-inverse of each `[n, n]` matrix by Newton–Schulz iterations.
///
/// # Shapes
/// - a: `[batch, heads, n, n]` → `[batch, heads, n, n]`
pub(crate) fn iterative_pinv(a: Tensor<4>, iterations: usize) -> Tensor<4> {
    let [b, h, n, _] = a.dims();
    let device = a.device();
    let eye = Tensor::<2>::eye(n, &device)
        .reshape([1, 1, n, n])
        .expand([b, h, n, n]);
    // ‖A‖₁ = max column sum, ‖A‖∞ = max row sum, per matrix.
    let norm1 = a.clone().abs().sum_dim(2).max_dim(3); // [batch, heads, 1, 1]
    let norm_inf = a.clone().abs().sum_dim(3).max_dim(2); // [batch, heads, 1, 1]
    let mut z = a.clone().swap_dims(2, 3).div(norm1.mul(norm_inf));
    for _ in 0..iterations {
        let az = a.clone().matmul(z.clone());
        let inner = eye.clone().mul_scalar(7.0).sub(az.clone());
        let inner = eye.clone().mul_scalar(15.0).sub(az.clone().matmul(inner));
        let inner = eye.clone().mul_scalar(13.0).sub(az.matmul(inner));
        z = z.matmul(inner).mul_scalar(0.25);
    }
    z
}

impl NystromformerAttention {
    /// The `[batch, 1, m, n]` averaging matrix of the landmarks and which landmarks have at
    /// least one unpadded token (`[batch, m]`, `true` = empty).
    fn segment_means(
        &self,
        n: usize,
        batch: usize,
        pad: Option<&Tensor<2, Bool>>,
        device: &Device,
    ) -> (Tensor<4>, Tensor<2, Bool>) {
        let m = self.landmarks.min(n);
        // Segment s covers [s·n/m, (s+1)·n/m): sizes differ by at most one.
        let mut indicator = vec![0f32; m * n];
        for s in 0..m {
            for p in (s * n / m)..((s + 1) * n / m) {
                indicator[s * n + p] = 1.0;
            }
        }
        let indicator = Tensor::<2>::from_data(TensorData::new(indicator, [m, n]), device)
            .reshape([1, 1, m, n]);
        let weights = match pad {
            Some(pad) => {
                let keep = pad.clone().bool_not().float().reshape([batch, 1, 1, n]);
                indicator.mul(keep) // [batch, 1, m, n]
            }
            None => indicator.expand([batch, 1, m, n]),
        };
        let counts = weights.clone().sum_dim(3); // [batch, 1, m, 1]
        let empty = counts.clone().lower_equal_elem(0.5).reshape([batch, m]);
        (weights.div(counts.clamp_min(1.0)), empty)
    }
}

impl AttentionCore for NystromformerAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [b, h, n, _, dk, dv] = input.dims();
        let device = input.query.device();
        let scale = (dk as f64).powf(-0.25);
        let q = input.query.mul_scalar(scale);
        let k = input.key.mul_scalar(scale);
        let value = input.value;
        let pad = input.mask_pad_k.as_ref();

        let (means, empty) = self.segment_means(n, b, pad, &device);
        let m = means.dims()[2];
        let means = means.expand([b, h, m, n]);
        let q_land = means.clone().matmul(q.clone()); // [batch, heads, m, d_k]
        let k_land = means.matmul(k.clone()); // [batch, heads, m, d_k]

        let empty_cols = empty.clone().reshape([b, 1, 1, m]);
        // F: queries over landmark keys, empty landmarks masked.
        let f = q.matmul(k_land.clone().swap_dims(2, 3)); // [batch, heads, n, m]
        let f = softmax(
            f.mask_fill(empty_cols.clone().expand([b, h, n, m]), -1.0e30),
            3,
        );
        // A: landmark queries over landmark keys; empty landmarks become identity rows/columns.
        let a = q_land.clone().matmul(k_land.swap_dims(2, 3)); // [batch, heads, m, m]
        let a = softmax(
            a.mask_fill(empty_cols.clone().expand([b, h, m, m]), -1.0e30),
            3,
        );
        let off = empty_cols
            .clone()
            .expand([b, 1, m, m])
            .bool_or(empty.clone().reshape([b, 1, m, 1]).expand([b, 1, m, m]))
            .expand([b, h, m, m]);
        let eye = Tensor::<2>::eye(m, &device)
            .reshape([1, 1, m, m])
            .expand([b, h, m, m]);
        let a = a.mask_where(off, eye);
        // B: landmark queries over all keys, padded keys masked.
        let bmat = q_land.matmul(k.swap_dims(2, 3)); // [batch, heads, m, n]
        let bmat = match pad {
            Some(p) => bmat.mask_fill(
                p.clone().reshape([b, 1, 1, n]).expand([b, h, m, n]),
                -1.0e30,
            ),
            None => bmat,
        };
        let bmat = softmax(bmat, 3);

        let bv = bmat.matmul(value.clone()); // [batch, heads, m, d_v]
        let out = f.matmul(iterative_pinv(a, self.pinv_iterations).matmul(bv)); // [batch, heads, n, d_v]

        match &self.conv {
            None => out,
            Some(w) => {
                let width = w.dims()[2];
                let value = match pad {
                    Some(p) => {
                        value.mask_fill(p.clone().reshape([b, 1, n, 1]).expand([b, h, n, dv]), 0.0)
                    }
                    None => value,
                };
                // Depthwise over heads: [batch, heads, n, d_v] → [batch·d_v, heads, n].
                let x = value.permute([0, 3, 1, 2]).reshape([b * dv, h, n]);
                let y = conv1d(x, w.val(), None, ConvOptions::new([1], [width / 2], [1], h)); // [batch·d_v, heads, n]
                out.add(y.reshape([b, dv, h, n]).permute([0, 2, 3, 1]))
            }
        }
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};

    /// 4 landmarks and a convolution skip in general; one landmark per token and 30
    /// pseudo-inverse iterations is full attention.
    impl Contract for NystromformerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let config = |_: &Case| {
                NystromformerAttentionConfig {
                    landmarks: 4,
                    pinv_iterations: 6,
                    conv_kernel: Some(3),
                }
                .into()
            };
            vec![exact_config(
                from_config(config),
                "m = N landmarks, 30 iterations",
                Oracle::Full,
                1e-4,
                |case| {
                    NystromformerAttentionConfig {
                        landmarks: case.seq_k,
                        pinv_iterations: 30,
                        conv_kernel: None,
                    }
                    .into()
                },
            )]
        }
    }
}
