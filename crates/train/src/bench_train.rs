//! `efformer bench-train`: whole training steps of a fixed small model, for comparison with
//! `../shared/notes/perf/train_step_bench.py` (the same model in PyTorch).
//!
//! The model: vocabulary 256, learned positions, 4 pre-LN encoder layers (d_model 256, 4 heads
//! of 64, feed-forward 1,024 with GELU; `--layers` and `--reversible` change the depth and make
//! the blocks reversible, trained through a [`ReversibleTape`] as `efformer train` does), a
//! final norm, mean pooling, a linear layer to 10 classes, cross-entropy; batch 8, no dropout. A step is forward, backward and an AdamW
//! (lr 1e-4) update. Each `(attention, N)` runs in its own process (`efformer
//! bench-train-case`, hidden) so that its peak memory is its own; after one warm-up step the
//! median of `steps` steps is reported, as wall time and tokens per second.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor};
use efficient_attn::WithExtras;
use models::{
    ClassifierConfig, EmbeddingSettings, EncoderConfig, EncoderInput, FeedForwardKind, NormKind,
    NormPlacement, Pooling, PositionKind, ReversibleTape, StackConfig,
};
use serde::{Deserialize, Serialize};

use crate::bench::{config_for_length, memory_status};
use crate::config::load::model_error;
use crate::device::DeviceChoice;

/// Sequences per step.
pub const BATCH: usize = 8;

/// The encoder's depth, wiring and dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Depth {
    /// Layers.
    pub layers: usize,
    /// Reversible blocks.
    pub reversible: bool,
    /// Dropout in the stack (0 as `train_step_bench.py`).
    pub dropout: f64,
}

impl Default for Depth {
    fn default() -> Self {
        Self {
            layers: 4,
            reversible: false,
            dropout: 0.0,
        }
    }
}

/// One measured training-step configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainStepRecord {
    /// Attention kind.
    pub attention: String,
    /// Sequence length.
    pub n: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Encoder layers.
    #[serde(default = "four")]
    pub layers: usize,
    /// Reversible blocks.
    #[serde(default)]
    pub reversible: bool,
    /// Dropout in the stack.
    #[serde(default)]
    pub dropout: f64,
    /// Median step time in milliseconds.
    pub median_ms: f64,
    /// Tokens (batch · n) per second at the median.
    pub tokens_per_s: f64,
    /// Peak resident memory of the process, in bytes.
    pub peak_bytes: Option<u64>,
    /// Parameters.
    pub parameters: usize,
    /// Device.
    pub device: String,
}

fn four() -> usize {
    4
}

/// The model of `train_step_bench.py` with `kind` attention at length `n`.
fn model_config(kind: &str, n: usize, depth: Depth) -> Result<ClassifierConfig, String> {
    Ok(ClassifierConfig {
        encoder: EncoderConfig {
            embedding: EmbeddingSettings {
                vocab_size: 256,
                max_len: n,
                positions: PositionKind::Learned,
                type_vocab_size: 0,
                norm: false,
                norm_eps: 1e-12,
                dropout: 0.0,
            },
            stack: StackConfig {
                n_layers: depth.layers,
                d_model: 256,
                n_heads: 4,
                d_ff: 1024,
                dropout: depth.dropout,
                norm: NormKind::LayerNorm,
                placement: NormPlacement::Pre,
                norm_eps: 1e-5,
                feed_forward: FeedForwardKind::Gelu,
                ffn: models::FfnConfig::Dense,
                attention: config_for_length(kind, n)?,
                attention_layers: None,
                attention_pattern: None,
                ff_chunks: 1,
                reversible: depth.reversible,
            },
            funnel: None,
        },
        n_classes: 10,
        pooling: Pooling::Mean,
        dropout: 0.0,
    })
}

/// One configuration in this process (what `efformer bench-train-case` runs).
///
/// # Errors
/// An unknown kind or an invalid model.
pub fn run_case(
    kind: &str,
    n: usize,
    depth: Depth,
    steps: usize,
    device: &Device,
) -> Result<TrainStepRecord, String> {
    let device = device.clone().autodiff();
    device.seed(0);
    let config = model_config(kind, n, depth)?;
    let mut model = config
        .init_sequence(&device)
        .map_err(|e| model_error(e, &[("encoder", "stack")]))?;
    let parameters = model.num_params();
    let mut optim = AdamWConfig::new().init();
    let tokens: Tensor<2, Int> =
        Tensor::<2>::random([BATCH, n], Distribution::Uniform(0.0, 255.99), &device).int();
    let labels: Tensor<1, Int> =
        Tensor::<1>::random([BATCH], Distribution::Uniform(0.0, 9.99), &device).int();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut step = || {
        let start = Instant::now();
        let tape = ReversibleTape::default();
        let logits = model.forward(EncoderInput::new(tokens.clone()).with_side(tape.clone()));
        let loss = loss_fn.forward(logits, labels.clone());
        let grads: GradientsParams = tape.gradients(loss.backward(), &model);
        model = optim.step(1e-4, model.clone(), grads);
        // Reading a parameter forces lazy backends to finish the update.
        let _ = model
            .valid()
            .output
            .weight
            .val()
            .narrow(0, 0, 1)
            .sum()
            .into_scalar::<f32>();
        start.elapsed().as_secs_f64() * 1e3
    };
    step(); // warm-up
    let mut times: Vec<f64> = (0..steps.max(1)).map(|_| step()).collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(TrainStepRecord {
        attention: kind.to_string(),
        n,
        batch: BATCH,
        layers: depth.layers,
        reversible: depth.reversible,
        dropout: depth.dropout,
        median_ms: median,
        tokens_per_s: (BATCH * n) as f64 / (median / 1e3),
        peak_bytes: memory_status().map(|(_, hwm)| hwm),
        parameters,
        device: format!("{device:?}"),
    })
}

/// Every `(kind, n)` in its own process, printing progress to stderr.
///
/// # Errors
/// If the binary cannot be started.
pub fn run_all(
    kinds: &[String],
    lengths: &[usize],
    depths: &[Depth],
    steps: usize,
    device: DeviceChoice,
) -> Result<Vec<TrainStepRecord>, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the efformer binary: {e}"))?;
    let mut records = Vec::new();
    for &n in lengths {
        for depth in depths {
            for kind in kinds {
                let layers = depth.layers.to_string();
                eprint!(
                    "{kind} n={n} layers={layers}{} ... ",
                    if depth.reversible { " reversible" } else { "" }
                );
                let mut args = vec!["bench-train-case", "--attention", kind, "--layers", &layers];
                if depth.reversible {
                    args.push("--reversible");
                }
                let (n_text, steps_text, device_text) =
                    (n.to_string(), steps.to_string(), device.to_string());
                args.extend([
                    "--n",
                    &n_text,
                    "--steps",
                    &steps_text,
                    "--device",
                    &device_text,
                ]);
                match crate::bench::run_in_process::<TrainStepRecord, _, _>(&exe, &args)? {
                    Ok(r) => {
                        eprintln!(
                            "{:.0} ms/step, {:.0} tokens/s, peak {:.0} MiB",
                            r.median_ms,
                            r.tokens_per_s,
                            r.peak_bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64
                        );
                        records.push(r);
                    }
                    Err(failure) => eprintln!("{failure}"),
                }
            }
        }
    }
    Ok(records)
}
