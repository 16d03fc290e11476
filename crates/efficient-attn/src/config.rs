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
//!
//! Both enums, their conversions and their dispatch are generated from the registry in
//! `lib.rs` (`__registered_variants!`): a variant is its own file plus one line there.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Tensor};

use crate::decoding::DecodeCache;
use crate::error::ConfigError;
use crate::extras::{Grid, SharedParameterSpec};
use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, CoreConfig, HeadDims, VariantInfo,
};
use crate::*;

/// Declares the config enum, the module enum, their conversions and the dispatch from the
/// registry's list.
#[doc(hidden)]
#[macro_export]
macro_rules! __attention_enums {
    ($(;)? $($module:ident { $($variant:ident($kind:literal, $config:ident => $core:ident)),+ $(,)? }),* $(,)?) => {
        /// Any attention variant, selected by `kind`.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(crate = "burn::serde", tag = "kind")]
        #[non_exhaustive]
        pub enum AttentionConfig {
            $($(
                #[doc = concat!("[`", stringify!($core), "`].")]
                #[serde(rename = $kind)]
                $variant($config),
            )+)*
        }

        impl AttentionConfig {
            /// Every `kind`, in registry order.
            pub const KINDS: &'static [&'static str] = &[$($($kind),+),*];

            /// Deserialises the variant `kind` from the rest of its table (everything but the
            /// `kind` key). Errors then carry the field path when the deserializer tracks one
            /// (e.g. through `serde_path_to_error`), which the buffered `kind`-tagged form
            /// cannot.
            pub fn deserialize_kind<'de, D: burn::serde::Deserializer<'de>>(
                kind: &str,
                deserializer: D,
            ) -> Result<Self, D::Error> {
                $($(
                    if kind == $kind {
                        return <$config as Deserialize>::deserialize(deserializer).map(Self::$variant);
                    }
                )+)*
                Err(<D::Error as burn::serde::de::Error>::unknown_variant(kind, Self::KINDS))
            }

            /// The default configuration of every variant, in the order
            /// `efformer attention list` prints them.
            pub fn all_defaults() -> Vec<AttentionConfig> {
                vec![$($(Self::$variant(Default::default())),+),*]
            }
        }

        impl CoreConfig for AttentionConfig {
            type Core = Attention;

            fn info(&self) -> &'static VariantInfo {
                match self {
                    $($(Self::$variant(c) => c.info(),)+)*
                }
            }

            fn init(
                &self,
                mode: AttentionMode,
                dims: HeadDims,
                device: &Device,
            ) -> Result<Attention, ConfigError> {
                Ok(match self {
                    $($(Self::$variant(c) => Attention::$variant(c.init(mode, dims, device)?),)+)*
                })
            }

            fn max_len(&self) -> Option<usize> {
                match self {
                    $($(Self::$variant(c) => c.max_len(),)+)*
                }
            }

            fn with_max_len(&self, max_len: usize) -> Self {
                match self {
                    $($(Self::$variant(c) => Self::$variant(c.with_max_len(max_len)),)+)*
                }
            }

            fn fit_grid(&self, grid: Grid) -> Self {
                match self {
                    $($(Self::$variant(c) => Self::$variant(c.fit_grid(grid)),)+)*
                }
            }

            fn global_projections(&self) -> bool {
                match self {
                    $($(Self::$variant(c) => c.global_projections(),)+)*
                }
            }

            fn layer_shared(&self, dims: HeadDims) -> Option<SharedParameterSpec> {
                match self {
                    $($(Self::$variant(c) => c.layer_shared(dims),)+)*
                }
            }

            fn shared_qk(&self) -> bool {
                match self {
                    $($(Self::$variant(c) => c.shared_qk(),)+)*
                }
            }

            fn for_layer(&self, layer: usize) -> Self {
                match self {
                    $($(Self::$variant(c) => Self::$variant(c.for_layer(layer)),)+)*
                }
            }

            fn memory_estimate(
                &self,
                n: usize,
                batch: usize,
                heads: usize,
                backward: bool,
                device: &Device,
            ) -> Option<u64> {
                match self {
                    $($(Self::$variant(c) => c.memory_estimate(n, batch, heads, backward, device),)+)*
                }
            }
        }

        $($(
            impl From<$config> for AttentionConfig {
                fn from(c: $config) -> Self {
                    Self::$variant(c)
                }
            }
        )+)*

        /// Any attention variant as a module. Models hold this enum, so their types stay
        /// concrete.
        #[derive(Module, Debug)]
        #[non_exhaustive]
        // Built once per layer and never moved on a hot path; boxing would only add indirection.
        #[allow(clippy::large_enum_variant)]
        pub enum Attention {
            $($(
                #[doc = concat!("[`", stringify!($core), "`].")]
                $variant($core),
            )+)*
        }

        impl Attention {
            /// The variant behind this module.
            pub fn as_core(&self) -> &dyn AttentionCore {
                match self {
                    $($(Self::$variant(a) => a,)+)*
                }
            }

            /// The variant after optimiser step `step` ([`AttentionCore::at_step`]).
            fn variant_at_step(self, step: usize) -> Self {
                match self {
                    $($(Self::$variant(a) => Self::$variant(a.at_step(step)),)+)*
                }
            }
        }
    };
}

crate::__registered_variants!(__attention_enums,);

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

    /// The default configuration of `kind`, or an error listing the kinds.
    ///
    /// # Errors
    /// An unknown kind.
    pub fn try_from_kind(kind: &str) -> Result<AttentionConfig, String> {
        Self::from_kind(kind).ok_or_else(|| {
            format!(
                "unknown attention kind `{kind}`: expected one of {}",
                Self::KINDS.join(", ")
            )
        })
    }

    /// What the selected variant is (also [`CoreConfig::info`]).
    pub fn info(&self) -> &'static VariantInfo {
        CoreConfig::info(self)
    }

    /// Builds the variant for `mode` and the head layout `dims` on `device` (also
    /// [`CoreConfig::init`]).
    ///
    /// # Errors
    /// A mode the variant does not support, or a field it cannot use.
    pub fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<Attention, ConfigError> {
        CoreConfig::init(self, mode, dims, device)
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

    fn at_step(self, step: usize) -> Self {
        self.variant_at_step(step)
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

    fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.as_core().aux_loss(device)
    }
}
