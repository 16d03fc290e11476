//! [`Extras`]: what a sequence carries besides its values, from a model's input down to the
//! attention core.
//!
//! One type travels through every layer of the stack: `models::EncoderInput` →
//! [`MhaInput`](crate::MhaInput) → [`AttnInput`](crate::AttnInput). Padding, global tokens and
//! a 2-D layout are fields every variant may read; inputs only particular variants read
//! ([`SharedParameter`], [`GlobalHeads`], or your own type) are [`SideInputs`], looked up by
//! type, so a new variant adds its own input without widening everyone's.
//!
//! The builders are defined once, on [`WithExtras`], and every carrier implements it.

use std::any::Any;
use std::fmt;

use burn::tensor::{Bool, Tensor};

/// Which tokens attend globally, for variants with global tokens (Longformer, ETC).
///
/// Variants without global tokens ignore it.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum GlobalTokens {
    /// The first `n` positions of every sequence (a CLS token, ETC's global prefix).
    Prefix(usize),
    /// The same positions in every sequence.
    Positions(Vec<usize>),
    /// Per-example flags, `true` = global. Shape `[batch, seq]`.
    Mask(Tensor<2, Bool>),
}

impl GlobalTokens {
    /// The global positions of every example, sorted (reads a mask back to the host).
    ///
    /// # Panics
    /// If a position is beyond `seq` or a mask has the wrong shape.
    pub fn positions(&self, batch: usize, seq: usize) -> Vec<Vec<usize>> {
        match self {
            Self::Prefix(n) => vec![(0..(*n).min(seq)).collect(); batch],
            Self::Positions(p) => {
                assert!(
                    p.iter().all(|&x| x < seq),
                    "global position beyond the sequence length {seq}"
                );
                let mut p = p.clone();
                p.sort_unstable();
                p.dedup();
                vec![p; batch]
            }
            Self::Mask(m) => {
                assert_eq!(
                    m.dims(),
                    [batch, seq],
                    "global token mask must be [batch, seq]"
                );
                let flags: Vec<bool> = m.to_data().iter::<bool>().collect();
                flags
                    .chunks(seq)
                    .map(|row| {
                        row.iter()
                            .enumerate()
                            .filter(|(_, g)| **g)
                            .map(|(i, _)| i)
                            .collect()
                    })
                    .collect()
            }
        }
    }
}

/// The 2-D layout of a flattened sequence (Image Transformer, Axial), raster order:
/// position `p` is row `p / width`, column `p % width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Rows.
    pub height: usize,
    /// Columns (for images with channels flattened into the row: `width * channels`).
    pub width: usize,
}

impl Grid {
    /// A `height × width` grid.
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width }
    }

    /// The grid of `n` positions with as many rows as possible up to √n (benchmarks and demos
    /// of 2-D variants on 1-D lengths).
    pub fn near_square(n: usize) -> Self {
        let rows = (1..=n)
            .filter(|r| n.is_multiple_of(*r) && r * r <= n)
            .max()
            .unwrap_or(1);
        Self::new(rows, n / rows.max(1))
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.height * self.width
    }

    /// Whether the grid has no positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A value a [`SideInputs`] map can hold: any clonable, debuggable, sendable type.
pub trait SideValue: Any + Send + fmt::Debug {
    /// A boxed copy.
    fn clone_box(&self) -> Box<dyn SideValue>;
    /// As [`Any`], for lookups by type.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any + Send + Clone + fmt::Debug> SideValue for T {
    fn clone_box(&self) -> Box<dyn SideValue> {
        Box::new(self.clone())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Inputs that particular variants read, at most one value per type.
///
/// A variant defines a type for what it needs (or uses [`SharedParameter`] or [`GlobalHeads`]),
/// the model or [`MultiHeadAttention`](crate::MultiHeadAttention) inserts it, and the core
/// looks it up with [`get`](Self::get). Everyone else passes it along untouched.
#[derive(Default)]
pub struct SideInputs {
    values: Vec<Box<dyn SideValue>>,
}

impl SideInputs {
    /// Inserts `value`, replacing a value of the same type.
    pub fn insert<T: SideValue>(&mut self, value: T) {
        self.values.retain(|v| !v.as_any().is::<T>());
        self.values.push(Box::new(value));
    }

    /// The value of type `T`, if present.
    pub fn get<T: SideValue>(&self) -> Option<&T> {
        self.values.iter().find_map(|v| v.as_any().downcast_ref())
    }

    /// Removes the value of type `T`, if present.
    pub fn remove<T: SideValue>(&mut self) {
        self.values.retain(|v| !v.as_any().is::<T>());
    }

    /// Whether there are no side inputs.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl Clone for SideInputs {
    fn clone(&self) -> Self {
        Self {
            values: self.values.iter().map(|v| v.clone_box()).collect(),
        }
    }
}

impl fmt::Debug for SideInputs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.values).finish()
    }
}

/// A parameter every layer of a stack shares, owned by the stack and trained once (Linformer's
/// layerwise projection): a variant asks for it with
/// [`CoreConfig::layer_shared`](crate::CoreConfig::layer_shared), and the stack passes it to
/// every layer as this side input.
///
/// # Shapes
/// - `[rows, columns]` of the [`SharedParameterSpec`]
#[derive(Clone, Debug)]
pub struct SharedParameter(pub Tensor<2>);

/// The shape and initialisation of a [`SharedParameter`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedParameterSpec {
    /// `[rows, columns]`.
    pub shape: [usize; 2],
    /// Initialised uniformly in `[-bound, bound]`.
    pub bound: f64,
}

/// Queries, keys and values from a layer's separate global projections (Longformer's Q_g, K_g,
/// V_g), over the whole sequence: [`MultiHeadAttention`](crate::MultiHeadAttention) makes them
/// when the variant asks for
/// [`global_projections`](crate::CoreConfig::global_projections) and the input has global
/// tokens.
///
/// # Shapes
/// - query, key: `[batch, heads, seq, d_k]`, value: `[batch, heads, seq, d_v]`
#[derive(Clone, Debug)]
pub struct GlobalHeads {
    /// Global queries.
    pub query: Tensor<4>,
    /// Global keys.
    pub key: Tensor<4>,
    /// Global values.
    pub value: Tensor<4>,
}

/// What a sequence carries besides its values: padding, global tokens and a 2-D layout, which
/// every variant may read, and [`SideInputs`] that particular variants look up by type.
///
/// # Shapes
/// - `mask_pad`: `[batch, seq]`, `true` = padded
/// - `global` as a mask: `[batch, seq]`, `true` = global
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// Padding of the sequence.
    pub mask_pad: Option<Tensor<2, Bool>>,
    /// Global tokens, for variants that have them.
    pub global: Option<GlobalTokens>,
    /// The 2-D layout of the sequence, for 2-D variants.
    pub grid: Option<Grid>,
    /// Inputs particular variants read.
    pub side: SideInputs,
}

impl Extras {
    /// No padding, no global tokens, no layout, no side inputs.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The builders of [`Extras`], defined once for every type that carries them (`Extras` itself,
/// `models::EncoderInput`, [`MhaInput`](crate::MhaInput), [`AttnInput`](crate::AttnInput)).
pub trait WithExtras: Sized {
    /// The carried extras.
    fn extras_mut(&mut self) -> &mut Extras;

    /// Replaces all extras.
    fn with_extras(mut self, extras: Extras) -> Self {
        *self.extras_mut() = extras;
        self
    }

    /// Padding, `[batch, seq]`, `true` = padded.
    fn mask_pad(mut self, mask: Tensor<2, Bool>) -> Self {
        self.extras_mut().mask_pad = Some(mask);
        self
    }

    /// Global tokens.
    fn with_global(mut self, global: GlobalTokens) -> Self {
        self.extras_mut().global = Some(global);
        self
    }

    /// The 2-D layout of the sequence.
    fn with_grid(mut self, grid: Grid) -> Self {
        self.extras_mut().grid = Some(grid);
        self
    }

    /// A side input (replacing one of the same type).
    fn with_side<T: SideValue>(mut self, value: T) -> Self {
        self.extras_mut().side.insert(value);
        self
    }
}

impl WithExtras for Extras {
    fn extras_mut(&mut self) -> &mut Extras {
        self
    }
}
