//! Block-sparse attention: the one kernel behind the fixed and sparse patterns.
//!
//! The sequence is cut into blocks of `b` positions. A [`BlockPlan`] lists, for every query
//! block, the key blocks it attends to (per head or shared by the heads); those key blocks are
//! gathered (`select`) into a `[.., query block, m·b, d]` tensor, an element-level
//! [`ElementRule`] (causality, a band, an explicit mask, the original positions of a permuted
//! sequence, nothing) masks positions inside the gathered blocks,
//! optional *global* keys are appended to every query block, and one softmax runs over the
//! concatenation. Cost O(N·m·b·d) time and O(N·m·b) memory for m key blocks per query block:
//! the N × N matrix is never formed.
//!
//! - The blocked **look-around** (local windows: Image Transformer 1D, Memory-Compressed local,
//!   Longformer's sliding window, ETC's local part, BigBird's window) is the plan
//!   `{i − back, …, i + ahead}`.
//! - The **gather of key blocks** (BigBird's random blocks, global blocks) is any other plan.
//! - **Permuted sequences** (Reformer's rows sorted by bucket, Routing's rows laid out cluster
//!   by cluster) are a plan over the permuted rows with [`ElementRule::Positions`]; the
//!   callers that weigh several attentions of one query take each row's log-sum-exp too
//!   ([`block_sparse_attention_with_lse`]).
//!
//! A key block must not appear twice in one query block's list (it would be counted twice by
//! the softmax); [`BlockPlan::new`] checks it.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::kernels::dense::masked_softmax_matmul;
use crate::kernels::fused;

/// For each query block, the key blocks it attends to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    /// Positions per block (b).
    pub block: usize,
    /// Query blocks.
    pub query_blocks: usize,
    /// Key blocks in the key sequence.
    pub key_blocks: usize,
    /// Key blocks listed per query block (m); unused slots are `None`.
    pub per_block: usize,
    /// `heads` separate plans, or 1 shared by all heads.
    pub heads: usize,
    /// `[heads, query_blocks, per_block]`, row-major.
    ids: Vec<Option<usize>>,
}

impl BlockPlan {
    /// A plan from `ids[h][q]` = the key blocks of query block `q` in head `h` (`heads = 1`
    /// for a plan shared by all heads). Lists shorter than the longest are padded.
    ///
    /// # Panics
    /// If a list names a block twice or a block beyond `key_blocks`.
    pub fn new(block: usize, key_blocks: usize, ids: Vec<Vec<Vec<usize>>>) -> Self {
        let heads = ids.len();
        let query_blocks = ids.first().map_or(0, Vec::len);
        let per_block = ids.iter().flatten().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = Vec::with_capacity(heads * query_blocks * per_block);
        for (h, head) in ids.iter().enumerate() {
            assert_eq!(
                head.len(),
                query_blocks,
                "every head plans every query block"
            );
            for (q, list) in head.iter().enumerate() {
                let mut seen = list.clone();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(
                    seen.len(),
                    list.len(),
                    "head {h}, query block {q}: key block listed twice"
                );
                assert!(
                    list.iter().all(|&k| k < key_blocks),
                    "head {h}, query block {q}: key block beyond {key_blocks}"
                );
                flat.extend(list.iter().map(|&k| Some(k)));
                flat.extend(std::iter::repeat_n(None, per_block - list.len()));
            }
        }
        Self {
            block,
            query_blocks,
            key_blocks,
            per_block,
            heads,
            ids: flat,
        }
    }

    /// The look-around plan: query block `i` sees key blocks `i − back ..= i + ahead` that
    /// exist (shared by all heads).
    pub fn look_around(
        block: usize,
        query_blocks: usize,
        key_blocks: usize,
        back: usize,
        ahead: usize,
    ) -> Self {
        let ids = (0..query_blocks)
            .map(|i| {
                (i.saturating_sub(back)..=(i + ahead).min(key_blocks.saturating_sub(1)))
                    .filter(|&k| k < key_blocks)
                    .collect()
            })
            .collect();
        Self::new(block, key_blocks, vec![ids])
    }

    /// Key block at `(head, query block, slot)`.
    pub fn get(&self, h: usize, q: usize, slot: usize) -> Option<usize> {
        let h = if self.heads == 1 { 0 } else { h };
        self.ids[(h * self.query_blocks + q) * self.per_block + slot]
    }

    /// Absolute key positions of each gathered slot, `[heads, query_blocks, per_block · b]`,
    /// −1 for empty slots.
    fn key_positions(&self) -> Vec<i64> {
        let b = self.block;
        let mut out = Vec::with_capacity(self.heads * self.query_blocks * self.per_block * b);
        for h in 0..self.heads {
            for q in 0..self.query_blocks {
                for s in 0..self.per_block {
                    match self.get(h, q, s) {
                        Some(k) => out.extend((0..b).map(|o| (k * b + o) as i64)),
                        None => out.extend(std::iter::repeat_n(-1, b)),
                    }
                }
            }
        }
        out
    }
}

/// Which gathered positions are allowed, by their absolute positions `i` (query) and `j` (key).
#[derive(Clone, Debug)]
pub enum ElementRule {
    /// Every gathered position.
    All,
    /// `j <= i + offset` (bottom-right causal alignment).
    Causal {
        /// `seq_k − seq_q`.
        offset: usize,
    },
    /// `−left <= j − i <= right`.
    Band {
        /// Keys before the query.
        left: usize,
        /// Keys after the query.
        right: usize,
    },
    /// An explicit mask over the gathered slots, `[plan heads, query_blocks, b, per_block · b]`
    /// row-major, `true` = masked (for patterns that are not a band, such as 2-D windows).
    Explicit(std::sync::Arc<Vec<bool>>),
    /// By the original positions the rows of a permuted sequence hold (Reformer's sorted
    /// buckets, Routing's cluster windows), per `(batch, head)`: see [`PositionRule`].
    Positions(Box<PositionRule>),
}

/// [`ElementRule::Positions`]: the rows of the query and key sequences are permutations (or
/// selections) of one sequence, and each carries its original position. A key is hidden when
/// its position is negative (padding) or, causal, after the query's; a key at the query's own
/// position scores [`self_score`](Self::self_score) instead of `q·k` when that is set.
#[derive(Clone, Debug)]
pub struct PositionRule {
    /// `[batch, heads, seq_q]`: each query row's original position.
    pub query: Tensor<3, Int>,
    /// `[batch, heads, seq_k]`: each key row's original position; negative = hidden.
    pub key: Tensor<3, Int>,
    /// Hide keys whose position is after the query's.
    pub causal: bool,
    /// The score (after scaling) of a query against its own position, replacing `q·k`; its
    /// gradient is zero. Reformer's self penalty, −1e5: not −∞, so a query that sees no
    /// other key attends to itself.
    pub self_score: Option<f32>,
}

/// Keys every query attends to besides its plan (Longformer's and ETC's global tokens,
/// Sparse Transformer's summary columns), with their own mask.
#[derive(Clone, Debug)]
pub struct ExtraKeys {
    /// `[batch, heads, g, d_k]`.
    pub key: Tensor<4>,
    /// `[batch, heads, g, d_v]`.
    pub value: Tensor<4>,
    /// `[batch, heads or 1, seq_q, g]`, `true` = masked for that query.
    pub mask: Option<Tensor<4, Bool>>,
}

/// The inputs of [`block_sparse_attention`].
pub struct BlockSparse<'a> {
    /// Queries `[batch, heads, seq_q, d_k]`, already scaled.
    pub query: Tensor<4>,
    /// Keys `[batch, heads, seq_k, d_k]`.
    pub key: Tensor<4>,
    /// Values `[batch, heads, seq_k, d_v]`.
    pub value: Tensor<4>,
    /// Keys no query may see: padding, and any other exclusion (`[batch, seq_k]`).
    pub mask_pad_k: Option<&'a Tensor<2, Bool>>,
    /// The plan.
    pub plan: &'a BlockPlan,
    /// The element rule inside gathered blocks.
    pub rule: ElementRule,
    /// Keys appended to every query block.
    pub extra: Option<ExtraKeys>,
}

fn pad_seq(x: Tensor<4>, to: usize) -> Tensor<4> {
    let [b, h, n, d] = x.dims();
    if n == to {
        return x;
    }
    let zeros = Tensor::zeros([b, h, to - n, d], (&x.device(), x.dtype()));
    Tensor::cat(vec![x, zeros], 2)
}

/// Gathers blocks of `x` (`[batch, heads, seq, d]`, padded to whole blocks) by the plan.
///
/// # Shapes
/// - output: `[batch, heads, query_blocks, per_block · b, d]`
fn gather_blocks(x: Tensor<4>, plan: &BlockPlan, device: &Device) -> Tensor<5> {
    let [bs, h, _, d] = x.dims();
    let (b, nk, nq, m) = (
        plan.block,
        plan.key_blocks,
        plan.query_blocks,
        plan.per_block,
    );
    let blocks = pad_seq(x, nk * b).reshape([bs, h, nk, b, d]); // [batch, heads, key blocks, b, d]
    let ids = |head: usize| -> Tensor<1, Int> {
        let v: Vec<i64> = (0..nq)
            .flat_map(|q| (0..m).map(move |s| (q, s)))
            .map(|(q, s)| plan.get(head, q, s).unwrap_or(0) as i64)
            .collect();
        Tensor::from_data(TensorData::new(v, [nq * m]), device)
    };
    if plan.heads == 1 {
        blocks.select(2, ids(0)).reshape([bs, h, nq, m * b, d])
    } else {
        let per_head: Vec<Tensor<5>> = (0..h)
            .map(|head| {
                blocks
                    .clone()
                    .narrow(1, head, 1)
                    .select(2, ids(head))
                    .reshape([bs, 1, nq, m * b, d])
            })
            .collect();
        Tensor::cat(per_head, 1)
    }
}

/// Attention of every query over its plan's key blocks (and the extra keys), with one softmax.
///
/// On `f32` Flex (and, with the `cube` feature, cubecl) tensors this is the fused operation
/// ([`fused::block_sparse`]: key blocks read in place, O(N·d) memory forward and backward);
/// elsewhere [`block_sparse_attention_composed`].
///
/// # Shapes
/// - see [`BlockSparse`]
/// - output: `[batch, heads, seq_q, d_v]`
pub fn block_sparse_attention(input: BlockSparse<'_>) -> Tensor<4> {
    if fused::attention_runs_fused(&input.query) {
        return fused::block_sparse::block_sparse_attention(input);
    }
    block_sparse_attention_composed(input)
}

/// [`block_sparse_attention`] as Burn tensor operations (key blocks gathered, one masked
/// softmax): what runs where the fused operation does not, and its oracle.
///
/// # Shapes
/// - as [`block_sparse_attention`]
pub fn block_sparse_attention_composed(input: BlockSparse<'_>) -> Tensor<4> {
    let (parts, finish) = composed_parts(input);
    let Parts { scores, mask, v } = parts;
    finish.output(masked_softmax_matmul(scores, Some(mask), v))
}

/// [`block_sparse_attention`] and each query row's log-sum-exp over the keys it sees (`+∞`
/// for a row that sees none, whose output is zeros), both differentiable: what a caller that
/// combines several attentions of the same query needs (Reformer's hashing rounds, Routing's
/// clusters).
///
/// # Shapes
/// - see [`BlockSparse`]
/// - output: `[batch, heads, seq_q, d_v]`, `[batch, heads, seq_q]`
pub fn block_sparse_attention_with_lse(input: BlockSparse<'_>) -> (Tensor<4>, Tensor<3>) {
    if fused::attention_runs_fused(&input.query) {
        return fused::block_sparse::block_sparse_attention_with_lse(input);
    }
    block_sparse_attention_composed_with_lse(input)
}

/// [`block_sparse_attention_with_lse`] as Burn tensor operations (the oracle of the fused
/// operation's log-sum-exp).
///
/// # Shapes
/// - as [`block_sparse_attention_with_lse`]
pub fn block_sparse_attention_composed_with_lse(input: BlockSparse<'_>) -> (Tensor<4>, Tensor<3>) {
    let (parts, finish) = composed_parts(input);
    let Parts { scores, mask, v } = parts;
    let scores = scores.mask_fill(mask.clone(), -1e30);
    let max = scores.clone().max_dim(3).detach();
    let weights = scores.sub(max.clone()).exp().mask_fill(mask, 0.0);
    let sum = weights.clone().sum_dim(3); // [batch, heads·nq, b, 1]
    let none = sum.clone().equal_elem(0.0);
    let sum = sum.mask_fill(none.clone(), 1.0);
    let out = weights.matmul(v).div(sum.clone());
    let lse = finish.output(sum.log().add(max).mask_fill(none, f32::INFINITY)); // [.., 1]
    let [bs, h, lq, _] = lse.dims();
    (finish.output(out), lse.reshape([bs, h, lq]))
}

/// The gathered scores `[batch, heads·nq, b, w]`, their mask and values, before the softmax.
struct Parts {
    scores: Tensor<4>,
    mask: Tensor<4, Bool>,
    v: Tensor<4>,
}

/// How a `[batch, heads·nq, b, width]` result becomes `[batch, heads, seq_q, width]`.
struct Finish {
    bs: usize,
    h: usize,
    nq: usize,
    b: usize,
    lq: usize,
}

impl Finish {
    fn output(&self, x: Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        x.reshape([self.bs, self.h, self.nq * self.b, d])
            .narrow(2, 0, self.lq)
    }
}

fn composed_parts(input: BlockSparse<'_>) -> (Parts, Finish) {
    let BlockSparse {
        query,
        key,
        value,
        mask_pad_k,
        plan,
        rule,
        extra,
    } = input;
    let [bs, h, lq, dk] = query.dims();
    let lk = key.dims()[2];
    let dv = value.dims()[3];
    let device = query.device();
    let (b, nq, m) = (plan.block, plan.query_blocks, plan.per_block);
    assert!(
        nq * b >= lq,
        "block plan covers {} queries, input has {lq}",
        nq * b
    );
    assert!(
        plan.key_blocks * b >= lk,
        "block plan covers {} keys, input has {lk}",
        plan.key_blocks * b
    );
    assert!(
        plan.heads == 1 || plan.heads == h,
        "plan for {} heads, input has {h}",
        plan.heads
    );

    let q_blocks_flat = pad_seq(query, nq * b); // [batch, heads, nq·b, d_k]
    let q = q_blocks_flat.clone().reshape([bs, h, nq, b, dk]); // [batch, heads, query blocks, b, d_k]
    let k = gather_blocks(key, plan, &device); // [batch, heads, query blocks, m·b, d_k]
    let v = gather_blocks(value, plan, &device); // [batch, heads, query blocks, m·b, d_v]
    let w = m * b;
    let mut scores = q.matmul(k.swap_dims(3, 4)); // [batch, heads, query blocks, b, m·b]

    // Element mask from absolute positions: empty slots, positions past the end, the rule.
    let ph = plan.heads;
    let kpos =
        Tensor::<3, Int>::from_data(TensorData::new(plan.key_positions(), [ph, nq, w]), &device)
            .reshape([ph, nq, 1, w]);
    let qpos = Tensor::<1, Int>::arange(0..(nq * b) as i64, &device).reshape([1, nq, b, 1]);
    let invalid = kpos
        .clone()
        .lower_elem(0)
        .bool_or(kpos.clone().greater_equal_elem(lk as i64)); // [heads', nq, 1, w]
    let mut by_position = None;
    let rule_mask = {
        let full = invalid.expand([ph, nq, b, w]);
        match rule {
            ElementRule::All => full,
            ElementRule::Causal { offset } => {
                full.bool_or(kpos.clone().greater(qpos.clone().add_scalar(offset as i64)))
            }
            ElementRule::Band { left, right } => {
                let delta = kpos.clone().sub(qpos.clone()); // [heads', nq, b, w]
                full.bool_or(delta.clone().lower_elem(-(left as i64)))
                    .bool_or(delta.greater_elem(right as i64))
            }
            ElementRule::Explicit(m) => {
                assert_eq!(
                    m.len(),
                    ph * nq * b * w,
                    "explicit mask must be [plan heads, nq, b, m·b]"
                );
                let t = Tensor::<4, Bool>::from_data(
                    TensorData::new(m.as_ref().clone(), [ph, nq, b, w]),
                    &device,
                );
                full.bool_or(t)
            }
            ElementRule::Positions(rule) => {
                by_position = Some(rule);
                full
            }
        }
    };
    let mut mask = rule_mask
        .reshape([1, ph, nq, b, w])
        .expand([bs, h, nq, b, w]);
    if let Some(rule) = by_position {
        // Original positions of the gathered keys (as floats: exact below 2²⁴; slots past the
        // end are already masked) against the queries'.
        let kp = gather_blocks(rule.key.float().reshape([bs, h, lk, 1]), plan, &device)
            .reshape([bs, h, nq, 1, w]);
        let qp =
            pad_seq(rule.query.float().reshape([bs, h, lq, 1]), nq * b).reshape([bs, h, nq, b, 1]);
        let (kp, qp) = (kp.expand([bs, h, nq, b, w]), qp.expand([bs, h, nq, b, w]));
        if let Some(score) = rule.self_score {
            let own = kp.clone().equal(qp.clone());
            scores = scores.mask_fill(own, score);
        }
        mask = mask.bool_or(kp.clone().lower_elem(0.0));
        if rule.causal {
            mask = mask.bool_or(kp.greater(qp));
        }
    }
    if let Some(pad) = mask_pad_k {
        // Key padding, gathered like the keys.
        // Per-head plans gather different blocks per head: give every head its copy.
        let ph_pad = if plan.heads == 1 { 1 } else { h };
        let padded: Tensor<4> = pad_seq(
            pad.clone()
                .float()
                .reshape([bs, 1, lk, 1])
                .expand([bs, ph_pad, lk, 1]),
            plan.key_blocks * b,
        );
        let gathered = gather_blocks(padded, plan, &device) // [batch, heads', nq, w, 1]
            .reshape([bs, ph_pad, nq, 1, w])
            .greater_elem(0.5);
        mask = mask.bool_or(gathered.expand([bs, h, nq, b, w]));
    }

    let (scores, mask, v, w) = match extra {
        None => (scores, mask, v, w),
        Some(ExtraKeys {
            key: gk,
            value: gv,
            mask: gmask,
        }) => {
            let g = gk.dims()[2];
            // Every query against the extra keys.
            let extra_scores = q_blocks_flat
                .matmul(gk.swap_dims(2, 3)) // [batch, heads, nq·b, g]
                .reshape([bs, h, nq, b, g]);
            let extra_mask = match gmask {
                Some(gm) => {
                    let [mb, mh, _, _] = gm.dims();
                    let gm = if nq * b > lq {
                        let pad = Tensor::<4, Int>::zeros([mb, mh, nq * b - lq, g], &device).bool();
                        Tensor::cat(vec![gm, pad], 2)
                    } else {
                        gm
                    };
                    gm.reshape([mb, mh, nq, b, g]).expand([bs, h, nq, b, g])
                }
                None => Tensor::<5, Int>::zeros([bs, h, nq, b, g], &device).bool(),
            };
            let extra_values = gv.reshape([bs, h, 1, g, dv]).expand([bs, h, nq, g, dv]);
            (
                Tensor::cat(vec![scores, extra_scores], 4),
                Tensor::cat(vec![mask, extra_mask], 4),
                Tensor::cat(vec![v, extra_values], 3),
                w + g,
            )
        }
    };
    (
        Parts {
            scores: scores.reshape([bs, h * nq, b, w]),
            mask: mask.reshape([bs, h * nq, b, w]),
            v: v.reshape([bs, h * nq, w, dv]),
        },
        Finish { bs, h, nq, b, lq },
    )
}
