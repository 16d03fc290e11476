//! The fused feed-forward operation (Flex) against the composed block it replaces: outputs
//! and the gradients of the input, weights and biases, for GELU and ReLU. (The dropout mask
//! path is compared in `efficient-attn`'s tests with an explicit mask: the device RNG is
//! shared by tests running in parallel, so two seeded draws here need not agree.)

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use models::{FeedForward, FeedForwardKind};

fn rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().add_scalar(1.0);
    a.sub(b).abs().div(scale).max().into_scalar::<f32>()
}

fn check(kind: FeedForwardKind, dropout: f64) {
    let device = Device::flex().autodiff();
    device.seed(3);
    let block = FeedForward::new(kind, 16, 40, dropout, &device);
    let x = Tensor::<3>::random([3, 23, 16], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<3>::random([3, 23, 16], Distribution::Normal(0.0, 1.0), &device);
    // Parameters initialise lazily, drawing from the device RNG: materialise them first, so
    // that the seeded dropout masks of both paths are the same draw.
    let _ = block.forward_composed(x.clone());
    let run = |fused: bool| {
        let block = block.clone();
        let x = x.clone().detach().require_grad();
        device.seed(11);
        let y = if fused {
            block.forward(x.clone())
        } else {
            block.forward_composed(x.clone())
        };
        let grads = y.clone().mul(w.clone()).sum().backward();
        let g = |p: &burn::module::Param<Tensor<2>>| p.val().grad(&grads).unwrap();
        let gb = |p: &Option<burn::module::Param<Tensor<1>>>| {
            p.as_ref().unwrap().val().grad(&grads).unwrap()
        };
        (
            y.inner(),
            x.grad(&grads).unwrap(),
            g(&block.linear_inner.weight),
            gb(&block.linear_inner.bias),
            g(&block.linear_outer.weight),
            gb(&block.linear_outer.bias),
        )
    };
    let f = run(true);
    let c = run(false);
    let name = format!("{kind:?}, dropout {dropout}");
    assert!(rel_diff(f.0, c.0) < 1e-5, "{name}: output");
    assert!(rel_diff(f.1, c.1) < 2e-5, "{name}: dx");
    assert!(rel_diff(f.2, c.2) < 2e-5, "{name}: dw1");
    assert!(rel_diff(f.3, c.3) < 2e-5, "{name}: db1");
    assert!(rel_diff(f.4, c.4) < 2e-5, "{name}: dw2");
    assert!(rel_diff(f.5, c.5) < 2e-5, "{name}: db2");
    assert!(efficient_attn::runs_fused(&x), "the fused path ran");
    let _ = block.num_params();
}

#[test]
fn fused_feed_forward_equals_the_composed_block() {
    for kind in [FeedForwardKind::Gelu, FeedForwardKind::Relu] {
        check(kind, 0.0);
    }
}

/// Reformer's chunked feed-forward: the block applied to pieces of the sequence (here 4 uneven
/// chunks of 23 positions) gives the unchunked output and gradients.
#[test]
fn chunked_feed_forward_equals_the_whole_sequence() {
    let device = Device::flex().autodiff();
    device.seed(5);
    for kind in [FeedForwardKind::Gelu, FeedForwardKind::Swiglu] {
        let block = FeedForward::new(kind, 16, 40, 0.0, &device);
        let x = Tensor::<3>::random([2, 23, 16], Distribution::Normal(0.0, 1.0), &device);
        let run = |b: &FeedForward| {
            let x = x.clone().detach().require_grad();
            let y = b.forward(x.clone());
            let g = y.clone().sum().backward();
            (y, x.grad(&g).unwrap())
        };
        let (y1, g1) = run(&block);
        let (y4, g4) = run(&block.clone().with_chunks(4));
        assert!(rel_diff(y4, y1) < 1e-6, "{kind:?} output");
        assert!(rel_diff(g4, g1) < 1e-6, "{kind:?} gradient");
    }
}
