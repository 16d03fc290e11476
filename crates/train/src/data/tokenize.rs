//! Text to token ids: UTF-8 bytes, or a `tokenizers` tokenizer (loaded from `tokenizer.json`,
//! or trained on the training split and saved with the run). Offline only: nothing is
//! downloaded.

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::TokenizerModel;

/// Padding id of the byte encoding.
pub const BYTE_PAD: u32 = 0;
/// CLS id of the byte encoding.
pub const BYTE_CLS: u32 = 1;
/// Vocabulary size of the byte encoding: padding, CLS and 256 bytes.
pub const BYTE_VOCAB: usize = 258;

/// UTF-8 bytes of `text` after a CLS token (byte `b` is id `b + 2`), truncated to `max_len`
/// ids in all.
pub fn encode_bytes(text: &str, max_len: usize) -> Vec<u32> {
    std::iter::once(BYTE_CLS)
        .chain(text.bytes().map(|b| b as u32 + 2))
        .take(max_len)
        .collect()
}

/// Bytes of `text` without a CLS token (language modelling).
pub fn encode_bytes_plain(text: &str) -> Vec<u32> {
    text.bytes().map(|b| b as u32 + 2).collect()
}

/// The text of byte-encoded ids ([`encode_bytes_plain`]); ids that are no byte (padding, CLS)
/// are left out, invalid UTF-8 becomes U+FFFD.
pub fn decode_bytes_plain(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .filter(|&&id| (2..BYTE_VOCAB as u32).contains(&id))
        .map(|&id| (id - 2) as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A `tokenizers` tokenizer with the ids our batches need.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Padding id.
    pub pad: u32,
    /// CLS id (first token of classified sequences).
    pub cls: u32,
    /// Whether the tokenizer's post-processor already adds CLS (BERT's template).
    adds_cls: bool,
}

fn special(tokenizer: &Tokenizer, names: &[&str]) -> Option<u32> {
    names.iter().find_map(|n| tokenizer.token_to_id(n))
}

impl TextTokenizer {
    fn wrap(inner: Tokenizer) -> Result<Self, String> {
        let pad = special(&inner, &["[PAD]", "<pad>"])
            .ok_or("the tokenizer has no [PAD] or <pad> token")?;
        let cls = special(&inner, &["[CLS]", "<cls>", "<s>"])
            .ok_or("the tokenizer has no [CLS], <cls> or <s> token")?;
        let probe = inner
            .encode("a", true)
            .map_err(|e| format!("the tokenizer cannot encode: {e}"))?;
        let adds_cls = probe.get_ids().first() == Some(&cls);
        Ok(Self {
            inner,
            pad,
            cls,
            adds_cls,
        })
    }

    /// Loads a `tokenizer.json`, switching off its own truncation and padding (lengths are the
    /// batcher's business).
    ///
    /// # Errors
    /// If the file is missing or not a tokenizer, or lacks padding/CLS tokens.
    pub fn load(path: &Path) -> Result<Self, String> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| format!("cannot load tokenizer {}: {e}", path.display()))?;
        inner
            .with_truncation(None)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        inner.with_padding(None);
        Self::wrap(inner).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Trains a BPE (byte-level) or WordPiece (lower-cased, BERT pre-tokenisation) tokenizer
    /// on `texts`. Special tokens come first: padding is id 0 and CLS id 1.
    ///
    /// # Errors
    /// If training fails.
    pub fn train<'a>(
        model: TokenizerModel,
        vocab_size: usize,
        texts: impl Iterator<Item = &'a str> + Send,
    ) -> Result<Self, String> {
        let texts: Vec<&str> = texts.collect();
        let mut tokenizer: Tokenizer = match model {
            TokenizerModel::Bpe => {
                let mut t = Tokenizer::new(BPE::default());
                t.with_pre_tokenizer(Some(ByteLevel::default()));
                t.with_decoder(Some(ByteLevel::default()));
                t
            }
            TokenizerModel::Wordpiece => {
                let mut t = Tokenizer::new(
                    WordPiece::builder()
                        .unk_token("[UNK]".into())
                        .build()
                        .map_err(|e| e.to_string())?,
                );
                t.with_normalizer(Some(BertNormalizer::default()));
                t.with_pre_tokenizer(Some(BertPreTokenizer));
                t
            }
        };
        let specials: Vec<AddedToken> = match model {
            TokenizerModel::Bpe => ["<pad>", "<cls>", "<eos>", "<unk>"],
            TokenizerModel::Wordpiece => ["[PAD]", "[CLS]", "[SEP]", "[UNK]"],
        }
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
        let mut trainer: TrainerWrapper = match model {
            TokenizerModel::Bpe => BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(specials)
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build()
                .into(),
            TokenizerModel::Wordpiece => WordPieceTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(specials)
                .build()
                .into(),
        };
        tokenizer
            .train(&mut trainer, texts.into_iter())
            .map_err(|e| format!("tokenizer training failed: {e}"))?;
        Self::wrap(tokenizer)
    }

    /// Saves the tokenizer as `tokenizer.json`.
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        self.inner
            .save(path, true)
            .map_err(|e| format!("cannot save tokenizer {}: {e}", path.display()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// CLS then the tokens of `text`, truncated to `max_len` ids.
    ///
    /// # Errors
    /// If encoding fails.
    pub fn encode_classified(&self, text: &str, max_len: usize) -> Result<Vec<u32>, String> {
        let enc = self
            .inner
            .encode(text, self.adds_cls)
            .map_err(|e| e.to_string())?;
        let ids = enc.get_ids();
        let mut out: Vec<u32> = if self.adds_cls {
            ids.to_vec()
        } else {
            std::iter::once(self.cls)
                .chain(ids.iter().copied())
                .collect()
        };
        out.truncate(max_len);
        Ok(out)
    }

    /// The tokens of `text` without special tokens (language modelling).
    ///
    /// # Errors
    /// If encoding fails.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| e.to_string())?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`, special tokens left out (generation).
    ///
    /// # Errors
    /// If decoding fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_round_trip_and_skip_special_ids() {
        let text = "héllo, wörld";
        let mut ids = encode_bytes_plain(text);
        ids.insert(0, BYTE_CLS);
        ids.push(BYTE_PAD);
        assert_eq!(decode_bytes_plain(&ids), text);
    }

    #[test]
    fn bytes_have_cls_and_truncate() {
        assert_eq!(encode_bytes("ab", 10), vec![1, 99, 100]);
        assert_eq!(encode_bytes("abc", 2), vec![1, 99]);
    }

    #[test]
    fn trained_tokenizers_put_specials_first_and_round_trip_through_a_file() {
        let texts = [
            "the cat sat on the mat",
            "the dog sat on the log",
            "a cat and a dog",
        ]
        .repeat(20);
        for model in [TokenizerModel::Bpe, TokenizerModel::Wordpiece] {
            let t = TextTokenizer::train(model, 60, texts.iter().map(|s| s.as_ref())).unwrap();
            assert_eq!((t.pad, t.cls), (0, 1), "{model:?}");
            let ids = t.encode_classified("the cat sat", 64).unwrap();
            assert_eq!(ids[0], 1);
            assert!(ids.len() > 1);
            let dir =
                std::env::temp_dir().join(format!("efformer-tok-{}-{model:?}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            t.save(&dir.join("tokenizer.json")).unwrap();
            let back = TextTokenizer::load(&dir.join("tokenizer.json")).unwrap();
            assert_eq!(back.encode_classified("the cat sat", 64).unwrap(), ids);
            std::fs::remove_dir_all(dir).ok();
        }
    }
}
