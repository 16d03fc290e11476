//! `efformer train` and `efformer eval`: an experiment file in, a run directory (or a report)
//! out. The steps are the same for every task: load and validate the configuration, check the
//! run directory, prepare the data (artifacts such as a trained tokenizer go to a scratch
//! directory), check the model configuration against the data, and only then create the run
//! directory and run [`tasks::run`] (or [`tasks::evaluate_checkpoint`]) with the task the data
//! belongs to. Bad input therefore leaves nothing behind.

use std::path::{Path, PathBuf};

use crate::config::load::load;
use crate::config::{ExperimentConfig, TaskKind};
use crate::data::prepare::{TaskData, prepare};
use crate::device::DeviceChoice;
use crate::fit::{RunContext, StopReason};
use crate::run_dir::{RunDir, run_dir_of, write_atomic};
use crate::tasks::{
    self, ClassificationTask, EvalReport, LanguageModelTask, RunReport, Seq2SeqTask, SetMaxTask,
    Task,
};

/// What `efformer train` was asked to do.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The experiment file.
    pub config: PathBuf,
    /// `key.path=value` overrides.
    pub sets: Vec<String>,
    /// Devices (more than one trains data-parallel).
    pub devices: Vec<DeviceChoice>,
    /// Continue from the run directory's last complete checkpoint.
    pub resume: bool,
    /// Run directory; default `runs/<config file stem>`.
    pub out: Option<PathBuf>,
}

/// Checks the configuration against its task before anything is written.
///
/// # Errors
/// The key and what was expected.
pub fn validate(config: &ExperimentConfig) -> Result<(), String> {
    if config.model.compressive.is_some() && config.task != TaskKind::LanguageModel {
        return Err(
            "model.compressive: a compressed memory belongs to language models read as \
             streams (task = \"language-model\", lm.mode = \"stream\")"
                .into(),
        );
    }
    if config.model.funnel.is_some()
        && !matches!(
            config.task,
            TaskKind::Listops | TaskKind::LraText | TaskKind::TextClassification
        )
    {
        return Err(
            "model.funnel: a funnel pools a classifier's encoder (task = \"text-classification\", \
             \"lra-text\" or \"listops\")"
                .into(),
        );
    }
    match config.task {
        TaskKind::Listops | TaskKind::LraText | TaskKind::TextClassification => {
            ClassificationTask::check_config(config)?;
        }
        TaskKind::LanguageModel => LanguageModelTask::check_config(config)?,
        TaskKind::Seq2seq => Seq2SeqTask::check_config(config)?,
        TaskKind::SetMax => SetMaxTask::check_config(config)?,
    }
    if config.model.set.is_some() && config.task != TaskKind::SetMax {
        return Err("model.set: a set model belongs to the set tasks (task = \"set-max\")".into());
    }
    if config.train.batch_size == 0 || config.train.epochs == 0 {
        return Err("train.batch_size and train.epochs must be positive".into());
    }
    Ok(())
}

/// Runs the task `data` belongs to.
fn run_task(
    ctx: &RunContext,
    data: TaskData,
    open: impl FnOnce() -> Result<(), String>,
) -> Result<RunReport, String> {
    match data {
        TaskData::Class(d) => checked_run(ctx, &ClassificationTask::new(d), open),
        TaskData::Lm(d) => checked_run(ctx, &LanguageModelTask::new(d, &ctx.config), open),
        TaskData::Seq2Seq(d) => checked_run(ctx, &Seq2SeqTask::new(d), open),
        TaskData::Set(d) => checked_run(ctx, &SetMaxTask::new(d), open),
    }
}

/// The task's model configuration is checked against its data (lengths, classes, pretrained
/// files) and the model built once (every layer's own checks) before `open` creates the run
/// directory; then the run.
fn checked_run<T: Task>(
    ctx: &RunContext,
    task: &T,
    open: impl FnOnce() -> Result<(), String>,
) -> Result<RunReport, String> {
    let model_config = task.model_config(ctx)?;
    drop(task.build(&model_config, ctx.main_device(), tasks::NanGuard::default())?);
    open()?;
    tasks::run(ctx, task)
}

/// Evaluates `checkpoint` with the task `data` belongs to.
fn evaluate_task(
    ctx: &RunContext,
    data: TaskData,
    checkpoint: &Path,
) -> Result<EvalReport, String> {
    match data {
        TaskData::Class(d) => {
            tasks::evaluate_checkpoint(ctx, &ClassificationTask::new(d), checkpoint)
        }
        TaskData::Lm(d) => {
            tasks::evaluate_checkpoint(ctx, &LanguageModelTask::new(d, &ctx.config), checkpoint)
        }
        TaskData::Seq2Seq(d) => tasks::evaluate_checkpoint(ctx, &Seq2SeqTask::new(d), checkpoint),
        TaskData::Set(d) => tasks::evaluate_checkpoint(ctx, &SetMaxTask::new(d), checkpoint),
    }
}

/// `efformer train`.
///
/// # Errors
/// Configuration, data, device or training failures, with a message naming the cause. A run
/// stopped by a non-finite loss is an error too; its last good checkpoint stays.
pub fn train(opts: &TrainOptions) -> Result<RunReport, String> {
    let (config, _) = load(&opts.config, &opts.sets).map_err(|e| e.to_string())?;
    let resolved = toml::to_string_pretty(&config)
        .map_err(|e| format!("cannot print the configuration: {e}"))?;
    println!(
        "# resolved configuration ({})\n{resolved}",
        opts.config.display()
    );
    validate(&config)?;
    let path = opts.out.clone().unwrap_or_else(|| {
        let stem = opts
            .config
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("runs").join(stem)
    });
    let pending = RunDir::check(path, &resolved, opts.resume)?;
    let choices = if opts.devices.is_empty() {
        vec![DeviceChoice::Flex]
    } else {
        opts.devices.clone()
    };
    let device_names = choices
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let devices = choices
        .iter()
        .map(|d| d.device())
        .collect::<Result<Vec<_>, _>>()?;
    let config_dir = opts.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let scratch = Scratch::new()?;
    let data = prepare(&config, &config_dir, &scratch.0)?;
    let ctx = RunContext {
        config,
        config_dir,
        run_dir: pending.path().to_path_buf(),
        devices,
        device_names,
        resume_from: pending.resume_from(),
    };
    let report = run_task(&ctx, data, || pending.create()?.adopt(&scratch.0))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    write_atomic(&ctx.run_dir.join("result.json"), json.as_bytes())?;
    println!("{json}");
    match &report.stopped {
        Some(reason @ StopReason::NonFiniteLoss { .. }) => Err(format!(
            "{reason} (run directory {})",
            ctx.run_dir.display()
        )),
        _ => Ok(report),
    }
}

/// `efformer eval`: the validation (and test) loss and accuracy of a checkpoint.
///
/// # Errors
/// Configuration, data or checkpoint problems, naming the file.
pub fn eval(
    config_path: &Path,
    sets: &[String],
    checkpoint: &Path,
    device: DeviceChoice,
) -> Result<EvalReport, String> {
    let (mut config, _) = load(config_path, sets).map_err(|e| e.to_string())?;
    validate(&config)?;
    let dev = device.device()?;
    let config_dir = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    // A trained tokenizer lives in the run directory (`<run>/checkpoint/model-N.bpk`).
    let run_dir = run_dir_of(checkpoint);
    for section in [&mut config.text.tokenizer, &mut config.lm.tokenizer] {
        let saved = run_dir.join("tokenizer.json");
        if section.file.is_none() && saved.exists() {
            section.file = Some(saved);
        }
    }
    let scratch = Scratch::new()?;
    let data = prepare(&config, &config_dir, &scratch.0);
    drop(scratch);
    let ctx = RunContext {
        config,
        config_dir,
        run_dir,
        devices: vec![dev],
        device_names: device.to_string(),
        resume_from: None,
    };
    evaluate_task(&ctx, data?, checkpoint)
}

/// A temporary directory for what data preparation writes (a trained tokenizer), removed when
/// dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self, String> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "efformer-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
