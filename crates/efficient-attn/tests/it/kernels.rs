//! Kernel and low-rank variants beyond the shared contract: the three forms of causal kernel
//! attention agree, FAVOR+'s error falls like m^-1/2, redraws are a schedule, configuration
//! errors, Linformer's layerwise sharing, Nyström's pseudo-inverse.

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::{Device, Tensor};
use efficient_attn::testing::{Case, SeededRng, oracle, prefix_sum};
use efficient_attn::{
    Attention, AttentionConfig, AttentionCore, AttentionMode, AttnInput, CoreConfig, FeatureDraw,
    HeadDims, LinearTransformerAttentionConfig, LinformerAttentionConfig, LinformerSharing,
    NystromformerAttentionConfig, PerformerAttentionConfig, PerformerKernel, SharedParameter,
    SynthesizerAttentionConfig, WithExtras,
};

fn input(case: Case, std: f64, seed: u64, device: &Device) -> AttnInput {
    let mut rng = SeededRng::new(seed);
    AttnInput::new(
        rng.normal_tensor([case.batch, case.heads, case.seq_q, case.d_k], std, device),
        rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_k], std, device),
        rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_v], 1.0, device),
    )
}

fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    a.sub(b).abs().max().into_scalar::<f32>()
}

/// Causal kernel attention: masked quadratic == chunked == recurrent, within 1e-5 in f32,
/// also with a memory (seq_k > seq_q) and chunks that do not divide the length.
#[test]
fn linear_transformer_parallel_chunked_and_recurrent_forms_agree() {
    let device = Device::flex();
    let dims = HeadDims::new(2, 8);
    let core = LinearTransformerAttentionConfig { chunk: 8 }
        .init(AttentionMode::Causal, dims, &device)
        .unwrap();
    for (lq, lk) in [(37, 37), (21, 30)] {
        let x = input(Case::cross(2, 2, lq, lk, 8), 1.0, 1, &device);
        let phi_q = core.features(x.query.clone());
        let phi_k = core.features(x.key.clone());
        let mask = efficient_attn::testing::causal_mask(lq, lk, &device)
            .reshape([1, 1, lq, lk])
            .expand([2, 2, lq, lk]);
        let quadratic = prefix_sum::masked_quadratic(phi_q, phi_k, x.value.clone(), Some(mask));
        let chunked = core.attend(x.clone());
        let diff = max_abs_diff(chunked, quadratic.clone());
        assert!(diff < 1e-5, "chunked vs quadratic ({lq}, {lk}): {diff:e}");

        // The recurrence, token by token (the memory first, its outputs ignored).
        let mut cache = core
            .decode_cache(2, dims, lk, &device)
            .expect("causal mode decodes");
        let mut outs = Vec::new();
        for t in 0..lk {
            let at = |x: &Tensor<4>, t| x.clone().narrow(2, t, 1);
            let q_t = if t >= lk - lq {
                at(&x.query, t - (lk - lq))
            } else {
                at(&x.key, t)
            };
            let out = core.decode_step(
                &mut cache,
                AttnInput::new(q_t, at(&x.key, t), at(&x.value, t)),
            );
            if t >= lk - lq {
                outs.push(out);
            }
        }
        let recurrent = Tensor::cat(outs, 2);
        let diff = max_abs_diff(recurrent, quadratic);
        assert!(diff < 1e-5, "recurrent vs quadratic ({lq}, {lk}): {diff:e}");
        // The state's size does not depend on the sequence length.
        let efficient_attn::DecodeCache::Recurrent(r) = cache else {
            panic!("linear attention decodes with a recurrent state")
        };
        assert_eq!(r.state.kv.dims(), [2, 2, 8, 8]);
        assert_eq!(r.len, lk);
    }
}

/// FAVOR+ output error against exact softmax attention falls like m^-1/2 on small-norm inputs
/// (‖q‖²/√d ≈ 1). Measured over 6 seeds at N = 64, d = 16; the fitted log-log slope must lie
/// in [-0.75, -0.3] and every 4× increase of m must cut the error by at least 25%.
#[test]
fn performer_error_falls_like_inverse_sqrt_features() {
    let device = Device::flex();
    let dims = HeadDims::new(1, 16);
    let ms = [16usize, 64, 256, 1024];
    let mut rmse = Vec::new();
    for &m in &ms {
        let mut total = 0.0;
        for seed in 0..6 {
            let x = input(Case::cross(1, 1, 64, 64, 16), 0.5, 100 + seed, &device);
            let exact = oracle(&x, AttentionMode::Bidirectional, None, None);
            let core = PerformerAttentionConfig {
                features: m,
                seed,
                ..Default::default()
            }
            .init(AttentionMode::Bidirectional, dims, &device)
            .unwrap();
            let err = core
                .attend(x)
                .sub(exact)
                .square()
                .mean()
                .into_scalar::<f64>();
            total += err;
        }
        rmse.push((total / 6.0).sqrt());
    }
    let logs: Vec<(f64, f64)> = ms
        .iter()
        .zip(&rmse)
        .map(|(&m, &e)| ((m as f64).ln(), e.ln()))
        .collect();
    let n = logs.len() as f64;
    let (sx, sy) = logs
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let slope = logs.iter().map(|(x, y)| (x - mx) * (y - my)).sum::<f64>()
        / logs.iter().map(|(x, _)| (x - mx).powi(2)).sum::<f64>();
    eprintln!("FAVOR+ RMSE for m = {ms:?}: {rmse:.4?}; log-log slope {slope:.3}");
    assert!((-0.75..=-0.3).contains(&slope), "slope {slope}");
    for w in rmse.windows(2) {
        assert!(w[1] < 0.75 * w[0], "RMSE {rmse:?}");
    }
}

/// Exact cases of FAVOR+ (any features): identical keys give uniform weights (a running mean
/// when causal), constant values give that constant.
#[test]
fn performer_exact_cases() {
    let device = Device::flex();
    let dims = HeadDims::new(2, 8);
    for mode in [AttentionMode::Bidirectional, AttentionMode::Causal] {
        for kernel in [PerformerKernel::Softmax, PerformerKernel::Relu] {
            let core = PerformerAttentionConfig {
                features: 32,
                kernel,
                ..Default::default()
            }
            .init(mode, dims, &device)
            .unwrap();
            let mut x = input(Case::cross(2, 2, 9, 9, 8), 0.7, 3, &device);
            // Identical keys.
            x.key = x.key.narrow(2, 0, 1).expand([2, 2, 9, 8]);
            let expected = match mode {
                AttentionMode::Causal => x.value.clone().cumsum(2).div(
                    Tensor::<1, burn::tensor::Int>::arange(1..10, &device)
                        .float()
                        .reshape([1, 1, 9, 1]),
                ),
                _ => x.value.clone().mean_dim(2).expand([2, 2, 9, 8]),
            };
            let diff = max_abs_diff(core.attend(x.clone()), expected);
            assert!(diff < 1e-5, "{mode} {kernel:?} identical keys: {diff:e}");
            // Constant values.
            let mut y = input(Case::cross(2, 2, 9, 9, 8), 0.7, 4, &device);
            y.value = Tensor::<4>::full([2, 2, 9, 8], 3.5, &device);
            let diff = max_abs_diff(core.attend(y), Tensor::full([2, 2, 9, 8], 3.5, &device));
            assert!(diff < 1e-5, "{mode} {kernel:?} constant values: {diff:e}");
        }
    }
}

/// Redraws follow the schedule: the features change exactly at multiples of the interval,
/// the k-th draw depends only on (seed, k), and the drawn features survive a save and load.
#[test]
fn performer_redraw_schedule_and_checkpoint() {
    let device = Device::flex();
    let dims = HeadDims::new(1, 8);
    let config = PerformerAttentionConfig {
        features: 8,
        redraw_interval: Some(100),
        seed: 9,
        draw: FeatureDraw::Orthogonal,
        ..Default::default()
    };
    let fresh = || {
        config
            .init(AttentionMode::Bidirectional, dims, &device)
            .unwrap()
    };
    let omega = |a: &efficient_attn::PerformerAttention| a.omega.val().into_data();
    let base = omega(&fresh());
    assert_eq!(omega(&fresh().redraw_for_step(99)), base);
    let at_200 = omega(&fresh().redraw_for_step(200));
    assert_ne!(at_200, base);
    assert_eq!(
        omega(&fresh().redraw_for_step(100).redraw_for_step(200)),
        at_200
    );

    let trained = fresh().redraw_for_step(200);
    let bytes = trained.into_record().into_bytes().unwrap();
    let restored = fresh().load_record(ModuleRecord::from_bytes(bytes).unwrap());
    assert_eq!(omega(&restored), at_200);
}

/// Orthogonal draws are orthogonal within each block of d rows.
#[test]
fn performer_orthogonal_blocks() {
    let d = 8;
    let w =
        efficient_attn::testing::draw_features(2 * d, d, FeatureDraw::OrthogonalFixedNorm, 1, 0);
    for block in 0..2 {
        for i in 0..d {
            for j in 0..d {
                let r = |k: usize| &w[(block * d + k) * d..(block * d + k + 1) * d];
                let dot: f32 = r(i).iter().zip(r(j)).map(|(a, b)| a * b).sum();
                let want = if i == j { d as f32 } else { 0.0 };
                assert!(
                    (dot - want).abs() < 1e-4,
                    "block {block} rows {i},{j}: {dot}"
                );
            }
        }
    }
}

#[test]
fn unsupported_modes_are_config_errors_that_say_why() {
    let device = Device::flex();
    let dims = HeadDims::new(2, 8);
    let cases: [(AttentionConfig, AttentionMode, &str); 4] = [
        (
            LinformerAttentionConfig::default().into(),
            AttentionMode::Causal,
            "future",
        ),
        (
            NystromformerAttentionConfig::default().into(),
            AttentionMode::Causal,
            "future",
        ),
        (
            NystromformerAttentionConfig::default().into(),
            AttentionMode::Cross,
            "self-attention",
        ),
        (
            SynthesizerAttentionConfig::default().into(),
            AttentionMode::Cross,
            "own sequence",
        ),
    ];
    for (config, mode, why) in cases {
        let err = config.init(mode, dims, &device).unwrap_err().to_string();
        assert!(err.contains(mode.name()) && err.contains(why), "{err}");
    }
}

#[test]
#[should_panic(expected = "exceeds max_len 16")]
fn linformer_beyond_max_len_is_a_clear_error() {
    let device = Device::flex();
    let core = LinformerAttentionConfig {
        k: 4,
        max_len: 16,
        ..Default::default()
    }
    .init(AttentionMode::Bidirectional, HeadDims::new(1, 4), &device)
    .unwrap();
    core.attend(input(Case::cross(1, 1, 17, 17, 4), 1.0, 0, &device));
}

/// Layerwise sharing: the layer owns no projection and uses the model's; with the identity it
/// is full attention.
#[test]
fn linformer_layerwise_uses_the_shared_projection() {
    let device = Device::flex();
    let core = LinformerAttentionConfig {
        k: 12,
        max_len: 12,
        sharing: LinformerSharing::Layerwise,
    }
    .init(AttentionMode::Bidirectional, HeadDims::new(2, 4), &device)
    .unwrap();
    assert!(core.e.is_none() && core.f.is_none());
    let x = input(Case::cross(2, 2, 12, 12, 4), 1.0, 5, &device);
    let want = oracle(&x, AttentionMode::Bidirectional, None, None);
    let got = core.attend(x.with_side(SharedParameter(Tensor::eye(12, &device))));
    assert!(max_abs_diff(got, want) < 1e-5);
}

/// The Newton–Schulz pseudo-inverse of a softmax matrix converges: A·Z → I.
#[test]
fn nystrom_pinv_converges() {
    let device = Device::flex();
    let mut rng = SeededRng::new(2);
    let a = burn::tensor::activation::softmax(rng.normal_tensor([2, 2, 16, 16], 1.0, &device), 3);
    let eye = Tensor::<2>::eye(16, &device)
        .reshape([1, 1, 16, 16])
        .expand([2, 2, 16, 16]);
    let err = |iters| {
        let z = efficient_attn::testing::iterative_pinv(a.clone(), iters);
        max_abs_diff(a.clone().matmul(z), eye.clone())
    };
    let (e6, e30) = (err(6), err(30));
    eprintln!("Nyström pinv: max |AZ - I| = {e6:e} after 6 iterations, {e30:e} after 30");
    assert!(e30 < 1e-3 && e30 < e6, "{e6} {e30}");
}

/// Constant values give a (nearly) constant output: A·1 = 1 ⇒ pinv(A)·1 = 1.
#[test]
fn nystrom_constant_values() {
    let device = Device::flex();
    let core = NystromformerAttentionConfig {
        landmarks: 8,
        pinv_iterations: 12,
        conv_kernel: None,
    }
    .init(AttentionMode::Bidirectional, HeadDims::new(1, 8), &device)
    .unwrap();
    let mut x = input(Case::cross(1, 1, 64, 64, 8), 1.0, 6, &device);
    x.value = Tensor::full([1, 1, 64, 8], 2.0, &device);
    let diff = max_abs_diff(core.attend(x), Tensor::full([1, 1, 64, 8], 2.0, &device));
    assert!(diff < 1e-2, "{diff}");
}

/// The random synthesiser's weights do not depend on the input.
#[test]
fn random_synthesizer_ignores_queries_and_keys() {
    let device = Device::flex();
    let core: Attention = AttentionConfig::from(SynthesizerAttentionConfig {
        max_len: 16,
        ..Default::default()
    })
    .init(AttentionMode::Causal, HeadDims::new(2, 4), &device)
    .unwrap();
    let a = input(Case::cross(1, 2, 10, 10, 4), 1.0, 7, &device);
    let mut b = input(Case::cross(1, 2, 10, 10, 4), 1.0, 8, &device);
    b.value = a.value.clone();
    assert!(max_abs_diff(core.attend(a), core.attend(b)) < 1e-6);
}
