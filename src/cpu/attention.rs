//! Causal multi-head self-attention over `q`, `k`, `v` `[batch, seq, heads * d_k]` (head `h`
//! owns columns `h d_k ..`), as one autodiff node that works one (sequence, head) at a time,
//! reading the heads where they lie:
//!
//! ```text
//! forward:  S = scale q k^T (key j <= query i)   P = softmax(S) (0 above the diagonal)   o = P v
//! backward: dP = do v^T   dS = P (dP - rowsum(dP P)) scale
//!           dq = dS k     dk = dS^T q     dv = P^T do
//! ```
//!
//! Why: Burn runs this as batched matmuls of one tiny product per (sequence, head) plus copies
//! that split and merge the heads; at the reference configuration gemm ran each 64 x 32 x 64
//! product with its backward at about 20 GFLOP/s (`switch bench --matmuls 64x32x64`). Here
//! each product is a loop of register tiles (`R` rows by one or two vectors of columns), over
//! only the causal triangle, with the softmax and its backward in between, compiled for
//! AVX-512, AVX2 or neither ([`Isa::selected`]). Timed alone on the reference configuration's
//! shape (`[32, 64, 128]`, 4 heads, forward and backward, 2 threads of a 2-core AMD EPYC with
//! AVX-512): 6.9-8.4 ms for Burn's composition, 2.4-3.3 ms here (medians of two runs of 55).
//!
//! Work is split over threads by sequence: results do not depend on the thread count.

use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, Tensor};
use rayon::prelude::*;

use super::simd::vectorized;
use super::softmax::{softmax_row, softmax_row_backward};
use super::{Isa, Kernel, flex_input, new_tensor, run_kernel, values};

/// Rows of a register tile.
const R: usize = 4;

/// Multiply-adds (`b * s * s * d`, about twice the causal work) below which one thread runs the
/// whole op.
const PARALLEL_MIN: usize = 1 << 20;

/// The kernel's `softmax(scale q k^T + causal) v` per head, heads concatenated, or `None`
/// where it does not apply (not f32 on the CPU backend, shapes that differ, `heads` not
/// dividing the width, a scale that is not positive).
pub(crate) fn causal_attention(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
    scale: f64,
) -> Option<Tensor<3>> {
    let [b, s, d] = q.dims();
    if k.dims() != [b, s, d] || v.dims() != [b, s, d] || heads == 0 || d % heads != 0 {
        return None;
    }
    if scale.is_nan() || scale <= 0.0 || b * s * d == 0 {
        return None;
    }
    let dims = Dims {
        b,
        s,
        h: heads,
        dk: d / heads,
        scale: scale as f32,
        isa: Isa::selected(),
    };
    run_kernel(
        Kernel::CausalAttention(dims.isa),
        CausalAttention,
        [flex_input(q), flex_input(k), flex_input(v)],
        |[q, k, v]| {
            let (o, p) = forward(&values(&q), &values(&k), &values(&v), dims);
            let o = new_tensor(o, Shape::new([b, s, d]));
            (o, State { q, k, v, p, dims })
        },
    )
}

/// The shape of one call and how to compute it.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    s: usize,
    h: usize,
    dk: usize,
    scale: f32,
    isa: Isa,
}

impl Dims {
    fn d(&self) -> usize {
        self.h * self.dk
    }

    fn parallel(&self) -> bool {
        self.b > 1 && self.b * self.s * self.s * self.d() >= PARALLEL_MIN
    }
}

/// `o` `[b, s, d]` and the attention weights `P` `[b, h, s, s]`.
fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, s, h, .. } = dims;
    let d = dims.d();
    let (mut o, mut p) = (vec![0.0f32; b * s * d], vec![0.0f32; b * h * s * s]);
    let sequence = |(n, (o, p)): (usize, (&mut [f32], &mut [f32]))| {
        let rows = n * s * d..(n + 1) * s * d;
        let (q, k, v) = (&q[rows.clone()], &k[rows.clone()], &v[rows]);
        let mut scratch = vec![0.0f32; dims.dk * s];
        for (head, p) in p.chunks_mut(s * s).enumerate() {
            let c = head * dims.dk;
            let head = Head {
                q: &q[c..],
                k: &k[c..],
                v: &v[c..],
                dims,
            };
            let o = &mut o[c..];
            vectorized(
                dims.isa,
                #[inline(always)]
                || forward_head(head, p, o, &mut scratch),
            );
        }
    };
    if dims.parallel() {
        let chunks = o.par_chunks_mut(s * d).zip(p.par_chunks_mut(h * s * s));
        chunks.enumerate().for_each(sequence);
    } else {
        let chunks = o.chunks_mut(s * d).zip(p.chunks_mut(h * s * s));
        chunks.enumerate().for_each(sequence);
    }
    (o, p)
}

#[derive(Debug)]
struct CausalAttention;

/// The inputs, the attention weights `P` and the shape.
#[derive(Debug, Clone)]
struct State {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    p: Vec<f32>,
    dims: Dims,
}

impl Backward<Flex, 3> for CausalAttention {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State { q, k, v, p, dims } = ops.state;
        let g = grads.consume::<Flex>(&ops.node);
        let shape = q.layout().shape().clone();
        let (q, k, v, g) = (values(&q), values(&k), values(&v), values(&g));
        let dqkv = backward(&q, &k, &v, &g, &p, dims);
        for (parent, grad) in ops.parents.into_iter().zip(dqkv) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, new_tensor(grad, shape.clone()));
            }
        }
    }
}

/// `dq`, `dk` and `dv` `[b, s, d]` from the output's gradient `g`.
fn backward(q: &[f32], k: &[f32], v: &[f32], g: &[f32], p: &[f32], dims: Dims) -> [Vec<f32>; 3] {
    let Dims { b, s, h, dk: w, .. } = dims;
    let d = dims.d();
    let mut out = [0; 3].map(|_| vec![0.0f32; b * s * d]);
    type Grads<'a> = ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]);
    let sequence = |(n, ((dq, dk), dv)): (usize, Grads)| {
        let rows = n * s * d..(n + 1) * s * d;
        let (q, k, v, g) = (
            &q[rows.clone()],
            &k[rows.clone()],
            &v[rows.clone()],
            &g[rows],
        );
        let p = &p[n * h * s * s..(n + 1) * h * s * s];
        let mut scratch = Scratch {
            vt: vec![0.0f32; w * s],
            ds: vec![0.0f32; s * s],
        };
        for (head_index, p) in p.chunks(s * s).enumerate() {
            let c = head_index * w;
            let head = Head {
                q: &q[c..],
                k: &k[c..],
                v: &v[c..],
                dims,
            };
            let grads = [&mut dq[c..], &mut dk[c..], &mut dv[c..]];
            let g = &g[c..];
            vectorized(
                dims.isa,
                #[inline(always)]
                || backward_head(head, g, p, grads, &mut scratch),
            );
        }
    };
    let [dq, dk, dv] = &mut out;
    if dims.parallel() {
        let chunks = dq.par_chunks_mut(s * d).zip(dk.par_chunks_mut(s * d));
        let chunks = chunks.zip(dv.par_chunks_mut(s * d));
        chunks.enumerate().for_each(sequence);
    } else {
        let chunks = dq.chunks_mut(s * d).zip(dk.chunks_mut(s * d));
        let chunks = chunks.zip(dv.chunks_mut(s * d));
        chunks.enumerate().for_each(sequence);
    }
    out
}

/// `q`, `k` and `v` of one (sequence, head): rows of `d_k` values, `d` apart.
#[derive(Clone, Copy)]
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dims: Dims,
}

/// One head forward: `p` `[s, s]` gets `P`, `o`'s rows (`d` apart) get `P v`. `kt`: `d_k * s`
/// values of scratch.
#[inline(always)]
fn forward_head(Head { q, k, v, dims }: Head, p: &mut [f32], o: &mut [f32], kt: &mut [f32]) {
    let (s, dk, d) = (dims.s, dims.dk, dims.d());
    transpose(k, d, s, dk, kt);
    // S = q k^T (keys up to each row block's last query; the softmax zeroes those ahead).
    mm(
        dims.isa,
        A::Rows(q, d),
        (kt, s),
        (p, s),
        s,
        Cols::Causal(s),
        Inner::All(dk),
    );
    for (i, row) in p.chunks_mut(s).enumerate() {
        softmax_row(row, i, dims.scale);
    }
    // o = P v.
    mm(
        dims.isa,
        A::Rows(p, s),
        (v, d),
        (o, d),
        s,
        Cols::All(dk),
        Inner::UpToRow,
    );
}

/// One head backward, from `g` (the output's gradient, rows `d` apart) and `p`: `dq`, `dk`,
/// `dv`'s rows (`d` apart).
#[inline(always)]
fn backward_head(
    Head { q, k, v, dims }: Head,
    g: &[f32],
    p: &[f32],
    [dq, dk, dv]: [&mut [f32]; 3],
    scratch: &mut Scratch,
) {
    let (s, w, d) = (dims.s, dims.dk, dims.d());
    let Scratch { vt, ds } = scratch;
    transpose(v, d, s, w, vt);
    // dP = do v^T into `ds`, then dS in place.
    mm(
        dims.isa,
        A::Rows(g, d),
        (vt, s),
        (ds, s),
        s,
        Cols::Causal(s),
        Inner::All(w),
    );
    for (i, (ds, p)) in ds.chunks_mut(s).zip(p.chunks(s)).enumerate() {
        softmax_row_backward(ds, p, i, dims.scale);
    }
    // dq = dS k.
    mm(
        dims.isa,
        A::Rows(ds, s),
        (k, d),
        (dq, d),
        s,
        Cols::All(w),
        Inner::UpToRow,
    );
    // dk = dS^T q (dS read down its columns).
    mm(
        dims.isa,
        A::Columns(ds, s),
        (q, d),
        (dk, d),
        s,
        Cols::All(w),
        Inner::FromRow(s),
    );
    // dv = P^T do.
    mm(
        dims.isa,
        A::Columns(p, s),
        (g, d),
        (dv, d),
        s,
        Cols::All(w),
        Inner::FromRow(s),
    );
}

/// Per-sequence scratch of the backward.
struct Scratch {
    vt: Vec<f32>,
    ds: Vec<f32>,
}

/// `out[t * rows + i] = a[i * lda + t]` for `i < rows`, `t < cols` (written in order).
#[inline(always)]
fn transpose(a: &[f32], lda: usize, rows: usize, cols: usize, out: &mut [f32]) {
    for (t, out) in out[..rows * cols].chunks_exact_mut(rows).enumerate() {
        for (i, out) in out.iter_mut().enumerate() {
            *out = a[i * lda + t];
        }
    }
}

/// Which columns of a row block [`mm`] computes.
#[derive(Clone, Copy)]
enum Cols {
    /// All `n`.
    All(usize),
    /// Those up to the block's last row (the causal triangle), rounded up to whole vectors and
    /// at most `n`: the columns past a row's diagonal are computed and left to the caller.
    Causal(usize),
}

/// Which terms of the sum [`mm`] adds for a row block starting at row `i0`.
#[derive(Clone, Copy)]
enum Inner {
    /// `t < n`.
    All(usize),
    /// `t` up to the block's last row (`a` is 0 above its diagonal).
    UpToRow,
    /// `i0 <= t < n` (`a` is 0 below its diagonal).
    FromRow(usize),
}

/// The left factor of [`mm`]: `a[i][t]` at `data[i ld + t]` (`Rows`) or at `data[t ld + i]`
/// (`Columns`: the transpose of a row-major matrix, read in place).
#[derive(Clone, Copy)]
enum A<'a> {
    Rows(&'a [f32], usize),
    Columns(&'a [f32], usize),
}

impl<'a> A<'a> {
    /// The same matrix from row `i0` on.
    fn at_row(self, i0: usize) -> A<'a> {
        match self {
            A::Rows(a, ld) => A::Rows(&a[i0 * ld..], ld),
            A::Columns(a, ld) => A::Columns(&a[i0..], ld),
        }
    }

    /// Whether `a[r][t]` is in bounds for `r < rows` and `t < terms`.
    fn holds(self, rows: usize, terms: usize) -> bool {
        match self {
            A::Rows(a, ld) => (rows - 1) * ld + terms <= a.len(),
            A::Columns(a, ld) => (terms - 1) * ld + rows <= a.len(),
        }
    }

    fn get(self, r: usize, t: usize) -> f32 {
        match self {
            A::Rows(a, ld) => a[r * ld + t],
            A::Columns(a, ld) => a[t * ld + r],
        }
    }
}

/// `c[i ldc + j] = sum_t a[i][t] b[t ldb + j]` for `i < rows` and the columns and terms that
/// `cols` and `inner` name, in register tiles of `R` rows (then single rows) by two, then one
/// vector of columns, then columns one by one.
fn mm(
    isa: Isa,
    a: A,
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
    rows: usize,
    cols: Cols,
    inner: Inner,
) {
    let lanes = lanes(isa);
    let mut i0 = 0;
    while i0 < rows {
        let rb = if rows - i0 >= R { R } else { 1 };
        let n = match cols {
            Cols::All(n) => n,
            Cols::Causal(n) => (i0 + rb).next_multiple_of(lanes).min(n),
        };
        let ts = match inner {
            Inner::All(n) => 0..n,
            Inner::UpToRow => 0..i0 + rb,
            Inner::FromRow(n) => i0..n,
        };
        let (a, c) = (a.at_row(i0), &mut c[i0 * ldc..]);
        if rb == R {
            row_block::<R>(isa, a, b, ldb, ts, n, c, ldc);
        } else {
            row_block::<1>(isa, a, b, ldb, ts, n, c, ldc);
        }
        i0 += rb;
    }
}

/// f32 lanes of a vector of `isa`'s tiles (the portable tile takes 16 too).
fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 => 8,
        _ => 16,
    }
}

/// Columns `0..n` of `RB` rows.
#[allow(clippy::too_many_arguments)]
fn row_block<const RB: usize>(
    isa: Isa,
    a: A,
    b: &[f32],
    ldb: usize,
    ts: Range<usize>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let lanes = lanes(isa);
    let mut j = 0;
    while j + 2 * lanes <= n {
        tile::<RB, 2>(isa, a, b, ldb, ts.clone(), j, c, ldc);
        j += 2 * lanes;
    }
    if j + lanes <= n {
        tile::<RB, 1>(isa, a, b, ldb, ts.clone(), j, c, ldc);
        j += lanes;
    }
    for r in 0..RB {
        for jj in j..n {
            let mut sum = 0.0f32;
            for t in ts.clone() {
                sum += a.get(r, t) * b[t * ldb + jj];
            }
            c[r * ldc + jj] = sum;
        }
    }
}

/// One register tile on `isa` (at most what the CPU has): `RB` rows by `NV` vectors of
/// columns from column `j`, `c[r ldc + j..] = sum_{t in ts} a[r][t] b[t ldb + j..]`.
#[allow(clippy::too_many_arguments)]
fn tile<const RB: usize, const NV: usize>(
    isa: Isa,
    a: A,
    b: &[f32],
    ldb: usize,
    ts: Range<usize>,
    j: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let width = NV * lanes(isa);
    if ts.start < ts.end {
        // The bounds the vector code relies on.
        assert!(a.holds(RB, ts.end), "a is too short");
        assert!((ts.end - 1) * ldb + j + width <= b.len(), "b is too short");
    }
    assert!((RB - 1) * ldc + j + width <= c.len(), "c is too short");
    assert!(isa <= Isa::detected(), "{isa:?} asked of a CPU without it");
    let (data, ld, columns) = match a {
        A::Rows(a, ld) => (a, ld, false),
        A::Columns(a, ld) => (a, ld, true),
    };
    // SAFETY: the CPU has `isa` and the reads and writes are in bounds (asserted above).
    unsafe {
        match (isa, columns) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, false) => {
                x86::tile_avx512::<RB, NV, false>(data, ld, b, ldb, ts, j, c, ldc)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, true) => {
                x86::tile_avx512::<RB, NV, true>(data, ld, b, ldb, ts, j, c, ldc)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, false) => x86::tile_avx2::<RB, NV, false>(data, ld, b, ldb, ts, j, c, ldc),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true) => x86::tile_avx2::<RB, NV, true>(data, ld, b, ldb, ts, j, c, ldc),
            _ => portable_tile::<RB, NV>(a, b, ldb, ts, j, c, ldc),
        }
    }
}

/// The tile in plain loops, 16 columns a vector.
fn portable_tile<const RB: usize, const NV: usize>(
    a: A,
    b: &[f32],
    ldb: usize,
    ts: Range<usize>,
    j: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let mut acc = [[[0.0f32; 16]; NV]; RB];
    for t in ts {
        let row = &b[t * ldb + j..t * ldb + j + NV * 16];
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = a.get(r, t);
            for (acc, bv) in acc.iter_mut().zip(row.chunks_exact(16)) {
                for (acc, &bv) in acc.iter_mut().zip(bv) {
                    *acc += x * bv;
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, acc) in acc.iter().enumerate() {
            let at = r * ldc + j + v * 16;
            c[at..at + 16].copy_from_slice(acc);
        }
    }
}

/// The tile in one instruction set's vectors (`$lanes` f32 each), its accumulators in
/// registers.
#[cfg(target_arch = "x86_64")]
macro_rules! vector_tile {
    ($name:ident, $feature:literal, $lanes:literal, $zero:ident, $set1:ident, $load:ident,
     $store:ident, $fma:ident) => {
        /// # Safety
        /// The CPU has the instruction set; `a[r][t]` (at `a[r lda + t]`, or `a[t lda + r]`
        /// with `COLUMNS`) for `t` in `ts`, `b[t ldb + j..]` for `NV` vectors and
        /// `c[r ldc + j..]` for `NV` vectors are in bounds.
        #[target_feature(enable = $feature)]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $name<const RB: usize, const NV: usize, const COLUMNS: bool>(
            a: &[f32],
            lda: usize,
            b: &[f32],
            ldb: usize,
            ts: Range<usize>,
            j: usize,
            c: &mut [f32],
            ldc: usize,
        ) {
            // SAFETY: as the caller promises.
            unsafe {
                let mut acc = [[$zero(); NV]; RB];
                for t in ts {
                    let bp = b.as_ptr().add(t * ldb + j);
                    let mut bv = [$zero(); NV];
                    for v in 0..NV {
                        bv[v] = $load(bp.add(v * $lanes));
                    }
                    for r in 0..RB {
                        let at = if COLUMNS { t * lda + r } else { r * lda + t };
                        let x = $set1(*a.get_unchecked(at));
                        for v in 0..NV {
                            acc[r][v] = $fma(x, bv[v], acc[r][v]);
                        }
                    }
                }
                let cp = c.as_mut_ptr();
                for r in 0..RB {
                    for v in 0..NV {
                        $store(cp.add(r * ldc + j + v * $lanes), acc[r][v]);
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    vector_tile!(
        tile_avx512,
        "avx512f",
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps
    );
    vector_tile!(
        tile_avx2,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values as values;

    /// Attention forward and backward in f64, the obvious way: `(o, dq, dk, dv)`.
    fn reference(
        [q, k, v, g]: [&[f32]; 4],
        (b, s, h, dk): (usize, usize, usize, usize),
        scale: f64,
    ) -> [Vec<f64>; 4] {
        let d = h * dk;
        let at = |n: usize, i: usize, c: usize| n * s * d + i * d + c;
        let mut out = [0; 4].map(|_| vec![0.0f64; b * s * d]);
        for n in 0..b {
            for head in 0..h {
                let c0 = head * dk;
                let dot = |x: &[f32], i: usize, y: &[f32], j: usize| -> f64 {
                    (0..dk)
                        .map(|c| x[at(n, i, c0 + c)] as f64 * y[at(n, j, c0 + c)] as f64)
                        .sum()
                };
                let mut p = vec![vec![0.0f64; s]; s];
                for (i, p) in p.iter_mut().enumerate() {
                    let sc: Vec<f64> = (0..=i).map(|j| scale * dot(q, i, k, j)).collect();
                    let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = sc.iter().map(|x| (x - max).exp()).sum();
                    for j in 0..=i {
                        p[j] = (sc[j] - max).exp() / sum;
                    }
                }
                let [o, dq, dkk, dv] = &mut out;
                for (i, p) in p.iter().enumerate() {
                    let dp: Vec<f64> = (0..=i).map(|j| dot(g, i, v, j)).collect();
                    let rowdot: f64 = (0..=i).map(|j| dp[j] * p[j]).sum();
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - rowdot) * scale;
                        for c in 0..dk {
                            let (ic, jc) = (at(n, i, c0 + c), at(n, j, c0 + c));
                            o[ic] += p[j] * v[jc] as f64;
                            dv[jc] += p[j] * g[ic] as f64;
                            dq[ic] += ds * k[jc] as f64;
                            dkk[jc] += ds * q[ic] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// Every instruction set this CPU has, on shapes with row blocks and single rows, whole
    /// and partial vectors of `d_k` columns, causal columns capped at `s`, one and several
    /// threads' worth of work: output and the three gradients within 1e-5 of f64 (relative to
    /// each one's largest magnitude).
    #[test]
    fn every_path_computes_attention_and_its_gradients() {
        for &(b, s, h, dk) in &[
            (1, 1, 1, 1),
            (2, 5, 3, 4),
            (1, 37, 2, 24),
            (2, 70, 1, 40),
            (3, 64, 4, 32),
            (4, 64, 4, 32), // above PARALLEL_MIN
        ] {
            let n = b * s * h * dk;
            let [q, k, v, g] = [1, 2, 3, 4].map(|seed| values(n, seed * 11 + s as u32));
            let scale = 1.0 / (dk as f64).sqrt();
            let want = reference([&q, &k, &v, &g], (b, s, h, dk), scale);
            for isa in Isa::available() {
                let dims = Dims {
                    b,
                    s,
                    h,
                    dk,
                    scale: scale as f32,
                    isa,
                };
                let (o, p) = forward(&q, &k, &v, dims);
                let [dq, dkk, dv] = backward(&q, &k, &v, &g, &p, dims);
                for (name, got, want) in [
                    ("o", &o, &want[0]),
                    ("dq", &dq, &want[1]),
                    ("dk", &dkk, &want[2]),
                    ("dv", &dv, &want[3]),
                ] {
                    let top = want.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
                    let err = got
                        .iter()
                        .zip(want.iter())
                        .map(|(&a, &b)| (a as f64 - b).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        err <= 1e-5 * top,
                        "{isa:?} b{b} s{s} h{h} dk{dk}: {name} off by {err:e} (largest {top:e})"
                    );
                }
                // Weights of later keys are exactly 0 and each row sums to 1.
                for (r, row) in p.chunks(s).enumerate() {
                    let i = r % s;
                    assert!(
                        row[i + 1..].iter().all(|&x| x == 0.0),
                        "row {r} looks ahead"
                    );
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                }
            }
        }
    }

    /// Results do not depend on the thread count.
    #[test]
    fn one_thread_and_the_pool_agree_exactly() {
        let (b, s, h, dk) = (4, 64, 4, 32);
        let n = b * s * h * dk;
        let [q, k, v, g] = [5, 6, 7, 8].map(|seed| values(n, seed));
        let dims = Dims {
            b,
            s,
            h,
            dk,
            scale: 0.2,
            isa: Isa::selected(),
        };
        assert!(dims.parallel());
        let run = || {
            let (o, p) = forward(&q, &k, &v, dims);
            (o, backward(&q, &k, &v, &g, &p, dims))
        };
        let pool = run();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert!(one.install(run) == pool);
    }
}
