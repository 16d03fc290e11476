//! Bad input, as a user would give it: every case must end with a one-line error that names
//! the cause, a non-zero exit, no Rust panic or backtrace, and nothing written or overwritten.
//! `docs/robustness.md` lists the same cases (a test checks that it names each one).

use std::path::Path;
use std::process::{Command, Output};

use crate::{TINY_LISTOPS, temp_dir, text, workspace};

/// One bad input: a name (as in `docs/robustness.md`), the experiment file (or none), the
/// command line, and a fragment the error must contain.
struct Case {
    name: &'static str,
    config: Option<String>,
    args: Vec<String>,
    expect: &'static str,
}

fn listops_with(from: &str, to: &str) -> String {
    assert!(TINY_LISTOPS.contains(from), "the base config has `{from}`");
    TINY_LISTOPS.replacen(from, to, 1)
}

fn train(config: String, name: &'static str, expect: &'static str) -> Case {
    Case {
        name,
        config: Some(config),
        args: ["train", "c.toml", "--out", "run"]
            .map(String::from)
            .to_vec(),
        expect,
    }
}

fn train_set(set: &str, name: &'static str, expect: &'static str) -> Case {
    Case {
        name,
        config: Some(TINY_LISTOPS.to_string()),
        args: ["train", "c.toml", "--out", "run", "--set", set]
            .map(String::from)
            .to_vec(),
        expect,
    }
}

const ATTENTION: &str = "kind = \"performer\"\nfeatures = 16";

fn config_cases() -> Vec<Case> {
    let attention = |with: &str| listops_with(ATTENTION, with);
    let text = |train: &str, test: &str| {
        format!(
            "task = \"text-classification\"\n[text]\ntrain = \"{train}\"\ntest = \"{test}\"\n\
             [model.stack]\nn_layers = 1\nd_model = 16\nn_heads = 2\nd_ff = 32\n[train]\nepochs = 1\n"
        )
    };
    let lm = |attention: &str| {
        format!(
            "task = \"language-model\"\n[lm]\ntrain = \"corpus.txt\"\nseq_len = 16\n\
             [model.stack]\nn_layers = 1\nd_model = 16\nn_heads = 2\nd_ff = 32\n\
             [model.stack.attention]\n{attention}\n[train]\nepochs = 1\n"
        )
    };
    vec![
        train(
            format!("bogus = 1\n{TINY_LISTOPS}"),
            "unknown top-level key",
            "bogus",
        ),
        train(
            listops_with("task = \"listops\"", "task = \"listopz\""),
            "unknown task",
            "listopz",
        ),
        train(
            listops_with("epochs = 3", "epochs = \"three\""),
            "wrong type",
            "train.epochs",
        ),
        train(
            attention("kind = \"nope\""),
            "unknown attention kind",
            "nope",
        ),
        train(
            attention("kind = \"performer\"\nfeatrues = 16"),
            "unknown attention field",
            "featrues",
        ),
        train(
            listops_with("n_heads = 2", "n_heads = 3"),
            "heads do not divide the width",
            "`model.stack.n_heads`:",
        ),
        train(
            listops_with("d_model = 16", "d_model = 0"),
            "zero width",
            "d_model",
        ),
        train(
            listops_with(
                "dropout = 0.1\n[model.stack.attention]",
                "dropout = 1.5\n[model.stack.attention]",
            ),
            "dropout out of range",
            "dropout",
        ),
        train(
            listops_with("batch_size = 16", "batch_size = 0"),
            "zero batch size",
            "batch_size",
        ),
        train(
            attention("kind = \"performer\"\nfeatures = 0"),
            "zero random features",
            "`model.stack.attention` (layer 0): `features`",
        ),
        train(
            attention("kind = \"linformer\"\nmax_len = 8"),
            "Linformer shorter than the data",
            "max_len",
        ),
        train(
            attention("kind = \"synthesizer\"\nmax_len = 8"),
            "Synthesizer shorter than the data",
            "max_len",
        ),
        train(
            listops_with("[model.embedding]", "[model.embedding]\nmax_len = 8"),
            "positions shorter than the data",
            "model.embedding.max_len",
        ),
        train(
            attention("kind = \"sparse-transformer\"\nstride = 4\nsummary = 8"),
            "summary longer than the stride",
            "summary",
        ),
        train(
            attention("kind = \"sparse-transformer\"\nstride = \"cube\""),
            "unknown stride rule",
            "stride",
        ),
        train(
            attention("kind = \"longformer\"\nwindow = 0"),
            "zero window",
            "window",
        ),
        train(
            listops_with(
                "n_layers = 1",
                "n_layers = 1\nattention_layers = [{ kind = \"full\" }, { kind = \"full\" }]",
            ),
            "one attention per layer",
            "attention_layers",
        ),
        train(
            lm("kind = \"linformer\""),
            "Linformer in a causal model",
            "`model.stack.attention` (layer 0): attention kind \"linformer\" has no causal mode",
        ),
        train(
            lm("kind = \"bigbird\""),
            "BigBird in a causal model",
            "causal",
        ),
        train(
            attention("kind = \"axial\""),
            "2-D attention without a grid",
            "model.grid",
        ),
        train(
            lm("kind = \"image-transformer-2d\""),
            "2-D attention in a language model",
            "needs a 2-D grid",
        ),
        train(
            text("missing.jsonl", "missing.jsonl"),
            "missing text data file",
            "missing.jsonl",
        ),
        train_set("train.lr", "a --set without a value", "train.lr"),
        train_set("train.nope=1", "a --set of an unknown key", "nope"),
        Case {
            name: "missing experiment file",
            config: None,
            args: ["train", "nope.toml", "--out", "run"]
                .map(String::from)
                .to_vec(),
            expect: "nope.toml",
        },
        Case {
            name: "unknown device",
            config: Some(TINY_LISTOPS.to_string()),
            args: ["train", "c.toml", "--out", "run", "--device", "tpu"]
                .map(String::from)
                .to_vec(),
            expect: "tpu",
        },
    ]
}

/// Runs `efformer` in `dir` with `RUST_BACKTRACE=1` (a backtrace must not appear anyway).
fn efformer_bt(dir: &Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_efformer"))
        .args(args)
        .current_dir(dir)
        .env("BURN_DEVICE", "flex")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("efformer runs")
}

/// The case failed as it should: non-zero, the fragment in a one-line error, no panic.
fn assert_clean_error(name: &str, out: &Output, expect: &str) {
    assert!(!out.status.success(), "{name}: succeeded\n{}", text(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert!(
        error.len() == 1 && error[0].contains(expect),
        "{name}: expected one error line containing `{expect}`\n{}",
        text(out)
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{name}: a panic reached the user\n{}",
        text(out)
    );
    eprintln!("case | {name} | {}", error[0]);
}

#[test]
fn bad_configurations_are_named_errors_that_write_nothing() {
    let root = temp_dir("robust-config");
    for (i, case) in config_cases().into_iter().enumerate() {
        let dir = root.join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("corpus.txt"), "some text to model\n".repeat(40)).unwrap();
        if let Some(config) = &case.config {
            std::fs::write(dir.join("c.toml"), config).unwrap();
        }
        let out = efformer_bt(&dir, &case.args);
        assert_clean_error(case.name, &out, case.expect);
        assert!(
            !dir.join("run").exists(),
            "{}: a run directory was written\n{}",
            case.name,
            text(&out)
        );
    }
}

/// Data files, checkpoints and run directories that are wrong.
#[test]
fn bad_data_and_checkpoints_are_named_errors_that_lose_nothing() {
    let dir = temp_dir("robust-data");
    let lines = |labels: &[&str]| -> String {
        (0..40)
            .map(|i| {
                format!(
                    "{{\"text\": \"words number {i}\", \"label\": \"{}\"}}\n",
                    labels[i % labels.len()]
                )
            })
            .collect()
    };
    std::fs::write(dir.join("train.jsonl"), lines(&["a", "b"])).unwrap();
    std::fs::write(dir.join("unknown-label.jsonl"), lines(&["a", "c"])).unwrap();
    std::fs::write(
        dir.join("broken.jsonl"),
        format!("{}{{\"text\": \"no end\n", lines(&["a", "b"])),
    )
    .unwrap();
    std::fs::write(dir.join("empty.jsonl"), "").unwrap();
    std::fs::write(dir.join("no-label.jsonl"), "{\"text\": \"words\"}\n").unwrap();
    let text_config = |train: &str, test: &str| {
        format!(
            "task = \"text-classification\"\n[text]\ntrain = \"{train}\"\ntest = \"{test}\"\n\
             [model.stack]\nn_layers = 1\nd_model = 16\nn_heads = 2\nd_ff = 32\n[train]\nepochs = 1\n"
        )
    };
    for (name, train, test, expect) in [
        (
            "malformed JSON line",
            "broken.jsonl",
            "train.jsonl",
            "broken.jsonl",
        ),
        (
            "test label unseen in training",
            "train.jsonl",
            "unknown-label.jsonl",
            "unknown-label.jsonl",
        ),
        (
            "empty training file",
            "empty.jsonl",
            "train.jsonl",
            "empty.jsonl",
        ),
        (
            "record without a label",
            "no-label.jsonl",
            "train.jsonl",
            "no-label.jsonl",
        ),
    ] {
        std::fs::write(dir.join("t.toml"), text_config(train, test)).unwrap();
        let args = ["train", "t.toml", "--out", "run-bad"].map(String::from);
        let out = efformer_bt(&dir, &args);
        assert_clean_error(name, &out, expect);
        assert!(
            !dir.join("run-bad").exists(),
            "{name}: a run directory was written"
        );
    }

    // A good run to break things against.
    std::fs::write(dir.join("c.toml"), TINY_LISTOPS).unwrap();
    let good = efformer_bt(&dir, &["train", "c.toml", "--out", "run"].map(String::from));
    assert!(good.status.success(), "{}", text(&good));
    let config_before = std::fs::read(dir.join("run/config.toml")).unwrap();
    let result_before = std::fs::read(dir.join("run/result.json")).unwrap();
    std::fs::write(dir.join("corrupt.bpk"), b"not a checkpoint").unwrap();
    let other = TINY_LISTOPS.replacen("d_model = 16", "d_model = 32", 1);
    std::fs::write(dir.join("other.toml"), other).unwrap();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "existing run without --resume",
            vec!["train", "c.toml", "--out", "run"],
            "--resume",
        ),
        (
            "--resume with a different configuration",
            vec![
                "train",
                "c.toml",
                "--out",
                "run",
                "--resume",
                "--set",
                "train.lr=0.5",
            ],
            "differs",
        ),
        (
            "--resume of a directory with no run",
            vec!["train", "c.toml", "--out", "empty-run", "--resume"],
            "nothing to resume",
        ),
        (
            "missing checkpoint",
            vec![
                "eval",
                "c.toml",
                "--checkpoint",
                "run/checkpoint/model-9.bpk",
            ],
            "model-9.bpk",
        ),
        (
            "corrupt checkpoint",
            vec!["eval", "c.toml", "--checkpoint", "corrupt.bpk"],
            "corrupt.bpk",
        ),
        (
            "checkpoint of another model",
            vec![
                "eval",
                "other.toml",
                "--checkpoint",
                "run/checkpoint/model-3.bpk",
            ],
            "model-3.bpk",
        ),
    ];
    for (name, args, expect) in cases {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let out = efformer_bt(&dir, &args);
        assert_clean_error(name, &out, expect);
        assert_eq!(
            std::fs::read(dir.join("run/config.toml")).unwrap(),
            config_before,
            "{name}: config.toml changed"
        );
        assert_eq!(
            std::fs::read(dir.join("run/result.json")).unwrap(),
            result_before,
            "{name}: result.json changed"
        );
    }
    assert!(
        !dir.join("empty-run").exists()
            || std::fs::read_dir(dir.join("empty-run"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// `docs/robustness.md` names every case the tests try.
#[test]
fn the_robustness_page_lists_every_case() {
    let page = std::fs::read_to_string(workspace().join("docs/robustness.md")).unwrap();
    let data_cases = [
        "malformed JSON line",
        "test label unseen in training",
        "empty training file",
        "record without a label",
        "existing run without --resume",
        "--resume with a different configuration",
        "--resume of a directory with no run",
        "missing checkpoint",
        "corrupt checkpoint",
        "checkpoint of another model",
        "missing text data file",
    ];
    for name in config_cases().iter().map(|c| c.name).chain(data_cases) {
        assert!(
            page.contains(name),
            "docs/robustness.md does not list `{name}`"
        );
    }
}
