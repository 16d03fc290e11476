//! Routing attention: queries and keys routed to k-means clusters; each cluster's members attend
//! to each other.
//!
//! - Paper: Roy, Saffar, Vaswani and Grangier 2021, "Efficient Content-Based Sparse Attention
//!   with Routing Transformers", arXiv:2003.05997 (TACL); references
//!   google-research/google-research `routing_transformer` (defaults: decay 0.999, commitment
//!   β = 1e-4, local + routing heads) and lucidrains/routing-transformer (`KmeansAttention`,
//!   `Kmeans`: balanced top-w windows, scatter-back by mean, EMA after the optimiser step).
//! - Routing heads (the last `heads − local_heads`): q̂ = q/‖q‖ and k̂ = k/‖k‖ are compared with
//!   C unit centroids μ (per head, non-trainable parameters saved in checkpoints). Each cluster
//!   takes its top-w queries and its top-w keys by similarity (balanced clusters, w = ⌈N/C⌉
//!   unless set), its w queries attend to its w keys (softmax(q kᵀ/√d), padding and, causally,
//!   later positions masked), and each query's output is the mean over the clusters that picked
//!   it and in which it sees a key (0 for a query no cluster picked, or whose every key is
//!   masked).
//! - Local heads (the first `local_heads`): attention within blocks of `local_window` and the
//!   block before (causal) or both neighbours (bidirectional), on the block-sparse kernel.
//! - Centroid updates, after each optimiser step through [`AttentionCore::at_step`], never inside
//!   a forward: μ ← normalize(λ·μ + (1 − λ)·normalize(mean of the q̂, k̂ assigned to it)) with
//!   λ = `decay`, from the statistics the training forwards since the last step collected.
//!   The first update runs 10 rounds of spherical k-means on the first batch's q̂, k̂ instead
//!   (lucidrains initialises on the first batch); before it the centroids are seeded random unit
//!   vectors.
//! - Commitment loss β·mean(‖x̂ − μ_a(x̂)‖²) over the real q̂ and k̂ of training forwards, offered
//!   to the training loss through [`AttentionCore::aux_loss`].
//! - Attention inside the clusters runs on the block-sparse kernel
//!   (`block_sparse_attention_with_lse`): the selected queries and keys laid out cluster by
//!   cluster, the plan "query block i sees key block i", `ElementRule::Positions` masking by
//!   the original positions; a row's log-sum-exp tells whether it saw any key.
//! - Cost: O(N·C·d) routing + O(C·w²·d) = O(N·w·d) attention with w = N/C: O(N^1.5·d) with
//!   C = √N (the paper's choice); O(N·C + C·w·d) memory on Flex and cubecl (O(N·C + C·w²)
//!   for the composed form elsewhere). Never an N × N matrix.
//! - Exact: C = 1 (w = N) is full attention (causal: causal full), tested; otherwise each query
//!   sees the keys of its clusters only.
//! - Modes: bidirectional, causal (positions masked inside clusters). Cross is a configuration
//!   error (clusters hold positions of one sequence; the official cross variant is not built).
//!   Causal: no value of the future reaches an output, but which queries and keys a cluster
//!   takes is a top-w over the whole sequence, so future queries/keys can change earlier
//!   outputs: the leak check perturbs values only.
//! - Decoding: none, for the same reason (a cluster's top-w depends on the whole sequence).
//! - Length: over 600 lines because the file holds, as every variant file does, the contract
//!   spec and the invariant tests (k-means, EMA, commitment, gradients) beside the core.
//! - Deviations: attention uses the raw q, k (scaled by 1/√d); routing uses the normalised
//!   ones. No learned null key (lucidrains' `num_mem_kv`); no shared QK.

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::error::ConfigError;
use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, CoreConfig, Exactness, HeadDims, VariantInfo,
};
use crate::kernels::block_sparse::{
    BlockPlan, BlockSparse, ElementRule, PositionRule, block_sparse_attention,
    block_sparse_attention_with_lse,
};
use crate::kernels::rows::{global_rows, select_rows, unit_rows};
use crate::rng::SeededRng;

/// Configuration of [`RoutingAttention`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct RoutingAttentionConfig {
    /// Clusters C per head (official PG-19 config 16).
    pub clusters: usize,
    /// Queries (and keys) per cluster; `None`: ⌈N/C⌉, every position in one cluster on average.
    pub window: Option<usize>,
    /// Heads doing local attention instead (official PG-19: 6 of 8; lucidrains 0).
    pub local_heads: usize,
    /// Block of the local heads (official 256 with a 256 flange).
    pub local_window: usize,
    /// EMA decay λ of the centroids (0.999).
    pub decay: f64,
    /// Commitment loss weight β (1e-4).
    pub commitment: f64,
    /// Seed of the initial centroids and of the k-means initialisation.
    pub seed: u64,
}

impl Default for RoutingAttentionConfig {
    fn default() -> Self {
        Self {
            clusters: 16,
            window: None,
            local_heads: 0,
            local_window: 256,
            decay: 0.999,
            commitment: 1e-4,
            seed: 0,
        }
    }
}

const WHY_NOT_DECODING: &str = "a cluster's top-w queries and keys are chosen over the whole sequence, so a prefix's outputs differ from the whole sequence's";

impl RoutingAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo::new(
        "routing",
        "Roy et al. 2021, Efficient Content-Based Sparse Attention with Routing Transformers, arXiv:2003.05997",
        &[AttentionMode::Bidirectional, AttentionMode::Causal],
        "O(N·C·d + N·w·d), w = N/C: O(N^1.5·d) with C = √N",
        "O(N·C + N·d) on Flex and cubecl (block-sparse kernel); O(N·C + C·w²) composed elsewhere",
        Exactness::ExactWhen("with one cluster (full attention); otherwise the keys of each query's clusters"),
    )
    .without_decoding(WHY_NOT_DECODING);
}

impl CoreConfig for RoutingAttentionConfig {
    /// Each layer draws its own random state: the seed mixed with the layer.
    fn for_layer(&self, layer: usize) -> Self {
        Self {
            seed: crate::interface::layer_seed(self.seed, layer),
            ..self.clone()
        }
    }

    type Core = RoutingAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<RoutingAttention, ConfigError> {
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "clusters hold positions of one sequence",
        )?;
        ConfigError::check_nonzero("clusters", self.clusters)?;
        ConfigError::check_nonzero("local_window", self.local_window)?;
        if let Some(w) = self.window {
            ConfigError::check_nonzero("window", w)?;
        }
        if self.local_heads > dims.heads {
            return Err(ConfigError::InvalidField {
                field: "local_heads",
                expected: format!("at most the {} heads", dims.heads),
                got: self.local_heads.to_string(),
            });
        }
        if !(0.0..1.0).contains(&self.decay) {
            return Err(ConfigError::InvalidField {
                field: "decay",
                expected: "a number in [0, 1)".into(),
                got: self.decay.to_string(),
            });
        }
        let routed = dims.heads - self.local_heads;
        let centroids = random_unit(routed.max(1) * self.clusters, dims.d_k, self.seed);
        Ok(RoutingAttention {
            centroids: Param::from_data(
                TensorData::new(centroids, [routed.max(1), self.clusters, dims.d_k]),
                device,
            )
            .set_require_grad(false),
            initialised: Param::from_data(TensorData::new(vec![0.0f32], [1]), device)
                .set_require_grad(false),
            mode,
            window: self.window,
            local_heads: self.local_heads,
            local_window: self.local_window,
            decay: self.decay,
            commitment: self.commitment,
            seed: self.seed,
            state: RoutingState::default(),
        })
    }
}

/// `rows` seeded random unit vectors of width `d`, row-major.
fn random_unit(rows: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed ^ 0x6d2b_79f5);
    let mut out = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.extend(v.iter().map(|x| (x / norm) as f32));
    }
    out
}

/// What training forwards leave for the next centroid update and for the loss.
#[derive(Clone, Debug, Default)]
struct RoutingState(Arc<Mutex<RoutingStats>>);

#[derive(Debug, Default)]
struct RoutingStats {
    /// Σ x̂ per (head, cluster), `[heads·C·d]`, and counts `[heads·C]`.
    sums: Vec<f64>,
    counts: Vec<f64>,
    /// Before the first update: the first batch's q̂, k̂ per head, `[heads][n·d]`.
    first_batch: Option<Vec<Vec<f32>>>,
    /// The commitment loss of the last training forward on each device, not yet taken.
    losses: Vec<(Device, Tensor<1>)>,
}

/// Routing attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct RoutingAttention {
    /// Centroids `[routing heads, C, d_k]`, unit rows (not trained by gradients).
    pub centroids: Param<Tensor<3>>,
    /// 1 once the centroids were initialised by k-means (saved with them).
    pub initialised: Param<Tensor<1>>,
    #[module(skip)]
    mode: AttentionMode,
    #[module(skip)]
    window: Option<usize>,
    local_heads: usize,
    local_window: usize,
    decay: f64,
    commitment: f64,
    seed: u64,
    #[module(skip)]
    state: RoutingState,
}


impl RoutingAttention {
    /// Clusters per head.
    pub fn clusters(&self) -> usize {
        self.centroids.dims()[1]
    }

    /// Local attention of the first heads, on the block-sparse kernel.
    fn local(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, pad: Option<&Tensor<2, Bool>>) -> Tensor<4> {
        let [_, _, n, dk] = q.dims();
        let b = self.local_window.min(n.max(1));
        let nb = n.div_ceil(b);
        let causal = self.mode.is_causal();
        let plan = BlockPlan::look_around(b, nb, nb, 1, if causal { 0 } else { 1 });
        block_sparse_attention(BlockSparse {
            query: q.mul_scalar(1.0 / (dk as f64).sqrt()),
            key: k,
            value: v,
            mask_pad_k: pad,
            plan: &plan,
            rule: if causal {
                ElementRule::Causal { offset: 0 }
            } else {
                ElementRule::All
            },
            extra: None,
        })
    }

    /// Routed attention of the last heads.
    fn routed(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, pad: Option<&Tensor<2, Bool>>) -> Tensor<4> {
        let [bs, h, n, dk] = q.dims();
        let dv = v.dims()[3];
        let device = q.device();
        let c = self.clusters();
        let w = self.window.unwrap_or_else(|| n.div_ceil(c)).min(n);
        let mu = self.centroids.val().reshape([1, h, c, dk]);
        let (qn, kn) = (unit_rows(q.clone()), unit_rows(k.clone()));
        let sim_q = qn.clone().matmul(mu.clone().swap_dims(2, 3)); // [batch, heads, n, C]
        let sim_k = kn.clone().matmul(mu.swap_dims(2, 3));
        let pad4 = pad.map(|p| p.clone().reshape([bs, 1, n, 1]).expand([bs, h, n, c]));
        let training = device.is_autodiff();
        if training {
            self.record(&qn, &kn, &sim_q, &sim_k, pad4.as_ref());
        }
        // Balanced clusters: each takes its top-w queries and keys (padding last).
        let top = |sim: Tensor<4>| {
            let sim = match &pad4 {
                Some(p) => sim.mask_fill(p.clone(), -1e4),
                None => sim,
            };
            sim.swap_dims(2, 3).topk_with_indices(w, 3).1 // [batch, heads, C, w]
        };
        let (iq, ik) = (top(sim_q), top(sim_k));
        // Whole rows of the flattened [batch·heads·n, d] tensors (kernels::rows).
        let (rows_q, rows_k) = (
            global_rows(iq.clone().reshape([bs * h, c * w]), n),
            global_rows(ik.clone().reshape([bs * h, c * w]), n),
        );
        let gather = |x: Tensor<4>, rows: &Tensor<1, Int>| select_rows(x, rows.clone()); // [batch, heads, C·w, d]
        // Each cluster's w queries attend to its w keys: the block-sparse kernel over the plan
        // "query block i sees key block i", the original positions deciding causality and
        // padding (position −1).
        let key_pos = ik.clone().reshape([bs, h, c * w]);
        let key_pos = match pad {
            Some(p) => {
                let padded = p
                    .clone()
                    .int()
                    .reshape([bs, 1, n])
                    .expand([bs, h, n])
                    .gather(2, key_pos.clone())
                    .bool();
                key_pos.mask_fill(padded, -1)
            }
            None => key_pos,
        };
        let plan = BlockPlan::new(w, c, vec![(0..c).map(|i| vec![i]).collect()]);
        let (o, lse) = block_sparse_attention_with_lse(BlockSparse {
            query: gather(q, &rows_q).mul_scalar(1.0 / (dk as f64).sqrt()),
            key: gather(k, &rows_k),
            value: gather(v, &rows_k),
            mask_pad_k: None,
            plan: &plan,
            rule: ElementRule::Positions(Box::new(PositionRule {
                query: iq.reshape([bs, h, c * w]),
                key: key_pos,
                causal: self.mode.is_causal(),
                self_score: None,
            })),
            extra: None,
        }); // [batch, heads, C·w, d_v], [batch, heads, C·w]
        // A cluster in which a query sees no key (all later or padded) is left out of its mean.
        let sees: Tensor<2> = lse.lower_elem(1e30).float().reshape([bs * h * c * w, 1]);
        // Scatter back: the mean over the clusters that picked a query and in which it sees a
        // key, one indexed add over the flattened [batch·heads·n] rows (a position picked by
        // several clusters adds once per cluster).
        let rows = bs * h * c * w;
        let global = rows_q;
        let add = burn::tensor::IndexingUpdateOp::Add;
        let out = Tensor::<2>::zeros([bs * h * n, dv], &device).select_assign(
            0,
            global.clone(),
            o.reshape([rows, dv]),
            add,
        );
        let count = Tensor::<2>::zeros([bs * h * n, 1], &device).select_assign(
            0,
            global,
            sees,
            add,
        );
        out.div(count.clamp_min(1.0)).reshape([bs, h, n, dv])
    }

    /// Collects a training forward's centroid statistics and commitment loss.
    fn record(
        &self,
        qn: &Tensor<4>,
        kn: &Tensor<4>,
        sim_q: &Tensor<4>,
        sim_k: &Tensor<4>,
        pad: Option<&Tensor<4, Bool>>,
    ) {
        let [bs, h, n, c] = sim_q.dims();
        let d = qn.dims()[3];
        let real = match pad {
            Some(p) => p.clone().bool_not().float().narrow(3, 0, 1), // [batch, heads, n, 1]
            None => Tensor::ones([bs, h, n, 1], &sim_q.device()),
        };
        let count_real = real.clone().sum().into_scalar::<f64>().max(1.0);
        // Commitment: ‖x̂ − μ_a‖² = 2 − 2·max_c x̂·μ_c for unit vectors.
        let gap = |sim: &Tensor<4>| {
            sim.clone()
                .max_dim(3)
                .mul_scalar(-2.0)
                .add_scalar(2.0)
                .mul(real.clone())
                .sum()
        };
        let loss = gap(sim_q)
            .add(gap(sim_k))
            .mul_scalar(self.commitment / (2.0 * count_real))
            .reshape([1]);
        // EMA statistics (detached): assignments by the nearest centroid.
        let mut sums = vec![0.0f64; h * c * d];
        let mut counts = vec![0.0f64; h * c];
        for (x, sim) in [(qn, sim_q), (kn, sim_k)] {
            let sim = sim.clone().detach();
            let nearest = sim
                .clone()
                .equal(sim.max_dim(3).expand([bs, h, n, c]))
                .float()
                .mul(real.clone().expand([bs, h, n, c])); // [batch, heads, n, C]
            let s = nearest
                .clone()
                .swap_dims(2, 3)
                .matmul(x.clone().detach())
                .sum_dim(0)
                .reshape([h * c * d]); // Σ x̂ per cluster
            let k = nearest.sum_dim(2).sum_dim(0).reshape([h * c]);
            let s: Vec<f32> = s.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            let k: Vec<f32> = k.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            for (a, b) in sums.iter_mut().zip(s) {
                *a += b as f64;
            }
            for (a, b) in counts.iter_mut().zip(k) {
                *a += b as f64;
            }
        }
        let first = (self.initialised.val().into_scalar::<f32>() == 0.0).then(|| {
            // The real positions' q̂ and k̂ of every head (padding left out).
            let both = Tensor::cat(vec![qn.clone().detach(), kn.clone().detach()], 2); // [batch, heads, 2n, d]
            let per_head: Vec<f32> = both
                .swap_dims(0, 1)
                .reshape([h * bs * 2 * n * d])
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default();
            let keep: Vec<f32> = Tensor::cat(vec![real.clone(), real.clone()], 2) // [batch, heads, 2n, 1]
                .swap_dims(0, 1)
                .reshape([h * bs * 2 * n])
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default();
            per_head
                .chunks(bs * 2 * n * d)
                .zip(keep.chunks(bs * 2 * n))
                .map(|(rows, keep)| {
                    rows.chunks(d)
                        .zip(keep)
                        .filter(|(_, k)| **k > 0.5)
                        .flat_map(|(row, _)| row.iter().copied())
                        .collect::<Vec<f32>>()
                })
                .collect::<Vec<_>>()
        });
        let mut stats = self.state.0.lock().expect("routing statistics");
        if stats.sums.len() != sums.len() {
            stats.sums = vec![0.0; sums.len()];
            stats.counts = vec![0.0; counts.len()];
        }
        for (a, b) in stats.sums.iter_mut().zip(sums) {
            *a += b;
        }
        for (a, b) in stats.counts.iter_mut().zip(counts) {
            *a += b;
        }
        if stats.first_batch.is_none() {
            stats.first_batch = first;
        }
        let device = loss.device();
        stats.losses.retain(|(d, _)| *d != device);
        stats.losses.push((device, loss));
    }

    /// The centroids after the update of an optimiser step (see the module docs).
    fn updated(mut self) -> Self {
        let (sums, counts, first) = {
            let mut stats = self.state.0.lock().expect("routing statistics");
            let out = (
                std::mem::take(&mut stats.sums),
                std::mem::take(&mut stats.counts),
                stats.first_batch.take(),
            );
            stats.losses.clear();
            out
        };
        if counts.is_empty() {
            return self;
        }
        let [h, c, d] = self.centroids.dims();
        let device = self.centroids.device();
        let mu: Vec<f32> = self
            .centroids
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let unit = |v: &mut [f64]| {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-12 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        };
        let mut new = vec![0.0f32; h * c * d];
        let initialise = self.initialised.val().into_scalar::<f32>() == 0.0;
        if let (true, Some(first)) = (initialise, first) {
            for (head, vectors) in first.iter().enumerate() {
                let centroids = spherical_kmeans(vectors, d, c, 10, self.seed ^ head as u64);
                new[head * c * d..(head + 1) * c * d].copy_from_slice(&centroids);
            }
            self.initialised = Param::from_data(TensorData::new(vec![1.0f32], [1]), &device)
                .set_require_grad(false);
        } else {
            for i in 0..h * c {
                let old = &mu[i * d..(i + 1) * d];
                let mut v: Vec<f64> = old.iter().map(|&x| x as f64).collect();
                if counts[i] > 0.0 {
                    let mut mean: Vec<f64> = sums[i * d..(i + 1) * d].iter().map(|s| s / counts[i]).collect();
                    unit(&mut mean);
                    for (a, m) in v.iter_mut().zip(mean) {
                        *a = self.decay * *a + (1.0 - self.decay) * m;
                    }
                    unit(&mut v);
                }
                for (o, x) in new[i * d..(i + 1) * d].iter_mut().zip(v) {
                    *o = x as f32;
                }
            }
        }
        self.centroids = Param::from_data(TensorData::new(new, [h, c, d]), &device).set_require_grad(false);
        self
    }
}

/// Spherical k-means: `k` unit centroids of the rows of `vectors` (width `d`), `iterations`
/// rounds from a seeded sample of the rows.
fn spherical_kmeans(vectors: &[f32], d: usize, k: usize, iterations: usize, seed: u64) -> Vec<f32> {
    let rows = vectors.len() / d;
    let mut rng = SeededRng::new(seed);
    let mut centroids: Vec<f32> = (0..k)
        .flat_map(|_| {
            let r = rng.below(rows.max(1));
            vectors[r * d..(r + 1) * d].to_vec()
        })
        .collect();
    for _ in 0..iterations {
        let mut sums = vec![0.0f64; k * d];
        for row in vectors.chunks(d) {
            let best = (0..k)
                .max_by(|&a, &b| {
                    let dot = |c: usize| -> f32 { row.iter().zip(&centroids[c * d..(c + 1) * d]).map(|(x, y)| x * y).sum() };
                    dot(a).total_cmp(&dot(b))
                })
                .unwrap_or(0);
            for (s, x) in sums[best * d..(best + 1) * d].iter_mut().zip(row) {
                *s += *x as f64;
            }
        }
        for cl in 0..k {
            let s = &sums[cl * d..(cl + 1) * d];
            let norm = s.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-12 {
                for (c, x) in centroids[cl * d..(cl + 1) * d].iter_mut().zip(s) {
                    *c = (x / norm) as f32;
                }
            }
        }
    }
    centroids
}

impl AttentionCore for RoutingAttention {
    /// # Shapes
    /// - input: see [`AttnInput`] (`seq_q = seq_k`)
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [_, h, n, lk, _, _] = input.dims();
        assert_eq!(n, lk, "routing attention is self-attention (seq_q = seq_k)");
        let pad = input.mask_pad_k.as_ref();
        let split = self.local_heads.min(h);
        let part = |t: &Tensor<4>, start: usize, len: usize| t.clone().narrow(1, start, len);
        let mut outs = Vec::new();
        if split > 0 {
            outs.push(self.local(
                part(&input.query, 0, split),
                part(&input.key, 0, split),
                part(&input.value, 0, split),
                pad,
            ));
        }
        if split < h {
            outs.push(self.routed(
                part(&input.query, split, h - split),
                part(&input.key, split, h - split),
                part(&input.value, split, h - split),
                pad,
            ));
        }
        Tensor::cat(outs, 1)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Updates the centroids from the statistics of the training forwards since the last step.
    fn at_step(self, step: usize) -> Self {
        let _ = step;
        self.updated()
    }

    /// The commitment loss of the last training forward on `device`, if not taken yet (the
    /// tasks take it after every forward).
    fn aux_loss(&self, device: &Device) -> Option<Tensor<1>> {
        let mut stats = self.state.0.lock().ok()?;
        let at = stats.losses.iter().position(|(d, _)| d == device)?;
        Some(stats.losses.swap_remove(at).1)
    }
}

#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, GradCheck, LeakCheck, Oracle, Spec};

    /// Three clusters on one head and local attention (blocks of 4) on the other; one cluster
    /// holding every position is full attention.
    impl Contract for RoutingAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let spec = exact_config(
                from_config(|_: &Case| {
                    RoutingAttentionConfig {
                        clusters: 3,
                        local_heads: 1,
                        local_window: 4,
                        ..Default::default()
                    }
                    .into()
                })
                .causal_memory(false)
                .leak(LeakCheck::ValuesOnly(
                    "a cluster's top-w is chosen over the whole sequence, so future queries/keys change which positions share a cluster",
                ))
                .grad(GradCheck::Skip(
                    "top-w membership is piecewise constant: a finite difference can move a position to another cluster; the one-cluster gradients are tested against dense attention",
                )),
                "one cluster = full attention",
                Oracle::Full,
                1e-5,
                |_| {
                    RoutingAttentionConfig {
                        clusters: 1,
                        ..Default::default()
                    }
                    .into()
                },
            );
            // Three clusters each taking every position: every query is picked three times
            // and the mean of three full attentions is full attention.
            let spec = exact_config(
                spec,
                "every cluster holds every position = full attention",
                Oracle::Full,
                1e-5,
                |_| {
                    RoutingAttentionConfig {
                        clusters: 3,
                        window: Some(64),
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
    use crate::reference::oracle;

    fn core(clusters: usize, device: &Device) -> RoutingAttention {
        RoutingAttentionConfig {
            clusters,
            ..Default::default()
        }
        .init(AttentionMode::Causal, HeadDims::new(2, 8), device)
        .unwrap()
    }

    fn input(n: usize, seed: u64, device: &Device) -> AttnInput {
        let mut rng = SeededRng::new(seed);
        AttnInput::new(
            rng.normal_tensor([2, 2, n, 8], 1.0, device),
            rng.normal_tensor([2, 2, n, 8], 1.0, device),
            rng.normal_tensor([2, 2, n, 8], 1.0, device),
        )
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        a.sub(b).abs().max().into_scalar::<f32>()
    }

    /// With one cluster the gradients with respect to q, k and v equal dense causal attention's.
    #[test]
    fn one_cluster_gradients_equal_dense_attention() {
        let device = Device::flex().autodiff();
        let x = input(9, 1, &device);
        let grads = |f: &dyn Fn(AttnInput) -> Tensor<4>| {
            let q = x.query.clone().detach().require_grad();
            let k = x.key.clone().detach().require_grad();
            let v = x.value.clone().detach().require_grad();
            let w = SeededRng::new(2).normal_tensor([2, 2, 9, 8], 1.0, &device);
            let g = f(AttnInput::new(q.clone(), k.clone(), v.clone()))
                .mul(w)
                .sum()
                .backward();
            [q.grad(&g).unwrap(), k.grad(&g).unwrap(), v.grad(&g).unwrap()]
        };
        let routing = core(1, &device);
        let ours = grads(&|i| routing.attend(i));
        let _ = routing.aux_loss(&device);
        let dense = grads(&|i| oracle(&i, AttentionMode::Causal, None, None));
        for (a, b) in ours.into_iter().zip(dense) {
            assert!(max_diff(a, b) < 1e-4);
        }
    }

    /// The commitment loss is 0 when every query and key is its centroid (any scale), and
    /// positive otherwise; it is offered once per forward.
    #[test]
    fn commitment_is_zero_at_the_centroids() {
        let device = Device::flex().autodiff();
        let c = core(4, &device);
        let mu = c.centroids.val(); // [2, 4, 8]
        let at = |scale: f64| {
            mu.clone()
                .mul_scalar(scale)
                .reshape([1, 2, 4, 8])
                .repeat_dim(0, 2)
        };
        let _ = c.attend(AttnInput::new(at(3.0), at(0.5), at(1.0)));
        let zero = c.aux_loss(&device).expect("a training forward offers its loss");
        assert!(zero.into_scalar::<f32>().abs() < 1e-6);
        assert!(c.aux_loss(&device).is_none(), "taken once");
        let _ = c.attend(input(8, 3, &device));
        let positive = c.aux_loss(&device).unwrap().into_scalar::<f32>();
        assert!(positive > 0.0);
    }

    /// The first optimiser step initialises the centroids by k-means on the first batch; later
    /// steps move them by the EMA; a step without training forwards changes nothing.
    #[test]
    fn steps_initialise_then_move_the_centroids() {
        let device = Device::flex().autodiff();
        let c = core(4, &device);
        let start = c.centroids.val();
        let unchanged = c.clone().at_step(1);
        assert_eq!(max_diff(unchanged.centroids.val(), start.clone()), 0.0);
        let _ = c.attend(input(32, 5, &device));
        let c = c.at_step(1);
        assert_eq!(c.initialised.val().into_scalar::<f32>(), 1.0);
        let after_kmeans = c.centroids.val();
        assert!(max_diff(after_kmeans.clone(), start) > 1e-2);
        let norms = after_kmeans.clone().powf_scalar(2.0).sum_dim(2).sqrt();
        assert!(max_diff(norms, Tensor::ones([2, 4, 1], &device)) < 1e-4, "unit centroids");
        let _ = c.attend(input(32, 6, &device));
        let c = c.at_step(2);
        let moved = max_diff(c.centroids.val(), after_kmeans);
        assert!(moved > 0.0 && moved < 0.05, "an EMA step at λ = 0.999 moves a little: {moved}");
    }

    /// Evaluation forwards (no autodiff) leave nothing for the loss or the centroids.
    #[test]
    fn evaluation_forwards_record_nothing() {
        let device = Device::flex();
        let c = core(4, &device);
        let _ = c.attend(input(16, 7, &device));
        assert!(c.aux_loss(&device).is_none());
        let start = c.centroids.val();
        assert_eq!(max_diff(c.at_step(1).centroids.val(), start), 0.0);
    }
}
