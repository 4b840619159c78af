//! LayerNorm over the last dimension, `(x - mean) / sqrt(var + eps) * gamma + beta` with the
//! biased variance (PyTorch's), as one autodiff node: one pass forward and one backward for x,
//! gamma and beta, where Burn's ops take about 8 and 15.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, Tensor};
use rayon::prelude::*;

use super::simd::{BLOCK_ROWS, PARALLEL_MIN, for_blocks, sum_lanes};
use super::{Kernel, flex_input, new_tensor, run_kernel, values};

/// The kernel's LayerNorm of `x` over its last dimension, or `None` where it does not apply
/// (not f32 on the CPU backend, or shapes that do not fit).
pub(crate) fn layer_norm<const D: usize>(
    x: &Tensor<D>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
) -> Option<Tensor<D>> {
    let d = gamma.dims()[0];
    if x.dims()[D - 1] != d || beta.dims()[0] != d {
        return None;
    }
    let eps = eps as f32;
    let inputs = [flex_input(x), flex_input(gamma), flex_input(beta)];
    run_kernel(
        Kernel::LayerNorm,
        LayerNormOp,
        inputs,
        |[x, gamma, beta]| {
            let (y, stats) = layer_norm_forward(&x, &gamma, &beta, eps);
            (y, LayerNormState { x, stats, gamma })
        },
    )
}

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
