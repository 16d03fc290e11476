//! The position-wise feed-forward block `act(x W₁ + b₁) W₂ + b₂` as one fused operation:
//! [`FusedFeedForward`] for Flex by the CPU kernel [`crate::kernels::cpu::ffn`] (multi-threaded
//! GEMMs, the bias and activation fused and vectorised), and for `Autodiff<Flex>` by a node that
//! keeps the pre-activation and calls the fused backward.

// The backward returns five gradients, which the backend-extension macro takes as a tuple.
#![allow(clippy::type_complexity)]

use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, BackendTypes, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

use super::{flex, host, runs_fused, slice};
use crate::kernels::cpu::ffn::{self, Block, Dims};
use crate::kernels::cpu::simd::Activation;
use crate::kernels::cpu::zeros;

/// The activation of a fused feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForwardActivation {
    /// `x·Φ(x)` (exact, erf-based: `torch.nn.GELU()`, Burn's `gelu`).
    Gelu,
    /// `max(x, 0)`.
    Relu,
}

impl FeedForwardActivation {
    fn code(self) -> u8 {
        match self {
            Self::Gelu => 0,
            Self::Relu => 1,
        }
    }
}

fn activation(code: u8) -> Activation {
    match code {
        0 => Activation::Gelu,
        _ => Activation::Relu,
    }
}

/// Which optional inputs are present: `[b₁, b₂, mask]`.
type Present = [bool; 3];

/// The feed-forward block as one operation. `x [rows, d_model]`, `w1 [d_model, d_ff]`,
/// `b1 [d_ff]`, `w2 [d_ff, d_model]`, `b2 [d_model]`, `mask [rows, d_ff]` (a dropout mask on the
/// activation, 0 or `1/(1-p)`); absent optional inputs (see `present`) are ignored.
#[backend_extension(Flex, Autodiff)]
pub trait FusedFeedForward: Backend {
    /// `y = act(x w1 + b1) · mask · w2 + b2`.
    #[allow(clippy::too_many_arguments)]
    fn feed_forward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        present: [bool; 3],
        activation: u8,
    ) -> FloatTensor<Self>;

    /// The forward with the pre-activation `z = x w1 + b1` the backward needs.
    #[allow(clippy::too_many_arguments)]
    fn feed_forward_with_hidden(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        present: [bool; 3],
        activation: u8,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dx, dw1, db1, dw2, db2)` for the output gradient `dy`, given the pre-activation `z`.
    #[allow(clippy::too_many_arguments)]
    fn feed_forward_backward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        z: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        present: [bool; 3],
        activation: u8,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// The dimensions of `x [rows, d_model]` and `w1 [d_model, d_ff]`, checked against `w2`.
fn dims_of(x: &[usize], w1: &[usize], w2: &[usize]) -> Dims {
    assert!(
        x.len() == 2 && w1.len() == 2 && w2.len() == 2,
        "fused feed-forward takes [rows, d_model] inputs and 2-D weights"
    );
    assert!(
        x[1] == w1[0] && w2 == [w1[1], w1[0]],
        "fused feed-forward: x {x:?}, w1 {w1:?}, w2 {w2:?} disagree"
    );
    Dims {
        rows: x[0],
        d_model: x[1],
        d_ff: w1[1],
    }
}

impl FusedFeedForward for Flex {
    fn feed_forward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        present: [bool; 3],
        activation: u8,
    ) -> FloatTensor<Self> {
        Self::feed_forward_with_hidden(x, w1, b1, w2, b2, mask, present, activation).0
    }

    fn feed_forward_with_hidden(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        present: [bool; 3],
        activation: u8,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let ((x, xd), (w1, w1d), (w2, w2d)) = (host(&x), host(&w1), host(&w2));
        let dims = dims_of(&xd, &w1d, &w2d);
        let [has_b1, has_b2, has_mask] = present;
        let (b1, b2, mask) = (
            has_b1.then(|| host(&b1).0),
            has_b2.then(|| host(&b2).0),
            has_mask.then(|| host(&mask).0),
        );
        let block = Block {
            x: slice(&x),
            w1: slice(&w1),
            b1: b1.as_ref().map(slice),
            w2: slice(&w2),
            b2: b2.as_ref().map(slice),
            mask: mask.as_ref().map(slice),
            activation: super::feed_forward::activation(activation),
        };
        let mut y = zeros(dims.rows * dims.d_model);
        let mut z = zeros(dims.rows * dims.d_ff);
        ffn::forward(block, dims, &mut y, &mut z);
        (
            flex(y, &[dims.rows, dims.d_model]),
            flex(z, &[dims.rows, dims.d_ff]),
        )
    }

    fn feed_forward_backward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        z: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        present: [bool; 3],
        activation: u8,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let ((x, xd), (w1, w1d), (w2, w2d)) = (host(&x), host(&w1), host(&w2));
        let dims = dims_of(&xd, &w1d, &w2d);
        let mask = present[2].then(|| host(&mask).0);
        let (z, _) = host(&z);
        let (dy, _) = host(&dy);
        let block = Block {
            x: slice(&x),
            w1: slice(&w1),
            b1: None,
            w2: slice(&w2),
            b2: None,
            mask: mask.as_ref().map(slice),
            activation: super::feed_forward::activation(activation),
        };
        let g = ffn::backward(block, dims, slice(&z), slice(&dy));
        (
            flex(g.dx, &xd),
            flex(g.dw1, &w1d),
            flex(g.db1, &[dims.d_ff]),
            flex(g.dw2, &w2d),
            flex(g.db2, &[dims.d_model]),
        )
    }
}

/// What the backward of [`FusedFeedForward::feed_forward`] keeps: the input, the weights, the
/// mask and the pre-activation.
#[derive(Clone, Debug)]
struct FeedForwardState<B: BackendTypes> {
    x: B::FloatTensorPrimitive,
    w1: B::FloatTensorPrimitive,
    w2: B::FloatTensorPrimitive,
    mask: B::FloatTensorPrimitive,
    z: B::FloatTensorPrimitive,
    present: Present,
    activation: u8,
}

#[derive(Debug)]
struct FeedForwardBackward;

impl<B: FusedFeedForward> burn::backend::autodiff::ops::Backward<B, 5> for FeedForwardBackward {
    type State = FeedForwardState<B>;

    fn backward(
        self,
        ops: burn::backend::autodiff::ops::Ops<Self::State, 5>,
        grads: &mut burn::backend::autodiff::grads::Gradients,
        _: &mut burn::backend::autodiff::checkpoint::base::Checkpointer,
    ) {
        let [x_node, w1_node, b1_node, w2_node, b2_node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dx, dw1, db1, dw2, db2) =
            B::feed_forward_backward(s.x, s.w1, s.w2, s.mask, s.z, dy, s.present, s.activation);
        let [has_b1, has_b2, _] = s.present;
        let pairs = [
            (x_node, Some(dx)),
            (w1_node, Some(dw1)),
            (b1_node, has_b1.then_some(db1)),
            (w2_node, Some(dw2)),
            (b2_node, has_b2.then_some(db2)),
        ];
        for (node, grad) in pairs {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FusedFeedForward, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    FusedFeedForward for Autodiff<B, C>
{
    fn feed_forward(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        present: [bool; 3],
        activation: u8,
    ) -> FloatTensor<Self> {
        use burn::backend::autodiff::ops::{Backward, OpsKind};
        let prep = FeedForwardBackward
            .prepare::<C>([x.node(), w1.node(), b1.node(), w2.node(), b2.node()])
            .compute_bound()
            .stateful();
        let (x, w1, b1, w2, b2, mask) = (
            x.into_primitive(),
            w1.into_primitive(),
            b1.into_primitive(),
            w2.into_primitive(),
            b2.into_primitive(),
            mask.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let (y, z) = B::feed_forward_with_hidden(
                    x.clone(),
                    w1.clone(),
                    b1,
                    w2.clone(),
                    b2,
                    mask.clone(),
                    present,
                    activation,
                );
                let state = FeedForwardState {
                    x,
                    w1,
                    w2,
                    mask,
                    z,
                    present,
                    activation,
                };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::feed_forward(
                x, w1, b1, w2, b2, mask, present, activation,
            )),
        }
    }

    fn feed_forward_with_hidden(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: [bool; 3],
        _: u8,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!(
            "the forward with its hidden state is called by the autodiff node, below autodiff"
        )
    }

    fn feed_forward_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: [bool; 3],
        _: u8,
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

/// The feed-forward block `act(x w1 + b1) · mask · w2 + b2` as one fused operation (on Flex a
/// CPU kernel: multi-threaded GEMMs, the bias and activation fused and vectorised; under
/// autodiff a node with its own backward); `mask` is a dropout mask on the activation (0 or
/// `1/(1-p)`).
///
/// # Shapes
/// - x: `[batch, seq, d_model]`, w1: `[d_model, d_ff]`, b1: `[d_ff]`, w2: `[d_ff, d_model]`,
///   b2: `[d_model]`, mask: `[batch, seq, d_ff]`
/// - output: `[batch, seq, d_model]`
///
/// # Panics
/// Unless [`runs_fused`] holds for `x` (the other tensors on the same device).
pub fn fused_feed_forward(
    x: Tensor<3>,
    w1: Tensor<2>,
    b1: Option<Tensor<1>>,
    w2: Tensor<2>,
    b2: Option<Tensor<1>>,
    mask: Option<Tensor<3>>,
    activation: FeedForwardActivation,
) -> Tensor<3> {
    assert!(
        runs_fused(&x),
        "the fused feed-forward runs on f32 Flex tensors"
    );
    let [b, n, d_model] = x.dims();
    let d_ff = w1.dims()[1];
    let device = x.device();
    let present = [b1.is_some(), b2.is_some(), mask.is_some()];
    let none = || Tensor::<1>::zeros([1], &device);
    let y = <Dispatch as FusedFeedForward>::feed_forward(
        x.reshape([b * n, d_model]).into_dispatch(),
        w1.into_dispatch(),
        b1.unwrap_or_else(none).into_dispatch(),
        w2.into_dispatch(),
        b2.unwrap_or_else(none).into_dispatch(),
        mask.map(|m| m.reshape([b * n, d_ff]))
            .unwrap_or_else(|| none().reshape([1, 1]))
            .into_dispatch(),
        present,
        activation.code(),
    );
    Tensor::<2>::from_dispatch(y).reshape([b, n, d_model])
}
