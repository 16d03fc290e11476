//! Configuration of transformer stacks (serde; omitted fields take defaults, unknown fields are
//! errors).

use std::fmt;

use burn::serde::{Deserialize, Serialize};
use efficient_attn::{
    AttentionConfig, AttentionMode, ConfigError, CoreConfig, MultiHeadAttentionConfig, RotaryConfig,
};

use crate::mixture_of_experts::{MixtureOfExpertsConfig, Routing};

/// Which normalisation layer the blocks use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum NormKind {
    /// LayerNorm (Ba et al. 2016).
    #[default]
    LayerNorm,
    /// RMSNorm (Zhang & Sennrich 2019).
    RmsNorm,
}

/// Where the normalisation sits relative to the residual.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum NormPlacement {
    /// `x + f(norm(x))`, with a final norm after the stack (GPT-2, most efficient-transformer
    /// papers).
    #[default]
    Pre,
    /// `norm(x + f(x))` (the original Transformer, BERT).
    Post,
}

/// The feed-forward block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum FeedForwardKind {
    /// `W₂ GELU(W₁ x)` (BERT, LRA).
    #[default]
    Gelu,
    /// `W₂ ReLU(W₁ x)` (the original Transformer).
    Relu,
    /// `W₃ (SiLU(W₁ x) ⊙ W₂ x)` (Shazeer 2020).
    Swiglu,
}

/// The position-wise block of every layer (`[model.stack.ffn]`, tagged by `kind`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", tag = "kind", rename_all = "kebab-case")]
pub enum FfnConfig {
    /// One feed-forward network `d_model → d_ff → d_model`.
    #[default]
    Dense,
    /// Switch Transformer: a mixture of experts, each token to its top-1 expert.
    Switch(MixtureOfExpertsConfig),
    /// GShard / ST-MoE: a mixture of experts, each token to its top-2 experts.
    Top2(MixtureOfExpertsConfig),
}

impl FfnConfig {
    /// The mixture of experts, if this is one, with its routing set by the kind.
    pub fn experts(&self) -> Option<MixtureOfExpertsConfig> {
        match self {
            Self::Dense => None,
            Self::Switch(c) => Some(MixtureOfExpertsConfig {
                routing: Routing::Switch,
                ..c.clone()
            }),
            Self::Top2(c) => Some(MixtureOfExpertsConfig {
                routing: Routing::Top2,
                ..c.clone()
            }),
        }
    }
}

/// How positions enter the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum PositionKind {
    /// A learned embedding per absolute position (BERT, LRA).
    #[default]
    Learned,
    /// Fixed sinusoids (Vaswani et al. 2017).
    Sinusoidal,
    /// Rotary embeddings of queries and keys in every self-attention layer (Su et al. 2021).
    Rotary,
    /// None (for variants that bring their own, such as relative positions).
    None,
}

/// A model configuration that cannot be built: the key path and what was expected.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfigError {
    /// Where, e.g. `decoder.layers[2].attention`.
    pub path: String,
    /// What was expected or why it cannot work.
    pub message: String,
}

impl ModelConfigError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An attention configuration error at `path`.
    pub fn attention(path: impl Into<String>, error: ConfigError) -> Self {
        Self::new(path, error.to_string())
    }

    /// The same error with its path read from inside `section` (`model` and `encoder.ffn`
    /// give `model.encoder.ffn`), for a configuration nested in a larger file.
    pub fn within(self, section: &str) -> Self {
        let path = match (section.is_empty(), self.path.is_empty()) {
            (true, _) => self.path,
            (false, true) => section.to_string(),
            (false, false) => format!("{section}.{}", self.path),
        };
        Self { path, ..self }
    }
}

impl fmt::Display for ModelConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path, self.message)
    }
}

impl std::error::Error for ModelConfigError {}

/// A stack of transformer layers. `A` configures the attention of each layer: the
/// TOML-selectable [`AttentionConfig`] by default, or your own
/// [`CoreConfig`](efficient_attn::CoreConfig).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "burn::serde",
    default,
    deny_unknown_fields,
    bound(deserialize = "A: Deserialize<'de> + Default")
)]
pub struct StackConfig<A = AttentionConfig> {
    /// Layers (paper: N = 6).
    pub n_layers: usize,
    /// Model width (paper: d_model = 512).
    pub d_model: usize,
    /// Heads (paper: h = 8).
    pub n_heads: usize,
    /// Feed-forward width (paper: d_ff = 2048).
    pub d_ff: usize,
    /// Dropout on residual branches and attention outputs (paper: 0.1).
    pub dropout: f64,
    /// Normalisation layer.
    pub norm: NormKind,
    /// Pre- or post-norm blocks.
    pub placement: NormPlacement,
    /// Normalisation epsilon (LayerNorm 1e-5; BERT 1e-12).
    pub norm_eps: f64,
    /// Feed-forward block (the activation; of every expert too).
    pub feed_forward: FeedForwardKind,
    /// One feed-forward network per layer, or a mixture of experts (`[model.stack.ffn]`).
    pub ffn: FfnConfig,
    /// The self-attention variant of every layer (unless a list or pattern is given).
    pub attention: A,
    /// One self-attention variant per layer.
    pub attention_layers: Option<Vec<A>>,
    /// Self-attention variants repeated cyclically over the layers (e.g. the
    /// Memory-Compressed paper's local/compressed alternation).
    pub attention_pattern: Option<Vec<A>>,
    /// Apply the feed-forward block to this many chunks of the sequence, one after another
    /// (Reformer §4: the `[seq, d_ff]` intermediate is one chunk's at a time; the result is
    /// the same). 1: the whole sequence at once.
    pub ff_chunks: usize,
    /// Reversible residual blocks (Reformer §3, RevNet): the input is duplicated into two
    /// halves, each layer computes `y₁ = x₁ + Attention(x₂)`, `y₂ = x₂ + FeedForward(y₁)`, and
    /// the output is their mean. Training through `efformer train` then stores no activations
    /// per layer (except a sequence-to-sequence model's encoder): the backward pass
    /// reconstructs each layer's input from its output ([`crate::reversible`]). Needs
    /// `placement = "pre"` and no cross-attention.
    pub reversible: bool,
}

impl<A: Default> Default for StackConfig<A> {
    fn default() -> Self {
        Self {
            n_layers: 6,
            d_model: 512,
            n_heads: 8,
            d_ff: 2048,
            dropout: 0.1,
            norm: NormKind::LayerNorm,
            placement: NormPlacement::Pre,
            norm_eps: 1e-5,
            feed_forward: FeedForwardKind::Gelu,
            ffn: FfnConfig::Dense,
            attention: A::default(),
            attention_layers: None,
            attention_pattern: None,
            ff_chunks: 1,
            reversible: false,
        }
    }
}

impl StackConfig {
    /// Sets the same variant for every layer.
    pub fn with_attention(mut self, attention: impl Into<AttentionConfig>) -> Self {
        self.attention = attention.into();
        self.attention_layers = None;
        self.attention_pattern = None;
        self
    }
}

impl<A: CoreConfig> StackConfig<A> {
    /// The same stack with your own attention core's configuration in every layer.
    pub fn with_core<B: CoreConfig>(self, attention: B) -> StackConfig<B> {
        StackConfig {
            n_layers: self.n_layers,
            d_model: self.d_model,
            n_heads: self.n_heads,
            d_ff: self.d_ff,
            dropout: self.dropout,
            norm: self.norm,
            placement: self.placement,
            norm_eps: self.norm_eps,
            feed_forward: self.feed_forward,
            ffn: self.ffn.clone(),
            attention,
            attention_layers: None,
            attention_pattern: None,
            ff_chunks: self.ff_chunks,
            reversible: self.reversible,
        }
    }

    /// The multi-head attention layer this stack builds around `attention`: the one place a
    /// layer's width, heads and dropout become an attention configuration (and are validated).
    pub fn attention_layer(
        &self,
        attention: A,
        mode: AttentionMode,
        rotary: Option<RotaryConfig>,
        d_context: Option<usize>,
    ) -> MultiHeadAttentionConfig<A> {
        MultiHeadAttentionConfig {
            d_model: self.d_model,
            n_heads: self.n_heads,
            d_k: None,
            d_context,
            dropout: self.dropout,
            bias: true,
            mode,
            rotary,
            attention,
        }
    }

    /// The variant of each layer.
    pub fn resolve_attention(&self, stack: &'static str) -> Result<Vec<A>, ModelConfigError> {
        let n_layers = self.n_layers;
        match (&self.attention_layers, &self.attention_pattern) {
            (Some(_), Some(_)) => Err(ModelConfigError::new(
                format!("{stack}.attention_layers"),
                "either attention_layers or attention_pattern, not both",
            )),
            (Some(list), None) if list.len() != n_layers => Err(ModelConfigError::new(
                format!("{stack}.attention_layers"),
                format!("one entry per layer ({n_layers}), got {}", list.len()),
            )),
            (Some(list), None) => Ok(list.clone()),
            (None, Some(pattern)) if pattern.is_empty() => Err(ModelConfigError::new(
                format!("{stack}.attention_pattern"),
                "at least one variant",
            )),
            (None, Some(pattern)) => Ok((0..n_layers)
                .map(|i| pattern[i % pattern.len()].clone())
                .collect()),
            (None, None) => Ok(vec![self.attention.clone(); n_layers]),
        }
    }

    /// Checks the stack and returns the per-layer attention, validated for `mode`: a variant
    /// without that mode is an error naming the layer and the variant. The layer's width,
    /// heads and dropout are checked by the attention layer's own validation
    /// ([`MultiHeadAttentionConfig::validate`]), reported at `stack.<field>`.
    pub fn check(
        &self,
        stack: &'static str,
        mode: AttentionMode,
    ) -> Result<Vec<A>, ModelConfigError> {
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(ModelConfigError::new(
                    format!("{stack}.{field}"),
                    "a positive integer",
                ))
            } else {
                Ok(())
            }
        };
        positive("n_layers", self.n_layers)?;
        positive("d_ff", self.d_ff)?;
        positive("ff_chunks", self.ff_chunks)?;
        if let Some(moe) = self.ffn.experts() {
            moe.check(&format!("{stack}.ffn"))?;
            if self.reversible {
                return Err(ModelConfigError::new(
                    format!("{stack}.ffn.kind"),
                    "a mixture of experts in a reversible stack: its routing (jitter, random \
                     second choices, capacity) would differ when the backward recomputes the \
                     layer; use kind = \"dense\" or reversible = false",
                ));
            }
        }
        if self.reversible && self.placement != NormPlacement::Pre {
            return Err(ModelConfigError::new(
                format!("{stack}.reversible"),
                "placement = \"pre\" for reversible blocks (a norm after the residual sum \
                 cannot be inverted)",
            ));
        }
        let layers = self.resolve_attention(stack)?;
        self.attention_layer(self.attention.clone(), mode, None, None)
            .validate()
            .map_err(|e| match e {
                ConfigError::InvalidField {
                    field,
                    expected,
                    got,
                } => ModelConfigError::new(
                    format!("{stack}.{field}"),
                    format!("{expected}, got {got}"),
                ),
                other => ModelConfigError::attention(stack, other),
            })?;
        for (i, attention) in layers.iter().enumerate() {
            let info = attention.info();
            if !info.supports(mode) {
                let why = match mode {
                    AttentionMode::Causal => "a decoder's self-attention must be causal",
                    AttentionMode::Bidirectional => "an encoder's self-attention is bidirectional",
                    AttentionMode::Cross => "cross-attention needs a cross mode",
                };
                return Err(ModelConfigError::new(
                    format!("{stack}.layers[{i}].attention"),
                    format!(
                        "attention kind \"{}\" has no {mode} mode ({why}); it supports: {}",
                        info.kind,
                        info.modes
                            .iter()
                            .map(|m| m.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(layers)
    }
}
