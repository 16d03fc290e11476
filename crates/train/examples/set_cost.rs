//! Time and peak memory of one Set Transformer encoder block on a set of N elements, forward
//! and backward, in this process (run one case per process):
//!
//! ```sh
//! cargo run --release -p train --example set_cost -- isab 16384
//! cargo run --release -p train --example set_cost -- sab 4096 reference
//! ```
//!
//! Prints `block style n ms peak_mib`: the median of three forward+backward passes and the
//! process's resident-set high-water mark above its value once the input exists (`VmHWM`,
//! read by `efformer bench`'s own [`train::bench::memory_status`]). Width 128, 4 heads, 32 inducing points, batch 1 (the reference's
//! defaults), on Flex.

use std::time::Instant;

use burn::tensor::{Device, Tensor};
use efficient_attn::testing::SeededRng;
use models::{SetBlockConfig, SetStyle};

/// The process's resident-set high-water mark, bytes.
fn peak_rss() -> u64 {
    train::bench::memory_status().map_or(0, |(_, peak)| peak)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: set_cost <sab|isab> <n> [paper|reference]";
    let (Some(block), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let style = match args.get(3).map(String::as_str) {
        None | Some("paper") => SetStyle::Paper,
        Some("reference") => SetStyle::Reference,
        Some(other) => {
            eprintln!("{usage} (got style {other})");
            std::process::exit(2);
        }
    };
    let device = Device::flex().autodiff();
    let config = SetBlockConfig {
        style,
        ..Default::default()
    };
    let x = SeededRng::new(1).normal_tensor([1, n, config.d_model], 1.0, &device);
    let run: Box<dyn Fn(Tensor<3>) -> Tensor<3>> = match block.as_str() {
        "sab" => {
            let b = config.sab("sab", &device).expect("a valid block");
            Box::new(move |x| b.forward(x, None))
        }
        "isab" => {
            let b = config.isab(32, "isab", &device).expect("a valid block");
            Box::new(move |x| b.forward(x, None))
        }
        other => {
            eprintln!("{usage} (got block {other})");
            std::process::exit(2);
        }
    };
    let base = peak_rss();
    let mut times = Vec::new();
    for _ in 0..4 {
        let start = Instant::now();
        let y = run(x.clone().require_grad());
        let grads = y.sum().backward();
        drop(grads);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    println!(
        "{block} {style:?} {n} {:.1} {}",
        times[1],
        peak_rss().saturating_sub(base) >> 20
    );
}
