//! Reformer LSH attention: shared query/key vectors hashed by random rotations, sorted by
//! bucket, and attended in chunks with one chunk of look-back.
//!
//! - Paper: Kitaev, Kaiser and Levskaya 2020, "Reformer: The Efficient Transformer",
//!   arXiv:2001.04451; reference google/trax `layers/research/efficient_attention.py`
//!   (`LSHSelfAttention`, `hash_vecs`, `attend`, `look_adjacent`), whose conventions we follow,
//!   and huggingface/transformers `ReformerAttention` / lucidrains/reformer-pytorch for defaults.
//! - Shared QK: the core reads the query as the key ([`CoreConfig::shared_qk`]), so
//!   [`MultiHeadAttention`](crate::MultiHeadAttention) has no key projection for it. Keys are the
//!   unit-length queries k̂ = q/‖q‖; logits q·k̂/√d.
//! - Hashing (per head and round r of `n_hashes`): h_r(x) = argmax([x·R_r ; −x·R_r]) with a
//!   random rotation R_r ∈ ℝ^{d × n_buckets/2} (angular LSH); `n_buckets` is even, by default
//!   2·N/chunk rounded up to even (trax: mean bucket = half a chunk), and this default, above
//!   128, factorised
//!   as trax does (two rotations of f₁/2 and f₂/2 columns, bucket h₁·f₂ + h₂, f₁·f₂ ≥ the
//!   buckets asked for), which keeps hashing O(N·√buckets). Padded positions go to an extra
//!   bucket after all others, so their content never moves a real position (their number
//!   does: the chunking and the default bucket count follow the padded length).
//! - Attention: each round's positions are sorted by (bucket, position) (a unique key, so the
//!   sort is stable by construction); the rounds' sorted sequences are laid end to end and cut
//!   into chunks of `chunk` positions; each chunk attends to itself and the chunk before it (the
//!   first chunk of a round sees the last of the previous round, the very first the very last,
//!   as trax's `look_adjacent`). A query's logit for its own position is set to −1e5
//!   (lucidrains/HF; trax subtracts 1e5 — a penalty, not −∞: a query with no other key attends
//!   to itself); padding and, causally, later positions are masked. The chunks run on the
//!   block-sparse kernel (`block_sparse_attention_with_lse`: the plan "chunk i sees chunks i
//!   and i − 1", `ElementRule::Positions` comparing the original positions the sorted rows
//!   carry), which on Flex and cubecl reads the chunks in place and keeps O(N·d) per round
//!   for the backward. Each round's output and log-sum-exp are unsorted and the rounds combined as
//!   Σ_r softmax_r(lse_r)·o_r (the paper's multi-round attention, without the duplicate-pair
//!   correction, as trax).
//! - Cost: O(n_hashes·N·(log N + 2·chunk·d)) time, O(n_hashes·N·d) memory on Flex and cubecl
//!   (the sorted copies and outputs; the composed form elsewhere keeps O(n_hashes·N·2·chunk)
//!   scores); never
//!   N × N.
//! - Exact: with `chunk ≥ N` every query sees every key in one chunk (with several rounds the
//!   look-back chunk repeats every key, which leaves the softmax unchanged): full shared-QK
//!   attention with the self penalty, for any rotations (tested against a dense reference).
//!   Otherwise approximate: a query misses keys hashed to other buckets or chunks.
//! - Modes: bidirectional, causal. Cross is a configuration error (keys are the queries).
//!   Causal: later positions are masked inside chunks, so no *value* of the future reaches an
//!   output; the future's queries/keys can still move chunk boundaries (which positions share a
//!   chunk), so earlier outputs may change with them — the contract's leak check perturbs values
//!   only, for that reason (the project's research notes measured changes up to 3.1 in a
//!   reference implementation).
//! - Decoding: none. Which keys a query meets depends on where the whole sequence's positions
//!   sort, so a prefix's outputs differ from the whole sequence's; trax decodes with a
//!   different (full-attention) memory, which would not equal this layer's forward.
//! - Randomness: the rotations are drawn on the host from (`seed`, training step) through
//!   [`AttentionCore::at_step`]: redrawn after every optimiser step, the same for any
//!   recomputation within a step and on every device, reproduced by a resumed run.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::ConfigError;
use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, CoreConfig, Exactness, HeadDims, VariantInfo,
};
use crate::kernels::block_sparse::{
    BlockPlan, BlockSparse, ElementRule, PositionRule, block_sparse_attention_with_lse,
};
use crate::kernels::rows::{global_rows, select_rows, unit_rows};
use crate::rng::SeededRng;

/// Configuration of [`ReformerAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct ReformerAttentionConfig {
    /// Chunk length (HF `lsh_attn_chunk_length` 64, lucidrains `bucket_size` 64; trax 128).
    pub chunk: usize,
    /// Hashing rounds (trax and HF 1; the paper's best results use 8).
    pub n_hashes: usize,
    /// Buckets per round (even); `None`: 2·N/chunk rounded up to even (trax).
    pub n_buckets: Option<usize>,
    /// Seed of the random rotations (drawn per training step).
    pub seed: u64,
}

impl Default for ReformerAttentionConfig {
    fn default() -> Self {
        Self {
            chunk: 64,
            n_hashes: 1,
            n_buckets: None,
            seed: 0,
        }
    }
}

const WHY_NOT_DECODING: &str = "which keys a query meets depends on where the whole sequence's positions sort into chunks, so a prefix's outputs differ from the whole sequence's";

impl ReformerAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo::new(
        "reformer",
        "Kitaev et al. 2020, Reformer: The Efficient Transformer, arXiv:2001.04451",
        &[AttentionMode::Bidirectional, AttentionMode::Causal],
        "O(n_hashes·N·(log N + 2c·d))",
        "O(n_hashes·N·d) on Flex and cubecl (block-sparse kernel); O(n_hashes·N·2c) composed elsewhere",
        Exactness::ExactWhen(
            "with chunk >= N (full shared-QK attention with the self penalty); otherwise LSH-approximate",
        ),
    )
    .without_decoding(WHY_NOT_DECODING);
}

impl CoreConfig for ReformerAttentionConfig {
    /// Each layer draws its own random state: the seed mixed with the layer.
    fn for_layer(&self, layer: usize) -> Self {
        Self {
            seed: crate::interface::layer_seed(self.seed, layer),
            ..self.clone()
        }
    }

    type Core = ReformerAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<ReformerAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode_because(&Self::INFO, mode, "LSH attention shares queries and keys")?;
        ConfigError::check_nonzero("chunk", self.chunk)?;
        ConfigError::check_nonzero("n_hashes", self.n_hashes)?;
        if let Some(nb) = self.n_buckets
            && (nb < 2 || nb % 2 != 0)
        {
            return Err(ConfigError::InvalidField {
                field: "n_buckets",
                expected: "an even number of at least 2 (each rotation gives ± halves)".into(),
                got: nb.to_string(),
            });
        }
        Ok(ReformerAttention {
            mode,
            chunk: self.chunk,
            n_hashes: self.n_hashes,
            n_buckets: self.n_buckets,
            seed: self.seed,
            step: 0,
            same_rotations: false,
        })
    }

    /// Keys are the queries: no key projection.
    fn shared_qk(&self) -> bool {
        true
    }
}

/// Reformer LSH attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct ReformerAttention {
    #[module(skip)]
    mode: AttentionMode,
    chunk: usize,
    n_hashes: usize,
    #[module(skip)]
    n_buckets: Option<usize>,
    seed: u64,
    step: usize,
    same_rotations: bool,
}

impl ReformerAttention {
    /// Buckets per round for a padded length `n`.
    pub fn buckets_for(&self, n: usize) -> usize {
        self.bucket_factors(n).iter().product()
    }

    /// The buckets as factors (trax's factorised hashing): one even factor up to 128 buckets,
    /// else two even factors near √buckets (the bucket is h₁·f₂ + h₂ from two rotations of
    /// f₁/2 and f₂/2 columns), so hashing costs O(N·√buckets), not O(N·buckets) = O(N²/chunk).
    pub fn bucket_factors(&self, n: usize) -> Vec<usize> {
        if let Some(nb) = self.n_buckets {
            return vec![nb];
        }
        let nb = (2 * n.div_ceil(self.chunk)).max(2).next_multiple_of(2);
        if nb <= 128 {
            return vec![nb];
        }
        let f1 = ((nb as f64).sqrt().ceil() as usize).next_multiple_of(2);
        let f2 = nb.div_ceil(f1).next_multiple_of(2);
        vec![f1, f2]
    }

    /// The rotations of the current step, `[1, heads, d, rounds·half]` (`half` columns per
    /// round: the factors' halves side by side).
    fn rotations(&self, heads: usize, d: usize, half: usize, device: &Device) -> Tensor<4> {
        let mut rng = SeededRng::new(
            self.seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(self.step as u64),
        );
        let one_round: usize = heads * d * half;
        let rounds = if self.same_rotations { 1 } else { self.n_hashes };
        let drawn: Vec<f32> = (0..one_round * rounds).map(|_| rng.normal() as f32).collect();
        // [rounds, heads, d, half] → [heads, d, rounds, half]
        let r = Tensor::<4>::from_data(TensorData::new(drawn, [rounds, heads, d, half]), device);
        let r = if rounds < self.n_hashes {
            r.expand([self.n_hashes, heads, d, half])
        } else {
            r
        };
        r.permute([1, 2, 0, 3])
            .reshape([1, heads, d, self.n_hashes * half])
    }
}

impl AttentionCore for ReformerAttention {
    /// The key is the query (shared QK): `input.key` is not read.
    ///
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [bs, h, n, lk, dk, dv] = input.dims();
        assert_eq!(n, lk, "reformer attention is self-attention (seq_q = seq_k)");
        let device = input.query.device();
        let c = self.chunk.min(n.max(1));
        let np = n.div_ceil(c) * c;
        let rounds = self.n_hashes;
        let nb = self.buckets_for(np);
        let total = rounds * np;
        let chunks = total / c;

        // Real positions (padding and the tail up to a whole chunk are not).
        let mut pad: Tensor<2, burn::tensor::Bool> = match &input.mask_pad_k {
            Some(p) => p.clone(),
            None => Tensor::<2, Int>::zeros([bs, n], &device).bool(),
        };
        let pad_tail = |x: Tensor<4>| {
            if np > n {
                let d = x.dims()[3];
                Tensor::cat(vec![x, Tensor::zeros([bs, h, np - n, d], &device)], 2)
            } else {
                x
            }
        };
        if np > n {
            pad = Tensor::cat(
                vec![pad, Tensor::<2, Int>::ones([bs, np - n], &device).bool()],
                1,
            );
        }
        let qk = pad_tail(input.query);
        let v = pad_tail(input.value);

        // Buckets: [batch, heads, np, rounds]; padded positions in the extra bucket nb.
        let factors = self.bucket_factors(np);
        let half: usize = factors.iter().map(|f| f / 2).sum();
        let rotated = qk
            .clone()
            .matmul(self.rotations(h, dk, half, &device)) // [batch, heads, np, rounds·half]
            .reshape([bs, h, np, rounds, half]);
        let mut offset = 0;
        let mut buckets: Option<Tensor<4, Int>> = None;
        for &f in &factors {
            let part = rotated.clone().narrow(4, offset, f / 2);
            offset += f / 2;
            let hash = Tensor::cat(vec![part.clone(), part.neg()], 4)
                .argmax(4)
                .reshape([bs, h, np, rounds]);
            buckets = Some(match buckets {
                Some(b) => b.mul_scalar(f as i64).add(hash),
                None => hash,
            });
        }
        let buckets = buckets.expect("at least one bucket factor");
        let pad_rounds = pad
            .clone()
            .reshape([bs, 1, np, 1])
            .expand([bs, h, np, rounds]);
        let buckets = buckets.mask_fill(pad_rounds, nb as i64);

        // Sort each round by (bucket, position) (keys below (nb + 1)·np, so 32-bit integer
        // backends hold them up to N ≈ 180K at chunk 64), then lay the rounds end to end.
        let pos = Tensor::<1, Int>::arange(0..np as i64, &device).reshape([1, 1, 1, np]);
        let key = buckets
            .swap_dims(2, 3) // [batch, heads, rounds, np]
            .mul_scalar(np as i64)
            .add(pos);
        let within = key.argsort(3); // positions of each round in sorted order
        let spos = within.clone().reshape([bs, h, total]); // original positions, round-major
        // Where each (round, position) went in the sorted, round-major sequence: its rank in
        // the round plus round·np (built from the ranks, so in their integer type).
        let rank = within.argsort(3); // [batch, heads, rounds, np]
        let offsets = rank
            .ones_like()
            .narrow(3, 0, 1)
            .cumsum(2)
            .sub_scalar(1)
            .mul_scalar(np as i64); // [batch, heads, rounds, 1]: r·np
        let undo = rank.add(offsets).reshape([bs, h, total]);
        // Whole rows of the flattened [batch·heads·len, d] tensors (kernels::rows).
        let sorted_rows = global_rows(spos.clone().reshape([bs * h, total]), np);
        let undo_rows = global_rows(undo.reshape([bs * h, total]), total);
        let sq = select_rows(qk, sorted_rows.clone()); // [batch, heads, total, d_k]
        let sv = select_rows(v, sorted_rows.clone());
        let sk = unit_rows(sq.clone());
        let spad = pad
            .int()
            .reshape([bs, 1, np])
            .expand([bs, h, np])
            .reshape([bs * h * np])
            .select(0, sorted_rows)
            .reshape([bs, h, total]);

        // Each chunk attends to itself and the chunk before (the first wraps to the last, as
        // trax's `look_adjacent`): the block-sparse kernel over that plan, the original
        // positions deciding causality, padding (position −1) and the self penalty. The
        // log-sum-exp of each row weighs the rounds below.
        let lists = (0..chunks)
            .map(|i| {
                if chunks == 1 {
                    vec![0]
                } else {
                    vec![i, (i + chunks - 1) % chunks]
                }
            })
            .collect();
        let plan = BlockPlan::new(c, chunks, vec![lists]);
        let rule = ElementRule::Positions(Box::new(PositionRule {
            query: spos.clone(),
            key: spos.mask_fill(spad.bool(), -1),
            causal: self.mode.is_causal(),
            self_score: Some(-1e5),
        }));
        let (o, lse) = block_sparse_attention_with_lse(BlockSparse {
            query: sq.mul_scalar(1.0 / (dk as f64).sqrt()),
            key: sk,
            value: sv,
            mask_pad_k: None,
            plan: &plan,
            rule,
            extra: None,
        }); // [batch, heads, total, d_v], [batch, heads, total]

        // Unsort and combine the rounds.
        let o = select_rows(o, undo_rows.clone()).reshape([bs, h, rounds, np, dv]);
        // A row that sees no key (a padded position whose chunks hold only padding) has
        // lse = +∞ and zeros: capped, it weighs its rounds equally.
        let l = lse
            .clamp_max(1e30)
            .reshape([bs * h * total])
            .select(0, undo_rows)
            .reshape([bs, h, rounds, np, 1]);
        // Softmax over the rounds, normalised by division so the weights sum to 1 exactly.
        let w = l.clone().sub(l.max_dim(2).detach()).exp();
        let total_w = w.clone().sum_dim(2);
        o.mul(w)
            .sum_dim(2)
            .div(total_w)
            .reshape([bs, h, np, dv])
            .narrow(2, 0, n)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Later forwards draw the rotations of `step`.
    fn at_step(mut self, step: usize) -> Self {
        self.step = step;
        self
    }
}

#[cfg(all(test, feature = "testing"))]
impl ReformerAttention {
    /// This instance drawing the same rotation for every round.
    fn with_same_rotations(mut self) -> Self {
        self.same_rotations = true;
        self
    }
}

/// Dense shared-QK attention with trax's conventions: keys are the unit-length queries, logits
/// q·k̂/√d, a query's own logit −1e5, padding and (causally) later keys masked. What LSH attention
/// equals when one chunk holds the whole sequence.
#[cfg(feature = "testing")]
pub(crate) fn dense_shared_qk(input: &AttnInput, mode: AttentionMode) -> Tensor<4> {
    use burn::tensor::activation::softmax;
    let [b, h, n, _, dk, _] = input.dims();
    let device = input.query.device();
    let q = input.query.clone();
    let k = crate::kernels::rows::unit_rows(q.clone());
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (dk as f64).sqrt());
    let eye = Tensor::<2>::eye(n, &device)
        .equal_elem(1.0)
        .reshape([1, 1, n, n])
        .expand([b, h, n, n]);
    scores = scores.mask_fill(eye, -1e5);
    if let Some(mask) = crate::reference::oracle_mask(input, mode, None) {
        scores = scores.mask_fill(mask, -1e9);
    }
    softmax(scores, 3).matmul(input.value.clone())
}

#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, GradCheck, LeakCheck, Oracle, Spec};

    fn reference(_: &Attention, input: &AttnInput, mode: AttentionMode) -> Tensor<4> {
        dense_shared_qk(input, mode)
    }

    /// Chunks of 4 with 2 rounds; one chunk covering the input is dense shared-QK attention.
    impl Contract for ReformerAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let spec = exact_config(
                from_config(|_: &Case| {
                    ReformerAttentionConfig {
                        chunk: 4,
                        n_hashes: 2,
                        ..Default::default()
                    }
                    .into()
                })
                .causal_memory(false)
                .leak(LeakCheck::ValuesOnly(
                    "a future position's query/key moves chunk boundaries (which positions share a chunk)",
                ))
                .grad(GradCheck::Skip(
                    "the hash is piecewise constant: a finite difference can move a position to another bucket; the one-chunk gradients are tested against the dense reference",
                )),
                "one chunk = dense shared-QK attention",
                Oracle::Reference("dense shared-QK attention with the self penalty", reference),
                1e-5,
                |_| {
                    ReformerAttentionConfig {
                        chunk: 64,
                        n_hashes: 3,
                        ..Default::default()
                    }
                    .into()
                },
            );
            vec![spec]
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    fn input(n: usize, seed: u64, device: &Device) -> AttnInput {
        let mut rng = SeededRng::new(seed);
        let q = rng.normal_tensor([2, 2, n, 8], 1.0, device);
        let v = rng.normal_tensor([2, 2, n, 8], 1.0, device);
        AttnInput::new(q.clone(), q, v)
    }

    fn core(mode: AttentionMode, chunk: usize, n_hashes: usize) -> ReformerAttention {
        ReformerAttentionConfig {
            chunk,
            n_hashes,
            seed: 7,
            ..Default::default()
        }
        .init(mode, HeadDims::new(2, 8), &Device::flex())
        .unwrap()
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        a.sub(b).abs().max().into_scalar::<f32>()
    }

    /// The same rotation in every round makes every round identical, so the output does not
    /// depend on the number of rounds.
    #[test]
    fn identical_rotations_make_the_rounds_agree() {
        let device = Device::flex();
        for mode in [AttentionMode::Bidirectional, AttentionMode::Causal] {
            let x = input(24, 1, &device);
            let one = core(mode, 4, 1).attend(x.clone());
            let four = core(mode, 4, 4).with_same_rotations().attend(x.clone());
            assert!(max_diff(one.clone(), four) < 1e-5, "{mode}");
            // With different rotations the rounds differ (the test can fail).
            let drawn = core(mode, 4, 4).attend(x);
            assert!(max_diff(one, drawn) > 1e-3, "{mode}");
        }
    }

    /// In the one-chunk regime the gradients with respect to the shared query/key and the
    /// values equal those of the dense reference.
    #[test]
    fn one_chunk_gradients_equal_the_dense_reference() {
        let device = Device::flex().autodiff();
        for mode in [AttentionMode::Bidirectional, AttentionMode::Causal] {
            let x = input(10, 2, &device);
            let grads = |f: &dyn Fn(AttnInput) -> Tensor<4>| {
                let q = x.query.clone().detach().require_grad();
                let v = x.value.clone().detach().require_grad();
                let w = SeededRng::new(3).normal_tensor([2, 2, 10, 8], 1.0, &device);
                let out = f(AttnInput::new(q.clone(), q.clone(), v.clone()));
                let g = out.mul(w).sum().backward();
                (q.grad(&g).unwrap(), v.grad(&g).unwrap())
            };
            let lsh = core(mode, 64, 2);
            let (gq, gv) = grads(&|i| lsh.attend(i));
            let (rq, rv) = grads(&|i| dense_shared_qk(&i, mode));
            assert!(max_diff(gq, rq) < 1e-4, "{mode}: query gradient");
            let dv = max_diff(gv, rv);
            assert!(dv < 1e-4, "{mode}: value gradient {dv:e}");
        }
    }

    /// The rotations are a function of the training step: the same step gives the same output,
    /// another step (usually) another.
    #[test]
    fn rotations_follow_the_training_step() {
        let device = Device::flex();
        let x = input(32, 4, &device);
        let base = core(AttentionMode::Bidirectional, 4, 2);
        let a = base.clone().at_step(3).attend(x.clone());
        let b = base.clone().at_step(3).attend(x.clone());
        let c = base.at_step(4).attend(x);
        assert_eq!(max_diff(a.clone(), b), 0.0);
        assert!(max_diff(a, c) > 1e-3);
    }

    /// Buckets default to two per chunk (trax), factorised above 128.
    #[test]
    fn the_buckets_default_to_two_per_chunk() {
        let c = core(AttentionMode::Bidirectional, 64, 1);
        assert_eq!(c.buckets_for(4096), 128);
        assert_eq!(c.buckets_for(64), 2);
        assert_eq!(c.buckets_for(200), 8);
        // Above 128 buckets: two even factors near the square root.
        assert_eq!(c.bucket_factors(16384), vec![24, 22]);
        assert!(c.buckets_for(16384) >= 512);
    }
}
