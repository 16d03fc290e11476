//! `efformer generate`: continue a prompt with a trained language model, streaming the text as
//! it is sampled.
//!
//! A run of the `language-model` task leaves what this needs beside its checkpoints:
//! `<run>/model.json` ([`SavedLanguageModel`]: the model's configuration, the padding id and
//! the encoding) and, for a tokenizer encoding, `<run>/tokenizer.json`. Decoding uses the
//! layers' incremental caches when every layer's variant has one (one position per step); past
//! the model's positions, a model without absolute positions (Transformer-XL) carries each
//! layer's memory from token to token; otherwise it runs the model over the sequence for every
//! new token and says why.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use models::{LanguageModel, PositionKind, Sampler, SegmentMemory};

use crate::config::TextEncoding;
use crate::data::tokenize::{self, TextTokenizer};
use crate::device::DeviceChoice;
use crate::run_dir::{checkpoint_file, last_complete_checkpoint, load_checkpoint};
use crate::tasks::{LanguageModelWithLoss, NanGuard, SavedLanguageModel};

/// A trained language model ready to continue text.
pub struct Generator {
    model: LanguageModel,
    saved: SavedLanguageModel,
    tokenizer: Option<TextTokenizer>,
    device: Device,
    checkpoint: PathBuf,
}

/// What one generation did.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The whole text: prompt and continuation.
    pub text: String,
    /// Tokens sampled.
    pub tokens: usize,
    /// Seconds from the first model call to the last token.
    pub seconds: f64,
    /// How the model ran for each new token.
    pub decoding: Decoding,
}

/// How [`Generator::generate`] ran the model for each new token.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoding {
    /// The layers' incremental caches, one position per step.
    Cache,
    /// Past the model's positions, a memory of this many positions per layer carried from
    /// token to token (Transformer-XL's recurrence; models without absolute positions).
    Memory(usize),
    /// The model over the sequence (at most its last `max_len` tokens) for every token, and
    /// why.
    Recompute(String),
}

impl std::fmt::Display for Decoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cache => f.write_str("decoded with the layers' incremental caches"),
            Self::Memory(m) => write!(
                f,
                "decoded with each layer's memory of the last {m} positions (segment recurrence)"
            ),
            Self::Recompute(why) => write!(
                f,
                "no incremental decoding ({why}): the model ran over the sequence for every token"
            ),
        }
    }
}

impl Generator {
    /// The model of the run directory `run`, from `checkpoint` or the run's last complete one.
    ///
    /// # Errors
    /// Names the run file that is missing or does not fit (a run of another task has no
    /// language model's `model.json`).
    pub fn from_run(
        run: &Path,
        checkpoint: Option<&Path>,
        device: DeviceChoice,
    ) -> Result<Self, String> {
        let saved_path = run.join("model.json");
        let text = std::fs::read_to_string(&saved_path).map_err(|e| {
            format!(
                "{}: {e}; generate reads the model.json a language-model run writes in its \
                 run directory",
                saved_path.display()
            )
        })?;
        let saved: SavedLanguageModel = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}: not a saved language model ({e}); generate continues text with a run of \
                 task = \"language-model\"",
                saved_path.display()
            )
        })?;
        let checkpoint = match checkpoint {
            Some(c) => c.to_path_buf(),
            None => {
                let epoch = last_complete_checkpoint(run).ok_or_else(|| {
                    format!(
                        "{}: no complete checkpoint (checkpoint/model-<epoch>.bpk) in the run",
                        run.display()
                    )
                })?;
                checkpoint_file(run, epoch)
            }
        };
        let tokenizer = match saved.encoding {
            TextEncoding::Bytes => None,
            TextEncoding::Tokenizer => Some(TextTokenizer::load(&run.join("tokenizer.json"))?),
        };
        let dev = device.device()?;
        let model = saved
            .model
            .init(&dev)
            .map_err(|e| format!("{}: {}", saved_path.display(), e.within("model")))?;
        let model = load_checkpoint(
            LanguageModelWithLoss::new(model, saved.pad as usize, NanGuard::default()),
            &checkpoint,
            &saved_path.display().to_string(),
        )?
        .model;
        Ok(Self {
            model,
            saved,
            tokenizer,
            device: dev,
            checkpoint,
        })
    }

    /// The checkpoint the parameters came from.
    pub fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }

    /// The ids of `text` in the run's encoding.
    ///
    /// # Errors
    /// If the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match &self.tokenizer {
            None => Ok(tokenize::encode_bytes_plain(text)),
            Some(t) => t.encode_plain(text),
        }
    }

    /// The text of `ids` (ids that are no byte or token, such as padding, are left out).
    ///
    /// # Errors
    /// If the tokenizer fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        match &self.tokenizer {
            None => Ok(tokenize::decode_bytes_plain(ids)),
            Some(t) => t.decode(ids),
        }
    }

    /// Continues `prompt` by `max_new` tokens drawn by `sampler`, handing `emit` the prompt and
    /// then each new piece of text as soon as it decodes to whole characters. Past the model's
    /// positions (`model.embedding.max_len`) a model without absolute positions carries each
    /// layer's memory of the last that many positions from token to token; one with absolute
    /// positions samples each token from the last that many tokens.
    ///
    /// # Errors
    /// An empty prompt, or what `emit` returns.
    pub fn generate(
        &self,
        prompt: &str,
        max_new: usize,
        sampler: &mut Sampler,
        emit: &mut dyn FnMut(&str) -> Result<(), String>,
    ) -> Result<Generated, String> {
        let mut ids = self.encode(prompt)?;
        if ids.is_empty() {
            return Err(
                "generate: the prompt is empty; give --prompt TEXT or text on standard input"
                    .into(),
            );
        }
        // Past the model's positions, each token sees the last `window` tokens only.
        let window = self.saved.model.embedding.max_len;
        let total = ids.len() + max_new;
        emit(prompt)?;
        let tensor = |ids: &[u32]| {
            let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            Tensor::<2, Int>::from_data(TensorData::new(v, [1, ids.len()]), &self.device)
        };
        let mut shown = self.decode(&ids)?;
        let start = Instant::now();
        let mut next_of = |logits: Tensor<3>| -> u32 {
            let n = logits.dims()[1];
            let id = sampler
                .sample(logits.narrow(1, n - 1, 1))
                .into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .expect("one sampled id")[0];
            id as u32
        };
        let mut show = |ids: &[u32], shown: &mut String| -> Result<(), String> {
            // A multi-byte character (or a token that merges with the next) may be incomplete:
            // hold back a trailing replacement character until it resolves.
            let text = self.decode(ids)?;
            let stable = text.trim_end_matches('\u{FFFD}');
            if stable.len() > shown.len() && stable.starts_with(shown.as_str()) {
                emit(&stable[shown.len()..])?;
                *shown = stable.to_string();
            }
            Ok(())
        };
        // Past the model's positions, a model without absolute positions reads a memory of the
        // last `window` positions (its layers attend over [memory; token]); one with absolute
        // positions is run over the last `window` tokens.
        let relative = self.saved.model.embedding.positions == PositionKind::None
            && !self.saved.model.stack.reversible;
        let state = if total <= window {
            self.model.init_state(1, total, &self.device)
        } else if relative {
            Err(String::new())
        } else {
            Err(format!(
                "the prompt and continuation make {total} tokens, more than the model's {window} \
                 positions (model.embedding.max_len): each token sees the last {window}"
            ))
        };
        let decoding = match state {
            Ok(mut state) => {
                let mut logits = self.model.step(tensor(&ids), &mut state);
                for _ in 0..max_new {
                    let id = next_of(logits);
                    ids.push(id);
                    show(&ids, &mut shown)?;
                    logits = self.model.step(tensor(&[id]), &mut state);
                }
                Decoding::Cache
            }
            Err(_) if relative => {
                let mut memory = SegmentMemory::default();
                let mut logits = None;
                for chunk in ids.chunks(window) {
                    let segment = self
                        .model
                        .forward_segment(tensor(chunk), None, &memory, window);
                    (logits, memory) = (Some(segment.logits), segment.memory);
                }
                let mut logits = logits.expect("a non-empty prompt");
                for _ in 0..max_new {
                    let id = next_of(logits);
                    ids.push(id);
                    show(&ids, &mut shown)?;
                    let segment = self
                        .model
                        .forward_segment(tensor(&[id]), None, &memory, window);
                    (logits, memory) = (segment.logits, segment.memory);
                }
                Decoding::Memory(window)
            }
            Err(why) => {
                for _ in 0..max_new {
                    let from = ids.len().saturating_sub(window);
                    let id = next_of(self.model.forward(tensor(&ids[from..]), None));
                    ids.push(id);
                    show(&ids, &mut shown)?;
                }
                Decoding::Recompute(why)
            }
        };
        let seconds = start.elapsed().as_secs_f64();
        let text = self.decode(&ids)?;
        if text.len() > shown.len() && text.starts_with(shown.as_str()) {
            emit(&text[shown.len()..])?;
        }
        Ok(Generated {
            text,
            tokens: max_new,
            seconds,
            decoding,
        })
    }
}
