//! Layer normalisation over the last axis as one fused operation: [`FusedLayerNorm`] for Flex
//! by the CPU kernel [`crate::kernels::cpu::layer_norm`] (rows over all threads, vectorised),
//! and for `Autodiff<Flex>` by a node that keeps each row's mean and inverse standard
//! deviation and calls the fused backward (Burn composes the backward of `layer_norm` from
//! about ten single-threaded element-wise operations).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, BackendTypes, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

use super::{flex, host, runs_fused, slice};
use crate::kernels::cpu::layer_norm::{self, Norm};
use crate::kernels::cpu::zeros;

/// Layer normalisation as one operation. `x [rows, width]`, `gamma [width]`, `beta [width]`
/// (ignored unless `has_beta`), `stats [rows, 2]` (each row's mean and `1/√(var + eps)`).
#[backend_extension(Flex, Autodiff)]
pub trait FusedLayerNorm: Backend {
    /// `y = (x - mean)/√(var + eps)·γ + β` per row.
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        has_beta: bool,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// The forward with the row statistics the backward needs.
    fn layer_norm_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        has_beta: bool,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dx, dγ, dβ)` for the output gradient `dy`.
    fn layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl FusedLayerNorm for Flex {
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        has_beta: bool,
        eps: f32,
    ) -> FloatTensor<Self> {
        Self::layer_norm_with_stats(x, gamma, beta, has_beta, eps).0
    }

    fn layer_norm_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        has_beta: bool,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let ((x, dims), (gamma, _)) = (host(&x), host(&gamma));
        let beta = has_beta.then(|| host(&beta).0);
        let norm = Norm {
            x: slice(&x),
            gamma: slice(&gamma),
            beta: beta.as_ref().map(slice),
            eps,
        };
        let rows = norm.x.len() / norm.gamma.len().max(1);
        let mut y = zeros(norm.x.len());
        let mut stats = vec![0.0; 2 * rows];
        layer_norm::forward(norm, &mut y, &mut stats);
        (flex(y, &dims), flex(stats, &[rows, 2]))
    }

    fn layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let ((x, dims), (gamma, gamma_dims)) = (host(&x), host(&gamma));
        let ((stats, _), (dy, _)) = (host(&stats), host(&dy));
        let norm = Norm {
            x: slice(&x),
            gamma: slice(&gamma),
            beta: None,
            eps: 0.0,
        };
        let g = layer_norm::backward(norm, slice(&stats), slice(&dy));
        (
            flex(g.dx, &dims),
            flex(g.dgamma, &gamma_dims),
            flex(g.dbeta, &gamma_dims),
        )
    }
}

/// What the backward of [`FusedLayerNorm::layer_norm`] keeps: the input, γ and the row
/// statistics.
#[derive(Clone, Debug)]
struct LayerNormState<B: BackendTypes> {
    x: B::FloatTensorPrimitive,
    gamma: B::FloatTensorPrimitive,
    stats: B::FloatTensorPrimitive,
}

#[derive(Debug)]
struct LayerNormBackward;

impl<B: FusedLayerNorm> burn::backend::autodiff::ops::Backward<B, 3> for LayerNormBackward {
    type State = LayerNormState<B>;

    fn backward(
        self,
        ops: burn::backend::autodiff::ops::Ops<Self::State, 3>,
        grads: &mut burn::backend::autodiff::grads::Gradients,
        _: &mut burn::backend::autodiff::checkpoint::base::Checkpointer,
    ) {
        let [x_node, gamma_node, beta_node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dx, dgamma, dbeta) = B::layer_norm_backward(s.x, s.gamma, s.stats, dy);
        for (node, grad) in [(x_node, dx), (gamma_node, dgamma), (beta_node, dbeta)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FusedLayerNorm, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    FusedLayerNorm for Autodiff<B, C>
{
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        has_beta: bool,
        eps: f32,
    ) -> FloatTensor<Self> {
        use burn::backend::autodiff::ops::{Backward, OpsKind};
        let prep = LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (x, gamma, beta) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let (y, stats) =
                    B::layer_norm_with_stats(x.clone(), gamma.clone(), beta, has_beta, eps);
                prep.finish(LayerNormState { x, gamma, stats }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as FusedLayerNorm>::layer_norm(
                x, gamma, beta, has_beta, eps,
            )),
        }
    }

    fn layer_norm_with_stats(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: bool,
        _: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!(
            "the forward with its statistics is called by the autodiff node, below autodiff"
        )
    }

    fn layer_norm_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the fused backward is called by the autodiff node, below autodiff")
    }
}

/// Layer normalisation over the last axis as one fused operation (on Flex a CPU kernel over
/// all threads; under autodiff a node with its own backward that keeps each row's mean and
/// inverse deviation): `(x - mean)/√(var + eps)·γ + β`, the variance biased, as Burn's
/// [`layer_norm`](burn::tensor::module::layer_norm).
///
/// # Shapes
/// - x: `[..., width]`, gamma: `[width]`, beta: `[width]`
/// - output: `[..., width]`
///
/// # Panics
/// Unless [`runs_fused`] holds for `x` (the other tensors on the same device).
pub fn fused_layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
) -> Tensor<D> {
    assert!(
        runs_fused(&x),
        "the fused layer norm runs on f32 Flex tensors"
    );
    let dims = x.dims();
    let width = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let has_beta = beta.is_some();
    let beta = beta.unwrap_or_else(|| Tensor::<1>::zeros([1], &x.device()));
    let y = <Dispatch as FusedLayerNorm>::layer_norm(
        x.reshape([rows, width]).into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        has_beta,
        eps as f32,
    );
    Tensor::<2>::from_dispatch(y).reshape(dims)
}
