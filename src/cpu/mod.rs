//! The CPU fast paths: kernels with hand-written backward on Burn's `flex` backend for the
//! parts of a step that Burn runs as chains of small ops (causal attention per head with its
//! softmax, or the softmax alone under the composed attention, LayerNorm, the experts' FFN
//! over rows grouped by expert), and the fused Adam update.
//!
//! Whether a fast path applies is decided once for a device ([`crate::device::Paths`]:
//! `host_kernels`) and here for a tensor (`applies`: f32 on such a device, with or without
//! autodiff).
//! Each kernel returns `None` where it does not apply, and its caller in
//! [`crate::model::ops`] then runs the same function composed from Burn ops, which is what
//! every other backend runs and what the tests compare the kernels with. [`runs`] counts the
//! kernels this thread has run, so that a test can prove that the fast path ran.
//!
//! Each kernel is registered with Burn's autodiff as one node: one pass forward and one
//! backward where Burn takes about 7 and 9 for the softmax, 8 and ~15 for LayerNorm. The
//! softmax and LayerNorm kernels alone took one model at the reference configuration from 165
//! to 126 ms/step.

pub(crate) mod adam;
mod attention;
mod exchange;
mod gemm;
mod grouped_ffn;
mod isa;
mod layer_norm;
mod simd;
mod softmax;
mod thin_linear;
mod thin_matmul;

use std::borrow::Cow;
use std::cell::Cell;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::{Backward, NodeGuard, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{DType, Shape, Tensor, TensorData};

use crate::device::Paths;

pub(crate) use attention::causal_attention;
pub(crate) use exchange::{from_experts, to_experts};
pub(crate) use grouped_ffn::grouped_ffn;
pub use isa::{Isa, check_env};
pub(crate) use layer_norm::layer_norm;
pub use simd::sum_lanes;
pub(crate) use softmax::causal_softmax;

type Ad = Autodiff<Flex, NoCheckpointing>;

/// `f` on a worker thread of the global thread pool. Called from another thread, each parallel
/// op inside `f` would be handed to the pool while the caller sleeps until it is done: a
/// wake-up on the critical path per op. One model at the reference configuration: 42,000 ->
/// 10,000 context switches in 33 steps, 98-102 -> 90-92 ms/step; decoding switch-base-8 in
/// bf16 with one thread, about 200 ops a token: 35.6 -> 52 tokens/s.
///
/// Only for the CPU backend: on `device`s of other backends `f` runs on the calling thread.
/// Their fusion keeps a stream of queued ops per thread, and work that hopped between the
/// caller and whichever pool worker took it raced between streams: on lavapipe under load,
/// 7 of 15 repetitions of the same training computed a different step-4 loss (3.83 or 4.21).
pub fn on_worker<R: Send>(device: &burn::tensor::Device, f: impl FnOnce() -> R + Send) -> R {
    if host_kernels(device) {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// `n` thread pools for `n` replicas that compute side by side on `device`: on the CPU they
/// split the global pool's threads (so that their parallel kernels do not oversubscribe the
/// cores); on other backends one thread each, since their fusion keeps a stream of queued ops
/// per thread and a replica's ops must not hop between them (see [`on_worker`]).
pub(crate) fn replica_pools(
    n: usize,
    device: &burn::tensor::Device,
) -> anyhow::Result<Vec<rayon::ThreadPool>> {
    use anyhow::Context;
    let threads = if host_kernels(device) {
        (rayon::current_num_threads() / n).max(1)
    } else {
        1
    };
    (0..n)
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
        .collect::<Result<_, _>>()
        .context("cannot start the replicas' thread pools")
}

/// Whether the kernels of this module run on `device`'s tensors ([`Paths::host_kernels`]).
fn host_kernels(device: &burn::tensor::Device) -> bool {
    Paths::of(device).host_kernels
}

/// Whether the CPU fast paths apply to `t`: an f32 tensor on the CPU backend.
pub(crate) fn applies<const D: usize>(t: &Tensor<D>) -> bool {
    t.dtype() == DType::F32 && host_kernels(&t.device())
}

/// The kernels of this module, as counted by [`runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Causal multi-head attention ([`crate::model::ops::causal_attention`]), on this level.
    CausalAttention(Isa),
    /// The causal attention softmax ([`crate::model::ops::causal_softmax`]).
    CausalSoftmax,
    /// LayerNorm ([`crate::model::ops::layer_norm`]).
    LayerNorm,
    /// The experts' FFN over grouped rows ([`crate::model::ops::grouped_ffn`]).
    GroupedFfn,
    /// The fused Adam update of one parameter tensor ([`crate::optim::LabmlAdam`]).
    Adam,
    /// The same update done in the parameter's own storage (no other tensor shared it), on
    /// top of [`Kernel::Adam`].
    AdamInPlace,
    /// An exchange of tokens between the ranks of an expert-parallel job, either direction
    /// ([`crate::distributed::ExpertExchange`]).
    ExpertExchange,
    /// A product with few rows that streams the weights ([`thin_matmul`]), on this level.
    ThinMatmul(Isa),
    /// The same product as a graph node of training, its backward included
    /// (`src/cpu/thin_linear.rs`), on this level.
    ThinLinear(Isa),
    /// Of those, the products whose `W` was the transpose of a row-major matrix (a tied
    /// output layer), read where it lies.
    ThinLinearTransposed,
}

/// How many times each kernel has run (forward, or one Adam update) on this thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelRuns {
    /// Causal attention kernels.
    pub causal_attention: u64,
    /// The instruction set of the last of them.
    pub causal_attention_isa: Option<Isa>,
    /// Causal softmax kernels.
    pub causal_softmax: u64,
    /// LayerNorm kernels.
    pub layer_norm: u64,
    /// Grouped expert FFN kernels.
    pub grouped_ffn: u64,
    /// Fused Adam updates (one per parameter tensor).
    pub adam: u64,
    /// Of those, the updates written into the parameter's own storage (no copy).
    pub adam_in_place: u64,
    /// Expert exchanges between ranks (forward).
    pub expert_exchange: u64,
    /// Few-row products (`thin_matmul`).
    pub thin_matmul: u64,
    /// The instruction set of the last of them.
    pub thin_matmul_isa: Option<Isa>,
    /// Few-row products with autodiff (training), forward and backward by the kernels.
    pub thin_linear: u64,
    /// The instruction set of the last of them.
    pub thin_linear_isa: Option<Isa>,
    /// Of those, the products with a transposed `W` read in place (a tied output layer).
    pub thin_linear_transposed: u64,
}

thread_local! {
    static RUNS: Cell<KernelRuns> = const {
        Cell::new(KernelRuns {
            causal_attention: 0,
            causal_attention_isa: None,
            causal_softmax: 0,
            layer_norm: 0,
            grouped_ffn: 0,
            adam: 0,
            adam_in_place: 0,
            expert_exchange: 0,
            thin_matmul: 0,
            thin_matmul_isa: None,
            thin_linear: 0,
            thin_linear_isa: None,
            thin_linear_transposed: 0,
        })
    };
}

/// The kernels this thread has run so far (compare two readings around a call).
pub fn runs() -> KernelRuns {
    RUNS.with(Cell::get)
}

pub(crate) fn count(kernel: Kernel) {
    RUNS.with(|r| {
        let mut v = r.get();
        match kernel {
            Kernel::CausalAttention(isa) => {
                v.causal_attention += 1;
                v.causal_attention_isa = Some(isa);
            }
            Kernel::CausalSoftmax => v.causal_softmax += 1,
            Kernel::LayerNorm => v.layer_norm += 1,
            Kernel::GroupedFfn => v.grouped_ffn += 1,
            Kernel::Adam => v.adam += 1,
            Kernel::AdamInPlace => v.adam_in_place += 1,
            Kernel::ExpertExchange => v.expert_exchange += 1,
            Kernel::ThinMatmul(isa) => {
                v.thin_matmul += 1;
                v.thin_matmul_isa = Some(isa);
            }
            Kernel::ThinLinear(isa) => {
                v.thin_linear += 1;
                v.thin_linear_isa = Some(isa);
            }
            Kernel::ThinLinearTransposed => v.thin_linear_transposed += 1,
        }
        r.set(v)
    });
}

/// The flex tensor behind `t` and, with autodiff, its graph node; `None` unless [`applies`].
fn flex_input<const D: usize>(t: &Tensor<D>) -> Option<(FlexTensor, Option<NodeGuard>)> {
    if !applies(t) {
        return None;
    }
    if t.is_autodiff() {
        let (x, node) = t.clone().try_into_primitive::<Ad>().ok()?.into_parts();
        Some((x, Some(node)))
    } else {
        Some((t.clone().try_into_primitive::<Flex>().ok()?, None))
    }
}

/// `forward` on the flex tensors behind the inputs, when every input has one (see
/// [`flex_input`]): its output, and with autodiff (all inputs tracked) one graph node whose
/// backward is `op` with the state `forward` returned. `None` otherwise.
fn run_kernel<K, const N: usize, const D: usize>(
    kernel: Kernel,
    op: K,
    inputs: [Option<(FlexTensor, Option<NodeGuard>)>; N],
    forward: impl FnOnce([FlexTensor; N]) -> (FlexTensor, K::State),
) -> Option<Tensor<D>>
where
    K: Backward<Flex, N>,
{
    let (tensors, nodes): (Vec<_>, Vec<_>) = inputs
        .into_iter()
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .unzip();
    let tensors: [FlexTensor; N] = tensors.try_into().ok()?;
    if nodes.iter().all(Option::is_none) {
        count(kernel);
        return Some(Tensor::from_primitive::<Flex>(forward(tensors).0));
    }
    let nodes: [NodeGuard; N] = nodes
        .into_iter()
        .collect::<Option<Vec<_>>>()?
        .try_into()
        .ok()?;
    count(kernel);
    let (y, state) = forward(tensors);
    let y = match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Ad>(y))
}

/// Rows up to which [`thin_matmul`] takes a product (above, packing `W` pays for itself).
pub(crate) const THIN_MAX_ROWS: usize = 64;

/// `x W` for `x` `[m, k]` with at most [`THIN_MAX_ROWS`] rows and `W` `[k, n]` (f32 or bf16,
/// contiguous), both on the CPU backend, streaming `W` (`src/cpu/thin_matmul.rs`); with
/// autodiff (training, f32) one graph node whose backward reads `W` in place too
/// (`src/cpu/thin_linear.rs`). `None` where it does not apply, and the caller runs Burn's
/// matmul.
pub(crate) fn thin_matmul(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    use half::slice::HalfFloatSliceExt;

    let ([m, k], [k_w, n]) = (x.dims(), w.dims());
    if m == 0 || m > THIN_MAX_ROWS || k != k_w {
        return None;
    }
    if x.is_autodiff() || w.is_autodiff() {
        return thin_linear::thin_linear(x, w);
    }
    if !applies(x) || !host_kernels(&w.device()) {
        return None;
    }
    let xf = x.clone().try_into_primitive::<Flex>().ok()?;
    let wf = w.clone().try_into_primitive::<Flex>().ok()?;
    if !wf.is_contiguous() {
        return None;
    }
    let start = wf.layout().start_offset();
    let weights = match w.dtype() {
        DType::F32 => thin_matmul::Weights::F32(&wf.storage::<f32>()[start..start + k * n]),
        DType::BF16 => thin_matmul::Weights::Bf16(
            wf.storage::<half::bf16>()[start..start + k * n].reinterpret_cast(),
        ),
        _ => return None,
    };
    let isa = Isa::selected();
    count(Kernel::ThinMatmul(isa));
    let y = thin_matmul::thin_matmul_host(isa, &values(&xf), m, k, weights, n);
    Some(Tensor::from_primitive::<Flex>(new_tensor(
        y,
        Shape::new([m, n]),
    )))
}

/// The `n` f32 values of `t`, contiguous (copied only when `t` is strided).
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    let n = t.layout().shape().num_elements();
    if t.is_contiguous() {
        let start = t.layout().start_offset();
        Cow::Borrowed(&t.storage::<f32>()[start..start + n])
    } else {
        Cow::Owned(t.to_contiguous().storage::<f32>()[..n].to_vec())
    }
}

fn new_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `len` pseudo-random values in [-1, 1] (xorshift from `seed`), for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}
