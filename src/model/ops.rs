//! The operations with a CPU fast path, each in two forms: the entry point the model calls,
//! which runs the kernel of [`crate::cpu`] where it applies, and the same function composed
//! from Burn ops (`*_generic`), which every other backend runs and the tests compare with.
//!
//! ```text
//! causal_attention(q, k, v) = softmax(scale q_h k_h^T + causal) v_h per head h, concatenated
//! causal_softmax(s, scale) = softmax(scale * s + causal, -1)      query i sees keys 0..=i
//! layer_norm(x)            = (x - mean) / sqrt(var + eps) * gamma + beta   (biased variance)
//! grouped_ffn(x)           = relu(x W1_e + b1_e) W2_e + b2_e       rows offsets[e].. of expert e
//! ```

use burn::tensor::activation::{relu, softmax};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

use std::sync::Arc;

use crate::cpu;
use crate::distributed::ExpertExchange;

/// Epsilon of every LayerNorm of the model (Burn's and PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

/// `t` in `dtype` (a no-op when it already is).
pub(crate) fn cast_to<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// `[1, 1, s, s]` additive mask: 0 where key j <= query i, -inf above the diagonal.
pub(crate) fn causal_mask(s: usize, device: &Device) -> Tensor<4> {
    let mut m = vec![0.0f32; s * s];
    for i in 0..s {
        for j in i + 1..s {
            m[i * s + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_data(TensorData::new(m, [1, 1, s, s]), device)
}

/// Causal multi-head attention over `q`, `k`, `v` `[batch, seq, heads * d_k]` (head `h` owns
/// columns `h d_k ..`): per head `softmax(scale q_h k_h^T + causal) v_h`, the heads
/// concatenated again, `[batch, seq, heads * d_k]`.
pub fn causal_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    scale: f64,
) -> Tensor<3> {
    cpu::causal_attention(&q, &k, &v, heads, scale)
        .unwrap_or_else(|| causal_attention_generic(q, k, v, heads, scale))
}

/// [`causal_attention`] composed from Burn ops: heads split by a reshape and a transpose, two
/// batched matmuls around [`causal_softmax`], heads merged back.
pub fn causal_attention_generic(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    scale: f64,
) -> Tensor<3> {
    let [b, s, d] = q.dims();
    let split = |t: Tensor<3>| t.reshape([b, s, heads, d / heads]).swap_dims(1, 2);
    let (q, k, v) = (split(q), split(k), split(v));
    let attn = causal_softmax(q.matmul(k.swap_dims(2, 3)), scale);
    attn.matmul(v).swap_dims(1, 2).reshape([b, s, d])
}

/// `softmax(scale * s + causal, -1)` for square scores `s` `[batch, heads, seq, seq]`: query i
/// attends to keys `0..=i` (the weights of later keys are exactly 0).
pub fn causal_softmax(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    cpu::causal_softmax(&scores, scale).unwrap_or_else(|| causal_softmax_generic(scores, scale))
}

/// [`causal_softmax`] composed from Burn ops (labml's order: scale, mask, softmax).
pub fn causal_softmax_generic(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    let mask = causal_mask(scores.dims()[2], &scores.device());
    let dtype = scores.dtype();
    softmax(scores * scale + cast_to(mask, dtype), 3)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`, with the
/// biased variance (PyTorch's).
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    cpu::layer_norm(&x, &gamma, &beta, eps)
        .unwrap_or_else(|| layer_norm_generic(x, gamma, beta, eps))
}

/// [`layer_norm`] composed from Burn ops: the same ops as Burn's own `layer_norm`, but with
/// `gamma` and `beta` reshaped for broadcasting *before* the statistics, so that under Burn's
/// fusion on GPU backends nothing stands between the mean and the rest: the whole norm runs as
/// one fused reduce-and-broadcast kernel instead of a reduction and then the rest.
pub fn layer_norm_generic<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    let d = x.dims()[D - 1];
    let mut shape = [1; D];
    shape[D - 1] = d;
    let (gamma, beta) = (gamma.reshape(shape), beta.reshape(shape));
    let centered = x.clone() - x.mean_dim(D - 1);
    let var = (centered.clone() * centered.clone()).mean_dim(D - 1);
    centered / (var + eps).sqrt() * gamma + beta
}

/// The experts' FFN `relu(x W1_e + b1_e) W2_e + b2_e` on rows grouped by expert: rows
/// `offsets[e]..offsets[e + 1]` of `x` `[rows, d]` go to expert e (`w1` `[E, d, f]`, `b1`
/// `[E, f]`, `w2` `[E, f, d]`, `b2` `[E, d]`). Each expert multiplies exactly its rows, where
/// the batched form pads every expert to the fullest one's count.
pub fn grouped_ffn(
    x: Tensor<2>,
    offsets: &[usize],
    w1: Tensor<3>,
    b1: Tensor<2>,
    w2: Tensor<3>,
    b2: Tensor<2>,
) -> Tensor<2> {
    cpu::grouped_ffn(&x, offsets, &w1, &b1, &w2, &b2)
        .unwrap_or_else(|| grouped_ffn_generic(x, offsets, w1, b1, w2, b2))
}

/// [`grouped_ffn`] composed from Burn ops, one expert at a time.
pub fn grouped_ffn_generic(
    x: Tensor<2>,
    offsets: &[usize],
    w1: Tensor<3>,
    b1: Tensor<2>,
    w2: Tensor<3>,
    b2: Tensor<2>,
) -> Tensor<2> {
    let [n_experts, d, f] = w1.dims();
    let parts = (0..n_experts)
        .filter(|&e| offsets[e + 1] > offsets[e])
        .map(|e| {
            let xe = x.clone().slice([offsets[e]..offsets[e + 1], 0..d]);
            let layer = |w: &Tensor<3>, b: &Tensor<2>, (k, n): (usize, usize)| {
                let w = w.clone().slice([e..e + 1, 0..k, 0..n]).reshape([k, n]);
                (w, b.clone().slice([e..e + 1, 0..n]))
            };
            let (w1e, b1e) = layer(&w1, &b1, (d, f));
            let (w2e, b2e) = layer(&w2, &b2, (f, d));
            relu(xe.matmul(w1e) + b1e).matmul(w2e) + b2e
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// Expert parallelism's first exchange: this rank's kept rows `x` (grouped by expert) to the
/// ranks of their experts; returns this rank's experts' input. CPU only: Burn has no
/// all-to-all to compose a generic form from, and `train.expert_parallel` checks the device
/// before any work.
///
/// # Panics
/// Off the CPU backend or not in f32.
pub(crate) fn to_experts(x: Tensor<2>, ex: &Arc<ExpertExchange>) -> Tensor<2> {
    cpu::to_experts(&x, ex).expect("expert parallelism runs on the CPU backend in f32")
}

/// The second exchange: this rank's experts' output back to the tokens' ranks (the transpose
/// of [`to_experts`]).
///
/// # Panics
/// Off the CPU backend or not in f32.
pub(crate) fn from_experts(y: Tensor<2>, ex: &Arc<ExpertExchange>) -> Tensor<2> {
    cpu::from_experts(&y, ex).expect("expert parallelism runs on the CPU backend in f32")
}
