//! Pattern oracles written from the papers' definitions, apart from the code they check: the
//! variants build their block plans and element rules elsewhere, and their contract specs
//! compare the realised attention with these masks. Nothing here is shared with the kernels'
//! plans.

use crate::mask::DenseMask;

/// Image Transformer 1-D local attention (Parmar et al. 2018, §3.2; t2t
/// `local_attention_1d` / `masked_local_attention_1d`): the sequence is cut into query blocks
/// of `query_block`; a query sees the keys from `memory` positions before its block's first
/// position up to `memory` positions after its block's last one (bidirectional), or from
/// `memory` before its block's start up to itself (causal).
pub fn image_transformer_1d(
    n: usize,
    lk: usize,
    query_block: usize,
    memory: usize,
    causal: bool,
) -> DenseMask {
    DenseMask::from_allowed(n, lk, |i, j| {
        let block = i / query_block;
        let first = block * query_block;
        let last = first + query_block - 1;
        let from = first as i64 - memory as i64;
        let to = if causal {
            i as i64
        } else {
            (last + memory) as i64
        };
        (from..=to).contains(&(j as i64))
    })
}

/// The Image Transformer 2-D layout: an image of `height × width` pixels in block-raster order
/// (query blocks of `block_h × block_w` in raster order, pixels in raster order inside a block).
#[derive(Clone, Copy, Debug)]
pub struct Image2d {
    /// Image rows.
    pub height: usize,
    /// Image columns.
    pub width: usize,
    /// Query block rows (h_q).
    pub block_h: usize,
    /// Query block columns (w_q).
    pub block_w: usize,
    /// Memory flange rows (h_m).
    pub flange_h: usize,
    /// Memory flange columns (w_m).
    pub flange_w: usize,
}

impl Image2d {
    /// The pixel `(row, column)` at sequence position `p`.
    fn pixel(&self, p: usize) -> (i64, i64) {
        let per_block = self.block_h * self.block_w;
        let blocks_per_row = self.width / self.block_w;
        let block = p / per_block;
        let within = p % per_block;
        let row = (block / blocks_per_row) * self.block_h + within / self.block_w;
        let col = (block % blocks_per_row) * self.block_w + within % self.block_w;
        (row as i64, col as i64)
    }
}

/// Image Transformer 2-D local attention (§3.2, Figure 2; t2t `local_attention_2d` /
/// `masked_local_attention_2d`): a query sees the pixels of the rectangle around its query
/// block widened by the flange (bidirectional); causal: the `flange_h` rows above that
/// rectangle's width, the `flange_w` columns left of its block, and its own block, each only
/// where the key comes before the query in block-raster order.
pub fn image_transformer_2d(layout: Image2d, causal: bool) -> DenseMask {
    let n = layout.height * layout.width;
    let (bh, bw) = (layout.block_h as i64, layout.block_w as i64);
    let (fh, fw) = (layout.flange_h as i64, layout.flange_w as i64);
    DenseMask::from_allowed(n, n, |i, j| {
        let (qr, qc) = layout.pixel(i);
        let (kr, kc) = layout.pixel(j);
        // The query's block: rows [top, top + bh), columns [left, left + bw).
        let (top, left) = (qr - qr % bh, qc - qc % bw);
        let rows = |a: i64, b: i64| kr >= a && kr < b;
        let cols = |a: i64, b: i64| kc >= a && kc < b;
        if !causal {
            return rows(top - fh, top + bh + fh) && cols(left - fw, left + bw + fw);
        }
        let above = rows(top - fh, top) && cols(left - fw, left + bw + fw);
        let beside = rows(top, top + bh) && cols(left - fw, left);
        let own = rows(top, top + bh) && cols(left, left + bw);
        (above || beside || own) && j <= i
    })
}

/// BigBird's ITC pattern (Zaheer et al. 2020, §2 and Appendix D; google-research/bigbird
/// `bigbird_block_sparse_attention`), per head: blocks of `block`; the first and the last
/// block are global (their queries see every key, every query sees their keys); every other
/// query block sees its window (the blocks before, at and after it) and its random blocks,
/// `random(head, query_block)`, a drawn plan taken as data.
pub fn bigbird(
    heads: usize,
    n: usize,
    block: usize,
    random: impl Fn(usize, usize) -> Vec<usize>,
) -> DenseMask {
    let nb = n.div_ceil(block);
    let global = |b: usize| b == 0 || b + 1 == nb;
    let random: Vec<Vec<Vec<usize>>> = (0..heads)
        .map(|h| (0..nb).map(|q| random(h, q)).collect())
        .collect();
    DenseMask::per_head(heads, n, n, |h, i, j| {
        let (bi, bj) = (i / block, j / block);
        global(bi) || global(bj) || bi.abs_diff(bj) <= 1 || random[h][bi].contains(&bj)
    })
}
