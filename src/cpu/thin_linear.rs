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
            let y = thin_matmul_host(isa, &values(&x), m, k, Weights::F32(&values(&w)), n);
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
        if let Some(node) = pw {
            let x = values(&x);
            let fill = |dw: &mut [std::mem::MaybeUninit<f32>]| {
                matmul_new(dw, Mat::rows(&x, 0, k).t(), Mat::rows(&dy, 0, n), k, n, m);
            };
            // SAFETY: `matmul_new` writes all `k * n` values.
            let dw = unsafe { written_by(k * n, fill) };
            grads.register::<Flex>(node.id, new_tensor(dw, Shape::new([k, n])));
        }
        if let Some(node) = px {
            let dx = thin_matmul_t_host(Isa::selected(), &dy, m, n, &values(&w), k);
            grads.register::<Flex>(node.id, new_tensor(dx, Shape::new([m, k])));
        }
    }
}
