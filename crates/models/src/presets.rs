//! Published configurations, each citing its source.

use crate::config::{
    FeedForwardKind, FfnConfig, NormKind, NormPlacement, PositionKind, StackConfig,
};
use crate::embedding::EmbeddingSettings;
use crate::model::{ClassifierConfig, EncoderConfig, Pooling};
use efficient_attn::AttentionConfig;

/// LRA ListOps base model: 4 layers, width 512, 8 heads, MLP 1024, max length 2000, CLS
/// pooling, 10 classes (Tay et al. 2020, arXiv:2011.04006, §3 and
/// google-research/long-range-arena `lra_benchmarks/listops/configs/base_listops_config.py`).
/// `vocab_size` is the tokenizer's; one extra position is kept for the CLS token.
pub fn lra_listops(vocab_size: usize, attention: AttentionConfig) -> ClassifierConfig {
    lra_classifier(vocab_size, 2000 + 1, 512, 8, 1024, 10, attention)
}

/// LRA byte-level Text base model: 4 layers, width 256, 4 heads, MLP 1024, max length 4096
/// (the paper's 4K; the repository default is 1000), CLS pooling, 2 classes (same sources,
/// `text_classification/configs/base_tc_config.py`; Nyströmformer issue #13 confirms 4K).
pub fn lra_text(vocab_size: usize, attention: AttentionConfig) -> ClassifierConfig {
    lra_classifier(vocab_size, 4096 + 1, 256, 4, 1024, 2, attention)
}

fn lra_classifier(
    vocab_size: usize,
    max_len: usize,
    d_model: usize,
    n_heads: usize,
    d_ff: usize,
    n_classes: usize,
    attention: AttentionConfig,
) -> ClassifierConfig {
    ClassifierConfig {
        encoder: EncoderConfig {
            embedding: EmbeddingSettings {
                vocab_size,
                max_len,
                positions: PositionKind::Learned,
                type_vocab_size: 0,
                norm: false,
                norm_eps: 1e-6,
                dropout: 0.1,
            },
            stack: StackConfig {
                n_layers: 4,
                d_model,
                n_heads,
                d_ff,
                dropout: 0.1,
                norm: NormKind::LayerNorm,
                // LRA's flax encoder block normalises before attention and MLP.
                placement: NormPlacement::Pre,
                norm_eps: 1e-6,
                feed_forward: FeedForwardKind::Gelu,
                ffn: FfnConfig::Dense,
                attention,
                attention_layers: None,
                attention_pattern: None,
                ff_chunks: 1,
                reversible: false,
            },
            funnel: None,
        },
        n_classes,
        pooling: Pooling::Cls,
        dropout: 0.1,
    }
}

/// A BERT-style encoder matching sentence-transformers/all-MiniLM-L6-v2
/// (`config.json`: 6 layers, hidden 384, 12 heads, intermediate 1536, GELU, post-norm, LayerNorm
/// eps 1e-12, 512 learned positions, 2 token types, vocabulary 30522).
pub fn minilm_l6(attention: AttentionConfig) -> EncoderConfig {
    EncoderConfig {
        embedding: EmbeddingSettings {
            vocab_size: 30522,
            max_len: 512,
            positions: PositionKind::Learned,
            type_vocab_size: 2,
            norm: true,
            norm_eps: 1e-12,
            dropout: 0.1,
        },
        stack: StackConfig {
            n_layers: 6,
            d_model: 384,
            n_heads: 12,
            d_ff: 1536,
            dropout: 0.1,
            norm: NormKind::LayerNorm,
            placement: NormPlacement::Post,
            norm_eps: 1e-12,
            feed_forward: FeedForwardKind::Gelu,
            ffn: FfnConfig::Dense,
            attention,
            attention_layers: None,
            attention_pattern: None,
            ff_chunks: 1,
            reversible: false,
        },
        funnel: None,
    }
}
