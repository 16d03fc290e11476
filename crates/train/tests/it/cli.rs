//! The CLI surface: attention list, bad arguments, exit codes.

use crate::{efformer, temp_dir, text};

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
