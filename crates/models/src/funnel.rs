//! Funnel-Transformer pooling (Dai et al. 2020, "Funnel-Transformer: Filtering out Sequential
//! Redundancy for Efficient Language Processing"): an encoder whose sequence shrinks between
//! blocks of layers.
//!
//! The encoder's layers are grouped into blocks (`blocks`, the paper's B6-6-6). Before every
//! block but the first, the sequence is **pooled**: strided mean (or max) pooling over windows
//! of `stride` positions. The block's first layer is *pool-query-only*: its queries are the
//! pooled sequence, its keys and values the unpooled one, and its residual branch starts from
//! the pooled sequence (`h ← h' + Attention(Q = h', KV = h)`, `h' = Pool(h)`, normalised as
//! the stack places its norms); every later layer of the block attends within the pooled
//! sequence. With 3 blocks and stride 2 the last block runs on a quarter of the tokens, so
//! every layer after the first block costs `1 / stride^b` of an unpooled one; the pooling
//! layer is a cross-attention from `n / stride` queries to `n` keys, as cheap as its attention
//! kind makes it (it must have a cross mode: `full`, `memory-efficient`, `linear-transformer`,
//! `performer`, `sinkhorn`; `pool_attention` chooses another kind for these layers than the
//! stack's).
//!
//! For token-level outputs, the **up-sampling path** repeats every vector of the last block
//! `stride^(blocks − 1)` times, adds the first block's output (the paper's residual that
//! restores token detail) and runs `upsample_layers` more full-length layers (the paper's
//! 2-layer decoder).
//!
//! Padding: a window's mean is over its real positions only, and a pooled position is padding
//! only when its whole window is, so a padded batch gives each sequence what it gets alone
//! (tested). Global tokens follow their windows (a pooled position is global when a position
//! it pools is); with `separate_cls` the first position (the CLS token) is never pooled,
//! which keeps a CLS prefix a prefix of one.
//!
//! Cost: blocks of sizes `L₁, …, L_K` over `n` tokens cost as `L₁` layers at `n`, then
//! `L_b − 1` layers at `n / stride^(b−1)` and one pooling layer (queries `n / stride^(b−1)`,
//! keys `n / stride^(b−2)`). Activation memory shrinks the same way (measured in
//! `docs/funnel.md`).
//!
//! Deviations from the paper: positions are the embedding's (learned or sinusoidal, added
//! once), not the paper's relative attention re-derived for every pooled resolution;
//! rotary positions are a configuration error (a pooled position has no integer position);
//! the paper's `truncate_seq` (dropping the last token so that lengths stay powers of two) is
//! replaced by ceil-mode windows (the last window may be shorter); 2-D layouts are not pooled
//! (a grid is dropped after the first block).

use burn::module::{Module, ModuleDisplay};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::Tensor;
use efficient_attn::{AttentionCore, AttentionMode, CoreConfig, Extras, GlobalTokens};

use crate::config::{ModelConfigError, StackConfig};
use crate::stack::Stack;

/// How a window of positions becomes one pooled position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum FunnelPool {
    /// The mean over the window's real positions (the paper's choice).
    #[default]
    Mean,
    /// The per-channel maximum over the window's real positions.
    Max,
}

/// Configuration of a funnel encoder (`[model.funnel]`), with the paper's defaults.
///
/// `A` configures attention, as in [`StackConfig`](crate::StackConfig).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "burn::serde",
    default,
    deny_unknown_fields,
    bound(deserialize = "A: Deserialize<'de>")
)]
pub struct FunnelConfig<A = efficient_attn::AttentionConfig> {
    /// Layers per block; their sum is the stack's `n_layers` (paper: B6-6-6, `[6, 6, 6]`).
    pub blocks: Vec<usize>,
    /// Pooling window and stride between blocks (paper: 2).
    pub stride: usize,
    /// Mean or max pooling (paper: mean).
    pub pool: FunnelPool,
    /// Keep the first position (CLS) out of pooling (paper: yes, "separate `[cls]`").
    pub separate_cls: bool,
    /// Full-length layers after up-sampling, for token-level outputs; 0: no up-sampling path
    /// (sequence-level outputs only). Paper: 2.
    pub upsample_layers: usize,
    /// The attention of the pooling layers (the first layer of every block after the first);
    /// none: the stack's. It needs a cross mode.
    pub pool_attention: Option<A>,
}

impl<A> Default for FunnelConfig<A> {
    fn default() -> Self {
        Self {
            blocks: vec![6, 6, 6],
            stride: 2,
            pool: FunnelPool::Mean,
            separate_cls: true,
            upsample_layers: 0,
            pool_attention: None,
        }
    }
}

impl<A: CoreConfig> FunnelConfig<A> {
    /// Checks the configuration against the stack it pools: the blocks cover its layers, and
    /// every pooling layer's attention has a cross mode. Errors name the key under `path`
    /// (e.g. `funnel`).
    pub fn check(&self, path: &str, stack: &StackConfig<A>) -> Result<(), ModelConfigError> {
        self.check_blocks(path, stack.n_layers)?;
        let per_layer = stack.resolve_attention("stack")?;
        for i in self.pool_layers() {
            let attention = self.pool_attention.as_ref().unwrap_or(&per_layer[i]);
            if !attention.info().supports(AttentionMode::Cross) {
                return Err(ModelConfigError::new(
                    format!("{path}.pool_attention"),
                    format!(
                        "layer {i} pools the queries, so its attention needs a cross mode \
                         (pooled queries, unpooled keys) and attention kind \"{}\" has none; \
                         set pool_attention to a kind that has one, e.g. \
                         {{ kind = \"memory-efficient\" }}",
                        attention.info().kind
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The attention of layer `i` given the stack's `attention` for it: `pool_attention` for
    /// a pooling layer that has one.
    pub(crate) fn layer_attention<'a>(&'a self, i: usize, attention: &'a A) -> &'a A {
        match &self.pool_attention {
            Some(pool) if self.pool_layers().contains(&i) => pool,
            _ => attention,
        }
    }
}

impl<A> FunnelConfig<A> {
    /// Checks that the blocks cover `n_layers` layers and the stride is positive.
    fn check_blocks(&self, path: &str, n_layers: usize) -> Result<(), ModelConfigError> {
        if self.blocks.is_empty() || self.blocks.contains(&0) {
            return Err(ModelConfigError::new(
                format!("{path}.blocks"),
                format!(
                    "a list of positive layer counts, one per block, got {:?}",
                    self.blocks
                ),
            ));
        }
        let sum: usize = self.blocks.iter().sum();
        if sum != n_layers {
            return Err(ModelConfigError::new(
                format!("{path}.blocks"),
                format!(
                    "{:?} sums to {sum} layers, but the stack has n_layers = {n_layers}",
                    self.blocks
                ),
            ));
        }
        if self.stride == 0 {
            return Err(ModelConfigError::new(
                format!("{path}.stride"),
                "a positive integer (paper: 2)",
            ));
        }
        Ok(())
    }

    /// The index of each pooling layer (the first of every block after the first).
    pub fn pool_layers(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .scan(0, |start, &n| {
                let first = *start;
                *start += n;
                Some(first)
            })
            .skip(1)
            .collect()
    }

    /// The plan a built encoder keeps (everything but the attention).
    pub(crate) fn plan(&self) -> FunnelPlan {
        FunnelPlan {
            blocks: self.blocks.clone(),
            stride: self.stride,
            pool: self.pool,
            separate_cls: self.separate_cls,
        }
    }
}

/// What a built funnel encoder needs to run: block sizes and pooling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunnelPlan {
    /// Layers per block.
    pub blocks: Vec<usize>,
    /// Pooling window and stride.
    pub stride: usize,
    /// Mean or max.
    pub pool: FunnelPool,
    /// The first position is never pooled.
    pub separate_cls: bool,
}

impl FunnelPlan {
    /// The length of a sequence of `n` positions after one pooling.
    pub fn pooled_len(&self, n: usize) -> usize {
        let s = usize::from(self.separate_cls).min(n);
        s + (n - s).div_ceil(self.stride)
    }

    /// Pools a sequence and what it carries: padding, global tokens and side inputs (a grid
    /// is dropped).
    ///
    /// # Shapes
    /// - x: `[batch, n, d]` → `[batch, pooled_len(n), d]`
    pub fn pool(&self, x: Tensor<3>, extras: &Extras) -> (Tensor<3>, Extras) {
        let [b, n, d] = x.dims();
        let s = usize::from(self.separate_cls).min(n);
        let rest = n - s;
        let m = rest.div_ceil(self.stride);
        let device = x.device();
        // Which positions are real: [batch, n], padded with zeros to s + m·stride.
        let real = match &extras.mask_pad {
            Some(mask) => mask.clone().bool_not().float(),
            None => Tensor::ones([b, n], &device),
        };
        let tail = s + m * self.stride - n;
        let widen = |t: Tensor<3>| {
            if tail == 0 {
                t
            } else {
                let [b, _, d] = t.dims();
                Tensor::cat(vec![t, Tensor::zeros([b, tail, d], &device)], 1)
            }
        };
        let windows = |t: Tensor<3>| {
            let [b, _, d] = t.dims();
            widen(t.narrow(1, s, rest)).reshape([b, m, self.stride, d])
        };
        let keep = windows(real.clone().reshape([b, n, 1])); // [b, m, stride, 1]
        let count = keep.clone().sum_dim(2); // [b, m, 1, 1]
        let pooled = match self.pool {
            FunnelPool::Mean => windows(x.clone())
                .mul(keep.clone())
                .sum_dim(2)
                .div(count.clone().clamp_min(1.0)),
            FunnelPool::Max => {
                // Padded positions lose every comparison; an all-padding window gives 0.
                let masked = windows(x.clone()).add(keep.clone().sub_scalar(1.0).mul_scalar(1e30));
                masked.max_dim(2).mul(count.clone().clamp_max(1.0))
            }
        }
        .reshape([b, m, d]);
        let pooled = if s > 0 {
            Tensor::cat(vec![x.narrow(1, 0, s), pooled], 1)
        } else {
            pooled
        };
        let pooled_pad = extras.mask_pad.as_ref().map(|mask| {
            let empty = count.reshape([b, m]).equal_elem(0.0);
            if s > 0 {
                Tensor::cat(vec![mask.clone().narrow(1, 0, s), empty], 1)
            } else {
                empty
            }
        });
        let global = extras.global.as_ref().map(|g| self.pool_global(g, b, n));
        let out = Extras {
            mask_pad: pooled_pad,
            global,
            grid: None,
            side: extras.side.clone(),
        };
        (pooled, out)
    }

    /// Global tokens after pooling: a pooled position is global when a position of its window
    /// is.
    fn pool_global(&self, global: &GlobalTokens, batch: usize, n: usize) -> GlobalTokens {
        let s = usize::from(self.separate_cls).min(n);
        let to_pooled = |i: usize| if i < s { i } else { s + (i - s) / self.stride };
        match global {
            GlobalTokens::Prefix(k) => {
                let k = (*k).min(n);
                GlobalTokens::Prefix(if k <= s { k } else { to_pooled(k - 1) + 1 })
            }
            GlobalTokens::Positions(p) => {
                let mut p: Vec<usize> = p.iter().map(|&i| to_pooled(i)).collect();
                p.sort_unstable();
                p.dedup();
                GlobalTokens::Positions(p)
            }
            GlobalTokens::Mask(mask) => {
                let flags = mask.clone().float().reshape([batch, n, 1]);
                let extras = Extras::new();
                let plan = FunnelPlan {
                    pool: FunnelPool::Max,
                    ..self.clone()
                };
                let (pooled, _) = plan.pool(flags, &extras);
                let m = pooled.dims()[1];
                GlobalTokens::Mask(pooled.reshape([batch, m]).greater_elem(0.5))
            }
        }
    }

    /// Repeats every pooled vector back to `n` positions (the first stays first with
    /// `separate_cls`), after `pools` poolings.
    ///
    /// # Shapes
    /// - x: `[batch, m, d]` → `[batch, n, d]`
    pub fn upsample(&self, x: Tensor<3>, n: usize, pools: usize) -> Tensor<3> {
        let [b, m, d] = x.dims();
        let s = usize::from(self.separate_cls).min(n).min(m);
        let factor = self.stride.pow(pools as u32);
        let rest = x.clone().narrow(1, s, m - s);
        let repeated = rest
            .reshape([b, m - s, 1, d])
            .repeat_dim(2, factor)
            .reshape([b, (m - s) * factor, d])
            .narrow(1, 0, n - s);
        if s > 0 {
            Tensor::cat(vec![x.narrow(1, 0, s), repeated], 1)
        } else {
            repeated
        }
    }
}

/// A funnel stack's output.
pub(crate) struct Funneled {
    /// The last block's output (after the stack's final norm), `[batch, m, d]`.
    pub output: Tensor<3>,
    /// What the last block's sequence carries (its padding `[batch, m]`).
    pub extras: Extras,
    /// The first block's output and extras (the up-sampling path's residual).
    pub first: (Tensor<3>, Extras),
}

impl FunnelPlan {
    /// Runs `stack` block by block, pooling before every block after the first.
    ///
    /// # Shapes
    /// - x: `[batch, n, d]` → output `[batch, m, d]`, m = n pooled `blocks − 1` times
    pub(crate) fn run<C: AttentionCore + Module + ModuleDisplay + 'static>(
        &self,
        stack: &Stack<C>,
        mut x: Tensor<3>,
        extras: Extras,
    ) -> Funneled {
        let mut extras = stack.extras_with_shared(extras);
        let mut layers = stack.layers.iter();
        let mut first = None;
        for (b, &n_layers) in self.blocks.iter().enumerate() {
            for j in 0..n_layers {
                let layer = layers.next().expect("blocks sum to the stack's layers");
                if b > 0 && j == 0 {
                    let (pooled, pooled_extras) = self.pool(x.clone(), &extras);
                    x = layer.forward_pooled(pooled, x, &pooled_extras, extras.mask_pad.clone());
                    extras = pooled_extras;
                } else {
                    x = layer.forward(x, &extras, None);
                }
            }
            if b == 0 {
                first = Some((x.clone(), extras.clone()));
            }
        }
        Funneled {
            output: stack.finish(x),
            extras,
            first: first.expect("at least one block"),
        }
    }
}
