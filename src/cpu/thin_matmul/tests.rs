use super::*;
use crate::cpu::test_values as values;

/// `x W` in f64, the obvious way.
fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; m * n];
    for r in 0..m {
        for kk in 0..k {
            for j in 0..n {
                y[r * n + j] += x[r * k + kk] as f64 * w[kk * n + j] as f64;
            }
        }
    }
    y
}

/// Every instruction set this CPU has, every shape class (rows below and above a tile,
/// columns with and without a partial tile and a portable tail, `k` across blocks),
/// f32 and bf16 weights, one and several threads' worth of work: within 1e-5 of f64
/// (relative to the sum of |terms|).
#[test]
fn every_path_computes_x_times_w() {
    let shapes = [
        (1, 1, 1),
        (1, 7, 5),
        (1, 33, 16),
        (3, 40, 24),
        (4, 64, 64),
        (5, 17, 100),
        (9, 200, 72),
        (16, 96, 1030),
        (2, 768, 776),
        (12, 300, 520),
    ];
    for isa in Isa::available() {
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            let x = values(m * k, s as u32);
            let w = values(k * n, 100 + s as u32);
            let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let widened: Vec<f32> = bits.iter().map(|&b| widen_bf16(b)).collect();
            let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            for (weights, wf) in [(Weights::F32(&w), &w), (Weights::Bf16(&bits), &widened)] {
                let got = thin_matmul_host(isa, &x, m, k, weights, n);
                let want = reference(&x, m, k, wf, n);
                let abs_w: Vec<f32> = wf.iter().map(|v| v.abs()).collect();
                let scale = reference(&abs_x, m, k, &abs_w, n);
                for i in 0..m * n {
                    let err = (got[i] as f64 - want[i]).abs();
                    assert!(
                        err <= 1e-5 * scale[i].max(1.0),
                        "{isa:?} {m}x{k}x{n} {weights:?}: y[{i}] = {} against {}",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

/// The vector paths add the terms of each output in the same order as the portable one:
/// with products exact in f32 (small integers) every path gives the same bits.
#[test]
fn the_paths_agree_exactly_on_exact_products() {
    let (m, k, n) = (6, 300, 90);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
    let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
    let want = thin_matmul_host(Isa::Portable, &x, m, k, Weights::F32(&w), n);
    for isa in Isa::available() {
        assert_eq!(
            thin_matmul_host(isa, &x, m, k, Weights::F32(&w), n),
            want,
            "{isa:?}"
        );
    }
}

/// The pieces cover every weight once, in row blocks whose partial sums are added in
/// order; whole-vector pieces first in each block.
#[test]
fn pieces_cover_the_weights_once() {
    for &(m, k, n) in &[
        (1, 768, 768),
        (4, 768, 32128),
        (1, 3072, 768),
        (2, 5, 7),
        (64, 768, 3000),
    ] {
        for (lanes, tile) in [(16, 4), (8, 2)] {
            let parts = split(m, k, n, lanes, tile);
            let mut seen = vec![0u8; k * n];
            for p in &parts {
                for kk in p.k0..p.k1 {
                    for j in p.j0..p.j0 + p.width {
                        seen[kk * n + j] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{m}x{k}x{n}: {parts:?}");
            assert!(parts.windows(2).all(|w| w[0].k0 <= w[1].k0));
        }
    }
}

/// From two register tiles of rows on, a product is cut by columns only: every piece runs
/// over all of `k` (no partial sums), in ranges of about `COLUMN_WIDTH`; with fewer rows,
/// the same weights are cut into row blocks as before.
#[test]
fn products_of_many_rows_are_cut_by_columns() {
    for (lanes, tile) in [(16, 4), (8, 2)] {
        let parts = split(COLUMN_ROWS, 768, 3072, lanes, tile);
        assert_eq!(parts.len(), 3072 / COLUMN_WIDTH, "{parts:?}");
        assert!(
            parts
                .iter()
                .all(|p| p.k0 == 0 && p.k1 == 768 && p.width == COLUMN_WIDTH)
        );
        let parts = split(64, 3072, 770, lanes, tile);
        assert!(parts.iter().all(|p| p.k0 == 0 && p.k1 == 3072), "{parts:?}");
        assert_eq!(parts.last().map(|p| p.width), Some(2), "the tail piece");
        let fewer = split(COLUMN_ROWS - 1, 768, 3072, lanes, tile);
        assert!(fewer.iter().any(|p| p.k0 > 0), "{fewer:?}");
    }
}

// `g W^T` (`transposed.rs`): the input gradient of `x W`.

/// `g W^T` in f64, the obvious way, and the same over |terms| (the error's scale).
fn reference_t(g: &[f32], m: usize, n: usize, w: &[f32], k: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut scale) = (vec![0.0f64; m * k], vec![0.0f64; m * k]);
    for i in 0..m {
        for c in 0..k {
            for j in 0..n {
                let t = g[i * n + j] as f64 * w[c * n + j] as f64;
                y[i * k + c] += t;
                scale[i * k + c] += t.abs();
            }
        }
    }
    (y, scale)
}

/// Every instruction set this CPU has, rows below and above a tile and not a multiple of
/// it, `W` rows that leave a partial tile and a partial piece, columns with a tail, one
/// and several threads' worth of work: within 1e-5 of f64 (relative to the sum of |terms|).
#[test]
fn every_path_computes_g_times_w_transposed() {
    let shapes = [
        (1, 1, 1),
        (1, 5, 7),
        (3, 24, 40),
        (4, 64, 64),
        (5, 100, 17),
        (9, 72, 203),
        (8, 3072, 50),
        (32, 768, 70),
        (12, 520, 300),
    ];
    for isa in Isa::available() {
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            let g = values(m * n, s as u32);
            let w = values(k * n, 100 + s as u32);
            let got = thin_matmul_t_host(isa, &g, m, n, &w, k);
            let (want, scale) = reference_t(&g, m, n, &w, k);
            for i in 0..m * k {
                let err = (got[i] as f64 - want[i]).abs();
                assert!(
                    err <= 1e-5 * scale[i].max(1.0),
                    "{isa:?} {m}x{n} by {k}x{n}: y[{i}] = {} against {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
}

/// With products exact in f32 (small integers) every path gives the same bits, and a
/// thread count of one the same as the pool's.
#[test]
fn the_paths_and_thread_counts_agree_exactly_on_exact_products() {
    let (m, n, k) = (6, 300, 90);
    let g: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
    let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
    let want = thin_matmul_t_host(Isa::Portable, &g, m, n, &w, k);
    for isa in Isa::available() {
        assert_eq!(thin_matmul_t_host(isa, &g, m, n, &w, k), want, "{isa:?}");
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let alone = one.install(|| thin_matmul_t_host(isa, &g, m, n, &w, k));
        assert_eq!(alone, want, "{isa:?} on one thread");
    }
}
