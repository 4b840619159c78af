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

/// Values per block of [`block_dropout_mask`]: each block has its own generator stream.
const MASK_BLOCK: usize = 1 << 16;

/// Inverted-dropout mask like [`dropout_mask`] (0 with probability `p`, else `1 / (1 - p)`),
/// drawn on every core: one draw of `rng` seeds ChaCha8, and block `i` of [`MASK_BLOCK`]
/// values reads its stream `i`, one `u32` per value (dropped when below `p * 2^32`). The mask
/// depends on the seed alone, not on the thread count; a quarter of the key stream of
/// [`dropout_mask`]'s `f64` per value.
pub(crate) fn block_dropout_mask<const D: usize>(
    rng: &mut RoutingRng,
    shape: [usize; D],
    p: f64,
    device: &Device,
) -> Tensor<D> {
    use rand::{RngCore, SeedableRng};
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    let seed: u64 = rng.random();
    let keep = (1.0 / (1.0 - p)) as f32;
    let threshold = (p * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    let mut v = vec![0.0f32; n];
    v.par_chunks_mut(MASK_BLOCK)
        .enumerate()
        .for_each(|(i, block)| {
            let mut r = RoutingRng::seed_from_u64(seed);
            r.set_stream(i as u64);
            for x in block {
                *x = if r.next_u32() < threshold { 0.0 } else { keep };
            }
        });
    Tensor::from_data(TensorData::new(v, shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn mask(seed: u64, n: usize, p: f64) -> Vec<f32> {
        let mut rng = RoutingRng::seed_from_u64(seed);
        let t = block_dropout_mask(&mut rng, [n], p, &Device::default());
        crate::store::host_f32(t)
    }

    #[test]
    fn block_masks_drop_their_fraction_and_scale_the_rest() {
        let n = 3 * MASK_BLOCK + 123;
        for p in [0.1, 0.5] {
            let m = mask(7, n, p);
            let keep = (1.0 / (1.0 - p)) as f32;
            assert!(m.iter().all(|&x| x == 0.0 || x == keep));
            let dropped = m.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
            // Binomial sd at n = 196k is under 0.0012.
            assert!((dropped - p).abs() < 0.006, "p {p}: dropped {dropped}");
        }
        assert_ne!(mask(7, n, 0.1), mask(8, n, 0.1));
    }

    #[test]
    fn block_masks_do_not_depend_on_the_thread_count() {
        let n = 5 * MASK_BLOCK + 9;
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| mask(3, n, 0.1));
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| mask(3, n, 0.1));
        assert_eq!(one, three);
        // Each block reads its own stream: blocks differ.
        assert_ne!(one[..MASK_BLOCK], one[MASK_BLOCK..2 * MASK_BLOCK]);
    }
}
