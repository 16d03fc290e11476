#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

//! # What is API
//!
//! Every type is re-exported at the crate root, one path each; the modules are private, except
//! [`presets`] (configurations from papers, grouped as functions).
//!
//! The models are generic over the attention core `C`: [`Attention`](efficient_attn::Attention)
//! (any variant of `efficient-attn`, selected from TOML) by default, or your own
//! [`AttentionCore`](efficient_attn::AttentionCore), configured by a
//! [`CoreConfig`](efficient_attn::CoreConfig) in the configs' `A` parameter.

mod block;
mod compressive;
mod config;
mod embedding;
mod funnel;
mod generate;
mod hf_names;
mod memory;
mod mixture_of_experts;
mod model;
pub mod presets;
mod pretrained;
pub mod reversible;
mod set_transformer;
mod stack;

pub use crate::block::{FeedForward, FeedForwardBlock, LayerNorm, Norm, TransformerLayer};
pub use crate::compressive::{Compression, CompressiveConfig, CompressiveMemory, Compressor};
pub use crate::config::{
    FeedForwardKind, FfnConfig, ModelConfigError, NormKind, NormPlacement, PositionKind,
    StackConfig,
};
pub use crate::embedding::{EmbeddingSettings, TokenEmbedding};
pub use crate::funnel::{FunnelConfig, FunnelPlan, FunnelPool};
pub use crate::generate::{SampleRng, Sampler};
pub use crate::hf_names::{
    CLASSIFIER_FROM_HF, CLASSIFIER_TO_HF, load_classifier_hf, save_classifier_hf,
};
pub use crate::memory::{Segment, SegmentMemory};
pub use crate::mixture_of_experts::{
    AuxTerms, MixtureOfExperts, MixtureOfExpertsConfig, Routing, RoutingReport, RoutingSummary,
};
pub use crate::model::{
    ClassifierConfig, DecodeState, Encoder, EncoderConfig, EncoderInput, LanguageModel,
    LanguageModelConfig, LmHead, Pooling, Seq2Seq, Seq2SeqConfig, SequenceClassifier,
    TokenClassifier, mean_pool,
};
pub use crate::pretrained::{
    BERT_KEY_MAP, BertCheckpoint, ConversionReport, HfBertConfig, ImportError, convert,
    load_weights,
};
pub use crate::reversible::ReversibleTape;
pub use crate::set_transformer::{
    Isab, Mab, MabAttention, Pma, ReferenceAttention, Sab, SetBlockConfig, SetEncoderBlock,
    SetStyle, SetTransformer, SetTransformerConfig,
};
pub use crate::stack::{Stack, StackSpec, Wiring};
