//! Metrics as CSV while training, and the PNG of the training curves at the end.
//!
//! `metrics.csv` has one row per logged value: `split,epoch,iteration,metric,value`, where
//! `iteration` counts batches within the epoch and split, and `iteration = 0` marks the
//! epoch's final (aggregated) value.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{MetricDefinition, NumericEntry};

use crate::plot::{Chart, Legend, Scale, Series, save_charts};

/// Appends every numeric metric value to a CSV file.
pub struct CsvMetricLogger {
    out: BufWriter<File>,
    names: HashMap<String, String>,
    iterations: HashMap<(String, usize), usize>,
}

impl CsvMetricLogger {
    /// Opens (or continues, on resume) `path`.
    ///
    /// # Errors
    /// If the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self, String> {
        let fresh = !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut out = BufWriter::new(file);
        if fresh {
            writeln!(out, "split,epoch,iteration,metric,value").map_err(|e| e.to_string())?;
        }
        Ok(Self {
            out,
            names: HashMap::new(),
            iterations: HashMap::new(),
        })
    }
}

fn split_name(split: &Split) -> String {
    match split {
        Split::Train => "train".into(),
        Split::Valid => "valid".into(),
        Split::Test(_) => "test".into(),
    }
}

impl MetricLogger for CsvMetricLogger {
    fn log(&mut self, update: MetricsUpdate, epoch: usize, split: &Split) {
        let split = split_name(split);
        let counter = self.iterations.entry((split.clone(), epoch)).or_insert(0);
        let mut batch_row = false;
        for entry in update.entries_numeric {
            let id = format!("{:?}", entry.entry.metric_id);
            let name = self.names.get(&id).cloned().unwrap_or(id);
            let (iteration, value) = match entry.numeric_entry {
                Some(NumericEntry::Value(v)) => (*counter + 1, v),
                Some(NumericEntry::Aggregated {
                    aggregated_value, ..
                }) => (*counter + 1, aggregated_value),
                Some(NumericEntry::Final(v)) => (0, v),
                None => continue,
            };
            batch_row |= iteration > 0;
            let _ = writeln!(self.out, "{split},{epoch},{iteration},{name},{value}");
        }
        if batch_row {
            *counter += 1;
        }
        let _ = self.out.flush();
    }

    fn read_numeric(
        &mut self,
        _name: &str,
        _epoch: usize,
        _split: &Split,
    ) -> Result<Vec<NumericEntry>, String> {
        Err("the CSV logger is write-only".into())
    }

    fn log_metric_definition(&mut self, definition: MetricDefinition) {
        self.names.insert(
            format!("{:?}", definition.metric_id),
            definition.name.to_string(),
        );
    }

    fn log_epoch_summary(&mut self, _summary: EpochSummary) {
        let _ = self.out.flush();
    }
}

/// One row of `metrics.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRow {
    /// `train`, `valid` or `test`.
    pub split: String,
    /// Epoch (1-based).
    pub epoch: usize,
    /// Batch within the epoch; 0 for the epoch's final value.
    pub iteration: usize,
    /// Metric name.
    pub metric: String,
    /// Value.
    pub value: f64,
}

/// Reads `metrics.csv`.
///
/// # Errors
/// If the file cannot be read.
pub fn read_csv(path: &Path) -> Result<Vec<MetricRow>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some(MetricRow {
                split: f.next()?.to_string(),
                epoch: f.next()?.parse().ok()?,
                iteration: f.next()?.parse().ok()?,
                metric: f.next()?.to_string(),
                value: f.next()?.parse().ok()?,
            })
        })
        .collect())
}

/// The value of `metric` per epoch for `split`: the epoch's final value if logged, else the
/// mean of its batch values.
pub fn per_epoch(rows: &[MetricRow], split: &str, metric: &str) -> Vec<(usize, f64)> {
    let mut epochs: Vec<usize> = rows
        .iter()
        .filter(|r| r.split == split && r.metric == metric)
        .map(|r| r.epoch)
        .collect();
    epochs.sort_unstable();
    epochs.dedup();
    epochs
        .into_iter()
        .filter_map(|e| {
            let of_epoch: Vec<&MetricRow> = rows
                .iter()
                .filter(|r| r.split == split && r.metric == metric && r.epoch == e)
                .collect();
            if let Some(f) = of_epoch.iter().find(|r| r.iteration == 0) {
                return Some((e, f.value));
            }
            let vals: Vec<f64> = of_epoch
                .iter()
                .map(|r| r.value)
                .filter(|v| v.is_finite())
                .collect();
            (!vals.is_empty()).then(|| (e, vals.iter().sum::<f64>() / vals.len() as f64))
        })
        .collect()
}

/// A chart of per-epoch means titled `title`, one series per `(name, split, metric)` that has
/// values; `None` if none has.
fn epoch_chart<'a>(
    rows: &[MetricRow],
    title: &str,
    lines: impl IntoIterator<Item = (String, &'a str, &'a str)>,
) -> Option<Chart> {
    let series: Vec<Series> = lines
        .into_iter()
        .map(|(name, split, metric)| Series {
            name,
            points: per_epoch(rows, split, metric)
                .into_iter()
                .map(|(e, v)| (e as f64, v))
                .collect(),
            markers: true,
            color: None,
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    (!series.is_empty()).then(|| Chart {
        title: title.to_string(),
        x_label: "epoch".into(),
        y_label: title.to_string(),
        x_scale: Scale::Linear,
        y_scale: Scale::Linear,
        series,
        legend: Legend::Inside,
    })
}

/// `("MoE balance", 2)` for a per-layer metric named `MoE balance L2`.
fn layer_of(metric: &str) -> Option<(&str, usize)> {
    let (name, layer) = metric.rsplit_once(" L")?;
    Some((name, layer.parse().ok()?))
}

/// Draws `curves.png` from `metrics.csv`: the training loss per step (raw and smoothed) with the
/// validation loss per epoch, and every other metric per epoch for train and valid.
///
/// # Errors
/// If the CSV cannot be read or the PNG written.
pub fn plot_curves(csv: &Path, png: &Path) -> Result<PathBuf, String> {
    let rows = read_csv(csv)?;
    let steps_per_epoch = |e: usize| {
        rows.iter()
            .filter(|r| r.split == "train" && r.epoch == e && r.metric == "Loss")
            .map(|r| r.iteration)
            .max()
            .unwrap_or(0)
    };
    let max_epoch = rows.iter().map(|r| r.epoch).max().unwrap_or(0);
    let offsets: Vec<usize> = (0..=max_epoch + 1)
        .scan(0, |acc, e| {
            let before = *acc;
            *acc += if e == 0 { 0 } else { steps_per_epoch(e) };
            Some(before)
        })
        .collect();
    let train_loss: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.split == "train" && r.metric == "Loss" && r.iteration > 0)
        .map(|r| {
            (
                (offsets.get(r.epoch).copied().unwrap_or(0) + r.iteration) as f64,
                r.value,
            )
        })
        .collect();
    let smoothed: Vec<(f64, f64)> = train_loss
        .iter()
        .scan(None, |ema: &mut Option<f64>, &(x, y)| {
            let v = match *ema {
                Some(e) => 0.95 * e + 0.05 * y,
                None => y,
            };
            *ema = Some(v);
            Some((x, v))
        })
        .collect();
    let epoch_end = |e: usize| offsets.get(e + 1).copied().unwrap_or(0) as f64;
    let valid_loss: Vec<(f64, f64)> = per_epoch(&rows, "valid", "Loss")
        .into_iter()
        .map(|(e, v)| (epoch_end(e), v))
        .collect();
    let mut charts = vec![Chart {
        title: "Loss".into(),
        x_label: "step".into(),
        y_label: "cross-entropy".into(),
        x_scale: Scale::Linear,
        y_scale: Scale::Linear,
        series: vec![
            Series {
                name: "train (per step)".into(),
                points: train_loss,
                markers: false,
                color: None,
            },
            Series {
                name: "train (smoothed)".into(),
                points: smoothed,
                markers: false,
                color: None,
            },
            Series {
                name: "valid (per epoch)".into(),
                points: valid_loss,
                markers: true,
                color: None,
            },
        ],
        legend: Legend::Inside,
    }];
    let mut metrics: Vec<String> = rows
        .iter()
        .map(|r| r.metric.clone())
        .filter(|m| m != "Loss")
        .collect();
    metrics.sort();
    metrics.dedup();
    // Per-layer metrics (`<name> L<layer>`, the mixture-of-experts routing) share one chart per
    // name, a series per layer (training split).
    let (layered, metrics): (Vec<String>, Vec<String>) =
        metrics.into_iter().partition(|m| layer_of(m).is_some());
    let mut groups: Vec<String> = layered
        .iter()
        .filter_map(|m| layer_of(m).map(|(name, _)| name.to_string()))
        .collect();
    groups.dedup();
    for group in groups {
        let mut members: Vec<(usize, &String)> = layered
            .iter()
            .filter_map(|m| {
                layer_of(m)
                    .filter(|(n, _)| *n == group)
                    .map(|(_, l)| (l, m))
            })
            .collect();
        members.sort();
        let lines = members
            .into_iter()
            .map(|(layer, metric)| (format!("layer {layer}"), "train", metric.as_str()));
        charts.extend(epoch_chart(&rows, &group, lines));
    }
    for metric in metrics {
        let lines = ["train", "valid"].map(|split| (split.to_string(), split, metric.as_str()));
        charts.extend(epoch_chart(&rows, &metric, lines));
    }
    save_charts(&charts, 2, png)?;
    Ok(png.to_path_buf())
}
