//! Sequence classification: ListOps, byte-level text (LRA Text) and tokenised text, from
//! scratch or from a pretrained encoder.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::Device;
use burn::train::ClassificationOutput;
use efficient_attn::{AttentionConfig, AttentionMode, GlobalTokens, Grid, WithExtras};
use models::{
    BertCheckpoint, ClassifierConfig, EncoderConfig, EncoderInput, ReversibleTape,
    SequenceClassifier,
};
use serde::Serialize;

use super::{NanGuard, Splits, StepClock, StepOutput, Task, embedding, fixed_length, with_aux};
use crate::config::load::model_error;
use crate::config::{ExperimentConfig, PretrainedInit, TaskKind};
use crate::data::loader::{ClassBatch, ClassBatcher, ClassItem, MakeBatch};
use crate::data::prepare::{ClassData, resolve};
use crate::fit::RunContext;
use crate::run_dir::write_atomic;

/// A sequence classifier with its loss.
#[derive(Module, Debug)]
pub struct ClassifierWithLoss {
    /// The model.
    pub model: SequenceClassifier,
    /// Leading tokens that are global (for variants with global tokens).
    pub global_prefix: usize,
    /// The `[rows, columns]` layout for 2-D variants.
    pub grid: Option<[usize; 2]>,
    #[module(skip)]
    guard: NanGuard,
    #[module(skip)]
    clock: StepClock,
}

impl ClassifierWithLoss {
    /// Wraps a classifier.
    pub fn new(
        model: SequenceClassifier,
        global_prefix: usize,
        grid: Option<[usize; 2]>,
        guard: NanGuard,
    ) -> Self {
        Self {
            model,
            global_prefix,
            grid,
            guard,
            clock: StepClock::default(),
        }
    }

    /// Loss and logits of a batch.
    pub fn forward(&self, batch: ClassBatch) -> ClassificationOutput {
        self.forward_taped(batch, None).scored.classes()
    }

    /// [`forward`](Self::forward), a reversible encoder recording on `tape` (training).
    pub fn forward_taped(&self, batch: ClassBatch, tape: Option<ReversibleTape>) -> StepOutput {
        let mut input = EncoderInput::new(batch.tokens).mask_pad(batch.mask_pad);
        if let Some(tape) = tape {
            input = input.with_side(tape);
        }
        if self.global_prefix > 0 {
            input = input.with_global(GlobalTokens::Prefix(self.global_prefix));
        }
        if let Some([rows, cols]) = self.grid {
            input = input.with_grid(Grid::new(rows, cols));
        }
        let logits = self.model.forward(input);
        let device = logits.device();
        let loss = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits.clone(), batch.labels.clone());
        let aux = self.model.aux_terms(&device);
        StepOutput {
            scored: ClassificationOutput::new(with_aux(loss, aux.loss), logits, batch.labels)
                .into(),
            routing: aux.routing,
        }
    }
}

burn_train_steps!(ClassifierWithLoss, ClassBatch);

/// What `predict` needs to rebuild a trained classifier without its data: written as
/// `model.json` in the run directory.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SavedClassifier {
    /// The model.
    pub model: ClassifierConfig,
    /// Label names in class order.
    pub labels: Vec<String>,
    /// Padding id.
    pub pad: u32,
    /// Global prefix tokens.
    pub global_prefix: usize,
    /// Grid layout.
    pub grid: Option<[usize; 2]>,
    /// Fixed batch length, if the model needs one.
    pub fixed_len: Option<usize>,
}

/// Sequence classification over prepared [`ClassData`].
pub struct ClassificationTask {
    data: ClassData,
}

impl ClassificationTask {
    /// The task over `data`.
    pub fn new(data: ClassData) -> Self {
        Self { data }
    }

    /// Checks the model sections before anything is written: a bidirectional encoder, and a
    /// pretrained checkpoint only for tokenised text with the stack's shape left to it.
    ///
    /// # Errors
    /// The key and what was expected.
    pub fn check_config(config: &ExperimentConfig) -> Result<(), String> {
        config
            .model
            .stack
            .check("encoder", AttentionMode::Bidirectional)
            .map_err(|e| model_error(e, &[("encoder", "stack")]))?;
        super::check_grid(&config.model.stack, "model.stack", config.model.grid, true)?;
        if let Some(funnel) = &config.model.funnel {
            funnel
                .check("model.funnel", &config.model.stack)
                .map_err(|e| format!("{}: {}", e.path, e.message))?;
            if config.model.grid.is_some() {
                return Err(
                    "model.funnel: a funnel pools 1-D sequences; remove model.grid (2-D \
                     layouts are not pooled)"
                        .into(),
                );
            }
            if config.model.pretrained.is_some() {
                return Err(
                    "model.funnel: a pretrained encoder is converted layer for layer, without \
                     pooling; remove [model.funnel] or [model.pretrained]"
                        .into(),
                );
            }
        }
        if config.model.pretrained.is_none() {
            return Ok(());
        }
        if config.task != TaskKind::TextClassification {
            return Err(format!(
                "model.pretrained: a pretrained encoder needs task = \"text-classification\" \
                 (with the checkpoint's tokenizer), not {:?}",
                config.task
            ));
        }
        if config.model.stack.ffn.experts().is_some() {
            return Err(
                "model.stack.ffn.kind: a pretrained encoder keeps its dense feed-forward blocks \
                 (the checkpoint has no experts); remove [model.stack.ffn]"
                    .into(),
            );
        }
        if config.model.stack.reversible {
            return Err(
                "model.stack.reversible: a pretrained BERT-family encoder is post-norm, and \
                 reversible blocks need pre-norm; train without reversible = true"
                    .into(),
            );
        }
        // Unset shape fields hold the section's default (no `[model.stack]` table) or the
        // stack's own default (a table with only attention/dropout).
        let stack = &config.model.stack;
        let unset = |defaults: models::StackConfig| models::StackConfig {
            attention: stack.attention.clone(),
            attention_layers: stack.attention_layers.clone(),
            attention_pattern: stack.attention_pattern.clone(),
            dropout: stack.dropout,
            ff_chunks: stack.ff_chunks,
            ..defaults
        };
        if *stack != unset(crate::config::ModelSection::default().stack)
            && *stack != unset(models::StackConfig::default())
        {
            return Err(
                "model.stack: with model.pretrained the layer shapes come from the \
                        checkpoint's config.json; set only model.stack.attention (or \
                        attention_layers / attention_pattern) and dropout"
                    .into(),
            );
        }
        Ok(())
    }

    /// The encoder config of a `model.pretrained` checkpoint with this run's attention,
    /// dropout and length.
    fn pretrained_encoder(
        &self,
        ctx: &RunContext,
        needed: usize,
    ) -> Result<Option<(BertCheckpoint, EncoderConfig)>, String> {
        let c = &ctx.config;
        let Some(p) = &c.model.pretrained else {
            return Ok(None);
        };
        let ckpt = BertCheckpoint::open(resolve(&p.dir, &ctx.config_dir))
            .map_err(|e| format!("model.pretrained.dir: {e}"))?;
        let vocab_size = self.data.vocab_size;
        if vocab_size != ckpt.config.vocab_size {
            return Err(format!(
                "text.tokenizer: the tokenizer has {vocab_size} tokens but the checkpoint {} has {}; \
                 use the checkpoint's tokenizer.json",
                ckpt.dir.display(),
                ckpt.config.vocab_size
            ));
        }
        let mut enc = ckpt.encoder_config(c.model.stack.attention.clone());
        enc.stack.attention_layers = c.model.stack.attention_layers.clone();
        enc.stack.attention_pattern = c.model.stack.attention_pattern.clone();
        enc.stack.dropout = c.model.stack.dropout;
        enc.stack.ff_chunks = c.model.stack.ff_chunks;
        enc.embedding.dropout = c.model.embedding.dropout;
        enc.embedding.max_len = c.model.embedding.max_len.unwrap_or(needed);
        if enc.embedding.max_len < needed {
            return Err(format!(
                "model.embedding.max_len = {} but the data has sequences of {needed} tokens",
                enc.embedding.max_len
            ));
        }
        Ok(Some((ckpt, enc)))
    }

    /// The length the model must hold: the grid's size for 2-D layouts, else the data's
    /// longest item.
    fn needed_len(&self, config: &ExperimentConfig) -> Result<usize, String> {
        let d = &self.data;
        match config.model.grid {
            Some([rows, cols]) if rows * cols < d.max_len => Err(format!(
                "model.grid = [{rows}, {cols}] holds {} positions but the data has sequences of {} tokens",
                rows * cols,
                d.max_len
            )),
            Some([rows, cols]) => Ok(rows * cols),
            None => Ok(d.max_len),
        }
    }
}

/// Task configuration: the classifier and the batch layout it needs.
#[derive(Clone, Debug)]
pub struct ClassifierSetup {
    model: ClassifierConfig,
    global_prefix: usize,
    grid: Option<[usize; 2]>,
    fixed_len: Option<usize>,
    pretrained: bool,
}

impl Task for ClassificationTask {
    type Item = ClassItem;
    type Batch = ClassBatch;
    type Model = ClassifierWithLoss;
    type ModelConfig = ClassifierSetup;

    fn model_config(&self, ctx: &RunContext) -> Result<ClassifierSetup, String> {
        let c = &ctx.config;
        let needed = self.needed_len(c)?;
        let encoder = match self.pretrained_encoder(ctx, needed)? {
            Some((_, enc)) => enc,
            None => EncoderConfig {
                embedding: embedding(c, self.data.vocab_size, needed)?,
                stack: c.model.stack.clone(),
                funnel: c.model.funnel.clone(),
            },
        };
        let fixed_len = fixed_length(&c.model, encoder.embedding.max_len);
        Ok(ClassifierSetup {
            model: ClassifierConfig {
                encoder,
                n_classes: self.data.labels.len(),
                pooling: c.model.pooling,
                dropout: c.model.head_dropout,
            },
            global_prefix: c.model.global_prefix,
            grid: c.model.grid,
            fixed_len,
            pretrained: c.model.pretrained.as_ref().map(|p| p.init)
                == Some(PretrainedInit::Pretrained),
        })
    }

    fn build(
        &self,
        config: &ClassifierSetup,
        device: &Device,
        guard: NanGuard,
    ) -> Result<ClassifierWithLoss, String> {
        let model = config
            .model
            .init_sequence(device)
            .map_err(|e| model_error(e, &[("encoder", "stack")]))?;
        Ok(ClassifierWithLoss::new(
            model,
            config.global_prefix,
            config.grid,
            guard,
        ))
    }

    /// Imports the pretrained encoder (converted to this run's attention and length).
    fn initialize(
        &self,
        mut model: ClassifierWithLoss,
        config: &ClassifierSetup,
        ctx: &RunContext,
        device: &Device,
    ) -> Result<ClassifierWithLoss, String> {
        if !config.pretrained {
            return Ok(model);
        }
        let needed = config.model.encoder.embedding.max_len;
        let Some((ckpt, target)) = self.pretrained_encoder(ctx, needed)? else {
            return Ok(model);
        };
        let base = ckpt
            .load(device)
            .map_err(|e| format!("model.pretrained.dir: {e}"))?;
        let (encoder, report) = models::convert(
            base,
            &ckpt.encoder_config(AttentionConfig::default()),
            &target,
            device,
        )
        .map_err(|e| format!("model.pretrained: {e}"))?;
        model.model.encoder = encoder;
        eprintln!(
            "pretrained encoder {}: positions {} -> {}, {} layers with global projections copied, {} fresh parameter tensors{}{}",
            ckpt.dir.display(),
            report.positions.0,
            report.positions.1,
            report.global_copies,
            report.fresh.len(),
            if report.fresh.is_empty() {
                String::new()
            } else {
                format!(" ({})", report.fresh.join(", "))
            },
            if report.dropped_keys > 0 {
                format!(
                    "; {} key projections dropped (the attention shares queries and keys)",
                    report.dropped_keys
                )
            } else {
                String::new()
            }
        );
        Ok(model)
    }

    fn batcher(&self, config: &ClassifierSetup) -> Arc<dyn MakeBatch<ClassItem, ClassBatch>> {
        Arc::new(ClassBatcher {
            pad: self.data.pad,
            fixed_len: config.fixed_len,
        })
    }

    fn splits(&self) -> Splits<'_, ClassItem> {
        Splits {
            train: &self.data.train,
            valid: &self.data.valid,
            test: Some(&self.data.test),
        }
    }

    fn pad_token(&self) -> Option<usize> {
        None
    }

    fn describe(&self, parameters: usize) -> String {
        let d = &self.data;
        format!(
            "classification: {} train / {} valid / {} test examples, vocabulary {}, {} classes, longest {} tokens; {parameters} parameters",
            d.train.len(),
            d.valid.len(),
            d.test.len(),
            d.vocab_size,
            d.labels.len(),
            d.max_len
        )
    }

    fn save_artifacts(&self, config: &ClassifierSetup, ctx: &RunContext) -> Result<(), String> {
        let saved = SavedClassifier {
            model: config.model.clone(),
            labels: self.data.labels.clone(),
            pad: self.data.pad,
            global_prefix: config.global_prefix,
            grid: config.grid,
            fixed_len: config.fixed_len,
        };
        write_atomic(
            &ctx.run_dir.join("model.json"),
            serde_json::to_string_pretty(&saved)
                .map_err(|e| e.to_string())?
                .as_bytes(),
        )
    }

    fn majority_baseline(&self) -> Option<f64> {
        let d = &self.data;
        let mut counts = vec![0usize; d.labels.len()];
        d.train.iter().for_each(|i| counts[i.label as usize] += 1);
        let top = counts
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .map_or(0, |(i, _)| i);
        Some(
            d.test.iter().filter(|i| i.label as usize == top).count() as f64
                / d.test.len().max(1) as f64,
        )
    }
}
