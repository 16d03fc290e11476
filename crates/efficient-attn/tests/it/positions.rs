//! Block-sparse attention over permuted sequences ([`ElementRule::Positions`], Reformer's
//! sorted buckets and Routing's cluster windows): the fused kernel against the gathered
//! composition, forward (output and row log-sum-exp) and backward through both outputs, with
//! hidden keys, causality, the self score and rows that see no key.

use burn::tensor::{Device, Int, Tensor, TensorData};
use efficient_attn::testing::SeededRng;
use efficient_attn::testing::block_sparse::{
    BlockPlan, BlockSparse, ElementRule, PositionRule, block_sparse_attention_composed_with_lse,
    block_sparse_attention_with_lse,
};

fn diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().add_scalar(1.0);
    a.sub(b).abs().div(scale).max().into_scalar::<f32>()
}

/// Each `(batch, head)` row holds a seeded permutation of `0..n` (taken modulo `n / 2` when
/// `twice`: every position then appears twice, as in Reformer's hashing rounds), with two of
/// every seven keys replaced by −1 when `hidden`.
fn positions(
    rng: &mut SeededRng,
    [b, h, n]: [usize; 3],
    hidden: bool,
    twice: bool,
    device: &Device,
) -> (Tensor<3, Int>, Tensor<3, Int>) {
    let (mut q, mut k) = (Vec::new(), Vec::new());
    for _ in 0..b * h {
        let mut perm: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        if twice {
            perm.iter_mut().for_each(|p| *p %= n as i64 / 2);
        }
        q.extend(&perm);
        k.extend(perm.iter().enumerate().map(|(j, &p)| {
            if hidden && (j * 5 + 3) % 7 == 0 {
                -1
            } else {
                p
            }
        }));
    }
    let t = |v: Vec<i64>| Tensor::<3, Int>::from_data(TensorData::new(v, [b, h, n]), device);
    (t(q), t(k))
}

#[test]
fn attention_by_original_positions_equals_its_composition_with_the_log_sum_exp() {
    let device = Device::flex().autodiff();
    let mut rng = SeededRng::new(16);
    let (b, h, n, block, dk, dv) = (2, 3, 20, 5, 8, 6);
    let chunks = n / block;
    // Reformer's plan: each chunk and the one before (the first wraps to the last).
    let plan = BlockPlan::new(
        block,
        chunks,
        vec![
            (0..chunks)
                .map(|i| vec![i, (i + chunks - 1) % chunks])
                .collect(),
        ],
    );
    let q = rng.normal_tensor([b, h, n, dk], 1.0, &device);
    let k = rng.normal_tensor([b, h, n, dk], 1.0, &device);
    let v = rng.normal_tensor([b, h, n, dv], 1.0, &device);
    let w = rng.normal_tensor([b, h, n, dv], 1.0, &device);
    let u = rng
        .normal_tensor([b, h, n, 1], 1.0, &device)
        .reshape([b, h, n]);
    // With every position twice, a causal query whose other keys are hidden sees its own
    // position twice at the self score: probabilities of 1/2 behind scores of −1e5, which a
    // single f32 log-sum-exp would round by 0.4%.
    for (causal, self_score, hidden, twice) in [
        (false, None, false, false),
        (true, Some(-1e5), true, false),
        (false, Some(-1e5), true, false),
        (true, None, true, false),
        (true, Some(-1e5), true, true),
        (false, Some(-1e5), false, true),
    ] {
        let (qpos, kpos) = positions(&mut rng, [b, h, n], hidden, twice, &device);
        let run = |fused_op: bool| {
            let track = |t: &Tensor<4>| t.clone().detach().require_grad();
            let (q, k, v) = (track(&q), track(&k), track(&v));
            let input = BlockSparse {
                query: q.clone(),
                key: k.clone(),
                value: v.clone(),
                mask_pad_k: None,
                plan: &plan,
                rule: ElementRule::Positions(Box::new(PositionRule {
                    query: qpos.clone(),
                    key: kpos.clone(),
                    causal,
                    self_score,
                })),
                extra: None,
            };
            let (out, lse) = if fused_op {
                block_sparse_attention_with_lse(input)
            } else {
                block_sparse_attention_composed_with_lse(input)
            };
            // Rows that see no key have lse = +∞: compared and differentiated where finite.
            let seen = lse.clone().lower_elem(1e30);
            let lse_finite = lse.mask_fill(seen.clone().bool_not(), 0.0);
            let loss = out.clone().mul(w.clone()).sum() + lse_finite.clone().mul(u.clone()).sum();
            let grads = loss.backward();
            (
                out.inner(),
                lse_finite.inner(),
                seen.inner(),
                [
                    q.grad(&grads).unwrap(),
                    k.grad(&grads).unwrap(),
                    v.grad(&grads).unwrap(),
                ],
            )
        };
        let what = format!(
            "causal {causal}, self score {self_score:?}, hidden keys {hidden}, twice {twice}"
        );
        let (fo, fl, fs, fg) = run(true);
        let (co, cl, cs, cg) = run(false);
        assert!(
            fs.clone().equal(cs).all().into_scalar::<bool>(),
            "{what}: which rows see a key"
        );
        if hidden && causal {
            assert!(
                !fs.all().into_scalar::<bool>(),
                "{what}: the case includes a row that sees no key"
            );
        }
        assert!(diff(fo, co) < 2e-5, "{what}: output");
        assert!(diff(fl, cl) < 2e-5, "{what}: log-sum-exp");
        for (name, (a, c)) in ["dq", "dk", "dv"].iter().zip(fg.into_iter().zip(cg)) {
            let d = diff(a, c);
            assert!(d < 2e-5, "{what}: {name} differs by {d:e}");
        }
    }
}
