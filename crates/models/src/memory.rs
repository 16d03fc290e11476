//! Segment memories (Transformer-XL's recurrence and the Compressive Transformer's second
//! FIFO): state passed explicitly from one segment to the next, never kept inside a module.

use burn::module::{Module, ModuleDisplay};
use burn::tensor::Tensor;
use efficient_attn::AttentionCore;

use crate::block::TransformerLayer;
use crate::compressive::CompressiveMemory;

/// What each layer remembers of the positions before the current segment: its inputs over the
/// last `mem_len` positions (Transformer-XL's segment recurrence), detached, `[batch, m,
/// d_model]` per layer, and with a [`CompressiveMemory`] the compressed slots of the positions
/// evicted from them, `[batch, cm, d_model]` per layer (oldest first). No tensors before the
/// first segment (or the first eviction). Passed explicitly from segment to segment
/// ([`LanguageModel::forward_segment`](crate::LanguageModel::forward_segment)); clear it at a
/// document boundary with [`SegmentMemory::default`].
#[derive(Clone, Debug, Default)]
pub struct SegmentMemory {
    /// One per layer, or none.
    pub layers: Vec<Tensor<3>>,
    /// Compressed memories: one per layer, or none.
    pub compressed: Vec<Tensor<3>>,
}

/// What [`LanguageModel::forward_segment`](crate::LanguageModel::forward_segment) returns.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Next-token logits, `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// The memory the next segment reads.
    pub memory: SegmentMemory,
    /// The Compressive Transformer's weighted attention-reconstruction loss, `[1]` (the mean
    /// over the layers that compressed; training forwards only): add it to the training
    /// loss. It reaches only the compressors' parameters.
    pub reconstruction: Option<Tensor<1>>,
}

impl SegmentMemory {
    /// Positions remembered uncompressed.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |m| m.dims()[1])
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.compressed_len() == 0
    }

    /// Compressed slots remembered.
    pub fn compressed_len(&self) -> usize {
        self.compressed.first().map_or(0, |m| m.dims()[1])
    }

    /// What each layer attends over before its segment: `[compressed; memory]`, or nothing.
    ///
    /// # Shapes
    /// - output: `[batch, cm + m, d_model]` per layer
    pub fn attended(&self) -> Vec<Tensor<3>> {
        if self.compressed.is_empty() {
            return self.layers.clone();
        }
        self.compressed
            .iter()
            .zip(&self.layers)
            .map(|(c, m)| Tensor::cat(vec![c.clone(), m.clone()], 1))
            .collect()
    }

    /// The memory after a segment whose layers read `inputs` (each layer's input over the
    /// segment): per layer the last `mem_len` positions of `[memory; input]`, detached. With
    /// `compressive`, the positions that fall out are compressed (a multiple of the ratio at a
    /// time: up to `ratio − 1` positions wait in the memory beyond `mem_len`, which happens
    /// only when segments or memory lengths are not multiples of the ratio, e.g. decoding one
    /// token at a time), appended to the compressed memory and truncated to its newest
    /// `cmem_len` slots; on an autodiff device the mean reconstruction loss of the layers
    /// comes back too. `mem_len = 0` remembers nothing.
    ///
    /// # Shapes
    /// - inputs: `[batch, seq, d_model]` per layer
    pub fn advance<C: AttentionCore + Module + ModuleDisplay + 'static>(
        &self,
        layers: &[TransformerLayer<C>],
        inputs: Vec<Tensor<3>>,
        mem_len: usize,
        compressive: Option<&CompressiveMemory>,
    ) -> (SegmentMemory, Option<Tensor<1>>) {
        if mem_len == 0 {
            return (SegmentMemory::default(), None);
        }
        let (ratio, cmem_len) = compressive.map_or((1, 0), |c| (c.ratio(), c.cmem_len(mem_len)));
        let mut next = SegmentMemory::default();
        let mut losses = Vec::new();
        for (l, input) in inputs.into_iter().enumerate() {
            let input = input.detach();
            let all = match self.layers.get(l) {
                Some(m) if m.dims()[1] > 0 => Tensor::cat(vec![m.clone(), input.clone()], 1),
                _ => input.clone(),
            };
            let n = all.dims()[1];
            let over = n.saturating_sub(mem_len);
            let evict = match compressive {
                Some(_) if cmem_len > 0 => over - over % ratio,
                _ => over,
            };
            next.layers.push(all.clone().narrow(1, evict, n - evict));
            let Some(compressive) = compressive.filter(|_| cmem_len > 0) else {
                continue;
            };
            let old = self.compressed.get(l).cloned();
            let slots = if evict > 0 {
                let train = input.device().is_autodiff();
                let (slots, loss) =
                    compressive.compress(l, &layers[l], input, all.narrow(1, 0, evict), train);
                losses.extend(loss);
                let joined = match old {
                    Some(old) => Tensor::cat(vec![old, slots.detach()], 1),
                    None => slots.detach(),
                };
                let m = joined.dims()[1];
                Some(joined.narrow(1, m - m.min(cmem_len), m.min(cmem_len)))
            } else {
                old
            };
            next.compressed.extend(slots);
        }
        if next.compressed.len() != next.layers.len() {
            next.compressed.clear();
        }
        let n = losses.len();
        let loss = (n > 0).then(|| Tensor::cat(losses, 0).sum().div_scalar(n as f64));
        (next, loss)
    }
}
