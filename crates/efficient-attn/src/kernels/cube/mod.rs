//! Kernels for Burn's cubecl backend (`Cube`: `wgpu`, `cuda` and the other cubecl runtimes),
//! written in CubeCL; compiled with the `cube` feature. They implement the same backend
//! extensions as the CPU kernels (`kernels::fused`), so the layers' calls and the autodiff
//! nodes are shared, and they are tested against the composed tensor operations on lavapipe.
//!
//! - [`flash`]: exact attention (forward with the row log-sum-exp, backward recomputing the
//!   scores).

pub mod flash;
