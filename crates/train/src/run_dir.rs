//! The run directory: created once and never overwritten, checked for `--resume`, and written
//! atomically (a file or checkpoint is either absent or whole).
//!
//! It holds `config.toml` (the resolved configuration), `tokenizer.json` (when one was trained
//! or loaded), `model.json` (classifiers), `checkpoint/{model,optim,scheduler}-<epoch>.bpk`,
//! `metrics.csv`, `curves.png`, `result.json` and burn-train's own logs.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError};

/// `module` with the parameters of the model checkpoint `checkpoint`; `fits` names what the
/// checkpoint must fit (a configuration or a saved model description) in the error.
///
/// # Errors
/// A checkpoint that cannot be read, or does not fit `module`, naming the file.
pub fn load_checkpoint<M: Module>(module: M, checkpoint: &Path, fits: &str) -> Result<M, String> {
    let record = ModuleRecord::load(checkpoint)
        .map_err(|e| format!("cannot load checkpoint {}: {e}", checkpoint.display()))?;
    module.try_load_record(record).map_err(|e| {
        format!(
            "checkpoint {} does not fit {fits}: {e}",
            checkpoint.display()
        )
    })
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

/// The model checkpoint of `epoch` in `run_dir`: `<run>/checkpoint/model-<epoch>.bpk`.
pub fn checkpoint_file(run_dir: &Path, epoch: usize) -> PathBuf {
    run_dir
        .join("checkpoint")
        .join(format!("model-{epoch}.bpk"))
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

/// The run directory of a checkpoint `<run>/checkpoint/model-<epoch>.bpk`.
pub fn run_dir_of(checkpoint: &Path) -> PathBuf {
    checkpoint
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A run directory ready for training: created with the resolved configuration, or (with
/// `--resume`) checked against it, with the epoch to resume after.
#[derive(Clone, Debug)]
pub struct RunDir {
    /// The directory.
    pub path: PathBuf,
    /// The last complete checkpoint when resuming.
    pub resume_from: Option<usize>,
}

impl RunDir {
    /// Creates `path` (which must be empty or absent) and writes `config.toml`, or, when
    /// `resume`, checks that `path` holds a run of the same resolved configuration.
    ///
    /// # Errors
    /// A run directory that already holds a run (without `resume`), a resolved configuration
    /// that differs from the saved one, or an I/O error; nothing is changed then.
    pub fn open(path: PathBuf, resolved: &str, resume: bool) -> Result<Self, String> {
        Self::check(path, resolved, resume)?.create()
    }

    /// [`open`](Self::open)'s checks without writing anything: what [`create`](PendingRunDir::create)
    /// then makes, once everything else about the run has been validated too.
    ///
    /// # Errors
    /// As [`open`](Self::open)'s checks.
    pub fn check(path: PathBuf, resolved: &str, resume: bool) -> Result<PendingRunDir, String> {
        let saved = path.join("config.toml");
        if resume {
            let previous = std::fs::read_to_string(&saved).map_err(|_| {
                format!(
                    "--resume: {} has no config.toml; nothing to resume (start without --resume)",
                    path.display()
                )
            })?;
            if previous != resolved {
                return Err(format!(
                    "--resume: the resolved configuration differs from {}; resume with the same file and --set values, or use --out for a new run",
                    saved.display()
                ));
            }
            let epoch = last_complete_checkpoint(&path);
            match epoch {
                Some(e) => eprintln!("resuming {} after epoch {e}", path.display()),
                None => eprintln!(
                    "resuming {}: no complete checkpoint yet, starting from the beginning",
                    path.display()
                ),
            }
            return Ok(PendingRunDir {
                dir: Self {
                    path,
                    resume_from: epoch,
                },
                config: None,
            });
        }
        if path.exists()
            && std::fs::read_dir(&path)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        {
            return Err(format!(
                "{} already holds a run; pass --resume to continue it or --out DIR for a new one (nothing was changed)",
                path.display()
            ));
        }
        Ok(PendingRunDir {
            dir: Self {
                path,
                resume_from: None,
            },
            config: Some(resolved.to_string()),
        })
    }

    /// Moves every file of `scratch` (artifacts made while preparing the data, such as a
    /// trained tokenizer) into this directory, replacing files of the same name.
    ///
    /// # Errors
    /// An I/O error, naming the file.
    pub fn adopt(&self, scratch: &Path) -> Result<(), String> {
        let entries = std::fs::read_dir(scratch)
            .map_err(|e| format!("cannot read {}: {e}", scratch.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let to = self.path.join(entry.file_name());
            let from = entry.path();
            if std::fs::rename(&from, &to).is_err() {
                std::fs::copy(&from, &to)
                    .map_err(|e| format!("cannot write {}: {e}", to.display()))?;
            }
        }
        Ok(())
    }

    /// Epochs completed so far (the last complete checkpoint).
    pub fn epochs_done(&self) -> usize {
        last_complete_checkpoint(&self.path).unwrap_or(0)
    }
}

/// A checked run directory not yet written: [`create`](Self::create) makes it.
#[derive(Clone, Debug)]
pub struct PendingRunDir {
    dir: RunDir,
    /// The resolved configuration to write, for a new run.
    config: Option<String>,
}

impl PendingRunDir {
    /// The directory (not yet created for a new run).
    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    /// The last complete checkpoint when resuming.
    pub fn resume_from(&self) -> Option<usize> {
        self.dir.resume_from
    }

    /// Creates the directory and writes `config.toml` (a new run), or hands back the checked
    /// one (a resumed run).
    ///
    /// # Errors
    /// An I/O error, naming the path.
    pub fn create(self) -> Result<RunDir, String> {
        if let Some(resolved) = &self.config {
            let path = &self.dir.path;
            std::fs::create_dir_all(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            write_atomic(&path.join("config.toml"), resolved.as_bytes())?;
        }
        Ok(self.dir)
    }
}
