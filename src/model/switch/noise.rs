//! The run's seeded noise on the host, as tensors: the router jitter and dropout masks come
//! from the run's generator, which checkpoints save, so runs with them resume exactly.

use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;

use crate::routing::RoutingRng;

/// Uniform noise in `[lo, hi)` drawn from the run's generator (so runs and resumes reproduce).
pub(crate) fn uniform_tensor<const D: usize>(
    rng: &mut RoutingRng,
    shape: [usize; D],
    lo: f64,
    hi: f64,
    device: &Device,
) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(lo as f32..hi as f32))
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Inverted-dropout mask: 0 with probability `p`, else `1 / (1 - p)`.
pub(crate) fn dropout_mask<const D: usize>(
    rng: &mut RoutingRng,
    shape: [usize; D],
    p: f64,
    device: &Device,
) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let keep = (1.0 / (1.0 - p)) as f32;
    let v: Vec<f32> = (0..n)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}
