//! The fused exact and kernel attentions against the composed tensor operations they replace,
//! on any device the fused kernels serve (Flex, and the cubecl backends with the `cube`
//! feature): forward outputs and the gradients of q, k and v, with padding, causality (with a
//! memory), cross attention and lengths that do not divide the tiles or chunks.

use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::{SeededRng, composed};
use crate::kernels::{fused, prefix_sum};
use crate::{Attention, AttentionConfig, AttentionCore, AttentionMode, AttnInput, HeadDims};

/// Padding flags `[batch × seq]` (`true` = padded): the last `padded[b]` positions of row `b`.
pub fn right_padded(batch: usize, seq: usize, padded: &[usize]) -> Vec<bool> {
    (0..batch * seq)
        .map(|i| i / seq < padded.len() && i % seq >= seq - padded[i / seq])
        .collect()
}

/// A `[rows, columns]` boolean tensor of `flags`.
pub fn bool_mask(flags: Vec<bool>, dims: [usize; 2], device: &Device) -> Tensor<2, Bool> {
    Tensor::from_data(TensorData::new(flags, dims), device)
}

/// Max relative difference `|a - b| / (1 + |b|)`.
pub fn max_rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().add_scalar(1.0);
    a.sub(b).abs().div(scale).max().into_scalar::<f32>()
}

/// One comparison's shape.
#[derive(Clone, Debug)]
pub struct FusedCase {
    /// Self (bidirectional or causal) or cross attention.
    pub mode: AttentionMode,
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Query length.
    pub seq_q: usize,
    /// Key length.
    pub seq_k: usize,
    /// Query/key width.
    pub d_k: usize,
    /// Value width.
    pub d_v: usize,
}

/// Forward and gradients of the attention `config` (one with a composed form: `full`,
/// `memory-efficient`, `linear-transformer`) through its fused kernel on `device` (autodiff is
/// added) against its composed implementation on the same device.
///
/// # Panics
/// When `device` does not run the fused kernel, or a difference exceeds its tolerance.
pub fn check_fused_against_composed(config: AttentionConfig, case: &FusedCase, device: &Device) {
    let device = device.clone().autodiff();
    let dims = HeadDims {
        heads: case.heads,
        d_k: case.d_k,
        d_v: case.d_v,
    };
    let core: Attention = config.init(case.mode, dims, &device).unwrap();
    let mut rng = SeededRng::new(case.seq_q as u64 * 31 + case.seq_k as u64);
    let q = rng.normal_tensor([case.batch, case.heads, case.seq_q, case.d_k], 1.0, &device);
    let k = rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_k], 1.0, &device);
    let v = rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_v], 1.0, &device);
    let w = rng.normal_tensor([case.batch, case.heads, case.seq_q, case.d_v], 1.0, &device);
    assert!(
        fused::flash_runs_fused(&q) && fused::attention_runs_fused(&q),
        "{device:?} does not run the fused attentions"
    );
    let key_pad = bool_mask(
        right_padded(case.batch, case.seq_k, &[0, 3]),
        [case.batch, case.seq_k],
        &device,
    );
    let query_pad = (case.seq_q == case.seq_k).then(|| key_pad.clone());
    let run = |fused_path: bool| {
        let (q, k, v) = (
            q.clone().detach().require_grad(),
            k.clone().detach().require_grad(),
            v.clone().detach().require_grad(),
        );
        let mut input =
            AttnInput::new(q.clone(), k.clone(), v.clone()).mask_pad_keys(key_pad.clone());
        if let Some(p) = &query_pad {
            input = input.mask_pad_queries(p.clone());
        }
        let out = if fused_path {
            core.attend(input)
        } else {
            composed(&core, input).expect("an exact variant has a composed form")
        };
        // Padded query rows are unspecified: weight them 0.
        let keep = match &query_pad {
            Some(p) => p
                .clone()
                .bool_not()
                .float()
                .reshape([case.batch, 1, case.seq_q, 1])
                .expand([case.batch, case.heads, case.seq_q, case.d_v]),
            None => w.ones_like(),
        };
        let grads = out
            .clone()
            .mul(w.clone())
            .mul(keep.clone())
            .sum()
            .backward();
        (
            out.mul(keep).inner(),
            q.grad(&grads).unwrap(),
            k.grad(&grads).unwrap(),
            v.grad(&grads).unwrap(),
        )
    };
    let (fo, fq, fk, fv) = run(true);
    let (co, cq, ck, cv) = run(false);
    let name = config.info().kind;
    for (what, a, b, tol) in [
        ("output", fo, co, 1e-5),
        ("dq", fq, cq, 2e-5),
        ("dk", fk, ck, 2e-5),
        ("dv", fv, cv, 2e-5),
    ] {
        let d = max_rel_diff(a, b);
        assert!(d < tol, "{name} {:?}: {what} differs by {d:e}", case.mode);
    }
}

/// Bidirectional, causal (equal lengths and with a memory) and cross cases with odd sizes.
pub fn fused_cases() -> Vec<FusedCase> {
    vec![
        FusedCase {
            mode: AttentionMode::Bidirectional,
            batch: 2,
            heads: 2,
            seq_q: 37,
            seq_k: 37,
            d_k: 8,
            d_v: 8,
        },
        FusedCase {
            mode: AttentionMode::Causal,
            batch: 2,
            heads: 3,
            seq_q: 29,
            seq_k: 29,
            d_k: 8,
            d_v: 6,
        },
        FusedCase {
            mode: AttentionMode::Causal,
            batch: 2,
            heads: 1,
            seq_q: 11,
            seq_k: 30,
            d_k: 4,
            d_v: 4,
        },
        FusedCase {
            mode: AttentionMode::Cross,
            batch: 2,
            heads: 2,
            seq_q: 13,
            seq_k: 41,
            d_k: 8,
            d_v: 5,
        },
    ]
}

/// `(output, d first input, d second input, d third input)` of a run.
type Grads4 = (Tensor<4>, Tensor<4>, Tensor<4>, Tensor<4>);

/// The output of `f(q, k, v)` and the gradients of `Σ out ⊙ w`, on autodiff leaves.
fn run_with_grads(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    w: &Tensor<4>,
    f: impl Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
) -> Grads4 {
    let (q, k, v) = (
        q.clone().detach().require_grad(),
        k.clone().detach().require_grad(),
        v.clone().detach().require_grad(),
    );
    let out = f(q.clone(), k.clone(), v.clone());
    let grads = out.clone().mul(w.clone()).sum().backward();
    (
        out.inner(),
        q.grad(&grads).unwrap(),
        k.grad(&grads).unwrap(),
        v.grad(&grads).unwrap(),
    )
}

fn assert_close(what: &str, fused: Grads4, composed: Grads4, tol: f32) {
    for (name, a, b, t) in [
        ("output", fused.0, composed.0, tol / 2.0),
        ("d q", fused.1, composed.1, tol),
        ("d k", fused.2, composed.2, tol),
        ("d v", fused.3, composed.3, tol),
    ] {
        let d = max_rel_diff(a, b);
        assert!(d < t, "{what}: {name} differs by {d:e}");
    }
}

/// The fused kernel attention on features (`prefix_sum::bidirectional` / `causal_chunked` on
/// positive features) against the composed prefix sums on `device`: bidirectional (and cross
/// lengths, and longer than one partial state) and causal with ragged chunks, a prefix of keys before the first query and a chunk
/// longer than the sequence; output and gradients.
///
/// # Panics
/// When `device` does not run the fused kernel attention, or a difference exceeds 2e-5.
pub fn check_kernel_attention_against_composed(device: &Device) {
    let device = device.clone().autodiff();
    let mut rng = SeededRng::new(4);
    for (seq_q, seq_k, chunk) in [
        (29, 29, None),
        (13, 40, None),
        (40, 13, None),
        // Longer than one bidirectional partial state (256 positions on cubecl).
        (300, 530, None),
        (29, 29, Some(6)),
        (11, 30, Some(4)),
        (8, 8, Some(64)),
    ] {
        let phi =
            |rng: &mut SeededRng, n: usize| rng.normal_tensor([2, 3, n, 7], 1.0, &device).exp();
        let q = phi(&mut rng, seq_q);
        let k = phi(&mut rng, seq_k);
        let v = rng.normal_tensor([2, 3, seq_k, 5], 1.0, &device);
        let w = rng.normal_tensor([2, 3, seq_q, 5], 1.0, &device);
        assert!(
            fused::attention_runs_fused(&q),
            "{device:?} does not run the fused kernel attention"
        );
        let run = |fused_op: bool| {
            run_with_grads(&q, &k, &v, &w, |q, k, v| match (chunk, fused_op) {
                (None, true) => prefix_sum::bidirectional(q, k, v),
                (None, false) => prefix_sum::bidirectional_composed(q, k, v),
                (Some(c), true) => prefix_sum::causal_chunked(q, k, v, c),
                (Some(c), false) => prefix_sum::causal_chunked_composed(q, k, v, c),
            })
        };
        let what = format!("{seq_q}x{seq_k} chunk {chunk:?}");
        assert_close(&what, run(true), run(false), 2e-5);
    }
}

/// The fused kernel attention with `φ = elu + 1` and key padding applied inside
/// (`fused::linear::elu_kernel_attention`) against the features, the zeroed padded keys and
/// the composed prefix sums on `device`: bidirectional, cross lengths, causal with ragged
/// chunks and a prefix of keys, a batch row whose keys are all padded (the normaliser's
/// floor); output and gradients of the raw q, k, v.
///
/// # Panics
/// When `device` does not run the fused kernel attention, or a difference exceeds 2e-5.
pub fn check_elu_kernel_attention_against_composed(device: &Device) {
    use burn::tensor::activation::elu;
    let device = device.clone().autodiff();
    let mut rng = SeededRng::new(5);
    for (seq_q, seq_k, chunk, padded) in [
        (23, 23, None, vec![0, 5]),
        (9, 31, None, vec![3]),
        (23, 23, Some(5), vec![4, 0]),
        (10, 27, Some(4), vec![]),
        (10, 27, Some(4), vec![2, 6]),
        // A batch row with every key padded: every normaliser is at its floor.
        (12, 12, Some(4), vec![0, 12]),
        (9, 9, None, vec![9, 0]),
    ] {
        let q = rng.normal_tensor([2, 3, seq_q, 6], 1.0, &device);
        let k = rng.normal_tensor([2, 3, seq_k, 6], 1.0, &device);
        let v = rng.normal_tensor([2, 3, seq_k, 4], 1.0, &device);
        let w = rng.normal_tensor([2, 3, seq_q, 4], 1.0, &device);
        assert!(
            fused::attention_runs_fused(&q),
            "{device:?} does not run the fused kernel attention"
        );
        let key_pad = (!padded.is_empty())
            .then(|| bool_mask(right_padded(2, seq_k, &padded), [2, seq_k], &device));
        let run = |fused_op: bool| {
            run_with_grads(&q, &k, &v, &w, |q, k, v| {
                if fused_op {
                    return fused::linear::elu_kernel_attention(q, k, v, key_pad.as_ref(), chunk);
                }
                let phi = |x: Tensor<4>| elu(x, 1.0).add_scalar(1.0);
                let phi_k = prefix_sum::zero_padded(phi(k), key_pad.as_ref());
                match chunk {
                    None => prefix_sum::bidirectional_composed(phi(q), phi_k, v),
                    Some(c) => prefix_sum::causal_chunked_composed(phi(q), phi_k, v, c),
                }
            })
        };
        let what = format!("{seq_q}x{seq_k} chunk {chunk:?} padded {padded:?}");
        assert_close(&what, run(true), run(false), 2e-5);
    }
}
