//! The experts: `E_e(v) = relu(v W1_e + b1_e) W2_e + b2_e`, all experts of a layer stored as
//! stacked weights so that every expert runs in one batched matmul over its packed tokens.
//!
//! PyTorch keeps one `nn.Linear` per expert (`experts.{e}.layer1.weight` `[d_ff, d]`); here
//! `w1[e]` is that matrix transposed (`[d, d_ff]`), so `x @ w1` needs no transpose.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::activation::relu;

use super::ops::{cast_to, grouped_ffn};

/// The experts of one Switch layer, stacked.
#[derive(Module, Debug)]
pub struct Experts {
    /// `[n_experts, d_model, d_ff]`
    pub w1: Param<Tensor<3>>,
    /// `[n_experts, d_ff]`
    pub b1: Param<Tensor<2>>,
    /// `[n_experts, d_ff, d_model]`
    pub w2: Param<Tensor<3>>,
    /// `[n_experts, d_model]`
    pub b2: Param<Tensor<2>>,
}

impl Experts {
    /// Number of experts.
    pub(crate) fn n_experts(&self) -> usize {
        self.w1.dims()[0]
    }

    /// `x`: `[n_experts, slots, d_model]`, expert e's tokens in row block e. `dropout`: an
    /// optional mask `[n_experts, slots, d_ff]` multiplied into the hidden activations.
    pub(crate) fn forward(&self, x: Tensor<3>, dropout: Option<Tensor<3>>) -> Tensor<3> {
        let dt = x.dtype();
        let w = |p: &Param<Tensor<3>>| cast_to(p.val(), dt);
        let b = |p: &Param<Tensor<2>>| cast_to(p.val(), dt).unsqueeze_dim(1);
        // Biases reshaped before the matmuls are issued: under Burn's fusion on a GPU, each
        // add (and the relu) then fuses into its matmul's output.
        let (b1, b2) = (b(&self.b1), b(&self.b2));
        let mut h = relu(x.matmul(w(&self.w1)) + b1);
        if let Some(mask) = dropout {
            h = h * cast_to(mask, dt);
        }
        h.matmul(w(&self.w2)) + b2
    }

    /// `x`: `[rows, d_model]`, expert e's tokens in rows `offsets[e]..offsets[e + 1]` (no
    /// padding): the CPU kernels' grouped FFN, or per expert with Burn ops elsewhere.
    pub(crate) fn forward_grouped(&self, x: Tensor<2>, offsets: &[usize]) -> Tensor<2> {
        let dt = x.dtype();
        let w = |p: &Param<Tensor<3>>| cast_to(p.val(), dt);
        let b = |p: &Param<Tensor<2>>| cast_to(p.val(), dt);
        let (w1, b1, w2, b2) = (w(&self.w1), b(&self.b1), w(&self.w2), b(&self.b2));
        grouped_ffn(x, offsets, w1, b1, w2, b2)
    }
}
