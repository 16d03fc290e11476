//! A small seeded generator for the randomness a variant holds as data (random features,
//! random block plans, hash rotations) and for test inputs.
//!
//! Values are drawn on the host from a seed, so they are identical on every backend and
//! independent of the device's global RNG (which tests running in parallel would share).

#[cfg(feature = "testing")]
use burn::tensor::{Device, Tensor, TensorData};

/// A seed for part `part` of what `seed` seeds (one SplitMix64 step of their mix): the one
/// way the workspace derives seeds (per layer, per branch, per chunk) from a seed.
pub fn mix_seed(seed: u64, part: u64) -> u64 {
    let mut z =
        (seed ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64 (Steele, Lea and Flood 2014): tiny, fast, and good enough for sampling.
#[derive(Clone, Debug)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x5851_f42d_4c95_7f2d,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n`.
    ///
    /// # Panics
    /// If `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "SeededRng::below(0)");
        (self.uniform() * n as f64) as usize % n
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    #[cfg(feature = "testing")]
    /// A tensor of standard normal values, scaled by `std`.
    pub fn normal_tensor<const D: usize>(
        &mut self,
        shape: [usize; D],
        std: f64,
        device: &Device,
    ) -> Tensor<D> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (self.normal() * std) as f32).collect();
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            p.swap(i, j);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_normals_are_standard() {
        let a: Vec<u64> = {
            let mut r = SeededRng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = SeededRng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        let mut r = SeededRng::new(1);
        let xs: Vec<f64> = (0..20_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    /// The stream is pinned: random features, block plans and the data of earlier runs depend
    /// on it (`train` pins the same values for its copy of the stream).
    #[test]
    fn the_stream_is_pinned() {
        let mut r = SeededRng::new(7);
        let draws: Vec<usize> = (0..6).map(|_| r.below(1000)).collect();
        assert_eq!(draws, [980, 381, 627, 344, 936, 187]);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = SeededRng::new(3).permutation(50);
        p.sort_unstable();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
    }
}
