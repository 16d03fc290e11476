//! The fused kernels on head-split views (a projection's `[batch, seq, heads · d]` reshaped
//! and swapped to `[batch, heads, seq, d]`, which is how the multi-head wrapper calls them):
//! the same outputs, after merging the heads back, and the same gradients of the projections
//! as on contiguous head-major copies of the same values. The kernels read such views with
//! their own row copies and return results laid out token-major, so this checks both.

use burn::tensor::{Device, Tensor};
use efficient_attn::testing::{SeededRng, fused};

/// `[b, n, h · d]` → `[b, h, n, d]` (a view).
fn split(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, width] = x.dims();
    x.reshape([b, n, heads, width / heads]).swap_dims(1, 2)
}

/// `[b, h, n, d]` → `[b, n, h · d]`.
fn merge(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}

fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

type Op = fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>;

#[test]
fn fused_kernels_on_head_split_views_equal_contiguous_inputs() {
    let device = Device::flex().autodiff();
    let mut rng = SeededRng::new(41);
    let (b, n, heads, d) = (2, 37, 3, 8);
    let ops: [(&str, Op); 4] = [
        ("flash", |q, k, v| {
            fused::flash_attention(q, k, v, None, false, 0.35, [16, 16])
        }),
        ("flash causal", |q, k, v| {
            fused::flash_attention(q, k, v, None, true, 0.35, [16, 16])
        }),
        ("elu kernel", |q, k, v| {
            fused::linear::elu_kernel_attention(q, k, v, None, None)
        }),
        ("elu kernel causal", |q, k, v| {
            fused::linear::elu_kernel_attention(q, k, v, None, Some(5))
        }),
    ];
    for (name, op) in ops {
        let xs: Vec<Tensor<3>> = (0..3)
            .map(|_| rng.normal_tensor([b, n, heads * d], 1.0, &device))
            .collect();
        let w = rng.normal_tensor([b, n, heads * d], 1.0, &device);
        // Views of token-major leaves.
        let leaves: Vec<Tensor<3>> = xs.iter().map(|x| x.clone().require_grad()).collect();
        let views: Vec<Tensor<4>> = leaves.iter().map(|x| split(x.clone(), heads)).collect();
        let out_views = merge(op(views[0].clone(), views[1].clone(), views[2].clone()));
        let grads = (out_views.clone() * w.clone()).sum().backward();
        // Contiguous head-major leaves holding the same values.
        let copies: Vec<Tensor<4>> = xs
            .iter()
            .map(|x| Tensor::from_data(split(x.clone(), heads).into_data(), &device).require_grad())
            .collect();
        let out_copies = merge(op(copies[0].clone(), copies[1].clone(), copies[2].clone()));
        let grads_copies = (out_copies.clone() * w.clone()).sum().backward();
        let diff = max_diff(out_views, out_copies);
        assert!(diff < 1e-6, "{name}: outputs differ by {diff}");
        for (i, (leaf, copy)) in leaves.iter().zip(&copies).enumerate() {
            let g_view = leaf.grad(&grads).expect("leaf gradient");
            let g_copy = merge(copy.grad(&grads_copies).expect("copy gradient"));
            let diff = max_diff(g_view, g_copy);
            assert!(
                diff < 1e-6,
                "{name}: gradient of input {i} differs by {diff}"
            );
        }
    }
}
