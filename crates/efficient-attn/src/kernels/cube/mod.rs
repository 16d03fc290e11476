//! Kernels for Burn's cubecl backend (`Cube`: `wgpu`, `cuda` and the other cubecl runtimes),
//! written in CubeCL; compiled with the `cube` feature. They implement the same backend
//! extensions as the CPU kernels (`kernels::fused`), so the layers' calls and the autodiff
//! nodes are shared, and they are tested against the composed tensor operations on lavapipe.
//!
//! - [`flash`]: exact attention (forward with the row log-sum-exp, backward recomputing the
//!   scores);
//! - [`block_sparse`]: attention over a block plan (windows, bands, random and global blocks,
//!   permuted rows by their positions) with extra keys, the plan and its inverse as index
//!   data on the device;
//! - [`linear`]: kernel (linear) attention on feature maps, bidirectional or causal through
//!   chunked prefix sums (forward and backward).

pub mod block_sparse;
pub mod flash;
pub mod linear;

use burn::tensor::Shape;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

/// `[batch, heads, seq, width]` of a 4-D tensor.
pub(crate) fn dims4(t: &CubeTensor) -> [usize; 4] {
    let s = t.meta.shape();
    assert!(
        s.num_dims() == 4,
        "the cubecl attention takes [batch, heads, seq, width] tensors"
    );
    [s[0], s[1], s[2], s[3]]
}

/// The dimensions of a tensor.
pub(crate) fn dims_of(t: &CubeTensor) -> Vec<usize> {
    let s = t.meta.shape();
    (0..s.num_dims()).map(|i| s[i]).collect()
}

/// An uninitialised tensor of `dims` on `model`'s device, in its dtype.
pub(crate) fn empty_like(model: &CubeTensor, dims: &[usize]) -> CubeTensor {
    empty_device_dtype(
        model.client.clone(),
        model.device.clone(),
        Shape::from(dims.to_vec()),
        model.dtype,
    )
}

/// A launch of `units` units, one per element of the work (the element-wise layout).
pub(crate) fn launch_shape(model: &CubeTensor, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&model.client, units);
    (
        calculate_cube_count_elemwise(&model.client, units, dim),
        dim,
    )
}

/// `x[a..a + width] · y[b..b + width]`.
#[cube]
pub(crate) fn dot<F: Float>(
    x: &Tensor<F>,
    y: &Tensor<F>,
    a: usize,
    b: usize,
    #[comptime] width: usize,
) -> F {
    let mut t = F::new(0.0);
    for d in 0..width {
        t += x[a + d] * y[b + d];
    }
    t
}

/// One step of the online softmax over a query row: `acc` holds `width` weighted sums of
/// values, then the running maximum (at `width`) and the running sum of exponentials (at
/// `width + 1`); the key with `score` and the values at `values[at..at + width]` joins them.
#[cube]
pub(crate) fn absorb<F: Float>(
    acc: &mut Array<F>,
    score: F,
    values: &Tensor<F>,
    at: usize,
    #[comptime] width: usize,
) {
    let max = acc[width];
    let mut new_max = max;
    if score > max {
        new_max = score;
    }
    let rescale = (max - new_max).exp();
    let p = (score - new_max).exp();
    acc[width + 1] = acc[width + 1] * rescale + p;
    for e in 0..width {
        acc[e] = acc[e] * rescale + p * values[at + e];
    }
    acc[width] = new_max;
}
