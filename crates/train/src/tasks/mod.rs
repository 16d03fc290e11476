//! Tasks: what `efformer train` and `efformer eval` run, one file each.
//!
//! A [`Task`] holds its prepared data and says how to configure and build its model, how to
//! batch its items and how its metrics count (per example, or per token ignoring padding).
//! [`run`] and [`evaluate_checkpoint`] are the one training skeleton and the one evaluation
//! every task goes through (over 600 lines on purpose: the skeleton, the step macro and the
//! shared loss and output helpers every task file builds on).

/// burn-train's training and inference steps for a model-with-loss type `$model` whose
/// `forward_taped($batch, Option<ReversibleTape>) -> StepOutput` gives the loss, outputs and
/// routing (and `forward($batch)` the scored output without a tape, anything `Into<Scored>`): training passes the loss through
/// the type's [`NanGuard`] (field `guard`) and backpropagates, completing the gradients of
/// reversible stacks from a fresh [`models::ReversibleTape`]; after every optimiser step the
/// model's per-step state advances (field `clock`, a [`StepClock`]; field `model` with an
/// `at_step` method).
macro_rules! burn_train_steps {
    ($model:ty, $batch:ty) => {
        impl burn::train::TrainStep for $model {
            type Input = $batch;
            type Output = $crate::tasks::StepOutput;

            fn step(&self, batch: $batch) -> burn::train::TrainOutput<Self::Output> {
                let tape = models::ReversibleTape::default();
                let mut out = self.forward_taped(batch, Some(tape.clone()));
                let loss = self.guard.check(out.scored.loss());
                out.scored = out.scored.with_loss(loss.clone());
                burn::train::TrainOutput {
                    grads: tape.gradients(loss.backward(), self),
                    item: out,
                }
            }

            fn optimize(
                self,
                optim: &mut burn::optim::ModuleOptimizer,
                lr: burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate,
                grads: burn::optim::GradientsParams,
            ) -> Self {
                let step = self.clock.tick();
                let mut stepped = optim.step(lr, self, grads);
                stepped.model = stepped.model.at_step(step);
                stepped
            }

            fn optimize_multi(
                self,
                optim: &mut burn::optim::ModuleOptimizer,
                lr: burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate,
                grads: burn::optim::MultiGradientsParams,
            ) -> Self {
                let step = self.clock.tick();
                let mut stepped = optim.step_multi(lr, self, grads);
                stepped.model = stepped.model.at_step(step);
                stepped
            }
        }

        impl $crate::tasks::Stepped for $model {
            fn with_clock(mut self, clock: $crate::tasks::StepClock) -> Self {
                // A resumed run: per-step state that checkpoints do not hold (Reformer's
                // rotations, Sinkhorn's noise: functions of the step) starts at the step count.
                let steps = clock.count();
                self.clock = clock;
                if steps > 0 {
                    self.model = self.model.at_step(steps);
                }
                self
            }
        }

        impl burn::train::InferenceStep for $model {
            type Input = $batch;
            type Output = $crate::tasks::Scored;

            fn step(&self, batch: $batch) -> Self::Output {
                self.forward(batch).into()
            }
        }
    };
}

mod classification;
mod language_model;
mod output;
mod seq2seq;
mod set_max;

pub use self::output::{RoutingMetric, RoutingQuantity, Scored, Scoring, StepOutput};

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor};
use burn::train::{ClassificationOutput, InferenceStep, Interrupter, LearnerModel, TrainStep};
use efficient_attn::CoreConfig;
use models::{EmbeddingSettings, StackConfig};
use serde::Serialize;

pub use self::classification::{ClassificationTask, ClassifierWithLoss, SavedClassifier};
pub use self::language_model::{LanguageModelTask, LanguageModelWithLoss, SavedLanguageModel};
pub use self::seq2seq::{Seq2SeqTask, Seq2SeqWithLoss};
pub use self::set_max::{SetMaxTask, SetRegressorWithLoss};
use crate::config::{ExperimentConfig, ModelSection, TaskKind};
use crate::data::batching::ItemLength;
use crate::data::loader::MakeBatch;
use crate::fit::{
    EvalResult, RunContext, StopReason, Throughput, evaluate, fit, loaders, peak_memory,
    plot_run_curves, steps_per_epoch,
};
use crate::run_dir::{checkpoint_file, last_complete_checkpoint};

/// The data splits of a task.
pub struct Splits<'a, I> {
    /// Training items.
    pub train: &'a [I],
    /// Validation items.
    pub valid: &'a [I],
    /// Test items, if the task has a test split.
    pub test: Option<&'a [I]>,
}

/// One kind of experiment: its prepared data, its model and how it is batched and scored.
pub trait Task {
    /// An example.
    type Item: Clone + ItemLength + Send + Sync + 'static;
    /// A batch on a device.
    type Batch: Send + 'static;
    /// The model with its loss: what burn-train trains and evaluates.
    type Model: LearnerModel
        + Stepped
        + TrainStep<Input = Self::Batch, Output = StepOutput>
        + InferenceStep<Input = Self::Batch, Output = Scored>;
    /// The model's configuration.
    type ModelConfig: Clone;

    /// The model configuration for this experiment and data.
    ///
    /// # Errors
    /// A setting that does not fit the data, naming the key.
    fn model_config(&self, ctx: &RunContext) -> Result<Self::ModelConfig, String>;

    /// A model with fresh parameters.
    ///
    /// # Errors
    /// An invalid model configuration, naming the key.
    fn build(
        &self,
        config: &Self::ModelConfig,
        device: &Device,
        guard: NanGuard,
    ) -> Result<Self::Model, String>;

    /// Initialises a freshly built model before training starts (not on resume, not for
    /// evaluation): e.g. imports pretrained weights. Default: unchanged.
    ///
    /// # Errors
    /// A checkpoint that cannot be imported.
    fn initialize(
        &self,
        model: Self::Model,
        config: &Self::ModelConfig,
        ctx: &RunContext,
        device: &Device,
    ) -> Result<Self::Model, String> {
        let _ = (config, ctx, device);
        Ok(model)
    }

    /// Batches items for this model.
    fn batcher(&self, config: &Self::ModelConfig) -> Arc<dyn MakeBatch<Self::Item, Self::Batch>>;

    /// The data.
    fn splits(&self) -> Splits<'_, Self::Item>;

    /// For token-level tasks, the padding id metrics ignore; `None`: one label per example
    /// (or values).
    fn pad_token(&self) -> Option<usize>;

    /// The attention kinds the model's layers use, for the run's report. Default: the
    /// stack's (`model.stack`).
    fn attention_kinds(&self, config: &ExperimentConfig) -> Vec<String> {
        attention_kinds(&config.model.stack)
    }

    /// How outputs are scored. Default: by class, per token when [`pad_token`](Self::pad_token)
    /// gives one, else per example.
    fn scoring(&self) -> Scoring {
        match self.pad_token() {
            Some(pad) => Scoring::PerToken { pad },
            None => Scoring::PerExample,
        }
    }

    /// One line about the data, printed when a run starts.
    fn describe(&self, parameters: usize) -> String;

    /// Files a later command needs besides the checkpoints (a classifier's `model.json`).
    ///
    /// # Errors
    /// An I/O error.
    fn save_artifacts(&self, config: &Self::ModelConfig, ctx: &RunContext) -> Result<(), String> {
        let _ = (config, ctx);
        Ok(())
    }

    /// The accuracy of always predicting the most frequent training label, for classifiers.
    fn majority_baseline(&self) -> Option<f64> {
        None
    }
}

/// What a run reports at the end (also written as `result.json`).
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Task.
    pub task: TaskKind,
    /// Attention kinds of the layers.
    pub attention: Vec<String>,
    /// Trainable parameters.
    pub parameters: usize,
    /// Epochs completed in total (including before a resume).
    pub epochs: usize,
    /// The epoch of the model the scores describe: the last complete epoch, or after a
    /// non-finite loss the kept checkpoint's (0: the freshly initialised model).
    pub evaluated_epoch: usize,
    /// Optimiser steps per epoch.
    pub steps_per_epoch: usize,
    /// Optimiser steps taken, resumed epochs included.
    pub optimizer_steps: usize,
    /// Wall time of this process's training, in seconds.
    pub wall_seconds: f64,
    /// Tokens per second of this process's training passes (real and padded).
    pub train_throughput: Throughput,
    /// Peak resident memory of this process, in bytes (Linux).
    pub peak_memory_bytes: Option<u64>,
    /// Device(s).
    pub device: String,
    /// Validation loss and accuracy of the final model.
    pub valid: EvalResult,
    /// Test loss and accuracy, for tasks with a test split.
    pub test: Option<EvalResult>,
    /// Why training stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// Accuracy of always predicting the most frequent training class (classification).
    pub majority_baseline: Option<f64>,
}

/// What `efformer eval` reports: each split by name.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// The validation split.
    pub valid: EvalResult,
    /// The test split, for tasks that have one.
    pub test: Option<EvalResult>,
    /// Whether accuracy and loss are per token (language models, sequence-to-sequence).
    pub per_token: bool,
}

/// Trains `task`'s model in `ctx`'s run directory and evaluates the result: the one training
/// skeleton of every task.
///
/// # Errors
/// Model configuration, pretrained import or I/O errors.
pub fn run<T: Task>(ctx: &RunContext, task: &T) -> Result<RunReport, String> {
    let c = &ctx.config;
    let model_config = task.model_config(ctx)?;
    let device = ctx.main_device().clone();
    device.seed(c.train.seed);
    let guard = NanGuard::new(Interrupter::new(), c.train.inject_nan_at_batch);
    let ad_device = device.clone().autodiff();
    let mut model = task.build(&model_config, &ad_device, guard.clone())?;
    if ctx.resume_from.is_none() {
        model = task.initialize(model, &model_config, ctx, &ad_device)?;
    }
    let parameters = model.num_params();
    task.save_artifacts(&model_config, ctx)?;
    eprintln!("{}", task.describe(parameters));
    let batcher = task.batcher(&model_config);
    let splits = task.splits();
    let steps = steps_per_epoch(splits.train.len(), c, ctx.devices.len());
    // Per-step state (Performer's feature redraws) continues from the epochs already done.
    let clock = StepClock::starting_at(ctx.resume_from.unwrap_or(0) * steps);
    let model = model.with_clock(clock.clone());
    let loaders = loaders(
        ctx,
        splits.train.to_vec(),
        splits.valid.to_vec(),
        batcher.clone(),
    );
    let fitted = fit::<T>(ctx, model, &loaders, steps, task.scoring(), &guard)?;
    plot_run_curves(&ctx.run_dir);
    let eval_device = device.clone().inner();
    let kept = last_complete_checkpoint(&ctx.run_dir).unwrap_or(0);
    // After a non-finite loss the trained model is the one that took the bad step: score the
    // model that is kept instead, the last complete checkpoint (or, before the first, the
    // freshly initialised model).
    let (model, evaluated_epoch) = match fitted.stopped {
        Some(StopReason::NonFiniteLoss { .. }) if kept > 0 => {
            let path = checkpoint_file(&ctx.run_dir, kept);
            (load_model(task, &model_config, &eval_device, &path)?, kept)
        }
        Some(StopReason::NonFiniteLoss { .. }) => {
            device.seed(c.train.seed);
            let fresh = task.build(&model_config, &ad_device, NanGuard::default())?;
            let fresh = task.initialize(fresh, &model_config, ctx, &ad_device)?;
            (fresh.valid().fork(&eval_device), 0)
        }
        _ => (fitted.model.valid().fork(&eval_device), kept),
    };
    let score = |items: &[T::Item]| {
        evaluate(
            &model,
            items,
            batcher.as_ref(),
            c.train.eval_batch_size,
            c.train.batching,
            &eval_device,
            task.scoring(),
        )
    };
    Ok(RunReport {
        task: c.task,
        attention: task.attention_kinds(c),
        parameters,
        epochs: kept,
        evaluated_epoch,
        steps_per_epoch: steps,
        optimizer_steps: clock.count(),
        wall_seconds: fitted.seconds,
        train_throughput: Throughput::of(
            &loaders.train_meter,
            kept.saturating_sub(ctx.resume_from.unwrap_or(0)),
        ),
        peak_memory_bytes: peak_memory(),
        device: ctx.device_names.clone(),
        valid: score(splits.valid),
        test: splits.test.map(score),
        stopped: fitted.stopped,
        majority_baseline: task.majority_baseline(),
    })
}

/// Evaluates the model checkpoint `checkpoint` of `task` on its validation and test splits:
/// the one evaluation of every task.
///
/// # Errors
/// A checkpoint that cannot be read or does not fit the configured model, naming the file.
pub fn evaluate_checkpoint<T: Task>(
    ctx: &RunContext,
    task: &T,
    checkpoint: &Path,
) -> Result<EvalReport, String> {
    let c = &ctx.config;
    let model_config = task.model_config(ctx)?;
    let device = ctx.main_device();
    let model = load_model(task, &model_config, device, checkpoint)?;
    let batcher = task.batcher(&model_config);
    let splits = task.splits();
    let score = |items: &[T::Item]| {
        evaluate(
            &model,
            items,
            batcher.as_ref(),
            c.train.eval_batch_size,
            c.train.batching,
            device,
            task.scoring(),
        )
    };
    Ok(EvalReport {
        valid: score(splits.valid),
        test: splits.test.map(score),
        per_token: task.pad_token().is_some(),
    })
}

/// `task`'s model with the parameters of the model checkpoint `checkpoint`, on `device`.
///
/// # Errors
/// A checkpoint that cannot be read or does not fit the configured model, naming the file.
fn load_model<T: Task>(
    task: &T,
    model_config: &T::ModelConfig,
    device: &Device,
    checkpoint: &Path,
) -> Result<T::Model, String> {
    crate::run_dir::load_checkpoint(
        task.build(model_config, device, NanGuard::default())?,
        checkpoint,
        "this configuration's model",
    )
}

/// The count of optimiser steps taken, shared by a model's clones: what
/// [`AttentionCore::at_step`](efficient_attn::AttentionCore::at_step) hooks are called with.
/// A resumed run starts it at the steps of the epochs already done.
#[derive(Clone, Debug, Default)]
pub struct StepClock(Arc<AtomicUsize>);

impl StepClock {
    /// A clock that has counted `steps` already.
    pub fn starting_at(steps: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(steps)))
    }

    /// Steps counted so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts one more step and returns the new count (1 for the first).
    pub fn tick(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// A model whose per-step state follows a [`StepClock`] (every task's model-with-loss).
pub trait Stepped {
    /// The model counting its steps on `clock`.
    fn with_clock(self, clock: StepClock) -> Self;
}

/// Stops training on a non-finite loss (burn-train then ends the epoch without writing a
/// checkpoint, so the last good checkpoint stays the latest) and remembers where.
#[derive(Clone, Default)]
pub struct NanGuard {
    interrupter: Option<Interrupter>,
    batches: Arc<AtomicUsize>,
    inject_at: Option<usize>,
    seen: Arc<Mutex<Option<StopReason>>>,
}

impl fmt::Debug for NanGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NanGuard")
    }
}

impl NanGuard {
    /// A guard that stops `interrupter`; `inject_at` makes the loss of that (1-based) training
    /// batch NaN (fault injection for tests).
    pub fn new(interrupter: Interrupter, inject_at: Option<usize>) -> Self {
        Self {
            interrupter: Some(interrupter),
            inject_at,
            ..Self::default()
        }
    }

    /// The interrupter it stops (a fresh one for a guard that stops nothing).
    pub fn interrupter(&self) -> Interrupter {
        self.interrupter.clone().unwrap_or_default()
    }

    /// The non-finite loss that stopped training, if one did.
    pub fn non_finite(&self) -> Option<StopReason> {
        self.seen.lock().ok().and_then(|s| s.clone())
    }

    /// Counts the batch, injects a NaN if asked to, and stops training on a non-finite loss.
    pub fn check(&self, loss: Tensor<1>) -> Tensor<1> {
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
            let reason = StopReason::NonFiniteLoss { value, batch };
            interrupter.stop(Some(&reason.to_string()));
            if let Ok(mut seen) = self.seen.lock() {
                *seen = Some(reason);
            }
        }
        loss
    }
}

/// The output of a token-level task: `[batch, seq, vocab]` logits and `[batch, seq]` targets
/// flattened, with a loss that ignores `pad`.
pub fn token_output(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    pad: usize,
) -> ClassificationOutput {
    let [b, n, v] = logits.dims();
    let logits = logits.reshape([b * n, v]);
    let targets = targets.reshape([b * n]);
    let loss = CrossEntropyLossConfig::new()
        .with_pad_tokens(Some(vec![pad]))
        .init(&logits.device())
        .forward(logits.clone(), targets.clone());
    ClassificationOutput::new(loss, logits, targets)
}

/// The task loss plus the attention layers' loss terms (Routing's commitment loss), if any.
pub fn with_aux(loss: Tensor<1>, aux: Option<Tensor<1>>) -> Tensor<1> {
    match aux {
        Some(aux) => loss.add(aux),
        None => loss,
    }
}

/// The embedding of a model trained from scratch: the vocabulary from the data, the length
/// the data needs unless `model.embedding.max_len` sets a longer one.
///
/// # Errors
/// A configured length shorter than the data's.
pub fn embedding(
    config: &ExperimentConfig,
    vocab_size: usize,
    needed_len: usize,
) -> Result<EmbeddingSettings, String> {
    let max_len = config.model.embedding.max_len.unwrap_or(needed_len);
    if max_len < needed_len {
        return Err(format!(
            "model.embedding.max_len = {max_len} but the data has sequences of {needed_len} tokens; raise it or truncate the data"
        ));
    }
    check_attention_lengths(&config.model.stack, "model.stack", needed_len)?;
    Ok(EmbeddingSettings {
        vocab_size,
        max_len,
        positions: config.model.embedding.positions,
        type_vocab_size: 0,
        norm: false,
        norm_eps: 1e-12,
        dropout: config.model.embedding.dropout,
    })
}

/// Every layer whose attention has parameters sized by a maximum length
/// ([`CoreConfig::max_len`]: Linformer, dense Synthesizer) must cover `needed_len`: checked
/// with the configuration, before anything is written, instead of failing inside a forward.
///
/// # Errors
/// The first layer that is too short, naming its key.
pub fn check_attention_lengths(
    stack: &StackConfig,
    key: &'static str,
    needed_len: usize,
) -> Result<(), String> {
    let layers = stack.resolve_attention(key).map_err(|e| e.to_string())?;
    for (i, attention) in layers.iter().enumerate() {
        if let Some(m) = attention.max_len()
            && m < needed_len
        {
            let field = match (&stack.attention_layers, &stack.attention_pattern) {
                (Some(_), _) => format!("{key}.attention_layers[{i}].max_len"),
                (_, Some(p)) => format!("{key}.attention_pattern[{}].max_len", i % p.len()),
                _ => format!("{key}.attention.max_len"),
            };
            return Err(format!(
                "{field} = {m} but the data has sequences of {needed_len} tokens ({} sizes its parameters by the length); set it to at least {needed_len}",
                attention.info().kind
            ));
        }
    }
    Ok(())
}

/// Layers whose attention lays the sequence out in 2-D ([`VariantInfo::needs_grid`]: Axial,
/// Image Transformer 2-D) need `model.grid`, which only classification tasks give; checked
/// with the configuration instead of failing inside the first forward.
///
/// [`VariantInfo::needs_grid`]: efficient_attn::VariantInfo::needs_grid
///
/// # Errors
/// The key to set (or the attention to change) and why.
pub fn check_grid(
    stack: &StackConfig,
    key: &'static str,
    grid: Option<[usize; 2]>,
    task_has_grid: bool,
) -> Result<(), String> {
    let layers = stack.resolve_attention(key).map_err(|e| e.to_string())?;
    let Some(kind) = layers
        .iter()
        .map(|a| a.info())
        .find(|info| info.needs_grid)
        .map(|info| info.kind)
    else {
        return Ok(());
    };
    match (task_has_grid, grid) {
        (true, Some(_)) => Ok(()),
        (true, None) => Err(format!(
            "model.grid: attention kind \"{kind}\" in {key} lays the sequence out as a 2-D grid; \
             set model.grid = [rows, columns] with rows × columns at least the longest sequence"
        )),
        (false, _) => Err(format!(
            "{key}.attention: attention kind \"{kind}\" needs a 2-D grid (model.grid), which only \
             classification tasks give; choose a 1-D attention for this task"
        )),
    }
}

/// The attention kinds of a stack's layers.
pub fn attention_kinds(stack: &StackConfig) -> Vec<String> {
    stack
        .resolve_attention("model.stack")
        .map(|v| v.iter().map(|c| c.info().kind.to_string()).collect())
        .unwrap_or_default()
}

/// The length every batch is padded to, when the model needs one: the grid's size for 2-D
/// layouts, or `max_len` when a layer's parameters are sized by the length
/// ([`CoreConfig::max_len`]); otherwise batches are padded to their longest item.
pub fn fixed_length(model: &ModelSection, max_len: usize) -> Option<usize> {
    if let Some([rows, cols]) = model.grid {
        return Some(rows * cols);
    }
    let sized = model
        .stack
        .resolve_attention("model.stack")
        .map(|layers| layers.iter().any(|a| a.max_len().is_some()))
        .unwrap_or(false);
    sized.then_some(max_len)
}
