//! Row operations the content-based variants share (Reformer's sort, Routing's clusters,
//! Sinkhorn's balancing): per-(batch, head) row indices made global over the flattened
//! `[batch·heads·len, d]` rows, so one `select` copies whole rows (much faster on Flex than an
//! element-wise `gather`) and one indexed add scatters them back; unit-length rows; and a
//! log-sum-exp.

use burn::tensor::{Int, Tensor};

/// Global row indices into `[groups·len, ·]` from per-group indices `[groups, k]` into `len`
/// rows: `idx[g, j] + g·len`, in `idx`'s integer type.
pub fn global_rows(idx: Tensor<2, Int>, len: usize) -> Tensor<1, Int> {
    let [groups, k] = idx.dims();
    let base = idx
        .clone()
        .narrow(1, 0, 1)
        .ones_like()
        .cumsum(0)
        .sub_scalar(1)
        .mul_scalar(len as i64); // [groups, 1]: g·len
    idx.add(base).reshape([groups * k])
}

/// Rows `rows` (global, from [`global_rows`]) of `x` `[batch, heads, len, d]`, as
/// `[batch, heads, rows / (batch·heads), d]`.
pub fn select_rows(x: Tensor<4>, rows: Tensor<1, Int>) -> Tensor<4> {
    let [b, h, len, d] = x.dims();
    let k = rows.dims()[0] / (b * h);
    x.reshape([b * h * len, d])
        .select(0, rows)
        .reshape([b, h, k, d])
}

/// `x` divided by the length of each row (last dimension), at least 1e-6.
pub fn unit_rows(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(3).sqrt().clamp_min(1e-6);
    x.div(norm)
}

/// `log Σ exp` along `dim` (the maximum detached: the gradient is the softmax either way).
pub fn log_sum_exp<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let max = x.clone().max_dim(dim).detach();
    x.sub(max.clone()).exp().sum_dim(dim).log().add(max)
}
