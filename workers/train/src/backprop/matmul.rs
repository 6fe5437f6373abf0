//! Matrix products over slices, by `gemm` (the crate candle's own CPU
//! matmul calls) with strides instead of copies.

/// A read-only matrix over a slice: `rows × cols`, element (i, j) at
/// `i·rs + j·cs`. A transpose swaps the strides; nothing is copied.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Row-major, contiguous.
    pub(super) fn new(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View::strided(data, rows, cols, cols)
    }

    /// `rows × cols` with row stride `rs`: a block of columns of a wider
    /// row-major matrix, starting at `data[0]`.
    pub(super) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> View<'a> {
        View {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    pub(super) fn t(self) -> View<'a> {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A writable matrix over a slice, as [`View`].
pub(super) struct ViewMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> ViewMut<'a> {
    pub(super) fn new(data: &'a mut [f32], rows: usize, cols: usize) -> ViewMut<'a> {
        ViewMut::strided(data, rows, cols, cols)
    }

    pub(super) fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> ViewMut<'a> {
        ViewMut {
            data,
            rows,
            cols,
            rs,
        }
    }
}

/// The last element a matrix reaches must lie inside its slice: with it,
/// `gemm` reads and writes only inside the borrowed slices.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .zip((cols - 1).checked_mul(cs))
        .and_then(|(a, b)| a.checked_add(b));
    last.is_some_and(|last| last < len)
}

/// `out = alpha · a·b`, or `out += alpha · a·b` when `accumulate`, on
/// rayon's threads.
pub(super) fn matmul(out: ViewMut, a: View, b: View, accumulate: bool, alpha: f32) {
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    product(out, a, b, accumulate, alpha, parallelism);
}

/// [`matmul`] on the calling thread (inside tasks that are parallel
/// already).
pub(super) fn matmul_here(out: ViewMut, a: View, b: View, accumulate: bool, alpha: f32) {
    product(out, a, b, accumulate, alpha, gemm::Parallelism::None);
}

fn product(
    out: ViewMut,
    a: View,
    b: View,
    accumulate: bool,
    alpha: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(
        a.cols == b.rows && out.rows == a.rows && out.cols == b.cols,
        "matmul shapes: ({}×{})·({}×{}) into {}×{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        out.rows,
        out.cols
    );
    assert!(fits(out.data.len(), out.rows, out.cols, out.rs, 1));
    // Rows of the output must not overlap: gemm's threads write them.
    assert!(out.rows <= 1 || out.rs >= out.cols);
    assert!(fits(a.data.len(), a.rows, a.cols, a.rs, a.cs));
    assert!(fits(b.data.len(), b.rows, b.cols, b.rs, b.cs));
    if out.rows == 0 || out.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..out.rows {
                out.data[i * out.rs..i * out.rs + out.cols].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm touches inside the
    // three slices, and `out` is borrowed mutably, so it aliases neither
    // input. gemm computes dst = 1·dst + alpha·lhs·rhs when it reads dst.
    unsafe {
        gemm::gemm(
            out.rows,
            out.cols,
            a.cols,
            out.data.as_mut_ptr(),
            1,
            out.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
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

    #[test]
    fn products_through_strides_and_transposes_equal_the_plain_ones() {
        // a: 3×4 inside a 3×6 row-major block, b: 5×4 read transposed.
        let a: Vec<f32> = (0..18).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..20).map(|i| (i as f32).sin()).collect();
        let mut out = vec![1.0f32; 3 * 7];
        let av = View::strided(&a[1..], 3, 4, 6);
        let bv = View::new(&b, 5, 4).t();
        for accumulate in [false, true] {
            let before = out.clone();
            matmul(
                ViewMut::strided(&mut out[2..], 3, 5, 7),
                av,
                bv,
                accumulate,
                0.5,
            );
            for i in 0..3 {
                for j in 0..5 {
                    let want: f32 = (0..4).map(|k| a[1 + i * 6 + k] * b[j * 4 + k]).sum();
                    let base = if accumulate {
                        before[2 + i * 7 + j]
                    } else {
                        0.0
                    };
                    let got = out[2 + i * 7 + j];
                    assert!((got - (base + 0.5 * want)).abs() < 1e-5, "{i},{j}");
                }
            }
            // Outside the output block nothing changes.
            assert_eq!(&out[..2], &before[..2]);
            assert_eq!(out[7], before[7]);
        }
    }

    #[test]
    #[should_panic]
    fn a_view_past_its_slice_is_refused() {
        let a = vec![0f32; 11];
        let b = vec![0f32; 4];
        let mut out = vec![0f32; 3];
        matmul(
            ViewMut::new(&mut out, 3, 1),
            View::new(&a, 3, 4),
            View::new(&b, 4, 1),
            false,
            1.0,
        );
    }

    #[test]
    #[should_panic]
    fn overlapping_output_rows_are_refused() {
        let a = vec![0f32; 4];
        let b = vec![0f32; 4];
        let mut out = vec![0f32; 4];
        matmul(
            ViewMut::strided(&mut out, 2, 2, 1),
            View::new(&a, 2, 2),
            View::new(&b, 2, 2),
            false,
            1.0,
        );
    }
}
