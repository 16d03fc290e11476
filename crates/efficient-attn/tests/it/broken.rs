//! Deliberately broken variants: the contract suite must catch each one, in the check that
//! names its bug. If a check stopped catching its bug, these tests fail.

use burn::tensor::{Device, Distribution, Tensor};
use efficient_attn::testing::{Case, Check, Oracle, Spec, check_all_modes};
use efficient_attn::{
    AttentionCore, AttentionMode, AttnInput, CoreConfig, FullAttentionConfig, HeadDims,
};

/// Which bug a [`Broken`] variant has.
#[derive(Clone, Copy, Debug)]
enum Bug {
    /// Ignores the causal mask.
    LeakyCausal,
    /// Scales scores by 1/d instead of 1/sqrt(d).
    WrongScale,
    /// Centres keys with a mean over the batch instead of over the sequence.
    BatchMixing,
    /// Drops the key padding mask.
    IgnoresPadding,
    /// Stops the gradient of the keys.
    DetachedKeys,
    /// Adds fresh noise on every call.
    Nondeterministic,
}

struct Broken {
    bug: Bug,
    mode: AttentionMode,
}

impl AttentionCore for Broken {
    fn attend(&self, mut input: AttnInput) -> Tensor<4> {
        let [_, heads, _, _, d_k, d_v] = input.dims();
        let dims = HeadDims { heads, d_k, d_v };
        let device = input.query.device();
        let honest = |mode| {
            FullAttentionConfig::default()
                .init(mode, dims, &device)
                .unwrap()
        };
        match self.bug {
            Bug::LeakyCausal => honest(AttentionMode::Bidirectional).attend(input),
            Bug::WrongScale => {
                let d = input.query.dims()[3] as f64;
                input.query = input.query.mul_scalar(1.0 / d.sqrt());
                honest(self.mode).attend(input)
            }
            Bug::BatchMixing => {
                let mean = input.key.clone().mean_dim(0);
                input.key = input.key.sub(mean.mul_scalar(0.5));
                honest(self.mode).attend(input)
            }
            Bug::IgnoresPadding => {
                input.mask_pad_k = None;
                honest(self.mode).attend(input)
            }
            Bug::DetachedKeys => {
                input.key = input.key.detach();
                honest(self.mode).attend(input)
            }
            Bug::Nondeterministic => {
                let out = honest(self.mode).attend(input);
                let noise = out.random_like(Distribution::Normal(0.0, 1e-3));
                out.add(noise)
            }
        }
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }
}

fn spec(bug: Bug) -> Spec<Broken> {
    let build = move |mode, _: &Case, _: &Device| Broken { bug, mode };
    Spec::new(format!("{bug:?}"), &AttentionMode::ALL, build).exact(
        "claims to be full attention",
        Oracle::Full,
        1e-5,
        build,
    )
}

/// Asserts that `check` catches `bug`, and prints what it saw.
fn caught(bug: Bug, check: Check) {
    let device = Device::flex();
    match check_all_modes(&spec(bug), check, &device) {
        Ok(()) => panic!("the {check:?} check did not catch {bug:?}"),
        Err(v) => {
            assert_eq!(v.check, check);
            eprintln!("caught as expected: {v}");
        }
    }
}

#[test]
fn causal_check_catches_a_leaky_mask() {
    caught(Bug::LeakyCausal, Check::Causal);
}

#[test]
fn exact_check_catches_a_wrong_scale() {
    caught(Bug::WrongScale, Check::Exact);
}

#[test]
fn batch_check_catches_batch_mixing() {
    caught(Bug::BatchMixing, Check::Batch);
}

#[test]
fn padding_check_catches_ignored_padding() {
    caught(Bug::IgnoresPadding, Check::Padding);
}

#[test]
fn gradient_check_catches_a_detached_input() {
    caught(Bug::DetachedKeys, Check::Gradients);
}

#[test]
fn determinism_check_catches_noise() {
    caught(Bug::Nondeterministic, Check::Determinism);
}

/// Each bug passes the checks that are not about it: the suite's checks are independent, so a
/// failure points at the broken property.
#[test]
fn bugs_are_not_flagged_by_unrelated_checks() {
    let device = Device::flex();
    for (bug, unrelated) in [
        (Bug::LeakyCausal, Check::Batch),
        (Bug::WrongScale, Check::Padding),
        (Bug::BatchMixing, Check::Causal),
        (Bug::IgnoresPadding, Check::Causal),
        (Bug::DetachedKeys, Check::Exact),
    ] {
        check_all_modes(&spec(bug), unrelated, &device)
            .unwrap_or_else(|v| panic!("{bug:?} should pass {unrelated:?}: {v}"));
    }
}

/// What is wrong with a [`BrokenWindow`]: a window of `|i − j| ≤ W` (causal: `0 ≤ i − j ≤ W`)
/// on the block-sparse kernel, blocks of `W`, with one mistake in the plan or the rule.
#[derive(Clone, Copy, Debug)]
enum PatternBug {
    /// None: the honest window (the suite must pass it).
    Honest,
    /// The plan forgets the block before each query's own.
    DroppedKeyBlock,
    /// The band's left edge is one key short.
    BandOffByOne,
    /// In causal mode the plan keeps the block after each query's own and the band its right
    /// side, so later keys leak in.
    LeakingCausalBlock,
}

/// Half-width of the window.
const W: usize = 3;

struct BrokenWindow {
    bug: PatternBug,
    mode: AttentionMode,
}

impl AttentionCore for BrokenWindow {
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        use efficient_attn::testing::block_sparse::{
            BlockPlan, BlockSparse, ElementRule, block_sparse_attention,
        };
        let [_, _, n, _, d_k, _] = input.dims();
        let causal = self.mode.is_causal();
        let nb = n.div_ceil(W);
        let (back, ahead) = match self.bug {
            PatternBug::DroppedKeyBlock => (0, usize::from(!causal)),
            PatternBug::LeakingCausalBlock => (1, 1),
            _ => (1, usize::from(!causal)),
        };
        let (left, right) = match self.bug {
            PatternBug::BandOffByOne => (W - 1, if causal { 0 } else { W }),
            PatternBug::LeakingCausalBlock => (W, W),
            _ => (W, if causal { 0 } else { W }),
        };
        let plan = BlockPlan::look_around(W, nb, nb, back, ahead);
        block_sparse_attention(BlockSparse {
            query: input.query.mul_scalar(1.0 / (d_k as f64).sqrt()),
            key: input.key,
            value: input.value,
            mask_pad_k: input.mask_pad_k.as_ref(),
            plan: &plan,
            rule: ElementRule::Band { left, right },
            extra: None,
        })
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }
}

/// The window from its definition, as data (independent of plans and rules; the oracle adds
/// causality and padding).
fn window_mask(_: &BrokenWindow, input: &AttnInput) -> Option<efficient_attn::testing::DenseMask> {
    let [_, _, n, lk, _, _] = input.dims();
    Some(efficient_attn::testing::DenseMask::from_allowed(
        n,
        lk,
        |i, j| i.abs_diff(j) <= W,
    ))
}

fn window_spec(bug: PatternBug) -> Spec<BrokenWindow> {
    let build = move |mode, _: &Case, _: &Device| BrokenWindow { bug, mode };
    let modes = [AttentionMode::Bidirectional, AttentionMode::Causal];
    Spec::new(format!("{bug:?}"), &modes, build)
        .exact(
            "claims the window |i - j| <= W",
            Oracle::Pattern(window_mask),
            1e-5,
            build,
        )
        .causal_memory(false)
}

/// Asserts that `check` catches the pattern bug `bug` (in some mode).
fn pattern_caught(bug: PatternBug, check: Check) {
    match check_all_modes(&window_spec(bug), check, &Device::flex()) {
        Ok(()) => panic!("the {check:?} check did not catch {bug:?}"),
        Err(v) => {
            assert_eq!(v.check, check);
            eprintln!("caught as expected: {v}");
        }
    }
}

#[test]
fn the_honest_window_passes_the_pattern_checks() {
    for check in [Check::Shapes, Check::Exact, Check::Padding, Check::Causal] {
        check_all_modes(&window_spec(PatternBug::Honest), check, &Device::flex())
            .unwrap_or_else(|v| panic!("the honest window fails {check:?}: {v}"));
    }
}

#[test]
fn exact_check_catches_a_dropped_key_block() {
    pattern_caught(PatternBug::DroppedKeyBlock, Check::Exact);
}

#[test]
fn exact_check_catches_a_band_off_by_one() {
    pattern_caught(PatternBug::BandOffByOne, Check::Exact);
}

#[test]
fn causal_and_exact_checks_catch_a_leaking_causal_block() {
    pattern_caught(PatternBug::LeakingCausalBlock, Check::Causal);
    pattern_caught(PatternBug::LeakingCausalBlock, Check::Exact);
}
