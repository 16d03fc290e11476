//! Mixture-of-experts feed-forward block: Switch Transformer (Fedus et al. 2021, top-1) and
//! GShard / ST-MoE (Lepikhin et al. 2020, Zoph et al. 2022, top-2).
//!
//! A router `W_r` (`d_model → E`, no bias) gives each token probabilities `p = softmax(x W_r)`
//! over `E` experts (position-wise feed-forward blocks). Switch sends the token to its most
//! probable expert with gate `p_e` (not renormalised); top-2 adds the second most probable
//! with the two gates renormalised to sum to 1, the second sent only if its gate reaches
//! `second_threshold` (in training with probability `g₂ / threshold`, the reference's "random"
//! policy; at evaluation when `g₂ ≥ threshold`, so evaluation is deterministic). Jitter
//! (training only) multiplies the router's input by `U(1 − ε, 1 + ε)`.
//!
//! **Capacity.** Each sequence is a group of `T` real (unpadded) tokens; an expert takes at most
//! `C = max(min_capacity, min(T, ⌊T · cf / E⌋))` of a group's assignments (`cf` =
//! `capacity_factor` in training, `eval_capacity_factor` at evaluation). Assignments beyond
//! `C` are dropped: that token gets no output from that expert (a token dropped everywhere
//! passes through the layer's residual alone) and is counted. Priority: bidirectional, every
//! first choice of the group before any second choice (GShard), in token order; causal, token
//! by token (its first choice, then its second), so no token's routing depends on a later
//! token of its sequence — and a group is one sequence, so it never depends on another one.
//!
//! **Dispatch** is by index: the kept assignments are sorted by expert on the host, each
//! expert reads its tokens with `select` and its weighted outputs are added back with
//! `select_assign` (no `[tokens, experts, capacity]` one-hot tensors). Cost: `k` feed-forward
//! passes per token (k = 1 or 2) plus the router's `T·d·E`; parameters × E.
//!
//! **Losses**, per layer (the caller sums or averages layers explicitly; mixing probabilities
//! of different layers is the known bug of several implementations): load balance
//! `α · E · Σ_e f_e P_e` (`f_e` the fraction of tokens whose first choice is `e`, `P_e` their
//! mean probability of `e`; 1 for uniform routing, `E` when every token goes to one expert
//! with probability 1) and the router z-loss `β · mean_t (logsumexp_e logits)²` (ST-MoE).

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::serde::{Deserialize, Serialize};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Distribution, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::block::FeedForward;
use crate::config::{FeedForwardKind, ModelConfigError};

/// How many experts a token goes to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum Routing {
    /// Top-1 (Switch Transformer).
    #[default]
    Switch,
    /// Top-2 with renormalised gates (GShard, ST-MoE).
    Top2,
}

/// Configuration of a [`MixtureOfExperts`], with the references' defaults (mesh-tensorflow
/// `moe.py`, ST-MoE).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct MixtureOfExpertsConfig {
    /// Top-1 or top-2 (in TOML, the `kind` of `[model.stack.ffn]`).
    #[serde(skip)]
    pub routing: Routing,
    /// Number of experts E.
    pub experts: usize,
    /// Capacity factor in training.
    pub capacity_factor: f64,
    /// Capacity factor at evaluation.
    pub eval_capacity_factor: f64,
    /// Smallest capacity per expert and group.
    pub min_capacity: usize,
    /// Router input jitter ε in training (0 = none).
    pub jitter: f64,
    /// Load-balancing loss coefficient α.
    pub balance_coef: f64,
    /// Router z-loss coefficient β.
    pub z_loss_coef: f64,
    /// Top-2: the second expert's gate threshold.
    pub second_threshold: f64,
}

impl Default for MixtureOfExpertsConfig {
    fn default() -> Self {
        Self {
            routing: Routing::Switch,
            experts: 8,
            capacity_factor: 1.25,
            eval_capacity_factor: 2.0,
            min_capacity: 4,
            jitter: 1e-2,
            balance_coef: 1e-2,
            z_loss_coef: 1e-3,
            second_threshold: 0.2,
        }
    }
}

impl MixtureOfExpertsConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// The key under `path` and what was expected.
    pub fn check(&self, path: &str) -> Result<(), ModelConfigError> {
        let err = |key: &str, msg: String| Err(ModelConfigError::new(format!("{path}.{key}"), msg));
        if self.experts == 0 {
            return err("experts", "expected at least 1 expert, got 0".into());
        }
        for (key, v) in [
            ("capacity_factor", self.capacity_factor),
            ("eval_capacity_factor", self.eval_capacity_factor),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return err(key, format!("expected a positive factor, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return err(
                "jitter",
                format!("expected 0 <= jitter < 1, got {}", self.jitter),
            );
        }
        for (key, v) in [
            ("balance_coef", self.balance_coef),
            ("z_loss_coef", self.z_loss_coef),
            ("second_threshold", self.second_threshold),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return err(key, format!("expected a finite value >= 0, got {v}"));
            }
        }
        Ok(())
    }

    /// `experts` feed-forward blocks `d_model → d_ff → d_model` and their router.
    pub fn init(
        &self,
        kind: FeedForwardKind,
        d_model: usize,
        d_ff: usize,
        dropout: f64,
        device: &Device,
    ) -> MixtureOfExperts {
        MixtureOfExperts {
            router: LinearConfig::new(d_model, self.experts)
                .with_bias(false)
                .init(device),
            experts: (0..self.experts)
                .map(|_| FeedForward::new(kind, d_model, d_ff, dropout, device))
                .collect(),
            settings: self.clone(),
            reports: Reports::default(),
        }
    }
}

/// The mixture-of-experts block (see the module docs).
#[derive(Module, Debug)]
pub struct MixtureOfExperts {
    /// Router `W_r`, `[d_model, E]`.
    pub router: Linear,
    /// The experts.
    pub experts: Vec<FeedForward>,
    #[module(skip)]
    settings: MixtureOfExpertsConfig,
    #[module(skip)]
    reports: Reports,
}

/// The reports of a block's training forwards not taken yet, per device (shared by clones,
/// like an attention core's loss terms: the training loop takes them after every forward).
#[derive(Clone, Debug, Default)]
struct Reports(Arc<Mutex<Vec<(Device, RoutingReport)>>>);

/// What one forward of a [`MixtureOfExperts`] gives besides its output.
#[derive(Clone, Debug)]
pub struct RoutingReport {
    /// `α · E · Σ_e f_e P_e`, `[1]`.
    pub balance_loss: Tensor<1>,
    /// `β · mean (logsumexp logits)²`, `[1]`.
    pub z_loss: Tensor<1>,
    /// Kept assignments per expert, summed over the groups.
    pub load: Vec<usize>,
    /// The capacity of each expert in the longest group (a group's capacity follows its real,
    /// unpadded length).
    pub capacity: usize,
    /// Assignments dropped for capacity.
    pub dropped: usize,
    /// Assignments made (kept or dropped; padded tokens make none).
    pub assigned: usize,
    /// The balance statistic `E · Σ_e f_e P_e` itself (1 for uniform routing, E when every
    /// token goes to one expert with probability 1; near 1 when balanced).
    pub balance: f32,
}

impl RoutingReport {
    /// The host numbers of this report for layer `layer` (reads the losses' values).
    pub fn summary(&self, layer: usize) -> RoutingSummary {
        let value = |t: &Tensor<1>| t.clone().detach().into_scalar::<f32>();
        RoutingSummary {
            layer,
            balance: self.balance,
            aux_loss: value(&self.balance_loss) + value(&self.z_loss),
            drop_fraction: if self.assigned == 0 {
                0.0
            } else {
                self.dropped as f32 / self.assigned as f32
            },
        }
    }
}

/// One mixture-of-experts layer's routing in a training forward, as numbers (the metrics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutingSummary {
    /// The layer, counted over the model (an encoder-decoder's decoder layers follow its
    /// encoder's).
    pub layer: usize,
    /// `E · Σ_e f_e P_e` (1 for uniform routing, E when every token goes to one expert).
    pub balance: f32,
    /// The weighted balance and z losses this layer added to the training loss.
    pub aux_loss: f32,
    /// The share of assignments dropped for capacity.
    pub drop_fraction: f32,
}

/// What a model's training forwards on a device leave besides their output, taken after each
/// forward: the loss terms to add to the training loss, and the routing of every
/// mixture-of-experts layer.
#[derive(Clone, Debug, Default)]
pub struct AuxTerms {
    /// The attention cores' terms and the experts' balance and z losses, summed.
    pub loss: Option<Tensor<1>>,
    /// One per mixture-of-experts layer and forward.
    pub routing: Vec<RoutingSummary>,
}

impl AuxTerms {
    /// Both sets of terms, `other`'s layers counted after `offset` layers.
    pub fn merge(mut self, other: AuxTerms, offset: usize) -> Self {
        self.loss = match (self.loss, other.loss) {
            (Some(a), Some(b)) => Some(a.add(b)),
            (a, b) => a.or(b),
        };
        self.routing
            .extend(other.routing.into_iter().map(|r| RoutingSummary {
                layer: r.layer + offset,
                ..r
            }));
        self
    }
}

/// One routed assignment: token `n` (flattened), choice `k`, expert `e`.
#[derive(Clone, Copy)]
struct Assignment {
    n: usize,
    k: usize,
    e: usize,
}

impl MixtureOfExperts {
    /// The settings.
    pub fn settings(&self) -> &MixtureOfExpertsConfig {
        &self.settings
    }

    /// [`forward`](Self::forward) keeping the report of a training forward (an autodiff
    /// device) for [`take_reports`](Self::take_reports); the layers call this.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`, mask_pad: `[batch, seq]` → `[batch, seq, d_model]`
    pub fn forward_recorded(
        &self,
        x: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
        causal: bool,
    ) -> Tensor<3> {
        let device = x.device();
        let train = device.is_autodiff();
        let (y, report) = self.forward(x, mask_pad, causal, train);
        if train && let Ok(mut reports) = self.reports.0.lock() {
            reports.push((device, report));
        }
        y
    }

    /// The reports of the training forwards on `device` since the last call; taken.
    pub fn take_reports(&self, device: &Device) -> Vec<RoutingReport> {
        let Ok(mut reports) = self.reports.0.lock() else {
            return Vec::new();
        };
        let (mine, rest): (Vec<_>, Vec<_>) = reports.drain(..).partition(|(d, _)| d == device);
        *reports = rest;
        mine.into_iter().map(|(_, r)| r).collect()
    }

    /// Routes every token (training: jitter, random second choices, `capacity_factor`; else
    /// deterministic with `eval_capacity_factor`), in causal priority or not, padded tokens
    /// (`mask_pad`, `true` = padded) excluded.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`, mask_pad: `[batch, seq]` → `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        mask_pad: Option<Tensor<2, Bool>>,
        causal: bool,
        train: bool,
    ) -> (Tensor<3>, RoutingReport) {
        let [b, t, d] = x.dims();
        let n = b * t;
        let e_count = self.settings.experts;
        let device = x.device();
        let xf = x.reshape([n, d]);
        let router_in = if train && self.settings.jitter > 0.0 {
            let eps = self.settings.jitter;
            xf.clone().mul(Tensor::random(
                [n, d],
                Distribution::Uniform(1.0 - eps, 1.0 + eps),
                &device,
            ))
        } else {
            xf.clone()
        };
        let logits = self.router.forward(router_in);
        let p = softmax(logits.clone(), 1);
        let host_p = p
            .clone()
            .detach()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("router probabilities");
        let keep: Vec<bool> = match &mask_pad {
            Some(m) => m
                .clone()
                .into_data()
                .try_to_vec::<bool>()
                .expect("padding mask")
                .into_iter()
                .map(|padded| !padded)
                .collect(),
            None => vec![true; n],
        };
        let uniform: Vec<f32> = if train && self.settings.routing == Routing::Top2 {
            Tensor::<1>::random([n], Distribution::Uniform(0.0, 1.0), &device)
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("uniform draws")
        } else {
            Vec::new()
        };
        let cf = if train {
            self.settings.capacity_factor
        } else {
            self.settings.eval_capacity_factor
        };
        // A group's capacity follows its real (unpadded) length, so a sequence routes the same
        // whatever it is batched with.
        let capacity_of = |real: usize| {
            self.settings
                .min_capacity
                .max(real.min((real as f64 * cf / e_count as f64).floor() as usize))
                .max(1)
        };

        // First and second choices (ties to the lower index), and which second choices go.
        let mut choices: Vec<[Option<usize>; 2]> = Vec::with_capacity(n);
        let mut best: Vec<[usize; 2]> = Vec::with_capacity(n);
        let mut first_counts = vec![0usize; e_count];
        let mut real = 0usize;
        for i in 0..n {
            let row = &host_p[i * e_count..(i + 1) * e_count];
            let e1 = argmax(row, None);
            let e2 = if e_count > 1 {
                argmax(row, Some(e1))
            } else {
                e1
            };
            best.push([e1, e2]);
            if !keep[i] {
                choices.push([None, None]);
                continue;
            }
            real += 1;
            first_counts[e1] += 1;
            let e2 = (self.settings.routing == Routing::Top2 && e_count > 1).then(|| {
                let g2 = row[e2] / (row[e1] + row[e2]);
                let threshold = self.settings.second_threshold as f32;
                let go = if train {
                    threshold <= 0.0 || uniform[i] < g2 / threshold
                } else {
                    g2 >= threshold
                };
                go.then_some(e2)
            });
            choices.push([Some(e1), e2.flatten()]);
        }

        // Positions in each expert's queue, group by group, in priority order.
        let mut kept: Vec<Vec<Assignment>> = vec![Vec::new(); e_count];
        let mut dropped = 0usize;
        let mut assigned = 0usize;
        let mut capacity = 0;
        for g in 0..b {
            let mut fill = vec![0usize; e_count];
            let tokens = g * t..(g + 1) * t;
            let group_capacity = capacity_of(tokens.clone().filter(|&i| keep[i]).count());
            capacity = capacity.max(group_capacity);
            let order: Vec<(usize, usize)> = if causal {
                tokens.flat_map(|i| [(i, 0), (i, 1)]).collect()
            } else {
                tokens
                    .clone()
                    .map(|i| (i, 0))
                    .chain(tokens.map(|i| (i, 1)))
                    .collect()
            };
            for (i, k) in order {
                let Some(e) = choices[i][k] else { continue };
                assigned += 1;
                if fill[e] < group_capacity {
                    fill[e] += 1;
                    kept[e].push(Assignment { n: i, k, e });
                } else {
                    dropped += 1;
                }
            }
        }

        // Gates: p at the first choice (Switch), or the two best renormalised (top-2; the
        // second gate is used only where the second choice is sent).
        let gather = |ids: Vec<usize>| {
            let ids: Vec<i64> = ids.into_iter().map(|e| e as i64).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, 1]), &device);
            p.clone().gather(1, ids).reshape([n])
        };
        let g1 = gather(best.iter().map(|b| b[0]).collect());
        let gates = match self.settings.routing {
            // One expert has no second choice: its gate stays p = 1.
            Routing::Switch => g1,
            Routing::Top2 if e_count == 1 => g1,
            Routing::Top2 => {
                let g2 = gather(best.iter().map(|b| b[1]).collect());
                let total = g1.clone() + g2.clone();
                Tensor::cat(vec![g1 / total.clone(), g2 / total], 0)
            }
        };

        // Dispatch: each expert reads its kept tokens, its weighted outputs are added back.
        let mut out = Tensor::<2>::zeros([n, d], &device);
        let mut load = vec![0usize; e_count];
        for (e, list) in kept.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            load[e] = list.len();
            let rows: Vec<i64> = list.iter().map(|a| a.n as i64).collect();
            let gate_at: Vec<i64> = list.iter().map(|a| (a.k * n + a.n) as i64).collect();
            debug_assert!(list.iter().all(|a| a.e == e));
            let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [list.len()]), &device);
            let gate_at =
                Tensor::<1, Int>::from_data(TensorData::new(gate_at, [list.len()]), &device);
            let input = xf.clone().select(0, rows.clone());
            let y = self.experts[e]
                .forward(input.reshape([1, list.len(), d]))
                .reshape([list.len(), d]);
            let g = gates.clone().select(0, gate_at).reshape([list.len(), 1]);
            out = out.select_assign(0, rows, y * g, IndexingUpdateOp::Add);
        }

        // Losses over the real tokens.
        let real_f = real.max(1) as f64;
        let weights: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let w = Tensor::<2>::from_data(TensorData::new(weights, [n, 1]), &device);
        let mean_p = (p * w.clone())
            .sum_dim(0)
            .reshape([e_count])
            .div_scalar(real_f);
        let f: Vec<f32> = first_counts
            .iter()
            .map(|&c| c as f32 / real_f as f32)
            .collect();
        let f = Tensor::<1>::from_data(TensorData::new(f, [e_count]), &device);
        let mut host_mean = vec![0f64; e_count];
        for i in (0..n).filter(|&i| keep[i]) {
            for (e, m) in host_mean.iter_mut().enumerate() {
                *m += host_p[i * e_count + e] as f64;
            }
        }
        let balance = (0..e_count)
            .map(|e| first_counts[e] as f64 / real_f * host_mean[e] / real_f)
            .sum::<f64>() as f32
            * e_count as f32;
        let balance_loss = (f * mean_p)
            .sum()
            .mul_scalar(self.settings.balance_coef * e_count as f64);
        let max = logits.clone().max_dim(1);
        let lse = (logits - max.clone()).exp().sum_dim(1).log() + max;
        let z_loss = (lse.powf_scalar(2.0) * w)
            .sum()
            .div_scalar(real_f)
            .mul_scalar(self.settings.z_loss_coef);
        (
            out.reshape([b, t, d]),
            RoutingReport {
                balance_loss,
                z_loss,
                load,
                capacity,
                dropped,
                assigned,
                balance,
            },
        )
    }
}

/// The index of the largest value (the first of ties), skipping `except`.
fn argmax(row: &[f32], except: Option<usize>) -> usize {
    let mut best = usize::MAX;
    for (i, &v) in row.iter().enumerate() {
        if Some(i) == except {
            continue;
        }
        if best == usize::MAX || v > row[best] {
            best = i;
        }
    }
    best
}
