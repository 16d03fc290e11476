//! Kernel (linear) attention `out_i = φ(q_i) S / φ(q_i)·z` on feature maps, forward and
//! backward, on `f32` slices: the fused form of [`crate::kernels::prefix_sum`].
//!
//! - Bidirectional: `S = Φkᵀ V`, `z = Σ_j Φk_j` once per head; every query reads them.
//! - Causal, chunks of `C` queries: inside a chunk a masked `C × C` product, across chunks the
//!   running state `(S, z)` of the keys before the chunk (bottom-right aligned: keys before the
//!   first query's position form a prefix every query sees).
//! - Backward: the bidirectional gradients are five GEMMs; the causal backward recomputes the
//!   per-chunk states (the forward keeps none) and walks the chunks in reverse with the
//!   running gradient of the state.
//! - The denominator is floored (1e-30) as in the composed form; where the floor applies, its
//!   gradient is zero.
//!
//! Threads: rayon over `(batch, head)`; the GEMMs are single-threaded.
//!
//! Forward and backward share the per-head views and chunk helpers, so they stay in one file
//! (~650 lines).

use rayon::prelude::*;

use super::gemm::{Mat, MatMut, gemm};
use super::simd::RowOps;
use super::zeros;

/// The floor of the denominator.
const FLOOR: f32 = 1.0e-30;

/// The problem: `phi_q [B, H, Nq, m]`, `phi_k [B, H, Nk, m]`, `v [B, H, Nk, dv]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Batch × heads.
    pub heads: usize,
    /// Queries.
    pub seq_q: usize,
    /// Keys.
    pub seq_k: usize,
    /// Features.
    pub m: usize,
    /// Value width.
    pub d_v: usize,
}

/// The feature map the kernel applies to its query and key inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// The inputs are already features (padded keys must have zero rows).
    Identity,
    /// `φ(x) = elu(x) + 1` (Linear Transformer), with padded keys zeroed by the key mask.
    EluPlusOne,
}

impl Feature {
    /// `φ(x)` in place.
    fn apply(self, x: &mut [f32]) {
        if self == Self::EluPlusOne {
            for v in x.iter_mut() {
                *v = if *v > 0.0 {
                    *v + 1.0
                } else {
                    super::simd::exp(*v)
                };
            }
        }
    }

    /// `g *= φ'(x)`.
    fn chain(self, g: &mut [f32], x: &[f32]) {
        if self == Self::EluPlusOne {
            for (g, x) in g.iter_mut().zip(x) {
                if *x <= 0.0 {
                    *g *= super::simd::exp(*x);
                }
            }
        }
    }
}

/// The inputs of one call: `phi_q`, `phi_k` are the query and key *inputs* of the feature map
/// (the features themselves when it is [`Feature::Identity`]).
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Queries (or their features).
    pub phi_q: &'a [f32],
    /// Keys (or their features).
    pub phi_k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
}

/// How the inputs become features: the map, and which keys are padded (`[B, Nk]`, 1 = keep,
/// 0 = padded; applied after the map).
#[derive(Clone, Copy, Debug)]
pub struct Features<'a> {
    /// The map.
    pub map: Feature,
    /// Key keep-mask, per batch row.
    pub keep: Option<&'a [f32]>,
    /// Heads per batch row (to find a head's mask row).
    pub heads_per_batch: usize,
}

impl Features<'_> {
    /// The features of head `h` (`Cow`-like: borrowed when the map is the identity and no key
    /// is padded).
    fn of<'a>(&self, s: &Shape, h: usize, head: Inputs<'a>) -> HeadFeatures<'a> {
        if self.map == Feature::Identity && self.keep.is_none() {
            return HeadFeatures::Borrowed(head);
        }
        let mut q = head.phi_q.to_vec();
        let mut k = head.phi_k.to_vec();
        self.map.apply(&mut q);
        self.map.apply(&mut k);
        if let Some(keep) = self.keep {
            let b = h / self.heads_per_batch.max(1);
            let keep = &keep[b * s.seq_k..(b + 1) * s.seq_k];
            for (row, kept) in k.chunks_mut(s.m).zip(keep) {
                if *kept == 0.0 {
                    row.fill(0.0);
                }
            }
        }
        HeadFeatures::Owned(q, k, head.v)
    }

    /// Back through the map and the mask: `d_q *= φ'(q)`, `d_k *= keep · φ'(k)`.
    fn chain(&self, s: &Shape, h: usize, head: &Inputs<'_>, dq: &mut [f32], dk: &mut [f32]) {
        self.map.chain(dq, head.phi_q);
        self.map.chain(dk, head.phi_k);
        if let Some(keep) = self.keep {
            let b = h / self.heads_per_batch.max(1);
            let keep = &keep[b * s.seq_k..(b + 1) * s.seq_k];
            for (row, kept) in dk.chunks_mut(s.m).zip(keep) {
                if *kept == 0.0 {
                    row.fill(0.0);
                }
            }
        }
    }
}

/// One head's features: the inputs themselves, or computed copies.
enum HeadFeatures<'a> {
    Borrowed(Inputs<'a>),
    Owned(Vec<f32>, Vec<f32>, &'a [f32]),
}

impl HeadFeatures<'_> {
    fn inputs(&self) -> Inputs<'_> {
        match self {
            Self::Borrowed(i) => *i,
            Self::Owned(q, k, v) => Inputs {
                phi_q: q,
                phi_k: k,
                v,
            },
        }
    }
}

impl Inputs<'_> {
    fn check(&self, s: &Shape) {
        assert_eq!(
            self.phi_q.len(),
            s.heads * s.seq_q * s.m,
            "kernel attention: phi_q size"
        );
        assert_eq!(
            self.phi_k.len(),
            s.heads * s.seq_k * s.m,
            "kernel attention: phi_k size"
        );
        assert_eq!(
            self.v.len(),
            s.heads * s.seq_k * s.d_v,
            "kernel attention: v size"
        );
    }

    fn head(&self, s: &Shape, h: usize) -> Inputs<'_> {
        Inputs {
            phi_q: &self.phi_q[h * s.seq_q * s.m..(h + 1) * s.seq_q * s.m],
            phi_k: &self.phi_k[h * s.seq_k * s.m..(h + 1) * s.seq_k * s.m],
            v: &self.v[h * s.seq_k * s.d_v..(h + 1) * s.seq_k * s.d_v],
        }
    }
}

/// Causal chunks: `Some(C)`; bidirectional: `None`.
pub type Chunk = Option<usize>;

/// Forward: writes `out [B, H, Nq, dv]`.
///
/// # Panics
/// If a size disagrees, or causal with `seq_k < seq_q`.
pub fn forward(
    inputs: Inputs<'_>,
    features: Features<'_>,
    shape: Shape,
    chunk: Chunk,
    out: &mut [f32],
) {
    inputs.check(&shape);
    assert_eq!(
        out.len(),
        shape.heads * shape.seq_q * shape.d_v,
        "kernel attention: out size"
    );
    if shape.seq_q == 0 || shape.d_v == 0 {
        return;
    }
    let ops = RowOps::detect();
    out.par_chunks_mut(shape.seq_q * shape.d_v)
        .enumerate()
        .for_each(|(h, out)| {
            let feats = features.of(&shape, h, inputs.head(&shape, h));
            let head = feats.inputs();
            match chunk {
                None => forward_bidirectional(&ops, &shape, head, out),
                Some(c) => forward_causal(&ops, &shape, head, c.max(1), out),
            }
        });
}

/// `S = Φkᵀ V` (`m × dv`) and `z = Σ Φk` of the rows `[k0, k1)`, added to `s` and `z`.
fn accumulate_state(
    ops: &RowOps,
    shape: &Shape,
    head: &Inputs<'_>,
    (k0, k1): (usize, usize),
    s: &mut [f32],
    z: &mut [f32],
) {
    let (m, dv) = (shape.m, shape.d_v);
    let rows = k1 - k0;
    if rows == 0 {
        return;
    }
    gemm(
        MatMut::rows(s, m, dv, dv),
        Mat::transposed(&head.phi_k[k0 * m..k1 * m], m, rows, m),
        Mat::rows(&head.v[k0 * dv..k1 * dv], rows, dv, dv),
        1.0,
        1.0,
    );
    for row in head.phi_k[k0 * m..k1 * m].chunks(m) {
        ops.add(z, row);
    }
}

fn forward_bidirectional(ops: &RowOps, shape: &Shape, head: Inputs<'_>, out: &mut [f32]) {
    let (m, dv, nq) = (shape.m, shape.d_v, shape.seq_q);
    let mut s = vec![0.0f32; m * dv];
    let mut z = vec![0.0f32; m];
    accumulate_state(ops, shape, &head, (0, shape.seq_k), &mut s, &mut z);
    gemm(
        MatMut::rows(out, nq, dv, dv),
        Mat::rows(head.phi_q, nq, m, m),
        Mat::rows(&s, m, dv, dv),
        0.0,
        1.0,
    );
    for (i, row) in out.chunks_mut(dv).enumerate() {
        let den = ops.dot(&head.phi_q[i * m..(i + 1) * m], &z).max(FLOOR);
        ops.scale(row, 1.0 / den);
    }
}

/// The lower-triangular (bottom-right aligned within the chunk) products of one chunk:
/// `a[r, c] = φ(q_{q0+r})·φ(k_{k0+c})` for `c ≤ r`, 0 above; the chunk's keys are the keys at
/// the same positions as its queries (`k0 = q0 + offset`).
fn chunk_scores(head: &Inputs<'_>, m: usize, q0: usize, k0: usize, rows: usize, a: &mut [f32]) {
    gemm(
        MatMut::rows(a, rows, rows, rows),
        Mat::rows(&head.phi_q[q0 * m..(q0 + rows) * m], rows, m, m),
        Mat::transposed(&head.phi_k[k0 * m..(k0 + rows) * m], m, rows, m),
        0.0,
        1.0,
    );
    for r in 0..rows {
        a[r * rows + r + 1..(r + 1) * rows].fill(0.0);
    }
}

fn forward_causal(ops: &RowOps, shape: &Shape, head: Inputs<'_>, c: usize, out: &mut [f32]) {
    let (m, dv, nq, nk) = (shape.m, shape.d_v, shape.seq_q, shape.seq_k);
    assert!(
        nk >= nq,
        "causal kernel attention needs seq_k >= seq_q, got {nq} > {nk}"
    );
    let offset = nk - nq;
    let mut s = vec![0.0f32; m * dv];
    let mut z = vec![0.0f32; m];
    accumulate_state(ops, shape, &head, (0, offset), &mut s, &mut z);
    let mut a = vec![0.0f32; c * c];
    for q0 in (0..nq).step_by(c) {
        let rows = c.min(nq - q0);
        let k0 = q0 + offset;
        let a = &mut a[..rows * rows];
        chunk_scores(&head, m, q0, k0, rows, a);
        let out = &mut out[q0 * dv..(q0 + rows) * dv];
        // num = A V_c + Φq_c S.
        gemm(
            MatMut::rows(out, rows, dv, dv),
            Mat::rows(a, rows, rows, rows),
            Mat::rows(&head.v[k0 * dv..(k0 + rows) * dv], rows, dv, dv),
            0.0,
            1.0,
        );
        gemm(
            MatMut::rows(out, rows, dv, dv),
            Mat::rows(&head.phi_q[q0 * m..(q0 + rows) * m], rows, m, m),
            Mat::rows(&s, m, dv, dv),
            1.0,
            1.0,
        );
        for (r, row) in out.chunks_mut(dv).enumerate() {
            let within: f32 = a[r * rows..(r + 1) * rows].iter().sum();
            let den =
                (within + ops.dot(&head.phi_q[(q0 + r) * m..(q0 + r + 1) * m], &z)).max(FLOOR);
            ops.scale(row, 1.0 / den);
        }
        accumulate_state(ops, shape, &head, (k0, k0 + rows), &mut s, &mut z);
    }
}

/// Gradients `(d_phi_q, d_phi_k, dv)` (of the feature map's inputs) of the forward that gave
/// `out`, for `d_out`.
///
/// # Panics
/// If a size disagrees.
pub fn backward(
    inputs: Inputs<'_>,
    features: Features<'_>,
    shape: Shape,
    chunk: Chunk,
    out: &[f32],
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    inputs.check(&shape);
    let Shape {
        heads,
        seq_q,
        seq_k,
        m,
        d_v,
    } = shape;
    assert_eq!(
        out.len(),
        heads * seq_q * d_v,
        "kernel attention backward: out size"
    );
    assert_eq!(
        d_out.len(),
        out.len(),
        "kernel attention backward: d_out size"
    );
    let mut dq = zeros(heads * seq_q * m);
    let mut dk = zeros(heads * seq_k * m);
    let mut dv = zeros(heads * seq_k * d_v);
    if heads == 0 || m == 0 {
        return (dq, dk, dv);
    }
    let ops = RowOps::detect();
    dq.par_chunks_mut((seq_q * m).max(1))
        .zip(dk.par_chunks_mut((seq_k * m).max(1)))
        .zip(dv.par_chunks_mut((seq_k * d_v).max(1)))
        .enumerate()
        .for_each(|(h, ((dq, dk), dv))| {
            let raw = inputs.head(&shape, h);
            let feats = features.of(&shape, h, raw);
            let head = feats.inputs();
            let span = h * seq_q * d_v..(h + 1) * seq_q * d_v;
            let g = Upstream::new(&ops, &shape, &head, &out[span.clone()], &d_out[span], chunk);
            match chunk {
                None => backward_bidirectional(&shape, &head, &g, dq, dk, dv),
                Some(c) => backward_causal(&ops, &shape, &head, &g, c.max(1), dq, dk, dv),
            }
            features.chain(&shape, h, &raw, dq, dk);
        });
    (dq, dk, dv)
}

/// The gradients of the numerator and denominator of each query: `G = dO / den`
/// (`[Nq, dv]`) and `c = -(dO·out) / den` (`[Nq]`, 0 where the floor applied).
struct Upstream {
    g: Vec<f32>,
    c: Vec<f32>,
}

impl Upstream {
    fn new(
        ops: &RowOps,
        shape: &Shape,
        head: &Inputs<'_>,
        out: &[f32],
        d_out: &[f32],
        chunk: Chunk,
    ) -> Self {
        let (m, dv, nq) = (shape.m, shape.d_v, shape.seq_q);
        let den = denominators(ops, shape, head, chunk);
        let mut g = d_out.to_vec();
        let mut c = vec![0.0f32; nq];
        for i in 0..nq {
            let row = &mut g[i * dv..(i + 1) * dv];
            let floored = den[i] <= FLOOR;
            let d = den[i].max(FLOOR);
            if !floored {
                c[i] = -ops.dot(row, &out[i * dv..(i + 1) * dv]) / d;
            }
            ops.scale(row, 1.0 / d);
        }
        let _ = m;
        Self { g, c }
    }
}

/// The (unfloored) denominators `φ(q_i)·z_i` of every query.
fn denominators(ops: &RowOps, shape: &Shape, head: &Inputs<'_>, chunk: Chunk) -> Vec<f32> {
    let (m, nq, nk) = (shape.m, shape.seq_q, shape.seq_k);
    let mut z = vec![0.0f32; m];
    let mut den = vec![0.0f32; nq];
    match chunk {
        None => {
            for row in head.phi_k.chunks(m) {
                ops.add(&mut z, row);
            }
            for (i, d) in den.iter_mut().enumerate() {
                *d = ops.dot(&head.phi_q[i * m..(i + 1) * m], &z);
            }
        }
        Some(_) => {
            let offset = nk - nq;
            for row in head.phi_k[..offset * m].chunks(m) {
                ops.add(&mut z, row);
            }
            for (i, d) in den.iter_mut().enumerate() {
                ops.add(&mut z, &head.phi_k[(offset + i) * m..(offset + i + 1) * m]);
                *d = ops.dot(&head.phi_q[i * m..(i + 1) * m], &z);
            }
        }
    }
    den
}

fn backward_bidirectional(
    shape: &Shape,
    head: &Inputs<'_>,
    up: &Upstream,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (m, d_v, nq, nk) = (shape.m, shape.d_v, shape.seq_q, shape.seq_k);
    let ops = RowOps::detect();
    let mut s = vec![0.0f32; m * d_v];
    let mut z = vec![0.0f32; m];
    accumulate_state(&ops, shape, head, (0, nk), &mut s, &mut z);
    // dΦq = G Sᵀ + c zᵀ.
    gemm(
        MatMut::rows(dq, nq, m, m),
        Mat::rows(&up.g, nq, d_v, d_v),
        Mat::transposed(&s, d_v, m, d_v),
        0.0,
        1.0,
    );
    for (i, row) in dq.chunks_mut(m).enumerate() {
        axpy(row, up.c[i], &z);
    }
    // dS = Φqᵀ G, dz = Φqᵀ c.
    let mut ds = vec![0.0f32; m * d_v];
    gemm(
        MatMut::rows(&mut ds, m, d_v, d_v),
        Mat::transposed(head.phi_q, m, nq, m),
        Mat::rows(&up.g, nq, d_v, d_v),
        0.0,
        1.0,
    );
    let mut dz = vec![0.0f32; m];
    for (i, row) in head.phi_q.chunks(m).enumerate() {
        axpy(&mut dz, up.c[i], row);
    }
    // dΦk = V dSᵀ + 1 dzᵀ, dV = Φk dS.
    gemm(
        MatMut::rows(dk, nk, m, m),
        Mat::rows(head.v, nk, d_v, d_v),
        Mat::transposed(&ds, d_v, m, d_v),
        0.0,
        1.0,
    );
    for row in dk.chunks_mut(m) {
        ops.add(row, &dz);
    }
    gemm(
        MatMut::rows(dv, nk, d_v, d_v),
        Mat::rows(head.phi_k, nk, m, m),
        Mat::rows(&ds, m, d_v, d_v),
        0.0,
        1.0,
    );
}

/// `y += a·x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_causal(
    ops: &RowOps,
    shape: &Shape,
    head: &Inputs<'_>,
    up: &Upstream,
    c: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (m, d_v, nq, nk) = (shape.m, shape.d_v, shape.seq_q, shape.seq_k);
    let offset = nk - nq;
    // The state before each chunk, recomputed (the forward kept none).
    let chunks: Vec<usize> = (0..nq).step_by(c).collect();
    let mut states = Vec::with_capacity(chunks.len());
    let mut s = vec![0.0f32; m * d_v];
    let mut z = vec![0.0f32; m];
    accumulate_state(ops, shape, head, (0, offset), &mut s, &mut z);
    for &q0 in &chunks {
        states.push((s.clone(), z.clone()));
        let rows = c.min(nq - q0);
        accumulate_state(
            ops,
            shape,
            head,
            (q0 + offset, q0 + offset + rows),
            &mut s,
            &mut z,
        );
    }
    // Reverse walk with the running gradient of the state of later chunks.
    let mut ds = vec![0.0f32; m * d_v];
    let mut dz = vec![0.0f32; m];
    let mut a = vec![0.0f32; c * c];
    let mut da = vec![0.0f32; c * c];
    for (&q0, (s_prev, z_prev)) in chunks.iter().zip(&states).rev() {
        let rows = c.min(nq - q0);
        let k0 = q0 + offset;
        let (a, da) = (&mut a[..rows * rows], &mut da[..rows * rows]);
        let phi_q = &head.phi_q[q0 * m..(q0 + rows) * m];
        let phi_k = &head.phi_k[k0 * m..(k0 + rows) * m];
        let v = &head.v[k0 * d_v..(k0 + rows) * d_v];
        let g = &up.g[q0 * d_v..(q0 + rows) * d_v];
        let cvec = &up.c[q0..q0 + rows];
        let dk_c = &mut dk[k0 * m..(k0 + rows) * m];
        let dv_c = &mut dv[k0 * d_v..(k0 + rows) * d_v];
        // This chunk's keys feed the state of every later chunk.
        gemm(
            MatMut::rows(dk_c, rows, m, m),
            Mat::rows(v, rows, d_v, d_v),
            Mat::transposed(&ds, d_v, m, d_v),
            0.0,
            1.0,
        );
        for row in dk_c.chunks_mut(m) {
            ops.add(row, &dz);
        }
        gemm(
            MatMut::rows(dv_c, rows, d_v, d_v),
            Mat::rows(phi_k, rows, m, m),
            Mat::rows(&ds, m, d_v, d_v),
            0.0,
            1.0,
        );
        // Inside the chunk: A (masked), dA = mask(G Vᵀ + c 1ᵀ).
        chunk_scores(head, m, q0, k0, rows, a);
        gemm(
            MatMut::rows(da, rows, rows, rows),
            Mat::rows(g, rows, d_v, d_v),
            Mat::transposed(v, d_v, rows, d_v),
            0.0,
            1.0,
        );
        for r in 0..rows {
            let row = &mut da[r * rows..(r + 1) * rows];
            for x in &mut row[..=r] {
                *x += cvec[r];
            }
            row[r + 1..].fill(0.0);
        }
        // dΦq_c = dA Φk_c + G S_prevᵀ + c z_prevᵀ.
        let dq_c = &mut dq[q0 * m..(q0 + rows) * m];
        gemm(
            MatMut::rows(dq_c, rows, m, m),
            Mat::rows(da, rows, rows, rows),
            Mat::rows(phi_k, rows, m, m),
            0.0,
            1.0,
        );
        gemm(
            MatMut::rows(dq_c, rows, m, m),
            Mat::rows(g, rows, d_v, d_v),
            Mat::transposed(s_prev, d_v, m, d_v),
            1.0,
            1.0,
        );
        for (r, row) in dq_c.chunks_mut(m).enumerate() {
            axpy(row, cvec[r], z_prev);
        }
        // dΦk_c += dAᵀ Φq_c; dV_c += Aᵀ G.
        gemm(
            MatMut::rows(dk_c, rows, m, m),
            Mat::transposed(da, rows, rows, rows),
            Mat::rows(phi_q, rows, m, m),
            1.0,
            1.0,
        );
        gemm(
            MatMut::rows(dv_c, rows, d_v, d_v),
            Mat::transposed(a, rows, rows, rows),
            Mat::rows(g, rows, d_v, d_v),
            1.0,
            1.0,
        );
        // Later-chunk gradient of the state seen by earlier chunks: dS += Φq_cᵀ G, dz += Φq_cᵀ c.
        gemm(
            MatMut::rows(&mut ds, m, d_v, d_v),
            Mat::transposed(phi_q, m, rows, m),
            Mat::rows(g, rows, d_v, d_v),
            1.0,
            1.0,
        );
        for (r, row) in phi_q.chunks(m).enumerate() {
            axpy(&mut dz, cvec[r], row);
        }
    }
    // The prefix keys (before the first query) feed every chunk's state.
    if offset > 0 {
        gemm(
            MatMut::rows(&mut dk[..offset * m], offset, m, m),
            Mat::rows(&head.v[..offset * d_v], offset, d_v, d_v),
            Mat::transposed(&ds, d_v, m, d_v),
            0.0,
            1.0,
        );
        for row in dk[..offset * m].chunks_mut(m) {
            ops.add(row, &dz);
        }
        gemm(
            MatMut::rows(&mut dv[..offset * d_v], offset, d_v, d_v),
            Mat::rows(&head.phi_k[..offset * m], offset, m, m),
            Mat::rows(&ds, m, d_v, d_v),
            0.0,
            1.0,
        );
    }
}
