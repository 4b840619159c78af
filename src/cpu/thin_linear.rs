//! `y = x W` with few rows of `x` (an expert's share of a short batch, a decoder's target
//! tokens) as one autodiff node, for fine-tuning: forward by [`thin_matmul_host`] (`W` read
//! where it lies), backward
//!
//! ```text
//! dx = dy W^T    thin_matmul_t_host: dot products along the rows of W
//! dW = x^T dy    gemm
//! ```
//!
//! Burn's matmul backward hands gemm `W^T` as a strided view for `dx`, and gemm packs it with
//! strided reads each time: on a 2-core AMD EPYC with AVX-512 the experts' `dx` of a
//! switch-base-8-shaped fine-tuning update (8 and 32 rows against 768 x 3072 weights) ran at
//! 5-19 GFLOP/s, about 1 s of a 2.5 s update.
//!
//! A tied output layer is `W = S^T`, a transposed view of the embedding `S` `[n, k]`
//! (row-major). It is read where it lies too, the two kernels trading places:
//!
//! ```text
//! y  = x S^T     thin_matmul_t_host
//! dx = dy S      thin_matmul_host
//! dS = dy^T x    gemm, [n, k] row-major (handed back as the transposed view's gradient)
//! ```
//!
//! Copying `S^T` into a row-major `[k, n]` first (what reading its values did) cost four
//! passes over the 98 MB embedding of switch-base-8 per update: a transposed copy and a
//! plain one in the forward pass and again in the backward, about 0.1 s of a 2.5 s update.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, Tensor};

use super::gemm::{Mat, matmul_new};
use super::isa::Isa;
use super::thin_matmul::{Weights, thin_matmul_host, thin_matmul_t_host};
use super::{Kernel, flex_input, new_tensor, run_kernel, values};
use crate::util::written_by;

/// `x W` for `x` `[m, k]` (`m` at most [`super::THIN_MAX_ROWS`]) and `W` `[k, n]`, f32 on the
/// CPU backend, with autodiff: one graph node whose backward is the two products above.
/// `None` where it does not apply.
pub(super) fn thin_linear(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let ([m, k], n) = (x.dims(), w.dims()[1]);
    let isa = Isa::selected();
    run_kernel(
        Kernel::ThinLinear(isa),
        ThinLinear,
        [flex_input(x), flex_input(w)],
        |[x, w]| {
            let x_values = values(&x);
            let y = match transposed(&w) {
                None => thin_matmul_host(isa, &x_values, m, k, Weights::F32(&values(&w)), n),
                Some(s) => {
                    super::count(Kernel::ThinLinearTransposed);
                    thin_matmul_t_host(isa, &x_values, m, k, s, n)
                }
            };
            (new_tensor(y, Shape::new([m, n])), (x, w))
        },
    )
}

#[derive(Debug)]
struct ThinLinear;

impl Backward<Flex, 2> for ThinLinear {
    /// `x` and `W` as the forward pass read them.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pw] = ops.parents;
        let ([m, k], n) = (
            x.layout().shape().dims::<2>(),
            w.layout().shape().dims::<2>()[1],
        );
        let dy = values(&dy);
        let s = transposed(&w);
        if let Some(node) = pw {
            let x = values(&x);
            let dw = match s {
                None => product(Mat::rows(&x, 0, k).t(), Mat::rows(&dy, 0, n), k, n, m),
                // `dS` row-major, seen as `dW = dS^T` (the transpose's backward sees through
                // it again: no copy either way).
                Some(_) => {
                    product(Mat::rows(&dy, 0, n).t(), Mat::rows(&x, 0, k), n, k, m).transpose(0, 1)
                }
            };
            grads.register::<Flex>(node.id, dw);
        }
        if let Some(node) = px {
            let isa = Isa::selected();
            let dx = match s {
                None => thin_matmul_t_host(isa, &dy, m, n, &values(&w), k),
                Some(s) => thin_matmul_host(isa, &dy, m, n, Weights::F32(s), k),
            };
            grads.register::<Flex>(node.id, new_tensor(dx, Shape::new([m, k])));
        }
    }
}

/// `a b` (`a` `[rows, inner]`, `b` `[inner, cols]`) as a new row-major tensor, written once.
fn product(a: Mat, b: Mat, rows: usize, cols: usize, inner: usize) -> FlexTensor {
    let fill = |out: &mut [std::mem::MaybeUninit<f32>]| matmul_new(out, a, b, rows, cols, inner);
    // SAFETY: `matmul_new` writes all `rows * cols` values.
    new_tensor(
        unsafe { written_by(rows * cols, fill) },
        Shape::new([rows, cols]),
    )
}

/// The values of `S` `[n, k]` (row-major) where `w` `[k, n]` is its transpose: element
/// `(i, j)` at `i + j k` past the start.
fn transposed(w: &FlexTensor) -> Option<&[f32]> {
    let layout = w.layout();
    let [k, n] = layout.shape().dims::<2>();
    if w.is_contiguous() || layout.strides() != [1, k as isize] {
        return None;
    }
    let start = layout.start_offset();
    Some(&w.storage::<f32>()[start..start + k * n])
}
