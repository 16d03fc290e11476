//! Exact attention as one fused operation: [`FusedAttention`] is implemented for Flex by the
//! FlashAttention-2 CPU kernel ([`crate::kernels::cpu::flash`]) and for `Autodiff<Flex>` by a
//! node whose backward calls the fused backward kernel (recomputing scores per tile instead of
//! storing them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, BackendTypes, Dispatch, Flex, backend_extension};
use burn::tensor::{Bool, Tensor};

#[cfg(feature = "cube")]
use burn::backend::Cube;

use super::{flash_runs_fused, flex, host, like, slice};
use crate::kernels::cpu::flash::{self, Inputs, Params, Shape};
use crate::kernels::cpu::zeros;

/// Exact attention as one fused operation (FlashAttention-2 on the CPU).
///
/// Every tensor is `[batch, heads, seq, width]` except `key_bias`, `[batch, seq_k]` (0 for a
/// visible key, `-∞` for a padded one; ignored unless `masked`), and `lse`, `[batch, heads,
/// seq_q]`.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait FusedAttention: Backend {
    /// `softmax(q kᵀ · scale + bias [+ causal mask]) v`.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        tiles: [usize; 2],
    ) -> FloatTensor<Self>;

    /// The forward with the row log-sum-exp the backward needs.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        tiles: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dq, dk, dv)` for the output gradient `d_out` of a forward that gave `out` and `lse`.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        tiles: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The shape of `q`, `k`, `v` (`[batch, heads, seq, width]` each), checked.
fn shape_of(q: &[usize], k: &[usize], v: &[usize]) -> Shape {
    assert!(
        q.len() == 4 && k.len() == 4 && v.len() == 4,
        "fused attention takes [batch, heads, seq, width] tensors"
    );
    assert!(
        q[..2] == k[..2] && k[..2] == v[..2] && q[3] == k[3] && k[2] == v[2],
        "fused attention: q {q:?}, k {k:?}, v {v:?} disagree"
    );
    Shape {
        batch: q[0],
        heads: q[1],
        seq_q: q[2],
        seq_k: k[2],
        d_k: q[3],
        d_v: v[3],
    }
}

fn params(causal: bool, scale: f32, tiles: [usize; 2]) -> Params {
    Params {
        scale,
        causal,
        tile_q: tiles[0].max(1),
        tile_k: tiles[1].max(1),
    }
}

impl FusedAttention for Flex {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        tiles: [usize; 2],
    ) -> FloatTensor<Self> {
        Self::flash_attention_with_lse(q, k, v, key_bias, masked, causal, scale, tiles).0
    }

    fn flash_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        tiles: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let ((hq, qd), (hk, kd), (hv, vd)) = (host(&q), host(&k), host(&v));
        let shape = shape_of(&qd, &kd, &vd);
        let bias = masked.then(|| host(&key_bias).0);
        let inputs = Inputs {
            q: slice(&hq),
            k: slice(&hk),
            v: slice(&hv),
            key_bias: bias.as_ref().map(slice),
        };
        let bh = shape.batch * shape.heads;
        let mut out = zeros(bh * shape.seq_q * shape.d_v);
        let mut lse = zeros(bh * shape.seq_q);
        flash::forward(
            inputs,
            shape,
            params(causal, scale, tiles),
            &mut out,
            &mut lse,
        );
        (
            like(out, &[shape.batch, shape.heads, shape.seq_q, shape.d_v], &q),
            flex(lse, &[shape.batch, shape.heads, shape.seq_q]),
        )
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        tiles: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let ((hq, qd), (hk, kd), (hv, vd)) = (host(&q), host(&k), host(&v));
        let shape = shape_of(&qd, &kd, &vd);
        let bias = masked.then(|| host(&key_bias).0);
        let (out, _) = host(&out);
        let (lse, _) = host(&lse);
        let (d_out, _) = host(&d_out);
        let inputs = Inputs {
            q: slice(&hq),
            k: slice(&hk),
            v: slice(&hv),
            key_bias: bias.as_ref().map(slice),
        };
        let mut dq = zeros(qd.iter().product());
        let mut dk = zeros(kd.iter().product());
        let mut dv = zeros(vd.iter().product());
        flash::backward(
            inputs,
            shape,
            params(causal, scale, tiles),
            slice(&out),
            slice(&lse),
            slice(&d_out),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        (like(dq, &qd, &q), like(dk, &kd, &k), like(dv, &vd, &v))
    }
}

/// On the cubecl backends, the kernels of [`crate::kernels::cube::flash`] (tiles are a CPU
/// setting and ignored).
#[cfg(feature = "cube")]
impl FusedAttention for Cube {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        _tiles: [usize; 2],
    ) -> FloatTensor<Self> {
        crate::kernels::cube::flash::forward(q, k, v, key_bias, masked, causal, scale).0
    }

    fn flash_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        _tiles: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::kernels::cube::flash::forward(q, k, v, key_bias, masked, causal, scale)
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        _tiles: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        crate::kernels::cube::flash::backward(
            q, k, v, key_bias, out, lse, d_out, masked, causal, scale,
        )
    }
}

/// What the backward of [`FusedAttention::flash_attention`] keeps: the inputs, the output and
/// the row log-sum-exp (O(N·d)), and the settings.
#[derive(Clone, Debug)]
struct FlashState<B: BackendTypes> {
    q: B::FloatTensorPrimitive,
    k: B::FloatTensorPrimitive,
    v: B::FloatTensorPrimitive,
    key_bias: B::FloatTensorPrimitive,
    out: B::FloatTensorPrimitive,
    lse: B::FloatTensorPrimitive,
    masked: bool,
    causal: bool,
    scale: f32,
    tiles: [usize; 2],
}

#[derive(Debug)]
struct FlashBackward;

impl<B: FusedAttention> Backward<B, 3> for FlashBackward {
    type State = FlashState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) = B::flash_attention_backward(
            s.q, s.k, s.v, s.key_bias, s.out, s.lse, d_out, s.masked, s.causal, s.scale, s.tiles,
        );
        for (node, grad) in [(q_node, dq), (k_node, dk), (v_node, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FusedAttention, C: CheckpointStrategy> FusedAttention for Autodiff<B, C> {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        masked: bool,
        causal: bool,
        scale: f32,
        tiles: [usize; 2],
    ) -> FloatTensor<Self> {
        let prep = FlashBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful();
        let (q, k, v, key_bias) = (
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            key_bias.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::flash_attention_with_lse(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    key_bias.clone(),
                    masked,
                    causal,
                    scale,
                    tiles,
                );
                let state = FlashState {
                    q,
                    k,
                    v,
                    key_bias,
                    out: out.clone(),
                    lse,
                    masked,
                    causal,
                    scale,
                    tiles,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::flash_attention(
                q, k, v, key_bias, masked, causal, scale, tiles,
            )),
        }
    }

    fn flash_attention_with_lse(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: bool,
        _: bool,
        _: f32,
        _: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the log-sum-exp forward is called by the autodiff node, below autodiff")
    }

    fn flash_attention_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: bool,
        _: bool,
        _: f32,
        _: [usize; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the fused backward is called by the autodiff node, below autodiff")
    }
}

/// The default tiles of [`flash_attention`]: 256 queries × 512 keys (a 512 KiB score tile in
/// L2). Measured at N = 1,024 and 4,096, 8 heads of 64, bidirectional and causal, forward and
/// backward, against 64–1,024 × 128–1,024: the fastest or within noise of it everywhere;
/// smaller tiles lose to the GEMMs' per-call packing.
pub const DEFAULT_TILES: [usize; 2] = [256, 512];

/// Exact attention through [`FusedAttention`]: `softmax(q kᵀ · scale + masks) v`, on tiles of
/// `tiles = [queries, keys]`.
///
/// # Shapes
/// - q: `[batch, heads, seq_q, d_k]`, k: `[batch, heads, seq_k, d_k]`,
///   v: `[batch, heads, seq_k, d_v]`, key_pad: `[batch, seq_k]` (`true` = padded)
/// - output: `[batch, heads, seq_q, d_v]`
///
/// # Panics
/// Unless [`flash_runs_fused`] holds for `q` (and `k`, `v` are on the same device).
pub fn flash_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_pad: Option<&Tensor<2, Bool>>,
    causal: bool,
    scale: f64,
    tiles: [usize; 2],
) -> Tensor<4> {
    assert!(
        flash_runs_fused(&q),
        "the fused attention runs on f32 Flex tensors (and on cubecl devices with the `cube` feature)"
    );
    let [b, _, _, _] = q.dims();
    let seq_k = k.dims()[2];
    let device = q.device();
    let bias = match key_pad {
        Some(pad) => {
            Tensor::<2>::zeros([b, seq_k], &device).mask_fill(pad.clone(), f32::NEG_INFINITY)
        }
        None => Tensor::<2>::zeros([1, 1], &device),
    };
    let out = <Dispatch as FusedAttention>::flash_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        key_pad.is_some(),
        causal,
        scale as f32,
        tiles,
    );
    Tensor::from_dispatch(out)
}
