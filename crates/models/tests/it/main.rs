//! Whole-model tests on tiny shapes: padding invariance of an encoder, causality of a decoder,
//! cross-attention masking, incremental decoding, per-layer attention, config errors, presets
//! (over 600 lines: these share the tiny-model fixtures the sibling test files import).

mod compressive;
mod funnel;
mod fused;
mod memory;
mod mixture_of_experts;
mod pretrained;
mod reversible;
mod set_transformer;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use efficient_attn::padding_mask;
use efficient_attn::{
    AttentionConfig, LinearTransformerAttentionConfig, LinformerAttentionConfig,
    MemoryCompressedAttentionConfig, MemoryEfficientAttentionConfig, PerformerAttentionConfig,
    SparsePattern, SparseTransformerAttentionConfig, Stride, SynthesizerAttentionConfig,
    WithExtras,
};
use models::{
    ClassifierConfig, EmbeddingSettings, EncoderConfig, EncoderInput, FeedForwardKind,
    LanguageModelConfig, NormKind, NormPlacement, Pooling, PositionKind, Sampler, Seq2SeqConfig,
    StackConfig,
};

fn tokens(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let n = rows[0].len();
    let data: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), n]), device)
}

fn stack(attention: impl Into<AttentionConfig>) -> StackConfig {
    StackConfig {
        n_layers: 2,
        d_model: 16,
        n_heads: 2,
        d_ff: 32,
        dropout: 0.0,
        ..Default::default()
    }
    .with_attention(attention)
}

fn embedding(positions: PositionKind) -> EmbeddingSettings {
    EmbeddingSettings {
        vocab_size: 20,
        max_len: 32,
        positions,
        dropout: 0.0,
        ..Default::default()
    }
}

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    a.sub(b).abs().max().into_scalar::<f32>()
}

/// The largest difference between `lm`'s logits for `seq` from one forward and from
/// incremental decoding: the first `prompt` tokens at once, then one token at a time.
fn decoding_error(lm: &models::LanguageModel, seq: Tensor<2, Int>, prompt: usize) -> f32 {
    let [batch, n] = seq.dims();
    let whole = lm.forward(seq.clone(), None);
    let mut state = lm.init_state(batch, n, &seq.device()).unwrap();
    let mut parts = vec![lm.step(seq.clone().narrow(1, 0, prompt), &mut state)];
    for t in prompt..n {
        parts.push(lm.step(seq.clone().narrow(1, t, 1), &mut state));
    }
    max_diff(Tensor::cat(parts, 1), whole)
}

#[test]
fn encoder_outputs_ignore_padded_tokens() {
    let device = Device::flex();
    for placement in [NormPlacement::Pre, NormPlacement::Post] {
        for norm in [NormKind::LayerNorm, NormKind::RmsNorm] {
            let mut s = stack(MemoryEfficientAttentionConfig {
                key_block: 3,
                ..Default::default()
            });
            s.placement = placement;
            s.norm = norm;
            s.feed_forward = FeedForwardKind::Swiglu;
            let encoder = EncoderConfig {
                embedding: embedding(PositionKind::Learned),
                stack: s,
                funnel: None,
            }
            .init(&device)
            .unwrap();
            let mask = padding_mask(&[7, 4], 7, &device);
            let a = tokens(
                &[vec![1, 2, 3, 4, 5, 6, 7], vec![3, 4, 5, 6, 0, 0, 0]],
                &device,
            );
            let b = tokens(
                &[vec![1, 2, 3, 4, 5, 6, 7], vec![3, 4, 5, 6, 9, 8, 7]],
                &device,
            );
            let ha = encoder.forward(EncoderInput::new(a).mask_pad(mask.clone()));
            let hb = encoder.forward(EncoderInput::new(b).mask_pad(mask));
            let d = max_diff(ha.narrow(1, 0, 4), hb.narrow(1, 0, 4));
            assert!(d < 1e-5, "{placement:?} {norm:?}: {d}");
        }
    }
}

#[test]
fn decoder_logits_never_see_the_future() {
    let device = Device::flex();
    for attention in [
        AttentionConfig::default(),
        LinearTransformerAttentionConfig { chunk: 2 }.into(),
    ] {
        let lm = LanguageModelConfig {
            embedding: embedding(PositionKind::Rotary),
            stack: stack(attention.clone()),
            tie_embeddings: true,
            compressive: None,
        }
        .init(&device)
        .unwrap();
        let a = lm.forward(tokens(&[vec![1, 2, 3, 4, 5, 6]], &device), None);
        let b = lm.forward(tokens(&[vec![1, 2, 3, 9, 9, 9]], &device), None);
        let d = max_diff(a.clone().narrow(1, 0, 3), b.clone().narrow(1, 0, 3));
        assert!(d < 1e-5, "{}: {d}", attention.info().kind);
        assert!(
            max_diff(a.narrow(1, 3, 1), b.narrow(1, 3, 1)) > 1e-4,
            "the future token must matter"
        );
    }
}

#[test]
fn incremental_decoding_gives_the_same_logits_as_one_forward() {
    let device = Device::flex();
    let variants: Vec<AttentionConfig> = vec![
        AttentionConfig::default(),
        MemoryEfficientAttentionConfig {
            key_block: 4,
            query_block: 3,
            ..Default::default()
        }
        .into(),
        LinearTransformerAttentionConfig { chunk: 3 }.into(),
        PerformerAttentionConfig {
            features: 16,
            ..Default::default()
        }
        .into(),
        SynthesizerAttentionConfig {
            max_len: 32,
            ..Default::default()
        }
        .into(),
        SparseTransformerAttentionConfig {
            pattern: SparsePattern::Fixed,
            stride: Stride::Length(3),
            summary: 1,
        }
        .into(),
        SparseTransformerAttentionConfig {
            pattern: SparsePattern::Strided,
            stride: Stride::Length(2),
            summary: 1,
        }
        .into(),
        MemoryCompressedAttentionConfig {
            factor: 2,
            null_slot: true,
        }
        .into(),
    ];
    for attention in variants {
        for positions in [
            PositionKind::Learned,
            PositionKind::Rotary,
            PositionKind::Sinusoidal,
        ] {
            let lm = LanguageModelConfig {
                embedding: embedding(positions),
                stack: stack(attention.clone()),
                tie_embeddings: false,
                compressive: None,
            }
            .init(&device)
            .unwrap();
            let seq = tokens(
                &[
                    vec![1, 5, 2, 7, 3, 3, 8, 1, 4],
                    vec![2, 2, 6, 1, 9, 4, 4, 0, 11],
                ],
                &device,
            );
            let d = decoding_error(&lm, seq, 4);
            assert!(
                d < 1e-4,
                "{} with {positions:?} positions: {d}",
                attention.info().kind
            );
        }
    }
}

#[test]
fn generation_is_greedy_or_seeded() {
    let device = Device::flex();
    let lm = LanguageModelConfig {
        embedding: embedding(PositionKind::Learned),
        stack: stack(PerformerAttentionConfig::default()),
        tie_embeddings: true,
        compressive: None,
    }
    .init(&device)
    .unwrap();
    let prompt = tokens(&[vec![1, 2, 3]], &device);
    let greedy = lm
        .generate(prompt.clone(), 5, &mut Sampler::Greedy)
        .unwrap();
    assert_eq!(greedy.dims(), [1, 8]);
    // Greedy continuation agrees with the argmax of a full forward at every step.
    let logits = lm.forward(greedy.clone().narrow(1, 0, 7), None);
    let argmax: Vec<i64> = logits
        .argmax(2)
        .reshape([7])
        .into_data()
        .convert::<i64>()
        .try_to_vec()
        .unwrap();
    let generated: Vec<i64> = greedy
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec()
        .unwrap();
    assert_eq!(&argmax[2..7], &generated[3..8]);
    let a = lm
        .generate(
            prompt.clone(),
            5,
            &mut Sampler::sample_with(1.0, Some(5), 3),
        )
        .unwrap();
    let b = lm
        .generate(prompt, 5, &mut Sampler::sample_with(1.0, Some(5), 3))
        .unwrap();
    assert_eq!(a.into_data(), b.into_data());
}

#[test]
fn encoder_decoder_masks_padded_source_tokens_and_decodes_incrementally() {
    let device = Device::flex();
    let model = Seq2SeqConfig {
        embedding: embedding(PositionKind::Learned),
        encoder: stack(AttentionConfig::default()),
        decoder: stack(LinearTransformerAttentionConfig::default()),
        cross_attention: AttentionConfig::default(),
        tie_embeddings: true,
    }
    .init(&device)
    .unwrap();
    let mask = padding_mask(&[6, 3], 6, &device);
    let src_a = tokens(&[vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 0, 0, 0]], &device);
    let src_b = tokens(&[vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 4, 4, 4]], &device);
    let tgt = tokens(&[vec![1, 3, 5, 7], vec![2, 4, 6, 8]], &device);
    let a = model.forward(src_a.clone(), Some(mask.clone()), tgt.clone(), None);
    let b = model.forward(src_b, Some(mask.clone()), tgt.clone(), None);
    assert!(max_diff(a.clone(), b) < 1e-5);

    let greedy = model
        .generate(
            src_a.clone(),
            Some(mask.clone()),
            1,
            None,
            4,
            &mut Sampler::Greedy,
        )
        .unwrap();
    let logits = model.forward(src_a, Some(mask), greedy.clone().narrow(1, 0, 4), None);
    let argmax: Vec<i64> = logits
        .argmax(2)
        .reshape([8])
        .into_data()
        .convert::<i64>()
        .try_to_vec()
        .unwrap();
    let generated: Vec<i64> = greedy
        .narrow(1, 1, 4)
        .reshape([8])
        .into_data()
        .convert::<i64>()
        .try_to_vec()
        .unwrap();
    assert_eq!(argmax, generated);
}

#[test]
fn a_non_causal_variant_in_a_decoder_is_an_error_naming_layer_and_variant() {
    let device = Device::flex();
    let mut s = stack(AttentionConfig::default());
    s.attention_layers = Some(vec![
        AttentionConfig::default(),
        LinformerAttentionConfig::default().into(),
    ]);
    let err = LanguageModelConfig {
        embedding: embedding(PositionKind::Learned),
        stack: s,
        tie_embeddings: true,
        compressive: None,
    }
    .init(&device)
    .unwrap_err()
    .to_string();
    assert!(err.contains("decoder.layers[1].attention"), "{err}");
    assert!(err.contains("linformer") && err.contains("causal"), "{err}");
}

#[test]
fn per_layer_lists_and_repeating_patterns() {
    let device = Device::flex();
    let mut s = stack(AttentionConfig::default());
    s.n_layers = 5;
    s.attention_pattern = Some(vec![
        MemoryEfficientAttentionConfig::default().into(),
        AttentionConfig::default(),
    ]);
    let kinds = |s: &StackConfig| -> Vec<&'static str> {
        s.resolve_attention("encoder")
            .unwrap()
            .iter()
            .map(|c| c.info().kind)
            .collect()
    };
    assert_eq!(
        kinds(&s),
        [
            "memory-efficient",
            "full",
            "memory-efficient",
            "full",
            "memory-efficient"
        ]
    );
    let encoder = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: s.clone(),
        funnel: None,
    }
    .init(&device)
    .unwrap();
    assert_eq!(encoder.stack.layers.len(), 5);

    s.attention_layers = Some(vec![AttentionConfig::default(); 2]);
    let err = s.resolve_attention("encoder").unwrap_err().to_string();
    assert!(err.contains("not both"), "{err}");
    s.attention_pattern = None;
    let err = s.resolve_attention("encoder").unwrap_err().to_string();
    assert!(err.contains("one entry per layer (5)"), "{err}");
}

#[test]
fn stack_config_from_toml_rejects_unknown_keys() {
    let s: StackConfig =
        toml::from_str("n_layers = 3\n[attention]\nkind = \"performer\"\nfeatures = 32\n").unwrap();
    assert_eq!(s.n_layers, 3);
    assert_eq!(s.attention.info().kind, "performer");
    let err = toml::from_str::<StackConfig>("n_layer = 3\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("n_layer"), "{err}");
}

#[test]
fn classifiers_pool_and_count_parameters() {
    let device = Device::flex();
    let config = ClassifierConfig {
        encoder: EncoderConfig {
            embedding: embedding(PositionKind::Learned),
            stack: stack(AttentionConfig::default()),
            funnel: None,
        },
        n_classes: 3,
        pooling: Pooling::Mean,
        dropout: 0.0,
    };
    let model = config.init_sequence(&device).unwrap();
    let mask = padding_mask(&[5, 3], 5, &device);
    let x = tokens(&[vec![1, 2, 3, 4, 5], vec![1, 2, 3, 0, 0]], &device);
    let y = tokens(&[vec![1, 2, 3, 4, 5], vec![1, 2, 3, 7, 7]], &device);
    let a = model.forward(EncoderInput::new(x).mask_pad(mask.clone()));
    let b = model.forward(EncoderInput::new(y).mask_pad(mask));
    assert_eq!(a.dims(), [2, 3]);
    assert!(max_diff(a, b) < 1e-5);
    // embeddings 20·16 + 32·16; per layer: 4·(16·16+16) + 16·32+32 + 32·16+16 + 2·2·16; final norm 2·16; head 16·3+3
    let expected = 20 * 16
        + 32 * 16
        + 2 * (4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16) + 4 * 16)
        + 2 * 16
        + 16 * 3
        + 3;
    assert_eq!(model.num_params(), expected);
    let tokens_model = config.init_token(&device).unwrap();
    assert_eq!(
        tokens_model
            .forward(EncoderInput::new(tokens(&[vec![1, 2]], &device)))
            .dims(),
        [1, 2, 3]
    );
}

#[test]
fn presets_match_their_sources() {
    let device = Device::flex();
    // all-MiniLM-L6-v2 has 22,713,216 parameters including BERT's pooler (147,840).
    let minilm = models::presets::minilm_l6(AttentionConfig::default())
        .init(&device)
        .unwrap();
    assert_eq!(minilm.num_params(), 22_713_216 - 147_840);
    let listops = models::presets::lra_listops(18, AttentionConfig::default());
    assert_eq!(
        (
            listops.encoder.stack.n_layers,
            listops.encoder.stack.d_model
        ),
        (4, 512)
    );
    let text = models::presets::lra_text(257, AttentionConfig::default());
    assert_eq!(
        (
            text.encoder.stack.d_model,
            text.encoder.stack.n_heads,
            text.n_classes
        ),
        (256, 4, 2)
    );
}

#[test]
#[should_panic(expected = "exceeds the model's max_len 32")]
fn too_long_inputs_are_a_clear_error() {
    let device = Device::flex();
    let encoder = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: stack(AttentionConfig::default()),
        funnel: None,
    }
    .init(&device)
    .unwrap();
    encoder.forward(EncoderInput::new(Tensor::zeros([1, 33], &device)));
}

/// Linformer's layerwise sharing: the stack owns one projection that every layer uses.
#[test]
fn layerwise_linformer_shares_one_projection_across_layers() {
    use efficient_attn::LinformerSharing;
    let device = Device::flex();
    let s = stack(LinformerAttentionConfig {
        k: 4,
        max_len: 32,
        sharing: LinformerSharing::Layerwise,
    });
    let encoder = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: s,
        funnel: None,
    }
    .init(&device)
    .unwrap();
    let shared = encoder
        .stack
        .shared_projection
        .as_ref()
        .expect("one shared projection");
    assert_eq!(shared.dims(), [4, 32]);
    let out = encoder.forward(EncoderInput::new(tokens(&[vec![1, 2, 3, 4, 5]], &device)));
    assert_eq!(out.dims(), [1, 5, 16]);
    // Headwise layers own theirs: no shared parameter.
    let own = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: stack(LinformerAttentionConfig {
            k: 4,
            max_len: 32,
            sharing: LinformerSharing::Headwise,
        }),
        funnel: None,
    }
    .init(&device)
    .unwrap();
    assert!(own.stack.shared_projection.is_none());
}

/// The per-step hook reaches every layer's core through the model: a Performer with
/// `redraw_interval = 2` keeps its features at step 1, draws new ones at steps 2 and 4 (each a
/// function of the step and the layer, the same on every clone), and changes the output.
#[test]
fn at_step_redraws_performer_features_on_their_schedule_through_the_model() {
    let device = Device::flex();
    let config = ClassifierConfig {
        encoder: EncoderConfig {
            embedding: embedding(PositionKind::Learned),
            stack: stack(PerformerAttentionConfig {
                features: 16,
                redraw_interval: Some(2),
                ..Default::default()
            }),
            funnel: None,
        },
        n_classes: 3,
        pooling: Pooling::Mean,
        dropout: 0.0,
    };
    let model = config.init_sequence(&device).unwrap();
    let omegas = |m: &models::SequenceClassifier| -> Vec<Vec<f32>> {
        m.encoder
            .stack
            .layers
            .iter()
            .map(|l| match &l.self_attention.core {
                efficient_attn::Attention::Performer(p) => {
                    p.omega.val().into_data().try_to_vec::<f32>().unwrap()
                }
                other => panic!("not a performer: {other:?}"),
            })
            .collect()
    };
    let x = tokens(&[vec![1, 2, 3, 4, 5]], &device);
    let out = |m: &models::SequenceClassifier| m.forward(EncoderInput::new(x.clone()));
    let start = omegas(&model);
    assert_ne!(start[0], start[1], "each layer draws its own features");
    assert_eq!(
        omegas(&model.clone().at_step(1)),
        start,
        "step 1 keeps the draw"
    );
    let two = model.clone().at_step(2);
    assert_ne!(omegas(&two), start, "step 2 redraws");
    assert_eq!(
        omegas(&model.clone().at_step(2)),
        omegas(&two),
        "a function of the step"
    );
    let four = two.clone().at_step(4);
    assert_ne!(omegas(&four), omegas(&two), "step 4 redraws again");
    assert!(
        max_diff(out(&model), out(&two)) > 1e-6,
        "the output follows the features"
    );
}

/// `save_classifier_hf` writes Hugging Face names (`[out, in]` linear weights, LayerNorm
/// `weight`/`bias`, Longformer-style `*_global` projections, `classifier`), and
/// `load_classifier_hf` reads them back into a differently initialised model exactly.
#[test]
fn a_classifier_saved_under_hugging_face_names_loads_back_identically() {
    let device = Device::flex();
    let config = ClassifierConfig {
        encoder: EncoderConfig {
            embedding: embedding(PositionKind::Learned),
            stack: stack(efficient_attn::LongformerAttentionConfig {
                window: 2,
                global_projections: true,
                ..Default::default()
            }),
            funnel: None,
        },
        n_classes: 2,
        pooling: Pooling::Cls,
        dropout: 0.0,
    };
    device.seed(1);
    let a = config.init_sequence(&device).unwrap();
    device.seed(2);
    let mut b = config.init_sequence(&device).unwrap();
    let x = || EncoderInput::new(tokens(&[vec![1, 2, 3, 4, 5], vec![5, 4, 3, 2, 1]], &device));
    let global = |m: &models::SequenceClassifier| {
        m.encoder.stack.layers[1]
            .self_attention
            .global
            .as_ref()
            .unwrap()
            .key
            .weight
            .val()
    };
    assert!(
        max_diff(a.forward(x()), b.forward(x())) > 1e-4,
        "different starts"
    );

    let dir = std::env::temp_dir().join(format!("efformer-hf-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    models::save_classifier_hf(&a, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for name in [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "encoder.layer.1.attention.self.query.weight",
        "encoder.layer.0.attention.self.key_global.bias",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias",
        "encoder.layer.1.intermediate.dense.weight",
        "encoder.layer.1.output.dense.weight",
        "encoder.layer.1.output.LayerNorm.weight",
        "classifier.weight",
    ] {
        assert!(header.get(name).is_some(), "{name} missing: {header}");
    }
    // PyTorch layout: intermediate.dense maps d_model 16 → d_ff 32, stored [out, in].
    assert_eq!(
        header["encoder.layer.0.intermediate.dense.weight"]["shape"],
        serde_json::json!([32, 16])
    );
    models::load_classifier_hf(&mut b, &path).unwrap();
    assert!(max_diff(a.forward(x()), b.forward(x())) < 1e-6);
    assert!(max_diff(global(&a), global(&b)) == 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Attention loss terms reach the model: a Routing classifier's training forward offers the
/// commitment loss of every layer (summed, taken once), and the step hook moves the centroids.
#[test]
fn routing_layers_offer_their_commitment_loss_and_move_their_centroids() {
    let device = Device::flex().autodiff();
    let config = ClassifierConfig {
        encoder: EncoderConfig {
            embedding: embedding(PositionKind::Learned),
            stack: stack(efficient_attn::RoutingAttentionConfig {
                clusters: 2,
                ..Default::default()
            }),
            funnel: None,
        },
        n_classes: 2,
        pooling: Pooling::Cls,
        dropout: 0.0,
    };
    let model = config.init_sequence(&device).unwrap();
    let centroids = |m: &models::SequenceClassifier| {
        let efficient_attn::Attention::Routing(r) = &m.encoder.stack.layers[0].self_attention.core
        else {
            unreachable!("a routing layer")
        };
        r.centroids.val()
    };
    let before = centroids(&model);
    let x = tokens(&[vec![1, 2, 3, 4, 5, 6], vec![6, 5, 4, 3, 2, 1]], &device);
    let _ = model.forward(EncoderInput::new(x));
    let loss = model
        .aux_loss(&device)
        .expect("two layers' commitment losses");
    assert!(loss.into_scalar::<f32>() > 0.0);
    assert!(model.aux_loss(&device).is_none(), "taken once");
    let model = model.at_step(1);
    assert!(
        max_diff(centroids(&model), before) > 1e-3,
        "k-means on the first batch"
    );
}
