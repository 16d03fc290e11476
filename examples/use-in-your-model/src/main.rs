//! An efficient attention layer inside a user's own Burn model.
//!
//! The model is ordinary Burn code; the only efformer types are `MultiHeadAttention` (built
//! from a `MultiHeadAttentionConfig` whose `attention` came from TOML) and `MhaInput`.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use efficient_attn::mask::padding_mask;
use efficient_attn::{AttentionConfig, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};

/// The user's model: tokens → embedding → attention → mean over unpadded tokens → logits.
#[derive(Module, Debug)]
struct TinyClassifier {
    embedding: Embedding,
    attention: MultiHeadAttention,
    head: Linear,
}

impl TinyClassifier {
    fn new(attention: AttentionConfig, device: &Device) -> Self {
        let d_model = 32;
        Self {
            embedding: EmbeddingConfig::new(16, d_model).init(device),
            attention: MultiHeadAttentionConfig::new(d_model, 4)
                .with_attention(attention)
                .with_dropout(0.0)
                .init(device)
                .expect("a valid attention config"),
            head: LinearConfig::new(d_model, 2).init(device),
        }
    }

    /// # Shapes
    /// - tokens: `[batch, seq]`, lengths: `batch` values
    /// - output: `[batch, 2]`
    fn forward(&self, tokens: Tensor<2, Int>, lengths: &[usize]) -> Tensor<2> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let pad = padding_mask(lengths, seq, &device); // [batch, seq]
        let x = self.embedding.forward(tokens); // [batch, seq, d_model]
        let h = self
            .attention
            .forward(MhaInput::self_attn(x).mask_pad(pad.clone()));
        let keep = pad.bool_not().float().reshape([batch, seq, 1]); // [batch, seq, 1]
        let pooled = h.mul(keep.clone()).sum_dim(1).div(keep.sum_dim(1)); // [batch, 1, d_model]
        self.head.forward(pooled.reshape([batch, 32]))
    }
}

fn main() {
    let device = Device::flex().autodiff();
    let attention: AttentionConfig = toml_attention("kind = \"memory-efficient\"\nkey_block = 8\n");
    let mut model = TinyClassifier::new(attention, &device);
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

/// Parses the `[attention]` table a user would keep in their own config file.
fn toml_attention(text: &str) -> AttentionConfig {
    toml::from_str(text).unwrap_or_else(|e| panic!("bad attention config: {e}"))
}
