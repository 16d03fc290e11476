//! Linear Transformer: kernelised attention with φ(x) = elu(x) + 1.
//!
//! - Paper: Katharopoulos, Vyas, Pappas and Fleuret 2020, "Transformers are RNNs: Fast
//!   Autoregressive Transformers with Linear Attention", arXiv:2006.16236.
//! - Computation: `out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)` over the keys query `i`
//!   may see, through the shared engine in `kernels::prefix_sum`:
//!   one state for bidirectional/cross, chunked prefix sums for causal, and a recurrent
//!   [`decode_step`](crate::AttentionCore::decode_step) for decoding with constant memory per token.
//! - Cost: O(N·d·d_v) time; memory O(d·d_v) bidirectional, O(N/C · d · d_v + N·C) causal
//!   (chunk C), O(d·d_v) per decoded token.
//! - Exact: no: a different similarity (the elu+1 kernel) than softmax; it equals its own
//!   causal recurrence exactly (the contract suite's exact case is the masked quadratic form).
//! - Modes: bidirectional, causal, cross.
//! - Deviations: no 1/√d scaling (as the paper). The paper adds ε = 1e-6 to the denominator;
//!   we only floor it at 1e-30 (φ > 0, so the denominator is positive whenever a key is
//!   visible), which keeps the three forms equal to rounding. Padded keys get zero features
//!   (the reference multiplies φ(K) by the key-length mask).

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::activation::elu;
use burn::tensor::{Device, Tensor};

use crate::error::ConfigError;
use crate::decoding::{self, DecodeCache};
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::kernels::{fused, prefix_sum};

/// Configuration of [`LinearTransformerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct LinearTransformerAttentionConfig {
    /// Chunk length of the causal prefix sums (C; flash-linear-attention uses 64).
    pub chunk: usize,
}

impl Default for LinearTransformerAttentionConfig {
    fn default() -> Self {
        Self { chunk: 64 }
    }
}

impl LinearTransformerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "linear-transformer",
        paper: "Katharopoulos et al. 2020, Transformers are RNNs, arXiv:2006.16236",
        modes: &AttentionMode::ALL,
        time: "O(N·d·d_v)",
        memory: "O(d·d_v) bidirectional; O(N/C·d·d_v) causal; O(d·d_v) per decoded token",
        exactness: Exactness::Approximate(
            "elu+1 kernel instead of softmax; exact to its own recurrence",
        ),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for LinearTransformerAttentionConfig {
    type Core = LinearTransformerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<LinearTransformerAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode(&Self::INFO, mode)?;
        ConfigError::check_nonzero("chunk", self.chunk)?;
        Ok(LinearTransformerAttention {
            mode,
            chunk: self.chunk,
        })
    }
}

/// Linear attention with φ = elu + 1. See the [module docs](self).
#[derive(Module, Debug)]
pub struct LinearTransformerAttention {
    #[module(skip)]
    mode: AttentionMode,
    chunk: usize,
}

impl LinearTransformerAttention {
    /// The feature map φ(x) = elu(x) + 1 (positive).
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, d]` → `[batch, heads, seq, d]`
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        elu(x, 1.0).add_scalar(1.0)
    }
}

impl LinearTransformerAttention {
    /// The attention as Burn tensor operations (features, padding and the composed prefix
    /// sums): what runs where the fused kernel attention does not, and its oracle.
    ///
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    pub fn attend_composed(&self, input: AttnInput) -> Tensor<4> {
        input.dims();
        let phi_q = self.features(input.query);
        let phi_k = prefix_sum::zero_padded(self.features(input.key), input.mask_pad_k.as_ref());
        match self.mode {
            AttentionMode::Causal => {
                prefix_sum::causal_chunked_composed(phi_q, phi_k, input.value, self.chunk)
            }
            AttentionMode::Bidirectional | AttentionMode::Cross => {
                prefix_sum::bidirectional_composed(phi_q, phi_k, input.value)
            }
        }
    }
}

impl AttentionCore for LinearTransformerAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        input.dims();
        if fused::attention_runs_fused(&input.query) {
            // φ, the padding and the prefix sums in one fused operation.
            let chunk = self.mode.is_causal().then_some(self.chunk);
            return fused::linear::elu_kernel_attention(
                input.query,
                input.key,
                input.value,
                input.mask_pad_k.as_ref(),
                chunk,
            );
        }
        self.attend_composed(input)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        let _ = max_len;
        decoding::recurrent_cache(self.mode.is_causal(), batch, dims, dims.d_k, device)
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        decoding::recurrent_step(
            cache,
            self.features(input.query),
            self.features(input.key),
            input.value,
        )
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};
    use crate::testing::ReferenceFn;

    /// Its chunked and single-state forms equal the masked quadratic form (chunk 3, so chunks
    /// are ragged).
    impl Contract for LinearTransformerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let config = |_: &Case| LinearTransformerAttentionConfig { chunk: 3 }.into();
            let reference: ReferenceFn<Attention> = |core, input, mode| match core {
                Attention::LinearTransformer(a) => kernel_reference(
                    a.features(input.query.clone()),
                    a.features(input.key.clone()),
                    input,
                    mode,
                ),
                _ => unreachable!("linear transformer spec"),
            };
            vec![exact_config(
                from_config(config),
                "masked quadratic form",
                Oracle::Reference("masked quadratic form", reference),
                1e-5,
                config,
            )]
        }
    }
}
