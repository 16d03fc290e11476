//! The one interface every attention variant implements, at the q/k/v boundary.
//!
//! A variant receives already-projected heads (`[batch, heads, seq, d]`) and returns the attended
//! values ([`AttentionCore`]); its configuration builds it and states what it needs
//! ([`CoreConfig`]). Projections, head split/merge and dropout live in exactly one place,
//! [`MultiHeadAttention`](crate::MultiHeadAttention), which takes any core, ours or yours.

use std::fmt;

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Tensor};

use crate::decoding::{DecodeCache, KvCache};
use crate::error::ConfigError;
use crate::extras::{Extras, Grid, SharedParameterSpec, WithExtras};

/// The masking regime an attention layer runs in, fixed when the layer is built.
///
/// Asking a variant for a mode it does not support is a [`ConfigError`](crate::ConfigError)
/// at `init`, never a silent fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum AttentionMode {
    /// Self-attention where every query may see every (unpadded) key: encoders.
    Bidirectional,
    /// Query `i` sees key `j` only if `j <= i + (seq_k - seq_q)`: the causal mask is aligned to
    /// the bottom-right corner, so keys may include a memory of earlier positions
    /// (Transformer-XL) or a decoding cache. Requires `seq_k >= seq_q`.
    Causal,
    /// Queries and keys come from different sequences (`seq_q != seq_k` allowed), no causality:
    /// encoder-decoder attention.
    Cross,
}

impl AttentionMode {
    /// All modes, in the order the CLI lists them.
    pub const ALL: [AttentionMode; 3] = [Self::Bidirectional, Self::Causal, Self::Cross];

    /// The kebab-case name used in TOML and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bidirectional => "bidirectional",
            Self::Causal => "causal",
            Self::Cross => "cross",
        }
    }

    /// Whether the causal (bottom-right aligned) mask applies.
    pub fn is_causal(self) -> bool {
        self == Self::Causal
    }
}

impl fmt::Display for AttentionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How close a variant is to exact softmax attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exactness {
    /// Always equal to dense softmax attention (up to floating-point rounding).
    Exact,
    /// Equal to dense softmax attention under the stated pattern or condition.
    ExactWhen(&'static str),
    /// An approximation; the text says of what and how the error behaves.
    Approximate(&'static str),
}

impl fmt::Display for Exactness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact => f.write_str("exact"),
            Self::ExactWhen(cond) => write!(f, "exact {cond}"),
            Self::Approximate(what) => write!(f, "approximate: {what}"),
        }
    }
}

/// What a variant is, for `efformer attention list`, docs, benchmarks and the contract suite.
///
/// Build one for your own core with [`VariantInfo::new`] and the `const` builders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VariantInfo {
    /// The `kind` that selects it in TOML, e.g. `"memory-efficient"`.
    pub kind: &'static str,
    /// Paper (authors, year, arXiv id).
    pub paper: &'static str,
    /// Supported modes.
    pub modes: &'static [AttentionMode],
    /// Time cost in terms of N (sequence length), d (head width) and the variant's parameters.
    pub time: &'static str,
    /// Extra memory of the forward pass (beyond inputs and output).
    pub memory: &'static str,
    /// Exactness against dense softmax attention.
    pub exactness: Exactness,
    /// Whether inputs must carry a 2-D layout ([`Extras::grid`]).
    pub needs_grid: bool,
    /// Whether it reads global tokens ([`Extras::global`]): Longformer's CLS token, ETC's
    /// global prefix. Variants that choose their own (BigBird's global blocks) do not.
    pub global_tokens: bool,
    /// For a causal variant that does not decode incrementally: why decoding cannot equal its
    /// causal forward (the decoding test requires a cache or a reason).
    pub cannot_decode: Option<&'static str>,
}

impl VariantInfo {
    /// A variant that needs no grid and has no global tokens.
    pub const fn new(
        kind: &'static str,
        paper: &'static str,
        modes: &'static [AttentionMode],
        time: &'static str,
        memory: &'static str,
        exactness: Exactness,
    ) -> Self {
        Self {
            kind,
            paper,
            modes,
            time,
            memory,
            exactness,
            needs_grid: false,
            global_tokens: false,
            cannot_decode: None,
        }
    }

    /// A causal variant that cannot decode incrementally, and why.
    pub const fn without_decoding(mut self, why: &'static str) -> Self {
        self.cannot_decode = Some(why);
        self
    }

    /// Inputs must carry a 2-D layout.
    pub const fn with_grid(mut self) -> Self {
        self.needs_grid = true;
        self
    }

    /// It reads global tokens.
    pub const fn with_global_tokens(mut self) -> Self {
        self.global_tokens = true;
        self
    }

    /// Whether `mode` is supported.
    pub fn supports(&self, mode: AttentionMode) -> bool {
        self.modes.contains(&mode)
    }

    /// What an input needs besides q, k and v to run this variant on a sequence of `n`
    /// positions, for benchmarks and demos: a near-square grid for 2-D variants, the first
    /// token as a global token (a CLS token) for variants that read global tokens, except in
    /// causal mode (global tokens see the future).
    pub fn demo_extras(&self, n: usize, mode: AttentionMode) -> Extras {
        let mut extras = Extras::new();
        if self.needs_grid {
            extras = extras.with_grid(Grid::near_square(n));
        }
        if self.global_tokens && !mode.is_causal() {
            extras = extras.with_global(crate::GlobalTokens::Prefix(1));
        }
        extras
    }
}

/// The head layout a variant is built for: variants with parameters or random features
/// (Performer's features, Linformer's projections) size them from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadDims {
    /// Heads.
    pub heads: usize,
    /// Query/key width per head.
    pub d_k: usize,
    /// Value width per head.
    pub d_v: usize,
}

impl HeadDims {
    /// `heads` heads of width `d` for queries, keys and values.
    pub fn new(heads: usize, d: usize) -> Self {
        Self {
            heads,
            d_k: d,
            d_v: d,
        }
    }
}

/// The input of an attention core: projected heads, key padding, and the query sequence's
/// [`Extras`] (its padding, global tokens, grid and side inputs).
///
/// Build it with [`AttnInput::new`], the [`WithExtras`] builders and
/// [`mask_pad_keys`](Self::mask_pad_keys). For self-attention, [`WithExtras::mask_pad`] sets the
/// padding of queries and keys together.
///
/// # Shapes
/// - `query`: `[batch, heads, seq_q, d_k]`
/// - `key`: `[batch, heads, seq_k, d_k]`
/// - `value`: `[batch, heads, seq_k, d_v]`
/// - `extras.mask_pad`: `[batch, seq_q]`, `true` = padded query (its output is unspecified)
/// - `mask_pad_k`: `[batch, seq_k]`, `true` = padded key (never attended to)
#[derive(Clone, Debug)]
pub struct AttnInput {
    /// Queries.
    pub query: Tensor<4>,
    /// Keys.
    pub key: Tensor<4>,
    /// Values.
    pub value: Tensor<4>,
    /// Padded keys, if any.
    pub mask_pad_k: Option<Tensor<2, Bool>>,
    /// What the query sequence carries.
    pub extras: Extras,
}

impl WithExtras for AttnInput {
    fn extras_mut(&mut self) -> &mut Extras {
        &mut self.extras
    }

    /// Self-attention padding: the same `[batch, seq]` mask for queries and keys.
    fn mask_pad(self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad_queries(mask.clone()).mask_pad_keys(mask)
    }
}

impl AttnInput {
    /// Projected queries, keys and values with no masks.
    pub fn new(query: Tensor<4>, key: Tensor<4>, value: Tensor<4>) -> Self {
        Self {
            query,
            key,
            value,
            mask_pad_k: None,
            extras: Extras::new(),
        }
    }

    /// Padding of the queries, `[batch, seq_q]`.
    pub fn mask_pad_queries(mut self, mask: Tensor<2, Bool>) -> Self {
        self.extras.mask_pad = Some(mask);
        self
    }

    /// Padding of the keys and values, `[batch, seq_k]`.
    pub fn mask_pad_keys(mut self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad_k = Some(mask);
        self
    }

    /// Padding of the queries, `[batch, seq_q]`.
    pub fn mask_pad_q(&self) -> Option<&Tensor<2, Bool>> {
        self.extras.mask_pad.as_ref()
    }

    /// `[batch, heads, seq_q, seq_k, d_k, d_v]`, after checking that the tensors agree.
    ///
    /// # Panics
    /// If batch, heads, key/query width or key/value length disagree, or a mask has the wrong
    /// shape; the message names the tensors.
    pub fn dims(&self) -> [usize; 6] {
        let [b, h, lq, dk] = self.query.dims();
        let [bk, hk, lk, dkk] = self.key.dims();
        let [bv, hv, lv, dv] = self.value.dims();
        assert!(
            b == bk && b == bv && h == hk && h == hv,
            "attention input: query {:?}, key {:?} and value {:?} must agree on [batch, heads]",
            self.query.dims(),
            self.key.dims(),
            self.value.dims()
        );
        assert_eq!(
            dk, dkk,
            "attention input: query width {dk} != key width {dkk} (shapes [batch, heads, seq, d])"
        );
        assert_eq!(
            lk, lv,
            "attention input: key length {lk} != value length {lv}"
        );
        if let Some(m) = &self.extras.mask_pad {
            assert_eq!(
                m.dims(),
                [b, lq],
                "attention input: the query padding must be [batch, seq_q] = [{b}, {lq}]"
            );
        }
        if let Some(m) = &self.mask_pad_k {
            assert_eq!(
                m.dims(),
                [b, lk],
                "attention input: mask_pad_k must be [batch, seq_k] = [{b}, {lk}]"
            );
        }
        [b, h, lq, lk, dk, dv]
    }
}

/// The algorithm of one attention variant, applied to already-projected heads.
///
/// One method computes; [`mode`](Self::mode) reports the mode it was built for. Decoding is
/// opt-in: a core that can decode incrementally returns a cache from
/// [`decode_cache`](Self::decode_cache) (a key/value cache with [`kv_cache`] serves any exact
/// core) and, for a cache other than [`DecodeCache::KeyValue`], overrides
/// [`decode_step`](Self::decode_step).
///
/// Implement it (with a [`CoreConfig`] that builds it) for your own type to run it inside
/// [`MultiHeadAttention`](crate::MultiHeadAttention) and the `models` stacks, and through the
/// contract suite (`efficient_attn::testing`, feature `testing`).
pub trait AttentionCore {
    /// Attend.
    ///
    /// Outputs at padded query positions are unspecified. Queries whose every key is masked
    /// (padding and/or causality) get zeros.
    ///
    /// # Shapes
    /// - input: see [`AttnInput`]
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4>;

    /// The mode this instance was built for.
    fn mode(&self) -> AttentionMode;

    /// This core after optimiser step `step` (1 for the first) of training: the one hook for
    /// state that changes per step rather than by gradients (Performer redraws its random
    /// features on a schedule). The training loop calls it after every optimiser step, and a
    /// resumed run continues the count, so the state is a function of the step. The default:
    /// unchanged.
    fn at_step(self, step: usize) -> Self
    where
        Self: Sized,
    {
        let _ = step;
        self
    }

    /// A term this core adds to the training loss, from its last training forward on `device`
    /// (Routing's commitment loss); taken, so each is counted once: call it after every
    /// forward. Models
    /// sum their layers' terms into the loss ([`MultiHeadAttention::aux_loss`](crate::MultiHeadAttention::aux_loss)).
    /// The default: none.
    fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        let _ = device;
        None
    }

    /// The state for incremental decoding of up to `max_len` positions, if this instance
    /// decodes incrementally. The default: none.
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        let _ = (batch, dims, max_len, device);
        None
    }

    /// Attends `t` new positions given the cache of the earlier ones, and adds them to it.
    /// The result equals the last `t` rows of a causal [`attend`](Self::attend) over the whole
    /// sequence. Padding masks of the input are not supported (decode unpadded sequences).
    ///
    /// The default serves [`DecodeCache::KeyValue`]: append, then attend over the prefix
    /// (bottom-right causal alignment makes the new queries see exactly the past).
    ///
    /// # Shapes
    /// - input: q `[batch, heads, t, d_k]`, k `[batch, heads, t, d_k]`, v `[batch, heads, t, d_v]`
    /// - output: `[batch, heads, t, d_v]`
    ///
    /// # Panics
    /// If the cache is not the kind this variant made.
    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        match cache {
            DecodeCache::KeyValue(kv) => {
                kv.append(input.key, input.value);
                self.attend(AttnInput {
                    query: input.query,
                    key: kv.keys(),
                    value: kv.values(),
                    mask_pad_k: None,
                    extras: input.extras,
                })
            }
            DecodeCache::Recurrent(_)
            | DecodeCache::Window(_)
            | DecodeCache::Slots(_)
            | DecodeCache::Prefix(_) => {
                panic!("this attention variant decodes with a key/value cache")
            }
        }
    }
}

/// A key/value decoding cache in causal mode, none otherwise: what an exact core returns from
/// [`AttentionCore::decode_cache`] to decode with the default
/// [`decode_step`](AttentionCore::decode_step).
pub fn kv_cache(
    mode: AttentionMode,
    batch: usize,
    dims: HeadDims,
    max_len: usize,
    device: &Device,
) -> Option<DecodeCache> {
    mode.is_causal()
        .then(|| DecodeCache::KeyValue(KvCache::new(batch, dims, max_len, device)))
}

/// The configuration of an [`AttentionCore`]: it builds the core for a mode and a head layout,
/// and states what the core needs from the layers around it. Every variant's config implements
/// it, and so does [`AttentionConfig`](crate::AttentionConfig), the TOML-selectable enum;
/// implement it for your own core's configuration to use it in
/// [`MultiHeadAttention`](crate::MultiHeadAttention) and the `models` stacks.
///
/// Only [`info`](Self::info) and [`init`](Self::init) are required; the other methods state
/// capabilities and default to "not needed".
pub trait CoreConfig: Clone + fmt::Debug {
    /// The core it builds.
    type Core: AttentionCore + Module + burn::module::ModuleDisplay + 'static;

    /// What the variant is.
    fn info(&self) -> &'static VariantInfo;

    /// Builds the core for `mode` and the head layout `dims` on `device` (where variants with
    /// parameters or random features put them).
    ///
    /// # Errors
    /// A mode the variant does not support, or a field it cannot use.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<Self::Core, ConfigError>;

    /// The longest sequence the built core accepts, for cores whose parameters are sized by
    /// the length (Linformer's projections, dense Synthesizer). A model pads every batch to
    /// it, because such a core's output depends on the padded length. Default: no limit.
    fn max_len(&self) -> Option<usize> {
        None
    }

    /// This configuration with its maximum length set to `max_len` (unchanged for cores
    /// without one).
    fn with_max_len(&self, max_len: usize) -> Self {
        let _ = max_len;
        self.clone()
    }

    /// This configuration fitted to inputs laid out as `grid` (2-D variants fit their block
    /// shapes to it); unchanged by default.
    fn fit_grid(&self, grid: Grid) -> Self {
        let _ = grid;
        self.clone()
    }

    /// Whether global tokens use separate query/key/value projections (Longformer), which
    /// [`MultiHeadAttention`](crate::MultiHeadAttention) then owns and passes to the core as
    /// [`GlobalHeads`](crate::GlobalHeads).
    fn global_projections(&self) -> bool {
        false
    }

    /// This configuration for layer `layer` of a stack (0 for the first). Variants that draw
    /// random state from a seed (hash rotations, random features, random blocks, Gumbel
    /// noise, initial centroids) mix the layer into it, so every layer draws its own, as the
    /// papers' and reference code's layers do; layer 0 keeps the configured seed. Unchanged
    /// by default.
    fn for_layer(&self, layer: usize) -> Self {
        let _ = layer;
        self.clone()
    }

    /// Whether the core reads the query as the key (Reformer's shared QK):
    /// [`MultiHeadAttention`](crate::MultiHeadAttention) then has no key projection and passes
    /// the projected queries as keys.
    fn shared_qk(&self) -> bool {
        false
    }

    /// A parameter shared by every layer of a stack that uses this configuration with heads
    /// `dims` (Linformer's layerwise projection, Transformer-XL's biases); the stack owns it and
    /// passes it as a [`SharedParameter`](crate::SharedParameter) side input, to every forward
    /// and every decoding step.
    fn layer_shared(&self, dims: HeadDims) -> Option<SharedParameterSpec> {
        let _ = dims;
        None
    }

    /// `extras` with what a stack would add for a core of this configuration used alone
    /// (benchmarks, demos): the [`layer_shared`](Self::layer_shared) parameter, freshly drawn.
    fn standalone_extras(&self, dims: HeadDims, device: &Device, mut extras: Extras) -> Extras {
        if let Some(spec) = self.layer_shared(dims) {
            let p: burn::module::Param<Tensor<2>> = burn::nn::Initializer::Uniform {
                min: -spec.bound,
                max: spec.bound,
            }
            .init(spec.shape, device);
            extras.side.insert(crate::SharedParameter(p.val()));
        }
        extras
    }

    /// An upper bound of the extra bytes one call needs at length `n` with `batch × heads`
    /// heads (and its backward pass when `backward`) on `device`, for cores whose memory grows
    /// quadratically there: benchmarks skip cases beyond their budget. `None`: sub-quadratic.
    fn memory_estimate(
        &self,
        n: usize,
        batch: usize,
        heads: usize,
        backward: bool,
        device: &Device,
    ) -> Option<u64> {
        let _ = (n, batch, heads, backward, device);
        None
    }
}

/// `seed` for layer `layer` of a stack ([`CoreConfig::for_layer`]): `seed` itself for layer 0,
/// [`mix_seed`](crate::mix_seed) of both for the others.
pub fn layer_seed(seed: u64, layer: usize) -> u64 {
    if layer == 0 {
        seed
    } else {
        crate::rng::mix_seed(seed, layer as u64)
    }
}
