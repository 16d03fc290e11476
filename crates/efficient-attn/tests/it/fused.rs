//! The fused CPU kernels against the composed tensor-operation implementations they replace
//! on Flex: forward outputs and the gradients of q, k and v, with padding, causality (with a
//! memory), cross attention and tiles that do not divide the lengths.
//!
//! Over 600 lines on purpose: one comparison per fused operation (exact, block-sparse with its
//! rules and steep scores, kernel, Performer features, feed-forward, layer norm), each with the
//! cases that exercise it; splitting them would scatter the shared case builders.

use burn::tensor::{Bool, Device, Tensor, TensorData};
use efficient_attn::testing::{
    FusedCase, SeededRng, bool_mask as bools, check_fused_against_composed, fused, fused_cases,
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
    use efficient_attn::testing::prefix_sum;
    let device = Device::flex().autodiff();
    let mut rng = SeededRng::new(4);
    for (seq_q, seq_k, chunk) in [
        (29, 29, None),
        (13, 40, None),
        (29, 29, Some(6)),
        (11, 30, Some(4)),
        (8, 8, Some(64)),
    ] {
        let phi =
            |rng: &mut SeededRng, n: usize| rng.normal_tensor([2, 3, n, 7], 1.0, &device).exp();
        let q = phi(&mut rng, seq_q);
        let k = phi(&mut rng, seq_k);
        let v = rng.normal_tensor([2, 3, seq_k, 5], 1.0, &device);
        let w = rng.normal_tensor([2, 3, seq_q, 5], 1.0, &device);
        let run = |fused: bool| {
            let (q, k, v) = (
                q.clone().detach().require_grad(),
                k.clone().detach().require_grad(),
                v.clone().detach().require_grad(),
            );
            let out = match (chunk, fused) {
                (None, true) => prefix_sum::bidirectional(q.clone(), k.clone(), v.clone()),
                (None, false) => {
                    prefix_sum::bidirectional_composed(q.clone(), k.clone(), v.clone())
                }
                (Some(c), true) => prefix_sum::causal_chunked(q.clone(), k.clone(), v.clone(), c),
                (Some(c), false) => {
                    prefix_sum::causal_chunked_composed(q.clone(), k.clone(), v.clone(), c)
                }
            };
            let grads = out.clone().mul(w.clone()).sum().backward();
            (
                out.inner(),
                q.grad(&grads).unwrap(),
                k.grad(&grads).unwrap(),
                v.grad(&grads).unwrap(),
            )
        };
        let (f, c) = (run(true), run(false));
        for (what, a, b, tol) in [
            ("output", f.0, c.0, 1e-5),
            ("d phi_q", f.1, c.1, 2e-5),
            ("d phi_k", f.2, c.2, 2e-5),
            ("dv", f.3, c.3, 2e-5),
        ] {
            let d = diff(a, b);
            assert!(
                d < tol,
                "{seq_q}x{seq_k} chunk {chunk:?}: {what} differs by {d:e}"
            );
        }
    }
}

#[test]
fn fused_elu_kernel_attention_applies_the_feature_map_and_the_padding() {
    use burn::tensor::activation::elu;
    use efficient_attn::testing::prefix_sum;
    let device = Device::flex().autodiff();
    let mut rng = SeededRng::new(5);
    for (seq_q, seq_k, chunk, padded) in [
        (23, 23, None, vec![0, 5]),
        (9, 31, None, vec![3]),
        (23, 23, Some(5), vec![4, 0]),
        (10, 27, Some(4), vec![]),
    ] {
        let q = rng.normal_tensor([2, 3, seq_q, 6], 1.0, &device);
        let k = rng.normal_tensor([2, 3, seq_k, 6], 1.0, &device);
        let v = rng.normal_tensor([2, 3, seq_k, 4], 1.0, &device);
        let w = rng.normal_tensor([2, 3, seq_q, 4], 1.0, &device);
        let key_pad =
            (!padded.is_empty()).then(|| bools(pad(2, seq_k, &padded), [2, seq_k], &device));
        let run = |fused_op: bool| {
            let (q, k, v) = (
                q.clone().detach().require_grad(),
                k.clone().detach().require_grad(),
                v.clone().detach().require_grad(),
            );
            let out = if fused_op {
                fused::linear::elu_kernel_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    key_pad.as_ref(),
                    chunk,
                )
            } else {
                let phi = |x: Tensor<4>| elu(x, 1.0).add_scalar(1.0);
                let phi_k = prefix_sum::zero_padded(phi(k.clone()), key_pad.as_ref());
                match chunk {
                    None => prefix_sum::bidirectional_composed(phi(q.clone()), phi_k, v.clone()),
                    Some(c) => {
                        prefix_sum::causal_chunked_composed(phi(q.clone()), phi_k, v.clone(), c)
                    }
                }
            };
            let grads = out.clone().mul(w.clone()).sum().backward();
            (
                out.inner(),
                q.grad(&grads).unwrap(),
                k.grad(&grads).unwrap(),
                v.grad(&grads).unwrap(),
            )
        };
        let (f, c) = (run(true), run(false));
        for (what, a, b) in [
            ("output", f.0, c.0),
            ("dq", f.1, c.1),
            ("dk", f.2, c.2),
            ("dv", f.3, c.3),
        ] {
            let d = diff(a, b);
            assert!(
                d < 2e-5,
                "{seq_q}x{seq_k} chunk {chunk:?} padded {padded:?}: {what} differs by {d:e}"
            );
        }
    }
}

/// One block-sparse case: lengths, block, the plan's lists per head, the rule, extra keys
/// (with a mask of `[batch or 1, heads or 1]`) and padded keys per batch row.
struct SparseCase {
    seq_q: usize,
    seq_k: usize,
    block: usize,
    lists: Vec<Vec<Vec<usize>>>,
    rule: efficient_attn::testing::block_sparse::ElementRule,
    extra: Option<(usize, Option<[usize; 2]>)>,
    padded: Vec<usize>,
}

#[test]
fn fused_block_sparse_attention_equals_its_gathered_composition() {
    use efficient_attn::testing::block_sparse::{
        BlockPlan, BlockSparse, ElementRule, ExtraKeys, block_sparse_attention,
        block_sparse_attention_composed,
    };
    use std::sync::Arc;
    let device = Device::flex().autodiff();
    let mut rng = SeededRng::new(6);
    let around = |nb: usize, back: usize, ahead: usize| -> Vec<Vec<Vec<usize>>> {
        vec![
            (0..nb)
                .map(|i| (i.saturating_sub(back)..=(i + ahead).min(nb - 1)).collect())
                .collect(),
        ]
    };
    let (batch, heads) = (2, 3);
    let mut explicit = vec![false; 5 * 4 * 2 * 4];
    for (n, x) in explicit.iter_mut().enumerate() {
        // Row 0 of query block 0 sees nothing; the rest a pseudo-random half.
        *x = n < 2 * 4 || (n * 7919) % 5 < 2;
    }
    let cases = vec![
        // Longformer-like window: band inside look-around blocks, a ragged last block.
        SparseCase {
            seq_q: 22,
            seq_k: 22,
            block: 4,
            lists: around(6, 1, 1),
            rule: ElementRule::Band { left: 4, right: 4 },
            extra: None,
            padded: vec![0, 3],
        },
        // Causal local blocks.
        SparseCase {
            seq_q: 19,
            seq_k: 19,
            block: 5,
            lists: around(4, 1, 0),
            rule: ElementRule::Causal { offset: 0 },
            extra: None,
            padded: vec![],
        },
        // BigBird-like per-head random blocks with global keys and their mask; padding.
        SparseCase {
            seq_q: 20,
            seq_k: 20,
            block: 5,
            lists: vec![
                vec![vec![0, 2], vec![1, 3], vec![2], vec![3, 0]],
                vec![vec![1], vec![1, 2], vec![0, 2, 3], vec![3]],
                vec![vec![0, 3], vec![1], vec![2, 1], vec![3, 2]],
            ],
            rule: ElementRule::All,
            extra: Some((3, Some([1, 3]))),
            padded: vec![2, 0],
        },
        // Queries and keys of different lengths, extra keys without a mask.
        SparseCase {
            seq_q: 10,
            seq_k: 17,
            block: 4,
            lists: vec![vec![vec![0, 4], vec![1, 2], vec![3]]],
            rule: ElementRule::All,
            extra: Some((2, None)),
            padded: vec![0, 1],
        },
        // An explicit element mask (2-D windows), one query seeing nothing; an extra mask
        // per batch row.
        SparseCase {
            seq_q: 17,
            seq_k: 17,
            block: 4,
            lists: around(5, 1, 0),
            rule: ElementRule::Explicit(Arc::new(explicit)),
            extra: Some((2, Some([2, 1]))),
            padded: vec![],
        },
    ];
    for (n, case) in cases.into_iter().enumerate() {
        let SparseCase {
            seq_q,
            seq_k,
            block,
            lists,
            rule,
            extra,
            padded,
        } = case;
        let plan = BlockPlan::new(block, seq_k.div_ceil(block), lists);
        let q = rng.normal_tensor([batch, heads, seq_q, 8], 1.0, &device);
        let k = rng.normal_tensor([batch, heads, seq_k, 8], 1.0, &device);
        let v = rng.normal_tensor([batch, heads, seq_k, 6], 1.0, &device);
        let w = rng.normal_tensor([batch, heads, seq_q, 6], 1.0, &device);
        let extra = extra.map(|(g, mask)| {
            let gk = rng.normal_tensor([batch, heads, g, 8], 1.0, &device);
            let gv = rng.normal_tensor([batch, heads, g, 6], 1.0, &device);
            let mask = mask.map(|[mb, mh]| {
                let flags = (0..mb * mh * seq_q * g)
                    .map(|_| rng.below(3) == 0)
                    .collect();
                Tensor::<4, Bool>::from_data(TensorData::new(flags, [mb, mh, seq_q, g]), &device)
            });
            (gk, gv, mask)
        });
        let key_pad = (!padded.is_empty())
            .then(|| bools(pad(batch, seq_k, &padded), [batch, seq_k], &device));
        let run = |fused_op: bool, q: &Tensor<4>| {
            let track = |t: &Tensor<4>| t.clone().detach().require_grad();
            let (q, k, v) = (track(q), track(&k), track(&v));
            let extra = extra
                .as_ref()
                .map(|(gk, gv, mask)| (track(gk), track(gv), mask.clone()));
            let input = BlockSparse {
                query: q.clone(),
                key: k.clone(),
                value: v.clone(),
                mask_pad_k: key_pad.as_ref(),
                plan: &plan,
                rule: rule.clone(),
                extra: extra.as_ref().map(|(gk, gv, mask)| ExtraKeys {
                    key: gk.clone(),
                    value: gv.clone(),
                    mask: mask.clone(),
                }),
            };
            let out = if fused_op {
                block_sparse_attention(input)
            } else {
                block_sparse_attention_composed(input)
            };
            let grads = out.clone().mul(w.clone()).sum().backward();
            let mut all = vec![
                ("output", out.inner()),
                ("dq", q.grad(&grads).unwrap()),
                ("dk", k.grad(&grads).unwrap()),
                ("dv", v.grad(&grads).unwrap()),
            ];
            if let Some((gk, gv, _)) = &extra {
                all.push(("d extra k", gk.grad(&grads).unwrap()));
                all.push(("d extra v", gv.grad(&grads).unwrap()));
            }
            all
        };
        // Sharp queries (scores spread over tens) make later blocks rise far above a row's
        // first block, and fall far below it: the kernel's rare rescaling path.
        for sharpness in [1.0, 12.0] {
            let q = q.clone().mul_scalar(sharpness);
            let (f, c) = (run(true, &q), run(false, &q));
            assert_eq!(f.len(), c.len());
            for ((what, a), (_, b)) in f.into_iter().zip(c) {
                let d = diff(a, b);
                // Rounding in the scores grows with their size.
                assert!(
                    d < 2e-5 * sharpness,
                    "case {n}, sharpness {sharpness}: {what} differs by {d:e}"
                );
            }
        }
    }
}

/// Scores built to climb by more than the kernel's headroom from one visited block to the next
/// (head 0) and to fall as steeply (head 1), through a band rule and a causal rule with key
/// padding: the kernel's rebuild-from-raw-scores path runs for certain, and the output and
/// gradients still equal the gathered composition.
#[test]
fn fused_block_sparse_attention_survives_steep_scores() {
    use efficient_attn::testing::block_sparse::{
        BlockPlan, BlockSparse, ElementRule, block_sparse_attention,
        block_sparse_attention_composed,
    };
    let device = Device::flex().autodiff();
    let (seq, block, d) = (24, 4, 8);
    let nb = seq / block;
    let around = |back: usize, ahead: usize| -> Vec<Vec<Vec<usize>>> {
        vec![
            (0..nb)
                .map(|i: usize| (i.saturating_sub(back)..=(i + ahead).min(nb - 1)).collect())
                .collect(),
        ]
    };
    // q = (1, small, …); k_j = (±25·(j - 12), small): scores step 25/√8 ≈ 8.8 per key, 35 per
    // block, between about ±100.
    let q: Vec<f32> = (0..2 * seq)
        .flat_map(|i| (0..d).map(move |t| if t == 0 { 1.0 } else { 0.01 * (i % 5) as f32 }))
        .collect();
    let k: Vec<f32> = (0..2 * seq)
        .flat_map(|i| {
            let j = (i % seq) as f32 - 12.0;
            let x = if i < seq { 25.0 * j } else { -25.0 * j };
            (0..d).map(move |t| if t == 0 { x } else { 0.1 })
        })
        .collect();
    let q = Tensor::<4>::from_data(TensorData::new(q, [1, 2, seq, d]), &device);
    let k = Tensor::<4>::from_data(TensorData::new(k, [1, 2, seq, d]), &device);
    let mut rng = SeededRng::new(12);
    let v = rng.normal_tensor([1, 2, seq, 6], 1.0, &device);
    let w = rng.normal_tensor([1, 2, seq, 6], 1.0, &device);
    let key_pad = bools(pad(1, seq, &[2]), [1, seq], &device);
    for (rule, lists) in [
        (ElementRule::Band { left: 6, right: 6 }, around(2, 2)),
        (ElementRule::Causal { offset: 0 }, around(2, 0)),
    ] {
        let plan = BlockPlan::new(block, nb, lists);
        let run = |fused_op: bool| {
            let track = |t: &Tensor<4>| t.clone().detach().require_grad();
            let (q, k, v) = (track(&q), track(&k), track(&v));
            let input = BlockSparse {
                query: q.clone(),
                key: k.clone(),
                value: v.clone(),
                mask_pad_k: Some(&key_pad),
                plan: &plan,
                rule: rule.clone(),
                extra: None,
            };
            let out = if fused_op {
                block_sparse_attention(input)
            } else {
                block_sparse_attention_composed(input)
            };
            let grads = out.clone().mul(w.clone()).sum().backward();
            [
                ("output", out.inner()),
                ("dq", q.grad(&grads).unwrap()),
                ("dk", k.grad(&grads).unwrap()),
                ("dv", v.grad(&grads).unwrap()),
            ]
        };
        for ((what, a), (_, b)) in run(true).into_iter().zip(run(false)) {
            let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
            let diff = a.sub(b).abs().max().into_scalar::<f32>();
            // Scores of magnitude ~100 carry f32 rounding of ~1e-5 into the probabilities,
            // amplified in the gradients by keys of magnitude ~300.
            let tol = if what == "output" { 1e-4 } else { 1e-3 };
            assert!(diff < tol * scale, "{rule:?}: {what} differs by {diff:e}");
        }
    }
}
