//! Synthesizer: attention weights synthesised without query-key dot products.
//!
//! - Paper: Tay, Bahri, Metzler, Juan, Zhao and Zheng 2020, "Synthesizer: Rethinking
//!   Self-Attention in Transformer Models", arXiv:2005.00743.
//! - Computation: logits `B ∈ R^{N×N}` per head, then `softmax(B + masks) · V`:
//!   - `dense`: `B_i = W₂ ReLU(W₁ q_i + b₁) + b₂ ∈ R^{N_max}` from each position's own query
//!     head, sliced to the keys present (W shared by the heads of a layer);
//!   - `random`: `B = R ∈ R^{heads × N_max × N_max}`, input-independent, trainable or fixed;
//!   - `factorized-random`: `R = R₁R₂ᵀ / √k` with `R₁, R₂ ∈ R^{heads × N_max × k}`;
//!   - mixed with dot-product attention (`mixing = "dot-product"`):
//!     `logits = (1 − σ(α))·q kᵀ/√d + σ(α)·B` with a learned α per head, initialised to 0
//!     (mesh-tensorflow's `random_plus_alpha`).
//! - Cost: O(N²·d) time and O(N²) memory: the synthesised matrix *is* the algorithm (it removes
//!   the dot products, not the quadratic cost); parameters N_max² per head (random) or
//!   2·k·N_max (factorised).
//! - Exact: not an approximation of softmax attention but a different model. Exact cases
//!   tested: random with R = 0 gives uniform weights (a running mean when causal); mixing with
//!   σ(α) = 0 gives full attention.
//! - Modes: bidirectional and causal (masking; `B_i` depends on position `i` only, so nothing
//!   leaks). Cross is a configuration error: the synthesised logits index key positions of
//!   the query's own sequence.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{Bool, Device, Tensor};

use crate::decoding::DecodeCache;
use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, kv_cache, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::kernels::dense::masked_softmax_matmul;
use crate::mask::causal_mask;

/// How the logits are synthesised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum Synthesis {
    /// From each position's query by a two-layer MLP.
    Dense,
    /// A learned (or fixed) matrix per head.
    #[default]
    Random,
    /// A rank-k product per head.
    FactorizedRandom,
}

/// Whether synthesised logits stand alone or mix with dot-product logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum SynthesizerMixing {
    /// Synthesised logits only.
    #[default]
    Alone,
    /// `(1 − σ(α))·dot-product + σ(α)·synthesised`, α learned per head.
    DotProduct,
}

/// Configuration of [`SynthesizerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct SynthesizerAttentionConfig {
    /// How logits are synthesised (LRA: factorized random).
    pub synthesis: Synthesis,
    /// Dot-product mixing.
    pub mixing: SynthesizerMixing,
    /// Maximum sequence length N_max (mesh-tensorflow: 512).
    pub max_len: usize,
    /// Rank k of the factorised matrix (LRA: 32).
    pub rank: usize,
    /// Whether random matrices are trained (paper: both variants studied).
    pub trainable: bool,
}

impl Default for SynthesizerAttentionConfig {
    fn default() -> Self {
        Self {
            synthesis: Synthesis::Random,
            mixing: SynthesizerMixing::Alone,
            max_len: 512,
            rank: 32,
            trainable: true,
        }
    }
}

impl SynthesizerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "synthesizer",
        paper: "Tay et al. 2020, Synthesizer, arXiv:2005.00743",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N²·d)",
        memory: "O(N²); params N_max² per head (random) or 2·k·N_max (factorised)",
        exactness: Exactness::Approximate(
            "synthesised weights, not dot-product attention; full attention when mixed with σ(α)=0",
        ),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for SynthesizerAttentionConfig {
    type Core = SynthesizerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<SynthesizerAttention, ConfigError> {
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "synthesised logits index key positions of the query's own sequence",
        )?;
        ConfigError::check_nonzero("max_len", self.max_len)?;
        ConfigError::check_nonzero("rank", self.rank)?;
        let normal = Initializer::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let fixed = |p: Param<Tensor<3>>| {
            if self.trainable {
                p
            } else {
                p.set_require_grad(false)
            }
        };
        let (dense, random, factors) = match self.synthesis {
            Synthesis::Dense => (
                Some(DenseSynthesis {
                    hidden: LinearConfig::new(dims.d_k, dims.d_k).init(device),
                    logits: LinearConfig::new(dims.d_k, self.max_len).init(device),
                }),
                None,
                None,
            ),
            Synthesis::Random => (
                None,
                Some(fixed(
                    normal.init([dims.heads, self.max_len, self.max_len], device),
                )),
                None,
            ),
            Synthesis::FactorizedRandom => (
                None,
                None,
                Some((
                    fixed(normal.init([dims.heads, self.max_len, self.rank], device)),
                    fixed(normal.init([dims.heads, self.max_len, self.rank], device)),
                )),
            ),
        };
        let alpha = match self.mixing {
            SynthesizerMixing::Alone => None,
            SynthesizerMixing::DotProduct => Some(Initializer::Zeros.init([dims.heads], device)),
        };
        Ok(SynthesizerAttention {
            dense,
            random,
            factors,
            alpha,
            mode,
            max_len: self.max_len,
        })
    }

    fn max_len(&self) -> Option<usize> {
        Some(self.max_len)
    }

    fn with_max_len(&self, max_len: usize) -> Self {
        Self {
            max_len,
            ..self.clone()
        }
    }

    /// The synthesised `N × N` weights: three matrices per head forward, six with backward.
    fn memory_estimate(
        &self,
        n: usize,
        batch: usize,
        heads: usize,
        backward: bool,
        _: &Device,
    ) -> Option<u64> {
        let matrix = (batch * heads * n * n * 4) as u64;
        Some(if backward { 6 * matrix } else { 3 * matrix })
    }
}

/// The dense synthesiser's two layers.
#[derive(Module, Debug)]
pub struct DenseSynthesis {
    /// W₁, b₁: `d_k → d_k`.
    pub hidden: Linear,
    /// W₂, b₂: `d_k → N_max`.
    pub logits: Linear,
}

/// Synthesizer attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct SynthesizerAttention {
    /// Dense synthesis layers, if `synthesis = "dense"`.
    pub dense: Option<DenseSynthesis>,
    /// R, `[heads, N_max, N_max]`, if `synthesis = "random"`.
    pub random: Option<Param<Tensor<3>>>,
    /// (R₁, R₂), each `[heads, N_max, k]`, if `synthesis = "factorized-random"`.
    pub factors: Option<(Param<Tensor<3>>, Param<Tensor<3>>)>,
    /// α per head, `[heads]`, if mixed with dot-product attention.
    pub alpha: Option<Param<Tensor<1>>>,
    #[module(skip)]
    mode: AttentionMode,
    max_len: usize,
}

impl SynthesizerAttention {
    /// The synthesised logits for queries at positions `q0..q0 + lq` over keys `0..lk`.
    ///
    /// # Shapes
    /// - query: `[batch, heads, seq_q, d_k]` → `[batch, heads, seq_q, seq_k]`
    fn synthesised(&self, query: &Tensor<4>, q0: usize, lk: usize) -> Tensor<4> {
        let [b, h, lq, _] = query.dims();
        if let Some(dense) = &self.dense {
            let hidden = relu(dense.hidden.forward(query.clone()));
            return dense.logits.forward(hidden).narrow(3, 0, lk);
        }
        let r = match (&self.random, &self.factors) {
            (Some(r), _) => r.val().narrow(1, q0, lq).narrow(2, 0, lk), // [heads, seq_q, seq_k]
            (None, Some((r1, r2))) => {
                let k = r1.dims()[2];
                r1.val()
                    .narrow(1, q0, lq)
                    .matmul(r2.val().narrow(1, 0, lk).swap_dims(1, 2))
                    .mul_scalar(1.0 / (k as f64).sqrt())
            }
            (None, None) => unreachable!("a synthesizer always has a synthesis"),
        };
        r.reshape([1, h, lq, lk]).expand([b, h, lq, lk])
    }

    fn mask(&self, input: &AttnInput) -> Option<Tensor<4, Bool>> {
        let [b, h, lq, lk, _, _] = input.dims();
        let device = input.query.device();
        let pad = input
            .mask_pad_k
            .as_ref()
            .map(|p| p.clone().reshape([b, 1, 1, lk]).expand([b, h, lq, lk]));
        let causal = self.mode.is_causal().then(|| {
            causal_mask(lq, lk, &device)
                .reshape([1, 1, lq, lk])
                .expand([b, h, lq, lk])
        });
        match (pad, causal) {
            (Some(p), Some(c)) => Some(p.bool_or(c)),
            (p, c) => p.or(c),
        }
    }
}

impl AttentionCore for SynthesizerAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    ///
    /// # Panics
    /// If the sequence is longer than `max_len`.
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, h, lq, lk, dk, _] = input.dims();
        assert!(
            lk <= self.max_len,
            "synthesizer: input length {lk} exceeds max_len {} fixed at init",
            self.max_len
        );
        let q0 = lk - lq; // queries sit at the end of the keys (bottom-right alignment)
        let mut logits = self.synthesised(&input.query, q0, lk);
        if let Some(alpha) = &self.alpha {
            let gate = sigmoid(alpha.val()).reshape([1, h, 1, 1]); // σ(α)
            let dot = input
                .query
                .clone()
                .matmul(input.key.clone().swap_dims(2, 3))
                .mul_scalar(1.0 / (dk as f64).sqrt());
            logits = dot
                .mul(gate.clone().neg().add_scalar(1.0))
                .add(logits.mul(gate));
        }
        let mask = self.mask(&input);
        masked_softmax_matmul(logits, mask, input.value)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes with a key/value cache (the new rows of the synthesised weights
    /// are those of the positions being decoded).
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        kv_cache(self.mode, batch, dims, max_len, device)
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::{Attention, AttentionConfig};
    use crate::testing::specs::*;
    use crate::testing::{Contract, Oracle, Spec};
    use burn::module::Param;

    use crate::testing::{ReferenceFn, oracle};

    fn synthesizer_with(synthesis: Synthesis) -> Spec<Attention> {
        let config = move |mixing| {
            AttentionConfig::from(SynthesizerAttentionConfig {
                synthesis,
                mixing,
                max_len: 40,
                rank: 3,
                trainable: true,
            })
        };
        let spec = from_config(move |_| config(SynthesizerMixing::Alone));
        let mut spec = spec.exact(
            "mixed with dot product, σ(α) = 0",
            Oracle::Full,
            1e-5,
            move |mode, case, device| {
                let mut core = build(&config(SynthesizerMixing::DotProduct), mode, case, device);
                let Attention::Synthesizer(s) = &mut core else {
                    unreachable!("synthesizer spec")
                };
                s.alpha = Some(Param::from_tensor(Tensor::<1>::full(
                    [case.heads],
                    -1.0e4,
                    device,
                )));
                core
            },
        );
        if synthesis == Synthesis::Random {
            let uniform: ReferenceFn<Attention> = |_, input, mode| {
                let mut zero_q = input.clone();
                zero_q.query = input.query.zeros_like();
                oracle(&zero_q, mode, None, None)
            };
            spec = spec.exact(
                "R = 0: uniform weights",
                Oracle::Reference("uniform weights over visible keys", uniform),
                1e-5,
                move |mode, case, device| {
                    let mut core = build(&config(SynthesizerMixing::Alone), mode, case, device);
                    let Attention::Synthesizer(s) = &mut core else {
                        unreachable!("synthesizer spec")
                    };
                    s.random = Some(Param::from_tensor(Tensor::<3>::zeros(
                        [case.heads, 40, 40],
                        device,
                    )));
                    core
                },
            );
        }
        spec.name = format!("synthesizer ({synthesis:?})");
        spec
    }

    /// Random, dense and factorised-random synthesis.
    impl Contract for SynthesizerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            vec![
                synthesizer_with(Synthesis::Random),
                synthesizer_with(Synthesis::Dense),
                synthesizer_with(Synthesis::FactorizedRandom),
            ]
        }
    }
}
