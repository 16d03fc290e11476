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

pub mod axial;
pub mod bigbird;
pub mod config;
pub mod decoding;
pub mod etc;
pub mod full;
pub mod image_transformer;
pub mod interface;
pub mod kernels;
pub mod linear_transformer;
pub mod linformer;
pub mod longformer;
pub mod mask;
pub mod memory_compressed;
pub mod memory_efficient;
pub mod mha;
pub mod nystromformer;
pub mod performer;
pub mod reference;
pub mod rng;
pub mod sparse_transformer;
pub mod synthesizer;

#[cfg(feature = "testing")]
pub mod testing;

pub use crate::axial::{AxialAttention, AxialAttentionConfig, AxialAxes};
pub use crate::bigbird::{BigBirdAttention, BigBirdAttentionConfig};
pub use crate::config::{Attention, AttentionConfig, ConfigError};
pub use crate::decoding::{DecodeCache, KvCache, WindowCache};
pub use crate::etc::{EtcAttention, EtcAttentionConfig};
pub use crate::full::{FullAttention, FullAttentionConfig};
pub use crate::image_transformer::{
    ImageTransformer1dAttention, ImageTransformer1dAttentionConfig, ImageTransformer2dAttention,
    ImageTransformer2dAttentionConfig, block_raster_order,
};
pub use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, Exactness, GlobalHeads, GlobalTokens, Grid, HeadDims,
    VariantInfo,
};
pub use crate::linear_transformer::{LinearTransformerAttention, LinearTransformerAttentionConfig};
pub use crate::linformer::{LinformerAttention, LinformerAttentionConfig, LinformerSharing};
pub use crate::longformer::{LongformerAttention, LongformerAttentionConfig};
pub use crate::mask::DenseMask;
pub use crate::memory_compressed::{
    MemoryCompressedAttention, MemoryCompressedAttentionConfig, MemoryCompressedLocalAttention,
    MemoryCompressedLocalAttentionConfig,
};
pub use crate::memory_efficient::{MemoryEfficientAttention, MemoryEfficientAttentionConfig};
pub use crate::mha::{
    GlobalProjections, MhaCache, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig,
    ProjectedContext, RotaryConfig,
};
pub use crate::nystromformer::{NystromformerAttention, NystromformerAttentionConfig};
pub use crate::performer::{
    FeatureDraw, PerformerAttention, PerformerAttentionConfig, PerformerKernel,
};
pub use crate::sparse_transformer::{
    SparsePattern, SparseTransformerAttention, SparseTransformerAttentionConfig,
};
pub use crate::synthesizer::{
    Synthesis, SynthesizerAttention, SynthesizerAttentionConfig, SynthesizerMixing,
};
