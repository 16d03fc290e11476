//! `dst = alpha·dst + beta·lhs·rhs` on strided `f32` slices, through the `gemm` crate.
//!
//! The wrapper checks that every element the product touches lies inside its slice, so the
//! call into `gemm` (which takes raw pointers) is sound for any arguments that pass.

/// A read-only `rows × cols` matrix in a slice: element `(r, c)` at `r·row_stride +
/// c·col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` block starting at `data[0]` whose rows are `row_stride` apart.
    ///
    /// # Panics
    /// If the block does not fit in `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self::strided(data, rows, cols, row_stride, 1)
    }

    /// The transpose of a row-major `cols × rows` block whose rows are `row_stride` apart: a
    /// `rows × cols` matrix.
    ///
    /// # Panics
    /// If the block does not fit in `data`.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self::strided(data, rows, cols, 1, row_stride)
    }

    fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        assert!(
            fits(data.len(), rows, cols, row_stride, col_stride),
            "gemm: a {rows}x{cols} matrix with strides ({row_stride}, {col_stride}) does not fit in {} elements",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
}

/// A mutable row-major `rows × cols` block of a slice whose rows are `row_stride` apart.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major `rows × cols` block starting at `data[0]`.
    ///
    /// # Panics
    /// If the block does not fit in `data`.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, row_stride, 1),
            "gemm: a {rows}x{cols} destination with row stride {row_stride} does not fit in {} elements",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
        }
    }
}

/// Whether a `rows × cols` matrix with these strides fits in `len` elements.
fn fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(row_stride).and_then(|a| {
        (cols - 1)
            .checked_mul(col_stride)
            .and_then(|b| a.checked_add(b))
    });
    last.is_some_and(|l| l < len && isize::try_from(len).is_ok())
}

/// `dst ← alpha·dst + beta·lhs·rhs` (`alpha` is ignored, and `dst` not read, when
/// `alpha == 0`), single-threaded: callers parallelise over independent products.
///
/// # Panics
/// If the shapes do not agree.
pub fn gemm(dst: MatMut<'_>, lhs: Mat<'_>, rhs: Mat<'_>, alpha: f32, beta: f32) {
    gemm_with(dst, lhs, rhs, alpha, beta, gemm::Parallelism::None);
}

/// [`gemm`] on all of rayon's threads, for one large product.
///
/// # Panics
/// If the shapes do not agree.
pub fn gemm_parallel(dst: MatMut<'_>, lhs: Mat<'_>, rhs: Mat<'_>, alpha: f32, beta: f32) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_with(dst, lhs, rhs, alpha, beta, parallelism);
}

fn gemm_with(
    dst: MatMut<'_>,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    alpha: f32,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(
        lhs.rows == dst.rows && rhs.cols == dst.cols && lhs.cols == rhs.rows,
        "gemm: [{}x{}]·[{}x{}] into [{}x{}]",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols,
        dst.rows,
        dst.cols
    );
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty inner dimension adds nothing.
        if alpha == 0.0 {
            for r in 0..m {
                dst.data[r * dst.row_stride..r * dst.row_stride + n].fill(0.0);
            }
        } else if alpha != 1.0 {
            for r in 0..m {
                for x in &mut dst.data[r * dst.row_stride..r * dst.row_stride + n] {
                    *x *= alpha;
                }
            }
        }
        return;
    }
    // SAFETY: `Mat::strided` and `MatMut::rows` checked that the last element each matrix
    // addresses (and therefore every element, strides being non-negative) lies inside its
    // slice; the slices are borrowed for the call, `dst` exclusively; `gemm` reads `dst` only
    // when `read_dst` is set and writes only the `m × n` elements it addresses.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            alpha != 0.0,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_transposes_and_accumulation_agree_with_a_naive_loop() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![1.0; m * n];
        gemm(
            MatMut::rows(&mut c, m, n, n),
            Mat::rows(&a, m, k, k),
            Mat::rows(&b, k, n, n),
            0.0,
            1.0,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // bᵀ stored row-major as [n, k], read transposed; accumulate twice with beta 0.5.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        gemm(
            MatMut::rows(&mut c, m, n, n),
            Mat::rows(&a, m, k, k),
            Mat::transposed(&bt, k, n, k),
            1.0,
            0.5,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - 1.5 * y).abs() < 1e-5);
        }
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn an_out_of_bounds_view_is_refused() {
        let data = vec![0.0; 10];
        let _ = Mat::rows(&data, 3, 4, 4);
    }
}
