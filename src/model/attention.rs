//! Causal multi-head self-attention (labml_nn.transformers.mha):
//! `softmax(q k^T / sqrt(d_k) + causal) v`, separate q/k/v/output projections with biases,
//! heads concatenated head-major (head h owns columns `h*d_k .. (h+1)*d_k`).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::ops::{cast_to, causal_attention};
use super::precision::linear;

/// labml's `MultiHeadAttention` with a causal mask.
#[derive(Module, Debug)]
pub struct MultiHeadAttention {
    /// Query projection (PyTorch name `query.linear`).
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Output projection over the concatenated heads.
    pub output: Linear,
    /// Number of heads.
    pub heads: usize,
}

impl MultiHeadAttention {
    /// `x`: `[batch, seq, d_model]` -> `[batch, seq, d_model]`.
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dk = x.dims()[2] / self.heads;
        let q = linear(&self.query, x.clone());
        let k = linear(&self.key, x.clone());
        let v = linear(&self.value, x);
        let o = causal_attention(q, k, v, self.heads, 1.0 / (dk as f64).sqrt());
        linear(&self.output, o)
    }
}

/// Keys and values of the positions seen so far, `[batch, heads, len, d_k]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Keys, `[batch, heads, len, d_k]`.
    pub k: Option<Tensor<4>>,
    /// Values, `[batch, heads, len, d_k]`.
    pub v: Option<Tensor<4>>,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MultiHeadAttention {
    /// Attention for `n` new positions `x` `[batch, n, d_model]` after those in `cache`, which
    /// is extended with them and then trimmed to the last `max_len` positions (a sliding
    /// window: beyond `max_len` a position attends to the `max_len` most recent ones).
    pub(crate) fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
        max_len: usize,
    ) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let (h, dk) = (self.heads, d / self.heads);
        let split = |t: Tensor<3>| t.reshape([b, n, h, dk]).swap_dims(1, 2);
        let dtype = x.dtype();
        let q = split(linear(&self.query, x.clone()));
        let append = |old: Option<Tensor<4>>, new: Tensor<4>| match old {
            Some(old) => Tensor::cat(vec![old, new], 2),
            None => new,
        };
        let mut k = append(cache.k.take(), split(linear(&self.key, x.clone())));
        let mut v = append(cache.v.take(), split(linear(&self.value, x)));
        let len = k.dims()[2];
        if len > max_len {
            k = k.slice([0..b, 0..h, len - max_len..len, 0..dk]);
            v = v.slice([0..b, 0..h, len - max_len..len, 0..dk]);
        }
        let len = k.dims()[2];
        let mut scores = q.matmul(k.clone().swap_dims(2, 3)) * (1.0 / (dk as f64).sqrt());
        if n > 1 {
            scores = scores + cast_to(offset_causal_mask(n, len, &k.device()), dtype);
        }
        let o = softmax(scores, 3)
            .matmul(v.clone())
            .swap_dims(1, 2)
            .reshape([b, n, d]);
        cache.k = Some(k);
        cache.v = Some(v);
        linear(&self.output, o)
    }
}

/// `[1, 1, n, len]` mask for the last `n` of `len` positions: query i sits at `len - n + i`.
fn offset_causal_mask(n: usize, len: usize, device: &Device) -> Tensor<4> {
    let mut m = vec![0.0f32; n * len];
    for i in 0..n {
        for j in len - n + i + 1..len {
            m[i * len + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_data(TensorData::new(m, [1, 1, n, len]), device)
}
