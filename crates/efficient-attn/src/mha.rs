//! The multi-head wrapper: projections, head split/merge and dropout around any
//! [`AttentionCore`].

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Tensor};

use crate::config::{Attention, AttentionConfig, ConfigError};
use crate::interface::{AttentionCore, AttentionMode, AttnInput, GlobalTokens, Grid, HeadDims};

/// Configuration of [`MultiHeadAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct MultiHeadAttentionConfig {
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
    /// The attention variant.
    pub attention: AttentionConfig,
}

impl Default for MultiHeadAttentionConfig {
    fn default() -> Self {
        Self {
            d_model: 512,
            n_heads: 8,
            d_k: None,
            d_context: None,
            dropout: 0.1,
            bias: true,
            mode: AttentionMode::Bidirectional,
            attention: AttentionConfig::default(),
        }
    }
}

impl MultiHeadAttentionConfig {
    /// A layer of width `d_model` with `n_heads` heads and the paper's other defaults.
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

    /// Builds the layer.
    pub fn init(&self, device: &Device) -> Result<MultiHeadAttention, ConfigError> {
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
        let inner = d_k * self.n_heads;
        let d_context = self.d_context.unwrap_or(self.d_model);
        let linear = |d_in, d_out| {
            LinearConfig::new(d_in, d_out)
                .with_bias(self.bias)
                .init(device)
        };
        Ok(MultiHeadAttention {
            query: linear(self.d_model, inner),
            key: linear(d_context, inner),
            value: linear(d_context, inner),
            output: linear(inner, self.d_model),
            dropout: DropoutConfig::new(self.dropout).init(),
            core: self
                .attention
                .init(self.mode, HeadDims::new(self.n_heads, d_k), device)?,
            n_heads: self.n_heads,
            d_k,
        })
    }
}

/// Multi-head attention with any variant as its core.
///
/// `x → (Q, K, V) = (x W_q, c W_k, c W_v)` split into heads, attended by the core, merged and
/// projected by `W_o`, then dropout; `c = x` except in cross mode.
#[derive(Module, Debug)]
pub struct MultiHeadAttention {
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Output projection.
    pub output: Linear,
    /// Dropout on the attention output.
    pub dropout: Dropout,
    /// The attention variant.
    pub core: Attention,
    n_heads: usize,
    d_k: usize,
}

/// Input of [`MultiHeadAttention::forward`].
///
/// # Shapes
/// - `x`: `[batch, seq_q, d_model]`
/// - `context`: `[batch, seq_k, d_context]` (cross mode only)
/// - `mask_pad`: `[batch, seq_q]`, `true` = padding
/// - `mask_pad_context`: `[batch, seq_k]`, `true` = padding
#[derive(Clone, Debug)]
pub struct MhaInput {
    x: Tensor<3>,
    context: Option<Tensor<3>>,
    mask_pad: Option<Tensor<2, Bool>>,
    mask_pad_context: Option<Tensor<2, Bool>>,
    global: Option<GlobalTokens>,
    grid: Option<Grid>,
}

impl MhaInput {
    /// Self-attention over `x` (bidirectional or causal layers).
    pub fn self_attn(x: Tensor<3>) -> Self {
        Self {
            x,
            context: None,
            mask_pad: None,
            mask_pad_context: None,
            global: None,
            grid: None,
        }
    }

    /// Cross-attention from `x` to `context` (cross layers).
    pub fn cross(x: Tensor<3>, context: Tensor<3>) -> Self {
        Self {
            context: Some(context),
            ..Self::self_attn(x)
        }
    }

    /// Padding of `x`.
    pub fn mask_pad(mut self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad = Some(mask);
        self
    }

    /// Padding of the context.
    pub fn mask_pad_context(mut self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad_context = Some(mask);
        self
    }

    /// Global tokens, for variants that have them.
    pub fn with_global(mut self, global: GlobalTokens) -> Self {
        self.global = Some(global);
        self
    }

    /// 2-D layout of the sequence, for image variants.
    pub fn with_grid(mut self, grid: Grid) -> Self {
        self.grid = Some(grid);
        self
    }
}

impl MultiHeadAttention {
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
        let [b, lq, _] = input.x.dims();
        let source = input.context.clone().unwrap_or_else(|| input.x.clone());
        let q = self.split_heads(self.query.forward(input.x)); // [batch, heads, seq_q, d_k]
        let k = self.split_heads(self.key.forward(source.clone())); // [batch, heads, seq_k, d_k]
        let v = self.split_heads(self.value.forward(source)); // [batch, heads, seq_k, d_k]

        let mut attn = AttnInput::new(q, k, v);
        let key_pad = match mode {
            AttentionMode::Cross => input.mask_pad_context,
            _ => input.mask_pad.clone(),
        };
        attn.mask_pad_q = input.mask_pad;
        attn.mask_pad_k = key_pad;
        attn.global = input.global;
        attn.grid = input.grid;

        let out = self.core.attend(attn); // [batch, heads, seq_q, d_k]
        let out = out
            .swap_dims(1, 2)
            .reshape([b, lq, self.n_heads * self.d_k]); // [batch, seq_q, heads * d_k]
        self.dropout.forward(self.output.forward(out))
    }

    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, l, _] = x.dims();
        x.reshape([b, l, self.n_heads, self.d_k]).swap_dims(1, 2)
    }
}
