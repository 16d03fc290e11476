//! Incremental decoding: for every registered variant that has a causal mode, decoding a
//! sequence in pieces (a prompt, then one token at a time) gives the same output as one causal
//! forward over the whole sequence; a causal kind without a cache fails unless its
//! `VariantInfo::cannot_decode` says why it cannot (Reformer: LSH chunks depend on the future). The variants are built
//! as their contract specs build them (small windows, blocks and strides, so caches roll over
//! and patterns reach back several blocks).

use burn::tensor::{Device, Tensor};
use efficient_attn::testing::{Case, SeededRng, build_seeded, registered_specs};
use efficient_attn::{AttentionConfig, AttentionCore, AttentionMode, AttnInput, HeadDims};

fn case_input(case: Case, seed: u64, device: &Device) -> AttnInput {
    let mut rng = SeededRng::new(seed);
    AttnInput::new(
        rng.normal_tensor([case.batch, case.heads, case.seq_q, case.d_k], 1.0, device),
        rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_k], 1.0, device),
        rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_v], 1.0, device),
    )
}

#[test]
fn decoding_in_pieces_equals_one_causal_forward_for_every_causal_variant() {
    let device = Device::flex();
    let mode = AttentionMode::Causal;
    let mut checked = Vec::new();
    let mut without_cache = Vec::new();
    for (kind, spec) in registered_specs() {
        if !spec.modes.contains(&mode) {
            continue;
        }
        let case = spec.case(mode, 2, 2, 13, 8);
        let n = case.seq_q;
        let dims = HeadDims::new(case.heads, case.d_k);
        let core = build_seeded(&spec.build, spec.materialize, mode, &case, &device, 1);
        let Some(mut cache) = core.decode_cache(2, dims, n, &device) else {
            let config = efficient_attn::AttentionConfig::from_kind(kind).unwrap();
            if config.info().cannot_decode.is_none() {
                without_cache.push(kind);
            }
            continue;
        };
        let x = spec.decorated(case_input(case, 1, &device), mode);
        let whole = core.attend(x.clone());
        let mut pieces = Vec::new();
        let mut start = 0;
        for len in std::iter::once(5).chain(std::iter::repeat_n(1, n - 5)) {
            let part = |t: &Tensor<4>| t.clone().narrow(2, start, len);
            let mut piece = AttnInput::new(part(&x.query), part(&x.key), part(&x.value));
            // Grid layouts: every step carries the grid of the whole sequence.
            piece.extras.grid = x.extras.grid;
            pieces.push(core.decode_step(&mut cache, piece));
            start += len;
        }
        assert_eq!(cache.len(), n, "{kind}");
        let stepped = Tensor::cat(pieces, 2);
        let diff = stepped.sub(whole).abs().max().into_scalar::<f32>();
        assert!(
            diff < 1e-5,
            "{}: decoding differs from the causal forward by {diff:e}",
            spec.name
        );
        checked.push(spec.name.clone());
    }
    for must in ["full", "memory-efficient", "linear-transformer"] {
        assert!(
            checked.iter().any(|c| c == must),
            "{must} not checked: {checked:?}"
        );
    }
    without_cache.sort_unstable();
    without_cache.dedup();
    assert!(
        without_cache.is_empty(),
        "causal kinds without a decoding cache or a reason: {without_cache:?}"
    );
    eprintln!("decoding checked for {checked:?}");
}

#[test]
#[should_panic(expected = "decoding cache full")]
fn a_full_cache_is_a_clear_error() {
    let device = Device::flex();
    let dims = HeadDims::new(1, 4);
    let core = AttentionConfig::default()
        .init(AttentionMode::Causal, dims, &device)
        .unwrap();
    let mut cache = core.decode_cache(1, dims, 2, &device).unwrap();
    let x = case_input(Case::self_attn(1, 1, 3, 4), 2, &device);
    let _ = core.decode_step(&mut cache, x);
}

#[test]
fn bidirectional_layers_have_no_decoding_cache() {
    let device = Device::flex();
    let dims = HeadDims::new(1, 4);
    let core = AttentionConfig::default()
        .init(AttentionMode::Bidirectional, dims, &device)
        .unwrap();
    assert!(core.decode_cache(1, dims, 4, &device).is_none());
}
