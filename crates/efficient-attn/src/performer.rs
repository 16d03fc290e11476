//! Performer: FAVOR+ random-feature attention.
//!
//! - Paper: Choromanski et al. 2020, "Rethinking Attention with Performers", arXiv:2009.14794.
//! - Computation: `x̂ = x · d^(-1/4)`; positive features
//!   `φ(x̂) = exp(ω x̂ − ‖x̂‖²/2 − c) / √m` with `m` random directions ω (block-orthogonal by
//!   default), so that `E[φ(q̂)·φ(k̂)] = exp(q·k/√d)`; the attention is then kernelised
//!   attention through `kernels::prefix_sum` (one state,
//!   chunked causal prefix sums, recurrent decoding). The ReLU kernel variant uses
//!   `φ(x̂) = ReLU(ω x̂) + 10⁻³` (the reference's "generalized" attention).
//! - Cost: O(N·m·d) time; memory O(N·m + m·d_v) bidirectional, O(N/C · m · d_v) causal,
//!   O(m·d_v) per decoded token.
//! - Exact: no: an unbiased estimate of softmax attention's kernel; the output error falls like
//!   m^(−1/2) for small-norm inputs (measured in our tests) and grows exponentially with
//!   ‖q‖·‖k‖.
//! - Modes: bidirectional, causal, cross.
//! - Stabilisers: the reference subtracts a per-row maximum from query features (cancels in the
//!   ratio) and the maximum over all keys from key features, then adds ε = 10⁻⁶. We keep the
//!   query rule; for keys, bidirectional and cross modes subtract the maximum over the
//!   *unpadded* keys of the same example and head (cancels exactly), and causal mode shifts
//!   feature i by `c_i = ‖ω_i‖²/2` on both sides (the product is unchanged), which turns key
//!   logits into `−‖x̂ − ω_i‖²/2 ≤ 0`: no feature exceeds 1 and nothing in the past depends on
//!   the future. We add no ε to features; the denominator is only floored. These choices make padding, batch and causal invariance exact rather than
//!   "up to ε" (see the pitfalls on the key stabiliser in the reference).
//! - Feature redraw: ω is held as a non-trainable parameter (so a checkpoint keeps it) drawn
//!   from `seed`; [`PerformerAttention::redraw_for_step`] implements the schedule
//!   (`redraw_interval`, lucidrains: 1000 training steps) and is this core's
//!   [`AttentionCore::at_step`], which `efformer train` calls after every optimiser step: the
//!   k-th draw is a function of `(seed, k)` only, and a resumed run continues the step count,
//!   so it redraws exactly as an uninterrupted one.

use burn::module::{Module, Param};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::ConfigError;
use crate::decoding::{self, DecodeCache};
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::kernels::fused::favor::{FavorShift, FavorSide, favor_features};
use crate::kernels::fused::runs_fused;
use crate::kernels::prefix_sum;
use crate::rng::SeededRng;

/// The kernel FAVOR estimates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum PerformerKernel {
    /// Softmax, with positive random features (FAVOR+).
    #[default]
    Softmax,
    /// ReLU features, `φ = ReLU(ω x̂) + 10⁻³` (Performer-ReLU).
    Relu,
}

/// How the random directions are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum FeatureDraw {
    /// Blocks of d orthogonal directions (QR of a Gaussian matrix), rows rescaled by the norms
    /// of independent Gaussian vectors (the reference's `scaling = 0`).
    #[default]
    Orthogonal,
    /// Blocks of orthogonal directions with every row of norm √d (`scaling = 1`).
    OrthogonalFixedNorm,
    /// Independent Gaussian directions.
    Iid,
}

/// Configuration of [`PerformerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct PerformerAttentionConfig {
    /// Number of random features (paper/jax default: m = 256).
    pub features: usize,
    /// Kernel (paper: softmax).
    pub kernel: PerformerKernel,
    /// How directions are drawn (paper: orthogonal).
    pub draw: FeatureDraw,
    /// Redraw the features every this many training steps; `None` never (lucidrains: 1000).
    pub redraw_interval: Option<usize>,
    /// Chunk length of the causal prefix sums (C).
    pub chunk: usize,
    /// Seed of the random directions.
    pub seed: u64,
}

impl Default for PerformerAttentionConfig {
    fn default() -> Self {
        Self {
            features: 256,
            kernel: PerformerKernel::Softmax,
            draw: FeatureDraw::Orthogonal,
            redraw_interval: None,
            chunk: 64,
            seed: 0,
        }
    }
}

impl PerformerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "performer",
        paper: "Choromanski et al. 2020, Rethinking Attention with Performers, arXiv:2009.14794",
        modes: &AttentionMode::ALL,
        time: "O(N·m·d)",
        memory: "O(N·m + m·d_v) bidirectional; O(N/C·m·d_v) causal; O(m·d_v) per decoded token",
        exactness: Exactness::Approximate("random-feature estimate of softmax; error ~ m^-1/2"),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for PerformerAttentionConfig {
    /// Each layer draws its own random state: the seed mixed with the layer.
    fn for_layer(&self, layer: usize) -> Self {
        Self {
            seed: crate::interface::layer_seed(self.seed, layer),
            ..self.clone()
        }
    }

    type Core = PerformerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`, drawing the first set of features.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<PerformerAttention, ConfigError> {
        ConfigError::check_mode(&Self::INFO, mode)?;
        ConfigError::check_nonzero("features", self.features)?;
        ConfigError::check_nonzero("chunk", self.chunk)?;
        if self.redraw_interval == Some(0) {
            return Err(ConfigError::InvalidField {
                field: "redraw_interval",
                expected: "a positive number of steps, or no value to never redraw".into(),
                got: "0".into(),
            });
        }
        let omega = draw_features(self.features, dims.d_k, self.draw, self.seed, 0);
        Ok(PerformerAttention {
            omega: Param::from_data(TensorData::new(omega, [self.features, dims.d_k]), device)
                .set_require_grad(false),
            mode,
            kernel: self.kernel,
            draw: self.draw,
            redraw_interval: self.redraw_interval,
            chunk: self.chunk,
            seed: self.seed,
        })
    }
}

/// The `draw`-th set of `m` directions in dimension `d` for `seed`, row-major `[m, d]`.
pub(crate) fn draw_features(m: usize, d: usize, how: FeatureDraw, seed: u64, draw: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed.wrapping_mul(0x9e37_79b9).wrapping_add(draw));
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(m);
    match how {
        FeatureDraw::Iid => {
            for _ in 0..m {
                rows.push((0..d).map(|_| rng.normal()).collect());
            }
        }
        FeatureDraw::Orthogonal | FeatureDraw::OrthogonalFixedNorm => {
            while rows.len() < m {
                let block = orthonormal_rows(d, &mut rng);
                rows.extend(block.into_iter().take(m - rows.len()));
            }
            for row in &mut rows {
                let norm = match how {
                    FeatureDraw::Orthogonal => {
                        (0..d).map(|_| rng.normal().powi(2)).sum::<f64>().sqrt()
                    }
                    _ => (d as f64).sqrt(),
                };
                row.iter_mut().for_each(|x| *x *= norm);
            }
        }
    }
    rows.into_iter().flatten().map(|x| x as f32).collect()
}

/// `d` orthonormal rows: modified Gram–Schmidt on a Gaussian matrix (equivalent to the Q of
/// its QR decomposition with a sign fix, i.e. Haar-distributed).
fn orthonormal_rows(d: usize, rng: &mut SeededRng) -> Vec<Vec<f64>> {
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(d);
    while rows.len() < d {
        let mut v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        for r in &rows {
            let dot: f64 = v.iter().zip(r).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(r).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-8 {
            v.iter_mut().for_each(|x| *x /= norm);
            rows.push(v);
        }
    }
    rows
}

/// FAVOR+ attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct PerformerAttention {
    /// The random directions ω, `[m, d_k]`; not trained, saved with the model.
    pub omega: Param<Tensor<2>>,
    #[module(skip)]
    mode: AttentionMode,
    #[module(skip)]
    kernel: PerformerKernel,
    #[module(skip)]
    draw: FeatureDraw,
    redraw_interval: Option<usize>,
    chunk: usize,
    seed: u64,
}

/// Which side of the kernel a feature map is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Query,
    /// Keys with the stabiliser of the current mode.
    Key,
}

impl PerformerAttention {
    /// The number of random features m.
    pub fn num_features(&self) -> usize {
        self.omega.dims()[0]
    }

    /// The features for training step `step` under the redraw schedule: unchanged unless
    /// `step` is a positive multiple of `redraw_interval`, then the `step / interval`-th draw.
    pub fn redraw_for_step(mut self, step: usize) -> Self {
        if let Some(interval) = self.redraw_interval
            && step > 0
            && step.is_multiple_of(interval)
        {
            let [m, d] = self.omega.dims();
            let device = self.omega.device();
            let omega = draw_features(m, d, self.draw, self.seed, (step / interval) as u64);
            self.omega =
                Param::from_data(TensorData::new(omega, [m, d]), &device).set_require_grad(false);
        }
        self
    }

    /// ω x̂ with x̂ = x · d^(-1/4).
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, d]` → `[batch, heads, seq, m]`
    fn project(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, l, d] = x.dims();
        let m = self.num_features();
        let omega_t = self.omega.val().transpose().reshape([1, d, m]); // [1, d, m]
        x.reshape([b * h, l, d])
            .mul_scalar((d as f64).powf(-0.25))
            .matmul(omega_t)
            .reshape([b, h, l, m])
    }

    /// φ for one side, with padded keys zeroed: the softmax kernel's as one fused operation on
    /// Flex, everything else composed.
    fn features(&self, x: Tensor<4>, side: Side, input: &AttnInput) -> Tensor<4> {
        if self.kernel == PerformerKernel::Softmax && runs_fused(&x) {
            return self.favor_fused(x, side, input);
        }
        self.features_composed(x, side, input)
    }

    /// The softmax kernel's features through [`favor_features`], with the same offsets and
    /// shifts as [`features_composed`](Self::features_composed).
    fn favor_fused(&self, x: Tensor<4>, side: Side, input: &AttnInput) -> Tensor<4> {
        let causal = self.mode == AttentionMode::Causal;
        // c_i = ‖ω_i‖²/2, added to query logits and subtracted from key logits when causal.
        let c = || self.omega.val().square().sum_dim(1).mul_scalar(0.5).reshape([-1]);
        let (offset, pad, norm_term, shift) = match side {
            Side::Query => (causal.then(c), None, false, FavorShift::Row),
            Side::Key if causal => {
                let pad = input.mask_pad_k.as_ref();
                (Some(c().neg()), pad, true, FavorShift::None)
            }
            Side::Key => (None, input.mask_pad_k.as_ref(), true, FavorShift::Slice),
        };
        favor_features(x, self.omega.val(), offset, pad, FavorSide { norm_term, shift })
    }

    /// φ for one side as Burn tensor operations, with padded keys zeroed: what runs off Flex,
    /// and the oracle of the fused features.
    fn features_composed(&self, x: Tensor<4>, side: Side, input: &AttnInput) -> Tensor<4> {
        let [b, h, l, d] = x.dims();
        let m = self.num_features();
        let proj = self.project(x.clone()); // [batch, heads, seq, m]
        let phi = match self.kernel {
            PerformerKernel::Relu => relu(proj).add_scalar(1e-3),
            PerformerKernel::Softmax => {
                let scale = 1.0 / (m as f64).sqrt();
                // ‖x̂‖² / 2 with x̂ = x · d^(-1/4)
                let diag = x.square().sum_dim(3).mul_scalar(0.5 / (d as f64).sqrt()); // [batch, heads, seq, 1]
                let causal = self.mode == AttentionMode::Causal;
                // Causal mode shifts feature i by c_i = ‖ω_i‖²/2 on both sides (the product is
                // unchanged): key logits become −‖x̂ − ω_i‖²/2 ≤ 0 without looking at any
                // other position.
                let c = || {
                    self.omega
                        .val()
                        .square()
                        .sum_dim(1)
                        .mul_scalar(0.5)
                        .reshape([1, 1, 1, m])
                        .detach()
                };
                match side {
                    Side::Query => {
                        let logits = if causal { proj.add(c()) } else { proj };
                        let shift = logits.clone().max_dim(3).detach(); // [batch, heads, seq, 1]
                        logits.sub(shift).exp().mul_scalar(scale)
                    }
                    Side::Key if causal => proj.sub(diag).sub(c()).exp().mul_scalar(scale),
                    Side::Key => {
                        let logits = proj.sub(diag); // [batch, heads, seq, m]
                        let visible = match &input.mask_pad_k {
                            Some(pad) => logits.clone().mask_fill(
                                pad.clone().reshape([b, 1, l, 1]).expand([b, h, l, m]),
                                f64::NEG_INFINITY,
                            ),
                            None => logits.clone(),
                        };
                        let max = visible.max_dim(3).max_dim(2); // [batch, heads, 1, 1]
                        // A fully padded example has max = −∞; any finite shift will do.
                        let max = max.clone().mask_fill(max.is_inf(), 0.0).detach();
                        logits.sub(max).exp().mul_scalar(scale)
                    }
                }
            }
        };
        match side {
            Side::Query => phi,
            Side::Key => prefix_sum::zero_padded(phi, input.mask_pad_k.as_ref()),
        }
    }

    /// The features of queries and keys for `input` (for reference computations in tests).
    ///
    /// # Shapes
    /// - output: (`[batch, heads, seq_q, m]`, `[batch, heads, seq_k, m]`)
    pub fn feature_maps(&self, input: &AttnInput) -> (Tensor<4>, Tensor<4>) {
        (
            self.features(input.query.clone(), Side::Query, input),
            self.features(input.key.clone(), Side::Key, input),
        )
    }

    /// [`feature_maps`](Self::feature_maps) as Burn tensor operations on any device (the fused
    /// features' oracle).
    ///
    /// # Shapes
    /// - output: (`[batch, heads, seq_q, m]`, `[batch, heads, seq_k, m]`)
    pub fn feature_maps_composed(&self, input: &AttnInput) -> (Tensor<4>, Tensor<4>) {
        (
            self.features_composed(input.query.clone(), Side::Query, input),
            self.features_composed(input.key.clone(), Side::Key, input),
        )
    }
}

impl AttentionCore for PerformerAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, _, _, _, dk, _] = input.dims();
        assert_eq!(
            dk,
            self.omega.dims()[1],
            "performer: built for d_k = {}, got d_k = {dk}",
            self.omega.dims()[1]
        );
        let (phi_q, phi_k) = self.feature_maps(&input);
        match self.mode {
            AttentionMode::Causal => {
                prefix_sum::causal_chunked(phi_q, phi_k, input.value, self.chunk)
            }
            AttentionMode::Bidirectional | AttentionMode::Cross => {
                prefix_sum::bidirectional(phi_q, phi_k, input.value)
            }
        }
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Redraws the features on the `redraw_interval` schedule ([`Self::redraw_for_step`]).
    fn at_step(self, step: usize) -> Self {
        self.redraw_for_step(step)
    }

    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        let _ = max_len;
        decoding::recurrent_cache(
            self.mode.is_causal(),
            batch,
            dims,
            self.num_features(),
            device,
        )
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        let (phi_q, phi_k) = self.feature_maps(&input);
        decoding::recurrent_step(cache, phi_q, phi_k, input.value)
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};
    use crate::testing::{GradCheck, ReferenceFn};

    fn performer_with(kernel: PerformerKernel) -> Spec<Attention> {
        let config = move |_: &Case| {
            PerformerAttentionConfig {
                features: 16,
                kernel,
                chunk: 3,
                seed: 5,
                ..Default::default()
            }
            .into()
        };
        let reference: ReferenceFn<Attention> = |core, input, mode| match core {
            Attention::Performer(a) => {
                let (phi_q, phi_k) = a.feature_maps(input);
                kernel_reference(phi_q, phi_k, input, mode)
            }
            _ => unreachable!("performer spec"),
        };
        let mut spec = exact_config(
            from_config(config),
            "masked quadratic form of its features",
            Oracle::Reference("masked quadratic form", reference),
            1e-5,
            config,
        );
        spec.name = format!("performer ({kernel:?} kernel)");
        spec
    }

    /// FAVOR+ softmax features (their approximation error against softmax is tested
    /// separately: it falls like m^-1/2), and ReLU features.
    impl Contract for PerformerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            vec![
                performer_with(PerformerKernel::Softmax),
                // ReLU features have kinks: central differences need a small step.
                performer_with(PerformerKernel::Relu).grad(GradCheck::Central {
                    eps: 1e-3,
                    tolerance: 3e-2,
                }),
            ]
        }
    }
}
