//! `efformer generate` on tiny language models trained here: a model that learnt a periodic
//! byte pattern continues it, a seed fixes the sampled text, a variant without decoding
//! caches and a continuation past the model's positions fall back to recomputing, and bad
//! input gets a one-line error.

use super::{efformer, temp_dir, text};

const CONFIG: &str = r#"
task = "language-model"
[lm]
train = "corpus.txt"
seq_len = 32
[model.stack]
n_layers = 1
d_model = 32
n_heads = 2
d_ff = 64
[model.stack.attention]
kind = "full"
[train]
epochs = 6
batch_size = 16
lr = 0.003
"#;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_trained_language_model_continues_its_pattern_and_a_seed_fixes_the_text() {
    let dir = temp_dir("generate");
    std::fs::write(dir.join("corpus.txt"), "abcdefgh".repeat(2500)).unwrap();
    std::fs::write(dir.join("lm.toml"), CONFIG).unwrap();
    let out = efformer(&dir, &["train", "lm.toml", "--out", "lm"]);
    assert!(out.status.success(), "{}", text(&out));

    // Greedy: the pattern, through the layers' caches.
    let greedy = efformer(
        &dir,
        &[
            "generate",
            "lm",
            "--prompt",
            "abcde",
            "--max-new",
            "20",
            "--greedy",
        ],
    );
    assert!(greedy.status.success(), "{}", text(&greedy));
    assert_eq!(
        stdout(&greedy),
        "abcdefghabcdefghabcdefgha\n",
        "{}",
        text(&greedy)
    );
    let err = stderr(&greedy);
    assert!(
        err.contains("20 tokens in") && err.contains("tokens/s"),
        "{err}"
    );
    assert!(err.contains("incremental caches"), "{err}");

    // Sampling: the same seed gives the same text.
    let sample = |seed: &str| {
        let out = efformer(
            &dir,
            &[
                "generate",
                "lm",
                "--prompt",
                "abc",
                "--max-new",
                "25",
                "--seed",
                seed,
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        stdout(&out)
    };
    let a = sample("11");
    assert_eq!(a, sample("11"), "the same seed");
    assert!(a.starts_with("abc") && a.len() == 3 + 25 + 1, "{a:?}");

    // Past the 32 positions every token sees the last 32: still the pattern, and said so.
    let long = efformer(
        &dir,
        &[
            "generate",
            "lm",
            "--prompt",
            "abcde",
            "--max-new",
            "43",
            "--greedy",
        ],
    );
    assert!(long.status.success(), "{}", text(&long));
    assert_eq!(stdout(&long), format!("{}\n", "abcdefgh".repeat(6)));
    assert!(
        stderr(&long).contains("each token sees the last 32"),
        "{}",
        text(&long)
    );

    // Transformer-XL (no absolute positions) past its 32 positions: each layer's memory of the
    // last 32 positions rides from token to token.
    let xl = CONFIG
        .replace("kind = \"full\"", "kind = \"transformer-xl\"")
        .replace(
            "[model.stack]",
            "[model.embedding]\npositions = \"none\"\n[model.stack]",
        );
    std::fs::write(dir.join("xl.toml"), xl).unwrap();
    let out = efformer(&dir, &["train", "xl.toml", "--out", "xl"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = efformer(
        &dir,
        &[
            "generate",
            "xl",
            "--prompt",
            "abcde",
            "--max-new",
            "43",
            "--greedy",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("memory of the last 32"),
        "{}",
        text(&out)
    );
    assert_eq!(
        stdout(&out),
        format!("{}\n", "abcdefgh".repeat(6)),
        "{}",
        text(&out)
    );

    // A variant without a decoding cache recomputes, and says why.
    let reformer = CONFIG
        .replace("kind = \"full\"", "kind = \"reformer\"")
        .replace("epochs = 6", "epochs = 1");
    std::fs::write(dir.join("reformer.toml"), reformer).unwrap();
    let out = efformer(&dir, &["train", "reformer.toml", "--out", "reformer"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = efformer(
        &dir,
        &["generate", "reformer", "--prompt", "abc", "--max-new", "5"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("no incremental decoding"),
        "{}",
        text(&out)
    );

    // Bad input: one line, no backtrace, nothing printed.
    for (args, expected) in [
        (
            vec!["generate", "lm", "--prompt", ""],
            "the prompt is empty",
        ),
        (
            vec!["generate", "lm", "--prompt", "a", "--temperature", "0"],
            "--temperature",
        ),
        (
            vec!["generate", "lm", "--prompt", "a", "--top-k", "0"],
            "--top-k",
        ),
        (vec!["generate", "missing", "--prompt", "a"], "model.json"),
    ] {
        let out = efformer(&dir, &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
    }
}
