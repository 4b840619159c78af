//! Causal multi-head self-attention (labml_nn.transformers.mha):
//! `softmax(q k^T / sqrt(d_k) + causal) v`, separate q/k/v/output projections with biases,
//! heads concatenated head-major (head h owns columns `h*d_k .. (h+1)*d_k`).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct MultiHeadAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
    pub heads: usize,
}

impl MultiHeadAttention {
    /// `x`: `[batch, seq, d_model]` -> `[batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let mask = causal_mask(s, &x.device());
        let (h, dk) = (self.heads, d / self.heads);
        let split = |t: Tensor<3>| t.reshape([b, s, h, dk]).swap_dims(1, 2); // [b, h, s, dk]
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x));

        let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (dk as f64).sqrt());
        let attn = softmax(scores + mask, 3);
        let o = attn.matmul(v).swap_dims(1, 2).reshape([b, s, d]);
        self.output.forward(o)
    }
}

/// `[1, 1, s, s]` additive mask: 0 where key j <= query i, -inf above the diagonal.
pub fn causal_mask(s: usize, device: &Device) -> Tensor<4> {
    let mut m = vec![0.0f32; s * s];
    for i in 0..s {
        for j in i + 1..s {
            m[i * s + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_data(TensorData::new(m, [1, 1, s, s]), device)
}
