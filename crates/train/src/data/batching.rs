//! How items are grouped into batches: shuffled, or in buckets of similar length (less
//! padding), both a function of (seed, epoch) so that a resumed run sees the same batches as an
//! uninterrupted one.

use serde::{Deserialize, Serialize};

use crate::rng::DataRng;

/// The batching of `[train.batching]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Batching {
    /// Training: a random permutation cut into batches. Evaluation: the data's order.
    Shuffled,
    /// Training: the permutation is cut into buckets of `batches_per_bucket` batches, each
    /// bucket sorted by length (longest first) and cut into batches, and the order of all the
    /// batches shuffled. Evaluation: the split sorted by length. Every item once per epoch;
    /// batches hold items of similar length, so less of each batch is padding.
    LengthBuckets {
        /// Batches per bucket: more sorts over a wider range of lengths (less padding), fewer
        /// keeps batches closer to random.
        #[serde(default = "default_batches_per_bucket")]
        batches_per_bucket: usize,
    },
    /// Training and evaluation: the data's order, never shuffled (streams whose segments must
    /// follow one another, `[lm] mode = "stream"`).
    InOrder,
}

fn default_batches_per_bucket() -> usize {
    16
}

impl Default for Batching {
    fn default() -> Self {
        Self::LengthBuckets {
            batches_per_bucket: default_batches_per_bucket(),
        }
    }
}

impl std::fmt::Display for Batching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shuffled => f.write_str("shuffled"),
            Self::InOrder => f.write_str("in order"),
            Self::LengthBuckets { batches_per_bucket } => {
                write!(f, "length buckets of {batches_per_bucket} batches")
            }
        }
    }
}

/// The length that orders items into batches of similar length: a sequence's tokens (a
/// sequence pair's source and target tokens together).
pub trait ItemLength {
    /// Tokens.
    fn length(&self) -> usize;
}

/// Where the batches of one pass come from.
#[derive(Clone, Copy, Debug)]
pub enum Pass {
    /// A training epoch: shuffled by (seed, epoch).
    Train {
        /// Data seed.
        seed: u64,
        /// 1-based epoch.
        epoch: usize,
    },
    /// An evaluation pass: no randomness.
    Eval,
}

impl Batching {
    /// The batches (indices into `lengths`) of one pass over items `range` of a split whose
    /// item lengths are `lengths`.
    pub fn batches(
        &self,
        lengths: &[usize],
        range: (usize, usize),
        batch_size: usize,
        pass: Pass,
    ) -> Vec<Vec<usize>> {
        let (start, end) = range;
        let batch_size = batch_size.max(1);
        let mut idx: Vec<usize> = (start..end).collect();
        let mut rng = match pass {
            Pass::Train { seed, epoch } => {
                let mut rng = DataRng::new(mix(seed, epoch as u64));
                idx = rng
                    .permutation(idx.len())
                    .into_iter()
                    .map(|p| start + p)
                    .collect();
                Some(rng)
            }
            Pass::Eval => None,
        };
        let longest_first = |a: &usize, b: &usize| lengths[*b].cmp(&lengths[*a]);
        match (self, rng.as_mut()) {
            (Self::Shuffled, _) => idx.chunks(batch_size).map(<[usize]>::to_vec).collect(),
            (Self::InOrder, _) => (start..end)
                .collect::<Vec<_>>()
                .chunks(batch_size)
                .map(<[usize]>::to_vec)
                .collect(),
            (Self::LengthBuckets { .. }, None) => {
                idx.sort_by(longest_first);
                idx.chunks(batch_size).map(<[usize]>::to_vec).collect()
            }
            (Self::LengthBuckets { batches_per_bucket }, Some(rng)) => {
                let bucket = batch_size * (*batches_per_bucket).max(1);
                let mut batches: Vec<Vec<usize>> = Vec::new();
                for b in idx.chunks_mut(bucket) {
                    b.sort_by(longest_first);
                    batches.extend(b.chunks(batch_size).map(<[usize]>::to_vec));
                }
                let order = rng.permutation(batches.len());
                order.into_iter().map(|i| batches[i].clone()).collect()
            }
        }
    }
}

/// Tokens in a pass: the items' own, and those of the padded batches (`padded_len` maps a
/// batch's longest item to the length it is padded to).
pub fn token_counts(
    lengths: &[usize],
    batches: &[Vec<usize>],
    padded_len: impl Fn(usize) -> usize,
) -> (u64, u64) {
    let mut real = 0u64;
    let mut padded = 0u64;
    for b in batches {
        let longest = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        real += b.iter().map(|&i| lengths[i] as u64).sum::<u64>();
        padded += (padded_len(longest) * b.len()) as u64;
    }
    (real, padded)
}

/// The seed of epoch `epoch` from the run's seed.
pub fn mix(seed: u64, epoch: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch.wrapping_add(0x632b_e59b_d9b4_e019)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(n: usize) -> Vec<usize> {
        let mut rng = DataRng::new(5);
        (0..n).map(|_| 1 + rng.below(500)).collect()
    }

    #[test]
    fn every_item_is_in_one_batch_per_pass() {
        let lens = lengths(203);
        for batching in [
            Batching::Shuffled,
            Batching::default(),
            Batching::LengthBuckets {
                batches_per_bucket: 1,
            },
        ] {
            for pass in [Pass::Train { seed: 3, epoch: 2 }, Pass::Eval] {
                let batches = batching.batches(&lens, (0, 203), 8, pass);
                let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..203).collect::<Vec<_>>(), "{batching} {pass:?}");
                assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 8));
                // A sub-range (one device's slice) holds only its own items.
                let part = batching.batches(&lens, (50, 120), 8, pass);
                let mut seen: Vec<usize> = part.iter().flatten().copied().collect();
                seen.sort_unstable();
                assert_eq!(seen, (50..120).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn batches_depend_only_on_seed_and_epoch() {
        let lens = lengths(100);
        let b = Batching::default();
        let at = |seed, epoch| b.batches(&lens, (0, 100), 4, Pass::Train { seed, epoch });
        assert_eq!(at(1, 2), at(1, 2));
        assert_ne!(at(1, 2), at(1, 3));
        assert_ne!(at(1, 2), at(2, 2));
    }

    #[test]
    fn buckets_pad_less_than_shuffled_batches() {
        let lens = lengths(512);
        let pass = Pass::Train { seed: 0, epoch: 1 };
        let fraction = |b: Batching| {
            let (real, padded) = token_counts(&lens, &b.batches(&lens, (0, 512), 8, pass), |l| l);
            1.0 - real as f64 / padded as f64
        };
        let shuffled = fraction(Batching::Shuffled);
        let buckets = fraction(Batching::default());
        assert!(
            shuffled > 0.3,
            "shuffled batches of uniform lengths pad {shuffled}"
        );
        assert!(
            buckets < shuffled / 4.0,
            "buckets pad {buckets}, shuffled {shuffled}"
        );
        // Evaluation sorts the whole split: the least padding of all.
        let (real, padded) = token_counts(
            &lens,
            &Batching::default().batches(&lens, (0, 512), 8, Pass::Eval),
            |l| l,
        );
        assert!(1.0 - (real as f64 / padded as f64) <= buckets);
    }
}
