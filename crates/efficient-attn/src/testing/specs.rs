//! The contract of every registered variant: its general configuration for the suite's tiny
//! shapes, and the configurations in which it is exact.
//!
//! Registering a new variant is one `name => spec` line in
//! [`__registered_variants!`](crate::__registered_variants) plus its function here.

use burn::module::Param;
use burn::tensor::{Device, Tensor};

use super::{Case, GradCheck, Oracle, ReferenceFn, Spec};
use crate::config::{Attention, AttentionConfig};
use crate::full::FullAttentionConfig;
use crate::interface::{AttentionMode, AttnInput, HeadDims};
use crate::kernels::prefix_sum;
use crate::linear_transformer::LinearTransformerAttentionConfig;
use crate::linformer::{LinformerAttentionConfig, LinformerSharing};
use crate::mask::causal_mask;
use crate::memory_efficient::MemoryEfficientAttentionConfig;
use crate::nystromformer::NystromformerAttentionConfig;
use crate::performer::{PerformerAttentionConfig, PerformerKernel};
use crate::reference::oracle;
use crate::synthesizer::{Synthesis, SynthesizerAttentionConfig, SynthesizerMixing};

/// Builds `config` for `mode`, panicking with the configuration error (a spec bug).
fn build(config: &AttentionConfig, mode: AttentionMode, case: &Case, device: &Device) -> Attention {
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

/// [`FullAttention`](crate::FullAttention): exact everywhere.
pub fn full() -> Spec<Attention> {
    let config = |_: &Case| FullAttentionConfig::default().into();
    exact_config(from_config(config), "always", Oracle::Full, 1e-5, config)
}

/// [`MemoryEfficientAttention`](crate::MemoryEfficientAttention): exact everywhere; checked
/// with tiny, ragged blocks so every code path (several query and key blocks, a partial last
/// block, causal block skipping) runs.
pub fn memory_efficient() -> Spec<Attention> {
    let tiny_blocks = |_: &Case| {
        MemoryEfficientAttentionConfig {
            query_block: 3,
            key_block: 4,
            scale: None,
        }
        .into()
    };
    let spec = from_config(tiny_blocks);
    let spec = exact_config(spec, "blocks 3 x 4", Oracle::Full, 1e-5, tiny_blocks);
    exact_config(spec, "one block", Oracle::Full, 1e-5, |_| {
        MemoryEfficientAttentionConfig::default().into()
    })
}

/// The masked quadratic form of a kernel variant's own features: what its engine must equal.
fn kernel_reference(
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

/// [`LinearTransformerAttention`](crate::LinearTransformerAttention): its chunked and
/// single-state forms equal the masked quadratic form (chunk 3, so chunks are ragged).
pub fn linear_transformer() -> Spec<Attention> {
    let config = |_: &Case| LinearTransformerAttentionConfig { chunk: 3 }.into();
    let reference: ReferenceFn<Attention> = |core, input, mode| match core {
        Attention::LinearTransformer(a) => kernel_reference(
            a.features(input.query.clone()),
            a.features(input.key.clone()),
            input,
            mode,
        ),
        _ => unreachable!("linear transformer spec"),
    };
    exact_config(
        from_config(config),
        "masked quadratic form",
        Oracle::Reference("masked quadratic form", reference),
        1e-5,
        config,
    )
}

fn performer_with(kernel: PerformerKernel) -> Spec<Attention> {
    let config = move |_: &Case| {
        PerformerAttentionConfig {
            features: 16,
            kernel,
            chunk: 3,
            seed: 5,
            ..Default::default()
        }
        .into()
    };
    let reference: ReferenceFn<Attention> = |core, input, mode| match core {
        Attention::Performer(a) => {
            let (phi_q, phi_k) = a.feature_maps(input);
            kernel_reference(phi_q, phi_k, input, mode)
        }
        _ => unreachable!("performer spec"),
    };
    let mut spec = exact_config(
        from_config(config),
        "masked quadratic form of its features",
        Oracle::Reference("masked quadratic form", reference),
        1e-5,
        config,
    );
    spec.name = format!("performer ({kernel:?} kernel)");
    spec
}

/// [`PerformerAttention`](crate::PerformerAttention) with FAVOR+ softmax features. Its
/// approximation error against softmax is tested separately (it falls like m^-1/2).
pub fn performer() -> Spec<Attention> {
    performer_with(PerformerKernel::Softmax)
}

/// [`PerformerAttention`](crate::PerformerAttention) with ReLU features.
pub fn performer_relu() -> Spec<Attention> {
    // ReLU features have kinks: central differences need a small step.
    performer_with(PerformerKernel::Relu).grad(GradCheck::Central {
        eps: 1e-3,
        tolerance: 3e-2,
    })
}

/// Linformer with `k = N`, `E = F = I`: full attention (without padding: zeroed padded rows
/// still take part in the softmax, see the module docs).
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

/// [`LinformerAttention`](crate::LinformerAttention), one E and one F per layer.
pub fn linformer() -> Spec<Attention> {
    linformer_with(LinformerSharing::Headwise)
}

/// [`LinformerAttention`](crate::LinformerAttention) with E = F.
pub fn linformer_key_value() -> Spec<Attention> {
    linformer_with(LinformerSharing::KeyValue)
}

/// [`NystromformerAttention`](crate::NystromformerAttention): 4 landmarks and a convolution
/// skip in general; one landmark per token and 30 pseudo-inverse iterations is full attention.
pub fn nystromformer() -> Spec<Attention> {
    let config = |_: &Case| {
        NystromformerAttentionConfig {
            landmarks: 4,
            pinv_iterations: 6,
            conv_kernel: Some(3),
        }
        .into()
    };
    exact_config(
        from_config(config),
        "m = N landmarks, 30 iterations",
        Oracle::Full,
        1e-4,
        |case| {
            NystromformerAttentionConfig {
                landmarks: case.seq_k,
                pinv_iterations: 30,
                conv_kernel: None,
            }
            .into()
        },
    )
}

fn synthesizer_with(synthesis: Synthesis) -> Spec<Attention> {
    let config = move |mixing| {
        AttentionConfig::from(SynthesizerAttentionConfig {
            synthesis,
            mixing,
            max_len: 40,
            rank: 3,
            trainable: true,
        })
    };
    let spec = from_config(move |_| config(SynthesizerMixing::Alone));
    let mut spec = spec.exact(
        "mixed with dot product, σ(α) = 0",
        Oracle::Full,
        1e-5,
        move |mode, case, device| {
            let mut core = build(&config(SynthesizerMixing::DotProduct), mode, case, device);
            let Attention::Synthesizer(s) = &mut core else {
                unreachable!("synthesizer spec")
            };
            s.alpha = Some(Param::from_tensor(Tensor::<1>::full(
                [case.heads],
                -1.0e4,
                device,
            )));
            core
        },
    );
    if synthesis == Synthesis::Random {
        let uniform: ReferenceFn<Attention> = |_, input, mode| {
            let mut zero_q = input.clone();
            zero_q.query = input.query.zeros_like();
            oracle(&zero_q, mode, None, None)
        };
        spec = spec.exact(
            "R = 0: uniform weights",
            Oracle::Reference("uniform weights over visible keys", uniform),
            1e-5,
            move |mode, case, device| {
                let mut core = build(&config(SynthesizerMixing::Alone), mode, case, device);
                let Attention::Synthesizer(s) = &mut core else {
                    unreachable!("synthesizer spec")
                };
                s.random = Some(Param::from_tensor(Tensor::<3>::zeros(
                    [case.heads, 40, 40],
                    device,
                )));
                core
            },
        );
    }
    spec.name = format!("synthesizer ({synthesis:?})");
    spec
}

/// [`SynthesizerAttention`](crate::SynthesizerAttention) with a random matrix.
pub fn synthesizer() -> Spec<Attention> {
    synthesizer_with(Synthesis::Random)
}

/// [`SynthesizerAttention`](crate::SynthesizerAttention) with dense synthesis.
pub fn synthesizer_dense() -> Spec<Attention> {
    synthesizer_with(Synthesis::Dense)
}

/// [`SynthesizerAttention`](crate::SynthesizerAttention) with a factorised random matrix.
pub fn synthesizer_factorized() -> Spec<Attention> {
    synthesizer_with(Synthesis::FactorizedRandom)
}
