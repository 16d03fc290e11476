//! Causal language modelling on text windows.

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use burn::train::ClassificationOutput;
use efficient_attn::{AttentionMode, Extras};
use models::{LanguageModel, LanguageModelConfig, ReversibleTape, SegmentMemory};

use super::{NanGuard, Splits, StepClock, Task, embedding, token_output};
use serde::{Deserialize, Serialize};

use crate::config::load::model_error;
use crate::config::{ExperimentConfig, LmMode, TextEncoding};
use crate::data::batching::Batching;
use crate::data::loader::{LmBatch, LmBatcher, LmItem, MakeBatch};
use crate::data::prepare::LmData;
use crate::fit::RunContext;
use crate::run_dir::write_atomic;

/// A language model with its loss (per token, ignoring padding).
#[derive(Module, Debug)]
pub struct LanguageModelWithLoss {
    /// The model.
    pub model: LanguageModel,
    /// Padding id (ignored by the loss and metrics).
    pub pad: usize,
    #[module(skip)]
    guard: NanGuard,
    #[module(skip)]
    clock: StepClock,
    #[module(skip)]
    stream: Option<Arc<StreamMemory>>,
}

/// Stream mode's memories (`[lm] mode = "stream"`): what each layer remembers of its streams'
/// previous segments, one for training and one for evaluation, each reset when an epoch's
/// segments are done. Batches arrive in order (segment t of every stream), so batch t + 1
/// continues batch t.
#[derive(Debug)]
pub struct StreamMemory {
    settings: StreamSettings,
    train: Mutex<(SegmentMemory, usize)>,
    eval: Mutex<(SegmentMemory, usize)>,
}

/// How much a stream-mode model remembers and how many segments an epoch has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSettings {
    /// Positions remembered in training.
    pub mem_len: usize,
    /// Positions remembered in evaluation.
    pub eval_mem_len: usize,
    /// Batches (segments per stream) of a training epoch.
    pub train_batches: usize,
    /// Batches of an evaluation pass.
    pub eval_batches: usize,
}

impl StreamMemory {
    /// Empty memories.
    pub fn new(settings: StreamSettings) -> Self {
        Self {
            settings,
            train: Mutex::new((SegmentMemory::default(), 0)),
            eval: Mutex::new((SegmentMemory::default(), 0)),
        }
    }

    /// The logits of the next segment of every stream, after the memory of the previous ones
    /// (a training forward on an autodiff device, an evaluation one otherwise), and a
    /// compressed memory's reconstruction loss (training).
    fn forward(
        &self,
        model: &LanguageModel,
        tokens: Tensor<2, Int>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let training = tokens.device().is_autodiff();
        let (state, mem_len, per_epoch) = if training {
            (
                &self.train,
                self.settings.mem_len,
                self.settings.train_batches,
            )
        } else {
            (
                &self.eval,
                self.settings.eval_mem_len,
                self.settings.eval_batches,
            )
        };
        let mut state = state.lock().expect("stream memory lock");
        if state.1 % per_epoch.max(1) == 0 {
            state.0 = SegmentMemory::default();
        }
        let segment = model.forward_segment(tokens, None, &state.0, mem_len);
        *state = (segment.memory, state.1 + 1);
        (segment.logits, segment.reconstruction)
    }
}

impl LanguageModelWithLoss {
    /// Wraps a language model.
    pub fn new(model: LanguageModel, pad: usize, guard: NanGuard) -> Self {
        Self {
            model,
            pad,
            guard,
            clock: StepClock::default(),
            stream: None,
        }
    }

    /// This model reading its batches as streams with `memory` (`StreamMemory`).
    pub fn with_stream(mut self, memory: StreamMemory) -> Self {
        self.stream = Some(Arc::new(memory));
        self
    }

    /// Loss and flattened logits of a batch.
    pub fn forward(&self, batch: LmBatch) -> ClassificationOutput {
        self.forward_taped(batch, None).scored.classes()
    }

    /// [`forward`](Self::forward), a reversible decoder recording on `tape` (training).
    pub fn forward_taped(&self, batch: LmBatch, tape: Option<ReversibleTape>) -> super::StepOutput {
        let mut extras = Extras {
            mask_pad: Some(batch.mask_pad),
            ..Default::default()
        };
        if let Some(tape) = tape {
            extras.side.insert(tape);
        }
        let (logits, reconstruction) = match &self.stream {
            Some(stream) => stream.forward(&self.model, batch.inputs),
            None => (self.model.forward_extras(batch.inputs, extras), None),
        };
        let aux = self.model.aux_terms(&logits.device());
        let mut out = token_output(logits, batch.targets, self.pad);
        out.loss = super::with_aux(super::with_aux(out.loss, aux.loss), reconstruction);
        super::StepOutput {
            scored: out.into(),
            routing: aux.routing,
        }
    }
}

burn_train_steps!(LanguageModelWithLoss, LmBatch);

/// What `efformer generate` needs besides a checkpoint: the model's configuration and how text
/// becomes ids (`<run>/model.json`; a tokenizer, if any, is `<run>/tokenizer.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedLanguageModel {
    /// The model.
    pub model: LanguageModelConfig,
    /// Padding id.
    pub pad: u32,
    /// Bytes or the run's tokenizer.
    pub encoding: TextEncoding,
    /// The training window (tokens).
    pub seq_len: usize,
}

/// Language modelling over prepared [`LmData`].
pub struct LanguageModelTask {
    data: LmData,
    stream: Option<StreamSettings>,
}

impl LanguageModelTask {
    /// The task over `data`, read as `config.lm.mode` says.
    pub fn new(data: LmData, config: &ExperimentConfig) -> Self {
        let lm = &config.lm;
        let stream = (lm.mode == LmMode::Stream).then(|| {
            let mem_len = lm.mem_len.unwrap_or(lm.seq_len);
            StreamSettings {
                mem_len,
                eval_mem_len: lm.eval_mem_len.unwrap_or(mem_len),
                train_batches: data.train.len() / config.train.batch_size.max(1),
                eval_batches: data.valid.len() / config.train.eval_batch_size.max(1),
            }
        });
        Self { data, stream }
    }

    /// Checks the model sections before anything is written: a causal stack.
    ///
    /// # Errors
    /// The key and what was expected.
    pub fn check_config(config: &ExperimentConfig) -> Result<(), String> {
        config
            .model
            .stack
            .check("decoder", AttentionMode::Causal)
            .map_err(|e| model_error(e, &[("decoder", "stack")]))?;
        if config.lm.mode == LmMode::Stream {
            if config.train.batching != Batching::InOrder {
                return Err(
                    "train.batching.kind: lm.mode = \"stream\" needs \"in-order\" (a stream's \
                     segments must follow one another)"
                        .into(),
                );
            }
            if config.model.stack.reversible {
                return Err(
                    "model.stack.reversible: lm.mode = \"stream\" needs a sequential stack (a \
                     reversible block's halves have no single input to remember)"
                        .into(),
                );
            }
            if config.lm.mem_len == Some(0) {
                return Err("lm.mem_len: expected a positive number of positions, got 0".into());
            }
        }
        if let Some(compressive) = &config.model.compressive {
            if config.lm.mode != LmMode::Stream {
                return Err(
                    "model.compressive: a compressed memory needs lm.mode = \"stream\" \
                            (it holds what segments of a stream evicted from their memory)"
                        .into(),
                );
            }
            compressive
                .check("model.compressive")
                .map_err(|e| format!("{}: {}", e.path, e.message))?;
        }
        super::check_grid(&config.model.stack, "model.stack", config.model.grid, false)
    }
}

impl Task for LanguageModelTask {
    type Item = LmItem;
    type Batch = LmBatch;
    type Model = LanguageModelWithLoss;
    type ModelConfig = LanguageModelConfig;

    fn model_config(&self, ctx: &RunContext) -> Result<LanguageModelConfig, String> {
        let c = &ctx.config;
        if self.stream.is_some() && ctx.devices.len() > 1 {
            return Err(format!(
                "--devices: lm.mode = \"stream\" trains on one device (each device would read \
                 its own slice of the batches, breaking the streams), got {}",
                ctx.devices.len()
            ));
        }
        Ok(LanguageModelConfig {
            embedding: embedding(c, self.data.vocab_size, self.data.seq_len)?,
            stack: c.model.stack.clone(),
            tie_embeddings: c.model.tie_embeddings,
            compressive: c.model.compressive.clone(),
        })
    }

    fn build(
        &self,
        config: &LanguageModelConfig,
        device: &Device,
        guard: NanGuard,
    ) -> Result<LanguageModelWithLoss, String> {
        let model = config
            .init(device)
            .map_err(|e| model_error(e, &[("decoder", "stack")]))?;
        let model = LanguageModelWithLoss::new(model, self.data.pad as usize, guard);
        Ok(match self.stream {
            Some(settings) => model.with_stream(StreamMemory::new(settings)),
            None => model,
        })
    }

    fn batcher(&self, _: &LanguageModelConfig) -> Arc<dyn MakeBatch<LmItem, LmBatch>> {
        Arc::new(LmBatcher { pad: self.data.pad })
    }

    fn splits(&self) -> Splits<'_, LmItem> {
        Splits {
            train: &self.data.train,
            valid: &self.data.valid,
            test: None,
        }
    }

    fn pad_token(&self) -> Option<usize> {
        Some(self.data.pad as usize)
    }

    fn save_artifacts(&self, config: &LanguageModelConfig, ctx: &RunContext) -> Result<(), String> {
        let saved = SavedLanguageModel {
            model: config.clone(),
            pad: self.data.pad,
            encoding: ctx.config.lm.encoding,
            seq_len: self.data.seq_len,
        };
        write_atomic(
            &ctx.run_dir.join("model.json"),
            serde_json::to_string_pretty(&saved)
                .map_err(|e| e.to_string())?
                .as_bytes(),
        )
    }

    fn describe(&self, parameters: usize) -> String {
        let d = &self.data;
        format!(
            "language model: {} train / {} valid windows of {} tokens, vocabulary {}; {parameters} parameters",
            d.train.len(),
            d.valid.len(),
            d.seq_len,
            d.vocab_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use efficient_attn::TransformerXlConfig;
    use models::{EmbeddingSettings, PositionKind, StackConfig};

    fn diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        a.sub(b).abs().max().into_scalar::<f32>()
    }

    /// Batch t + 1 continues batch t (its logits are the tail of one pass over both
    /// segments), and a new epoch starts with an empty memory.
    #[test]
    fn stream_memory_carries_segments_and_restarts_each_epoch() {
        let device = Device::flex();
        let model = LanguageModelConfig {
            embedding: EmbeddingSettings {
                vocab_size: 12,
                max_len: 8,
                positions: PositionKind::None,
                dropout: 0.0,
                ..Default::default()
            },
            stack: StackConfig {
                n_layers: 2,
                d_model: 16,
                n_heads: 2,
                d_ff: 32,
                dropout: 0.0,
                ..Default::default()
            }
            .with_attention(TransformerXlConfig::default()),
            tie_embeddings: true,
            compressive: None,
        }
        .init(&device)
        .unwrap();
        let memory = StreamMemory::new(StreamSettings {
            mem_len: 8,
            eval_mem_len: 8,
            train_batches: 2,
            eval_batches: 2,
        });
        let tokens = |v: &[i64]| {
            Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &device)
        };
        let (a, b) = ([1i64, 2, 3, 4], [5i64, 6, 7, 8]);
        let first = memory.forward(&model, tokens(&a)).0;
        let second = memory.forward(&model, tokens(&b)).0;
        let both = model
            .forward(tokens(&[a, b].concat()), None)
            .narrow(1, 4, 4);
        assert!(
            diff(second.clone(), both) < 1e-5,
            "continues the first segment"
        );
        assert!(
            diff(second, model.forward(tokens(&b), None)) > 1e-4,
            "the memory matters"
        );
        let third = memory.forward(&model, tokens(&a)).0;
        assert!(diff(third, first) < 1e-6, "a new epoch starts afresh");
    }
}
