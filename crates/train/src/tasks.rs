//! The models burn-train trains: each task wraps a `models` model and implements its training
//! and inference steps (loss and outputs for the metrics).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Int, Tensor};
use burn::train::{ClassificationOutput, InferenceStep, Interrupter, TrainOutput, TrainStep};
use efficient_attn::{GlobalTokens, Grid};
use models::{EncoderInput, LanguageModel, Seq2Seq, SequenceClassifier};

use crate::data::loader::{ClassBatch, LmBatch, Seq2SeqBatch};

/// Stops training on a non-finite loss (burn-train then ends the epoch without writing a
/// checkpoint, so the last good checkpoint stays the latest).
#[derive(Clone, Default)]
pub struct NanGuard {
    interrupter: Option<Interrupter>,
    batches: Arc<AtomicUsize>,
    inject_at: Option<usize>,
}

impl fmt::Debug for NanGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NanGuard")
    }
}

impl NanGuard {
    /// A guard that stops `interrupter`.
    pub fn new(interrupter: Interrupter, inject_at: Option<usize>) -> Self {
        Self {
            interrupter: Some(interrupter),
            batches: Arc::new(AtomicUsize::new(0)),
            inject_at,
        }
    }

    /// Counts the batch, injects a NaN if asked to, and stops training on a non-finite loss.
    fn check(&self, loss: Tensor<1>) -> Tensor<1> {
        let batch = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        let loss = if self.inject_at == Some(batch) {
            loss.mul_scalar(f32::NAN)
        } else {
            loss
        };
        let Some(interrupter) = &self.interrupter else {
            return loss;
        };
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() && !interrupter.should_stop() {
            interrupter.stop(Some(&format!(
                "the training loss became {value} at batch {batch}; stopping without writing a checkpoint (the last good one is kept)"
            )));
        }
        loss
    }
}

/// Sequence classification.
#[derive(Module, Debug)]
pub struct ClassifierTask {
    /// The model.
    pub model: SequenceClassifier,
    /// Leading tokens that are global (for variants with global tokens).
    pub global_prefix: usize,
    /// The `[rows, columns]` layout for 2-D variants.
    pub grid: Option<[usize; 2]>,
    #[module(skip)]
    guard: NanGuard,
}

impl ClassifierTask {
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
        }
    }

    /// Loss and logits of a batch.
    pub fn forward(&self, batch: ClassBatch) -> ClassificationOutput {
        let mut input = EncoderInput::new(batch.tokens).mask_pad(batch.mask_pad);
        if self.global_prefix > 0 {
            input = input.with_global(GlobalTokens::Prefix(self.global_prefix));
        }
        if let Some([rows, cols]) = self.grid {
            input.grid = Some(Grid::new(rows, cols));
        }
        let logits = self.model.forward(input);
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), batch.labels.clone());
        ClassificationOutput::new(loss, logits, batch.labels)
    }
}

impl TrainStep for ClassifierTask {
    type Input = ClassBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassBatch) -> TrainOutput<ClassificationOutput> {
        let mut out = self.forward(batch);
        out.loss = self.guard.check(out.loss);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for ClassifierTask {
    type Input = ClassBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassBatch) -> ClassificationOutput {
        self.forward(batch)
    }
}

/// Flattens `[batch, seq, vocab]` logits and `[batch, seq]` targets for a token-level loss
/// that ignores `pad`.
fn token_output(logits: Tensor<3>, targets: Tensor<2, Int>, pad: usize) -> ClassificationOutput {
    let [b, n, v] = logits.dims();
    let logits = logits.reshape([b * n, v]);
    let targets = targets.reshape([b * n]);
    let loss = CrossEntropyLossConfig::new()
        .with_pad_tokens(Some(vec![pad]))
        .init(&logits.device())
        .forward(logits.clone(), targets.clone());
    ClassificationOutput::new(loss, logits, targets)
}

/// Causal language modelling.
#[derive(Module, Debug)]
pub struct LanguageModelTask {
    /// The model.
    pub model: LanguageModel,
    /// Padding id (ignored by the loss and metrics).
    pub pad: usize,
    #[module(skip)]
    guard: NanGuard,
}

impl LanguageModelTask {
    /// Wraps a language model.
    pub fn new(model: LanguageModel, pad: usize, guard: NanGuard) -> Self {
        Self { model, pad, guard }
    }

    /// Loss and flattened logits of a batch.
    pub fn forward(&self, batch: LmBatch) -> ClassificationOutput {
        let logits = self.model.forward(batch.inputs, Some(batch.mask_pad));
        token_output(logits, batch.targets, self.pad)
    }
}

impl TrainStep for LanguageModelTask {
    type Input = LmBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: LmBatch) -> TrainOutput<ClassificationOutput> {
        let mut out = self.forward(batch);
        out.loss = self.guard.check(out.loss);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for LanguageModelTask {
    type Input = LmBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: LmBatch) -> ClassificationOutput {
        self.forward(batch)
    }
}

/// Sequence-to-sequence with teacher forcing.
#[derive(Module, Debug)]
pub struct Seq2SeqTaskModel {
    /// The model.
    pub model: Seq2Seq,
    /// Padding id.
    pub pad: usize,
    #[module(skip)]
    guard: NanGuard,
}

impl Seq2SeqTaskModel {
    /// Wraps an encoder-decoder model.
    pub fn new(model: Seq2Seq, pad: usize, guard: NanGuard) -> Self {
        Self { model, pad, guard }
    }

    /// Loss and flattened logits of a batch.
    pub fn forward(&self, batch: Seq2SeqBatch) -> ClassificationOutput {
        let logits = self.model.forward(
            batch.source,
            Some(batch.source_pad),
            batch.target_in,
            Some(batch.target_pad),
        );
        token_output(logits, batch.target_out, self.pad)
    }
}

impl TrainStep for Seq2SeqTaskModel {
    type Input = Seq2SeqBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Seq2SeqBatch) -> TrainOutput<ClassificationOutput> {
        let mut out = self.forward(batch);
        out.loss = self.guard.check(out.loss);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for Seq2SeqTaskModel {
    type Input = Seq2SeqBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Seq2SeqBatch) -> ClassificationOutput {
        self.forward(batch)
    }
}
