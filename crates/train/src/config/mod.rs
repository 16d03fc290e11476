//! Experiment files: what `efformer train` reads.
//!
//! Every section has defaults; unknown keys are errors. A minimal file:
//!
//! ```toml
//! task = "listops"
//! [listops]
//! train = 2000
//! [model.stack]
//! n_layers = 2
//! [model.stack.attention]
//! kind = "performer"
//! [train]
//! epochs = 3
//! ```

pub mod load;

use std::path::PathBuf;

use efficient_attn::AttentionConfig;
use models::{PositionKind, StackConfig};
use serde::{Deserialize, Serialize};

use crate::data::batching::Batching;
use crate::data::listops::ListOpsSettings;

/// The task, which decides the data and the model family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// LRA ListOps: classify the value (0–9) of a nested expression; `[listops]`.
    #[default]
    Listops,
    /// LRA byte-level text classification (IMDB, 4,096 bytes); `[text]`.
    LraText,
    /// Text classification with a tokenizer (`tokenizer.json` or trained); `[text]`.
    TextClassification,
    /// Causal language modelling on text (bytes or a tokenizer); `[lm]`.
    LanguageModel,
    /// A generated sequence-to-sequence task (reverse, sort); `[seq2seq]`.
    Seq2seq,
    /// The Set Transformer's maximum-value regression (Lee et al. 2019, §5.1): the largest of
    /// a set of numbers; `[set]` data, `[model.set]` model.
    SetMax,
}

/// A whole experiment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Name shown in progress output.
    pub name: String,
    /// The task.
    pub task: TaskKind,
    /// ListOps data.
    pub listops: ListOpsTask,
    /// Text-classification data (`lra-text`, `text-classification`).
    pub text: TextTask,
    /// Language-modelling data.
    pub lm: LmTask,
    /// Sequence-to-sequence data.
    pub seq2seq: Seq2SeqTask,
    /// Set data (`set-max`).
    pub set: SetTask,
    /// The model.
    pub model: ModelSection,
    /// Optimisation.
    pub train: TrainSection,
}

/// ListOps: generated (LRA's generator with a seed; defaults are LRA's) or read from LRA's TSV
/// files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListOpsTask {
    /// Maximum tree depth (LRA: 10).
    pub max_depth: usize,
    /// Maximum operator arguments (LRA: 10).
    pub max_args: usize,
    /// Lengths must exceed this (LRA: 500).
    pub min_length: usize,
    /// Lengths must stay below this (LRA: 2000).
    pub max_length: usize,
    /// Training examples (LRA: 96,000).
    pub train: usize,
    /// Validation examples (LRA: 2,000).
    pub valid: usize,
    /// Test examples (LRA: 2,000).
    pub test: usize,
    /// Generator seed.
    pub seed: u64,
    /// A folder with LRA's `basic_train.tsv`, `basic_val.tsv`, `basic_test.tsv` to read instead
    /// of generating.
    pub files: Option<PathBuf>,
}

impl Default for ListOpsTask {
    fn default() -> Self {
        let g = ListOpsSettings::default();
        Self {
            max_depth: g.max_depth,
            max_args: g.max_args,
            min_length: g.min_length,
            max_length: g.max_length,
            train: g.train,
            valid: g.valid,
            test: g.test,
            seed: g.seed,
            files: None,
        }
    }
}

impl ListOpsTask {
    /// The generator settings.
    pub fn settings(&self) -> ListOpsSettings {
        ListOpsSettings {
            max_depth: self.max_depth,
            max_args: self.max_args,
            min_length: self.min_length,
            max_length: self.max_length,
            train: self.train,
            valid: self.valid,
            test: self.test,
            seed: self.seed,
        }
    }
}

/// How text becomes token ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextEncoding {
    /// UTF-8 bytes (ids 2..=257; 0 padding, 1 CLS), as LRA's byte-level tasks.
    #[default]
    Bytes,
    /// A `tokenizers` tokenizer (see `[text.tokenizer]`).
    Tokenizer,
}

/// Which tokenizer model to train.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerModel {
    /// Byte-level BPE.
    #[default]
    Bpe,
    /// WordPiece (BERT-style, lower-cased).
    Wordpiece,
}

/// A tokenizer: loaded from a `tokenizer.json`, or trained on the training split and saved
/// with the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerSection {
    /// A `tokenizer.json` to load (its truncation and padding are switched off).
    pub file: Option<PathBuf>,
    /// Model to train when no file is given.
    pub model: TokenizerModel,
    /// Vocabulary size when training.
    pub vocab_size: usize,
    /// Training documents used for training the tokenizer (at most).
    pub train_documents: usize,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self {
            file: None,
            model: TokenizerModel::Bpe,
            vocab_size: 8000,
            train_documents: 5000,
        }
    }
}

/// Labelled text data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextTask {
    /// Training data: `.jsonl(.gz)` with `text` and `label`, or a folder per label.
    pub train: PathBuf,
    /// Validation data; `None` = the test data (as LRA Text does).
    pub valid: Option<PathBuf>,
    /// Test data.
    pub test: PathBuf,
    /// Label names in order; `None` = sorted names found in the training data.
    pub labels: Option<Vec<String>>,
    /// Bytes or a tokenizer.
    pub encoding: TextEncoding,
    /// The tokenizer, when `encoding = "tokenizer"`.
    pub tokenizer: TokenizerSection,
    /// Longest input in tokens including the CLS token; longer documents are truncated.
    pub max_len: usize,
    /// Use only the first N training documents (after a seeded shuffle).
    pub train_limit: Option<usize>,
    /// Use only the first N validation/test documents (after a seeded shuffle).
    pub eval_limit: Option<usize>,
}

impl Default for TextTask {
    fn default() -> Self {
        Self {
            train: PathBuf::from("../shared/data/imdb/train.jsonl.gz"),
            valid: None,
            test: PathBuf::from("../shared/data/imdb/test.jsonl.gz"),
            labels: None,
            encoding: TextEncoding::Bytes,
            tokenizer: TokenizerSection::default(),
            max_len: 4096,
            train_limit: None,
            eval_limit: None,
        }
    }
}

/// Language-modelling data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmTask {
    /// Training text: a plain text file, or `.jsonl(.gz)` whose `text` fields are concatenated.
    pub train: PathBuf,
    /// Validation text; `None` = the last 5% of the training text.
    pub valid: Option<PathBuf>,
    /// Bytes or a tokenizer.
    pub encoding: TextEncoding,
    /// The tokenizer, when `encoding = "tokenizer"`.
    pub tokenizer: TokenizerSection,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Read at most this many bytes of training text.
    pub max_bytes: Option<usize>,
    /// How the text becomes examples: independent windows, or streams read segment after
    /// segment with each layer's memory of the previous segments (Transformer-XL).
    pub mode: LmMode,
    /// Stream mode: positions each layer remembers in training.
    pub mem_len: Option<usize>,
    /// Stream mode: positions each layer remembers in evaluation (the reference evaluates with
    /// a longer memory than it trains with); `None` = `mem_len`.
    pub eval_mem_len: Option<usize>,
}

/// How language-modelling text becomes examples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LmMode {
    /// Independent windows of `seq_len + 1` tokens, shuffled.
    #[default]
    Windows,
    /// The text cut into `batch_size` parallel streams (contiguous parts), each read as
    /// consecutive segments of `seq_len`: batch t holds segment t of every stream, and each
    /// layer carries its memory of the stream's previous segments from one batch to the next
    /// (reset every epoch). Needs `[train.batching] kind = "in-order"` and one device.
    Stream,
}

impl Default for LmTask {
    fn default() -> Self {
        Self {
            train: PathBuf::from("../shared/data/imdb/train.jsonl.gz"),
            valid: None,
            encoding: TextEncoding::Bytes,
            tokenizer: TokenizerSection::default(),
            seq_len: 256,
            max_bytes: Some(2_000_000),
            mode: LmMode::Windows,
            mem_len: None,
            eval_mem_len: None,
        }
    }
}

/// The generated sequence-to-sequence problem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Seq2SeqProblem {
    /// Output the input reversed.
    #[default]
    Reverse,
    /// Output the input sorted.
    Sort,
}

/// Sets of numbers, generated from a seed (`set-max`); defaults are the paper's (Lee et al.
/// 2019, supplementary §2.1: 1–10 reals uniform in [0, 100]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SetTask {
    /// Smallest set (paper: 1).
    pub min_size: usize,
    /// Largest set (paper: 10).
    pub max_size: usize,
    /// Values are uniform in `[low, high)` (paper: 0).
    pub low: f64,
    /// Upper end of the values (paper: 100).
    pub high: f64,
    /// Training sets (the paper draws fresh sets for each of 20,000 batches of 128; a fixed
    /// set of 256,000 seen for 10 epochs is as many).
    pub train: usize,
    /// Validation sets.
    pub valid: usize,
    /// Test sets.
    pub test: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for SetTask {
    fn default() -> Self {
        Self {
            min_size: 1,
            max_size: 10,
            low: 0.0,
            high: 100.0,
            train: 256_000,
            valid: 2_000,
            test: 2_000,
            seed: 0,
        }
    }
}

/// Sequence-to-sequence data, generated from a seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Seq2SeqTask {
    /// The problem.
    pub problem: Seq2SeqProblem,
    /// Symbols (excluding the special ids for padding, start and end).
    pub symbols: usize,
    /// Shortest input.
    pub min_len: usize,
    /// Longest input.
    pub max_len: usize,
    /// Training pairs.
    pub train: usize,
    /// Validation pairs.
    pub valid: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for Seq2SeqTask {
    fn default() -> Self {
        Self {
            problem: Seq2SeqProblem::Reverse,
            symbols: 10,
            min_len: 4,
            max_len: 16,
            train: 5000,
            valid: 500,
            seed: 0,
        }
    }
}

/// Embedding settings the data does not decide (vocabulary size and the default maximum length
/// come from the task).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingSection {
    /// Longest sequence; `None` = what the task needs.
    pub max_len: Option<usize>,
    /// How positions enter.
    pub positions: PositionKind,
    /// Dropout after the embeddings.
    pub dropout: f64,
}

impl Default for EmbeddingSection {
    fn default() -> Self {
        Self {
            max_len: None,
            positions: PositionKind::Learned,
            dropout: 0.1,
        }
    }
}

/// The model (the family follows from the task).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Embeddings.
    pub embedding: EmbeddingSection,
    /// The encoder (classification) or decoder (language model) stack; the encoder of a
    /// sequence-to-sequence model.
    pub stack: StackConfig,
    /// The decoder stack of a sequence-to-sequence model (its attention must be causal).
    pub decoder: Option<StackConfig>,
    /// Decoder-to-encoder attention of a sequence-to-sequence model.
    pub cross_attention: AttentionConfig,
    /// Sequence pooling of classifiers.
    pub pooling: models::Pooling,
    /// Dropout before a classifier's output layer.
    pub head_dropout: f64,
    /// Tie the output layer of language models to the token embedding.
    pub tie_embeddings: bool,
    /// A language model's compressed memory beside its segment memory (Compressive
    /// Transformer; `lm.mode = "stream"`).
    pub compressive: Option<models::CompressiveConfig>,
    /// A classifier's encoder pools its sequence between blocks of layers (Funnel-Transformer;
    /// `blocks`, `stride`, `pool`, `separate_cls`, `upsample_layers`, `pool_attention`).
    pub funnel: Option<models::FunnelConfig>,
    /// The set model of set tasks (`[model.set]`: blocks, inducing points, seeds; the Set
    /// Transformer's defaults).
    pub set: Option<models::SetTransformerConfig>,
    /// Number of leading tokens that are global (the CLS token; for Longformer, ETC, BigBird).
    pub global_prefix: usize,
    /// Lay the sequence out as a `[rows, columns]` grid for 2-D variants (Image Transformer 2-D,
    /// Axial); inputs are padded to rows × columns.
    pub grid: Option<[usize; 2]>,
    /// Start a classifier's encoder from a Hugging Face BERT-family checkpoint: the layer
    /// shapes come from its `config.json`; `model.stack.attention` (and `attention_layers` /
    /// `attention_pattern`) and `model.embedding.max_len` choose the attention and the length.
    pub pretrained: Option<PretrainedSection>,
}

/// A pretrained encoder to start from (text classification).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainedSection {
    /// Checkpoint directory: `config.json`, `model.safetensors` (and usually `tokenizer.json`).
    pub dir: PathBuf,
    /// `pretrained`: load the weights (positions beyond the checkpoint's length are copies of
    /// its table); `random`: the same architecture, trained from scratch.
    #[serde(default)]
    pub init: PretrainedInit,
}

/// How a [`PretrainedSection`] encoder starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PretrainedInit {
    /// The checkpoint's weights.
    #[default]
    Pretrained,
    /// Fresh initialisation of the checkpoint's architecture.
    Random,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            embedding: EmbeddingSection::default(),
            stack: StackConfig {
                n_layers: 2,
                d_model: 64,
                n_heads: 4,
                d_ff: 128,
                ..StackConfig::default()
            },
            decoder: None,
            cross_attention: AttentionConfig::default(),
            pooling: models::Pooling::Cls,
            head_dropout: 0.1,
            tie_embeddings: true,
            compressive: None,
            funnel: None,
            set: None,
            global_prefix: 0,
            grid: None,
            pretrained: None,
        }
    }
}

/// The optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OptimizerSection {
    /// AdamW (Loshchilov & Hutter 2019).
    Adamw {
        /// β₁.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// β₂.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// ε.
        #[serde(default = "default_eps")]
        epsilon: f32,
        /// Decoupled weight decay.
        #[serde(default = "default_weight_decay")]
        weight_decay: f32,
    },
    /// Adam (Kingma & Ba 2015) with L2 weight decay.
    Adam {
        /// β₁.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// β₂.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// ε.
        #[serde(default = "default_eps")]
        epsilon: f32,
        /// L2 penalty.
        #[serde(default)]
        weight_decay: f32,
    },
    /// SGD with momentum.
    Sgd {
        /// Momentum.
        #[serde(default)]
        momentum: f64,
        /// L2 penalty.
        #[serde(default)]
        weight_decay: f32,
    },
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.98
}
fn default_eps() -> f32 {
    1e-9
}
fn default_weight_decay() -> f32 {
    0.1
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self::Adamw {
            beta1: default_beta1(),
            beta2: default_beta2(),
            epsilon: default_eps(),
            weight_decay: default_weight_decay(),
        }
    }
}

/// The learning-rate schedule (`lr` in `[train]` is the base rate).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ScheduleSection {
    /// The base rate throughout.
    Constant,
    /// LRA's `constant * linear_warmup * rsqrt_decay`:
    /// `lr · min(1, step/warmup) / √max(step, warmup)`.
    Rsqrt {
        /// Warm-up steps.
        warmup_steps: usize,
    },
    /// Noam (Vaswani et al. 2017): `lr · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)`.
    Noam {
        /// Warm-up steps.
        warmup_steps: usize,
    },
    /// Linear warm-up to the base rate, then cosine decay to `min_lr` at the last step.
    WarmupCosine {
        /// Warm-up steps.
        warmup_steps: usize,
        /// Final rate.
        #[serde(default)]
        min_lr: f64,
    },
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self::WarmupCosine {
            warmup_steps: 100,
            min_lr: 0.0,
        }
    }
}

/// Early stopping on the validation loss.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStopping {
    /// Stop after this many epochs without improvement.
    pub patience: usize,
}

impl Default for EarlyStopping {
    fn default() -> Self {
        Self { patience: 3 }
    }
}

/// Optimisation and bookkeeping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Epochs (passes over the training data).
    pub epochs: usize,
    /// Examples per batch.
    pub batch_size: usize,
    /// Examples per evaluation batch.
    pub eval_batch_size: usize,
    /// How items are grouped into batches (default: buckets of similar length).
    pub batching: Batching,
    /// Base learning rate.
    pub lr: f64,
    /// Optimiser.
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule.
    pub schedule: ScheduleSection,
    /// Clip the gradient norm to this value.
    pub grad_clip_norm: Option<f32>,
    /// Accumulate gradients over this many batches per optimiser step.
    pub grad_accumulation: usize,
    /// Early stopping on the validation loss.
    pub early_stopping: Option<EarlyStopping>,
    /// Seed of initialisation, data order and dropout.
    pub seed: u64,
    /// Checkpoints kept (most recent).
    pub keep_checkpoints: usize,
    /// Data-loading worker threads.
    pub workers: usize,
    /// Fault injection for testing recovery: the training loss becomes NaN at this (1-based)
    /// training batch.
    pub inject_nan_at_batch: Option<usize>,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            eval_batch_size: 64,
            batching: Batching::default(),
            lr: 1e-3,
            optimizer: OptimizerSection::default(),
            schedule: ScheduleSection::default(),
            grad_clip_norm: Some(1.0),
            grad_accumulation: 1,
            early_stopping: None,
            seed: 0,
            keep_checkpoints: 2,
            workers: 1,
            inject_nan_at_batch: None,
        }
    }
}
