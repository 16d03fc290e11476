//! Token, position and token-type embeddings.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, generate_sinusoids};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Int, Tensor};
use efficient_attn::RotaryConfig;

use crate::block::Norm;
use crate::config::{ModelConfigError, NormKind, PositionKind};

/// Configuration of [`TokenEmbedding`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct EmbeddingSettings {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence (positions beyond it are an error).
    pub max_len: usize,
    /// How positions enter.
    pub positions: PositionKind,
    /// Token-type vocabulary (BERT's segment ids: 2); 0 for none.
    pub type_vocab_size: usize,
    /// A LayerNorm after the summed embeddings (BERT).
    pub norm: bool,
    /// Its epsilon (BERT: 1e-12).
    pub norm_eps: f64,
    /// Dropout after the embeddings.
    pub dropout: f64,
}

impl Default for EmbeddingSettings {
    fn default() -> Self {
        Self {
            vocab_size: 256,
            max_len: 512,
            positions: PositionKind::Learned,
            type_vocab_size: 0,
            norm: false,
            norm_eps: 1e-12,
            dropout: 0.1,
        }
    }
}

impl EmbeddingSettings {
    /// The rotary table the attention layers need, if positions are rotary.
    pub fn rotary(&self) -> Option<RotaryConfig> {
        (self.positions == PositionKind::Rotary).then_some(RotaryConfig {
            theta: 10000.0,
            max_len: self.max_len,
        })
    }

    /// Builds the embedding of width `d_model`.
    pub fn init(
        &self,
        d_model: usize,
        path: &str,
        device: &Device,
    ) -> Result<TokenEmbedding, ModelConfigError> {
        if self.vocab_size == 0 {
            return Err(ModelConfigError::new(
                format!("{path}.vocab_size"),
                "a positive vocabulary size",
            ));
        }
        if self.max_len == 0 {
            return Err(ModelConfigError::new(
                format!("{path}.max_len"),
                "a positive maximum length",
            ));
        }
        if self.positions == PositionKind::Sinusoidal && d_model % 2 == 1 {
            return Err(ModelConfigError::new(
                format!("{path}.positions"),
                format!("sinusoidal positions need an even d_model, got {d_model}"),
            ));
        }
        Ok(TokenEmbedding {
            tokens: EmbeddingConfig::new(self.vocab_size, d_model).init(device),
            learned_positions: (self.positions == PositionKind::Learned)
                .then(|| EmbeddingConfig::new(self.max_len, d_model).init(device)),
            sinusoids: (self.positions == PositionKind::Sinusoidal).then(|| {
                generate_sinusoids(self.max_len, d_model, 10_000.max(self.max_len), device)
            }),
            token_types: (self.type_vocab_size > 0)
                .then(|| EmbeddingConfig::new(self.type_vocab_size, d_model).init(device)),
            norm: self
                .norm
                .then(|| Norm::new(NormKind::LayerNorm, d_model, self.norm_eps, device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            max_len: self.max_len,
        })
    }
}

/// Token embedding plus learned or sinusoidal positions and optional token types, then an
/// optional norm and dropout.
#[derive(Module, Debug)]
pub struct TokenEmbedding {
    /// Token table `[vocab, d_model]`.
    pub tokens: Embedding,
    /// Learned position table `[max_len, d_model]`.
    pub learned_positions: Option<Embedding>,
    /// Fixed sinusoids `[max_len, d_model]` (not a parameter).
    pub sinusoids: Option<Tensor<2>>,
    /// Token-type table.
    pub token_types: Option<Embedding>,
    /// Norm after the sum.
    pub norm: Option<Norm>,
    /// Dropout.
    pub dropout: Dropout,
    max_len: usize,
}

impl TokenEmbedding {
    /// The maximum length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Embeds `tokens` at positions `offset..offset + seq`.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`, token_types: `[batch, seq]`
    /// - output: `[batch, seq, d_model]`
    ///
    /// # Panics
    /// If `offset + seq` exceeds the maximum length.
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        token_types: Option<Tensor<2, Int>>,
        offset: usize,
    ) -> Tensor<3> {
        let [b, n] = tokens.dims();
        assert!(
            offset + n <= self.max_len,
            "sequence of {} positions exceeds the model's max_len {}",
            offset + n,
            self.max_len
        );
        let device = tokens.device();
        let mut x = self.tokens.forward(tokens); // [batch, seq, d_model]
        if let Some(table) = &self.learned_positions {
            let positions = Tensor::<1, Int>::arange(offset as i64..(offset + n) as i64, &device)
                .reshape([1, n])
                .expand([b, n]);
            x = x.add(table.forward(positions));
        }
        if let Some(sin) = &self.sinusoids {
            let d = sin.dims()[1];
            x = x.add(sin.clone().narrow(0, offset, n).reshape([1, n, d]));
        }
        if let (Some(table), Some(types)) = (&self.token_types, token_types) {
            x = x.add(table.forward(types));
        } else if let Some(table) = &self.token_types {
            // Absent types are type 0 (BERT's single-segment default).
            let zeros = Tensor::<2, Int>::zeros([b, n], &device);
            x = x.add(table.forward(zeros));
        }
        if let Some(norm) = &self.norm {
            x = norm.forward(x);
        }
        self.dropout.forward(x)
    }
}
