//! Memory-Compressed attention (T-DMCA): local block attention, and attention over keys and
//! values compressed by a strided convolution.
//!
//! - Paper: Liu, Saleh, Pot, Goodrich, Sepassi, Kaiser and Shazeer 2018, "Generating Wikipedia
//!   by Summarizing Long Sequences", arXiv:1801.10198; reference tensorflow/tensor2tensor
//!   (`masked_local_attention_1d`, `multihead_self_attention_reduced`) and
//!   lucidrains/memory-compressed-attention.
//! - The paper alternates the two kinds of layer (`LMLML`); in `models`, a stack's
//!   `attention_pattern = [{ kind = "memory-compressed-local" }, { kind = "memory-compressed" }]`
//!   expresses it.
//! - **Local** ([`MemoryCompressedLocalAttention`]): blocks of `block` (b) positions.
//!   Bidirectional: a block attends to itself and its neighbouring blocks. Causal: to itself and
//!   the previous block, key ≤ query (t2t `masked_local_attention_1d`). O(N·b·d) time, O(N·b)
//!   memory, through the shared block-sparse kernel. Exact on its pattern; b ≥ N is full
//!   (causal full) attention.
//! - **Compressed** ([`MemoryCompressedAttention`]): keys and values are compressed along the
//!   sequence by a learned convolution with kernel = stride = `factor` (k) per head
//!   (lucidrains: grouped by head, on the projected keys and values), so the N queries attend to
//!   ⌈N/k⌉ slots (plus a learned null slot, so every query has a key). Causal: slot m covers
//!   positions `[mk, (m+1)k)` and query i sees it iff `(m+1)k − 1 ≤ i` (only complete past
//!   blocks, which is leak-free; t2t excludes the block containing i too). Padded positions are
//!   zeroed before compressing and a slot of only padding is masked. O(N·N/k·d) time and
//!   O(N·N/k) memory: quadratic, divided by k (the paper's claim). With k = 1, an identity
//!   convolution and no null slot it is full attention (tested).
//! - Decoding (causal): local keeps a rolling window of the last 2b positions; compressed keeps
//!   the slots so far and the keys and values of the block not yet complete, compressing each
//!   block when its k-th position arrives (a step costs O(t/k·d) at position t).
//! - Modes: bidirectional, causal; cross is a configuration error for both (the papers define
//!   self-attention layers; t2t raises `NotImplementedError` for a memory antecedent).
//! - Deviation: compression is applied to the projected keys and values (lucidrains), not to
//!   the layer input before projection (t2t); the two are equal when the projection is linear
//!   and the convolution shares weights across heads.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::decoding::{DecodeCache, SlotCache, WindowCache};
use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::kernels::block_sparse::{BlockPlan, BlockSparse, ElementRule, block_sparse_attention};
use crate::kernels::dense::masked_softmax_matmul;

const WHY_NOT_CROSS: &str =
    "the paper defines self-attention layers (t2t has no memory antecedent)";

/// Configuration of [`MemoryCompressedLocalAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct MemoryCompressedLocalAttentionConfig {
    /// Block length (paper/t2t: b = 256).
    pub block: usize,
}

impl Default for MemoryCompressedLocalAttentionConfig {
    fn default() -> Self {
        Self { block: 256 }
    }
}

impl MemoryCompressedLocalAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "memory-compressed-local",
        paper: "Liu et al. 2018, Generating Wikipedia by Summarizing Long Sequences, arXiv:1801.10198",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N·b·d)",
        memory: "O(N·d) on Flex and cubecl (block-sparse kernel); O(N·b) composed elsewhere",
        exactness: Exactness::ExactWhen("on its block pattern (full when b >= N)"),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for MemoryCompressedLocalAttentionConfig {
    type Core = MemoryCompressedLocalAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<MemoryCompressedLocalAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode_because(&Self::INFO, mode, WHY_NOT_CROSS)?;
        ConfigError::check_nonzero("block", self.block)?;
        Ok(MemoryCompressedLocalAttention {
            mode,
            block: self.block,
        })
    }
}

/// Local block attention of the Memory-Compressed Transformer. See the [module docs](self).
#[derive(Module, Debug)]
pub struct MemoryCompressedLocalAttention {
    #[module(skip)]
    mode: AttentionMode,
    block: usize,
}

impl MemoryCompressedLocalAttention {
    #[cfg(feature = "testing")]
    fn allowed(&self, i: usize, j: usize) -> bool {
        let (bi, bj) = (i / self.block, j / self.block);
        match self.mode {
            AttentionMode::Causal => j <= i && bj + 1 >= bi,
            _ => bj + 1 >= bi && bj <= bi + 1,
        }
    }
}

impl AttentionCore for MemoryCompressedLocalAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, _, n, lk, dk, _] = input.dims();
        assert_eq!(
            n, lk,
            "memory-compressed local attention is self-attention (seq_q = seq_k)"
        );
        let b = self.block.min(n.max(1));
        let nb = n.div_ceil(b);
        let causal = self.mode.is_causal();
        // With b clipped to N there is one block: the rule alone decides.
        let plan = BlockPlan::look_around(b, nb, nb, 1, if causal { 0 } else { 1 });
        let rule = if causal {
            ElementRule::Causal { offset: 0 }
        } else {
            ElementRule::All
        };
        block_sparse_attention(BlockSparse {
            query: input.query.mul_scalar(1.0 / (dk as f64).sqrt()),
            key: input.key,
            value: input.value,
            mask_pad_k: input.mask_pad_k.as_ref(),
            plan: &plan,
            rule,
            extra: None,
        })
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }
    /// Causal mode decodes with a rolling window of the keys its local blocks can still see.
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        let _ = (batch, dims, max_len, device);
        self.mode
            .is_causal()
            .then(|| DecodeCache::Window(WindowCache::blocks(self.block, self.block)))
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        crate::decoding::window_step(cache, input)
    }


}

#[cfg(feature = "testing")]
impl MemoryCompressedLocalAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        let [_, _, n, lk, _, _] = input.dims();
        let b = self.block.min(n.max(1));
        let clipped = MemoryCompressedLocalAttention {
            mode: self.mode,
            block: b,
        };
        Some(crate::mask::DenseMask::from_allowed(n, lk, |i, j| clipped.allowed(i, j)))
    }
}

/// Configuration of [`MemoryCompressedAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct MemoryCompressedAttentionConfig {
    /// Compression factor: kernel and stride of the convolution (paper: k = 3).
    pub factor: usize,
    /// A learned null key and value every query can attend to (lucidrains; t2t prepends the
    /// first token instead).
    pub null_slot: bool,
}

impl Default for MemoryCompressedAttentionConfig {
    fn default() -> Self {
        Self {
            factor: 3,
            null_slot: true,
        }
    }
}

impl MemoryCompressedAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "memory-compressed",
        paper: "Liu et al. 2018, Generating Wikipedia by Summarizing Long Sequences, arXiv:1801.10198",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N·N/k·d)",
        memory: "O(N·N/k)",
        exactness: Exactness::Approximate(
            "keys and values compressed by a learned strided convolution; full with k = 1 and an identity convolution",
        ),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for MemoryCompressedAttentionConfig {
    type Core = MemoryCompressedAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<MemoryCompressedAttention, ConfigError> {
        ConfigError::check_mode_because(&Self::INFO, mode, WHY_NOT_CROSS)?;
        ConfigError::check_nonzero("factor", self.factor)?;
        let k = self.factor;
        let fan = (k * dims.d_k) as f64;
        let init = Initializer::Uniform {
            min: -1.0 / fan.sqrt(),
            max: 1.0 / fan.sqrt(),
        };
        Ok(MemoryCompressedAttention {
            conv_key: init.init([dims.heads, k * dims.d_k, dims.d_k], device),
            conv_value: init.init([dims.heads, k * dims.d_v, dims.d_v], device),
            null_key: self.null_slot.then(|| {
                Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
                .init([dims.heads, dims.d_k], device)
            }),
            null_value: self.null_slot.then(|| {
                Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
                .init([dims.heads, dims.d_v], device)
            }),
            mode,
            factor: k,
        })
    }
}

/// Attention over convolution-compressed keys and values. See the [module docs](self).
#[derive(Module, Debug)]
pub struct MemoryCompressedAttention {
    /// Key compression `[heads, k·d_k, d_k]`: slot m = Σ_t W_t k_{mk+t}.
    pub conv_key: Param<Tensor<3>>,
    /// Value compression `[heads, k·d_v, d_v]`.
    pub conv_value: Param<Tensor<3>>,
    /// Null key `[heads, d_k]`, if configured.
    pub null_key: Option<Param<Tensor<2>>>,
    /// Null value `[heads, d_v]`, if configured.
    pub null_value: Option<Param<Tensor<2>>>,
    #[module(skip)]
    mode: AttentionMode,
    factor: usize,
}

impl MemoryCompressedAttention {
    /// Compresses `[batch, heads, n, d]` into `[batch, heads, ⌈n/k⌉, d]`.
    fn compress(&self, x: Tensor<4>, weight: Tensor<3>) -> Tensor<4> {
        let [b, h, n, d] = x.dims();
        let k = self.factor;
        let slots = n.div_ceil(k);
        let x = if slots * k > n {
            let zeros = Tensor::zeros([b, h, slots * k - n, d], (&x.device(), x.dtype()));
            Tensor::cat(vec![x, zeros], 2)
        } else {
            x
        };
        let windows = x.reshape([b, h, slots, k * d]); // [batch, heads, slots, k·d]
        let d_out = weight.dims()[2];
        windows.matmul(weight.reshape([1, h, k * d, d_out])) // [batch, heads, slots, d]
    }
}

impl AttentionCore for MemoryCompressedAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [bs, h, n, lk, dk, dv] = input.dims();
        assert_eq!(
            n, lk,
            "memory-compressed attention is self-attention (seq_q = seq_k)"
        );
        let device = input.query.device();
        let k = self.factor;
        let slots = n.div_ceil(k);
        let (key, value) = match &input.mask_pad_k {
            Some(pad) => {
                let m = pad.clone().reshape([bs, 1, n, 1]);
                (
                    input.key.mask_fill(m.clone().expand([bs, h, n, dk]), 0.0),
                    input.value.mask_fill(m.expand([bs, h, n, dv]), 0.0),
                )
            }
            None => (input.key, input.value),
        };
        let mut ck = self.compress(key, self.conv_key.val()); // [batch, heads, slots, d_k]
        let mut cv = self.compress(value, self.conv_value.val()); // [batch, heads, slots, d_v]

        // Slot validity: causal visibility and all-padding slots, [batch, 1, n, slots].
        let mut mask: Option<Tensor<4, Bool>> = None;
        if self.mode.is_causal() {
            let ends = Tensor::<1, Int>::arange(0..slots as i64, &device)
                .mul_scalar(k as i64)
                .add_scalar(k as i64 - 1)
                .reshape([1, 1, 1, slots]);
            let q = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, 1, n, 1]);
            mask = Some(ends.greater(q).expand([bs, 1, n, slots]));
        }
        if let Some(pad) = &input.mask_pad_k {
            let padded = if slots * k > n {
                let extra = Tensor::<2, Int>::ones([bs, slots * k - n], &device).bool();
                Tensor::cat(vec![pad.clone(), extra], 1)
            } else {
                pad.clone()
            };
            let empty = padded
                .reshape([bs, slots, k])
                .all_dim(2)
                .reshape([bs, 1, 1, slots])
                .expand([bs, 1, n, slots]);
            mask = Some(match mask {
                Some(m) => m.bool_or(empty),
                None => empty,
            });
        }
        if let (Some(nk), Some(nv)) = (&self.null_key, &self.null_value) {
            ck = Tensor::cat(
                vec![nk.val().reshape([1, h, 1, dk]).expand([bs, h, 1, dk]), ck],
                2,
            );
            cv = Tensor::cat(
                vec![nv.val().reshape([1, h, 1, dv]).expand([bs, h, 1, dv]), cv],
                2,
            );
            mask = mask.map(|m| {
                let open = Tensor::<4, Int>::zeros([bs, 1, n, 1], &device).bool();
                Tensor::cat(vec![open, m], 3)
            });
        }
        let total = ck.dims()[2];
        let scores = input
            .query
            .matmul(ck.swap_dims(2, 3))
            .mul_scalar(1.0 / (dk as f64).sqrt()); // [batch, heads, n, slots (+1)]
        let mask = mask.map(|m| m.expand([bs, h, n, total]));
        masked_softmax_matmul(scores, mask, cv)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes with the compressed slots so far and the incomplete block.
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        let _ = (batch, dims, max_len, device);
        self.mode
            .is_causal()
            .then(|| DecodeCache::Slots(Box::new(SlotCache::new(self.factor))))
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        let DecodeCache::Slots(slots) = cache else {
            panic!("memory-compressed attention decodes with a slot cache")
        };
        let [b, h, t, _, dk, dv] = input.dims();
        let device = input.query.device();
        let start = slots.len();
        slots.append(input.key, input.value, |k, v| {
            (
                self.compress(k, self.conv_key.val()),
                self.compress(v, self.conv_value.val()),
            )
        });
        let k = self.factor;
        // Key sets: the null slot (always visible), then slot m (covering [mk, (m+1)k)), visible
        // to the query at p iff (m+1)k − 1 ≤ p.
        let mut keys = Vec::new();
        let mut values = Vec::new();
        let mut visible: Vec<Box<dyn Fn(usize) -> bool>> = Vec::new();
        if let (Some(nk), Some(nv)) = (&self.null_key, &self.null_value) {
            keys.push(nk.val().reshape([1, h, 1, dk]).expand([b, h, 1, dk]));
            values.push(nv.val().reshape([1, h, 1, dv]).expand([b, h, 1, dv]));
            visible.push(Box::new(|_| true));
        }
        if let Some((ck, cv)) = slots.compressed() {
            for m in 0..ck.dims()[2] {
                visible.push(Box::new(move |p| (m + 1) * k <= p + 1));
            }
            keys.push(ck);
            values.push(cv);
        }
        let total = visible.len();
        if total == 0 {
            return Tensor::zeros([b, h, t, dv], &device);
        }
        let hidden: Vec<bool> = (0..t)
            .flat_map(|i| visible.iter().map(move |v| !v(start + i)))
            .collect();
        let (ck, cv) = (Tensor::cat(keys, 2), Tensor::cat(values, 2));
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(hidden, [t, total]), &device)
            .reshape([1, 1, t, total])
            .expand([b, h, t, total]);
        let scores = input
            .query
            .matmul(ck.swap_dims(2, 3))
            .mul_scalar(1.0 / (dk as f64).sqrt());
        masked_softmax_matmul(scores, Some(mask), cv)
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};
    use burn::module::Param;

    /// Blocks of 4 on the pattern; one block covering the input is full (causal full)
    /// attention.
    impl Contract for MemoryCompressedLocalAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let spec = pattern_spec(
                |_| MemoryCompressedLocalAttentionConfig { block: 4 }.into(),
                |core, input| match core {
                    Attention::MemoryCompressedLocal(a) => a.pattern(input),
                    _ => None,
                },
            );
            vec![exact_config(spec, "block >= N", Oracle::Full, 1e-5, |case| {
                MemoryCompressedLocalAttentionConfig { block: case.seq_k }.into()
            })]
        }
    }

    /// Factor 3 with a null slot; k = 1 with an identity convolution and no null slot is full
    /// attention.
    impl Contract for MemoryCompressedAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let general = |_: &Case| {
                MemoryCompressedAttentionConfig {
                    factor: 3,
                    null_slot: true,
                }
                .into()
            };
            vec![from_config(general).causal_memory(false).exact(
                "k = 1, identity convolution",
                Oracle::Full,
                1e-5,
                |mode, case, device| {
                    let mut core = build(
                        &MemoryCompressedAttentionConfig {
                            factor: 1,
                            null_slot: false,
                        }
                        .into(),
                        mode,
                        case,
                        device,
                    );
                    let Attention::MemoryCompressed(m) = &mut core else {
                        unreachable!("memory-compressed spec")
                    };
                    let eye = |d: usize| {
                        Param::from_tensor(
                            Tensor::<2>::eye(d, device)
                                .reshape([1, d, d])
                                .expand([case.heads, d, d]),
                        )
                    };
                    m.conv_key = eye(case.d_k);
                    m.conv_value = eye(case.d_v);
                    core
                },
            )]
        }
    }
}
