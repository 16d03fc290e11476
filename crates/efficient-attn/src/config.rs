//! Selecting a variant from configuration: [`AttentionConfig`] (serde, `kind = "..."` in TOML)
//! builds an [`Attention`] module for a mode.
//!
//! ```toml
//! [attention]
//! kind = "memory-efficient"
//! key_block = 256
//! ```
//!
//! Every variant's config has `#[serde(default, deny_unknown_fields)]`: omitted fields take the
//! paper's defaults and a misspelt field is an error that names it.

use std::fmt;

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Tensor};

use crate::axial::{AxialAttention, AxialAttentionConfig};
use crate::bigbird::{BigBirdAttention, BigBirdAttentionConfig};
use crate::decoding::DecodeCache;
use crate::etc::{EtcAttention, EtcAttentionConfig};
use crate::full::{FullAttention, FullAttentionConfig};
use crate::image_transformer::{
    ImageTransformer1dAttention, ImageTransformer1dAttentionConfig, ImageTransformer2dAttention,
    ImageTransformer2dAttentionConfig,
};
use crate::interface::{AttentionCore, AttentionMode, AttnInput, HeadDims, VariantInfo};
use crate::linear_transformer::{LinearTransformerAttention, LinearTransformerAttentionConfig};
use crate::linformer::{LinformerAttention, LinformerAttentionConfig};
use crate::longformer::{LongformerAttention, LongformerAttentionConfig};
use crate::mask::DenseMask;
use crate::memory_compressed::{
    MemoryCompressedAttention, MemoryCompressedAttentionConfig, MemoryCompressedLocalAttention,
    MemoryCompressedLocalAttentionConfig,
};
use crate::memory_efficient::{MemoryEfficientAttention, MemoryEfficientAttentionConfig};
use crate::nystromformer::{NystromformerAttention, NystromformerAttentionConfig};
use crate::performer::{PerformerAttention, PerformerAttentionConfig};
use crate::sparse_transformer::{SparseTransformerAttention, SparseTransformerAttentionConfig};
use crate::synthesizer::{SynthesizerAttention, SynthesizerAttentionConfig};

/// A configuration that cannot build a layer. The message names the field or mode and what was
/// expected.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The variant has no such mode.
    UnsupportedMode {
        /// Variant kind.
        kind: &'static str,
        /// The mode asked for.
        mode: AttentionMode,
        /// Why the variant cannot run in that mode.
        reason: &'static str,
    },
    /// A field has a value the variant cannot use.
    InvalidField {
        /// Field name (as in TOML).
        field: &'static str,
        /// What was expected.
        expected: String,
        /// What was given.
        got: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedMode { kind, mode, reason } => {
                write!(
                    f,
                    "attention kind \"{kind}\" does not support {mode} mode: {reason}"
                )
            }
            Self::InvalidField {
                field,
                expected,
                got,
            } => write!(f, "`{field}`: expected {expected}, got {got}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// `Ok` if `info` lists `mode`; otherwise an [`UnsupportedMode`](Self::UnsupportedMode)
    /// error with the variant's general reason.
    pub fn check_mode(info: &VariantInfo, mode: AttentionMode) -> Result<(), Self> {
        Self::check_mode_because(info, mode, "the paper defines no such mode")
    }

    /// Like [`check_mode`](Self::check_mode) with the variant's own reason.
    pub fn check_mode_because(
        info: &VariantInfo,
        mode: AttentionMode,
        reason: &'static str,
    ) -> Result<(), Self> {
        if info.supports(mode) {
            Ok(())
        } else {
            Err(Self::UnsupportedMode {
                kind: info.kind,
                mode,
                reason,
            })
        }
    }

    /// `Ok` if `value > 0`.
    pub fn check_nonzero(field: &'static str, value: usize) -> Result<(), Self> {
        if value > 0 {
            Ok(())
        } else {
            Err(Self::InvalidField {
                field,
                expected: "a positive integer".into(),
                got: "0".into(),
            })
        }
    }

    /// `Ok` if `value` is absent or a finite positive number.
    pub fn check_positive_opt(field: &'static str, value: Option<f64>) -> Result<(), Self> {
        match value {
            Some(v) if !(v.is_finite() && v > 0.0) => Err(Self::InvalidField {
                field,
                expected: "a finite positive number".into(),
                got: v.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// Declares every variant once: the config enum, the module enum, their conversions and the
/// dispatch. Adding a variant is one line here (plus its file and its contract spec).
macro_rules! attention_variants {
    ($($variant:ident($kind:literal, $config:ident => $module:ident),)*) => {
        /// Any attention variant, selected by `kind`.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(crate = "burn::serde", tag = "kind")]
        #[non_exhaustive]
        pub enum AttentionConfig {
            $(
                #[doc = concat!("[`", stringify!($module), "`].")]
                #[serde(rename = $kind)]
                $variant($config),
            )*
        }

        impl AttentionConfig {
            /// Every `kind`, in declaration order.
            pub const KINDS: &'static [&'static str] = &[$($config::INFO.kind),*];

            /// Deserialises the variant `kind` from the rest of its table (everything but the
            /// `kind` key). Errors then carry the field path when the deserializer tracks one
            /// (e.g. through `serde_path_to_error`), which the buffered `kind`-tagged form
            /// cannot.
            pub fn deserialize_kind<'de, D: burn::serde::Deserializer<'de>>(
                kind: &str,
                deserializer: D,
            ) -> Result<Self, D::Error> {
                $(
                    if kind == $config::INFO.kind {
                        return <$config as Deserialize>::deserialize(deserializer).map(Self::$variant);
                    }
                )*
                Err(<D::Error as burn::serde::de::Error>::unknown_variant(kind, Self::KINDS))
            }

            /// The default configuration of every variant, in the order
            /// `efformer attention list` prints them.
            pub fn all_defaults() -> Vec<AttentionConfig> {
                vec![$(Self::$variant(Default::default())),*]
            }

            /// Whether the variant wants separate projections for global tokens (Longformer),
            /// which [`MultiHeadAttention`](crate::MultiHeadAttention) then owns.
            pub fn global_projections(&self) -> bool {
                matches!(self, Self::Longformer(c) if c.global_projections)
            }

            /// What the selected variant is.
            pub fn info(&self) -> &'static VariantInfo {
                match self {
                    $(Self::$variant(_) => &$config::INFO,)*
                }
            }

            /// Builds the variant for `mode` and the head layout `dims` on `device` (where
            /// variants with parameters or random features put them).
            pub fn init(
                &self,
                mode: AttentionMode,
                dims: HeadDims,
                device: &Device,
            ) -> Result<Attention, ConfigError> {
                Ok(match self {
                    $(Self::$variant(c) => Attention::$variant(c.init(mode, dims, device)?),)*
                })
            }
        }

        $(
            impl From<$config> for AttentionConfig {
                fn from(c: $config) -> Self {
                    Self::$variant(c)
                }
            }
        )*

        /// Any attention variant as a module. Models hold this enum, so their types stay
        /// concrete.
        #[derive(Module, Debug)]
        #[non_exhaustive]
        // Built once per layer and never moved on a hot path; boxing would only add indirection.
        #[allow(clippy::large_enum_variant)]
        pub enum Attention {
            $(
                #[doc = concat!("[`", stringify!($module), "`].")]
                $variant($module),
            )*
        }

        impl Attention {
            /// The variant behind this module.
            pub fn as_core(&self) -> &dyn AttentionCore {
                match self {
                    $(Self::$variant(a) => a,)*
                }
            }
        }
    };
}

attention_variants! {
    Full("full", FullAttentionConfig => FullAttention),
    MemoryEfficient("memory-efficient", MemoryEfficientAttentionConfig => MemoryEfficientAttention),
    LinearTransformer("linear-transformer", LinearTransformerAttentionConfig => LinearTransformerAttention),
    Performer("performer", PerformerAttentionConfig => PerformerAttention),
    Linformer("linformer", LinformerAttentionConfig => LinformerAttention),
    Nystromformer("nystromformer", NystromformerAttentionConfig => NystromformerAttention),
    Synthesizer("synthesizer", SynthesizerAttentionConfig => SynthesizerAttention),
    MemoryCompressedLocal("memory-compressed-local", MemoryCompressedLocalAttentionConfig => MemoryCompressedLocalAttention),
    MemoryCompressed("memory-compressed", MemoryCompressedAttentionConfig => MemoryCompressedAttention),
    ImageTransformer1d("image-transformer-1d", ImageTransformer1dAttentionConfig => ImageTransformer1dAttention),
    ImageTransformer2d("image-transformer-2d", ImageTransformer2dAttentionConfig => ImageTransformer2dAttention),
    SparseTransformer("sparse-transformer", SparseTransformerAttentionConfig => SparseTransformerAttention),
    Longformer("longformer", LongformerAttentionConfig => LongformerAttention),
    Etc("etc", EtcAttentionConfig => EtcAttention),
    Bigbird("bigbird", BigBirdAttentionConfig => BigBirdAttention),
    Axial("axial", AxialAttentionConfig => AxialAttention),
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self::Full(FullAttentionConfig::default())
    }
}

impl AttentionConfig {
    /// The default configuration of the variant called `kind`.
    pub fn from_kind(kind: &str) -> Option<AttentionConfig> {
        Self::all_defaults()
            .into_iter()
            .find(|c| c.info().kind == kind)
    }
}

impl AttentionCore for Attention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        self.as_core().attend(input)
    }

    fn mode(&self) -> AttentionMode {
        self.as_core().mode()
    }

    fn pattern(&self, input: &AttnInput) -> Option<DenseMask> {
        self.as_core().pattern(input)
    }

    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        self.as_core().decode_cache(batch, dims, max_len, device)
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        self.as_core().decode_step(cache, input)
    }
}
