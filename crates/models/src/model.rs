//! Complete models: encoder, sequence and token classifiers, decoder-only language model and
//! encoder-decoder sequence-to-sequence model.
//!
//! Over 600 lines on purpose: the five model types share their input type, heads and
//! decoding state, and each is a thin layer over [`Stack`](crate::Stack); one file per model
//! would split ~100-line types and their shared helpers across six files.

use burn::module::{Module, ModuleDisplay};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Int, Tensor};
use efficient_attn::{
    Attention, AttentionConfig, AttentionCore, AttentionMode, CoreConfig, Extras, MhaCache,
    ProjectedContext, WithExtras,
};

use crate::compressive::{CompressiveConfig, CompressiveMemory};
use crate::config::{ModelConfigError, StackConfig};
use crate::embedding::{EmbeddingSettings, TokenEmbedding};
use crate::funnel::{FunnelConfig, FunnelPlan};
use crate::memory::{Segment, SegmentMemory};
use crate::mixture_of_experts::AuxTerms;
use crate::stack::{Stack, StackSpec};

/// What an encoder reads: tokens, optional token types, and the [`Extras`] the sequence
/// carries (padding, global tokens, grid), set with the [`WithExtras`] builders.
///
/// # Shapes
/// - tokens, token_types: `[batch, seq]`; `extras.mask_pad`: `[batch, seq]`, `true` = padding
#[derive(Clone, Debug)]
pub struct EncoderInput {
    /// Token ids.
    pub tokens: Tensor<2, Int>,
    /// Token types (BERT segments).
    pub token_types: Option<Tensor<2, Int>>,
    /// Padding, global tokens, grid and side inputs.
    pub extras: Extras,
}

impl WithExtras for EncoderInput {
    fn extras_mut(&mut self) -> &mut Extras {
        &mut self.extras
    }
}

impl EncoderInput {
    /// Tokens without padding.
    pub fn new(tokens: Tensor<2, Int>) -> Self {
        Self {
            tokens,
            token_types: None,
            extras: Extras::new(),
        }
    }

    /// Sets the token types.
    pub fn with_token_types(mut self, types: Tensor<2, Int>) -> Self {
        self.token_types = Some(types);
        self
    }
}

/// Configuration of an [`Encoder`]; `A` configures the attention (see [`StackConfig`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "burn::serde",
    default,
    deny_unknown_fields,
    bound(deserialize = "A: Deserialize<'de> + Default")
)]
pub struct EncoderConfig<A = AttentionConfig> {
    /// Embeddings.
    pub embedding: EmbeddingSettings,
    /// Layers (bidirectional self-attention).
    pub stack: StackConfig<A>,
    /// Funnel pooling between blocks of layers (`[model.funnel]`; [`FunnelConfig`]).
    pub funnel: Option<FunnelConfig<A>>,
}

impl<A: CoreConfig> EncoderConfig<A> {
    /// Builds the encoder.
    ///
    /// # Errors
    /// The key path of an invalid setting.
    pub fn init(&self, device: &Device) -> Result<Encoder<A::Core>, ModelConfigError> {
        fn spec<'a, A>(
            config: &'a StackConfig<A>,
            rotary: Option<efficient_attn::RotaryConfig>,
            funnel: Option<&'a FunnelConfig<A>>,
        ) -> StackSpec<'a, A> {
            StackSpec {
                config,
                name: "encoder",
                mode: AttentionMode::Bidirectional,
                rotary,
                cross: None,
                d_context: config.d_model,
                funnel,
            }
        }
        let rotary = self.embedding.rotary();
        let upsample = match &self.funnel {
            Some(f) if f.upsample_layers > 0 => {
                let config = StackConfig {
                    n_layers: f.upsample_layers,
                    attention_layers: None,
                    attention_pattern: None,
                    ..self.stack.clone()
                };
                Some(Stack::new(spec(&config, rotary.clone(), None), device)?)
            }
            _ => None,
        };
        Ok(Encoder {
            embedding: self
                .embedding
                .init(self.stack.d_model, "embedding", device)?,
            stack: Stack::new(spec(&self.stack, rotary, self.funnel.as_ref()), device)?,
            upsample,
            funnel: self.funnel.as_ref().map(FunnelConfig::plan),
        })
    }
}

/// Embeddings and a bidirectional stack over the attention core `C` ([`Attention`] by
/// default, or your own [`AttentionCore`]).
#[derive(Module, Debug)]
pub struct Encoder<C = Attention> {
    /// Embeddings.
    pub embedding: TokenEmbedding,
    /// Layers.
    pub stack: Stack<C>,
    /// A funnel's up-sampling layers (full length, after the pooled blocks).
    pub upsample: Option<Stack<C>>,
    #[module(skip)]
    funnel: Option<FunnelPlan>,
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> Encoder<C> {
    /// The extra terms of the training forwards on `device` since the last call, taken
    /// ([`Stack::aux_terms`]).
    pub fn aux_terms(&self, device: &Device) -> AuxTerms {
        let mut terms = self.stack.aux_terms(device);
        if let Some(up) = &self.upsample {
            let more = up.aux_terms(device);
            terms.loss = match (terms.loss, more.loss) {
                (Some(a), Some(b)) => Some(a.add(b)),
                (a, b) => a.or(b),
            };
            terms.routing.extend(more.routing);
        }
        terms
    }

    /// The loss terms of [`aux_terms`](Self::aux_terms) alone (taken).
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.aux_terms(device).loss
    }

    /// This model after optimiser step `step`: its attention cores' per-step state
    /// ([`AttentionCore::at_step`]; the training loop calls it after every step).
    pub fn at_step(mut self, step: usize) -> Self {
        self.stack = self.stack.at_step(step);
        self.upsample = self.upsample.map(|s| s.at_step(step));
        self
    }

    /// The funnel plan, if the encoder pools ([`FunnelConfig`]).
    pub fn funnel(&self) -> Option<&FunnelPlan> {
        self.funnel.as_ref()
    }

    /// # Shapes
    /// - input: see [`EncoderInput`]
    /// - output: `[batch, seq, d_model]`; a funnel without up-sampling returns its last
    ///   block's pooled `[batch, seq', d_model]` ([`forward_masked`](Self::forward_masked)
    ///   gives its padding)
    pub fn forward(&self, input: EncoderInput) -> Tensor<3> {
        self.forward_masked(input).0
    }

    /// [`forward`](Self::forward) and the padding of its output (the input's, or a funnel's
    /// pooled padding).
    ///
    /// # Shapes
    /// - output: `[batch, seq', d_model]` and `[batch, seq']`
    pub fn forward_masked(&self, input: EncoderInput) -> (Tensor<3>, Option<Tensor<2, Bool>>) {
        let x = self.embedding.forward(input.tokens, input.token_types, 0);
        let Some(plan) = &self.funnel else {
            let mask = input.extras.mask_pad.clone();
            return (self.stack.forward(x, input.extras, &[]), mask);
        };
        let n = x.dims()[1];
        let out = plan.run(&self.stack, x, input.extras);
        match &self.upsample {
            None => (out.output, out.extras.mask_pad),
            Some(up) => {
                let (first, extras) = out.first;
                let pools = plan.blocks.len() - 1;
                let x = plan.upsample(out.output, n, pools).add(first);
                let mask = extras.mask_pad.clone();
                (up.forward(x, extras, &[]), mask)
            }
        }
    }
}

/// How a sequence classifier reduces the sequence to one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum Pooling {
    /// The first position (a CLS token the data pipeline prepends; LRA, BERT).
    #[default]
    Cls,
    /// The mean over unpadded positions.
    Mean,
}

/// Configuration of a [`SequenceClassifier`] or [`TokenClassifier`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "burn::serde",
    default,
    deny_unknown_fields,
    bound(deserialize = "A: Deserialize<'de> + Default")
)]
pub struct ClassifierConfig<A = AttentionConfig> {
    /// The encoder.
    pub encoder: EncoderConfig<A>,
    /// Number of classes.
    pub n_classes: usize,
    /// Pooling (sequence classification only).
    pub pooling: Pooling,
    /// Dropout before the output layer.
    pub dropout: f64,
}

impl<A: Default> Default for ClassifierConfig<A> {
    fn default() -> Self {
        Self {
            encoder: EncoderConfig::default(),
            n_classes: 2,
            pooling: Pooling::Cls,
            dropout: 0.1,
        }
    }
}

impl<A: CoreConfig> ClassifierConfig<A> {
    fn check(&self) -> Result<(), ModelConfigError> {
        if self.n_classes < 2 {
            return Err(ModelConfigError::new("n_classes", "at least 2 classes"));
        }
        Ok(())
    }

    /// Builds a sequence classifier.
    ///
    /// # Errors
    /// The key path of an invalid setting.
    pub fn init_sequence(
        &self,
        device: &Device,
    ) -> Result<SequenceClassifier<A::Core>, ModelConfigError> {
        self.check()?;
        Ok(SequenceClassifier {
            encoder: self.encoder.init(device)?,
            dropout: DropoutConfig::new(self.dropout).init(),
            output: LinearConfig::new(self.encoder.stack.d_model, self.n_classes).init(device),
            pooling: self.pooling,
        })
    }

    /// Builds a token classifier.
    ///
    /// # Errors
    /// The key path of an invalid setting.
    pub fn init_token(
        &self,
        device: &Device,
    ) -> Result<TokenClassifier<A::Core>, ModelConfigError> {
        self.check()?;
        if self
            .encoder
            .funnel
            .as_ref()
            .is_some_and(|f| f.upsample_layers == 0)
        {
            return Err(ModelConfigError::new(
                "funnel.upsample_layers",
                "at least 1 for token-level outputs (the pooled sequence has fewer positions \
                 than the input; paper: 2)",
            ));
        }
        Ok(TokenClassifier {
            encoder: self.encoder.init(device)?,
            dropout: DropoutConfig::new(self.dropout).init(),
            output: LinearConfig::new(self.encoder.stack.d_model, self.n_classes).init(device),
        })
    }
}

/// Encoder, pooling and a linear layer: one label per sequence.
#[derive(Module, Debug)]
pub struct SequenceClassifier<C = Attention> {
    /// The encoder.
    pub encoder: Encoder<C>,
    /// Dropout before the output layer.
    pub dropout: Dropout,
    /// Output layer.
    pub output: Linear,
    #[module(skip)]
    pooling: Pooling,
}

/// The mean of `h` over unpadded positions.
///
/// # Shapes
/// - h: `[batch, seq, d]`, mask_pad: `[batch, seq]` → `[batch, d]`
pub fn mean_pool(h: Tensor<3>, mask_pad: Option<Tensor<2, Bool>>) -> Tensor<2> {
    let [b, n, d] = h.dims();
    match mask_pad {
        None => h.mean_dim(1).reshape([b, d]),
        Some(mask) => {
            let keep = mask.bool_not().float().reshape([b, n, 1]); // [batch, seq, 1]
            let count = keep.clone().sum_dim(1).clamp_min(1.0); // [batch, 1, 1]
            h.mul(keep).sum_dim(1).div(count).reshape([b, d])
        }
    }
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> SequenceClassifier<C> {
    /// The extra terms of the training forwards on `device` since the last call, taken
    /// ([`Stack::aux_terms`]).
    pub fn aux_terms(&self, device: &Device) -> AuxTerms {
        self.encoder.aux_terms(device)
    }

    /// The loss terms of [`aux_terms`](Self::aux_terms) alone (taken).
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.aux_terms(device).loss
    }
    /// This model after optimiser step `step`: its attention cores' per-step state
    /// ([`AttentionCore::at_step`]; the training loop calls it after every step).
    pub fn at_step(mut self, step: usize) -> Self {
        self.encoder = self.encoder.at_step(step);
        self
    }

    /// # Shapes
    /// - input: see [`EncoderInput`]
    /// - output: `[batch, n_classes]` logits
    pub fn forward(&self, input: EncoderInput) -> Tensor<2> {
        let (h, mask) = self.encoder.forward_masked(input); // [batch, seq', d_model]
        let [b, _, d] = h.dims();
        let pooled = match self.pooling {
            Pooling::Cls => h.narrow(1, 0, 1).reshape([b, d]),
            Pooling::Mean => mean_pool(h, mask),
        };
        self.output.forward(self.dropout.forward(pooled))
    }
}

/// Encoder and a linear layer: one label per token.
#[derive(Module, Debug)]
pub struct TokenClassifier<C = Attention> {
    /// The encoder.
    pub encoder: Encoder<C>,
    /// Dropout before the output layer.
    pub dropout: Dropout,
    /// Output layer.
    pub output: Linear,
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> TokenClassifier<C> {
    /// The extra terms of the training forwards on `device` since the last call, taken
    /// ([`Stack::aux_terms`]).
    pub fn aux_terms(&self, device: &Device) -> AuxTerms {
        self.encoder.aux_terms(device)
    }

    /// The loss terms of [`aux_terms`](Self::aux_terms) alone (taken).
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.aux_terms(device).loss
    }
    /// This model after optimiser step `step`: its attention cores' per-step state
    /// ([`AttentionCore::at_step`]; the training loop calls it after every step).
    pub fn at_step(mut self, step: usize) -> Self {
        self.encoder = self.encoder.at_step(step);
        self
    }

    /// # Shapes
    /// - input: see [`EncoderInput`]
    /// - output: `[batch, seq, n_classes]` logits
    pub fn forward(&self, input: EncoderInput) -> Tensor<3> {
        self.output
            .forward(self.dropout.forward(self.encoder.forward(input)))
    }
}

/// The language-model head: a linear layer, or the token embedding transposed (tied).
#[derive(Module, Debug)]
pub struct LmHead {
    /// Untied output layer (`None` when tied to the token embedding).
    pub output: Option<Linear>,
}

impl LmHead {
    fn new(tied: bool, d_model: usize, vocab: usize, device: &Device) -> Self {
        Self {
            output: (!tied).then(|| {
                LinearConfig::new(d_model, vocab)
                    .with_bias(false)
                    .init(device)
            }),
        }
    }

    /// # Shapes
    /// - h: `[batch, seq, d_model]` → `[batch, seq, vocab]`
    pub fn forward(&self, h: Tensor<3>, embedding: &TokenEmbedding) -> Tensor<3> {
        match &self.output {
            Some(linear) => linear.forward(h),
            None => {
                let table = embedding.tokens.weight.val(); // [vocab, d_model]
                let [b, n, d] = h.dims();
                let v = table.dims()[0];
                h.reshape([b * n, d])
                    .matmul(table.transpose())
                    .reshape([b, n, v])
            }
        }
    }
}

/// Configuration of a decoder-only [`LanguageModel`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "burn::serde",
    default,
    deny_unknown_fields,
    bound(deserialize = "A: Deserialize<'de> + Default")
)]
pub struct LanguageModelConfig<A = AttentionConfig> {
    /// Embeddings.
    pub embedding: EmbeddingSettings,
    /// Layers (causal self-attention: every variant must have a causal mode).
    pub stack: StackConfig<A>,
    /// Tie the output layer to the token embedding (Press & Wolf 2017).
    pub tie_embeddings: bool,
    /// A compressed memory beside the segment memory (Compressive Transformer); read only by
    /// [`LanguageModel::forward_segment`].
    pub compressive: Option<CompressiveConfig>,
}

impl<A: CoreConfig> LanguageModelConfig<A> {
    /// Builds the model.
    ///
    /// # Errors
    /// The key path of an invalid setting.
    pub fn init(&self, device: &Device) -> Result<LanguageModel<A::Core>, ModelConfigError> {
        Ok(LanguageModel {
            embedding: self
                .embedding
                .init(self.stack.d_model, "embedding", device)?,
            stack: Stack::new(
                StackSpec {
                    config: &self.stack,
                    name: "decoder",
                    mode: AttentionMode::Causal,
                    rotary: self.embedding.rotary(),
                    cross: None,
                    d_context: self.stack.d_model,
                    funnel: None,
                },
                device,
            )?,
            head: LmHead::new(
                self.tie_embeddings,
                self.stack.d_model,
                self.embedding.vocab_size,
                device,
            ),
            compressive: match &self.compressive {
                Some(c) => {
                    c.check("compressive")?;
                    Some(c.init(self.stack.n_layers, self.stack.d_model, device))
                }
                None => None,
            },
        })
    }
}

/// A decoder-only language model.
#[derive(Module, Debug)]
pub struct LanguageModel<C = Attention> {
    /// Embeddings.
    pub embedding: TokenEmbedding,
    /// Causal layers.
    pub stack: Stack<C>,
    /// Output head.
    pub head: LmHead,
    /// The Compressive Transformer's compressors, if configured (stream mode).
    pub compressive: Option<CompressiveMemory>,
}

/// The decoding state of a model: one cache per layer.
#[derive(Clone, Debug)]
pub struct DecodeState {
    /// Per-layer caches.
    pub layers: Vec<MhaCache>,
    /// Positions decoded so far.
    pub position: usize,
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> LanguageModel<C> {
    /// The extra terms of the training forwards on `device` since the last call, taken
    /// ([`Stack::aux_terms`]).
    pub fn aux_terms(&self, device: &Device) -> AuxTerms {
        self.stack.aux_terms(device)
    }

    /// The loss terms of [`aux_terms`](Self::aux_terms) alone (taken).
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.aux_terms(device).loss
    }
    /// This model after optimiser step `step`: its attention cores' per-step state
    /// ([`AttentionCore::at_step`]; the training loop calls it after every step).
    pub fn at_step(mut self, step: usize) -> Self {
        self.stack = self.stack.at_step(step);
        self
    }

    /// Next-token logits for every position.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`, mask_pad: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<2, Int>, mask_pad: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let extras = Extras {
            mask_pad,
            ..Default::default()
        };
        self.forward_extras(tokens, extras)
    }

    /// [`forward`](Self::forward) with everything the sequence carries (padding, side inputs
    /// such as a [`ReversibleTape`](crate::ReversibleTape)).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`; extras: padding `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward_extras(&self, tokens: Tensor<2, Int>, extras: Extras) -> Tensor<3> {
        let x = self.embedding.forward(tokens, None, 0);
        self.head
            .forward(self.stack.forward(x, extras, &[]), &self.embedding)
    }

    /// Next-token logits of a segment that follows the positions `memory` holds, and the
    /// memory the next segment reads ([`SegmentMemory::advance`]): each layer's inputs over
    /// `[memory; segment]`, the last `mem_len` positions, detached (no gradient reaches an
    /// earlier segment); with a [`CompressiveMemory`], the evicted positions compressed into
    /// the second memory and, on an autodiff device, the reconstruction loss. Position
    /// embeddings, if the model has absolute ones, restart at 0 in every segment
    /// (Transformer-XL's layers bring relative positions and take `positions = "none"`).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`, mask_pad: `[batch, seq]`
    /// - output: logits `[batch, seq, vocab]`
    pub fn forward_segment(
        &self,
        tokens: Tensor<2, Int>,
        mask_pad: Option<Tensor<2, Bool>>,
        memory: &SegmentMemory,
        mem_len: usize,
    ) -> Segment {
        let extras = Extras {
            mask_pad,
            ..Default::default()
        };
        let x = self.embedding.forward(tokens, None, 0);
        let (h, inputs) = self
            .stack
            .forward_with_memory(x, extras, &memory.attended());
        let (memory, reconstruction) = memory.advance(
            &self.stack.layers,
            inputs,
            mem_len,
            self.compressive.as_ref(),
        );
        Segment {
            logits: self.head.forward(h, &self.embedding),
            memory,
            reconstruction,
        }
    }

    /// An empty decoding state for `batch` sequences of up to `max_len` positions, or an error
    /// naming a layer whose variant cannot decode incrementally.
    pub fn init_state(
        &self,
        batch: usize,
        max_len: usize,
        device: &Device,
    ) -> Result<DecodeState, String> {
        let layers = self
            .stack
            .init_caches(batch, max_len.min(self.embedding.max_len()), device)
            .ok_or("a layer's attention variant has no incremental decoding cache")?;
        Ok(DecodeState {
            layers,
            position: 0,
        })
    }

    /// Logits for `t` new tokens given the state of the earlier ones; equal to the last `t`
    /// rows of [`forward`](Self::forward) over the whole sequence.
    ///
    /// # Shapes
    /// - tokens: `[batch, t]` → `[batch, t, vocab]`
    pub fn step(&self, tokens: Tensor<2, Int>, state: &mut DecodeState) -> Tensor<3> {
        let t = tokens.dims()[1];
        let x = self.embedding.forward(tokens, None, state.position);
        state.position += t;
        let h = self.stack.forward_step(x, &mut state.layers, &[]);
        self.head.forward(h, &self.embedding)
    }

    /// Continues `prompt` by `max_new` tokens with `sampler`, decoding incrementally.
    ///
    /// # Shapes
    /// - prompt: `[batch, p]` → `[batch, p + max_new]`
    pub fn generate(
        &self,
        prompt: Tensor<2, Int>,
        max_new: usize,
        sampler: &mut crate::generate::Sampler,
    ) -> Result<Tensor<2, Int>, String> {
        let [b, p] = prompt.dims();
        let device = prompt.device();
        let mut state = self.init_state(b, p + max_new, &device)?;
        let mut logits = self.step(prompt.clone(), &mut state);
        let mut out = vec![prompt];
        for _ in 0..max_new {
            let n = logits.dims()[1];
            let next = sampler.sample(logits.narrow(1, n - 1, 1));
            out.push(next.clone());
            logits = self.step(next, &mut state);
        }
        Ok(Tensor::cat(out, 1))
    }
}

/// Configuration of a [`Seq2Seq`] encoder-decoder model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "burn::serde",
    default,
    deny_unknown_fields,
    bound(deserialize = "A: Deserialize<'de> + Default")
)]
pub struct Seq2SeqConfig<A = AttentionConfig> {
    /// Embeddings shared by source and target.
    pub embedding: EmbeddingSettings,
    /// Encoder layers.
    pub encoder: StackConfig<A>,
    /// Decoder layers (causal self-attention).
    pub decoder: StackConfig<A>,
    /// Decoder-to-encoder attention (full by default).
    pub cross_attention: A,
    /// Tie the output layer to the token embedding.
    pub tie_embeddings: bool,
}

impl<A: Default> Default for Seq2SeqConfig<A> {
    fn default() -> Self {
        Self {
            embedding: EmbeddingSettings::default(),
            encoder: StackConfig::default(),
            decoder: StackConfig::default(),
            cross_attention: A::default(),
            tie_embeddings: true,
        }
    }
}

impl<A: CoreConfig> Seq2SeqConfig<A> {
    /// Builds the model.
    ///
    /// # Errors
    /// The key path of an invalid setting.
    pub fn init(&self, device: &Device) -> Result<Seq2Seq<A::Core>, ModelConfigError> {
        if self.encoder.d_model != self.decoder.d_model {
            return Err(ModelConfigError::new(
                "decoder.d_model",
                format!(
                    "the encoder's width {} (embeddings are shared)",
                    self.encoder.d_model
                ),
            ));
        }
        let rotary = self.embedding.rotary();
        Ok(Seq2Seq {
            embedding: self
                .embedding
                .init(self.encoder.d_model, "embedding", device)?,
            encoder: Stack::new(
                StackSpec {
                    config: &self.encoder,
                    name: "encoder",
                    mode: AttentionMode::Bidirectional,
                    rotary: rotary.clone(),
                    cross: None,
                    d_context: self.encoder.d_model,
                    funnel: None,
                },
                device,
            )?,
            decoder: Stack::new(
                StackSpec {
                    config: &self.decoder,
                    name: "decoder",
                    mode: AttentionMode::Causal,
                    rotary,
                    cross: Some(&self.cross_attention),
                    d_context: self.encoder.d_model,
                    funnel: None,
                },
                device,
            )?,
            head: LmHead::new(
                self.tie_embeddings,
                self.decoder.d_model,
                self.embedding.vocab_size,
                device,
            ),
        })
    }
}

/// An encoder-decoder model with cross-attention.
#[derive(Module, Debug)]
pub struct Seq2Seq<C = Attention> {
    /// Shared embeddings.
    pub embedding: TokenEmbedding,
    /// Encoder.
    pub encoder: Stack<C>,
    /// Decoder.
    pub decoder: Stack<C>,
    /// Output head.
    pub head: LmHead,
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> Seq2Seq<C> {
    /// The extra terms of the training forwards on `device` since the last call, taken
    /// ([`Stack::aux_terms`]; the decoder's layers counted after the encoder's).
    pub fn aux_terms(&self, device: &Device) -> AuxTerms {
        let offset = self.encoder.layers.len();
        self.encoder
            .aux_terms(device)
            .merge(self.decoder.aux_terms(device), offset)
    }

    /// The loss terms of [`aux_terms`](Self::aux_terms) alone (taken).
    pub fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        self.aux_terms(device).loss
    }
    /// This model after optimiser step `step`: its attention cores' per-step state
    /// ([`AttentionCore::at_step`]; the training loop calls it after every step).
    pub fn at_step(mut self, step: usize) -> Self {
        self.encoder = self.encoder.at_step(step);
        self.decoder = self.decoder.at_step(step);
        self
    }

    /// Encodes the source and projects it for every decoder layer's cross-attention.
    ///
    /// # Shapes
    /// - source, mask_pad: `[batch, seq_src]`
    pub fn encode(
        &self,
        source: Tensor<2, Int>,
        mask_pad: Option<Tensor<2, Bool>>,
    ) -> Vec<ProjectedContext> {
        let x = self.embedding.forward(source, None, 0);
        let extras = Extras {
            mask_pad: mask_pad.clone(),
            ..Default::default()
        };
        let memory = self.encoder.forward(x, extras, &[]);
        self.decoder.project_contexts(memory, mask_pad)
    }

    /// Teacher-forced logits.
    ///
    /// # Shapes
    /// - source, source_pad: `[batch, seq_src]`; target, target_pad: `[batch, seq_tgt]`
    /// - output: `[batch, seq_tgt, vocab]`
    pub fn forward(
        &self,
        source: Tensor<2, Int>,
        source_pad: Option<Tensor<2, Bool>>,
        target: Tensor<2, Int>,
        target_pad: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let contexts = self.encode(source, source_pad);
        let x = self.embedding.forward(target, None, 0);
        let extras = Extras {
            mask_pad: target_pad,
            ..Default::default()
        };
        self.head
            .forward(self.decoder.forward(x, extras, &contexts), &self.embedding)
    }

    /// Generates up to `max_len` target tokens after `bos`, stopping a sequence at `eos`
    /// (later positions repeat `eos`).
    ///
    /// # Shapes
    /// - source, source_pad: `[batch, seq_src]` → `[batch, 1 + generated]`
    pub fn generate(
        &self,
        source: Tensor<2, Int>,
        source_pad: Option<Tensor<2, Bool>>,
        bos: usize,
        eos: Option<usize>,
        max_len: usize,
        sampler: &mut crate::generate::Sampler,
    ) -> Result<Tensor<2, Int>, String> {
        let [b, _] = source.dims();
        let device = source.device();
        let contexts = self.encode(source, source_pad);
        let mut caches = self
            .decoder
            .init_caches(b, max_len + 1, &device)
            .ok_or("a decoder layer's attention variant has no incremental decoding cache")?;
        let mut token = Tensor::<2, Int>::full([b, 1], bos as i64, &device);
        let mut out = vec![token.clone()];
        let mut done = vec![false; b];
        for position in 0..max_len {
            let x = self.embedding.forward(token, None, position);
            let h = self.decoder.forward_step(x, &mut caches, &contexts);
            let next = sampler.sample(self.head.forward(h, &self.embedding));
            let mut ids: Vec<i64> = next
                .to_data()
                .convert::<i64>()
                .try_to_vec()
                .map_err(|e| format!("{e:?}"))?;
            if let Some(eos) = eos {
                for (i, id) in ids.iter_mut().enumerate() {
                    if done[i] {
                        *id = eos as i64;
                    }
                    done[i] |= *id == eos as i64;
                }
            }
            token = Tensor::from_data(burn::tensor::TensorData::new(ids, [b, 1]), &device);
            out.push(token.clone());
            if done.iter().all(|d| *d) {
                break;
            }
        }
        Ok(Tensor::cat(out, 1))
    }
}
