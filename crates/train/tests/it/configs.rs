//! Every shipped experiment file parses, every variant has its LRA configs, and configuration
//! errors name the key path.

use std::path::Path;

use efficient_attn::AttentionConfig;
use train::config::load::{apply_sets, from_table, load, load_table};

use crate::{temp_dir, workspace};

fn toml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            toml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "toml") {
            out.push(p);
        }
    }
}

#[test]
fn every_shipped_config_parses() {
    let mut files = Vec::new();
    toml_files(&workspace().join("configs"), &mut files);
    assert!(files.len() >= 10, "{files:?}");
    for f in files {
        load(&f, &[]).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn every_variant_has_lra_configs() {
    for kind in AttentionConfig::KINDS {
        for task in ["listops", "text"] {
            let path = workspace().join(format!("configs/lra/{task}/{kind}.toml"));
            let (config, _) =
                load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kinds: Vec<&str> = config
                .model
                .stack
                .resolve_attention("model.stack")
                .unwrap()
                .iter()
                .map(|c| c.info().kind)
                .collect();
            assert!(
                kinds.contains(kind),
                "{}: layers use {kinds:?}",
                path.display()
            );
        }
    }
}

#[test]
fn errors_name_the_key_path() {
    let dir = temp_dir("config-errors");
    let cases = [
        ("[model.stack]\nn_layer = 2\n", "model.stack", "n_layer"),
        (
            "[train]\nepochs = \"three\"\n",
            "train.epochs",
            "invalid type",
        ),
        (
            "[model.stack.attention]\nkind = \"performer\"\nfeatures = \"many\"\n",
            "model.stack.attention.features",
            "invalid type",
        ),
        (
            "[model.stack.attention]\nkind = \"performer\"\nfeatrues = 3\n",
            "model.stack.attention",
            "featrues",
        ),
        (
            "[model.stack.attention]\nkind = \"nope\"\n",
            "model.stack.attention",
            "nope",
        ),
        ("task = \"listopz\"\n", "task", "listopz"),
    ];
    for (i, (text, path, word)) in cases.iter().enumerate() {
        let file = dir.join(format!("c{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let err = load(&file, &[]).unwrap_err();
        let msg = err.to_string();
        assert!(
            err.path.starts_with(path),
            "{text}: path `{}` ({msg})",
            err.path
        );
        assert!(msg.contains(word), "{text}: {msg}");
        assert!(
            msg.contains(&format!("c{i}.toml")),
            "the message names the file: {msg}"
        );
    }
    let missing = load(&dir.join("missing.toml"), &[])
        .unwrap_err()
        .to_string();
    assert!(missing.contains("missing.toml"), "{missing}");
}

#[test]
fn base_files_merge_and_sets_override() {
    let dir = temp_dir("config-base");
    std::fs::write(
        dir.join("base.toml"),
        "[model.stack]\nn_layers = 4\nd_model = 32\n[model.stack.attention]\nkind = \"performer\"\nfeatures = 8\n[train]\nepochs = 9\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("variant.toml"),
        "base = \"base.toml\"\n[model.stack.attention]\nkind = \"linformer\"\nk = 4\n",
    )
    .unwrap();
    let (c, _) = load(
        &dir.join("variant.toml"),
        &["train.epochs=2".into(), "model.stack.d_model=48".into()],
    )
    .unwrap();
    assert_eq!(
        (
            c.model.stack.n_layers,
            c.model.stack.d_model,
            c.train.epochs
        ),
        (4, 48, 2)
    );
    // A table with a different `kind` replaces the base table (no `features` left over).
    assert_eq!(c.model.stack.attention.info().kind, "linformer");
    let mut table = load_table(&dir.join("variant.toml")).unwrap();
    apply_sets(&mut table, &["model.stack.attention.k=5".into()]).unwrap();
    assert!(from_table(table, None).is_ok());
    let bad = load(&dir.join("variant.toml"), &["train.epochs".into()]).unwrap_err();
    assert!(bad.to_string().contains("key.path=value"), "{bad}");
}
