//! The fused block-sparse attention against its gathered composition, on any device the fused
//! kernels serve (Flex, and the cubecl backends with the `cube` feature): window, causal,
//! random, global, explicit and by-position patterns, forward and backward.

use std::sync::Arc;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::SeededRng;
use super::fused_checks::{bool_mask as bools, max_rel_diff as diff, right_padded as pad};
use crate::kernels::block_sparse::{
    BlockPlan, BlockSparse, ElementRule, ExtraKeys, PositionRule, block_sparse_attention,
    block_sparse_attention_composed, block_sparse_attention_composed_with_lse,
    block_sparse_attention_with_lse,
};

/// One block-sparse case: lengths, block, the plan's lists per head, the rule, extra keys
/// (with a mask of `[batch or 1, heads or 1]`) and padded keys per batch row.
struct SparseCase {
    seq_q: usize,
    seq_k: usize,
    block: usize,
    lists: Vec<Vec<Vec<usize>>>,
    rule: ElementRule,
    extra: Option<(usize, Option<[usize; 2]>)>,
    padded: Vec<usize>,
}

/// The fused block-sparse attention against its gathered composition on `device`: windows
/// with a band and ragged last block, causal local blocks, per-head random blocks with masked
/// global keys and padding, cross lengths with unmasked extra keys, an explicit element mask
/// with a row that sees nothing, causal cross lengths, per-head plans with a band or a
/// per-head explicit mask, extra-key masks of every broadcast shape; soft and sharp queries,
/// and with the row log-sum-exp as a second output; output and every gradient.
///
/// # Panics
/// When a difference exceeds its tolerance.
pub fn check_block_sparse_against_composed(device: &Device) {
    let device = device.clone().autodiff();
    let mut rng = SeededRng::new(6);
    let around = |nb: usize, back: usize, ahead: usize| -> Vec<Vec<Vec<usize>>> {
        vec![
            (0..nb)
                .map(|i| (i.saturating_sub(back)..=(i + ahead).min(nb - 1)).collect())
                .collect(),
        ]
    };
    let (batch, heads) = (2, 3);
    let mut explicit = vec![false; 5 * 4 * 2 * 4];
    for (n, x) in explicit.iter_mut().enumerate() {
        // Row 0 of query block 0 sees nothing; the rest a pseudo-random half.
        *x = n < 2 * 4 || (n * 7919) % 5 < 2;
    }
    let cases = vec![
        // Longformer-like window: band inside look-around blocks, a ragged last block.
        SparseCase {
            seq_q: 22,
            seq_k: 22,
            block: 4,
            lists: around(6, 1, 1),
            rule: ElementRule::Band { left: 4, right: 4 },
            extra: None,
            padded: vec![0, 3],
        },
        // Causal local blocks.
        SparseCase {
            seq_q: 19,
            seq_k: 19,
            block: 5,
            lists: around(4, 1, 0),
            rule: ElementRule::Causal { offset: 0 },
            extra: None,
            padded: vec![],
        },
        // BigBird-like per-head random blocks with global keys and their mask; padding.
        SparseCase {
            seq_q: 20,
            seq_k: 20,
            block: 5,
            lists: vec![
                vec![vec![0, 2], vec![1, 3], vec![2], vec![3, 0]],
                vec![vec![1], vec![1, 2], vec![0, 2, 3], vec![3]],
                vec![vec![0, 3], vec![1], vec![2, 1], vec![3, 2]],
            ],
            rule: ElementRule::All,
            extra: Some((3, Some([1, 3]))),
            padded: vec![2, 0],
        },
        // Queries and keys of different lengths, extra keys without a mask.
        SparseCase {
            seq_q: 10,
            seq_k: 17,
            block: 4,
            lists: vec![vec![vec![0, 4], vec![1, 2], vec![3]]],
            rule: ElementRule::All,
            extra: Some((2, None)),
            padded: vec![0, 1],
        },
        // An explicit element mask (2-D windows), one query seeing nothing; an extra mask
        // per batch row.
        SparseCase {
            seq_q: 17,
            seq_k: 17,
            block: 4,
            lists: around(5, 1, 0),
            rule: ElementRule::Explicit(Arc::new(explicit)),
            extra: Some((2, Some([2, 1]))),
            padded: vec![],
        },
        // Causal cross lengths: queries aligned to the last keys (offset 8), a padded key and
        // one extra key with a mask shared by every batch row and head.
        SparseCase {
            seq_q: 9,
            seq_k: 17,
            block: 4,
            lists: vec![vec![vec![0, 1, 2], vec![1, 2, 3], vec![3, 4]]],
            rule: ElementRule::Causal { offset: 8 },
            extra: Some((1, Some([1, 1]))),
            padded: vec![1, 0],
        },
        // Per-head plans with a band, global keys masked per batch row and head, padding.
        SparseCase {
            seq_q: 20,
            seq_k: 20,
            block: 5,
            lists: vec![
                vec![vec![0, 1], vec![0, 1, 2], vec![1, 2, 3], vec![2, 3]],
                vec![vec![0], vec![1, 2], vec![2, 3], vec![3, 0]],
                vec![vec![0, 1], vec![1], vec![1, 2, 3], vec![3]],
            ],
            rule: ElementRule::Band { left: 3, right: 2 },
            extra: Some((2, Some([2, 3]))),
            padded: vec![4, 1],
        },
        // Per-head plans with a per-head explicit mask.
        SparseCase {
            seq_q: 16,
            seq_k: 16,
            block: 4,
            lists: vec![
                vec![vec![0, 1], vec![1, 0], vec![2, 1], vec![3, 2]],
                vec![vec![0], vec![1, 2], vec![2], vec![3, 0]],
                vec![vec![0, 3], vec![1], vec![2, 0], vec![3]],
            ],
            rule: ElementRule::Explicit(Arc::new(
                (0..3 * 4 * 4 * 8).map(|n| (n * 7907) % 7 < 3).collect(),
            )),
            extra: None,
            padded: vec![0, 2],
        },
    ];
    for (n, case) in cases.into_iter().enumerate() {
        let SparseCase {
            seq_q,
            seq_k,
            block,
            lists,
            rule,
            extra,
            padded,
        } = case;
        let plan = BlockPlan::new(block, seq_k.div_ceil(block), lists);
        let q = rng.normal_tensor([batch, heads, seq_q, 8], 1.0, &device);
        let k = rng.normal_tensor([batch, heads, seq_k, 8], 1.0, &device);
        let v = rng.normal_tensor([batch, heads, seq_k, 6], 1.0, &device);
        let w = rng.normal_tensor([batch, heads, seq_q, 6], 1.0, &device);
        let extra = extra.map(|(g, mask)| {
            let gk = rng.normal_tensor([batch, heads, g, 8], 1.0, &device);
            let gv = rng.normal_tensor([batch, heads, g, 6], 1.0, &device);
            let mask = mask.map(|[mb, mh]| {
                let flags = (0..mb * mh * seq_q * g)
                    .map(|_| rng.below(3) == 0)
                    .collect();
                Tensor::<4, Bool>::from_data(TensorData::new(flags, [mb, mh, seq_q, g]), &device)
            });
            (gk, gv, mask)
        });
        let key_pad = (!padded.is_empty())
            .then(|| bools(pad(batch, seq_k, &padded), [batch, seq_k], &device));
        let u = rng
            .normal_tensor([batch, heads, seq_q, 1], 1.0, &device)
            .reshape([batch, heads, seq_q]);
        let run = |fused_op: bool, with_lse: bool, q: &Tensor<4>| {
            let track = |t: &Tensor<4>| t.clone().detach().require_grad();
            let (q, k, v) = (track(q), track(&k), track(&v));
            let extra = extra
                .as_ref()
                .map(|(gk, gv, mask)| (track(gk), track(gv), mask.clone()));
            let input = BlockSparse {
                query: q.clone(),
                key: k.clone(),
                value: v.clone(),
                mask_pad_k: key_pad.as_ref(),
                plan: &plan,
                rule: rule.clone(),
                extra: extra.as_ref().map(|(gk, gv, mask)| ExtraKeys {
                    key: gk.clone(),
                    value: gv.clone(),
                    mask: mask.clone(),
                }),
            };
            let (out, lse) = match (fused_op, with_lse) {
                (true, false) => (block_sparse_attention(input), None),
                (false, false) => (block_sparse_attention_composed(input), None),
                (true, true) => {
                    let (out, lse) = block_sparse_attention_with_lse(input);
                    (out, Some(lse))
                }
                (false, true) => {
                    let (out, lse) = block_sparse_attention_composed_with_lse(input);
                    (out, Some(lse))
                }
            };
            // Rows that see no key have lse = +∞: compared and differentiated where finite.
            let lse = lse.map(|l| {
                let seen = l.clone().lower_elem(1e30);
                l.mask_fill(seen.bool_not(), 0.0)
            });
            let mut loss = out.clone().mul(w.clone()).sum();
            if let Some(l) = &lse {
                loss = loss + l.clone().mul(u.clone()).sum();
            }
            let grads = loss.backward();
            let mut all = vec![
                ("output", out.inner()),
                ("dq", q.grad(&grads).unwrap()),
                ("dk", k.grad(&grads).unwrap()),
                ("dv", v.grad(&grads).unwrap()),
            ];
            if let Some((gk, gv, _)) = &extra {
                all.push(("d extra k", gk.grad(&grads).unwrap()));
                all.push(("d extra v", gv.grad(&grads).unwrap()));
            }
            if let Some(l) = lse {
                let [b, h, n] = l.dims();
                all.push(("log-sum-exp", l.inner().reshape([b, h, n, 1])));
            }
            all
        };
        // Sharp queries (scores spread over tens) make later blocks rise far above a row's
        // first block, and fall far below it: the kernel's rare rescaling path.
        // With the log-sum-exp as a second output (Reformer's and Routing's form), whose
        // gradient enters every row's backward.
        for (sharpness, with_lse) in [(1.0, false), (12.0, false), (1.0, true)] {
            let q = q.clone().mul_scalar(sharpness);
            let (f, c) = (run(true, with_lse, &q), run(false, with_lse, &q));
            assert_eq!(f.len(), c.len());
            for ((what, a), (_, b)) in f.into_iter().zip(c) {
                let d = diff(a, b);
                // Rounding in the scores grows with their size.
                assert!(
                    d < 2e-5 * sharpness,
                    "case {n}, sharpness {sharpness}, lse {with_lse}: {what} differs by {d:e}"
                );
            }
        }
    }
}

/// On `device`: scores built to climb steeply from one visited block to the next (head 0) and
/// to fall as steeply (head 1), through a band rule and a causal rule with key padding (on the
/// CPU kernel, more than its headroom: its rebuild-from-raw-scores path runs for certain); the
/// output and
/// gradients still equal the gathered composition.
///
/// # Panics
/// When a difference exceeds its tolerance.
pub fn check_block_sparse_with_steep_scores(device: &Device) {
    let device = device.clone().autodiff();
    let (seq, block, d) = (24, 4, 8);
    let nb = seq / block;
    let around = |back: usize, ahead: usize| -> Vec<Vec<Vec<usize>>> {
        vec![
            (0..nb)
                .map(|i: usize| (i.saturating_sub(back)..=(i + ahead).min(nb - 1)).collect())
                .collect(),
        ]
    };
    // q = (1, small, …); k_j = (±25·(j - 12), small): scores step 25/√8 ≈ 8.8 per key, 35 per
    // block, between about ±100.
    let q: Vec<f32> = (0..2 * seq)
        .flat_map(|i| (0..d).map(move |t| if t == 0 { 1.0 } else { 0.01 * (i % 5) as f32 }))
        .collect();
    let k: Vec<f32> = (0..2 * seq)
        .flat_map(|i| {
            let j = (i % seq) as f32 - 12.0;
            let x = if i < seq { 25.0 * j } else { -25.0 * j };
            (0..d).map(move |t| if t == 0 { x } else { 0.1 })
        })
        .collect();
    let q = Tensor::<4>::from_data(TensorData::new(q, [1, 2, seq, d]), &device);
    let k = Tensor::<4>::from_data(TensorData::new(k, [1, 2, seq, d]), &device);
    let mut rng = SeededRng::new(12);
    let v = rng.normal_tensor([1, 2, seq, 6], 1.0, &device);
    let w = rng.normal_tensor([1, 2, seq, 6], 1.0, &device);
    let key_pad = bools(pad(1, seq, &[2]), [1, seq], &device);
    for (rule, lists) in [
        (ElementRule::Band { left: 6, right: 6 }, around(2, 2)),
        (ElementRule::Causal { offset: 0 }, around(2, 0)),
    ] {
        let plan = BlockPlan::new(block, nb, lists);
        let run = |fused_op: bool| {
            let track = |t: &Tensor<4>| t.clone().detach().require_grad();
            let (q, k, v) = (track(&q), track(&k), track(&v));
            let input = BlockSparse {
                query: q.clone(),
                key: k.clone(),
                value: v.clone(),
                mask_pad_k: Some(&key_pad),
                plan: &plan,
                rule: rule.clone(),
                extra: None,
            };
            let out = if fused_op {
                block_sparse_attention(input)
            } else {
                block_sparse_attention_composed(input)
            };
            let grads = out.clone().mul(w.clone()).sum().backward();
            [
                ("output", out.inner()),
                ("dq", q.grad(&grads).unwrap()),
                ("dk", k.grad(&grads).unwrap()),
                ("dv", v.grad(&grads).unwrap()),
            ]
        };
        for ((what, a), (_, b)) in run(true).into_iter().zip(run(false)) {
            let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
            let diff = a.sub(b).abs().max().into_scalar::<f32>();
            // Scores of magnitude ~100 carry f32 rounding of ~1e-5 into the probabilities,
            // amplified in the gradients by keys of magnitude ~300.
            let tol = if what == "output" { 1e-4 } else { 1e-3 };
            assert!(diff < tol * scale, "{rule:?}: {what} differs by {diff:e}");
        }
    }
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

/// Block-sparse attention by original positions ([`ElementRule::Positions`]: Reformer's
/// sorted buckets, Routing's clusters) through the fused operation on `device` against the
/// gathered composition, forward (output and row log-sum-exp) and backward through both, with
/// hidden keys, key padding, causality, the self score, positions seen twice and rows that see
/// no key.
///
/// # Panics
/// When a difference exceeds 2e-5 or the rows that see a key differ.
pub fn check_positions_against_composed(device: &Device) {
    let device = device.clone().autodiff();
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
    // Key padding on top of the positions in two cases (the last keys of batch row 1).
    let key_pad = bools(pad(b, n, &[0, 4]), [b, n], &device);
    for (causal, self_score, hidden, twice, padded) in [
        (false, None, false, false, false),
        (true, Some(-1e5), true, false, false),
        (false, Some(-1e5), true, false, true),
        (true, None, true, false, false),
        (true, Some(-1e5), true, true, true),
        (false, Some(-1e5), false, true, false),
    ] {
        let (qpos, kpos) = positions(&mut rng, [b, h, n], hidden, twice, &device);
        let run = |fused_op: bool| {
            let track = |t: &Tensor<4>| t.clone().detach().require_grad();
            let (q, k, v) = (track(&q), track(&k), track(&v));
            let input = BlockSparse {
                query: q.clone(),
                key: k.clone(),
                value: v.clone(),
                mask_pad_k: padded.then_some(&key_pad),
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
            "causal {causal}, self score {self_score:?}, hidden keys {hidden}, twice {twice}, \
             padded {padded}"
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
