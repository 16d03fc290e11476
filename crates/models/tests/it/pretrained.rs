//! Import of a real Hugging Face checkpoint (`../shared/pretrained/all-MiniLM-L6-v2`) against
//! outputs computed with the reference implementation, clear errors for weights that do not fit,
//! and the long-context conversion.
//!
//! The checkpoint is looked for at `$EFFORMER_MINILM`, else `<workspace>/../shared/pretrained/
//! all-MiniLM-L6-v2`. Without it these tests print a note and pass, unless
//! `EFFORMER_REQUIRE_SHARED` is set (as `.ci/run` does when `../shared` exists), which makes a
//! missing checkpoint a failure.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use efficient_attn::padding_mask;
use efficient_attn::{
    AttentionConfig, GlobalTokens, LongformerAttentionConfig, MemoryEfficientAttentionConfig,
    PerformerAttentionConfig, WithExtras,
};
use models::load_weights;
use models::{BertCheckpoint, EncoderInput, ImportError, convert};
use serde_json::Value;

fn checkpoint_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("EFFORMER_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/pretrained/all-MiniLM-L6-v2")
        });
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else if std::env::var_os("EFFORMER_REQUIRE_SHARED").is_some() {
        panic!(
            "{}: checkpoint not found and EFFORMER_REQUIRE_SHARED is set",
            dir.display()
        );
    } else {
        efficient_attn::testing::skipped(
            "models pretrained-checkpoint tests",
            &format!("{} not found", dir.display()),
        );
        None
    }
}

fn ids(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let n = rows[0].len();
    let data: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), n]), device)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: max |ours - reference| = {worst:e} > {tol:e}\n ours {got:?}\n want {want:?}"
    );
}

fn row(t: &Tensor<3>, b: usize, i: usize, len: usize) -> Vec<f32> {
    t.clone()
        .narrow(0, b, 1)
        .narrow(1, i, 1)
        .narrow(2, 0, len)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn minilm_reproduces_the_reference_outputs_including_a_padded_batch() {
    let Some(dir) = checkpoint_dir() else { return };
    let device = Device::flex();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference-outputs.json")).unwrap())
            .unwrap();
    let ckpt = BertCheckpoint::open(&dir).unwrap();
    let encoder = ckpt.load(&device).unwrap();
    assert_eq!(encoder.num_params(), 22_565_376);

    for case in reference["cases"].as_array().unwrap() {
        let input = ints(&case["input_ids"]);
        let n = input.len();
        let h = encoder.forward(EncoderInput::new(ids(&[input], &device))); // [1, n, 384]
        let text = case["text"].as_str().unwrap();
        assert_close(
            &row(&h, 0, 0, 8),
            &floats(&case["last_hidden_state_first_token_first8"]),
            1e-4,
            text,
        );
        assert_close(
            &row(&h, 0, n - 1, 8),
            &floats(&case["last_hidden_state_last_token_first8"]),
            1e-4,
            text,
        );
        let sum = h.clone().sum().into_scalar::<f32>();
        let abs = h.clone().abs().sum().into_scalar::<f32>();
        let want_sum = case["last_hidden_state_sum"].as_f64().unwrap() as f32;
        let want_abs = case["last_hidden_state_abs_sum"].as_f64().unwrap() as f32;
        // Sums of n·384 values: 1e-4 per element at most.
        let tol = 1e-4 * (n * 384) as f32;
        assert!(
            (sum - want_sum).abs() <= tol,
            "{text}: sum {sum} vs {want_sum}"
        );
        assert!(
            (abs - want_abs).abs() <= tol,
            "{text}: abs sum {abs} vs {want_abs}"
        );
        // Mean pooling over the tokens, then L2 normalisation (sentence-transformers).
        let pooled = h.mean_dim(1).reshape([1, 384]);
        let norm = pooled.clone().powf_scalar(2.0).sum_dim(1).sqrt();
        let embedding = pooled
            .div(norm)
            .narrow(1, 0, 16)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_close(
            &embedding,
            &floats(&case["mean_pooled_normalized_first16"]),
            1e-4,
            text,
        );
    }

    let batch = &reference["padded_batch"];
    let rows: Vec<Vec<i64>> = batch["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ints)
        .collect();
    let lengths: Vec<usize> = batch["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ints(m).iter().filter(|&&x| x == 1).count())
        .collect();
    let n = rows[0].len();
    let h = encoder.forward(
        EncoderInput::new(ids(&rows, &device)).mask_pad(padding_mask(&lengths, n, &device)),
    );
    assert_close(
        &row(&h, 0, 0, 8),
        &floats(&batch["row0_first_token_first8"]),
        1e-4,
        "padded row 0",
    );
    assert_close(
        &row(&h, 0, lengths[0] - 1, 8),
        &floats(&batch["row0_last_unpadded_token_first8"]),
        1e-4,
        "padded row 0, last real token",
    );
    assert_close(
        &row(&h, 1, 0, 8),
        &floats(&batch["row1_first_token_first8"]),
        1e-4,
        "padded row 1",
    );
}

#[test]
fn weights_that_do_not_fit_name_the_tensors() {
    let Some(dir) = checkpoint_dir() else { return };
    let device = Device::flex();
    let ckpt = BertCheckpoint::open(&dir).unwrap();
    let path = ckpt.weights_path();

    let mut config = ckpt.encoder_config(AttentionConfig::default());
    config.stack.n_layers = 5;
    let mut short = config.init(&device).unwrap();
    match load_weights(&mut short, &path) {
        Err(ImportError::Tensors {
            unexpected,
            missing,
            ..
        }) => {
            assert!(missing.is_empty(), "{missing:?}");
            assert!(
                unexpected
                    .iter()
                    .any(|p| p == "stack.layers.5.self_attention.query.weight"),
                "{unexpected:?}"
            );
            assert!(
                unexpected.iter().all(|p| p.starts_with("stack.layers.5.")),
                "{unexpected:?}"
            );
        }
        other => panic!("expected unexpected tensors, got {other:?}"),
    }

    config.stack.n_layers = 7;
    let mut long = config.init(&device).unwrap();
    let err = load_weights(&mut long, &path).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("missing tensors")
            && message.contains("stack.layers.6.feed_forward.linear_inner.weight"),
        "{message}"
    );

    let missing = BertCheckpoint::open(dir.join("no-such-dir")).unwrap_err();
    assert!(
        missing.to_string().contains("config.json: file not found"),
        "{missing}"
    );
}

#[test]
fn conversion_extends_positions_and_keeps_the_function_in_the_exact_regime() {
    let Some(dir) = checkpoint_dir() else { return };
    let device = Device::flex();
    let ckpt = BertCheckpoint::open(&dir).unwrap();
    let base_config = ckpt.encoder_config(AttentionConfig::default());
    let tokens = ids(
        &[vec![101, 2023, 2003, 2019, 2742, 6251, 1012, 102]],
        &device,
    );
    let want = ckpt
        .load(&device)
        .unwrap()
        .forward(EncoderInput::new(tokens.clone()).with_global(GlobalTokens::Prefix(1)));

    let long = |attention: AttentionConfig| {
        let mut target = ckpt.encoder_config(attention);
        target.embedding.max_len = 1024;
        convert(ckpt.load(&device).unwrap(), &base_config, &target, &device).unwrap()
    };

    // Exact attention: the same function, and the position table tiled end to end.
    let (exact, report) = long(MemoryEfficientAttentionConfig::default().into());
    assert_eq!(report.positions, (512, 1024));
    assert!(report.fresh.is_empty(), "{:?}", report.fresh);
    let table = exact
        .embedding
        .learned_positions
        .as_ref()
        .unwrap()
        .weight
        .val();
    let diff = table
        .clone()
        .narrow(0, 512, 512)
        .sub(table.narrow(0, 0, 512))
        .abs()
        .max()
        .into_scalar::<f32>();
    assert_eq!(diff, 0.0);
    let got = exact.forward(EncoderInput::new(tokens.clone()));
    let err = got.sub(want.clone()).abs().max().into_scalar::<f32>();
    assert!(
        err < 1e-4,
        "memory-efficient conversion changed the output by {err}"
    );

    // Longformer with its own global projections (copies) and a window covering the input.
    let (longformer, report) = long(
        LongformerAttentionConfig {
            window: 16,
            global_projections: true,
            ..Default::default()
        }
        .into(),
    );
    assert_eq!(report.global_copies, 6);
    assert!(report.fresh.is_empty(), "{:?}", report.fresh);
    let got =
        longformer.forward(EncoderInput::new(tokens.clone()).with_global(GlobalTokens::Prefix(1)));
    let err = got.sub(want).abs().max().into_scalar::<f32>();
    assert!(
        err < 1e-4,
        "longformer conversion changed the output by {err}"
    );

    // A variant with its own parameters: they are reported, everything else is carried.
    let (_, report) = long(PerformerAttentionConfig::default().into());
    assert!(
        report
            .fresh
            .iter()
            .all(|p| p.contains("self_attention.core")),
        "{:?}",
        report.fresh
    );

    // Only the attention and the length may change.
    let mut wrong = ckpt.encoder_config(AttentionConfig::default());
    wrong.stack.d_ff = 1024;
    let err = convert(ckpt.load(&device).unwrap(), &base_config, &wrong, &device).unwrap_err();
    assert!(err.to_string().contains("`stack.d_ff` is 1536"), "{err}");
}
