//! Configuration of transformer stacks (serde; omitted fields take defaults, unknown fields are
//! errors).

use std::fmt;

use burn::serde::{Deserialize, Serialize};
use efficient_attn::{AttentionConfig, AttentionMode, ConfigError};

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
}

impl fmt::Display for ModelConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path, self.message)
    }
}

impl std::error::Error for ModelConfigError {}

/// A stack of transformer layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct StackConfig {
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
    /// Feed-forward block.
    pub feed_forward: FeedForwardKind,
    /// The self-attention variant of every layer (unless a list or pattern is given).
    pub attention: AttentionConfig,
    /// One self-attention variant per layer.
    pub attention_layers: Option<Vec<AttentionConfig>>,
    /// Self-attention variants repeated cyclically over the layers (e.g. the
    /// Memory-Compressed paper's local/compressed alternation).
    pub attention_pattern: Option<Vec<AttentionConfig>>,
}

impl Default for StackConfig {
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
            attention: AttentionConfig::default(),
            attention_layers: None,
            attention_pattern: None,
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

    /// The variant of each layer.
    pub fn resolve_attention(
        &self,
        stack: &'static str,
    ) -> Result<Vec<AttentionConfig>, ModelConfigError> {
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

    /// Checks the widths and returns the per-layer attention, validated for `mode`: a variant
    /// without that mode is an error naming the layer and the variant.
    pub fn check(
        &self,
        stack: &'static str,
        mode: AttentionMode,
    ) -> Result<Vec<AttentionConfig>, ModelConfigError> {
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
        positive("d_model", self.d_model)?;
        positive("n_heads", self.n_heads)?;
        positive("d_ff", self.d_ff)?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ModelConfigError::new(
                format!("{stack}.n_heads"),
                format!(
                    "a divisor of d_model = {}, got {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelConfigError::new(
                format!("{stack}.dropout"),
                "a probability in [0, 1)",
            ));
        }
        let layers = self.resolve_attention(stack)?;
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
