//! The one interface every attention variant implements, at the q/k/v boundary.
//!
//! A variant receives already-projected heads (`[batch, heads, seq, d]`) and returns the attended
//! values. Projections, head split/merge and dropout live in exactly one place,
//! [`MultiHeadAttention`](crate::MultiHeadAttention).

use std::fmt;

use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Tensor};

use crate::decoding::{DecodeCache, KvCache};
use crate::mask::DenseMask;

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

/// What a variant is, for `efformer attention list`, docs and the contract suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

impl VariantInfo {
    /// Whether `mode` is supported.
    pub fn supports(&self, mode: AttentionMode) -> bool {
        self.modes.contains(&mode)
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

/// Which tokens attend globally, for variants with global tokens (Longformer, ETC, BigBird).
///
/// Variants without global tokens ignore it.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum GlobalTokens {
    /// The first `n` positions of every sequence (a CLS token, ETC's global prefix).
    Prefix(usize),
    /// The same positions in every sequence.
    Positions(Vec<usize>),
    /// Per-example flags, `true` = global. Shape `[batch, seq]`.
    Mask(Tensor<2, Bool>),
}

impl GlobalTokens {
    /// The global positions of every example, sorted (reads a mask back to the host).
    ///
    /// # Panics
    /// If a position is beyond `seq` or a mask has the wrong shape.
    pub fn positions(&self, batch: usize, seq: usize) -> Vec<Vec<usize>> {
        match self {
            Self::Prefix(n) => vec![(0..(*n).min(seq)).collect(); batch],
            Self::Positions(p) => {
                assert!(
                    p.iter().all(|&x| x < seq),
                    "global position beyond the sequence length {seq}"
                );
                let mut p = p.clone();
                p.sort_unstable();
                p.dedup();
                vec![p; batch]
            }
            Self::Mask(m) => {
                assert_eq!(
                    m.dims(),
                    [batch, seq],
                    "global token mask must be [batch, seq]"
                );
                let flags: Vec<bool> = m.to_data().iter::<bool>().collect();
                flags
                    .chunks(seq)
                    .map(|row| {
                        row.iter()
                            .enumerate()
                            .filter(|(_, g)| **g)
                            .map(|(i, _)| i)
                            .collect()
                    })
                    .collect()
            }
        }
    }
}

/// The 2-D layout of a flattened sequence (Image Transformer, Axial), raster order:
/// position `p` is row `p / width`, column `p % width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Rows.
    pub height: usize,
    /// Columns (for images with channels flattened into the row: `width * channels`).
    pub width: usize,
}

impl Grid {
    /// A `height × width` grid.
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width }
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.height * self.width
    }

    /// Whether the grid has no positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The input of an attention core: projected heads, padding masks and optional extras.
///
/// Build it with [`AttnInput::new`] and the `mask_*`/`with_*` builders.
///
/// # Shapes
/// - `query`: `[batch, heads, seq_q, d_k]`
/// - `key`: `[batch, heads, seq_k, d_k]`
/// - `value`: `[batch, heads, seq_k, d_v]`
/// - `mask_pad_q`: `[batch, seq_q]`, `true` = padded query (its output is unspecified)
/// - `mask_pad_k`: `[batch, seq_k]`, `true` = padded key (never attended to)
#[derive(Clone, Debug)]
pub struct AttnInput {
    /// Queries.
    pub query: Tensor<4>,
    /// Keys.
    pub key: Tensor<4>,
    /// Values.
    pub value: Tensor<4>,
    /// Padded queries, if any.
    pub mask_pad_q: Option<Tensor<2, Bool>>,
    /// Padded keys, if any.
    pub mask_pad_k: Option<Tensor<2, Bool>>,
    /// Global tokens, for variants that have them.
    pub global: Option<GlobalTokens>,
    /// The 2-D layout of the sequence, for image variants.
    pub grid: Option<Grid>,
    /// A low-rank projection `[k, max_len]` shared by every layer of a model, for Linformer's
    /// layerwise sharing (the model owns the parameter so it is trained once).
    pub shared_projection: Option<Tensor<2>>,
    /// Heads projected by separate global projections (Longformer's Q_g, K_g, V_g), over the
    /// whole sequence; `None` means global tokens use the ordinary projections (tied).
    pub global_heads: Option<GlobalHeads>,
}

/// Queries, keys and values from a variant's separate global projections.
///
/// # Shapes
/// - query, key: `[batch, heads, seq, d_k]`, value: `[batch, heads, seq, d_v]`
#[derive(Clone, Debug)]
pub struct GlobalHeads {
    /// Global queries.
    pub query: Tensor<4>,
    /// Global keys.
    pub key: Tensor<4>,
    /// Global values.
    pub value: Tensor<4>,
}

impl AttnInput {
    /// Projected queries, keys and values with no masks.
    pub fn new(query: Tensor<4>, key: Tensor<4>, value: Tensor<4>) -> Self {
        Self {
            query,
            key,
            value,
            mask_pad_q: None,
            mask_pad_k: None,
            global: None,
            grid: None,
            shared_projection: None,
            global_heads: None,
        }
    }

    /// Self-attention padding: the same `[batch, seq]` mask for queries and keys.
    pub fn mask_pad(self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad_queries(mask.clone()).mask_pad_keys(mask)
    }

    /// Padding of the queries, `[batch, seq_q]`.
    pub fn mask_pad_queries(mut self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad_q = Some(mask);
        self
    }

    /// Padding of the keys and values, `[batch, seq_k]`.
    pub fn mask_pad_keys(mut self, mask: Tensor<2, Bool>) -> Self {
        self.mask_pad_k = Some(mask);
        self
    }

    /// Global tokens.
    pub fn with_global(mut self, global: GlobalTokens) -> Self {
        self.global = Some(global);
        self
    }

    /// The 2-D layout of the sequence.
    pub fn with_grid(mut self, grid: Grid) -> Self {
        self.grid = Some(grid);
        self
    }

    /// A projection shared by every layer (Linformer's layerwise sharing).
    ///
    /// # Shapes
    /// - projection: `[k, max_len]`
    pub fn with_shared_projection(mut self, projection: Tensor<2>) -> Self {
        self.shared_projection = Some(projection);
        self
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
        if let Some(m) = &self.mask_pad_q {
            assert_eq!(
                m.dims(),
                [b, lq],
                "attention input: mask_pad_q must be [batch, seq_q] = [{b}, {lq}]"
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
/// One method is required. Implement it for your own type to run it through
/// [`MultiHeadAttention`](crate::MultiHeadAttention)'s sibling code paths or the contract suite
/// (`efficient_attn::testing`, feature `testing`).
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

    /// The key positions each query may attend to, as pure data, when the variant is exact
    /// softmax attention restricted to a fixed pattern (padding and causality excluded: the
    /// oracle adds them). `None` for variants that are not a pattern (kernels, low rank).
    ///
    /// The contract suite compares the variant with dense attention under this mask.
    fn pattern(&self, input: &AttnInput) -> Option<DenseMask> {
        let _ = input;
        None
    }

    /// The state for incremental decoding of up to `max_len` positions, if this instance
    /// decodes incrementally. The default: a [`KvCache`] in causal mode, none otherwise.
    /// Variants with a cheaper state (kernel attention's recurrence) override it together with
    /// [`decode_step`](Self::decode_step).
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        self.mode()
            .is_causal()
            .then(|| DecodeCache::KeyValue(KvCache::new(batch, dims, max_len, device)))
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
                self.attend(AttnInput::new(input.query, kv.keys(), kv.values()))
            }
            DecodeCache::Recurrent(_) | DecodeCache::Window(_) => {
                panic!("this attention variant decodes with a key/value cache")
            }
        }
    }
}
