//! `efformer predict`: classify documents with a trained text classifier; `efformer export`:
//! write one as a directory a user can move elsewhere.
//!
//! From a run, the model is rebuilt from `model.json`, which every classification run writes
//! beside its checkpoints (`<run>/model.json`, `<run>/checkpoint/model-<epoch>.bpk`), so no
//! training data is read. Texts are encoded as in training: bytes, or the run's tokenizer (the
//! config's `text.tokenizer.file`, else `<run>/tokenizer.json`).
//!
//! An exported directory holds `model.safetensors` (Hugging Face BERT names where the
//! architecture has them, [`models::save_classifier_hf`]), `config.json` (the BERT fields, the
//! labels as `id2label`/`label2id`, and under `efformer` what rebuilding the model needs), and
//! `tokenizer.json` for tokenised text; `predict` reads it without the experiment file.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use crate::config::load::load;
use crate::config::{TaskKind, TextEncoding};
use crate::data::loader::{ClassBatcher, ClassItem, MakeBatch};
use crate::data::prepare::resolve;
use crate::data::tokenize::{self, TextTokenizer};
use crate::device::DeviceChoice;
use crate::run_dir::{load_checkpoint, run_dir_of};
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

/// How an exported classifier encodes text (`config.json`'s `efformer` entry).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportedClassifier {
    /// The model, labels and batch layout.
    pub classifier: SavedClassifier,
    /// Longest input in tokens (longer texts are truncated).
    pub max_len: usize,
    /// `true`: UTF-8 bytes; `false`: `tokenizer.json` beside it.
    pub bytes: bool,
}

/// A trained classifier ready to classify texts.
pub struct Predictor {
    task: ClassifierWithLoss,
    saved: SavedClassifier,
    tokenizer: Option<(TextTokenizer, PathBuf)>,
    max_len: usize,
    device: Device,
}

impl Predictor {
    /// The classifier at `checkpoint`, trained with the experiment file `config_path`.
    ///
    /// # Errors
    /// Names the config, checkpoint, `model.json` or tokenizer that is missing or does not fit.
    pub fn from_run(
        config_path: &Path,
        sets: &[String],
        checkpoint: &Path,
        device: DeviceChoice,
    ) -> Result<Self, String> {
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
            let tok = TextTokenizer::load(&file).map_err(|e| format!("text.tokenizer: {e}"))?;
            Some((tok, file))
        };
        let dev = device.device()?;
        let model = saved
            .model
            .init_sequence(&dev)
            .map_err(|e| format!("{}: {}", saved_path.display(), e.within("model")))?;
        let task = load_checkpoint(
            ClassifierWithLoss::new(model, saved.global_prefix, saved.grid, NanGuard::default()),
            checkpoint,
            &saved_path.display().to_string(),
        )?;
        Ok(Self {
            task,
            saved,
            tokenizer,
            max_len,
            device: dev,
        })
    }

    /// The classifier exported to `dir` by [`export`](Self::export).
    ///
    /// # Errors
    /// Names the file of the directory that is missing or does not fit.
    pub fn from_export(dir: &Path, device: DeviceChoice) -> Result<Self, String> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            format!(
                "{}: {e}; an exported model directory has config.json, model.safetensors \
                 (and tokenizer.json for tokenised text), written by `efformer export`",
                config_path.display()
            )
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not JSON: {e}", config_path.display()))?;
        let exported: ExportedClassifier =
            serde_json::from_value(json.get("efformer").cloned().ok_or_else(|| {
                format!(
                    "{}: no `efformer` entry; not written by `efformer export`",
                    config_path.display()
                )
            })?)
            .map_err(|e| format!("{}: `efformer`: {e}", config_path.display()))?;
        let tokenizer = if exported.bytes {
            None
        } else {
            let file = dir.join("tokenizer.json");
            Some((TextTokenizer::load(&file)?, file))
        };
        let dev = device.device()?;
        let saved = exported.classifier;
        let mut model = saved.model.init_sequence(&dev).map_err(|e| {
            format!(
                "{}: {}",
                config_path.display(),
                e.within("efformer.classifier.model")
            )
        })?;
        models::load_classifier_hf(&mut model, &dir.join("model.safetensors"))?;
        Ok(Self {
            task: ClassifierWithLoss::new(
                model,
                saved.global_prefix,
                saved.grid,
                NanGuard::default(),
            ),
            saved,
            tokenizer,
            max_len: exported.max_len,
            device: dev,
        })
    }

    /// Writes this classifier to the new directory `out` (see the [module docs](self)). The
    /// directory is assembled beside `out` and renamed into place, so a failed export leaves
    /// nothing behind.
    ///
    /// # Errors
    /// If `out` exists, or a file cannot be written.
    pub fn export(&self, out: &Path) -> Result<(), String> {
        if out.exists() {
            return Err(format!(
                "{} already exists; export writes a new directory (nothing was changed)",
                out.display()
            ));
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        let tmp = out.with_file_name(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let written = (|| {
            models::save_classifier_hf(&self.task.model, &tmp.join("model.safetensors"))?;
            if let Some((_, file)) = &self.tokenizer {
                std::fs::copy(file, tmp.join("tokenizer.json"))
                    .map_err(|e| format!("cannot copy {}: {e}", file.display()))?;
            }
            let config = self.hf_config()?;
            std::fs::write(tmp.join("config.json"), config)
                .map_err(|e| format!("{}: {e}", tmp.join("config.json").display()))?;
            std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
        })();
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written
    }

    /// `config.json`: Hugging Face's BERT fields, the labels, and the `efformer` entry.
    fn hf_config(&self) -> Result<String, String> {
        let m = &self.saved.model.encoder;
        let labels = &self.saved.labels;
        let json = serde_json::json!({
            "model_type": "bert",
            "hidden_size": m.stack.d_model,
            "num_hidden_layers": m.stack.n_layers,
            "num_attention_heads": m.stack.n_heads,
            "intermediate_size": m.stack.d_ff,
            "max_position_embeddings": m.embedding.max_len,
            "vocab_size": m.embedding.vocab_size,
            "type_vocab_size": m.embedding.type_vocab_size,
            "layer_norm_eps": m.stack.norm_eps,
            "hidden_act": "gelu",
            "id2label": labels.iter().enumerate().map(|(i, l)| (i.to_string(), serde_json::json!(l))).collect::<serde_json::Map<_, _>>(),
            "label2id": labels.iter().enumerate().map(|(i, l)| (l.clone(), serde_json::json!(i))).collect::<serde_json::Map<_, _>>(),
            "efformer": ExportedClassifier {
                classifier: self.saved.clone(),
                max_len: self.max_len,
                bytes: self.tokenizer.is_none(),
            },
        });
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())
    }

    /// Classifies `files` (standard input when empty).
    ///
    /// # Errors
    /// Names an input file that cannot be read or encoded.
    pub fn predict(&self, files: &[PathBuf]) -> Result<Vec<Prediction>, String> {
        let mut inputs: Vec<(String, String)> = Vec::new();
        if files.is_empty() {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("standard input: {e}"))?;
            inputs.push(("-".into(), text));
        }
        for f in files {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            inputs.push((f.display().to_string(), text));
        }
        inputs
            .into_iter()
            .map(|(source, text)| self.classify(source, &text))
            .collect()
    }

    fn classify(&self, source: String, text: &str) -> Result<Prediction, String> {
        let saved = &self.saved;
        let tokens = match &self.tokenizer {
            None => tokenize::encode_bytes(text, self.max_len),
            Some((tok, _)) => tok.encode_classified(text, self.max_len)?,
        };
        let n = tokens.len();
        let batcher = ClassBatcher {
            pad: saved.pad,
            fixed_len: saved.fixed_len,
        };
        let batch = batcher.batch(&[ClassItem { tokens, label: 0 }], &self.device);
        let logits = self.task.forward(batch).output; // [1, classes]
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
    }
}
