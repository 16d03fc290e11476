//! `efformer bench`: forward and forward+backward time and peak memory of attention variants
//! across sequence lengths.
//!
//! Each case (variant, mode, length, pass) runs in its **own process** (`efformer bench-case`,
//! hidden), so its peak memory is that process's peak resident set (`VmHWM` in
//! `/proc/self/status`) minus its resident set after the inputs were created. Time: one
//! warm-up call, then `reps` timed calls, the device synchronised before each timer stops;
//! the median and the spread (min, max) are reported.
//!
//! Cases whose score matrix would exceed the memory budget are skipped with a note instead of
//! being run into the out-of-memory killer.
//!
//! Over 600 lines on purpose: the sweep, the one-case process it spawns and the memory reading
//! both sides share, and the GEMM-rate probe are one measurement protocol.

use std::process::Command;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use efficient_attn::{
    AttentionConfig, AttentionCore, AttentionMode, AttnInput, CoreConfig, Grid, HeadDims,
    WithExtras,
};
use serde::{Deserialize, Serialize};

use crate::device::DeviceChoice;

/// Which computation a case times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pass {
    /// The attention forward only (no autodiff).
    Forward,
    /// Forward on an autodiff device, then `out.sum().backward()`.
    ForwardBackward,
}

impl Pass {
    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::ForwardBackward => "forward_backward",
        }
    }
}

/// One measured (or skipped) case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchRecord {
    /// Variant kind.
    pub variant: String,
    /// Mode.
    pub mode: String,
    /// Sequence length (queries).
    pub n: usize,
    /// Memory positions before the queries (causal; keys are `memory + n`).
    #[serde(default)]
    pub memory: usize,
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Head width.
    pub d_head: usize,
    /// `forward` or `forward_backward`.
    pub pass: Pass,
    /// Median time in milliseconds (`None` if skipped).
    pub median_ms: Option<f64>,
    /// Fastest repetition.
    pub min_ms: Option<f64>,
    /// Slowest repetition.
    pub max_ms: Option<f64>,
    /// Timed repetitions.
    pub reps: usize,
    /// Peak resident memory above the process baseline after the inputs were created.
    pub peak_bytes: Option<u64>,
    /// Tokens (batch · n) per second at the median.
    pub tokens_per_s: Option<f64>,
    /// Median time over full attention's at the same length, mode and pass.
    pub ratio_to_full: Option<f64>,
    /// Device.
    pub device: String,
    /// Why a case was skipped or failed.
    pub note: Option<String>,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// Variant kinds.
    pub variants: Vec<String>,
    /// Sequence lengths.
    pub lengths: Vec<usize>,
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Head width.
    pub d_head: usize,
    /// Mode.
    pub mode: AttentionMode,
    /// Passes to time.
    pub passes: Vec<Pass>,
    /// Device.
    pub device: DeviceChoice,
    /// Timed repetitions per case.
    pub reps: usize,
    /// Memory budget in bytes for one case.
    pub budget_bytes: u64,
    /// Memory positions before the queries (causal mode; 0 for none).
    pub memory: usize,
}

/// A variant spec: a kind (`sparse-transformer`, its default config) or a kind with some of
/// its fields as the body of a TOML inline table (`sparse-transformer{stride = "sqrt"}`).
///
/// # Errors
/// An unknown kind, or fields its config rejects (named).
pub fn parse_variant_spec(spec: &str) -> Result<AttentionConfig, String> {
    let Some((kind, rest)) = spec.split_once('{') else {
        return AttentionConfig::try_from_kind(spec.trim());
    };
    let kind = kind.trim();
    let body = rest
        .strip_suffix('}')
        .ok_or_else(|| format!("variant `{spec}`: expected `kind{{field = value, ...}}`"))?;
    AttentionConfig::try_from_kind(kind)?;
    let doc = format!("attention = {{ kind = {kind:?}, {body} }}");
    let mut table: toml::Table =
        toml::from_str(&doc).map_err(|e| format!("variant `{spec}`: {}", e.message()))?;
    let value = table
        .remove("attention")
        .expect("the table has the key it was written with");
    value
        .try_into::<AttentionConfig>()
        .map_err(|e| format!("variant `{spec}`: {}", e.message()))
}

/// Splits a comma-separated list of variant specs, keeping the commas inside `{...}`.
pub fn split_variant_specs(list: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0usize);
    for c in list.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out.retain(|s| !s.is_empty());
    out
}

/// The variant's config (see [`parse_variant_spec`]), adapted to sequences of exactly `n`
/// positions: sized variants set their maximum length to `n` ([`CoreConfig::with_max_len`]),
/// 2-D variants fit their blocks to the near-square grid of `n` ([`CoreConfig::fit_grid`]).
///
/// # Errors
/// An unknown kind or a field its config rejects.
pub fn config_for_length(spec: &str, n: usize) -> Result<AttentionConfig, String> {
    let config = parse_variant_spec(spec)?;
    let config = config.with_max_len(n);
    Ok(if config.info().needs_grid {
        config.fit_grid(Grid::near_square(n))
    } else {
        config
    })
}

/// Resident set and its peak, in bytes, from `/proc/self/status` (Linux).
pub fn memory_status() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// One case in this process (what `efformer bench-case` runs).
#[allow(clippy::too_many_arguments)]
pub fn run_case(
    kind: &str,
    mode: AttentionMode,
    n: usize,
    batch: usize,
    heads: usize,
    d_head: usize,
    pass: Pass,
    device: &Device,
    reps: usize,
    memory: usize,
) -> Result<BenchRecord, String> {
    check_sizes(&[
        ("n", n),
        ("batch", batch),
        ("heads", heads),
        ("d-head", d_head),
    ])?;
    check_memory(memory, mode)?;
    let device = match pass {
        Pass::Forward => device.clone(),
        Pass::ForwardBackward => device.clone().autodiff(),
    };
    let config = config_for_length(kind, n)?;
    let core = config
        .init(mode, HeadDims::new(heads, d_head), &device)
        .map_err(|e| e.to_string())?;
    device.seed(0);
    let shape = [batch, heads, n, d_head];
    let keys = [batch, heads, memory + n, d_head];
    let q = Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::random(keys, Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::random(keys, Distribution::Normal(0.0, 1.0), &device);
    let extras = config.standalone_extras(
        HeadDims::new(heads, d_head),
        &device,
        config.info().demo_extras(n, mode),
    );
    let extras = |input: AttnInput| input.with_extras(extras.clone());
    device.sync().map_err(|e| format!("{e:?}"))?;
    let baseline = memory_status().map(|(rss, _)| rss);

    let once = || -> Result<f64, String> {
        let start = Instant::now();
        match pass {
            Pass::Forward => {
                let out = core.attend(extras(AttnInput::new(q.clone(), k.clone(), v.clone())));
                // Reading one value forces lazy backends to finish.
                let _ = out.narrow(2, 0, 1).sum().into_scalar::<f32>();
            }
            Pass::ForwardBackward => {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let out = core.attend(extras(AttnInput::new(q.clone(), k.clone(), v.clone())));
                let grads = out.sum().backward();
                let gq: Option<Tensor<4>> = q.grad(&grads);
                let _ = gq.map(|g| g.narrow(2, 0, 1).sum().into_scalar::<f32>());
            }
        }
        device.sync().map_err(|e| format!("{e:?}"))?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    once()?; // warm-up (kernel compilation, autotuning, allocator growth)
    let mut times = (0..reps.max(1))
        .map(|_| once())
        .collect::<Result<Vec<_>, _>>()?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let peak = match (baseline, memory_status()) {
        (Some(base), Some((_, hwm))) => Some(hwm.saturating_sub(base)),
        _ => None,
    };
    Ok(BenchRecord {
        variant: kind.to_string(),
        mode: mode.name().to_string(),
        n,
        memory,
        batch,
        heads,
        d_head,
        pass,
        median_ms: Some(median),
        min_ms: times.first().copied(),
        max_ms: times.last().copied(),
        reps: times.len(),
        peak_bytes: peak,
        tokens_per_s: Some((batch * n) as f64 / (median / 1e3)),
        ratio_to_full: None,
        device: format!("{device:?}"),
        note: None,
    })
}

/// Runs every case of `settings`, each in a child process, printing progress to stderr.
pub fn run_all(settings: &BenchSettings) -> Result<Vec<BenchRecord>, String> {
    for &n in &settings.lengths {
        check_sizes(&[("lengths", n)])?;
    }
    check_sizes(&[
        ("batch", settings.batch),
        ("heads", settings.heads),
        ("d-head", settings.d_head),
        ("reps", settings.reps),
    ])?;
    check_memory(settings.memory, settings.mode)?;
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the efformer binary: {e}"))?;
    let device = settings.device.device()?;
    let mut records = Vec::new();
    let total = settings.variants.len() * settings.lengths.len() * settings.passes.len();
    let mut done = 0;
    for &n in &settings.lengths {
        for variant in &settings.variants {
            for &pass in &settings.passes {
                done += 1;
                let skipped = |note: String| BenchRecord {
                    variant: variant.clone(),
                    mode: settings.mode.name().to_string(),
                    n,
                    memory: settings.memory,
                    batch: settings.batch,
                    heads: settings.heads,
                    d_head: settings.d_head,
                    pass,
                    median_ms: None,
                    min_ms: None,
                    max_ms: None,
                    reps: 0,
                    peak_bytes: None,
                    tokens_per_s: None,
                    ratio_to_full: None,
                    device: settings.device.to_string(),
                    note: Some(note),
                };
                let config = config_for_length(variant, n)?;
                if !config.info().supports(settings.mode) {
                    eprintln!(
                        "[{done}/{total}] {variant} n={n} {}: no {} mode, skipped",
                        pass.name(),
                        settings.mode
                    );
                    continue;
                }
                if let Some(bytes) = config.memory_estimate(
                    n,
                    settings.batch,
                    settings.heads,
                    pass == Pass::ForwardBackward,
                    &device,
                ) && bytes > settings.budget_bytes
                {
                    let note = format!(
                        "skipped: needs about {:.1} GiB, budget {:.1} GiB",
                        bytes as f64 / (1u64 << 30) as f64,
                        settings.budget_bytes as f64 / (1u64 << 30) as f64
                    );
                    eprintln!("[{done}/{total}] {variant} n={n} {}: {note}", pass.name());
                    records.push(skipped(note));
                    continue;
                }
                eprint!("[{done}/{total}] {variant} n={n} {} ... ", pass.name());
                let outcome = run_in_process::<BenchRecord, _, _>(
                    &exe,
                    [
                        "bench-case",
                        "--variant",
                        variant,
                        "--mode",
                        settings.mode.name(),
                        "--n",
                        &n.to_string(),
                        "--batch",
                        &settings.batch.to_string(),
                        "--heads",
                        &settings.heads.to_string(),
                        "--d-head",
                        &settings.d_head.to_string(),
                        "--pass",
                        pass.name(),
                        "--device",
                        &settings.device.to_string(),
                        "--reps",
                        &settings.reps.to_string(),
                        "--memory",
                        &settings.memory.to_string(),
                    ],
                )?;
                match outcome {
                    Ok(record) => {
                        eprintln!(
                            "{:.2} ms, peak {:.0} MiB",
                            record.median_ms.unwrap_or(f64::NAN),
                            record.peak_bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64
                        );
                        records.push(record);
                    }
                    Err(failure) => {
                        eprintln!("{failure}");
                        records.push(skipped(failure));
                    }
                }
            }
        }
    }
    fill_ratios(&mut records);
    Ok(records)
}

/// Runs one case in its own `efformer` process (`exe`, with `args`), which prints its record
/// as the last JSON line of its output. `Ok(Err(why))` when the case failed: the exit status
/// and the last line of its error output.
///
/// # Errors
/// If the process cannot be started.
pub fn run_in_process<
    R: serde::de::DeserializeOwned,
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
>(
    exe: &std::path::Path,
    args: I,
) -> Result<Result<R, String>, String> {
    let output = Command::new(exe)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run a bench case: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let record = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<R>(l).ok());
    Ok(match record {
        Some(r) if output.status.success() => Ok(r),
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().last().unwrap_or("no output");
            Err(format!("failed ({}): {last}", output.status))
        }
    })
}

/// The kind every other variant is compared with: exact attention, the default variant.
pub fn baseline_kind() -> &'static str {
    AttentionConfig::default().info().kind
}

/// Sets `ratio_to_full` from the `full` record with the same length, memory, mode and pass.
pub fn fill_ratios(records: &mut [BenchRecord]) {
    let full: Vec<(usize, usize, String, Pass, f64)> = records
        .iter()
        .filter(|r| r.variant == baseline_kind())
        .filter_map(|r| Some((r.n, r.memory, r.mode.clone(), r.pass, r.median_ms?)))
        .collect();
    for r in records.iter_mut() {
        r.ratio_to_full = full
            .iter()
            .find(|(n, memory, mode, pass, _)| {
                *n == r.n && *memory == r.memory && *mode == r.mode && *pass == r.pass
            })
            .and_then(|(_, _, _, _, base)| Some(r.median_ms? / base));
    }
}

/// `n`, or `n+m` with a memory of m positions.
fn length(r: &BenchRecord) -> String {
    if r.memory > 0 {
        format!("{}+{}", r.n, r.memory)
    } else {
        r.n.to_string()
    }
}

/// A table for the terminal.
pub fn table(records: &[BenchRecord]) -> String {
    let mut out = format!(
        "{:<20} {:>6} {:<17} {:>11} {:>17} {:>10} {:>12} {:>9}\n",
        "variant", "n", "pass", "median ms", "spread ms", "peak MiB", "tokens/s", "vs full"
    );
    for r in records {
        match r.median_ms {
            Some(median) => out.push_str(&format!(
                "{:<20} {:>6} {:<17} {:>11.2} {:>17} {:>10.0} {:>12.0} {:>9}\n",
                r.variant,
                length(r),
                r.pass.name(),
                median,
                format!(
                    "{:.1}–{:.1}",
                    r.min_ms.unwrap_or(median),
                    r.max_ms.unwrap_or(median)
                ),
                r.peak_bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64,
                r.tokens_per_s.unwrap_or(0.0),
                r.ratio_to_full
                    .map_or("-".to_string(), |x| format!("{x:.2}x")),
            )),
            None => out.push_str(&format!(
                "{:<20} {:>6} {:<17} {}\n",
                r.variant,
                length(r),
                r.pass.name(),
                r.note.as_deref().unwrap_or("skipped")
            )),
        }
    }
    out
}

/// Achieved GFLOP/s of matrix products on a device: a square product, the two products of
/// attention (QKᵀ and PV with 8 heads of 64), and full attention's forward.
#[derive(Clone, Debug, Serialize)]
pub struct GemmReport {
    /// Device.
    pub device: String,
    /// Sequence length / square size.
    pub n: usize,
    /// `[n, n]·[n, n]`.
    pub square_gflops: f64,
    /// `[1, 8, n, 64]·[1, 8, 64, n]`.
    pub qk_gflops: f64,
    /// `[1, 8, n, n]·[1, 8, n, 64]`.
    pub pv_gflops: f64,
    /// QKᵀ with Kᵀ stored contiguously (`[1, 8, 64, n]`) instead of as a transposed view.
    pub qk_contiguous_gflops: f64,
    /// Full attention forward, counting its two products (4·h·n²·d).
    pub attention_gflops: f64,
    /// The linear layers of `bench-train`'s model (8 × 1,024 tokens of width 256): `[m, k]·[k, n]`
    /// as `(m, k, n, GFLOP/s)`.
    pub linear_gflops: Vec<(usize, usize, usize, f64)>,
}

fn time_median(reps: usize, device: &Device, mut f: impl FnMut() -> f32) -> f64 {
    let _ = f();
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            let _ = f();
            let _ = device.sync();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Measures [`GemmReport`] at size `n`.
pub fn gemm_report(n: usize, device: &Device, name: &str, reps: usize) -> GemmReport {
    device.seed(1);
    let a = Tensor::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let probe = |t: Tensor<2>| t.narrow(0, 0, 1).sum().into_scalar::<f32>();
    let square = time_median(reps, device, || probe(a.clone().matmul(b.clone())));
    let q = Tensor::random([1, 8, n, 64], Distribution::Normal(0.0, 1.0), device);
    let k = Tensor::random([1, 8, n, 64], Distribution::Normal(0.0, 1.0), device);
    let p = Tensor::random([1, 8, n, n], Distribution::Normal(0.0, 1.0), device);
    let probe4 = |t: Tensor<4>| t.narrow(2, 0, 1).sum().into_scalar::<f32>();
    let qk = time_median(reps, device, || {
        probe4(q.clone().matmul(k.clone().swap_dims(2, 3)))
    });
    let pv = time_median(reps, device, || probe4(p.clone().matmul(k.clone())));
    let kt: Tensor<4> = Tensor::from_data(k.clone().swap_dims(2, 3).into_data(), device);
    let qk_contiguous = time_median(reps, device, || probe4(q.clone().matmul(kt.clone())));
    let full = AttentionConfig::default()
        .init(AttentionMode::Bidirectional, HeadDims::new(8, 64), device)
        .expect("full attention");
    let att = time_median(reps, device, || {
        probe4(full.attend(AttnInput::new(q.clone(), k.clone(), k.clone())))
    });
    let flop_sq = 2.0 * (n as f64).powi(3);
    let flop_qk = 2.0 * 8.0 * (n as f64).powi(2) * 64.0;
    let linear_gflops = [
        (8192, 256, 768),
        (8192, 256, 1024),
        (8192, 1024, 256),
        (256, 8192, 1024),
    ]
    .into_iter()
    .map(|(m, k, n)| {
        let a = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), device);
        let b = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), device);
        let t = time_median(reps, device, || probe(a.clone().matmul(b.clone())));
        (m, k, n, 2.0 * (m * k * n) as f64 / t / 1e9)
    })
    .collect();
    GemmReport {
        device: name.to_string(),
        n,
        square_gflops: flop_sq / square / 1e9,
        qk_gflops: flop_qk / qk / 1e9,
        pv_gflops: flop_qk / pv / 1e9,
        qk_contiguous_gflops: flop_qk / qk_contiguous / 1e9,
        attention_gflops: 2.0 * flop_qk / att / 1e9,
        linear_gflops,
    }
}

/// A memory is the keys before a causal layer's queries.
///
/// # Errors
/// A memory outside causal mode, named.
fn check_memory(memory: usize, mode: AttentionMode) -> Result<(), String> {
    if memory > 0 && mode != AttentionMode::Causal {
        return Err(format!(
            "--memory {memory}: a memory is the keys before a causal layer's queries; add --mode causal"
        ));
    }
    Ok(())
}

/// Every size of a benchmark is positive.
///
/// # Errors
/// The first option that is 0, named.
fn check_sizes(sizes: &[(&str, usize)]) -> Result<(), String> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(format!("--{name}: expected a positive number, got 0")),
        None => Ok(()),
    }
}
