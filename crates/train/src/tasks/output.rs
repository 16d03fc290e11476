//! What a training step gives burn-train's metrics: the classification output (loss, logits,
//! targets) and the routing of the model's mixture-of-experts layers, which the
//! [`RoutingMetric`]s turn into `metrics.csv` rows and curves (training split only: evaluation
//! forwards keep no routing report).

use std::sync::Arc;

use burn::tensor::ExecutionError;
use burn::tensor::TensorReadError;
use burn::train::ClassificationOutput;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    AccuracyInput, Adaptor, ItemLazy, LossInput, Metric, MetricAttributes, MetricMetadata,
    MetricName, Numeric, NumericAttributes, NumericEntry, PerplexityInput, SerializedEntry,
};
use models::RoutingSummary;

/// A training step's output.
pub struct StepOutput {
    /// Loss, logits and targets.
    pub class: ClassificationOutput,
    /// One entry per mixture-of-experts layer (none without experts).
    pub routing: Vec<RoutingSummary>,
}

impl ItemLazy for StepOutput {
    fn sync(self) -> Result<Self, ExecutionError> {
        Ok(Self {
            class: self.class.sync()?,
            routing: self.routing,
        })
    }
}

impl Adaptor<AccuracyInput> for StepOutput {
    fn adapt(&self) -> AccuracyInput {
        self.class.adapt()
    }
}

impl Adaptor<LossInput> for StepOutput {
    fn adapt(&self) -> LossInput {
        self.class.adapt()
    }
}

impl Adaptor<PerplexityInput> for StepOutput {
    fn adapt(&self) -> PerplexityInput {
        self.class.adapt()
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
