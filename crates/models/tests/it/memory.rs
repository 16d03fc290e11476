//! Segment recurrence (Transformer-XL): a segment read after the memory of the one before it
//! gives the logits one causal pass over both gives its positions; the memory is detached and
//! bounded by `mem_len`; an empty memory is the plain forward.

use burn::tensor::{Device, Tensor};
use efficient_attn::{AttentionConfig, TransformerXlConfig};
use models::{LanguageModelConfig, NormPlacement, PositionKind, SegmentMemory};

use super::{embedding, max_diff, stack, tokens};

fn lm(
    attention: AttentionConfig,
    placement: NormPlacement,
    tie_embeddings: bool,
    device: &Device,
) -> models::LanguageModel {
    let mut stack = stack(attention);
    stack.placement = placement;
    LanguageModelConfig {
        embedding: embedding(PositionKind::None),
        stack,
        tie_embeddings,
        compressive: None,
    }
    .init(device)
    .unwrap()
}

#[test]
fn a_segment_after_its_memory_equals_the_tail_of_one_causal_pass() {
    let device = Device::flex();
    let s1 = vec![1i64, 2, 3, 4, 5, 6, 7];
    let s2 = vec![8i64, 9, 10, 11, 12];
    let both: Vec<i64> = s1.iter().chain(&s2).copied().collect();
    for attention in [
        TransformerXlConfig::default().into(),
        AttentionConfig::default(),
    ] {
        for placement in [NormPlacement::Pre, NormPlacement::Post] {
            let model = lm(attention.clone(), placement, true, &device);
            let kind = attention.info().kind;
            let whole = model
                .forward(tokens(&[both.clone(), both.clone()], &device), None)
                .narrow(1, s1.len(), s2.len());
            let first = model.forward_segment(
                tokens(&[s1.clone(), s1.clone()], &device),
                None,
                &SegmentMemory::default(),
                16,
            );
            let (first, memory) = (first.logits, first.memory);
            assert_eq!(memory.len(), s1.len());
            // An empty memory is the plain forward.
            let plain = model.forward(tokens(&[s1.clone(), s1.clone()], &device), None);
            assert!(
                max_diff(first, plain) < 1e-6,
                "{kind} {placement:?}: empty memory"
            );
            let second =
                model.forward_segment(tokens(&[s2.clone(), s2.clone()], &device), None, &memory, 9);
            let (second, next) = (second.logits, second.memory);
            let d = max_diff(whole, second.clone());
            assert!(d < 1e-5, "{kind} {placement:?}: segment 2 differs by {d:e}");
            assert_eq!(next.len(), 9, "the memory keeps the last mem_len positions");
            let none =
                model.forward_segment(tokens(&[s2.clone(), s2.clone()], &device), None, &memory, 0);
            let (none, empty) = (none.logits, none.memory);
            assert!(empty.is_empty(), "mem_len 0 remembers nothing");
            assert!(
                max_diff(none, second.clone()) < 1e-6,
                "{kind}: mem_len bounds what is kept, not what is read"
            );
        }
    }
}

/// No gradient reaches the earlier segment: segment 1's tokens (none of which occurs in
/// segment 2) get no embedding gradient from segment 2's loss (an untied output layer, so
/// that the embedding table is reached through the inputs only).
#[test]
fn no_gradient_flows_into_the_previous_segment() {
    let device = Device::flex().autodiff();
    let model = lm(
        TransformerXlConfig::default().into(),
        NormPlacement::Pre,
        false,
        &device,
    );
    let s1 = tokens(&[vec![1, 2, 3, 4]], &device);
    let s2 = tokens(&[vec![5, 6, 7]], &device);
    let memory = model
        .forward_segment(s1, None, &SegmentMemory::default(), 8)
        .memory;
    let logits = model.forward_segment(s2, None, &memory, 8).logits;
    let grads = logits.sum().backward();
    let table = model
        .embedding
        .tokens
        .weight
        .val()
        .grad(&grads)
        .expect("a gradient");
    let seg1: Tensor<2> = table.clone().narrow(0, 1, 4);
    let seg2: Tensor<2> = table.narrow(0, 5, 3);
    assert_eq!(
        seg1.abs().max().into_scalar::<f32>(),
        0.0,
        "segment 1's embeddings"
    );
    assert!(
        seg2.abs().max().into_scalar::<f32>() > 0.0,
        "segment 2's embeddings"
    );
}

/// Transformer-XL's biases u, v are one parameter of the stack by default (the reference's
/// `untie_r = False`), read by every layer in a forward and at every decoding step.
#[test]
fn shared_biases_are_one_stack_parameter_read_when_decoding_too() {
    let device = Device::flex();
    let model = lm(
        TransformerXlConfig::default().into(),
        NormPlacement::Pre,
        true,
        &device,
    );
    let shared = model
        .stack
        .shared_projection
        .as_ref()
        .expect("the stack owns u, v");
    assert_eq!(shared.val().dims(), [2, 16]);
    let seq = tokens(
        &[vec![1, 2, 3, 4, 5, 6, 7, 8], vec![8, 7, 6, 5, 4, 3, 2, 1]],
        &device,
    );
    let d = super::decoding_error(&model, seq, 3);
    assert!(d < 1e-4, "decoding differs by {d:e}");
}
