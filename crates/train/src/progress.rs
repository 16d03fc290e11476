//! Progress output for runs whose standard output is not a terminal (logs, CI, `nohup`).
//!
//! burn-train draws its TUI dashboard on a terminal; elsewhere its fallback prints one `Debug`
//! dump per batch. [`PlainProgress`] replaces that fallback with one readable line every few
//! seconds (and at the end of every split): epoch, items, throughput, time left and the latest
//! metric values (running means over the split so far).
//!
//! ```text
//! [train] epoch 1/3   928/10000 items (  9%)  10.3 items/s  1843 tokens/s (2011 padded)  elapsed 1m30s  eta 14m41s  |  Loss 2.1130  Accuracy 21.9000
//! ```
//!
//! Tokens per second come from the loaders' [`TokenMeter`]s: the items' own tokens, and in
//! brackets the tokens of the padded batches the model computed on.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::data::loader::{TokenCount, TokenMeter};

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};

/// Line-oriented progress renderer for non-terminal output.
pub struct PlainProgress {
    every: Duration,
    names: HashMap<MetricId, String>,
    latest: Vec<Running>,
    split: String,
    epoch: usize,
    epochs: usize,
    items_total: usize,
    items_done: usize,
    started: Instant,
    last_print: Option<Instant>,
    meters: Vec<(String, Arc<TokenMeter>)>,
    tokens_at_begin: Option<TokenCount>,
}

impl PlainProgress {
    /// A renderer printing at most one line per `every` (plus one at the end of each split).
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            names: HashMap::new(),
            latest: Vec::new(),
            split: String::from("train"),
            epoch: 1,
            epochs: 1,
            items_total: 0,
            items_done: 0,
            started: Instant::now(),
            last_print: None,
            meters: Vec::new(),
            tokens_at_begin: None,
        }
    }

    /// Shows the tokens per second of `meter` while the split named `split` runs.
    pub fn with_meter(mut self, split: &str, meter: Arc<TokenMeter>) -> Self {
        self.meters.push((split.to_lowercase(), meter));
        self
    }

    fn meter(&self) -> Option<&Arc<TokenMeter>> {
        let split = self.split.to_lowercase();
        self.meters
            .iter()
            .find(|(s, _)| *s == split)
            .map(|(_, m)| m)
    }

    fn record(&mut self, state: MetricState) {
        if let MetricState::Numeric(entry, Some(value)) = state {
            let name = self
                .names
                .get(&entry.metric_id)
                .cloned()
                .unwrap_or_else(|| String::from("metric"));
            let (v, last) = match value {
                NumericEntry::Final(v) => (v, true),
                other => (other.current(), false),
            };
            match self.latest.iter_mut().find(|m| m.name == name) {
                Some(m) if last => *m = Running::last(name, v),
                Some(m) => m.add(v),
                None => self.latest.push(Running::last(name, v)),
            }
        }
    }

    fn begin(&mut self, split: &str, total: usize) {
        self.split = split.to_string();
        self.items_total = total;
        self.items_done = 0;
        self.started = Instant::now();
        self.last_print = None;
        self.latest.clear();
        self.tokens_at_begin = self.meter().map(|m| m.count());
    }

    fn progress(&mut self, done: usize, force: bool) {
        self.items_done = done;
        let now = Instant::now();
        let due = self
            .last_print
            .is_none_or(|t| now.duration_since(t) >= self.every);
        if force || due {
            self.last_print = Some(now);
            println!("{}", self.line());
            let _ = std::io::stdout().flush();
        }
    }

    /// The current progress line.
    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.items_done as f64 / secs
        } else {
            0.0
        };
        let pct = if self.items_total > 0 {
            100.0 * self.items_done as f64 / self.items_total as f64
        } else {
            0.0
        };
        let left = self.items_total.saturating_sub(self.items_done);
        let eta = if rate > 0.0 {
            format_duration(left as f64 / rate)
        } else {
            String::from("?")
        };
        let tokens = match (self.meter(), self.tokens_at_begin) {
            (Some(m), Some(start)) if secs > 0.0 => {
                let now = m.count();
                format!(
                    "  {:.0} tokens/s ({:.0} padded)",
                    (now.real - start.real) as f64 / secs,
                    (now.padded - start.padded) as f64 / secs
                )
            }
            _ => String::new(),
        };
        let mut line = format!(
            "[{}] epoch {}/{}  {:>w$}/{} items ({:>3.0}%)  {:.1} items/s{}  elapsed {}  eta {}",
            self.split,
            self.epoch,
            self.epochs,
            self.items_done,
            self.items_total,
            pct,
            rate,
            tokens,
            format_duration(secs),
            eta,
            w = self.items_total.to_string().len(),
        );
        if !self.latest.is_empty() {
            line.push_str("  |");
            for m in &self.latest {
                line.push_str(&format!("  {} {:.4}", m.name, m.mean()));
            }
        }
        line
    }
}

/// Running mean of one metric over the current split (the epoch value so far).
struct Running {
    name: String,
    sum: f64,
    count: usize,
}

impl Running {
    fn last(name: String, v: f64) -> Self {
        Self {
            name,
            sum: v,
            count: 1,
        }
    }

    fn add(&mut self, v: f64) {
        self.sum += v;
        self.count += 1;
    }

    fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }
}

/// `93` → `1m33s`, `4000` → `1h06m40s`.
fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

impl MetricsRendererTraining for PlainProgress {
    fn update_train(&mut self, state: MetricState) {
        self.record(state);
    }

    fn update_valid(&mut self, state: MetricState) {
        self.record(state);
    }
}

impl MetricsRendererEvaluation for PlainProgress {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        self.record(state);
    }
}

impl TrainingProgressLogger for PlainProgress {
    fn start(
        &mut self,
        total_epochs: usize,
        starting_epoch: usize,
        _total_items: Option<usize>,
        _label: Option<&str>,
    ) {
        self.epochs = total_epochs;
        self.epoch = starting_epoch.max(1);
    }

    fn update_epoch(&mut self, epoch: usize) {
        self.epoch = (epoch + 1).min(self.epochs.max(1));
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        self.begin(split, total_items);
    }

    fn update_split(&mut self, items_processed: usize) {
        self.progress(items_processed, false);
    }

    fn end_split(&mut self) {
        self.progress(self.items_done, true);
    }

    fn end(&mut self) {}

    /// burn-train reports every iteration as an event; the progress line already covers them.
    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for PlainProgress {
    fn start_global_progress(&mut self, _total_tests: usize) {}

    fn start_test(&mut self, name: &str, total_items: usize) {
        self.begin(name, total_items);
    }

    fn update_test_progress(&mut self, items_processed: usize) {
        self.progress(items_processed, false);
    }

    fn end_test(&mut self) {
        self.progress(self.items_done, true);
    }

    fn end_global_progress(&mut self) {}

    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for PlainProgress {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(definition.metric_id, definition.name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_clock_time() {
        assert_eq!(format_duration(7.4), "7s");
        assert_eq!(format_duration(93.0), "1m33s");
        assert_eq!(format_duration(4000.0), "1h06m40s");
    }

    #[test]
    fn the_line_names_split_epoch_rate_and_metrics() {
        let mut p = PlainProgress::new(Duration::from_secs(3600));
        p.start(3, 1, None, None);
        p.begin("train", 1000);
        p.latest.push(Running::last(String::from("Loss"), 2.0));
        p.latest[0].add(3.0);
        p.items_done = 250;
        let line = p.line();
        assert!(
            line.starts_with("[train] epoch 1/3   250/1000 items ( 25%)"),
            "{line}"
        );
        assert!(line.ends_with("|  Loss 2.5000"), "{line}");
    }
}
