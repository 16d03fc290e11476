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
//! Variants whose pattern is tied to absolute block boundaries of the whole sequence (local
//! blocks, strided and summary patterns, 2-D layouts, compressed slots) have no incremental
//! cache yet: `decode_cache` returns `None` and models say so.

use burn::tensor::{Bool, Device, Tensor, TensorData};

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
