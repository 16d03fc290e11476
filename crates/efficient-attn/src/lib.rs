#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

//! # Shape glossary
//!
//! Every public `forward`/`attend` documents its shapes with these names:
//!
//! | name | meaning |
//! |---|---|
//! | `batch` | batch size |
//! | `heads` | attention heads |
//! | `seq_q`, `seq_k` | query and key/value sequence lengths (`seq_q = seq_k` for self-attention) |
//! | `d_k`, `d_v` | per-head query/key and value widths |
//! | `d_model` | model width (`heads * d_k` unless configured otherwise) |
//!
//! Masks follow Burn: `true` means *masked out*.

pub mod config;
pub mod decoding;
pub mod full;
pub mod interface;
pub mod kernels;
pub mod linear_transformer;
pub mod linformer;
pub mod mask;
pub mod memory_efficient;
pub mod mha;
pub mod nystromformer;
pub mod performer;
pub mod reference;
pub mod rng;
pub mod synthesizer;

#[cfg(feature = "testing")]
pub mod testing;

pub use crate::config::{Attention, AttentionConfig, ConfigError};
pub use crate::decoding::{DecodeCache, KvCache};
pub use crate::full::{FullAttention, FullAttentionConfig};
pub use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, Exactness, GlobalTokens, Grid, HeadDims, VariantInfo,
};
pub use crate::linear_transformer::{LinearTransformerAttention, LinearTransformerAttentionConfig};
pub use crate::linformer::{LinformerAttention, LinformerAttentionConfig, LinformerSharing};
pub use crate::mask::DenseMask;
pub use crate::memory_efficient::{MemoryEfficientAttention, MemoryEfficientAttentionConfig};
pub use crate::mha::{
    MhaCache, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, ProjectedContext,
    RotaryConfig,
};
pub use crate::nystromformer::{NystromformerAttention, NystromformerAttentionConfig};
pub use crate::performer::{
    FeatureDraw, PerformerAttention, PerformerAttentionConfig, PerformerKernel,
};
pub use crate::synthesizer::{
    Synthesis, SynthesizerAttention, SynthesizerAttentionConfig, SynthesizerMixing,
};
