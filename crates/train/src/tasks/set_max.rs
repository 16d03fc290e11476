//! The Set Transformer's maximum-value regression (Lee et al. 2019, §5.1): given a set of
//! numbers, predict its largest, trained with the mean absolute error (the paper's L1 loss,
//! and the metric of its Table 1).

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::Device;
use burn::train::RegressionOutput;
use models::{SetTransformer, SetTransformerConfig};

use super::{NanGuard, Scoring, Splits, StepClock, StepOutput, Task};
use crate::config::ExperimentConfig;
use crate::config::load::model_error;
use crate::data::loader::{MakeBatch, SetBatch, SetBatcher, SetItem};
use crate::data::prepare::SetData;
use crate::fit::RunContext;

/// A set model with its loss, the mean absolute error of its one output per set.
#[derive(Module, Debug)]
pub struct SetRegressorWithLoss {
    /// The model.
    pub model: SetTransformer,
    #[module(skip)]
    guard: NanGuard,
    #[module(skip)]
    clock: StepClock,
}

impl SetRegressorWithLoss {
    /// Wraps a set model.
    pub fn new(model: SetTransformer, guard: NanGuard) -> Self {
        Self {
            model,
            guard,
            clock: StepClock::default(),
        }
    }

    /// Loss, predictions and targets of a batch.
    ///
    /// # Shapes
    /// - output and targets: `[batch, 1]`
    pub fn forward(&self, batch: SetBatch) -> RegressionOutput {
        let [b, _, _] = batch.values.dims();
        let predicted = self
            .model
            .forward(batch.values, Some(batch.mask_pad))
            .reshape([b, 1]);
        let loss = predicted
            .clone()
            .sub(batch.targets.clone())
            .abs()
            .mean()
            .reshape([1]);
        RegressionOutput::new(loss, predicted, batch.targets)
    }

    /// [`forward`](Self::forward) for training (set blocks have no reversible tape).
    pub fn forward_taped(
        &self,
        batch: SetBatch,
        _tape: Option<models::ReversibleTape>,
    ) -> StepOutput {
        StepOutput {
            scored: self.forward(batch).into(),
            routing: Vec::new(),
        }
    }
}

burn_train_steps!(SetRegressorWithLoss, SetBatch);

/// Maximum-value regression over generated [`SetData`].
pub struct SetMaxTask {
    data: SetData,
}

impl SetMaxTask {
    /// The task over `data`.
    pub fn new(data: SetData) -> Self {
        Self { data }
    }

    /// The set model of `config` (`[model.set]`, or the Set Transformer's defaults with one
    /// input and one output per set).
    pub fn model(config: &ExperimentConfig) -> SetTransformerConfig {
        config.model.set.clone().unwrap_or_default()
    }

    /// Checks the model before anything is written: one input and one output per element and
    /// set, one seed, blocks that build.
    ///
    /// # Errors
    /// The key and what was expected.
    pub fn check_config(config: &ExperimentConfig) -> Result<(), String> {
        let m = Self::model(config);
        for (key, got) in [
            ("d_input", m.d_input),
            ("d_output", m.d_output),
            ("seeds", m.seeds),
        ] {
            if got != 1 {
                return Err(format!(
                    "model.set.{key}: 1 for maximum-value regression (one number in per element, \
                     one out per set), got {got}"
                ));
            }
        }
        m.blocks
            .check("model.set.blocks")
            .map_err(|e| format!("{}: {}", e.path, e.message))
    }
}

impl Task for SetMaxTask {
    type Item = SetItem;
    type Batch = SetBatch;
    type Model = SetRegressorWithLoss;
    type ModelConfig = SetTransformerConfig;

    fn model_config(&self, ctx: &RunContext) -> Result<SetTransformerConfig, String> {
        Ok(Self::model(&ctx.config))
    }

    fn build(
        &self,
        config: &SetTransformerConfig,
        device: &Device,
        guard: NanGuard,
    ) -> Result<SetRegressorWithLoss, String> {
        let model = config.init(device).map_err(|e| {
            model_error(
                e,
                &[
                    ("set.encoder", "set.blocks"),
                    ("set.pool", "set.blocks"),
                    ("set.decoder", "set.blocks"),
                ],
            )
        })?;
        Ok(SetRegressorWithLoss::new(model, guard))
    }

    fn batcher(&self, _: &SetTransformerConfig) -> Arc<dyn MakeBatch<SetItem, SetBatch>> {
        Arc::new(SetBatcher)
    }

    fn splits(&self) -> Splits<'_, SetItem> {
        Splits {
            train: &self.data.train,
            valid: &self.data.valid,
            test: (!self.data.test.is_empty()).then_some(self.data.test.as_slice()),
        }
    }

    fn attention_kinds(&self, config: &ExperimentConfig) -> Vec<String> {
        let blocks = Self::model(config).blocks;
        let kind = match blocks.style {
            models::SetStyle::Paper => blocks.attention.info().kind.to_string(),
            models::SetStyle::Reference => "set-transformer-reference".to_string(),
        };
        vec![kind]
    }

    fn pad_token(&self) -> Option<usize> {
        None
    }

    fn scoring(&self) -> Scoring {
        Scoring::Values
    }

    fn describe(&self, parameters: usize) -> String {
        let d = &self.data;
        let largest = d.train.iter().map(|i| i.values.len()).max().unwrap_or(0);
        format!(
            "set maximum: {} train / {} valid / {} test sets of up to {largest} numbers; {parameters} parameters",
            d.train.len(),
            d.valid.len(),
            d.test.len(),
        )
    }
}
