//! ETC: global-local attention between a few global tokens and a long input.
//!
//! - Paper: Ainslie et al. 2020, "ETC: Encoding Long and Structured Inputs in Transformers",
//!   arXiv:2004.08483; reference google-research/google-research `etcmodel/layers/attention.py`
//!   (`FusedGlobalLocalAttention`).
//! - The n_g global tokens are a **prefix** of the sequence (`GlobalTokens::Prefix(n_g)`): the
//!   sequence is `concat(global, long)`, as the paper's exact-reduction statement has it. The
//!   four pieces share one softmax per query: long queries see the long tokens within `radius`
//!   r (l2l) and every global token (l2g); global queries see every global (g2g) and every long
//!   token (g2l).
//! - Computation: l2l on the shared block-sparse kernel (blocks of r, look-around of one block,
//!   band |i − j| ≤ r) with the global keys as extra keys; global rows as dense rows over all
//!   keys. Cost O(n_g² + n_g·n_l + n_l·(2r+1)) · d time, O(n_l·(3r + n_g) + n_g·N) memory.
//! - Exact: softmax attention on its pattern (tested against the dense mask); with r covering
//!   the input and shared projections it is full attention over `concat(global, long)`.
//! - Modes: bidirectional only. Causal is a configuration error: global tokens attend to the
//!   whole long input (g2l), so no order can be respected (the survey: ETC "cannot be used to
//!   autoregressively decode"). Cross is a configuration error too.
//! - Deviations: one set of projections for all four pieces (ETC's default
//!   `share_qkv_projections`); ETC's relative position embeddings and hard g2l/l2g masks are
//!   not implemented.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Tensor};

use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::extras::{GlobalTokens};
use crate::kernels::block_sparse::{
    BlockPlan, BlockSparse, ElementRule, ExtraKeys, block_sparse_attention,
};
use crate::kernels::dense::padded_attention;

/// Configuration of [`EtcAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct EtcAttentionConfig {
    /// Local radius r of long-to-long attention (paper: 84).
    pub radius: usize,
}

impl Default for EtcAttentionConfig {
    fn default() -> Self {
        Self { radius: 84 }
    }
}

impl EtcAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "etc",
        paper: "Ainslie et al. 2020, ETC: Encoding Long and Structured Inputs in Transformers, arXiv:2004.08483",
        modes: &[AttentionMode::Bidirectional],
        time: "O((n_g² + n_g·n_l + n_l·(2r+1))·d)",
        memory: "O(n_l·(3r + n_g) + n_g·N)",
        exactness: Exactness::ExactWhen(
            "on its global-local pattern (full when r covers the input)",
        ),
        needs_grid: false,
        global_tokens: true,
        cannot_decode: None,
    };

}

impl CoreConfig for EtcAttentionConfig {
    type Core = EtcAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<EtcAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "global tokens attend to the whole long input (g2l), so no causal order can hold",
        )?;
        ConfigError::check_nonzero("radius", self.radius)?;
        Ok(EtcAttention {
            mode,
            radius: self.radius,
        })
    }
}

/// ETC global-local attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct EtcAttention {
    #[module(skip)]
    mode: AttentionMode,
    radius: usize,
}

impl EtcAttention {
    fn globals(input: &AttnInput, n: usize) -> usize {
        match &input.extras.global {
            None => 0,
            Some(GlobalTokens::Prefix(g)) => (*g).min(n),
            Some(_) => {
                panic!("ETC's global tokens are a prefix of the sequence: use GlobalTokens::Prefix")
            }
        }
    }
}

impl AttentionCore for EtcAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]; `global = Prefix(n_g)` marks the global tokens
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [b, _, n, lk, dk, _] = input.dims();
        assert_eq!(
            n, lk,
            "ETC attention is self-attention over concat(global, long)"
        );
        let g = Self::globals(&input, n);
        let nl = n - g;
        let q = input.query.mul_scalar(1.0 / (dk as f64).sqrt());
        let part = |t: &Tensor<4>, start: usize, len: usize| t.clone().narrow(2, start, len);
        let pad = input.mask_pad_k.as_ref();
        let mut rows = Vec::new();
        if g > 0 {
            // g2g and g2l: dense rows over every key.
            rows.push(padded_attention(
                part(&q, 0, g),
                input.key.clone(),
                input.value.clone(),
                pad,
                1.0,
            ));
        }
        if nl > 0 {
            // l2l in the window, l2g as extra keys.
            let r = self.radius.min(nl);
            let nb = nl.div_ceil(r);
            let plan = BlockPlan::look_around(r, nb, nb, 1, 1);
            let extra = (g > 0).then(|| ExtraKeys {
                key: part(&input.key, 0, g),
                value: part(&input.value, 0, g),
                mask: pad.map(|p| {
                    p.clone()
                        .narrow(1, 0, g)
                        .reshape([b, 1, 1, g])
                        .expand([b, 1, nl, g])
                }),
            });
            let long_pad = pad.map(|p| p.clone().narrow(1, g, nl));
            rows.push(block_sparse_attention(BlockSparse {
                query: part(&q, g, nl),
                key: part(&input.key, g, nl),
                value: part(&input.value, g, nl),
                mask_pad_k: long_pad.as_ref(),
                plan: &plan,
                rule: ElementRule::Band { left: r, right: r },
                extra,
            }));
        }
        Tensor::cat(rows, 2)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

}

#[cfg(feature = "testing")]
impl EtcAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        let [_, _, n, lk, _, _] = input.dims();
        let g = Self::globals(input, n);
        Some(crate::mask::DenseMask::from_allowed(n, lk, |i, j| {
            i < g || j < g || i.abs_diff(j) <= self.radius
        }))
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Contract, Oracle, Spec};

    /// Radius 2 with two global tokens; a radius covering the input is full attention over
    /// concat(global, long).
    impl Contract for EtcAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let mut spec = pattern_spec(
                |_| EtcAttentionConfig { radius: 2 }.into(),
                |core, input| match core {
                    Attention::Etc(a) => a.pattern(input),
                    _ => None,
                },
            );
            spec = exact_config(
                spec,
                "radius covering the input",
                Oracle::Full,
                1e-5,
                |case| EtcAttentionConfig { radius: case.seq_k }.into(),
            );
            spec.decorate = Some(two_global);
            vec![spec]
        }
    }
}
