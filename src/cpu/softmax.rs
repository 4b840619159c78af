//! The causal attention softmax `y = softmax(scale * s + causal)` over square scores
//! `[batch, heads, seq, seq]`, as one autodiff node: one pass forward, one backward
//! (`ds_j = y_j (g_j - sum_k g_k y_k) scale`), where Burn's ops take about 7 and 9.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::Tensor;

use super::simd::{exp_nonpositive, for_blocks, sum_lanes};
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
