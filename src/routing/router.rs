//! The router layer: a linear map d_model -> n_experts followed by a softmax over experts.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;

/// Linear layer d_model -> n_experts followed by a softmax over experts.
#[derive(Module, Debug)]
pub struct Router {
    /// PyTorch name `switch` (labml's `SwitchFeedForward.switch`).
    pub switch: Linear,
}

impl Router {
    /// Router logits `[tokens, n_experts]`.
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        self.switch.forward(x)
    }

    /// Routing probabilities `[tokens, n_experts]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        softmax(self.logits(x), 1)
    }
}
