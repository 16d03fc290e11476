//! Batches and a data loader whose order is a function of (seed, epoch).
//!
//! Burn's own loader advances one shuffling generator per pass, so a run resumed from a
//! checkpoint would see a different order than an uninterrupted run. [`EpochLoader`] draws the
//! batches of epoch `e` from `(seed, e)` by its [`Batching`] (shuffled, or length buckets) and
//! reseeds the device RNG (dropout) at the start of each training epoch the same way, which
//! makes `--resume` reproduce the uninterrupted run. A [`TokenMeter`] counts the tokens it
//! hands out (real and padded) and the time its passes take.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::batching::{Batching, ItemLength, Pass, mix};
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

impl ItemLength for ClassItem {
    fn length(&self) -> usize {
        self.tokens.len()
    }
}

impl ItemLength for LmItem {
    fn length(&self) -> usize {
        self.tokens.len().saturating_sub(1)
    }
}

impl ItemLength for Seq2SeqItem {
    fn length(&self) -> usize {
        self.source.len() + self.target.len().saturating_sub(1)
    }
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

/// A set of numbers and its target value (set tasks).
#[derive(Clone, Debug, PartialEq)]
pub struct SetItem {
    /// The elements.
    pub values: Vec<f32>,
    /// The value to predict.
    pub target: f32,
}

impl ItemLength for SetItem {
    fn length(&self) -> usize {
        self.values.len()
    }
}

/// A batch of sets.
///
/// # Shapes
/// - values: `[batch, n, 1]`; mask_pad: `[batch, n]`; targets: `[batch, 1]`
#[derive(Clone, Debug)]
pub struct SetBatch {
    /// Elements, padded with zeros to the largest set.
    pub values: Tensor<3>,
    /// Padding (`true` = padded).
    pub mask_pad: Tensor<2, Bool>,
    /// Targets.
    pub targets: Tensor<2>,
}

/// Batches sets, padded to the largest.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetBatcher;

impl MakeBatch<SetItem, SetBatch> for SetBatcher {
    fn batch(&self, items: &[SetItem], device: &Device) -> SetBatch {
        let b = items.len();
        let n = items
            .iter()
            .map(|i| i.values.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut values = vec![0.0f32; b * n];
        let mut pad = vec![true; b * n];
        for (r, item) in items.iter().enumerate() {
            for (j, &v) in item.values.iter().enumerate() {
                values[r * n + j] = v;
                pad[r * n + j] = false;
            }
        }
        let targets: Vec<f32> = items.iter().map(|i| i.target).collect();
        SetBatch {
            values: Tensor::from_data(TensorData::new(values, [b, n, 1]), device),
            mask_pad: Tensor::from_data(TensorData::new(pad, [b, n]), device),
            targets: Tensor::from_data(TensorData::new(targets, [b, 1]), device),
        }
    }

    fn tokens(&self, items: &[&SetItem]) -> (u64, u64) {
        padded_counts(items.iter().map(|i| i.values.len()), None)
    }
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

    /// Tokens of the batch of `items`: the items' own, and the padded batch's (what the model
    /// computes on).
    fn tokens(&self, items: &[&I]) -> (u64, u64);
}

/// Tokens of sequences padded to `len` (or the longest), as [`pad_batch`] pads them.
fn padded_counts(lens: impl Iterator<Item = usize> + Clone, len: Option<usize>) -> (u64, u64) {
    let n = len
        .unwrap_or_else(|| lens.clone().max().unwrap_or(1))
        .max(1);
    let real: usize = lens.clone().map(|l| l.min(n)).sum();
    (real as u64, (n * lens.count()) as u64)
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

    fn tokens(&self, items: &[&ClassItem]) -> (u64, u64) {
        padded_counts(items.iter().map(|i| i.tokens.len()), self.fixed_len)
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

    fn tokens(&self, items: &[&LmItem]) -> (u64, u64) {
        padded_counts(items.iter().map(|i| i.length()), None)
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

    fn tokens(&self, items: &[&Seq2SeqItem]) -> (u64, u64) {
        let (rs, ps) = padded_counts(items.iter().map(|i| i.source.len()), None);
        let (rt, pt) = padded_counts(items.iter().map(|i| i.target.len() - 1), None);
        (rs + rt, ps + pt)
    }
}

/// Tokens handed out by a loader (real and padded) and the time its passes took (the union of
/// the passes of its device slices, which run at the same time), shared by its clones and
/// slices: the throughput a run reports.
#[derive(Debug, Default)]
pub struct TokenMeter {
    real: AtomicU64,
    padded: AtomicU64,
    /// When each pass (of each device's slice) ran; passes of several devices overlap, so the
    /// time is the length of their union.
    passes: std::sync::Mutex<Vec<(Instant, Instant)>>,
}

/// A [`TokenMeter`]'s counts at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TokenCount {
    /// The items' own tokens.
    pub real: u64,
    /// Tokens of the padded batches.
    pub padded: u64,
    /// Seconds spent in finished passes.
    pub seconds: f64,
}

impl TokenMeter {
    fn add(&self, real: u64, padded: u64) {
        self.real.fetch_add(real, Ordering::Relaxed);
        self.padded.fetch_add(padded, Ordering::Relaxed);
    }

    /// Seconds covered by the passes so far (overlapping passes counted once).
    fn seconds(&self) -> f64 {
        let mut passes = self.passes.lock().map(|p| p.clone()).unwrap_or_default();
        passes.sort_by_key(|p| p.0);
        let mut total = 0.0;
        let mut current: Option<(Instant, Instant)> = None;
        for (start, end) in passes {
            current = match current {
                Some((s, e)) if start <= e => Some((s, e.max(end))),
                Some((s, e)) => {
                    total += (e - s).as_secs_f64();
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        total + current.map_or(0.0, |(s, e)| (e - s).as_secs_f64())
    }

    /// The counts so far.
    pub fn count(&self) -> TokenCount {
        TokenCount {
            real: self.real.load(Ordering::Relaxed),
            padded: self.padded.load(Ordering::Relaxed),
            seconds: self.seconds(),
        }
    }
}

/// A loader over in-memory items whose batches in epoch `e` are drawn from `(seed, e)` by a
/// [`Batching`]. A training loader also reseeds the device RNG at the start of each epoch.
pub struct EpochLoader<I, O> {
    items: Arc<Vec<I>>,
    lengths: Arc<Vec<usize>>,
    range: (usize, usize),
    batcher: Arc<dyn MakeBatch<I, O>>,
    batch_size: usize,
    seed: u64,
    batching: Batching,
    train: bool,
    next_epoch: Arc<AtomicUsize>,
    device: Device,
    meter: Arc<TokenMeter>,
}

/// What an [`EpochLoader`] is for.
#[derive(Clone, Copy, Debug)]
pub enum LoaderRole {
    /// Training: batches drawn from (seed, epoch), the device RNG reseeded every epoch; the
    /// first pass is epoch `first_epoch` (1-based, as burn-train counts).
    Train {
        /// Data and dropout seed.
        seed: u64,
        /// The epoch of the first pass.
        first_epoch: usize,
    },
    /// Evaluation: the same batches every pass.
    Eval,
}

impl<I: ItemLength, O> EpochLoader<I, O> {
    /// A loader over `items`.
    pub fn new(
        items: Vec<I>,
        batcher: Arc<dyn MakeBatch<I, O>>,
        batch_size: usize,
        batching: Batching,
        role: LoaderRole,
        device: Device,
    ) -> Self {
        let n = items.len();
        let (seed, first_epoch, train) = match role {
            LoaderRole::Train { seed, first_epoch } => (seed, first_epoch, true),
            LoaderRole::Eval => (0, 1, false),
        };
        Self {
            lengths: Arc::new(items.iter().map(ItemLength::length).collect()),
            items: Arc::new(items),
            range: (0, n),
            batcher,
            batch_size: batch_size.max(1),
            seed,
            batching,
            train,
            next_epoch: Arc::new(AtomicUsize::new(first_epoch)),
            device,
            meter: Arc::new(TokenMeter::default()),
        }
    }
}

impl<I, O> EpochLoader<I, O> {
    fn with(&self, range: (usize, usize), device: Device) -> Self {
        Self {
            items: self.items.clone(),
            lengths: self.lengths.clone(),
            range,
            batcher: self.batcher.clone(),
            batch_size: self.batch_size,
            seed: self.seed,
            batching: self.batching,
            train: self.train,
            next_epoch: Arc::new(AtomicUsize::new(self.next_epoch.load(Ordering::SeqCst))),
            device,
            meter: self.meter.clone(),
        }
    }

    /// The batches (item indices) of epoch `epoch`.
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let pass = if self.train {
            Pass::Train {
                seed: self.seed,
                epoch,
            }
        } else {
            Pass::Eval
        };
        self.batching
            .batches(&self.lengths, self.range, self.batch_size, pass)
    }

    /// The token meter (shared by this loader's clones and slices).
    pub fn meter(&self) -> Arc<TokenMeter> {
        self.meter.clone()
    }

    /// The fraction of batch tokens that are padding in epoch `epoch`, under this loader's
    /// batching and under `other`.
    pub fn padding_fraction(&self, epoch: usize, other: Batching) -> (f64, f64) {
        let fraction = |batches: Vec<Vec<usize>>| {
            let (mut real, mut padded) = (0u64, 0u64);
            for b in &batches {
                let items: Vec<&I> = b.iter().map(|&i| &self.items[i]).collect();
                let (r, p) = self.batcher.tokens(&items);
                real += r;
                padded += p;
            }
            1.0 - real as f64 / padded.max(1) as f64
        };
        let mine = fraction(self.batches(epoch));
        let theirs = fraction(
            Self {
                batching: other,
                ..self.with(self.range, self.device.clone())
            }
            .batches(epoch),
        );
        (mine, theirs)
    }
}

struct EpochIter<'a, I, O> {
    loader: &'a EpochLoader<I, O>,
    batches: Vec<Vec<usize>>,
    position: usize,
    items_done: usize,
    items_total: usize,
    started: Instant,
}

impl<I, O> Drop for EpochIter<'_, I, O> {
    fn drop(&mut self) {
        if let Ok(mut passes) = self.loader.meter.passes.lock() {
            passes.push((self.started, Instant::now()));
        }
    }
}

impl<I: Clone, O> Iterator for EpochIter<'_, I, O> {
    type Item = Result<O, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.batches.get(self.position)?;
        let items: Vec<&I> = batch.iter().map(|&i| &self.loader.items[i]).collect();
        self.position += 1;
        self.items_done += items.len();
        let (real, padded) = self.loader.batcher.tokens(&items);
        self.loader.meter.add(real, padded);
        Some(Ok(self
            .loader
            .batcher
            .batch_refs(&items, &self.loader.device)))
    }
}

impl<I: Clone, O> DataLoaderIterator<O> for EpochIter<'_, I, O> {
    fn progress(&self) -> Progress {
        Progress::new(self.items_done, self.items_total, None)
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
        if self.train {
            self.device
                .seed(mix(self.seed ^ 0xd1b5_4a32_d192_ed03, epoch as u64));
        }
        Box::new(EpochIter {
            loader: self,
            batches: self.batches(epoch),
            position: 0,
            items_done: 0,
            items_total: self.num_items(),
            started: Instant::now(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Passes of several device slices overlap; their time is counted once.
    #[test]
    fn overlapping_passes_count_once() {
        let meter = TokenMeter::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        *meter.passes.lock().unwrap() = vec![(at(5), at(12)), (at(0), at(10)), (at(20), at(25))];
        assert!((meter.count().seconds - 17.0).abs() < 1e-9);
    }
}
