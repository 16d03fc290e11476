//! Linformer: softmax attention over keys and values projected along the sequence.
//!
//! - Paper: Wang, Li, Khabsa, Fang and Ma 2020, "Linformer: Self-Attention with Linear
//!   Complexity", arXiv:2006.04768.
//! - Computation: `K' = E·K`, `V' = F·V` with learned `E, F ∈ R^{k × N_max}` (sliced to the
//!   first `N` columns for shorter inputs), then exact softmax attention of the N queries over
//!   the k projected keys.
//! - Sharing (paper §4): `headwise` (one E and one F per layer, shared by its heads; the
//!   default), `key-value` (one matrix for both, E = F), `layerwise` (one matrix for every
//!   layer: the model owns it and passes it in [`SharedParameter`] side input).
//! - Cost: O(N·k·d) time, O(N·k) memory; parameters 2·k·N_max per layer (k·N_max shared).
//! - Exact: no: a rank-k approximation. With k = N and E = F = I it is full attention (tested).
//! - Modes: bidirectional and cross (the context is projected). Causal is a configuration
//!   error: projecting along the sequence mixes every future position into every projected key.
//! - Padding: padded rows of K and V are zeroed before projecting (the LRA reference ignores
//!   masks, which leaks padding into every key). Zeroed rows still count as projected mass, so
//!   an input padded to N_max and the same input unpadded give (slightly) different outputs;
//!   changing the padded *values* changes nothing.
//! - Maximum length: N_max is fixed at init; a longer input panics with a message naming both.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Tensor};

use crate::error::ConfigError;
use crate::kernels::dense::padded_attention;
use crate::extras::{SharedParameter, SharedParameterSpec};
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};

/// Which projections Linformer shares (paper §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum LinformerSharing {
    /// One E and one F per layer, shared across heads.
    #[default]
    Headwise,
    /// One projection per layer for both keys and values (E = F).
    KeyValue,
    /// One projection for keys and values of every layer, owned by the model and passed in
    /// [`SharedParameter`] side input.
    Layerwise,
}

/// The projections' initialisation bound, U(±1/√k) as lucidrains/linformer.
fn projection_bound(k: usize) -> f64 {
    1.0 / (k as f64).sqrt()
}

/// Configuration of [`LinformerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct LinformerAttentionConfig {
    /// Projected length (paper: k = 256; LRA: 16).
    pub k: usize,
    /// Maximum sequence length N_max the projections are sized for.
    pub max_len: usize,
    /// Sharing mode (paper: headwise).
    pub sharing: LinformerSharing,
}

impl Default for LinformerAttentionConfig {
    fn default() -> Self {
        Self {
            k: 256,
            max_len: 4096,
            sharing: LinformerSharing::Headwise,
        }
    }
}

impl LinformerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "linformer",
        paper: "Wang et al. 2020, Linformer: Self-Attention with Linear Complexity, arXiv:2006.04768",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Cross],
        time: "O(N·k·d)",
        memory: "O(N·k)",
        exactness: Exactness::Approximate("rank-k projection; exact with k = N, E = F = I"),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for LinformerAttentionConfig {
    type Core = LinformerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<LinformerAttention, ConfigError> {
        let _ = dims;
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "projecting keys along the sequence mixes future positions into every projected key",
        )?;
        ConfigError::check_nonzero("k", self.k)?;
        ConfigError::check_nonzero("max_len", self.max_len)?;
        let bound = projection_bound(self.k);
        let init = Initializer::Uniform {
            min: -bound,
            max: bound,
        };
        let projection = || init.init([self.k, self.max_len], device);
        let (e, f) = match self.sharing {
            LinformerSharing::Headwise => (Some(projection()), Some(projection())),
            LinformerSharing::KeyValue => (Some(projection()), None),
            LinformerSharing::Layerwise => (None, None),
        };
        Ok(LinformerAttention {
            e,
            f,
            mode,
            max_len: self.max_len,
            k: self.k,
        })
    }

    fn max_len(&self) -> Option<usize> {
        Some(self.max_len)
    }

    fn with_max_len(&self, max_len: usize) -> Self {
        Self {
            max_len,
            ..self.clone()
        }
    }

    /// Layerwise sharing: one `[k, max_len]` projection for every layer, initialised as the
    /// per-layer ones.
    fn layer_shared(&self, _: HeadDims) -> Option<SharedParameterSpec> {
        (self.sharing == LinformerSharing::Layerwise).then(|| SharedParameterSpec {
            shape: [self.k, self.max_len],
            bound: projection_bound(self.k),
        })
    }
}

/// Linformer attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct LinformerAttention {
    /// Key projection E, `[k, max_len]` (`None` when shared across layers).
    pub e: Option<Param<Tensor<2>>>,
    /// Value projection F, `[k, max_len]` (`None` when E is used for values too).
    pub f: Option<Param<Tensor<2>>>,
    #[module(skip)]
    mode: AttentionMode,
    max_len: usize,
    k: usize,
}

impl LinformerAttention {
    /// The maximum input length N_max.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Projects `[batch, heads, n, d]` along the sequence with the first `n` columns of `p`.
    ///
    /// # Shapes
    /// - p: `[k, max_len]`, x: `[batch, heads, n, d]` → `[batch, heads, k, d]`
    fn project(p: Tensor<2>, x: Tensor<4>) -> Tensor<4> {
        let [b, h, n, d] = x.dims();
        let k = p.dims()[0];
        let p = p.narrow(1, 0, n).reshape([1, k, n]).expand([b * h, k, n]); // [batch * heads, k, n]
        p.matmul(x.reshape([b * h, n, d])).reshape([b, h, k, d])
    }
}

impl AttentionCore for LinformerAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    ///
    /// # Panics
    /// If `seq_k` exceeds the `max_len` the layer was built with, or a layerwise-shared layer
    /// gets no [`SharedParameter`] side input.
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [b, h, _, lk, _, _] = input.dims();
        assert!(
            lk <= self.max_len,
            "linformer: input length {lk} exceeds max_len {} fixed at init; rebuild with a larger max_len",
            self.max_len
        );
        let (e, f) = match (&self.e, &self.f, input.extras.side.get::<SharedParameter>()) {
            (Some(e), Some(f), _) => (e.val(), f.val()),
            (Some(e), None, _) => (e.val(), e.val()),
            (None, _, Some(shared)) => (shared.0.clone(), shared.0.clone()),
            (None, _, None) => panic!(
                "linformer (layerwise sharing): the model must pass the shared projection as a SharedParameter side input"
            ),
        };
        assert!(
            e.dims()[1] >= lk,
            "linformer: projection covers {} positions, input has {lk}",
            e.dims()[1]
        );
        // Padded keys and values must not leak into the projections.
        let (key, value) = match &input.mask_pad_k {
            Some(pad) => {
                let [_, _, _, dk] = input.key.dims();
                let [_, _, _, dv] = input.value.dims();
                let m = pad.clone().reshape([b, 1, lk, 1]);
                (
                    input.key.mask_fill(m.clone().expand([b, h, lk, dk]), 0.0),
                    input.value.mask_fill(m.expand([b, h, lk, dv]), 0.0),
                )
            }
            None => (input.key, input.value),
        };
        let key = Self::project(e, key); // [batch, heads, k, d_k]
        let value = Self::project(f, value); // [batch, heads, k, d_v]
        let scale = 1.0 / (input.query.dims()[3] as f64).sqrt();
        padded_attention(input.query, key, value, None, scale)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};
    use burn::module::Param;

    /// With `k = N`, `E = F = I`: full attention (without padding: zeroed padded rows still
    /// take part in the softmax, see the module docs).
    fn linformer_with(sharing: LinformerSharing) -> Spec<Attention> {
        let config = move |_: &Case| {
            LinformerAttentionConfig {
                k: 5,
                max_len: 40,
                sharing,
            }
            .into()
        };
        let mut spec = from_config(config).exact_unpadded(
            "k = N, E = F = I",
            Oracle::Full,
            1e-5,
            move |mode, case, device| {
                let n = case.seq_k;
                let mut core = build(
                    &LinformerAttentionConfig {
                        k: n,
                        max_len: n,
                        sharing,
                    }
                    .into(),
                    mode,
                    case,
                    device,
                );
                let Attention::Linformer(l) = &mut core else {
                    unreachable!("linformer spec")
                };
                let eye = || Param::from_tensor(Tensor::<2>::eye(n, device));
                l.e = l.e.as_ref().map(|_| eye());
                l.f = l.f.as_ref().map(|_| eye());
                core
            },
        );
        spec.name = format!("linformer ({sharing:?})");
        spec
    }

    /// One E and one F per layer, and E = F.
    impl Contract for LinformerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            vec![
                linformer_with(LinformerSharing::Headwise),
                linformer_with(LinformerSharing::KeyValue),
            ]
        }
    }
}
