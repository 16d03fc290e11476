//! Helpers for writing the contract of a variant selected through
//! [`AttentionConfig`]: build it from a config, add exact regimes, the kernel reference, the
//! pattern oracle, and the extras (grid, global tokens) the suite's inputs need. Each variant's
//! own contract is in its file ([`Contract`](super::Contract)).

use burn::tensor::{Device, Tensor};

use super::{Case, Oracle, PatternFn, Spec};
use crate::config::{Attention, AttentionConfig};
use crate::extras::{GlobalTokens, Grid, WithExtras};
use crate::interface::{AttentionMode, AttnInput, HeadDims};
use crate::kernels::prefix_sum;
use crate::mask::causal_mask;

/// Builds `config` for `mode`, panicking with the configuration error (a spec bug).
pub fn build(
    config: &AttentionConfig,
    mode: AttentionMode,
    case: &Case,
    device: &Device,
) -> Attention {
    let dims = HeadDims {
        heads: case.heads,
        d_k: case.d_k,
        d_v: case.d_v,
    };
    config
        .init(mode, dims, device)
        .unwrap_or_else(|e| panic!("contract spec builds an invalid config: {e}"))
}

/// A spec whose variant is built from `config(case)`, with the modes its info lists.
pub fn from_config(
    config: impl Fn(&Case) -> AttentionConfig + Send + Sync + Clone + 'static,
) -> Spec<Attention> {
    let info = config(&Case::self_attn(1, 1, 1, 1)).info();
    let mut spec = Spec::new(info.kind, info.modes, move |mode, case, device| {
        build(&config(case), mode, case, device)
    });
    spec.materialize = Some(super::materialize::<Attention>);
    spec
}

/// Exact when built from `config(case)`.
pub fn exact_config(
    spec: Spec<Attention>,
    name: &'static str,
    oracle: Oracle<Attention>,
    tolerance: f64,
    config: impl Fn(&Case) -> AttentionConfig + Send + Sync + 'static,
) -> Spec<Attention> {
    spec.exact(name, oracle, tolerance, move |mode, case, device| {
        build(&config(case), mode, case, device)
    })
}

/// The masked quadratic form of a kernel variant's own features: what its engine must equal.
pub fn kernel_reference(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    input: &AttnInput,
    mode: AttentionMode,
) -> Tensor<4> {
    let phi_k = prefix_sum::zero_padded(phi_k, input.mask_pad_k.as_ref());
    let [b, h, lq, lk, _, _] = input.dims();
    let mask = mode.is_causal().then(|| {
        causal_mask(lq, lk, &input.query.device())
            .reshape([1, 1, lq, lk])
            .expand([b, h, lq, lk])
    });
    prefix_sum::masked_quadratic(phi_q, phi_k, input.value.clone(), mask)
}

/// A pattern variant: exact on its own pattern, self-attention only (no memory in causal mode).
pub fn pattern_spec(
    config: impl Fn(&Case) -> AttentionConfig + Send + Sync + Clone + 'static,
    pattern: PatternFn<Attention>,
) -> Spec<Attention> {
    let c2 = config.clone();
    exact_config(
        from_config(config),
        "realised pattern = dense mask",
        Oracle::Pattern(pattern),
        1e-5,
        c2,
    )
    .causal_memory(false)
}

/// A grid of 4 columns for 2-D variants (lengths are rounded up to whole 2 × 2 blocks).
pub fn grid4(input: AttnInput, _: AttentionMode) -> AttnInput {
    let n = input.query.dims()[2];
    input.with_grid(Grid::new(n / 4, 4))
}

/// A grid with as many rows as possible up to √n.
pub fn square_grid(input: AttnInput, _: AttentionMode) -> AttnInput {
    let n = input.query.dims()[2];
    input.with_grid(Grid::near_square(n))
}

/// The first token is global (like a CLS token) except in causal mode.
pub fn first_token_global(input: AttnInput, mode: AttentionMode) -> AttnInput {
    if mode.is_causal() {
        input
    } else {
        input.with_global(GlobalTokens::Prefix(1))
    }
}

/// Two global tokens (ETC's prefix).
pub fn two_global(input: AttnInput, _: AttentionMode) -> AttnInput {
    input.with_global(GlobalTokens::Prefix(2))
}
