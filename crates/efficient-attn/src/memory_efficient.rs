//! Memory-efficient exact attention: key blocks with a streaming (online) softmax.
//!
//! - Paper: Rabe and Staats 2021, "Self-attention Does Not Need O(n²) Memory",
//!   arXiv:2112.05682 (the same recurrence as FlashAttention, Dao et al. 2022, arXiv:2205.14135).
//! - Computation: queries are split into blocks of `query_block`; for each, key blocks of
//!   `key_block` are visited in order, keeping a running row maximum `m`, normaliser `l` and
//!   unnormalised output `acc`:
//!   `m' = max(m, rowmax(s))`, `l' = l·e^(m−m') + Σ e^(s−m')`, `acc' = acc·e^(m−m') + e^(s−m')·V`,
//!   and finally `out = acc / l`.
//! - Cost: O(N²·d) time; forward memory O(query_block · key_block) per (batch, head) for scores,
//!   never the N × N matrix. On Flex this is the fused CPU kernel (`kernels::fused`,
//!   blocks capped at its default tiles), on the cubecl backends the CubeCL kernel
//!   (`kernels::cube::flash`, `cube` feature), each with its own backward: O(N·d) memory when
//!   training.
//!   Elsewhere it is composed of tensor operations, and autodiff keeps each block's
//!   probabilities for the backward pass (O(N²) in total).
//! - Exact: yes (equal to dense attention up to f32 rounding; the contract suite checks 1e-5).
//! - Modes: bidirectional, causal (bottom-right aligned; key blocks wholly in a query block's
//!   future are skipped, halving the work), cross.
//! - Deviation: no dropout on attention probabilities (see
//!   [`MultiHeadAttention`](crate::MultiHeadAttention)).

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{DType, Device, Tensor};

use crate::decoding::DecodeCache;
use crate::error::ConfigError;
use crate::kernels::fused;
use crate::interface::{AttentionCore, CoreConfig, kv_cache, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::mask::causal_block_mask;

/// Configuration of [`MemoryEfficientAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct MemoryEfficientAttentionConfig {
    /// Queries per block (paper: 1024).
    pub query_block: usize,
    /// Keys per block (paper: 4096; smaller blocks use less memory).
    pub key_block: usize,
    /// Score scale; `None` = 1/√d_k.
    pub scale: Option<f64>,
}

impl Default for MemoryEfficientAttentionConfig {
    fn default() -> Self {
        Self {
            query_block: 1024,
            key_block: 4096,
            scale: None,
        }
    }
}

impl MemoryEfficientAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "memory-efficient",
        paper: "Rabe & Staats 2021, Self-attention Does Not Need O(n²) Memory, arXiv:2112.05682",
        modes: &AttentionMode::ALL,
        time: "O(N²·d)",
        memory: "O(query_block·key_block) forward; O(N·d) training on Flex and cubecl",
        exactness: Exactness::Exact,
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for MemoryEfficientAttentionConfig {
    type Core = MemoryEfficientAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<MemoryEfficientAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode(&Self::INFO, mode)?;
        ConfigError::check_nonzero("query_block", self.query_block)?;
        ConfigError::check_nonzero("key_block", self.key_block)?;
        ConfigError::check_positive_opt("scale", self.scale)?;
        Ok(MemoryEfficientAttention {
            mode,
            query_block: self.query_block,
            key_block: self.key_block,
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

/// Exact attention with a streaming softmax over key blocks. See the [module docs](self).
#[derive(Module, Debug)]
pub struct MemoryEfficientAttention {
    #[module(skip)]
    mode: AttentionMode,
    query_block: usize,
    key_block: usize,
    scale: Option<f64>,
}

/// A finite stand-in for −∞ as the initial running maximum, so that `m − m'` is never
/// `−∞ − (−∞)`.
fn lowest_finite(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -6.0e4,
        _ => -1.0e30,
    }
}

/// A positive normaliser floor that is not zero in `dtype`.
fn tiny(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1.0e-7,
        _ => 1.0e-30,
    }
}

impl AttentionCore for MemoryEfficientAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, _, lq, lk, dk, _] = input.dims();
        let causal = self.mode.is_causal();
        if causal {
            assert!(
                lk >= lq,
                "memory-efficient attention (causal): needs seq_k >= seq_q, got seq_q {lq}, seq_k {lk}"
            );
        }
        let scale = self.scale.unwrap_or(1.0 / (dk as f64).sqrt());
        if fused::flash_runs_fused(&input.query) {
            // The fused kernel is this algorithm with its own backward; the blocks are its
            // tiles, capped at its defaults (larger tiles only cost cache).
            let tiles = [
                self.query_block.min(fused::DEFAULT_TILES[0]),
                self.key_block.min(fused::DEFAULT_TILES[1]),
            ];
            return fused::flash_attention(
                input.query,
                input.key,
                input.value,
                input.mask_pad_k.as_ref(),
                causal,
                scale,
                tiles,
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

impl MemoryEfficientAttention {
    /// The streaming softmax as Burn tensor operations: what runs off the fused kernels (Flex,
    /// cubecl), and their oracle.
    pub(crate) fn attend_composed(&self, input: AttnInput) -> Tensor<4> {
        let [b, h, lq, lk, dk, dv] = input.dims();
        let scale = self.scale.unwrap_or(1.0 / (dk as f64).sqrt());
        let causal = self.mode.is_causal();
        let offset = lk.saturating_sub(lq);
        let device = input.query.device();
        let dtype = input.query.dtype();
        if lq == 0 {
            return Tensor::zeros([b, h, 0, dv], (&device, dtype));
        }
        let q_all = input.query.mul_scalar(scale);

        let mut outputs = Vec::with_capacity(lq.div_ceil(self.query_block));
        for q0 in (0..lq).step_by(self.query_block) {
            let rows = self.query_block.min(lq - q0);
            let q = q_all.clone().narrow(2, q0, rows); // [batch, heads, rows, d_k]
            // In causal mode the last key any query of this block may see:
            let k_end = if causal {
                (q0 + rows + offset).min(lk)
            } else {
                lk
            };

            let mut m = Tensor::<4>::full([b, h, rows, 1], lowest_finite(dtype), (&device, dtype));
            let mut l = Tensor::<4>::zeros([b, h, rows, 1], (&device, dtype));
            let mut acc = Tensor::<4>::zeros([b, h, rows, dv], (&device, dtype));
            for k0 in (0..k_end).step_by(self.key_block) {
                let cols = self.key_block.min(k_end - k0);
                let k = input.key.clone().narrow(2, k0, cols); // [batch, heads, cols, d_k]
                let v = input.value.clone().narrow(2, k0, cols); // [batch, heads, cols, d_v]
                let mut s = q.clone().matmul(k.swap_dims(2, 3)); // [batch, heads, rows, cols]
                if let Some(pad) = &input.mask_pad_k {
                    let pad = pad.clone().narrow(1, k0, cols).reshape([b, 1, 1, cols]);
                    s = s.mask_fill(pad.expand([b, h, rows, cols]), f64::NEG_INFINITY);
                }
                // Only blocks that cross the diagonal need the causal mask.
                if causal && k0 + cols > q0 + offset + 1 {
                    let mask = causal_block_mask(rows, q0, cols, k0, offset, &device)
                        .reshape([1, 1, rows, cols])
                        .expand([b, h, rows, cols]);
                    s = s.mask_fill(mask, f64::NEG_INFINITY);
                }
                // The stabiliser cancels out of the result, so it needs no gradient.
                let m_new = m.clone().max_pair(s.clone().max_dim(3)).detach(); // [batch, heads, rows, 1]
                let p = s.sub(m_new.clone()).exp(); // [batch, heads, rows, cols]
                let correction = m.sub(m_new.clone()).exp(); // [batch, heads, rows, 1]
                l = l.mul(correction.clone()).add(p.clone().sum_dim(3));
                acc = acc.mul(correction).add(p.matmul(v));
                m = m_new;
            }
            // Rows that saw no key have l = 0 and acc = 0: their output is 0.
            let l = l.clamp_min(tiny(dtype));
            outputs.push(acc.div(l));
        }
        if outputs.len() == 1 {
            outputs.pop().expect("one block")
        } else {
            Tensor::cat(outputs, 2)
        }
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};

    /// Exact everywhere; checked with tiny, ragged blocks so every code path (several query and
    /// key blocks, a partial last block, causal block skipping) runs.
    impl Contract for MemoryEfficientAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let tiny_blocks = |_: &Case| {
                MemoryEfficientAttentionConfig {
                    query_block: 3,
                    key_block: 4,
                    scale: None,
                }
                .into()
            };
            let spec = from_config(tiny_blocks);
            let spec = exact_config(spec, "blocks 3 x 4", Oracle::Full, 1e-5, tiny_blocks);
            vec![exact_config(spec, "one block", Oracle::Full, 1e-5, |_| {
                MemoryEfficientAttentionConfig::default().into()
            })]
        }
    }
}
