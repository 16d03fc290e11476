//! A fine-tuned [`SequenceClassifier`] as a `model.safetensors` with Hugging Face names, and
//! back.
//!
//! The encoder's tensors take the names of Hugging Face's `BertModel` (the table in
//! [`pretrained`](crate::pretrained), read backwards), Longformer-style separate global
//! projections take `LongformerSelfAttention`'s (`attention.self.{query,key,value}_global`),
//! and the output layer is `classifier`. Linear weights are stored `[out, in]` and LayerNorm
//! parameters as `weight`/`bias`, as PyTorch stores them (burn-store's `BurnToPyTorchAdapter`).
//! Parameters no Hugging Face architecture has (Linformer's projections, Synthesizer's tables,
//! …) keep their efformer paths. The classification head is CLS (or mean) pooling followed by
//! `classifier`, without BERT's tanh pooler, so the file is not a drop-in
//! `BertForSequenceClassification`; the encoder part is a `BertModel` when the attention is
//! full attention at 512 positions.

use std::path::Path;

use crate::model::SequenceClassifier;
use burn::store::{
    BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};

/// efformer → Hugging Face names of a [`SequenceClassifier`]'s tensors (regex, replacement).
pub const CLASSIFIER_TO_HF: &[(&str, &str)] = &[
    (
        r"^encoder\.embedding\.tokens\.",
        "embeddings.word_embeddings.",
    ),
    (
        r"^encoder\.embedding\.learned_positions\.",
        "embeddings.position_embeddings.",
    ),
    (
        r"^encoder\.embedding\.token_types\.",
        "embeddings.token_type_embeddings.",
    ),
    (r"^encoder\.embedding\.norm\.", "embeddings.LayerNorm."),
    (
        r"^encoder\.stack\.layers\.(\d+)\.self_attention\.(query|key|value)\.",
        "encoder.layer.$1.attention.self.$2.",
    ),
    (
        r"^encoder\.stack\.layers\.(\d+)\.self_attention\.global\.(query|key|value)\.",
        "encoder.layer.$1.attention.self.${2}_global.",
    ),
    (
        r"^encoder\.stack\.layers\.(\d+)\.self_attention\.output\.",
        "encoder.layer.$1.attention.output.dense.",
    ),
    (
        r"^encoder\.stack\.layers\.(\d+)\.norm_attention\.",
        "encoder.layer.$1.attention.output.LayerNorm.",
    ),
    (
        r"^encoder\.stack\.layers\.(\d+)\.feed_forward\.linear_inner\.",
        "encoder.layer.$1.intermediate.dense.",
    ),
    (
        r"^encoder\.stack\.layers\.(\d+)\.feed_forward\.linear_outer\.",
        "encoder.layer.$1.output.dense.",
    ),
    (
        r"^encoder\.stack\.layers\.(\d+)\.norm_feed_forward\.",
        "encoder.layer.$1.output.LayerNorm.",
    ),
    (r"^output\.", "classifier."),
];

/// Hugging Face → efformer names of a [`SequenceClassifier`]'s tensors: the inverse of
/// [`CLASSIFIER_TO_HF`].
pub const CLASSIFIER_FROM_HF: &[(&str, &str)] = &[
    (
        r"^embeddings\.word_embeddings\.",
        "encoder.embedding.tokens.",
    ),
    (
        r"^embeddings\.position_embeddings\.",
        "encoder.embedding.learned_positions.",
    ),
    (
        r"^embeddings\.token_type_embeddings\.",
        "encoder.embedding.token_types.",
    ),
    (r"^embeddings\.LayerNorm\.", "encoder.embedding.norm."),
    (
        r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
        "encoder.stack.layers.$1.self_attention.$2.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)_global\.",
        "encoder.stack.layers.$1.self_attention.global.$2.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.",
        "encoder.stack.layers.$1.self_attention.output.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
        "encoder.stack.layers.$1.norm_attention.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.intermediate\.dense\.",
        "encoder.stack.layers.$1.feed_forward.linear_inner.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.output\.dense\.",
        "encoder.stack.layers.$1.feed_forward.linear_outer.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.",
        "encoder.stack.layers.$1.norm_feed_forward.",
    ),
    (r"^classifier\.", "output."),
];

fn remapper(table: &[(&'static str, &'static str)]) -> KeyRemapper {
    KeyRemapper::from_patterns(table.to_vec()).expect("the name tables' regexes are valid")
}

/// Writes `classifier`'s parameters to `path` (safetensors) under Hugging Face names.
///
/// # Errors
/// burn-store's message if the file cannot be written.
pub fn save_classifier_hf(classifier: &SequenceClassifier, path: &Path) -> Result<(), String> {
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .remap(remapper(CLASSIFIER_TO_HF))
        .skip_enum_variants(true)
        .metadata("format", "pt")
        .metadata("producer", "efformer export");
    classifier
        .save_into(&mut store)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Loads parameters written by [`save_classifier_hf`] into `classifier` (built with the same
/// configuration).
///
/// # Errors
/// A file that cannot be read, or tensors missing, unexpected or of the wrong shape, naming
/// them.
pub fn load_classifier_hf(classifier: &mut SequenceClassifier, path: &Path) -> Result<(), String> {
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter)
        .remap(remapper(CLASSIFIER_FROM_HF))
        .skip_enum_variants(true)
        .allow_partial(true);
    let result = classifier
        .load_from(&mut store)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let missing: Vec<String> = result.missing.iter().map(|(p, _)| p.clone()).collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", missing.join(", ")));
    }
    if !result.unused.is_empty() {
        problems.push(format!("unexpected tensors: {}", result.unused.join(", ")));
    }
    problems.extend(result.errors.iter().map(|e| e.to_string()));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: the weights do not fit the model: {}",
            path.display(),
            problems.join("; ")
        ))
    }
}
