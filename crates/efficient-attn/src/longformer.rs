//! Longformer: a sliding window with per-head dilation, plus global tokens.
//!
//! - Paper: Beltagy, Peters and Cohan 2020, "Longformer: The Long-Document Transformer",
//!   arXiv:2004.05150; reference allenai/longformer and huggingface `modeling_longformer.py`.
//! - **Window convention: `window` is one-sided** (w, as allenai's `attention_window`): query i
//!   sees keys `i + d·t` for `t ∈ [−w, w]` (causal: `t ∈ [−w, 0]`), d the head's dilation.
//!   Hugging Face's `attention_window` is the *total* window (2w); convert with w = total / 2.
//! - **Global tokens** (given per call as [`GlobalTokens`](crate::GlobalTokens): a prefix, positions, or a mask):
//!   every token attends to them, and they attend to every token. Local rows take one softmax
//!   over the window plus the global keys (global positions are removed from the window so no
//!   key counts twice). Global rows are recomputed over all keys with the separate global
//!   projections (the [`GlobalHeads`] side input, made by `MultiHeadAttention` when
//!   `global_projections = true`, initialised as copies of the local ones by the long-document
//!   conversion) and overwrite those rows.
//! - Computation: the window runs on the shared block-sparse kernel (blocks of w, look-around
//!   of one block each side, band mask); a dilation d regroups the sequence by residue mod d so
//!   the dilated window is contiguous; global keys are extra keys of every block. Cost
//!   O(N·(2w+1 + g)·d) time and O(N·(3w + g)) memory; global rows O(g·N·d).
//! - Exact: softmax attention on its pattern (tested against the dense mask); w ≥ N is full
//!   attention; all tokens global with tied projections is full attention.
//! - Modes: bidirectional; causal (sliding window only, as the paper's autoregressive
//!   character-LM: global tokens are an error there, they see the future). Cross is a
//!   configuration error.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::ConfigError;
use crate::extras::GlobalHeads;
use crate::decoding::{DecodeCache, WindowCache};
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::kernels::block_sparse::{
    BlockPlan, BlockSparse, ElementRule, ExtraKeys, block_sparse_attention,
};
use crate::kernels::dense::padded_attention;

/// Configuration of [`LongformerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct LongformerAttentionConfig {
    /// One-sided window w (longformer-base-4096: 256 per side, i.e. HF `attention_window` 512).
    pub window: usize,
    /// Dilation per head (one value for all heads, or one per head; paper: 1, with 2 or 3 on
    /// two heads of the upper layers for character LM).
    pub dilation: Vec<usize>,
    /// Separate Q/K/V projections for global tokens (paper: yes).
    pub global_projections: bool,
}

impl Default for LongformerAttentionConfig {
    fn default() -> Self {
        Self {
            window: 256,
            dilation: vec![1],
            global_projections: true,
        }
    }
}

impl LongformerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "longformer",
        paper: "Beltagy et al. 2020, Longformer: The Long-Document Transformer, arXiv:2004.05150",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N·(2w+1+g)·d)",
        memory: "O(N·d) on Flex and cubecl (block-sparse kernel); O(N·(3w+g)) composed elsewhere",
        exactness: Exactness::ExactWhen(
            "on its window + global pattern (full when w >= N or all tokens are global)",
        ),
        needs_grid: false,
        global_tokens: true,
        cannot_decode: None,
    };

}

impl CoreConfig for LongformerAttentionConfig {
    type Core = LongformerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<LongformerAttention, ConfigError> {
        let _ = device;
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "the window and global tokens index positions of one sequence",
        )?;
        ConfigError::check_nonzero("window", self.window)?;
        let dilation = match self.dilation.len() {
            0 => vec![1; dims.heads],
            1 => vec![self.dilation[0]; dims.heads],
            n if n == dims.heads => self.dilation.clone(),
            n => {
                return Err(ConfigError::InvalidField {
                    field: "dilation",
                    expected: format!("one value, or one per head ({})", dims.heads),
                    got: format!("{n} values"),
                });
            }
        };
        if dilation.contains(&0) {
            return Err(ConfigError::InvalidField {
                field: "dilation",
                expected: "positive dilations".into(),
                got: format!("{dilation:?}"),
            });
        }
        Ok(LongformerAttention {
            mode,
            window: self.window,
            dilation,
        })
    }

    fn global_projections(&self) -> bool {
        self.global_projections
    }
}

/// The window's blocks are `⌈w / WINDOW_SPLIT⌉` keys (measured on Flex at n = 1,024 and 4,096,
/// w = 256: 2 is faster than 1 and 4).
const WINDOW_SPLIT: usize = 2;

/// Longformer attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct LongformerAttention {
    #[module(skip)]
    mode: AttentionMode,
    window: usize,
    dilation: Vec<usize>,
}

impl LongformerAttention {
    #[cfg(feature = "testing")]
    /// Whether query `i` may see key `j` through the window of head `h`.
    fn in_window(&self, h: usize, i: usize, j: usize) -> bool {
        let d = self.dilation[h];
        let diff = i.abs_diff(j);
        let side_ok = !self.mode.is_causal() || j <= i;
        side_ok && diff.is_multiple_of(d) && diff / d <= self.window
    }

    /// The window for the heads in `heads` (all with dilation `d`), with `exclude` keys removed
    /// and `extra` keys appended.
    #[allow(clippy::too_many_arguments)]
    fn window_part(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        exclude: Option<Tensor<2, Bool>>,
        extra: Option<ExtraKeys>,
        d: usize,
    ) -> Tensor<4> {
        let [b, h, n, dk] = q.dims();
        let dv = v.dims()[3];
        let causal = self.mode.is_causal();
        if d == 1 {
            let w = self.window.min(n.max(1));
            // Blocks of ⌈w/s⌉ with s blocks of look-around each side cover the band
            // [i − w, i + w] with (2s + 1)/(2s) of its keys computed, instead of 3/2 with blocks of w.
            let s = WINDOW_SPLIT.min(w);
            let block = w.div_ceil(s);
            let nb = n.div_ceil(block);
            let plan = BlockPlan::look_around(block, nb, nb, s, if causal { 0 } else { s });
            let rule = ElementRule::Band {
                left: w,
                right: if causal { 0 } else { w },
            };
            return block_sparse_attention(BlockSparse {
                query: q,
                key: k,
                value: v,
                mask_pad_k: exclude.as_ref(),
                plan: &plan,
                rule,
                extra,
            });
        }
        // Dilation d: regroup by residue mod d; each class is a contiguous sequence.
        let rows = n.div_ceil(d);
        let device = q.device();
        let to_classes = |x: Tensor<4>| {
            let [_, _, _, c] = x.dims();
            let x = if rows * d > n {
                Tensor::cat(
                    vec![
                        x.clone(),
                        Tensor::zeros([b, h, rows * d - n, c], (&device, x.dtype())),
                    ],
                    2,
                )
            } else {
                x
            };
            // [batch, heads, rows, d, c] → [batch, d, heads, rows, c] → [batch·d, heads, rows, c]
            x.reshape([b, h, rows, d, c])
                .permute([0, 3, 1, 2, 4])
                .reshape([b * d, h, rows, c])
        };
        let mut ex = match exclude {
            Some(e) => e,
            None => Tensor::<2, Int>::zeros([b, n], &device).bool(),
        };
        if rows * d > n {
            ex = Tensor::cat(
                vec![
                    ex,
                    Tensor::<2, Int>::ones([b, rows * d - n], &device).bool(),
                ],
                1,
            );
        }
        let ex = ex
            .reshape([b, rows, d])
            .swap_dims(1, 2)
            .reshape([b * d, rows]);
        let extra = extra.map(|e| {
            let g = e.key.dims()[2];
            let rep = |t: Tensor<4>| {
                let [_, _, _, c] = t.dims();
                t.reshape([b, 1, h, g, c])
                    .expand([b, d, h, g, c])
                    .reshape([b * d, h, g, c])
            };
            ExtraKeys {
                key: rep(e.key),
                value: rep(e.value),
                mask: e.mask.map(|m| {
                    // [batch, heads', n, g] → per class
                    let [mb, mh, _, _] = m.dims();
                    let m = if rows * d > n {
                        Tensor::cat(
                            vec![
                                m,
                                Tensor::<4, Int>::zeros([mb, mh, rows * d - n, g], &device).bool(),
                            ],
                            2,
                        )
                    } else {
                        m
                    };
                    m.reshape([mb, mh, rows, d, g])
                        .permute([0, 3, 1, 2, 4])
                        .reshape([mb * d, mh, rows, g])
                }),
            }
        });
        let inner = LongformerAttention {
            mode: self.mode,
            window: self.window,
            dilation: vec![1; h],
        };
        let out = inner.window_part(
            to_classes(q),
            to_classes(k),
            to_classes(v),
            Some(ex),
            extra,
            1,
        ); // [batch·d, heads, rows, d_v]
        let _ = dk;
        out.reshape([b, d, h, rows, dv])
            .permute([0, 2, 3, 1, 4])
            .reshape([b, h, rows * d, dv])
            .narrow(2, 0, n)
    }
}

impl AttentionCore for LongformerAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    ///
    /// # Panics
    /// On global tokens in causal mode.
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [b, h, n, lk, dk, dv] = input.dims();
        assert_eq!(
            n, lk,
            "longformer attention is self-attention (seq_q = seq_k)"
        );
        let device = input.query.device();
        let scale = 1.0 / (dk as f64).sqrt();
        let global = input
            .extras
            .global
            .as_ref()
            .map(|g| g.positions(b, n))
            .filter(|p| p.iter().any(|r| !r.is_empty()));
        assert!(
            global.is_none() || !self.mode.is_causal(),
            "longformer: global tokens attend to the whole sequence, which a causal layer cannot"
        );
        let q = input.query.clone().mul_scalar(scale);

        // Global keys (local projection) for the local rows, and the window's exclusions.
        let (exclude, extra, global_info) = match &global {
            None => (input.mask_pad_k.clone(), None, None),
            Some(pos) => {
                let g = pos.iter().map(Vec::len).max().unwrap_or(0);
                // Indices padded to g (slot validity kept separately) and a one-hot scatter map.
                let mut idx = Vec::with_capacity(b * g);
                let mut invalid = Vec::with_capacity(b * g);
                let mut is_global = vec![false; b * n];
                let mut onehot = vec![0f32; b * n * g];
                for (bi, row) in pos.iter().enumerate() {
                    for s in 0..g {
                        match row.get(s) {
                            Some(&p) => {
                                idx.push((bi * n + p) as i64);
                                invalid.push(false);
                                is_global[bi * n + p] = true;
                                onehot[(bi * n + p) * g + s] = 1.0;
                            }
                            None => {
                                idx.push((bi * n) as i64);
                                invalid.push(true);
                            }
                        }
                    }
                }
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [b * g]), &device);
                let gather = |t: &Tensor<4>| {
                    let c = t.dims()[3];
                    t.clone()
                        .swap_dims(0, 1)
                        .reshape([h, b * n, c])
                        .select(1, idx.clone())
                        .reshape([h, b, g, c])
                        .swap_dims(0, 1)
                };
                let mut slot_mask =
                    Tensor::<2, Bool>::from_data(TensorData::new(invalid, [b, g]), &device);
                if let Some(pad) = &input.mask_pad_k {
                    let pad_g = pad
                        .clone()
                        .int()
                        .reshape([b * n])
                        .select(0, idx.clone())
                        .reshape([b, g])
                        .bool();
                    slot_mask = slot_mask.bool_or(pad_g);
                }
                let is_global =
                    Tensor::<2, Bool>::from_data(TensorData::new(is_global, [b, n]), &device);
                let exclude = match &input.mask_pad_k {
                    Some(p) => p.clone().bool_or(is_global.clone()),
                    None => is_global.clone(),
                };
                let extra = ExtraKeys {
                    key: gather(&input.key),
                    value: gather(&input.value),
                    mask: Some(slot_mask.clone().reshape([b, 1, 1, g]).expand([b, 1, n, g])),
                };
                let onehot = Tensor::<3>::from_data(TensorData::new(onehot, [b, n, g]), &device);
                (
                    Some(exclude),
                    Some(extra),
                    Some((idx, g, is_global, onehot)),
                )
            }
        };

        // Local rows: the window (grouped by dilation) plus the global keys.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (head, &d) in self.dilation.iter().enumerate().take(h) {
            match groups.iter_mut().find(|(gd, _)| *gd == d) {
                Some((_, hs)) => hs.push(head),
                None => groups.push((d, vec![head])),
            }
        }
        let mut out = if let [(d, _)] = groups.as_slice() {
            // One dilation for every head: no per-head selection (its backward is a
            // scatter-add that cost a fifth of the step).
            self.window_part(
                q.clone(),
                input.key.clone(),
                input.value.clone(),
                exclude.clone(),
                extra.clone(),
                *d,
            )
        } else {
            Tensor::<4>::zeros([b, h, n, dv], (&device, input.value.dtype()))
        };
        for (d, heads) in groups.iter().filter(|_| groups.len() > 1) {
            let sel = Tensor::<1, Int>::from_data(
                TensorData::new(
                    heads.iter().map(|&x| x as i64).collect::<Vec<_>>(),
                    [heads.len()],
                ),
                &device,
            );
            let pick = |t: &Tensor<4>| t.clone().select(1, sel.clone());
            let extra_h = extra.as_ref().map(|e| ExtraKeys {
                key: pick(&e.key),
                value: pick(&e.value),
                mask: e.mask.clone(),
            });
            let part = self.window_part(
                pick(&q),
                pick(&input.key),
                pick(&input.value),
                exclude.clone(),
                extra_h,
                *d,
            );
            out = out.select_assign(1, sel, part, IndexingUpdateOp::Add);
        }

        // Global rows: every key, through the global projections (or the local ones, tied).
        if let Some((idx, g, is_global, onehot)) = global_info {
            let (gq, gk, gv) = match input.extras.side.get::<GlobalHeads>() {
                Some(gh) => (gh.query.clone(), gh.key.clone(), gh.value.clone()),
                None => (input.query.clone(), input.key.clone(), input.value.clone()),
            };
            let gq = gq
                .swap_dims(0, 1)
                .reshape([h, b * n, dk])
                .select(1, idx)
                .reshape([h, b, g, dk])
                .swap_dims(0, 1); // [batch, heads, g, d_k]
            let rows = padded_attention(gq, gk, gv, input.mask_pad_k.as_ref(), scale); // [batch, heads, g, d_v]
            let scattered = onehot
                .reshape([b, 1, n, g])
                .expand([b, h, n, g])
                .matmul(rows); // [batch, heads, n, d_v]
            let at_global = is_global.reshape([b, 1, n, 1]).expand([b, h, n, dv]);
            out = out.mask_where(at_global, scattered);
        }
        out
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes with a rolling window of the last w·d positions (d the largest
    /// head dilation), each head seeing every d-th of its own.
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        let _ = (batch, dims, max_len, device);
        self.mode.is_causal().then(|| {
            DecodeCache::Window(WindowCache::dilated(self.window, self.dilation.clone()))
        })
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        crate::decoding::window_step(cache, input)
    }

}

#[cfg(feature = "testing")]
impl LongformerAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        let [b, h, n, lk, _, _] = input.dims();
        let global = input.extras.global.as_ref().map(|g| g.positions(b, n));
        Some(crate::mask::DenseMask::per_example([b, h, n, lk], |bi, head, i, j| {
            let is_g = |p: usize| global.as_ref().is_some_and(|g| g[bi].contains(&p));
            is_g(i) || is_g(j) || self.in_window(head, i, j)
        }))
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Contract, Oracle, Spec};

    fn longformer_with(dilation: Vec<usize>) -> Spec<Attention> {
        let d2 = dilation.clone();
        let mut spec = pattern_spec(
            move |case| {
                LongformerAttentionConfig {
                    window: 2,
                    // Cycled over the heads of the case.
                    dilation: (0..case.heads).map(|h| d2[h % d2.len()]).collect(),
                    global_projections: false,
                }
                .into()
            },
            |core, input| match core {
                Attention::Longformer(a) => a.pattern(input),
                _ => None,
            },
        );
        spec = exact_config(spec, "w >= N", Oracle::Full, 1e-5, |case| {
            LongformerAttentionConfig {
                window: case.seq_k,
                dilation: vec![1],
                global_projections: false,
            }
            .into()
        });
        spec.decorate = Some(first_token_global);
        spec.name = format!("longformer (dilation {dilation:?})");
        spec
    }

    /// Window 2 per side with the first token global (bidirectional), with dilation 1 and
    /// with dilations 1 and 2 on the two heads.
    impl Contract for LongformerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            vec![longformer_with(vec![1]), longformer_with(vec![1, 2])]
        }
    }
}
