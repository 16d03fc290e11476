//! Selecting variants from TOML, and configuration errors.

use burn::tensor::Device;
use efficient_attn::{
    AttentionConfig, AttentionMode, ConfigError, HeadDims, MemoryEfficientAttentionConfig,
    MultiHeadAttentionConfig,
};

#[test]
fn kind_selects_the_variant_and_omitted_fields_take_defaults() {
    let c: AttentionConfig =
        toml::from_str("kind = \"memory-efficient\"\nkey_block = 64\n").unwrap();
    assert_eq!(
        c,
        AttentionConfig::MemoryEfficient(MemoryEfficientAttentionConfig {
            key_block: 64,
            ..Default::default()
        })
    );
    let full: AttentionConfig = toml::from_str("kind = \"full\"").unwrap();
    assert_eq!(full.info().kind, "full");
}

#[test]
fn unknown_keys_and_kinds_are_errors_that_name_them() {
    let err = toml::from_str::<AttentionConfig>("kind = \"memory-efficient\"\nkey_blok = 64\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("key_blok"), "{err}");
    let err = toml::from_str::<AttentionConfig>("kind = \"fulll\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("fulll"), "{err}");
    // Through the kind-tagged enum serde buffers the table, so a wrong type is reported
    // without its field...
    let err =
        toml::from_str::<AttentionConfig>("kind = \"memory-efficient\"\nkey_block = \"big\"\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("expected usize"), "{err}");
    // ...and `deserialize_kind` (what the efformer config loader uses) names it.
    let table: toml::Table = toml::from_str("key_block = \"big\"").unwrap();
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(toml::Value::Table(table), &mut track);
    let err = AttentionConfig::deserialize_kind("memory-efficient", de).unwrap_err();
    let path = track.path().to_string();
    assert_eq!(path, "key_block", "{err}");
    let err = AttentionConfig::deserialize_kind("nope", toml::Value::Table(toml::Table::new()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope") && err.contains("memory-efficient"),
        "{err}"
    );
}

#[test]
fn every_default_round_trips_through_toml() {
    for config in AttentionConfig::all_defaults() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Wrap {
            attention: AttentionConfig,
        }
        let text = toml::to_string(&Wrap {
            attention: config.clone(),
        })
        .unwrap();
        let back: Wrap = toml::from_str(&text).unwrap();
        assert_eq!(back.attention, config, "{text}");
        assert_eq!(AttentionConfig::from_kind(config.info().kind), Some(config));
    }
}

#[test]
fn invalid_values_are_errors_that_name_the_field() {
    let device = Device::flex();
    let bad = AttentionConfig::MemoryEfficient(MemoryEfficientAttentionConfig {
        key_block: 0,
        ..Default::default()
    });
    let err = bad
        .init(AttentionMode::Bidirectional, HeadDims::new(2, 8), &device)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::InvalidField {
                field: "key_block",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("key_block"));

    let err = MultiHeadAttentionConfig::new(30, 4)
        .init(&device)
        .unwrap_err();
    assert!(err.to_string().contains("n_heads"), "{err}");
}

#[test]
fn every_variant_lists_modes_complexity_and_exactness() {
    for config in AttentionConfig::all_defaults() {
        let info = config.info();
        assert!(!info.modes.is_empty(), "{}", info.kind);
        assert!(
            !info.time.is_empty() && !info.memory.is_empty(),
            "{}",
            info.kind
        );
        assert!(info.paper.contains("arXiv"), "{}", info.kind);
        let device = Device::flex();
        for mode in AttentionMode::ALL {
            let built = config.init(mode, HeadDims::new(2, 8), &device);
            assert_eq!(
                built.is_ok(),
                info.supports(mode),
                "{} in {mode}",
                info.kind
            );
            if let Err(e) = built {
                assert!(e.to_string().contains(mode.name()), "{e}");
            }
        }
    }
}
