//! Full (vanilla) softmax attention.
//!
//! - Paper: Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762.
//! - Cost: O(N²·d) time. On Flex it runs the fused CPU kernel (FlashAttention-2 forward and
//!   backward, `kernels::fused`), and on the cubecl backends (`wgpu`, `cuda`, with the `cube`
//!   feature) a CubeCL kernel with its own backward (`kernels::cube::flash`): O(N·d) memory
//!   when training too. On other devices Burn's fused [`attention`] op runs it; its forward is
//!   tiled, but under autodiff Burn decomposes it into matmul/softmax/matmul and stores the
//!   N × N weights: O(N²) memory when training.
//! - Exact: yes. It is the baseline every other variant is measured against.
//! - Modes: bidirectional, causal (bottom-right aligned, so keys may include a memory), cross.
//! - Deviation: no dropout on attention probabilities (the fused op has none);
//!   [`MultiHeadAttention`](crate::MultiHeadAttention) applies dropout to the attention output.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

use crate::decoding::DecodeCache;
use crate::error::ConfigError;
use crate::kernels::fused;
use crate::interface::{AttentionCore, CoreConfig, kv_cache, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};

/// Configuration of [`FullAttention`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct FullAttentionConfig {
    /// Score scale; `None` = 1/√d_k (paper).
    pub scale: Option<f64>,
}

impl FullAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "full",
        paper: "Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762",
        modes: &AttentionMode::ALL,
        time: "O(N²·d)",
        memory: "O(N·d) on Flex and cubecl (fused forward and backward); O(N²) under autodiff elsewhere",
        exactness: Exactness::Exact,
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for FullAttentionConfig {
    type Core = FullAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<FullAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode(&Self::INFO, mode)?;
        ConfigError::check_positive_opt("scale", self.scale)?;
        Ok(FullAttention {
            mode,
            scale: self.scale,
        })
    }

    /// Off the fused kernels (Flex, cubecl), autodiff stores the probabilities and their
    /// gradient: about four `N × N` matrices per head. The fused backward recomputes them:
    /// O(N·d).
    fn memory_estimate(
        &self,
        n: usize,
        batch: usize,
        heads: usize,
        backward: bool,
        device: &Device,
    ) -> Option<u64> {
        (backward && !fused::flash_device_runs_fused(device)).then(|| 4 * (batch * heads * n * n * 4) as u64)
    }
}

/// Full softmax attention through Burn's fused `attention` op. See the [module docs](self).
#[derive(Module, Debug)]
pub struct FullAttention {
    #[module(skip)]
    mode: AttentionMode,
    scale: Option<f64>,
}

impl AttentionCore for FullAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, _, lq, lk, d_k, _] = input.dims();
        let causal = self.mode.is_causal();
        if causal {
            assert!(
                lk >= lq,
                "full attention (causal): needs seq_k >= seq_q, got seq_q {lq}, seq_k {lk}"
            );
        }
        if fused::flash_runs_fused(&input.query) {
            let scale = self.scale.unwrap_or(1.0 / (d_k as f64).sqrt());
            return fused::flash_attention(
                input.query,
                input.key,
                input.value,
                input.mask_pad_k.as_ref(),
                causal,
                scale,
                fused::DEFAULT_TILES,
            );
        }
        self.attend_composed(input)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes with a key/value cache.
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

impl FullAttention {
    /// Burn's fused `attention` op: what runs off the fused kernels (Flex, cubecl), and their oracle.
    pub(crate) fn attend_composed(&self, input: AttnInput) -> Tensor<4> {
        let [b, h, lq, lk, _, _] = input.dims();
        let mask = input
            .mask_pad_k
            .map(|pad| pad.reshape([b, 1, 1, lk]).expand([b, h, lq, lk]));
        attention(
            input.query,
            input.key,
            input.value,
            mask,
            None,
            AttentionModuleOptions {
                scale: self.scale,
                softcap: None,
                is_causal: self.mode.is_causal(),
            },
        )
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};

    /// Exact everywhere.
    impl Contract for FullAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let config = |_: &Case| FullAttentionConfig::default().into();
            vec![exact_config(
                from_config(config),
                "always",
                Oracle::Full,
                1e-5,
                config,
            )]
        }
    }
}
