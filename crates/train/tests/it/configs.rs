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

/// LRA's tasks classify with a bidirectional encoder: every variant with that mode has its
/// ListOps and Text files (a causal-only variant such as Transformer-XL has none).
#[test]
fn every_variant_has_lra_configs() {
    for config in AttentionConfig::all_defaults() {
        let info = config.info();
        if !info.supports(efficient_attn::AttentionMode::Bidirectional) {
            continue;
        }
        let kind = &info.kind;
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

/// The Sparse Transformer's stride is a length or `"sqrt"` (l = ⌈√N⌉, at least the summary
/// length), in TOML and in `efformer bench`'s variant specs; anything else is an error that
/// names the variant.
#[test]
fn sparse_transformer_stride_is_a_length_or_sqrt() {
    use efficient_attn::{
        Attention, AttentionMode, HeadDims, SparseTransformerAttentionConfig, Stride, StrideRule,
    };
    use train::bench::{parse_variant_spec, split_variant_specs};
    let stride_of = |spec: &str| match parse_variant_spec(spec).unwrap() {
        AttentionConfig::SparseTransformer(c) => c.stride,
        other => panic!("{spec}: {other:?}"),
    };
    assert_eq!(
        stride_of("sparse-transformer{stride = \"sqrt\"}"),
        Stride::Rule(StrideRule::Sqrt)
    );
    assert_eq!(
        stride_of("sparse-transformer{stride = 64, summary = 8}"),
        Stride::Length(64)
    );
    assert_eq!(stride_of("sparse-transformer"), Stride::Length(128));
    let err = parse_variant_spec("sparse-transformer{stride = \"cube\"}").unwrap_err();
    assert!(err.contains("sparse-transformer"), "{err}");
    let err = parse_variant_spec("sparse-transformer{strides = 4}").unwrap_err();
    assert!(err.contains("strides"), "{err}");
    assert_eq!(
        split_variant_specs("full, sparse-transformer{stride = 64, summary = 8},linformer"),
        [
            "full",
            "sparse-transformer{stride = 64, summary = 8}",
            "linformer"
        ]
    );
    // l = ⌈√N⌉, never below the summary length c.
    assert_eq!(Stride::Rule(StrideRule::Sqrt).for_length(1000, 8), 32);
    assert_eq!(Stride::Rule(StrideRule::Sqrt).for_length(1024, 8), 32);
    assert_eq!(Stride::Rule(StrideRule::Sqrt).for_length(16, 8), 8);
    // A summary longer than a fixed stride is a config error; with "sqrt" it is allowed.
    let dims = HeadDims::new(2, 8);
    let device = burn::tensor::Device::flex();
    let build = |stride| -> Result<Attention, _> {
        AttentionConfig::SparseTransformer(SparseTransformerAttentionConfig {
            stride,
            summary: 40,
            ..Default::default()
        })
        .init(AttentionMode::Causal, dims, &device)
    };
    assert!(build(Stride::Length(32)).is_err());
    assert!(build(Stride::Rule(StrideRule::Sqrt)).is_ok());
}
