//! Kernel (linear) attention on feature maps as one fused operation: [`FusedKernelAttention`]
//! for Flex by the CPU kernel [`crate::kernels::cpu::linear`], for the cubecl backends (with
//! the `cube` feature) by the CubeCL kernels of `kernels::cube::linear`, and for
//! `Autodiff` over either by a node that keeps the inputs and the output and calls the fused
//! backward (which recomputes the chunk states).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, BackendTypes, Dispatch, Flex, backend_extension};
use burn::tensor::{Bool, Tensor};

#[cfg(feature = "cube")]
use burn::backend::Cube;

use super::{attention_runs_fused, host, like, slice};
use crate::kernels::cpu::linear::{self, Feature, Features, Inputs, Shape};
use crate::kernels::cpu::zeros;

/// `out_i = φ(q_i) S_i / φ(q_i)·z_i` over the keys query `i` sees: every key (`chunk = 0`) or
/// causally, in chunks of `chunk` queries. `q [B, H, Nq, m]`, `k [B, H, Nk, m]`,
/// `v [B, H, Nk, dv]`; `feature` 0: `q`, `k` are the features (padded keys zero), 1:
/// `φ = elu + 1` is applied here and `keep [B, Nk]` (1 = keep, 0 = padded; ignored unless
/// `masked`) zeroes padded keys.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait FusedKernelAttention: Backend {
    /// The attention.
    #[allow(clippy::too_many_arguments)]
    fn kernel_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        masked: bool,
        feature: u8,
        chunk: usize,
    ) -> FloatTensor<Self>;

    /// `(dq, dk, dv)` for the output gradient `d_out` of a forward that gave `out`.
    #[allow(clippy::too_many_arguments)]
    fn kernel_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        out: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        masked: bool,
        feature: u8,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

fn feature_of(code: u8) -> Feature {
    match code {
        0 => Feature::Identity,
        _ => Feature::EluPlusOne,
    }
}

pub(crate) fn shape_of(q: &[usize], k: &[usize], v: &[usize]) -> Shape {
    assert!(
        q.len() == 4 && k.len() == 4 && v.len() == 4,
        "kernel attention takes [batch, heads, seq, width] tensors"
    );
    assert!(
        q[..2] == k[..2] && k[..2] == v[..2] && q[3] == k[3] && k[2] == v[2],
        "kernel attention: phi_q {q:?}, phi_k {k:?}, v {v:?} disagree"
    );
    Shape {
        heads: q[0] * q[1],
        seq_q: q[2],
        seq_k: k[2],
        m: q[3],
        d_v: v[3],
    }
}

fn chunk_of(chunk: usize) -> linear::Chunk {
    (chunk > 0).then_some(chunk)
}

impl FusedKernelAttention for Flex {
    fn kernel_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        masked: bool,
        feature: u8,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let ((hq, qd), (hk, kd), (hv, vd)) = (host(&q), host(&k), host(&v));
        let shape = shape_of(&qd, &kd, &vd);
        let keep = masked.then(|| host(&keep).0);
        let inputs = Inputs {
            phi_q: slice(&hq),
            phi_k: slice(&hk),
            v: slice(&hv),
        };
        let features = Features {
            map: feature_of(feature),
            keep: keep.as_ref().map(slice),
            heads_per_batch: qd[1],
        };
        let mut out = zeros(shape.heads * shape.seq_q * shape.d_v);
        linear::forward(inputs, features, shape, chunk_of(chunk), &mut out);
        like(out, &[qd[0], qd[1], qd[2], vd[3]], &q)
    }

    fn kernel_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        out: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        masked: bool,
        feature: u8,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let ((hq, qd), (hk, kd), (hv, vd)) = (host(&q), host(&k), host(&v));
        let shape = shape_of(&qd, &kd, &vd);
        let keep = masked.then(|| host(&keep).0);
        let (out, _) = host(&out);
        let (d_out, _) = host(&d_out);
        let inputs = Inputs {
            phi_q: slice(&hq),
            phi_k: slice(&hk),
            v: slice(&hv),
        };
        let features = Features {
            map: feature_of(feature),
            keep: keep.as_ref().map(slice),
            heads_per_batch: qd[1],
        };
        let (dq, dk, dv) = linear::backward(
            inputs,
            features,
            shape,
            chunk_of(chunk),
            slice(&out),
            slice(&d_out),
        );
        (like(dq, &qd, &q), like(dk, &kd, &k), like(dv, &vd, &v))
    }
}

/// On the cubecl backends, the kernels of [`crate::kernels::cube::linear`].
#[cfg(feature = "cube")]
impl FusedKernelAttention for Cube {
    fn kernel_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        masked: bool,
        feature: u8,
        chunk: usize,
    ) -> FloatTensor<Self> {
        crate::kernels::cube::linear::forward(q, k, v, keep, cube_options(masked, feature, chunk))
    }

    fn kernel_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        out: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        masked: bool,
        feature: u8,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        crate::kernels::cube::linear::backward(
            q,
            k,
            v,
            keep,
            out,
            d_out,
            cube_options(masked, feature, chunk),
        )
    }
}

#[cfg(feature = "cube")]
fn cube_options(masked: bool, feature: u8, chunk: usize) -> crate::kernels::cube::linear::Options {
    crate::kernels::cube::linear::Options {
        masked,
        elu: feature_of(feature) == Feature::EluPlusOne,
        chunk,
    }
}

/// What the backward keeps: the inputs and the output.
#[derive(Clone, Debug)]
struct KernelState<B: BackendTypes> {
    q: B::FloatTensorPrimitive,
    k: B::FloatTensorPrimitive,
    v: B::FloatTensorPrimitive,
    keep: B::FloatTensorPrimitive,
    out: B::FloatTensorPrimitive,
    masked: bool,
    feature: u8,
    chunk: usize,
}

#[derive(Debug)]
struct KernelBackward;

impl<B: FusedKernelAttention> Backward<B, 3> for KernelBackward {
    type State = KernelState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) = B::kernel_attention_backward(
            s.q, s.k, s.v, s.keep, s.out, d_out, s.masked, s.feature, s.chunk,
        );
        for (node, grad) in [(q_node, dq), (k_node, dk), (v_node, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FusedKernelAttention, C: CheckpointStrategy> FusedKernelAttention for Autodiff<B, C> {
    fn kernel_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        masked: bool,
        feature: u8,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let prep = KernelBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful();
        let (q, k, v, keep) = (
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            keep.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::kernel_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    keep.clone(),
                    masked,
                    feature,
                    chunk,
                );
                let state = KernelState {
                    q,
                    k,
                    v,
                    keep,
                    out: out.clone(),
                    masked,
                    feature,
                    chunk,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::kernel_attention(q, k, v, keep, masked, feature, chunk))
            }
        }
    }

    fn kernel_attention_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: bool,
        _: u8,
        _: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the fused backward is called by the autodiff node, below autodiff")
    }
}

/// Kernel attention on features through [`FusedKernelAttention`]: bidirectional
/// (`chunk = None`) or causal in chunks of `chunk` queries (bottom-right aligned). Padded keys
/// must have zero features.
///
/// # Shapes
/// - phi_q: `[batch, heads, seq_q, m]`, phi_k: `[batch, heads, seq_k, m]`,
///   v: `[batch, heads, seq_k, d_v]`
/// - output: `[batch, heads, seq_q, d_v]`
///
/// # Panics
/// Unless [`attention_runs_fused`] holds for `phi_q`.
pub fn kernel_attention(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    chunk: Option<usize>,
) -> Tensor<4> {
    assert!(
        attention_runs_fused(&phi_q),
        "the fused kernel attention runs on f32 Flex (or cubecl) tensors"
    );
    check_causal_lengths(&phi_q, &phi_k, chunk);
    let device = phi_q.device();
    let out = <Dispatch as FusedKernelAttention>::kernel_attention(
        phi_q.into_dispatch(),
        phi_k.into_dispatch(),
        v.into_dispatch(),
        Tensor::<2>::zeros([1, 1], &device).into_dispatch(),
        false,
        0,
        chunk.map_or(0, |c| c.max(1)),
    );
    Tensor::from_dispatch(out)
}

/// Linear Transformer attention, `φ = elu + 1` applied inside the fused operation, padded
/// keys (`key_pad`, `true` = padded) zeroed there: bidirectional or causal in chunks.
///
/// # Shapes
/// - q: `[batch, heads, seq_q, d_k]`, k: `[batch, heads, seq_k, d_k]`,
///   v: `[batch, heads, seq_k, d_v]`, key_pad: `[batch, seq_k]`
/// - output: `[batch, heads, seq_q, d_v]`
///
/// # Panics
/// Unless [`attention_runs_fused`] holds for `q`.
pub fn elu_kernel_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_pad: Option<&Tensor<2, Bool>>,
    chunk: Option<usize>,
) -> Tensor<4> {
    assert!(
        attention_runs_fused(&q),
        "the fused kernel attention runs on f32 Flex (or cubecl) tensors"
    );
    check_causal_lengths(&q, &k, chunk);
    let device = q.device();
    let keep = match key_pad {
        Some(pad) => pad.clone().bool_not().float(),
        None => Tensor::<2>::zeros([1, 1], &device),
    };
    let out = <Dispatch as FusedKernelAttention>::kernel_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        keep.into_dispatch(),
        key_pad.is_some(),
        1,
        chunk.map_or(0, |c| c.max(1)),
    );
    Tensor::from_dispatch(out)
}

/// Causal kernel attention aligns queries to the last keys, so it needs `seq_k >= seq_q`.
fn check_causal_lengths(q: &Tensor<4>, k: &Tensor<4>, chunk: Option<usize>) {
    let (lq, lk) = (q.dims()[2], k.dims()[2]);
    assert!(
        chunk.is_none() || lk >= lq,
        "causal kernel attention needs seq_k >= seq_q, got {lq} > {lk}"
    );
}
