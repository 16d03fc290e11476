//! Fitting and evaluating any task's model: burn-train's supervised training with our atomic
//! checkpoints, epoch-seeded loaders, metrics, early stopping, resume and device strategy, and
//! a plain evaluation loop.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::data::dataloader::DataLoader;
use burn::tensor::Device;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::store::{Aggregate, Direction, Split};
use burn::train::metric::{AccuracyMetric, LossMetric, PerplexityMetric};
use burn::train::{
    ExecutionStrategy, InferenceStep, Learner, MetricEarlyStoppingStrategy, MultiDeviceOptim,
    StoppingCondition, SupervisedTraining,
};
use serde::Serialize;

use crate::config::ExperimentConfig;
use crate::data::batching::{Batching, ItemLength};
use crate::data::loader::{EpochLoader, LoaderRole, MakeBatch, TokenMeter};
use crate::metrics_log::{CsvMetricLogger, plot_curves};
use crate::optim::{Schedule, optimizer};
use crate::progress::PlainProgress;
use crate::run_dir::AtomicCheckpointer;
use crate::tasks::{NanGuard, RoutingMetric, RoutingQuantity, Scored, Scoring, Task};

/// Everything a run needs besides the task's data and model.
pub struct RunContext {
    /// The resolved experiment.
    pub config: ExperimentConfig,
    /// The experiment file's folder (relative data paths).
    pub config_dir: PathBuf,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Devices; the first is the main one.
    pub devices: Vec<Device>,
    /// Their names, for reports.
    pub device_names: String,
    /// The last complete checkpoint when resuming.
    pub resume_from: Option<usize>,
}

impl RunContext {
    /// The main device.
    pub fn main_device(&self) -> &Device {
        &self.devices[0]
    }
}

/// Loss and accuracy on a split.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EvalResult {
    /// Mean loss per example (or per token).
    pub loss: f64,
    /// Accuracy (per example, or per token); none for values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean absolute error (values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
    /// Macro-averaged F1 over the classes (per-example tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// Examples (or tokens) evaluated.
    pub count: usize,
}

impl EvalResult {
    /// `accuracy 91.20%` or `mean absolute error 0.2085`, as the task scores.
    pub fn score(&self) -> String {
        match (self.accuracy, self.mae) {
            (Some(a), _) => format!("accuracy {:.2}%", 100.0 * a),
            (None, Some(m)) => format!("mean absolute error {m:.4}"),
            (None, None) => "no score".into(),
        }
    }
}

/// Tokens a run's training passes processed and how fast (this process's epochs only, after a
/// `--resume`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Throughput {
    /// Epochs timed.
    pub epochs: usize,
    /// The items' own tokens.
    pub real_tokens: u64,
    /// Tokens of the padded batches (what the model computed on).
    pub padded_tokens: u64,
    /// Seconds spent in training passes (validation excluded).
    pub seconds: f64,
    /// Real tokens per second.
    pub real_tokens_per_second: f64,
    /// Padded tokens per second.
    pub padded_tokens_per_second: f64,
    /// Seconds per training epoch.
    pub seconds_per_epoch: f64,
}

impl Throughput {
    /// The throughput of `epochs` training passes counted by `meter`.
    pub fn of(meter: &TokenMeter, epochs: usize) -> Self {
        let c = meter.count();
        let per = |x: f64| if c.seconds > 0.0 { x / c.seconds } else { 0.0 };
        Self {
            epochs,
            real_tokens: c.real,
            padded_tokens: c.padded,
            seconds: c.seconds,
            real_tokens_per_second: per(c.real as f64),
            padded_tokens_per_second: per(c.padded as f64),
            seconds_per_epoch: c.seconds / epochs.max(1) as f64,
        }
    }
}

/// Why training ended before its last epoch.
#[derive(Clone, Debug, PartialEq)]
pub enum StopReason {
    /// The training loss became NaN or infinite; no checkpoint was written after it.
    NonFiniteLoss {
        /// The value.
        value: f32,
        /// The (1-based) training batch.
        batch: usize,
    },
    /// Interrupted for another reason (burn-train's message).
    Interrupted(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NonFiniteLoss { value, batch } => write!(
                f,
                "the training loss became {value} at batch {batch}; stopping without writing a checkpoint (the last good one is kept)"
            ),
            Self::Interrupted(reason) => f.write_str(reason),
        }
    }
}

impl Serialize for StopReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What [`fit`] returns: the final model, why it stopped early (if it did) and the wall time.
pub struct Fitted<M> {
    /// The model after the last epoch (or the interruption).
    pub model: M,
    /// Why training stopped early.
    pub stopped: Option<StopReason>,
    /// Wall time of training, in seconds.
    pub seconds: f64,
}

/// Optimiser steps per epoch for `items` training items on `devices` devices. burn-train
/// splits an epoch's items into one contiguous slice per device (`split_dataloader`: `items /
/// devices` each, the last taking the rest), takes one batch from every device per step and
/// one optimiser step per `grad_accumulation` steps, so an epoch has as many steps as the
/// largest slice has batches (divided by the accumulation).
pub fn steps_per_epoch(items: usize, config: &ExperimentConfig, devices: usize) -> usize {
    let devices = devices.max(1);
    let largest = items - (devices - 1) * (items / devices);
    largest
        .div_ceil(config.train.batch_size.max(1))
        .div_ceil(config.train.grad_accumulation.max(1))
}

/// The loaders of a run and their token meters.
pub struct Loaders<O> {
    /// Training: batches drawn from (seed, epoch), starting after a resumed epoch.
    pub train: Arc<dyn DataLoader<O>>,
    /// Validation.
    pub valid: Arc<dyn DataLoader<O>>,
    /// Tokens and time of the training passes.
    pub train_meter: Arc<TokenMeter>,
    /// Tokens and time of the validation passes.
    pub valid_meter: Arc<TokenMeter>,
}

/// The training loader (epoch-seeded batches, reseeded dropout, starting after a resumed
/// epoch) and the validation loader, both batched by `train.batching`; prints the share of
/// padding that batching leaves in the first epoch, next to the other batching's.
pub fn loaders<I, O>(
    ctx: &RunContext,
    train: Vec<I>,
    valid: Vec<I>,
    batcher: Arc<dyn MakeBatch<I, O>>,
) -> Loaders<O>
where
    I: Clone + ItemLength + Send + Sync + 'static,
    O: Send + 'static,
{
    let t = &ctx.config.train;
    let first_epoch = ctx.resume_from.unwrap_or(0) + 1;
    let train = EpochLoader::new(
        train,
        batcher.clone(),
        t.batch_size,
        t.batching,
        LoaderRole::Train {
            seed: t.seed,
            first_epoch,
        },
        ctx.main_device().clone(),
    );
    let other = match t.batching {
        Batching::Shuffled => Batching::default(),
        Batching::LengthBuckets { .. } | Batching::InOrder => Batching::Shuffled,
    };
    let (mine, theirs) = train.padding_fraction(first_epoch, other);
    eprintln!(
        "batching: {}; padding is {:.1}% of the training tokens of epoch {first_epoch} ({other}: {:.1}%)",
        t.batching,
        100.0 * mine,
        100.0 * theirs
    );
    let valid = EpochLoader::new(
        valid,
        batcher,
        t.eval_batch_size,
        t.batching,
        LoaderRole::Eval,
        ctx.main_device().clone(),
    );
    Loaders {
        train_meter: train.meter(),
        valid_meter: valid.meter(),
        train: Arc::new(train),
        valid: Arc::new(valid),
    }
}

/// The layers (counted over the model: a sequence-to-sequence model's decoder after its
/// encoder) whose feed-forward blocks are mixtures of experts.
fn routed_layers(config: &ExperimentConfig) -> Vec<usize> {
    let encoder = &config.model.stack;
    let mut layers: Vec<usize> = match encoder.ffn.experts() {
        Some(_) => (0..encoder.n_layers).collect(),
        None => Vec::new(),
    };
    if config.task == crate::config::TaskKind::Seq2seq {
        let decoder = config.model.decoder.as_ref().unwrap_or(encoder);
        if decoder.ffn.experts().is_some() {
            layers.extend(encoder.n_layers..encoder.n_layers + decoder.n_layers);
        }
    }
    layers
}

/// Trains `model` with burn-train: optimiser, schedule, metrics, atomic checkpoints, early
/// stopping, resume and the device strategy.
///
/// # Errors
/// If the metrics file cannot be opened.
pub fn fit<T: Task>(
    ctx: &RunContext,
    model: T::Model,
    loaders: &Loaders<T::Batch>,
    steps_per_epoch: usize,
    scoring: Scoring,
    guard: &NanGuard,
) -> Result<Fitted<T::Model>, String> {
    let t = &ctx.config.train;
    let total_steps = steps_per_epoch * t.epochs;
    let schedule = Schedule::new(
        t.schedule,
        t.lr,
        ctx.config.model.stack.d_model,
        total_steps,
    );
    let learner = Learner::new(model, optimizer(&ctx.config), schedule);
    let checkpoints = ctx.run_dir.join("checkpoint");
    let csv = CsvMetricLogger::open(&ctx.run_dir.join("metrics.csv"))?;
    let interrupter = guard.interrupter();
    let mut training =
        SupervisedTraining::new(&ctx.run_dir, loaders.train.clone(), loaders.valid.clone())
            .with_metric_logger(burn::train::logger::FileMetricLogger::new(
                ctx.run_dir.clone(),
            ))
            .with_metric_logger(csv)
            .with_custom_checkpointers(
                AtomicCheckpointer::new(&checkpoints, "model"),
                AtomicCheckpointer::new(&checkpoints, "optim"),
                AtomicCheckpointer::new(&checkpoints, "scheduler"),
            )
            .with_checkpointing_strategy(KeepLastNCheckpoints::new(t.keep_checkpoints.max(1)))
            .with_interrupter(interrupter.clone())
            .num_epochs(t.epochs);
    if !std::io::stdout().is_terminal() {
        training = training.renderer(Box::new(
            PlainProgress::new(Duration::from_secs(10))
                .with_meter("train", loaders.train_meter.clone())
                .with_meter("valid", loaders.valid_meter.clone()),
        ));
    }
    training = match scoring {
        Scoring::PerToken { pad } => training.metrics((
            AccuracyMetric::new().with_pad_token(pad),
            LossMetric::new(),
            PerplexityMetric::new().with_pad_token(pad),
        )),
        Scoring::PerExample => training.metrics((AccuracyMetric::new(), LossMetric::new())),
        Scoring::Values => training.metrics((LossMetric::new(),)),
    };
    for layer in routed_layers(&ctx.config) {
        for quantity in [
            RoutingQuantity::Balance,
            RoutingQuantity::Drops,
            RoutingQuantity::AuxLoss,
        ] {
            training = training.metric_train_numeric(RoutingMetric::new(layer, quantity));
        }
    }
    if t.grad_accumulation > 1 {
        training = training.grads_accumulation(t.grad_accumulation);
    }
    if let Some(stop) = t.early_stopping {
        training = training.early_stopping(MetricEarlyStoppingStrategy::new(
            &LossMetric::new(),
            Aggregate::Mean,
            Direction::Lowest,
            Split::Valid,
            StoppingCondition::NoImprovementSince {
                n_epochs: stop.patience,
            },
        ));
    }
    if let Some(epoch) = ctx.resume_from {
        training = training.checkpoint(epoch);
    }
    let strategy = if ctx.devices.len() > 1 {
        ExecutionStrategy::MultiDevice(ctx.devices.clone(), MultiDeviceOptim::OptimMainDevice)
    } else {
        ExecutionStrategy::SingleDevice(ctx.main_device().clone())
    };
    training = training.with_training_strategy(strategy.into());
    ctx.main_device().seed(ctx.config.train.seed);
    let start = Instant::now();
    let result = training.launch(learner);
    let seconds = start.elapsed().as_secs_f64();
    let stopped = guard.non_finite().or_else(|| {
        interrupter.should_stop().then(|| {
            StopReason::Interrupted(
                interrupter
                    .interruption()
                    .and_then(|i| i.reason)
                    .unwrap_or_else(|| "stopped early".to_string()),
            )
        })
    });
    Ok(Fitted {
        model: result.model,
        stopped,
        seconds,
    })
}

/// Mean loss, accuracy and (one label per example) macro-F1 of `model` over `items`, batched
/// by `batching` (length buckets: the split sorted by length); per token ignoring the padding
/// id, or for values the mean absolute error, as `scoring` says.
pub fn evaluate<I, O, M>(
    model: &M,
    items: &[I],
    batcher: &dyn MakeBatch<I, O>,
    batch_size: usize,
    batching: Batching,
    device: &Device,
    scoring: Scoring,
) -> EvalResult
where
    I: Clone + ItemLength,
    M: InferenceStep<Input = O, Output = Scored>,
{
    let lengths: Vec<usize> = items.iter().map(ItemLength::length).collect();
    let batches = batching.batches(
        &lengths,
        (0, items.len()),
        batch_size,
        crate::data::batching::Pass::Eval,
    );
    let pad = match scoring {
        Scoring::PerToken { pad } => Some(pad),
        _ => None,
    };
    let (mut loss_sum, mut count) = (0.0, 0usize);
    let mut pairs: Vec<(i64, i64)> = Vec::new();
    let mut abs_error = 0.0;
    let read = |t: burn::tensor::Tensor<2>| -> Vec<f64> {
        t.into_data()
            .convert::<f64>()
            .try_to_vec()
            .unwrap_or_default()
    };
    for batch in batches {
        let chunk: Vec<I> = batch.iter().map(|&i| items[i].clone()).collect();
        let counted = match model.step(batcher.batch(&chunk, device)) {
            Scored::Classes(out) => {
                let targets: Vec<i64> = out
                    .targets
                    .clone()
                    .into_data()
                    .convert::<i64>()
                    .try_to_vec()
                    .unwrap_or_default();
                let predicted: Vec<i64> = out
                    .output
                    .clone()
                    .argmax(1)
                    .into_data()
                    .convert::<i64>()
                    .try_to_vec()
                    .unwrap_or_default();
                let before = pairs.len();
                pairs.extend(
                    targets
                        .iter()
                        .zip(&predicted)
                        .filter(|(t, _)| pad.is_none_or(|p| **t != p as i64))
                        .map(|(t, p)| (*t, *p)),
                );
                let counted = pairs.len() - before;
                loss_sum += out.loss.into_scalar::<f64>() * counted as f64;
                counted
            }
            Scored::Values(out) => {
                let predicted = read(out.output);
                let targets = read(out.targets);
                abs_error += predicted
                    .iter()
                    .zip(&targets)
                    .map(|(p, t)| (p - t).abs())
                    .sum::<f64>();
                let counted = chunk.len();
                loss_sum += out.loss.into_scalar::<f64>() * counted as f64;
                counted
            }
        };
        count += counted;
    }
    let n = count.max(1) as f64;
    let correct = pairs.iter().filter(|(t, p)| t == p).count();
    let classes = scoring != Scoring::Values;
    EvalResult {
        loss: loss_sum / n,
        accuracy: classes.then(|| correct as f64 / n),
        mae: (!classes).then(|| abs_error / n),
        macro_f1: (scoring == Scoring::PerExample).then(|| macro_f1(&pairs)),
        count,
    }
}

/// Macro-averaged F1 over the classes that occur as a target or a prediction (as
/// scikit-learn's `f1_score(average="macro")`): per class 2·tp / (2·tp + fp + fn).
pub fn macro_f1(pairs: &[(i64, i64)]) -> f64 {
    let mut classes: Vec<i64> = pairs.iter().flat_map(|&(t, p)| [t, p]).collect();
    classes.sort_unstable();
    classes.dedup();
    if classes.is_empty() {
        return 0.0;
    }
    let f1 = |c: i64| {
        let tp = pairs.iter().filter(|&&(t, p)| t == c && p == c).count() as f64;
        let fp = pairs.iter().filter(|&&(t, p)| t != c && p == c).count() as f64;
        let fn_ = pairs.iter().filter(|&&(t, p)| t == c && p != c).count() as f64;
        2.0 * tp / (2.0 * tp + fp + fn_)
    };
    classes.iter().map(|&c| f1(c)).sum::<f64>() / classes.len() as f64
}

/// Draws `curves.png` from the run's `metrics.csv` (a warning if it cannot).
pub fn plot_run_curves(run_dir: &Path) {
    let csv = run_dir.join("metrics.csv");
    match plot_curves(&csv, &run_dir.join("curves.png")) {
        Ok(p) => eprintln!("training curves: {}", p.display()),
        Err(e) => eprintln!("warning: no training curves: {e}"),
    }
}

/// Peak resident memory of this process, in bytes (Linux).
pub fn peak_memory() -> Option<u64> {
    crate::bench::memory_status().map(|(_, hwm)| hwm)
}
