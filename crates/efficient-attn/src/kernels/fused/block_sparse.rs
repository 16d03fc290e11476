//! Block-sparse attention as one fused operation: [`FusedBlockSparse`] for Flex by the CPU
//! kernel [`crate::kernels::cpu::block_sparse`], for the cubecl backends (feature `cube`) by
//! the CubeCL kernels of `kernels::cube::block_sparse`, and for `Autodiff` over either
//! by a node that keeps the inputs, the output and the row statistics (O(N·d)) and calls the
//! fused backward.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, BackendTypes, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

#[cfg(feature = "cube")]
use burn::backend::Cube;

use super::{attention_runs_fused, flex, host, slice};
use crate::kernels::block_sparse::{BlockPlan, BlockSparse, ElementRule, ExtraKeys};
use crate::kernels::cpu::block_sparse::{self, ExtraBias, Inputs, Pattern, Positions, Shape};
use crate::kernels::cpu::zeros;

/// The host-side settings of one call: the plan, the rule inside planned blocks, the scale.
#[derive(Clone, Debug)]
pub struct SparsePattern {
    /// Key blocks per query block.
    pub plan: BlockPlan,
    /// Which positions inside a planned block a query sees.
    pub rule: ElementRule,
    /// Score scale.
    pub scale: f32,
    /// Whether `key_bias` is used (otherwise it is a placeholder).
    pub key_masked: bool,
    /// Whether `extra_bias` is used (otherwise it is a placeholder).
    pub extra_masked: bool,
    /// The original positions of [`ElementRule::Positions`] on the host:
    /// `[batch·heads, seq_q]` and `[batch·heads, seq_k]`.
    pub positions: Option<(Vec<i64>, Vec<i64>)>,
    /// Whether the output carries each row's log-sum-exp as a last column
    /// (`[batch, heads, seq_q, d_v + 1]`), differentiable like the rest (the backward's
    /// output gradient then has that column too).
    pub with_lse: bool,
}

/// Block-sparse attention as one fused operation.
///
/// `q`, `k`, `v` are `[batch, heads, seq, width]`; `extra_k`, `extra_v` the extra keys every
/// query sees, `[batch, heads, g, width]` (`g = 0` for none); `key_bias` `[batch, seq_k]` and
/// `extra_bias` `[batch or 1, heads or 1, seq_q, g]` are additive masks (0 or `-∞`); the row
/// statistics `lse` are `[batch, heads, seq_q, 2]` (shift and sum of exponentials, see
/// [`block_sparse::forward`]; each backend reads back only its own).
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait FusedBlockSparse: Backend {
    /// The attention.
    #[allow(clippy::too_many_arguments)]
    fn block_sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> FloatTensor<Self>;

    /// The forward with the row log-sum-exp the backward needs.
    #[allow(clippy::too_many_arguments)]
    fn block_sparse_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dq, dk, dv, d extra_k, d extra_v)` for the output gradient `d_out` of a forward that
    /// gave `out` and `lse`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn block_sparse_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// The shape of the inputs, checked.
pub(crate) fn shape_of(q: &[usize], k: &[usize], v: &[usize], ek: &[usize], ev: &[usize]) -> Shape {
    assert!(
        [q, k, v, ek, ev].iter().all(|d| d.len() == 4),
        "block-sparse attention takes [batch, heads, seq, width] tensors"
    );
    assert!(
        q[..2] == k[..2] && k[..2] == v[..2] && q[3] == k[3] && k[2] == v[2],
        "block-sparse attention: q {q:?}, k {k:?}, v {v:?} disagree"
    );
    assert!(
        ek[..2] == q[..2] && ev[..2] == q[..2] && ek[2] == ev[2] && ek[3] == q[3] && ev[3] == v[3],
        "block-sparse attention: extra keys {ek:?}, values {ev:?} disagree with q {q:?}, v {v:?}"
    );
    Shape {
        batch: q[0],
        heads: q[1],
        seq_q: q[2],
        seq_k: k[2],
        d_k: q[3],
        d_v: v[3],
        extra: ek[2],
    }
}

/// The host copies of one call's tensors.
struct Host {
    q: burn::backend::flex::FlexTensor,
    k: burn::backend::flex::FlexTensor,
    v: burn::backend::flex::FlexTensor,
    ek: burn::backend::flex::FlexTensor,
    ev: burn::backend::flex::FlexTensor,
    key_bias: Option<burn::backend::flex::FlexTensor>,
    extra_bias: Option<(burn::backend::flex::FlexTensor, Vec<usize>)>,
    dims: [Vec<usize>; 5],
}

impl Host {
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: FloatTensor<Flex>,
        k: FloatTensor<Flex>,
        v: FloatTensor<Flex>,
        ek: FloatTensor<Flex>,
        ev: FloatTensor<Flex>,
        key_bias: FloatTensor<Flex>,
        extra_bias: FloatTensor<Flex>,
        pattern: &SparsePattern,
    ) -> Self {
        let ((q, qd), (k, kd), (v, vd)) = (host(&q), host(&k), host(&v));
        let ((ek, ekd), (ev, evd)) = (host(&ek), host(&ev));
        Self {
            q,
            k,
            v,
            ek,
            ev,
            key_bias: pattern.key_masked.then(|| host(&key_bias).0),
            extra_bias: pattern.extra_masked.then(|| host(&extra_bias)),
            dims: [qd, kd, vd, ekd, evd],
        }
    }

    fn shape(&self) -> Shape {
        let [q, k, v, ek, ev] = &self.dims;
        shape_of(q, k, v, ek, ev)
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            q: slice(&self.q),
            k: slice(&self.k),
            v: slice(&self.v),
            key_bias: self.key_bias.as_ref().map(slice),
            extra_k: slice(&self.ek),
            extra_v: slice(&self.ev),
            extra_bias: self.extra_bias.as_ref().map(|(t, d)| {
                assert_eq!(
                    d.len(),
                    4,
                    "the extra keys' mask is [batch, heads, seq_q, g]"
                );
                ExtraBias {
                    data: slice(t),
                    batch: d[0],
                    heads: d[1],
                }
            }),
        }
    }
}

fn pattern_of(p: &SparsePattern) -> Pattern<'_> {
    Pattern {
        plan: &p.plan,
        rule: &p.rule,
        scale: p.scale,
        positions: match (&p.rule, &p.positions) {
            (ElementRule::Positions(rule), Some((query, key))) => Some(Positions {
                query,
                key,
                causal: rule.causal,
                self_score: rule.self_score,
            }),
            _ => None,
        },
    }
}

/// `[rows, d]` and `[rows]` side by side: `[rows, d + 1]`.
fn pack(out: &[f32], lse: &[f32], d: usize) -> Vec<f32> {
    let mut packed = Vec::with_capacity(out.len() + lse.len());
    for (i, l) in lse.iter().enumerate() {
        packed.extend_from_slice(&out[i * d..(i + 1) * d]);
        packed.push(*l);
    }
    packed
}

/// The inverse of [`pack`].
fn unpack(packed: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = packed.len() / (d + 1);
    let mut out = Vec::with_capacity(rows * d);
    let mut lse = Vec::with_capacity(rows);
    for row in packed.chunks(d + 1) {
        out.extend_from_slice(&row[..d]);
        lse.push(row[d]);
    }
    (out, lse)
}

impl FusedBlockSparse for Flex {
    fn block_sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> FloatTensor<Self> {
        Self::block_sparse_attention_with_lse(
            q, k, v, extra_k, extra_v, key_bias, extra_bias, pattern,
        )
        .0
    }

    fn block_sparse_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let h = Host::new(q, k, v, extra_k, extra_v, key_bias, extra_bias, &pattern);
        let s = h.shape();
        let mut out = zeros(s.batch * s.heads * s.seq_q * s.d_v);
        let mut stats = zeros(2 * s.batch * s.heads * s.seq_q);
        block_sparse::forward(h.inputs(), s, pattern_of(&pattern), &mut out, &mut stats);
        let out = if pattern.with_lse {
            let lse = block_sparse::log_sum_exp(&stats);
            flex(
                pack(&out, &lse, s.d_v),
                &[s.batch, s.heads, s.seq_q, s.d_v + 1],
            )
        } else {
            flex(out, &[s.batch, s.heads, s.seq_q, s.d_v])
        };
        (out, flex(stats, &[s.batch, s.heads, s.seq_q, 2]))
    }

    fn block_sparse_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let h = Host::new(q, k, v, extra_k, extra_v, key_bias, extra_bias, &pattern);
        let s = h.shape();
        let ((out, _), (lse, _), (d_out, _)) = (host(&out), host(&lse), host(&d_out));
        let g = if pattern.with_lse {
            // The output and its gradient carry the log-sum-exp column.
            let (out, _) = unpack(slice(&out), s.d_v);
            let (d_out, d_lse) = unpack(slice(&d_out), s.d_v);
            block_sparse::backward(
                h.inputs(),
                s,
                pattern_of(&pattern),
                &out,
                slice(&lse),
                &d_out,
                Some(&d_lse),
            )
        } else {
            block_sparse::backward(
                h.inputs(),
                s,
                pattern_of(&pattern),
                slice(&out),
                slice(&lse),
                slice(&d_out),
                None,
            )
        };
        let [qd, kd, vd, ekd, evd] = &h.dims;
        (
            flex(g.dq, qd),
            flex(g.dk, kd),
            flex(g.dv, vd),
            flex(g.d_extra_k, ekd),
            flex(g.d_extra_v, evd),
        )
    }
}

/// On the cubecl backends, the kernels of [`crate::kernels::cube::block_sparse`].
#[cfg(feature = "cube")]
impl FusedBlockSparse for Cube {
    fn block_sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> FloatTensor<Self> {
        crate::kernels::cube::block_sparse::forward(
            q, k, v, extra_k, extra_v, key_bias, extra_bias, &pattern,
        )
        .0
    }

    fn block_sparse_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::kernels::cube::block_sparse::forward(
            q, k, v, extra_k, extra_v, key_bias, extra_bias, &pattern,
        )
    }

    fn block_sparse_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        crate::kernels::cube::block_sparse::backward(
            q, k, v, extra_k, extra_v, key_bias, extra_bias, out, lse, d_out, &pattern,
        )
    }
}

/// What the backward keeps: the inputs, the output and the row log-sum-exp.
#[derive(Clone, Debug)]
struct SparseState<B: BackendTypes> {
    q: B::FloatTensorPrimitive,
    k: B::FloatTensorPrimitive,
    v: B::FloatTensorPrimitive,
    extra_k: B::FloatTensorPrimitive,
    extra_v: B::FloatTensorPrimitive,
    key_bias: B::FloatTensorPrimitive,
    extra_bias: B::FloatTensorPrimitive,
    out: B::FloatTensorPrimitive,
    lse: B::FloatTensorPrimitive,
    pattern: Arc<SparsePattern>,
}

#[derive(Debug)]
struct SparseBackward;

impl<B: FusedBlockSparse> Backward<B, 5> for SparseBackward {
    type State = SparseState<B>;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv, dek, dev) = B::block_sparse_attention_backward(
            s.q,
            s.k,
            s.v,
            s.extra_k,
            s.extra_v,
            s.key_bias,
            s.extra_bias,
            s.out,
            s.lse,
            d_out,
            s.pattern,
        );
        for (node, grad) in ops.parents.into_iter().zip([dq, dk, dv, dek, dev]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FusedBlockSparse, C: CheckpointStrategy> FusedBlockSparse for Autodiff<B, C> {
    fn block_sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        extra_k: FloatTensor<Self>,
        extra_v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        extra_bias: FloatTensor<Self>,
        pattern: Arc<SparsePattern>,
    ) -> FloatTensor<Self> {
        let prep = SparseBackward
            .prepare::<C>([q.node(), k.node(), v.node(), extra_k.node(), extra_v.node()])
            .compute_bound()
            .stateful();
        let (q, k, v, extra_k, extra_v) = (
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            extra_k.into_primitive(),
            extra_v.into_primitive(),
        );
        let key_bias = key_bias.into_primitive();
        let extra_bias = extra_bias.into_primitive();
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::block_sparse_attention_with_lse(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    extra_k.clone(),
                    extra_v.clone(),
                    key_bias.clone(),
                    extra_bias.clone(),
                    pattern.clone(),
                );
                let state = SparseState {
                    q,
                    k,
                    v,
                    extra_k,
                    extra_v,
                    key_bias,
                    extra_bias,
                    out: out.clone(),
                    lse,
                    pattern,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::block_sparse_attention(
                q, k, v, extra_k, extra_v, key_bias, extra_bias, pattern,
            )),
        }
    }

    fn block_sparse_attention_with_lse(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: Arc<SparsePattern>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the log-sum-exp forward is called by the autodiff node, below autodiff")
    }

    fn block_sparse_attention_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: Arc<SparsePattern>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        unreachable!("the fused backward is called by the autodiff node, below autodiff")
    }
}

/// [`crate::kernels::block_sparse::block_sparse_attention`] through [`FusedBlockSparse`]: the
/// queries come scaled, the key blocks are read in place and nothing N × N or gathered is
/// formed, forward or backward.
///
/// # Shapes
/// - see [`BlockSparse`]
/// - output: `[batch, heads, seq_q, d_v]`
///
/// # Panics
/// Unless [`attention_runs_fused`] holds for the queries, or if the plan does not cover the
/// input.
pub fn block_sparse_attention(input: BlockSparse<'_>) -> Tensor<4> {
    call(input, false)
}

/// [`crate::kernels::block_sparse::block_sparse_attention_with_lse`] through
/// [`FusedBlockSparse`]: the output and each row's log-sum-exp (`+∞` where a row sees no key),
/// both differentiable.
///
/// # Shapes
/// - see [`BlockSparse`]
/// - output: `[batch, heads, seq_q, d_v]`, `[batch, heads, seq_q]`
///
/// # Panics
/// As [`block_sparse_attention`].
pub fn block_sparse_attention_with_lse(input: BlockSparse<'_>) -> (Tensor<4>, Tensor<3>) {
    let dv = input.value.dims()[3];
    let packed = call(input, true); // [batch, heads, seq_q, d_v + 1]
    let [b, h, n, _] = packed.dims();
    (
        packed.clone().narrow(3, 0, dv),
        packed.narrow(3, dv, 1).reshape([b, h, n]),
    )
}

/// The positions of a [`PositionRule`](crate::kernels::block_sparse::PositionRule) on the host,
/// flattened to `[batch·heads, seq]`.
fn host_positions(t: &Tensor<3, burn::tensor::Int>) -> Vec<i64> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("integer positions")
}

fn call(input: BlockSparse<'_>, with_lse: bool) -> Tensor<4> {
    let BlockSparse {
        query,
        key,
        value,
        mask_pad_k,
        plan,
        rule,
        extra,
    } = input;
    assert!(
        attention_runs_fused(&query),
        "the fused block-sparse attention runs on f32 Flex (or cubecl) tensors"
    );
    let [b, h, _, dk] = query.dims();
    let dv = value.dims()[3];
    let seq_k = key.dims()[2];
    let device = query.device();
    let key_bias = match mask_pad_k {
        Some(pad) => {
            Tensor::<2>::zeros([b, seq_k], &device).mask_fill(pad.clone(), f32::NEG_INFINITY)
        }
        None => Tensor::<2>::zeros([1, 1], &device),
    };
    let (extra_k, extra_v, extra_bias) = match extra {
        Some(ExtraKeys { key, value, mask }) => (
            key,
            value,
            mask.map(|m| Tensor::<4>::zeros(m.dims(), &device).mask_fill(m, f32::NEG_INFINITY)),
        ),
        None => (
            Tensor::<4>::zeros([b, h, 0, dk], &device),
            Tensor::<4>::zeros([b, h, 0, dv], &device),
            None,
        ),
    };
    let positions = match &rule {
        ElementRule::Positions(p) => Some((host_positions(&p.query), host_positions(&p.key))),
        _ => None,
    };
    let pattern = Arc::new(SparsePattern {
        plan: plan.clone(),
        rule,
        scale: 1.0,
        key_masked: mask_pad_k.is_some(),
        extra_masked: extra_bias.is_some(),
        positions,
        with_lse,
    });
    let extra_bias = extra_bias.unwrap_or_else(|| Tensor::<4>::zeros([1, 1, 1, 1], &device));
    let out = <Dispatch as FusedBlockSparse>::block_sparse_attention(
        query.into_dispatch(),
        key.into_dispatch(),
        value.into_dispatch(),
        extra_k.into_dispatch(),
        extra_v.into_dispatch(),
        key_bias.into_dispatch(),
        extra_bias.into_dispatch(),
        pattern,
    );
    Tensor::from_dispatch(out)
}
