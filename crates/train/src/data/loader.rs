//! Batches and a data loader whose order is a function of (seed, epoch).
//!
//! Burn's own loader advances one shuffling generator per pass, so a run resumed from a
//! checkpoint would see a different order than an uninterrupted run. [`EpochLoader`] draws the
//! permutation of epoch `e` from `(seed, e)` and reseeds the device RNG (dropout) at the start
//! of each training epoch the same way, which makes `--resume` reproduce the uninterrupted run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::rng::DataRng;
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

/// A token sequence with a class label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassItem {
    /// Token ids (CLS first).
    pub tokens: Vec<u32>,
    /// Class index.
    pub label: u32,
}

/// A token sequence for language modelling: inputs are `tokens[..n-1]`, targets `tokens[1..]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmItem {
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// A source and target pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq2SeqItem {
    /// Source ids.
    pub source: Vec<u32>,
    /// Target ids (start token first, end token last).
    pub target: Vec<u32>,
}

/// A classification batch.
///
/// # Shapes
/// - tokens, mask_pad: `[batch, seq]`; labels: `[batch]`
#[derive(Clone, Debug)]
pub struct ClassBatch {
    /// Token ids.
    pub tokens: Tensor<2, Int>,
    /// Padding (`true` = padded).
    pub mask_pad: Tensor<2, Bool>,
    /// Labels.
    pub labels: Tensor<1, Int>,
}

/// A language-modelling batch.
///
/// # Shapes
/// - inputs, targets, mask_pad: `[batch, seq]`
#[derive(Clone, Debug)]
pub struct LmBatch {
    /// Input ids.
    pub inputs: Tensor<2, Int>,
    /// Next-token targets (padding id where padded).
    pub targets: Tensor<2, Int>,
    /// Padding of the inputs.
    pub mask_pad: Tensor<2, Bool>,
}

/// A sequence-to-sequence batch.
///
/// # Shapes
/// - source, source_pad: `[batch, seq_src]`; target_in, target_out, target_pad: `[batch, seq_tgt]`
#[derive(Clone, Debug)]
pub struct Seq2SeqBatch {
    /// Source ids.
    pub source: Tensor<2, Int>,
    /// Source padding.
    pub source_pad: Tensor<2, Bool>,
    /// Decoder inputs (target without its last token).
    pub target_in: Tensor<2, Int>,
    /// Decoder targets (target without its first token).
    pub target_out: Tensor<2, Int>,
    /// Decoder padding.
    pub target_pad: Tensor<2, Bool>,
}

/// Pads sequences to `len` (or the longest) with `pad`, returning ids and the padding mask.
pub fn pad_batch(
    seqs: &[&[u32]],
    pad: u32,
    len: Option<usize>,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Bool>) {
    let n = len
        .unwrap_or_else(|| seqs.iter().map(|s| s.len()).max().unwrap_or(1))
        .max(1);
    let mut ids = Vec::with_capacity(seqs.len() * n);
    let mut mask = Vec::with_capacity(seqs.len() * n);
    for s in seqs {
        for p in 0..n {
            match s.get(p) {
                Some(&t) => {
                    ids.push(t as i64);
                    mask.push(false);
                }
                None => {
                    ids.push(pad as i64);
                    mask.push(true);
                }
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [seqs.len(), n]), device),
        Tensor::from_data(TensorData::new(mask, [seqs.len(), n]), device),
    )
}

/// Turns items into a batch on a device.
pub trait MakeBatch<I, O>: Send + Sync {
    /// The batch of `items`.
    fn batch(&self, items: &[I], device: &Device) -> O;
}

/// Classification batches padded to the longest item, or to `fixed_len` for variants whose
/// parameters are sized by the length (Linformer, Synthesizer).
#[derive(Clone, Debug)]
pub struct ClassBatcher {
    /// Padding id.
    pub pad: u32,
    /// Pad every batch to this length.
    pub fixed_len: Option<usize>,
}

impl MakeBatch<ClassItem, ClassBatch> for ClassBatcher {
    fn batch(&self, items: &[ClassItem], device: &Device) -> ClassBatch {
        let seqs: Vec<&[u32]> = items.iter().map(|i| i.tokens.as_slice()).collect();
        let (tokens, mask_pad) = pad_batch(&seqs, self.pad, self.fixed_len, device);
        let labels: Vec<i64> = items.iter().map(|i| i.label as i64).collect();
        ClassBatch {
            tokens,
            mask_pad,
            labels: Tensor::from_data(TensorData::new(labels, [items.len()]), device),
        }
    }
}

/// Language-modelling batches (inputs and shifted targets).
#[derive(Clone, Debug)]
pub struct LmBatcher {
    /// Padding id.
    pub pad: u32,
}

impl MakeBatch<LmItem, LmBatch> for LmBatcher {
    fn batch(&self, items: &[LmItem], device: &Device) -> LmBatch {
        let inputs: Vec<&[u32]> = items
            .iter()
            .map(|i| &i.tokens[..i.tokens.len() - 1])
            .collect();
        let targets: Vec<&[u32]> = items.iter().map(|i| &i.tokens[1..]).collect();
        let (inputs, mask_pad) = pad_batch(&inputs, self.pad, None, device);
        let (targets, _) = pad_batch(&targets, self.pad, None, device);
        LmBatch {
            inputs,
            targets,
            mask_pad,
        }
    }
}

/// Sequence-to-sequence batches.
#[derive(Clone, Debug)]
pub struct Seq2SeqBatcher {
    /// Padding id.
    pub pad: u32,
}

impl MakeBatch<Seq2SeqItem, Seq2SeqBatch> for Seq2SeqBatcher {
    fn batch(&self, items: &[Seq2SeqItem], device: &Device) -> Seq2SeqBatch {
        let src: Vec<&[u32]> = items.iter().map(|i| i.source.as_slice()).collect();
        let tin: Vec<&[u32]> = items
            .iter()
            .map(|i| &i.target[..i.target.len() - 1])
            .collect();
        let tout: Vec<&[u32]> = items.iter().map(|i| &i.target[1..]).collect();
        let (source, source_pad) = pad_batch(&src, self.pad, None, device);
        let (target_in, target_pad) = pad_batch(&tin, self.pad, None, device);
        let (target_out, _) = pad_batch(&tout, self.pad, None, device);
        Seq2SeqBatch {
            source,
            source_pad,
            target_in,
            target_out,
            target_pad,
        }
    }
}

/// A loader over in-memory items whose order in epoch `e` is a permutation drawn from
/// `(seed, e)`. A training loader also reseeds the device RNG at the start of each epoch.
pub struct EpochLoader<I, O> {
    items: Arc<Vec<I>>,
    range: (usize, usize),
    batcher: Arc<dyn MakeBatch<I, O>>,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    reseed_device: bool,
    next_epoch: Arc<AtomicUsize>,
    device: Device,
}

impl<I, O> EpochLoader<I, O> {
    /// A loader over `items`; the first call of `iter` is epoch `first_epoch` (1-based, as
    /// burn-train counts).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        items: Vec<I>,
        batcher: Arc<dyn MakeBatch<I, O>>,
        batch_size: usize,
        seed: u64,
        shuffle: bool,
        reseed_device: bool,
        first_epoch: usize,
        device: Device,
    ) -> Self {
        let n = items.len();
        Self {
            items: Arc::new(items),
            range: (0, n),
            batcher,
            batch_size: batch_size.max(1),
            seed,
            shuffle,
            reseed_device,
            next_epoch: Arc::new(AtomicUsize::new(first_epoch)),
            device,
        }
    }

    fn with(&self, range: (usize, usize), device: Device) -> Self {
        Self {
            items: self.items.clone(),
            range,
            batcher: self.batcher.clone(),
            batch_size: self.batch_size,
            seed: self.seed,
            shuffle: self.shuffle,
            reseed_device: self.reseed_device,
            next_epoch: Arc::new(AtomicUsize::new(self.next_epoch.load(Ordering::SeqCst))),
            device,
        }
    }

    /// The order of epoch `epoch`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let (start, end) = self.range;
        let mut idx: Vec<usize> = (start..end).collect();
        if self.shuffle {
            let perm = DataRng::new(mix(self.seed, epoch as u64)).permutation(idx.len());
            idx = perm.into_iter().map(|p| start + p).collect();
        }
        idx
    }
}

fn mix(seed: u64, epoch: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch.wrapping_add(0x632b_e59b_d9b4_e019)
}

struct EpochIter<'a, I, O> {
    loader: &'a EpochLoader<I, O>,
    order: Vec<usize>,
    position: usize,
}

impl<I: Clone, O> Iterator for EpochIter<'_, I, O> {
    type Item = Result<O, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.position >= self.order.len() {
            return None;
        }
        let end = (self.position + self.loader.batch_size).min(self.order.len());
        let items: Vec<&I> = self.order[self.position..end]
            .iter()
            .map(|&i| &self.loader.items[i])
            .collect();
        self.position = end;
        Some(Ok(self
            .loader
            .batcher
            .batch_refs(&items, &self.loader.device)))
    }
}

impl<I: Clone, O> DataLoaderIterator<O> for EpochIter<'_, I, O> {
    fn progress(&self) -> Progress {
        Progress::new(self.position, self.order.len(), None)
    }
}

/// Batching from references (the loader does not clone items).
trait BatchRefs<I, O> {
    fn batch_refs(&self, items: &[&I], device: &Device) -> O;
}

impl<I: Clone, O> BatchRefs<I, O> for Arc<dyn MakeBatch<I, O>> {
    fn batch_refs(&self, items: &[&I], device: &Device) -> O {
        let owned: Vec<I> = items.iter().map(|i| (*i).clone()).collect();
        self.batch(&owned, device)
    }
}

impl<I, O> DataLoader<O> for EpochLoader<I, O>
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<O> + 'a> {
        let epoch = self.next_epoch.fetch_add(1, Ordering::SeqCst);
        if self.reseed_device {
            self.device
                .seed(mix(self.seed ^ 0xd1b5_4a32_d192_ed03, epoch as u64));
        }
        Box::new(EpochIter {
            loader: self,
            order: self.order(epoch),
            position: 0,
        })
    }

    fn num_items(&self) -> usize {
        self.range.1 - self.range.0
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<O>> {
        Arc::new(self.with(self.range, device.clone()))
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<O>> {
        let s = self.range.0 + start.min(self.num_items());
        let e = self.range.0 + end.min(self.num_items());
        Arc::new(self.with((s, e), self.device.clone()))
    }
}
