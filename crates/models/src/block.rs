//! The pieces of a transformer layer: normalisation, feed-forward, and the encoder and decoder
//! layers that combine them with attention from `efficient-attn`.

use burn::module::{Module, ModuleDisplay, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::{gelu, relu, silu};
use burn::tensor::module::layer_norm;
use burn::tensor::{Bool, Device, Tensor};
use efficient_attn::{
    Attention, AttentionCore, AttentionMode, CoreConfig, Extras, FeedForwardActivation, MhaCache,
    MhaInput, MultiHeadAttention, ProjectedContext, RotaryConfig, WithExtras, fused_feed_forward,
    fused_layer_norm, mix_seed, runs_fused, seeded_dropout,
};

use crate::config::{FeedForwardKind, ModelConfigError, NormKind, NormPlacement, StackConfig};
use crate::mixture_of_experts::MixtureOfExperts;

/// Layer normalisation over the last axis, `(x - mean)/√(var + eps)·γ + β`, with the fields and
/// record layout of Burn's `LayerNorm` (`gamma`, `beta`): on Flex one fused operation with its
/// own backward ([`fused_layer_norm`]), elsewhere Burn's `layer_norm`.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale γ (ones at initialisation).
    pub gamma: Param<Tensor<1>>,
    /// Shift β (zeros at initialisation).
    pub beta: Option<Param<Tensor<1>>>,
    /// Added to the variance.
    epsilon: f64,
}

impl LayerNorm {
    /// A norm of width `d_model` with a shift, as Burn's `LayerNormConfig::new(d_model)`.
    pub fn new(d_model: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            gamma: Initializer::Ones.init([d_model], device),
            beta: Some(Initializer::Zeros.init([d_model], device)),
            epsilon,
        }
    }

    /// # Shapes
    /// - x: `[..., d_model]` → `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let beta = self.beta.as_ref().map(|b| b.val());
        if runs_fused(&x) {
            fused_layer_norm(x, self.gamma.val(), beta, self.epsilon)
        } else {
            layer_norm(x, self.gamma.val(), beta, self.epsilon)
        }
    }
}

/// LayerNorm or RMSNorm.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Norm {
    /// LayerNorm.
    Layer(LayerNorm),
    /// RMSNorm.
    Rms(RmsNorm),
}

impl Norm {
    /// A norm of width `d_model`.
    pub fn new(kind: NormKind, d_model: usize, eps: f64, device: &Device) -> Self {
        match kind {
            NormKind::LayerNorm => Self::Layer(LayerNorm::new(d_model, eps, device)),
            NormKind::RmsNorm => {
                Self::Rms(RmsNormConfig::new(d_model).with_epsilon(eps).init(device))
            }
        }
    }

    /// # Shapes
    /// - x: `[..., d_model]` → `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Layer(n) => n.forward(x),
            Self::Rms(n) => n.forward(x),
        }
    }
}

/// The position-wise feed-forward block: `W₂ act(W₁ x)` or SwiGLU `W₂ (SiLU(W₁ x) ⊙ W₃ x)`.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// W₁.
    pub linear_inner: Linear,
    /// W₃ (the gate's value branch), for SwiGLU only.
    pub linear_gate: Option<Linear>,
    /// W₂.
    pub linear_outer: Linear,
    /// Dropout after the activation.
    pub dropout: Dropout,
    #[module(skip)]
    kind: FeedForwardKind,
    chunks: usize,
}

impl FeedForward {
    /// A block `d_model → d_ff → d_model`.
    pub fn new(
        kind: FeedForwardKind,
        d_model: usize,
        d_ff: usize,
        dropout: f64,
        device: &Device,
    ) -> Self {
        Self {
            linear_inner: LinearConfig::new(d_model, d_ff).init(device),
            linear_gate: (kind == FeedForwardKind::Swiglu)
                .then(|| LinearConfig::new(d_model, d_ff).init(device)),
            linear_outer: LinearConfig::new(d_ff, d_model).init(device),
            dropout: DropoutConfig::new(dropout).init(),
            kind,
            chunks: 1,
        }
    }

    /// This block applied to `chunks` pieces of the sequence one after another (Reformer's
    /// chunked feed-forward: the same result, a `[seq / chunks, d_ff]` intermediate).
    pub fn with_chunks(mut self, chunks: usize) -> Self {
        self.chunks = chunks.max(1);
        self
    }

    /// On Flex, GELU and ReLU blocks run as one fused operation with its own backward
    /// ([`fused_feed_forward`]); elsewhere (and for SwiGLU) as [`forward_composed`](Self::forward_composed).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_seeded(x, None)
    }

    /// [`forward`](Self::forward) with the dropout mask drawn from `seed` (chunk `i` from a
    /// seed derived from it), the same on every call ([`seeded_dropout`]); `None` draws from
    /// the device's generator.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn forward_seeded(&self, x: Tensor<3>, seed: Option<u64>) -> Tensor<3> {
        let n = x.dims()[1];
        if self.chunks > 1 && n > 1 {
            let size = n.div_ceil(self.chunks.min(n));
            let pieces: Vec<Tensor<3>> = (0..n)
                .step_by(size)
                .map(|start| {
                    let chunk_seed = seed.map(|s| mix_seed(s, start as u64));
                    self.forward_whole(x.clone().narrow(1, start, size.min(n - start)), chunk_seed)
                })
                .collect();
            return Tensor::cat(pieces, 1);
        }
        self.forward_whole(x, seed)
    }

    fn forward_whole(&self, x: Tensor<3>, seed: Option<u64>) -> Tensor<3> {
        let activation = match self.kind {
            FeedForwardKind::Gelu => Some(FeedForwardActivation::Gelu),
            FeedForwardKind::Relu => Some(FeedForwardActivation::Relu),
            FeedForwardKind::Swiglu => None,
        };
        match activation {
            Some(activation) if runs_fused(&x) => {
                let [b, n, _] = x.dims();
                let d_ff = self.linear_inner.weight.dims()[1];
                // Burn's dropout, applied to ones, is the mask (ones when it is inactive).
                let mask = (self.dropout.prob > 0.0 && x.device().is_autodiff()).then(|| {
                    seeded_dropout(&self.dropout, Tensor::ones([b, n, d_ff], &x.device()), seed)
                });
                fused_feed_forward(
                    x,
                    self.linear_inner.weight.val(),
                    self.linear_inner.bias.as_ref().map(|b| b.val()),
                    self.linear_outer.weight.val(),
                    self.linear_outer.bias.as_ref().map(|b| b.val()),
                    mask,
                    activation,
                )
            }
            _ => self.composed(x, seed),
        }
    }

    /// The block as Burn tensor operations: what runs off Flex, and the oracle of the fused
    /// operation.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn forward_composed(&self, x: Tensor<3>) -> Tensor<3> {
        self.composed(x, None)
    }

    fn composed(&self, x: Tensor<3>, seed: Option<u64>) -> Tensor<3> {
        let h = self.linear_inner.forward(x.clone());
        let h = match (self.kind, &self.linear_gate) {
            (FeedForwardKind::Gelu, _) => gelu(h),
            (FeedForwardKind::Relu, _) => relu(h),
            (FeedForwardKind::Swiglu, Some(gate)) => silu(h).mul(gate.forward(x)),
            (FeedForwardKind::Swiglu, None) => unreachable!("SwiGLU has a gate"),
        };
        self.linear_outer
            .forward(seeded_dropout(&self.dropout, h, seed))
    }
}

/// The position-wise block of a layer.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum FeedForwardBlock {
    /// One feed-forward network (`[model.stack.ffn] kind = "dense"`).
    Dense(FeedForward),
    /// A mixture of experts (`kind = "switch"` or `"top2"`).
    Experts(MixtureOfExperts),
}

impl FeedForwardBlock {
    /// The block on a segment (`causal`: a decoder's routing priority; `mask_pad`: tokens a
    /// mixture of experts does not route).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`, mask_pad: `[batch, seq]` → `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
        causal: bool,
    ) -> Tensor<3> {
        match self {
            Self::Dense(f) => f.forward(x),
            Self::Experts(m) => m.forward_recorded(x, mask_pad, causal),
        }
    }
}

/// Self-attention (+ optional cross-attention) + feed-forward, each a residual branch.
///
/// `C` is the attention core: [`Attention`] (any variant of `efficient-attn`, chosen from
/// configuration) by default, or your own [`AttentionCore`].
#[derive(Module, Debug)]
pub struct TransformerLayer<C = Attention> {
    /// Self-attention.
    pub self_attention: MultiHeadAttention<C>,
    /// Cross-attention to an encoder's output (encoder-decoder decoders only).
    pub cross_attention: Option<MultiHeadAttention<C>>,
    /// Feed-forward: one network, or a mixture of experts.
    pub feed_forward: FeedForwardBlock,
    /// Norm of the self-attention branch.
    pub norm_attention: Norm,
    /// Norm of the cross-attention branch.
    pub norm_cross: Option<Norm>,
    /// Norm of the feed-forward branch.
    pub norm_feed_forward: Norm,
    /// Dropout on the feed-forward output.
    pub dropout: Dropout,
    #[module(skip)]
    placement: NormPlacement,
}

/// Builds one layer.
pub(crate) struct LayerSpec<'a, A> {
    pub stack: &'a StackConfig<A>,
    pub attention: &'a A,
    pub mode: AttentionMode,
    pub rotary: Option<RotaryConfig>,
    pub cross: Option<&'a A>,
    pub d_context: usize,
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> TransformerLayer<C> {
    /// This layer after optimiser step `step` (its attention cores' per-step state,
    /// [`AttentionCore::at_step`]).
    pub fn at_step(mut self, step: usize) -> Self {
        self.self_attention = self.self_attention.at_step(step);
        self.cross_attention = self.cross_attention.map(|c| c.at_step(step));
        self
    }

    pub(crate) fn new<A: CoreConfig<Core = C>>(
        spec: LayerSpec<'_, A>,
        path: &str,
        device: &Device,
    ) -> Result<Self, ModelConfigError> {
        let s = spec.stack;
        let self_attention = s
            .attention_layer(spec.attention.clone(), spec.mode, spec.rotary.clone(), None)
            .init(device)
            .map_err(|e| ModelConfigError::attention(format!("{path}.attention"), e))?;
        let cross_attention = match spec.cross {
            Some(c) => Some(
                s.attention_layer(c.clone(), AttentionMode::Cross, None, Some(spec.d_context))
                    .init(device)
                    .map_err(|e| {
                        ModelConfigError::attention(format!("{path}.cross_attention"), e)
                    })?,
            ),
            None => None,
        };
        let norm = || Norm::new(s.norm, s.d_model, s.norm_eps, device);
        Ok(Self {
            self_attention,
            norm_cross: cross_attention.as_ref().map(|_| norm()),
            cross_attention,
            feed_forward: match s.ffn.experts() {
                None => FeedForwardBlock::Dense(
                    FeedForward::new(s.feed_forward, s.d_model, s.d_ff, s.dropout, device)
                        .with_chunks(s.ff_chunks),
                ),
                Some(moe) => FeedForwardBlock::Experts(moe.init(
                    s.feed_forward,
                    s.d_model,
                    s.d_ff,
                    s.dropout,
                    device,
                )),
            },
            norm_attention: norm(),
            norm_feed_forward: norm(),
            dropout: DropoutConfig::new(s.dropout).init(),
            placement: s.placement,
        })
    }

    /// One residual branch: pre-norm `x + f(norm(x))` or post-norm `norm(x + f(x))`.
    fn branch(
        &self,
        x: Tensor<3>,
        norm: &Norm,
        f: impl FnOnce(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        match self.placement {
            NormPlacement::Pre => x.clone().add(f(norm.forward(x))),
            NormPlacement::Post => norm.forward(x.clone().add(f(x))),
        }
    }

    fn feed_forward_branch(&self, x: Tensor<3>, mask_pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let causal = self.self_attention.core.mode() == AttentionMode::Causal;
        self.branch(x, &self.norm_feed_forward, |h| {
            self.dropout
                .forward(self.feed_forward.forward(h, mask_pad, causal))
        })
    }

    fn cross_branch(&self, x: Tensor<3>, context: Option<&ProjectedContext>) -> Tensor<3> {
        match (&self.cross_attention, &self.norm_cross, context) {
            (Some(cross), Some(norm), Some(context)) => {
                self.branch(x, norm, |h| cross.forward_context(h, context))
            }
            (Some(_), _, None) => {
                panic!("a decoder layer with cross-attention needs the encoder output")
            }
            _ => x,
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    /// - extras: what the sequence carries (padding `[batch, seq]`, global tokens, grid, side
    ///   inputs)
    pub fn forward(
        &self,
        x: Tensor<3>,
        extras: &Extras,
        context: Option<&ProjectedContext>,
    ) -> Tensor<3> {
        let x = self.branch(x, &self.norm_attention, |h| {
            self.self_attention
                .forward(MhaInput::self_attn(h).with_extras(extras.clone()))
        });
        let x = self.cross_branch(x, context);
        self.feed_forward_branch(x, extras.mask_pad.clone())
    }

    /// A funnel's pooling layer ([`crate::FunnelConfig`]): the queries and the residual
    /// stream are the pooled sequence, the keys and values the unpooled `source` (normalised
    /// like the queries in a pre-norm layer). The layer's attention is in cross mode.
    ///
    /// # Shapes
    /// - pooled: `[batch, m, d_model]`, source: `[batch, n, d_model]` → `[batch, m, d_model]`
    /// - extras: what the pooled sequence carries (padding `[batch, m]`); mask_pad_source:
    ///   `[batch, n]`
    pub fn forward_pooled(
        &self,
        pooled: Tensor<3>,
        source: Tensor<3>,
        extras: &Extras,
        mask_pad_source: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let source = self.attention_input(source);
        let x = self.branch(pooled, &self.norm_attention, |h| {
            let input = MhaInput::cross(h, source).with_extras(extras.clone());
            self.self_attention.forward(match mask_pad_source {
                Some(mask) => input.mask_pad_context(mask),
                None => input,
            })
        });
        self.feed_forward_branch(x, extras.mask_pad.clone())
    }

    /// [`forward`](Self::forward) with this layer's memory of earlier positions (its inputs
    /// over the previous segments; Transformer-XL): the self-attention's keys and values come
    /// from `[memory; x]` (normalised like `x` in a pre-norm layer), its queries from `x`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`, memory: `[batch, m, d_model]` → `[batch, seq, d_model]`
    pub fn forward_with_memory(
        &self,
        x: Tensor<3>,
        extras: &Extras,
        memory: Tensor<3>,
    ) -> Tensor<3> {
        let memory = self.attention_input(memory);
        let x = self.branch(x, &self.norm_attention, |h| {
            self.self_attention.forward(
                MhaInput::self_attn(h)
                    .with_extras(extras.clone())
                    .with_memory(memory),
            )
        });
        let x = self.cross_branch(x, None);
        self.feed_forward_branch(x, extras.mask_pad.clone())
    }

    /// What the self-attention reads of `x`: `norm(x)` in a pre-norm layer, `x` itself in a
    /// post-norm one (the memory of [`forward_with_memory`](Self::forward_with_memory)).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn attention_input(&self, x: Tensor<3>) -> Tensor<3> {
        match self.placement {
            NormPlacement::Pre => self.norm_attention.forward(x),
            NormPlacement::Post => x,
        }
    }

    /// The self-attention branch of a pre-norm layer without its residual:
    /// `attention(norm(x))`, the attention's output dropout included (`F` of a reversible
    /// block, [`crate::reversible`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub(crate) fn attention_residual(&self, x: Tensor<3>, extras: &Extras) -> Tensor<3> {
        self.self_attention.forward(
            MhaInput::self_attn(self.norm_attention.forward(x)).with_extras(extras.clone()),
        )
    }

    /// [`attention_residual`](Self::attention_residual) for `t` new positions given the
    /// layer's cache.
    ///
    /// # Shapes
    /// - x: `[batch, t, d_model]` → `[batch, t, d_model]`
    pub(crate) fn attention_residual_step(&self, x: Tensor<3>, cache: &mut MhaCache) -> Tensor<3> {
        self.self_attention
            .forward_step(self.norm_attention.forward(x), cache)
    }

    /// The feed-forward branch of a pre-norm layer without its residual:
    /// `dropout(feed_forward(norm(x)))` (`G` of a reversible block), its dropout masks drawn
    /// from `seed` if given ([`seeded_dropout`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub(crate) fn feed_forward_residual(&self, x: Tensor<3>, seed: Option<u64>) -> Tensor<3> {
        let h = self.norm_feed_forward.forward(x);
        let h = match &self.feed_forward {
            FeedForwardBlock::Dense(f) => f.forward_seeded(h, seed),
            FeedForwardBlock::Experts(_) => {
                panic!("a mixture of experts in a reversible stack (the configuration rejects it)")
            }
        };
        seeded_dropout(&self.dropout, h, seed.map(|s| mix_seed(s, u64::MAX)))
    }

    /// Incremental decoding: `t` new positions given the layer's cache.
    ///
    /// # Shapes
    /// - x: `[batch, t, d_model]` → `[batch, t, d_model]`
    pub fn forward_step(
        &self,
        x: Tensor<3>,
        cache: &mut MhaCache,
        context: Option<&ProjectedContext>,
    ) -> Tensor<3> {
        let x = self.branch(x, &self.norm_attention, |h| {
            self.self_attention.forward_step(h, cache)
        });
        let x = self.cross_branch(x, context);
        self.feed_forward_branch(x, None)
    }
}
