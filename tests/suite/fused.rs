//! The CPU kernels (`switch_transformer::cpu`, called through `switch_transformer::model::ops`)
//! against the same functions composed from Burn ops, on random inputs: outputs and every
//! gradient, with and without autodiff, on contiguous and strided inputs, below and above the
//! size where the kernels go parallel. Every comparison first proves that the kernel ran
//! (`cpu::runs`) and that the reference did not. Tolerance: 2e-6 relative to each tensor's
//! largest magnitude (f32 rounding, different summation order).

use crate::common;

use burn::tensor::{Device, Distribution, Tensor};
use switch_transformer::cpu::{self, KernelRuns};
use switch_transformer::model::ops::{
    LN_EPS, causal_attention, causal_attention_generic, causal_softmax, causal_softmax_generic,
    layer_norm, layer_norm_generic,
};

const TOL: f64 = 2e-6;

/// `f()`, asserting that it ran the kernel counted by `count` exactly `times` times.
fn ran<R>(count: fn(&KernelRuns) -> u64, times: u64, f: impl FnOnce() -> R) -> R {
    let before = count(&cpu::runs());
    let out = f();
    let after = count(&cpu::runs());
    assert_eq!(after - before, times, "kernel runs");
    out
}

/// Kernel counters.
fn attention_runs(r: &KernelRuns) -> u64 {
    r.causal_attention
}
fn softmax_runs(r: &KernelRuns) -> u64 {
    r.causal_softmax
}
fn layer_norm_runs(r: &KernelRuns) -> u64 {
    r.layer_norm
}
fn grouped_ffn_runs(r: &KernelRuns) -> u64 {
    r.grouped_ffn
}
fn thin_linear_runs(r: &KernelRuns) -> u64 {
    r.thin_linear
}
fn thin_linear_transposed_runs(r: &KernelRuns) -> u64 {
    r.thin_linear_transposed
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn assert_close(a: Vec<f64>, b: Vec<f64>, what: &str) {
    let err = common::max_rel_err(&a, &b);
    assert!(err <= TOL, "{what}: relative error {err:e} > {TOL:e}");
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 2.0), device)
}

/// Output and the gradients of `q`, `k` and `v` of the attention kernel against its
/// composition from Burn ops (batched matmuls around the causal softmax), for `[b, s, d]`
/// inputs with `h` heads; then the forward alone without autodiff.
fn check_attention([b, s, d]: [usize; 3], h: usize) {
    let device = Device::default().autodiff();
    let raw = [0; 3].map(|_| random([b, s, d], &device));
    let g = random([b, s, d], &device);
    let scale = 1.0 / ((d / h) as f64).sqrt();
    let run = |fused: bool| {
        let [q, k, v] = raw.clone().map(|t| t.detach().require_grad());
        let y = if fused {
            ran(attention_runs, 1, || {
                causal_attention(q.clone(), k.clone(), v.clone(), h, scale)
            })
        } else {
            ran(attention_runs, 0, || {
                causal_attention_generic(q.clone(), k.clone(), v.clone(), h, scale)
            })
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        let grad = |t: &Tensor<3>| host(t.grad(&grads).unwrap());
        [host(y.clone()), grad(&q), grad(&k), grad(&v)]
    };
    let (ours, theirs) = (run(true), run(false));
    assert_eq!(cpu::runs().causal_attention_isa, Some(cpu::Isa::selected()));
    let what = format!("causal attention {b}x{s}x{d}, {h} heads");
    for (name, (a, r)) in ["output", "q gradient", "k gradient", "v gradient"]
        .iter()
        .zip(ours.into_iter().zip(theirs))
    {
        assert_close(a, r, &format!("{what}: {name}"));
    }
    let plain = Device::default();
    let [q, k, v] = raw.map(|t| Tensor::<3>::from_data(t.into_data(), &plain));
    assert_close(
        host(ran(attention_runs, 1, || {
            causal_attention(q.clone(), k.clone(), v.clone(), h, scale)
        })),
        host(causal_attention_generic(q, k, v, h, scale)),
        "causal attention without autodiff",
    );
}

#[test]
fn causal_attention_matches_burn_ops() {
    check_attention([1, 1, 4], 1);
    check_attention([2, 5, 12], 3); // below the parallel threshold, 4-wide heads
    check_attention([3, 37, 48], 2); // rows and columns that leave partial tiles
    check_attention([32, 64, 128], 4); // the reference configuration's attention
}

/// Forward and input gradient of both softmax versions for scores of `shape` (`transposed`:
/// the scores are a strided view, as `k q^T` swapped back).
fn check_softmax(shape: [usize; 4], transposed: bool) {
    let device = Device::default().autodiff();
    let [b, h, s, _] = shape;
    let raw = random(shape, &device);
    let g = random(shape, &device);
    let scale = 0.37;
    let run = |fused: bool| {
        let x = raw.clone().detach().require_grad();
        let input = if transposed {
            x.clone().swap_dims(2, 3)
        } else {
            x.clone()
        };
        let y = if fused {
            ran(softmax_runs, 1, || causal_softmax(input, scale))
        } else {
            ran(softmax_runs, 0, || causal_softmax_generic(input, scale))
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        (host(y), host(x.grad(&grads).unwrap()))
    };
    let ((y, dx), (y_ref, dx_ref)) = (run(true), run(false));
    let what = format!("causal softmax {b}x{h}x{s}x{s} transposed={transposed}");
    assert_close(y.clone(), y_ref, &format!("{what}: output"));
    assert_close(dx, dx_ref, &format!("{what}: gradient"));
    // Later keys get exactly zero weight; each row sums to 1.
    for (r, row) in y.chunks(s).enumerate() {
        let i = r % s;
        assert!(
            row[i + 1..].iter().all(|&v| v == 0.0),
            "row {r} attends ahead"
        );
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    }
    // Without autodiff (evaluation, generation) the forward is the same.
    let plain = Device::default();
    let x = Tensor::<4>::from_data(raw.clone().into_data(), &plain);
    assert_close(
        host(ran(softmax_runs, 1, || causal_softmax(x.clone(), scale))),
        host(causal_softmax_generic(x, scale)),
        &format!("{what}: output without autodiff"),
    );
}

#[test]
fn causal_softmax_matches_burn_ops() {
    check_softmax([1, 1, 1, 1], false);
    check_softmax([2, 3, 5, 5], false); // below the parallel threshold
    check_softmax([16, 4, 64, 64], false); // the reference configuration's attention
    check_softmax([3, 2, 40, 40], true);
}

/// Forward and the gradients of x, gamma and beta for input `shape` (last dim = d).
fn check_layer_norm<const D: usize>(shape: [usize; D]) {
    let device = Device::default().autodiff();
    let d = shape[D - 1];
    let raw = random(shape, &device) + 3.0; // an offset the mean must remove
    let g = random(shape, &device);
    let gamma0 = random([d], &device);
    let beta0 = random([d], &device);
    let run = |fused: bool| {
        let x = raw.clone().detach().require_grad();
        let gamma = gamma0.clone().detach().require_grad();
        let beta = beta0.clone().detach().require_grad();
        let (x1, g1, b1) = (x.clone(), gamma.clone(), beta.clone());
        let y = if fused {
            ran(layer_norm_runs, 1, || layer_norm(x1, g1, b1, LN_EPS))
        } else {
            ran(layer_norm_runs, 0, || {
                layer_norm_generic(x1, g1, b1, LN_EPS)
            })
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        (
            host(y),
            host(x.grad(&grads).unwrap()),
            host(gamma.grad(&grads).unwrap()),
            host(beta.grad(&grads).unwrap()),
        )
    };
    let (f, r) = (run(true), run(false));
    let what = format!("layer norm {shape:?}");
    assert_close(f.0, r.0, &format!("{what}: output"));
    assert_close(f.1, r.1, &format!("{what}: x gradient"));
    assert_close(f.2, r.2, &format!("{what}: gamma gradient"));
    assert_close(f.3, r.3, &format!("{what}: beta gradient"));
    let plain = Device::default();
    let x = Tensor::<D>::from_data(raw.into_data(), &plain);
    let (gm, bt) = (
        Tensor::<1>::from_data(gamma0.into_data(), &plain),
        Tensor::<1>::from_data(beta0.into_data(), &plain),
    );
    assert_close(
        host(ran(layer_norm_runs, 1, || {
            layer_norm(x.clone(), gm.clone(), bt.clone(), LN_EPS)
        })),
        host(layer_norm_generic(x, gm, bt, LN_EPS)),
        &format!("{what}: output without autodiff"),
    );
}

#[test]
fn layer_norm_matches_burn_ops() {
    check_layer_norm([1, 1]);
    check_layer_norm([7, 5]); // below the parallel threshold, rows not a block multiple
    check_layer_norm([16, 64, 128]); // the reference configuration
    check_layer_norm([1000, 33]);
}

#[test]
fn layer_norm_on_a_strided_input() {
    let device = Device::default().autodiff();
    let raw = random([24, 16], &device);
    let gamma0 = random([24], &device);
    let beta0 = random([24], &device);
    let g = random([16, 24], &device);
    let run = |fused: bool| {
        let x = raw.clone().detach().require_grad();
        let (gamma, beta) = (gamma0.clone(), beta0.clone());
        let input = x.clone().swap_dims(0, 1); // [16, 24], strided
        let y = if fused {
            ran(layer_norm_runs, 1, || {
                layer_norm(input, gamma, beta, LN_EPS)
            })
        } else {
            ran(layer_norm_runs, 0, || {
                layer_norm_generic(input, gamma, beta, LN_EPS)
            })
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        (host(y), host(x.grad(&grads).unwrap()))
    };
    let (f, r) = (run(true), run(false));
    assert_close(f.0, r.0, "strided layer norm: output");
    assert_close(f.1, r.1, "strided layer norm: x gradient");
}

/// The experts' FFN over rows grouped by expert, against the same per expert with Burn ops.
fn check_grouped_ffn(sizes: &[usize], d: usize, f: usize) {
    use switch_transformer::model::ops::{grouped_ffn, grouped_ffn_generic};
    let device = Device::default().autodiff();
    let e = sizes.len();
    let mut offsets = vec![0];
    for s in sizes {
        offsets.push(offsets.last().unwrap() + s);
    }
    let rows = offsets[e];
    let raw = random([rows, d], &device);
    let g = random([rows, d], &device);
    let params0 = (
        random([e, d, f], &device),
        random([e, f], &device),
        random([e, f, d], &device),
        random([e, d], &device),
    );
    let run = |fused: bool| {
        let x = raw.clone().detach().require_grad();
        let w1 = params0.0.clone().detach().require_grad();
        let b1 = params0.1.clone().detach().require_grad();
        let w2 = params0.2.clone().detach().require_grad();
        let b2 = params0.3.clone().detach().require_grad();
        let f = if fused {
            grouped_ffn
        } else {
            grouped_ffn_generic
        };
        let y = ran(grouped_ffn_runs, fused as u64, || {
            f(
                x.clone(),
                &offsets,
                w1.clone(),
                b1.clone(),
                w2.clone(),
                b2.clone(),
            )
        });
        let grads = (y.clone() * g.clone()).sum().backward();
        let grad = |t: &Tensor<3>| host(t.grad(&grads).unwrap());
        let grad2 = |t: &Tensor<2>| host(t.grad(&grads).unwrap());
        vec![
            ("output", host(y)),
            ("x", grad2(&x)),
            ("w1", grad(&w1)),
            ("b1", grad2(&b1)),
            ("w2", grad(&w2)),
            ("b2", grad2(&b2)),
        ]
    };
    for ((name, a), (_, b)) in run(true).into_iter().zip(run(false)) {
        assert_close(a, b, &format!("grouped ffn {sizes:?}: {name}"));
    }
    // Without autodiff (evaluation, generation).
    let plain = Device::default();
    let output = |fused: bool| {
        let f = if fused {
            grouped_ffn
        } else {
            grouped_ffn_generic
        };
        let (w1, b1, w2, b2) = &params0;
        host(ran(grouped_ffn_runs, fused as u64, || {
            f(
                Tensor::from_data(raw.to_data(), &plain),
                &offsets,
                Tensor::from_data(w1.to_data(), &plain),
                Tensor::from_data(b1.to_data(), &plain),
                Tensor::from_data(w2.to_data(), &plain),
                Tensor::from_data(b2.to_data(), &plain),
            )
        }))
    };
    let what = format!("grouped ffn {sizes:?}: output without autodiff");
    assert_close(output(true), output(false), &what);
}

#[test]
fn grouped_ffn_matches_burn_ops() {
    check_grouped_ffn(&[3], 4, 5);
    check_grouped_ffn(&[2, 0, 5, 1], 8, 16); // an expert without rows: zero weight gradients
    check_grouped_ffn(&[300, 211, 0, 260], 128, 256); // the reference configuration's sizes
    check_grouped_ffn(&[7; 40], 16, 32); // many experts: multiplied in parallel
}

/// How the weights of [`check_thin_linear`] lie.
#[derive(Debug, Clone, Copy, PartialEq)]
enum WLayout {
    /// A row-major `[k, n]` leaf.
    Rows,
    /// `S^T` for a row-major leaf `S` `[n, k]`: a tied output layer (`lm_head = shared^T`),
    /// whose gradient reaches `S`.
    TransposedLeaf,
}

/// `x W` with few rows in training (the Hugging Face models' linear layers,
/// `hf::matmul2`): output and both gradients against Burn's matmul, with both inputs tracked,
/// either one frozen, `x` a strided view, and `W` a transposed view read in place; above
/// `THIN_MAX_ROWS` rows the kernel stays out.
fn check_thin_linear(
    m: usize,
    k: usize,
    n: usize,
    track: (bool, bool),
    strided: bool,
    layout: WLayout,
) {
    let device = Device::default().autodiff();
    let raw_x = random([m, k], &device);
    let raw_w = match layout {
        WLayout::Rows => random([k, n], &device),
        WLayout::TransposedLeaf => random([n, k], &device),
    };
    let g = random([m, n], &device);
    let kernel = m <= 64;
    let transposed = (kernel && layout == WLayout::TransposedLeaf) as u64;
    let run = |fused: bool| {
        let (x, w) = (raw_x.clone().detach(), raw_w.clone().detach());
        let x = if track.0 { x.require_grad() } else { x };
        let w = if track.1 { w.require_grad() } else { w };
        let input = if strided {
            x.clone().transpose().transpose()
        } else {
            x.clone()
        };
        let weights = match layout {
            WLayout::Rows => w.clone(),
            WLayout::TransposedLeaf => w.clone().transpose(),
        };
        let y = if fused {
            ran(thin_linear_transposed_runs, transposed, || {
                ran(thin_linear_runs, kernel as u64, || {
                    switch_transformer::hf::matmul2(input, &weights)
                })
            })
        } else {
            ran(thin_linear_runs, 0, || input.matmul(weights))
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        let mut out = vec![("output", host(y))];
        if track.0 {
            out.push(("x", host(x.grad(&grads).unwrap())));
        }
        if track.1 {
            out.push(("w", host(w.grad(&grads).unwrap())));
        }
        out
    };
    for ((name, a), (_, b)) in run(true).into_iter().zip(run(false)) {
        let what = format!("x W, {m}x{k}x{n} {track:?} strided {strided} {layout:?}: {name}");
        assert_close(a, b, &what);
    }
}

#[test]
fn few_row_products_in_training_match_burns_matmul() {
    for (m, k, n) in [
        (1, 7, 5),
        (5, 40, 24),
        (8, 300, 520),
        (64, 96, 130),
        (65, 30, 20),
    ] {
        check_thin_linear(m, k, n, (true, true), false, WLayout::Rows);
    }
    check_thin_linear(6, 50, 70, (true, false), false, WLayout::Rows);
    check_thin_linear(6, 50, 70, (false, true), false, WLayout::Rows);
    check_thin_linear(12, 50, 70, (true, true), true, WLayout::Rows);
    let isa = switch_transformer::cpu::runs().thin_linear_isa;
    assert_eq!(isa, Some(switch_transformer::cpu::Isa::selected()));
}

/// A tied output layer (`W` the transpose of the embedding) runs the kernels with the
/// embedding read where it lies, its gradient reaching the embedding: one row, a register
/// tile's rows and more, a partial vector of columns, either input frozen; above
/// `THIN_MAX_ROWS` rows Burn's matmul takes it.
#[test]
fn a_tied_output_layer_is_read_in_place() {
    for (m, k, n) in [
        (1, 7, 5),
        (4, 40, 24),
        (9, 96, 1030),
        (64, 64, 300),
        (65, 30, 20),
    ] {
        check_thin_linear(m, k, n, (true, true), false, WLayout::TransposedLeaf);
    }
    check_thin_linear(6, 50, 70, (true, false), false, WLayout::TransposedLeaf);
    check_thin_linear(6, 50, 70, (false, true), true, WLayout::TransposedLeaf);
}

/// The fast paths run where the model needs them: a training step of a small model on the
/// CPU (forward, losses, backward, Adam, all on this thread) runs the softmax and LayerNorm
/// kernels in every block, the grouped expert FFN in every Switch layer, and the fused Adam
/// update on every parameter tensor.
#[test]
fn a_cpu_training_step_runs_every_kernel() {
    use burn::tensor::{Int, TensorData};
    use rand::SeedableRng;
    use switch_transformer::model::loss::Losses;
    use switch_transformer::optim::{LabmlAdam, ParamGrads};
    use switch_transformer::routing::RoutingRng;

    let device = Device::default().autodiff();
    let config = common::tiny_run_config().model;
    let model = config.init(0, &device).unwrap();
    struct Count(u64);
    impl burn::module::ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            self.0 += p.is_require_grad() as u64;
        }
    }
    let mut n_tensors = Count(0);
    burn::module::Module::visit(&model, &mut n_tensors);
    let (b, s) = (4, 16);
    let ids = |offset: usize| {
        let v: Vec<i64> = (0..b * s)
            .map(|i| ((i + offset) * 7 % config.n_vocab) as i64)
            .collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), &device)
    };
    let before = cpu::runs();
    let out = model.forward(ids(0), &mut RoutingRng::seed_from_u64(0));
    let losses = Losses::new(
        out.logits,
        ids(1),
        &out.stats,
        0.01,
        0.0,
        Default::default(),
    );
    let grads = ParamGrads::from_gradients(&model, losses.total.backward());
    let _model = LabmlAdam::default().step(model, &grads, 1e-3);
    let after = cpu::runs();
    let layers = config.n_layers as u64;
    // The attention kernel, softmax included, in every block.
    assert_eq!(after.causal_attention - before.causal_attention, layers);
    assert_eq!(after.causal_softmax - before.causal_softmax, 0);
    // Two per block and the final norm.
    assert_eq!(after.layer_norm - before.layer_norm, 2 * layers + 1);
    assert_eq!(
        after.grouped_ffn - before.grouped_ffn,
        config.n_switch_layers() as u64
    );
    assert_eq!(
        after.adam - before.adam,
        n_tensors.0,
        "one update per tensor"
    );
    assert_eq!(
        after.adam_in_place - before.adam_in_place,
        n_tensors.0,
        "a model handed to the step alone is updated in place"
    );
}

/// The training step on one model (`train::step`: forward, backward, clip, Adam): every
/// parameter is updated in its own storage, without a copy of the weights.
#[test]
fn training_updates_the_weights_in_place() {
    use rand::SeedableRng;
    use switch_transformer::data::Batch;
    use switch_transformer::optim::LabmlAdam;
    use switch_transformer::routing::RoutingRng;
    use switch_transformer::train::placement::GradSync;
    use switch_transformer::train::replicas::{Replica, Replicas};
    use switch_transformer::train::step::{StepSettings, step};

    let device = Device::default();
    let config = common::tiny_run_config().model;
    let first = Replica {
        model: config.init(0, &device.clone().autodiff()).unwrap(),
        adam: LabmlAdam::default(),
        device: device.clone().autodiff(),
    };
    let mut replicas = Replicas::new(
        first,
        &config,
        std::slice::from_ref(&device),
        GradSync::Broadcast,
        false,
    )
    .unwrap();
    let tokens = |offset: usize| -> Vec<u32> {
        (0..64)
            .map(|i| ((i + offset) * 7 % config.n_vocab) as u32)
            .collect()
    };
    let settings = StepSettings {
        lb_coef: 0.01,
        z_coef: 0.0,
        balance_scope: Default::default(),
        grad_clip: 0.5,
        lr: 1e-3,
    };
    let mut rng = RoutingRng::seed_from_u64(0);
    // The step runs its passes and Adam on a worker of the thread pool; the kernel counts are
    // per thread, so the test runs there too (a worker's nested call stays on it).
    switch_transformer::cpu::on_worker(&device, || {
        for n in 0..2 {
            let batch = Batch {
                inputs: tokens(n),
                targets: tokens(n + 1),
                batch: 4,
                seq_len: 16,
            };
            let before = cpu::runs();
            let out = step(&mut replicas, &batch, &mut rng, settings).unwrap();
            let after = cpu::runs();
            assert!(out.updated);
            let updates = after.adam - before.adam;
            assert!(updates > 0, "step {n}: Adam's kernel did not run");
            assert_eq!(
                after.adam_in_place - before.adam_in_place,
                updates,
                "step {n}: weights copied instead of updated in place"
            );
        }
    });
}

/// The compositions written for Burn's fusion (`linear_rows`, which every backend's linear
/// layers run: rows folded, bias reshaped before the matmul; `layer_norm_generic`, which the
/// GPU backends run: gamma and beta reshaped first), against Burn's own `linear` and `layer_norm`: outputs and every gradient, on the
/// CPU backend (the same ops in another order, so within f32 rounding).
#[test]
fn gpu_compositions_match_burns_linear_and_layer_norm() {
    use switch_transformer::model::precision::linear_rows;
    let device = Device::default().autodiff();
    let (x0, w0, b0) = (
        random([3, 5, 8], &device),
        random([8, 6], &device),
        random([6], &device),
    );
    let g = random([3, 5, 6], &device);
    let run = |ours: bool| {
        let (x, w, b) = (
            x0.clone().detach().require_grad(),
            w0.clone().detach().require_grad(),
            b0.clone().detach().require_grad(),
        );
        let y = if ours {
            linear_rows(x.clone(), w.clone(), Some(b.clone()))
        } else {
            burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()))
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        let grad = |t: &Tensor<3>| host(t.grad(&grads).unwrap());
        (
            host(y),
            grad(&x),
            host(w.grad(&grads).unwrap()),
            host(b.grad(&grads).unwrap()),
        )
    };
    let (f, r) = (run(true), run(false));
    assert_close(f.0, r.0, "linear_rows: output");
    assert_close(f.1, r.1, "linear_rows: x gradient");
    assert_close(f.2, r.2, "linear_rows: weight gradient");
    assert_close(f.3, r.3, "linear_rows: bias gradient");

    let (gamma0, beta0) = (random([8], &device), random([8], &device));
    let g = random([3, 5, 8], &device);
    let run = |ours: bool| {
        let (x, gamma, beta) = (
            x0.clone().detach().require_grad(),
            gamma0.clone().detach().require_grad(),
            beta0.clone().detach().require_grad(),
        );
        let y = if ours {
            layer_norm_generic(x.clone(), gamma.clone(), beta.clone(), LN_EPS)
        } else {
            burn::tensor::module::layer_norm(x.clone(), gamma.clone(), Some(beta.clone()), LN_EPS)
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        (
            host(y),
            host(x.grad(&grads).unwrap()),
            host(gamma.grad(&grads).unwrap()),
            host(beta.grad(&grads).unwrap()),
        )
    };
    let (f, r) = (run(true), run(false));
    assert_close(f.0, r.0, "layer_norm_generic: output");
    assert_close(f.1, r.1, "layer_norm_generic: x gradient");
    assert_close(f.2, r.2, "layer_norm_generic: gamma gradient");
    assert_close(f.3, r.3, "layer_norm_generic: beta gradient");
}
