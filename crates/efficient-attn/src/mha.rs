//! The multi-head wrapper: projections, head split/merge and dropout around any
//! [`AttentionCore`], ours or yours.

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Linear, LinearConfig, RotaryEncoding, RotaryEncodingConfig,
};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::config::{Attention, AttentionConfig};
use crate::decoding::DecodeCache;
use crate::dropout::{DropoutSeed, seeded_dropout};
use crate::error::ConfigError;
use crate::extras::{Extras, GlobalHeads, Grid, SideInputs, SideValue, WithExtras};
use crate::interface::{AttentionCore, AttentionMode, AttnInput, CoreConfig, HeadDims};

/// Configuration of [`MultiHeadAttention`]. `A` is the attention's configuration: the
/// TOML-selectable [`AttentionConfig`] by default, or your own [`CoreConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct MultiHeadAttentionConfig<A = AttentionConfig> {
    /// Model width (paper: d_model = 512).
    pub d_model: usize,
    /// Number of heads (paper: h = 8).
    pub n_heads: usize,
    /// Per-head width; `None` = d_model / n_heads (paper: d_k = 64).
    pub d_k: Option<usize>,
    /// Width of the sequence keys and values come from in cross mode; `None` = d_model.
    pub d_context: Option<usize>,
    /// Dropout on the attention output (paper: P_drop = 0.1).
    pub dropout: f64,
    /// Whether the projections have biases.
    pub bias: bool,
    /// Mode the layer runs in.
    pub mode: AttentionMode,
    /// Rotary position embedding of queries and keys (RoFormer, Su et al. 2021,
    /// arXiv:2104.09864), applied after projection and before the core; `None` for none.
    pub rotary: Option<RotaryConfig>,
    /// The attention variant.
    pub attention: A,
}

/// Rotary position embedding settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct RotaryConfig {
    /// Base of the frequencies (paper: θ = 10000).
    pub theta: f64,
    /// Longest sequence (including decoded positions) the table covers.
    pub max_len: usize,
}

impl Default for RotaryConfig {
    fn default() -> Self {
        Self {
            theta: 10000.0,
            max_len: 4096,
        }
    }
}

impl<A: Default> Default for MultiHeadAttentionConfig<A> {
    fn default() -> Self {
        Self {
            d_model: 512,
            n_heads: 8,
            d_k: None,
            d_context: None,
            dropout: 0.1,
            bias: true,
            mode: AttentionMode::Bidirectional,
            rotary: None,
            attention: A::default(),
        }
    }
}

impl MultiHeadAttentionConfig {
    /// A layer of width `d_model` with `n_heads` heads, full attention and the paper's other
    /// defaults.
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        Self {
            d_model,
            n_heads,
            ..Default::default()
        }
    }

    /// Sets the attention variant.
    pub fn with_attention(mut self, attention: impl Into<AttentionConfig>) -> Self {
        self.attention = attention.into();
        self
    }
}

impl<A: CoreConfig> MultiHeadAttentionConfig<A> {
    /// The same layer with another attention: one of ours, or your own [`CoreConfig`].
    pub fn with_core<B: CoreConfig>(self, attention: B) -> MultiHeadAttentionConfig<B> {
        MultiHeadAttentionConfig {
            d_model: self.d_model,
            n_heads: self.n_heads,
            d_k: self.d_k,
            d_context: self.d_context,
            dropout: self.dropout,
            bias: self.bias,
            mode: self.mode,
            rotary: self.rotary,
            attention,
        }
    }

    /// Sets the mode.
    pub fn with_mode(mut self, mode: AttentionMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the dropout probability.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    /// The per-head width.
    pub fn head_dim(&self) -> usize {
        self.d_k.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Checks the layer's shape, dropout and rotary settings (not the attention's own fields,
    /// which [`CoreConfig::init`] checks): every model validates its layers through this.
    ///
    /// # Errors
    /// The field and what was expected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::check_nonzero("d_model", self.d_model)?;
        ConfigError::check_nonzero("n_heads", self.n_heads)?;
        if self.d_k.is_none() && !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ConfigError::InvalidField {
                field: "n_heads",
                expected: format!("a divisor of d_model = {} (or set d_k)", self.d_model),
                got: self.n_heads.to_string(),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::InvalidField {
                field: "dropout",
                expected: "a probability in [0, 1)".into(),
                got: self.dropout.to_string(),
            });
        }
        let d_k = self.head_dim();
        ConfigError::check_nonzero("d_k", d_k)?;
        match &self.rotary {
            Some(_) if self.mode == AttentionMode::Cross => {
                return Err(ConfigError::InvalidField {
                    field: "rotary",
                    expected: "no rotary embedding in cross mode (queries and keys come from different sequences)".into(),
                    got: "a rotary table".into(),
                });
            }
            Some(_) if d_k % 2 == 1 => {
                return Err(ConfigError::InvalidField {
                    field: "rotary",
                    expected: "an even head width for rotary embeddings".into(),
                    got: format!("d_k = {d_k}"),
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// Builds the layer.
    ///
    /// # Errors
    /// An invalid layer ([`validate`](Self::validate)) or attention configuration.
    pub fn init(&self, device: &Device) -> Result<MultiHeadAttention<A::Core>, ConfigError> {
        self.validate()?;
        let d_k = self.head_dim();
        let rotary = self.rotary.as_ref().map(|r| {
            RotaryEncodingConfig::new(r.max_len, d_k)
                .with_theta(r.theta as f32)
                .init(device)
        });
        let inner = d_k * self.n_heads;
        let d_context = self.d_context.unwrap_or(self.d_model);
        let linear = |d_in, d_out| {
            LinearConfig::new(d_in, d_out)
                .with_bias(self.bias)
                .init(device)
        };
        Ok(MultiHeadAttention {
            query: linear(self.d_model, inner),
            key: (!self.attention.shared_qk()).then(|| linear(d_context, inner)),
            value: linear(d_context, inner),
            output: linear(inner, self.d_model),
            dropout: DropoutConfig::new(self.dropout).init(),
            core: self
                .attention
                .init(self.mode, HeadDims::new(self.n_heads, d_k), device)?,
            global: self
                .attention
                .global_projections()
                .then(|| GlobalProjections {
                    query: linear(self.d_model, inner),
                    key: linear(self.d_model, inner),
                    value: linear(self.d_model, inner),
                }),
            rotary,
            n_heads: self.n_heads,
            d_k,
        })
    }
}

/// Multi-head attention with any core: one of ours ([`Attention`], the default) or your own
/// [`AttentionCore`].
///
/// `x → (Q, K, V) = (x W_q, c W_k, c W_v)` split into heads, attended by the core, merged and
/// projected by `W_o`, then dropout; `c = x` except in cross mode.
#[derive(Module, Debug)]
pub struct MultiHeadAttention<C = Attention> {
    /// Query projection.
    pub query: Linear,
    /// Key projection; `None` for a core that reads the queries as keys
    /// ([`CoreConfig::shared_qk`]: Reformer).
    pub key: Option<Linear>,
    /// Value projection.
    pub value: Linear,
    /// Output projection.
    pub output: Linear,
    /// Dropout on the attention output.
    pub dropout: Dropout,
    /// The attention core.
    pub core: C,
    /// Rotary position table, if configured.
    pub rotary: Option<RotaryEncoding>,
    /// Separate projections for global tokens (Longformer), if the variant asks for them.
    pub global: Option<GlobalProjections>,
    n_heads: usize,
    d_k: usize,
}

/// The query, key and value projections used for global tokens.
#[derive(Module, Debug)]
pub struct GlobalProjections {
    /// Global query projection.
    pub query: Linear,
    /// Global key projection.
    pub key: Linear,
    /// Global value projection.
    pub value: Linear,
}

/// A layer's state for incremental decoding: the variant's cache and the next position.
#[derive(Clone, Debug)]
pub struct MhaCache {
    /// The attention variant's cache.
    pub attention: DecodeCache,
    /// Positions decoded so far (the rotary offset of the next token).
    pub position: usize,
    /// The grid of the whole sequence being decoded, for variants that lay it out in 2-D
    /// (Axial, Image Transformer 2-D); set with [`with_grid`](Self::with_grid).
    pub grid: Option<Grid>,
    /// Side inputs every step passes to the core (a stack's [`SharedParameter`](crate::SharedParameter));
    /// set with [`with_side`](Self::with_side).
    pub side: SideInputs,
}

impl MhaCache {
    /// This cache for a sequence laid out as `grid` (its final length is `grid.len()`).
    pub fn with_grid(mut self, grid: Grid) -> Self {
        self.grid = Some(grid);
        self
    }

    /// This cache with `value` passed to the core at every step.
    pub fn with_side<T: SideValue>(mut self, value: T) -> Self {
        self.side.insert(value);
        self
    }
}

/// Keys and values of a cross-attention context, projected once and reused for every decoded
/// token.
#[derive(Clone, Debug)]
pub struct ProjectedContext {
    /// `[batch, heads, seq_k, d_k]`.
    pub key: Tensor<4>,
    /// `[batch, heads, seq_k, d_k]`.
    pub value: Tensor<4>,
    /// `[batch, seq_k]`, `true` = padding.
    pub mask_pad: Option<Tensor<2, Bool>>,
}

/// Input of [`MultiHeadAttention::forward`]: the sequence, its [`Extras`] (set with the
/// [`WithExtras`] builders), and in cross mode the context with its padding.
///
/// # Shapes
/// - `x`: `[batch, seq_q, d_model]`
/// - `context`: `[batch, seq_k, d_context]` (cross mode only)
/// - `extras.mask_pad`: `[batch, seq_q]`, `true` = padding
/// - `mask_pad_context`: `[batch, seq_k]`, `true` = padding
#[derive(Clone, Debug)]
pub struct MhaInput {
    x: Tensor<3>,
    context: Option<Tensor<3>>,
    mask_pad_context: Option<Tensor<2, Bool>>,
    memory: Option<Tensor<3>>,
    extras: Extras,
}

impl WithExtras for MhaInput {
    fn extras_mut(&mut self) -> &mut Extras {
        &mut self.extras
    }
}

impl MhaInput {
    /// Self-attention over `x` (bidirectional or causal layers).
    pub fn self_attn(x: Tensor<3>) -> Self {
        Self {
            x,
            context: None,
            mask_pad_context: None,
            memory: None,
            extras: Extras::new(),
        }
    }

    /// Cross-attention from `x` to `context` (cross layers).
    pub fn cross(x: Tensor<3>, context: Tensor<3>) -> Self {
        Self {
            context: Some(context),
            ..Self::self_attn(x)
        }
    }

    /// Padding of the context.
    pub fn mask_pad_context(mut self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad_context = Some(mask);
        self
    }

    /// Earlier positions every query may also attend to (causal layers; Transformer-XL's
    /// segment memory): the keys and values come from `[memory; x]`, the queries from `x`
    /// alone, aligned bottom-right. The memory is read, never trained through: it is detached
    /// here.
    ///
    /// # Shapes
    /// - memory: `[batch, m, d_model]`
    pub fn with_memory(mut self, memory: Tensor<3>) -> Self {
        self.memory = Some(memory.detach());
        self
    }
}

impl<C: AttentionCore + Module> MultiHeadAttention<C> {
    /// Number of heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Query and key width per head.
    pub fn d_k(&self) -> usize {
        self.d_k
    }

    /// This layer after optimiser step `step` ([`AttentionCore::at_step`] of its core).
    pub fn at_step(mut self, step: usize) -> Self {
        self.core = self.core.at_step(step);
        self
    }

    /// Attend.
    ///
    /// # Shapes
    /// - input: see [`MhaInput`]
    /// - output: `[batch, seq_q, d_model]`
    ///
    /// # Panics
    /// If a cross layer gets no context or a self-attention layer gets one.
    pub fn forward(&self, input: MhaInput) -> Tensor<3> {
        let mode = self.core.mode();
        match (&input.context, mode) {
            (None, AttentionMode::Cross) => {
                panic!("a cross-attention layer needs MhaInput::cross(x, context)")
            }
            (Some(_), AttentionMode::Bidirectional | AttentionMode::Causal) => {
                panic!(
                    "a {mode} layer takes MhaInput::self_attn(x); build it in cross mode for a context"
                )
            }
            _ => {}
        }
        let mut extras = input.extras;
        let memory_len = input.memory.as_ref().map_or(0, |m| m.dims()[1]);
        let source = match (&input.context, input.memory) {
            (Some(context), _) => context.clone(),
            (None, Some(memory)) => {
                assert!(
                    mode == AttentionMode::Causal,
                    "a memory is for causal self-attention, not {mode}"
                );
                assert!(
                    self.key.is_some(),
                    "a memory needs a key projection (a shared-QK variant reads the queries as keys)"
                );
                // Memory positions are real: the padding mask grows by m unpadded keys.
                if let Some(pad) = extras.mask_pad.take() {
                    let b = pad.dims()[0];
                    let real = Tensor::<2, Int>::zeros([b, memory_len], &pad.device()).bool();
                    extras.mask_pad = Some(Tensor::cat(vec![real, pad], 1));
                }
                Tensor::cat(vec![memory, input.x.clone()], 1)
            }
            (None, None) => input.x.clone(),
        };
        if let (Some(g), Some(_)) = (&self.global, &extras.global) {
            let gq = self.split_heads(g.query.forward(input.x.clone()));
            let gk = self.split_heads(g.key.forward(input.x.clone()));
            let (gq, gk) = self.rotate(gq, gk, 0);
            extras.side.insert(GlobalHeads {
                query: gq,
                key: gk,
                value: self.split_heads(g.value.forward(input.x.clone())),
            });
        }
        let q = self.split_heads(self.query.forward(input.x)); // [batch, heads, seq_q, d_k]
        let k = self.project_key(&source, &q); // [batch, heads, seq_k, d_k]
        let v = self.split_heads(self.value.forward(source)); // [batch, heads, seq_k, d_k]
        let (q, k) = match &self.rotary {
            Some(rope) if memory_len > 0 => (rope.apply(q, memory_len), rope.apply(k, 0)),
            _ => self.rotate(q, k, 0),
        };

        let mask_pad_k = match mode {
            AttentionMode::Cross => input.mask_pad_context,
            _ => extras.mask_pad.clone(),
        };
        let seed = extras.side.get::<DropoutSeed>().map(|s| s.0);
        let attn = AttnInput {
            query: q,
            key: k,
            value: v,
            mask_pad_k,
            extras,
        };
        self.merge_heads(self.core.attend(attn), seed)
    }

    /// The core's training-loss term from its forwards on `device` since the last call
    /// ([`AttentionCore::aux_loss`]).
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.core.aux_loss(device)
    }

    /// A decoding cache for up to `max_len` positions, if the layer's variant decodes
    /// incrementally (causal mode).
    pub fn init_cache(&self, batch: usize, max_len: usize, device: &Device) -> Option<MhaCache> {
        let dims = HeadDims::new(self.n_heads, self.d_k);
        self.core
            .decode_cache(batch, dims, max_len, device)
            .map(|attention| MhaCache {
                attention,
                position: 0,
                grid: None,
                side: SideInputs::default(),
            })
    }

    /// Attends `t` new positions of a causal layer given the cache of the earlier ones; equal to
    /// the last `t` rows of [`forward`](Self::forward) over the whole sequence.
    ///
    /// # Shapes
    /// - x: `[batch, t, d_model]` → `[batch, t, d_model]`
    pub fn forward_step(&self, x: Tensor<3>, cache: &mut MhaCache) -> Tensor<3> {
        let t = x.dims()[1];
        let q = self.split_heads(self.query.forward(x.clone())); // [batch, heads, t, d_k]
        let k = self.project_key(&x, &q); // [batch, heads, t, d_k]
        let v = self.split_heads(self.value.forward(x)); // [batch, heads, t, d_k]
        let (q, k) = self.rotate(q, k, cache.position);
        let mut input = AttnInput::new(q, k, v);
        input.extras.grid = cache.grid;
        input.extras.side = cache.side.clone();
        let out = self.core.decode_step(&mut cache.attention, input);
        cache.position += t;
        self.merge_heads(out, None)
    }

    /// Projects a cross-attention context once (keys and values), for
    /// [`forward_context`](Self::forward_context).
    ///
    /// # Shapes
    /// - context: `[batch, seq_k, d_context]`, mask_pad: `[batch, seq_k]`
    pub fn project_context(
        &self,
        context: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
    ) -> ProjectedContext {
        ProjectedContext {
            key: self.split_heads(
                self.key
                    .as_ref()
                    .expect("a cross-attention layer has a key projection")
                    .forward(context.clone()),
            ),
            value: self.split_heads(self.value.forward(context)),
            mask_pad,
        }
    }

    /// Cross-attention from `x` to an already projected context: equal to
    /// [`forward`](Self::forward) with [`MhaInput::cross`].
    ///
    /// # Shapes
    /// - x: `[batch, seq_q, d_model]` → `[batch, seq_q, d_model]`
    pub fn forward_context(&self, x: Tensor<3>, context: &ProjectedContext) -> Tensor<3> {
        let q = self.split_heads(self.query.forward(x)); // [batch, heads, seq_q, d_k]
        let mut attn = AttnInput::new(q, context.key.clone(), context.value.clone());
        attn.mask_pad_k = context.mask_pad.clone();
        self.merge_heads(self.core.attend(attn), None)
    }

    /// The keys of `source`: its key projection, or the queries `q` for a shared-QK core.
    fn project_key(&self, source: &Tensor<3>, q: &Tensor<4>) -> Tensor<4> {
        match &self.key {
            Some(key) => self.split_heads(key.forward(source.clone())),
            None => q.clone(),
        }
    }

    fn rotate(&self, q: Tensor<4>, k: Tensor<4>, start: usize) -> (Tensor<4>, Tensor<4>) {
        match &self.rotary {
            Some(rope) => (rope.apply(q, start), rope.apply(k, start)),
            None => (q, k),
        }
    }

    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, l, _] = x.dims();
        x.reshape([b, l, self.n_heads, self.d_k]).swap_dims(1, 2)
    }

    /// `[batch, heads, seq, d_k]` → output projection and dropout (its mask from `seed` if
    /// given, [`seeded_dropout`]) → `[batch, seq, d_model]`.
    fn merge_heads(&self, x: Tensor<4>, seed: Option<u64>) -> Tensor<3> {
        let [b, _, l, _] = x.dims();
        let x = x.swap_dims(1, 2).reshape([b, l, self.n_heads * self.d_k]); // [batch, seq, heads * d_k]
        seeded_dropout(&self.dropout, self.output.forward(x), seed)
    }
}
