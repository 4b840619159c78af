//! Linear layers without bias, as these checkpoints have them: PyTorch stores `[out, in]`,
//! we keep `[in, out]` so that a layer is `x @ w`.
//!
//! Weights a checkpoint stores in bf16 stay bf16 on the CPU (half the bytes that decoding
//! reads per token, half the memory): [`crate::cpu::thin_matmul`] widens them in registers,
//! so `x @ w` is the f32 product of the same values. Other backends get them widened to f32.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::store::{HostData, HostTensor};

/// `t` (`[out, in]`, PyTorch's linear layout) as a `[in, out]` tensor on `device`: bf16 as
/// stored on the CPU, else f32.
pub(crate) fn linear_weight(t: &HostTensor, device: &Device) -> Tensor<2> {
    if !(t.is_bf16() && crate::device::Paths::of(device).bf16_weights) {
        return linear_weight_f32(t, device);
    }
    let [o, i] = [t.shape[0], t.shape[1]];
    let HostData::Bf16(bits) = t.transposed().data else {
        unreachable!("a bf16 matrix transposes to bf16")
    };
    let values: Vec<half::bf16> = bits.into_iter().map(half::bf16::from_bits).collect();
    Tensor::from_data(TensorData::new(values, [i, o]), (device, DType::BF16))
}

/// `t` (`[out, in]`) as an f32 `[in, out]` tensor on `device`, whatever it was stored in (the
/// router: transformers computes it in f32).
pub(crate) fn linear_weight_f32(t: &HostTensor, device: &Device) -> Tensor<2> {
    let [o, i] = [t.shape[0], t.shape[1]];
    Tensor::from_data(TensorData::new(t.transposed().to_f32(), [i, o]), device)
}

/// `x @ w` for `x` `[b, s, i]` and `w` `[i, o]`.
pub(crate) fn matmul3(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    let [b, s, i] = x.dims();
    let o = w.dims()[1];
    matmul2(x.reshape([b * s, i]), w).reshape([b, s, o])
}

/// `x @ w` for `x` `[m, i]` and `w` `[i, o]`, as the models' linear layers compute it: on the
/// CPU with few rows, the kernel that streams `w` (`src/cpu/thin_matmul.rs`; in training
/// forward and backward, `src/cpu/thin_linear.rs`); otherwise Burn's matmul.
pub fn matmul2(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    crate::cpu::thin_matmul(&x, w).unwrap_or_else(|| {
        let dtype = x.dtype();
        if w.dtype() == dtype {
            x.matmul(w.clone())
        } else {
            x.matmul(w.clone().cast(dtype))
        }
    })
}

/// `w` `[in, out]` back to PyTorch's `[out, in]`.
pub(crate) fn host_linear(w: &Tensor<2>) -> HostTensor {
    HostTensor::from_tensor(w.clone()).transposed()
}
