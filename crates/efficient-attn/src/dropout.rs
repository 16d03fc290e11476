//! Dropout whose mask is a function of a seed, for computations that must replay their
//! randomness (reversible layers reconstruct and recompute each block with the forward's
//! masks).
//!
//! Burn's [`Dropout`] draws from the device's one global generator, which any other thread
//! (another test, another device's training step) may advance between a reseeding and the
//! draw; a [`DropoutSeed`] in a layer's extras instead draws the mask on the host from a
//! [`SeededRng`] of its own, the same on every call.

use burn::nn::Dropout;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::rng::{SeededRng, mix_seed};

/// A side input ([`crate::SideInputs`]) that makes [`MultiHeadAttention`](crate::MultiHeadAttention)'s
/// output dropout draw its mask from this seed ([`seeded_dropout`]). The layer it is passed to
/// uses it as given: a stack that passes the same extras to every layer would give every layer
/// the same mask (reversible stacks derive one seed per layer and branch from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutSeed(pub u64);

/// `dropout` applied to `x`, its mask drawn from `seed` when one is given (the same mask on
/// every call with the same seed and shape), from the device's generator otherwise. Like
/// Burn's, it is active only on autodiff devices, for a positive probability and while the
/// module is not frozen; kept values are scaled by `1/(1 - p)`.
///
/// # Shapes
/// - x: any → the same
pub fn seeded_dropout<const D: usize>(
    dropout: &Dropout,
    x: Tensor<D>,
    seed: Option<u64>,
) -> Tensor<D> {
    let Some(seed) = seed else {
        return dropout.forward(x);
    };
    if dropout.prob <= 0.0 || !dropout.training.is_enabled() || !x.device().is_autodiff() {
        return x;
    }
    let keep = 1.0 - dropout.prob;
    let scale = (1.0 / keep) as f32;
    let shape = x.dims();
    let n: usize = shape.iter().product();
    // Chunks of the mask drawn in parallel, chunk `c` from its own generator of (seed, c):
    // the mask is a function of the seed and the shape alone.
    const CHUNK: usize = 1 << 16;
    let threshold = (keep * (1u64 << 32) as f64) as u64;
    let mut mask = vec![0.0f32; n];
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, part)| {
            let mut rng = SeededRng::new(mix_seed(seed, c as u64));
            // Two 32-bit uniforms per draw.
            for pair in part.chunks_mut(2) {
                let bits = rng.next_u64();
                for (m, half) in pair.iter_mut().zip([bits & 0xffff_ffff, bits >> 32]) {
                    *m = if half < threshold { scale } else { 0.0 };
                }
            }
        });
    let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
    x.mul(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::DropoutConfig;
    use burn::tensor::Device;

    #[test]
    fn the_same_seed_gives_the_same_mask_and_the_rate_is_p() {
        let device = Device::flex().autodiff();
        let dropout = DropoutConfig::new(0.25).init();
        let x = Tensor::<2>::ones([64, 64], &device);
        let a = seeded_dropout(&dropout, x.clone(), Some(7));
        let b = seeded_dropout(&dropout, x.clone(), Some(7));
        let c = seeded_dropout(&dropout, x.clone(), Some(8));
        assert_eq!(a.clone().sub(b).abs().max().into_scalar::<f32>(), 0.0);
        assert!(a.clone().sub(c).abs().max().into_scalar::<f32>() > 0.0);
        // Mean stays 1 (kept values scaled), about a quarter dropped.
        let dropped = a.clone().equal_elem(0.0).int().sum().into_scalar::<i64>() as f64;
        assert!((dropped / 4096.0 - 0.25).abs() < 0.03, "{dropped}");
        let kept = a.max().into_scalar::<f32>();
        assert!((kept - 1.0 / 0.75).abs() < 1e-6);
        // Inactive without autodiff, and when frozen.
        let plain = Tensor::<2>::ones([4, 4], &Device::flex());
        let out = seeded_dropout(&dropout, plain, Some(7));
        assert_eq!(out.min().into_scalar::<f32>(), 1.0);
        let frozen = burn::module::Module::freeze(dropout);
        let out = seeded_dropout(&frozen, x, Some(7));
        assert_eq!(out.min().into_scalar::<f32>(), 1.0);
    }
}
