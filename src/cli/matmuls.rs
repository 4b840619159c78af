//! Matrix products as training meets them (`switch bench --matmuls`): for each shape, `y = x W`
//! with `x` `[m, k]` and `W` `[k, n]`, its backward products `dX = dY W^T` and `dW = X^T dY`,
//! through Burn's autodiff on the device; 6 m k n flops per forward and backward. Each shape is
//! timed both ways, alternating: as the Hugging Face models' linear layers compute it
//! ([`switch_transformer::hf::matmul2`]: the project's kernels on the CPU with few rows) and
//! with Burn's matmul alone. With a count per shape (how many such products one update has)
//! the total says how long an update spends in them, and the slowest shapes say where a
//! kernel would pay.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Distribution, Tensor};

/// The products of one fine-tuning update of a switch-base-8-shaped model (d_model 768, d_ff
/// 3072, 12 + 12 blocks, every other FFN 8 experts, vocabulary 32128) at batch 4 of 64 input
/// and 16 target tokens, as `benchmarks/finetune.sh` runs it: an expert's share is the tokens
/// over 8 experts.
const FINETUNE: &[(&str, usize, usize, usize, usize)] = &[
    ("encoder attention", 256, 768, 768, 48),
    ("encoder ffn wi", 256, 768, 3072, 6),
    ("encoder ffn wo", 256, 3072, 768, 6),
    ("encoder expert wi", 32, 768, 3072, 48),
    ("encoder expert wo", 32, 3072, 768, 48),
    ("decoder attention q/o", 64, 768, 768, 48),
    ("decoder cross k/v", 256, 768, 768, 24),
    ("decoder ffn wi", 64, 768, 3072, 6),
    ("decoder ffn wo", 64, 3072, 768, 6),
    ("decoder expert wi", 8, 768, 3072, 48),
    ("decoder expert wo", 8, 3072, 768, 48),
    ("lm_head", 64, 768, 32128, 1),
];

/// A shape: its name, `m`, `k`, `n`, and how many such products an update has.
pub type Shape = (String, usize, usize, usize, usize);

/// One shape's timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatmulTiming {
    /// What it is.
    pub name: String,
    /// Rows of `x`.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Columns of `W`.
    pub n: usize,
    /// Products of this shape per update.
    pub count: usize,
    /// Forward and backward as the models compute it, median milliseconds.
    pub ms: f64,
    /// 6 m k n / time.
    pub gflop_per_s: f64,
    /// The same with Burn's matmul, median milliseconds.
    pub burn_ms: f64,
}

/// The shapes `spec` names: `finetune` (one fine-tuning update, see [`FINETUNE`]), or
/// comma-separated `MxKxN` with an optional `:COUNT`.
pub fn parse(spec: &str) -> Result<Vec<Shape>> {
    if spec == "finetune" {
        return Ok(FINETUNE
            .iter()
            .map(|&(name, m, k, n, c)| (name.to_string(), m, k, n, c))
            .collect());
    }
    spec.split(',')
        .map(|s| {
            let (dims, count) = match s.split_once(':') {
                Some((d, c)) => (d, c.parse().with_context(|| format!("count in `{s}`"))?),
                None => (s, 1),
            };
            let v: Vec<usize> = dims
                .split('x')
                .map(|x| x.parse::<usize>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("`{s}` is not MxKxN[:COUNT]"))?;
            let [m, k, n] = v[..] else {
                bail!("`{s}` is not MxKxN[:COUNT] (three sizes)");
            };
            if m * k * n == 0 {
                bail!("`{s}`: every size must be at least 1");
            }
            Ok((dims.to_string(), m, k, n, count))
        })
        .collect()
}

/// Times each shape on `device`, ours and Burn's alternating: `warmup` runs of each, then the
/// medians of `steps`.
pub fn time(shapes: &[Shape], device: &Device, steps: usize, warmup: usize) -> Vec<MatmulTiming> {
    let ad = device.clone().autodiff();
    shapes
        .iter()
        .map(|(name, m, k, n, count)| {
            let (m, k, n) = (*m, *k, *n);
            let x = Tensor::<2>::random([m, k], Distribution::Default, &ad).require_grad();
            let w = Tensor::<2>::random([k, n], Distribution::Default, &ad).require_grad();
            let dy = Tensor::<2>::random([m, n], Distribution::Default, &ad);
            let run = |ours: bool| {
                let t = Instant::now();
                let y = if ours {
                    switch_transformer::hf::matmul2(x.clone(), &w)
                } else {
                    x.clone().matmul(w.clone())
                };
                let mut grads = (y * dy.clone()).sum().backward();
                let dx = x.grad_remove(&mut grads).expect("x takes part");
                let dw = w.grad_remove(&mut grads).expect("w takes part");
                // Reading back waits for the device.
                std::hint::black_box((dx.into_data(), dw.into_data()));
                t.elapsed().as_secs_f64()
            };
            for _ in 0..warmup {
                run(true);
                run(false);
            }
            let (mut ours, mut burn): (Vec<f64>, Vec<f64>) =
                (0..steps.max(1)).map(|_| (run(true), run(false))).unzip();
            let median = |t: &mut Vec<f64>| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            };
            let (s, burn) = (median(&mut ours), median(&mut burn));
            MatmulTiming {
                name: name.clone(),
                m,
                k,
                n,
                count: *count,
                ms: s * 1e3,
                gflop_per_s: 6.0 * (m * k * n) as f64 / s / 1e9,
                burn_ms: burn * 1e3,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_are_refused() {
        let s = parse("8x768x3072:48,2x3x4").unwrap();
        assert_eq!(s[0], ("8x768x3072".to_string(), 8, 768, 3072, 48));
        assert_eq!(s[1], ("2x3x4".to_string(), 2, 3, 4, 1));
        assert_eq!(parse("finetune").unwrap().len(), FINETUNE.len());
        for bad in ["8x768", "8x0x3", "axbxc", "2x3x4:x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let t = time(&s[1..], &Device::default(), 2, 1);
        assert!(t[0].ms > 0.0 && t[0].gflop_per_s > 0.0 && t[0].burn_ms > 0.0);
    }
}
