//! The causal attention softmax `y = softmax(scale * s + causal)` over square scores
//! `[batch, heads, seq, seq]`, as one autodiff node: one pass forward, one backward
//! (`ds_j = y_j (g_j - sum_k g_k y_k) scale`), where Burn's ops take about 7 and 9.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::Tensor;

use super::simd::{exp_nonpositive, for_blocks, max_lanes, sum_lanes};
use super::{Kernel, flex_input, new_tensor, run_kernel, values};

/// The kernel's `softmax(scale * scores + causal, -1)`, or `None` where it does not apply
/// (not f32 on the CPU backend, scores not square, scale not positive).
pub(crate) fn causal_softmax(scores: &Tensor<4>, scale: f64) -> Option<Tensor<4>> {
    let [_, _, s, t] = scores.dims();
    if s != t || scale <= 0.0 {
        return None;
    }
    let scale = scale as f32;
    // (The kernel takes the row maximum before scaling.)
    run_kernel(
        Kernel::CausalSoftmax,
        CausalSoftmax,
        [flex_input(scores)],
        |[x]| {
            let y = causal_softmax_forward(&x, scale);
            (y.clone(), (y, scale))
        },
    )
}

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
            let mut dx = g.to_vec();
            for_blocks(&mut dx, s * s, |at, dx| {
                for (i, dx) in dx.chunks_mut(s).enumerate() {
                    let row = at + i * s;
                    softmax_row_backward(dx, &y[row..row + s], i, scale);
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
    let mut y = x.to_vec();
    for_blocks(&mut y, s * s, |_, y| {
        for (i, y) in y.chunks_mut(s).enumerate() {
            softmax_row(y, i, scale);
        }
    });
    new_tensor(y, shape)
}

/// Row `i` of a causal softmax in place: the scores `row[..=i]` become
/// `softmax(scale * row[..=i])` (the maximum taken before scaling), `row[i + 1..]` becomes 0.
#[inline(always)]
pub(super) fn softmax_row(row: &mut [f32], i: usize, scale: f32) {
    let (keep, ahead) = row.split_at_mut(i + 1);
    let max = max_lanes(keep) * scale;
    for y in keep.iter_mut() {
        *y = exp_nonpositive(*y * scale - max);
    }
    let sum = sum_lanes(keep, keep, keep, |y, _, _| y);
    for y in keep.iter_mut() {
        *y /= sum;
    }
    ahead.fill(0.0);
}

/// Row `i` of its backward in place: the output's gradient `row[..=i]` becomes
/// `y (row - sum row y) scale` for that row's weights `y`, `row[i + 1..]` becomes 0.
#[inline(always)]
pub(super) fn softmax_row_backward(row: &mut [f32], y: &[f32], i: usize, scale: f32) {
    let (keep, ahead) = row.split_at_mut(i + 1);
    let dot = sum_lanes(keep, &y[..=i], keep, |g, y, _| g * y);
    for (g, &y) in keep.iter_mut().zip(y) {
        *g = y * (*g - dot) * scale;
    }
    ahead.fill(0.0);
}
