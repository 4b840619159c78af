//! Linear layers without bias, as these checkpoints have them: PyTorch stores `[out, in]`,
//! we keep `[in, out]` so that a layer is `x @ w`.

use burn::tensor::{Device, Tensor, TensorData};

use crate::store::HostTensor;

/// `t` (`[out, in]`, PyTorch's linear layout) as a `[in, out]` tensor on `device`.
pub fn linear_weight(t: &HostTensor, device: &Device) -> Tensor<2> {
    let [o, i] = [t.shape[0], t.shape[1]];
    Tensor::from_data(TensorData::new(t.transposed().to_f32(), [i, o]), device)
}

/// `x @ w` for `x` `[b, s, i]` and `w` `[i, o]`.
pub fn matmul3(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    let [b, s, i] = x.dims();
    let o = w.dims()[1];
    matmul2(x.reshape([b * s, i]), w).reshape([b, s, o])
}

/// `x @ w` for `x` `[m, i]` and `w` `[i, o]`: on the CPU with few rows (decoding), the kernel
/// that streams `w` ([`crate::cpu::thin_matmul`]); otherwise Burn's matmul.
pub fn matmul2(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    crate::cpu::thin_matmul(&x, w).unwrap_or_else(|| x.matmul(w.clone()))
}

/// `w` `[in, out]` back to PyTorch's `[out, in]`.
pub fn host_linear(w: &Tensor<2>) -> HostTensor {
    HostTensor::from_tensor(w.clone()).transposed()
}
