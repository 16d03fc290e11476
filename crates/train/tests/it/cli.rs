//! The CLI surface: attention list, bad arguments, exit codes.

use std::collections::BTreeSet;

use efficient_attn::AttentionConfig;
use efficient_attn::testing::registered_specs;

use crate::{efformer, temp_dir, text};

/// A variant cannot be half-registered: the contract suite's registry, the config enum (its
/// kinds, its defaults and what each default says it is) and `efformer attention list` name
/// the same kinds, and every kind has a contract spec under its own name.
#[test]
fn the_registry_the_config_enum_and_attention_list_agree() {
    let enum_kinds: Vec<&str> = AttentionConfig::KINDS.to_vec();
    let defaults: Vec<&str> = AttentionConfig::all_defaults()
        .iter()
        .map(|c| c.info().kind)
        .collect();
    assert_eq!(defaults, enum_kinds, "defaults vs KINDS");
    for kind in &enum_kinds {
        let config = AttentionConfig::from_kind(kind).expect("every kind has a default");
        assert_eq!(config.info().kind, *kind);
        let round: AttentionConfig = toml::from_str(&format!("kind = \"{kind}\"")).unwrap();
        assert_eq!(round.info().kind, *kind, "serde name of {kind}");
    }
    let specs = registered_specs();
    let spec_kinds: BTreeSet<&str> = specs.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        spec_kinds,
        enum_kinds.iter().copied().collect::<BTreeSet<_>>(),
        "contract registry vs config enum"
    );
    for (kind, spec) in &specs {
        assert!(
            spec.name.starts_with(kind),
            "spec `{}` registered under `{kind}`",
            spec.name
        );
    }
    let dir = temp_dir("registry");
    let out = efformer(&dir, &["attention", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, enum_kinds, "attention list vs config enum");
}

#[test]
fn attention_list_json_has_the_documented_keys() {
    let dir = temp_dir("list");
    let out = efformer(&dir, &["attention", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = list.as_array().unwrap();
    assert!(entries.len() >= 7);
    for e in entries {
        for key in ["name", "modes", "complexity", "exact"] {
            assert!(e.get(key).is_some(), "{key} missing in {e}");
        }
        for m in e["modes"].as_array().unwrap() {
            assert!(["bidirectional", "causal", "cross"].contains(&m.as_str().unwrap()));
        }
    }
    let table = efformer(&dir, &["attention", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("memory-efficient"));
}

#[test]
fn a_missing_config_is_a_clear_error_with_a_nonzero_exit() {
    let dir = temp_dir("missing");
    let out = efformer(&dir, &["train", "nope.toml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope.toml"),
        "{}",
        text(&out)
    );
    assert!(
        !dir.join("runs").exists(),
        "nothing is written for a bad config"
    );
}

#[test]
fn an_unknown_device_is_a_clear_error() {
    let dir = temp_dir("device");
    let out = efformer(&dir, &["attention", "demo", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tpu"),
        "{}",
        text(&out)
    );
}

/// Errors the configuration and the data allow to catch are caught before anything is
/// written: a missing data file, and a length-sized attention (Linformer, dense Synthesizer)
/// shorter than the data's sequences. Each is one line naming the cause (no Rust backtrace,
/// even with `RUST_BACKTRACE=1`), a non-zero exit, and no run directory.
#[test]
fn data_and_length_errors_leave_no_run_directory_and_no_backtrace() {
    let dir = temp_dir("before-writing");
    let text_config = |train: &str| {
        format!(
            r#"
task = "text-classification"
[text]
train = "{train}"
test = "{train}"
[model.stack]
n_layers = 1
d_model = 16
n_heads = 2
d_ff = 32
[train]
epochs = 1
"#
        )
    };
    std::fs::write(dir.join("missing.toml"), text_config("no-such-file.jsonl")).unwrap();
    let listops = crate::TINY_LISTOPS.replace(
        "kind = \"performer\"\nfeatures = 16",
        "kind = \"linformer\"\nmax_len = 8",
    );
    assert!(listops.contains("linformer"));
    std::fs::write(dir.join("short.toml"), &listops).unwrap();
    let synth = crate::TINY_LISTOPS.replace(
        "kind = \"performer\"\nfeatures = 16",
        "kind = \"synthesizer\"\nmax_len = 8",
    );
    std::fs::write(dir.join("synth.toml"), &synth).unwrap();
    for (file, expect) in [
        ("missing.toml", "no-such-file.jsonl"),
        ("short.toml", "model.stack.attention.max_len = 8"),
        ("synth.toml", "model.stack.attention.max_len = 8"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_efformer"))
            .args(["train", file, "--out", "run"])
            .current_dir(&dir)
            .env("BURN_DEVICE", "flex")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{file}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{file}: {}", text(&out));
        assert!(
            !stderr.contains("stack backtrace") && !stderr.contains("panicked"),
            "{file}: {}",
            text(&out)
        );
        assert!(
            !dir.join("run").exists(),
            "{file}: a run directory was left behind"
        );
    }
}

/// A zero size or an unknown kind for `efformer bench` / `bench-train` is a one-line error
/// naming it (not a panic inside a tensor operation, nor a table of failed cases).
#[test]
fn zero_benchmark_sizes_are_named_errors() {
    let dir = temp_dir("bench-zero");
    for (args, option) in [
        (
            &["bench", "--variants", "full", "--lengths", "0"][..],
            "--lengths",
        ),
        (
            &["bench", "--variants", "full", "--heads", "0"][..],
            "--heads",
        ),
        (&["bench", "--variants", "nope"][..], "nope"),
        (&["bench-train", "--attentions", "nope"][..], "nope"),
        (&["bench-train", "--steps", "0"][..], "--steps"),
        (
            &["bench", "--variants", "full", "--memory", "4"][..],
            "--mode causal",
        ),
    ] {
        let out = efformer(&dir, args);
        assert!(!out.status.success(), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(option), "{}", text(&out));
        assert!(!stderr.contains("panicked"), "{}", text(&out));
    }
}
