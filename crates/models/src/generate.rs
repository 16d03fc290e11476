//! Choosing the next token from logits: greedy, or sampling with temperature and top-k.

use burn::tensor::{Int, Tensor, TensorData};
use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{RngCore, SeedableRng};

/// A decoding strategy.
#[derive(Clone, Debug)]
pub enum Sampler {
    /// The most likely token.
    Greedy,
    /// A draw from `softmax(logits / temperature)` restricted to the `top_k` most likely
    /// tokens (all if `None`), from a seeded generator.
    Sample {
        /// Temperature (> 0).
        temperature: f64,
        /// Keep only the k most likely tokens.
        top_k: Option<usize>,
        /// The generator.
        rng: SampleRng,
    },
}

/// The seeded generator of [`Sampler::Sample`] (SplitMix64).
#[derive(Clone, Debug)]
pub struct SampleRng(SplitMix64);

impl SampleRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d))
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl Sampler {
    /// Sampling with a temperature, optional top-k and a seed.
    pub fn sample_with(temperature: f64, top_k: Option<usize>, seed: u64) -> Self {
        assert!(temperature > 0.0, "temperature must be positive");
        Self::Sample {
            temperature,
            top_k,
            rng: SampleRng::new(seed),
        }
    }

    /// The next token of every sequence from the logits of its last position.
    ///
    /// # Shapes
    /// - logits: `[batch, 1, vocab]` → `[batch, 1]`
    pub fn sample(&mut self, logits: Tensor<3>) -> Tensor<2, Int> {
        let [b, _, v] = logits.dims();
        let device = logits.device();
        let data: Vec<f32> = logits
            .reshape([b, v])
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32 logits");
        let ids: Vec<i64> = data.chunks(v).map(|row| self.choose(row) as i64).collect();
        Tensor::from_data(TensorData::new(ids, [b, 1]), &device)
    }

    fn choose(&mut self, row: &[f32]) -> usize {
        let argmax = || {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        };
        match self {
            Self::Greedy => argmax(),
            Self::Sample {
                temperature,
                top_k,
                rng,
            } => {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                order.truncate(top_k.unwrap_or(row.len()).max(1));
                let max = row[order[0]] as f64;
                let weights: Vec<f64> = order
                    .iter()
                    .map(|&i| ((row[i] as f64 - max) / *temperature).exp())
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut u = rng.uniform() * total;
                for (&i, w) in order.iter().zip(&weights) {
                    if u < *w {
                        return i;
                    }
                    u -= w;
                }
                *order.last().unwrap_or(&0)
            }
        }
    }
}
