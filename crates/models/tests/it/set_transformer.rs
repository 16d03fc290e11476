//! Set Transformer blocks, paper and reference styles: SAB and ISAB permutation-equivariant,
//! ISAB's summaries and PMA permutation-invariant, padded elements changing nothing and padded
//! = unpadded on the real elements.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use efficient_attn::testing::SeededRng;
use models::{SetBlockConfig, SetStyle};

use super::max_diff;

const D: usize = 16;

fn config(style: SetStyle) -> SetBlockConfig {
    SetBlockConfig {
        d_model: D,
        n_heads: 4,
        style,
        layer_norm: style == SetStyle::Paper,
        ..Default::default()
    }
}

fn set(b: usize, n: usize, seed: u64, device: &Device) -> Tensor<3> {
    SeededRng::new(seed).normal_tensor([b, n, D], 1.0, device)
}

/// `x` with its elements reordered by `perm` (the same for every batch row).
fn permute(x: Tensor<3>, perm: &[usize]) -> Tensor<3> {
    let device = x.device();
    let idx: Vec<i64> = perm.iter().map(|&i| i as i64).collect();
    x.select(
        1,
        Tensor::<1, Int>::from_data(TensorData::new(idx, [perm.len()]), &device),
    )
}

const PERM: [usize; 9] = [4, 0, 8, 2, 7, 1, 6, 3, 5];

#[test]
fn sab_and_isab_are_permutation_equivariant_and_summaries_invariant() {
    let device = Device::flex();
    for style in [SetStyle::Paper, SetStyle::Reference] {
        let c = config(style);
        let sab = c.sab("sab", &device).unwrap();
        let isab = c.isab(5, "isab", &device).unwrap();
        let x = set(2, 9, 1, &device);
        let px = permute(x.clone(), &PERM);
        let d = max_diff(
            sab.forward(px.clone(), None),
            permute(sab.forward(x.clone(), None), &PERM),
        );
        assert!(d < 1e-5, "{style:?} SAB: {d:e}");
        let d = max_diff(
            isab.forward(px.clone(), None),
            permute(isab.forward(x.clone(), None), &PERM),
        );
        assert!(d < 1e-5, "{style:?} ISAB: {d:e}");
        let points = isab.inducing.val().expand([2, 5, D]);
        let h = isab.summarise.forward(points.clone(), x, None);
        let ph = isab.summarise.forward(points, px, None);
        assert!(
            max_diff(h, ph) < 1e-5,
            "{style:?}: ISAB's summaries are invariant"
        );
    }
}

#[test]
fn pma_is_permutation_invariant() {
    let device = Device::flex();
    for style in [SetStyle::Paper, SetStyle::Reference] {
        let pma = config(style).pma(2, "pma", &device).unwrap();
        let x = set(3, 9, 2, &device);
        let pooled = pma.forward(x.clone(), None);
        assert_eq!(pooled.dims(), [3, 2, D]);
        let d = max_diff(pooled, pma.forward(permute(x, &PERM), None));
        assert!(d < 1e-5, "{style:?} PMA: {d:e}");
    }
}

#[test]
fn padded_elements_change_nothing_and_padded_equals_unpadded() {
    let device = Device::flex();
    for style in [SetStyle::Paper, SetStyle::Reference] {
        let c = config(style);
        let sab = c.sab("sab", &device).unwrap();
        let isab = c.isab(4, "isab", &device).unwrap();
        let pma = c.pma(3, "pma", &device).unwrap();
        let real = set(1, 6, 3, &device);
        let padded = |fill: u64| Tensor::cat(vec![real.clone(), set(1, 4, fill, &device)], 1);
        let pad = Tensor::<2, Bool>::from_data(
            TensorData::new((0..10).map(|i| i >= 6).collect::<Vec<_>>(), [1, 10]),
            &device,
        );
        let (a, b) = (padded(10), padded(11));
        let head = |t: Tensor<3>| t.narrow(1, 0, 6);
        // SAB and ISAB: real rows equal the unpadded set's, whatever the padding holds.
        type Block<'a> = &'a dyn Fn(Tensor<3>, Option<Tensor<2, Bool>>) -> Tensor<3>;
        let blocks: [(&str, Block); 2] = [
            ("SAB", &|x, p| sab.forward(x, p)),
            ("ISAB", &|x, p| isab.forward(x, p)),
        ];
        for (name, f) in blocks {
            let unpadded = f(real.clone(), None);
            let da = max_diff(head(f(a.clone(), Some(pad.clone()))), unpadded.clone());
            let db = max_diff(head(f(b.clone(), Some(pad.clone()))), unpadded);
            assert!(da < 1e-5 && db < 1e-5, "{style:?} {name}: {da:e} {db:e}");
        }
        let unpadded = pma.forward(real.clone(), None);
        let d = max_diff(pma.forward(a, Some(pad.clone())), unpadded.clone());
        assert!(d < 1e-5, "{style:?} PMA: {d:e}");
        // Without the mask the padding would matter (so the check above can fail).
        let d = max_diff(pma.forward(b, None), unpadded);
        assert!(
            d > 1e-4,
            "{style:?}: unmasked padding changes the pooled output"
        );
    }
}

#[test]
fn a_cross_less_attention_kind_is_a_config_error_naming_the_key() {
    let device = Device::flex();
    let mut c = config(SetStyle::Paper);
    c.attention = efficient_attn::TransformerXlConfig::default().into();
    let err = c.sab("encoder[0]", &device).unwrap_err();
    assert_eq!(err.path, "encoder[0].attention");
    c = config(SetStyle::Paper);
    c.n_heads = 3;
    assert_eq!(c.sab("sab", &device).unwrap_err().path, "sab.n_heads");
}

#[test]
fn the_set_transformer_is_permutation_invariant_and_ignores_padding() {
    let device = Device::flex();
    for (style, inducing) in [(SetStyle::Paper, 4), (SetStyle::Reference, 0)] {
        let model = models::SetTransformerConfig {
            blocks: config(style),
            d_input: 2,
            inducing,
            seeds: 2,
            d_output: 3,
            ..Default::default()
        }
        .init(&device)
        .unwrap();
        let x = SeededRng::new(5).normal_tensor([2, 9, 2], 1.0, &device);
        let y = model.forward(x.clone(), None);
        assert_eq!(y.dims(), [2, 2, 3]);
        let d = max_diff(y.clone(), model.forward(permute(x.clone(), &PERM), None));
        assert!(
            d < 1e-5,
            "{style:?}: permutation changed the output by {d:e}"
        );
        let extra = SeededRng::new(6).normal_tensor([2, 3, 2], 1.0, &device);
        let pad = Tensor::<2, Bool>::from_data(
            TensorData::new((0..24).map(|i| i % 12 >= 9).collect::<Vec<_>>(), [2, 12]),
            &device,
        );
        let padded = model.forward(Tensor::cat(vec![x, extra], 1), Some(pad));
        let d = max_diff(y, padded);
        assert!(d < 1e-5, "{style:?}: padding changed the output by {d:e}");
    }
}
