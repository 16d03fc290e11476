//! Axial attention: attention along the rows and along the columns of a 2-D grid.
//!
//! - Paper: Ho, Kalchbrenner, Weissenborn and Salimans 2019, "Axial Attention in
//!   Multidimensional Transformers", arXiv:1912.12180; references google-research
//!   `axial/transformers.py` (autoregressive) and lucidrains/axial-attention (encoder,
//!   `sum_axial_out`).
//! - The sequence is a grid (`AttnInput::grid`, raster order: position `p` is row `p / W`,
//!   column `p % W`). `row` attention: each position attends within its row; `column`: within
//!   its column; `sum` (lucidrains' default): the sum of the two.
//! - Causal (the paper's masked layers): the row attention sees columns `c' ≤ c` of its row
//!   and the column attention rows `r' ≤ r` of its column, so nothing later in raster order is
//!   seen. The paper's full autoregressive model composes such layers with a downward shift
//!   (outer decoder) before the masked row layers (inner decoder); that composition belongs to a
//!   model, the masked layers are what this module provides.
//! - Computation: rows (or columns) become batch entries of Burn's fused attention: O(N·(H+W)·d)
//!   time, O(N·max(H, W)) memory: O(N√N) for a square grid.
//! - Exact: row (column) attention equals dense attention with the same-row (same-column) mask,
//!   tested; `sum` is a sum of two softmax attentions, not one.
//! - Decoding (causal): a key/value cache of which each new query reads its row so far and the
//!   positions above it in its column: O(W + H) keys per step. Each step's input carries the
//!   grid of the whole sequence (`AttnInput::with_grid`; `MhaCache::grid` at the layer level).
//! - Modes: bidirectional, causal. Cross is a configuration error.

use burn::module::Module;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor};

use crate::decoding::{CausalPattern, DecodeCache, pattern_step};
use crate::error::ConfigError;
use crate::interface::{AttentionCore, CoreConfig, AttentionMode, AttnInput, Exactness, HeadDims, VariantInfo};
use crate::extras::{Grid};

/// Which axes a layer attends along.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum AxialAxes {
    /// Within each row.
    Row,
    /// Within each column.
    Column,
    /// Row attention plus column attention.
    #[default]
    Sum,
}

/// Configuration of [`AxialAttention`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct AxialAttentionConfig {
    /// Axes (lucidrains: sum of both).
    pub axes: AxialAxes,
}

impl AxialAttentionConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "axial",
        paper: "Ho et al. 2019, Axial Attention in Multidimensional Transformers, arXiv:1912.12180",
        modes: &[AttentionMode::Bidirectional, AttentionMode::Causal],
        time: "O(N·(H+W)·d) = O(N√N·d)",
        memory: "O(N·max(H, W))",
        exactness: Exactness::ExactWhen(
            "per axis (row or column attention equals the dense same-row/column mask)",
        ),
        needs_grid: true,
        global_tokens: false,
        cannot_decode: None,
    };

}

impl CoreConfig for AxialAttentionConfig {
    type Core = AxialAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// Builds the attention for `mode`.
    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<AxialAttention, ConfigError> {
        let _ = (dims, device);
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "axes are those of the query's own grid",
        )?;
        Ok(AxialAttention {
            mode,
            axes: self.axes,
        })
    }
}

/// Axial attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct AxialAttention {
    #[module(skip)]
    mode: AttentionMode,
    #[module(skip)]
    axes: AxialAxes,
}

impl AxialAttention {
    fn grid(input: &AttnInput, n: usize) -> Grid {
        let grid = input
            .extras
            .grid
            .expect("axial attention needs the grid: AttnInput::with_grid / MhaInput::with_grid");
        assert_eq!(
            grid.len(),
            n,
            "grid {}x{} does not match sequence length {n}",
            grid.height,
            grid.width
        );
        grid
    }

    /// Attention within rows of a `[batch, heads, R·C, d]` tensor laid out as `rows × cols`.
    fn along_rows(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        pad: Option<&Tensor<2, Bool>>,
        rows: usize,
        cols: usize,
    ) -> Tensor<4> {
        let [b, h, n, dk] = q.dims();
        let dv = v.dims()[3];
        let split = |t: Tensor<4>| {
            let d = t.dims()[3];
            t.reshape([b, h * rows, cols, d])
        };
        let mask = pad.map(|p| {
            p.clone()
                .reshape([b, 1, rows, 1, cols])
                .expand([b, h, rows, cols, cols])
                .reshape([b, h * rows, cols, cols])
        });
        let out = attention(
            split(q),
            split(k),
            split(v),
            mask,
            None,
            AttentionModuleOptions {
                scale: Some(1.0 / (dk as f64).sqrt()),
                softcap: None,
                is_causal: self.mode.is_causal(),
            },
        );
        out.reshape([b, h, n, dv])
    }

    fn transpose(t: Tensor<4>, rows: usize, cols: usize) -> Tensor<4> {
        let [b, h, n, d] = t.dims();
        t.reshape([b, h, rows, cols, d])
            .swap_dims(2, 3)
            .reshape([b, h, n, d])
    }

    #[cfg(feature = "testing")]
    fn allowed(&self, grid: Grid, i: usize, j: usize) -> bool {
        let (ri, ci) = (i / grid.width, i % grid.width);
        let (rj, cj) = (j / grid.width, j % grid.width);
        let causal = self.mode.is_causal();
        let row = ri == rj && (!causal || cj <= ci);
        let col = ci == cj && (!causal || rj <= ri);
        match self.axes {
            AxialAxes::Row => row,
            AxialAxes::Column => col,
            AxialAxes::Sum => row || col,
        }
    }
}

impl AttentionCore for AxialAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]; the sequence is `grid` in raster order
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [b, _, n, lk, _, _] = input.dims();
        assert_eq!(n, lk, "axial attention is self-attention (seq_q = seq_k)");
        let grid = Self::grid(&input, n);
        let (rows, cols) = (grid.height, grid.width);
        let pad = input.mask_pad_k.as_ref();
        let row = || {
            self.along_rows(
                input.query.clone(),
                input.key.clone(),
                input.value.clone(),
                pad,
                rows,
                cols,
            )
        };
        let col = || {
            let t = |x: &Tensor<4>| Self::transpose(x.clone(), rows, cols);
            let pad_t = pad.map(|p| {
                p.clone()
                    .reshape([b, rows, cols])
                    .swap_dims(1, 2)
                    .reshape([b, n])
            });
            let out = self.along_rows(
                t(&input.query),
                t(&input.key),
                t(&input.value),
                pad_t.as_ref(),
                cols,
                rows,
            );
            Self::transpose(out, cols, rows)
        };
        match self.axes {
            AxialAxes::Row => row(),
            AxialAxes::Column => col(),
            AxialAxes::Sum => row().add(col()),
        }
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// Causal mode decodes with a key/value cache read along the row and the column.
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        crate::interface::kv_cache(self.mode, batch, dims, max_len, device)
    }

    /// # Panics
    /// Without the grid of the whole sequence on the input.
    fn decode_step(&self, cache: &mut DecodeCache, input: AttnInput) -> Tensor<4> {
        let grid = input.extras.grid.expect(
            "axial decoding needs the grid of the whole sequence on every step (AttnInput::with_grid)",
        );
        let parts = match self.axes {
            AxialAxes::Row => vec![Axis::Row],
            AxialAxes::Column => vec![Axis::Column],
            AxialAxes::Sum => vec![Axis::Row, Axis::Column],
        };
        let pattern = AxialPattern {
            width: grid.width,
            parts,
        };
        let scale = 1.0 / (input.query.dims()[3] as f64).sqrt();
        pattern_step(cache, &pattern, input.query, input.key, input.value, scale)
    }
}

#[derive(Clone, Copy, Debug)]
enum Axis {
    Row,
    Column,
}

/// The causal row and column patterns of a grid `width` wide, for decoding.
#[derive(Debug)]
struct AxialPattern {
    width: usize,
    parts: Vec<Axis>,
}

impl CausalPattern for AxialPattern {
    fn parts(&self) -> usize {
        self.parts.len()
    }

    fn keys(&self, part: usize, _head: usize, p: usize, keys: &mut Vec<usize>) {
        let w = self.width;
        match self.parts[part] {
            Axis::Row => keys.extend(p / w * w..=p),
            Axis::Column => keys.extend((p % w..=p).step_by(w)),
        }
    }
}

#[cfg(feature = "testing")]
impl AxialAttention {
    /// The key positions each query may attend to, as data (the contract suite's pattern
    /// oracle).
    pub(crate) fn pattern(&self, input: &AttnInput) -> Option<crate::mask::DenseMask> {
        if self.axes == AxialAxes::Sum {
            return None;
        }
        let [_, _, n, lk, _, _] = input.dims();
        let grid = Self::grid(input, n);
        Some(crate::mask::DenseMask::from_allowed(n, lk, |i, j| {
            self.allowed(grid, i, j)
        }))
    }
}


#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Contract, Oracle, Spec};

    /// Rows plus columns; each axis alone equals the dense same-row / same-column mask.
    impl Contract for AxialAttentionConfig {
        fn contract() -> Vec<Spec<Attention>> {
            let pattern = |core: &Attention, input: &AttnInput| match core {
                Attention::Axial(a) => a.pattern(input),
                _ => None,
            };
            let mut spec = from_config(|_| {
                AxialAttentionConfig {
                    axes: AxialAxes::Sum,
                }
                .into()
            })
            .causal_memory(false);
            spec = exact_config(
                spec,
                "row axis = same-row mask",
                Oracle::Pattern(pattern),
                1e-5,
                |_| {
                    AxialAttentionConfig {
                        axes: AxialAxes::Row,
                    }
                    .into()
                },
            );
            spec = exact_config(
                spec,
                "column axis = same-column mask",
                Oracle::Pattern(pattern),
                1e-5,
                |_| {
                    AxialAttentionConfig {
                        axes: AxialAxes::Column,
                    }
                    .into()
                },
            );
            spec.decorate = Some(square_grid);
            vec![spec]
        }
    }
}
