//! Selective precision (paper, section 2.4): the model may compute in bf16 or f16, while the
//! router, its softmax and the losses always run in f32. Parameters stay f32 (master weights:
//! the optimizer and checkpoints see f32); they are cast to the compute type where used.

use burn::nn::Linear;
use burn::tensor::{DType, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use super::ops::LN_EPS;
pub(crate) use super::ops::cast_to;

/// Compute type of the model's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit floats (labml).
    #[default]
    F32,
    /// bfloat16 activations.
    Bf16,
    /// IEEE half-precision activations.
    F16,
}

impl Precision {
    /// Burn's float type for this precision.
    pub(crate) fn dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        }
    }
}

/// `t` in f32.
pub(crate) fn f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    cast_to(t, DType::F32)
}

/// `l.forward(x)` computed in `x`'s dtype, as [`linear_rows`] on every backend.
pub(crate) fn linear<const D: usize>(l: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let weight = cast_to(l.weight.val(), dtype);
    let bias = l.bias.as_ref().map(|b| cast_to(b.val(), dtype));
    linear_rows(x, weight, bias)
}

/// `x W + b` with `x`'s leading dimensions folded into rows: `[rows, d_in] x [d_in, d_out]`,
/// then `+ b` broadcast from `[1, d_out]`, then the leading dimensions back. What it is for,
/// on GPU backends under Burn's fusion: the bias is reshaped *before* the matmul is issued, so
/// the add directly follows the matmul and fuses into its output (Burn's own `linear` reshapes
/// the bias in between, which leaves the add a kernel of its own); and the weight gradient is
/// one `[d_in, rows] x [rows, d_out]` matmul instead of a batched one summed over the batch.
/// On the CPU: Burn 0.22's `linear` keeps `[batch, seq, d]` inputs batched when `seq` is a
/// multiple of 32, and the flex backend then runs one gemm per sequence (32 products of 64
/// rows at the reference configuration, each packing the same weight); one product over all
/// rows made a training step about 5% faster there (`switch bench`, 2-core AMD EPYC with
/// AVX-512, fastest steps 84-92 against 86-98 ms over five alternating runs).
pub fn linear_rows<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let bias = bias.map(|b| b.reshape([1, d_out]));
    let y = x.reshape([rows, d_in]).matmul(weight);
    let y = match bias {
        Some(b) => y + b,
        None => y,
    };
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}

/// LayerNorm computed in f32 (its statistics need the range), returned in `x`'s dtype.
/// (Fused on the CPU: [`super::ops::layer_norm`]; every norm of the model has epsilon
/// [`LN_EPS`].)
pub(crate) fn layer_norm<const D: usize>(ln: &burn::nn::LayerNorm, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let norm = |x: Tensor<D>| match &ln.beta {
        Some(beta) => super::ops::layer_norm(x, ln.gamma.val(), beta.val(), LN_EPS),
        None => ln.forward(x),
    };
    if dtype == DType::F32 {
        return norm(x);
    }
    cast_to(norm(f32(x)), dtype)
}

/// An error if `device` cannot compute in `precision` (WGSL, say, has no bf16).
pub(crate) fn check_device(
    precision: Precision,
    device: &burn::tensor::Device,
) -> anyhow::Result<()> {
    if device.supports_dtype(precision.dtype()) {
        Ok(())
    } else {
        anyhow::bail!(
            "this device does not support {precision:?} tensors: set model.precision to f32 or \
             another type the backend supports (wgpu has f16 but no bf16)"
        )
    }
}
