//! The contract of every registered variant: its general configuration for the suite's tiny
//! shapes, and the configurations in which it is exact.
//!
//! Registering a new variant is one `name => spec` line in
//! [`__registered_variants!`](crate::__registered_variants) plus its function here.

use burn::module::Param;
use burn::tensor::{Device, Tensor};

use super::{Case, GradCheck, Oracle, ReferenceFn, Spec};
use crate::axial::{AxialAttentionConfig, AxialAxes};
use crate::bigbird::BigBirdAttentionConfig;
use crate::config::{Attention, AttentionConfig};
use crate::etc::EtcAttentionConfig;
use crate::full::FullAttentionConfig;
use crate::image_transformer::{
    ImageTransformer1dAttentionConfig, ImageTransformer2dAttentionConfig,
};
use crate::interface::{AttentionMode, AttnInput, GlobalTokens, Grid, HeadDims};
use crate::kernels::prefix_sum;
use crate::linear_transformer::LinearTransformerAttentionConfig;
use crate::linformer::{LinformerAttentionConfig, LinformerSharing};
use crate::longformer::LongformerAttentionConfig;
use crate::mask::causal_mask;
use crate::memory_compressed::{
    MemoryCompressedAttentionConfig, MemoryCompressedLocalAttentionConfig,
};
use crate::memory_efficient::MemoryEfficientAttentionConfig;
use crate::nystromformer::NystromformerAttentionConfig;
use crate::performer::{PerformerAttentionConfig, PerformerKernel};
use crate::reference::oracle;
use crate::sparse_transformer::{SparsePattern, SparseTransformerAttentionConfig};
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

/// A pattern variant: exact on its own pattern, self-attention only (no memory in causal mode).
fn pattern_spec(
    config: impl Fn(&Case) -> AttentionConfig + Send + Sync + Clone + 'static,
) -> Spec<Attention> {
    let c2 = config.clone();
    exact_config(
        from_config(config),
        "realised pattern = dense mask",
        Oracle::Pattern,
        1e-5,
        c2,
    )
    .causal_memory(false)
}

/// [`MemoryCompressedLocalAttention`](crate::MemoryCompressedLocalAttention): blocks of 4 on
/// the pattern; one block covering the input is full (causal full) attention.
pub fn memory_compressed_local() -> Spec<Attention> {
    let spec = pattern_spec(|_| MemoryCompressedLocalAttentionConfig { block: 4 }.into());
    exact_config(spec, "block >= N", Oracle::Full, 1e-5, |case| {
        MemoryCompressedLocalAttentionConfig { block: case.seq_k }.into()
    })
}

/// [`MemoryCompressedAttention`](crate::MemoryCompressedAttention): factor 3 with a null slot;
/// k = 1 with an identity convolution and no null slot is full attention.
pub fn memory_compressed() -> Spec<Attention> {
    let general = |_: &Case| {
        MemoryCompressedAttentionConfig {
            factor: 3,
            null_slot: true,
        }
        .into()
    };
    from_config(general).causal_memory(false).exact(
        "k = 1, identity convolution",
        Oracle::Full,
        1e-5,
        |mode, case, device| {
            let mut core = build(
                &MemoryCompressedAttentionConfig {
                    factor: 1,
                    null_slot: false,
                }
                .into(),
                mode,
                case,
                device,
            );
            let Attention::MemoryCompressed(m) = &mut core else {
                unreachable!("memory-compressed spec")
            };
            let eye = |d: usize| {
                Param::from_tensor(
                    Tensor::<2>::eye(d, device)
                        .reshape([1, d, d])
                        .expand([case.heads, d, d]),
                )
            };
            m.conv_key = eye(case.d_k);
            m.conv_value = eye(case.d_v);
            core
        },
    )
}

/// [`ImageTransformer1dAttention`](crate::ImageTransformer1dAttention): query blocks of 4 with a
/// memory of 3; one block covering the input is full (causal: raster-causal) attention.
pub fn image_transformer_1d() -> Spec<Attention> {
    let spec = pattern_spec(|_| {
        ImageTransformer1dAttentionConfig {
            query_block: 4,
            memory: 3,
        }
        .into()
    });
    exact_config(
        spec,
        "one block covering the image",
        Oracle::Full,
        1e-5,
        |case| {
            ImageTransformer1dAttentionConfig {
                query_block: case.seq_k,
                memory: 0,
            }
            .into()
        },
    )
}

/// A grid of 4 columns for 2-D variants (lengths are rounded up to whole 2 × 2 blocks).
fn grid4(input: AttnInput, _: AttentionMode) -> AttnInput {
    let n = input.query.dims()[2];
    input.with_grid(Grid::new(n / 4, 4))
}

/// [`ImageTransformer2dAttention`](crate::ImageTransformer2dAttention): 2 × 2 query blocks with
/// a 1 × 1 flange on `n/4 × 4` images in block-raster order; one block covering the image is
/// full (causal: block-raster-causal) attention.
pub fn image_transformer_2d() -> Spec<Attention> {
    let mut spec = pattern_spec(|_| {
        ImageTransformer2dAttentionConfig {
            query_shape: [2, 2],
            memory_flange: [1, 1],
        }
        .into()
    });
    spec = exact_config(
        spec,
        "one block covering the image",
        Oracle::Full,
        1e-5,
        |case| {
            ImageTransformer2dAttentionConfig {
                query_shape: [case.seq_k / 4, 4],
                memory_flange: [0, 0],
            }
            .into()
        },
    );
    spec.decorate = Some(grid4);
    spec.fit_len = |n| n.div_ceil(8).max(1) * 8;
    spec
}

fn sparse_with(pattern: SparsePattern) -> Spec<Attention> {
    let config = move |_: &Case| {
        SparseTransformerAttentionConfig {
            pattern,
            stride: 4,
            summary: 2,
        }
        .into()
    };
    let mut spec = pattern_spec(config);
    spec.name = format!("sparse-transformer ({pattern:?})");
    spec
}

/// [`SparseTransformerAttention`](crate::SparseTransformerAttention), strided pattern, l = 4.
pub fn sparse_transformer_strided() -> Spec<Attention> {
    sparse_with(SparsePattern::Strided)
}

/// [`SparseTransformerAttention`](crate::SparseTransformerAttention), fixed pattern, l = 4, c = 2.
pub fn sparse_transformer_fixed() -> Spec<Attention> {
    sparse_with(SparsePattern::Fixed)
}

/// The first token is global (like a CLS token) except in causal mode.
fn first_token_global(input: AttnInput, mode: AttentionMode) -> AttnInput {
    if mode.is_causal() {
        input
    } else {
        input.with_global(GlobalTokens::Prefix(1))
    }
}

fn longformer_with(dilation: Vec<usize>) -> Spec<Attention> {
    let d2 = dilation.clone();
    let mut spec = pattern_spec(move |case| {
        LongformerAttentionConfig {
            window: 2,
            // Cycled over the heads of the case.
            dilation: (0..case.heads).map(|h| d2[h % d2.len()]).collect(),
            global_projections: false,
        }
        .into()
    });
    spec = exact_config(spec, "w >= N", Oracle::Full, 1e-5, |case| {
        LongformerAttentionConfig {
            window: case.seq_k,
            dilation: vec![1],
            global_projections: false,
        }
        .into()
    });
    spec.decorate = Some(first_token_global);
    spec.name = format!("longformer (dilation {dilation:?})");
    spec
}

/// [`LongformerAttention`](crate::LongformerAttention), window 2 per side, the first token
/// global (bidirectional).
pub fn longformer() -> Spec<Attention> {
    longformer_with(vec![1])
}

/// [`LongformerAttention`](crate::LongformerAttention) with dilations 1 and 2 on the two heads.
pub fn longformer_dilated() -> Spec<Attention> {
    longformer_with(vec![1, 2])
}

/// Two global tokens (ETC's prefix).
fn two_global(input: AttnInput, _: AttentionMode) -> AttnInput {
    input.with_global(GlobalTokens::Prefix(2))
}

/// [`EtcAttention`](crate::EtcAttention): radius 2 with two global tokens; a radius covering
/// the input is full attention over concat(global, long).
pub fn etc() -> Spec<Attention> {
    let mut spec = pattern_spec(|_| EtcAttentionConfig { radius: 2 }.into());
    spec = exact_config(
        spec,
        "radius covering the input",
        Oracle::Full,
        1e-5,
        |case| EtcAttentionConfig { radius: case.seq_k }.into(),
    );
    spec.decorate = Some(two_global);
    spec
}

/// [`BigBirdAttention`](crate::BigBirdAttention): blocks of 2, one random block; with at most
/// two blocks everything is global and it is full attention.
pub fn bigbird() -> Spec<Attention> {
    let spec = pattern_spec(|_| {
        BigBirdAttentionConfig {
            block: 2,
            random_blocks: 1,
            seed: 3,
        }
        .into()
    });
    exact_config(spec, "all blocks global", Oracle::Full, 1e-5, |case| {
        BigBirdAttentionConfig {
            block: case.seq_k.div_ceil(2),
            random_blocks: 1,
            seed: 3,
        }
        .into()
    })
}

/// A grid with as many rows as possible up to √n.
fn square_grid(input: AttnInput, _: AttentionMode) -> AttnInput {
    let n = input.query.dims()[2];
    let rows = (1..=n)
        .filter(|r| n.is_multiple_of(*r) && r * r <= n)
        .max()
        .unwrap_or(1);
    input.with_grid(Grid::new(rows, n / rows))
}

/// [`AxialAttention`](crate::AxialAttention): rows plus columns; each axis alone equals the
/// dense same-row / same-column mask.
pub fn axial() -> Spec<Attention> {
    let mut spec = from_config(|_| {
        AxialAttentionConfig {
            axes: AxialAxes::Sum,
        }
        .into()
    })
    .causal_memory(false);
    spec = exact_config(
        spec,
        "row axis = same-row mask",
        Oracle::Pattern,
        1e-5,
        |_| {
            AxialAttentionConfig {
                axes: AxialAxes::Row,
            }
            .into()
        },
    );
    spec = exact_config(
        spec,
        "column axis = same-column mask",
        Oracle::Pattern,
        1e-5,
        |_| {
            AxialAttentionConfig {
                axes: AxialAxes::Column,
            }
            .into()
        },
    );
    spec.decorate = Some(square_grid);
    spec
}
