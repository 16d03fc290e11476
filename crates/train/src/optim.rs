//! Optimisation: the optimiser of `[train.optimizer]` and the learning-rate schedule of
//! `[train.schedule]` (a burn-optim scheduler whose step is checkpointed).

use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};

use crate::config::{ExperimentConfig, OptimizerSection, ScheduleSection};

/// The learning-rate schedule of `[train.schedule]`, as a burn-optim scheduler whose state (the
/// step) is checkpointed.
#[derive(Clone, Debug)]
pub struct Schedule {
    kind: ScheduleSection,
    base: f64,
    d_model: usize,
    total_steps: usize,
    step: usize,
}

impl Schedule {
    /// A schedule over `total_steps` optimiser steps.
    pub fn new(kind: ScheduleSection, base: f64, d_model: usize, total_steps: usize) -> Self {
        Self {
            kind,
            base,
            d_model,
            total_steps: total_steps.max(1),
            step: 0,
        }
    }

    /// The rate at (1-based) step `step`.
    pub fn rate(&self, step: usize) -> f64 {
        let s = step.max(1) as f64;
        match self.kind {
            ScheduleSection::Constant => self.base,
            ScheduleSection::Rsqrt { warmup_steps } => {
                let w = warmup_steps.max(1) as f64;
                self.base * (s / w).min(1.0) / s.max(w).sqrt()
            }
            ScheduleSection::Noam { warmup_steps } => {
                let w = warmup_steps.max(1) as f64;
                self.base * (self.d_model as f64).powf(-0.5) * s.powf(-0.5).min(s * w.powf(-1.5))
            }
            ScheduleSection::WarmupCosine {
                warmup_steps,
                min_lr,
            } => {
                if step <= warmup_steps {
                    self.base * s / warmup_steps.max(1) as f64
                } else {
                    let t = ((step - warmup_steps) as f64
                        / (self.total_steps.saturating_sub(warmup_steps)).max(1) as f64)
                        .min(1.0);
                    min_lr + (self.base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

impl LrScheduler for Schedule {
    fn step(&mut self) -> f64 {
        self.step += 1;
        self.rate(self.step)
    }

    fn to_record(&self) -> LrSchedulerRecord {
        LrSchedulerRecord::new().with_scalar("step", self.step as f64)
    }

    fn load_record(&mut self, record: LrSchedulerRecord) {
        if let Some(step) = record.scalar::<f64>("step") {
            self.step = step as usize;
        }
    }
}

/// The optimiser of `[train]` with its gradient clipping.
pub fn optimizer(config: &ExperimentConfig) -> ModuleOptimizer {
    let clip = config
        .train
        .grad_clip_norm
        .map(GradientClippingConfig::Norm);
    match config.train.optimizer {
        OptimizerSection::Adamw {
            beta1,
            beta2,
            epsilon,
            weight_decay,
        } => AdamWConfig::new()
            .with_beta_1(beta1)
            .with_beta_2(beta2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .with_grad_clipping(clip)
            .init(),
        OptimizerSection::Adam {
            beta1,
            beta2,
            epsilon,
            weight_decay,
        } => AdamConfig::new()
            .with_beta_1(beta1)
            .with_beta_2(beta2)
            .with_epsilon(epsilon)
            .with_weight_decay((weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay)))
            .with_grad_clipping(clip)
            .init(),
        OptimizerSection::Sgd {
            momentum,
            weight_decay,
        } => SgdConfig::new()
            .with_momentum((momentum > 0.0).then(|| {
                MomentumConfig::new()
                    .with_momentum(momentum)
                    .with_dampening(0.0)
            }))
            .with_weight_decay((weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay)))
            .with_gradient_clipping(clip)
            .init(),
    }
}
