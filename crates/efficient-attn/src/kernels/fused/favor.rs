//! Performer's positive random features as one fused operation: [`FusedFavor`] for Flex by
//! the CPU kernel [`crate::kernels::cpu::favor`] (a GEMM and vectorised `exp` per (batch,
//! head)), and for `Autodiff<Flex>` by a node that keeps the features and calls the fused
//! backward. Only the input gets a gradient: the random directions are not trained.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, BackendTypes, Dispatch, Flex, backend_extension};
use burn::tensor::{Bool, Tensor};

use super::{flex, host, runs_fused, slice};
use crate::kernels::cpu::favor::{self, Map, Shape, Shift};
use crate::kernels::cpu::zeros;

/// How the features of one side are formed (see [`favor_features`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FavorSide {
    /// Whether `‖x̂‖²/2` is subtracted from the logits (keys).
    pub norm_term: bool,
    /// The stabilising shift.
    pub shift: FavorShift,
}

/// The stabilising shift of [`FavorSide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FavorShift {
    /// Each row's maximum.
    Row,
    /// The maximum over each (batch, head)'s unpadded rows.
    Slice,
    /// None.
    None,
}

impl FavorSide {
    /// `[norm_term, shift]` as the extension's plain arguments.
    fn code(self) -> [u8; 2] {
        let shift = match self.shift {
            FavorShift::Row => 0,
            FavorShift::Slice => 1,
            FavorShift::None => 2,
        };
        [u8::from(self.norm_term), shift]
    }
}

/// The kernel's map for the extension's plain arguments.
fn map_of<'a>(
    omega: &'a [f32],
    offset: Option<&'a [f32]>,
    keep: Option<&'a [f32]>,
    code: [u8; 2],
) -> Map<'a> {
    Map {
        omega,
        offset,
        norm_term: code[0] != 0,
        shift: match code[1] {
            0 => Shift::Row,
            1 => Shift::Slice,
            _ => Shift::None,
        },
        keep,
    }
}

fn shape_of(x: &[usize], omega: &[usize]) -> Shape {
    assert!(
        x.len() == 4 && omega.len() == 2 && x[3] == omega[1],
        "favor features: x {x:?} and omega {omega:?} disagree"
    );
    Shape {
        batch: x[0],
        heads: x[1],
        seq: x[2],
        d: x[3],
        m: omega[0],
    }
}

/// FAVOR+ features as one operation: `x [B, H, L, d]`, `omega [m, d]`, `offset [m]` (ignored
/// unless `flags[0]`), `keep [B, L]` (1 = real row; ignored unless `flags[1]`), `side` as
/// [`FavorSide::code`]; output `φ [B, H, L, m]`.
#[backend_extension(Flex, Autodiff)]
pub trait FusedFavor: Backend {
    /// The features.
    fn favor(
        x: FloatTensor<Self>,
        omega: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        flags: [bool; 2],
        side: [u8; 2],
    ) -> FloatTensor<Self>;

    /// `dx` for the output gradient `dphi` of a forward that gave `phi`.
    #[allow(clippy::too_many_arguments)]
    fn favor_backward(
        x: FloatTensor<Self>,
        omega: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        phi: FloatTensor<Self>,
        dphi: FloatTensor<Self>,
        flags: [bool; 2],
        side: [u8; 2],
    ) -> FloatTensor<Self>;
}

impl FusedFavor for Flex {
    fn favor(
        x: FloatTensor<Self>,
        omega: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        flags: [bool; 2],
        side: [u8; 2],
    ) -> FloatTensor<Self> {
        let ((x, xd), (omega, od)) = (host(&x), host(&omega));
        let shape = shape_of(&xd, &od);
        let offset = flags[0].then(|| host(&offset).0);
        let keep = flags[1].then(|| host(&keep).0);
        let map = map_of(
            slice(&omega),
            offset.as_ref().map(slice),
            keep.as_ref().map(slice),
            side,
        );
        let mut phi = zeros(shape.batch * shape.heads * shape.seq * shape.m);
        favor::forward(map, shape, slice(&x), &mut phi);
        flex(phi, &[shape.batch, shape.heads, shape.seq, shape.m])
    }

    fn favor_backward(
        x: FloatTensor<Self>,
        omega: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        phi: FloatTensor<Self>,
        dphi: FloatTensor<Self>,
        flags: [bool; 2],
        side: [u8; 2],
    ) -> FloatTensor<Self> {
        let ((x, xd), (omega, od)) = (host(&x), host(&omega));
        let ((phi, _), (dphi, _)) = (host(&phi), host(&dphi));
        let shape = shape_of(&xd, &od);
        let offset = flags[0].then(|| host(&offset).0);
        let keep = flags[1].then(|| host(&keep).0);
        let map = map_of(
            slice(&omega),
            offset.as_ref().map(slice),
            keep.as_ref().map(slice),
            side,
        );
        let dx = favor::backward(map, shape, slice(&x), slice(&phi), slice(&dphi));
        flex(dx, &xd)
    }
}

/// What the backward keeps: the input, the map's tensors and the features.
#[derive(Clone, Debug)]
struct FavorState<B: BackendTypes> {
    x: B::FloatTensorPrimitive,
    omega: B::FloatTensorPrimitive,
    offset: B::FloatTensorPrimitive,
    keep: B::FloatTensorPrimitive,
    phi: B::FloatTensorPrimitive,
    flags: [bool; 2],
    side: [u8; 2],
}

#[derive(Debug)]
struct FavorBackward;

impl<B: FusedFavor> Backward<B, 1> for FavorBackward {
    type State = FavorState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let dphi = grads.consume::<B>(&ops.node);
        let s = ops.state;
        if let Some(node) = x_node {
            let dx =
                B::favor_backward(s.x, s.omega, s.offset, s.keep, s.phi, dphi, s.flags, s.side);
            grads.register::<B>(node.id, dx);
        }
    }
}

impl<B: FusedFavor, C: CheckpointStrategy> FusedFavor for Autodiff<B, C> {
    fn favor(
        x: FloatTensor<Self>,
        omega: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        flags: [bool; 2],
        side: [u8; 2],
    ) -> FloatTensor<Self> {
        let prep = FavorBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let (x, omega, offset, keep) = (
            x.into_primitive(),
            omega.into_primitive(),
            offset.into_primitive(),
            keep.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let phi = B::favor(
                    x.clone(),
                    omega.clone(),
                    offset.clone(),
                    keep.clone(),
                    flags,
                    side,
                );
                let state = FavorState {
                    x,
                    omega,
                    offset,
                    keep,
                    phi: phi.clone(),
                    flags,
                    side,
                };
                prep.finish(state, phi)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::favor(x, omega, offset, keep, flags, side)),
        }
    }

    fn favor_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: [bool; 2],
        _: [u8; 2],
    ) -> FloatTensor<Self> {
        unreachable!("the fused backward is called by the autodiff node, below autodiff")
    }
}

/// FAVOR+ features `φ(x) = exp(ω x̂ + offset − [‖x̂‖²/2] − shift) / √m`, `x̂ = x·d^(-1/4)`,
/// padded rows (`pad`, `true` = padded) zero, as one fused operation (see the
/// [module docs](self)). The shift is a constant of the backward; `omega` gets no gradient.
///
/// # Shapes
/// - x: `[batch, heads, seq, d]`, omega: `[m, d]`, offset: `[m]`, pad: `[batch, seq]`
/// - output: `[batch, heads, seq, m]`
///
/// # Panics
/// Unless [`runs_fused`] holds for `x`.
pub fn favor_features(
    x: Tensor<4>,
    omega: Tensor<2>,
    offset: Option<Tensor<1>>,
    pad: Option<&Tensor<2, Bool>>,
    side: FavorSide,
) -> Tensor<4> {
    assert!(
        runs_fused(&x),
        "the fused FAVOR+ features run on f32 Flex tensors"
    );
    let device = x.device();
    let flags = [offset.is_some(), pad.is_some()];
    let offset = offset.unwrap_or_else(|| Tensor::<1>::zeros([1], &device));
    let keep = match pad {
        Some(pad) => pad.clone().bool_not().float(),
        None => Tensor::<2>::zeros([1, 1], &device),
    };
    let phi = <Dispatch as FusedFavor>::favor(
        x.into_dispatch(),
        omega.detach().into_dispatch(),
        offset.detach().into_dispatch(),
        keep.into_dispatch(),
        flags,
        side.code(),
    );
    Tensor::from_dispatch(phi)
}
