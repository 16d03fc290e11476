//! Labelled text from disk: JSON Lines (`.jsonl` or `.jsonl.gz`, fields `text` and `label`, as in
//! `../shared/data`) or a folder per label (each sub-folder a label, each file a document; this
//! is also the original `aclImdb/{train,test}/{pos,neg}` layout, whose `unsup` folder has no
//! labels and is skipped).

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One labelled document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextExample {
    /// The text.
    pub text: String,
    /// The label's index in [`LabeledTexts::labels`].
    pub label: usize,
}

/// Documents with their label names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabeledTexts {
    /// Documents.
    pub examples: Vec<TextExample>,
    /// Label names; a document's `label` indexes this list.
    pub labels: Vec<String>,
}

/// Folders that are never labels (aclImdb's unlabelled reviews).
const NOT_LABELS: [&str; 1] = ["unsup"];

fn open_lines(path: &Path) -> Result<Box<dyn BufRead>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::new(reader)))
}

/// Reads labelled documents from `path` (a JSON Lines file, optionally gzip-compressed, or a
/// folder per label). `labels` fixes the label order (and rejects others); without it the label
/// names are sorted. `limit` keeps only the first documents (after sorting folder entries by
/// name, so it is deterministic).
///
/// # Errors
/// Missing files, unreadable lines, a record without `text` or `label`, or a label outside
/// `labels`; the message names the file and line.
pub fn read_labeled(
    path: &Path,
    labels: Option<&[String]>,
    limit: Option<usize>,
) -> Result<LabeledTexts, String> {
    let raw: Vec<(String, String)> = if path.is_dir() {
        read_folders(path, limit)?
    } else if path.exists() {
        read_jsonl(path, limit)?
    } else {
        return Err(format!(
            "{} does not exist: expected a .jsonl(.gz) file with `text` and `label` fields, or a folder with one sub-folder per label",
            path.display()
        ));
    };
    if raw.is_empty() {
        return Err(format!(
            "{} has no examples: expected `text` and `label` records",
            path.display()
        ));
    }
    let names: Vec<String> = match labels {
        Some(l) => l.to_vec(),
        None => raw
            .iter()
            .map(|(_, l)| l.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let examples = raw
        .into_iter()
        .map(|(text, label)| {
            let idx = names.iter().position(|n| *n == label).ok_or_else(|| {
                format!(
                    "{}: label `{label}` is not one of the configured labels {names:?}",
                    path.display()
                )
            })?;
            Ok(TextExample { text, label: idx })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(LabeledTexts {
        examples,
        labels: names,
    })
}

/// The `text` fields of a JSON Lines file (labels optional), joined by newlines, up to about
/// `max_bytes`: a corpus for language modelling.
///
/// # Errors
/// Unreadable files or records without `text`; the message names the file and line.
pub fn read_texts(path: &Path, max_bytes: Option<usize>) -> Result<String, String> {
    let mut out = String::new();
    for (i, line) in open_lines(path)?.lines().enumerate() {
        if max_bytes.is_some_and(|m| out.len() >= m) {
            break;
        }
        let line = line.map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: not JSON: {e}", path.display(), i + 1))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => {
                out.push_str(s);
                out.push('\n');
            }
            _ => {
                return Err(format!(
                    "{} line {}: no `text` string",
                    path.display(),
                    i + 1
                ));
            }
        }
    }
    Ok(out)
}

fn read_jsonl(path: &Path, limit: Option<usize>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in open_lines(path)?.lines().enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let line = line.map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: not JSON: {e}", path.display(), i + 1))?;
        let field = |name: &str| -> Result<String, String> {
            match value.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(other) => Err(format!(
                    "{} line {}: `{name}` must be a string, got {other}",
                    path.display(),
                    i + 1
                )),
                None => Err(format!(
                    "{} line {}: no `{name}` field",
                    path.display(),
                    i + 1
                )),
            }
        };
        out.push((field("text")?, field("label")?));
    }
    Ok(out)
}

fn read_folders(path: &Path, limit: Option<usize>) -> Result<Vec<(String, String)>, String> {
    let mut label_dirs: Vec<_> = fs::read_dir(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter(|e| !NOT_LABELS.contains(&e.file_name().to_string_lossy().as_ref()))
        .collect();
    label_dirs.sort_by_key(|e| e.file_name());
    if label_dirs.is_empty() {
        return Err(format!("{}: no label folders inside", path.display()));
    }
    // Documents of all labels, interleaved by index so a limit keeps labels balanced.
    let mut per_label: Vec<(String, Vec<std::path::PathBuf>)> = Vec::new();
    for dir in label_dirs {
        let mut files: Vec<_> = fs::read_dir(dir.path())
            .map_err(|e| format!("cannot read {}: {e}", dir.path().display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        per_label.push((dir.file_name().to_string_lossy().into_owned(), files));
    }
    let longest = per_label.iter().map(|(_, f)| f.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    'outer: for i in 0..longest {
        for (label, files) in &per_label {
            if limit.is_some_and(|l| out.len() >= l) {
                break 'outer;
            }
            if let Some(file) = files.get(i) {
                let bytes =
                    fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("{} is not UTF-8 text", file.display()))?;
                out.push((text, label.clone()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("efformer-text-{}-{name}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn jsonl_plain_and_gzip() {
        let d = temp("jsonl");
        let text = "{\"id\": \"a\", \"text\": \"good\", \"label\": \"pos\"}\n{\"id\": \"b\", \"text\": \"bad\", \"label\": \"neg\"}\n";
        fs::write(d.join("x.jsonl"), text).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, text.as_bytes()).unwrap();
        fs::write(d.join("x.jsonl.gz"), gz.finish().unwrap()).unwrap();
        for f in ["x.jsonl", "x.jsonl.gz"] {
            let t = read_labeled(&d.join(f), None, None).unwrap();
            assert_eq!(t.labels, ["neg", "pos"]);
            assert_eq!(
                t.examples[0],
                TextExample {
                    text: "good".into(),
                    label: 1
                }
            );
        }
        let err = read_labeled(&d.join("x.jsonl"), Some(&["pos".into()]), None).unwrap_err();
        assert!(err.contains("`neg`"), "{err}");
        fs::write(d.join("bad.jsonl"), "{\"text\": \"x\"}\n").unwrap();
        let err = read_labeled(&d.join("bad.jsonl"), None, None).unwrap_err();
        assert!(
            err.contains("bad.jsonl line 1") && err.contains("label"),
            "{err}"
        );
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn folder_per_label_like_aclimdb() {
        let d = temp("folders");
        for (label, docs) in [
            ("neg", ["n1", "n2"]),
            ("pos", ["p1", "p2"]),
            ("unsup", ["u1", "u2"]),
        ] {
            fs::create_dir_all(d.join(label)).unwrap();
            for (i, doc) in docs.iter().enumerate() {
                fs::write(d.join(label).join(format!("{i}_1.txt")), doc).unwrap();
            }
        }
        fs::write(d.join("urls_pos.txt"), "ignored").unwrap();
        let t = read_labeled(&d, None, None).unwrap();
        assert_eq!(t.labels, ["neg", "pos"]);
        assert_eq!(t.examples.len(), 4);
        let limited = read_labeled(&d, None, Some(2)).unwrap();
        assert_eq!(
            limited.examples.iter().map(|e| e.label).collect::<Vec<_>>(),
            [0, 1]
        );
        assert!(
            read_labeled(&d.join("missing"), None, None)
                .unwrap_err()
                .contains("does not exist")
        );
        fs::remove_dir_all(d).ok();
    }
}
