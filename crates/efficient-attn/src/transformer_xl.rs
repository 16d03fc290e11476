//! Transformer-XL's relative positional attention: scores from content and from the distance
//! between a query and a key, so a segment can attend over a memory of earlier positions.
//!
//! - Paper: Dai, Yang, Yang, Carbonell, Le and Salakhutdinov 2019, "Transformer-XL: Attentive
//!   Language Models Beyond a Fixed-Length Context", arXiv:1901.02860; reference
//!   kimiyoung/transformer-xl `pytorch/mem_transformer.py`, `RelPartialLearnableMultiHeadAttn`
//!   (`attn_type = 0`), whose conventions we follow.
//! - Score of query i (absolute position m + i, after m memory positions) and key j:
//!   `A_ij = ((q_i + u)·k_j + (q_i + v)·r_{m+i−j}) · scale`, with `r_δ = W_r R_δ`, `R_δ` the
//!   sinusoid of distance δ as `[sin | cos]` halves (not interleaved) of width `heads · d_k`,
//!   distances capped at `clamp_len`. The second term is computed for every key against the
//!   distances `K−1, …, 0` (descending, K = m + n keys) and aligned by [`rel_shift`] (pad a zero
//!   column, reshape, drop a row); its entries above the causal band are garbage and always
//!   masked.
//! - Parameters: `W_r` per layer (`[heads·d_k, heads·d_k]`, no bias, as the reference's
//!   `r_net`) and the biases `u`, `v` (`[heads, d_k]` each, the reference's `r_w_bias`,
//!   `r_r_bias`), by default one pair for the whole stack as in the reference
//!   (`untie_r = False`; `biases = "shared"`: the stack owns them as a `[2, heads·d_k]`
//!   [`SharedParameter`] and passes it to every forward and decoding step), or one pair per
//!   layer (`biases = "per-layer"`, `untie_r = True`).
//! - Memory: the keys and values may be longer than the queries (`seq_k = m + seq_q`): the
//!   first m are earlier positions (the previous segment's hidden states, projected by this
//!   layer), aligned bottom-right as in causal attention with a memory. Carrying the memory
//!   from segment to segment is the model's business (issue 17); this core attends over what
//!   it is given.
//! - Cost: O(n·K·d) time and O(n·K) memory per head (the window is quadratic by design, as in
//!   the paper: O(L·(L + M)) per segment); never more than the window.
//! - Exact: it is its own function (relative, not absolute, positions); tested against a dense
//!   reference that indexes distances directly instead of shifting.
//! - Modes: causal only. Bidirectional and cross are configuration errors: the shift aligns
//!   distances for keys at or before the query only (kimiyoung/transformer-xl #129, #138;
//!   XLNet needs a two-sided variant).
//! - Decoding: a key/value cache; one position at a time equals the full pass (the distances
//!   depend only on the query's and keys' positions).
//! - `same_length` (the reference's evaluation setting): with a memory of m, every query sees
//!   exactly the m keys up to itself, so early and late queries of a segment see as much
//!   context; a core with it does not decode incrementally (the window depends on how the
//!   positions are cut into segments).

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::decoding::DecodeCache;
use crate::error::ConfigError;
use crate::extras::{Extras, SharedParameter, SharedParameterSpec};
use crate::interface::{
    AttentionCore, AttentionMode, AttnInput, CoreConfig, Exactness, HeadDims, VariantInfo,
    kv_cache,
};
use crate::kernels::dense::masked_softmax_matmul;
use crate::mask::causal_mask;

/// Where Transformer-XL's biases u, v live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", rename_all = "kebab-case")]
pub enum Biases {
    /// One pair for every layer of the stack (the reference's default, `untie_r = False`).
    #[default]
    Shared,
    /// A pair per layer (`untie_r = True`).
    PerLayer,
}

/// Configuration of [`TransformerXlAttention`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(crate = "burn::serde", default, deny_unknown_fields)]
pub struct TransformerXlConfig {
    /// Distances beyond this use this distance's embedding (`clamp_len`; `None`: no cap, the
    /// reference's default −1; its enwik8/WT-103 evaluation used 820 / 400).
    pub clamp_len: Option<usize>,
    /// Score scale; `None` = 1/√d_k (paper).
    pub scale: Option<f64>,
    /// Where the biases u, v live.
    pub biases: Biases,
    /// Every query sees the same number of keys: with a memory of m positions, query i sees
    /// keys `(i, m + i]` (the m positions up to itself) instead of `[0, m + i]` (the
    /// reference's `same_length`, its evaluation setting; off in training).
    pub same_length: bool,
}

impl TransformerXlConfig {
    /// What this variant is.
    pub const INFO: VariantInfo = VariantInfo {
        kind: "transformer-xl",
        paper: "Dai et al. 2019, Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context, arXiv:1901.02860",
        modes: &[AttentionMode::Causal],
        time: "O(N·(N + M)·d) per segment of N with a memory of M",
        memory: "O(N·(N + M))",
        exactness: Exactness::Exact,
        needs_grid: false,
        global_tokens: false,
        cannot_decode: None,
    };
}

impl CoreConfig for TransformerXlConfig {
    type Core = TransformerXlAttention;

    fn info(&self) -> &'static VariantInfo {
        &Self::INFO
    }

    /// The shared `[u; v]`, `[2, heads·d_k]`, with `biases = "shared"` (drawn uniformly with the
    /// reference's standard deviation 0.02).
    fn layer_shared(&self, dims: HeadDims) -> Option<SharedParameterSpec> {
        (self.biases == Biases::Shared).then(|| SharedParameterSpec {
            shape: [2, dims.heads * dims.d_k],
            bound: 0.02 * 3f64.sqrt(),
        })
    }

    fn init(
        &self,
        mode: AttentionMode,
        dims: HeadDims,
        device: &Device,
    ) -> Result<TransformerXlAttention, ConfigError> {
        ConfigError::check_mode_because(
            &Self::INFO,
            mode,
            "relative positions are shifted into place for keys at or before the query only (kimiyoung/transformer-xl #129); a two-sided variant is XLNet's",
        )?;
        ConfigError::check_positive_opt("scale", self.scale)?;
        if let Some(c) = self.clamp_len {
            ConfigError::check_nonzero("clamp_len", c)?;
        }
        let width = dims.heads * dims.d_k;
        if width % 2 == 1 {
            return Err(ConfigError::invalid(
                "heads × d_k",
                "an even width (the sinusoid has sin and cos halves)",
                width,
            ));
        }
        // As the reference's nn.Linear (r_net) and its normal(0, 0.02) biases.
        let bound = 1.0 / (width as f64).sqrt();
        Ok(TransformerXlAttention {
            mode,
            heads: dims.heads,
            d_k: dims.d_k,
            clamp_len: self.clamp_len,
            scale: self.scale,
            same_length: self.same_length,
            w_r: Initializer::Uniform {
                min: -bound,
                max: bound,
            }
            .init([width, width], device),
            biases: (self.biases == Biases::PerLayer).then(|| {
                Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
                .init([2, width], device)
            }),
        })
    }
}

/// Transformer-XL's relative positional attention. See the [module docs](self).
#[derive(Module, Debug)]
pub struct TransformerXlAttention {
    #[module(skip)]
    mode: AttentionMode,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    d_k: usize,
    #[module(skip)]
    clamp_len: Option<usize>,
    #[module(skip)]
    scale: Option<f64>,
    #[module(skip)]
    same_length: bool,
    /// `W_r`: the distance sinusoid to every head's `r`, `[heads·d_k, heads·d_k]`.
    pub w_r: Param<Tensor<2>>,
    /// The layer's own `[u; v]` (`r_w_bias`, `r_r_bias`), `[2, heads·d_k]`, with
    /// `biases = "per-layer"`; otherwise the stack's [`SharedParameter`].
    pub biases: Option<Param<Tensor<2>>>,
}

/// The sinusoid of the distances `len−1, …, 0` (each capped at `clamp`), `[sin | cos]` halves
/// of `width` columns: the reference's `PositionalEmbedding` of `pos_seq = arange(klen−1, −1,
/// −1)` clamped by `clamp_len`.
///
/// # Shapes
/// - output: `[len, width]`
pub fn relative_sinusoid(len: usize, width: usize, clamp: Option<usize>, device: &Device) -> Tensor<2> {
    let half = width / 2;
    let distances: Vec<f32> = (0..len)
        .map(|c| {
            let d = len - 1 - c;
            clamp.map_or(d, |m| d.min(m)) as f32
        })
        .collect();
    let inv_freq: Vec<f32> = (0..half)
        .map(|k| 1.0 / 10000f32.powf(2.0 * k as f32 / width as f32))
        .collect();
    let pos = Tensor::<1>::from_floats(distances.as_slice(), device).reshape([len, 1]);
    let freq = Tensor::<1>::from_floats(inv_freq.as_slice(), device).reshape([1, half]);
    let angles = pos.matmul(freq); // [len, half]
    Tensor::cat(vec![angles.clone().sin(), angles.cos()], 1)
}

/// Aligns scores against the descending distances `K−1, …, 0` (column c holds distance
/// K−1−c) to keys: row i of `n` (the last n of K positions) gets in column j the entry of
/// distance `(K − n + i) − j`. Pads one zero column on the left, reads the `[n, K + 1]` rows
/// as `[K + 1, n]`, drops the first row and reads back as `[n, K]` (the reference's
/// `_rel_shift`); entries with j after the query (distance < 0) are garbage.
///
/// # Shapes
/// - x: `[batch, heads, n, K]` → `[batch, heads, n, K]`
pub fn rel_shift(x: Tensor<4>) -> Tensor<4> {
    let [b, h, n, k] = x.dims();
    let zeros = Tensor::<4>::zeros([b, h, n, 1], &x.device());
    Tensor::cat(vec![zeros, x], 3)
        .reshape([b, h, k + 1, n])
        .narrow(2, 1, k)
        .reshape([b, h, n, k])
}

impl TransformerXlAttention {
    /// `[u; v]`, `[2, heads·d_k]`: the layer's own, or the stack's shared parameter.
    ///
    /// # Panics
    /// With shared biases and no [`SharedParameter`] side input.
    pub fn biases_of(&self, extras: &Extras) -> Tensor<2> {
        match &self.biases {
            Some(b) => b.val(),
            None => extras
                .side
                .get::<SharedParameter>()
                .expect(
                    "transformer-xl (shared biases): the stack must pass u, v as a SharedParameter side input",
                )
                .0
                .clone(),
        }
    }
}

impl AttentionCore for TransformerXlAttention {
    /// # Shapes
    /// - input: see [`AttnInput`]; `seq_k = memory + seq_q`
    /// - output: `[batch, heads, seq_q, d_v]`
    fn attend(&self, input: AttnInput) -> Tensor<4> {
        let [b, h, n, k_len, dk, _] = input.dims();
        assert!(
            k_len >= n,
            "transformer-xl: the keys are a memory then the segment (seq_k >= seq_q), got seq_q {n}, seq_k {k_len}"
        );
        let device = input.query.device();
        let m = k_len - n;
        let biases = self.biases_of(&input.extras);
        let u = biases.clone().narrow(0, 0, 1).reshape([1, h, 1, dk]);
        let v = biases.narrow(0, 1, 1).reshape([1, h, 1, dk]);
        let r = relative_sinusoid(k_len, h * dk, self.clamp_len, &device)
            .matmul(self.w_r.val()) // [K, heads·d_k]
            .reshape([k_len, h, dk])
            .swap_dims(0, 1)
            .reshape([1, h, k_len, dk]);
        let q = input.query;
        let content = q.clone().add(u).matmul(input.key.swap_dims(2, 3)); // [b, h, n, K]
        let position = rel_shift(q.add(v).matmul(r.swap_dims(2, 3))); // [b, h, n, K]
        let scale = self.scale.unwrap_or(1.0 / (dk as f64).sqrt());
        let scores = content.add(position).mul_scalar(scale);
        // Key j is visible to query i when j <= m + i (bottom-right causal) and not padding.
        let mut hidden = causal_mask(n, k_len, &device); // [n, K]: j > m + i
        if self.same_length && m > 0 {
            // Also the keys more than m behind the query: j <= i.
            let qi = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([n, 1]);
            let kj = Tensor::<1, Int>::arange(0..k_len as i64, &device).reshape([1, k_len]);
            hidden = hidden.bool_or(kj.lower_equal(qi));
        }
        let mut mask: Tensor<4, Bool> = hidden.reshape([1, 1, n, k_len]).expand([b, h, n, k_len]);
        if let Some(pad) = input.mask_pad_k {
            mask = mask.bool_or(pad.reshape([b, 1, 1, k_len]).expand([b, h, n, k_len]));
        }
        masked_softmax_matmul(scores, Some(mask), input.value)
    }

    fn mode(&self) -> AttentionMode {
        self.mode
    }

    /// A key/value cache: a new position's query meets the cached keys at their distances.
    /// None with `same_length`, whose window depends on how the positions are cut into
    /// segments (a cache would show each new query one key fewer than a pass over the whole
    /// sequence).
    fn decode_cache(
        &self,
        batch: usize,
        dims: HeadDims,
        max_len: usize,
        device: &Device,
    ) -> Option<DecodeCache> {
        if self.same_length {
            return None;
        }
        kv_cache(self.mode, batch, dims, max_len, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kimiyoung/transformer-xl #8's worked example, in our terms: row i of the last n of K
    /// positions gets the entry of distance (K − n + i) − j in column j.
    #[test]
    fn rel_shift_moves_each_row_to_its_distances() {
        let device = Device::flex();
        let (n, k) = (3usize, 5usize);
        // Entry (i, c) = 10·i + (distance of column c) = 10·i + (K − 1 − c).
        let values: Vec<f32> = (0..n)
            .flat_map(|i| (0..k).map(move |c| (10 * i + (k - 1 - c)) as f32))
            .collect();
        let x = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([1, 1, n, k]);
        let y: Vec<f32> = rel_shift(x).into_data().try_to_vec().unwrap();
        for i in 0..n {
            for j in 0..=(k - n + i) {
                let distance = (k - n + i) - j;
                assert_eq!(
                    y[i * k + j],
                    (10 * i + distance) as f32,
                    "row {i}, key {j} (distance {distance})"
                );
            }
        }
    }

    #[test]
    fn distances_descend_and_clamp() {
        let device = Device::flex();
        let r: Vec<f32> = relative_sinusoid(6, 4, Some(3), &device)
            .into_data()
            .try_to_vec()
            .unwrap();
        // Row c: distance min(5 − c, 3); columns [sin(d), sin(d/100), cos(d), cos(d/100)].
        for c in 0..6 {
            let d = (5 - c).min(3) as f32;
            assert!((r[c * 4] - d.sin()).abs() < 1e-6);
            assert!((r[c * 4 + 1] - (d / 100.0).sin()).abs() < 1e-6);
            assert!((r[c * 4 + 2] - d.cos()).abs() < 1e-6);
        }
    }

    /// Segment 2 attending over [segment 1; segment 2] (segment 1 as the memory) equals the
    /// last rows of one causal pass over both: the distances, not the offsets, enter.
    #[test]
    fn a_segment_with_a_memory_equals_the_tail_of_one_pass_over_both() {
        let device = Device::flex();
        let core = TransformerXlConfig {
            clamp_len: Some(9),
            biases: Biases::PerLayer,
            ..Default::default()
        }
        .init(AttentionMode::Causal, HeadDims::new(2, 4), &device)
        .unwrap();
        let mut rng = crate::rng::SeededRng::new(17);
        let (s1, s2) = (7, 5);
        let q = rng.normal_tensor([2, 2, s1 + s2, 4], 1.0, &device);
        let k = rng.normal_tensor([2, 2, s1 + s2, 4], 1.0, &device);
        let v = rng.normal_tensor([2, 2, s1 + s2, 4], 1.0, &device);
        let whole = core
            .attend(AttnInput::new(q.clone(), k.clone(), v.clone()))
            .narrow(2, s1, s2);
        let tail = core.attend(AttnInput::new(q.narrow(2, s1, s2), k, v));
        let d = whole.sub(tail).abs().max().into_scalar::<f32>();
        assert!(d < 1e-5, "{d:e}");
    }

    /// Translation invariance: moving the segment and its keys further along (p more key
    /// positions in front, all padding) changes no output, since only distances enter.
    #[test]
    fn outputs_depend_on_distances_not_on_the_offset() {
        use burn::tensor::TensorData;
        let device = Device::flex();
        let core = TransformerXlConfig {
            biases: Biases::PerLayer,
            ..Default::default()
        }
        .init(AttentionMode::Causal, HeadDims::new(2, 4), &device)
        .unwrap();
        let mut rng = crate::rng::SeededRng::new(23);
        let (m, n, p) = (3, 5, 6);
        let q = rng.normal_tensor([1, 2, n, 4], 1.0, &device);
        let k = rng.normal_tensor([1, 2, m + n, 4], 1.0, &device);
        let v = rng.normal_tensor([1, 2, m + n, 4], 1.0, &device);
        let base = core.attend(AttnInput::new(q.clone(), k.clone(), v.clone()));
        let front = rng.normal_tensor([1, 2, p, 4], 1.0, &device);
        let mut moved = AttnInput::new(
            q,
            Tensor::cat(vec![front.clone(), k], 2),
            Tensor::cat(vec![front, v], 2),
        );
        let pad: Vec<bool> = (0..p + m + n).map(|j| j < p).collect();
        moved.mask_pad_k = Some(
            Tensor::<2, Bool>::from_data(TensorData::new(pad, [1, p + m + n]), &device),
        );
        let d = base
            .sub(core.attend(moved))
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(d < 1e-5, "{d:e}");
    }

    /// With `same_length` each query sees exactly the m keys up to itself: changing an older
    /// key's value moves no output, changing one of its m moves it.
    #[test]
    fn same_length_shows_every_query_the_last_m_keys() {
        let device = Device::flex();
        let core = TransformerXlConfig {
            same_length: true,
            biases: Biases::PerLayer,
            ..Default::default()
        }
        .init(AttentionMode::Causal, HeadDims::new(1, 4), &device)
        .unwrap();
        let mut rng = crate::rng::SeededRng::new(5);
        let (m, n) = (4, 3);
        let q = rng.normal_tensor([1, 1, n, 4], 1.0, &device);
        let k = rng.normal_tensor([1, 1, m + n, 4], 1.0, &device);
        let v = rng.normal_tensor([1, 1, m + n, 4], 1.0, &device);
        let out = |v: Tensor<4>| core.attend(AttnInput::new(q.clone(), k.clone(), v));
        let base = out(v.clone());
        for j in 0..m + n {
            let bumped = v.clone().slice_assign(
                [0..1, 0..1, j..j + 1, 0..4],
                Tensor::ones([1, 1, 1, 4], &device).mul_scalar(5.0),
            );
            let moved = out(bumped).sub(base.clone()).abs().sum_dim(3);
            let moved: Vec<f32> = moved.into_data().try_to_vec().unwrap();
            for (i, d) in moved.iter().enumerate() {
                let sees = j > i && j <= m + i;
                assert_eq!(*d > 1e-6, sees, "query {i}, key {j}: moved {d}");
            }
        }
    }

    #[test]
    fn bidirectional_and_cross_are_configuration_errors_that_say_why() {
        let device = Device::flex();
        for mode in [AttentionMode::Bidirectional, AttentionMode::Cross] {
            let e = TransformerXlConfig::default()
                .init(mode, HeadDims::new(2, 4), &device)
                .unwrap_err()
                .to_string();
            assert!(e.contains("XLNet"), "{e}");
        }
    }
}

#[cfg(feature = "testing")]
mod contract {
    use super::*;
    use crate::config::Attention;
    use crate::testing::specs::*;
    use crate::testing::{Case, Contract, Oracle, Spec};

    /// Relative attention computed densely with each score's distance indexed directly (no
    /// shift): `((q_i + u)·k_j + (q_i + v)·W_r R(min(m + i − j, clamp))) · scale`, with the
    /// sinusoid built here from its definition.
    fn reference(core: &Attention, input: &AttnInput, mode: AttentionMode) -> Tensor<4> {
        use burn::tensor::TensorData;
        let Attention::TransformerXl(core) = core else {
            unreachable!("the transformer-xl contract builds transformer-xl")
        };
        let [b, h, n, k_len, dk, _] = input.dims();
        let device = input.query.device();
        let m = k_len - n;
        let width = h * dk;
        // R(δ) for δ = 0..K−1, then every (i, j)'s row selected by its distance.
        let sinusoid: Vec<f32> = (0..k_len)
            .flat_map(|d| {
                let d = core.clamp_len.map_or(d, |c| d.min(c)) as f64;
                let row: Vec<f32> = (0..width)
                    .map(|col| {
                        let k = (col % (width / 2)) as f64;
                        let angle = d / 10000f64.powf(2.0 * k / width as f64);
                        (if col < width / 2 { angle.sin() } else { angle.cos() }) as f32
                    })
                    .collect();
                row
            })
            .collect();
        let r_by_distance = Tensor::<2>::from_data(TensorData::new(sinusoid, [k_len, width]), &device)
            .matmul(core.w_r.val())
            .reshape([k_len, h, dk])
            .swap_dims(0, 1); // [h, distance, dk]
        let index: Vec<i64> = (0..n)
            .flat_map(|i| (0..k_len).map(move |j| (m + i).saturating_sub(j) as i64))
            .collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n * k_len]), &device);
        let r_ij = r_by_distance
            .select(1, index)
            .reshape([1, h, n, k_len, dk]); // r of distance (m + i − j)
        let biases = core.biases_of(&input.extras);
        let qv = input
            .query
            .clone()
            .add(biases.clone().narrow(0, 1, 1).reshape([1, h, 1, dk]))
            .reshape([b, h, n, 1, dk]);
        let position = qv.mul(r_ij).sum_dim(4).reshape([b, h, n, k_len]);
        let content = input
            .query
            .clone()
            .add(biases.narrow(0, 0, 1).reshape([1, h, 1, dk]))
            .matmul(input.key.clone().swap_dims(2, 3));
        let scale = core.scale.unwrap_or(1.0 / (dk as f64).sqrt());
        let mut scores = content.add(position).mul_scalar(scale);
        if let Some(mask) = crate::reference::oracle_mask(input, mode, None) {
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        burn::tensor::activation::softmax(scores, 3).matmul(input.value.clone())
    }

    /// Relative attention equals its dense reference with and without a memory and clamping.
    impl Contract for TransformerXlConfig {
        fn contract() -> Vec<Spec<Attention>> {
            // Per-layer biases: a core alone has no stack to share them (the shared ones are
            // tested through the models' stacks).
            vec![exact_config(
                from_config(|_: &Case| {
                    TransformerXlConfig {
                        biases: Biases::PerLayer,
                        ..Default::default()
                    }
                    .into()
                }),
                "always (its own function)",
                Oracle::Reference("dense relative attention, distances indexed", reference),
                1e-5,
                |_| {
                    TransformerXlConfig {
                        clamp_len: Some(3),
                        biases: Biases::PerLayer,
                        ..Default::default()
                    }
                    .into()
                },
            )]
        }
    }
}
