//! The machine's memory read bandwidth, as decoding meets it: a buffer far larger than the
//! caches summed by every thread (contiguous blocks, vector partial sums), best of several
//! passes. Decoding one token at batch 1 reads every weight it uses once, so bytes of weights
//! per token over this figure bounds its speed (`benchmarks/cpu.sh` reports the fraction).

use std::time::Instant;

use rayon::prelude::*;

/// What one measurement found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bandwidth {
    /// Bytes read per pass.
    pub bytes: usize,
    /// Rayon threads reading.
    pub threads: usize,
    /// Best pass, GB/s (1e9 bytes).
    pub read_gb_per_s: f64,
}

/// Reads a buffer of `mib` MiB `passes` times with all of rayon's threads.
pub fn measure(mib: usize, passes: usize) -> Bandwidth {
    let n = (mib << 20) / 4;
    let data: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut best = f64::INFINITY;
    let mut total = 0.0f32;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        total += data
            .par_chunks(1 << 18)
            .map(|c| switch_transformer::cpu::sum_lanes(c, c, c, |a, _, _| a))
            .sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(total);
    Bandwidth {
        bytes: n * 4,
        threads: rayon::current_num_threads(),
        read_gb_per_s: (n * 4) as f64 / best / 1e9,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_small_buffer_is_read_and_timed() {
        let b = super::measure(4, 2);
        assert_eq!(b.bytes, 4 << 20);
        assert!(b.read_gb_per_s.is_finite() && b.read_gb_per_s > 0.0);
    }
}
