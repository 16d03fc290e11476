//! From an experiment's task section to in-memory items: generated, read and tokenised.

use std::path::{Path, PathBuf};

use crate::rng::DataRng;

use super::listops::{self, ListOpsExample};
use super::loader::{ClassItem, LmItem, Seq2SeqItem, SetItem};
use super::text::{LabeledTexts, read_labeled};
use super::tokenize::{self, TextTokenizer};
use crate::config::{
    ExperimentConfig, LmMode, LmTask, Seq2SeqProblem, Seq2SeqTask, SetTask, TaskKind, TextEncoding,
    TextTask, TokenizerSection,
};

/// Prepared classification data.
#[derive(Clone, Debug)]
pub struct ClassData {
    /// Training items.
    pub train: Vec<ClassItem>,
    /// Validation items.
    pub valid: Vec<ClassItem>,
    /// Test items.
    pub test: Vec<ClassItem>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Padding id.
    pub pad: u32,
    /// Class names.
    pub labels: Vec<String>,
    /// Longest item (tokens, CLS included).
    pub max_len: usize,
}

/// Prepared language-modelling data.
#[derive(Clone, Debug)]
pub struct LmData {
    /// Training windows of `seq_len + 1` tokens.
    pub train: Vec<LmItem>,
    /// Validation windows.
    pub valid: Vec<LmItem>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Padding id.
    pub pad: u32,
    /// Window length (inputs).
    pub seq_len: usize,
}

/// Prepared sequence-to-sequence data.
#[derive(Clone, Debug)]
pub struct Seq2SeqData {
    /// Training pairs.
    pub train: Vec<Seq2SeqItem>,
    /// Validation pairs.
    pub valid: Vec<Seq2SeqItem>,
    /// Vocabulary size (symbols and the special ids).
    pub vocab_size: usize,
    /// Padding id (0); start is 1, end is 2.
    pub pad: u32,
    /// Longest source or target.
    pub max_len: usize,
}

/// Data of any task.
#[derive(Clone, Debug)]
pub enum TaskData {
    /// Classification.
    Class(ClassData),
    /// Language modelling.
    Lm(LmData),
    /// Sequence to sequence.
    Seq2Seq(Seq2SeqData),
    /// Sets.
    Set(SetData),
}

/// Generated sets of numbers.
#[derive(Clone, Debug)]
pub struct SetData {
    /// Training sets.
    pub train: Vec<SetItem>,
    /// Validation sets.
    pub valid: Vec<SetItem>,
    /// Test sets.
    pub test: Vec<SetItem>,
}

/// Where relative data paths are resolved: the working directory if they exist there,
/// otherwise relative to the config file's folder.
pub fn resolve(path: &Path, config_dir: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        path.to_path_buf()
    } else {
        let candidate = config_dir.join(path);
        if candidate.exists() {
            candidate
        } else {
            path.to_path_buf()
        }
    }
}

/// Prepares the data of `config`; a trained tokenizer is saved into `run_dir`.
///
/// # Errors
/// Missing files, bad records, tokenizer problems; the message names the file or key.
pub fn prepare(
    config: &ExperimentConfig,
    config_dir: &Path,
    run_dir: &Path,
) -> Result<TaskData, String> {
    match config.task {
        TaskKind::Listops => listops_data(config, config_dir).map(TaskData::Class),
        TaskKind::LraText | TaskKind::TextClassification => text_data(
            &config.text,
            config.task,
            config.train.seed,
            config_dir,
            run_dir,
        )
        .map(TaskData::Class),
        TaskKind::LanguageModel => lm_data(
            &config.lm,
            (config.train.batch_size, config.train.eval_batch_size),
            config_dir,
            run_dir,
        )
        .map(TaskData::Lm),
        TaskKind::Seq2seq => Ok(TaskData::Seq2Seq(seq2seq_data(&config.seq2seq)?)),
        TaskKind::SetMax => set_max_data(&config.set).map(TaskData::Set),
    }
}

fn listops_items(examples: Vec<ListOpsExample>) -> Result<Vec<ClassItem>, String> {
    examples
        .into_iter()
        .map(|e| {
            let tokens = std::iter::once(Ok(1))
                .chain(e.tokens.iter().map(|t| listops::token_id(t)))
                .collect::<Result<Vec<u32>, String>>()?;
            Ok(ClassItem {
                tokens,
                label: e.label as u32,
            })
        })
        .collect()
}

fn listops_data(config: &ExperimentConfig, config_dir: &Path) -> Result<ClassData, String> {
    let task = &config.listops;
    let [train, valid, test] = match &task.files {
        Some(dir) => {
            let dir = resolve(dir, config_dir);
            let read = |name: &str| -> Result<Vec<ListOpsExample>, String> {
                let path = dir.join(name);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("listops.files: cannot read {}: {e}", path.display()))?;
                text.lines()
                    .enumerate()
                    .skip(1) // header `Source\tTarget`
                    .filter(|(_, l)| !l.trim().is_empty())
                    .map(|(i, l)| {
                        listops::parse_tsv_line(l)
                            .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
                    })
                    .collect()
            };
            [
                read("basic_train.tsv")?,
                read("basic_val.tsv")?,
                read("basic_test.tsv")?,
            ]
        }
        None => listops::generate(&task.settings())?,
    };
    let train = listops_items(train)?;
    let valid = listops_items(valid)?;
    let test = listops_items(test)?;
    let max_len = train
        .iter()
        .chain(&valid)
        .chain(&test)
        .map(|i| i.tokens.len())
        .max()
        .unwrap_or(1);
    Ok(ClassData {
        train,
        valid,
        test,
        vocab_size: listops::VOCAB.len(),
        pad: 0,
        labels: (0..10).map(|d| d.to_string()).collect(),
        max_len,
    })
}

fn shuffled<T>(mut items: Vec<T>, seed: u64, limit: Option<usize>) -> Vec<T> {
    let perm = DataRng::new(seed).permutation(items.len());
    let mut slots: Vec<Option<T>> = items.drain(..).map(Some).collect();
    let mut out: Vec<T> = perm.into_iter().filter_map(|i| slots[i].take()).collect();
    if let Some(l) = limit {
        out.truncate(l);
    }
    out
}

fn tokenizer_for(
    section: &TokenizerSection,
    texts: &[&str],
    config_dir: &Path,
    run_dir: &Path,
    key: &str,
) -> Result<TextTokenizer, String> {
    let tokenizer = match &section.file {
        Some(file) => TextTokenizer::load(&resolve(file, config_dir))
            .map_err(|e| format!("{key}.file: {e}"))?,
        None => {
            let n = section.train_documents.min(texts.len());
            eprintln!(
                "training a {:?} tokenizer (vocabulary {}) on {n} documents",
                section.model, section.vocab_size
            );
            TextTokenizer::train(
                section.model,
                section.vocab_size,
                texts[..n].iter().copied(),
            )?
        }
    };
    tokenizer.save(&run_dir.join("tokenizer.json"))?;
    Ok(tokenizer)
}

/// Text to token ids.
type Encoder<'a> = dyn Fn(&str) -> Result<Vec<u32>, String> + 'a;

fn text_data(
    task: &TextTask,
    kind: TaskKind,
    seed: u64,
    config_dir: &Path,
    run_dir: &Path,
) -> Result<ClassData, String> {
    let read = |path: &Path, labels: Option<&[String]>| -> Result<LabeledTexts, String> {
        read_labeled(&resolve(path, config_dir), labels, None)
    };
    let train =
        read(&task.train, task.labels.as_deref()).map_err(|e| format!("text.train: {e}"))?;
    let labels = train.labels.clone();
    let test = read(&task.test, Some(&labels)).map_err(|e| format!("text.test: {e}"))?;
    let valid = match &task.valid {
        Some(p) => read(p, Some(&labels)).map_err(|e| format!("text.valid: {e}"))?,
        None => test.clone(),
    };
    let train_ex = shuffled(train.examples, seed, task.train_limit);
    let valid_ex = shuffled(valid.examples, seed + 1, task.eval_limit);
    let test_ex = shuffled(test.examples, seed + 1, task.eval_limit);
    let encoding = if kind == TaskKind::LraText {
        TextEncoding::Bytes
    } else {
        task.encoding
    };
    let (encode, vocab_size, pad): (Box<Encoder<'_>>, usize, u32) = match encoding {
        TextEncoding::Bytes => (
            Box::new(|t: &str| Ok(tokenize::encode_bytes(t, task.max_len))),
            tokenize::BYTE_VOCAB,
            tokenize::BYTE_PAD,
        ),
        TextEncoding::Tokenizer => {
            let texts: Vec<&str> = train_ex.iter().map(|e| e.text.as_str()).collect();
            let tok = tokenizer_for(
                &task.tokenizer,
                &texts,
                config_dir,
                run_dir,
                "text.tokenizer",
            )?;
            let (v, p) = (tok.vocab_size(), tok.pad);
            (
                Box::new(move |t: &str| tok.encode_classified(t, task.max_len)),
                v,
                p,
            )
        }
    };
    let items = |ex: Vec<super::text::TextExample>| -> Result<Vec<ClassItem>, String> {
        ex.into_iter()
            .map(|e| {
                Ok(ClassItem {
                    tokens: encode(&e.text)?,
                    label: e.label as u32,
                })
            })
            .collect()
    };
    let train = items(train_ex)?;
    let valid = items(valid_ex)?;
    let test = items(test_ex)?;
    let max_len = train
        .iter()
        .chain(&valid)
        .chain(&test)
        .map(|i| i.tokens.len())
        .max()
        .unwrap_or(1);
    Ok(ClassData {
        train,
        valid,
        test,
        vocab_size,
        pad,
        labels,
        max_len,
    })
}

fn read_corpus(path: &Path, max_bytes: Option<usize>) -> Result<String, String> {
    let name = path.to_string_lossy();
    let mut text = if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
        super::text::read_texts(path, max_bytes)?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
    };
    if let Some(m) = max_bytes
        && text.len() > m
    {
        let mut cut = m;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Ok(text)
}

fn windows(ids: &[u32], seq_len: usize) -> Vec<LmItem> {
    ids.chunks(seq_len)
        .filter(|c| c.len() > 1)
        .enumerate()
        .map(|(i, _)| {
            let start = i * seq_len;
            let end = (start + seq_len + 1).min(ids.len());
            LmItem {
                tokens: ids[start..end].to_vec(),
            }
        })
        .filter(|w| w.tokens.len() > 1)
        .collect()
}

/// `ids` cut into `streams` contiguous parts, each read as consecutive segments of `seq_len`
/// inputs (plus the next token as the last target), laid out segment by segment: item
/// `t · streams + s` is segment t of stream s. The tail that does not fill a segment of every
/// stream is left out.
pub fn stream_segments(ids: &[u32], seq_len: usize, streams: usize) -> Vec<LmItem> {
    let streams = streams.max(1);
    let part = ids.len().saturating_sub(1) / streams;
    let segments = part / seq_len.max(1);
    (0..segments)
        .flat_map(|t| {
            (0..streams).map(move |s| {
                let start = s * part + t * seq_len;
                LmItem {
                    tokens: ids[start..start + seq_len + 1].to_vec(),
                }
            })
        })
        .collect()
}

fn lm_data(
    task: &LmTask,
    batches: (usize, usize),
    config_dir: &Path,
    run_dir: &Path,
) -> Result<LmData, String> {
    if task.seq_len < 2 {
        return Err("lm.seq_len: at least 2 tokens".into());
    }
    let train_text = read_corpus(&resolve(&task.train, config_dir), task.max_bytes)
        .map_err(|e| format!("lm.train: {e}"))?;
    let (train_text, valid_text) = match &task.valid {
        Some(p) => (
            train_text,
            read_corpus(&resolve(p, config_dir), task.max_bytes)
                .map_err(|e| format!("lm.valid: {e}"))?,
        ),
        None => {
            let mut cut = train_text.len() * 95 / 100;
            while !train_text.is_char_boundary(cut) {
                cut -= 1;
            }
            let valid = train_text[cut..].to_string();
            (train_text[..cut].to_string(), valid)
        }
    };
    let (train_ids, valid_ids, vocab_size, pad) = match task.encoding {
        TextEncoding::Bytes => (
            tokenize::encode_bytes_plain(&train_text),
            tokenize::encode_bytes_plain(&valid_text),
            tokenize::BYTE_VOCAB,
            tokenize::BYTE_PAD,
        ),
        TextEncoding::Tokenizer => {
            let docs: Vec<&str> = train_text.lines().collect();
            let tok = tokenizer_for(&task.tokenizer, &docs, config_dir, run_dir, "lm.tokenizer")?;
            (
                tok.encode_plain(&train_text)?,
                tok.encode_plain(&valid_text)?,
                tok.vocab_size(),
                tok.pad,
            )
        }
    };
    let (train, valid) = match task.mode {
        LmMode::Windows => (
            windows(&train_ids, task.seq_len),
            windows(&valid_ids, task.seq_len),
        ),
        LmMode::Stream => {
            let (train, valid) = (
                stream_segments(&train_ids, task.seq_len, batches.0),
                stream_segments(&valid_ids, task.seq_len, batches.1),
            );
            if valid.is_empty() {
                return Err(format!(
                    "lm.mode = \"stream\": the validation text ({} tokens) does not fill one \
                     segment of lm.seq_len = {} in each of train.eval_batch_size = {} streams",
                    valid_ids.len(),
                    task.seq_len,
                    batches.1
                ));
            }
            (train, valid)
        }
    };
    Ok(LmData {
        train,
        valid,
        vocab_size,
        pad,
        seq_len: task.seq_len,
    })
}

/// Sets of `min_size..=max_size` values uniform in `[low, high)`, each with its maximum; the
/// three splits drawn one after another from one seeded stream.
///
/// # Errors
/// Sizes or bounds that describe no set, naming the key.
pub fn set_max_data(task: &SetTask) -> Result<SetData, String> {
    if task.min_size == 0 || task.min_size > task.max_size {
        return Err(format!(
            "set.min_size / set.max_size: need 0 < min_size <= max_size, got {} and {}",
            task.min_size, task.max_size
        ));
    }
    let representable = |x: f64| x.is_finite() && (x as f32).is_finite();
    if !representable(task.low)
        || !representable(task.high)
        || !(task.high - task.low).is_finite()
        || task.low >= task.high
    {
        return Err(format!(
            "set.low / set.high: need low < high, both finite in f32, got {} and {}",
            task.low, task.high
        ));
    }
    if task.train == 0 || task.valid == 0 {
        return Err("set.train and set.valid: at least one set each".into());
    }
    let mut rng = DataRng::new(task.seed);
    let mut draw = |count: usize| -> Vec<SetItem> {
        (0..count)
            .map(|_| {
                let n = task.min_size + rng.below(task.max_size - task.min_size + 1);
                let values: Vec<f32> = (0..n)
                    .map(|_| {
                        // [low, high): f32 rounding must not reach `high`.
                        let x = (task.low + (task.high - task.low) * rng.uniform()) as f32;
                        x.min((task.high as f32).next_down())
                    })
                    .collect();
                let target = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                SetItem { values, target }
            })
            .collect()
    };
    let train = draw(task.train);
    let valid = draw(task.valid);
    let test = draw(task.test);
    Ok(SetData { train, valid, test })
}

fn seq2seq_data(task: &Seq2SeqTask) -> Result<Seq2SeqData, String> {
    if task.min_len == 0 || task.min_len > task.max_len || task.symbols == 0 {
        return Err("seq2seq: need 0 < min_len <= max_len and symbols > 0".into());
    }
    let mut rng = DataRng::new(task.seed);
    let mut pair = || {
        let len = task.min_len + rng.below(task.max_len - task.min_len + 1);
        let source: Vec<u32> = (0..len)
            .map(|_| 3 + rng.below(task.symbols) as u32)
            .collect();
        let mut out = source.clone();
        match task.problem {
            Seq2SeqProblem::Reverse => out.reverse(),
            Seq2SeqProblem::Sort => out.sort_unstable(),
        }
        let target = std::iter::once(1)
            .chain(out)
            .chain(std::iter::once(2))
            .collect();
        Seq2SeqItem { source, target }
    };
    let train = (0..task.train).map(|_| pair()).collect();
    let valid = (0..task.valid).map(|_| pair()).collect();
    Ok(Seq2SeqData {
        train,
        valid,
        vocab_size: 3 + task.symbols,
        pad: 0,
        max_len: task.max_len + 2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_max_data_is_seeded_bounded_and_labelled_with_the_maximum() {
        let task = SetTask {
            train: 500,
            valid: 50,
            test: 50,
            seed: 4,
            ..SetTask::default()
        };
        let a = set_max_data(&task).unwrap();
        let b = set_max_data(&task).unwrap();
        assert_eq!(a.train, b.train);
        assert_eq!((a.train.len(), a.valid.len(), a.test.len()), (500, 50, 50));
        let mut sizes = std::collections::BTreeSet::new();
        for item in a.train.iter().chain(&a.valid).chain(&a.test) {
            sizes.insert(item.values.len());
            assert!(item.values.iter().all(|v| (0.0..100.0).contains(v)));
            let max = item.values.iter().copied().fold(f32::MIN, f32::max);
            assert_eq!(item.target, max);
        }
        assert_eq!(sizes, (1..=10).collect());
        let other = set_max_data(&SetTask {
            seed: 5,
            ..task.clone()
        })
        .unwrap();
        assert_ne!(a.train, other.train);
        for (bad, key) in [
            (
                SetTask {
                    min_size: 0,
                    ..task.clone()
                },
                "set.min_size",
            ),
            (
                SetTask {
                    min_size: 11,
                    ..task.clone()
                },
                "set.min_size",
            ),
            (
                SetTask {
                    low: 5.0,
                    high: 5.0,
                    ..task.clone()
                },
                "set.low",
            ),
        ] {
            let err = set_max_data(&bad).unwrap_err();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn lm_windows_overlap_by_one_token() {
        let ids: Vec<u32> = (0..10).collect();
        let w = windows(&ids, 4);
        assert_eq!(w[0].tokens, vec![0, 1, 2, 3, 4]);
        assert_eq!(w[1].tokens, vec![4, 5, 6, 7, 8]);
        assert_eq!(w[2].tokens, vec![8, 9]);
    }

    #[test]
    fn seq2seq_pairs_are_correct() {
        let d = seq2seq_data(&Seq2SeqTask {
            train: 5,
            valid: 1,
            ..Default::default()
        })
        .unwrap();
        for p in &d.train {
            let mut rev = p.source.clone();
            rev.reverse();
            assert_eq!(&p.target[1..p.target.len() - 1], rev.as_slice());
            assert_eq!((p.target[0], *p.target.last().unwrap()), (1, 2));
        }
    }
}
