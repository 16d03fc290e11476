//! Full (vanilla) softmax attention.
//!
//! - Paper: Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762.
//! - Cost: O(N²·d) time. Burn's fused [`attention`] op runs it; on Flex and CubeCL
//!   backends the forward is tiled (flash-style), but under autodiff Burn decomposes it into
//!   matmul/softmax/matmul and stores the N × N weights: O(N²) memory when training.
//! - Exact: yes. It is the baseline every other variant is measured against.
//! - Modes: bidirectional, causal (bottom-right aligned, so keys may include a memory), cross.
//! - Deviation: no dropout on attention probabilities (the fused op has none);
//!   [`MultiHeadAttention`](crate::MultiHeadAttention) applies dropout to the attention output.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

use crate::config::ConfigError;
use crate::interface::{AttentionCore, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::mask::DenseMask;

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
        memory: "O(N²) under autodiff; tiled forward on Flex/CubeCL",
        exactness: Exactness::Exact,
    };

    /// Builds the attention for `mode`.
    pub fn init(
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
        let [b, h, lq, lk, _, _] = input.dims();
        if self.mode.is_causal() {
            assert!(
                lk >= lq,
                "full attention (causal): needs seq_k >= seq_q, got seq_q {lq}, seq_k {lk}"
            );
        }
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

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    fn pattern(&self, input: &AttnInput) -> Option<DenseMask> {
        let [_, _, lq, lk, _, _] = input.dims();
        Some(DenseMask::none(lq, lk))
    }
}
