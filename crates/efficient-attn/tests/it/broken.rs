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
