//! Sinkhorn attention: each query block attends to its own block and to a block sorted to it
//! by a differentiable (Gumbel–Sinkhorn) permutation of the key blocks.
//!
//! - Paper: Tay, Bahri, Yang, Metzler and Juan 2020, "Sparse Sinkhorn Attention",
//!   arXiv:2002.11296; reference lucidrains/sinkhorn-transformer (`AttentionSortNet`,
//!   `gumbel_sinkhorn`, `SinkhornAttention`), read for its defaults and causal summaries.
//! - Computation (per head; blocks of `block` = b positions, N_B = ⌈N/b⌉ blocks):
//!   1. block summaries: the mean query and the mean key of each block's real (unpadded)
//!      positions (lucidrains' parameter-free sort net);
//!   2. sort scores R_ij = s_q,i · s_k,j / √d, plus Gumbel noise during training;
//!   3. Sinkhorn in the log domain: r = R/τ, then `iterations` times r −= lse_rows(r),
//!      r −= lse_cols(r); S = exp(r), a doubly stochastic N_B × N_B matrix (columns sum to 1
//!      exactly after the last step);
//!   4. sorted blocks: K̃ = S·K_blocks, Ṽ = S·V_blocks (each sorted block a mixture of blocks);
//!   5. query block i attends to [K̃_i ; K_i]: the sorted block, then its own block.
//! - Padding: padded keys are zeroed before mixing; a sorted key carries the real mass
//!   m = Σ_j S_ij·real_j of its mixture as a logit bias ln m (m = 0 is masked), so the content
//!   of padded positions never changes an output (their number does: blocks of padding still
//!   take part in the balancing).
//! - SortCut (`sortcut = n`): instead of its own sorted block, every query attends to the first
//!   n rows of the (square) sorted sequence, shared by all queries, and its own block:
//!   O(N·(n+1)·b).
//! - Causal: the summaries of block i use only blocks before it (the cumulative mean of the
//!   earlier blocks' queries; lucidrains uses cumulative means too), block i may only draw from
//!   blocks j < i (R masked), and the normalisation is over rows only (a softmax over the earlier
//!   blocks): the column steps of Sinkhorn balancing would let later blocks change the sorting
//!   of earlier ones, i.e. leak the future. Own-block keys are masked causally; block 0 has no
//!   sorted block. Nothing after a query reaches it (queries, keys and values; tested).
//! - Cost: O(N·2b·d + N_B²·d) time, O(N·2b + N_B²) memory per head; never an N × N matrix.
//! - Exact: with one block (b ≥ N) S = (1), the sorted block is the own block, and the output is
//!   full (causal: causal full) attention (tested); with S = I, local block attention (tested).
//!   Otherwise it attends to mixtures of keys: not an approximation of full attention.
//! - Cross (lucidrains' context attention): the query blocks and the context's blocks are
//!   summarised the same way; a rectangular Sinkhorn matrix (rows = query blocks, columns =
//!   context blocks; rows sum to 1, columns to ⌈N_q/b⌉/⌈N_k/b⌉) sorts a context block to every
//!   query
//!   block, which attends to it alone; with SortCut every query attends to the first n sorted
//!   blocks. One context block is full cross-attention (tested).
//! - Modes: bidirectional, causal, cross (SortCut: bidirectional and cross).
//! - Decoding (causal): the layer is recomputed over the prefix at every step (a prefix cache of
//!   queries, keys and values; exact by causality), O(t·2b·d + (t/b)²·d) for position t: the
//!   sorted block of block i mixes every earlier block, so even a dedicated cache would read
//!   O(t·d).
//! - Randomness: Gumbel noise only on an autodiff device (training), drawn on the host from
//!   (`seed`, training step) through [`AttentionCore::at_step`], so a step's forward and any
//!   recomputation agree and a resumed run reproduces an uninterrupted one.
//! - Length: over 600 lines because the file holds the self and cross computations and, as
//!   every variant file does, the contract spec and the Sinkhorn invariant tests.
//! - Deviations: the paper's sort net is a learned feed-forward on block sums; lucidrains' is
//!   the parameter-free product of mean query and key summaries followed by a ReLU, which we use
//!   without the ReLU (R are log-domain scores). lucidrains' non-SortCut branch mixes the
//!   *keys* into the sorted values (`b_v_r = b_k_r…`); we mix the values.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::decoding::{DecodeCache, PrefixCache, prefix_step};
use crate::error::ConfigError;
use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, CoreConfig, Exactness, HeadDims, VariantInfo,
};
use crate::kernels::dense::masked_softmax_matmul;
use crate::kernels::rows::log_sum_exp as lse;
use crate::rng::SeededRng;

/// Configuration of [`SinkhornAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct SinkhornAttentionConfig {
    /// Block length b (lucidrains `bucket_size` 64).
    pub block: usize,
    /// Sinkhorn iterations (lucidrains `sinkhorn_iter` 5).
    pub iterations: usize,
    /// Temperature τ of the Gumbel–Sinkhorn operator (lucidrains 0.75).
    pub temperature: f64,
    /// SortCut: every query attends to this many sorted blocks (and its own); `None`: each
    /// query block to its own sorted block (lucidrains `n_sortcut` 0).
    pub sortcut: Option<usize>,
    /// Seed of the Gumbel noise (drawn per training step).
    pub seed: u64,
}

impl Default for SinkhornAttentionConfig {
    fn default() -> Self {
        Self {
            block: 64,
            iterations: 5,
            temperature: 0.75,
            sortcut: None,
            seed: 0,
        }
    }
}

impl SinkhornAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "sinkhorn",
        paper: "Tay et al. 2020, Sparse Sinkhorn Attention, arXiv:2002.11296",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal, AttentionMode::Cross],
        time: "O(N·2b·d + (N/b)²·d); SortCut O(N·(n+1)·b·d); cross O(N·b·d + (N/b)(M/b)·d)",
        memory: "O(N·2b + (N/b)²)",
        exactness: Exactness::ExactWhen(
            "with one block (full attention) or S = I (local block attention); otherwise attends to learned mixtures of key blocks",
        ),
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };
}

impl CoreConfig for SinkhornAttentionConfig {
    /// Each layer draws its own random state: the seed mixed with the layer.
    fn for_layer(&self, layer: usize) -> Self {
        Self {
            seed: crate::interface::layer_seed(self.seed, layer),
            ..self.clone()
        }
    }

    type Core = SinkhornAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<SinkhornAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode(&Self::INFO, mode)?;
        ConfigError::check_nonzero("block", self.block)?;
        ConfigError::check_nonzero("iterations", self.iterations)?;
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(ConfigError::InvalidField {
                field: "temperature",
                expected: "a positive number".into(),
                got: self.temperature.to_string(),
            });
        }
        if let Some(n) = self.sortcut {
            ConfigError::check_nonzero("sortcut", n)?;
            if mode.is_causal() {
                return Err(ConfigError::InvalidField {
                    field: "sortcut",
                    expected: "unset in causal mode (every query would see sorted blocks drawn from its future)".into(),
                    got: n.to_string(),
                });
            }
        }
        Ok(SinkhornAttention {
            mode,
            block: self.block,
            iterations: self.iterations,
            temperature: self.temperature,
            sortcut: self.sortcut,
            seed: self.seed,
            step: 0,
            identity_sort: false,
        })
    }
}

/// Sinkhorn attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct SinkhornAttention {
    #[module(skip)]
    mode: AttentionMode,
    block: usize,
    iterations: usize,
    temperature: f64,
    #[module(skip)]
    sortcut: Option<usize>,
    seed: u64,
    step: usize,
    identity_sort: bool,
}


impl SinkhornAttention {
    /// The sorting matrix from log-domain scores `r` (`[batch, heads, N_B, N_B]`) and the
    /// forbidden entries (`true`), in the same shape.
    ///
    /// # Shapes
    /// - r: `[batch, heads, rows, cols]` (rows = cols but in cross mode)
    /// - output: the same shape. Bidirectional: doubly stochastic in the limit (the columns sum
    ///   to 1 exactly after the last step); causal: each row with an allowed entry sums to 1
    ///   over its allowed entries; cross (rows ≠ cols): rows sum to 1 exactly, columns to
    ///   rows/cols in the limit
    pub fn sinkhorn(&self, r: Tensor<4>, forbidden: Option<Tensor<4, Bool>>) -> Tensor<4> {
        let [_, _, rows, cols] = r.dims();
        let mut r = r.div_scalar(self.temperature);
        if let Some(f) = &forbidden {
            r = r.mask_fill(f.clone(), -1e9);
        }
        // Columns of a rectangular matrix (cross mode) sum to rows/cols; a last row step makes
        // every row a distribution over the key blocks.
        let column_target = (rows as f64 / cols as f64).ln();
        for _ in 0..self.iterations {
            r = r.clone().sub(lse(r, 3));
            if !self.mode.is_causal() {
                r = r.clone().sub(lse(r, 2)).add_scalar(column_target);
            }
        }
        if rows != cols {
            r = r.clone().sub(lse(r, 3));
        }
        let s = r.exp();
        match forbidden {
            Some(f) => s.mask_fill(f, 0.0),
            None => s,
        }
    }

    /// Cross-attention: query block i attends to the context blocks sorted to it (row i of a
    /// rectangular Sinkhorn matrix over query × context blocks), or with SortCut every query
    /// to the first n sorted blocks.
    ///
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_k` may differ from `seq_q`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend_cross(&self, input: AttnInput) -> Tensor<4> {
        let [bs, h, lq, lk, dk, dv] = input.dims();
        let device = input.query.device();
        let (bq, bk) = (self.block.min(lq.max(1)), self.block.min(lk.max(1)));
        let (nq, nk) = (lq.div_ceil(bq), lk.div_ceil(bk));
        let (tq, tk) = (nq * bq, nk * bk);
        let real_of = |mask: Option<&Tensor<2, Bool>>, len: usize, total: usize| {
            let real: Tensor<2> = match mask {
                Some(p) => p.clone().bool_not().float(),
                None => Tensor::ones([bs, len], &device),
            };
            if total > len {
                Tensor::cat(vec![real, Tensor::zeros([bs, total - len], &device)], 1)
            } else {
                real
            }
        };
        let pad_to = |x: Tensor<4>, total: usize| {
            let [_, _, len, d] = x.dims();
            if total > len {
                Tensor::cat(vec![x, Tensor::zeros([bs, h, total - len, d], &device)], 2)
            } else {
                x
            }
        };
        let real_q = real_of(input.mask_pad_q(), lq, tq);
        let real_k = real_of(input.mask_pad_k.as_ref(), lk, tk);
        let masked = |x: Tensor<4>, real: &Tensor<2>, total: usize| {
            let d = x.dims()[3];
            let pad = real.clone().reshape([bs, 1, total, 1]).equal_elem(0.0).expand([bs, h, total, d]);
            pad_to(x, total).mask_fill(pad, 0.0)
        };
        let q = masked(input.query, &real_q, tq).mul_scalar(1.0 / (dk as f64).sqrt());
        let kb = masked(input.key, &real_k, tk).reshape([bs, h, nk, bk, dk]);
        let vb = masked(input.value, &real_k, tk).reshape([bs, h, nk, bk, dv]);
        let qb = q.reshape([bs, h, nq, bq, dk]);
        let rq = real_q.reshape([bs, 1, nq, bq]);
        let rk = real_k.reshape([bs, 1, nk, bk]);
        let mean = |x: Tensor<5>, real: &Tensor<4>, blocks: usize, len: usize, d: usize| {
            let counts = real.clone().sum_dim(3).clamp_min(1.0); // [batch, 1, blocks, 1]
            x.mul(real.clone().reshape([bs, 1, blocks, len, 1]))
                .sum_dim(3)
                .reshape([bs, h, blocks, d])
                .div(counts)
        };
        let s_q = mean(qb.clone(), &rq, nq, bq, dk);
        let s_k = mean(kb.clone(), &rk, nk, bk, dk);
        let scores = s_q.matmul(s_k.swap_dims(2, 3)); // [batch, heads, N_q, N_k]
        let scores = if device.is_autodiff() {
            scores.add(self.gumbel([bs, h, nq, nk], &device))
        } else {
            scores
        };
        let s = self.sinkhorn(scores, None);
        let rows = self.sortcut.map_or(nq, |c| c.min(nq));
        let s = s.narrow(2, 0, rows);
        let k_sorted = s.clone().matmul(kb.reshape([bs, h, nk, bk * dk])).reshape([bs, h, rows, bk, dk]);
        let v_sorted = s.clone().matmul(vb.reshape([bs, h, nk, bk * dv])).reshape([bs, h, rows, bk, dv]);
        let mass = s.matmul(rk.expand([bs, h, nk, bk])); // [batch, heads, rows, b_k]
        let (keys, values, mass, m) = match self.sortcut {
            None => (k_sorted, v_sorted, mass, bk),
            Some(_) => {
                let w = rows * bk;
                (
                    k_sorted.reshape([bs, h, 1, w, dk]).expand([bs, h, nq, w, dk]),
                    v_sorted.reshape([bs, h, 1, w, dv]).expand([bs, h, nq, w, dv]),
                    mass.reshape([bs, h, 1, w]).expand([bs, h, nq, w]),
                    w,
                )
            }
        };
        let empty = mass
            .clone()
            .lower_equal_elem(0.0)
            .reshape([bs, h, nq, 1, m])
            .expand([bs, h, nq, bq, m]);
        let scores = qb
            .matmul(keys.swap_dims(3, 4))
            .add(mass.clamp_min(1e-30).log().reshape([bs, h, nq, 1, m]).expand([bs, h, nq, bq, m]));
        masked_softmax_matmul(
            scores.reshape([bs * h, nq, bq, m]),
            Some(empty.reshape([bs * h, nq, bq, m])),
            values.reshape([bs * h, nq, m, dv]),
        )
        .reshape([bs, h, tq, dv])
        .narrow(2, 0, lq)
    }

    /// Gumbel noise for the current training step, `[batch, heads, rows, cols]`.
    fn gumbel(&self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let mut rng = SeededRng::new(
            self.seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(self.step as u64),
        );
        let n = shape.iter().product();
        let g: Vec<f32> = (0..n)
            .map(|_| {
                let u = rng.uniform().clamp(1e-12, 1.0 - 1e-12);
                -(-(u.ln())).ln() as f32
            })
            .collect();
        Tensor::from_data(TensorData::new(g, shape), device)
    }
}

impl AttentionCore for SinkhornAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        if self.mode == AttentionMode::Cross {
            return self.attend_cross(input);
        }
        let [bs, h, n, lk, dk, dv] = input.dims();
        assert_eq!(n, lk, "sinkhorn self-attention has seq_q = seq_k (cross mode for a context)");
        let device = input.query.device();
        let b = self.block.min(n.max(1));
        let nb = n.div_ceil(b);
        let total = nb * b;
        let causal = self.mode.is_causal();

        // Real positions (1) and padding (0), with the tail beyond N padded: [batch, total].
        let mut real: Tensor<2> = match &input.mask_pad_k {
            Some(p) => p.clone().bool_not().float(),
            None => Tensor::ones([bs, n], &device),
        };
        let pad_tail = |x: Tensor<4>| {
            if total > n {
                let d = x.dims()[3];
                Tensor::cat(vec![x, Tensor::zeros([bs, h, total - n, d], &device)], 2)
            } else {
                x
            }
        };
        if total > n {
            real = Tensor::cat(vec![real, Tensor::zeros([bs, total - n], &device)], 1);
        }
        let real4 = real.clone().reshape([bs, 1, total, 1]);
        let q = pad_tail(input.query).mul_scalar(1.0 / (dk as f64).sqrt());
        let padded4 = real4.equal_elem(0.0);
        let k = pad_tail(input.key).mask_fill(padded4.clone().expand([bs, h, total, dk]), 0.0);
        let v = pad_tail(input.value).mask_fill(padded4.expand([bs, h, total, dv]), 0.0);
        let qb = q.reshape([bs, h, nb, b, dk]);
        let kb = k.reshape([bs, h, nb, b, dk]);
        let vb = v.reshape([bs, h, nb, b, dv]);
        let real_b = real.clone().reshape([bs, 1, nb, b]); // [batch, 1, N_B, b]

        // Block summaries: means over real positions; causal queries use the earlier blocks.
        let counts = real_b.clone().sum_dim(3); // [batch, 1, N_B, 1]
        let q_real = qb.clone().mul(real_b.clone().reshape([bs, 1, nb, b, 1]));
        let q_sum = q_real.sum_dim(3).reshape([bs, h, nb, dk]);
        let (s_q, q_counts) = if causal {
            // Exclusive cumulative sums over blocks: block i sees blocks 0..i.
            let shift = |x: Tensor<4>| {
                let [d0, d1, _, d] = x.dims();
                let zeros = Tensor::zeros([d0, d1, 1, d], &device);
                if nb == 1 {
                    return zeros;
                }
                Tensor::cat(vec![zeros, x.cumsum(2).narrow(2, 0, nb - 1)], 2)
            };
            (shift(q_sum), shift(counts.clone()))
        } else {
            (q_sum, counts.clone())
        };
        let s_q = s_q.div(q_counts.clamp_min(1.0));
        let s_k = kb
            .clone()
            .sum_dim(3)
            .reshape([bs, h, nb, dk])
            .div(counts.clone().clamp_min(1.0));

        // Sort scores and the (square) sorting matrix; SortCut keeps its first rows.
        // q is already scaled by 1/√d: s_q · s_k = mean q · mean k / √d.
        let scores = s_q.matmul(s_k.swap_dims(2, 3)); // [batch, heads, N_B, N_B]
        let scores = if device.is_autodiff() {
            scores.add(self.gumbel([bs, h, nb, nb], &device))
        } else {
            scores
        };
        let forbidden = causal.then(|| {
            let f: Vec<bool> = (0..nb)
                .flat_map(|i| (0..nb).map(move |j| j >= i))
                .collect();
            Tensor::<2, Bool>::from_data(TensorData::new(f, [nb, nb]), &device)
                .reshape([1, 1, nb, nb])
                .expand([bs, h, nb, nb])
        });
        let s = if self.identity_sort {
            Tensor::<2>::eye(nb, &device)
                .reshape([1, 1, nb, nb])
                .expand([bs, h, nb, nb])
        } else {
            self.sinkhorn(scores, forbidden)
        };
        let rows = self.sortcut.map_or(nb, |c| c.min(nb));
        let s = s.narrow(2, 0, rows);

        // Sorted blocks and the real mass of each sorted key.
        let k_sorted = s
            .clone()
            .matmul(kb.clone().reshape([bs, h, nb, b * dk]))
            .reshape([bs, h, rows, b, dk]);
        let v_sorted = s
            .clone()
            .matmul(vb.clone().reshape([bs, h, nb, b * dv]))
            .reshape([bs, h, rows, b, dv]);
        let mass = s.matmul(real_b.clone().expand([bs, h, nb, b])); // [batch, heads, rows, b]

        // Keys per query block: [sorted block(s); own block].
        let (keys_sorted, values_sorted, mass_sorted, per) = match self.sortcut {
            None => (k_sorted, v_sorted, mass, b),
            Some(_) => {
                let w = rows * b;
                let expand = |x: Tensor<4>| {
                    let d = x.dims()[3];
                    x.reshape([bs, h, 1, w, d]).expand([bs, h, nb, w, d])
                };
                (
                    expand(k_sorted.reshape([bs, h, w, dk])),
                    expand(v_sorted.reshape([bs, h, w, dv])),
                    mass.reshape([bs, h, 1, w]).expand([bs, h, nb, w]),
                    w,
                )
            }
        };
        let keys = Tensor::cat(vec![keys_sorted, kb], 3); // [batch, heads, N_B, per + b, d_k]
        let values = Tensor::cat(vec![values_sorted, vb], 3);
        let m = per + b;

        // Logits with the sorted keys' log mass; masks: zero mass, own-block padding, causality.
        let bias = Tensor::cat(
            vec![
                mass_sorted.clone().clamp_min(1e-30).log(),
                Tensor::zeros([bs, h, nb, b], &device),
            ],
            3,
        ); // [batch, heads, N_B, per + b]
        let sorted_empty = mass_sorted.lower_equal_elem(0.0);
        let own_padded = real_b.equal_elem(0.0).expand([bs, h, nb, b]);
        let key_masked = Tensor::cat(vec![sorted_empty, own_padded], 3)
            .reshape([bs, h, nb, 1, m])
            .expand([bs, h, nb, b, m]);
        let mut masked = key_masked;
        if causal {
            // Own block: key offset > query offset is the future; sorted keys are all earlier.
            let f: Vec<bool> = (0..b)
                .flat_map(|r| (0..m).map(move |c| c >= per && c - per > r))
                .collect();
            let future = Tensor::<2, Bool>::from_data(TensorData::new(f, [b, m]), &device)
                .reshape([1, 1, 1, b, m])
                .expand([bs, h, nb, b, m]);
            masked = masked.bool_or(future);
        }
        let scores = qb
            .matmul(keys.swap_dims(3, 4))
            .add(bias.reshape([bs, h, nb, 1, m]).expand([bs, h, nb, b, m])); // [batch, heads, N_B, b, per + b]
        let out = masked_softmax_matmul(
            scores.reshape([bs * h, nb, b, m]),
            Some(masked.reshape([bs * h, nb, b, m])),
            values.reshape([bs * h, nb, m, dv]),
        );
        out.reshape([bs, h, total, dv]).narrow(2, 0, n)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes by recomputing the layer over the prefix (module docs).
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        self.mode
            .is_causal()
            .then(|| DecodeCache::Prefix(Box::new(PrefixCache::new(batch, dims, max_len, device))))
    }

    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        prefix_step(cache, |x| self.attend(x), input)
    }

    /// The Gumbel noise of later forwards is drawn for `step`.
    fn at_step(mut self, step: usize) -> Self {
        self.step = step;
        self
    }
}

#[cfg(all(test, feature = "testing"))]
impl SinkhornAttention {
    /// This instance with the sorting matrix fixed to the identity (each block draws itself):
    /// local block attention, an exact regime of the bidirectional mode.
    pub(crate) fn with_identity_sort(mut self) -> Self {
        self.identity_sort = true;
        self
    }
}

#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};

    fn sinkhorn_with(sortcut: Option<usize>) -> Spec<Attention> {
        let config = move |_: &Case| {
            SinkhornAttentionConfig {
                block: 4,
                sortcut,
                ..Default::default()
            }
            .into()
        };
        let mut spec = exact_config(
            from_config(config).causal_memory(false),
            "one block = full attention",
            Oracle::Full,
            1e-5,
            move |_| {
                SinkhornAttentionConfig {
                    block: 64,
                    sortcut: sortcut.map(|_| 1),
                    ..Default::default()
                }
                .into()
            },
        );
        if sortcut.is_some() {
            spec.modes.retain(|m| *m != AttentionMode::Causal);
        }
        spec.name = format!("sinkhorn (sortcut {sortcut:?})");
        spec
    }

    /// Blocks of 4 sorted by Sinkhorn, with and without SortCut (2 blocks); one block covering
    /// the input is full (causal: causal full) attention.
    impl Contract for SinkhornAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            vec![sinkhorn_with(None), sinkhorn_with(Some(2))]
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::mask::DenseMask;
    use crate::reference::oracle;
    use crate::rng::SeededRng;

    fn core(mode: AttentionMode, temperature: f64, iterations: usize) -> SinkhornAttention {
        SinkhornAttentionConfig {
            block: 4,
            temperature,
            iterations,
            ..Default::default()
        }
        .init(mode, HeadDims::new(1, 8), &Device::flex())
        .unwrap()
    }

    fn scores(n: usize, scale: f64) -> Tensor<4> {
        SeededRng::new(3).normal_tensor([1, 1, n, n], scale, &Device::flex())
    }

    fn sums(s: Tensor<4>, dim: usize) -> Vec<f32> {
        s.sum_dim(dim).into_data().try_to_vec::<f32>().unwrap()
    }

    /// Columns sum to 1 after the last (column) step; the row error shrinks with iterations
    /// (notes: 0.19 after 1, 1.5e-3 after 5, 5e-6 after 10, 8.5e-11 after 20 on 8 × 8, τ = 0.75).
    #[test]
    fn sinkhorn_is_doubly_stochastic_in_the_limit() {
        let mut errors = Vec::new();
        for iterations in [1, 5, 10, 20] {
            let s = core(AttentionMode::Bidirectional, 0.75, iterations).sinkhorn(scores(8, 1.0), None);
            for c in sums(s.clone(), 2) {
                assert!((c - 1.0).abs() < 1e-5, "column sum {c}");
            }
            let row_error = sums(s, 3)
                .iter()
                .map(|r| (r - 1.0).abs())
                .fold(0.0f32, f32::max);
            errors.push(row_error);
        }
        assert!(errors.windows(2).all(|w| w[1] < w[0]), "{errors:?}");
        assert!(errors[3] < 1e-4, "{errors:?}");
    }

    /// Scores with a planted permutation (a margin of 5 over unit noise) give, at τ = 0.75,
    /// a near-permutation: each row puts at least 0.9 on its planted column.
    #[test]
    fn a_planted_permutation_is_recovered() {
        let perm = [3usize, 0, 6, 1, 7, 2, 5, 4];
        let noise: Vec<f32> = scores(8, 1.0).into_data().try_to_vec::<f32>().unwrap();
        let r: Vec<f32> = (0..64)
            .map(|x| noise[x] + if perm[x / 8] == x % 8 { 5.0 } else { 0.0 })
            .collect();
        let r = Tensor::<4>::from_data(TensorData::new(r, [1, 1, 8, 8]), &Device::flex());
        let s: Vec<f32> = core(AttentionMode::Bidirectional, 0.75, 20)
            .sinkhorn(r, None)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (row, &col) in perm.iter().enumerate() {
            assert!(s[row * 8 + col] > 0.9, "row {row}: {:?}", &s[row * 8..row * 8 + 8]);
        }
    }

    /// Cross mode's rectangular matrix (3 query blocks × 6 context blocks): rows sum to 1
    /// exactly, columns to 3/6 in the limit.
    #[test]
    fn rectangular_sinkhorn_balances_to_the_shape() {
        let r = SeededRng::new(4).normal_tensor([1, 1, 3, 6], 1.0, &Device::flex());
        let s = core(AttentionMode::Cross, 0.75, 30).sinkhorn(r, None);
        for row in sums(s.clone(), 3) {
            assert!((row - 1.0).abs() < 1e-5, "row sum {row}");
        }
        for col in sums(s, 2) {
            assert!((col - 0.5).abs() < 1e-3, "column sum {col}");
        }
    }

    /// Causal rows are softmaxes over the earlier blocks only.
    #[test]
    fn causal_rows_draw_only_earlier_blocks() {
        let n = 6;
        let device = Device::flex();
        let f: Vec<bool> = (0..n).flat_map(|i| (0..n).map(move |j| j >= i)).collect();
        let forbidden = Tensor::<2, Bool>::from_data(TensorData::new(f.clone(), [n, n]), &device)
            .reshape([1, 1, n, n]);
        let s = core(AttentionMode::Causal, 0.75, 5).sinkhorn(scores(n, 1.0), Some(forbidden));
        let v: Vec<f32> = s.clone().into_data().try_to_vec::<f32>().unwrap();
        for (x, forbidden) in v.iter().zip(&f) {
            if *forbidden {
                assert_eq!(*x, 0.0);
            }
        }
        let rows = sums(s, 3);
        assert_eq!(rows[0], 0.0, "block 0 has no earlier block");
        assert!(rows[1..].iter().all(|r| (r - 1.0).abs() < 1e-5), "{rows:?}");
    }

    /// With S = I every block draws itself: local block attention (keys duplicated), equal to
    /// the dense oracle with a same-block mask, with padding.
    #[test]
    fn identity_sort_is_local_block_attention() {
        let device = Device::flex();
        let n = 10;
        let core = core(AttentionMode::Bidirectional, 0.75, 5).with_identity_sort();
        let mut rng = SeededRng::new(9);
        let input = AttnInput::new(
            rng.normal_tensor([2, 2, n, 8], 1.0, &device),
            rng.normal_tensor([2, 2, n, 8], 1.0, &device),
            rng.normal_tensor([2, 2, n, 8], 1.0, &device),
        )
        .mask_pad_keys(crate::mask::padding_mask(&[10, 7], n, &device));
        let want = oracle(
            &input,
            AttentionMode::Bidirectional,
            Some(&DenseMask::from_allowed(n, n, |i, j| i / 4 == j / 4)),
            None,
        );
        let got = core.attend(input);
        let keep = |t: Tensor<4>| t.narrow(0, 0, 1).into_data();
        keep(got.clone()).assert_approx_eq::<f32>(&keep(want.clone()), burn::tensor::Tolerance::rel_abs(1e-5, 1e-5));
        // Second row: its 7 real positions.
        let real = |t: Tensor<4>| t.narrow(0, 1, 1).narrow(2, 0, 7).into_data();
        real(got).assert_approx_eq::<f32>(&real(want), burn::tensor::Tolerance::rel_abs(1e-5, 1e-5));
    }
}
