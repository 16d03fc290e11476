//! Mixture of experts (Switch top-1, GShard / ST-MoE top-2): the invariants of the notes, and
//! the dispatch by index against a dense oracle that runs every expert on every token.

use burn::module::Param;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use efficient_attn::testing::SeededRng;
use models::{FeedForwardKind, MixtureOfExperts, MixtureOfExpertsConfig, Routing};

use super::max_diff;

const D: usize = 8;

fn moe(config: MixtureOfExpertsConfig, device: &Device) -> MixtureOfExperts {
    config.check("moe").unwrap();
    config.init(FeedForwardKind::Gelu, D, 16, 0.0, device)
}

fn input(b: usize, t: usize, seed: u64, device: &Device) -> Tensor<3> {
    SeededRng::new(seed).normal_tensor([b, t, D], 1.0, device)
}

/// Every expert on every token, combined with the gates of the notes (top-1: `p_e`; top-2:
/// the two best renormalised, both sent).
fn dense_oracle(m: &MixtureOfExperts, x: Tensor<3>, top2: bool) -> Tensor<3> {
    let [b, t, _] = x.dims();
    let p = softmax(m.router.forward(x.clone()), 2);
    let probs = p
        .clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let e_count = m.experts.len();
    let outs: Vec<Tensor<3>> = m.experts.iter().map(|f| f.forward(x.clone())).collect();
    let mut weights = vec![0f32; b * t * e_count];
    for i in 0..b * t {
        let row = &probs[i * e_count..(i + 1) * e_count];
        let mut order: Vec<usize> = (0..e_count).collect();
        order.sort_by(|&a, &c| row[c].partial_cmp(&row[a]).unwrap().then(a.cmp(&c)));
        if top2 {
            let total = row[order[0]] + row[order[1]];
            weights[i * e_count + order[0]] = row[order[0]] / total;
            weights[i * e_count + order[1]] = row[order[1]] / total;
        } else {
            weights[i * e_count + order[0]] = row[order[0]];
        }
    }
    let w = Tensor::<3>::from_data(TensorData::new(weights, [b, t, e_count]), &x.device());
    outs.into_iter()
        .enumerate()
        .map(|(e, y)| y * w.clone().narrow(2, e, 1))
        .reduce(|a, c| a + c)
        .unwrap()
}

#[test]
fn one_expert_is_the_dense_feed_forward_exactly() {
    let device = Device::flex();
    for routing in [Routing::Switch, Routing::Top2] {
        let m = moe(
            MixtureOfExpertsConfig {
                routing,
                experts: 1,
                ..Default::default()
            },
            &device,
        );
        let x = input(2, 13, 1, &device);
        let (y, report) = m.forward(x.clone(), None, false, false);
        assert_eq!(report.dropped, 0);
        assert_eq!(max_diff(y, m.experts[0].forward(x)), 0.0, "{routing:?}");
    }
}

#[test]
fn dispatch_by_index_equals_every_expert_on_every_token() {
    let device = Device::flex();
    for (routing, top2) in [(Routing::Switch, false), (Routing::Top2, true)] {
        let m = moe(
            MixtureOfExpertsConfig {
                routing,
                experts: 4,
                eval_capacity_factor: 4.0,
                second_threshold: 0.0,
                ..Default::default()
            },
            &device,
        );
        let x = input(3, 11, 2, &device);
        let (y, report) = m.forward(x.clone(), None, false, false);
        assert_eq!(report.dropped, 0, "capacity factor >= E drops nothing");
        assert_eq!(report.assigned, 33 * if top2 { 2 } else { 1 });
        let d = max_diff(y, dense_oracle(&m, x, top2));
        assert!(d < 1e-5, "{routing:?}: {d:e}");
    }
}

/// A router whose weights are zero (uniform probabilities), or that sends every token to
/// expert 0 with probability ~1.
fn with_router(mut m: MixtureOfExperts, collapse: bool) -> MixtureOfExperts {
    let w = m.router.weight.val();
    let [d, e] = w.dims();
    let mut values = vec![0f32; d * e];
    if collapse {
        // Inputs are shifted positive below: a large weight from every input to expert 0.
        for i in 0..d {
            values[i * e] = 100.0;
        }
    }
    m.router.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(values, [d, e]),
        &w.device(),
    ));
    m
}

#[test]
fn balance_and_z_losses_take_their_reference_values() {
    let device = Device::flex();
    let e = 4;
    let config = MixtureOfExpertsConfig {
        experts: e,
        balance_coef: 1.0,
        z_loss_coef: 1.0,
        ..Default::default()
    };
    let x = input(2, 9, 3, &device);
    let (_, uniform) =
        with_router(moe(config.clone(), &device), false).forward(x.clone(), None, false, false);
    let balance = uniform.balance_loss.into_scalar::<f32>();
    assert!((balance - 1.0).abs() < 1e-6, "uniform routing: {balance}");
    let z = uniform.z_loss.into_scalar::<f32>();
    let ln_e = (e as f32).ln();
    assert!((z - ln_e * ln_e).abs() < 1e-5, "zero logits: {z}");
    let positive = x.abs().add_scalar(0.5);
    let (_, collapsed) =
        with_router(moe(config, &device), true).forward(positive, None, false, false);
    let balance = collapsed.balance_loss.into_scalar::<f32>();
    assert!((balance - e as f32).abs() < 1e-4, "collapse: {balance}");
    assert_eq!(
        collapsed.load[0],
        collapsed.capacity * 2,
        "one expert, full"
    );
}

#[test]
fn permuting_experts_with_their_router_columns_changes_nothing() {
    let device = Device::flex();
    for routing in [Routing::Switch, Routing::Top2] {
        let config = MixtureOfExpertsConfig {
            routing,
            experts: 4,
            eval_capacity_factor: 0.75,
            ..Default::default()
        };
        let m = moe(config, &device);
        let x = input(2, 16, 4, &device);
        let (y, report) = m.forward(x.clone(), None, false, false);
        assert!(report.dropped > 0, "capacity binds in this case");
        let perm = [2usize, 0, 3, 1];
        let mut permuted = m.clone();
        permuted.experts = perm.iter().map(|&i| m.experts[i].clone()).collect();
        let w = m.router.weight.val();
        let cols: Vec<Tensor<2>> = perm.iter().map(|&i| w.clone().narrow(1, i, 1)).collect();
        permuted.router.weight = Param::from_tensor(Tensor::cat(cols, 1));
        let (z, _) = permuted.forward(x, None, false, false);
        let d = max_diff(y, z);
        assert!(d < 1e-6, "{routing:?}: {d:e}");
    }
}

#[test]
fn no_expert_takes_more_than_its_capacity_and_drops_are_counted() {
    let device = Device::flex();
    for routing in [Routing::Switch, Routing::Top2] {
        let m = moe(
            MixtureOfExpertsConfig {
                routing,
                experts: 4,
                capacity_factor: 0.5,
                min_capacity: 1,
                jitter: 0.0,
                ..Default::default()
            },
            &device,
        );
        // One group, so every expert's load is its fill in that group.
        let (_, r) = m.forward(input(1, 24, 5, &device), None, false, true);
        assert_eq!(r.capacity, 3, "⌊24 · 0.5 / 4⌋");
        assert!(r.load.iter().all(|&l| l <= r.capacity), "{r:?}");
        assert_eq!(r.load.iter().sum::<usize>() + r.dropped, r.assigned);
        assert!(r.dropped > 0);
    }
}

#[test]
fn padded_tokens_are_not_routed_and_change_nothing() {
    let device = Device::flex();
    let m = moe(
        MixtureOfExpertsConfig {
            routing: Routing::Top2,
            experts: 3,
            eval_capacity_factor: 3.0,
            second_threshold: 0.0,
            ..Default::default()
        },
        &device,
    );
    let x = input(1, 10, 6, &device);
    let (short, _) = m.forward(x.clone().narrow(1, 0, 7), None, false, false);
    let pad = Tensor::<2, Bool>::from_data(
        TensorData::new((0..10).map(|i| i >= 7).collect::<Vec<_>>(), [1, 10]),
        &device,
    );
    let (long, report) = m.forward(x, Some(pad), false, false);
    assert_eq!(
        report.assigned, 14,
        "two assignments per real token, none for padding"
    );
    let padded_rows = long
        .clone()
        .narrow(1, 7, 3)
        .abs()
        .max()
        .into_scalar::<f32>();
    assert_eq!(padded_rows, 0.0, "padded tokens get no expert output");
    let d = max_diff(long.narrow(1, 0, 7), short);
    assert!(d < 1e-6, "padded = unpadded on the real tokens: {d:e}");
}

/// A group's capacity follows its real length: a padded sequence batched with a longer one
/// routes (and drops) exactly as it does alone, with a capacity that binds.
#[test]
fn a_padded_sequence_routes_as_it_does_alone_when_capacity_binds() {
    let device = Device::flex();
    for routing in [Routing::Switch, Routing::Top2] {
        let m = moe(
            MixtureOfExpertsConfig {
                routing,
                experts: 3,
                eval_capacity_factor: 0.5,
                min_capacity: 1,
                second_threshold: 0.0,
                ..Default::default()
            },
            &device,
        );
        let long = input(1, 12, 20, &device);
        let short = input(1, 7, 21, &device);
        let (alone, report) = m.forward(short.clone(), None, false, false);
        assert!(report.dropped > 0, "capacity binds");
        let padded = Tensor::cat(vec![short, input(1, 5, 22, &device)], 1);
        let pad = Tensor::<2, Bool>::from_data(
            TensorData::new(
                (0..24).map(|i| i >= 12 && i - 12 >= 7).collect::<Vec<_>>(),
                [2, 12],
            ),
            &device,
        );
        let (batched, _) = m.forward(Tensor::cat(vec![long, padded], 0), Some(pad), false, false);
        let d = max_diff(batched.narrow(0, 1, 1).narrow(1, 0, 7), alone);
        // Rounding of the experts' products over different row counts only (a routing
        // change moves outputs by O(1)).
        assert!(
            d < 1e-6,
            "{routing:?}: batching changed a padded sequence's output by {d:e}"
        );
    }
}

#[test]
fn in_causal_priority_a_later_token_never_changes_an_earlier_output() {
    let device = Device::flex();
    for routing in [Routing::Switch, Routing::Top2] {
        let m = moe(
            MixtureOfExpertsConfig {
                routing,
                experts: 3,
                eval_capacity_factor: 0.6,
                min_capacity: 1,
                second_threshold: 0.0,
                ..Default::default()
            },
            &device,
        );
        let x = input(2, 12, 7, &device);
        let (y, report) = m.forward(x.clone(), None, true, false);
        assert!(report.dropped > 0, "capacity binds");
        for at in [3usize, 8, 11] {
            let noise = input(2, 1, 100 + at as u64, &device).mul_scalar(5.0);
            let changed = x
                .clone()
                .slice_assign([0..2, at..at + 1, 0..D], x.clone().narrow(1, at, 1) + noise);
            let (z, _) = m.forward(changed, None, true, false);
            let d = max_diff(y.clone().narrow(1, 0, at), z.narrow(1, 0, at));
            // Rounding only: a changed token can change how many rows an expert's product
            // holds, and under a loaded thread pool the product's split (seen in CI: 4.5e-8).
            // A token that changed an earlier one's routing would move it by O(1).
            assert!(
                d < 1e-6,
                "{routing:?}: token {at} changed an earlier output by {d:e}"
            );
        }
    }
}

#[test]
fn the_router_and_the_chosen_experts_get_gradients() {
    let device = Device::flex().autodiff();
    let m = moe(
        MixtureOfExpertsConfig {
            routing: Routing::Top2,
            experts: 3,
            ..Default::default()
        },
        &device,
    );
    let (y, report) = m.forward(input(2, 8, 8, &device), None, false, true);
    let loss = y.sum() + report.balance_loss + report.z_loss;
    let grads = loss.backward();
    let router = m.router.weight.val().grad(&grads).expect("router gradient");
    assert!(router.abs().max().into_scalar::<f32>() > 0.0);
    for (e, expert) in m.experts.iter().enumerate() {
        if report.load[e] > 0 {
            let g = expert
                .linear_inner
                .weight
                .val()
                .grad(&grads)
                .expect("expert gradient");
            assert!(g.abs().max().into_scalar::<f32>() > 0.0, "expert {e}");
        }
    }
}

/// A decoder language model whose layers are mixtures of experts, from TOML.
fn moe_lm(ffn: &str, device: &Device) -> models::LanguageModel {
    let stack: models::StackConfig = toml::from_str(&format!(
        "n_layers = 2\nd_model = 16\nn_heads = 2\nd_ff = 32\ndropout = 0.0\n[ffn]\n{ffn}\n"
    ))
    .unwrap();
    models::LanguageModelConfig {
        embedding: super::embedding(models::PositionKind::Learned),
        stack,
        tie_embeddings: true,
        compressive: None,
    }
    .init(device)
    .unwrap()
}

#[test]
fn stacks_take_experts_from_toml_and_offer_their_losses_once() {
    let device = Device::flex().autodiff();
    let lm = moe_lm("kind = \"top2\"\nexperts = 3", &device);
    assert!(matches!(
        lm.stack.layers[0].feed_forward,
        models::FeedForwardBlock::Experts(_)
    ));
    let tokens = super::tokens(&[vec![1, 2, 3, 4, 5, 6], vec![6, 5, 4, 3, 2, 1]], &device);
    let _ = lm.forward(tokens, None);
    let aux = lm
        .aux_loss(&device)
        .expect("balance and z losses of both layers");
    assert!(aux.into_scalar::<f32>() > 0.0);
    assert!(lm.aux_loss(&device).is_none(), "taken once");
    // Evaluation (no autodiff) keeps no report.
    let plain = Device::flex();
    let lm = moe_lm("kind = \"switch\"\nexperts = 2", &plain);
    let _ = lm.forward(super::tokens(&[vec![1, 2, 3]], &plain), None);
    assert!(lm.aux_loss(&plain).is_none());
    // Unknown keys and bad values are errors naming them.
    let err = toml::from_str::<models::StackConfig>("[ffn]\nkind = \"switch\"\nexpertz = 4\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("expertz"), "{err}");
    let bad: models::StackConfig =
        toml::from_str("[ffn]\nkind = \"switch\"\nexperts = 0\n").unwrap();
    let err = bad
        .check("decoder", efficient_attn::AttentionMode::Causal)
        .unwrap_err();
    assert_eq!(err.path, "decoder.ffn.experts");
    let reversible: models::StackConfig =
        toml::from_str("reversible = true\n[ffn]\nkind = \"top2\"\n").unwrap();
    let err = reversible
        .check("decoder", efficient_attn::AttentionMode::Causal)
        .unwrap_err();
    assert_eq!(err.path, "decoder.ffn.kind");
}

#[test]
fn a_decoder_with_experts_never_sees_the_future_and_decodes_incrementally() {
    let device = Device::flex();
    // Capacity binds in the full pass (drops happen) for the causality check.
    let lm = moe_lm(
        "kind = \"top2\"\nexperts = 3\neval_capacity_factor = 0.5\nmin_capacity = 1\nsecond_threshold = 0.0",
        &device,
    );
    let a = vec![1i64, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let mut b = a.clone();
    b[7] = 15;
    let la = lm.forward(super::tokens(std::slice::from_ref(&a), &device), None);
    let lb = lm.forward(super::tokens(&[b], &device), None);
    let d = max_diff(la.narrow(1, 0, 7), lb.narrow(1, 0, 7));
    assert_eq!(d, 0.0, "a later token changed earlier logits");
    // With a capacity that never binds, one token at a time equals the full pass.
    let lm = moe_lm(
        "kind = \"top2\"\nexperts = 3\neval_capacity_factor = 3.0",
        &device,
    );
    let d = super::decoding_error(&lm, super::tokens(&[a.clone(), a], &device), 4);
    assert!(d < 1e-4, "decoding differs by {d:e}");
}
