//! Host-side seeded randomness for data: generated datasets, shuffles and the epoch order.
//!
//! The stream is `rand_xoshiro`'s SplitMix64 seeded from `seed ^ 0x5851f42d4c957f2d`, and the
//! draws below (uniform, bounded integers, Fisher–Yates permutations) are
//! fixed here, so a seed gives the same data on every machine and in every release (the same
//! stream `efficient-attn` draws its random features from).

use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{RngCore, SeedableRng};

/// A seeded generator.
#[derive(Clone, Debug)]
pub struct DataRng(SplitMix64);

impl DataRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d))
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n`.
    ///
    /// # Panics
    /// If `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "DataRng::below(0)");
        (self.uniform() * n as f64) as usize % n
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

    /// The stream is pinned: the generated datasets and epoch orders of earlier runs depend on
    /// it.
    #[test]
    fn the_stream_is_pinned() {
        let mut r = DataRng::new(7);
        let draws: Vec<usize> = (0..6).map(|_| r.below(1000)).collect();
        assert_eq!(draws, PINNED);
        let p = DataRng::new(3).permutation(50);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    /// `below(1000)` six times from seed 7, as the generator the project has always used.
    const PINNED: [usize; 6] = [980, 381, 627, 344, 936, 187];
}
