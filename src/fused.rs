//! CPU kernels with hand-written backward for the parts of the step that Burn runs as chains
//! of small ops: the causal attention softmax (`softmax(scale * s + causal)`), LayerNorm, and
//! the experts' FFN over rows grouped by expert (no padding).
//!
//! Each has a definition in Burn ops (any backend, and the tests' reference) and, for f32
//! tensors on the flex backend, a kernel registered with Burn's autodiff as one node: one pass
//! forward and one backward where Burn takes about 7 and 9 for the softmax, 8 and ~15 for
//! LayerNorm. The softmax and LayerNorm kernels alone took one model at the reference
//! configuration from 165 to 126 ms/step.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

use crate::attention::causal_mask;
use crate::precision::cast_to;
use crate::util::written_by;

type Ad = Autodiff<Flex, NoCheckpointing>;

/// Epsilon of every LayerNorm of the model (Burn's and PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

/// Elements below which a kernel runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// `softmax(scale * s + causal, -1)` for square scores `s` `[batch, heads, seq, seq]`: query i
/// attends to keys `0..=i` (the weights of later keys are exactly 0).
pub fn causal_softmax(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    let [_, _, s, t] = scores.dims();
    let scale32 = scale as f32;
    // (The kernel takes the row maximum before scaling.)
    let kernel = || {
        run_kernel(CausalSoftmax, [flex_input(&scores)], |[x]| {
            let y = causal_softmax_forward(&x, scale32);
            (y.clone(), (y, scale32))
        })
    };
    (s == t && scale > 0.0)
        .then(kernel)
        .flatten()
        .unwrap_or_else(|| causal_softmax_generic(scores, scale))
}

/// [`causal_softmax`] composed from Burn ops (labml's order: scale, mask, softmax).
pub fn causal_softmax_generic(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    let mask = causal_mask(scores.dims()[2], &scores.device());
    let dtype = scores.dtype();
    softmax(scores * scale + cast_to(mask, dtype), 3)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`, with the
/// biased variance (PyTorch's).
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    let d = gamma.dims()[0];
    let fits = x.dims()[D - 1] == d && beta.dims()[0] == d;
    let eps32 = eps as f32;
    let kernel = || {
        let inputs = [flex_input(&x), flex_input(&gamma), flex_input(&beta)];
        run_kernel(LayerNormOp, inputs, |[x, gamma, beta]| {
            let (y, stats) = layer_norm_forward(&x, &gamma, &beta, eps32);
            (y, LayerNormState { x, stats, gamma })
        })
    };
    fits.then(kernel)
        .flatten()
        .unwrap_or_else(|| layer_norm_generic(x, gamma, beta, eps))
}

/// [`layer_norm`] composed from Burn ops.
pub fn layer_norm_generic<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    burn::tensor::module::layer_norm(x, gamma, Some(beta), eps)
}

// ---- dispatch to the flex kernels ------------------------------------------------------------

/// The flex tensor behind `t` and, with autodiff, its graph node; `None` unless `t` is f32 on
/// the flex backend.
fn flex_input<const D: usize>(t: &Tensor<D>) -> Option<(FlexTensor, Option<NodeGuard>)> {
    if t.dtype() != DType::F32 {
        return None;
    }
    if t.is_autodiff() {
        let (x, node) = t.clone().try_into_primitive::<Ad>().ok()?.into_parts();
        Some((x, Some(node)))
    } else {
        Some((t.clone().try_into_primitive::<Flex>().ok()?, None))
    }
}

/// Whether `t` is an f32 tensor on the flex backend (with or without autodiff), where the
/// kernels of this module run.
pub fn on_cpu_kernels<const D: usize>(t: &Tensor<D>) -> bool {
    flex_input(t).is_some()
}

/// `forward` on the flex tensors behind the inputs, when every input has one (see
/// [`flex_input`]): its output, and with autodiff (all inputs tracked) one graph node whose
/// backward is `op` with the state `forward` returned. `None` otherwise.
fn run_kernel<K, const N: usize, const D: usize>(
    op: K,
    inputs: [Option<(FlexTensor, Option<NodeGuard>)>; N],
    forward: impl FnOnce([FlexTensor; N]) -> (FlexTensor, K::State),
) -> Option<Tensor<D>>
where
    K: Backward<Flex, N>,
{
    let (tensors, nodes): (Vec<_>, Vec<_>) = inputs
        .into_iter()
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .unzip();
    let tensors: [FlexTensor; N] = tensors.try_into().ok()?;
    if nodes.iter().all(Option::is_none) {
        return Some(Tensor::from_primitive::<Flex>(forward(tensors).0));
    }
    let nodes: [NodeGuard; N] = nodes
        .into_iter()
        .collect::<Option<Vec<_>>>()?
        .try_into()
        .ok()?;
    let (y, state) = forward(tensors);
    let y = match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Ad>(y))
}

/// The `n` f32 values of `t`, contiguous (copied only when `t` is strided).
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    let n = t.layout().shape().num_elements();
    if t.is_contiguous() {
        let start = t.layout().start_offset();
        Cow::Borrowed(&t.storage::<f32>()[start..start + n])
    } else {
        Cow::Owned(t.to_contiguous().storage::<f32>()[..n].to_vec())
    }
}

fn new_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `f(first_element, block)` for each block of `block` elements of `out`, in parallel for
/// large outputs. Blocks are the same either way, so results do not depend on the threads.
fn for_blocks<F>(out: &mut [f32], block: usize, f: F)
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

// ---- causal softmax --------------------------------------------------------------------------

#[derive(Debug)]
struct CausalSoftmax;

impl Backward<Flex, 1> for CausalSoftmax {
    /// The softmax output and the scale.
    type State = (FlexTensor, f32);

    /// `ds_j = y_j * (g_j - sum_k g_k y_k) * scale`.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, scale) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let shape = y.layout().shape().clone();
            let s = shape[3];
            let (y, g) = (values(&y), values(&g));
            let mut dx = vec![0.0f32; g.len()];
            for_blocks(&mut dx, s * s, |at, dx| {
                for (i, dx) in dx.chunks_mut(s).enumerate() {
                    let row = at + i * s;
                    let (g, y) = (&g[row..row + i + 1], &y[row..row + i + 1]);
                    let dot = sum_lanes(g, y, y, |g, y, _| g * y);
                    for ((d, &g), &y) in dx.iter_mut().zip(g).zip(y) {
                        *d = y * (g - dot) * scale;
                    }
                }
            });
            new_tensor(dx, shape)
        });
    }
}

/// Blocks of one `[seq, seq]` matrix; its row `i` keeps keys `0..=i`, the rest is 0.
fn causal_softmax_forward(x: &FlexTensor, scale: f32) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let s = shape[3];
    let x = values(x);
    let mut y = vec![0.0f32; x.len()];
    for_blocks(&mut y, s * s, |at, y| {
        for (i, y) in y.chunks_mut(s).enumerate() {
            let (x, y) = (&x[at + i * s..at + i * s + i + 1], &mut y[..=i]);
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = exp_nonpositive(x * scale - max);
            }
            let sum = sum_lanes(y, y, y, |y, _, _| y);
            for y in y.iter_mut() {
                *y /= sum;
            }
        }
    });
    new_tensor(y, shape)
}

// ---- LayerNorm -------------------------------------------------------------------------------

/// Rows per parallel task of the row-wise loops (LayerNorm, the experts' ReLU).
const BLOCK_ROWS: usize = 32;

/// Mean and `1 / sqrt(var + eps)` of each row of length `d`.
fn row_stats(x: &[f32], d: usize, eps: f32) -> Vec<(f32, f32)> {
    let stats = |x: &[f32]| {
        let mean = sum_lanes(x, x, x, |x, _, _| x) / d as f32;
        let var = sum_lanes(x, x, x, |x, _, _| (x - mean) * (x - mean)) / d as f32;
        (mean, 1.0 / (var + eps).sqrt())
    };
    if x.len() >= PARALLEL_MIN {
        x.par_chunks(d).map(stats).collect()
    } else {
        x.chunks(d).map(stats).collect()
    }
}

/// `y` and the row statistics.
fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f32,
) -> (FlexTensor, Vec<(f32, f32)>) {
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1];
    let (x, gamma, beta) = (values(x), values(gamma), values(beta));
    let stats = row_stats(&x, d, eps);
    let mut y = vec![0.0f32; x.len()];
    for_blocks(&mut y, d * BLOCK_ROWS, |at, y| {
        for (i, y) in y.chunks_mut(d).enumerate() {
            let (mean, rstd) = stats[at / d + i];
            let x = &x[at + i * d..at + (i + 1) * d];
            for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma.iter()).zip(beta.iter()) {
                *y = (x - mean) * rstd * g + b;
            }
        }
    });
    (new_tensor(y, shape), stats)
}

#[derive(Debug)]
struct LayerNormOp;

/// The input, its row statistics and `gamma`.
#[derive(Debug, Clone)]
struct LayerNormState {
    x: FlexTensor,
    stats: Vec<(f32, f32)>,
    gamma: FlexTensor,
}

impl Backward<Flex, 3> for LayerNormOp {
    type State = LayerNormState;

    /// With `xh = (x - mean) * rstd` and `dxh = dy * gamma`: `dbeta = sum dy`,
    /// `dgamma = sum dy * xh`, `dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh))`.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let LayerNormState { x, stats, gamma } = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pg, pb] = ops.parents;
        let shape = x.layout().shape().clone();
        let d = shape[shape.num_dims() - 1];
        let (x, dy, gamma) = (values(&x), values(&dy), values(&gamma));
        let gamma = &gamma[..d];
        // Row `row` of x, dy, and its statistics.
        let row_of = |row: usize| (&x[row * d..][..d], &dy[row * d..][..d], stats[row]);
        if let Some(n) = px {
            let mut dx = vec![0.0f32; x.len()];
            for_blocks(&mut dx, d * BLOCK_ROWS, |at, dx| {
                for (i, dx) in dx.chunks_mut(d).enumerate() {
                    let (x, dy, (mean, rstd)) = row_of(at / d + i);
                    let m1 = sum_lanes(dy, gamma, x, |dy, g, _| dy * g) / d as f32;
                    let m2 = sum_lanes(dy, gamma, x, |dy, g, x| dy * g * (x - mean) * rstd);
                    let m2 = m2 / d as f32;
                    for (((dx, &dy), &g), &x) in dx.iter_mut().zip(dy).zip(gamma).zip(x) {
                        *dx = rstd * (dy * g - m1 - (x - mean) * rstd * m2);
                    }
                }
            });
            grads.register::<Flex>(n.id, new_tensor(dx, shape));
        }
        if pg.is_some() || pb.is_some() {
            // Per block of rows, then summed in block order (the same for any thread count).
            let rows = x.len() / d;
            let partial = |b: usize| {
                let mut acc = vec![0.0f32; 2 * d];
                let (dgamma, dbeta) = acc.split_at_mut(d);
                for row in b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(rows) {
                    let (x, dy, (mean, rstd)) = row_of(row);
                    for (((dg, db), &dy), &x) in
                        dgamma.iter_mut().zip(dbeta.iter_mut()).zip(dy).zip(x)
                    {
                        *dg += dy * (x - mean) * rstd;
                        *db += dy;
                    }
                }
                acc
            };
            let blocks = rows.div_ceil(BLOCK_ROWS);
            let partials: Vec<Vec<f32>> = if x.len() >= PARALLEL_MIN {
                (0..blocks).into_par_iter().map(partial).collect()
            } else {
                (0..blocks).map(partial).collect()
            };
            let mut sums = vec![0.0f32; 2 * d];
            for p in partials {
                for (s, v) in sums.iter_mut().zip(p) {
                    *s += v;
                }
            }
            let dbeta = sums.split_off(d);
            if let Some(n) = pg {
                grads.register::<Flex>(n.id, new_tensor(sums, Shape::from(vec![d])));
            }
            if let Some(n) = pb {
                grads.register::<Flex>(n.id, new_tensor(dbeta, Shape::from(vec![d])));
            }
        }
    }
}

// ---- vector helpers --------------------------------------------------------------------------

/// `sum_j f(a_j, b_j, c_j)` over slices of one length, in 8 interleaved partial sums that the
/// compiler vectorises (one running sum is a chain of dependent adds). Pass any slice for an
/// argument `f` ignores.
#[inline(always)]
fn sum_lanes(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
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

/// `e^x` for `x <= 0`, within 2 ulp of the true value (Cody-Waite reduction `x = n ln 2 + r`,
/// Cephes' degree-6 polynomial for `e^r`, `2^n` built in the exponent bits). Straight-line
/// code, so loops over it vectorise (libm's `expf` is one call per element). Below -87 it
/// returns about 1.6e-38 instead of underflowing further.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
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

// ---- experts over rows grouped by expert -----------------------------------------------------

/// The experts' FFN `relu(x W1_e + b1_e) W2_e + b2_e` on rows grouped by expert: rows
/// `offsets[e]..offsets[e + 1]` of `x` `[rows, d]` go to expert e (`w1` `[E, d, f]`, `b1`
/// `[E, f]`, `w2` `[E, f, d]`, `b2` `[E, d]`). Each expert multiplies exactly its rows, where
/// the batched form pads every expert to the fullest one's count.
pub fn grouped_ffn(
    x: Tensor<2>,
    offsets: &[usize],
    w1: Tensor<3>,
    b1: Tensor<2>,
    w2: Tensor<3>,
    b2: Tensor<2>,
) -> Tensor<2> {
    let [e, d, f] = w1.dims();
    let fits = x.dims()[1] == d
        && offsets.len() == e + 1
        && offsets[e] == x.dims()[0]
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && b1.dims() == [e, f]
        && w2.dims() == [e, f, d]
        && b2.dims() == [e, d];
    let kernel = || {
        let inputs = [
            flex_input(&x),
            flex_input(&w1),
            flex_input(&b1),
            flex_input(&w2),
            flex_input(&b2),
        ];
        run_kernel(GroupedFfn, inputs, |[x, w1, b1, w2, b2]| {
            let (y, h) = grouped_ffn_forward(&x, offsets, &w1, &b1, &w2, &b2);
            let offsets = offsets.to_vec();
            (
                y,
                GroupedFfnState {
                    x,
                    h,
                    w1,
                    w2,
                    offsets,
                },
            )
        })
    };
    fits.then(kernel)
        .flatten()
        .unwrap_or_else(|| grouped_ffn_generic(x, offsets, w1, b1, w2, b2))
}

/// [`grouped_ffn`] composed from Burn ops, one expert at a time.
pub fn grouped_ffn_generic(
    x: Tensor<2>,
    offsets: &[usize],
    w1: Tensor<3>,
    b1: Tensor<2>,
    w2: Tensor<3>,
    b2: Tensor<2>,
) -> Tensor<2> {
    let [n_experts, d, f] = w1.dims();
    let parts = (0..n_experts)
        .filter(|&e| offsets[e + 1] > offsets[e])
        .map(|e| {
            let xe = x.clone().slice([offsets[e]..offsets[e + 1], 0..d]);
            let layer = |w: &Tensor<3>, b: &Tensor<2>, (k, n): (usize, usize)| {
                let w = w.clone().slice([e..e + 1, 0..k, 0..n]).reshape([k, n]);
                (w, b.clone().slice([e..e + 1, 0..n]))
            };
            let (w1e, b1e) = layer(&w1, &b1, (d, f));
            let (w2e, b2e) = layer(&w2, &b2, (f, d));
            relu(xe.matmul(w1e) + b1e).matmul(w2e) + b2e
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// A row-major matrix view for [`matmul_add`] and [`matmul_new`]: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Rows `r0..` of a row-major `[_, width]` buffer.
    fn rows(data: &'a [f32], r0: usize, width: usize) -> Self {
        Self {
            data: &data[r0 * width..],
            rs: width,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `out [m, n] (row-major, contiguous) += a [m, k] @ b [k, n]`.
fn matmul_add(out: &mut [f32], a: Mat, b: Mat, m: usize, n: usize, k: usize) {
    assert!(out.len() >= m * n);
    // SAFETY: `out` holds `m * n` initialised values.
    unsafe { matmul_raw(out.as_mut_ptr(), a, b, (m, n, k), true) }
}

/// `out [m, n] = a [m, k] @ b [k, n]` into memory not written yet: a new gradient is written
/// once, with no zero-fill pass before (100 MB per step at 64 experts).
fn matmul_new(out: &mut [MaybeUninit<f32>], a: Mat, b: Mat, m: usize, n: usize, k: usize) {
    // All of `out`, so that a caller that allocated it uninitialised may treat it as written.
    assert_eq!(out.len(), m * n);
    // SAFETY: without `accumulate` nothing is read from `out`, and all `m * n` values are written.
    unsafe { matmul_raw(out.as_mut_ptr().cast(), a, b, (m, n, k), false) }
}

/// # Safety
/// `out` is valid for writes of `m * n` values, and for reads of them with `accumulate`.
unsafe fn matmul_raw(out: *mut f32, a: Mat, b: Mat, (m, n, k): (usize, usize, usize), acc: bool) {
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
fn split_groups<'a, T>(mut buf: &'a mut [T], offsets: &[usize], width: usize) -> Vec<&'a mut [T]> {
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
fn for_experts<T: Send>(parts: Vec<T>, f: impl Fn(usize, T) + Sync) {
    if parts.len() >= 2 * rayon::current_num_threads() && rayon::current_num_threads() > 1 {
        parts.into_par_iter().enumerate().for_each(|(e, p)| f(e, p));
    } else {
        parts.into_iter().enumerate().for_each(|(e, p)| f(e, p));
    }
}

/// `y` and the hidden activations `h = relu(x W1_e + b1_e)`.
fn grouped_ffn_forward(
    x: &FlexTensor,
    offsets: &[usize],
    w1: &FlexTensor,
    b1: &FlexTensor,
    w2: &FlexTensor,
    b2: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [_, d, f] = w1.layout().shape().dims::<3>();
    let rows = offsets[offsets.len() - 1];
    let (x, w1, b1, w2, b2) = (values(x), values(w1), values(b1), values(w2), values(b2));
    // Each output row starts as its expert's bias; the multiply accumulates onto it.
    let layer = |input: &[f32], w: &[f32], b: &[f32], (k, n): (usize, usize)| {
        let mut out = Vec::with_capacity(rows * n);
        for (e, w) in offsets.windows(2).enumerate() {
            for _ in w[0]..w[1] {
                out.extend_from_slice(&b[e * n..(e + 1) * n]);
            }
        }
        for_experts(split_groups(&mut out, offsets, n), |e, out| {
            let (a, m) = (Mat::rows(input, offsets[e], k), offsets[e + 1] - offsets[e]);
            matmul_add(out, a, Mat::rows(w, e * k, n), m, n, k);
        });
        out
    };
    let mut h = layer(&x, &w1, &b1, (d, f));
    for_blocks(&mut h, f * BLOCK_ROWS, |_, h| {
        for v in h {
            *v = v.max(0.0);
        }
    });
    let y = layer(&h, &w2, &b2, (f, d));
    (
        new_tensor(y, Shape::from(vec![rows, d])),
        new_tensor(h, Shape::from(vec![rows, f])),
    )
}

#[derive(Debug)]
struct GroupedFfn;

#[derive(Debug, Clone)]
struct GroupedFfnState {
    x: FlexTensor,
    h: FlexTensor,
    w1: FlexTensor,
    w2: FlexTensor,
    offsets: Vec<usize>,
}

/// Sums of the rows of each expert's part of a `[rows, width]` buffer: `[E, width]`.
fn group_row_sums(buf: &[f32], offsets: &[usize], width: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; (offsets.len() - 1) * width];
    for (e, s) in sums.chunks_mut(width).enumerate() {
        for row in buf[offsets[e] * width..offsets[e + 1] * width].chunks(width) {
            for (s, &v) in s.iter_mut().zip(row) {
                *s += v;
            }
        }
    }
    sums
}

impl Backward<Flex, 5> for GroupedFfn {
    type State = GroupedFfnState;

    /// Per expert, with `dh = (dy W2^T) * (h > 0)`: `db2 = sum dy`, `dW2 = h^T dy`,
    /// `db1 = sum dh`, `dW1 = x^T dh`, `dx = dh W1^T`.
    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let GroupedFfnState {
            x,
            h,
            w1,
            w2,
            offsets,
        } = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pw1, pb1, pw2, pb2] = ops.parents;
        let [n_exp, d, f] = w1.layout().shape().dims::<3>();
        let rows = offsets[n_exp];
        let (x, h, w1, w2, dy) = (
            values(&x),
            values(&h),
            values(&w1),
            values(&w2),
            values(&dy),
        );
        let m = |e: usize| offsets[e + 1] - offsets[e];
        let tensor = |v: Vec<f32>, dims: Vec<usize>| new_tensor(v, Shape::from(dims));
        // `[E, ka, kg]`: `a_e^T g_e` for row-major `a` `[rows, ka]` and `g` `[rows, kg]`.
        let weight_grad = |a: &[f32], ka: usize, g: &[f32], kg: usize| {
            let fill = |dw: &mut [MaybeUninit<f32>]| {
                for_experts(dw.chunks_mut(ka * kg).collect(), |e, out| {
                    let (am, gm) = (Mat::rows(a, offsets[e], ka), Mat::rows(g, offsets[e], kg));
                    matmul_new(out, am.t(), gm, ka, kg, m(e));
                });
            };
            // SAFETY: `matmul_new` writes each expert's `ka * kg` values.
            let dw = unsafe { written_by(n_exp * ka * kg, fill) };
            tensor(dw, vec![n_exp, ka, kg])
        };
        // `[rows, kin]`: `g_e W_e^T` for `g` `[rows, kout]` and `w` `[E, kin, kout]`.
        let input_grad = |g: &[f32], kout: usize, w: &[f32], kin: usize| {
            let fill = |out: &mut [MaybeUninit<f32>]| {
                for_experts(split_groups(out, &offsets, kin), |e, part| {
                    let (gm, wt) = (Mat::rows(g, offsets[e], kout), Mat::rows(w, e * kin, kout));
                    matmul_new(part, gm, wt.t(), m(e), kin, kout);
                });
            };
            // SAFETY: the experts' row ranges cover all `rows`; `matmul_new` writes each one.
            unsafe { written_by(rows * kin, fill) }
        };

        if let Some(n) = pb2 {
            let db2 = group_row_sums(&dy, &offsets, d);
            grads.register::<Flex>(n.id, tensor(db2, vec![n_exp, d]));
        }
        if let Some(n) = pw2 {
            grads.register::<Flex>(n.id, weight_grad(&h, f, &dy, d));
        }
        if px.is_none() && pw1.is_none() && pb1.is_none() {
            return;
        }
        let mut dh = input_grad(&dy, d, &w2, f);
        for_blocks(&mut dh, f * BLOCK_ROWS, |at, dh| {
            for (g, &h) in dh.iter_mut().zip(&h[at..]) {
                *g = if h > 0.0 { *g } else { 0.0 }; // a select, not a branch: it vectorises
            }
        });
        if let Some(n) = pb1 {
            let db1 = group_row_sums(&dh, &offsets, f);
            grads.register::<Flex>(n.id, tensor(db1, vec![n_exp, f]));
        }
        if let Some(n) = pw1 {
            grads.register::<Flex>(n.id, weight_grad(&x, d, &dh, f));
        }
        if let Some(n) = px {
            grads.register::<Flex>(n.id, tensor(input_grad(&dh, f, &w1, d), vec![rows, d]));
        }
    }
}
