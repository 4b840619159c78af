//! Direct calls to `gemm` (the crate behind Burn's CPU matmul) on row ranges of host buffers,
//! for the experts' multiplies on their own rows, and the helpers that split a buffer by
//! expert.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A row-major matrix view for [`matmul_add`] and [`matmul_new`]: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Rows `r0..` of a row-major `[_, width]` buffer.
    pub(super) fn rows(data: &'a [f32], r0: usize, width: usize) -> Self {
        Self {
            data: &data[r0 * width..],
            rs: width,
            cs: 1,
        }
    }

    pub(super) fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `out [m, n] (row-major, contiguous) += a [m, k] @ b [k, n]`.
pub(super) fn matmul_add(out: &mut [f32], a: Mat, b: Mat, m: usize, n: usize, k: usize) {
    assert!(out.len() >= m * n);
    // SAFETY: `out` holds `m * n` initialised values.
    unsafe { matmul_raw(out.as_mut_ptr(), a, b, (m, n, k), true) }
}

/// `out [m, n] = a [m, k] @ b [k, n]` into memory not written yet: a new gradient is written
/// once, with no zero-fill pass before (100 MB per step at 64 experts).
pub(super) fn matmul_new(
    out: &mut [MaybeUninit<f32>],
    a: Mat,
    b: Mat,
    m: usize,
    n: usize,
    k: usize,
) {
    // All of `out`, so that a caller that allocated it uninitialised may treat it as written.
    assert_eq!(out.len(), m * n);
    // SAFETY: without `accumulate` nothing is read from `out`, and all `m * n` values are written.
    unsafe { matmul_raw(out.as_mut_ptr().cast(), a, b, (m, n, k), false) }
}

/// # Safety
/// `out` is valid for writes of `m * n` values, and for reads of them with `accumulate`.
pub(super) unsafe fn matmul_raw(
    out: *mut f32,
    a: Mat,
    b: Mat,
    (m, n, k): (usize, usize, usize),
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            // SAFETY: the caller's contract.
            unsafe { std::ptr::write_bytes(out, 0, m * n) };
        }
        return;
    }
    // The last element each view reads lies inside its slice.
    assert!((m - 1) * a.rs + (k - 1) * a.cs < a.data.len());
    assert!((k - 1) * b.rs + (n - 1) * b.cs < b.data.len());
    let parallelism = if m * n * k >= 192 * 192 * 192 && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every read of the two views inside their slices; the
    // caller vouches for `out`, which does not alias them (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            n as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Splits a row-major `[rows, width]` buffer into the row ranges of `offsets`.
pub(super) fn split_groups<'a, T>(
    mut buf: &'a mut [T],
    offsets: &[usize],
    width: usize,
) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(offsets.len() - 1);
    for w in offsets.windows(2) {
        let (head, rest) = buf.split_at_mut((w[1] - w[0]) * width);
        parts.push(head);
        buf = rest;
    }
    parts
}

/// `f(e, part)` for each expert's part, in parallel when there are many experts per thread
/// (each multiply then runs on one thread).
pub(super) fn for_experts<T: Send>(parts: Vec<T>, f: impl Fn(usize, T) + Sync) {
    if parts.len() >= 2 * rayon::current_num_threads() && rayon::current_num_threads() > 1 {
        parts.into_par_iter().enumerate().for_each(|(e, p)| f(e, p));
    } else {
        parts.into_iter().enumerate().for_each(|(e, p)| f(e, p));
    }
}
