//! Pretrained BERT-family encoders from Hugging Face checkpoint directories, and their
//! conversion to long inputs with an efficient attention (the Longformer recipe).
//!
//! A checkpoint directory holds `config.json`, `model.safetensors` and usually
//! `tokenizer.json`. [`BertCheckpoint::load`] reads the weights through burn-store
//! (`SafetensorsStore` + `PyTorchToBurnAdapter`, which transposes linear weights and renames
//! LayerNorm `weight`/`bias` to `gamma`/`beta`) into an [`Encoder`] built from the checkpoint's
//! own config, with full attention: the same function as the reference implementation.
//!
//! Key mapping (Hugging Face → ours; `N` = layer):
//!
//! | Hugging Face | efformer |
//! |---|---|
//! | `embeddings.word_embeddings` | `embedding.tokens` |
//! | `embeddings.position_embeddings` | `embedding.learned_positions` |
//! | `embeddings.token_type_embeddings` | `embedding.token_types` |
//! | `embeddings.LayerNorm` | `embedding.norm` |
//! | `encoder.layer.N.attention.self.{query,key,value}` | `stack.layers.N.self_attention.{query,key,value}` |
//! | `encoder.layer.N.attention.output.dense` | `stack.layers.N.self_attention.output` |
//! | `encoder.layer.N.attention.output.LayerNorm` | `stack.layers.N.norm_attention` |
//! | `encoder.layer.N.intermediate.dense` | `stack.layers.N.feed_forward.linear_inner` |
//! | `encoder.layer.N.output.dense` | `stack.layers.N.feed_forward.linear_outer` |
//! | `encoder.layer.N.output.LayerNorm` | `stack.layers.N.norm_feed_forward` |
//!
//! `pooler.*` and the `embeddings.position_ids` buffer are not part of an encoder and are
//! ignored; any other tensor the model does not have, or any tensor the model needs that the file
//! lacks, is an [`ImportError::Tensors`] that lists them.
//!
//! [`convert`] then moves every pretrained weight into an encoder with another attention and a
//! longer position table:
//! - learned positions are extended by copying the pretrained table end to end
//!   (row `i` = pretrained row `i mod max_position_embeddings`), as Longformer did;
//! - each layer keeps its Q/K/V/output projections; a variant with separate global
//!   projections (Longformer with `global_projections = true`) gets copies of the local ones;
//! - parameters only the new variant has (Linformer's E/F projections, Synthesizer's tables,
//!   …) start from their initialisation and are listed in the [`ConversionReport`].
//!
//! Every variant can be converted this way, because every variant sits behind the same
//! multi-head wrapper that owns the projections. Those that reuse Q and K (all but Synthesizer's
//! random/dense forms) start close to the pretrained function: exactly equal for
//! `memory-efficient`, and in the exact regime of each pattern (e.g. a Longformer window
//! covering the input) for the sparse ones.

use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Linear;
use burn::serde::Deserialize;
use burn::store::{KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::{Device, Tensor};
use efficient_attn::AttentionConfig;

use crate::config::{
    FeedForwardKind, FfnConfig, NormKind, NormPlacement, PositionKind, StackConfig,
};
use crate::embedding::EmbeddingSettings;
use crate::model::{Encoder, EncoderConfig};

/// Why a checkpoint could not be imported or converted.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportError {
    /// A file the checkpoint needs is absent.
    MissingFile {
        /// The path looked for.
        path: PathBuf,
        /// What it should contain.
        what: &'static str,
    },
    /// `config.json` is unreadable, or a field has a value we do not support.
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Tensors the model needs are missing from the file, or the file has tensors the model
    /// does not (after the key mapping), or shapes differ.
    Tensors {
        /// The weights file.
        path: PathBuf,
        /// Model paths with no tensor in the file.
        missing: Vec<String>,
        /// File tensors (mapped names) the model has no place for.
        unexpected: Vec<String>,
        /// Other errors (shape or dtype mismatches), one per tensor.
        errors: Vec<String>,
    },
    /// burn-store could not read the file.
    Store {
        /// The weights file.
        path: PathBuf,
        /// The store's message.
        message: String,
    },
    /// The conversion target does not match the pretrained encoder.
    Incompatible {
        /// The config field that differs (e.g. `stack.d_model`).
        field: String,
        /// The pretrained value.
        pretrained: String,
        /// The target value.
        target: String,
    },
    /// The target encoder config itself is invalid.
    Model(String),
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingFile { path, what } => {
                write!(f, "{}: file not found (expected {what})", path.display())
            }
            Self::Config { path, message } => write!(f, "{}: {message}", path.display()),
            Self::Tensors {
                path,
                missing,
                unexpected,
                errors,
            } => {
                write!(f, "{}: the weights do not fit the encoder", path.display())?;
                if !missing.is_empty() {
                    write!(f, "; missing tensors: {}", missing.join(", "))?;
                }
                if !unexpected.is_empty() {
                    write!(f, "; unexpected tensors: {}", unexpected.join(", "))?;
                }
                if !errors.is_empty() {
                    write!(f, "; {}", errors.join("; "))?;
                }
                Ok(())
            }
            Self::Store { path, message } => write!(f, "{}: {message}", path.display()),
            Self::Incompatible {
                field,
                pretrained,
                target,
            } => write!(
                f,
                "cannot convert: `{field}` is {pretrained} in the pretrained encoder but {target} \
                 in the target config (only the attention and max_len may change)"
            ),
            Self::Model(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for ImportError {}

/// The fields of a Hugging Face BERT `config.json` that define the encoder.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(crate = "burn::serde")]
pub struct HfBertConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Rows of the learned position table.
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Token-type (segment) vocabulary.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "bert_eps")]
    pub layer_norm_eps: f64,
    /// Feed-forward activation (`gelu` is supported).
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// Position scheme (`absolute` is supported).
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
    /// Dropout used in fine-tuning.
    #[serde(default = "point_one")]
    pub hidden_dropout_prob: f64,
    /// Architecture family.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn two() -> usize {
    2
}
fn bert_eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn absolute() -> String {
    "absolute".into()
}
fn point_one() -> f64 {
    0.1
}

/// A Hugging Face BERT-family checkpoint directory.
#[derive(Clone, Debug)]
pub struct BertCheckpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: HfBertConfig,
}

impl BertCheckpoint {
    /// Reads `dir/config.json` and checks that `dir/model.safetensors` exists.
    ///
    /// # Errors
    /// A missing file, unreadable JSON, or an unsupported `hidden_act`,
    /// `position_embedding_type` or `model_type`, naming the field.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ImportError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|_| ImportError::MissingFile {
            path: path.clone(),
            what: "a Hugging Face config.json",
        })?;
        let config: HfBertConfig =
            serde_json::from_str(&text).map_err(|e| ImportError::Config {
                path: path.clone(),
                message: format!("not a BERT config: {e}"),
            })?;
        let bad = |field: &str, value: &str, expected: &str| ImportError::Config {
            path: path.clone(),
            message: format!("`{field}` is \"{value}\"; supported: {expected}"),
        };
        if config.hidden_act != "gelu" {
            return Err(bad("hidden_act", &config.hidden_act, "\"gelu\""));
        }
        if config.position_embedding_type != "absolute" {
            return Err(bad(
                "position_embedding_type",
                &config.position_embedding_type,
                "\"absolute\"",
            ));
        }
        if let Some(kind) = &config.model_type
            && !matches!(kind.as_str(), "bert")
        {
            return Err(bad("model_type", kind, "\"bert\""));
        }
        let checkpoint = Self { dir, config };
        let weights = checkpoint.weights_path();
        if !weights.is_file() {
            return Err(ImportError::MissingFile {
                path: weights,
                what: "the checkpoint's weights (model.safetensors)",
            });
        }
        Ok(checkpoint)
    }

    /// `dir/model.safetensors`.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    /// `dir/tokenizer.json` (may not exist).
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// The encoder config the checkpoint describes: post-norm, GELU, learned positions,
    /// token types, embedding LayerNorm, with `attention` (full attention reproduces the
    /// checkpoint).
    pub fn encoder_config(&self, attention: AttentionConfig) -> EncoderConfig {
        let c = &self.config;
        EncoderConfig {
            embedding: EmbeddingSettings {
                vocab_size: c.vocab_size,
                max_len: c.max_position_embeddings,
                positions: PositionKind::Learned,
                type_vocab_size: c.type_vocab_size,
                norm: true,
                norm_eps: c.layer_norm_eps,
                dropout: c.hidden_dropout_prob,
            },
            stack: StackConfig {
                n_layers: c.num_hidden_layers,
                d_model: c.hidden_size,
                n_heads: c.num_attention_heads,
                d_ff: c.intermediate_size,
                dropout: c.hidden_dropout_prob,
                norm: NormKind::LayerNorm,
                placement: NormPlacement::Post,
                norm_eps: c.layer_norm_eps,
                feed_forward: FeedForwardKind::Gelu,
                ffn: FfnConfig::Dense,
                attention,
                attention_layers: None,
                attention_pattern: None,
                ff_chunks: 1,
                reversible: false,
            },
            funnel: None,
        }
    }

    /// Loads the pretrained encoder with full attention at the checkpoint's own length.
    ///
    /// # Errors
    /// [`ImportError::Tensors`] names every missing or unexpected tensor;
    /// [`ImportError::Store`] if the file cannot be read.
    pub fn load(&self, device: &Device) -> Result<Encoder, ImportError> {
        let mut encoder = self
            .encoder_config(AttentionConfig::default())
            .init(device)
            .map_err(|e| ImportError::Model(e.to_string()))?;
        load_weights(&mut encoder, &self.weights_path())?;
        Ok(encoder)
    }
}

/// The Hugging Face → efformer key mapping (regex, replacement), applied in order.
pub const BERT_KEY_MAP: &[(&str, &str)] = &[
    (r"^embeddings\.word_embeddings\.", "embedding.tokens."),
    (
        r"^embeddings\.position_embeddings\.",
        "embedding.learned_positions.",
    ),
    (
        r"^embeddings\.token_type_embeddings\.",
        "embedding.token_types.",
    ),
    (r"^embeddings\.LayerNorm\.", "embedding.norm."),
    (
        r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
        "stack.layers.$1.self_attention.$2.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.",
        "stack.layers.$1.self_attention.output.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
        "stack.layers.$1.norm_attention.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.intermediate\.dense\.",
        "stack.layers.$1.feed_forward.linear_inner.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.output\.dense\.",
        "stack.layers.$1.feed_forward.linear_outer.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.",
        "stack.layers.$1.norm_feed_forward.",
    ),
];

/// File tensors that are not part of an encoder and are ignored.
const IGNORED: &[&str] = &["pooler.", "embeddings.position_ids"];

/// Loads a BERT `model.safetensors` into `encoder` (built with the matching config).
///
/// # Errors
/// See [`BertCheckpoint::load`].
pub fn load_weights(encoder: &mut Encoder, path: &Path) -> Result<(), ImportError> {
    let remapper =
        KeyRemapper::from_patterns(BERT_KEY_MAP.to_vec()).expect("the key map's regexes are valid");
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter)
        .remap(remapper)
        .skip_enum_variants(true)
        .allow_partial(true);
    let result = encoder
        .load_from(&mut store)
        .map_err(|e| ImportError::Store {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let missing: Vec<String> = result.missing.iter().map(|(p, _)| p.clone()).collect();
    let unexpected: Vec<String> = result
        .unused
        .iter()
        .filter(|p| !IGNORED.iter().any(|i| p.starts_with(i)))
        .cloned()
        .collect();
    let errors: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
    if missing.is_empty() && unexpected.is_empty() && errors.is_empty() {
        Ok(())
    } else {
        Err(ImportError::Tensors {
            path: path.to_path_buf(),
            missing,
            unexpected,
            errors,
        })
    }
}

/// What [`convert`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConversionReport {
    /// Position rows before and after.
    pub positions: (usize, usize),
    /// Layers whose global projections were initialised as copies of the local ones.
    pub global_copies: usize,
    /// Parameters of the new attention that start from their initialisation, by path.
    pub fresh: Vec<String>,
    /// Layers whose pretrained key projection was dropped: the target attention shares
    /// queries and keys (Reformer) and has none.
    pub dropped_keys: usize,
}

fn linear_copy(l: &Linear) -> Linear {
    Linear {
        weight: Param::from_tensor(l.weight.val().detach()),
        bias: l
            .bias
            .as_ref()
            .map(|b| Param::from_tensor(b.val().detach())),
    }
}

/// Tiles `table` `[rows, d]` end to end into `[n, d]` (row `i` = row `i mod rows`).
fn tile_rows(table: Tensor<2>, n: usize) -> Tensor<2> {
    let rows = table.dims()[0];
    table.repeat_dim(0, n.div_ceil(rows)).narrow(0, 0, n)
}

fn check<T: PartialEq + fmt::Debug>(field: &str, a: T, b: T) -> Result<(), ImportError> {
    if a == b {
        Ok(())
    } else {
        Err(ImportError::Incompatible {
            field: field.into(),
            pretrained: format!("{a:?}"),
            target: format!("{b:?}"),
        })
    }
}

/// Moves a pretrained encoder's weights into a new encoder built from `target`, which may
/// differ from `pretrained_config` only in `embedding.max_len`, `embedding.dropout`,
/// `stack.dropout` and the attention (per layer or patterned).
///
/// # Errors
/// [`ImportError::Incompatible`] naming the first other field that differs;
/// [`ImportError::Model`] if `target` is invalid.
pub fn convert(
    pretrained: Encoder,
    pretrained_config: &EncoderConfig,
    target: &EncoderConfig,
    device: &Device,
) -> Result<(Encoder, ConversionReport), ImportError> {
    let (p, t) = (pretrained_config, target);
    check(
        "embedding.vocab_size",
        p.embedding.vocab_size,
        t.embedding.vocab_size,
    )?;
    check(
        "embedding.positions",
        p.embedding.positions,
        t.embedding.positions,
    )?;
    check(
        "embedding.type_vocab_size",
        p.embedding.type_vocab_size,
        t.embedding.type_vocab_size,
    )?;
    check("embedding.norm", p.embedding.norm, t.embedding.norm)?;
    check("stack.n_layers", p.stack.n_layers, t.stack.n_layers)?;
    check("stack.d_model", p.stack.d_model, t.stack.d_model)?;
    check("stack.n_heads", p.stack.n_heads, t.stack.n_heads)?;
    check("stack.d_ff", p.stack.d_ff, t.stack.d_ff)?;
    check("stack.ffn", p.stack.ffn.clone(), t.stack.ffn.clone())?;
    check("stack.norm", p.stack.norm, t.stack.norm)?;
    check("stack.placement", p.stack.placement, t.stack.placement)?;
    check(
        "stack.feed_forward",
        p.stack.feed_forward,
        t.stack.feed_forward,
    )?;
    let mut out = target
        .init(device)
        .map_err(|e| ImportError::Model(e.to_string()))?;
    let before = out.collect(None, None, true);
    let mut report = ConversionReport::default();

    let src = pretrained.embedding;
    out.embedding.tokens = src.tokens;
    out.embedding.token_types = src.token_types;
    out.embedding.norm = src.norm;
    if let (Some(from), Some(to)) = (
        src.learned_positions,
        out.embedding.learned_positions.as_mut(),
    ) {
        let rows_from = from.weight.dims()[0];
        let rows_to = to.weight.dims()[0];
        to.weight = Param::from_tensor(tile_rows(from.weight.val(), rows_to).detach());
        report.positions = (rows_from, rows_to);
    }
    for (to, from) in out.stack.layers.iter_mut().zip(pretrained.stack.layers) {
        let attn = from.self_attention;
        if let Some(global) = to.self_attention.global.as_mut() {
            global.query = linear_copy(&attn.query);
            global.key = linear_copy(
                attn.key
                    .as_ref()
                    .expect("a pretrained BERT layer has a key projection"),
            );
            global.value = linear_copy(&attn.value);
            report.global_copies += 1;
        }
        to.self_attention.query = attn.query;
        if to.self_attention.key.is_some() {
            to.self_attention.key = attn.key;
        } else {
            report.dropped_keys += 1;
        }
        to.self_attention.value = attn.value;
        to.self_attention.output = attn.output;
        to.feed_forward = from.feed_forward;
        to.norm_attention = from.norm_attention;
        to.norm_feed_forward = from.norm_feed_forward;
    }
    out.stack.final_norm = pretrained.stack.final_norm;
    // Whatever still has the id it was initialised with was not carried over.
    let after = out.collect(None, None, true);
    report.fresh = after
        .iter()
        .filter(|a| {
            before
                .iter()
                .any(|b| b.name == a.name && b.param_id == a.param_id)
        })
        .map(|a| a.name.clone())
        .collect();
    Ok((out, report))
}
