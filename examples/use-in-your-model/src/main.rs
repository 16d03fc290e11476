//! Efficient attention inside a user's own Burn model.
//!
//! `TinyClassifier` is ordinary Burn code. It uses two efformer pieces:
//! - an encoder stack from `models` whose attention variant comes from TOML, and
//! - a `MultiHeadAttention` from `efficient-attn` in cross mode, pooling the sequence with one
//!   learned query (attention pooling, as in Set Transformer's PMA).
//!
//! It trains for a few steps on Flex on a toy task and prints the loss.

use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use efficient_attn::{
    AttentionMode, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, WithExtras, padding_mask,
};
use models::{EmbeddingSettings, Encoder, EncoderConfig, EncoderInput, StackConfig};

const D_MODEL: usize = 32;

/// The user's model: tokens → efformer encoder → attention pooling → logits.
#[derive(Module, Debug)]
struct TinyClassifier {
    encoder: Encoder,
    pool_query: Param<Tensor<3>>,
    pool: MultiHeadAttention,
    head: Linear,
}

impl TinyClassifier {
    fn new(stack: StackConfig, device: &Device) -> Self {
        let encoder = EncoderConfig {
            embedding: EmbeddingSettings {
                vocab_size: 16,
                max_len: 64,
                dropout: 0.0,
                ..Default::default()
            },
            stack,
            funnel: None,
        };
        Self {
            encoder: encoder.init(device).expect("a valid encoder config"),
            pool_query: Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, 1, D_MODEL], device),
            pool: MultiHeadAttentionConfig::new(D_MODEL, 4)
                .with_mode(AttentionMode::Cross)
                .with_dropout(0.0)
                .init(device)
                .expect("a valid attention config"),
            head: LinearConfig::new(D_MODEL, 2).init(device),
        }
    }

    /// # Shapes
    /// - tokens: `[batch, seq]`, lengths: `batch` values
    /// - output: `[batch, 2]`
    fn forward(&self, tokens: Tensor<2, Int>, lengths: &[usize]) -> Tensor<2> {
        let [batch, seq] = tokens.dims();
        let pad = padding_mask(lengths, seq, &tokens.device()); // [batch, seq]
        let h = self
            .encoder
            .forward(EncoderInput::new(tokens).mask_pad(pad.clone())); // [batch, seq, d_model]
        let query = self.pool_query.val().expand([batch, 1, D_MODEL]); // [batch, 1, d_model]
        let pooled = self
            .pool
            .forward(MhaInput::cross(query, h).mask_pad_context(pad)); // [batch, 1, d_model]
        self.head.forward(pooled.reshape([batch, D_MODEL]))
    }
}

fn main() {
    let device = Device::flex().autodiff();
    // The part of the user's config file that picks the attention.
    let stack: StackConfig = toml::from_str(
        r#"
        n_layers = 2
        d_model = 32
        n_heads = 4
        d_ff = 64
        dropout = 0.0
        [attention]
        kind = "performer"
        features = 32
        "#,
    )
    .unwrap_or_else(|e| panic!("bad stack config: {e}"));
    let mut model = TinyClassifier::new(stack, &device);
    println!("parameters: {}", model.num_params());
    let mut optim = AdamConfig::new().init();

    // Task: is token 1 present? Sequences of length 24 with padding.
    let lengths = [24, 20, 17, 24];
    let mut tokens = vec![0i64; 4 * 24];
    for (b, row) in tokens.chunks_mut(24).enumerate() {
        for (p, t) in row.iter_mut().enumerate() {
            *t = ((b * 7 + p * 3) % 14 + 2) as i64;
        }
        if b % 2 == 0 {
            row[b + 3] = 1;
        }
    }
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(tokens, [4, 24]), &device);
    let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 0, 1, 0], [4]), &device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);

    for step in 0..30 {
        let logits = model.forward(tokens.clone(), &lengths);
        let loss = loss_fn.forward(logits, labels.clone());
        if step % 10 == 0 || step == 29 {
            println!(
                "step {step:2}: loss {:.4}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
}
