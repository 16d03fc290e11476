//! Funnel pooling: a pooled stage's shapes, values and padding against a host-side
//! computation; a padded batch equals each sequence alone; stride 1 equals the unpooled stack;
//! up-sampling; global tokens through pooling; configuration errors.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use efficient_attn::testing::SeededRng;
use efficient_attn::{
    AttentionConfig, Extras, GlobalTokens, LongformerAttentionConfig,
    MemoryEfficientAttentionConfig, PerformerAttentionConfig, WithExtras, padding_mask,
};
use models::{
    ClassifierConfig, EncoderConfig, EncoderInput, FunnelConfig, FunnelPlan, FunnelPool,
    NormPlacement, Pooling, PositionKind,
};

use super::{embedding, max_diff, stack, tokens};

fn plan(stride: usize, pool: FunnelPool, separate_cls: bool) -> FunnelPlan {
    FunnelPlan {
        blocks: vec![1, 1],
        stride,
        pool,
        separate_cls,
    }
}

/// The pooling written out on the host: windows of `stride` after the first `s` positions,
/// over real positions only; a window without one is padding (0).
fn host_pool(
    x: &[f32],
    n: usize,
    d: usize,
    len: usize,
    stride: usize,
    s: usize,
    max: bool,
) -> (Vec<f32>, Vec<bool>) {
    let m = (n - s).div_ceil(stride);
    let mut out = Vec::new();
    let mut pad = Vec::new();
    for i in 0..s {
        out.extend_from_slice(&x[i * d..(i + 1) * d]);
        pad.push(i >= len);
    }
    for w in 0..m {
        let real: Vec<usize> = (s + w * stride..(s + (w + 1) * stride).min(n))
            .filter(|&i| i < len)
            .collect();
        pad.push(real.is_empty());
        for c in 0..d {
            let vals = real.iter().map(|&i| x[i * d + c]);
            out.push(match (real.is_empty(), max) {
                (true, _) => 0.0,
                (false, true) => vals.fold(f32::NEG_INFINITY, f32::max),
                (false, false) => vals.sum::<f32>() / real.len() as f32,
            });
        }
    }
    (out, pad)
}

#[test]
fn a_pooled_stage_has_the_windowed_shapes_values_and_padding() {
    let device = Device::flex();
    let (n, d) = (9, 3);
    let lengths = [9, 6];
    let x = SeededRng::new(3).normal_tensor([2, n, d], 1.0, &device);
    let extras = Extras::new().mask_pad(padding_mask(&lengths, n, &device));
    for (stride, separate_cls, pool) in [
        (2, true, FunnelPool::Mean),
        (2, false, FunnelPool::Mean),
        (3, true, FunnelPool::Max),
        (4, false, FunnelPool::Max),
    ] {
        let p = plan(stride, pool, separate_cls);
        let (pooled, pooled_extras) = p.pool(x.clone(), &extras);
        let m = p.pooled_len(n);
        let s = usize::from(separate_cls);
        assert_eq!(m, s + (n - s).div_ceil(stride));
        assert_eq!(pooled.dims(), [2, m, d]);
        let mask = pooled_extras.mask_pad.expect("pooled padding");
        assert_eq!(mask.dims(), [2, m]);
        let mask: Vec<bool> = mask.into_data().try_to_vec().unwrap();
        let got: Vec<f32> = pooled.into_data().try_to_vec().unwrap();
        let all: Vec<f32> = x.clone().into_data().try_to_vec().unwrap();
        for (row, &len) in lengths.iter().enumerate() {
            let (want, pad) = host_pool(
                &all[row * n * d..(row + 1) * n * d],
                n,
                d,
                len,
                stride,
                s,
                pool == FunnelPool::Max,
            );
            assert_eq!(
                &mask[row * m..(row + 1) * m],
                &pad[..],
                "stride {stride} row {row}"
            );
            for (j, (g, w)) in got[row * m * d..(row + 1) * m * d]
                .iter()
                .zip(&want)
                .enumerate()
            {
                if !pad[j / d] {
                    assert!(
                        (g - w).abs() < 1e-6,
                        "stride {stride} row {row} [{j}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn global_tokens_follow_their_windows() {
    let device = Device::flex();
    let x = Tensor::<3>::zeros([2, 9, 1], &device);
    let p = plan(2, FunnelPool::Mean, true);
    let pool = |g: GlobalTokens| {
        p.pool(x.clone(), &Extras::new().with_global(g))
            .1
            .global
            .expect("pooled global tokens")
    };
    // Separate CLS: a CLS prefix stays a prefix of one; a longer prefix covers its windows.
    assert!(matches!(
        pool(GlobalTokens::Prefix(1)),
        GlobalTokens::Prefix(1)
    ));
    assert!(matches!(
        pool(GlobalTokens::Prefix(3)),
        GlobalTokens::Prefix(2)
    ));
    assert!(matches!(
        pool(GlobalTokens::Prefix(4)),
        GlobalTokens::Prefix(3)
    ));
    match pool(GlobalTokens::Positions(vec![6, 0, 5])) {
        GlobalTokens::Positions(p) => assert_eq!(p, vec![0, 3]),
        other => panic!("positions stay positions, got {other:?}"),
    }
    let flags = [[false, false, false, false, true, false, false, false, false]; 2];
    let data: Vec<bool> = flags.iter().flatten().copied().collect();
    let mask = Tensor::from_data(TensorData::new(data, [2, 9]), &device);
    match pool(GlobalTokens::Mask(mask)) {
        GlobalTokens::Mask(m) => {
            let m: Vec<bool> = m.into_data().try_to_vec().unwrap();
            // Position 4 lies in the window of positions 3 and 4 (pooled position 2).
            let row = [false, false, true, false, false];
            assert_eq!(m, [row, row].concat());
        }
        other => panic!("a mask stays a mask, got {other:?}"),
    }
}

#[test]
fn upsampling_repeats_each_pooled_vector_and_keeps_the_cls_first() {
    let device = Device::flex();
    // 1 + 3 pooled positions after two poolings of stride 2 from 11 positions.
    let x = Tensor::<3>::from_data(
        TensorData::new(vec![9.0f32, 1.0, 2.0, 3.0], [1, 4, 1]),
        &device,
    );
    let p = plan(2, FunnelPool::Mean, true);
    let up: Vec<f32> = p.upsample(x, 11, 2).into_data().try_to_vec().unwrap();
    assert_eq!(up, [9.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0]);
}

fn funnel_classifier(
    funnel: FunnelConfig,
    attention: impl Into<AttentionConfig>,
    placement: NormPlacement,
    pooling: Pooling,
) -> ClassifierConfig {
    let mut stack = stack(attention);
    stack.n_layers = funnel.blocks.iter().sum();
    stack.placement = placement;
    ClassifierConfig {
        encoder: EncoderConfig {
            embedding: embedding(PositionKind::Learned),
            stack,
            funnel: Some(funnel),
        },
        n_classes: 3,
        pooling,
        dropout: 0.0,
    }
}

fn three_blocks(upsample_layers: usize) -> FunnelConfig {
    FunnelConfig {
        blocks: vec![1, 2, 1],
        upsample_layers,
        ..Default::default()
    }
}

#[test]
fn a_padded_batch_gives_each_sequence_what_it_gets_alone() {
    let device = Device::flex();
    let rows = [
        vec![1, 5, 7, 2, 9, 4, 3, 8, 6, 2, 11],
        vec![1, 3, 3, 12, 5, 6, 0, 0, 0, 0, 0],
    ];
    let lengths = [11, 6];
    for (placement, pooling, pool) in [
        (NormPlacement::Pre, Pooling::Cls, FunnelPool::Mean),
        (NormPlacement::Post, Pooling::Mean, FunnelPool::Max),
    ] {
        let funnel = FunnelConfig {
            pool,
            ..three_blocks(1)
        };
        let config = funnel_classifier(
            funnel,
            MemoryEfficientAttentionConfig::default(),
            placement,
            pooling,
        );
        let seq = config.init_sequence(&device).unwrap();
        let tok = config.init_token(&device).unwrap();
        let batch = EncoderInput::new(tokens(&rows, &device)).mask_pad(padding_mask(
            &lengths,
            rows[0].len(),
            &device,
        ));
        let logits = seq.forward(batch.clone());
        let per_token = tok.forward(batch);
        for (r, &len) in lengths.iter().enumerate() {
            let alone = EncoderInput::new(tokens(&[rows[r][..len].to_vec()], &device));
            let d = max_diff(logits.clone().narrow(0, r, 1), seq.forward(alone.clone()));
            assert!(
                d < 1e-5,
                "{placement:?} {pooling:?}: sequence logits of row {r} differ by {d}"
            );
            let d = max_diff(
                per_token.clone().narrow(0, r, 1).narrow(1, 0, len),
                tok.forward(alone),
            );
            assert!(
                d < 1e-5,
                "{placement:?}: token logits of row {r} differ by {d}"
            );
        }
        assert_eq!(per_token.dims(), [2, 11, 3]);
    }
}

#[test]
fn stride_one_is_the_unpooled_stack() {
    let device = Device::flex();
    let rows = [vec![1, 5, 7, 2, 9, 4, 3, 8], vec![1, 3, 3, 12, 5, 0, 0, 0]];
    let lengths = [8, 5];
    for (placement, attention) in [
        (
            NormPlacement::Pre,
            AttentionConfig::from(MemoryEfficientAttentionConfig::default()),
        ),
        (
            NormPlacement::Post,
            AttentionConfig::from(PerformerAttentionConfig {
                features: 16,
                ..Default::default()
            }),
        ),
    ] {
        let funnel = FunnelConfig {
            blocks: vec![1, 1, 1],
            stride: 1,
            ..Default::default()
        };
        let pooled = funnel_classifier(funnel, attention.clone(), placement, Pooling::Mean);
        let mut plain = pooled.clone();
        plain.encoder.funnel = None;
        let pooled = pooled.encoder.init(&device).unwrap();
        // The same parameters: a pooling layer's cross-mode attention has a self-attention's.
        let plain = plain
            .encoder
            .init(&device)
            .unwrap()
            .load_record(pooled.clone().into_record());
        let input =
            EncoderInput::new(tokens(&rows, &device)).mask_pad(padding_mask(&lengths, 8, &device));
        let (a, mask_a) = pooled.forward_masked(input.clone());
        let (b, mask_b) = plain.forward_masked(input);
        let keep = mask_b.clone().unwrap().bool_not().float().unsqueeze_dim(2);
        let d = max_diff(a.mul(keep.clone()), b.mul(keep));
        assert!(
            d < 1e-5,
            "{placement:?}: stride 1 differs from the unpooled stack by {d}"
        );
        let same: Vec<bool> = mask_a
            .unwrap()
            .equal(mask_b.unwrap())
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(same.iter().all(|&s| s));
    }
}

#[test]
fn pooled_blocks_run_any_kind_and_the_pooling_layers_a_cross_capable_one() {
    let device = Device::flex();
    let longformer = LongformerAttentionConfig {
        window: 2,
        ..Default::default()
    };
    // Longformer has no cross mode: the pooling layers need pool_attention.
    let err = funnel_classifier(
        three_blocks(0),
        longformer.clone(),
        NormPlacement::Pre,
        Pooling::Cls,
    )
    .init_sequence(&device)
    .unwrap_err();
    assert_eq!(err.path, "funnel.pool_attention", "{err}");
    assert!(err.message.contains("longformer"), "{err}");
    let funnel = FunnelConfig {
        pool_attention: Some(MemoryEfficientAttentionConfig::default().into()),
        ..three_blocks(0)
    };
    let model = funnel_classifier(funnel, longformer, NormPlacement::Pre, Pooling::Cls)
        .init_sequence(&device)
        .unwrap();
    let rows = [vec![1, 5, 7, 2, 9, 4, 3, 8, 6, 2, 11]];
    let logits = model
        .forward(EncoderInput::new(tokens(&rows, &device)).with_global(GlobalTokens::Prefix(1)));
    assert_eq!(logits.dims(), [1, 3]);
    let pooled = model
        .encoder
        .forward(EncoderInput::new(tokens(&rows, &device)));
    // 11 → 1 + 5 → 1 + 3 positions.
    assert_eq!(pooled.dims(), [1, 4, 16]);
}

#[test]
fn funnel_configuration_errors_name_the_key() {
    let device = Device::flex();
    let attention = || MemoryEfficientAttentionConfig::default();
    let mut wrong_sum = funnel_classifier(
        three_blocks(0),
        attention(),
        NormPlacement::Pre,
        Pooling::Cls,
    );
    wrong_sum.encoder.stack.n_layers = 5;
    let err = wrong_sum.init_sequence(&device).unwrap_err();
    assert_eq!(err.path, "funnel.blocks", "{err}");
    assert!(err.message.contains("n_layers = 5"), "{err}");
    let zero = FunnelConfig {
        stride: 0,
        ..three_blocks(0)
    };
    let err = funnel_classifier(zero, attention(), NormPlacement::Pre, Pooling::Cls)
        .init_sequence(&device)
        .unwrap_err();
    assert_eq!(err.path, "funnel.stride", "{err}");
    let err = funnel_classifier(
        three_blocks(0),
        attention(),
        NormPlacement::Pre,
        Pooling::Cls,
    )
    .init_token(&device)
    .unwrap_err();
    assert_eq!(err.path, "funnel.upsample_layers", "{err}");
    let mut rotary = funnel_classifier(
        three_blocks(0),
        attention(),
        NormPlacement::Pre,
        Pooling::Cls,
    );
    rotary.encoder.embedding = embedding(PositionKind::Rotary);
    let err = rotary.init_sequence(&device).unwrap_err();
    assert_eq!(err.path, "embedding.positions", "{err}");
    let mut reversible = funnel_classifier(
        three_blocks(0),
        attention(),
        NormPlacement::Pre,
        Pooling::Cls,
    );
    reversible.encoder.stack.reversible = true;
    let err = reversible.init_sequence(&device).unwrap_err();
    assert_eq!(err.path, "encoder.reversible", "{err}");
}
