//! The contract suite on a core defined outside efformer's crates, against an independent dense
//! computation (explicit score matrix, masked softmax) of the same function.

use burn::tensor::Device;
use custom_attention::{CosineAttention, CosineAttentionConfig, unit};
use efficient_attn::testing::{Case, Oracle, ReferenceFn, Spec, materialize, oracle};
use efficient_attn::{AttentionMode, AttnInput, CoreConfig, HeadDims};

fn build(mode: AttentionMode, case: &Case, device: &Device) -> CosineAttention {
    let dims = HeadDims {
        heads: case.heads,
        d_k: case.d_k,
        d_v: case.d_v,
    };
    CosineAttentionConfig { initial_scale: 4.0 }
        .init(mode, dims, device)
        .expect("a valid config")
}

/// Normalised, scaled queries and normalised keys through the suite's dense oracle.
fn dense_cosine(
    core: &CosineAttention,
    input: &AttnInput,
    mode: AttentionMode,
) -> burn::tensor::Tensor<4> {
    let mut scaled = input.clone();
    scaled.query = unit(input.query.clone()).mul(core.scale());
    scaled.key = unit(input.key.clone());
    oracle(&scaled, mode, None, Some(1.0))
}

fn spec() -> Spec<CosineAttention> {
    let reference: ReferenceFn<CosineAttention> = dense_cosine;
    let mut spec = Spec::new("cosine", &AttentionMode::ALL, build).exact(
        "dense cosine attention",
        Oracle::Reference("dense cosine attention", reference),
        1e-5,
        build,
    );
    spec.materialize = Some(materialize::<CosineAttention>);
    spec
}

efficient_attn::contract_tests_for!(cosine, spec(), Device::flex());

/// Decoding token by token equals the causal forward (the core opted into a key/value cache).
#[test]
fn causal_decoding_equals_the_forward() {
    use burn::tensor::Tensor;
    use efficient_attn::AttentionCore;
    let device = Device::flex();
    let case = Case::self_attn(2, 2, 9, 8);
    let core = build(AttentionMode::Causal, &case, &device);
    let x = efficient_attn::testing::random_input(&case, 3, &device);
    let whole = core.attend(x.clone());
    let mut cache = core
        .decode_cache(2, HeadDims::new(2, 8), 9, &device)
        .expect("causal layers decode");
    let steps: Vec<Tensor<4>> = (0..9)
        .map(|t| {
            let part = |v: &Tensor<4>| v.clone().narrow(2, t, 1);
            core.decode_step(
                &mut cache,
                AttnInput::new(part(&x.query), part(&x.key), part(&x.value)),
            )
        })
        .collect();
    let diff = Tensor::cat(steps, 2)
        .sub(whole)
        .abs()
        .max()
        .into_scalar::<f32>();
    assert!(diff < 1e-5, "{diff}");
}
