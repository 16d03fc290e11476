//! Image Transformer local attention: 1-D query blocks with a memory, and 2-D query blocks with
//! a memory flange.
//!
//! - Paper: Parmar et al. 2018, "Image Transformer", arXiv:1802.05751; reference
//!   tensorflow/tensor2tensor `layers/common_attention.py` (`local_attention_1d`,
//!   `masked_local_attention_1d`, `local_attention_2d`, `masked_local_attention_2d`).
//! - **1-D** ([`ImageTransformer1dAttention`]): the flattened image is cut into query blocks of
//!   `query_block` (l_q) positions. Bidirectional: a block attends to the positions from
//!   `memory` (l_m) before its start to `memory` after its end. Causal: to the `memory`
//!   positions before its start and itself, with key ≤ query (t2t's masked 1-D local attention
//!   with l_m = l_q).
//! - **2-D** ([`ImageTransformer2dAttention`]): the sequence is an image of `grid` (H × W) in
//!   **block-raster order** (query blocks of h_q × w_q in raster order, pixels in raster order
//!   inside a block; [`block_raster_order`] converts). Bidirectional: a block attends to the
//!   rectangle around it widened by the flange (h_m rows above and below, w_m columns left and
//!   right). Causal: to the h_m rows above (w_q + 2·w_m wide), the w_m columns left of it, and
//!   itself, with key ≤ query in block-raster order (the generation order).
//! - Cost: O(N·m·d) time and O(N·m) memory, m = keys per block (l_q + 2·l_m, or the flange
//!   rectangle), through the shared block-sparse kernel.
//! - Exact: softmax attention restricted to the pattern (tested against the dense masked
//!   oracle); one block covering the image is full (causal: raster-causal) attention.
//! - Decoding (causal): 1-D keeps a rolling window of the last l_q + l_m positions; 2-D keeps
//!   every key and reads, per new pixel, its block's earlier pixels and the flange blocks above
//!   and to the left (each step's input carries the image's grid, `AttnInput::with_grid`).
//! - Modes: bidirectional, causal. Cross is a configuration error (the memory is a region of the
//!   query's own image).
//! - Deviation: t2t detects padding by all-zero keys; we use the explicit padding mask.

use std::sync::Arc;

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Tensor};

use crate::decoding::{CausalPattern, DecodeCache, WindowCache, pattern_step};
use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::extras::{Grid};
use crate::kernels::block_sparse::{BlockPlan, BlockSparse, ElementRule, block_sparse_attention};

const WHY_NOT_CROSS: &str = "the memory is a region of the query's own image";

/// Configuration of [`ImageTransformer1dAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct ImageTransformer1dAttentionConfig {
    /// Query block length (paper: l_q = 256, t2t `block_length`).
    pub query_block: usize,
    /// Memory before (and, bidirectional, after) each block (paper: l_m; t2t `block_width` 128
    /// unmasked, l_q masked).
    pub memory: usize,
}

impl Default for ImageTransformer1dAttentionConfig {
    fn default() -> Self {
        Self {
            query_block: 256,
            memory: 256,
        }
    }
}

impl ImageTransformer1dAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "image-transformer-1d",
        paper: "Parmar et al. 2018, Image Transformer, arXiv:1802.05751",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N·(l_q + 2·l_m)·d)",
        memory: "O(N·d) on Flex and cubecl (block-sparse kernel); O(N·(l_q + 2·l_m)) composed elsewhere",
        exactness: Exactness::ExactWhen("on its local pattern (full when l_q >= N)"),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for ImageTransformer1dAttentionConfig {
    type Core = ImageTransformer1dAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<ImageTransformer1dAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode_because(&Self::INFO, mode, WHY_NOT_CROSS)?;
        ConfigError::check_nonzero("query_block", self.query_block)?;
        Ok(ImageTransformer1dAttention {
            mode,
            query_block: self.query_block,
            memory: self.memory,
        })
    }
}

/// 1-D local attention of the Image Transformer. See the [module docs](self).
#[derive(Module, Debug)]
pub struct ImageTransformer1dAttention {
    #[module(skip)]
    mode: AttentionMode,
    query_block: usize,
    memory: usize,
}

impl ImageTransformer1dAttention {
    /// Whether query `i` may see key `j` (pattern without padding).
    fn allowed(&self, i: usize, j: usize) -> bool {
        let start = i / self.query_block * self.query_block;
        let end = start + self.query_block;
        let lo = start.saturating_sub(self.memory);
        match self.mode {
            AttentionMode::Causal => j >= lo && j <= i,
            _ => j >= lo && j < end + self.memory,
        }
    }

    fn plan_and_rule(&self, n: usize) -> (BlockPlan, ElementRule) {
        let b = self.query_block.min(n.max(1));
        let nb = n.div_ceil(b);
        let reach = self.memory.div_ceil(b);
        let ahead = if self.mode.is_causal() { 0 } else { reach };
        let plan = BlockPlan::look_around(b, nb, nb, reach, ahead);
        let w = plan.per_block * b;
        let mut mask = Vec::with_capacity(nb * b * w);
        for q in 0..nb {
            for r in 0..b {
                let i = q * b + r;
                for s in 0..plan.per_block {
                    for o in 0..b {
                        let ok = plan
                            .get(0, q, s)
                            .is_some_and(|kb| self.allowed(i, kb * b + o));
                        mask.push(!ok);
                    }
                }
            }
        }
        (plan, ElementRule::Explicit(Arc::new(mask)))
    }
}

impl AttentionCore for ImageTransformer1dAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (self-attention: `seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, _, lq, lk, dk, _] = input.dims();
        assert_eq!(
            lq, lk,
            "image transformer attention is self-attention (seq_q = seq_k)"
        );
        let (plan, rule) = self.plan_and_rule(lq);
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
            .then(|| DecodeCache::Window(WindowCache::blocks(self.query_block, self.memory)))
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        crate::decoding::window_step(cache, input)
    }


}

#[cfg(feature = "testing")]
impl ImageTransformer1dAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        let [_, _, lq, lk, _, _] = input.dims();
        Some(crate::testing::patterns::image_transformer_1d(
            lq,
            lk,
            self.query_block,
            self.memory,
            self.mode.is_causal(),
        ))
    }
}

/// Configuration of [`ImageTransformer2dAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct ImageTransformer2dAttentionConfig {
    /// Query block rows and columns (paper: h_q × w_q = 8 × 16; t2t `query_shape` (16, 16)).
    pub query_shape: [usize; 2],
    /// Memory flange rows and columns (paper: h_m, w_m; t2t `memory_flange` (16, 32)).
    pub memory_flange: [usize; 2],
}

impl Default for ImageTransformer2dAttentionConfig {
    fn default() -> Self {
        Self {
            query_shape: [16, 16],
            memory_flange: [16, 32],
        }
    }
}

impl ImageTransformer2dAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "image-transformer-2d",
        paper: "Parmar et al. 2018, Image Transformer, arXiv:1802.05751",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N·(h_q + 2h_m)(w_q + 2w_m)·d)",
        memory: "O(N·d) on Flex and cubecl (block-sparse kernel); O(N·(h_q + 2h_m)(w_q + 2w_m)) composed elsewhere",
        exactness: Exactness::ExactWhen(
            "on its 2-D local pattern (full when one block covers the image)",
        ),
        needs_grid: true,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for ImageTransformer2dAttentionConfig {
    type Core = ImageTransformer2dAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<ImageTransformer2dAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode_because(&Self::INFO, mode, WHY_NOT_CROSS)?;
        ConfigError::check_nonzero("query_shape", self.query_shape[0].min(self.query_shape[1]))?;
        Ok(ImageTransformer2dAttention {
            mode,
            query_shape: self.query_shape,
            memory_flange: self.memory_flange,
        })
    }

    /// Query blocks must tile the grid: each side becomes the largest divisor of the grid's
    /// side that is at most the configured one.
    fn fit_grid(&self, grid: Grid) -> Self {
        let fit = |want: usize, side: usize| {
            (1..=want.min(side))
                .rev()
                .find(|q| side.is_multiple_of(*q))
                .unwrap_or(1)
        };
        Self {
            query_shape: [
                fit(self.query_shape[0], grid.height),
                fit(self.query_shape[1], grid.width),
            ],
            ..self.clone()
        }
    }
}

/// 2-D local attention of the Image Transformer. See the [module docs](self).
#[derive(Module, Debug)]
pub struct ImageTransformer2dAttention {
    #[module(skip)]
    mode: AttentionMode,
    query_shape: [usize; 2],
    memory_flange: [usize; 2],
}

/// The 2-D block layout of a grid: block sizes clipped to the grid.
#[derive(Clone, Copy, Debug)]
struct Blocks2d {
    hq: usize,
    wq: usize,
    rows: usize,
    cols: usize,
}

impl Blocks2d {
    fn new(grid: Grid, query_shape: [usize; 2]) -> Self {
        let hq = query_shape[0].min(grid.height);
        let wq = query_shape[1].min(grid.width);
        assert!(
            grid.height.is_multiple_of(hq) && grid.width.is_multiple_of(wq),
            "image transformer 2d: the grid {}x{} must be a whole number of {hq}x{wq} query blocks",
            grid.height,
            grid.width
        );
        Self {
            hq,
            wq,
            rows: grid.height / hq,
            cols: grid.width / wq,
        }
    }

    /// (row, col) of sequence position `p` in block-raster order.
    fn coords(&self, p: usize) -> (usize, usize) {
        let size = self.hq * self.wq;
        let (block, inner) = (p / size, p % size);
        let (br, bc) = (block / self.cols, block % self.cols);
        (
            br * self.hq + inner / self.wq,
            bc * self.wq + inner % self.wq,
        )
    }
}

/// The permutation from raster order to block-raster order for query blocks of
/// `query_shape`: `order[p]` is the raster index of the pixel at block-raster position `p`.
pub fn block_raster_order(grid: Grid, query_shape: [usize; 2]) -> Vec<usize> {
    let b = Blocks2d::new(grid, query_shape);
    (0..grid.len())
        .map(|p| {
            let (r, c) = b.coords(p);
            r * grid.width + c
        })
        .collect()
}

impl ImageTransformer2dAttention {
    fn blocks(&self, input: &AttnInput, n: usize) -> Blocks2d {
        let grid = input
            .extras
            .grid
            .expect("image transformer 2d needs the image shape: AttnInput::with_grid / MhaInput::with_grid");
        assert_eq!(
            grid.len(),
            n,
            "grid {}x{} does not match sequence length {n}",
            grid.height,
            grid.width
        );
        Blocks2d::new(grid, self.query_shape)
    }

    /// Whether query `i` may see key `j` (positions in block-raster order).
    fn allowed(&self, b: &Blocks2d, i: usize, j: usize) -> bool {
        let (qr, qc) = b.coords(i);
        let (kr, kc) = b.coords(j);
        let (r0, c0) = (qr / b.hq * b.hq, qc / b.wq * b.wq);
        let (r1, c1) = (r0 + b.hq, c0 + b.wq);
        let [hm, wm] = self.memory_flange;
        let in_cols = kc + wm >= c0 && kc < c1 + wm;
        match self.mode {
            AttentionMode::Causal => {
                let above = kr + hm >= r0 && kr < r0 && in_cols;
                let left = kr >= r0 && kr < r1 && kc + wm >= c0 && kc < c0;
                let own = kr >= r0 && kr < r1 && kc >= c0 && kc < c1 && j <= i;
                (above || left || own) && j <= i
            }
            _ => kr + hm >= r0 && kr < r1 + hm && in_cols,
        }
    }
}

impl AttentionCore for ImageTransformer2dAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]; the sequence is `grid` in block-raster order
    /// - output: `[batch, heads, seq_q, d_v]`
    ///
    /// # Panics
    /// Without a grid, or if the grid is not a whole number of query blocks.
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, _, n, lk, dk, _] = input.dims();
        assert_eq!(
            n, lk,
            "image transformer attention is self-attention (seq_q = seq_k)"
        );
        let blocks = self.blocks(&input, n);
        let size = blocks.hq * blocks.wq;
        let nb = n / size;
        // Key blocks: the query block's 2-D neighbours within the flange.
        let [hm, wm] = self.memory_flange;
        let (dr, dc) = (hm.div_ceil(blocks.hq), wm.div_ceil(blocks.wq));
        let lists: Vec<Vec<usize>> = (0..nb)
            .map(|q| {
                let (br, bc) = (q / blocks.cols, q % blocks.cols);
                let mut list = Vec::new();
                for r in br.saturating_sub(dr)..=(br + dr).min(blocks.rows - 1) {
                    for c in bc.saturating_sub(dc)..=(bc + dc).min(blocks.cols - 1) {
                        let k = r * blocks.cols + c;
                        if !self.mode.is_causal() || k <= q {
                            list.push(k);
                        }
                    }
                }
                list
            })
            .collect();
        let plan = BlockPlan::new(size, nb, vec![lists]);
        let w = plan.per_block * size;
        let mut mask = Vec::with_capacity(nb * size * w);
        for q in 0..nb {
            for r in 0..size {
                let i = q * size + r;
                for s in 0..plan.per_block {
                    for o in 0..size {
                        let ok = plan
                            .get(0, q, s)
                            .is_some_and(|kb| self.allowed(&blocks, i, kb * size + o));
                        mask.push(!ok);
                    }
                }
            }
        }
        block_sparse_attention(BlockSparse {
            query: input.query.mul_scalar(1.0 / (dk as f64).sqrt()),
            key: input.key,
            value: input.value,
            mask_pad_k: input.mask_pad_k.as_ref(),
            plan: &plan,
            rule: ElementRule::Explicit(Arc::new(mask)),
            extra: None,
        })
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes with a key/value cache read through the flange: each new pixel
    /// reads its block's earlier pixels and the flange blocks above and to the left.
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        crate::interface::kv_cache(self.mode, batch, dims, max_len, device)
    }

    /// # Panics
    /// Without the grid of the whole image on the input, or past its last pixel.
    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        let grid = input.extras.grid.expect(
            "image transformer 2d decoding needs the image's grid on every step (AttnInput::with_grid)",
        );
        let end = cache.len() + input.query.dims()[2];
        assert!(
            end <= grid.len(),
            "image transformer 2d: decoding position {end} is past the {}x{} image",
            grid.height,
            grid.width
        );
        let pattern = Flange2d {
            core: self,
            blocks: Blocks2d::new(grid, self.query_shape),
        };
        let scale = 1.0 / (input.query.dims()[3] as f64).sqrt();
        pattern_step(cache, &pattern, input.query, input.key, input.value, scale)
    }
}

/// The causal 2-D pattern of one image, listing keys for decoding.
#[derive(Debug)]
struct Flange2d<'a> {
    core: &'a ImageTransformer2dAttention,
    blocks: Blocks2d,
}

impl CausalPattern for Flange2d<'_> {
    fn keys(&self, _part: usize, _head: usize, p: usize, keys: &mut Vec<usize>) {
        let b = &self.blocks;
        let size = b.hq * b.wq;
        let [hm, wm] = self.core.memory_flange;
        let (dr, dc) = (hm.div_ceil(b.hq), wm.div_ceil(b.wq));
        let q = p / size;
        let (br, bc) = (q / b.cols, q % b.cols);
        for r in br.saturating_sub(dr)..=br {
            for c in bc.saturating_sub(dc)..=(bc + dc).min(b.cols - 1) {
                let kb = r * b.cols + c;
                if kb <= q {
                    keys.extend(
                        (kb * size..(kb + 1) * size).filter(|&j| self.core.allowed(b, p, j)),
                    );
                }
            }
        }
    }
}

#[cfg(feature = "testing")]
impl ImageTransformer2dAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        let [_, _, n, lk, _, _] = input.dims();
        let b = self.blocks(input, n);
        assert_eq!(n, lk, "image transformer 2d is self-attention");
        let layout = crate::testing::patterns::Image2d {
            height: b.rows * b.hq,
            width: b.cols * b.wq,
            block_h: b.hq,
            block_w: b.wq,
            flange_h: self.memory_flange[0],
            flange_w: self.memory_flange[1],
        };
        Some(crate::testing::patterns::image_transformer_2d(
            layout,
            self.mode.is_causal(),
        ))
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Contract, Oracle, Spec};

    /// Query blocks of 4 with a memory of 3; one block covering the input is full (causal:
    /// raster-causal) attention.
    impl Contract for ImageTransformer1dAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let spec = pattern_spec(
                |_| {
                    ImageTransformer1dAttentionConfig {
                        query_block: 4,
                        memory: 3,
                    }
                    .into()
                },
                |core, input| match core {
                    Attention::ImageTransformer1d(a) => a.pattern(input),
                    _ => None,
                },
            );
            vec![exact_config(
                spec,
                "one block covering the image",
                Oracle::Full,
                1e-5,
                |case| {
                    ImageTransformer1dAttentionConfig {
                        query_block: case.seq_k,
                        memory: 0,
                    }
                    .into()
                },
            )]
        }
    }

    /// 2 × 2 query blocks with a 1 × 1 flange on `n/4 × 4` images in block-raster order; one
    /// block covering the image is full (causal: block-raster-causal) attention.
    impl Contract for ImageTransformer2dAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let mut spec = pattern_spec(
                |_| {
                    ImageTransformer2dAttentionConfig {
                        query_shape: [2, 2],
                        memory_flange: [1, 1],
                    }
                    .into()
                },
                |core, input| match core {
                    Attention::ImageTransformer2d(a) => a.pattern(input),
                    _ => None,
                },
            );
            spec = exact_config(
                spec,
                "one block covering the image",
                Oracle::Full,
                1e-5,
                |case| {
                    ImageTransformer2dAttentionConfig {
                        query_shape: [case.seq_k / 4, 4],
                        memory_flange: [0, 0],
                    }
                    .into()
                },
            );
            spec.decorate = Some(grid4);
            spec.fit_len = |n| n.div_ceil(8).max(1) * 8;
            vec![spec]
        }
    }
}
