//! Fused operations with their own backward, through Burn's backend extension: each is
//! implemented for the Flex backend by a CPU kernel of [`crate::kernels::cpu`], the three
//! attentions also for Burn's cubecl backend by the CubeCL kernels of `kernels::cube` (feature
//! `cube`), and for `Autodiff` over either by a node whose backward calls the fused backward
//! kernel.
//!
//! The tensor-level entry points run a fused operation when the tensors are `f32` on Flex
//! (with or without autodiff, [`runs_fused`]) and, for the three attentions with CubeCL kernels
//! in `kernels::cube` (exact, block-sparse, kernel; feature `cube`), on Burn's cubecl
//! backends too ([`flash_runs_fused`], [`attention_runs_fused`]); callers keep their composed
//! implementation for other devices and as the oracle the fused operations are tested against.
//!
//! - [`attention`]: exact attention (FlashAttention-2);
//! - [`block_sparse`]: attention over a block plan (windows, bands, random and global blocks);
//! - [`linear`]: kernel (linear) attention on feature maps, bidirectional or causal in chunks;
//! - [`favor`]: Performer's positive random features;
//! - [`feed_forward`]: the position-wise feed-forward block with GELU or ReLU;
//! - [`layer_norm`]: layer normalisation over the last axis.

pub mod attention;
pub mod block_sparse;
pub mod favor;
pub mod feed_forward;
pub mod layer_norm;
pub mod linear;

use burn::backend::flex::FlexTensor;
use burn::backend::{DispatchDevice, TensorMetadata};
use burn::tensor::{DType, Device, Tensor, TensorData};

pub use self::attention::{DEFAULT_TILES, flash_attention};
pub use self::feed_forward::{FeedForwardActivation, fused_feed_forward};
pub use self::layer_norm::fused_layer_norm;

/// A contiguous `f32` copy (or view) of a Flex tensor and its dimensions.
fn host(t: &FlexTensor) -> (FlexTensor, Vec<usize>) {
    assert_eq!(
        t.dtype(),
        DType::F32,
        "the fused operations run on f32 tensors"
    );
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        contiguous(t)
    };
    let dims = t.shape().to_vec();
    (t, dims)
}

/// A contiguous copy of `t`. A view whose last axis is dense (a head split `[B, N, H, d]` →
/// `[B, H, N, d]`, or a merge) is copied row by row on every thread; Flex's own copy moves
/// such views element by element in 16 × 16 tiles (~5% of a training step in `perf`).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    let layout = t.layout();
    let dims = layout.shape().to_vec();
    let strides = layout.strides().to_vec();
    let rank = dims.len();
    let dense_rows = rank >= 2 && strides[rank - 1] == 1 && strides.iter().all(|&s| s >= 0);
    if !dense_rows || t.dtype() != DType::F32 {
        return t.to_contiguous();
    }
    let row_len = dims[rank - 1];
    let rows: usize = dims[..rank - 1].iter().product();
    let src = t.storage::<f32>();
    let start = layout.start_offset();
    let data = crate::kernels::cpu::simd::gather_rows(rows, row_len, |r| {
        let (mut rest, mut at) = (r, start);
        for axis in (0..rank - 1).rev() {
            at += (rest % dims[axis]) * strides[axis] as usize;
            rest /= dims[axis];
        }
        &src[at..at + row_len]
    });
    flex(data, &dims)
}

/// Whether `t` is the head split of a token-major tensor: `[B, H, N, d]` viewing a dense
/// `[B, N, H, d]` (what `reshape` + `swap_dims(1, 2)` of a projection gives).
fn head_split(t: &FlexTensor) -> bool {
    let layout = t.layout();
    let (dims, strides) = (layout.shape().to_vec(), layout.strides());
    dims.len() == 4 && {
        let (h, n, d) = (dims[1] as isize, dims[2] as isize, dims[3] as isize);
        strides == [n * h * d, d, h * d, 1]
    }
}

/// A kernel's head-major result (`[B, H, N, d]`) in the layout of `model`: token-major (a
/// head-split view of a dense `[B, N, H, d]`) when `model` is one, so that merging the heads
/// afterwards (or the gradient of the split) is a free reshape; as it is otherwise.
fn like(data: Vec<f32>, dims: &[usize], model: &FlexTensor) -> FlexTensor {
    let t = flex(data, dims);
    if dims.len() == 4 && head_split(model) && dims[1] > 1 && dims[2] > 1 {
        contiguous(&t.transpose(1, 2)).transpose(1, 2)
    } else {
        t
    }
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("a contiguous f32 tensor has a slice")
}

fn flex(data: Vec<f32>, dims: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, dims.to_vec()))
}

/// Whether the fused CPU kernels serve `device`: Flex, with or without autodiff.
pub fn device_runs_fused(device: &Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Whether `device` is one of Burn's cubecl backends (with or without autodiff) and the `cube`
/// feature, which holds the CubeCL kernels, is on.
fn cube_device(device: &Device) -> bool {
    #[cfg(feature = "cube")]
    {
        matches!(
            device.clone().without_autodiff().as_dispatch(),
            DispatchDevice::Cube(_)
        )
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = device;
        false
    }
}

/// Whether the fused exact attention ([`flash_attention`]) runs on `device`: Flex, and, with
/// the `cube` feature, Burn's cubecl backends (with or without autodiff). The fused
/// block-sparse and kernel attentions run on the same devices ([`attention_runs_fused`]); the
/// other fused operations (Performer's features, the feed-forward block, layer normalisation)
/// on Flex only ([`device_runs_fused`]).
pub fn flash_device_runs_fused(device: &Device) -> bool {
    device_runs_fused(device) || cube_device(device)
}

/// Whether the fused exact attention runs on this tensor: `f32` on a device of
/// [`flash_device_runs_fused`].
pub fn flash_runs_fused<const D: usize>(t: &Tensor<D>) -> bool {
    flash_device_runs_fused(&t.device()) && t.dtype() == DType::F32
}

/// Whether the fused attentions with CubeCL kernels run on this tensor: the block-sparse
/// attention ([`block_sparse::block_sparse_attention`]) and the kernel (linear) attention
/// ([`linear::kernel_attention`], [`linear::elu_kernel_attention`]), like the exact one
/// ([`flash_runs_fused`]): `f32` on Flex (the CPU kernels) or, with the `cube` feature, on a
/// cubecl backend (the CubeCL kernels), with or without autodiff.
pub fn attention_runs_fused<const D: usize>(t: &Tensor<D>) -> bool {
    flash_runs_fused(t)
}

/// Whether efformer's fused CPU kernels run on this tensor: `f32` on Flex (or autodiff over
/// Flex). Elsewhere the layers compose Burn tensor operations, except for the three attentions
/// with CubeCL kernels ([`flash_runs_fused`], [`attention_runs_fused`]).
pub fn runs_fused<const D: usize>(t: &Tensor<D>) -> bool {
    device_runs_fused(&t.device()) && t.dtype() == DType::F32
}
