//! Sequence to sequence with teacher forcing.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::Device;
use burn::train::ClassificationOutput;
use efficient_attn::AttentionMode;
use models::{Seq2Seq, Seq2SeqConfig};

use super::{NanGuard, Splits, StepClock, Task, check_attention_lengths, embedding, token_output};
use crate::config::ExperimentConfig;
use crate::config::load::model_error;
use crate::data::loader::{MakeBatch, Seq2SeqBatch, Seq2SeqBatcher, Seq2SeqItem};
use crate::data::prepare::Seq2SeqData;
use crate::fit::RunContext;

/// An encoder-decoder model with its loss (per target token, ignoring padding).
#[derive(Module, Debug)]
pub struct Seq2SeqWithLoss {
    /// The model.
    pub model: Seq2Seq,
    /// Padding id.
    pub pad: usize,
    #[module(skip)]
    guard: NanGuard,
    #[module(skip)]
    clock: StepClock,
}

impl Seq2SeqWithLoss {
    /// Wraps an encoder-decoder model.
    pub fn new(model: Seq2Seq, pad: usize, guard: NanGuard) -> Self {
        Self {
            model,
            pad,
            guard,
            clock: StepClock::default(),
        }
    }

    /// Loss and flattened logits of a batch.
    pub fn forward(&self, batch: Seq2SeqBatch) -> ClassificationOutput {
        self.forward_taped(batch, None).scored.classes()
    }

    /// [`forward`](Self::forward); the tape is not used: a reversible encoder of a
    /// sequence-to-sequence model trains with ordinary autodiff (its activations stored).
    pub fn forward_taped(
        &self,
        batch: Seq2SeqBatch,
        _tape: Option<models::ReversibleTape>,
    ) -> super::StepOutput {
        let logits = self.model.forward(
            batch.source,
            Some(batch.source_pad),
            batch.target_in,
            Some(batch.target_pad),
        );
        let aux = self.model.aux_terms(&logits.device());
        let mut out = token_output(logits, batch.target_out, self.pad);
        out.loss = super::with_aux(out.loss, aux.loss);
        super::StepOutput {
            scored: out.into(),
            routing: aux.routing,
        }
    }
}

burn_train_steps!(Seq2SeqWithLoss, Seq2SeqBatch);

/// The experiment file's sections of a built model's stacks (the decoder's own section, where
/// a model without `[model.decoder]` copied the encoder's, is told apart at `check_config`).
const BUILT_KEYS: [(&str, &str); 3] = [
    ("decoder.cross_attention", "cross_attention"),
    ("encoder", "stack"),
    ("decoder", "decoder"),
];

/// Sequence to sequence over prepared [`Seq2SeqData`].
pub struct Seq2SeqTask {
    data: Seq2SeqData,
}

impl Seq2SeqTask {
    /// The task over `data`.
    pub fn new(data: Seq2SeqData) -> Self {
        Self { data }
    }

    /// Checks the model sections before anything is written: a bidirectional encoder, a
    /// causal decoder and a cross-attention with a cross mode.
    ///
    /// # Errors
    /// The key and what was expected.
    pub fn check_config(config: &ExperimentConfig) -> Result<(), String> {
        let decoder_section = if config.model.decoder.is_some() {
            "decoder"
        } else {
            "stack"
        };
        let keys = [
            ("decoder.cross_attention", "cross_attention"),
            ("encoder", "stack"),
            ("decoder", decoder_section),
        ];
        let err = |e: models::ModelConfigError| model_error(e, &keys);
        config
            .model
            .stack
            .check("encoder", AttentionMode::Bidirectional)
            .map_err(err)?;
        let decoder = config.model.decoder.as_ref().unwrap_or(&config.model.stack);
        decoder
            .check("decoder", AttentionMode::Causal)
            .map_err(err)?;
        super::check_grid(&config.model.stack, "model.stack", None, false)?;
        if let Some(d) = &config.model.decoder {
            super::check_grid(d, "model.decoder", None, false)?;
        }
        let cross = config.model.cross_attention.info();
        if !cross.supports(AttentionMode::Cross) {
            return Err(format!(
                "model.cross_attention: attention kind \"{}\" has no cross mode",
                cross.kind
            ));
        }
        Ok(())
    }
}

impl Task for Seq2SeqTask {
    type Item = Seq2SeqItem;
    type Batch = Seq2SeqBatch;
    type Model = Seq2SeqWithLoss;
    type ModelConfig = Seq2SeqConfig;

    fn model_config(&self, ctx: &RunContext) -> Result<Seq2SeqConfig, String> {
        let c = &ctx.config;
        if let Some(decoder) = &c.model.decoder {
            check_attention_lengths(decoder, "model.decoder", self.data.max_len)?;
        }
        Ok(Seq2SeqConfig {
            embedding: embedding(c, self.data.vocab_size, self.data.max_len)?,
            encoder: c.model.stack.clone(),
            decoder: c
                .model
                .decoder
                .clone()
                .unwrap_or_else(|| c.model.stack.clone()),
            cross_attention: c.model.cross_attention.clone(),
            tie_embeddings: c.model.tie_embeddings,
        })
    }

    fn build(
        &self,
        config: &Seq2SeqConfig,
        device: &Device,
        guard: NanGuard,
    ) -> Result<Seq2SeqWithLoss, String> {
        let model = config
            .init(device)
            .map_err(|e| model_error(e, &BUILT_KEYS))?;
        Ok(Seq2SeqWithLoss::new(model, self.data.pad as usize, guard))
    }

    fn batcher(&self, _: &Seq2SeqConfig) -> Arc<dyn MakeBatch<Seq2SeqItem, Seq2SeqBatch>> {
        Arc::new(Seq2SeqBatcher { pad: self.data.pad })
    }

    fn splits(&self) -> Splits<'_, Seq2SeqItem> {
        Splits {
            train: &self.data.train,
            valid: &self.data.valid,
            test: None,
        }
    }

    fn pad_token(&self) -> Option<usize> {
        Some(self.data.pad as usize)
    }

    fn describe(&self, parameters: usize) -> String {
        let d = &self.data;
        format!(
            "sequence to sequence: {} train / {} valid pairs, longest {} tokens, vocabulary {}; {parameters} parameters",
            d.train.len(),
            d.valid.len(),
            d.max_len,
            d.vocab_size
        )
    }
}
