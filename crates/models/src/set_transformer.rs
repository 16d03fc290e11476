//! Set Transformer (Lee et al. 2019): attention blocks for sets, whose outputs do not depend on
//! the order of the elements.
//!
//! - `MAB(X, Y)`: X attends to Y. Paper: `H = LN(X + MHA(X, Y, Y))`, `MAB = LN(H + rFF(H))`.
//! - `SAB(X) = MAB(X, X)`: O(n²); permutation-equivariant.
//! - `ISAB_m(X) = MAB(X, MAB(I_m, X))` with m learned inducing points: O(n·m);
//!   permutation-equivariant.
//! - `PMA_k(Z) = MAB(S_k, rFF(Z))` with k learned seeds: O(k·n); permutation-invariant.
//!
//! [`SetStyle`] chooses between the paper and the authors' code (`juho-lee/set_transformer`),
//! which differ in four documented ways: the reference divides scores by `√d_model` instead of
//! `√d_head`, has no output projection `W_O`, adds the attention to the *projected* queries
//! (`Q W_q + A V`), uses `O + ReLU(O W_o)` as the row-wise feed-forward, makes LayerNorm
//! optional (off by default), and its PMA has no rFF before the pooling. The paper style runs
//! its attention through `efficient-attn`'s [`MultiHeadAttention`] in cross mode (any attention
//! kind with a cross mode); the reference style computes its own softmax attention (exact,
//! `[n, m]` scores per head — the same cost class as the paper's blocks).
//!
//! Padding: sets of different sizes are padded to one length with a key-padding mask
//! (`true` = padded). Padded keys are masked in every block that reads the set (SAB, both
//! halves of ISAB — the inducing points attend over the set — and PMA); outputs at padded rows
//! are defined but meaningless. Real elements' outputs equal those of the unpadded set.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Bool, Device, Tensor};
use efficient_attn::{
    Attention, AttentionConfig, AttentionMode, MhaInput, MultiHeadAttention,
    MultiHeadAttentionConfig,
};

use crate::block::LayerNorm;
use crate::config::ModelConfigError;

/// The paper's blocks or the authors' code (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum SetStyle {
    /// Lee et al. 2019 as written.
    #[default]
    Paper,
    /// `juho-lee/set_transformer` (`modules.py`).
    Reference,
}

/// Configuration shared by the blocks of a set model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct SetBlockConfig {
    /// Width (reference default 128).
    pub d_model: usize,
    /// Heads (reference default 4).
    pub n_heads: usize,
    /// Paper or reference blocks.
    pub style: SetStyle,
    /// LayerNorm in every block (paper: yes; the reference's `ln` flag defaults to off).
    pub layer_norm: bool,
    /// The attention of the paper style's blocks (needs a cross mode; reference style: unused).
    pub attention: AttentionConfig,
}

impl Default for SetBlockConfig {
    fn default() -> Self {
        Self {
            d_model: 128,
            n_heads: 4,
            style: SetStyle::Paper,
            layer_norm: true,
            attention: AttentionConfig::default(),
        }
    }
}

impl SetBlockConfig {
    /// Checks the widths and that the attention has a cross mode.
    ///
    /// # Errors
    /// The key under `path` and what was expected.
    pub fn check(&self, path: &str) -> Result<(), ModelConfigError> {
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ModelConfigError::new(
                format!("{path}.n_heads"),
                format!(
                    "a positive divisor of d_model = {}, got {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if self.style == SetStyle::Paper && !self.attention.info().supports(AttentionMode::Cross) {
            return Err(ModelConfigError::new(
                format!("{path}.attention"),
                format!(
                    "set blocks attend from one set to another (cross mode), which attention kind \
                     \"{}\" does not have",
                    self.attention.info().kind
                ),
            ));
        }
        Ok(())
    }

    /// A multihead attention block.
    ///
    /// # Errors
    /// An invalid attention configuration, at `path`.
    pub fn mab(&self, path: &str, device: &Device) -> Result<Mab, ModelConfigError> {
        self.check(path)?;
        let d = self.d_model;
        let norm = || self.layer_norm.then(|| LayerNorm::new(d, 1e-5, device));
        let attention = match self.style {
            SetStyle::Paper => MabAttention::Paper(
                MultiHeadAttentionConfig::new(d, self.n_heads)
                    .with_attention(self.attention.clone())
                    .with_mode(AttentionMode::Cross)
                    .with_dropout(0.0)
                    .init(device)
                    .map_err(|e| ModelConfigError::attention(format!("{path}.attention"), e))?,
            ),
            SetStyle::Reference => MabAttention::Reference(ReferenceAttention {
                query: LinearConfig::new(d, d).init(device),
                key: LinearConfig::new(d, d).init(device),
                value: LinearConfig::new(d, d).init(device),
                n_heads: self.n_heads,
            }),
        };
        Ok(Mab {
            attention,
            feed_forward: LinearConfig::new(d, d).init(device),
            norm_attention: norm(),
            norm_feed_forward: norm(),
        })
    }

    /// `count` learned vectors (inducing points or seeds), `[1, count, d]`, Xavier-uniform with
    /// the fans PyTorch's `xavier_uniform_` gives that shape in the reference (fan in
    /// `count · d`, fan out `d`).
    fn points(&self, count: usize, device: &Device) -> Param<Tensor<3>> {
        Initializer::XavierUniform { gain: 1.0 }.init_with(
            [1, count, self.d_model],
            Some(count * self.d_model),
            Some(self.d_model),
            device,
        )
    }

    /// `SAB(X) = MAB(X, X)`.
    ///
    /// # Errors
    /// An invalid attention configuration, at `path`.
    pub fn sab(&self, path: &str, device: &Device) -> Result<Sab, ModelConfigError> {
        Ok(Sab {
            mab: self.mab(path, device)?,
        })
    }

    /// `ISAB_m(X) = MAB(X, MAB(I_m, X))`.
    ///
    /// # Errors
    /// An invalid attention configuration, at `path`.
    pub fn isab(
        &self,
        inducing: usize,
        path: &str,
        device: &Device,
    ) -> Result<Isab, ModelConfigError> {
        Ok(Isab {
            inducing: self.points(inducing.max(1), device),
            summarise: self.mab(path, device)?,
            read: self.mab(path, device)?,
        })
    }

    /// `PMA_k(Z) = MAB(S_k, rFF(Z))` (reference style: without the rFF).
    ///
    /// # Errors
    /// An invalid attention configuration, at `path`.
    pub fn pma(&self, seeds: usize, path: &str, device: &Device) -> Result<Pma, ModelConfigError> {
        Ok(Pma {
            seeds: self.points(seeds.max(1), device),
            feed_forward: (self.style == SetStyle::Paper)
                .then(|| LinearConfig::new(self.d_model, self.d_model).init(device)),
            mab: self.mab(path, device)?,
        })
    }
}

/// The reference code's attention: `Q W_q + softmax(Q W_q (K W_k)ᵀ / √d_model) V W_v`, heads
/// split from the projections, no output projection.
#[derive(Module, Debug)]
pub struct ReferenceAttention {
    /// `fc_q`.
    pub query: Linear,
    /// `fc_k`.
    pub key: Linear,
    /// `fc_v`.
    pub value: Linear,
    n_heads: usize,
}

impl ReferenceAttention {
    /// # Shapes
    /// - x: `[batch, n, d]`, y: `[batch, m, d]`, y_pad: `[batch, m]` → `[batch, n, d]`
    fn forward(&self, x: Tensor<3>, y: Tensor<3>, y_pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let m = y.dims()[1];
        let h = self.n_heads;
        let split = |t: Tensor<3>, len: usize| t.reshape([b, len, h, d / h]).swap_dims(1, 2);
        let q = self.query.forward(x);
        let k = split(self.key.forward(y.clone()), m);
        let v = split(self.value.forward(y), m);
        let mut scores = split(q.clone(), n)
            .matmul(k.swap_dims(2, 3))
            .div_scalar((d as f64).sqrt());
        if let Some(pad) = y_pad {
            scores = scores.mask_fill(pad.reshape([b, 1, 1, m]).expand([b, h, n, m]), -1e30);
        }
        let a = softmax(scores, 3).matmul(v);
        q + a.swap_dims(1, 2).reshape([b, n, d])
    }
}

/// The attention of a [`Mab`].
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum MabAttention {
    /// `MHA(X, Y, Y)` through `efficient-attn` (with `W_O`).
    Paper(MultiHeadAttention<Attention>),
    /// The reference code's attention.
    Reference(ReferenceAttention),
}

/// A multihead attention block `MAB(X, Y)`.
#[derive(Module, Debug)]
pub struct Mab {
    /// The attention from X to Y.
    pub attention: MabAttention,
    /// The row-wise feed-forward `rFF(H) = ReLU(H W + b)`.
    pub feed_forward: Linear,
    /// LayerNorm after the attention residual, if configured.
    pub norm_attention: Option<LayerNorm>,
    /// LayerNorm after the feed-forward residual, if configured.
    pub norm_feed_forward: Option<LayerNorm>,
}

impl Mab {
    /// This block after optimiser step `step` (its attention core's per-step state,
    /// [`AttentionCore::at_step`](efficient_attn::AttentionCore::at_step)).
    pub fn at_step(mut self, step: usize) -> Self {
        self.attention = match self.attention {
            MabAttention::Paper(mha) => MabAttention::Paper(mha.at_step(step)),
            reference => reference,
        };
        self
    }

    /// X attends to Y (padded elements of Y masked).
    ///
    /// # Shapes
    /// - x: `[batch, n, d]`, y: `[batch, m, d]`, y_pad: `[batch, m]` → `[batch, n, d]`
    pub fn forward(&self, x: Tensor<3>, y: Tensor<3>, y_pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let h = match &self.attention {
            MabAttention::Paper(mha) => {
                let mut input = MhaInput::cross(x.clone(), y);
                if let Some(pad) = y_pad {
                    input = input.mask_pad_context(pad);
                }
                x + mha.forward(input)
            }
            MabAttention::Reference(attn) => attn.forward(x, y, y_pad),
        };
        let norm = |t: Tensor<3>, n: &Option<LayerNorm>| match n {
            Some(n) => n.forward(t),
            None => t,
        };
        let h = norm(h, &self.norm_attention);
        let out = h.clone() + relu(self.feed_forward.forward(h));
        norm(out, &self.norm_feed_forward)
    }
}

/// Set attention block `SAB(X) = MAB(X, X)`: O(n²), permutation-equivariant.
#[derive(Module, Debug)]
pub struct Sab {
    /// The block.
    pub mab: Mab,
}

impl Sab {
    /// This block after optimiser step `step` ([`Mab::at_step`]).
    pub fn at_step(mut self, step: usize) -> Self {
        self.mab = self.mab.at_step(step);
        self
    }

    /// # Shapes
    /// - x: `[batch, n, d]`, pad: `[batch, n]` → `[batch, n, d]`
    pub fn forward(&self, x: Tensor<3>, pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        self.mab.forward(x.clone(), x, pad)
    }
}

/// Induced set attention block `ISAB_m(X) = MAB(X, MAB(I_m, X))`: O(n·m),
/// permutation-equivariant.
#[derive(Module, Debug)]
pub struct Isab {
    /// The inducing points `I_m`, `[1, m, d]`.
    pub inducing: Param<Tensor<3>>,
    /// `H = MAB(I_m, X)`: m summaries of the set (permutation-invariant).
    pub summarise: Mab,
    /// `MAB(X, H)`.
    pub read: Mab,
}

impl Isab {
    /// This block after optimiser step `step` ([`Mab::at_step`]).
    pub fn at_step(mut self, step: usize) -> Self {
        self.summarise = self.summarise.at_step(step);
        self.read = self.read.at_step(step);
        self
    }

    /// # Shapes
    /// - x: `[batch, n, d]`, pad: `[batch, n]` → `[batch, n, d]`
    pub fn forward(&self, x: Tensor<3>, pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let [b, _, d] = x.dims();
        let m = self.inducing.val().dims()[1];
        let points = self.inducing.val().expand([b, m, d]);
        let h = self.summarise.forward(points, x.clone(), pad);
        self.read.forward(x, h, None)
    }
}

/// Pooling by multihead attention `PMA_k(Z) = MAB(S_k, rFF(Z))`: O(k·n),
/// permutation-invariant.
#[derive(Module, Debug)]
pub struct Pma {
    /// The seeds `S_k`, `[1, k, d]`.
    pub seeds: Param<Tensor<3>>,
    /// `rFF` before pooling (paper style only).
    pub feed_forward: Option<Linear>,
    /// `MAB(S_k, ·)`.
    pub mab: Mab,
}

impl Pma {
    /// This block after optimiser step `step` ([`Mab::at_step`]).
    pub fn at_step(mut self, step: usize) -> Self {
        self.mab = self.mab.at_step(step);
        self
    }

    /// # Shapes
    /// - z: `[batch, n, d]`, pad: `[batch, n]` → `[batch, k, d]`
    pub fn forward(&self, z: Tensor<3>, pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let [b, _, d] = z.dims();
        let k = self.seeds.val().dims()[1];
        let z = match &self.feed_forward {
            Some(f) => relu(f.forward(z)),
            None => z,
        };
        self.mab.forward(self.seeds.val().expand([b, k, d]), z, pad)
    }
}

/// Configuration of a [`SetTransformer`]: the reference's `SetTransformer` shape (width 128,
/// 4 heads, two ISABs of 32 inducing points, PMA, two SABs, a linear head), with the paper's
/// blocks by default ([`SetBlockConfig`]: LayerNorm on; the reference runs without) and an
/// input layer `d_input → d_model` before the first block (the reference's first ISAB
/// projects its input width itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct SetTransformerConfig {
    /// Width, heads, style, LayerNorm and attention of every block.
    pub blocks: SetBlockConfig,
    /// Width of each input element.
    pub d_input: usize,
    /// Encoder blocks.
    pub encoder_layers: usize,
    /// Inducing points of each encoder ISAB; 0: SABs (O(n²)).
    pub inducing: usize,
    /// Seeds of the PMA (outputs per set).
    pub seeds: usize,
    /// SABs over the pooled seeds.
    pub decoder_layers: usize,
    /// Width of each output.
    pub d_output: usize,
}

impl Default for SetTransformerConfig {
    fn default() -> Self {
        Self {
            blocks: SetBlockConfig::default(),
            d_input: 1,
            encoder_layers: 2,
            inducing: 32,
            seeds: 1,
            decoder_layers: 2,
            d_output: 1,
        }
    }
}

impl SetTransformerConfig {
    /// Builds the model.
    ///
    /// # Errors
    /// The key path of an invalid setting.
    pub fn init(&self, device: &Device) -> Result<SetTransformer, ModelConfigError> {
        for (key, v) in [
            ("d_input", self.d_input),
            ("seeds", self.seeds),
            ("d_output", self.d_output),
        ] {
            if v == 0 {
                return Err(ModelConfigError::new(
                    format!("set.{key}"),
                    "a positive integer",
                ));
            }
        }
        let b = &self.blocks;
        let encoder = (0..self.encoder_layers)
            .map(|i| {
                let path = format!("set.encoder[{i}]");
                Ok(if self.inducing > 0 {
                    SetEncoderBlock::Isab(b.isab(self.inducing, &path, device)?)
                } else {
                    SetEncoderBlock::Sab(b.sab(&path, device)?)
                })
            })
            .collect::<Result<Vec<_>, ModelConfigError>>()?;
        Ok(SetTransformer {
            input: LinearConfig::new(self.d_input, b.d_model).init(device),
            encoder,
            pool: b.pma(self.seeds, "set.pool", device)?,
            decoder: (0..self.decoder_layers)
                .map(|i| b.sab(&format!("set.decoder[{i}]"), device))
                .collect::<Result<_, _>>()?,
            output: LinearConfig::new(b.d_model, self.d_output).init(device),
        })
    }
}

/// An encoder block of a [`SetTransformer`].
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum SetEncoderBlock {
    /// `SAB`.
    Sab(Sab),
    /// `ISAB_m`.
    Isab(Isab),
}

/// The Set Transformer: `Linear → (I)SAB… → PMA_k → SAB… → Linear`, permutation-invariant in
/// the elements of each set.
#[derive(Module, Debug)]
pub struct SetTransformer {
    /// Element embedding `d_input → d_model`.
    pub input: Linear,
    /// Encoder blocks.
    pub encoder: Vec<SetEncoderBlock>,
    /// Pooling.
    pub pool: Pma,
    /// SABs over the k pooled vectors.
    pub decoder: Vec<Sab>,
    /// Output layer `d_model → d_output`.
    pub output: Linear,
}

impl SetTransformer {
    /// This model after optimiser step `step`: its attention cores' per-step state (the
    /// training loop calls it after every step).
    pub fn at_step(mut self, step: usize) -> Self {
        self.encoder = self
            .encoder
            .into_iter()
            .map(|b| match b {
                SetEncoderBlock::Sab(s) => SetEncoderBlock::Sab(s.at_step(step)),
                SetEncoderBlock::Isab(i) => SetEncoderBlock::Isab(i.at_step(step)),
            })
            .collect();
        self.pool = self.pool.at_step(step);
        self.decoder = self.decoder.into_iter().map(|b| b.at_step(step)).collect();
        self
    }

    /// One output vector per seed for every set (padded elements masked).
    ///
    /// # Shapes
    /// - x: `[batch, n, d_input]`, pad: `[batch, n]` (`true` = padded) → `[batch, k, d_output]`
    pub fn forward(&self, x: Tensor<3>, pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let mut h = self.input.forward(x);
        for block in &self.encoder {
            h = match block {
                SetEncoderBlock::Sab(b) => b.forward(h, pad.clone()),
                SetEncoderBlock::Isab(b) => b.forward(h, pad.clone()),
            };
        }
        let mut z = self.pool.forward(h, pad);
        for block in &self.decoder {
            z = block.forward(z, None);
        }
        self.output.forward(z)
    }
}
