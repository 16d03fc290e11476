//! What a training step gives burn-train's metrics: the task's scored output (a classifier's
//! loss, logits and targets, or a regression's loss, predictions and targets) and the routing
//! of the model's mixture-of-experts layers, which the [`RoutingMetric`]s turn into
//! `metrics.csv` rows and curves (training split only: evaluation forwards keep no routing
//! report).

use std::sync::Arc;

use burn::tensor::ExecutionError;
use burn::tensor::Tensor;
use burn::tensor::TensorReadError;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    AccuracyInput, Adaptor, ItemLazy, LossInput, Metric, MetricAttributes, MetricMetadata,
    MetricName, Numeric, NumericAttributes, NumericEntry, PerplexityInput, SerializedEntry,
};
use burn::train::{ClassificationOutput, RegressionOutput};
use models::RoutingSummary;

/// What a task's model outputs for a batch, with its loss: classes or values.
pub enum Scored {
    /// Logits and class targets (classification, language models, sequence-to-sequence).
    Classes(ClassificationOutput),
    /// Predicted and target values (regression: the set tasks).
    Values(RegressionOutput),
}

impl Scored {
    /// The batch's loss.
    pub fn loss(&self) -> Tensor<1> {
        match self {
            Self::Classes(c) => c.loss.clone(),
            Self::Values(v) => v.loss.clone(),
        }
    }

    /// The same output with its loss replaced.
    pub fn with_loss(self, loss: Tensor<1>) -> Self {
        match self {
            Self::Classes(c) => Self::Classes(ClassificationOutput { loss, ..c }),
            Self::Values(v) => Self::Values(RegressionOutput { loss, ..v }),
        }
    }

    /// The classification output.
    ///
    /// # Panics
    /// On values: a classifier's own wrapper calls it on what it scored itself.
    pub fn classes(self) -> ClassificationOutput {
        match self {
            Self::Classes(c) => c,
            Self::Values(_) => panic!("a regression output where classes were scored"),
        }
    }
}

impl From<ClassificationOutput> for Scored {
    fn from(c: ClassificationOutput) -> Self {
        Self::Classes(c)
    }
}

impl From<RegressionOutput> for Scored {
    fn from(v: RegressionOutput) -> Self {
        Self::Values(v)
    }
}

impl ItemLazy for Scored {
    fn sync(self) -> Result<Self, ExecutionError> {
        Ok(match self {
            Self::Classes(c) => Self::Classes(c.sync()?),
            Self::Values(v) => Self::Values(v.sync()?),
        })
    }
}

/// How a task's outputs are scored: the metrics training registers and what evaluation counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// One label per example: accuracy, loss, macro-F1.
    PerExample,
    /// One label per token, `pad` ignored: accuracy, loss, perplexity.
    PerToken {
        /// The padding id.
        pad: usize,
    },
    /// Values: the loss and the mean absolute error.
    Values,
}

/// A training step's output.
pub struct StepOutput {
    /// Loss, outputs and targets.
    pub scored: Scored,
    /// One entry per mixture-of-experts layer (none without experts).
    pub routing: Vec<RoutingSummary>,
}

impl ItemLazy for StepOutput {
    fn sync(self) -> Result<Self, ExecutionError> {
        Ok(Self {
            scored: self.scored.sync()?,
            routing: self.routing,
        })
    }
}

// Training registers the accuracy and perplexity metrics only for class outputs
// ([`Scoring`]), so a value output never reaches these two adaptors.
impl Adaptor<AccuracyInput> for Scored {
    fn adapt(&self) -> AccuracyInput {
        match self {
            Self::Classes(c) => c.adapt(),
            Self::Values(_) => unreachable!("no accuracy metric is registered for values"),
        }
    }
}

impl Adaptor<PerplexityInput> for Scored {
    fn adapt(&self) -> PerplexityInput {
        match self {
            Self::Classes(c) => c.adapt(),
            Self::Values(_) => unreachable!("no perplexity metric is registered for values"),
        }
    }
}

impl Adaptor<LossInput> for Scored {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss())
    }
}

impl Adaptor<AccuracyInput> for StepOutput {
    fn adapt(&self) -> AccuracyInput {
        self.scored.adapt()
    }
}

impl Adaptor<PerplexityInput> for StepOutput {
    fn adapt(&self) -> PerplexityInput {
        self.scored.adapt()
    }
}

impl Adaptor<LossInput> for StepOutput {
    fn adapt(&self) -> LossInput {
        self.scored.adapt()
    }
}

/// The routing numbers of one step.
pub struct RoutingInput(Vec<RoutingSummary>);

impl Adaptor<RoutingInput> for StepOutput {
    fn adapt(&self) -> RoutingInput {
        RoutingInput(self.routing.clone())
    }
}

/// Which routing number a [`RoutingMetric`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingQuantity {
    /// `E · Σ_e f_e P_e`: near 1 balanced, E collapsed.
    Balance,
    /// The share of assignments dropped for capacity.
    Drops,
    /// The weighted balance and z losses added to the training loss.
    AuxLoss,
}

/// One mixture-of-experts layer's routing number, averaged over an epoch's steps.
#[derive(Clone)]
pub struct RoutingMetric {
    name: MetricName,
    layer: usize,
    quantity: RoutingQuantity,
    state: NumericMetricState,
}

impl RoutingMetric {
    /// `quantity` of layer `layer` (counted over the model).
    pub fn new(layer: usize, quantity: RoutingQuantity) -> Self {
        let what = match quantity {
            RoutingQuantity::Balance => "MoE balance",
            RoutingQuantity::Drops => "MoE drops",
            RoutingQuantity::AuxLoss => "MoE aux loss",
        };
        Self {
            name: Arc::new(format!("{what} L{layer}")),
            layer,
            quantity,
            state: NumericMetricState::new(),
        }
    }

    fn format(&self) -> FormatOptions {
        FormatOptions::new(self.name.clone()).precision(4)
    }
}

impl Metric for RoutingMetric {
    type Input = RoutingInput;

    fn update(
        &mut self,
        input: &RoutingInput,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let values: Vec<f64> = input
            .0
            .iter()
            .filter(|r| r.layer == self.layer)
            .map(|r| match self.quantity {
                RoutingQuantity::Balance => r.balance,
                RoutingQuantity::Drops => r.drop_fraction,
                RoutingQuantity::AuxLoss => r.aux_loss,
            } as f64)
            .collect();
        if !values.is_empty() {
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            self.state.update(mean, 1);
        }
        Ok(self.state.compute_update(self.format()))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self.state.compute_final(self.format()))
    }

    fn clear(&mut self) {
        self.state.reset();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: false,
        }
        .into()
    }
}

impl Numeric for RoutingMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}
