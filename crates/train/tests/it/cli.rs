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
