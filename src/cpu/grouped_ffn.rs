//! The experts' FFN `relu(x W1_e + b1_e) W2_e + b2_e` over rows grouped by expert (expert e
//! owns rows `offsets[e]..offsets[e + 1]`, no padding), as one autodiff node: each expert's
//! two layers and their backward are gemm calls on exactly its rows, where the batched form
//! pads every expert to the fullest one.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Shape, Tensor};

use super::gemm::{Mat, for_experts, matmul_add, matmul_new, split_groups};
use super::simd::{BLOCK_ROWS, for_blocks};
use super::{Kernel, flex_input, new_tensor, run_kernel, values};
use crate::util::written_by;

/// The kernel's grouped FFN (`x` `[rows, d]`, `w1` `[E, d, f]`, `b1` `[E, f]`, `w2`
/// `[E, f, d]`, `b2` `[E, d]`), or `None` where it does not apply (not f32 on the CPU
/// backend, or shapes and offsets that do not fit).
pub(crate) fn grouped_ffn(
    x: &Tensor<2>,
    offsets: &[usize],
    w1: &Tensor<3>,
    b1: &Tensor<2>,
    w2: &Tensor<3>,
    b2: &Tensor<2>,
) -> Option<Tensor<2>> {
    let [e, d, f] = w1.dims();
    let fits = x.dims()[1] == d
        && offsets.len() == e + 1
        && offsets[e] == x.dims()[0]
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && b1.dims() == [e, f]
        && w2.dims() == [e, f, d]
        && b2.dims() == [e, d];
    if !fits {
        return None;
    }
    let inputs = [
        flex_input(x),
        flex_input(w1),
        flex_input(b1),
        flex_input(w2),
        flex_input(b2),
    ];
    run_kernel(
        Kernel::GroupedFfn,
        GroupedFfn,
        inputs,
        |[x, w1, b1, w2, b2]| {
            let (y, h) = grouped_ffn_forward(&x, offsets, &w1, &b1, &w2, &b2);
            let offsets = offsets.to_vec();
            let state = GroupedFfnState {
                x,
                h,
                w1,
                w2,
                offsets,
            };
            (y, state)
        },
    )
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
