//! `efformer`: the command-line front end.
//!
//! Over 600 lines on purpose: the clap command tree (every subcommand's flags with their help)
//! and its one dispatch; each command's work lives in its own module of the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use efficient_attn::AttentionConfig;
use efficient_attn::AttentionMode;
use train::attention_cmd::{DemoSettings, demo, list_json, list_table};
use train::bench::{BenchSettings, Pass, run_all, run_case, table};
use train::device::DeviceChoice;
use train::experiment::TrainOptions;

/// Efficient transformers in Rust: every attention of the survey, trained from TOML.
#[derive(Parser)]
#[command(name = "efformer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from an experiment file.
    Train {
        /// The experiment file (TOML).
        config: PathBuf,
        /// Override a setting: `--set train.epochs=2` (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        /// Device: flex, wgpu, wgpu-cpu, cuda, cuda:N, ndarray.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
        /// Several devices, trained data-parallel by burn-train (e.g. `cuda:0,cuda:1`).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<DeviceChoice>,
        /// Continue the run in the output directory from its last complete checkpoint.
        #[arg(long)]
        resume: bool,
        /// Run directory (default: a folder named after the config file, under runs/).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Evaluate a checkpoint on the test (and validation) split.
    Eval {
        /// The experiment file the checkpoint was trained with.
        config: PathBuf,
        /// A model checkpoint (`<run>/checkpoint/model-<epoch>.bpk`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Override a setting (as for `train`).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        /// Device.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
    },
    /// Classify documents with a trained text classifier: prints file, label and probability.
    Predict {
        /// The experiment file the checkpoint was trained with, or a directory written by
        /// `efformer export` (then no --checkpoint).
        config: PathBuf,
        /// A model checkpoint (`<run>/checkpoint/model-<epoch>.bpk`).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Text files to classify; none = one document from standard input.
        files: Vec<PathBuf>,
        /// Override a setting (as for `train`).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        /// Device.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
        /// Print one JSON object per document (with every label's probability).
        #[arg(long)]
        json: bool,
    },
    /// Write a trained text classifier as a directory to use elsewhere: model.safetensors
    /// (Hugging Face BERT names where the architecture has them), config.json with the labels,
    /// and the tokenizer; `efformer predict DIR` reads it.
    Export {
        /// The experiment file the checkpoint was trained with.
        config: PathBuf,
        /// A model checkpoint (`<run>/checkpoint/model-<epoch>.bpk`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The new directory.
        #[arg(long)]
        out: PathBuf,
        /// Override a setting (as for `train`).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
    },
    /// Continue a prompt with a trained language model (a run of task = "language-model"),
    /// printing the text as it is sampled and the tokens per second at the end.
    Generate {
        /// The run directory (`efformer train … --out DIR`).
        run: PathBuf,
        /// A model checkpoint; default: the run's last complete one.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The prompt; none = standard input.
        #[arg(long)]
        prompt: Option<String>,
        /// Tokens to add.
        #[arg(long = "max-new", default_value_t = 200)]
        max_new: usize,
        /// Sampling temperature (> 0).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Sample among the k most likely tokens only.
        #[arg(long = "top-k")]
        top_k: Option<usize>,
        /// Seed of the sampler: the same seed gives the same text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Take the most likely token every time (no sampling).
        #[arg(long)]
        greedy: bool,
        /// Device.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
    },
    /// Inspect the attention variants.
    Attention {
        #[command(subcommand)]
        command: AttentionCommand,
    },
    /// Time and measure the memory of attention variants across sequence lengths.
    Bench {
        /// Variants, comma-separated: kinds, or kinds with fields as a TOML inline table's body
        /// (`sparse-transformer{stride = "sqrt"}`); default: every kind.
        #[arg(long)]
        variants: Option<String>,
        /// Sequence lengths.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096,16384")]
        lengths: Vec<usize>,
        /// Batch size.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Heads.
        #[arg(long, default_value_t = 8)]
        heads: usize,
        /// Width of one head.
        #[arg(long = "d-head", default_value_t = 64)]
        d_head: usize,
        /// Mode: bidirectional, causal or cross.
        #[arg(long, default_value = "bidirectional", value_parser = parse_mode)]
        mode: AttentionMode,
        /// Also time forward+backward.
        #[arg(long)]
        backward: bool,
        /// Device: flex, wgpu, wgpu-cpu, cuda, cuda:N, ndarray.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
        /// Timed repetitions per case (after one warm-up).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Memory budget of one case in GiB; larger cases are skipped with a note.
        #[arg(long = "budget-gib", default_value_t = 16.0)]
        budget_gib: f64,
        /// Keys before the queries (a causal layer's memory, as Transformer-XL's): every case
        /// attends `n` queries over `memory + n` keys.
        #[arg(long, default_value_t = 0)]
        memory: usize,
        /// Write one JSON record per case to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Achieved GFLOP/s of matrix products and of full attention (the matmul rate attention
    /// should approach).
    BenchGemm {
        /// Size.
        #[arg(long, default_value_t = 4096)]
        n: usize,
        /// Device.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
        /// Repetitions.
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Regenerate the benchmark document's tables and its two log-log plots from `bench --json`
    /// files (prose outside the generated block is kept).
    BenchReport {
        /// Benchmark JSON files (one per device or sweep).
        #[arg(long, required = true, num_args = 1..)]
        json: Vec<PathBuf>,
        /// The Markdown document to update; plots are written beside it.
        #[arg(long, default_value = "docs/benchmarks.md")]
        doc: PathBuf,
    },
    /// Time whole training steps (forward, backward, AdamW) of a fixed 4-layer model, as
    /// `train_step_bench.py` does in PyTorch; one process per case.
    BenchTrain {
        /// Attention kinds (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "full,linear-transformer")]
        attentions: Vec<String>,
        /// Sequence lengths.
        #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
        lengths: Vec<usize>,
        /// Timed steps per case (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Encoder depths (layers; comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "4")]
        layers: Vec<usize>,
        /// Reversible layers (`reversible = true`), trained without stored activations.
        #[arg(long)]
        reversible: bool,
        /// Dropout in the stack (default 0, as PyTorch's `train_step_bench.py`).
        #[arg(long, default_value_t = 0.0)]
        dropout: f64,
        /// Device.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
        /// Write the records to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One training-step case in this process (used by `bench-train`; prints one JSON record).
    #[command(hide = true)]
    BenchTrainCase {
        #[arg(long)]
        attention: String,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        steps: usize,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long)]
        reversible: bool,
        #[arg(long, default_value_t = 0.0)]
        dropout: f64,
        #[arg(long)]
        device: DeviceChoice,
    },
    /// One benchmark case in this process (used by `bench`; prints one JSON record).
    #[command(hide = true)]
    BenchCase {
        #[arg(long)]
        variant: String,
        #[arg(long, value_parser = parse_mode)]
        mode: AttentionMode,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        heads: usize,
        #[arg(long = "d-head")]
        d_head: usize,
        #[arg(long, value_parser = parse_pass)]
        pass: Pass,
        #[arg(long)]
        device: DeviceChoice,
        #[arg(long)]
        reps: usize,
        #[arg(long, default_value_t = 0)]
        memory: usize,
    },
}

#[derive(Subcommand)]
enum AttentionCommand {
    /// Print every variant with its modes, complexity and exactness.
    List {
        /// Print a JSON array of objects with keys name, modes, complexity, exact.
        #[arg(long)]
        json: bool,
    },
    /// Run every variant on one random input and compare it with full attention.
    Demo {
        /// Device: flex, wgpu, wgpu-cpu, cuda, cuda:N, ndarray.
        #[arg(long, default_value = "flex")]
        device: DeviceChoice,
        /// Mode: bidirectional, causal or cross.
        #[arg(long, default_value = "bidirectional", value_parser = parse_mode)]
        mode: AttentionMode,
        /// Sequence length.
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        /// Batch size.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Heads.
        #[arg(long, default_value_t = 8)]
        heads: usize,
        /// Width of one head.
        #[arg(long = "d-head", default_value_t = 64)]
        d_head: usize,
    },
}

fn parse_pass(s: &str) -> Result<Pass, String> {
    match s {
        "forward" => Ok(Pass::Forward),
        "forward_backward" => Ok(Pass::ForwardBackward),
        _ => Err(format!(
            "unknown pass `{s}`: expected forward or forward_backward"
        )),
    }
}

fn parse_mode(s: &str) -> Result<AttentionMode, String> {
    AttentionMode::ALL
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| format!("unknown mode `{s}`: expected bidirectional, causal or cross"))
}

/// Tensors are allocated and freed per operation: a caching allocator keeps their pages mapped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`; the same index in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The delay, in milliseconds, before mimalloc returns freed pages to the OS.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Keeps freed pages mapped for ten seconds (mimalloc's default is 10 ms) before returning
/// them to the OS: a training step frees and re-allocates the same tens to hundreds of MiB of
/// activations, and faulting them back in (the kernel zeroes every page) cost 18% of a step at
/// a delay of 1 s (`perf`: `clear_page_erms` under `do_huge_pmd_anonymous_page`). Measured with
/// `bench-train --attentions full,linear-transformer` (batch 8, this 2-core machine, one
/// sitting, 2026-12-02), ms a step and peak MiB: N = 1,024 `full` 1,483–1,608 / 780 at 1 s,
/// 1,251–1,258 / 913 at 10 s; N = 4,096 `full` 12,232 / 2,273 at 1 s, 9,726 / 2,829 at 10 s,
/// 9,360 / 3,186 at 30 s, 10,251 / 3,050 never; linear attention 5,178 / 2,436 at 1 s and
/// 4,088 / 3,386 at 10 s. Ten seconds outlasts a step at these sizes and keeps the peak below
/// PyTorch's for the same model (mimalloc's arenas wait `arena_purge_mult` times the delay,
/// 10 by default, before purging large blocks, so those may stay mapped longer; longer steps,
/// at 16,384 tokens or deep reversible stacks, outlast the delay and fault some pages back).
/// `MIMALLOC_PURGE_DELAY` set in the environment wins.
#[allow(unsafe_code)]
fn keep_freed_pages_mapped() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` only stores a value in mimalloc's option table; it takes any
    // option index and value and may be called at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
}

/// A panic that escapes (a bug, or bad input no check caught) prints one line naming its
/// message and where it happened, never a backtrace, and the process exits with failure.
fn one_line_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".to_string());
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        let at = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error: {message}{at}; please report it with the command");
    }));
}

fn main() -> ExitCode {
    keep_freed_pages_mapped();
    one_line_panics();
    match std::panic::catch_unwind(|| run(Cli::parse())) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Train {
            config,
            sets,
            device,
            devices,
            resume,
            out,
        } => {
            let devices = if devices.is_empty() {
                vec![device]
            } else {
                devices
            };
            let opts = TrainOptions {
                config,
                sets,
                devices,
                resume,
                out,
            };
            let report = train::experiment::train(&opts)?;
            if let Some(test) = report.test {
                let baseline = report
                    .majority_baseline
                    .map(|m| format!(" (majority class {:.2}%)", 100.0 * m))
                    .unwrap_or_default();
                println!(
                    "test {}{baseline}, loss {:.4}, after {} epochs in {:.0} s",
                    test.score(),
                    test.loss,
                    report.epochs,
                    report.wall_seconds
                );
            }
            Ok(())
        }
        Command::Predict {
            config,
            checkpoint,
            files,
            sets,
            device,
            json,
        } => {
            let predictor = match checkpoint {
                Some(checkpoint) => {
                    train::predict::Predictor::from_run(&config, &sets, &checkpoint, device)?
                }
                None if config.is_dir() => train::predict::Predictor::from_export(&config, device)?,
                None => {
                    return Err(format!(
                        "predict {}: pass --checkpoint <run>/checkpoint/model-<epoch>.bpk with an \
                         experiment file, or give a directory written by `efformer export`",
                        config.display()
                    ));
                }
            };
            for p in predictor.predict(&files)? {
                if json {
                    println!("{}", serde_json::to_string(&p).map_err(|e| e.to_string())?);
                } else {
                    println!("{}\t{}\t{:.4}", p.source, p.label, p.probability);
                }
            }
            Ok(())
        }
        Command::Export {
            config,
            checkpoint,
            out,
            sets,
        } => {
            let predictor = train::predict::Predictor::from_run(
                &config,
                &sets,
                &checkpoint,
                DeviceChoice::Flex,
            )?;
            predictor.export(&out)?;
            eprintln!(
                "exported to {}: model.safetensors, config.json{}; classify with `efformer predict {} FILE…`",
                out.display(),
                if out.join("tokenizer.json").exists() {
                    ", tokenizer.json"
                } else {
                    ""
                },
                out.display()
            );
            Ok(())
        }
        Command::Generate {
            run,
            checkpoint,
            prompt,
            max_new,
            temperature,
            top_k,
            seed,
            greedy,
            device,
        } => {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(format!(
                    "--temperature: expected a positive number, got {temperature}"
                ));
            }
            if top_k == Some(0) {
                return Err("--top-k: expected at least 1, got 0".into());
            }
            if max_new == 0 {
                return Err("--max-new: expected at least 1, got 0".into());
            }
            let generator =
                train::generate::Generator::from_run(&run, checkpoint.as_deref(), device)?;
            let prompt = match prompt {
                Some(p) => p,
                None => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                        .map_err(|e| format!("cannot read the prompt from standard input: {e}"))?;
                    text
                }
            };
            let mut sampler = if greedy {
                models::Sampler::Greedy
            } else {
                models::Sampler::sample_with(temperature, top_k, seed)
            };
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            let mut emit = |piece: &str| -> Result<(), String> {
                stdout
                    .write_all(piece.as_bytes())
                    .and_then(|_| stdout.flush())
                    .map_err(|e| format!("cannot write to standard output: {e}"))
            };
            let g = generator.generate(&prompt, max_new, &mut sampler, &mut emit)?;
            emit("\n")?;
            eprintln!(
                "{} tokens in {:.2} s ({:.1} tokens/s) from {}; {}",
                g.tokens,
                g.seconds,
                g.tokens as f64 / g.seconds.max(1e-9),
                generator.checkpoint().display(),
                g.decoding
            );
            Ok(())
        }
        Command::Eval {
            config,
            checkpoint,
            sets,
            device,
        } => {
            let report = train::experiment::eval(&config, &sets, &checkpoint, device)?;
            let (per, unit) = if report.per_token {
                ("token ", "tokens")
            } else {
                ("", "examples")
            };
            let splits = [("test", report.test), ("valid", Some(report.valid))];
            for (name, result) in splits {
                if let Some(r) = result {
                    println!(
                        "{name:<6} loss {:.4}, {per}{} ({} {unit})",
                        r.loss,
                        r.score(),
                        r.count
                    );
                }
            }
            Ok(())
        }
        Command::Attention { command } => match command {
            AttentionCommand::List { json } => {
                println!("{}", if json { list_json() } else { list_table() });
                Ok(())
            }
            AttentionCommand::Demo {
                device,
                mode,
                seq,
                batch,
                heads,
                d_head,
            } => {
                let dev = device.device()?;
                println!(
                    "attention demo on {device}: batch {batch}, heads {heads}, seq {seq}, d_head {d_head}, {mode}"
                );
                let settings = DemoSettings {
                    mode,
                    batch,
                    heads,
                    seq,
                    d_head,
                };
                println!(
                    "{:<20} {:>12} {:>22}",
                    "kind", "forward ms", "max |diff| vs full"
                );
                demo(&settings, &dev, |row| {
                    println!(
                        "{:<20} {:>12.2} {:>22.2e}",
                        row.kind, row.millis, row.max_abs_diff
                    )
                })?;
                Ok(())
            }
        },
        Command::Bench {
            variants,
            lengths,
            batch,
            heads,
            d_head,
            mode,
            backward,
            device,
            reps,
            budget_gib,
            memory,
            json,
        } => {
            let variants = match variants {
                None => AttentionConfig::all_defaults()
                    .iter()
                    .map(|c| c.info().kind.to_string())
                    .collect(),
                Some(list) => {
                    let specs = train::bench::split_variant_specs(&list);
                    for spec in &specs {
                        train::bench::parse_variant_spec(spec)?;
                    }
                    specs
                }
            };
            let mut passes = vec![Pass::Forward];
            if backward {
                passes.push(Pass::ForwardBackward);
            }
            let settings = BenchSettings {
                variants,
                lengths,
                batch,
                heads,
                d_head,
                mode,
                passes,
                device,
                reps,
                budget_bytes: (budget_gib * (1u64 << 30) as f64) as u64,
                memory,
            };
            let records = run_all(&settings)?;
            println!("{}", table(&records));
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?;
                std::fs::write(&path, text)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::BenchGemm { n, device, reps } => {
            let dev = device.device()?;
            let r = train::bench::gemm_report(n, &dev, &device.to_string(), reps);
            println!(
                "{}",
                serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Command::BenchReport { json, doc } => {
            let (time, memory) = train::bench_report::run(&json, &doc)?;
            eprintln!(
                "updated {}; wrote {} and {}",
                doc.display(),
                time.display(),
                memory.display()
            );
            Ok(())
        }
        Command::BenchTrain {
            attentions,
            lengths,
            steps,
            layers,
            reversible,
            dropout,
            device,
            json,
        } => {
            for a in &attentions {
                train::bench::parse_variant_spec(a)?;
            }
            if steps == 0 || lengths.contains(&0) || layers.contains(&0) {
                return Err("--steps, --lengths and --layers: expected positive numbers".into());
            }
            if !(0.0..1.0).contains(&dropout) {
                return Err(format!(
                    "--dropout: expected a probability in [0, 1), got {dropout}"
                ));
            }
            let shapes: Vec<_> = layers
                .iter()
                .map(|&layers| train::bench_train::Depth {
                    layers,
                    reversible,
                    dropout,
                })
                .collect();
            let records =
                train::bench_train::run_all(&attentions, &lengths, &shapes, steps, device)?;
            println!(
                "{:<20} {:>6} {:>7} {:>10} {:>12} {:>10}",
                "attention", "n", "layers", "ms/step", "tokens/s", "peak MiB"
            );
            for r in &records {
                println!(
                    "{:<20} {:>6} {:>7} {:>10.0} {:>12.0} {:>10.0}",
                    r.attention,
                    r.n,
                    format!("{}{}", r.layers, if r.reversible { "r" } else { "" }),
                    r.median_ms,
                    r.tokens_per_s,
                    r.peak_bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64
                );
            }
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?;
                std::fs::write(&path, text)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(())
        }
        Command::BenchTrainCase {
            attention,
            n,
            steps,
            layers,
            reversible,
            dropout,
            device,
        } => {
            let dev = device.device()?;
            let depth = train::bench_train::Depth {
                layers,
                reversible,
                dropout,
            };
            let mut record = train::bench_train::run_case(&attention, n, depth, steps, &dev)?;
            record.device = device.to_string();
            println!(
                "{}",
                serde_json::to_string(&record).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Command::BenchCase {
            variant,
            mode,
            n,
            batch,
            heads,
            d_head,
            pass,
            device,
            reps,
            memory,
        } => {
            let dev = device.device()?;
            let mut record = run_case(
                &variant, mode, n, batch, heads, d_head, pass, &dev, reps, memory,
            )?;
            record.device = device.to_string();
            println!(
                "{}",
                serde_json::to_string(&record).map_err(|e| e.to_string())?
            );
            Ok(())
        }
    }
}
