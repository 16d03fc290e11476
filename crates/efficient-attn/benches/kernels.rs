//! Microbenchmarks of the shared kernels: the blocked look-around (sliding window), the
//! gather-of-key-blocks with a random plan (BigBird-like), and the chunked prefix sum of causal
//! kernel attention; batch 1, 8 heads, d_head 64, on `flex`.
//!
//! Run: `cargo bench -p efficient-attn --bench kernels` (CI only compiles them).

use burn::tensor::{Device, Tensor};
use efficient_attn::testing::block_sparse::{
    BlockPlan, BlockSparse, ElementRule, block_sparse_attention,
};
use efficient_attn::testing::{SeededRng, prefix_sum};

fn main() {
    divan::main();
}

const LENGTHS: [usize; 2] = [1024, 4096];
const HEADS: usize = 8;
const D: usize = 64;

fn qkv(n: usize, device: &Device) -> [Tensor<4>; 3] {
    let mut rng = SeededRng::new(n as u64);
    [0, 1, 2].map(|_| rng.normal_tensor([1, HEADS, n, D], 1.0, device))
}

fn probe(t: Tensor<4>) -> f32 {
    t.narrow(2, 0, 1).sum().into_scalar::<f32>()
}

/// Sliding window of 256 per side: each block of 256 queries sees its block and both neighbours.
#[divan::bench(args = LENGTHS, sample_count = 5)]
fn look_around(bencher: divan::Bencher, n: usize) {
    let device = Device::flex();
    let [q, k, v] = qkv(n, &device);
    let w = 256;
    let nb = n.div_ceil(w);
    let plan = BlockPlan::look_around(w, nb, nb, 1, 1);
    bencher.bench_local(|| {
        probe(block_sparse_attention(BlockSparse {
            query: q.clone(),
            key: k.clone(),
            value: v.clone(),
            mask_pad_k: None,
            plan: &plan,
            rule: ElementRule::Band { left: w, right: w },
            extra: None,
        }))
    });
}

/// Gather of key blocks: blocks of 64, each query block sees 3 neighbours and 3 random blocks,
/// a different plan per head.
#[divan::bench(args = LENGTHS, sample_count = 5)]
fn gather_random_blocks(bencher: divan::Bencher, n: usize) {
    let device = Device::flex();
    let [q, k, v] = qkv(n, &device);
    let b = 64;
    let nb = n.div_ceil(b);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |m: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % m as u64) as usize
    };
    let ids = (0..HEADS)
        .map(|_| {
            (0..nb)
                .map(|i| {
                    let mut list: Vec<usize> =
                        (i.saturating_sub(1)..=(i + 1).min(nb - 1)).collect();
                    while list.len() < 6 {
                        let r = next(nb);
                        if !list.contains(&r) {
                            list.push(r);
                        }
                    }
                    list
                })
                .collect()
        })
        .collect();
    let plan = BlockPlan::new(b, nb, ids);
    bencher.bench_local(|| {
        probe(block_sparse_attention(BlockSparse {
            query: q.clone(),
            key: k.clone(),
            value: v.clone(),
            mask_pad_k: None,
            plan: &plan,
            rule: ElementRule::All,
            extra: None,
        }))
    });
}

/// Causal linear attention as chunks of 64: masked quadratic inside, carried state across.
#[divan::bench(args = LENGTHS, sample_count = 5)]
fn prefix_sum_causal_chunked(bencher: divan::Bencher, n: usize) {
    let device = Device::flex();
    let [q, k, v] = qkv(n, &device);
    let (q, k) = (q.exp(), k.exp()); // positive features
    bencher.bench_local(|| {
        probe(prefix_sum::causal_chunked(
            q.clone(),
            k.clone(),
            v.clone(),
            64,
        ))
    });
}

/// Bidirectional linear attention: φ(Q)(φ(K)ᵀV) with its normaliser.
#[divan::bench(args = LENGTHS, sample_count = 5)]
fn prefix_sum_bidirectional(bencher: divan::Bencher, n: usize) {
    let device = Device::flex();
    let [q, k, v] = qkv(n, &device);
    let (q, k) = (q.exp(), k.exp());
    bencher.bench_local(|| probe(prefix_sum::bidirectional(q.clone(), k.clone(), v.clone())));
}
