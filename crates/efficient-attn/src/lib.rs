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
//!
//! # What is API
//!
//! Everything is re-exported at the crate root, one path per item; the modules are private.
//!
//! - The interface: [`AttentionCore`], [`CoreConfig`], [`AttnInput`], [`AttentionMode`],
//!   [`HeadDims`], [`VariantInfo`], [`Exactness`], [`ConfigError`].
//! - What sequences carry: [`Extras`] and its builders [`WithExtras`], [`GlobalTokens`],
//!   [`Grid`], [`SideInputs`] with [`SharedParameter`] and [`GlobalHeads`]; [`padding_mask`].
//! - The wrapper: [`MultiHeadAttention`] (any core, ours or yours) with [`MhaInput`],
//!   [`MhaCache`], [`ProjectedContext`], [`RotaryConfig`].
//! - Selection from TOML: [`AttentionConfig`] → [`Attention`]; every variant's config, module
//!   and option enums (`PerformerAttentionConfig`, `SparsePattern`, ...).
//! - Decoding caches: [`DecodeCache`], [`KvCache`], [`WindowCache`] ([`WindowRule`]), [`RecurrentState`],
//!   [`SlotCache`], [`PrefixCache`], [`kv_cache`]; [`CausalPattern`] with [`pattern_step`], and
//!   [`prefix_step`].
//! - Fused CPU operations other layers use: [`fused_feed_forward`] and [`fused_layer_norm`]
//!   (with [`runs_fused`] to know when they run).
//!
//! Not API: the kernels, the dense oracle, the seeded generator and the pattern masks the
//! contract suite uses. With the `testing` feature they are reachable from `testing` for
//! tests and benchmarks, without semver promises.

/// The registry: every attention variant, one line per paper file, listing the variants that
/// file defines as `Variant("kind", Config => Core)`.
///
/// It declares the modules (each file's `pub` items are re-exported at the crate root), the
/// [`AttentionConfig`] and [`Attention`] enums with their dispatch, and the contract-suite tests
/// ([`contract_tests!`]). Adding a variant is its file plus one line here.
///
/// `$mac` is called with `$args`, `;`, then the list.
#[doc(hidden)]
#[macro_export]
macro_rules! __registered_variants {
    ($mac:ident, $($args:tt)*) => {
        $crate::$mac! {
            $($args)*;
            full { Full("full", FullAttentionConfig => FullAttention) },
            memory_efficient { MemoryEfficient("memory-efficient", MemoryEfficientAttentionConfig => MemoryEfficientAttention) },
            linear_transformer { LinearTransformer("linear-transformer", LinearTransformerAttentionConfig => LinearTransformerAttention) },
            performer { Performer("performer", PerformerAttentionConfig => PerformerAttention) },
            linformer { Linformer("linformer", LinformerAttentionConfig => LinformerAttention) },
            nystromformer { Nystromformer("nystromformer", NystromformerAttentionConfig => NystromformerAttention) },
            synthesizer { Synthesizer("synthesizer", SynthesizerAttentionConfig => SynthesizerAttention) },
            memory_compressed {
                MemoryCompressedLocal("memory-compressed-local", MemoryCompressedLocalAttentionConfig => MemoryCompressedLocalAttention),
                MemoryCompressed("memory-compressed", MemoryCompressedAttentionConfig => MemoryCompressedAttention),
            },
            image_transformer {
                ImageTransformer1d("image-transformer-1d", ImageTransformer1dAttentionConfig => ImageTransformer1dAttention),
                ImageTransformer2d("image-transformer-2d", ImageTransformer2dAttentionConfig => ImageTransformer2dAttention),
            },
            sparse_transformer { SparseTransformer("sparse-transformer", SparseTransformerAttentionConfig => SparseTransformerAttention) },
            longformer { Longformer("longformer", LongformerAttentionConfig => LongformerAttention) },
            etc { Etc("etc", EtcAttentionConfig => EtcAttention) },
            bigbird { Bigbird("bigbird", BigBirdAttentionConfig => BigBirdAttention) },
            axial { Axial("axial", AxialAttentionConfig => AxialAttention) },
            sinkhorn { Sinkhorn("sinkhorn", SinkhornAttentionConfig => SinkhornAttention) },
            reformer { Reformer("reformer", ReformerAttentionConfig => ReformerAttention) },
            routing { Routing("routing", RoutingAttentionConfig => RoutingAttention) },
            transformer_xl { TransformerXl("transformer-xl", TransformerXlConfig => TransformerXlAttention) },
        }
    };
}

/// Declares one public module per registered paper file (its documentation is the paper's
/// header: cost, exactness, modes, sources) and re-exports its `pub` items at the root.
#[doc(hidden)]
#[macro_export]
macro_rules! __declare_variant_modules {
    ($(;)? $($module:ident { $($rest:tt)* }),* $(,)?) => {
        $(
            pub mod $module;
            pub use self::$module::*;
        )*
    };
}

__registered_variants!(__declare_variant_modules,);

mod config;
mod decoding;
mod dropout;
mod error;
mod extras;
mod interface;
mod kernels;
mod mask;
mod mha;
#[cfg(feature = "testing")]
mod reference;
mod rng;

#[cfg(feature = "testing")]
pub mod testing;

pub use crate::config::{Attention, AttentionConfig};
pub use crate::decoding::{
    CausalPattern, DecodeCache, KvCache, PrefixCache, RecurrentState, SlotCache, WindowCache,
    WindowRule, pattern_step, prefix_step,
};
pub use crate::dropout::{DropoutSeed, seeded_dropout};
pub use crate::error::ConfigError;
pub use crate::extras::{
    Extras, GlobalHeads, GlobalTokens, Grid, SharedParameter, SharedParameterSpec, SideInputs,
    SideValue, WithExtras,
};
pub use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, CoreConfig, Exactness, HeadDims, VariantInfo,
    kv_cache, layer_seed,
};
pub use crate::kernels::fused::{
    FeedForwardActivation, fused_feed_forward, fused_layer_norm, runs_fused,
};
pub use crate::mask::padding_mask;
pub use crate::mha::{
    GlobalProjections, MhaCache, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig,
    ProjectedContext, RotaryConfig,
};
pub use crate::rng::mix_seed;

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
