//! End-to-end tests of the `efformer` binary and its library on tiny configurations: config
//! errors, every shipped config parses, training writes a complete run, resume after SIGKILL
//! reproduces an uninterrupted run, NaN stops cleanly, multi-device, eval, the other tasks.

mod cli;
mod configs;
mod generate;
mod longdoc;
mod robustness;
mod training;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh temporary directory for one test, removed when the test ends (runs here hold
/// checkpoints of hundreds of megabytes; leaving them behind filled the disk).
pub fn temp_dir(name: &str) -> TestDir {
    TestDir(
        tempfile::Builder::new()
            .prefix(&format!("efformer-it-{name}-"))
            .tempdir()
            .unwrap(),
    )
}

/// A test's directory: a [`Path`] that is removed on drop.
pub struct TestDir(tempfile::TempDir);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// The workspace root (configs, shared data paths are relative to it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Runs `efformer` with `args` in `dir`.
pub fn efformer(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_efformer"))
        .args(args)
        .current_dir(dir)
        .env("BURN_DEVICE", "flex")
        .output()
        .expect("efformer runs")
}

/// Stdout and stderr of a run, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A tiny ListOps experiment: seconds per epoch on one core.
pub const TINY_LISTOPS: &str = r#"
task = "listops"
[listops]
max_depth = 3
max_args = 3
min_length = 4
max_length = 24
train = 256
valid = 64
test = 64
seed = 3
[model]
head_dropout = 0.1
[model.embedding]
dropout = 0.1
[model.stack]
n_layers = 1
d_model = 16
n_heads = 2
d_ff = 32
dropout = 0.1
[model.stack.attention]
kind = "performer"
features = 16
[train]
epochs = 3
batch_size = 16
eval_batch_size = 64
lr = 3e-3
seed = 7
[train.schedule]
kind = "warmup-cosine"
warmup_steps = 10
"#;
