//! Sparse Transformer: factorised attention with strided or fixed patterns, the two
//! factors split between the heads.
//!
//! - Paper: Child, Gray, Radford and Sutskever 2019, "Generating Long Sequences with Sparse
//!   Transformers", arXiv:1904.10509; reference openai/sparse_attention.
//! - Patterns (stride l, summary c), causal form (bidirectional drops `j ≤ i`):
//!   - `strided`: A¹ = {j : i − l < j ≤ i} (a band), A² = {j ≤ i : (i − j) mod l = 0};
//!   - `fixed`: A¹ = {j ≤ i : ⌊j/l⌋ = ⌊i/l⌋} (same block), A² = {j ≤ i : j mod l ≥ l − c}
//!     (the last c positions of every block are summaries).
//! - Heads: the first ⌈h/2⌉ heads use A¹, the others A² (the paper's "multi-head" integration;
//!   one head gives A¹ only).
//! - Computation, never an N × N matrix: the band and the blocks run on the shared block-sparse
//!   kernel; the stride pattern becomes contiguous after a transpose of the sequence as an
//!   `[N/l, l]` grid (each residue class is one short sequence, attended fully or causally); the
//!   summary columns are a fixed set of N/l·c keys every query sees (masked by causality).
//!   Cost O(N·(l + c·N/l)·d) time and O(N·(l + c·N/l)) memory (the strided A² heads see N/l
//!   keys per query, the fixed ones c·N/l): **quadratic in N at a fixed l** (the default, l =
//!   128, as openai and LRA use it), O(N√N) only when l grows like √N, which `stride = "sqrt"`
//!   does (l = ⌈√N⌉ per input, at least c).
//! - Exact: softmax attention restricted to the pattern (the realised pattern equals the dense
//!   mask, tested); with l ≥ N the A¹ heads are full (causal full) attention.
//! - Modes: causal (native) and bidirectional (symmetric patterns, as DeepSpeed/xformers
//!   `FixedSparsityConfig(attention="bidirectional")`). Cross is a configuration error.
//! - Decoding (causal): a key/value cache of which each new query reads its pattern's keys
//!   (its band or block, and the stride or summary positions so far): O(l + t/l) keys per head
//!   for a query at position t (fixed: O(l + c·t/l)). With `stride = "sqrt"`, l is set from
//!   the cache's `max_len` (the length of the sequence being decoded), so decode with `max_len`
//!   equal to the final length to match a forward pass over the whole sequence.
//! - Deviation: openai gives heads different summary columns (`num_verts`); all A² heads here
//!   use the last c positions of each block.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::decoding::{CausalPattern, DecodeCache, pattern_step};
use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::kernels::block_sparse::{BlockPlan, BlockSparse, ElementRule, block_sparse_attention};
use crate::kernels::dense::masked_softmax_matmul;

/// The factorisation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum SparsePattern {
    /// Band of l and stride l (images, audio).
    #[default]
    Strided,
    /// Blocks of l and summary columns (text).
    Fixed,
}

/// The stride (block length) l of [`SparseTransformerAttentionConfig`]: a fixed length (TOML
/// `stride = 128`) or `stride = "sqrt"`, l = ⌈√N⌉ for each input of length N (at least the
/// summary length c), which makes the cost O(N√N).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(crate = "burn::serde", untagged)]
pub enum Stride {
    /// A fixed l: cost O(N·(l + c·N/l)), quadratic in N.
    Length(usize),
    /// A rule that sets l from N.
    Rule(StrideRule),
}

/// A rule that sets the Sparse Transformer's stride from the sequence length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum StrideRule {
    /// l = ⌈√N⌉ (the paper's choice, l ≈ √N).
    Sqrt,
}

impl<'de> Deserialize<'de> for Stride {
    fn deserialize<D: burn::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(crate = "burn::serde", untagged)]
        enum Raw {
            Length(usize),
            Name(String),
        }
        let expected = "a length (a positive integer) or \"sqrt\"";
        match Raw::deserialize(d).map_err(|_| {
            <D::Error as burn::serde::de::Error>::custom(format!("expected {expected}"))
        })? {
            Raw::Length(l) => Ok(Self::Length(l)),
            Raw::Name(name) if name == "sqrt" => Ok(Self::Rule(StrideRule::Sqrt)),
            Raw::Name(name) => Err(<D::Error as burn::serde::de::Error>::custom(format!(
                "expected {expected}, got \"{name}\""
            ))),
        }
    }
}

impl Stride {
    /// l for a sequence of `n` positions, at least `min`.
    pub fn for_length(self, n: usize, min: usize) -> usize {
        match self {
            Self::Length(l) => l,
            Self::Rule(StrideRule::Sqrt) => {
                let mut l = (n as f64).sqrt().ceil() as usize;
                while l * l < n {
                    l += 1;
                }
                l.max(min).max(1)
            }
        }
    }
}

/// Configuration of [`SparseTransformerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct SparseTransformerAttentionConfig {
    /// Pattern (paper: strided for images, fixed for text).
    pub pattern: SparsePattern,
    /// Stride or block length l: a length (openai fixed example 128, LRA 128; cost quadratic in
    /// N) or `"sqrt"` (paper: l ≈ √N; cost O(N√N)).
    pub stride: Stride,
    /// Summary positions per block of the fixed pattern (paper: c; LRA 32).
    pub summary: usize,
}

impl Default for SparseTransformerAttentionConfig {
    fn default() -> Self {
        Self {
            pattern: SparsePattern::Fixed,
            stride: Stride::Length(128),
            summary: 32,
        }
    }
}

impl SparseTransformerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "sparse-transformer",
        paper: "Child et al. 2019, Generating Long Sequences with Sparse Transformers, arXiv:1904.10509",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N·(l + c·N/l)·d): quadratic at fixed l; O(N√N·d) with stride = \"sqrt\"",
        memory: "O(N·(l + c·N/l)): quadratic at fixed l; O(N√N) with stride = \"sqrt\"",
        exactness: Exactness::ExactWhen("on its factorised pattern (A¹ heads full when l >= N)"),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for SparseTransformerAttentionConfig {
    type Core = SparseTransformerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<SparseTransformerAttention, ConfigError> {
        let _ = device;
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "the factorised patterns index positions of one sequence",
        )?;
        let fixed = self.pattern == SparsePattern::Fixed;
        match self.stride {
            Stride::Length(l) => {
                ConfigError::check_nonzero("stride", l)?;
                if fixed && (self.summary == 0 || self.summary > l) {
                    return Err(ConfigError::InvalidField {
                        field: "summary",
                        expected: format!("1..={l} (at most the block length `stride`)"),
                        got: self.summary.to_string(),
                    });
                }
            }
            Stride::Rule(_) => {
                if fixed {
                    ConfigError::check_nonzero("summary", self.summary)?;
                }
            }
        }
        Ok(SparseTransformerAttention {
            mode,
            pattern: self.pattern,
            stride: self.stride,
            summary: self.summary,
            local_heads: dims.heads.div_ceil(2),
        })
    }
}

/// Sparse Transformer attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct SparseTransformerAttention {
    #[module(skip)]
    mode: AttentionMode,
    #[module(skip)]
    pattern: SparsePattern,
    #[module(skip)]
    stride: Stride,
    summary: usize,
    local_heads: usize,
}

impl SparseTransformerAttention {
    /// The stride l for a sequence of `n` positions.
    pub fn stride_for(&self, n: usize) -> usize {
        let min = if self.pattern == SparsePattern::Fixed {
            self.summary
        } else {
            1
        };
        self.stride.for_length(n, min)
    }

    /// Whether query `i` may see key `j` in head `h`, in a sequence of `n` positions.
    pub fn allowed(&self, h: usize, n: usize, i: usize, j: usize) -> bool {
        let l = self.stride_for(n);
        let causal_ok = !self.mode.is_causal() || j <= i;
        let first = h < self.local_heads;
        causal_ok
            && match (self.pattern, first) {
                (SparsePattern::Strided, true) => i.abs_diff(j) < l,
                (SparsePattern::Strided, false) => i.abs_diff(j).is_multiple_of(l),
                (SparsePattern::Fixed, true) => i / l == j / l,
                (SparsePattern::Fixed, false) => j % l >= l - self.summary,
            }
    }

    /// A¹: the band (strided) or the block (fixed), on the block-sparse kernel.
    fn local(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        pad: Option<&Tensor<2, Bool>>,
    ) -> Tensor<4> {
        let n = q.dims()[2];
        let l = self.stride_for(n).min(n.max(1));
        let nb = n.div_ceil(l);
        let causal = self.mode.is_causal();
        let (plan, rule) = match self.pattern {
            SparsePattern::Strided => (
                BlockPlan::look_around(l, nb, nb, 1, if causal { 0 } else { 1 }),
                ElementRule::Band {
                    left: l - 1,
                    right: if causal { 0 } else { l - 1 },
                },
            ),
            SparsePattern::Fixed => (
                BlockPlan::look_around(l, nb, nb, 0, 0),
                if causal {
                    ElementRule::Causal { offset: 0 }
                } else {
                    ElementRule::All
                },
            ),
        };
        block_sparse_attention(BlockSparse {
            query: q,
            key: k,
            value: v,
            mask_pad_k: pad,
            plan: &plan,
            rule,
            extra: None,
        })
    }

    /// A² strided: within each residue class mod l, after transposing the `[N/l, l]` grid.
    fn strided(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        pad: Option<&Tensor<2, Bool>>,
    ) -> Tensor<4> {
        let [b, h, n, _] = q.dims();
        let dv = v.dims()[3];
        let l = self.stride_for(n);
        let rows = n.div_ceil(l);
        let device = q.device();
        let to_classes = |x: Tensor<4>| {
            let [_, _, _, d] = x.dims();
            let x = if rows * l > n {
                Tensor::cat(
                    vec![
                        x.clone(),
                        Tensor::zeros([b, h, rows * l - n, d], (&device, x.dtype())),
                    ],
                    2,
                )
            } else {
                x
            };
            // [batch, heads, rows, l, d] → [batch, heads, l, rows, d]: class r is positions r, r+l, …
            x.reshape([b, h, rows, l, d])
                .swap_dims(2, 3)
                .reshape([b * h * l, 1, rows, d])
        };
        // Padding (and the tail beyond N), per class.
        let mut pad_all = match pad {
            Some(p) => p.clone(),
            None => Tensor::<2, Int>::zeros([b, n], &device).bool(),
        };
        if rows * l > n {
            pad_all = Tensor::cat(
                vec![
                    pad_all,
                    Tensor::<2, Int>::ones([b, rows * l - n], &device).bool(),
                ],
                1,
            );
        }
        let pad_classes = pad_all
            .reshape([b, 1, rows, l])
            .swap_dims(2, 3)
            .expand([b, h, l, rows])
            .reshape([b * h * l, 1, 1, rows])
            .expand([b * h * l, 1, rows, rows]);
        let out = attention(
            to_classes(q),
            to_classes(k),
            to_classes(v),
            Some(pad_classes),
            None,
            AttentionModuleOptions {
                scale: Some(1.0),
                softcap: None,
                is_causal: self.mode.is_causal(),
            },
        ); // [batch·heads·l, 1, rows, d_v]
        out.reshape([b, h, l, rows, dv])
            .swap_dims(2, 3)
            .reshape([b, h, rows * l, dv])
            .narrow(2, 0, n)
    }

    /// A² fixed: the summary columns, a fixed key set every query sees (masked by causality).
    fn summaries(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        pad: Option<&Tensor<2, Bool>>,
    ) -> Tensor<4> {
        let [b, h, n, _] = q.dims();
        let l = self.stride_for(n);
        let device = q.device();
        let cols: Vec<i64> = (0..n)
            .filter(|j| j % l >= l - self.summary)
            .map(|j| j as i64)
            .collect();
        if cols.is_empty() {
            return Tensor::zeros([b, h, n, v.dims()[3]], (&device, q.dtype()));
        }
        let s = cols.len();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(cols.clone(), [s]), &device);
        let ks = k.select(2, idx.clone()); // [batch, heads, s, d_k]
        let vs = v.select(2, idx.clone()); // [batch, heads, s, d_v]
        let scores = q.matmul(ks.swap_dims(2, 3)); // [batch, heads, n, s]
        let mut mask: Option<Tensor<4, Bool>> = None;
        if self.mode.is_causal() {
            let kpos = Tensor::<1, Int>::from_data(TensorData::new(cols, [s]), &device)
                .reshape([1, 1, 1, s]);
            let qpos = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, 1, n, 1]);
            mask = Some(kpos.greater(qpos).expand([b, h, n, s]));
        }
        if let Some(p) = pad {
            let ps = p
                .clone()
                .int()
                .select(1, idx)
                .bool()
                .reshape([b, 1, 1, s])
                .expand([b, h, n, s]);
            mask = Some(match mask {
                Some(m) => m.bool_or(ps),
                None => ps,
            });
        }
        masked_softmax_matmul(scores, mask, vs)
    }
}

impl AttentionCore for SparseTransformerAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, h, n, lk, dk, _] = input.dims();
        assert_eq!(
            n, lk,
            "sparse transformer attention is self-attention (seq_q = seq_k)"
        );
        let q = input.query.mul_scalar(1.0 / (dk as f64).sqrt());
        let pad = input.mask_pad_k.as_ref();
        let split = self.local_heads.min(h);
        let part = |t: &Tensor<4>, start: usize, len: usize| t.clone().narrow(1, start, len);
        let mut outs = vec![self.local(
            part(&q, 0, split),
            part(&input.key, 0, split),
            part(&input.value, 0, split),
            pad,
        )];
        if split < h {
            let rest = h - split;
            let (q2, k2, v2) = (
                part(&q, split, rest),
                part(&input.key, split, rest),
                part(&input.value, split, rest),
            );
            outs.push(match self.pattern {
                SparsePattern::Strided => self.strided(q2, k2, v2, pad),
                SparsePattern::Fixed => self.summaries(q2, k2, v2, pad),
            });
        }
        Tensor::cat(outs, 1)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes with a key/value cache read through the pattern (module docs).
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        crate::interface::kv_cache(self.mode, batch, dims, max_len, device)
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        let DecodeCache::KeyValue(kv) = &*cache else {
            panic!("sparse transformer attention decodes with a key/value cache")
        };
        let pattern = DecodePattern {
            core: self,
            stride: self.stride_for(kv.max_len()),
        };
        let scale = 1.0 / (input.query.dims()[3] as f64).sqrt();
        pattern_step(cache, &pattern, input.query, input.key, input.value, scale)
    }
}

/// The causal pattern at one stride, listing keys for decoding.
#[derive(Debug)]
struct DecodePattern<'a> {
    core: &'a SparseTransformerAttention,
    stride: usize,
}

impl CausalPattern for DecodePattern<'_> {
    fn keys(&self, _part: usize, head: usize, p: usize, keys: &mut Vec<usize>) {
        let l = self.stride;
        let local = head < self.core.local_heads;
        match (self.core.pattern, local) {
            (SparsePattern::Strided, true) => keys.extend((p + 1).saturating_sub(l)..=p),
            (SparsePattern::Fixed, true) => keys.extend(p / l * l..=p),
            (SparsePattern::Strided, false) => keys.extend((p % l..=p).step_by(l)),
            (SparsePattern::Fixed, false) => {
                let summary = self.core.summary;
                for block in 0..=p / l {
                    keys.extend((block * l + l - summary..(block + 1) * l).take_while(|&j| j <= p));
                }
            }
        }
    }
}

#[cfg(feature = "testing")]
impl SparseTransformerAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        let [_, h, n, lk, _, _] = input.dims();
        Some(crate::mask::DenseMask::per_head(h, n, lk, |head, i, j| {
            self.allowed(head, n, i, j)
        }))
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Spec};

    fn sparse_with(pattern: SparsePattern, stride: Stride) -> Spec<Attention> {
        let config = move |_: &Case| {
            SparseTransformerAttentionConfig {
                pattern,
                stride,
                summary: 2,
            }
            .into()
        };
        let mut spec = pattern_spec(config, |core, input| match core {
            Attention::SparseTransformer(a) => a.pattern(input),
            _ => None,
        });
        spec.name = format!("sparse-transformer ({pattern:?}, {stride:?})");
        spec
    }

    /// Strided pattern with l = 4, fixed pattern with l = 4, c = 2, and both with l = ⌈√N⌉.
    impl Contract for SparseTransformerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let sqrt = Stride::Rule(StrideRule::Sqrt);
            vec![
                sparse_with(SparsePattern::Strided, Stride::Length(4)),
                sparse_with(SparsePattern::Fixed, Stride::Length(4)),
                sparse_with(SparsePattern::Strided, sqrt),
                sparse_with(SparsePattern::Fixed, sqrt),
            ]
        }
    }
}
