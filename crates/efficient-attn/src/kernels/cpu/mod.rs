//! CPU kernels on plain `f32` slices: the fused attentions behind the Flex backend's custom
//! ops ([`crate::kernels::fused`]).
//!
//! This is the one module of the workspace with `unsafe` code, confined to two leaf files:
//! - [`gemm`]: a checked, slice-based wrapper around the `gemm` crate (the matrix-product
//!   micro-kernels Burn's Flex backend uses), whose entry point takes raw pointers;
//! - [`simd`]: the row operations of the online softmax (scale, bias, max, exp, sums) compiled
//!   for AVX-512 and AVX2+FMA and chosen at run time, with a portable fallback; calling a
//!   `#[target_feature]` function needs `unsafe` after the feature check; and a zeroed buffer
//!   written in parallel (`set_len` after every element is written).
//!
//! Everything above them ([`flash`], [`block_sparse`], [`linear`], [`favor`], [`ffn`],
//! [`layer_norm`]) is safe code over slices.

pub mod block_sparse;
pub mod favor;
pub mod ffn;
pub mod flash;
#[allow(unsafe_code)]
pub mod gemm;
pub mod layer_norm;
pub mod linear;
#[allow(unsafe_code)]
pub mod simd;

/// `n` zeros, written by all threads when `n` is large: an output buffer of a kernel (a
/// single-threaded `vec![0.0; n]` of a recycled allocation is a `memset` on the calling
/// thread while the others wait). See [`simd::parallel_zeros`].
pub fn zeros(n: usize) -> Vec<f32> {
    if n < 1 << 16 {
        return vec![0.0; n];
    }
    simd::parallel_zeros(n)
}
