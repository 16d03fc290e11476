//! `efformer train` and `efformer eval`: an experiment file in, a run directory out.
//!
//! A run directory holds `config.toml` (the resolved configuration), `tokenizer.json` (when
//! one was trained or loaded), `checkpoint/{model,optim,scheduler}-<epoch>.bpk` (written
//! atomically), `metrics.csv`, `curves.png`, `result.json` and burn-train's own logs.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::data::dataloader::DataLoader;
use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};
use burn::store::ModuleRecord;
use burn::tensor::Device;
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError, KeepLastNCheckpoints};
use burn::train::metric::store::{Aggregate, Direction, Split};
use burn::train::metric::{AccuracyMetric, LossMetric, PerplexityMetric};
use burn::train::{
    ClassificationOutput, ExecutionStrategy, InferenceStep, Interrupter, Learner, LearnerModel,
    MetricEarlyStoppingStrategy, MultiDeviceOptim, StoppingCondition, SupervisedTraining,
};
use efficient_attn::AttentionConfig;
use models::{
    BertCheckpoint, ClassifierConfig, EmbeddingSettings, EncoderConfig, LanguageModelConfig,
    Seq2SeqConfig,
};
use serde::Serialize;

use crate::config::load::{ConfigFileError, load};
use crate::config::{
    ExperimentConfig, OptimizerSection, PretrainedInit, ScheduleSection, TaskKind,
};
use crate::data::loader::{
    ClassBatch, ClassBatcher, ClassItem, EpochLoader, LmBatch, LmBatcher, MakeBatch, Seq2SeqBatch,
    Seq2SeqBatcher,
};
use crate::data::prepare::{ClassData, LmData, Seq2SeqData, TaskData, prepare};
use crate::device::DeviceChoice;
use crate::metrics_log::{CsvMetricLogger, plot_curves};
use crate::progress::PlainProgress;
use crate::tasks::{ClassifierTask, LanguageModelTask, NanGuard, Seq2SeqTaskModel};

/// What `efformer train` was asked to do.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The experiment file.
    pub config: PathBuf,
    /// `key.path=value` overrides.
    pub sets: Vec<String>,
    /// Devices (more than one trains data-parallel).
    pub devices: Vec<DeviceChoice>,
    /// Continue from the run directory's last checkpoint.
    pub resume: bool,
    /// Run directory; default `runs/<config file stem>`.
    pub out: Option<PathBuf>,
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
    /// Optimiser steps per epoch.
    pub steps_per_epoch: usize,
    /// Wall time of this process's training, in seconds.
    pub wall_seconds: f64,
    /// Peak resident memory of this process, in bytes (Linux).
    pub peak_memory_bytes: Option<u64>,
    /// Device(s).
    pub device: String,
    /// Validation loss and accuracy of the final model.
    pub valid: EvalResult,
    /// Test loss and accuracy (classification).
    pub test: Option<EvalResult>,
    /// Why training stopped early, if it did.
    pub stopped: Option<String>,
    /// Accuracy of always predicting the most frequent training class (classification).
    pub majority_baseline: Option<f64>,
}

/// Loss and accuracy on a split.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EvalResult {
    /// Mean loss per example (or per token).
    pub loss: f64,
    /// Accuracy (per example, or per token).
    pub accuracy: f64,
    /// Examples (or tokens) evaluated.
    pub count: usize,
}

fn config_error(e: ConfigFileError) -> String {
    e.to_string()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, renamed.
///
/// # Errors
/// If writing or renaming fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// burn-train's file checkpointer, but atomic: a checkpoint is either absent or whole.
pub struct AtomicCheckpointer {
    directory: PathBuf,
    name: String,
}

impl AtomicCheckpointer {
    /// Checkpoints `<directory>/<name>-<epoch>.bpk`.
    pub fn new(directory: &Path, name: &str) -> Self {
        std::fs::create_dir_all(directory).ok();
        Self {
            directory: directory.to_path_buf(),
            name: name.to_string(),
        }
    }

    fn path(&self, epoch: usize) -> PathBuf {
        self.directory.join(format!("{}-{epoch}.bpk", self.name))
    }
}

impl<R: Checkpoint> Checkpointer<R> for AtomicCheckpointer {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        let path = self.path(epoch);
        let tmp = self
            .directory
            .join(format!(".{}-{epoch}.bpk.tmp", self.name));
        record.save(tmp.clone())?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(CheckpointerError::IOError)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        let path = self.path(epoch);
        if path.exists() {
            std::fs::remove_file(path).map_err(CheckpointerError::IOError)?;
        }
        Ok(())
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        R::load(self.path(epoch))
    }
}

/// The latest epoch whose model, optimiser and scheduler checkpoints all exist.
pub fn last_complete_checkpoint(run_dir: &Path) -> Option<usize> {
    let dir = run_dir.join("checkpoint");
    let mut epochs: Vec<usize> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("model-")?
                .strip_suffix(".bpk")?
                .parse()
                .ok()
        })
        .collect();
    epochs.sort_unstable();
    epochs.into_iter().rev().find(|e| {
        ["optim", "scheduler"]
            .iter()
            .all(|n| dir.join(format!("{n}-{e}.bpk")).exists())
    })
}

/// The learning-rate schedule of `[train.schedule]`, as a burn-optim scheduler whose state (the
/// step) is checkpointed.
#[derive(Clone, Debug)]
pub struct Schedule {
    kind: ScheduleSection,
    base: f64,
    d_model: usize,
    total_steps: usize,
    step: usize,
}

impl Schedule {
    /// A schedule over `total_steps` optimiser steps.
    pub fn new(kind: ScheduleSection, base: f64, d_model: usize, total_steps: usize) -> Self {
        Self {
            kind,
            base,
            d_model,
            total_steps: total_steps.max(1),
            step: 0,
        }
    }

    /// The rate at (1-based) step `step`.
    pub fn rate(&self, step: usize) -> f64 {
        let s = step.max(1) as f64;
        match self.kind {
            ScheduleSection::Constant => self.base,
            ScheduleSection::Rsqrt { warmup_steps } => {
                let w = warmup_steps.max(1) as f64;
                self.base * (s / w).min(1.0) / s.max(w).sqrt()
            }
            ScheduleSection::Noam { warmup_steps } => {
                let w = warmup_steps.max(1) as f64;
                self.base * (self.d_model as f64).powf(-0.5) * s.powf(-0.5).min(s * w.powf(-1.5))
            }
            ScheduleSection::WarmupCosine {
                warmup_steps,
                min_lr,
            } => {
                if step <= warmup_steps {
                    self.base * s / warmup_steps.max(1) as f64
                } else {
                    let t = ((step - warmup_steps) as f64
                        / (self.total_steps.saturating_sub(warmup_steps)).max(1) as f64)
                        .min(1.0);
                    min_lr + (self.base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

impl LrScheduler for Schedule {
    fn step(&mut self) -> f64 {
        self.step += 1;
        self.rate(self.step)
    }

    fn to_record(&self) -> LrSchedulerRecord {
        LrSchedulerRecord::new().with_scalar("step", self.step as f64)
    }

    fn load_record(&mut self, record: LrSchedulerRecord) {
        if let Some(step) = record.scalar::<f64>("step") {
            self.step = step as usize;
        }
    }
}

fn optimizer(config: &ExperimentConfig) -> ModuleOptimizer {
    let clip = config
        .train
        .grad_clip_norm
        .map(GradientClippingConfig::Norm);
    match config.train.optimizer {
        OptimizerSection::Adamw {
            beta1,
            beta2,
            epsilon,
            weight_decay,
        } => AdamWConfig::new()
            .with_beta_1(beta1)
            .with_beta_2(beta2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .with_grad_clipping(clip)
            .init(),
        OptimizerSection::Adam {
            beta1,
            beta2,
            epsilon,
            weight_decay,
        } => AdamConfig::new()
            .with_beta_1(beta1)
            .with_beta_2(beta2)
            .with_epsilon(epsilon)
            .with_weight_decay((weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay)))
            .with_grad_clipping(clip)
            .init(),
        OptimizerSection::Sgd {
            momentum,
            weight_decay,
        } => SgdConfig::new()
            .with_momentum((momentum > 0.0).then(|| {
                MomentumConfig::new()
                    .with_momentum(momentum)
                    .with_dampening(0.0)
            }))
            .with_weight_decay((weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay)))
            .with_gradient_clipping(clip)
            .init(),
    }
}

/// Everything a run needs besides the model and data.
struct RunContext {
    config: ExperimentConfig,
    config_dir: PathBuf,
    run_dir: PathBuf,
    devices: Vec<Device>,
    device_names: String,
    resume_from: Option<usize>,
}

impl RunContext {
    fn main_device(&self) -> &Device {
        &self.devices[0]
    }
}

/// The run directory: created, or checked for `--resume`; never overwritten.
fn prepare_run_dir(
    opts: &TrainOptions,
    resolved: &str,
) -> Result<(PathBuf, Option<usize>), String> {
    let run_dir = opts.out.clone().unwrap_or_else(|| {
        let stem = opts
            .config
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("runs").join(stem)
    });
    let saved = run_dir.join("config.toml");
    if opts.resume {
        let previous = std::fs::read_to_string(&saved).map_err(|_| {
            format!(
                "--resume: {} has no config.toml; nothing to resume (start without --resume)",
                run_dir.display()
            )
        })?;
        if previous != resolved {
            return Err(format!(
                "--resume: the resolved configuration differs from {}; resume with the same file and --set values, or use --out for a new run",
                saved.display()
            ));
        }
        let epoch = last_complete_checkpoint(&run_dir);
        match epoch {
            Some(e) => eprintln!("resuming {} after epoch {e}", run_dir.display()),
            None => eprintln!(
                "resuming {}: no complete checkpoint yet, starting from the beginning",
                run_dir.display()
            ),
        }
        Ok((run_dir, epoch))
    } else {
        if run_dir.exists()
            && std::fs::read_dir(&run_dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        {
            return Err(format!(
                "{} already holds a run; pass --resume to continue it or --out DIR for a new one (nothing was changed)",
                run_dir.display()
            ));
        }
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        write_atomic(&saved, resolved.as_bytes())?;
        Ok((run_dir, None))
    }
}

/// `efformer train`.
///
/// # Errors
/// Configuration, data, device or training failures, with a message naming the cause. A run
/// stopped by a non-finite loss is an error too; its last good checkpoint stays.
pub fn train(opts: &TrainOptions) -> Result<RunReport, String> {
    let (config, _) = load(&opts.config, &opts.sets).map_err(config_error)?;
    let resolved = toml::to_string_pretty(&config)
        .map_err(|e| format!("cannot print the configuration: {e}"))?;
    println!(
        "# resolved configuration ({})\n{resolved}",
        opts.config.display()
    );
    validate(&config)?;
    let (run_dir, resume_from) = prepare_run_dir(opts, &resolved)?;
    let devices = if opts.devices.is_empty() {
        vec![DeviceChoice::Flex]
    } else {
        opts.devices.clone()
    };
    let device_names = devices
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let devices = devices
        .iter()
        .map(|d| d.device())
        .collect::<Result<Vec<_>, _>>()?;
    let config_dir = opts.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let data = prepare(&config, &config_dir, &run_dir)?;
    let ctx = RunContext {
        config,
        config_dir,
        run_dir,
        devices,
        device_names,
        resume_from,
    };
    let report = match data {
        TaskData::Class(d) => run_classifier(&ctx, d)?,
        TaskData::Lm(d) => run_lm(&ctx, d)?,
        TaskData::Seq2Seq(d) => run_seq2seq(&ctx, d)?,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    write_atomic(&ctx.run_dir.join("result.json"), json.as_bytes())?;
    println!("{json}");
    match &report.stopped {
        Some(reason) if reason.contains("loss became") => Err(format!(
            "{reason} (run directory {})",
            ctx.run_dir.display()
        )),
        _ => Ok(report),
    }
}

/// Checks the model sections against the task before anything is written.
fn validate(config: &ExperimentConfig) -> Result<(), String> {
    use efficient_attn::AttentionMode;
    let err = |e: models::ModelConfigError| format!("model.{e}");
    match config.task {
        TaskKind::Listops | TaskKind::LraText | TaskKind::TextClassification => {
            config
                .model
                .stack
                .check("encoder", AttentionMode::Bidirectional)
                .map_err(err)?;
        }
        TaskKind::LanguageModel => {
            config
                .model
                .stack
                .check("decoder", AttentionMode::Causal)
                .map_err(err)?;
        }
        TaskKind::Seq2seq => {
            config
                .model
                .stack
                .check("encoder", AttentionMode::Bidirectional)
                .map_err(err)?;
            let decoder = config.model.decoder.as_ref().unwrap_or(&config.model.stack);
            decoder
                .check("decoder", AttentionMode::Causal)
                .map_err(err)?;
            if !config
                .model
                .cross_attention
                .info()
                .supports(AttentionMode::Cross)
            {
                return Err(format!(
                    "model.cross_attention: attention kind \"{}\" has no cross mode",
                    config.model.cross_attention.info().kind
                ));
            }
        }
    }
    if config.train.batch_size == 0 || config.train.epochs == 0 {
        return Err("train.batch_size and train.epochs must be positive".into());
    }
    if config.model.pretrained.is_some() {
        if config.task != TaskKind::TextClassification {
            return Err(format!(
                "model.pretrained: a pretrained encoder needs task = \"text-classification\" \
                 (with the checkpoint's tokenizer), not {:?}",
                config.task
            ));
        }
        // Unset shape fields hold the section's default (no `[model.stack]` table) or the
        // stack's own default (a table with only attention/dropout).
        let stack = &config.model.stack;
        let unset = |defaults: models::StackConfig| models::StackConfig {
            attention: stack.attention.clone(),
            attention_layers: stack.attention_layers.clone(),
            attention_pattern: stack.attention_pattern.clone(),
            dropout: stack.dropout,
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
    }
    Ok(())
}

/// The encoder config of a `model.pretrained` checkpoint with this run's attention, dropout
/// and length.
fn pretrained_encoder(
    ctx: &RunContext,
    vocab_size: usize,
    needed: usize,
) -> Result<Option<(BertCheckpoint, EncoderConfig)>, String> {
    let c = &ctx.config;
    let Some(p) = &c.model.pretrained else {
        return Ok(None);
    };
    let ckpt = BertCheckpoint::open(crate::data::prepare::resolve(&p.dir, &ctx.config_dir))
        .map_err(|e| format!("model.pretrained.dir: {e}"))?;
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

fn embedding(
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

fn attention_kinds(stack: &models::StackConfig) -> Vec<String> {
    stack
        .resolve_attention("model.stack")
        .map(|v| v.iter().map(|c| c.info().kind.to_string()).collect())
        .unwrap_or_default()
}

/// Pads to a fixed length when the model needs one: the grid's size for 2-D layouts, the
/// model's length when a layer's parameters are sized by it (Linformer, Synthesizer);
/// otherwise batches are padded to their longest item.
fn fixed_length(model: &crate::config::ModelSection, max_len: usize) -> Option<usize> {
    if let Some([rows, cols]) = model.grid {
        return Some(rows * cols);
    }
    let sized = attention_kinds(&model.stack)
        .iter()
        .any(|k| k == "linformer" || k == "synthesizer");
    sized.then_some(max_len)
}

fn steps_per_epoch(items: usize, config: &ExperimentConfig) -> usize {
    items
        .div_ceil(config.train.batch_size.max(1))
        .div_ceil(config.train.grad_accumulation.max(1))
}

#[allow(clippy::too_many_arguments)]
fn loaders<I, O>(
    ctx: &RunContext,
    train: Vec<I>,
    valid: Vec<I>,
    batcher: Arc<dyn MakeBatch<I, O>>,
) -> (Arc<dyn DataLoader<O>>, Arc<dyn DataLoader<O>>)
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    let t = &ctx.config.train;
    let first_epoch = ctx.resume_from.unwrap_or(0) + 1;
    let train = EpochLoader::new(
        train,
        batcher.clone(),
        t.batch_size,
        t.seed,
        true,
        true,
        first_epoch,
        ctx.main_device().clone(),
    );
    let valid = EpochLoader::new(
        valid,
        batcher,
        t.eval_batch_size,
        t.seed,
        false,
        false,
        1,
        ctx.main_device().clone(),
    );
    (Arc::new(train), Arc::new(valid))
}

/// Trains `model` with burn-train: optimiser, schedule, metrics, atomic checkpoints, early
/// stopping, resume and the device strategy. Returns the final model (validation mode) and the
/// reason for an early stop.
#[allow(clippy::too_many_arguments)]
fn fit<M: LearnerModel>(
    ctx: &RunContext,
    model: M,
    train: Arc<dyn DataLoader<<M as burn::train::TrainStep>::Input>>,
    valid: Arc<dyn DataLoader<<M as InferenceStep>::Input>>,
    steps_per_epoch: usize,
    d_model: usize,
    pad: Option<usize>,
    interrupter: Interrupter,
) -> Result<(M, Option<String>, f64), String>
where
    <M as burn::train::TrainStep>::Output: burn::train::metric::Adaptor<burn::train::metric::AccuracyInput>
        + burn::train::metric::Adaptor<burn::train::metric::LossInput>
        + burn::train::metric::Adaptor<burn::train::metric::PerplexityInput>,
    <M as InferenceStep>::Output: burn::train::metric::Adaptor<burn::train::metric::AccuracyInput>
        + burn::train::metric::Adaptor<burn::train::metric::LossInput>
        + burn::train::metric::Adaptor<burn::train::metric::PerplexityInput>,
{
    let t = &ctx.config.train;
    let total_steps = steps_per_epoch * t.epochs;
    let schedule = Schedule::new(t.schedule, t.lr, d_model, total_steps);
    let learner = Learner::new(model, optimizer(&ctx.config), schedule);
    let checkpoints = ctx.run_dir.join("checkpoint");
    let csv = CsvMetricLogger::open(&ctx.run_dir.join("metrics.csv"))?;
    let mut training = SupervisedTraining::new(&ctx.run_dir, train, valid)
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
        training = training.renderer(Box::new(PlainProgress::new(Duration::from_secs(10))));
    }
    training = match pad {
        Some(pad) => training.metrics((
            AccuracyMetric::new().with_pad_token(pad),
            LossMetric::new(),
            PerplexityMetric::new().with_pad_token(pad),
        )),
        None => training.metrics((AccuracyMetric::new(), LossMetric::new())),
    };
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
    let stopped = interrupter
        .interruption()
        .and_then(|i| i.reason)
        .or_else(|| {
            interrupter
                .should_stop()
                .then(|| "stopped early".to_string())
        });
    Ok((result.model, stopped, seconds))
}

/// Mean loss and accuracy of `model` over `items`.
fn evaluate<I, O, M>(
    model: &M,
    items: &[I],
    batcher: &dyn MakeBatch<I, O>,
    batch_size: usize,
    device: &Device,
    pad: Option<usize>,
) -> EvalResult
where
    I: Clone,
    M: InferenceStep<Input = O, Output = ClassificationOutput>,
{
    let (mut loss_sum, mut correct, mut count) = (0.0, 0usize, 0usize);
    for chunk in items.chunks(batch_size.max(1)) {
        let out = model.step(batcher.batch(chunk, device));
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
        let counted = targets
            .iter()
            .filter(|t| pad.is_none_or(|p| **t != p as i64))
            .count();
        correct += targets
            .iter()
            .zip(&predicted)
            .filter(|(t, p)| pad.is_none_or(|pd| **t != pd as i64) && t == p)
            .count();
        loss_sum += out.loss.into_scalar::<f64>() * counted as f64;
        count += counted;
    }
    EvalResult {
        loss: loss_sum / count.max(1) as f64,
        accuracy: correct as f64 / count.max(1) as f64,
        count,
    }
}

fn finish(ctx: &RunContext) {
    let csv = ctx.run_dir.join("metrics.csv");
    match plot_curves(&csv, &ctx.run_dir.join("curves.png")) {
        Ok(p) => eprintln!("training curves: {}", p.display()),
        Err(e) => eprintln!("warning: no training curves: {e}"),
    }
}

fn epochs_done(ctx: &RunContext) -> usize {
    last_complete_checkpoint(&ctx.run_dir).unwrap_or(0)
}

fn peak_memory() -> Option<u64> {
    crate::bench::memory_status().map(|(_, hwm)| hwm)
}

fn classifier_config(ctx: &RunContext, d: &ClassData) -> Result<ClassifierConfig, String> {
    let c = &ctx.config;
    let needed = match c.model.grid {
        Some([rows, cols]) if rows * cols < d.max_len => {
            return Err(format!(
                "model.grid = [{rows}, {cols}] holds {} positions but the data has sequences of {} tokens",
                rows * cols,
                d.max_len
            ));
        }
        Some([rows, cols]) => rows * cols,
        None => d.max_len,
    };
    let encoder = match pretrained_encoder(ctx, d.vocab_size, needed)? {
        Some((_, enc)) => enc,
        None => EncoderConfig {
            embedding: embedding(c, d.vocab_size, needed)?,
            stack: c.model.stack.clone(),
        },
    };
    Ok(ClassifierConfig {
        encoder,
        n_classes: d.labels.len(),
        pooling: c.model.pooling,
        dropout: c.model.head_dropout,
    })
}

fn run_classifier(ctx: &RunContext, d: ClassData) -> Result<RunReport, String> {
    let c = &ctx.config;
    let model_config = classifier_config(ctx, &d)?;
    let device = ctx.main_device().clone();
    device.seed(c.train.seed);
    let interrupter = Interrupter::new();
    let ad_device = device.clone().autodiff();
    let mut model = model_config
        .init_sequence(&ad_device)
        .map_err(|e| format!("model.{e}"))?;
    if let Some((ckpt, target)) =
        pretrained_encoder(ctx, d.vocab_size, model_config.encoder.embedding.max_len)?
        && c.model.pretrained.as_ref().map(|p| p.init) == Some(PretrainedInit::Pretrained)
        && ctx.resume_from.is_none()
    {
        let base = ckpt
            .load(&ad_device)
            .map_err(|e| format!("model.pretrained.dir: {e}"))?;
        let (encoder, report) = models::convert(
            base,
            &ckpt.encoder_config(AttentionConfig::default()),
            &target,
            &ad_device,
        )
        .map_err(|e| format!("model.pretrained: {e}"))?;
        model.encoder = encoder;
        eprintln!(
            "pretrained encoder {}: positions {} -> {}, {} layers with global projections copied, {} fresh parameter tensors{}",
            ckpt.dir.display(),
            report.positions.0,
            report.positions.1,
            report.global_copies,
            report.fresh.len(),
            if report.fresh.is_empty() {
                String::new()
            } else {
                format!(" ({})", report.fresh.join(", "))
            }
        );
    }
    let parameters = model.num_params();
    let task = ClassifierTask::new(
        model,
        c.model.global_prefix,
        c.model.grid,
        NanGuard::new(interrupter.clone(), c.train.inject_nan_at_batch),
    );
    let batcher = ClassBatcher {
        pad: d.pad,
        fixed_len: fixed_length(&c.model, model_config.encoder.embedding.max_len),
    };
    let saved = SavedClassifier {
        model: model_config.clone(),
        labels: d.labels.clone(),
        pad: d.pad,
        global_prefix: c.model.global_prefix,
        grid: c.model.grid,
        fixed_len: batcher.fixed_len,
    };
    write_atomic(
        &ctx.run_dir.join("model.json"),
        serde_json::to_string_pretty(&saved)
            .map_err(|e| e.to_string())?
            .as_bytes(),
    )?;
    let majority = {
        let mut counts = vec![0usize; d.labels.len()];
        d.train.iter().for_each(|i| counts[i.label as usize] += 1);
        let top = counts
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .map_or(0, |(i, _)| i);
        d.test.iter().filter(|i| i.label as usize == top).count() as f64
            / d.test.len().max(1) as f64
    };
    eprintln!(
        "task {:?}: {} train / {} valid / {} test examples, vocabulary {}, {} classes, longest {} tokens; {parameters} parameters",
        c.task,
        d.train.len(),
        d.valid.len(),
        d.test.len(),
        d.vocab_size,
        d.labels.len(),
        d.max_len
    );
    let steps = steps_per_epoch(d.train.len(), c);
    let arc: Arc<dyn MakeBatch<ClassItem, ClassBatch>> = Arc::new(batcher.clone());
    let (train, valid) = loaders(ctx, d.train.clone(), d.valid.clone(), arc);
    let (model, stopped, seconds) = fit(
        ctx,
        task,
        train,
        valid,
        steps,
        c.model.stack.d_model,
        None,
        interrupter,
    )?;
    finish(ctx);
    let model = model.valid();
    let eval_device = device.clone().inner();
    let model = model.fork(&eval_device);
    let valid = evaluate(
        &model,
        &d.valid,
        &batcher,
        c.train.eval_batch_size,
        &eval_device,
        None,
    );
    let test = evaluate(
        &model,
        &d.test,
        &batcher,
        c.train.eval_batch_size,
        &eval_device,
        None,
    );
    Ok(RunReport {
        task: c.task,
        attention: attention_kinds(&c.model.stack),
        parameters,
        epochs: epochs_done(ctx),
        steps_per_epoch: steps,
        wall_seconds: seconds,
        peak_memory_bytes: peak_memory(),
        device: ctx.device_names.clone(),
        valid,
        test: Some(test),
        stopped,
        majority_baseline: Some(majority),
    })
}

fn run_lm(ctx: &RunContext, d: LmData) -> Result<RunReport, String> {
    let c = &ctx.config;
    let config = LanguageModelConfig {
        embedding: embedding(c, d.vocab_size, d.seq_len)?,
        stack: c.model.stack.clone(),
        tie_embeddings: c.model.tie_embeddings,
    };
    let device = ctx.main_device().clone();
    device.seed(c.train.seed);
    let interrupter = Interrupter::new();
    let model = config
        .init(&device.clone().autodiff())
        .map_err(|e| format!("model.{e}"))?;
    let parameters = model.num_params();
    let task = LanguageModelTask::new(
        model,
        d.pad as usize,
        NanGuard::new(interrupter.clone(), c.train.inject_nan_at_batch),
    );
    eprintln!(
        "language model: {} train / {} valid windows of {} tokens, vocabulary {}; {parameters} parameters",
        d.train.len(),
        d.valid.len(),
        d.seq_len,
        d.vocab_size
    );
    let batcher = LmBatcher { pad: d.pad };
    let steps = steps_per_epoch(d.train.len(), c);
    let arc: Arc<dyn MakeBatch<_, LmBatch>> = Arc::new(batcher.clone());
    let (train, valid) = loaders(ctx, d.train.clone(), d.valid.clone(), arc);
    let (model, stopped, seconds) = fit(
        ctx,
        task,
        train,
        valid,
        steps,
        c.model.stack.d_model,
        Some(d.pad as usize),
        interrupter,
    )?;
    finish(ctx);
    let eval_device = device.clone().inner();
    let model = model.valid().fork(&eval_device);
    let valid = evaluate(
        &model,
        &d.valid,
        &batcher,
        c.train.eval_batch_size,
        &eval_device,
        Some(d.pad as usize),
    );
    Ok(RunReport {
        task: c.task,
        attention: attention_kinds(&c.model.stack),
        parameters,
        epochs: epochs_done(ctx),
        steps_per_epoch: steps,
        wall_seconds: seconds,
        peak_memory_bytes: peak_memory(),
        device: ctx.device_names.clone(),
        valid,
        test: None,
        stopped,
        majority_baseline: None,
    })
}

fn run_seq2seq(ctx: &RunContext, d: Seq2SeqData) -> Result<RunReport, String> {
    let c = &ctx.config;
    let decoder = c
        .model
        .decoder
        .clone()
        .unwrap_or_else(|| c.model.stack.clone());
    let config = Seq2SeqConfig {
        embedding: embedding(c, d.vocab_size, d.max_len)?,
        encoder: c.model.stack.clone(),
        decoder,
        cross_attention: c.model.cross_attention.clone(),
        tie_embeddings: c.model.tie_embeddings,
    };
    let device = ctx.main_device().clone();
    device.seed(c.train.seed);
    let interrupter = Interrupter::new();
    let model = config
        .init(&device.clone().autodiff())
        .map_err(|e| format!("model.{e}"))?;
    let parameters = model.num_params();
    let task = Seq2SeqTaskModel::new(
        model,
        d.pad as usize,
        NanGuard::new(interrupter.clone(), c.train.inject_nan_at_batch),
    );
    let batcher = Seq2SeqBatcher { pad: d.pad };
    let steps = steps_per_epoch(d.train.len(), c);
    let arc: Arc<dyn MakeBatch<_, Seq2SeqBatch>> = Arc::new(batcher.clone());
    let (train, valid) = loaders(ctx, d.train.clone(), d.valid.clone(), arc);
    let (model, stopped, seconds) = fit(
        ctx,
        task,
        train,
        valid,
        steps,
        c.model.stack.d_model,
        Some(d.pad as usize),
        interrupter,
    )?;
    finish(ctx);
    let eval_device = device.clone().inner();
    let model = model.valid().fork(&eval_device);
    let valid = evaluate(
        &model,
        &d.valid,
        &batcher,
        c.train.eval_batch_size,
        &eval_device,
        Some(d.pad as usize),
    );
    Ok(RunReport {
        task: c.task,
        attention: attention_kinds(&c.model.stack),
        parameters,
        epochs: epochs_done(ctx),
        steps_per_epoch: steps,
        wall_seconds: seconds,
        peak_memory_bytes: peak_memory(),
        device: ctx.device_names.clone(),
        valid,
        test: None,
        stopped,
        majority_baseline: None,
    })
}

/// The error of a checkpoint whose tensors do not fit the configured model.
fn does_not_fit(checkpoint: &Path, e: impl std::fmt::Display) -> String {
    format!(
        "checkpoint {} does not fit this configuration's model: {e}",
        checkpoint.display()
    )
}

/// `efformer eval`: the test (and validation) loss and accuracy of a checkpoint.
///
/// # Errors
/// Configuration, data or checkpoint problems, naming the file.
pub fn eval(
    config_path: &Path,
    sets: &[String],
    checkpoint: &Path,
    device: DeviceChoice,
) -> Result<(EvalResult, Option<EvalResult>), String> {
    let (config, _) = load(config_path, sets).map_err(config_error)?;
    let dev = device.device()?;
    let config_dir = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    // A trained tokenizer lives in the run directory (`<run>/checkpoint/model-N.bpk`).
    let run_dir = checkpoint
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let scratch = std::env::temp_dir().join(format!("efformer-eval-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let mut config = config;
    for section in [&mut config.text.tokenizer, &mut config.lm.tokenizer] {
        let saved = run_dir.join("tokenizer.json");
        if section.file.is_none() && saved.exists() {
            section.file = Some(saved);
        }
    }
    let data = prepare(&config, &config_dir, &scratch)?;
    std::fs::remove_dir_all(&scratch).ok();
    let record = ModuleRecord::load(checkpoint)
        .map_err(|e| format!("cannot load checkpoint {}: {e}", checkpoint.display()))?;
    let ctx = RunContext {
        config: config.clone(),
        config_dir: config_dir.clone(),
        run_dir,
        devices: vec![dev.clone()],
        device_names: device.to_string(),
        resume_from: None,
    };
    match data {
        TaskData::Class(d) => {
            let mc = classifier_config(&ctx, &d)?;
            let model = mc.init_sequence(&dev).map_err(|e| format!("model.{e}"))?;
            let task = ClassifierTask::new(
                model,
                config.model.global_prefix,
                config.model.grid,
                NanGuard::default(),
            )
            .try_load_record(record)
            .map_err(|e| does_not_fit(checkpoint, e))?;
            let batcher = ClassBatcher {
                pad: d.pad,
                fixed_len: fixed_length(&config.model, mc.encoder.embedding.max_len),
            };
            let test = evaluate(
                &task,
                &d.test,
                &batcher,
                config.train.eval_batch_size,
                &dev,
                None,
            );
            let valid = evaluate(
                &task,
                &d.valid,
                &batcher,
                config.train.eval_batch_size,
                &dev,
                None,
            );
            Ok((test, Some(valid)))
        }
        TaskData::Lm(d) => {
            let lc = LanguageModelConfig {
                embedding: embedding(&config, d.vocab_size, d.seq_len)?,
                stack: config.model.stack.clone(),
                tie_embeddings: config.model.tie_embeddings,
            };
            let model = lc.init(&dev).map_err(|e| format!("model.{e}"))?;
            let task = LanguageModelTask::new(model, d.pad as usize, NanGuard::default())
                .try_load_record(record)
                .map_err(|e| does_not_fit(checkpoint, e))?;
            let valid = evaluate(
                &task,
                &d.valid,
                &LmBatcher { pad: d.pad },
                config.train.eval_batch_size,
                &dev,
                Some(d.pad as usize),
            );
            Ok((valid, None))
        }
        TaskData::Seq2Seq(d) => {
            let decoder = config
                .model
                .decoder
                .clone()
                .unwrap_or_else(|| config.model.stack.clone());
            let sc = Seq2SeqConfig {
                embedding: embedding(&config, d.vocab_size, d.max_len)?,
                encoder: config.model.stack.clone(),
                decoder,
                cross_attention: config.model.cross_attention.clone(),
                tie_embeddings: config.model.tie_embeddings,
            };
            let model = sc.init(&dev).map_err(|e| format!("model.{e}"))?;
            let task = Seq2SeqTaskModel::new(model, d.pad as usize, NanGuard::default())
                .try_load_record(record)
                .map_err(|e| does_not_fit(checkpoint, e))?;
            let valid = evaluate(
                &task,
                &d.valid,
                &Seq2SeqBatcher { pad: d.pad },
                config.train.eval_batch_size,
                &dev,
                Some(d.pad as usize),
            );
            Ok((valid, None))
        }
    }
}
