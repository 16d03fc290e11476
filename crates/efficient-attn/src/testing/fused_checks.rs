//! The fused exact attention against the composed tensor operations it replaces, on any
//! device the fused kernel serves (Flex, and the cubecl backends with the `cube` feature):
//! forward outputs and the gradients of q, k and v, with padding, causality (with a memory),
//! cross attention and lengths that do not divide the tiles.

use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::{SeededRng, composed};
use crate::kernels::fused;
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
pub fn max_rel_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
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

/// Forward and gradients of the exact attention `config` through the fused kernel on `device`
/// (autodiff is added) against its composed implementation on the same device.
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
        fused::flash_runs_fused(&q),
        "{device:?} does not run the fused attention"
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
