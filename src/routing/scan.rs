//! An inclusive prefix sum down the rows of an int tensor in O(rows x cols x BLOCK) work, for
//! the device routing decision.
//!
//! Burn 0.22.1's `cumsum` on GPU backends (burn-cubecl's `cumulative_kernel`) has every output
//! re-read every element before it along the summed dimension: O(n^2) per column, which at
//! 128k tokens is 8G reads per expert. Here the rows are cut into blocks of [`BLOCK`]:
//!
//! ```text
//! x: [n, c] -> [n/B, B, c];  inner = cumsum within each block      (B reads per element)
//! totals_b = inner[b, B-1, :];  before_b = scan(totals)_b - totals_b (the same, recursively)
//! out = inner + before (broadcast over the block)
//! ```
//! Every level divides the rows by `B`, so the whole is O(n x c x B) reads in
//! `1 + log_B(n)` levels of a few kernels each. Integers throughout: the result is exactly
//! `cumsum`'s.

use burn::tensor::{Int, Tensor};

/// Rows per block. Each output element reads at most this many inputs; 2k tokens take two
/// levels, 32k three.
pub(crate) const BLOCK: usize = 128;

/// Inclusive prefix sum of `x: [n, c]` along dimension 0 (what `x.cumsum(0)` computes).
pub(crate) fn cumsum_rows(x: Tensor<2, Int>) -> Tensor<2, Int> {
    let [n, c] = x.dims();
    if n <= BLOCK {
        return x.cumsum(0);
    }
    let blocks = n.div_ceil(BLOCK);
    let padded = blocks * BLOCK;
    let x = if padded == n {
        x
    } else {
        let zeros = Tensor::<2, Int>::zeros([padded - n, c], &x.device());
        Tensor::cat(vec![x, zeros], 0)
    };
    let inner = x.reshape([blocks, BLOCK, c]).cumsum(1);
    let totals: Tensor<2, Int> = inner
        .clone()
        .slice([0..blocks, BLOCK - 1..BLOCK, 0..c])
        .reshape([blocks, c]);
    let before = cumsum_rows(totals.clone()) - totals;
    let out = inner + before.reshape([blocks, 1, c]).expand([blocks, BLOCK, c]);
    let out = out.reshape([padded, c]);
    if padded == n { out } else { out.slice(0..n) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn host_cumsum(v: &[i64], n: usize, c: usize) -> Vec<i64> {
        let mut out = v.to_vec();
        for r in 1..n {
            for j in 0..c {
                out[r * c + j] += out[(r - 1) * c + j];
            }
        }
        out
    }

    #[test]
    fn equals_a_plain_prefix_sum_at_every_size() {
        let device = Device::flex();
        // One level, a partial block, exact blocks, two and three levels with padding.
        for (n, c) in [
            (1, 1),
            (7, 3),
            (128, 2),
            (129, 4),
            (256, 1),
            (1000, 5),
            (20_000, 3),
        ] {
            let v: Vec<i64> = (0..n * c)
                .map(|i| ((i * 7919 + n) % 5) as i64 - 1)
                .collect();
            let x = Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [n, c]), &device);
            let got: Vec<i64> = cumsum_rows(x)
                .into_data()
                .convert::<i64>()
                .try_to_vec()
                .unwrap();
            assert_eq!(got, host_cumsum(&v, n, c), "n = {n}, c = {c}");
        }
    }
}
