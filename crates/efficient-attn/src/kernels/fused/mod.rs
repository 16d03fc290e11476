//! Fused operations with their own backward, through Burn's backend extension: each is
//! implemented for the Flex backend by a CPU kernel of [`crate::kernels::cpu`] and for
//! `Autodiff<Flex>` by a node whose backward calls the fused backward kernel.
//!
//! The tensor-level entry points run a fused operation when the tensors are `f32` on Flex
//! (with or without autodiff, [`runs_fused`]); callers keep their composed implementation for
//! other devices (until the GPU kernels exist) and as the oracle the fused operations are
//! tested against.
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
        t.to_contiguous()
    };
    let dims = t.shape().to_vec();
    (t, dims)
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

/// Whether efformer's fused CPU kernels run on this tensor: `f32` on Flex (or autodiff over
/// Flex). Elsewhere the layers compose Burn tensor operations.
pub fn runs_fused<const D: usize>(t: &Tensor<D>) -> bool {
    device_runs_fused(&t.device()) && t.dtype() == DType::F32
}
