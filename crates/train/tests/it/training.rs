//! Training runs on tiny configurations.
//!
//! Over 600 lines on purpose: every run-level behaviour of `efformer train` (run directory,
//! resume, NaN guard, streams, memories, experts), sharing the resume helper and fixtures.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{TINY_LISTOPS, efformer, temp_dir, text, workspace};

fn result(run: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(run.join("result.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()));
    serde_json::from_str(&s).unwrap()
}

#[test]
fn a_run_writes_config_checkpoints_metrics_curves_and_result_and_is_not_overwritten() {
    let dir = temp_dir("run");
    std::fs::write(dir.join("tiny.toml"), TINY_LISTOPS).unwrap();
    let out = efformer(
        &dir,
        &[
            "train",
            "tiny.toml",
            "--out",
            "run",
            "--set",
            "train.epochs=2",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let run = dir.join("run");
    for f in [
        "config.toml",
        "metrics.csv",
        "curves.png",
        "result.json",
        "checkpoint/model-2.bpk",
        "checkpoint/optim-2.bpk",
        "checkpoint/scheduler-2.bpk",
    ] {
        assert!(run.join(f).exists(), "{f} missing: {}", text(&out));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("# resolved configuration") && stdout.contains("epochs = 2"),
        "the resolved config is printed"
    );
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert!(
        csv.starts_with("split,epoch,iteration,metric,value")
            && csv.contains("train,2,")
            && csv.contains("valid,1,"),
        "{csv}"
    );
    let r = result(&run);
    assert_eq!(r["epochs"], 2);
    assert!(r["test"]["accuracy"].as_f64().unwrap() > 0.0);
    let f1 = r["test"]["macro_f1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f1), "macro-F1 {f1}");
    // Throughput: every training token counted once per epoch, padding on top.
    let t = &r["train_throughput"];
    let (real, padded) = (
        t["real_tokens"].as_u64().unwrap(),
        t["padded_tokens"].as_u64().unwrap(),
    );
    assert_eq!(t["epochs"], 2);
    assert!(real > 0 && padded >= real, "{t}");
    assert!(t["real_tokens_per_second"].as_f64().unwrap() > 0.0, "{t}");
    assert!(
        stdout.contains("tokens/s (") && stdout.contains(" padded)"),
        "progress lines show tokens per second: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("batching: length buckets of 16 batches; padding is"),
        "the padding share is printed: {stderr}"
    );

    // A second run into the same directory is refused and changes nothing.
    let before = std::fs::read(run.join("checkpoint/model-2.bpk")).unwrap();
    let again = efformer(&dir, &["train", "tiny.toml", "--out", "run"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--resume"),
        "{}",
        text(&again)
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint/model-2.bpk")).unwrap(),
        before
    );

    // eval on the checkpoint reproduces the run's test accuracy.
    let eval = efformer(
        &dir,
        &[
            "eval",
            "tiny.toml",
            "--checkpoint",
            "run/checkpoint/model-2.bpk",
        ],
    );
    assert!(eval.status.success(), "{}", text(&eval));
    let acc = format!(
        "accuracy {:.2}%",
        100.0 * r["test"]["accuracy"].as_f64().unwrap()
    );
    assert!(
        String::from_utf8_lossy(&eval.stdout).contains(&acc),
        "{acc}\n{}",
        text(&eval)
    );

    // A corrupt checkpoint is a clear error.
    std::fs::write(run.join("checkpoint/model-1.bpk"), b"not a checkpoint").unwrap();
    let bad = efformer(
        &dir,
        &[
            "eval",
            "tiny.toml",
            "--checkpoint",
            "run/checkpoint/model-1.bpk",
        ],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("model-1.bpk"),
        "{}",
        text(&bad)
    );
}

/// A run killed with SIGKILL during epoch 2 and resumed ends with the same metrics as an
/// uninterrupted run with the same seed (data order and dropout depend only on seed and epoch;
/// Performer redraws its features every 5 optimiser steps, and the resumed run continues the
/// step count, so its draws are the uninterrupted run's).
#[test]
fn resume_after_sigkill_reproduces_the_uninterrupted_run() {
    let dir = temp_dir("resume");
    let config = TINY_LISTOPS
        .replace("train = 256", "train = 1024")
        .replace("features = 16", "features = 16\nredraw_interval = 5");
    assert!(config.contains("redraw_interval = 5"));
    std::fs::write(dir.join("tiny.toml"), config).unwrap();
    let whole = efformer(&dir, &["train", "tiny.toml", "--out", "whole"]);
    assert!(whole.status.success(), "{}", text(&whole));

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_efformer"))
        .args(["train", "tiny.toml", "--out", "killed"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = dir.join("killed/checkpoint/scheduler-1.bpk");
    let start = Instant::now();
    while !first.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !dir.join("killed/result.json").exists(),
        "the run was killed before finishing"
    );

    let resumed = efformer(&dir, &["train", "tiny.toml", "--out", "killed", "--resume"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    let (a, b) = (result(&dir.join("whole")), result(&dir.join("killed")));
    for split in ["valid", "test"] {
        for key in ["loss", "accuracy"] {
            let (x, y) = (
                a[split][key].as_f64().unwrap(),
                b[split][key].as_f64().unwrap(),
            );
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
                "{split} {key}: uninterrupted {x} vs resumed {y}"
            );
        }
    }
}

/// Per-step state survives a resume exactly: a run whose Performer redraws its features every
/// 5 optimiser steps, cut back to its epoch-1 checkpoint (what a kill during epoch 2 leaves,
/// checkpoints being atomic) and resumed, ends as the uninterrupted run; the redraws matter
/// (a run without them ends elsewhere).
#[test]
fn a_resumed_run_continues_the_per_step_state() {
    // Performer redrawing its features every 5 steps.
    let performer = TINY_LISTOPS.replace("features = 16", "features = 16\nredraw_interval = 5");
    let (dir, a) = resumed_equals_uninterrupted("resume-steps", &performer);
    std::fs::write(dir.join("fixed.toml"), TINY_LISTOPS).unwrap();
    let fixed = efformer(&dir, &["train", "fixed.toml", "--out", "fixed"]);
    assert!(fixed.status.success(), "{}", text(&fixed));
    assert_ne!(
        result(&dir.join("fixed"))["valid"],
        a["valid"],
        "the redraws change the run"
    );
    // Routing: k-means centroids initialised after step 1 and moved by EMA every step, saved
    // with the checkpoint, and the commitment loss in the training loss.
    let routing = TINY_LISTOPS.replace(
        "kind = \"performer\"\nfeatures = 16",
        "kind = \"routing\"\nclusters = 3",
    );
    resumed_equals_uninterrupted("resume-routing", &routing);
    // Reformer: rotations drawn from the step, which no checkpoint holds.
    let reformer = TINY_LISTOPS.replace(
        "kind = \"performer\"\nfeatures = 16",
        "kind = \"reformer\"\nchunk = 4\nn_hashes = 2",
    );
    resumed_equals_uninterrupted("resume-reformer", &reformer);
    // Reversible layers with dropout: masks drawn from (step, layer, branch), trained through
    // the tape (no stored activations).
    let reversible = reformer.replace(
        "n_layers = 1",
        "n_layers = 2\nplacement = \"pre\"\nreversible = true",
    );
    resumed_equals_uninterrupted("resume-reversible", &reversible);
}

/// Trains `config` (3 epochs) uninterrupted, and again from a copy of its epoch-1 checkpoints
/// with `--resume`: the two results must be equal. Returns the folder and the first result.
fn resumed_equals_uninterrupted(name: &str, config: &str) -> (crate::TestDir, serde_json::Value) {
    let dir = temp_dir(name);
    let config = config.replace("[train]", "[train]\nkeep_checkpoints = 3");
    std::fs::write(dir.join("tiny.toml"), &config).unwrap();
    let whole = efformer(&dir, &["train", "tiny.toml", "--out", "whole"]);
    assert!(whole.status.success(), "{}", text(&whole));
    // The state a kill during epoch 2 leaves: epoch 1's checkpoints, no result.
    let cut = dir.join("cut");
    std::fs::create_dir_all(cut.join("checkpoint")).unwrap();
    std::fs::copy(dir.join("whole/config.toml"), cut.join("config.toml")).unwrap();
    for name in ["model", "optim", "scheduler"] {
        let file = format!("checkpoint/{name}-1.bpk");
        std::fs::copy(dir.join("whole").join(&file), cut.join(&file)).unwrap();
    }
    let resumed = efformer(&dir, &["train", "tiny.toml", "--out", "cut", "--resume"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    let (a, b) = (result(&dir.join("whole")), result(&dir.join("cut")));
    assert_eq!(a["test"], b["test"], "{name}: uninterrupted vs resumed");
    assert_eq!(a["valid"], b["valid"], "{name}: uninterrupted vs resumed");
    (dir, a)
}

#[test]
fn a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = temp_dir("nan");
    std::fs::write(dir.join("tiny.toml"), TINY_LISTOPS).unwrap();
    // 256 examples / 16 per batch = 16 batches per epoch: batch 20 is in epoch 2.
    let out = efformer(
        &dir,
        &[
            "train",
            "tiny.toml",
            "--out",
            "run",
            "--set",
            "train.inject_nan_at_batch=20",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NaN") && stderr.contains("batch 20"),
        "{}",
        text(&out)
    );
    let ckpt = dir.join("run/checkpoint");
    assert!(ckpt.join("model-1.bpk").exists(), "epoch 1 is kept");
    assert!(
        !ckpt.join("model-2.bpk").exists(),
        "no checkpoint after the NaN"
    );
    // result.json scores the kept model (epoch 1), not the one that took the NaN step: the
    // same test accuracy as `efformer eval` on the kept checkpoint.
    let r = result(&dir.join("run"));
    assert_eq!(r["evaluated_epoch"], 1, "{r}");
    assert!(r["stopped"].to_string().contains("20"), "{r}");
    let eval = efformer(
        &dir,
        &[
            "eval",
            "tiny.toml",
            "--checkpoint",
            "run/checkpoint/model-1.bpk",
        ],
    );
    assert!(eval.status.success(), "{}", text(&eval));
    let acc = format!(
        "accuracy {:.2}%",
        100.0 * r["test"]["accuracy"].as_f64().unwrap()
    );
    assert!(
        String::from_utf8_lossy(&eval.stdout).contains(&acc),
        "{acc}\n{}",
        text(&eval)
    );
    assert!(r["test"]["loss"].as_f64().unwrap().is_finite(), "{r}");
}

#[test]
fn two_flex_devices_train_data_parallel() {
    let dir = temp_dir("devices");
    std::fs::write(dir.join("tiny.toml"), TINY_LISTOPS).unwrap();
    let out = efformer(
        &dir,
        &[
            "train",
            "tiny.toml",
            "--out",
            "run",
            "--devices",
            "flex,flex",
            "--set",
            "train.epochs=1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let r = result(&dir.join("run"));
    assert_eq!(r["device"], "flex,flex");
    // 256 items split 128 + 128, batches of 16: 8 optimiser steps an epoch (one batch from
    // each device a step), as the schedule and the step clock count them and as the run took.
    assert_eq!(r["steps_per_epoch"], 8, "{r}");
    assert_eq!(r["optimizer_steps"], 8, "{r}");
    // One device: 16 batches, 16 steps.
    let one = efformer(
        &dir,
        &[
            "train",
            "tiny.toml",
            "--out",
            "one",
            "--set",
            "train.epochs=1",
        ],
    );
    assert!(one.status.success(), "{}", text(&one));
    let r = result(&dir.join("one"));
    assert_eq!(
        (r["steps_per_epoch"].clone(), r["optimizer_steps"].clone()),
        (16.into(), 16.into()),
        "{r}"
    );
}

#[test]
fn tokenized_text_classification_trains_and_saves_its_tokenizer() {
    let dir = temp_dir("tokenized");
    let mut lines = String::new();
    for i in 0..120 {
        let (t, l) = if i % 2 == 0 {
            ("a wonderful lovely great film", "pos")
        } else {
            ("a terrible awful boring film", "neg")
        };
        lines.push_str(&format!(
            "{{\"id\": \"{i}\", \"text\": \"{t} number {i}\", \"label\": \"{l}\"}}\n"
        ));
    }
    std::fs::write(dir.join("train.jsonl"), &lines).unwrap();
    let half: String = lines.lines().take(60).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("test.jsonl"), half).unwrap();
    let config = r#"
task = "text-classification"
[text]
train = "train.jsonl"
test = "test.jsonl"
encoding = "tokenizer"
max_len = 32
[text.tokenizer]
model = "wordpiece"
vocab_size = 80
[model.stack]
n_layers = 1
d_model = 16
n_heads = 2
d_ff = 32
[model.stack.attention]
kind = "linear-transformer"
[train]
epochs = 2
batch_size = 16
lr = 3e-3
"#;
    std::fs::write(dir.join("text.toml"), config).unwrap();
    let out = efformer(&dir, &["train", "text.toml", "--out", "run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.join("run/tokenizer.json").exists());
    let eval = efformer(
        &dir,
        &[
            "eval",
            "text.toml",
            "--checkpoint",
            "run/checkpoint/model-2.bpk",
        ],
    );
    assert!(eval.status.success(), "{}", text(&eval));

    // The trained model classifies files, rebuilt from run/model.json and the saved tokenizer.
    assert!(dir.join("run/model.json").exists());
    std::fs::write(dir.join("a.txt"), "a wonderful lovely great film").unwrap();
    std::fs::write(dir.join("b.txt"), "a terrible awful boring film").unwrap();
    let checkpoint = "run/checkpoint/model-2.bpk";
    let out = efformer(
        &dir,
        &[
            "predict",
            "text.toml",
            "--checkpoint",
            checkpoint,
            "a.txt",
            "b.txt",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0][0], "a.txt");
    assert_eq!(lines[1][0], "b.txt");
    for line in &lines {
        assert!(["neg", "pos"].contains(&line[1]), "{stdout}");
        let p: f64 = line[2].parse().unwrap();
        assert!((0.5..=1.0).contains(&p), "{stdout}");
    }
    // Two epochs of a tiny model need not separate the classes, but its output depends on the input.
    assert_ne!(lines[0][2], lines[1][2], "{stdout}");
    let out = efformer(
        &dir,
        &[
            "predict",
            "text.toml",
            "--checkpoint",
            checkpoint,
            "--json",
            "a.txt",
        ],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: f64 = json["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "{json}");
    let out = efformer(
        &dir,
        &[
            "predict",
            "text.toml",
            "--checkpoint",
            checkpoint,
            "missing.txt",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot read missing.txt"),
        "{}",
        text(&out)
    );
}

/// The long-document pipeline on a tiny slice: import MiniLM, convert it to Longformer
/// attention with longer positions, fine-tune one epoch, predict. Needs the checkpoint in
/// `../shared/pretrained` (see `models`' pretrained tests for how a missing one is handled).
#[test]
fn a_pretrained_encoder_is_converted_fine_tuned_and_used_for_prediction() {
    let ckpt = workspace().join("../shared/pretrained/all-MiniLM-L6-v2");
    if !ckpt.join("model.safetensors").is_file() {
        assert!(
            std::env::var_os("EFFORMER_REQUIRE_SHARED").is_none(),
            "{} missing",
            ckpt.display()
        );
        efficient_attn::testing::skipped(
            "a_pretrained_encoder_is_converted_fine_tuned_and_used_for_prediction",
            &format!("{} not found", ckpt.display()),
        );
        return;
    }
    let dir = temp_dir("pretrained");
    let mut lines = String::new();
    for i in 0..16 {
        let (t, l) = if i % 2 == 0 {
            ("a wonderful, lovely and great film that I enjoyed", "pos")
        } else {
            ("a terrible, awful and boring film that I hated", "neg")
        };
        lines.push_str(&format!(
            "{{\"id\": \"{i}\", \"text\": \"{t}\", \"label\": \"{l}\"}}\n"
        ));
    }
    std::fs::write(dir.join("docs.jsonl"), &lines).unwrap();
    let config = format!(
        r#"
task = "text-classification"
[text]
train = "docs.jsonl"
test = "docs.jsonl"
encoding = "tokenizer"
max_len = 600
[text.tokenizer]
file = "{ckpt}/tokenizer.json"
[model]
global_prefix = 1
[model.pretrained]
dir = "{ckpt}"
[model.embedding]
max_len = 600
[model.stack]
dropout = 0.0
[model.stack.attention]
kind = "longformer"
window = 8
[train]
epochs = 1
batch_size = 8
lr = 1e-4
"#,
        ckpt = ckpt.display()
    );
    std::fs::write(dir.join("longdoc.toml"), config).unwrap();
    let out = efformer(&dir, &["train", "longdoc.toml", "--out", "run"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("positions 512 -> 600, 6 layers with global projections copied"),
        "{log}"
    );
    let result = result(&dir.join("run"));
    assert_eq!(
        result["parameters"].as_u64().unwrap(),
        22_565_376 + 6 * 3 * (384 * 384 + 384) + 88 * 384 + 2 * 385
    );
    std::fs::write(dir.join("doc.txt"), "a wonderful film").unwrap();
    let out = efformer(
        &dir,
        &[
            "predict",
            "longdoc.toml",
            "--checkpoint",
            "run/checkpoint/model-1.bpk",
            "doc.txt",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("doc.txt\t"),
        "{}",
        text(&out)
    );

    // Export: a directory with Hugging Face names, the labels and the tokenizer, which
    // predict reads alone and which gives the run's probabilities.
    let out = efformer(
        &dir,
        &[
            "export",
            "longdoc.toml",
            "--checkpoint",
            "run/checkpoint/model-1.bpk",
            "--out",
            "exported",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let exported = dir.join("exported");
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(exported.join(f).is_file(), "{f} missing: {}", text(&out));
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["hidden_size"], 384);
    assert_eq!(config["max_position_embeddings"], 600);
    let labels: Vec<&str> = config["id2label"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 2, "{config}");
    let weights = std::fs::read(exported.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&weights[8..8 + n]).into_owned();
    for name in [
        "embeddings.word_embeddings.weight",
        "encoder.layer.5.attention.self.query_global.weight",
        "classifier.weight",
    ] {
        assert!(header.contains(name), "{name} not in the exported weights");
    }
    std::fs::write(dir.join("doc2.txt"), "a boring, awful film I hated").unwrap();
    let probabilities = |args: &[&str]| {
        let out = efformer(&dir, args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["probabilities"].clone())
            .collect::<Vec<_>>()
    };
    let from_run = probabilities(&[
        "predict",
        "longdoc.toml",
        "--checkpoint",
        "run/checkpoint/model-1.bpk",
        "--json",
        "doc.txt",
        "doc2.txt",
    ]);
    let from_export = probabilities(&["predict", "exported", "--json", "doc.txt", "doc2.txt"]);
    assert_eq!(from_run.len(), 2);
    for (a, b) in from_run.iter().zip(&from_export) {
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            assert_eq!(x[0], y[0], "labels in the same order");
            let (x, y) = (x[1].as_f64().unwrap(), y[1].as_f64().unwrap());
            assert!((x - y).abs() < 1e-6, "run {x} vs export {y}");
        }
    }
    // Exporting over an existing directory is refused and changes nothing.
    let again = efformer(
        &dir,
        &[
            "export",
            "longdoc.toml",
            "--checkpoint",
            "run/checkpoint/model-1.bpk",
            "--out",
            "exported",
        ],
    );
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"), "{}", text(&again));
    assert_eq!(
        std::fs::read(exported.join("model.safetensors")).unwrap(),
        weights
    );

    // Shapes other than the attention come from the checkpoint.
    let out = efformer(
        &dir,
        &[
            "train",
            "longdoc.toml",
            "--out",
            "run2",
            "--set",
            "model.stack.d_model=128",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("model.stack: with model.pretrained"),
        "{}",
        text(&out)
    );
}

#[test]
fn language_model_and_seq2seq_tasks_train() {
    let dir = temp_dir("lm");
    std::fs::write(
        dir.join("corpus.txt"),
        "the quick brown fox jumps over the lazy dog. ".repeat(60),
    )
    .unwrap();
    let lm = r#"
task = "language-model"
[lm]
train = "corpus.txt"
seq_len = 32
[model.stack]
n_layers = 1
d_model = 16
n_heads = 2
d_ff = 32
[model.stack.attention]
kind = "performer"
features = 16
[train]
epochs = 1
batch_size = 8
"#;
    std::fs::write(dir.join("lm.toml"), lm).unwrap();
    let out = efformer(&dir, &["train", "lm.toml", "--out", "lm"]);
    assert!(out.status.success(), "{}", text(&out));
    let s2s = r#"
task = "seq2seq"
[seq2seq]
train = 128
valid = 32
max_len = 8
[model.stack]
n_layers = 1
d_model = 16
n_heads = 2
d_ff = 32
[model.decoder]
n_layers = 1
d_model = 16
n_heads = 2
d_ff = 32
[model.decoder.attention]
kind = "linear-transformer"
[train]
epochs = 1
batch_size = 16
"#;
    std::fs::write(dir.join("s2s.toml"), s2s).unwrap();
    let out = efformer(&dir, &["train", "s2s.toml", "--out", "s2s"]);
    assert!(out.status.success(), "{}", text(&out));
    // A decoder variant without a causal mode is a config error naming the layer.
    let bad = s2s.replace("kind = \"linear-transformer\"", "kind = \"linformer\"");
    std::fs::write(dir.join("bad.toml"), bad).unwrap();
    let out = efformer(&dir, &["train", "bad.toml", "--out", "bad"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`model.decoder.attention` (layer 0)") && err.contains("linformer"),
        "{}",
        text(&out)
    );
    assert!(
        !dir.join("bad").exists(),
        "an invalid configuration writes nothing"
    );
}

/// `[lm] mode = "stream"`: Transformer-XL trains on parallel streams read segment after
/// segment with its memory carried from batch to batch, and a resumed run equals the
/// uninterrupted one (the memories restart with every epoch). Without in-order batches the
/// run stops before writing anything, naming the key.
/// A Transformer-XL language model read as streams of `corpus` (the cat and the dog).
fn streamed_config(name: &str) -> (crate::TestDir, String) {
    let data = temp_dir(name);
    let corpus = data.join("corpus.txt");
    std::fs::write(
        &corpus,
        "the cat sat on the mat; the dog dug in the fog. ".repeat(120),
    )
    .unwrap();
    let config = format!(
        r#"
task = "language-model"
[lm]
train = "{}"
seq_len = 16
mode = "stream"
mem_len = 16
eval_mem_len = 32
[model.embedding]
positions = "none"
[model.stack]
n_layers = 1
d_model = 32
n_heads = 2
d_ff = 64
[model.stack.attention]
kind = "transformer-xl"
[train]
epochs = 3
batch_size = 4
eval_batch_size = 2
lr = 0.01
[train.batching]
kind = "in-order"
"#,
        corpus.display()
    );
    (data, config)
}

#[test]
fn a_streamed_language_model_trains_and_resumes_exactly() {
    let (_data, config) = streamed_config("stream-data");
    let (dir, a) = resumed_equals_uninterrupted("resume-stream", &config);
    let accuracy = a["valid"]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.3, "the model learnt something: {a}");

    let shuffled = config.replace("kind = \"in-order\"", "kind = \"shuffled\"");
    std::fs::write(dir.join("shuffled.toml"), shuffled).unwrap();
    let out = efformer(&dir, &["train", "shuffled.toml", "--out", "shuffled"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.batching.kind"), "{err}");
    assert!(!dir.join("shuffled").exists(), "nothing written");
}

/// `[model.compressive]`: the Compressive Transformer trains on the same streams (its
/// reconstruction loss in the training loss, its compressors in the checkpoint), resumes
/// exactly and generates through its memories; the configurations it cannot serve stop
/// before anything is written, naming the key.
#[test]
fn a_compressive_language_model_trains_resumes_and_generates() {
    let (_data, config) = streamed_config("compressive-data");
    let config = config.replace(
        "[train]\n",
        "[model.compressive]\ncmem_len = 4\nratio = 4\n[train]\n",
    );
    let (dir, a) = resumed_equals_uninterrupted("resume-compressive", &config);
    let accuracy = a["valid"]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "the model learnt the pattern: {a}");
    let out = efformer(
        &dir,
        &[
            "generate",
            "whole",
            "--prompt",
            "abcdefghabcdefghabcdefgh",
            "--max-new",
            "9",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    for (from, to, key) in [
        (
            "mode = \"stream\"",
            "mode = \"windows\"",
            "model.compressive",
        ),
        ("ratio = 4", "ratio = 0", "model.compressive.ratio"),
        (
            "task = \"language-model\"",
            "task = \"listops\"",
            "model.compressive",
        ),
    ] {
        std::fs::write(dir.join("bad.toml"), config.replace(from, to)).unwrap();
        let out = efformer(&dir, &["train", "bad.toml", "--out", "bad"]);
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{to}: {err}");
        assert!(!dir.join("bad").exists(), "{to}: nothing written");
    }
}

/// `[model.stack.ffn] kind = "top2"`: a classifier whose layers are mixtures of experts trains
/// (its balance and z losses in the training loss) and resumes exactly; a mixture of experts
/// in a reversible stack stops before anything is written, naming the key.
#[test]
fn a_mixture_of_experts_classifier_trains_and_resumes_exactly() {
    let config = TINY_LISTOPS.replace(
        "[model.stack.attention]",
        "[model.stack.ffn]\nkind = \"top2\"\nexperts = 3\n[model.stack.attention]",
    );
    let (dir, a) = resumed_equals_uninterrupted("resume-moe", &config);
    assert!(a["valid"]["accuracy"].as_f64().is_some(), "{a}");
    // Per-layer routing in the training rows of metrics.csv: balance in (0, E], drops in [0, 1].
    let csv = std::fs::read_to_string(dir.join("whole/metrics.csv")).unwrap();
    for name in ["MoE balance L0", "MoE drops L0", "MoE aux loss L0"] {
        let values: Vec<f64> = csv
            .lines()
            .filter(|l| l.starts_with("train,") && l.contains(name))
            .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
            .collect();
        assert!(!values.is_empty(), "{name} in metrics.csv");
        let ok = |v: f64| match name {
            "MoE balance L0" => v > 0.0 && v <= 3.0 + 1e-4,
            "MoE drops L0" => (0.0..=1.0).contains(&v),
            _ => v > 0.0,
        };
        assert!(values.iter().all(|&v| ok(v)), "{name}: {values:?}");
    }

    let reversible = config.replace("[model.stack.ffn]", "reversible = true\n[model.stack.ffn]");
    std::fs::write(dir.join("reversible.toml"), reversible).unwrap();
    let out = efformer(&dir, &["train", "reversible.toml", "--out", "reversible"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ffn.kind") && err.contains("reversible"),
        "{err}"
    );
    assert!(!dir.join("reversible").exists(), "nothing written");
}

/// A funnel classifier (3 blocks, stride 2; the pooling layers' attention chosen apart from the
/// stack's) trains and resumes exactly; a funnel whose pooling layers lack a cross mode, or
/// whose blocks do not cover the stack, stops before anything is written, naming the key.
#[test]
fn a_funnel_classifier_trains_and_resumes_exactly() {
    let config = TINY_LISTOPS
        .replace("n_layers = 1", "n_layers = 3")
        .replace(
            "[model.stack.attention]\nkind = \"performer\"\nfeatures = 16",
            "[model.stack.attention]\nkind = \"longformer\"\nwindow = 4\n\
             [model.funnel]\nblocks = [1, 1, 1]\npool_attention = { kind = \"memory-efficient\" }",
        );
    assert!(
        config.contains("[model.funnel]"),
        "the fixture changed: {config}"
    );
    let (dir, a) = resumed_equals_uninterrupted("resume-funnel", &config);
    assert!(a["valid"]["accuracy"].as_f64().is_some(), "{a}");

    for (name, broken, key) in [
        (
            "no-cross",
            config.replace("pool_attention = { kind = \"memory-efficient\" }", ""),
            "model.funnel.pool_attention",
        ),
        (
            "blocks",
            config.replace("blocks = [1, 1, 1]", "blocks = [2, 2]"),
            "model.funnel.blocks",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.toml")), broken).unwrap();
        let out = efformer(&dir, &["train", &format!("{name}.toml"), "--out", name]);
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(!dir.join(name).exists(), "{name}: nothing written");
    }
}

/// The set task: the Set Transformer learns the maximum of a set (loss and mean absolute error
/// fall far below the error of predicting the mean target), resumes exactly, and reports the
/// mean absolute error, not an accuracy; a set model on another task is refused.
#[test]
fn the_set_max_task_trains_resumes_and_reports_the_mean_absolute_error() {
    let config = std::fs::read_to_string(workspace().join("configs/sets/max-regression.toml"))
        .unwrap()
        .replace("train = 256000", "train = 6144")
        .replace("valid = 2000", "valid = 256")
        .replace("test = 2000", "test = 256")
        .replace("epochs = 10", "epochs = 3")
        .replace("batch_size = 128", "batch_size = 64")
        .replace("d_model = 64", "d_model = 32")
        .replace("lr = 1e-3", "lr = 3e-3");
    assert!(
        config.contains("train = 6144"),
        "the config changed: {config}"
    );
    let (dir, a) = resumed_equals_uninterrupted("resume-set", &config);
    let test = &a["test"];
    assert!(test.get("accuracy").is_none(), "{a}");
    let mae = test["mae"].as_f64().expect("a mean absolute error");
    // Predicting one constant for the maximum of 1-10 numbers in [0, 100] errs by about 15 on
    // average (about 14.5 at the median).
    assert!(mae < 10.0, "test MAE {mae}: {a}");
    assert!(
        (test["loss"].as_f64().unwrap() - mae).abs() < 1e-3,
        "L1 loss = MAE: {a}"
    );
    let out = efformer(
        &dir,
        &[
            "eval",
            "tiny.toml",
            "--checkpoint",
            "whole/checkpoint/model-3.bpk",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("mean absolute error"), "{}", text(&out));

    let wrong = TINY_LISTOPS.replace("[model]", "[model.set]\nd_input = 1\n[model]");
    std::fs::write(dir.join("wrong.toml"), wrong).unwrap();
    let out = efformer(&dir, &["train", "wrong.toml", "--out", "wrong"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model.set"),
        "{}",
        text(&out)
    );
    assert!(!dir.join("wrong").exists(), "nothing written");
}
