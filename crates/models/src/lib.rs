#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod block;
pub mod config;
pub mod embedding;
pub mod generate;
pub mod model;
pub mod presets;
pub mod pretrained;
pub mod stack;

pub use crate::config::{
    FeedForwardKind, ModelConfigError, NormKind, NormPlacement, PositionKind, StackConfig,
};
pub use crate::embedding::{EmbeddingSettings, TokenEmbedding};
pub use crate::generate::Sampler;
pub use crate::model::{
    ClassifierConfig, DecodeState, Encoder, EncoderConfig, EncoderInput, LanguageModel,
    LanguageModelConfig, LmHead, Pooling, Seq2Seq, Seq2SeqConfig, SequenceClassifier,
    TokenClassifier,
};
pub use crate::pretrained::{BertCheckpoint, ConversionReport, ImportError, convert};
