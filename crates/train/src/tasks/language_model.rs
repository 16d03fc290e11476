//! Causal language modelling on text windows.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::Device;
use burn::train::ClassificationOutput;
use efficient_attn::{AttentionMode, Extras};
use models::{LanguageModel, LanguageModelConfig, ReversibleTape};

use super::{NanGuard, Splits, StepClock, Task, embedding, token_output};
use serde::{Deserialize, Serialize};

use crate::config::{ExperimentConfig, TextEncoding};
use crate::data::loader::{LmBatch, LmBatcher, LmItem, MakeBatch};
use crate::data::prepare::LmData;
use crate::fit::RunContext;
use crate::run_dir::write_atomic;

/// A language model with its loss (per token, ignoring padding).
#[derive(Module, Debug)]
pub struct LanguageModelWithLoss {
    /// The model.
    pub model: LanguageModel,
    /// Padding id (ignored by the loss and metrics).
    pub pad: usize,
    #[module(skip)]
    guard: NanGuard,
    #[module(skip)]
    clock: StepClock,
}

impl LanguageModelWithLoss {
    /// Wraps a language model.
    pub fn new(model: LanguageModel, pad: usize, guard: NanGuard) -> Self {
        Self {
            model,
            pad,
            guard,
            clock: StepClock::default(),
        }
    }

    /// Loss and flattened logits of a batch.
    pub fn forward(&self, batch: LmBatch) -> ClassificationOutput {
        self.forward_taped(batch, None)
    }

    /// [`forward`](Self::forward), a reversible decoder recording on `tape` (training).
    pub fn forward_taped(
        &self,
        batch: LmBatch,
        tape: Option<ReversibleTape>,
    ) -> ClassificationOutput {
        let mut extras = Extras {
            mask_pad: Some(batch.mask_pad),
            ..Default::default()
        };
        if let Some(tape) = tape {
            extras.side.insert(tape);
        }
        let logits = self.model.forward_extras(batch.inputs, extras);
        let aux = self.model.aux_loss(&logits.device());
        let mut out = token_output(logits, batch.targets, self.pad);
        out.loss = super::with_aux(out.loss, aux);
        out
    }
}

burn_train_steps!(LanguageModelWithLoss, LmBatch);

/// What `efformer generate` needs besides a checkpoint: the model's configuration and how text
/// becomes ids (`<run>/model.json`; a tokenizer, if any, is `<run>/tokenizer.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedLanguageModel {
    /// The model.
    pub model: LanguageModelConfig,
    /// Padding id.
    pub pad: u32,
    /// Bytes or the run's tokenizer.
    pub encoding: TextEncoding,
    /// The training window (tokens).
    pub seq_len: usize,
}

/// Language modelling over prepared [`LmData`].
pub struct LanguageModelTask {
    data: LmData,
}

impl LanguageModelTask {
    /// The task over `data`.
    pub fn new(data: LmData) -> Self {
        Self { data }
    }

    /// Checks the model sections before anything is written: a causal stack.
    ///
    /// # Errors
    /// The key and what was expected.
    pub fn check_config(config: &ExperimentConfig) -> Result<(), String> {
        config
            .model
            .stack
            .check("decoder", AttentionMode::Causal)
            .map_err(|e| format!("model.{e}"))?;
        super::check_grid(&config.model.stack, "model.stack", config.model.grid, false)
    }
}

impl Task for LanguageModelTask {
    type Item = LmItem;
    type Batch = LmBatch;
    type Model = LanguageModelWithLoss;
    type ModelConfig = LanguageModelConfig;

    fn model_config(&self, ctx: &RunContext) -> Result<LanguageModelConfig, String> {
        let c = &ctx.config;
        Ok(LanguageModelConfig {
            embedding: embedding(c, self.data.vocab_size, self.data.seq_len)?,
            stack: c.model.stack.clone(),
            tie_embeddings: c.model.tie_embeddings,
        })
    }

    fn build(
        &self,
        config: &LanguageModelConfig,
        device: &Device,
        guard: NanGuard,
    ) -> Result<LanguageModelWithLoss, String> {
        let model = config.init(device).map_err(|e| format!("model.{e}"))?;
        Ok(LanguageModelWithLoss::new(
            model,
            self.data.pad as usize,
            guard,
        ))
    }

    fn batcher(&self, _: &LanguageModelConfig) -> Arc<dyn MakeBatch<LmItem, LmBatch>> {
        Arc::new(LmBatcher { pad: self.data.pad })
    }

    fn splits(&self) -> Splits<'_, LmItem> {
        Splits {
            train: &self.data.train,
            valid: &self.data.valid,
            test: None,
        }
    }

    fn pad_token(&self) -> Option<usize> {
        Some(self.data.pad as usize)
    }

    fn save_artifacts(&self, config: &LanguageModelConfig, ctx: &RunContext) -> Result<(), String> {
        let saved = SavedLanguageModel {
            model: config.clone(),
            pad: self.data.pad,
            encoding: ctx.config.lm.encoding,
            seq_len: self.data.seq_len,
        };
        write_atomic(
            &ctx.run_dir.join("model.json"),
            serde_json::to_string_pretty(&saved)
                .map_err(|e| e.to_string())?
                .as_bytes(),
        )
    }

    fn describe(&self, parameters: usize) -> String {
        let d = &self.data;
        format!(
            "language model: {} train / {} valid windows of {} tokens, vocabulary {}; {parameters} parameters",
            d.train.len(),
            d.valid.len(),
            d.seq_len,
            d.vocab_size
        )
    }
}
