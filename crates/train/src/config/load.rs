//! Reading experiment files: `base` files, `--set` overrides, and errors that name the key path.
//!
//! 1. The file is parsed as TOML. If it has `base = "path"` (relative to the file), the base
//!    is loaded the same way and this file is merged over it: tables merge key by key, other
//!    values replace. A table with a `kind` key (an attention variant, an optimiser, a
//!    schedule) replaces the base table when the kinds differ, so a variant file holds only
//!    its own settings.
//! 2. `--set a.b.c=value` overrides are applied (`value` is parsed as TOML, or taken as a
//!    string if it does not parse).
//! 3. The result is deserialised into [`ExperimentConfig`], tracking
//!    the key path: an unknown key, a wrong type or a bad value is reported as
//!    `model.stack.attention.features: invalid type ...`.

use std::path::{Path, PathBuf};

use efficient_attn::AttentionConfig;
use toml::{Table, Value};

use super::ExperimentConfig;

/// A configuration error: where, and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFileError {
    /// File, if the error is tied to one.
    pub file: Option<PathBuf>,
    /// Key path (`model.stack.d_model`), empty for the whole file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigFileError {}

fn error(
    file: Option<&Path>,
    path: impl Into<String>,
    message: impl Into<String>,
) -> ConfigFileError {
    ConfigFileError {
        file: file.map(Path::to_path_buf),
        path: path.into(),
        message: message.into(),
    }
}

/// Parses a file and resolves its chain of `base` files.
pub fn load_table(path: &Path) -> Result<Table, ConfigFileError> {
    load_table_depth(path, 0)
}

fn load_table_depth(path: &Path, depth: usize) -> Result<Table, ConfigFileError> {
    if depth > 8 {
        return Err(error(
            Some(path),
            "base",
            "more than 8 nested base files (a cycle?)",
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| error(Some(path), "", format!("cannot read the config file: {e}")))?;
    let mut table: Table =
        toml::from_str(&text).map_err(|e| error(Some(path), "", format!("not valid TOML: {e}")))?;
    match table.remove("base") {
        None => Ok(table),
        Some(Value::String(base)) => {
            let base_path = path.parent().unwrap_or(Path::new(".")).join(&base);
            let mut merged = load_table_depth(&base_path, depth + 1)?;
            merge(&mut merged, table);
            Ok(merged)
        }
        Some(other) => Err(error(
            Some(path),
            "base",
            format!("expected the path of a base file (a string), got {other}"),
        )),
    }
}

/// Merges `over` into `base` (see the module docs).
pub fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => {
                let kinds_differ =
                    matches!((b.get("kind"), o.get("kind")), (Some(x), Some(y)) if x != y);
                if kinds_differ {
                    base.insert(key, Value::Table(o));
                } else {
                    merge(b, o);
                }
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `key.path=value` overrides.
pub fn apply_sets(table: &mut Table, sets: &[String]) -> Result<(), ConfigFileError> {
    for set in sets {
        let (path, raw) = set
            .split_once('=')
            .ok_or_else(|| error(None, set.clone(), "expected `--set key.path=value`"))?;
        let path = path.trim();
        let value: Value = toml::from_str::<Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.to_string()));
        let keys: Vec<&str> = path.split('.').collect();
        let mut node = &mut *table;
        for (i, key) in keys.iter().enumerate() {
            if i + 1 == keys.len() {
                node.insert(key.to_string(), value.clone());
            } else {
                let next = node
                    .entry(key.to_string())
                    .or_insert_with(|| Value::Table(Table::new()));
                node = next.as_table_mut().ok_or_else(|| {
                    error(
                        None,
                        keys[..=i].join("."),
                        "is not a table, so it has no sub-keys to set",
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// Attention tables are `kind`-tagged; serde buffers them, losing the field path of a bad
/// value. Check each one through `AttentionConfig::deserialize_kind` first, so errors name it.
/// A table is an attention table when its `kind` is a registered attention kind
/// ([`AttentionConfig::KINDS`]), wherever it sits; an unknown kind is reported by the typed
/// pass that follows, at its key path.
fn check_attention_tables(
    value: &Value,
    path: &str,
    file: Option<&Path>,
) -> Result<(), ConfigFileError> {
    match value {
        Value::Table(table) => {
            let is_attention = matches!(
                table.get("kind"),
                Some(Value::String(k)) if AttentionConfig::KINDS.contains(&k.as_str())
            );
            if is_attention {
                return check_one_attention(value, path, file);
            }
            for (key, child) in table {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                check_attention_tables(child, &child_path, file)?;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_attention_tables(item, &format!("{path}[{i}]"), file)),
        _ => Ok(()),
    }
}

fn check_one_attention(
    value: &Value,
    path: &str,
    file: Option<&Path>,
) -> Result<(), ConfigFileError> {
    let Value::Table(table) = value else {
        return Err(error(
            file,
            path,
            format!("expected a table with a `kind` key, got {value}"),
        ));
    };
    let mut rest = table.clone();
    let kind = match rest.remove("kind") {
        Some(Value::String(k)) => k,
        Some(other) => {
            return Err(error(
                file,
                format!("{path}.kind"),
                format!("expected a string, got {other}"),
            ));
        }
        None => {
            return Err(error(
                file,
                format!("{path}.kind"),
                format!("missing: one of {}", AttentionConfig::KINDS.join(", ")),
            ));
        }
    };
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(Value::Table(rest), &mut track);
    AttentionConfig::deserialize_kind(&kind, de)
        .map(|_| ())
        .map_err(|e| {
            let inner = track.path().to_string();
            let at = if inner == "." || inner.is_empty() {
                path.to_string()
            } else {
                format!("{path}.{inner}")
            };
            error(file, at, e.to_string())
        })
}

/// Turns a merged table into the typed configuration, with key paths in errors.
pub fn from_table(table: Table, file: Option<&Path>) -> Result<ExperimentConfig, ConfigFileError> {
    let value = Value::Table(table);
    check_attention_tables(&value, "", file)?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    <ExperimentConfig as serde::Deserialize>::deserialize(de)
        .map_err(|e| error(file, track.path().to_string(), e.to_string()))
}

/// Loads `path` with its base files and `sets` applied.
pub fn load(path: &Path, sets: &[String]) -> Result<(ExperimentConfig, Table), ConfigFileError> {
    let mut table = load_table(path)?;
    apply_sets(&mut table, sets)?;
    let config = from_table(table.clone(), Some(path))?;
    Ok((config, table))
}

/// A model that cannot be built, with its key as the experiment file spells it. The layer or
/// block index is taken out first (`layers[i]` is dropped, `encoder[i]` becomes `encoder`) and
/// reported as "(layer i)"; then `stacks` maps the model's section names to the file's (a
/// classifier's `encoder` and a language model's `decoder` are both `stack`; the first
/// matching prefix wins). So `encoder.layers[0].attention` becomes
/// `` `model.stack.attention` (layer 0) ``. Where layer i's attention came from
/// `attention_layers` or `attention_pattern` the key named is still the section's
/// `attention`, with the layer to look at.
pub fn model_error(error: models::ModelConfigError, stacks: &[(&str, &str)]) -> String {
    let mut path = error.path;
    let mut layer = String::new();
    if let Some(open) = path.find('[')
        && let Some(len) = path[open..].find(']')
    {
        layer = format!(" (layer {})", &path[open + 1..open + len]);
        let head = path[..open]
            .strip_suffix(".layers")
            .unwrap_or(&path[..open]);
        path = format!("{head}{}", &path[open + len + 1..]);
    }
    if let Some((from, to)) = stacks
        .iter()
        .find(|(from, _)| path == *from || path.starts_with(&format!("{from}.")))
    {
        path = format!("{to}{}", &path[from.len()..]);
    }
    format!("`model.{path}`{layer}: {}", error.message)
}

#[cfg(test)]
mod tests {
    use super::model_error;
    use models::ModelConfigError;

    #[test]
    fn model_errors_read_as_the_files_keys() {
        let e = |p: &str| ModelConfigError::new(p, "why");
        let lm = [("decoder", "stack")];
        assert_eq!(
            model_error(e("encoder.layers[3].attention"), &[("encoder", "stack")]),
            "`model.stack.attention` (layer 3): why"
        );
        assert_eq!(
            model_error(e("decoder.n_heads"), &lm),
            "`model.stack.n_heads`: why"
        );
        assert_eq!(model_error(e("decoderish"), &lm), "`model.decoderish`: why");
        assert_eq!(
            model_error(e("funnel.upsample_layers"), &lm),
            "`model.funnel.upsample_layers`: why"
        );
        let seq2seq = [
            ("decoder.cross_attention", "cross_attention"),
            ("encoder", "stack"),
            ("decoder", "decoder"),
        ];
        assert_eq!(
            model_error(e("decoder.layers[1].attention"), &seq2seq),
            "`model.decoder.attention` (layer 1): why"
        );
        assert_eq!(
            model_error(e("decoder.cross_attention"), &seq2seq),
            "`model.cross_attention`: why"
        );
        assert_eq!(
            model_error(e("decoder.layers[2].cross_attention"), &seq2seq),
            "`model.cross_attention` (layer 2): why"
        );
        let set = [("set.encoder", "set.blocks"), ("set.pool", "set.blocks")];
        assert_eq!(
            model_error(e("set.encoder[1].attention"), &set),
            "`model.set.blocks.attention` (layer 1): why"
        );
        assert_eq!(
            model_error(e("set.pool.attention"), &set),
            "`model.set.blocks.attention`: why"
        );
    }
}
