//! `g W^T` for a few rows of `g` `[m, n]` and `W` `[k, n]`, row-major: the input gradient of
//! `y = x W` (`dx = dy W^T`) reading `W` along its rows, where it lies.
//!
//! Each output is a dot product of a row of `g` with a row of `W`. An `R x C` tile of them
//! accumulates in vector registers while `C` rows of `W` pass (read from memory once; `g`, a
//! few rows, stays in L2), and is summed across lanes at the end: `R + C` loads feed `R C`
//! multiply-adds, as in the forward kernel. gemm, handed `W^T` as a strided view, packs it
//! with strided reads for every product: on a 2-core AMD EPYC with AVX-512 it ran 8 x 3072 x
//! 768 (8 rows of `g` against a 768 x 3072 `W`) at 5 GFLOP/s and 32 rows at 19, a quarter of
//! its forward speed.
//!
//! The pieces handed to threads are ranges of rows of `W` (columns of the result), and each
//! output is computed whole, in one order, by one tile: results do not depend on the thread
//! count.

use rayon::prelude::*;

use super::{Isa, PARALLEL_MIN, padded_to_tiles};

/// Rows of `W` per piece of the product handed to a thread (a multiple of every tile's `C`).
const PIECE_ROWS: usize = 16;

/// `g W^T` (`[m, k]`) for `g` `[m, n]` and `W` `[k, n]` (f32, row-major), on `isa` (at most
/// what the CPU has: anything higher panics).
pub(crate) fn thin_matmul_t_host(
    isa: Isa,
    g: &[f32],
    m: usize,
    n: usize,
    w: &[f32],
    k: usize,
) -> Vec<f32> {
    assert!(isa <= Isa::detected(), "{isa:?} asked of a CPU without it");
    assert_eq!(g.len(), m * n, "g is not [m, n]");
    assert_eq!(w.len(), k * n, "W is not [k, n]");
    let (gp, rows) = padded_to_tiles(g, m, n);
    if rows == 0 || n == 0 || k == 0 {
        return vec![0.0f32; m * k];
    }
    // The result transposed, `[k, rows]`: a piece's outputs are one stretch of it.
    let mut out_t = vec![0.0f32; k * rows];
    let piece = |(p, out): (usize, &mut [f32])| {
        let r0 = p * PIECE_ROWS;
        let count = out.len() / rows;
        let wp = &w[r0 * n..(r0 + count) * n];
        // SAFETY: `isa` is at most what the CPU has (asserted above); the kernels read `gp`
        // `[rows, n]` and `wp` `[count, n]` and write `out` `[count, rows]`.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::avx512(&gp, rows, n, wp, count, out),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::avx2(&gp, rows, n, wp, count, out),
                _ => portable(&gp, rows, n, wp, count, out),
            }
        }
    };
    if m * k * n >= PARALLEL_MIN {
        out_t
            .par_chunks_mut(PIECE_ROWS * rows)
            .enumerate()
            .for_each(piece);
    } else {
        out_t
            .chunks_mut(PIECE_ROWS * rows)
            .enumerate()
            .for_each(piece);
    }
    let mut y = vec![0.0f32; m * k];
    for (c, col) in out_t.chunks_exact(rows).enumerate() {
        for (i, &v) in col[..m].iter().enumerate() {
            y[i * k + c] = v;
        }
    }
    y
}

/// The same dot products in plain loops, in 16 interleaved partial sums (the vector paths'
/// order for 16 lanes).
fn portable(g: &[f32], rows: usize, n: usize, w: &[f32], count: usize, out: &mut [f32]) {
    for c in 0..count {
        let wr = &w[c * n..(c + 1) * n];
        for i in 0..rows {
            let gr = &g[i * n..(i + 1) * n];
            let mut lanes = [0.0f32; 16];
            let whole = n / 16 * 16;
            for (gc, wc) in gr[..whole]
                .chunks_exact(16)
                .zip(wr[..whole].chunks_exact(16))
            {
                for l in 0..16 {
                    lanes[l] = gc[l].mul_add(wc[l], lanes[l]);
                }
            }
            let tail: f32 = (whole..n).map(|j| gr[j] * wr[j]).sum();
            out[c * rows + i] = lanes.iter().sum::<f32>() + tail;
        }
    }
}

/// One vector kernel: `$name(g, rows, n, w, count, out)` with `out[c * rows + i] = g_i . w_c`
/// over `$lanes`-wide vectors, tiles of `R` rows of `g` (one when `rows` is not a multiple
/// of `R`) by `$c` rows of `W` (one for the last rows), the columns past the last whole
/// vector added one by one; `$sum` adds a vector's lanes.
#[cfg(target_arch = "x86_64")]
macro_rules! dot_kernel {
    ($name:ident, $feature:literal, $lanes:literal, $c:literal,
     $zero:path, $load:path, $fma:path, $sum:path) => {
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $name(
            g: &[f32],
            rows: usize,
            n: usize,
            w: &[f32],
            count: usize,
            out: &mut [f32],
        ) {
            let mut c0 = 0;
            while c0 < count {
                let whole_c = count - c0 >= $c;
                match (rows % R == 0, whole_c) {
                    (true, true) => dot_kernel!(@tile 4, $c, $lanes, $zero, $load, $fma, $sum, g, rows, n, w, c0, out),
                    (true, false) => dot_kernel!(@tile 4, 1, $lanes, $zero, $load, $fma, $sum, g, rows, n, w, c0, out),
                    (false, true) => dot_kernel!(@tile 1, $c, $lanes, $zero, $load, $fma, $sum, g, rows, n, w, c0, out),
                    (false, false) => dot_kernel!(@tile 1, 1, $lanes, $zero, $load, $fma, $sum, g, rows, n, w, c0, out),
                }
                c0 += if whole_c { $c } else { 1 };
            }
        }
    };
    (@tile $r:literal, $c:literal, $lanes:literal, $zero:path, $load:path, $fma:path, $sum:path,
     $g:ident, $rows:ident, $n:ident, $w:ident, $c0:ident, $out:ident) => {{
        let whole = $n / $lanes * $lanes;
        let (gp, wp) = ($g.as_ptr(), $w.as_ptr());
        let mut i0 = 0;
        while i0 < $rows {
            let mut acc = [[$zero(); $c]; $r];
            let mut j = 0;
            while j < whole {
                // SAFETY: `j + $lanes <= n`; rows `i0..i0 + $r` of `g` and `c0..c0 + $c` of
                // `W` exist (the tile choice above).
                unsafe {
                    let mut wv = [$zero(); $c];
                    for (c, v) in wv.iter_mut().enumerate() {
                        *v = $load(wp.add(($c0 + c) * $n + j));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let gv = $load(gp.add((i0 + r) * $n + j));
                        for (c, v) in a.iter_mut().enumerate() {
                            *v = $fma(gv, wv[c], *v);
                        }
                    }
                }
                j += $lanes;
            }
            for (r, a) in acc.iter().enumerate() {
                for (c, v) in a.iter().enumerate() {
                    let (gr, wr) = (&$g[(i0 + r) * $n..], &$w[($c0 + c) * $n..]);
                    let tail: f32 = (whole..$n).map(|j| gr[j] * wr[j]).sum();
                    $out[($c0 + c) * $rows + i0 + r] = $sum(*v) + tail;
                }
            }
            i0 += $r;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::R;

    /// The 8 lanes of `v` added.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    dot_kernel!(
        avx512,
        "avx512f",
        16,
        4,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    dot_kernel!(
        avx2,
        "avx2,fma",
        8,
        2,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        sum8
    );
}
