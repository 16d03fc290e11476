//! Masks: tensor helpers for padding and causality, and [`DenseMask`], attention patterns as
//! pure data for test oracles.
//!
//! Everywhere `true` means *masked out* (Burn's convention).

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

/// A padding mask from sequence lengths: row `b` masks positions `lengths[b]..max_len`.
///
/// # Shapes
/// - output: `[batch, max_len]`
///
/// # Panics
/// If a length exceeds `max_len`.
pub fn padding_mask(lengths: &[usize], max_len: usize, device: &Device) -> Tensor<2, Bool> {
    let mut data = Vec::with_capacity(lengths.len() * max_len);
    for (b, &len) in lengths.iter().enumerate() {
        assert!(
            len <= max_len,
            "padding_mask: length {len} of row {b} exceeds max_len {max_len}"
        );
        data.extend((0..max_len).map(|p| p >= len));
    }
    Tensor::from_data(TensorData::new(data, [lengths.len(), max_len]), device)
}

/// The causal mask aligned to the bottom-right corner: query `i` may see key `j` iff
/// `j <= i + (seq_k - seq_q)`.
///
/// # Shapes
/// - output: `[seq_q, seq_k]`
///
/// # Panics
/// If `seq_k < seq_q`.
pub fn causal_mask(seq_q: usize, seq_k: usize, device: &Device) -> Tensor<2, Bool> {
    assert!(
        seq_k >= seq_q,
        "causal_mask: causal attention needs seq_k >= seq_q, got seq_q {seq_q}, seq_k {seq_k}"
    );
    causal_block_mask(seq_q, 0, seq_k, 0, seq_k - seq_q, device)
}

/// The causal mask of one tile of the score matrix: queries `q0..q0 + rows`, keys
/// `k0..k0 + cols`, with the causal offset `seq_k - seq_q`. Built from two index vectors, so
/// it costs O(rows · cols) and never the full N × N.
///
/// # Shapes
/// - output: `[rows, cols]`
pub fn causal_block_mask(
    rows: usize,
    q0: usize,
    cols: usize,
    k0: usize,
    offset: usize,
    device: &Device,
) -> Tensor<2, Bool> {
    let q = Tensor::<1, Int>::arange((q0 + offset) as i64..(q0 + offset + rows) as i64, device)
        .reshape([rows, 1]);
    let k = Tensor::<1, Int>::arange(k0 as i64..(k0 + cols) as i64, device).reshape([1, cols]);
    // masked where key > query + offset
    k.greater(q)
}

#[cfg(feature = "testing")]
/// An attention pattern as plain data: `[batch, heads, seq_q, seq_k]` booleans, `true` =
/// masked, where `batch` and `heads` may be 1 to broadcast.
///
/// Used to build oracles (dense masked attention) for tests; never on a hot path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenseMask {
    dims: [usize; 4],
    masked: Vec<bool>,
}

#[cfg(feature = "testing")]
impl DenseMask {
    /// A mask from the rule `allowed(query, key)`, shared by every batch row and head.
    pub fn from_allowed(
        seq_q: usize,
        seq_k: usize,
        allowed: impl Fn(usize, usize) -> bool,
    ) -> Self {
        Self::per_head(1, seq_q, seq_k, |_, q, k| allowed(q, k))
    }

    /// A mask from the rule `allowed(head, query, key)`.
    pub fn per_head(
        heads: usize,
        seq_q: usize,
        seq_k: usize,
        allowed: impl Fn(usize, usize, usize) -> bool,
    ) -> Self {
        let mut masked = Vec::with_capacity(heads * seq_q * seq_k);
        for h in 0..heads {
            for q in 0..seq_q {
                for k in 0..seq_k {
                    masked.push(!allowed(h, q, k));
                }
            }
        }
        Self {
            dims: [1, heads, seq_q, seq_k],
            masked,
        }
    }

    /// A mask from the rule `allowed(batch, head, query, key)`.
    pub fn per_example(
        dims: [usize; 4],
        allowed: impl Fn(usize, usize, usize, usize) -> bool,
    ) -> Self {
        let [b, h, q, k] = dims;
        let mut masked = Vec::with_capacity(b * h * q * k);
        for bi in 0..b {
            for hi in 0..h {
                for qi in 0..q {
                    for ki in 0..k {
                        masked.push(!allowed(bi, hi, qi, ki));
                    }
                }
            }
        }
        Self { dims, masked }
    }

    /// Nothing masked.
    pub fn none(seq_q: usize, seq_k: usize) -> Self {
        Self::from_allowed(seq_q, seq_k, |_, _| true)
    }

    /// The bottom-right aligned causal pattern (see [`causal_mask`]).
    pub fn causal(seq_q: usize, seq_k: usize) -> Self {
        assert!(seq_k >= seq_q, "DenseMask::causal: needs seq_k >= seq_q");
        let offset = seq_k - seq_q;
        Self::from_allowed(seq_q, seq_k, move |q, k| k <= q + offset)
    }

    /// Key padding `[batch][seq_k]` (`true` = padded), broadcast over heads and queries.
    pub fn key_padding(pad: &[Vec<bool>], seq_q: usize) -> Self {
        let seq_k = pad.first().map_or(0, Vec::len);
        Self::per_example([pad.len(), 1, seq_q, seq_k], |b, _, _, k| !pad[b][k])
    }

    /// `[batch, heads, seq_q, seq_k]`, with 1 for broadcast dimensions.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Whether `(batch, head, query, key)` is masked (broadcast dimensions are ignored).
    pub fn is_masked(&self, b: usize, h: usize, q: usize, k: usize) -> bool {
        let [db, dh, dq, dk] = self.dims;
        let b = if db == 1 { 0 } else { b };
        let h = if dh == 1 { 0 } else { h };
        debug_assert!(q < dq && k < dk);
        self.masked[((b * dh + h) * dq + q) * dk + k]
    }

    /// Masked where either is masked, broadcasting batch and head dimensions.
    ///
    /// # Panics
    /// If the query/key lengths differ or batch/head sizes are incompatible.
    pub fn union(&self, other: &Self) -> Self {
        let [b1, h1, q1, k1] = self.dims;
        let [b2, h2, q2, k2] = other.dims;
        assert!(
            q1 == q2 && k1 == k2,
            "DenseMask::union: [seq_q, seq_k] differ: {:?} vs {:?}",
            self.dims,
            other.dims
        );
        let join = |a: usize, b: usize, what: &str| {
            assert!(
                a == b || a == 1 || b == 1,
                "DenseMask::union: {what} sizes {a} and {b} do not broadcast"
            );
            a.max(b)
        };
        let dims = [join(b1, b2, "batch"), join(h1, h2, "head"), q1, k1];
        Self::per_example(dims, |b, h, q, k| {
            !(self.is_masked(b, h, q, k) || other.is_masked(b, h, q, k))
        })
    }

    /// Number of allowed (unmasked) entries, counting broadcast dimensions once.
    pub fn allowed_count(&self) -> usize {
        self.masked.iter().filter(|m| !**m).count()
    }

    /// The mask as a tensor, expanded to `[batch, heads, seq_q, seq_k]`.
    ///
    /// # Shapes
    /// - output: `[batch, heads, seq_q, seq_k]`
    pub fn to_tensor(&self, batch: usize, heads: usize, device: &Device) -> Tensor<4, Bool> {
        let [db, dh, dq, dk] = self.dims;
        assert!(
            (db == 1 || db == batch) && (dh == 1 || dh == heads),
            "DenseMask::to_tensor: mask {:?} does not broadcast to batch {batch}, heads {heads}",
            self.dims
        );
        let t =
            Tensor::<4, Bool>::from_data(TensorData::new(self.masked.clone(), self.dims), device);
        t.expand([batch, heads, dq, dk])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_pattern_is_bottom_right_aligned() {
        let m = DenseMask::causal(2, 4);
        // query 0 sees keys 0..=2, query 1 sees all 4
        let row0: Vec<bool> = (0..4).map(|k| m.is_masked(0, 0, 0, k)).collect();
        let row1: Vec<bool> = (0..4).map(|k| m.is_masked(0, 0, 1, k)).collect();
        assert_eq!(row0, [false, false, false, true]);
        assert_eq!(row1, [false, false, false, false]);
    }

    #[test]
    fn union_broadcasts_heads() {
        let a = DenseMask::per_head(2, 1, 2, |h, _, k| h == k);
        let b = DenseMask::from_allowed(1, 2, |_, k| k == 0);
        let u = a.union(&b);
        assert_eq!(u.dims(), [1, 2, 1, 2]);
        assert!(!u.is_masked(0, 0, 0, 0));
        assert!(u.is_masked(0, 0, 0, 1));
        assert!(u.is_masked(0, 1, 0, 0));
        assert!(u.is_masked(0, 1, 0, 1));
    }
}
