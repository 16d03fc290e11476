//! `efformer attention list` and `efformer attention demo`.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use efficient_attn::{
    AttentionConfig, AttentionCore, AttentionMode, AttnInput, CoreConfig, HeadDims, VariantInfo,
    WithExtras,
};
use serde::Serialize;

/// One row of `efformer attention list --json`.
#[derive(Debug, Serialize)]
pub struct ListEntry {
    /// The `kind` that selects the variant.
    pub name: &'static str,
    /// Supported modes: a subset of `bidirectional`, `causal`, `cross`.
    pub modes: Vec<&'static str>,
    /// Time and memory cost.
    pub complexity: String,
    /// `exact`, `exact when …` or `approximate: …`.
    pub exact: String,
    /// Paper.
    pub paper: &'static str,
}

impl From<&VariantInfo> for ListEntry {
    fn from(info: &VariantInfo) -> Self {
        Self {
            name: info.kind,
            modes: info.modes.iter().map(|m| m.name()).collect(),
            complexity: format!("time {}, memory {}", info.time, info.memory),
            exact: info.exactness.to_string(),
            paper: info.paper,
        }
    }
}

/// Every registered variant.
pub fn list_entries() -> Vec<ListEntry> {
    AttentionConfig::all_defaults()
        .iter()
        .map(|c| ListEntry::from(c.info()))
        .collect()
}

/// The list as a JSON array.
pub fn list_json() -> String {
    serde_json::to_string_pretty(&list_entries()).expect("serialisable")
}

/// The list as a table for a terminal.
pub fn list_table() -> String {
    let rows: Vec<[String; 4]> = list_entries()
        .into_iter()
        .map(|e| {
            [
                e.name.to_string(),
                e.modes.join(", "),
                e.complexity,
                e.exact,
            ]
        })
        .collect();
    let header = ["kind", "modes", "complexity", "exactness"].map(String::from);
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String; 4]| {
        r.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(&header)];
    out.extend(rows.iter().map(line));
    out.join("\n")
}

/// Settings of `efformer attention demo`.
#[derive(Clone, Debug)]
pub struct DemoSettings {
    /// Mode.
    pub mode: AttentionMode,
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Sequence length.
    pub seq: usize,
    /// Head width.
    pub d_head: usize,
}

/// One variant's demo result.
#[derive(Debug)]
pub struct DemoRow {
    /// Variant kind.
    pub kind: &'static str,
    /// Forward time in milliseconds (after one warm-up call).
    pub millis: f64,
    /// Largest absolute difference from full attention.
    pub max_abs_diff: f32,
}

/// Runs every variant that supports `settings.mode` on the same random input and compares it
/// with full attention, calling `report` after each variant.
pub fn demo(
    settings: &DemoSettings,
    device: &Device,
    mut report: impl FnMut(&DemoRow),
) -> Result<Vec<DemoRow>, String> {
    let DemoSettings {
        mode,
        batch,
        heads,
        seq,
        d_head,
    } = *settings;
    device.seed(0);
    let q = Tensor::random(
        [batch, heads, seq, d_head],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let k = Tensor::random(
        [batch, heads, seq, d_head],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let v = Tensor::random(
        [batch, heads, seq, d_head],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let input = AttnInput::new(q, k, v);
    let dims = HeadDims::new(heads, d_head);
    let reference = AttentionConfig::default()
        .init(mode, dims, device)
        .map_err(|e| e.to_string())?
        .attend(input.clone());
    let mut rows = Vec::new();
    for kind in AttentionConfig::KINDS {
        let config = crate::bench::config_for_length(kind, seq)?;
        let info = config.info();
        if !info.supports(mode) {
            continue;
        }
        let core = config
            .init(mode, dims, device)
            .map_err(|e| format!("{}: {e}", info.kind))?;
        let extras = config.standalone_extras(dims, device, info.demo_extras(seq, mode));
        let input = input.clone().with_extras(extras);
        let _ = core.attend(input.clone()); // warm-up
        device.sync().map_err(|e| format!("{e:?}"))?;
        let start = Instant::now();
        let out = core.attend(input.clone());
        device.sync().map_err(|e| format!("{e:?}"))?;
        let millis = start.elapsed().as_secs_f64() * 1e3;
        let max_abs_diff = out.sub(reference.clone()).abs().max().into_scalar::<f32>();
        let row = DemoRow {
            kind: info.kind,
            millis,
            max_abs_diff,
        };
        report(&row);
        rows.push(row);
    }
    Ok(rows)
}
