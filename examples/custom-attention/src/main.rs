//! Trains an encoder whose every layer uses [`CosineAttention`], a core defined in this crate,
//! on a toy task: is token 1 anywhere in the (padded) sequence?

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use custom_attention::{CosineAttention, CosineAttentionConfig};
use efficient_attn::{WithExtras, padding_mask};
use models::{Encoder, EncoderConfig, EncoderInput, StackConfig, mean_pool};

/// Encoder (with the user's core) → mean over unpadded tokens → logits.
#[derive(Module, Debug)]
struct Classifier {
    encoder: Encoder<CosineAttention>,
    head: Linear,
}

impl Classifier {
    /// # Shapes
    /// - tokens: `[batch, seq]` → `[batch, 2]`
    fn forward(&self, tokens: Tensor<2, Int>, lengths: &[usize]) -> Tensor<2> {
        let [_, seq] = tokens.dims();
        let pad = padding_mask(lengths, seq, &tokens.device()); // [batch, seq]
        let h = self
            .encoder
            .forward(EncoderInput::new(tokens).mask_pad(pad.clone())); // [batch, seq, d_model]
        self.head.forward(mean_pool(h, Some(pad)))
    }
}

fn main() {
    let device = Device::flex().autodiff();
    // The stack from TOML, with the user's own attention table.
    let stack: StackConfig<CosineAttentionConfig> = toml::from_str(
        r#"
        n_layers = 2
        d_model = 32
        n_heads = 4
        d_ff = 64
        dropout = 0.0
        [attention]
        initial_scale = 10.0
        "#,
    )
    .unwrap_or_else(|e| panic!("bad stack config: {e}"));
    let losses = train(stack, 60, &device);
    for (step, loss) in losses.iter().enumerate() {
        if step % 10 == 0 || step + 1 == losses.len() {
            println!("step {step:2}: loss {loss:.4}");
        }
    }
}

/// Trains for `steps` Adam steps and returns the loss of each step.
fn train(stack: StackConfig<CosineAttentionConfig>, steps: usize, device: &Device) -> Vec<f32> {
    let config = EncoderConfig {
        embedding: models::EmbeddingSettings {
            vocab_size: 16,
            max_len: 32,
            dropout: 0.0,
            ..Default::default()
        },
        stack,
        funnel: None,
    };
    let mut model = Classifier {
        encoder: config.init(device).expect("a valid encoder config"),
        head: LinearConfig::new(config.stack.d_model, 2).init(device),
    };
    println!("parameters: {}", model.num_params());
    let mut optim = AdamConfig::new().init();
    let lengths = [24, 20, 17, 24, 22, 19, 24, 21];
    let mut tokens = vec![0i64; 8 * 24];
    for (b, row) in tokens.chunks_mut(24).enumerate() {
        for (p, t) in row.iter_mut().enumerate().take(lengths[b]) {
            *t = ((b * 7 + p * 3) % 14 + 2) as i64;
        }
        if b % 2 == 0 {
            row[b + 3] = 1;
        }
    }
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(tokens, [8, 24]), device);
    let labels = Tensor::<1, Int>::from_data(
        TensorData::new(vec![1i64, 0, 1, 0, 1, 0, 1, 0], [8]),
        device,
    );
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    (0..steps)
        .map(|_| {
            let loss = loss_fn.forward(model.forward(tokens.clone(), &lengths), labels.clone());
            let value = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(3e-3, model.clone(), grads);
            value
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_core_trains_inside_a_models_encoder() {
        let stack: StackConfig<CosineAttentionConfig> = StackConfig {
            n_layers: 1,
            d_model: 16,
            n_heads: 2,
            d_ff: 32,
            dropout: 0.0,
            ..Default::default()
        };
        let losses = train(stack, 30, &Device::flex().autodiff());
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }
}
