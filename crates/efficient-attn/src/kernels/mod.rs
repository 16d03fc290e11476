//! Computation shared by several variants. Each kernel is built once and documented with its
//! cost; variants are thin layers that choose features, patterns or plans and call these.

pub mod block_sparse;
pub mod cpu;
#[cfg(feature = "cube")]
pub mod cube;
pub mod dense;
pub mod fused;
pub mod prefix_sum;
pub mod rows;
