//! [`ConfigError`]: why a configuration cannot build a layer.

use std::fmt;

use crate::interface::{AttentionMode, VariantInfo};

/// A configuration that cannot build a layer. The message names the field or mode and what was
/// expected.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The variant has no such mode.
    UnsupportedMode {
        /// Variant kind.
        kind: &'static str,
        /// The mode asked for.
        mode: AttentionMode,
        /// Why the variant cannot run in that mode.
        reason: &'static str,
    },
    /// A field has a value the variant cannot use.
    InvalidField {
        /// Field name (as in TOML).
        field: &'static str,
        /// What was expected.
        expected: String,
        /// What was given.
        got: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedMode { kind, mode, reason } => {
                write!(
                    f,
                    "attention kind \"{kind}\" does not support {mode} mode: {reason}"
                )
            }
            Self::InvalidField {
                field,
                expected,
                got,
            } => write!(f, "`{field}`: expected {expected}, got {got}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An [`InvalidField`](Self::InvalidField) error.
    pub fn invalid(field: &'static str, expected: impl Into<String>, got: impl ToString) -> Self {
        Self::InvalidField {
            field,
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    /// `Ok` if `info` lists `mode`; otherwise an [`UnsupportedMode`](Self::UnsupportedMode)
    /// error with the variant's general reason.
    pub(crate) fn check_mode(info: &VariantInfo, mode: AttentionMode) -> Result<(), Self> {
        Self::check_mode_because(info, mode, "the paper defines no such mode")
    }

    /// Like [`check_mode`](Self::check_mode) with the variant's own reason.
    pub(crate) fn check_mode_because(
        info: &VariantInfo,
        mode: AttentionMode,
        reason: &'static str,
    ) -> Result<(), Self> {
        if info.supports(mode) {
            Ok(())
        } else {
            Err(Self::UnsupportedMode {
                kind: info.kind,
                mode,
                reason,
            })
        }
    }

    /// `Ok` if `value > 0`.
    pub(crate) fn check_nonzero(field: &'static str, value: usize) -> Result<(), Self> {
        if value > 0 {
            Ok(())
        } else {
            Err(Self::invalid(field, "a positive integer", 0))
        }
    }

    /// `Ok` if `value` is absent or a finite positive number.
    pub(crate) fn check_positive_opt(field: &'static str, value: Option<f64>) -> Result<(), Self> {
        match value {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                Err(Self::invalid(field, "a finite positive number", v))
            }
            _ => Ok(()),
        }
    }
}
