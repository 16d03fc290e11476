//! Time and peak memory of a funnel encoder against the same stack unpooled, forward and
//! backward, in this process (run one case per process):
//!
//! ```sh
//! cargo run --release -p train --example funnel_cost -- funnel 4096
//! cargo run --release -p train --example funnel_cost -- unpooled 4096
//! ```
//!
//! Prints `model n ms peak_mib`: the median of three forward+backward passes of a sequence
//! classifier (6 pre-norm layers, width 256, 4 heads, feed-forward 1,024, exact attention on
//! the fused `memory-efficient` kernel, batch 1; the funnel pools 3 blocks of 2 layers with
//! stride 2), and the process's resident-set high-water mark above its value once the model
//! exists (`VmHWM`, read by `efformer bench`'s own [`train::bench::memory_status`]). On Flex.

use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use efficient_attn::MemoryEfficientAttentionConfig;
use models::{
    ClassifierConfig, EmbeddingSettings, EncoderConfig, EncoderInput, FunnelConfig, StackConfig,
};

/// The process's resident-set high-water mark, bytes.
fn peak_rss() -> u64 {
    train::bench::memory_status().map_or(0, |(_, peak)| peak)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: funnel_cost <funnel|unpooled> <n>";
    let (Some(model), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let funnel = match model.as_str() {
        "funnel" => Some(FunnelConfig {
            blocks: vec![2, 2, 2],
            ..Default::default()
        }),
        "unpooled" => None,
        other => {
            eprintln!("{usage} (got {other})");
            std::process::exit(2);
        }
    };
    let device = Device::flex().autodiff();
    let config = ClassifierConfig {
        encoder: EncoderConfig {
            embedding: EmbeddingSettings {
                vocab_size: 256,
                max_len: n,
                dropout: 0.0,
                ..Default::default()
            },
            stack: StackConfig {
                n_layers: 6,
                d_model: 256,
                n_heads: 4,
                d_ff: 1024,
                dropout: 0.0,
                ..Default::default()
            }
            .with_attention(MemoryEfficientAttentionConfig::default()),
            funnel,
        },
        n_classes: 2,
        ..Default::default()
    };
    let classifier = config.init_sequence(&device).expect("a valid model");
    let ids: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % 256).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let base = peak_rss();
    let mut times = Vec::new();
    for _ in 0..4 {
        let start = Instant::now();
        let logits = classifier.forward(EncoderInput::new(tokens.clone()));
        let grads = logits.sum().backward();
        drop(grads);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    println!(
        "{model} {n} {:.1} {}",
        times[1],
        peak_rss().saturating_sub(base) >> 20
    );
}
