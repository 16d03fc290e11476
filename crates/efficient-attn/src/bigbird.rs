//! BigBird (ITC): block-sparse attention with global, window and random blocks.
//!
//! - Paper: Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences",
//!   arXiv:2007.14062; reference google-research/bigbird `bigbird/core/attention.py` and
//!   huggingface `modeling_big_bird.py`.
//! - Blocks of `block` (b) positions. **Global**: the first and the last block (ITC); their
//!   queries attend to every key and every query attends to them. **Window**: blocks i−1, i,
//!   i+1. **Random**: `random_blocks` (r) other blocks per query block and head, drawn from
//!   `seed` (a plan held as data: a function of seed, head and block count; never resampled
//!   per call). Random blocks exclude the window and global blocks, so no key is counted twice
//!   (the reference's "Missing -3 / -4" rows can double count; LRA's copy fixes it).
//! - Computation: the shared block-sparse kernel with a per-head plan; global rows as dense
//!   rows. Cost O(N·(5 + r)·b·d) time and O(N·(5 + r)·b) memory: linear in N.
//! - Exact: softmax attention on the plan's pattern (tested against the dense mask of the same
//!   plan); with at most two blocks everything is global and it is full attention.
//! - Modes: bidirectional only. Causal is a configuration error: global rows see the whole
//!   sequence and random blocks would have to be drawn from the past only (HF raises the same
//!   error for `block_sparse`). Cross is a configuration error.
//! - Deviation: Hugging Face silently switches to full attention for short inputs; we do not
//!   (short inputs simply have few blocks).

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Tensor};

use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::kernels::block_sparse::{BlockPlan, BlockSparse, ElementRule, block_sparse_attention};
use crate::kernels::dense::padded_attention;
use crate::rng::SeededRng;

/// Configuration of [`BigBirdAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct BigBirdAttentionConfig {
    /// Block length (paper/HF: b = 64).
    pub block: usize,
    /// Random blocks per query block and head (paper/HF: r = 3).
    pub random_blocks: usize,
    /// Seed of the random plan.
    pub seed: u64,
}

impl Default for BigBirdAttentionConfig {
    fn default() -> Self {
        Self {
            block: 64,
            random_blocks: 3,
            seed: 0,
        }
    }
}

impl BigBirdAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "bigbird",
        paper: "Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences, arXiv:2007.14062",
        modes: &[AttentionMode::Bidirectional],
        time: "O(N·(5+r)·b·d)",
        memory: "O(N·d) on Flex and cubecl (block-sparse kernel); O(N·(5+r)·b) composed elsewhere",
        exactness: Exactness::ExactWhen("on its block plan (full when everything is global)"),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for BigBirdAttentionConfig {
    /// Each layer draws its own random state: the seed mixed with the layer.
    fn for_layer(&self, layer: usize) -> Self {
        Self {
            seed: crate::interface::layer_seed(self.seed, layer),
            ..self.clone()
        }
    }

    type Core = BigBirdAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<BigBirdAttention, ConfigError> {
        let _ = device;
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "global blocks see the whole sequence and random blocks are not restricted to the past",
        )?;
        ConfigError::check_nonzero("block", self.block)?;
        Ok(BigBirdAttention {
            mode,
            block: self.block,
            random_blocks: self.random_blocks,
            seed: self.seed,
            heads: dims.heads,
        })
    }
}

/// BigBird attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct BigBirdAttention {
    #[module(skip)]
    mode: AttentionMode,
    block: usize,
    random_blocks: usize,
    seed: u64,
    heads: usize,
}

impl BigBirdAttention {
    /// The key blocks of every non-global query block, per head: `[head][query block]`.
    /// Global query blocks (first, last) get an empty list (their rows are dense).
    pub fn plan_lists(&self, nb: usize) -> Vec<Vec<Vec<usize>>> {
        (0..self.heads)
            .map(|h| {
                let mut rng = SeededRng::new(
                    self.seed ^ ((h as u64) << 32) ^ (nb as u64).wrapping_mul(0x9e37_79b9),
                );
                (0..nb)
                    .map(|i| {
                        if i == 0 || i + 1 == nb {
                            return Vec::new();
                        }
                        let mut list: Vec<usize> = vec![0];
                        list.extend((i - 1)..=(i + 1));
                        list.push(nb - 1);
                        list.sort_unstable();
                        list.dedup();
                        let candidates: Vec<usize> =
                            (0..nb).filter(|k| !list.contains(k)).collect();
                        let take = self.random_blocks.min(candidates.len());
                        let perm = rng.permutation(candidates.len());
                        list.extend(perm.into_iter().take(take).map(|p| candidates[p]));
                        list
                    })
                    .collect()
            })
            .collect()
    }

    fn blocks(&self, n: usize) -> (usize, usize) {
        let b = self.block.min(n.max(1));
        (b, n.div_ceil(b))
    }
}

impl AttentionCore for BigBirdAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, h, n, lk, dk, dv] = input.dims();
        assert_eq!(n, lk, "BigBird attention is self-attention (seq_q = seq_k)");
        assert_eq!(
            h, self.heads,
            "BigBird was built for {} heads, got {h}",
            self.heads
        );
        let (b, nb) = self.blocks(n);
        let q = input.query.mul_scalar(1.0 / (dk as f64).sqrt());
        let pad = input.mask_pad_k.as_ref();
        let dense_rows = |start: usize, len: usize| {
            padded_attention(
                q.clone().narrow(2, start, len),
                input.key.clone(),
                input.value.clone(),
                pad,
                1.0,
            )
        };
        if nb <= 2 {
            return dense_rows(0, n);
        }
        let lists = self.plan_lists(nb);
        // Global query blocks need some plan for the kernel; their rows are replaced below.
        let lists: Vec<Vec<Vec<usize>>> = lists
            .into_iter()
            .map(|head| {
                head.into_iter()
                    .enumerate()
                    .map(|(i, l)| if l.is_empty() { vec![i] } else { l })
                    .collect()
            })
            .collect();
        let plan = BlockPlan::new(b, nb, lists);
        let middle = block_sparse_attention(BlockSparse {
            query: q.clone(),
            key: input.key.clone(),
            value: input.value.clone(),
            mask_pad_k: pad,
            plan: &plan,
            rule: ElementRule::All,
            extra: None,
        });
        let last_start = (nb - 1) * b;
        let first = dense_rows(0, b);
        let last = dense_rows(last_start, n - last_start);
        let inner = middle.narrow(2, b, last_start - b);
        let _ = dv;
        Tensor::cat(vec![first, inner, last], 2)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

}

#[cfg(feature = "testing")]
impl BigBirdAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    ///
    /// The window and global blocks come from the paper's definition
    /// ([`crate::testing::patterns::bigbird`]), not from the plan; only the random blocks are
    /// read from the drawn plan (they are data), after [`Self::random_blocks_of`] checks them.
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        let [_, h, n, lk, _, _] = input.dims();
        assert_eq!(n, lk, "BigBird is self-attention");
        let (b, nb) = self.blocks(n);
        let lists = self.plan_lists(nb);
        Some(crate::testing::patterns::bigbird(h, n, b, |head, q| {
            self.random_blocks_of(&lists, nb, head, q)
        }))
    }

    /// The random key blocks of query block `q` of `head` in the plan `lists`: the blocks
    /// that are neither in its window nor global. Panics unless there are exactly
    /// `min(random_blocks, blocks left)` of them, distinct, and the rest of the list is
    /// exactly the window and the global blocks.
    pub(crate) fn random_blocks_of(
        &self,
        lists: &[Vec<Vec<usize>>],
        nb: usize,
        head: usize,
        q: usize,
    ) -> Vec<usize> {
        let list = &lists[head][q];
        if q == 0 || q + 1 == nb {
            assert!(list.is_empty(), "a global query block has no plan list");
            return Vec::new();
        }
        let fixed: Vec<usize> = (0..nb)
            .filter(|&k| k == 0 || k + 1 == nb || k.abs_diff(q) <= 1)
            .collect();
        let random: Vec<usize> = list.iter().copied().filter(|k| !fixed.contains(k)).collect();
        let mut distinct = list.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), list.len(), "block {q} of head {head}: repeated key blocks");
        assert!(
            fixed.iter().all(|k| list.contains(k)),
            "block {q} of head {head}: the plan {list:?} misses a window or global block"
        );
        assert_eq!(
            random.len(),
            self.random_blocks.min(nb - fixed.len()),
            "block {q} of head {head}: {} random blocks, configured {}",
            random.len(),
            self.random_blocks
        );
        random
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Contract, Oracle, Spec};

    /// Blocks of 2, one random block; with at most two blocks everything is global and it is
    /// full attention.
    impl Contract for BigBirdAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let spec = pattern_spec(
                |_| {
                    BigBirdAttentionConfig {
                        block: 2,
                        random_blocks: 1,
                        seed: 3,
                    }
                    .into()
                },
                |core, input| match core {
                    Attention::Bigbird(a) => a.pattern(input),
                    _ => None,
                },
            );
            let spec = exact_config(
                spec,
                "all blocks global",
                Oracle::Full,
                1e-5,
                |case| {
                    BigBirdAttentionConfig {
                        block: case.seq_k.div_ceil(2),
                        random_blocks: 1,
                        seed: 3,
                    }
                    .into()
                },
            );
            // Random blocks covering every other block: full attention through the
            // block-sparse kernel (blocks of 2, so more than two blocks at the suite's sizes).
            vec![exact_config(
                spec,
                "random blocks cover every block, on the sparse path",
                Oracle::Full,
                1e-5,
                |case| {
                    BigBirdAttentionConfig {
                        block: 2,
                        random_blocks: case.seq_k,
                        seed: 5,
                    }
                    .into()
                },
            )]
        }
    }
}
