//! What a run will need in memory, estimated before anything is allocated, so that a
//! configuration that cannot fit (`model.d_model=1000000`, `model.n_experts=100000`) is a clear
//! error instead of a process the kernel kills after it has eaten the machine's memory.
//!
//! ```text
//! state       = 4 floats per parameter: weight, gradient, Adam's two moments
//! activations = per block: attention scores and softmax (3 B H S^2), projections and norms
//!               (12 T d), the experts' hidden units at capacity (3 k T f cf), the router (3 T E);
//!               the logits (3 T V); T = B S tokens. Kept for the backward pass, f32.
//! ```
//! An estimate (within a factor of about 2 of the measured peak at the reference
//! configuration: 193 MB estimated, 231 MB peak RSS including the program and the data).

use anyhow::{Result, bail};

use super::config::RunConfig;

/// Bytes a run of `c` needs for its parameters' state and for the activations of one step.
pub(crate) fn estimate(c: &RunConfig) -> (u64, u64) {
    let m = &c.model;
    let f32b = 4u64;
    let params = m.num_params() as u64;
    let state = 4 * params * f32b;
    let (b, s) = (c.train.batch_size as u64, c.train.seq_len as u64);
    let t = b * s;
    let (d, f, h) = (m.d_model as u64, m.expert_width() as u64, m.heads as u64);
    let (e, k, v) = (m.n_experts as u64, m.top_k as u64, m.n_vocab as u64);
    let cf = m.capacity_factor.max(1.0);
    let shared = m.switch_config().shared_width() as u64;
    let per_block = 3 * b * h * s * s
        + 12 * t * d
        + (3.0 * (k * t * f) as f64 * cf) as u64
        + 2 * t * shared
        + 3 * t * e;
    let activations = (m.n_layers as u64 * per_block + 3 * t * v) * f32b;
    (state, activations)
}

/// Memory available to a new process, from `/proc/meminfo` (`None` where it cannot be read).
pub fn available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An error if `c` needs more memory than `available` bytes.
pub fn check_fits(c: &RunConfig, available: Option<u64>) -> Result<()> {
    let (state, activations) = estimate(c);
    let need = state + activations;
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    tracing::debug!(
        "memory estimate: {:.2} GiB of weights, gradients and moments, {:.2} GiB of activations; \
         {:?} bytes available",
        gib(state),
        gib(activations),
        available
    );
    if let Some(avail) = available
        && need > avail
    {
        bail!(
            "this configuration needs about {:.1} GiB ({} parameters: {:.1} GiB for weights, \
             gradients and Adam's moments; {:.1} GiB of activations per step) but {:.1} GiB is \
             available: lower model.d_model, model.d_ff, model.n_experts, model.n_layers or \
             train.batch_size",
            gib(need),
            c.model.num_params(),
            gib(state),
            gib(activations),
            gib(avail)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_fits_and_huge_models_do_not() {
        let c = RunConfig::default();
        let (state, act) = estimate(&c);
        // 2,001,497 parameters x 16 bytes; activations of a 32 x 64 batch.
        assert_eq!(state, 2_001_497 * 16);
        assert!((20 << 20..400 << 20).contains(&act), "{act}");
        check_fits(&c, Some(1 << 30)).unwrap();
        check_fits(&c, None).unwrap();
        for key in ["model.d_model=1000000", "model.n_experts=100000"] {
            let mut c = RunConfig::default();
            c.set(key).unwrap();
            let err = check_fits(&c, Some(24 << 30)).unwrap_err().to_string();
            assert!(err.contains("needs about") && err.contains("GiB"), "{err}");
        }
    }
}
