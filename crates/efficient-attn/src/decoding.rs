//! Incremental (token-by-token) causal decoding: the per-layer state each variant keeps.
//!
//! A variant chooses its cache in [`AttentionCore::decode_cache`](crate::AttentionCore):
//! - [`DecodeCache::KeyValue`]: keys and values of every position so far, preallocated to the
//!   maximum length and filled in place; new queries attend over the filled prefix (exact and
//!   pattern variants). A step costs O(t·d) for position t; nothing is re-projected.
//! - [`DecodeCache::Recurrent`]: a fixed-size state (kernel attention: Linear Transformer,
//!   Performer). A step costs O(m·d_v) whatever the position.
//! - [`DecodeCache::Window`]: the keys and values of the last w positions only (sliding-window
//!   attention: Longformer's causal window). A step costs O(w·d), memory O(w·d).
//!
//! - [`DecodeCache::KeyValue`] with [`pattern_step`]: every key so far, of which each new query
//!   reads only the positions its [`CausalPattern`] lists (strided and summary patterns, axial
//!   rows and columns, 2-D blocks with a flange). A step costs O(m·d) for the m keys the
//!   pattern shows, memory O(t·d) (the strided and summary keys reach back to the start).
//! - [`DecodeCache::Prefix`] with [`prefix_step`]: queries, keys and values of every position;
//!   each step runs the causal layer over the whole prefix and keeps the new rows. Exact for a
//!   causal core whose outputs do not depend on later positions at all (not Reformer's or
//!   Routing's, whose chunks and clusters do); a step costs
//!   one forward over t positions. For variants whose sorting or clustering mixes all earlier
//!   blocks (Sinkhorn), until they get a cache of their own.
//! - [`DecodeCache::Slots`]: keys and values compressed every k positions (Memory-Compressed
//!   attention): the slots so far and the positions of the block not yet complete. A step
//!   costs O(t/k·d), memory O(t/k·d + k·d).

use std::fmt;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::interface::HeadDims;
use crate::kernels::prefix_sum::KernelState;

/// Keys and values of the positions decoded so far, in buffers preallocated to `max_len`.
#[derive(Clone, Debug)]
pub struct KvCache {
    keys: Tensor<4>,
    values: Tensor<4>,
    len: usize,
}

impl KvCache {
    /// An empty cache for up to `max_len` positions.
    pub fn new(batch: usize, dims: HeadDims, max_len: usize, device: &Device) -> Self {
        Self {
            keys: Tensor::zeros([batch, dims.heads, max_len, dims.d_k], device),
            values: Tensor::zeros([batch, dims.heads, max_len, dims.d_v], device),
            len: 0,
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity.
    pub fn max_len(&self) -> usize {
        self.keys.dims()[2]
    }

    /// Appends the keys and values of `t` new positions (in place when the buffers are not
    /// shared).
    ///
    /// # Shapes
    /// - keys: `[batch, heads, t, d_k]`, values: `[batch, heads, t, d_v]`
    ///
    /// # Panics
    /// If the cache would exceed its `max_len`.
    pub fn append(&mut self, keys: Tensor<4>, values: Tensor<4>) {
        let [b, h, t, dk] = keys.dims();
        let dv = values.dims()[3];
        let end = self.len + t;
        assert!(
            end <= self.max_len(),
            "decoding cache full: {} positions + {t} new > max_len {}",
            self.len,
            self.max_len()
        );
        let device = self.keys.device();
        let placeholder = || Tensor::<4>::zeros([1, 1, 1, 1], &device);
        let k = std::mem::replace(&mut self.keys, placeholder());
        let v = std::mem::replace(&mut self.values, placeholder());
        self.keys = k.slice_assign([0..b, 0..h, self.len..end, 0..dk], keys);
        self.values = v.slice_assign([0..b, 0..h, self.len..end, 0..dv], values);
        self.len = end;
    }

    /// The stored keys, `[batch, heads, len, d_k]`.
    pub fn keys(&self) -> Tensor<4> {
        self.keys.clone().narrow(2, 0, self.len)
    }

    /// The stored values, `[batch, heads, len, d_v]`.
    pub fn values(&self) -> Tensor<4> {
        self.values.clone().narrow(2, 0, self.len)
    }
}

/// A layer's decoding state, chosen by its attention variant.
#[derive(Clone, Debug)]
pub enum DecodeCache {
    /// Every key and value so far.
    KeyValue(KvCache),
    /// A fixed-size recurrent state.
    Recurrent(RecurrentState),
    /// The last positions of a sliding window.
    Window(WindowCache),
    /// Compressed slots and the incomplete block.
    Slots(Box<SlotCache>),
    /// Queries, keys and values of every position so far, for variants that recompute the
    /// layer over the prefix ([`prefix_step`]).
    Prefix(Box<PrefixCache>),
}

/// Which recent keys a causal local pattern shows the query at position p.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowRule {
    /// Keys p − i·d for i = 0..=`window`, d the head's dilation (one value: every head).
    Dilated {
        /// One-sided window, in dilated steps.
        window: usize,
        /// Per-head dilation.
        dilation: Vec<usize>,
    },
    /// Keys from `memory` positions before the start of p's block (blocks of `block`) up to p.
    Blocks {
        /// Block length.
        block: usize,
        /// Positions before the block.
        memory: usize,
    },
}

impl WindowRule {
    fn visible(&self, head: usize, p: usize, key: usize) -> bool {
        if key > p {
            return false;
        }
        match self {
            Self::Dilated { window, dilation } => {
                let d = dilation[if dilation.len() == 1 { 0 } else { head }];
                (p - key).is_multiple_of(d) && (p - key) / d <= *window
            }
            Self::Blocks { block, memory } => key + memory >= p / block * block,
        }
    }

    /// Positions any query can reach back (the keys worth keeping).
    fn reach(&self) -> usize {
        match self {
            Self::Dilated { window, dilation } => {
                window * dilation.iter().copied().max().unwrap_or(1)
            }
            Self::Blocks { block, memory } => block + memory,
        }
    }
}

/// The keys and values a causal local pattern still needs (a rolling buffer), by its
/// [`WindowRule`].
#[derive(Clone, Debug)]
pub struct WindowCache {
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
    rule: WindowRule,
    len: usize,
}

impl WindowCache {
    /// An empty cache for a one-sided window of `window` positions.
    pub fn new(window: usize) -> Self {
        Self::dilated(window, vec![1])
    }

    /// An empty cache for a one-sided window of `window` dilated steps, with one dilation per
    /// head (or one for every head).
    ///
    /// # Panics
    /// If a dilation is 0.
    pub fn dilated(window: usize, dilation: Vec<usize>) -> Self {
        assert!(
            !dilation.is_empty() && dilation.iter().all(|&d| d > 0),
            "window cache: dilations must be positive"
        );
        Self::with_rule(WindowRule::Dilated { window, dilation })
    }

    /// An empty cache for causal local blocks: query p sees from `memory` positions before
    /// its block (of `block`) up to itself.
    ///
    /// # Panics
    /// If `block` is 0.
    pub fn blocks(block: usize, memory: usize) -> Self {
        assert!(block > 0, "window cache: the block must be positive");
        Self::with_rule(WindowRule::Blocks { block, memory })
    }

    fn with_rule(rule: WindowRule) -> Self {
        Self {
            keys: None,
            values: None,
            rule,
            len: 0,
        }
    }

    /// Attends `t` new queries (with their keys and values) to the keys their
    /// [`WindowRule`] shows them, and keeps the positions later queries can still see.
    ///
    /// # Shapes
    /// - q, k: `[batch, heads, t, d_k]`, v: `[batch, heads, t, d_v]` → `[batch, heads, t, d_v]`
    pub fn step(&mut self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
        let [b, h, t, _] = q.dims();
        let device = q.device();
        let (keys, values) = match (self.keys.take(), self.values.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            _ => (k, v),
        };
        let m = keys.dims()[2];
        let first = self.len + t - m; // absolute position of keys[0]
        // Masked (true) where the key is not in the query's dilated causal window.
        let mut masked = Vec::with_capacity(h * t * m);
        for head in 0..h {
            for i in 0..t {
                for j in 0..m {
                    masked.push(!self.rule.visible(head, self.len + i, first + j));
                }
            }
        }
        let mask = Tensor::<3, Bool>::from_data(TensorData::new(masked, [h, t, m]), &device)
            .reshape([1, h, t, m])
            .expand([b, h, t, m]);
        let scores = q.matmul(keys.clone().swap_dims(2, 3)).mul_scalar(scale);
        let out = crate::kernels::dense::masked_softmax_matmul(scores, Some(mask), values.clone());
        let keep = self.rule.reach().min(m);
        self.keys = Some(keys.narrow(2, m - keep, keep));
        self.values = Some(values.narrow(2, m - keep, keep));
        self.len += t;
        out
    }
}

/// The decode step of every windowed variant: the new queries attend through the window cache
/// at the standard 1/√d_k scale.
///
/// # Shapes
/// - input: q, k `[batch, heads, t, d_k]`, v `[batch, heads, t, d_v]` → `[batch, heads, t, d_v]`
///
/// # Panics
/// If `cache` is not a window cache.
pub fn window_step(cache: &mut DecodeCache, input: crate::interface::AttnInput) -> Tensor<4> {
    let DecodeCache::Window(window) = cache else {
        panic!("this attention variant decodes with a window cache")
    };
    let dk = input.query.dims()[3];
    window.step(
        input.query,
        input.key,
        input.value,
        1.0 / (dk as f64).sqrt(),
    )
}

/// The recurrent state of kernel attention and how many positions it has absorbed.
#[derive(Clone, Debug)]
pub struct RecurrentState {
    /// `Σ φ(k) vᵀ` and `Σ φ(k)`.
    pub state: KernelState,
    /// Positions absorbed.
    pub len: usize,
}

impl DecodeCache {
    /// Positions decoded so far.
    pub fn len(&self) -> usize {
        match self {
            Self::KeyValue(c) => c.len(),
            Self::Recurrent(r) => r.len,
            Self::Window(w) => w.len,
            Self::Slots(s) => s.len,
            Self::Prefix(p) => p.kv.len(),
        }
    }

    /// Whether nothing has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The recurrent decode step shared by kernel variants: absorbs each new position in order.
///
/// # Shapes
/// - phi_q, phi_k: `[batch, heads, t, m]` (features of the new positions), v: `[batch, heads, t, d_v]`
/// - output: `[batch, heads, t, d_v]`
///
/// # Panics
/// If `cache` is not a recurrent state.
pub fn recurrent_step(
    cache: &mut DecodeCache,
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
) -> Tensor<4> {
    let DecodeCache::Recurrent(r) = cache else {
        panic!("kernel attention decodes with a recurrent state, not a key/value cache")
    };
    let t = phi_q.dims()[2];
    let outs: Vec<Tensor<4>> = (0..t)
        .map(|i| {
            r.len += 1;
            r.state.step(
                phi_q.clone().narrow(2, i, 1),
                phi_k.clone().narrow(2, i, 1),
                v.clone().narrow(2, i, 1),
            )
        })
        .collect();
    Tensor::cat(outs, 2)
}

/// An empty recurrent cache with `features` features per head (causal mode only).
pub fn recurrent_cache(
    causal: bool,
    batch: usize,
    dims: HeadDims,
    features: usize,
    device: &Device,
) -> Option<DecodeCache> {
    causal.then(|| {
        DecodeCache::Recurrent(RecurrentState {
            state: KernelState::new(batch, dims.heads, features, dims.d_v, device),
            len: 0,
        })
    })
}

/// The keys a causal pattern shows each query, for decoding over a key/value cache with
/// [`pattern_step`]. A pattern may be a sum of several softmax attentions (Axial's row plus
/// column attention): one key list per part.
pub trait CausalPattern: fmt::Debug {
    /// Softmax attentions summed in the output (default 1).
    fn parts(&self) -> usize {
        1
    }

    /// Appends to `keys` the positions (each ≤ `p`, none twice) that head `head` of the query
    /// at position `p` sees in part `part`.
    fn keys(&self, part: usize, head: usize, p: usize, keys: &mut Vec<usize>);
}

/// Appends `t` new positions to a key/value cache, then attends each new query to the keys its
/// [`CausalPattern`] lists (gathered from the cache, so a step reads only those keys).
///
/// # Shapes
/// - q, k: `[batch, heads, t, d_k]`, v: `[batch, heads, t, d_v]` → `[batch, heads, t, d_v]`
///
/// # Panics
/// If `cache` is not a key/value cache, or the cache is full.
pub fn pattern_step(
    cache: &mut DecodeCache,
    pattern: &dyn CausalPattern,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
) -> Tensor<4> {
    let DecodeCache::KeyValue(kv) = cache else {
        panic!("pattern attention decodes with a key/value cache")
    };
    let [b, h, t, _] = q.dims();
    let dv = v.dims()[3];
    let device = q.device();
    let start = kv.len();
    kv.append(k, v);
    let mut out: Option<Tensor<4>> = None;
    for part in 0..pattern.parts() {
        let mut lists = Vec::with_capacity(h * t);
        let mut union = Vec::new();
        for head in 0..h {
            for i in 0..t {
                let mut list = Vec::new();
                pattern.keys(part, head, start + i, &mut list);
                debug_assert!(list.iter().all(|&j| j <= start + i), "{pattern:?} leaks");
                union.extend_from_slice(&list);
                lists.push(list);
            }
        }
        union.sort_unstable();
        union.dedup();
        let m = union.len();
        let part_out = if m == 0 {
            Tensor::zeros([b, h, t, dv], (&device, q.dtype()))
        } else {
            let mut masked = vec![true; h * t * m];
            for (row, list) in lists.iter().enumerate() {
                for j in list {
                    let column = union.binary_search(j).expect("listed key in the union");
                    masked[row * m + column] = false;
                }
            }
            let positions: Vec<i64> = union.iter().map(|&j| j as i64).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(positions, [m]), &device);
            let keys = kv.keys().select(2, idx.clone()); // [batch, heads, m, d_k]
            let values = kv.values().select(2, idx); // [batch, heads, m, d_v]
            let mask = Tensor::<3, Bool>::from_data(TensorData::new(masked, [h, t, m]), &device)
                .reshape([1, h, t, m])
                .expand([b, h, t, m]);
            let scores = q.clone().matmul(keys.swap_dims(2, 3)).mul_scalar(scale);
            crate::kernels::dense::masked_softmax_matmul(scores, Some(mask), values)
        };
        out = Some(match out {
            Some(o) => o.add(part_out),
            None => part_out,
        });
    }
    out.expect("a causal pattern has at least one part")
}

/// Keys and values compressed every `factor` positions: the slots of the complete blocks so
/// far, and the keys and values of the block not yet complete.
#[derive(Clone, Debug)]
pub struct SlotCache {
    factor: usize,
    pending: Option<(Tensor<4>, Tensor<4>)>,
    slots: Option<(Tensor<4>, Tensor<4>)>,
    len: usize,
}

impl SlotCache {
    /// An empty cache compressing blocks of `factor` positions.
    ///
    /// # Panics
    /// If `factor` is 0.
    pub fn new(factor: usize) -> Self {
        assert!(
            factor > 0,
            "slot cache: the compression factor must be positive"
        );
        Self {
            factor,
            pending: None,
            slots: None,
            len: 0,
        }
    }

    /// Positions absorbed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been absorbed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots so far (complete blocks).
    pub fn slots(&self) -> usize {
        self.len / self.factor
    }

    /// Absorbs `t` new positions; every block of `factor` positions they complete becomes one
    /// slot through `compress` (keys, values of whole blocks → their slots).
    ///
    /// # Shapes
    /// - keys: `[batch, heads, t, d_k]`, values: `[batch, heads, t, d_v]`
    /// - compress: `[batch, heads, c·factor, d]` → `[batch, heads, c, d]`
    pub fn append(
        &mut self,
        keys: Tensor<4>,
        values: Tensor<4>,
        compress: impl Fn(Tensor<4>, Tensor<4>) -> (Tensor<4>, Tensor<4>),
    ) {
        let t = keys.dims()[2];
        let (keys, values) = match self.pending.take() {
            Some((pk, pv)) => (
                Tensor::cat(vec![pk, keys], 2),
                Tensor::cat(vec![pv, values], 2),
            ),
            None => (keys, values),
        };
        let held = keys.dims()[2];
        let whole = held / self.factor * self.factor;
        if whole > 0 {
            let (ck, cv) = compress(
                keys.clone().narrow(2, 0, whole),
                values.clone().narrow(2, 0, whole),
            );
            self.slots = Some(match self.slots.take() {
                Some((sk, sv)) => (Tensor::cat(vec![sk, ck], 2), Tensor::cat(vec![sv, cv], 2)),
                None => (ck, cv),
            });
        }
        if held > whole {
            self.pending = Some((
                keys.narrow(2, whole, held - whole),
                values.narrow(2, whole, held - whole),
            ));
        }
        self.len += t;
    }

    /// The slots' keys `[batch, heads, slots, d_k]` and values `[batch, heads, slots, d_v]`,
    /// if any block is complete.
    pub fn compressed(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        self.slots.clone()
    }
}

/// Queries, keys and values of the positions decoded so far ([`DecodeCache::Prefix`]).
#[derive(Clone, Debug)]
pub struct PrefixCache {
    queries: KvCache,
    kv: KvCache,
}

impl PrefixCache {
    /// An empty cache for up to `max_len` positions.
    pub fn new(batch: usize, dims: HeadDims, max_len: usize, device: &Device) -> Self {
        let q_dims = HeadDims {
            heads: dims.heads,
            d_k: dims.d_k,
            d_v: 1,
        };
        Self {
            queries: KvCache::new(batch, q_dims, max_len, device),
            kv: KvCache::new(batch, dims, max_len, device),
        }
    }
}

/// Appends `t` new positions to a prefix cache and returns the last `t` rows of `attend` over
/// the whole prefix: exact for a causal core whose outputs do not depend on later positions.
///
/// # Shapes
/// - input: q, k `[batch, heads, t, d_k]`, v `[batch, heads, t, d_v]` → `[batch, heads, t, d_v]`
///
/// # Panics
/// If `cache` is not a prefix cache, or it is full.
pub fn prefix_step(
    cache: &mut DecodeCache,
    attend: impl Fn(crate::interface::AttnInput) -> Tensor<4>,
    input: crate::interface::AttnInput,
) -> Tensor<4> {
    let DecodeCache::Prefix(p) = cache else {
        panic!("this attention variant decodes with a prefix cache")
    };
    let [b, h, t, _] = input.query.dims();
    let dummy = Tensor::zeros([b, h, t, 1], &input.query.device());
    p.queries.append(input.query, dummy);
    p.kv.append(input.key, input.value);
    let n = p.kv.len();
    let mut whole = crate::interface::AttnInput::new(p.queries.keys(), p.kv.keys(), p.kv.values());
    whole.extras = input.extras;
    attend(whole).narrow(2, n - t, t)
}
