//! The plain feed-forward network, labml's `FeedForward`: `FFN(x) = relu(x W1 + b1) W2 + b2`.
//! The FFN of dense blocks, and a Switch layer's shared experts (K shared experts of width w
//! are one FFN of width K * w: their hidden units never meet, and their K output biases would
//! add up to one; DeepSeek-MoE builds them the same way).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;

use super::precision::linear;

/// labml's `FeedForward`: `relu(x W1 + b1) W2 + b2`.
#[derive(Module, Debug)]
pub struct DenseFeedForward {
    /// `d_model -> d_ff`.
    pub layer1: Linear,
    /// `d_ff -> d_model`.
    pub layer2: Linear,
}

impl DenseFeedForward {
    /// `x` `[tokens, d_model]` -> `[tokens, d_model]`.
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        linear(&self.layer2, relu(linear(&self.layer1, x)))
    }
}
