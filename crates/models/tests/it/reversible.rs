//! Reversible stacks: each block inverts, the taped training path (no stored activations)
//! gives the gradients of ordinary autodiff through the same blocks, decoding works, and the
//! configurations that cannot be reversible are errors.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor};
use efficient_attn::{
    AttentionConfig, DropoutSeed, Extras, LinformerAttentionConfig, LinformerSharing,
    ReformerAttentionConfig, RoutingAttentionConfig, WithExtras, padding_mask,
};
use models::{
    ClassifierConfig, EncoderConfig, EncoderInput, LanguageModelConfig, NormPlacement,
    PositionKind, ReversibleTape, Seq2SeqConfig, StackConfig,
};

use super::{decoding_error, embedding, max_diff, tokens};

fn reversible(attention: impl Into<AttentionConfig>, layers: usize, dropout: f64) -> StackConfig {
    StackConfig {
        n_layers: layers,
        d_model: 16,
        n_heads: 2,
        d_ff: 32,
        dropout,
        reversible: true,
        ..Default::default()
    }
    .with_attention(attention)
}

/// Every block, and the whole stack, inverts to its input within float rounding, dropout
/// included (the masks are replayed).
#[test]
fn reversible_blocks_invert_with_dropout() {
    let device = Device::flex().autodiff();
    let encoder = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: reversible(AttentionConfig::default(), 3, 0.2),
        funnel: None,
    }
    .init(&device)
    .unwrap();
    let stack = &encoder.stack;
    let extras = stack.extras_with_shared(Extras::default());
    let x1 = Tensor::<3>::random([2, 7, 16], Distribution::Normal(0.0, 1.0), &device);
    let x2 = Tensor::<3>::random([2, 7, 16], Distribution::Normal(0.0, 1.0), &device);
    let mut pair = (x1.clone(), x2.clone());
    for l in 0..3 {
        let next = stack.reversible_layer(l, pair.clone(), &extras);
        let back = stack.reversible_inverse(l, next.clone(), &extras);
        assert!(max_diff(back.0, pair.0.clone()) < 1e-5, "layer {l}: x1");
        assert!(max_diff(back.1, pair.1.clone()) < 1e-5, "layer {l}: x2");
        assert!(
            max_diff(next.0.clone(), pair.0.clone()) > 1e-2,
            "layer {l} changes its input"
        );
        pair = next;
    }
    for l in (0..3).rev() {
        pair = stack.reversible_inverse(l, pair, &extras);
    }
    assert!(max_diff(pair.0, x1) < 1e-5);
    assert!(max_diff(pair.1, x2) < 1e-5);
}

/// Every parameter gradient of a model, by parameter id, flattened.
fn flatten<M: Module>(grads: &GradientsParams, model: &M) -> Vec<(ParamId, Vec<f32>)> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<(ParamId, Vec<f32>)>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out
                    .push((param.id, g.into_data().try_to_vec::<f32>().unwrap()));
            }
        }
    }
    let mut c = Collect {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

/// The taped path (forward without a graph, backward by reconstruction and recomputation)
/// gives the gradients of ordinary autodiff through the same reversible blocks, for every
/// parameter (embeddings, every layer, a projection shared by all layers, the head), with
/// dropout on and a padded row, within 1e-4 (relative to the largest gradient of the
/// parameter).
#[test]
fn taped_gradients_equal_ordinary_autodiff_through_the_same_blocks() {
    let device = Device::flex().autodiff();
    let cases: Vec<AttentionConfig> = vec![
        AttentionConfig::default(),
        LinformerAttentionConfig {
            k: 4,
            max_len: 32,
            sharing: LinformerSharing::Layerwise,
        }
        .into(),
        ReformerAttentionConfig {
            chunk: 4,
            n_hashes: 2,
            ..Default::default()
        }
        .into(),
        RoutingAttentionConfig {
            clusters: 2,
            ..Default::default()
        }
        .into(),
    ];
    for attention in cases {
        let kind = attention.info().kind;
        let model = ClassifierConfig {
            encoder: EncoderConfig {
                embedding: embedding(PositionKind::Learned),
                stack: reversible(attention, 3, 0.1),
                funnel: None,
            },
            n_classes: 3,
            // Dropout outside the stack would draw from the device's shared generator.
            dropout: 0.0,
            ..Default::default()
        }
        .init_sequence(&device)
        .unwrap()
        .at_step(5);
        let input = tokens(
            &[vec![1, 5, 2, 7, 3, 3, 8, 1], vec![2, 2, 6, 1, 9, 4, 4, 11]],
            &device,
        );
        let labels = Tensor::<1, Int>::from_ints([0, 2], &device);
        let loss = |taped: Option<&ReversibleTape>| {
            // The same pass nonce on both paths: the same dropout masks; the second row's last
            // three tokens are padding.
            let mut x = EncoderInput::new(input.clone())
                .mask_pad(padding_mask(&[8, 5], 8, &device))
                .with_side(DropoutSeed(9));
            if let Some(tape) = taped {
                x = x.with_side(tape.clone());
            }
            let logits = model.forward(x);
            let loss = CrossEntropyLossConfig::new()
                .init(&device)
                .forward(logits, labels.clone());
            match model.aux_loss(&device) {
                Some(aux) => loss.add(aux),
                None => loss,
            }
        };
        let plain = GradientsParams::from_grads(loss(None).backward(), &model);
        let tape = ReversibleTape::default();
        let taped_loss = loss(Some(&tape));
        assert!(!tape.is_empty(), "{kind}: the forward records on the tape");
        let taped = tape.gradients(taped_loss.backward(), &model);
        assert!(
            tape.is_empty(),
            "{kind}: gradients take the recorded passes"
        );
        assert_same_grads(kind, &plain, &taped, &model, 1e-3);
    }
}

/// A reversible decoder decodes incrementally: one token at a time equals one forward.
#[test]
fn a_reversible_decoder_decodes_incrementally() {
    let device = Device::flex();
    let lm = LanguageModelConfig {
        embedding: embedding(PositionKind::Rotary),
        stack: reversible(AttentionConfig::default(), 2, 0.0),
        tie_embeddings: false,
        compressive: None,
    }
    .init(&device)
    .unwrap();
    let seq = tokens(
        &[vec![1, 5, 2, 7, 3, 3, 8], vec![2, 2, 6, 1, 9, 4, 4]],
        &device,
    );
    assert!(decoding_error(&lm, seq, 3) < 1e-4);
}

/// Post-norm blocks and decoder layers with cross-attention cannot be reversible: config
/// errors naming the key.
#[test]
fn post_norm_and_cross_attention_cannot_be_reversible() {
    let device = Device::flex();
    let mut post = reversible(AttentionConfig::default(), 2, 0.0);
    post.placement = NormPlacement::Post;
    let err = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: post,
        funnel: None,
    }
    .init(&device)
    .expect_err("post-norm reversible is an error")
    .to_string();
    assert!(
        err.contains("encoder.reversible") && err.contains("pre"),
        "{err}"
    );
    let plain = StackConfig {
        reversible: false,
        ..reversible(AttentionConfig::default(), 2, 0.0)
    };
    let err = Seq2SeqConfig {
        embedding: embedding(PositionKind::Learned),
        encoder: plain.clone(),
        decoder: reversible(AttentionConfig::default(), 2, 0.0),
        cross_attention: AttentionConfig::default(),
        tie_embeddings: false,
    }
    .init(&device)
    .expect_err("a reversible decoder with cross-attention is an error")
    .to_string();
    assert!(
        err.contains("decoder.reversible") && err.contains("cross"),
        "{err}"
    );
}

/// Every parameter gradient of `model` from `a` and `b` agrees within 1e-4 of the parameter's
/// largest gradient (taken as at least `floor`, which bounds the absolute tolerance of
/// near-zero gradients), and the same parameters have one.
fn assert_same_grads<M: Module>(
    what: &str,
    a: &GradientsParams,
    b: &GradientsParams,
    model: &M,
    floor: f32,
) {
    let (a, b) = (flatten(a, model), flatten(b, model));
    assert_eq!(
        a.iter().map(|p| p.0).collect::<Vec<_>>(),
        b.iter().map(|p| p.0).collect::<Vec<_>>(),
        "{what}: the same parameters get gradients"
    );
    for ((id, x), (_, y)) in a.iter().zip(&b) {
        let scale = x.iter().fold(floor, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(y)
            .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            d < 1e-4 * scale,
            "{what}: parameter {id}: {d:e} (scale {scale:e})"
        );
    }
}

/// One tape over two passes of the same stack, the second reading the first's output: the
/// gradient reaching the first pass through the second pass's input is not lost.
#[test]
fn a_tape_over_chained_passes_gives_the_gradients_of_autodiff() {
    let device = Device::flex().autodiff();
    let encoder = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: reversible(AttentionConfig::default(), 2, 0.1),
        funnel: None,
    }
    .init(&device)
    .unwrap()
    .at_step(3);
    let input = tokens(&[vec![1, 5, 2, 7, 3, 3], vec![2, 2, 6, 1, 9, 4]], &device);
    let w = Tensor::<3>::random([2, 6, 16], Distribution::Normal(0.0, 1.0), &device);
    let loss = |tape: Option<&ReversibleTape>| {
        let x = encoder.embedding.forward(input.clone(), None, 0);
        let extras = |nonce: u64| {
            let mut e = Extras::default();
            e.side.insert(DropoutSeed(nonce));
            if let Some(t) = tape {
                e.side.insert(t.clone());
            }
            e
        };
        let h = encoder.stack.forward(x, extras(5), &[]);
        let h = encoder.stack.forward(h, extras(6), &[]);
        h.mul(w.clone()).sum()
    };
    let plain = GradientsParams::from_grads(loss(None).backward(), &encoder);
    let tape = ReversibleTape::default();
    let taped_loss = loss(Some(&tape));
    let taped = tape.gradients(taped_loss.backward(), &encoder);
    assert_same_grads("chained", &plain, &taped, &encoder, 1e-2);
}

/// A tape given to a model without reversible stacks records nothing, and its gradients are
/// those of `GradientsParams::from_grads`.
#[test]
fn a_tape_leaves_sequential_stacks_alone() {
    let device = Device::flex().autodiff();
    let model = ClassifierConfig {
        encoder: EncoderConfig {
            embedding: embedding(PositionKind::Learned),
            stack: StackConfig {
                reversible: false,
                ..reversible(AttentionConfig::default(), 2, 0.0)
            },
            funnel: None,
        },
        n_classes: 3,
        dropout: 0.0,
        ..Default::default()
    }
    .init_sequence(&device)
    .unwrap();
    let input = tokens(&[vec![1, 5, 2, 7]], &device);
    let loss = |tape: Option<&ReversibleTape>| {
        let mut x = EncoderInput::new(input.clone());
        if let Some(t) = tape {
            x = x.with_side(t.clone());
        }
        model.forward(x).sum()
    };
    let plain = GradientsParams::from_grads(loss(None).backward(), &model);
    let tape = ReversibleTape::default();
    let taped_loss = loss(Some(&tape));
    assert!(tape.is_empty());
    let taped = tape.gradients(taped_loss.backward(), &model);
    assert_same_grads("sequential", &plain, &taped, &model, 1e-2);
}

/// Dropout masks are functions of (pass nonce, step, layer, branch): the same nonce and step
/// replay them, another step or nonce draws others.
#[test]
fn reversible_dropout_follows_the_nonce_and_the_step() {
    let device = Device::flex().autodiff();
    let encoder = EncoderConfig {
        embedding: embedding(PositionKind::Learned),
        stack: reversible(AttentionConfig::default(), 2, 0.3),
        funnel: None,
    }
    .init(&device)
    .unwrap();
    let input = tokens(&[vec![1, 5, 2, 7, 3, 3]], &device);
    let run = |step: usize, nonce: u64| {
        encoder
            .clone()
            .at_step(step)
            .forward(EncoderInput::new(input.clone()).with_side(DropoutSeed(nonce)))
    };
    assert_eq!(max_diff(run(1, 4), run(1, 4)), 0.0, "replayed");
    assert!(max_diff(run(1, 4), run(2, 4)) > 1e-3, "another step");
    assert!(max_diff(run(1, 4), run(1, 5)) > 1e-3, "another pass");
}
