//! Stacks of layers: encoder (bidirectional), decoder (causal, optionally with cross-attention),
//! each with the final norm pre-norm stacks need.

use burn::module::{Module, ModuleDisplay, Param};
use burn::nn::Initializer;
use burn::tensor::{Bool, Device, Tensor};
use efficient_attn::{
    Attention, AttentionCore, AttentionMode, CoreConfig, Extras, HeadDims, MhaCache,
    ProjectedContext, RotaryConfig, SharedParameter, SharedParameterSpec,
};

use crate::block::{FeedForwardBlock, LayerSpec, Norm, TransformerLayer};
use crate::config::{ModelConfigError, NormPlacement, StackConfig};
use crate::funnel::FunnelConfig;
use crate::mixture_of_experts::AuxTerms;
use crate::reversible::ReversibleTape;

/// A stack of [`TransformerLayer`]s over the attention core `C` ([`Attention`] by default).
#[derive(Module, Debug)]
pub struct Stack<C = Attention> {
    /// The layers.
    pub layers: Vec<TransformerLayer<C>>,
    /// Norm after the last layer (pre-norm stacks only).
    pub final_norm: Option<Norm>,
    /// A parameter every layer shares (Linformer's layerwise projection), owned here so it is
    /// one parameter trained once, and passed to every layer as a [`SharedParameter`]. (The
    /// field keeps its first name so that checkpoints stay loadable.)
    pub shared_projection: Option<Param<Tensor<2>>>,
    #[module(skip)]
    wiring: Wiring,
}

/// How a stack's layers are connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wiring {
    /// One after another, each layer's residual branches on one stream.
    #[default]
    Sequential,
    /// Reversible blocks on two streams ([`crate::reversible`]); `step` (the optimiser step)
    /// seeds the dropout each block replays.
    Reversible {
        /// The optimiser step this stack is at.
        step: usize,
    },
}

/// How a stack is built.
pub struct StackSpec<'a, A = efficient_attn::AttentionConfig> {
    /// Its configuration.
    pub config: &'a StackConfig<A>,
    /// `encoder` or `decoder`, for error paths.
    pub name: &'static str,
    /// Self-attention mode of every layer.
    pub mode: AttentionMode,
    /// Rotary positions, if the model uses them.
    pub rotary: Option<RotaryConfig>,
    /// Cross-attention to an encoder (decoders of encoder-decoder models).
    pub cross: Option<&'a A>,
    /// Width of the encoder output cross-attention reads.
    pub d_context: usize,
    /// Funnel pooling (encoders): the first layer of every block after the first is built in
    /// cross mode, its pooled queries attending to the unpooled sequence
    /// ([`crate::FunnelConfig`]).
    pub funnel: Option<&'a FunnelConfig<A>>,
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> Stack<C> {
    /// The sum of the layers' loss terms from their training forwards on `device` since the
    /// last call, taken ([`aux_terms`](Self::aux_terms)`.loss`).
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.aux_terms(device).loss
    }

    /// The layers' extra terms from their training forwards on `device` since the last call,
    /// taken: attention loss terms ([`AttentionCore::aux_loss`]: Routing's commitment loss),
    /// each mixture-of-experts layer's own balance and z losses (per layer, then summed over
    /// layers) and its routing numbers.
    pub fn aux_terms(&self, device: &Device) -> AuxTerms {
        let mut routing = Vec::new();
        let loss = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let attention = std::iter::once(&l.self_attention)
                    .chain(l.cross_attention.as_ref())
                    .filter_map(|a| a.aux_loss(device));
                let experts = match &l.feed_forward {
                    FeedForwardBlock::Experts(m) => m.take_reports(device),
                    FeedForwardBlock::Dense(_) => Vec::new(),
                };
                routing.extend(experts.iter().map(|r| r.summary(i)));
                attention
                    .chain(experts.into_iter().map(|r| r.balance_loss + r.z_loss))
                    .collect::<Vec<_>>()
            })
            .reduce(|a, b| a.add(b));
        AuxTerms { loss, routing }
    }

    /// This stack after optimiser step `step` (every layer's, [`TransformerLayer::at_step`]).
    pub fn at_step(mut self, step: usize) -> Self {
        self.layers = self.layers.into_iter().map(|l| l.at_step(step)).collect();
        if let Wiring::Reversible { .. } = self.wiring {
            self.wiring = Wiring::Reversible { step };
        }
        self
    }

    /// How the layers are connected (`reversible` in the stack's configuration).
    pub fn wiring(&self) -> Wiring {
        self.wiring
    }

    /// The optimiser step a reversible stack is at (0 for a sequential one).
    pub(crate) fn step(&self) -> usize {
        match self.wiring {
            Wiring::Reversible { step } => step,
            Wiring::Sequential => 0,
        }
    }

    /// Layer `l`'s attention loss terms since the last call (see [`aux_loss`](Self::aux_loss)).
    pub(crate) fn layer_aux_loss(&self, l: usize, device: &Device) -> Option<Tensor<1>> {
        self.layers[l].self_attention.aux_loss(device)
    }

    /// `extras` with this stack's [`SharedParameter`], if it has one.
    pub fn extras_with_shared(&self, mut extras: Extras) -> Extras {
        if let Some(p) = &self.shared_projection {
            extras.side.insert(SharedParameter(p.val()));
        }
        extras
    }

    /// Builds the stack; a variant without the stack's mode is an error naming the layer.
    pub fn new<A: CoreConfig<Core = C>>(
        spec: StackSpec<'_, A>,
        device: &Device,
    ) -> Result<Self, ModelConfigError> {
        let per_layer = spec.config.check(spec.name, spec.mode)?;
        if let Some(cross) = spec.cross
            && !cross.info().supports(AttentionMode::Cross)
        {
            return Err(ModelConfigError::new(
                format!("{}.cross_attention", spec.name),
                format!("attention kind \"{}\" has no cross mode", cross.info().kind),
            ));
        }
        let c = spec.config;
        let pool_layers = match spec.funnel {
            Some(funnel) => {
                funnel.check("funnel", c)?;
                if c.reversible {
                    return Err(ModelConfigError::new(
                        format!("{}.reversible", spec.name),
                        "reversible = false with a funnel (a pooling layer changes the \
                         sequence length, which a reversible block cannot invert)",
                    ));
                }
                if spec.rotary.is_some() {
                    return Err(ModelConfigError::new(
                        "embedding.positions",
                        "learned or sinusoidal positions with a funnel: a pooled position has \
                         no integer position to rotate by",
                    ));
                }
                funnel.pool_layers()
            }
            None => Vec::new(),
        };
        let layers = per_layer
            .iter()
            .enumerate()
            .map(|(i, attention)| {
                let path = format!("{}.layers[{i}]", spec.name);
                let pooling = pool_layers.contains(&i);
                let attention = match spec.funnel {
                    Some(funnel) => funnel.layer_attention(i, attention),
                    None => attention,
                };
                TransformerLayer::new(
                    LayerSpec {
                        stack: spec.config,
                        // Each layer draws its own random state (rotations, features, noise).
                        attention: &attention.for_layer(i),
                        mode: if pooling {
                            AttentionMode::Cross
                        } else {
                            spec.mode
                        },
                        rotary: spec.rotary.clone(),
                        cross: spec.cross,
                        d_context: spec.d_context,
                    },
                    &path,
                    device,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        if c.reversible && spec.cross.is_some() {
            return Err(ModelConfigError::new(
                format!("{}.reversible", spec.name),
                "a stack without cross-attention (a reversible block has two residual \
                 branches, attention and feed-forward; a decoder layer with cross-attention \
                 has three)",
            ));
        }
        // One shared parameter for the layers that ask for one (they must agree on it).
        let mut shared: Option<(usize, SharedParameterSpec)> = None;
        for (i, attention) in per_layer.iter().enumerate() {
            let dims = HeadDims::new(c.n_heads, c.d_model / c.n_heads.max(1));
            match (attention.layer_shared(dims), &shared) {
                (Some(want), None) => shared = Some((i, want)),
                (Some(want), Some((first, have))) if want != *have => {
                    return Err(ModelConfigError::new(
                        format!("{}.layers[{i}].attention", spec.name),
                        format!(
                            "layers that share a parameter must agree on it: layer {first} has shape {:?}, this one {:?}",
                            have.shape, want.shape
                        ),
                    ));
                }
                _ => {}
            }
        }
        let shared_projection = shared.map(|(_, spec)| {
            Initializer::Uniform {
                min: -spec.bound,
                max: spec.bound,
            }
            .init(spec.shape, device)
        });
        Ok(Self {
            layers,
            final_norm: (c.placement == NormPlacement::Pre)
                .then(|| Norm::new(c.norm, c.d_model, c.norm_eps, device)),
            shared_projection,
            wiring: if c.reversible {
                Wiring::Reversible { step: 0 }
            } else {
                Wiring::Sequential
            },
        })
    }

    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    /// - extras: what the sequence carries (padding `[batch, seq]`, global tokens, grid, side
    ///   inputs); the stack adds its [`SharedParameter`] if it has one
    /// - `contexts`: one projected encoder output per layer (cross-attention), or empty
    ///
    /// A reversible stack ([`Wiring::Reversible`]) given a [`ReversibleTape`] in
    /// `extras.side` on an autodiff device stores no activations; see [`crate::reversible`].
    pub fn forward(
        &self,
        mut x: Tensor<3>,
        extras: Extras,
        contexts: &[ProjectedContext],
    ) -> Tensor<3> {
        if let Wiring::Reversible { .. } = self.wiring {
            let tape = extras.side.get::<ReversibleTape>().cloned();
            return match tape {
                Some(tape) if x.device().is_autodiff() => {
                    self.finish(self.reversible_forward_taped(x, &extras, &tape))
                }
                _ => {
                    let extras = self.extras_with_shared(extras);
                    self.finish(self.reversible_forward(x, &extras))
                }
            };
        }
        let extras = self.extras_with_shared(extras);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &extras, contexts.get(i));
        }
        self.finish(x)
    }

    /// A causal stack over a segment after the positions each layer remembers (Transformer-XL's
    /// segment recurrence): layer `l` attends over `[memories[l]; its input]`. Returns the output
    /// and every layer's input, from which the caller makes the next segment's memories.
    /// `memories` is empty (no memory) or one tensor per layer.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`, memories: `[batch, m, d_model]` each
    /// - output: `[batch, seq, d_model]`, and `n_layers` inputs `[batch, seq, d_model]`
    ///
    /// # Panics
    /// On a reversible stack (a block's two halves have no single input to remember), or with
    /// a memory per layer that is neither none nor one each.
    pub fn forward_with_memory(
        &self,
        mut x: Tensor<3>,
        extras: Extras,
        memories: &[Tensor<3>],
    ) -> (Tensor<3>, Vec<Tensor<3>>) {
        assert!(
            matches!(self.wiring, Wiring::Sequential),
            "segment memories need a sequential stack: a reversible block's halves have no single input to remember"
        );
        assert!(
            memories.is_empty() || memories.len() == self.layers.len(),
            "{} memories for {} layers",
            memories.len(),
            self.layers.len()
        );
        let extras = self.extras_with_shared(extras);
        let mut inputs = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            inputs.push(x.clone());
            x = match memories.get(i) {
                Some(m) if m.dims()[1] > 0 => layer.forward_with_memory(x, &extras, m.clone()),
                _ => layer.forward(x, &extras, None),
            };
        }
        (self.finish(x), inputs)
    }

    /// Incremental decoding of `t` new positions (causal stacks).
    ///
    /// # Shapes
    /// - x: `[batch, t, d_model]` → `[batch, t, d_model]`
    pub fn forward_step(
        &self,
        mut x: Tensor<3>,
        caches: &mut [MhaCache],
        contexts: &[ProjectedContext],
    ) -> Tensor<3> {
        if let Wiring::Reversible { .. } = self.wiring {
            let mut pair = (x.clone(), x);
            for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
                let y1 = pair
                    .0
                    .add(layer.attention_residual_step(pair.1.clone(), cache));
                let y2 = pair.1.add(layer.feed_forward_residual(y1.clone(), None));
                pair = (y1, y2);
            }
            return self.finish(pair.0.add(pair.1).div_scalar(2.0));
        }
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            x = layer.forward_step(x, cache, contexts.get(i));
        }
        self.finish(x)
    }

    pub(crate) fn finish(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.final_norm {
            Some(norm) => norm.forward(x),
            None => x,
        }
    }

    /// One decoding cache per layer for up to `max_len` positions, or `None` if a layer's
    /// variant cannot decode incrementally.
    pub fn init_caches(
        &self,
        batch: usize,
        max_len: usize,
        device: &Device,
    ) -> Option<Vec<MhaCache>> {
        self.layers
            .iter()
            .map(|l| {
                let cache = l.self_attention.init_cache(batch, max_len, device)?;
                Some(match &self.shared_projection {
                    Some(p) => cache.with_side(SharedParameter(p.val())),
                    None => cache,
                })
            })
            .collect()
    }

    /// Projects an encoder output once for every layer's cross-attention.
    ///
    /// # Shapes
    /// - memory: `[batch, seq_src, d_model]`, mask_pad: `[batch, seq_src]`
    pub fn project_contexts(
        &self,
        memory: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
    ) -> Vec<ProjectedContext> {
        self.layers
            .iter()
            .filter_map(|l| l.cross_attention.as_ref())
            .map(|c| c.project_context(memory.clone(), mask_pad.clone()))
            .collect()
    }
}
