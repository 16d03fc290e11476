//! `efformer predict`: classify documents with a trained text classifier.
//!
//! The model is rebuilt from `model.json`, which every classification run writes beside its
//! checkpoints (`<run>/model.json`, `<run>/checkpoint/model-<epoch>.bpk`), so no training data
//! is read. Texts are encoded as in training: bytes, or the run's tokenizer (the config's
//! `text.tokenizer.file`, else `<run>/tokenizer.json`).

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::activation::softmax;
use serde::Serialize;

use crate::config::load::load;
use crate::config::{TaskKind, TextEncoding};
use crate::data::loader::{ClassBatcher, ClassItem, MakeBatch};
use crate::data::prepare::resolve;
use crate::data::tokenize::{self, TextTokenizer};
use crate::device::DeviceChoice;
use crate::run_dir::run_dir_of;
use crate::tasks::{ClassifierWithLoss, NanGuard, SavedClassifier};

/// The prediction for one document.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// The file name, or `-` for standard input.
    pub source: String,
    /// The most probable label.
    pub label: String,
    /// Its probability.
    pub probability: f64,
    /// All labels' probabilities, in label order.
    pub probabilities: Vec<(String, f64)>,
    /// Tokens the model saw (after truncation).
    pub tokens: usize,
}

/// Classifies `files` (standard input when empty) with the classifier at `checkpoint`, trained
/// with the experiment file `config_path`.
///
/// # Errors
/// Names the config, checkpoint, `model.json`, tokenizer or input file that is missing or
/// does not fit.
pub fn predict(
    config_path: &Path,
    sets: &[String],
    checkpoint: &Path,
    files: &[PathBuf],
    device: DeviceChoice,
) -> Result<Vec<Prediction>, String> {
    let (config, _) = load(config_path, sets).map_err(|e| e.to_string())?;
    let config_dir = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    if !matches!(
        config.task,
        TaskKind::LraText | TaskKind::TextClassification
    ) {
        return Err(format!(
            "{}: predict classifies documents; task must be \"lra-text\" or \"text-classification\", not {:?}",
            config_path.display(),
            config.task
        ));
    }
    let run_dir = run_dir_of(checkpoint);
    let saved_path = run_dir.join("model.json");
    let saved: SavedClassifier =
        serde_json::from_str(&std::fs::read_to_string(&saved_path).map_err(|e| {
            format!(
                "{}: {e}; predict rebuilds the model from the model.json a training run writes \
                 beside its checkpoint folder",
                saved_path.display()
            )
        })?)
        .map_err(|e| format!("{}: not a saved classifier: {e}", saved_path.display()))?;

    let max_len = config
        .text
        .max_len
        .min(saved.model.encoder.embedding.max_len);
    let bytes = config.task == TaskKind::LraText || config.text.encoding == TextEncoding::Bytes;
    let tokenizer = if bytes {
        None
    } else {
        let file = match &config.text.tokenizer.file {
            Some(f) => resolve(f, &config_dir),
            None => run_dir.join("tokenizer.json"),
        };
        Some(TextTokenizer::load(&file).map_err(|e| format!("text.tokenizer: {e}"))?)
    };
    let encode = |text: &str| -> Result<Vec<u32>, String> {
        match &tokenizer {
            None => Ok(tokenize::encode_bytes(text, max_len)),
            Some(tok) => tok.encode_classified(text, max_len),
        }
    };

    let dev = device.device()?;
    let record = ModuleRecord::load(checkpoint)
        .map_err(|e| format!("cannot load checkpoint {}: {e}", checkpoint.display()))?;
    let model = saved
        .model
        .init_sequence(&dev)
        .map_err(|e| format!("{}: model.{e}", saved_path.display()))?;
    let task = ClassifierWithLoss::new(model, saved.global_prefix, saved.grid, NanGuard::default())
        .try_load_record(record)
        .map_err(|e| {
            format!(
                "checkpoint {} does not fit {}: {e}",
                checkpoint.display(),
                saved_path.display()
            )
        })?;
    let batcher = ClassBatcher {
        pad: saved.pad,
        fixed_len: saved.fixed_len,
    };

    let mut inputs: Vec<(String, String)> = Vec::new();
    if files.is_empty() {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("standard input: {e}"))?;
        inputs.push(("-".into(), text));
    }
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        inputs.push((f.display().to_string(), text));
    }
    inputs
        .into_iter()
        .map(|(source, text)| {
            let tokens = encode(&text)?;
            let n = tokens.len();
            let batch = batcher.batch(&[ClassItem { tokens, label: 0 }], &dev);
            let logits = task.forward(batch).output; // [1, classes]
            let probs: Vec<f32> = softmax(logits, 1)
                .into_data()
                .try_to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
            let (best, p) = probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, p)| (i, *p as f64))
                .unwrap_or((0, 0.0));
            Ok(Prediction {
                source,
                label: saved
                    .labels
                    .get(best)
                    .cloned()
                    .unwrap_or_else(|| best.to_string()),
                probability: p,
                probabilities: saved
                    .labels
                    .iter()
                    .cloned()
                    .zip(probs.iter().map(|&p| p as f64))
                    .collect(),
                tokens: n,
            })
        })
        .collect()
}
