//! The fused CPU kernels against the composed tensor-operation implementations they replace
//! on Flex: forward outputs and the gradients of q, k and v, with padding, causality (with a
//! memory), cross attention and tiles that do not divide the lengths.
//! The attention checks that also run on wgpu live in `efficient_attn::testing`.

use burn::tensor::{Device, Tensor};
use efficient_attn::testing::{
    FusedCase, SeededRng, bool_mask as bools, check_block_sparse_against_composed,
    check_block_sparse_with_steep_scores, check_elu_kernel_attention_against_composed,
    check_fused_against_composed, check_kernel_attention_against_composed, fused_cases,
    max_rel_diff as diff, right_padded as pad,
};
use efficient_attn::{
    AttentionMode, AttnInput, FullAttentionConfig, HeadDims, MemoryEfficientAttentionConfig,
};

#[test]
fn fused_full_attention_equals_burns_attention_forward_and_backward() {
    for case in fused_cases() {
        check_fused_against_composed(
            FullAttentionConfig::default().into(),
            &case,
            &Device::flex(),
        );
    }
}

#[test]
fn fused_memory_efficient_attention_equals_its_streaming_composition() {
    for case in fused_cases() {
        let ragged = MemoryEfficientAttentionConfig {
            query_block: 5,
            key_block: 7,
            scale: None,
        };
        check_fused_against_composed(ragged.into(), &case, &Device::flex());
    }
}

/// Several default tiles (64 × 256) in both directions, causal.
#[test]
fn fused_attention_spans_several_default_tiles() {
    let case = FusedCase {
        mode: AttentionMode::Causal,
        batch: 1,
        heads: 2,
        seq_q: 600,
        seq_k: 600,
        d_k: 16,
        d_v: 16,
    };
    check_fused_against_composed(
        FullAttentionConfig::default().into(),
        &case,
        &Device::flex(),
    );
}

/// The fused feed-forward block with biases and a dropout mask against its composition from
/// Burn operations: output and the gradients of x, w1, b1, w2, b2.
#[test]
fn fused_feed_forward_with_a_mask_equals_its_composition() {
    use burn::tensor::activation::{gelu, relu};
    use burn::tensor::module::linear;
    use efficient_attn::{FeedForwardActivation, fused_feed_forward};
    let device = Device::flex().autodiff();
    let mut rng = SeededRng::new(9);
    let (b, n, d, f) = (2, 37, 12, 20);
    let x = rng.normal_tensor([b, n, d], 1.0, &device);
    let w1 = rng.normal_tensor([d, f], 0.3, &device);
    let b1 = rng.normal_tensor([f], 0.3, &device);
    let w2 = rng.normal_tensor([f, d], 0.3, &device);
    let b2 = rng.normal_tensor([d], 0.3, &device);
    let mask = rng
        .normal_tensor([b, n, f], 1.0, &device)
        .greater_elem(-0.5)
        .float()
        .mul_scalar(1.0 / 0.7);
    let w = rng.normal_tensor([b, n, d], 1.0, &device);
    for act in [FeedForwardActivation::Gelu, FeedForwardActivation::Relu] {
        let run = |fused: bool| {
            let (x, w1, b1, w2, b2) = (
                x.clone().detach().require_grad(),
                w1.clone().detach().require_grad(),
                b1.clone().detach().require_grad(),
                w2.clone().detach().require_grad(),
                b2.clone().detach().require_grad(),
            );
            let y = if fused {
                fused_feed_forward(
                    x.clone(),
                    w1.clone(),
                    Some(b1.clone()),
                    w2.clone(),
                    Some(b2.clone()),
                    Some(mask.clone()),
                    act,
                )
            } else {
                let h = linear(x.clone(), w1.clone(), Some(b1.clone()));
                let h = match act {
                    FeedForwardActivation::Gelu => gelu(h),
                    FeedForwardActivation::Relu => relu(h),
                };
                linear(h.mul(mask.clone()), w2.clone(), Some(b2.clone()))
            };
            let grads = y.clone().mul(w.clone()).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                w1.grad(&grads).unwrap(),
                b1.grad(&grads).unwrap(),
                w2.grad(&grads).unwrap(),
                b2.grad(&grads).unwrap(),
            )
        };
        let (f, c) = (run(true), run(false));
        let d3 = |a: Tensor<3>, b: Tensor<3>| {
            let s = b.clone().abs().add_scalar(1.0);
            a.sub(b).abs().div(s).max().into_scalar::<f32>()
        };
        let d2 = |a: Tensor<2>, b: Tensor<2>| {
            let s = b.clone().abs().add_scalar(1.0);
            a.sub(b).abs().div(s).max().into_scalar::<f32>()
        };
        let d1 = |a: Tensor<1>, b: Tensor<1>| {
            let s = b.clone().abs().add_scalar(1.0);
            a.sub(b).abs().div(s).max().into_scalar::<f32>()
        };
        assert!(d3(f.0, c.0) < 1e-5, "{act:?}: output");
        assert!(d3(f.1, c.1) < 2e-5, "{act:?}: dx");
        assert!(d2(f.2, c.2) < 2e-5, "{act:?}: dw1");
        assert!(d1(f.3, c.3) < 2e-5, "{act:?}: db1");
        assert!(d2(f.4, c.4) < 2e-5, "{act:?}: dw2");
        assert!(d1(f.5, c.5) < 2e-5, "{act:?}: db2");
    }
}

/// The fused layer norm against Burn's `layer_norm` (composed under autodiff): outputs and the
/// gradients of the input, γ and β, with and without β, on rows wider than a vector and with
/// a ragged tail.
#[test]
fn fused_layer_norm_equals_burns_layer_norm_forward_and_backward() {
    use burn::tensor::module::layer_norm;
    use efficient_attn::fused_layer_norm;
    let device = Device::flex().autodiff();
    let mut rng = SeededRng::new(17);
    let rel = |a: Tensor<3>, b: Tensor<3>| {
        let s = b.clone().abs().add_scalar(1.0);
        a.sub(b).abs().div(s).max().into_scalar::<f32>()
    };
    let rel1 = |a: Tensor<1>, b: Tensor<1>| {
        let s = b.clone().abs().add_scalar(1.0);
        a.sub(b).abs().div(s).max().into_scalar::<f32>()
    };
    for (width, with_beta) in [(37, true), (256, true), (20, false)] {
        let (b, n) = (3, 45);
        // An offset and spread per row, so that the mean and variance matter.
        let x = rng
            .normal_tensor([b, n, width], 2.0, &device)
            .add_scalar(3.0);
        let gamma = rng.normal_tensor([width], 1.0, &device);
        let beta = rng.normal_tensor([width], 1.0, &device);
        let w = rng.normal_tensor([b, n, width], 1.0, &device);
        let run = |fused: bool| {
            let (x, gamma, beta) = (
                x.clone().detach().require_grad(),
                gamma.clone().detach().require_grad(),
                beta.clone().detach().require_grad(),
            );
            let shift = with_beta.then(|| beta.clone());
            let y = if fused {
                fused_layer_norm(x.clone(), gamma.clone(), shift, 1e-5)
            } else {
                layer_norm(x.clone(), gamma.clone(), shift, 1e-5)
            };
            let grads = y.clone().mul(w.clone()).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                gamma.grad(&grads).unwrap(),
                beta.grad(&grads),
            )
        };
        let (f, c) = (run(true), run(false));
        let name = format!("width {width}, beta {with_beta}");
        assert!(rel(f.0, c.0) < 1e-5, "{name}: output");
        assert!(rel(f.1, c.1) < 5e-5, "{name}: dx");
        assert!(rel1(f.2, c.2) < 5e-5, "{name}: dgamma");
        match (f.3, c.3) {
            (Some(fb), Some(cb)) => assert!(rel1(fb, cb) < 5e-5, "{name}: dbeta"),
            (None, None) => assert!(!with_beta, "{name}: β has a gradient"),
            _ => panic!("{name}: β's gradient exists on one path only"),
        }
    }
}

/// Performer's fused FAVOR+ features against the composed ones: query and key features in
/// bidirectional and causal modes with padded keys, and the gradients of q and k through
/// them (the stabilising shifts are constants of both backwards).
#[test]
fn fused_favor_features_equal_the_composed_ones() {
    use efficient_attn::{CoreConfig, PerformerAttentionConfig};
    let device = Device::flex().autodiff();
    let (b, h, l, d) = (2, 3, 29, 16);
    let dims = HeadDims {
        heads: h,
        d_k: d,
        d_v: d,
    };
    let mut rng = SeededRng::new(23);
    let q = rng.normal_tensor([b, h, l, d], 1.0, &device);
    let k = rng.normal_tensor([b, h, l, d], 1.0, &device);
    let v = rng.normal_tensor([b, h, l, d], 1.0, &device);
    let key_pad = bools(pad(b, l, &[1, 4]), [b, l], &device);
    for mode in [AttentionMode::Bidirectional, AttentionMode::Causal] {
        let core = PerformerAttentionConfig {
            features: 40,
            ..Default::default()
        }
        .init(mode, dims, &device)
        .unwrap();
        let m = core.num_features();
        let wq = rng.normal_tensor([b, h, l, m], 1.0, &device);
        let wk = rng.normal_tensor([b, h, l, m], 1.0, &device);
        let run = |fused_path: bool| {
            let (q, k) = (
                q.clone().detach().require_grad(),
                k.clone().detach().require_grad(),
            );
            let input =
                AttnInput::new(q.clone(), k.clone(), v.clone()).mask_pad_keys(key_pad.clone());
            let (pq, pk) = if fused_path {
                core.feature_maps(&input)
            } else {
                core.feature_maps_composed(&input)
            };
            let loss = pq.clone().mul(wq.clone()).sum() + pk.clone().mul(wk.clone()).sum();
            let grads = loss.backward();
            (
                pq.inner(),
                pk.inner(),
                q.grad(&grads).unwrap(),
                k.grad(&grads).unwrap(),
            )
        };
        let (f, c) = (run(true), run(false));
        let rel = |a: Tensor<4>, b: Tensor<4>| {
            let s = b.clone().abs().add_scalar(1e-3);
            a.sub(b).abs().div(s).max().into_scalar::<f32>()
        };
        assert!(rel(f.0, c.0) < 2e-4, "{mode:?}: query features");
        assert!(rel(f.1.clone(), c.1) < 2e-4, "{mode:?}: key features");
        assert!(diff(f.2, c.2) < 1e-4, "{mode:?}: dq");
        assert!(diff(f.3, c.3) < 1e-4, "{mode:?}: dk");
        // Padded keys have zero features.
        let padded =
            f.1.slice([1..2, 0..h, l - 4..l, 0..m])
                .abs()
                .max()
                .into_scalar::<f32>();
        assert_eq!(padded, 0.0, "{mode:?}: a padded key has features");
    }
}

/// The fused kernel attention against the composed prefix-sum forms: bidirectional and causal
/// (ragged chunks, a prefix of keys before the first query), output and gradients.
#[test]
fn fused_kernel_attention_equals_the_composed_prefix_sums() {
    check_kernel_attention_against_composed(&Device::flex());
}

#[test]
fn fused_elu_kernel_attention_applies_the_feature_map_and_the_padding() {
    check_elu_kernel_attention_against_composed(&Device::flex());
}

/// The Linear Transformer through the fused kernel attention against its composed form
/// (ragged chunks of 5), on the fused-check cases.
#[test]
fn fused_linear_transformer_equals_its_composition() {
    for case in fused_cases() {
        check_fused_against_composed(
            efficient_attn::LinearTransformerAttentionConfig { chunk: 5 }.into(),
            &case,
            &Device::flex(),
        );
    }
}

#[test]
fn fused_block_sparse_attention_equals_its_gathered_composition() {
    check_block_sparse_against_composed(&Device::flex());
}

#[test]
fn fused_block_sparse_attention_survives_steep_scores() {
    check_block_sparse_with_steep_scores(&Device::flex());
}
