//! Compressive Transformer (Rae et al. 2020): Transformer-XL's segment memory plus, per layer,
//! a second FIFO of *compressed* memories.
//!
//! After each segment, the positions that fall out of a layer's memory (its inputs over the
//! last `mem_len` positions) are not dropped: a compression function `f_c` turns every `c` of
//! them into one slot, appended to that layer's compressed memory and truncated to its newest
//! `cmem_len` slots. The layer then attends over `[compressed; memory; segment]` (the order of
//! lucidrains' `compressive-transformer-pytorch`), each slot counted as one position by the
//! relative attention, so a layer reaches `mem_len + c · cmem_len` positions back for the cost
//! of `mem_len + cmem_len`.
//!
//! `f_c` ([`Compression`]) is a 1-D convolution with kernel = stride = `c` (the paper's choice)
//! or mean / max pooling over every `c` positions. The convolution learns from the
//! **attention-reconstruction loss** alone: `‖attn(h, old) − attn(h, f_c(old))‖²` (mean
//! squared error), with `h` the layer's current segment, `old` the evicted positions and
//! `attn` plain softmax attention through the layer's own query, key and value projections
//! (and its pre-norm), whose parameters are *frozen copies* for this loss (`no_grad` on a
//! clone — never a parameter detached in place, the pitfall of the reference code), and
//! `h`, `old` and the target detached. So the loss reaches only the compressors; the main
//! network never sees it, and the compressors get no gradient from the language-model loss
//! (compressed memories are stored detached, like Transformer-XL's). The training loss adds
//! the layers' mean reconstruction loss times `recon_weight`.
//!
//! Invariants (tested in `tests/it/compressive.rs`): `cmem_len = 0` is Transformer-XL; until the
//! first eviction the outputs are Transformer-XL's; `c = 1` with an identity compressor is
//! Transformer-XL with a memory of `mem_len + cmem_len`; the reconstruction loss gives
//! gradients to the compressors only.

use burn::module::{Module, ModuleDisplay};
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use efficient_attn::AttentionCore;

use crate::block::TransformerLayer;
use crate::config::ModelConfigError;

/// How evicted memories become compressed slots (`f_c`), every `ratio` positions into one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum Compression {
    /// A 1-D convolution over positions, kernel = stride = `ratio`, `d_model` channels in and
    /// out (the paper's choice); trained by the reconstruction loss.
    #[default]
    Conv,
    /// The mean of every `ratio` positions (no parameters).
    Mean,
    /// The per-channel maximum of every `ratio` positions (no parameters).
    Max,
}

/// Configuration of a [`CompressiveMemory`] (`[model.compressive]`), with the reference's
/// defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct CompressiveConfig {
    /// Compressed slots per layer (`n_cm`); `None`: `mem_len / ratio` (lucidrains' default).
    /// 0 is Transformer-XL.
    pub cmem_len: Option<usize>,
    /// Compression rate `c`: evicted positions per compressed slot (the paper uses 3–4,
    /// lucidrains 4). With segment and memory lengths that are multiples of it, every
    /// eviction is compressed at once; otherwise up to `c − 1` evicted positions wait in the
    /// memory for the next eviction.
    pub ratio: usize,
    /// The compression function.
    pub compression: Compression,
    /// Weight of the attention-reconstruction loss in the training loss (lucidrains: 1).
    pub recon_weight: f64,
}

impl Default for CompressiveConfig {
    fn default() -> Self {
        Self {
            cmem_len: None,
            ratio: 4,
            compression: Compression::Conv,
            recon_weight: 1.0,
        }
    }
}

impl CompressiveConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// The key under `path` and what was expected.
    pub fn check(&self, path: &str) -> Result<(), ModelConfigError> {
        if self.ratio == 0 {
            return Err(ModelConfigError::new(
                format!("{path}.ratio"),
                "expected a compression rate of at least 1, got 0",
            ));
        }
        if !(self.recon_weight.is_finite() && self.recon_weight >= 0.0) {
            return Err(ModelConfigError::new(
                format!("{path}.recon_weight"),
                format!("expected a finite weight >= 0, got {}", self.recon_weight),
            ));
        }
        Ok(())
    }

    /// The compressors of `n_layers` layers of width `d_model`.
    pub fn init(&self, n_layers: usize, d_model: usize, device: &Device) -> CompressiveMemory {
        let compressors = (0..n_layers)
            .map(|_| Compressor {
                conv: (self.compression == Compression::Conv).then(|| {
                    Conv1dConfig::new(d_model, d_model, self.ratio)
                        .with_stride(self.ratio)
                        .init(device)
                }),
                ratio: self.ratio,
                compression: self.compression,
            })
            .collect();
        CompressiveMemory {
            compressors,
            settings: self.clone(),
        }
    }
}

/// One layer's compression function `f_c`.
#[derive(Module, Debug)]
pub struct Compressor {
    /// The convolution (`compression = "conv"`), `[d_model, d_model, ratio]`, stride `ratio`.
    pub conv: Option<Conv1d>,
    ratio: usize,
    #[module(skip)]
    compression: Compression,
}

impl Compressor {
    /// Compresses every `ratio` positions into one.
    ///
    /// # Shapes
    /// - x: `[batch, n, d_model]`, `n` a multiple of the ratio → `[batch, n / ratio, d_model]`
    ///
    /// # Panics
    /// If `n` is not a multiple of the ratio (the configuration checks rule it out).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let c = self.ratio;
        assert!(
            n % c == 0,
            "compressive memory: {n} evicted positions are not a multiple of the ratio {c}"
        );
        if let Some(conv) = &self.conv {
            return conv.forward(x.swap_dims(1, 2)).swap_dims(1, 2);
        }
        let groups = x.reshape([b, n / c, c, d]);
        let pooled = match self.compression {
            Compression::Max => groups.max_dim(2),
            Compression::Mean | Compression::Conv => groups.mean_dim(2),
        };
        pooled.reshape([b, n / c, d])
    }
}

/// The Compressive Transformer's compressors (one per layer) and settings; the memories
/// themselves are state passed from segment to segment
/// ([`SegmentMemory`](crate::SegmentMemory)).
#[derive(Module, Debug)]
pub struct CompressiveMemory {
    /// One per layer.
    pub compressors: Vec<Compressor>,
    #[module(skip)]
    settings: CompressiveConfig,
}

impl CompressiveMemory {
    /// Compressed slots per layer for a memory of `mem_len` positions.
    pub fn cmem_len(&self, mem_len: usize) -> usize {
        self.settings
            .cmem_len
            .unwrap_or(mem_len / self.settings.ratio.max(1))
    }

    /// The compression rate.
    pub fn ratio(&self) -> usize {
        self.settings.ratio
    }

    /// Layer `l`'s compressed slots for its `evicted` positions (tracked: the reconstruction
    /// loss trains the compressor through them) and, when `train` and the compressor has
    /// parameters (the convolution), the weighted attention-reconstruction loss of `layer`
    /// reading `segment`.
    ///
    /// # Shapes
    /// - segment: `[batch, seq, d_model]`, evicted: `[batch, n, d_model]`
    /// - output: `[batch, n / ratio, d_model]`, loss `[1]`
    pub(crate) fn compress<C: AttentionCore + Module + ModuleDisplay + 'static>(
        &self,
        l: usize,
        layer: &TransformerLayer<C>,
        segment: Tensor<3>,
        evicted: Tensor<3>,
        train: bool,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let compressed = self.compressors[l].forward(evicted.clone());
        // Only a compressor with parameters learns from the loss (pooling has none).
        let learns = self.compressors[l].conv.is_some();
        let loss = (train && learns).then(|| {
            reconstruction_loss(layer, segment, evicted, compressed.clone())
                .mul_scalar(self.settings.recon_weight)
        });
        (compressed, loss)
    }
}

/// `mean((attn(h, f_c(old)) − attn(h, old))²)` through frozen copies of `layer`'s pre-norm and
/// projections: plain softmax attention per head (no positions, no mask: every memory
/// position precedes the segment), scaled by `1/√d_k`.
fn reconstruction_loss<C: AttentionCore + Module + ModuleDisplay + 'static>(
    layer: &TransformerLayer<C>,
    segment: Tensor<3>,
    evicted: Tensor<3>,
    compressed: Tensor<3>,
) -> Tensor<1> {
    let frozen = layer.clone().no_grad();
    let mha = &frozen.self_attention;
    let heads = mha.n_heads();
    let split = |x: Tensor<3>| {
        let [b, n, w] = x.dims();
        x.reshape([b, n, heads, w / heads]).swap_dims(1, 2)
    };
    let q = split(mha.query.forward(frozen.attention_input(segment.detach())));
    let key = mha.key.as_ref().unwrap_or(&mha.query);
    let scale = 1.0 / (mha.d_k() as f64).sqrt();
    let attend = |memory: Tensor<3>| {
        let memory = frozen.attention_input(memory);
        let k = split(key.forward(memory.clone()));
        let v = split(mha.value.forward(memory));
        softmax(q.clone().matmul(k.swap_dims(2, 3)).mul_scalar(scale), 3).matmul(v)
    };
    let target = attend(evicted.detach()).detach();
    (attend(compressed) - target).powf_scalar(2.0).mean()
}
