#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod attention_cmd;
pub mod bench;
pub mod bench_report;
pub mod bench_train;
pub mod config;
pub mod data;
pub mod device;
pub mod experiment;
pub mod fit;
pub mod generate;
pub mod metrics_log;
pub mod optim;
pub mod plot;
pub mod predict;
pub mod progress;
pub mod rng;
pub mod run_dir;
pub mod tasks;
