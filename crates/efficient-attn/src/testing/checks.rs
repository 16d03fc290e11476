//! The checks of the contract suite, the inputs they make and how they compare outputs.

use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::{Builder, Case, Check, GradCheck, LeakCheck, Oracle, Spec, Violation};
use crate::extras::WithExtras;
use crate::interface::{AttentionCore, AttentionMode, AttnInput};
use crate::reference::oracle;
use crate::rng::SeededRng;

// ---------------------------------------------------------------------------------------------
// Inputs and comparisons

/// Random projected heads for `case`, drawn from `seed` (identical on every device).
pub fn random_input(case: &Case, seed: u64, device: &Device) -> AttnInput {
    let mut rng = SeededRng::new(seed);
    let q = rng.normal_tensor([case.batch, case.heads, case.seq_q, case.d_k], 1.0, device);
    let k = rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_k], 1.0, device);
    let v = rng.normal_tensor([case.batch, case.heads, case.seq_k, case.d_v], 1.0, device);
    AttnInput::new(q, k, v)
}

/// Padding flags for a batch: row 0 is right-padded by `right`, row 1 (if any) left-padded by
/// `left`, other rows unpadded.
pub fn pad_flags(batch: usize, seq: usize, right: usize, left: usize) -> Vec<Vec<bool>> {
    (0..batch)
        .map(|b| {
            (0..seq)
                .map(|p| match b {
                    0 => p + right >= seq,
                    1 => p < left,
                    _ => false,
                })
                .collect()
        })
        .collect()
}

fn bool_tensor(flags: &[Vec<bool>], device: &Device) -> Tensor<2, Bool> {
    let rows = flags.len();
    let cols = flags.first().map_or(0, Vec::len);
    let data: Vec<bool> = flags.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

fn to_vec(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// Compares `[batch, heads, seq, d]` tensors on the rows `keep(batch, seq)` selects:
/// `|a - b| <= tol * (1 + |b|)`, and both finite.
fn compare_rows(
    a: Tensor<4>,
    b: Tensor<4>,
    tol: f64,
    keep: impl Fn(usize, usize) -> bool,
    what: &str,
) -> Result<(), String> {
    let dims = a.dims();
    if dims != b.dims() {
        return Err(format!("{what}: shapes {:?} vs {:?}", dims, b.dims()));
    }
    let [nb, nh, nl, nd] = dims;
    let (va, vb) = (to_vec(a), to_vec(b));
    let mut worst: Option<(f64, [usize; 4], f32, f32)> = None;
    for bi in 0..nb {
        for hi in 0..nh {
            for li in 0..nl {
                if !keep(bi, li) {
                    continue;
                }
                for di in 0..nd {
                    let i = ((bi * nh + hi) * nl + li) * nd + di;
                    let (x, y) = (va[i], vb[i]);
                    if !x.is_finite() || !y.is_finite() {
                        return Err(format!(
                            "{what}: non-finite value at [{bi}, {hi}, {li}, {di}]: {x} vs {y}"
                        ));
                    }
                    let err = (x as f64 - y as f64).abs() / (1.0 + (y as f64).abs());
                    if worst.is_none_or(|w| err > w.0) {
                        worst = Some((err, [bi, hi, li, di], x, y));
                    }
                }
            }
        }
    }
    match worst {
        Some((err, at, x, y)) if err > tol => Err(format!(
            "{what}: error {err:.3e} > tolerance {tol:.1e} at {at:?} ({x} vs {y})"
        )),
        _ => Ok(()),
    }
}

fn all_rows(_: usize, _: usize) -> bool {
    true
}

/// Replaces the positions `flags[b][p] == true` of a `[batch, heads, seq, d]` tensor with fresh
/// noise of larger scale.
fn perturb_positions(t: Tensor<4>, flags: &[Vec<bool>], seed: u64) -> Tensor<4> {
    let [b, h, l, d] = t.dims();
    let device = t.device();
    let noise = SeededRng::new(seed)
        .normal_tensor([b, h, l, d], 3.0, &device)
        .add_scalar(1.0);
    let mask = bool_tensor(flags, &device)
        .reshape([b, 1, l, 1])
        .expand([b, h, l, d]);
    t.mask_where(mask, noise)
}

/// The device RNG is global, and tests run in parallel: variants are built under this lock
/// with the device seeded, so parameter initialisation is reproducible.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds with the device RNG seeded, holding the suite's build lock, and materialises the
/// parameters before releasing it.
pub fn build_seeded<C>(
    build: &Builder<C>,
    materialize: Option<fn(&C)>,
    mode: AttentionMode,
    case: &Case,
    device: &Device,
    seed: u64,
) -> C {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    let built = build(mode, case, device);
    if let Some(materialize) = materialize {
        materialize(&built);
    }
    built
}

/// Initialises every lazily initialised parameter of `module` now.
pub fn materialize<M: Module>(module: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Check 1: output shapes and finiteness.
pub fn check_shapes<C: AttentionCore>(
    spec: &Spec<C>,
    mode: AttentionMode,
    device: &Device,
) -> Result<(), String> {
    let mut cases = match mode {
        AttentionMode::Cross => vec![
            Case::cross(2, 2, 1, 5, 8),
            Case::cross(2, 2, 7, 13, 8),
            Case::cross(1, 3, 13, 4, 8),
        ],
        _ => vec![
            Case::self_attn(2, 2, 1, 8),
            Case::self_attn(2, 2, 7, 8),
            Case::self_attn(1, 3, 13, 8),
            Case::self_attn(2, 1, 33, 4),
        ],
    };
    // A value width different from the key width.
    cases.push(Case {
        d_v: 6,
        ..spec.case(mode, 2, 2, 9, 8)
    });
    if mode.is_causal() && spec.causal_memory {
        cases.push(Case::cross(2, 2, 5, 12, 8));
    }
    let fit = spec.fit_len;
    let mut cases: Vec<Case> = cases
        .into_iter()
        .map(|c| Case {
            seq_q: fit(c.seq_q),
            seq_k: fit(c.seq_k),
            ..c
        })
        .collect();
    cases.dedup();
    for (i, case) in cases.iter().enumerate() {
        let core = build_seeded(&spec.build, spec.materialize, mode, case, device, 1);
        let out = core.attend(spec.decorated(random_input(case, 10 + i as u64, device), mode));
        let want = [case.batch, case.heads, case.seq_q, case.d_v];
        if out.dims() != want {
            return Err(format!(
                "{case:?}: output shape {:?}, expected {want:?}",
                out.dims()
            ));
        }
        compare_rows(out.clone(), out, 0.0, all_rows, &format!("{case:?}"))?;
    }
    Ok(())
}

/// Check 2: equality with the dense oracle in every exact-regime configuration, with padding.
pub fn check_exact<C: AttentionCore>(
    spec: &Spec<C>,
    mode: AttentionMode,
    device: &Device,
) -> Result<(), String> {
    for exact in &spec.exact {
        for (i, case) in [spec.case(mode, 2, 2, 11, 8), spec.case(mode, 1, 2, 32, 4)]
            .iter()
            .enumerate()
        {
            let core = build_seeded(&exact.build, spec.materialize, mode, case, device, 2);
            let (right_q, right_k) = if exact.padded { (2, 1) } else { (0, 0) };
            let pad_q = pad_flags(case.batch, case.seq_q, right_q, 0);
            let pad_k = match mode {
                AttentionMode::Cross => pad_flags(case.batch, case.seq_k, right_k, 0),
                _ => pad_q.clone(),
            };
            let input = spec
                .decorated(random_input(case, 20 + i as u64, device), mode)
                .mask_pad_queries(bool_tensor(&pad_q, device))
                .mask_pad_keys(bool_tensor(&pad_k, device));
            let want = match &exact.oracle {
                Oracle::Full => oracle(&input, mode, None, None),
                Oracle::Pattern(pattern) => {
                    let pattern = pattern(&core, &input).ok_or_else(|| {
                        format!(
                            "exact case `{}` asks for the pattern oracle but the instance has no pattern",
                            exact.name
                        )
                    })?;
                    oracle(&input, mode, Some(&pattern), None)
                }
                Oracle::Reference(_, reference) => reference(&core, &input, mode),
            };
            let got = core.attend(input);
            compare_rows(
                got,
                want,
                exact.tolerance,
                |b, l| !pad_q[b][l],
                &format!("exact case `{}`, {case:?}", exact.name),
            )?;
        }
    }
    Ok(())
}

/// Check 3: changing padded positions leaves unpadded outputs unchanged.
pub fn check_padding<C: AttentionCore>(
    spec: &Spec<C>,
    mode: AttentionMode,
    device: &Device,
) -> Result<(), String> {
    let case = spec.case(mode, 2, 2, 13, 8);
    let core = build_seeded(&spec.build, spec.materialize, mode, &case, device, 3);
    let pad_q = pad_flags(case.batch, case.seq_q, 3, 2);
    let pad_k = match mode {
        AttentionMode::Cross => pad_flags(case.batch, case.seq_k, 2, 3),
        _ => pad_q.clone(),
    };
    let base = random_input(&case, 30, device);
    let masked = |input: AttnInput| {
        spec.decorated(input, mode)
            .mask_pad_queries(bool_tensor(&pad_q, device))
            .mask_pad_keys(bool_tensor(&pad_k, device))
    };
    let a = core.attend(masked(base.clone()));
    let changed = AttnInput::new(
        perturb_positions(base.query, &pad_q, 31),
        perturb_positions(base.key, &pad_k, 32),
        perturb_positions(base.value, &pad_k, 33),
    );
    let b = core.attend(masked(changed));
    compare_rows(b, a, spec.tolerance, |b, l| !pad_q[b][l], "padding")
}

/// Check 4: perturbing positions after `t` leaves outputs at positions up to `t` unchanged.
pub fn check_causal<C: AttentionCore>(spec: &Spec<C>, device: &Device) -> Result<(), String> {
    let mode = AttentionMode::Causal;
    let case = spec.case(mode, 2, 2, 13, 8);
    let core = build_seeded(&spec.build, spec.materialize, mode, &case, device, 4);
    let base = spec.decorated(random_input(&case, 40, device), mode);
    let reference = core.attend(base.clone());
    for t in [0, case.seq_q / 2, case.seq_q - 2] {
        let future: Vec<Vec<bool>> = (0..case.batch)
            .map(|_| (0..case.seq_q).map(|p| p > t).collect())
            .collect();
        let seed = 41 + t as u64;
        let changed = match spec.leak {
            LeakCheck::AllInputs => AttnInput::new(
                perturb_positions(base.query.clone(), &future, seed),
                perturb_positions(base.key.clone(), &future, seed + 100),
                perturb_positions(base.value.clone(), &future, seed + 200),
            ),
            LeakCheck::ValuesOnly(_) => AttnInput::new(
                base.query.clone(),
                base.key.clone(),
                perturb_positions(base.value.clone(), &future, seed + 200),
            ),
        };
        let out = core.attend(spec.decorated(changed, mode));
        compare_rows(
            out,
            reference.clone(),
            spec.tolerance,
            |_, l| l <= t,
            &format!("perturbing positions > {t}"),
        )?;
    }
    Ok(())
}

/// Check 5: each batch row depends only on its own input.
pub fn check_batch<C: AttentionCore>(
    spec: &Spec<C>,
    mode: AttentionMode,
    device: &Device,
) -> Result<(), String> {
    let case = spec.case(mode, 3, 2, 10, 8);
    let core = build_seeded(&spec.build, spec.materialize, mode, &case, device, 5);
    let base = spec.decorated(random_input(&case, 50, device), mode);
    let reference = core.attend(base.clone());
    let row1_q: Vec<Vec<bool>> = (0..case.batch).map(|b| vec![b == 1; case.seq_q]).collect();
    let row1_k: Vec<Vec<bool>> = (0..case.batch).map(|b| vec![b == 1; case.seq_k]).collect();
    let changed = AttnInput::new(
        perturb_positions(base.query, &row1_q, 51),
        perturb_positions(base.key, &row1_k, 52),
        perturb_positions(base.value, &row1_k, 53),
    );
    let out = core.attend(spec.decorated(changed, mode));
    compare_rows(
        out,
        reference,
        spec.tolerance,
        |b, _| b != 1,
        "rows 0 and 2 after changing row 1",
    )
}

/// Check 6: same seed, same output; same instance, same output.
pub fn check_determinism<C: AttentionCore>(
    spec: &Spec<C>,
    mode: AttentionMode,
    device: &Device,
) -> Result<(), String> {
    let case = spec.case(mode, 2, 2, 12, 8);
    let first = build_seeded(&spec.build, spec.materialize, mode, &case, device, 6);
    let second = build_seeded(&spec.build, spec.materialize, mode, &case, device, 6);
    let input = spec.decorated(random_input(&case, 60, device), mode);
    let a = first.attend(input.clone());
    let a2 = first.attend(input.clone());
    let b = second.attend(input);
    compare_rows(
        a2,
        a.clone(),
        1e-6,
        all_rows,
        "the same instance called twice",
    )?;
    compare_rows(
        b,
        a,
        1e-6,
        all_rows,
        "two instances built with the same seed",
    )
}

/// Check 7: autodiff gradients of `Σ out ⊙ w` with respect to q, k and v against central finite
/// differences along random directions, with padding (and causality in causal mode).
pub fn check_gradients<C: AttentionCore>(
    spec: &Spec<C>,
    mode: AttentionMode,
    device: &Device,
) -> Result<(), String> {
    let GradCheck::Central { eps, tolerance } = spec.grad else {
        return Ok(());
    };
    let ad = device.clone().autodiff();
    let case = spec.case(mode, 2, 1, 6, 4);
    let core = build_seeded(&spec.build, spec.materialize, mode, &case, &ad, 7);
    let base = random_input(&case, 70, &ad);
    let pad_q = pad_flags(case.batch, case.seq_q, 2, 0);
    let pad_k = match mode {
        AttentionMode::Cross => pad_flags(case.batch, case.seq_k, 1, 1),
        _ => pad_q.clone(),
    };
    let mut rng = SeededRng::new(71);
    // Padded query rows have unspecified outputs: give them zero weight.
    let w = rng
        .normal_tensor([case.batch, case.heads, case.seq_q, case.d_v], 1.0, &ad)
        .mask_fill(
            bool_tensor(&pad_q, &ad)
                .reshape([case.batch, 1, case.seq_q, 1])
                .expand([case.batch, case.heads, case.seq_q, case.d_v]),
            0.0,
        );
    let loss = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| {
        let input = spec
            .decorated(AttnInput::new(q, k, v), mode)
            .mask_pad_queries(bool_tensor(&pad_q, &ad))
            .mask_pad_keys(bool_tensor(&pad_k, &ad));
        core.attend(input).mul(w.clone()).sum()
    };
    let (q, k, v) = (
        base.query.clone().require_grad(),
        base.key.clone().require_grad(),
        base.value.clone().require_grad(),
    );
    let grads = loss(q.clone(), k.clone(), v.clone()).backward();
    let analytic = [
        ("q", q.grad(&grads)),
        ("k", k.grad(&grads)),
        ("v", v.grad(&grads)),
    ];
    for (which, (name, grad)) in analytic.into_iter().enumerate() {
        // No gradient means "does not depend on it" (e.g. a random synthesiser's queries):
        // the finite differences must then be zero too.
        let grad = grad.unwrap_or_else(|| {
            [&base.query, &base.key, &base.value][which]
                .zeros_like()
                .detach()
        });
        let x = [&base.query, &base.key, &base.value][which]
            .clone()
            .detach();
        for trial in 0..2 {
            let u = rng.normal_tensor(x.dims(), 1.0, &ad);
            let shifted = |sign: f64| {
                let mut inputs = [
                    base.query.clone().detach(),
                    base.key.clone().detach(),
                    base.value.clone().detach(),
                ];
                inputs[which] = x.clone().add(u.clone().mul_scalar(sign * eps));
                let [q, k, v] = inputs;
                loss(q, k, v).into_scalar::<f64>()
            };
            let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
            let exact: f64 = grad.clone().mul(u.clone()).sum().into_scalar::<f64>();
            if !numeric.is_finite() || !exact.is_finite() {
                return Err(format!(
                    "d/d{name}: non-finite ({exact} autodiff vs {numeric} numeric)"
                ));
            }
            let err = (numeric - exact).abs() / (1.0 + numeric.abs().max(exact.abs()));
            if err > tolerance {
                return Err(format!(
                    "d/d{name} along direction {trial}: autodiff {exact:.6} vs central difference {numeric:.6} (error {err:.2e} > {tolerance:.1e})"
                ));
            }
        }
    }
    Ok(())
}

/// The same instance's output on `device` and on `reference` (e.g. wgpu vs Flex), for every
/// mode, within `tolerance`. The module is built on `reference` and moved, so parameters agree.
pub fn check_cross_device<C: AttentionCore + Module>(
    spec: &Spec<C>,
    device: &Device,
    reference: &Device,
    tolerance: f64,
) -> Result<(), Violation> {
    for &mode in &spec.modes {
        let case = spec.case(mode, 2, 2, 11, 8);
        let on_ref = build_seeded(&spec.build, spec.materialize, mode, &case, reference, 8);
        let on_dev = on_ref.clone().to_device(device);
        let pad = pad_flags(case.batch, case.seq_q, 2, 1);
        let input = |d: &Device| {
            let i = spec.decorated(random_input(&case, 80, d), mode);
            if mode == AttentionMode::Cross {
                i
            } else {
                i.mask_pad(bool_tensor(&pad, d))
            }
        };
        let want = on_ref.attend(input(reference));
        let got = on_dev.attend(input(device));
        compare_rows(
            got.to_device(reference),
            want,
            tolerance,
            |b, l| mode == AttentionMode::Cross || !pad[b][l],
            "device vs reference",
        )
        .map_err(|detail| Violation {
            check: Check::Exact,
            variant: spec.name.clone(),
            mode,
            detail,
        })?;
    }
    Ok(())
}
