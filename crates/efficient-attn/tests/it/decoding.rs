//! Incremental decoding: for every variant that has a causal mode, decoding a sequence in
//! pieces (one token at a time, or a prompt then tokens) with the variant's cache gives the same
//! output as one causal forward over the whole sequence.

use burn::tensor::{Device, Tensor};
use efficient_attn::rng::SeededRng;
use efficient_attn::testing::Case;
use efficient_attn::{
    AttentionConfig, AttentionCore, AttentionMode, AttnInput, DecodeCache, HeadDims,
};

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
    let dims = HeadDims::new(2, 8);
    let n = 13;
    let mut checked = Vec::new();
    let mut without_cache = Vec::new();
    for kind in AttentionConfig::KINDS {
        let config = match *kind {
            // Sized by a maximum length.
            "synthesizer" => efficient_attn::SynthesizerAttentionConfig {
                max_len: n,
                ..Default::default()
            }
            .into(),
            "longformer" => efficient_attn::LongformerAttentionConfig {
                window: 3,
                ..Default::default()
            }
            .into(),
            _ => AttentionConfig::from_kind(kind).unwrap(),
        };
        if !config.info().supports(AttentionMode::Causal) {
            continue;
        }
        let core = config.init(AttentionMode::Causal, dims, &device).unwrap();
        let Some(mut cache) = core.decode_cache(2, dims, n, &device) else {
            without_cache.push(*kind);
            continue;
        };
        let x = case_input(Case::self_attn(2, 2, n, 8), 1, &device);
        let whole = core.attend(x.clone());
        // A prompt of 5 positions, then one token at a time.
        let mut pieces = Vec::new();
        let mut start = 0;
        for len in std::iter::once(5).chain(std::iter::repeat_n(1, n - 5)) {
            let part = |t: &Tensor<4>| t.clone().narrow(2, start, len);
            pieces.push(core.decode_step(
                &mut cache,
                AttnInput::new(part(&x.query), part(&x.key), part(&x.value)),
            ));
            start += len;
        }
        assert_eq!(cache.len(), n);
        let stepped = Tensor::cat(pieces, 2);
        let diff = stepped.sub(whole).abs().max().into_scalar::<f32>();
        assert!(
            diff < 1e-5,
            "{kind}: decoding differs from the causal forward by {diff:e}"
        );
        checked.push(*kind);
    }
    assert!(
        checked.contains(&"full") && checked.contains(&"performer"),
        "{checked:?}"
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
    let _: Option<DecodeCache> = None;
}
