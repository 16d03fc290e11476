//! The contract suite every attention variant must pass (feature `testing`).
//!
//! A variant is described by a [`Spec`]: how to build it for a mode and a problem size, in
//! which configurations it is exact (and against which oracle), and any documented exception.
//! For each supported mode the suite checks ([`Check`]):
//!
//! 1. [`Check::Shapes`]: output shapes and finiteness, with lengths that are not multiples of
//!    any block size, `seq_q != seq_k` in cross mode and a memory (`seq_k > seq_q`) in causal
//!    mode;
//! 2. [`Check::Exact`]: equality with the dense masked oracle in the variant's exact regime;
//! 3. [`Check::Padding`]: changing padded positions leaves unpadded outputs unchanged;
//! 4. [`Check::Causal`]: perturbing positions after `t` leaves outputs up to `t` unchanged;
//! 5. [`Check::Batch`]: each batch row depends only on its own input;
//! 6. [`Check::Determinism`]: two instances built with the same seed agree, and an instance
//!    gives the same output twice;
//! 7. [`Check::Gradients`]: autodiff agrees with central finite differences on tiny shapes;
//!
//! and, for a second device such as wgpu, [`check_cross_device`] compares it with a reference
//! device.
//!
//! Every check returns a [`Violation`] instead of panicking, so the suite's own tests can show
//! it catches deliberately broken variants. [`contract_tests!`](crate::contract_tests) turns the
//! registry ([`specs`]) into `#[test]` functions for one device.

mod checks;
mod fused_checks;
mod macros;
pub mod patterns;
mod sparse_checks;
pub mod specs;

pub use self::checks::*;
pub use self::fused_checks::*;
pub use self::sparse_checks::*;

use std::fmt;

use burn::tensor::{Device, Tensor};

use crate::config::Attention;
use crate::interface::{AttentionCore, AttentionMode, AttnInput};

/// Internals the tests and benchmarks reach (kernels, the dense oracle, the seeded generator,
/// pattern masks). Not covered by semver.
pub use crate::kernels::cpu::{flash, simd};
pub use crate::kernels::{block_sparse, dense, fused, prefix_sum};
pub use crate::mask::{DenseMask, causal_mask};
pub use crate::reference::{dense_attention, oracle, oracle_mask};
pub use crate::rng::SeededRng;

/// The composed tensor-operation implementation of a variant with a fused kernel: what runs on
/// devices the kernel does not serve (it serves Flex, and cubecl with the `cube` feature), and
/// the kernel's oracle (`None` for variants without one).
///
/// # Shapes
/// - input: see [`AttnInput`]; output: `[batch, heads, seq_q, d_v]`
pub fn composed(core: &Attention, input: AttnInput) -> Option<Tensor<4>> {
    match core {
        Attention::Full(a) => Some(a.attend_composed(input)),
        Attention::MemoryEfficient(a) => Some(a.attend_composed(input)),
        Attention::LinearTransformer(a) => Some(a.attend_composed(input)),
        _ => None,
    }
}

/// The environment variable naming the file where tests that could not run record why
/// (`cargo xtask test` sets it, prints the count at the end, and fails when
/// `EFFORMER_NO_SKIPS` is set, as CI sets it).
pub const SKIP_LOG_ENV: &str = "EFFORMER_SKIP_LOG";

/// Records that test `test` could not run, and why: a note on stderr and a line
/// `test: reason` in the file [`SKIP_LOG_ENV`] names, if any. A test calls it and returns, so
/// that a skip is never a silent pass.
pub fn skipped(test: &str, reason: &str) {
    use std::io::Write;
    eprintln!("skipped: {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        match file {
            // One write of the whole line: appends from parallel tests do not interleave.
            Ok(mut f) => {
                let _ = f.write_all(format!("{test}: {reason}\n").as_bytes());
            }
            Err(e) => panic!("cannot record a skipped test in {}: {e}", path.display()),
        }
    }
}

/// Nyströmformer's Newton–Schulz pseudo-inverse, for its convergence test.
///
/// # Shapes
/// - a: `[batch, heads, m, m]` → `[batch, heads, m, m]`
pub fn iterative_pinv(a: Tensor<4>, iterations: usize) -> Tensor<4> {
    crate::nystromformer::iterative_pinv(a, iterations)
}

/// Performer's random feature matrix (`m × d`, row-major), for its statistics tests.
pub fn draw_features(
    m: usize,
    d: usize,
    how: crate::FeatureDraw,
    seed: u64,
    draw: u64,
) -> Vec<f32> {
    crate::performer::draw_features(m, d, how, seed, draw)
}

/// A registered variant's contract: the specs the suite checks it with. Every variant's config
/// implements it in the variant's own file.
pub trait Contract {
    /// One spec per configuration family worth checking (e.g. Performer's two kernels).
    fn contract() -> Vec<Spec<Attention>>;
}

/// A problem size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Query length.
    pub seq_q: usize,
    /// Key/value length.
    pub seq_k: usize,
    /// Query/key width per head.
    pub d_k: usize,
    /// Value width per head.
    pub d_v: usize,
}

impl Case {
    /// A self-attention case (`seq_q = seq_k = seq`).
    pub fn self_attn(batch: usize, heads: usize, seq: usize, d: usize) -> Self {
        Self {
            batch,
            heads,
            seq_q: seq,
            seq_k: seq,
            d_k: d,
            d_v: d,
        }
    }

    /// A case with different query and key lengths.
    pub fn cross(batch: usize, heads: usize, seq_q: usize, seq_k: usize, d: usize) -> Self {
        Self {
            seq_q,
            seq_k,
            ..Self::self_attn(batch, heads, seq_q, d)
        }
    }
}

/// Builds a variant for a mode and a problem size on a device.
pub type Builder<C> = Box<dyn Fn(AttentionMode, &Case, &Device) -> C + Send + Sync>;

/// A reference computation: the variant, its input and mode in, the expected output out.
pub type ReferenceFn<C> = fn(&C, &AttnInput, AttentionMode) -> Tensor<4>;

/// The key positions each query may attend to, as data: `None` if the instance is not
/// exact softmax attention on a fixed pattern.
pub type PatternFn<C> = fn(&C, &AttnInput) -> Option<DenseMask>;

/// What an exact-regime configuration must equal.
pub enum Oracle<C> {
    /// Dense softmax attention with only padding and (in causal mode) causal masks.
    Full,
    /// Dense softmax attention restricted to a pattern (padding and causality are added by the
    /// oracle).
    Pattern(PatternFn<C>),
    /// Another computation of the same function (e.g. a kernel's masked quadratic form),
    /// named for messages.
    Reference(&'static str, ReferenceFn<C>),
}

/// A configuration in which the variant is exact.
pub struct ExactCase<C> {
    /// What the configuration is, for messages (e.g. "window >= N").
    pub name: &'static str,
    /// Builds it.
    pub build: Builder<C>,
    /// The oracle it must equal.
    pub oracle: Oracle<C>,
    /// Largest allowed `|out - oracle| / (1 + |oracle|)`.
    pub tolerance: f64,
    /// Whether the case is checked with padded inputs (some exact regimes, like Linformer's
    /// identity projection, hold only without padding).
    pub padded: bool,
}

/// Which inputs the causal check may perturb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeakCheck {
    /// Queries, keys and values after `t`.
    AllInputs,
    /// Only values after `t`, with the documented reason (e.g. LSH chunk boundaries depend on
    /// future keys).
    ValuesOnly(&'static str),
}

/// The finite-difference gradient check's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GradCheck {
    /// Central differences with step `eps`; agreement within `tolerance` relative to the
    /// larger of the two directional derivatives (plus `tolerance` absolute).
    Central {
        /// Step.
        eps: f64,
        /// Tolerance.
        tolerance: f64,
    },
    /// Not checked, with the reason (e.g. a piecewise-constant hash).
    Skip(&'static str),
}

/// A variant's contract: how to build it and what it promises.
pub struct Spec<C> {
    /// Name in messages.
    pub name: String,
    /// Modes it supports; the suite checks each.
    pub modes: Vec<AttentionMode>,
    /// Builds it in its general (possibly approximate) configuration.
    pub build: Builder<C>,
    /// Exact-regime configurations (at least one for every variant that has one).
    pub exact: Vec<ExactCase<C>>,
    /// The causal leak check's inputs.
    pub leak: LeakCheck,
    /// The gradient check's settings.
    pub grad: GradCheck,
    /// Whether causal mode is checked with a memory (`seq_k > seq_q`).
    pub causal_memory: bool,
    /// Tolerance of the invariance checks (padding, causality, batch, determinism):
    /// `|a - b| <= tolerance * (1 + |b|)`.
    pub tolerance: f64,
    /// Forces lazily initialised parameters while the build lock is held (Burn initialises
    /// parameters on first use, which would otherwise draw from the device RNG at an arbitrary
    /// later time). [`materialize`] does it for any module.
    pub materialize: Option<fn(&C)>,
    /// Adds what the variant needs besides q, k, v to every input the suite makes (a grid,
    /// global tokens), for a mode.
    pub decorate: Option<fn(AttnInput, AttentionMode) -> AttnInput>,
    /// Maps each sequence length the suite wants to one the variant accepts (e.g. a whole
    /// number of 2-D blocks).
    pub fit_len: fn(usize) -> usize,
}

impl<C> Spec<C> {
    /// A spec with the default checks: all inputs in the leak check, central differences
    /// (eps 1e-2, tolerance 2e-2 in f32), causal memory, invariance tolerance 1e-5.
    pub fn new(
        name: impl Into<String>,
        modes: &[AttentionMode],
        build: impl Fn(AttentionMode, &Case, &Device) -> C + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            modes: modes.to_vec(),
            build: Box::new(build),
            exact: Vec::new(),
            leak: LeakCheck::AllInputs,
            grad: GradCheck::Central {
                eps: 1e-2,
                tolerance: 2e-2,
            },
            causal_memory: true,
            tolerance: 1e-5,
            materialize: None,
            decorate: None,
            fit_len: |n| n,
        }
    }

    /// Decorates an input for `mode`.
    pub fn decorated(&self, input: AttnInput, mode: AttentionMode) -> AttnInput {
        match self.decorate {
            Some(f) => f(input, mode),
            None => input,
        }
    }

    /// A self-attention case (a cross case in cross mode: `seq_k = seq + 3`), lengths fitted.
    pub fn case(
        &self,
        mode: AttentionMode,
        batch: usize,
        heads: usize,
        seq: usize,
        d: usize,
    ) -> Case {
        let fit = self.fit_len;
        match mode {
            AttentionMode::Cross => Case::cross(batch, heads, fit(seq), fit(seq + 3), d),
            _ => Case::self_attn(batch, heads, fit(seq), d),
        }
    }

    /// Adds an exact-regime configuration.
    pub fn exact(
        mut self,
        name: &'static str,
        oracle: Oracle<C>,
        tolerance: f64,
        build: impl Fn(AttentionMode, &Case, &Device) -> C + Send + Sync + 'static,
    ) -> Self {
        self.exact.push(ExactCase {
            name,
            build: Box::new(build),
            oracle,
            tolerance,
            padded: true,
        });
        self
    }

    /// Adds an exact-regime configuration that holds only without padding.
    pub fn exact_unpadded(
        mut self,
        name: &'static str,
        oracle: Oracle<C>,
        tolerance: f64,
        build: impl Fn(AttentionMode, &Case, &Device) -> C + Send + Sync + 'static,
    ) -> Self {
        self = self.exact(name, oracle, tolerance, build);
        if let Some(last) = self.exact.last_mut() {
            last.padded = false;
        }
        self
    }

    /// Sets the causal leak check.
    pub fn leak(mut self, leak: LeakCheck) -> Self {
        self.leak = leak;
        self
    }

    /// Sets the gradient check.
    pub fn grad(mut self, grad: GradCheck) -> Self {
        self.grad = grad;
        self
    }

    /// Sets the invariance tolerance.
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Whether causal mode is checked with `seq_k > seq_q`.
    pub fn causal_memory(mut self, yes: bool) -> Self {
        self.causal_memory = yes;
        self
    }
}

/// One check of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Output shapes and finiteness.
    Shapes,
    /// Equality with the oracle in the exact regime.
    Exact,
    /// Padding invariance.
    Padding,
    /// No future leakage (causal mode only).
    Causal,
    /// Batch independence.
    Batch,
    /// Determinism under a seed.
    Determinism,
    /// Autodiff against finite differences.
    Gradients,
}

impl Check {
    /// All checks.
    pub const ALL: [Check; 7] = [
        Self::Shapes,
        Self::Exact,
        Self::Padding,
        Self::Causal,
        Self::Batch,
        Self::Determinism,
        Self::Gradients,
    ];
}

/// A broken promise: which check, variant and mode, and what was seen.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The check.
    pub check: Check,
    /// The variant.
    pub variant: String,
    /// The mode.
    pub mode: AttentionMode,
    /// What went wrong.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "contract {:?} violated by `{}` in {} mode: {}",
            self.check, self.variant, self.mode, self.detail
        )
    }
}

impl std::error::Error for Violation {}

/// Runs one check for every mode of `spec`, panicking with the first violation.
///
/// # Panics
/// On a violation.
#[track_caller]
pub fn run<C: AttentionCore>(spec: &Spec<C>, check: Check, device: &Device) {
    if let Err(v) = check_all_modes(spec, check, device) {
        panic!("{v}");
    }
}

/// Runs one check for every mode of `spec`.
pub fn check_all_modes<C: AttentionCore>(
    spec: &Spec<C>,
    check: Check,
    device: &Device,
) -> Result<(), Violation> {
    for &mode in &spec.modes {
        let result = match check {
            Check::Shapes => check_shapes(spec, mode, device),
            Check::Exact => check_exact(spec, mode, device),
            Check::Padding => check_padding(spec, mode, device),
            Check::Causal if mode.is_causal() => check_causal(spec, device),
            Check::Causal => Ok(()),
            Check::Batch => check_batch(spec, mode, device),
            Check::Determinism => check_determinism(spec, mode, device),
            Check::Gradients => check_gradients(spec, mode, device),
        };
        result.map_err(|detail| Violation {
            check,
            variant: spec.name.clone(),
            mode,
            detail,
        })?;
    }
    Ok(())
}

/// Every spec of every registered variant, with its `kind`.
pub fn registered_specs() -> Vec<(&'static str, Spec<Attention>)> {
    let all: Vec<Vec<(&'static str, Spec<Attention>)>> =
        crate::__registered_variants!(__registered_specs,);
    all.into_iter().flatten().collect()
}
