//! The multi-head wrapper around any core.

use burn::tensor::{Device, Tensor, TensorData, Tolerance};
use efficient_attn::testing::SeededRng;
use efficient_attn::{
    AttentionMode, AxialAttentionConfig, Grid, HeadDims, MemoryEfficientAttentionConfig, MhaInput,
    MultiHeadAttentionConfig, WithExtras, padding_mask,
};

fn x(batch: usize, seq: usize, d: usize, seed: u64, device: &Device) -> Tensor<3> {
    SeededRng::new(seed).normal_tensor([batch, seq, d], 1.0, device)
}

/// The same weights with a different exact core give the same layer output.
#[test]
fn exact_cores_agree_inside_the_wrapper() {
    let device = Device::flex();
    for mode in [AttentionMode::Bidirectional, AttentionMode::Causal] {
        let config = MultiHeadAttentionConfig::new(16, 4)
            .with_dropout(0.0)
            .with_mode(mode);
        let full = config.init(&device).unwrap();
        let mut streamed = full.clone();
        streamed.core = config
            .clone()
            .with_attention(MemoryEfficientAttentionConfig {
                query_block: 2,
                key_block: 3,
                scale: None,
            })
            .attention
            .init(mode, HeadDims::new(4, 4), &device)
            .unwrap();
        let input = x(2, 9, 16, 1, &device);
        let mask = padding_mask(&[9, 6], 9, &device);
        let a = full.forward(MhaInput::self_attn(input.clone()).mask_pad(mask.clone()));
        let b = streamed.forward(MhaInput::self_attn(input).mask_pad(mask));
        let keep = |t: Tensor<3>| t.narrow(1, 0, 6).into_data();
        keep(a).assert_approx_eq::<f32>(&keep(b), Tolerance::rel_abs(1e-5, 1e-5));
    }
}

#[test]
fn cross_attention_takes_a_context_of_another_length_and_width() {
    let device = Device::flex();
    let mut config = MultiHeadAttentionConfig::new(16, 2).with_mode(AttentionMode::Cross);
    config.d_context = Some(10);
    let layer = config.init(&device).unwrap();
    let out = layer.forward(
        MhaInput::cross(x(2, 5, 16, 2, &device), x(2, 7, 10, 3, &device))
            .mask_pad_context(padding_mask(&[7, 3], 7, &device)),
    );
    assert_eq!(out.dims(), [2, 5, 16]);
    let data: TensorData = out.into_data();
    assert!(data.iter::<f32>().all(f32::is_finite));
}

#[test]
#[should_panic(expected = "needs MhaInput::cross")]
fn a_cross_layer_without_context_is_a_clear_error() {
    let device = Device::flex();
    let layer = MultiHeadAttentionConfig::new(8, 2)
        .with_mode(AttentionMode::Cross)
        .init(&device)
        .unwrap();
    layer.forward(MhaInput::self_attn(x(1, 3, 8, 4, &device)));
}

/// A layer whose variant lays the sequence out in 2-D decodes with the grid on its cache:
/// axial attention, a prompt then one position at a time, equals one causal forward.
#[test]
fn a_grid_layer_decodes_with_the_grid_on_its_cache() {
    let device = Device::flex();
    let mha = MultiHeadAttentionConfig::new(16, 2)
        .with_dropout(0.0)
        .with_mode(AttentionMode::Causal)
        .with_attention(AxialAttentionConfig::default())
        .init(&device)
        .unwrap();
    let grid = Grid::new(3, 4);
    let input = x(2, 12, 16, 3, &device);
    let whole = mha.forward(MhaInput::self_attn(input.clone()).with_grid(grid));
    let mut cache = mha.init_cache(2, 12, &device).unwrap().with_grid(grid);
    let mut parts = vec![mha.forward_step(input.clone().narrow(1, 0, 5), &mut cache)];
    for t in 5..12 {
        parts.push(mha.forward_step(input.clone().narrow(1, t, 1), &mut cache));
    }
    Tensor::cat(parts, 1)
        .into_data()
        .assert_approx_eq::<f32>(&whole.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
}

/// A shared-QK core (Reformer) gets no key projection: the layer has three projections, and
/// its keys are its queries.
#[test]
fn a_shared_qk_layer_has_no_key_projection() {
    use burn::module::Module;
    let device = Device::flex();
    let config = MultiHeadAttentionConfig::new(16, 2).with_dropout(0.0);
    let shared = config
        .clone()
        .with_attention(efficient_attn::ReformerAttentionConfig::default())
        .init(&device)
        .unwrap();
    let full = config.init(&device).unwrap();
    assert!(shared.key.is_none() && full.key.is_some());
    assert_eq!(full.num_params() - shared.num_params(), 16 * 16 + 16);
    let out = shared.forward(MhaInput::self_attn(x(2, 9, 16, 4, &device)));
    assert_eq!(out.dims(), [2, 9, 16]);
}
