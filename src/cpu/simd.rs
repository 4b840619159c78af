//! Loops the compiler turns into vector code: 8-lane partial sums, a straight-line `exp` for
//! the softmax, and row blocks split over threads the same way for any thread count (so that
//! results do not depend on it).

use rayon::prelude::*;

use super::Isa;

/// Elements below which a kernel runs on the calling thread.
pub(super) const PARALLEL_MIN: usize = 1 << 15;

/// Rows per parallel task of the row-wise loops (LayerNorm, the experts' ReLU).
pub(super) const BLOCK_ROWS: usize = 32;

/// `f(first_element, block)` for each block of `block` elements of `out`, in parallel for
/// large outputs. Blocks are the same either way, so results do not depend on the threads.
pub(super) fn for_blocks<F>(out: &mut [f32], block: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(block)
            .enumerate()
            .for_each(|(b, o)| f(b * block, o));
    } else {
        for (b, o) in out.chunks_mut(block).enumerate() {
            f(b * block, o)
        }
    }
}

/// `f()` compiled for `isa`'s vectors: `f` is inlined into a function built for AVX-512 or
/// AVX2 (mark the closure `#[inline(always)]`), so that its loops, and the `#[inline(always)]`
/// helpers here, vectorise to that width instead of the build's baseline (SSE2 on x86-64).
/// `isa` must be at most what the CPU has ([`Isa::selected`]; anything higher panics).
#[inline(always)]
pub(super) fn vectorized<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    assert!(isa <= Isa::detected(), "{isa:?} asked of a CPU without it");
    match isa {
        // SAFETY: the CPU has AVX-512 F (asserted above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512(f) },
        // SAFETY: the CPU has AVX2 and FMA (asserted above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// `f()` built for AVX-512.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    /// `f()` built for AVX2 with FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// `sum_j f(a_j, b_j, c_j)` over slices of one length, in 8 interleaved partial sums that the
/// compiler vectorises (one running sum is a chain of dependent adds). Pass any slice for an
/// argument `f` ignores.
#[inline(always)]
pub fn sum_lanes(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let n = a.len();
    let (b, c) = (&b[..n], &c[..n]);
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail: f32 = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .map(|((&a, &b), &c)| f(a, b, c))
    .sum();
    let mut acc = [0.0f32; 8];
    for ((a, b), c) in ca.zip(cb).zip(cc) {
        let (a, b, c): (&[f32; 8], &[f32; 8], &[f32; 8]) = (
            a.try_into().unwrap(),
            b.try_into().unwrap(),
            c.try_into().unwrap(),
        );
        for k in 0..8 {
            acc[k] += f(a[k], b[k], c[k]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest of `x` (-inf for none; NaNs are skipped), in 16 interleaved partial maxima that
/// the compiler vectorises (a running maximum is a chain of dependent compares).
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    let mut acc = [f32::NEG_INFINITY; 16];
    for c in chunks {
        let c: &[f32; 16] = c.try_into().unwrap();
        for k in 0..16 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `e^x` for `x <= 0`, within 2 ulp of the true value (Cody-Waite reduction `x = n ln 2 + r`,
/// Cephes' degree-6 polynomial for `e^r`, `2^n` built in the exponent bits). Straight-line
/// code, so loops over it vectorise (libm's `expf` is one call per element). Below -87 it
/// returns about 1.6e-38 instead of underflowing further.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n sits in the low mantissa bits of t; n + 127 is the biased exponent of 2^n.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e_r * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_within_two_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        // 2 ulp of f32 = 2 * 2^-23 relative at most
        assert!(
            worst < 2.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
    }

    #[test]
    fn max_lanes_finds_the_largest() {
        assert_eq!(max_lanes(&[]), f32::NEG_INFINITY);
        for n in [1, 15, 16, 17, 40, 64] {
            for top in 0..n {
                let mut x: Vec<f32> = (0..n).map(|j| -((j * 7 % 13) as f32) - 1.0).collect();
                x[top] = 0.5;
                if n > 2 {
                    x[(top + 1) % n] = f32::NAN;
                }
                assert_eq!(max_lanes(&x), 0.5, "n = {n}, largest at {top}");
            }
        }
    }

    #[test]
    fn sum_lanes_adds_every_term() {
        for n in [0, 1, 7, 8, 9, 64, 129] {
            let a: Vec<f32> = (0..n).map(|j| j as f32).collect();
            let b: Vec<f32> = (0..n).map(|j| (j % 3) as f32).collect();
            let want: f64 = (0..n).map(|j| (j * (j % 3) + 1) as f64).sum();
            let got = sum_lanes(&a, &b, &a, |a, b, _| a * b + 1.0);
            assert_eq!(got as f64, want, "n = {n}");
        }
    }
}
