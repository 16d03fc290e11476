//! An attention core defined outside efformer's crates: scaled cosine attention (Swin
//! Transformer V2, Liu et al. 2022, arXiv:2111.09883), `softmax(τ_h · cos(q_i, k_j)) v` with a
//! learned scale τ_h per head.
//!
//! - Cost: O(N²·d) time through Burn's fused attention op (this example is about the
//!   interface, not about speed).
//! - Modes: bidirectional, causal (bottom-right aligned), cross; causal layers decode with a
//!   key/value cache.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};
use efficient_attn::{
    AttentionCore, AttentionMode, AttnInput, ConfigError, CoreConfig, DecodeCache, Exactness,
    HeadDims, VariantInfo, kv_cache,
};
use serde::{Deserialize, Serialize};

/// Configuration of [`CosineAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CosineAttentionConfig {
    /// Initial scale τ (Swin V2 initialises the logit scale at log 10, i.e. τ = 10).
    pub initial_scale: f64,
}

impl Default for CosineAttentionConfig {
    fn default() -> Self {
        Self {
            initial_scale: 10.0,
        }
    }
}

/// What the variant is: `efformer attention list` style metadata.
pub const INFO: VariantInfo = VariantInfo::new(
    "cosine",
    "Liu et al. 2022, Swin Transformer V2, arXiv:2111.09883",
    &AttentionMode::ALL,
    "O(N²·d)",
    "O(N) forward (fused op)",
    Exactness::Approximate("a different similarity: cosine with a learned scale"),
);

impl CoreConfig for CosineAttentionConfig {
    type Core = CosineAttention;

    fn info(&self) -> &'static VariantInfo {
        &INFO
    }

    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<CosineAttention, ConfigError> {
        if !(self.initial_scale.is_finite() && self.initial_scale > 0.0) {
            return Err(ConfigError::invalid(
                "initial_scale",
                "a finite positive number",
                self.initial_scale,
            ));
        }
        Ok(CosineAttention {
            log_scale: Initializer::Constant {
                value: self.initial_scale.ln(),
            }
            .init([dims.heads], device),
            mode,
        })
    }
}

/// Scaled cosine attention. See the [crate docs](crate).
#[derive(Module, Debug)]
pub struct CosineAttention {
    /// log τ per head, `[heads]`.
    pub log_scale: Param<Tensor<1>>,
    #[module(skip)]
    mode: AttentionMode,
}

impl CosineAttention {
    /// τ per head, as `[1, heads, 1, 1]`.
    pub fn scale(&self) -> Tensor<4> {
        let heads = self.log_scale.dims()[0];
        self.log_scale.val().exp().reshape([1, heads, 1, 1])
    }
}

/// `x / |x|` along the last dimension.
///
/// # Shapes
/// - x: `[batch, heads, seq, d]` → `[batch, heads, seq, d]`
pub fn unit(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().powi_scalar(2).sum_dim(3).sqrt().clamp_min(1e-6); // [batch, heads, seq, 1]
    x.div(norm)
}

impl AttentionCore for CosineAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [b, h, lq, lk, _, _] = input.dims();
        let q = unit(input.query).mul(self.scale()); // [batch, heads, seq_q, d_k]
        let k = unit(input.key); // [batch, heads, seq_k, d_k]
        let mask = input
            .mask_pad_k
            .map(|pad| pad.reshape([b, 1, 1, lk]).expand([b, h, lq, lk]));
        attention(
            q,
            k,
            input.value,
            mask,
            None,
            AttentionModuleOptions {
                scale: Some(1.0),
                softcap: None,
                is_causal: self.mode.is_causal(),
            },
        )
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
        kv_cache(self.mode, batch, dims, max_len, device)
    }
}
