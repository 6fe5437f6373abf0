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
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
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
