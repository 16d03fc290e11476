//! Stacks of layers: encoder (bidirectional), decoder (causal, optionally with cross-attention),
//! each with the final norm pre-norm stacks need.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Bool, Device, Tensor};
use efficient_attn::{
    Attention, AttentionCore, AttentionMode, CoreConfig, Extras, MhaCache, ProjectedContext,
    RotaryConfig, SharedParameter, SharedParameterSpec,
};

use crate::block::{LayerSpec, Norm, TransformerLayer};
use crate::config::{ModelConfigError, NormPlacement, StackConfig};

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
}

impl<C: AttentionCore + Module> Stack<C> {
    /// The sum of the layers' attention loss terms from their training forwards on `device`
    /// since the last call ([`AttentionCore::aux_loss`]: Routing's commitment loss); taken.
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.layers
            .iter()
            .flat_map(|l| {
                std::iter::once(&l.self_attention)
                    .chain(l.cross_attention.as_ref())
                    .filter_map(|a| a.aux_loss(device))
            })
            .reduce(|a, b| a.add(b))
    }

    /// This stack after optimiser step `step` (every layer's, [`TransformerLayer::at_step`]).
    pub fn at_step(mut self, step: usize) -> Self {
        self.layers = self.layers.into_iter().map(|l| l.at_step(step)).collect();
        self
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
        let layers = per_layer
            .iter()
            .enumerate()
            .map(|(i, attention)| {
                TransformerLayer::new(
                    LayerSpec {
                        stack: spec.config,
                        attention,
                        mode: spec.mode,
                        rotary: spec.rotary.clone(),
                        cross: spec.cross,
                        d_context: spec.d_context,
                    },
                    &format!("{}.layers[{i}]", spec.name),
                    device,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let c = spec.config;
        // One shared parameter for the layers that ask for one (they must agree on it).
        let mut shared: Option<(usize, SharedParameterSpec)> = None;
        for (i, attention) in per_layer.iter().enumerate() {
            match (attention.layer_shared(), &shared) {
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
        })
    }

    /// # Shapes
    /// - x: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    /// - extras: what the sequence carries (padding `[batch, seq]`, global tokens, grid, side
    ///   inputs); the stack adds its [`SharedParameter`] if it has one
    /// - `contexts`: one projected encoder output per layer (cross-attention), or empty
    pub fn forward(
        &self,
        mut x: Tensor<3>,
        extras: Extras,
        contexts: &[ProjectedContext],
    ) -> Tensor<3> {
        let mut extras = extras;
        if let Some(p) = &self.shared_projection {
            extras.side.insert(SharedParameter(p.val()));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &extras, contexts.get(i));
        }
        self.finish(x)
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
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            x = layer.forward_step(x, cache, contexts.get(i));
        }
        self.finish(x)
    }

    fn finish(&self, x: Tensor<3>) -> Tensor<3> {
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
            .map(|l| l.self_attention.init_cache(batch, max_len, device))
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
