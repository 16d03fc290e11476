//! Compressive Transformer: a compressed memory beside Transformer-XL's. Its invariants against
//! Transformer-XL with the same weights (no compressed slots: the same model; before the first
//! eviction: the same outputs; `c = 1` with an identity compressor: Transformer-XL with the
//! longer memory), FIFO bookkeeping, and a reconstruction loss that trains only the
//! compressors.

use burn::module::{ModuleVisitor, Param};
use burn::tensor::Gradients;
use burn::tensor::{Device, Tensor};
use efficient_attn::TransformerXlConfig;
use models::{
    Compression, CompressiveConfig, LanguageModel, LanguageModelConfig, PositionKind, SegmentMemory,
};

use super::{embedding, max_diff, stack, tokens};

/// A Transformer-XL language model with a compressed memory, and the same model without it.
fn models(config: CompressiveConfig, device: &Device) -> (LanguageModel, LanguageModel) {
    let model = LanguageModelConfig {
        embedding: embedding(PositionKind::None),
        stack: stack(TransformerXlConfig::default()),
        tie_embeddings: false,
        compressive: Some(config),
    }
    .init(device)
    .unwrap();
    let xl = LanguageModel {
        compressive: None,
        ..model.clone()
    };
    (model, xl)
}

/// Segments of four tokens (batch 2).
fn segments(n: usize, device: &Device) -> Vec<burn::tensor::Tensor<2, burn::tensor::Int>> {
    (0..n)
        .map(|s| {
            let row = |r: i64| {
                (0..4)
                    .map(|i| 1 + (s as i64 * 5 + i * 3 + r * 7) % 19)
                    .collect()
            };
            tokens(&[row(0), row(1)], device)
        })
        .collect()
}

/// Logits of every segment read in turn, each with the memory the one before left.
fn run(model: &LanguageModel, n: usize, mem_len: usize, device: &Device) -> Vec<Tensor<3>> {
    let mut memory = SegmentMemory::default();
    segments(n, device)
        .into_iter()
        .map(|s| {
            let out = model.forward_segment(s, None, &memory, mem_len);
            memory = out.memory;
            out.logits
        })
        .collect()
}

#[test]
fn no_compressed_slots_is_transformer_xl() {
    let device = Device::flex();
    let config = CompressiveConfig {
        cmem_len: Some(0),
        ..Default::default()
    };
    let (model, xl) = models(config, &device);
    for (s, (a, b)) in run(&model, 5, 4, &device)
        .into_iter()
        .zip(run(&xl, 5, 4, &device))
        .enumerate()
    {
        assert_eq!(max_diff(a, b), 0.0, "segment {s}");
    }
}

#[test]
fn before_the_first_eviction_the_outputs_are_transformer_xls() {
    let device = Device::flex();
    let (model, xl) = models(CompressiveConfig::default(), &device);
    // mem_len 8, segments of 4: segment 3 evicts segment 1, segment 4 reads it compressed.
    let ours = run(&model, 4, 8, &device);
    let theirs = run(&xl, 4, 8, &device);
    for s in 0..3 {
        let d = max_diff(ours[s].clone(), theirs[s].clone());
        assert_eq!(d, 0.0, "segment {s}: before any eviction");
    }
    let d = max_diff(ours[3].clone(), theirs[3].clone());
    assert!(
        d > 1e-4,
        "segment 3 reads the compressed slot, got a difference of {d:e}"
    );
}

#[test]
fn rate_one_with_an_identity_compressor_is_transformer_xl_with_the_longer_memory() {
    let device = Device::flex();
    for compression in [Compression::Mean, Compression::Max, Compression::Conv] {
        let config = CompressiveConfig {
            cmem_len: Some(6),
            ratio: 1,
            compression,
            ..Default::default()
        };
        let (mut model, xl) = models(config, &device);
        if compression == Compression::Conv {
            // The identity: weight [d, d, 1] = I, bias 0.
            let memory = model.compressive.as_mut().unwrap();
            for c in &mut memory.compressors {
                let conv = c.conv.as_mut().unwrap();
                let [d, _, _] = conv.weight.val().dims();
                conv.weight = Param::from_tensor(Tensor::<2>::eye(d, &device).reshape([d, d, 1]));
                conv.bias = conv
                    .bias
                    .take()
                    .map(|b| Param::from_tensor(b.val().zeros_like()));
            }
        }
        let ours = run(&model, 6, 4, &device);
        let theirs = run(&xl, 6, 10, &device);
        for (s, (a, b)) in ours.into_iter().zip(theirs).enumerate() {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "{compression:?}, segment {s}: differs by {d:e}");
        }
    }
}

#[test]
fn the_compressed_memory_is_a_bounded_fifo_of_detached_slots() {
    let device = Device::flex().autodiff();
    let config = CompressiveConfig {
        cmem_len: Some(3),
        ratio: 2,
        ..Default::default()
    };
    let (model, _) = models(config, &device);
    let mut memory = SegmentMemory::default();
    let mut lens = Vec::new();
    for s in segments(5, &device) {
        let out = model.forward_segment(s, None, &memory, 4);
        memory = out.memory;
        lens.push((memory.len(), memory.compressed_len()));
        assert!(
            memory.compressed.is_empty() || memory.compressed.len() == 2,
            "no compressed memory, or one per layer"
        );
        for c in &memory.compressed {
            assert!(!c.is_require_grad(), "compressed slots are stored detached");
        }
    }
    // 4 positions a segment, mem_len 4: from segment 2 on, 4 evicted → 2 slots, capped at 3.
    assert_eq!(lens, [(4, 0), (4, 2), (4, 3), (4, 3), (4, 3)]);
    // Decoding one token at a time: evictions wait until a multiple of the ratio.
    let one = tokens(&[vec![3], vec![4]], &device);
    let next = model.forward_segment(one.clone(), None, &memory, 4).memory;
    assert_eq!((next.len(), next.compressed_len()), (5, 3));
    let next = model.forward_segment(one, None, &next, 4).memory;
    assert_eq!((next.len(), next.compressed_len()), (4, 3));
}

/// Which parameters got a non-zero gradient.
struct Touched<'a> {
    grads: &'a Gradients,
    nonzero: usize,
    total: usize,
}

impl ModuleVisitor for Touched<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.total += 1;
        if let Some(g) = param.val().grad(self.grads)
            && g.abs().max().into_scalar::<f32>() > 0.0
        {
            self.nonzero += 1;
        }
    }
}

#[test]
fn the_reconstruction_loss_trains_only_the_compressors() {
    use burn::module::Module;
    let device = Device::flex().autodiff();
    let (model, _) = models(CompressiveConfig::default(), &device);
    let mut memory = SegmentMemory::default();
    let mut loss = None;
    for s in segments(2, &device) {
        let out = model.forward_segment(s, None, &memory, 4);
        memory = out.memory;
        loss = out.reconstruction;
    }
    let loss = loss.expect("segment 2 evicts segment 1: a reconstruction loss");
    assert!(loss.clone().into_scalar::<f32>() > 0.0);
    let grads = loss.backward();
    let mut main = Touched {
        grads: &grads,
        nonzero: 0,
        total: 0,
    };
    model.embedding.visit(&mut main);
    model.stack.visit(&mut main);
    model.head.visit(&mut main);
    assert!(main.total > 10);
    assert_eq!(main.nonzero, 0, "the main network gets no gradient");
    let mut compressors = Touched {
        grads: &grads,
        nonzero: 0,
        total: 0,
    };
    model.compressive.as_ref().unwrap().visit(&mut compressors);
    assert_eq!(compressors.total, 4, "a weight and a bias per layer");
    assert_eq!(compressors.nonzero, 4, "every compressor learns");
    // And the language-model loss does not reach the compressors.
    let out = model.forward_segment(segments(3, &device).remove(2), None, &memory, 4);
    let grads = out.logits.sum().backward();
    let mut compressors = Touched {
        grads: &grads,
        nonzero: 0,
        total: 0,
    };
    model.compressive.as_ref().unwrap().visit(&mut compressors);
    assert_eq!(compressors.nonzero, 0, "compressed slots are read detached");
}
