//! The Adam update and the gradient norm on the CPU backend, on the tensors' storage itself:
//! one fused pass per parameter (the tensor-op form is about 13 passes over memory), zipped
//! iterators that compile to vector code, and sums of squares accumulated in f64.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Tensor, TensorData};

use super::{Kernel, count};
use crate::util::written_by;

/// The sum of the squares of all of `grads` in f64, or `None` unless the fast path
/// [`applies`] to every one of them.
pub(crate) fn sum_of_squares(grads: &[Tensor<1>]) -> Option<f64> {
    if !grads.iter().all(super::applies) {
        return None;
    }
    let total = grads
        .iter()
        .map(|g| sum_squares(contiguous_f32(&flex(g.clone()))))
        .sum();
    Some(total)
}

/// Whether [`update`] applies to the flattened parameter `theta` and its gradient `g`.
pub(crate) fn applies(theta: &Tensor<1>, g: &Tensor<1>) -> bool {
    super::applies(theta) && super::applies(g)
}

/// One Adam update of the flattened parameter `theta` with gradient `g` and moments `m`, `v`
/// (host memory, updated in place): the new parameter values. Storage that no other tensor
/// shares is updated in place. Needs [`applies`].
pub(crate) fn update(
    theta: Tensor<1>,
    g: &Tensor<1>,
    m: &mut [f32],
    v: &mut [f32],
    k: Coefs,
) -> Tensor<1> {
    assert!(
        applies(&theta, g),
        "the CPU Adam update needs f32 tensors on the CPU"
    );
    count(Kernel::Adam);
    let n = theta.shape().num_elements();
    let device = theta.device();
    let g = flex(g.clone());
    let mut th = flex(theta);
    if th.is_unique() && th.storage::<f32>().len() == n {
        count(Kernel::AdamInPlace);
        fused_update(
            Theta::InPlace(th.storage_mut()),
            contiguous_f32(&g),
            m,
            v,
            k,
        );
        Tensor::from_primitive::<Flex>(th)
    } else {
        let (old, g) = (contiguous_f32(&th), contiguous_f32(&g));
        let fill =
            |new: &mut [MaybeUninit<f32>]| fused_update(Theta::Into { old, new }, g, m, v, k);
        // SAFETY: `fused_update` writes all of `new` (it asserts `n` values everywhere).
        let new = unsafe { written_by(n, fill) };
        Tensor::from_data(TensorData::new(new, [n]), &device)
    }
}

/// Runs `f` on `theta`'s own storage (to change it in place) and `g`'s values, when both are
/// f32 tensors on the CPU backend and no other tensor shares `theta`'s storage: an optimizer
/// update without copies ([`crate::optim::adamw`] in fine-tuning). Otherwise gives `theta`
/// back untouched.
#[allow(clippy::result_large_err)] // `Err` hands the tensor back: not an error to propagate
pub(crate) fn update_in_place(
    theta: Tensor<1>,
    g: &Tensor<1>,
    f: impl FnOnce(&mut [f32], &[f32]),
) -> Result<Tensor<1>, Tensor<1>> {
    if !applies(&theta, g) {
        return Err(theta);
    }
    count(Kernel::Adam);
    let n = theta.shape().num_elements();
    let mut th = flex(theta);
    if !(th.is_unique() && th.storage::<f32>().len() == n) {
        return Err(Tensor::from_primitive::<Flex>(th));
    }
    count(Kernel::AdamInPlace);
    let g = flex(g.clone());
    f(th.storage_mut(), contiguous_f32(&g));
    Ok(Tensor::from_primitive::<Flex>(th))
}

/// The CPU backend's tensor behind `t` (shares its storage; needs [`applies`]).
fn flex(t: Tensor<1>) -> FlexTensor {
    let t = if t.is_autodiff() { t.inner() } else { t };
    let t = t
        .try_into_primitive::<Flex>()
        .expect("a tensor on the flex backend");
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

/// The `n` values of a contiguous 1-D f32 [`FlexTensor`] (its buffer may be longer).
fn contiguous_f32(t: &FlexTensor) -> &[f32] {
    let n = t.layout().shape().num_elements();
    &t.storage::<f32>()[..n]
}

/// Sum of squares in f64, in parallel over large tensors. Eight partial sums, so that the loop
/// runs in vector registers instead of waiting on one chain of dependent additions. The
/// chunks' sums are added in their order, so the result does not depend on the thread count
/// (rayon's `sum` adds them in a tree shaped by the threads: at 5 threads the last bit
/// differed from 1 thread's).
fn sum_squares(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    let part = |c: &[f32]| {
        let mut acc = [0.0f64; 8];
        let mut lanes = c.chunks_exact(8);
        for l in &mut lanes {
            for (a, &v) in acc.iter_mut().zip(l) {
                *a += (v as f64) * (v as f64);
            }
        }
        let tail: f64 = lanes
            .remainder()
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        acc.iter().sum::<f64>() + tail
    };
    if x.len() > 2 * CHUNK {
        let parts: Vec<f64> = x.par_chunks(CHUNK).map(part).collect();
        parts.iter().sum()
    } else {
        part(x)
    }
}

/// Elements per parallel task of the CPU update.
const CHUNK: usize = 1 << 15;

/// Adam's coefficients for one step, rounded once to f32 (`1 - b1` computed in f64, as PyTorch
/// computes `alpha` in Python).
#[derive(Clone, Copy)]
pub(crate) struct Coefs {
    pub(crate) c1: f32,
    pub(crate) d1: f32,
    pub(crate) c2: f32,
    pub(crate) d2: f32,
    pub(crate) eps: f32,
    pub(crate) step_size: f32,
    /// Applied to the gradient first (the clip factor).
    pub(crate) grad_scale: f32,
}

/// Where the CPU update writes the new parameter values.
enum Theta<'a> {
    /// Over the old ones (storage held by no one else).
    InPlace(&'a mut [f32]),
    /// To a new buffer, not written yet (the old storage is shared, e.g. with another replica).
    Into {
        old: &'a [f32],
        new: &'a mut [MaybeUninit<f32>],
    },
}

/// One fused Adam update on the CPU: the same arithmetic as the tensor path, in one pass.
fn fused_update(theta: Theta, g: &[f32], m: &mut [f32], v: &mut [f32], k: Coefs) {
    use rayon::prelude::*;
    // The amount subtracted from one parameter; updates its moments.
    let delta = |g: f32, m: &mut f32, v: &mut f32| {
        let g = g * k.grad_scale;
        *m = k.c1 * *m + k.d1 * g;
        *v = k.c2 * *v + k.d2 * (g * g);
        (*m * k.step_size) / (v.sqrt() + k.eps)
    };
    // Zipped iterators (no bounds checks), so that the loops compile to vector instructions:
    // indexed, they ran one element at a time, at 30% of a 64-expert step.
    let into = |o: &mut [MaybeUninit<f32>], t: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        let moments = m.iter_mut().zip(v.iter_mut());
        for (((o, &t), &g), (m, v)) in o.iter_mut().zip(t).zip(g).zip(moments) {
            o.write(t - delta(g, m, v));
        }
    };
    let in_place = |t: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        let moments = m.iter_mut().zip(v.iter_mut());
        for ((t, &g), (m, v)) in t.iter_mut().zip(g).zip(moments) {
            *t -= delta(g, m, v);
        }
    };
    let n = g.len();
    let theta_fits = match &theta {
        Theta::InPlace(t) => t.len() == n,
        Theta::Into { old, new } => old.len() == n && new.len() == n,
    };
    // The loops zip the slices: a shorter one would leave values of `new` unwritten.
    assert!(
        theta_fits && m.len() == n && v.len() == n,
        "Adam on slices of different lengths"
    );
    let parallel = n > 2 * CHUNK;
    let moments = m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK));
    match theta {
        Theta::Into { old, new } if parallel => new
            .par_chunks_mut(CHUNK)
            .zip(old.par_chunks(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .zip(moments)
            .for_each(|(((o, t), g), (m, v))| into(o, t, g, m, v)),
        Theta::Into { old, new } => into(new, old, g, m, v),
        Theta::InPlace(t) if parallel => t
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(moments)
            .for_each(|((t, g), (m, v))| in_place(t, g, m, v)),
        Theta::InPlace(t) => in_place(t, g, m, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut rand_chacha::ChaCha8Rng, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// The fused loop against the formula written out one element at a time (same f32
    /// operations in the same order, so equal bit for bit), in place and into a new buffer,
    /// below and above the parallel threshold, with a tail that is not a multiple of a chunk.
    #[test]
    fn fused_update_equals_the_formula() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let k = Coefs {
            c1: 0.9,
            d1: 0.1,
            c2: 0.999,
            d2: (1.0 - 0.999f64) as f32,
            eps: 1e-8,
            step_size: 3e-4,
            grad_scale: 0.37,
        };
        for n in [5, 1000, 2 * CHUNK + 12_345] {
            let theta = random(n, &mut rng, 1.0);
            let g = random(n, &mut rng, 0.1);
            let m0 = random(n, &mut rng, 0.01);
            let v0: Vec<f32> = random(n, &mut rng, 1e-3).iter().map(|x| x.abs()).collect();

            let (mut want_t, mut want_m, mut want_v) = (theta.clone(), m0.clone(), v0.clone());
            for i in 0..n {
                let gi = g[i] * k.grad_scale;
                want_m[i] = k.c1 * want_m[i] + k.d1 * gi;
                want_v[i] = k.c2 * want_v[i] + k.d2 * (gi * gi);
                want_t[i] -= (want_m[i] * k.step_size) / (want_v[i].sqrt() + k.eps);
            }

            let (mut t, mut m, mut v) = (theta.clone(), m0.clone(), v0.clone());
            fused_update(Theta::InPlace(&mut t), &g, &mut m, &mut v, k);
            assert_eq!(
                (&t, &m, &v),
                (&want_t, &want_m, &want_v),
                "in place, n = {n}"
            );

            let mut new = vec![MaybeUninit::new(f32::NAN); n];
            let (mut m, mut v) = (m0.clone(), v0.clone());
            let old = theta.clone();
            fused_update(
                Theta::Into {
                    old: &old,
                    new: &mut new,
                },
                &g,
                &mut m,
                &mut v,
                k,
            );
            // SAFETY: every value was initialised (NaN), then overwritten.
            let new: Vec<f32> = new
                .into_iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            assert_eq!((&new, &m, &v), (&want_t, &want_m, &want_v), "into, n = {n}");
            assert_eq!(old, theta);
        }
    }

    /// The parallel sum adds its chunks in one order: the same bits on any number of threads.
    #[test]
    fn sum_squares_does_not_depend_on_the_thread_count() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let x = random(300 * CHUNK + 17, &mut rng, 3.0);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| sum_squares(&x))
        };
        let one = on(1);
        for threads in [2, 3, 5, 8] {
            assert_eq!(on(threads).to_bits(), one.to_bits(), "{threads} threads");
        }
    }

    #[test]
    fn sum_squares_matches_a_plain_sum() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for n in [0, 7, 8, 1001, 2 * CHUNK + 3] {
            let x = random(n, &mut rng, 2.0);
            let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let got = sum_squares(&x);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "n = {n}: {got} vs {want}"
            );
        }
    }
}
