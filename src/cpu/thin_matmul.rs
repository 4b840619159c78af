//! `y = x W` for a few rows of `x` (decoding one or a few tokens a step; an expert's share of a
//! short batch), reading `W` once, in place, at the speed of memory.
//!
//! With `m` rows a matmul does `2 m k n` flops on `k n` weights: at small `m` it is bound by
//! reading `W`. A general GEMM (the `gemm` crate under Burn's flex backend) packs panels of `W`
//! into a buffer before its microkernel; at one to a few rows that costs more than the
//! arithmetic (perf: 75% of a batch-1 decode step of switch-base-8 was inside `gemm`; this
//! kernel runs those products 2-2.5x faster). Here `W` is read where it lies, in blocks of
//! [`KB`] rows (as many sequential streams as the prefetchers follow); an `R x C`-vector tile
//! of `y` stays in registers while a block passes. The product is cut into pieces by row
//! blocks of `W` or wide column ranges, decided by the shape alone ([`split`]), and the
//! partial sums are added in a fixed order: results do not depend on the thread count.
//! From [`COLUMN_ROWS`] rows on (an expert's share of a batch, a short input through the
//! encoder) each element of `W` feeds enough multiply-adds that the arithmetic, not the
//! reading, sets the pace: there the pieces are narrow column ranges over the whole of `k`,
//! whose outputs stay in cache from one block to the next and need no partial sums.
//!
//! Weights are f32 or bf16 (widened to f32 in registers: a bf16 is the top half of an f32), so
//! a bf16 model reads half the bytes and computes `x * w` exactly for its rounded weights.
//! Vector code comes from one body per instruction set ([`Isa`]): 16 lanes with a 4 x 4 tile
//! (AVX-512), 8 lanes with 4 x 2 (AVX2, 16 registers), and a portable loop that also takes the
//! columns past the last full vector.

use rayon::prelude::*;

use super::isa::Isa;

mod transposed;

pub(crate) use transposed::thin_matmul_t_host;

/// Rows of `W` per block while streaming it (fewer than [`COLUMN_ROWS`] rows of `x`): the
/// number of sequential streams read side by side. With the next block prefetched into L2,
/// on a 2-core AMD EPYC with AVX-512 (`thin_matmul_host` timed alone over 400 MB of distinct
/// weights) one-row products of 768 x 3072 streamed at 27-44 GB/s, where 16-row blocks
/// prefetched into L1 streamed at 19-22 (`switch bench --bandwidth`: 31-55 GB/s that day).
const KB: usize = 8;

/// Rows of `W` per block from [`COLUMN_ROWS`] rows of `x` on (the product is compute-bound
/// there, and cut by columns unless it is small; a longer block loads and stores the register
/// tile half as often).
const KB_COLUMNS: usize = 16;

/// Rows of `y` per register tile (`x` is padded with zero rows to a multiple of it; below it,
/// tiles of one row).
const R: usize = 4;

/// Multiply-adds below which one thread does the whole product.
const PARALLEL_MIN: usize = 1 << 18;

/// Bytes of weights above which the kernels prefetch the next block's rows.
const PREFETCH_MIN_BYTES: usize = 1 << 20;

/// Fewest columns in a piece of the product split over threads (16 KiB of f32 per row).
const MIN_COLUMNS: usize = 4096;

/// Pieces of the product when its columns do not split.
const K_PARTS: usize = 8;

/// Rows of `x` from which the pieces are column ranges of [`COLUMN_WIDTH`] over the whole of
/// `k` (two register tiles: 8 multiply-adds per weight read). On a 2-core AMD EPYC with
/// AVX-512, against row blocks with partial sums (`thin_matmul_host` timed alone, weights in
/// cache, best of 40): 8 x 768 x 3072 599 -> 307 us, 64 x 768 x 3072 2282 -> 1757 us, 8 x
/// 3072 x 768 387 -> 243 us; the switch-base-8-shaped encoder at batch 1 (64 tokens, `switch
/// seq2seq --bench`) 537 -> 625 tokens/s.
const COLUMN_ROWS: usize = 2 * R;

/// Columns of a piece cut by columns only: its `[rows, 192]` outputs stay in cache from one
/// block of `W` to the next (192 beat 128 and an L1-sized width on the encoder above).
const COLUMN_WIDTH: usize = 192;

/// The weights `W` `[k, n]`, row-major.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weights<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values as their bits.
    Bf16(&'a [u16]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }
}

/// The `m` rows (of `width` values each) of `a` padded with zero rows to whole tiles of `R`
/// rows, and the padded row count. Fewer rows than a tile stay as they are (one-row tiles,
/// each reading its block of `W` from L1 again), so that a single row does not pay for `R`.
fn padded_to_tiles(a: &[f32], m: usize, width: usize) -> (std::borrow::Cow<'_, [f32]>, usize) {
    let rows = if m < R { m } else { m.div_ceil(R) * R };
    if rows == m {
        return (a.into(), rows);
    }
    let mut padded = a.to_vec();
    padded.resize(rows * width, 0.0);
    (padded.into(), rows)
}

/// `x W` for `x` `[m, k]` and `W` `[k, n]`, row-major, on `isa` (at most what the CPU has:
/// anything higher panics, so callers pass [`Isa::selected`] or one of [`Isa::available`]).
pub(crate) fn thin_matmul_host(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights,
    n: usize,
) -> Vec<f32> {
    assert!(isa <= Isa::detected(), "{isa:?} asked of a CPU without it");
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), k * n, "W is not [k, n]");
    let (xp, rows) = padded_to_tiles(x, m, k);
    // The portable loop takes 16-column pieces too, so that it is split over threads alike.
    let (lanes, tile) = match isa {
        Isa::Avx512 => (16, 4),
        Isa::Avx2 => (8, 2),
        Isa::Portable => (16, 1),
    };
    let kb = if m >= COLUMN_ROWS { KB_COLUMNS } else { KB };
    let run = |&Part { k0, k1, j0, width }: &Part, out: &mut [f32]| {
        let vector = width % lanes == 0 && isa != Isa::Portable;
        // SAFETY: `isa` is at most what the CPU has (asserted above); every kernel reads
        // `W[k0..k1, j0..j0 + width]` (inside `w`: `k1 <= k`, `j0 + width <= n`), `x`
        // `[rows, k]` and writes `out` `[rows, width]`, `rows % R == 0`, `width % lanes == 0`.
        unsafe {
            match (isa, w) {
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, Weights::F32(w)) if vector => {
                    x86::avx512_f32(&xp, k, w.as_ptr(), n, k0, k1, kb, j0, width, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, Weights::Bf16(w)) if vector => {
                    x86::avx512_bf16(&xp, k, w.as_ptr(), n, k0, k1, kb, j0, width, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, Weights::F32(w)) if vector => {
                    x86::avx2_f32(&xp, k, w.as_ptr(), n, k0, k1, kb, j0, width, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, Weights::Bf16(w)) if vector => {
                    x86::avx2_bf16(&xp, k, w.as_ptr(), n, k0, k1, kb, j0, width, out)
                }
                (_, Weights::F32(w)) => portable(&xp, k, w, |v| v, n, k0..k1, j0, width, out),
                (_, Weights::Bf16(w)) => portable(&xp, k, w, widen_bf16, n, k0..k1, j0, width, out),
            }
        }
    };
    let parts = split(m, k, n, lanes, tile);
    match parts[..] {
        // Nothing to add up (`k` or `n` is 0).
        [] => return vec![0.0f32; m * n],
        // One piece (a small product in whole vectors): straight into the result.
        [whole] => {
            let mut y = vec![0.0f32; rows * n];
            run(&whole, &mut y);
            y.truncate(m * n);
            return y;
        }
        _ => {}
    }
    let block = |p: &Part| {
        let mut out = vec![0.0f32; rows * p.width];
        run(p, &mut out);
        out
    };
    let blocks: Vec<Vec<f32>> = if m * k * n >= PARALLEL_MIN {
        parts.par_iter().map(block).collect()
    } else {
        parts.iter().map(block).collect()
    };
    // Partial sums over `k` added in the order of their rows: the same for any thread count.
    let mut y = vec![0.0f32; m * n];
    for (p, out) in parts.iter().zip(&blocks) {
        for r in 0..m {
            let dst = &mut y[r * n + p.j0..r * n + p.j0 + p.width];
            let src = &out[r * p.width..(r + 1) * p.width];
            if p.k0 == 0 {
                dst.copy_from_slice(src);
            } else {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        }
    }
    y
}

/// One piece of the product: rows `k0..k1` of `W` and its columns `j0..j0 + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    k0: usize,
    k1: usize,
    j0: usize,
    width: usize,
}

/// The pieces of a product, decided by its shape alone (never by the thread count, so that
/// results do not depend on it), in the order their partial sums are added: columns in
/// ranges of at least [`MIN_COLUMNS`] (each row of a piece is one stretch of memory that the
/// prefetchers follow), and with few columns rows in up to [`K_PARTS`] blocks (each a
/// contiguous region of `W`) so that every thread has work; from [`COLUMN_ROWS`] rows,
/// columns in ranges of about [`COLUMN_WIDTH`] over all of `k`. Columns past the last full
/// vector come last, as a piece of their own (the portable loop takes it).
fn split(m: usize, k: usize, n: usize, lanes: usize, tile: usize) -> Vec<Part> {
    let vectors = n / lanes;
    let mut parts = Vec::new();
    let small = m * k * n < PARALLEL_MIN;
    let by_columns = !small && m >= COLUMN_ROWS;
    let col_parts = if small {
        1
    } else if by_columns {
        (vectors * lanes).div_ceil(COLUMN_WIDTH).max(1)
    } else {
        (vectors * lanes / MIN_COLUMNS).max(1)
    };
    let k_parts = if small || by_columns {
        1
    } else {
        (K_PARTS / col_parts).clamp(1, K_PARTS).min(k.div_ceil(KB))
    };
    let k_per = k.div_ceil(k_parts).next_multiple_of(KB);
    let v_per = vectors.div_ceil(col_parts).next_multiple_of(tile).max(tile);
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + k_per).min(k);
        let mut v = 0;
        while v < vectors {
            let width = v_per.min(vectors - v) * lanes;
            parts.push(Part {
                k0,
                k1,
                j0: v * lanes,
                width,
            });
            v += v_per;
        }
        if vectors * lanes < n {
            parts.push(Part {
                k0,
                k1,
                j0: vectors * lanes,
                width: n - vectors * lanes,
            });
        }
        k0 = k1;
    }
    parts
}

/// A bf16's bits widened to the f32 it stands for.
fn widen_bf16(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

/// The same product in plain loops: rows `ks` of `W`, columns `j0..j0 + width`, into `out`
/// `[rows, width]`.
#[allow(clippy::too_many_arguments)]
fn portable<T: Copy>(
    x: &[f32],
    k: usize,
    w: &[T],
    widen: impl Fn(T) -> f32,
    n: usize,
    ks: std::ops::Range<usize>,
    j0: usize,
    width: usize,
    out: &mut [f32],
) {
    let rows = out.len() / width.max(1);
    let mut row = vec![0.0f32; width];
    for kk in ks {
        for (o, &v) in row.iter_mut().zip(&w[kk * n + j0..kk * n + j0 + width]) {
            *o = widen(v);
        }
        for r in 0..rows {
            let xv = x[r * k + kk];
            for (o, &v) in out[r * width..(r + 1) * width].iter_mut().zip(&row) {
                *o += xv * v;
            }
        }
    }
}

/// One vector kernel: `$name(x, k, w, n, k_lo, k_hi, kb, j0, width, out)` over rows
/// `k_lo..k_hi` of `W` in blocks of `kb` rows and its columns `j0..j0 + width` with
/// `$lanes`-wide vectors, tiles of `R` rows (or one row, when the rows are not a multiple of
/// `R`) x `$tile` vectors and a one-vector tile for the rest; `$loadw` reads one vector of
/// weights (f32 or bf16) from a pointer.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($name:ident, $feature:literal, $wt:ty, $lanes:literal, $tile:literal,
     $zero:path, $loadw:path, $loadx:path, $store:path, $fma:path, $splat:path) => {
        #[target_feature(enable = $feature)]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $name(
            x: &[f32],
            k: usize,
            w: *const $wt,
            n: usize,
            k_lo: usize,
            k_hi: usize,
            kb: usize,
            j0: usize,
            width: usize,
            out: &mut [f32],
        ) {
            let rows = out.len() / width;
            let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
            // Weights that fit in L2 are likely there already (a small model's every step):
            // prefetching them would only take load slots.
            let prefetch = k * n * std::mem::size_of::<$wt>() > PREFETCH_MIN_BYTES;
            let ahead = kb * n;
            let mut k0 = k_lo;
            while k0 < k_hi {
                let k1 = (k0 + kb).min(k_hi);
                let mut j = 0;
                while j < width {
                    let whole = width - j >= $tile * $lanes;
                    match (rows % R == 0, whole) {
                        (true, true) => kernel!(@tile 4, $tile, $lanes, $zero, $loadw, $loadx,
                            $store, $fma, $splat, prefetch, ahead, xp, op, w, k, n, j0, j, width, rows, k0, k1),
                        (true, false) => kernel!(@tile 4, 1, $lanes, $zero, $loadw, $loadx,
                            $store, $fma, $splat, prefetch, ahead, xp, op, w, k, n, j0, j, width, rows, k0, k1),
                        (false, true) => kernel!(@tile 1, $tile, $lanes, $zero, $loadw, $loadx,
                            $store, $fma, $splat, prefetch, ahead, xp, op, w, k, n, j0, j, width, rows, k0, k1),
                        (false, false) => kernel!(@tile 1, 1, $lanes, $zero, $loadw, $loadx,
                            $store, $fma, $splat, prefetch, ahead, xp, op, w, k, n, j0, j, width, rows, k0, k1),
                    }
                    j += if whole { $tile * $lanes } else { $lanes };
                }
                k0 = k1;
            }
        }
    };
    (@tile $r:literal, $c:literal, $lanes:literal, $zero:path, $loadw:path, $loadx:path, $store:path,
     $fma:path, $splat:path, $prefetch:ident, $ahead:ident, $xp:ident, $op:ident, $w:ident, $k:ident, $n:ident, $j0:ident,
     $j:ident, $width:ident, $rows:ident, $k0:ident, $k1:ident) => {{
        let mut r0 = 0;
        while r0 < $rows {
            // SAFETY (for the block): the caller's bounds (see `thin_matmul_host`).
            unsafe {
                let mut acc = [[$zero(); $c]; $r];
                for (r, a) in acc.iter_mut().enumerate() {
                    for (c, v) in a.iter_mut().enumerate() {
                        *v = $loadx($op.add((r0 + r) * $width + $j + c * $lanes));
                    }
                }
                for kk in $k0..$k1 {
                    let mut wv = [$zero(); $c];
                    for (c, v) in wv.iter_mut().enumerate() {
                        let at = kk * $n + $j0 + $j + c * $lanes;
                        *v = $loadw($w.add(at));
                        if $prefetch && r0 == 0 {
                            // The same columns one block further down, into L2: the next block
                            // reads them (a wrapping address past `W` is only a hint, never
                            // read).
                            _mm_prefetch::<_MM_HINT_T1>($w.wrapping_add(at + $ahead) as *const i8);
                        }
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xb = $splat(*$xp.add((r0 + r) * $k + kk));
                        for (c, v) in a.iter_mut().enumerate() {
                            *v = $fma(xb, wv[c], *v);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    for (c, v) in a.iter().enumerate() {
                        $store($op.add((r0 + r) * $width + $j + c * $lanes), *v);
                    }
                }
            }
            r0 += $r;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PREFETCH_MIN_BYTES, R};

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_bf16(p: *const u16) -> __m512 {
        // SAFETY: the caller's pointer covers 16 values.
        let bits = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8_bf16(p: *const u16) -> __m256 {
        // SAFETY: the caller's pointer covers 8 values.
        let bits = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
    }

    kernel!(
        avx512_f32,
        "avx512f",
        f32,
        16,
        4,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_set1_ps
    );
    kernel!(
        avx512_bf16,
        "avx512f",
        u16,
        16,
        4,
        _mm512_setzero_ps,
        load16_bf16,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_set1_ps
    );
    kernel!(
        avx2_f32,
        "avx2,fma",
        f32,
        8,
        2,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_set1_ps
    );
    kernel!(
        avx2_bf16,
        "avx2,fma",
        u16,
        8,
        2,
        _mm256_setzero_ps,
        load8_bf16,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_set1_ps
    );
}

#[cfg(test)]
mod tests;
