//! Block-sparse attention on the cubecl backends (`wgpu`, `cuda`): the [`FusedBlockSparse`]
//! operation as CubeCL kernels over a [`BlockPlan`] held on the device as index data.
//!
//! - Forward: one unit per query row visits the key blocks its plan lists for its query block
//!   (in place in `k` and `v`: nothing is gathered), applies the [`ElementRule`] (causal, band,
//!   explicit mask, or by the original positions of a permuted sequence with Reformer's self
//!   score), the key padding and, last, the extra (global) keys with their own mask, with an
//!   online softmax; it writes the output and the row statistics (shift and sum of
//!   exponentials, kept apart as on the CPU so that a self score of −1e5 keeps the backward's
//!   probabilities exact), and, when asked, the row log-sum-exp as an extra output column
//!   (`+∞` for a row that sees no key).
//! - Backward: one unit per query row recomputes its scores for `dq` (and writes the row term
//!   `Dᵢ = dOᵢ·Oᵢ − dlseᵢ`); one unit per key row walks the plan's inverse (which query
//!   blocks list its key block, built on the host and uploaded) for `dk`, `dv`; one unit per
//!   extra key sums over every query for its gradients.
//!
//! Cost: O(N·m·b·d) time for m key blocks of b positions per query block (plus O(N·g·d) for g
//! extra keys); memory O(N·d): no score matrix, gathered block or N × N tensor is formed,
//! forward or backward. Untiled (each unit reads its rows from global memory): a correct,
//! memory-lean first version, not a fast one.
//!
//! [`FusedBlockSparse`]: crate::kernels::fused::block_sparse::FusedBlockSparse

use burn::tensor::{DType, TensorData};
use burn_backend::ops::FloatTensorOps;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use self::kernels::{
    RuleFlags, SizesLaunch, backward_dkv_kernel, backward_dq_kernel, backward_extra_kernel,
    forward_kernel,
};
use super::{dims_of, dims4, empty_like, launch_shape};
use crate::kernels::block_sparse::{BlockPlan, ElementRule};
use crate::kernels::fused::block_sparse::{SparsePattern, shape_of};

mod kernels;

/// A device copy of `data` (as `f32`, one element at least) next to `model`.
fn upload(model: &CubeTensor, mut data: Vec<f32>) -> CubeTensor {
    if data.is_empty() {
        data.push(0.0);
    }
    let n = data.len();
    <burn::backend::Cube as FloatTensorOps<burn::backend::Cube>>::float_from_data(
        TensorData::new(data, [n]),
        &model.device,
    )
}

/// The plan's key block ids `[plan heads, query blocks, per block]`, −1 for an empty slot.
fn plan_ids(plan: &BlockPlan) -> Vec<f32> {
    let mut ids = Vec::with_capacity(plan.heads * plan.query_blocks * plan.per_block);
    for h in 0..plan.heads {
        for qb in 0..plan.query_blocks {
            for s in 0..plan.per_block {
                ids.push(plan.get(h, qb, s).map_or(-1.0, |kb| kb as f32));
            }
        }
    }
    ids
}

/// The plan's inverse: for every `(plan head, key block)`, the entries `query block · per
/// block + slot` that list it, as offsets (`[plan heads · key blocks + 1]`) and entries.
fn plan_inverse(plan: &BlockPlan) -> (Vec<f32>, Vec<f32>) {
    let mut lists = vec![Vec::new(); plan.heads * plan.key_blocks];
    for h in 0..plan.heads {
        for qb in 0..plan.query_blocks {
            for s in 0..plan.per_block {
                if let Some(kb) = plan.get(h, qb, s) {
                    lists[h * plan.key_blocks + kb].push((qb * plan.per_block + s) as f32);
                }
            }
        }
    }
    let mut start = Vec::with_capacity(lists.len() + 1);
    start.push(0.0);
    let mut entries = Vec::new();
    for list in lists {
        entries.extend(list);
        start.push(entries.len() as f32);
    }
    (start, entries)
}

/// The sizes of one call and the rule's flags and data.
struct Call {
    sizes: SizesLaunchValues,
    flags: RuleFlags,
    rule: [CubeTensor; 6],
    dims: [usize; 7],
    key_masked: bool,
    extra_masked: bool,
    packed: bool,
}

/// Plain values of [`Sizes`], launched by [`Call::sizes_arg`].
#[derive(Clone, Copy)]
struct SizesLaunchValues {
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    block: usize,
    query_blocks: usize,
    key_blocks: usize,
    per_block: usize,
    plan_heads: usize,
    extra: usize,
    bias_batch: usize,
    bias_heads: usize,
    offset: usize,
    left: usize,
    right: usize,
    scale: f32,
    self_score: f32,
}

impl Call {
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: &CubeTensor,
        k: &CubeTensor,
        v: &CubeTensor,
        extra_k: &CubeTensor,
        extra_v: &CubeTensor,
        key_bias: &CubeTensor,
        extra_bias: &CubeTensor,
        pattern: &SparsePattern,
    ) -> Self {
        // The checks of the CPU path, on the host-side shapes: a kernel reading past a buffer
        // would give wrong numbers silently, not panic.
        shape_of(
            &dims_of(q),
            &dims_of(k),
            &dims_of(v),
            &dims_of(extra_k),
            &dims_of(extra_v),
        );
        let ([b, h, nq, dk], [_, _, nk, _], [_, _, _, dv], [_, _, g, _]) =
            (dims4(q), dims4(k), dims4(v), dims4(extra_k));
        assert_eq!(
            q.dtype,
            DType::F32,
            "the cubecl block-sparse attention runs on f32"
        );
        assert!(
            dk > 0 && dv > 0,
            "the cubecl block-sparse attention needs non-empty head widths, got d_k {dk}, d_v {dv}"
        );
        if pattern.key_masked {
            assert_eq!(
                dims_of(key_bias),
                [b, nk],
                "block-sparse: the key bias is [batch, seq_k]"
            );
        }
        if pattern.extra_masked {
            let d = dims_of(extra_bias);
            assert!(
                d.len() == 4
                    && (d[0] == 1 || d[0] == b)
                    && (d[1] == 1 || d[1] == h)
                    && d[2..] == [nq, g],
                "block-sparse: the extra keys' mask {d:?} is not [{b} or 1, {h} or 1, {nq}, {g}]"
            );
        }
        let plan = &pattern.plan;
        assert!(
            plan.query_blocks * plan.block >= nq && plan.key_blocks * plan.block >= nk,
            "block plan covers {} queries and {} keys, input has {nq} and {nk}",
            plan.query_blocks * plan.block,
            plan.key_blocks * plan.block
        );
        assert!(
            plan.heads == 1 || plan.heads == h,
            "plan for {} heads, input has {h}",
            plan.heads
        );
        let mut flags = RuleFlags::default();
        let (mut offset, mut left, mut right, mut self_score) = (0, 0, 0, 0.0);
        let mut explicit = Vec::new();
        let (mut query_pos, mut key_pos) = (Vec::new(), Vec::new());
        match &pattern.rule {
            ElementRule::All => {}
            ElementRule::Causal { offset: o } => {
                flags.causal = true;
                offset = *o;
            }
            ElementRule::Band { left: l, right: r } => {
                flags.band = true;
                (left, right) = (*l, *r);
            }
            ElementRule::Explicit(mask) => {
                flags.explicit = true;
                assert_eq!(
                    mask.len(),
                    plan.heads * plan.query_blocks * plan.block * plan.per_block * plan.block,
                    "explicit mask must be [plan heads, query blocks, b, per block · b]"
                );
                explicit = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
            }
            ElementRule::Positions(rule) => {
                let (qp, kp) = pattern
                    .positions
                    .as_ref()
                    .expect("the position rule comes with its positions");
                flags.positions = true;
                flags.positions_causal = rule.causal;
                if let Some(score) = rule.self_score {
                    flags.self_score = true;
                    self_score = score;
                }
                assert!(
                    qp.len() == b * h * nq && kp.len() == b * h * nk,
                    "block-sparse: positions for {} queries and {} keys, input has {} and {}",
                    qp.len(),
                    kp.len(),
                    b * h * nq,
                    b * h * nk
                );
                query_pos = qp.iter().map(|&p| p as f32).collect();
                key_pos = kp.iter().map(|&p| p as f32).collect();
            }
        }
        let (bias_batch, bias_heads) = if pattern.extra_masked {
            let d = dims4(extra_bias);
            (d[0], d[1])
        } else {
            (1, 1)
        };
        let rule = [
            upload(q, plan_ids(plan)),
            upload(q, explicit),
            upload(q, query_pos),
            upload(q, key_pos),
            into_contiguous(key_bias.clone()),
            into_contiguous(extra_bias.clone()),
        ];
        Self {
            sizes: SizesLaunchValues {
                heads: h,
                seq_q: nq,
                seq_k: nk,
                block: plan.block,
                query_blocks: plan.query_blocks,
                key_blocks: plan.key_blocks,
                per_block: plan.per_block,
                plan_heads: plan.heads,
                extra: g,
                bias_batch,
                bias_heads,
                offset,
                left,
                right,
                scale: pattern.scale,
                self_score,
            },
            flags,
            rule,
            dims: [b, h, nq, nk, dk, dv, g],
            key_masked: pattern.key_masked,
            extra_masked: pattern.extra_masked,
            packed: pattern.with_lse,
        }
    }

    fn sizes_arg(&self) -> SizesLaunch {
        let s = self.sizes;
        SizesLaunch::new(
            s.heads,
            s.seq_q,
            s.seq_k,
            s.block,
            s.query_blocks,
            s.key_blocks,
            s.per_block,
            s.plan_heads,
            s.extra,
            s.bias_batch,
            s.bias_heads,
            s.offset,
            s.left,
            s.right,
            s.scale,
            s.self_score,
            f32::INFINITY,
        )
    }

    /// The rule's tensor `n`: plan ids, explicit mask, query and key positions, key bias,
    /// extra-key bias.
    fn rule_arg(&self, n: usize) -> TensorArg {
        self.rule[n].clone().into_tensor_arg()
    }
}

/// The forward: the output (`[B, H, Nq, d_v]`, or `[B, H, Nq, d_v + 1]` with the row
/// log-sum-exp last when the pattern asks for it) and the row statistics `[B, H, Nq, 2]`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    extra_k: CubeTensor,
    extra_v: CubeTensor,
    key_bias: CubeTensor,
    extra_bias: CubeTensor,
    pattern: &SparsePattern,
) -> (CubeTensor, CubeTensor) {
    let call = Call::new(
        &q,
        &k,
        &v,
        &extra_k,
        &extra_v,
        &key_bias,
        &extra_bias,
        pattern,
    );
    let [q, k, v, extra_k, extra_v] = [q, k, v, extra_k, extra_v].map(into_contiguous);
    let [b, h, nq, _, dk, dv, _] = call.dims;
    let width = if call.packed { dv + 1 } else { dv };
    let out = empty_like(&q, &[b, h, nq, width]);
    let stats = empty_like(&q, &[b, h, nq, 2]);
    let rows = b * h * nq;
    if rows > 0 {
        let (count, dim) = launch_shape(&q, rows);
        forward_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            extra_k.into_tensor_arg(),
            extra_v.into_tensor_arg(),
            call.rule_arg(0),
            call.rule_arg(1),
            call.rule_arg(2),
            call.rule_arg(3),
            call.rule_arg(4),
            call.rule_arg(5),
            out.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            call.sizes_arg(),
            rows,
            dk,
            dv,
            call.flags,
            call.key_masked,
            call.extra_masked,
            call.packed,
        );
    }
    (out, stats)
}

/// The backward: `(dq, dk, dv, d extra_k, d extra_v)` for the output gradient `d_out` of a
/// forward that gave `out` and `stats`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    extra_k: CubeTensor,
    extra_v: CubeTensor,
    key_bias: CubeTensor,
    extra_bias: CubeTensor,
    out: CubeTensor,
    stats: CubeTensor,
    d_out: CubeTensor,
    pattern: &SparsePattern,
) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
    let call = Call::new(
        &q,
        &k,
        &v,
        &extra_k,
        &extra_v,
        &key_bias,
        &extra_bias,
        pattern,
    );
    let [q, k, v, extra_k, extra_v, out, stats, d_out] =
        [q, k, v, extra_k, extra_v, out, stats, d_out].map(into_contiguous);
    let [b, h, nq, nk, dk, dv, g] = call.dims;
    let grad_q = empty_like(&q, &[b, h, nq, dk]);
    let grad_k = empty_like(&q, &[b, h, nk, dk]);
    let grad_v = empty_like(&q, &[b, h, nk, dv]);
    let grad_ek = empty_like(&q, &[b, h, g, dk]);
    let grad_ev = empty_like(&q, &[b, h, g, dv]);
    let term = empty_like(&q, &[b, h, nq.max(1)]);
    let rows = b * h * nq;
    if rows > 0 {
        let (count, dim) = launch_shape(&q, rows);
        backward_dq_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            extra_k.clone().into_tensor_arg(),
            extra_v.clone().into_tensor_arg(),
            call.rule_arg(0),
            call.rule_arg(1),
            call.rule_arg(2),
            call.rule_arg(3),
            call.rule_arg(4),
            call.rule_arg(5),
            out.into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            d_out.clone().into_tensor_arg(),
            grad_q.clone().into_tensor_arg(),
            term.clone().into_tensor_arg(),
            call.sizes_arg(),
            rows,
            dk,
            dv,
            call.flags,
            call.key_masked,
            call.extra_masked,
            call.packed,
        );
    }
    let key_rows = b * h * nk;
    if key_rows > 0 {
        let (start, entries) = plan_inverse(&pattern.plan);
        let (count, dim) = launch_shape(&q, key_rows);
        backward_dkv_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            call.rule_arg(1),
            call.rule_arg(2),
            call.rule_arg(3),
            call.rule_arg(4),
            upload(&q, start).into_tensor_arg(),
            upload(&q, entries).into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            d_out.clone().into_tensor_arg(),
            term.clone().into_tensor_arg(),
            grad_k.clone().into_tensor_arg(),
            grad_v.clone().into_tensor_arg(),
            call.sizes_arg(),
            key_rows,
            dk,
            dv,
            call.flags,
            call.key_masked,
            call.packed,
        );
    }
    let extra_rows = b * h * g;
    if extra_rows > 0 {
        let (count, dim) = launch_shape(&q, extra_rows);
        backward_extra_kernel::launch(
            &q.client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            extra_k.into_tensor_arg(),
            extra_v.into_tensor_arg(),
            call.rule_arg(5),
            stats.into_tensor_arg(),
            d_out.into_tensor_arg(),
            term.into_tensor_arg(),
            grad_ek.clone().into_tensor_arg(),
            grad_ev.clone().into_tensor_arg(),
            call.sizes_arg(),
            extra_rows,
            dk,
            dv,
            call.extra_masked,
            call.packed,
        );
    }
    (grad_q, grad_k, grad_v, grad_ek, grad_ev)
}
