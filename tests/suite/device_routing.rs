//! Routing decided on the device (`model.route_on = device`, the default on GPU backends)
//! against routing decided on the host: the same decisions where the policy is deterministic
//! (position), the same invariants where it is random, and the same layer outputs and
//! gradients.

use crate::common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use switch_transformer::ModelConfig;
use switch_transformer::interop::weights::{Source, switch_from_state_dict, switch_state_dict};
use switch_transformer::routing::{
    DeviceRoutes, DropPolicy, RoutePlace, RoutePlan, RoutingOptions, RoutingRng, capacity,
};
use switch_transformer::store::host_f32;

fn ints(t: Tensor<1, Int>) -> Vec<usize> {
    let v: Vec<i64> = t.into_data().convert::<i64>().try_into_vec().unwrap();
    v.into_iter().map(|x| x as usize).collect()
}

/// Skewed random probabilities `[n, e]` so that some experts overflow.
fn probs(rng: &mut RoutingRng, n: usize, e: usize) -> Vec<f32> {
    let mut p = Vec::new();
    for _ in 0..n {
        let row: Vec<f32> = (0..e)
            .map(|i| rng.random::<f32>() * (1.0 + i as f32))
            .collect();
        let s: f32 = row.iter().sum();
        p.extend(row.iter().map(|v| v / s));
    }
    p
}

/// A decision read back: for each token, `Some((expert, position))` if kept, else `None`;
/// plus the counts.
struct Decision {
    routes: Vec<usize>,
    kept: Vec<Option<(usize, usize)>>,
    counts: Vec<usize>,
    n_dropped: usize,
}

fn device_decision(r: DeviceRoutes, e: usize) -> Decision {
    let cap = r.slots;
    let source = ints(r.token_source);
    let slot_token = ints(r.slot_token);
    let kept: Vec<_> = source
        .iter()
        .enumerate()
        .map(|(t, &s)| {
            if s < e * cap {
                assert_eq!(slot_token[s], t, "slot {s} does not hold token {t}");
                Some((s / cap, s % cap))
            } else {
                assert_eq!(s, e * cap + t, "dropped token {t} reads the wrong row");
                None
            }
        })
        .collect();
    Decision {
        routes: ints(r.routes),
        counts: host_f32(r.counts).iter().map(|&c| c as usize).collect(),
        n_dropped: host_f32(r.n_dropped)[0] as usize,
        kept,
    }
}

fn host_decision(p: &RoutePlan) -> Decision {
    let e = p.n_experts;
    Decision {
        routes: p.routes.clone(),
        kept: p
            .token_source
            .iter()
            .map(|&s| (s < e * p.slots).then(|| (s / p.slots, s % p.slots)))
            .collect(),
        counts: p.counts.clone(),
        n_dropped: p.n_dropped(),
    }
}

fn routes_on_device(
    p: &[f32],
    e: usize,
    opts: &RoutingOptions,
    seed: u64,
    device: &Device,
) -> DeviceRoutes {
    let n = p.len() / e;
    let t = Tensor::<2>::from_data(TensorData::new(p.to_vec(), [n, e]), device);
    DeviceRoutes::new(t, opts, &mut RoutingRng::seed_from_u64(seed))
}

#[test]
fn position_policy_decides_exactly_as_on_the_host() {
    let device = common::test_device();
    let mut rng = RoutingRng::seed_from_u64(1);
    for trial in 0..60 {
        let e = 1 + trial % 9;
        let n = 1 + (trial * 37) % 300;
        let cf = 0.25 + (trial % 7) as f64 * 0.3;
        let p = probs(&mut rng, n, e);
        let opts = RoutingOptions {
            drop_policy: DropPolicy::Position,
            ..RoutingOptions::labml(cf, true)
        };
        let host = host_decision(&RoutePlan::new(&p, e, &opts, &mut rng));
        let dev = device_decision(routes_on_device(&p, e, &opts, 0, &device), e);
        assert_eq!(dev.routes, host.routes, "trial {trial}");
        assert_eq!(dev.counts, host.counts, "trial {trial}");
        assert_eq!(dev.n_dropped, host.n_dropped, "trial {trial}");
        assert_eq!(dev.kept, host.kept, "trial {trial}");
    }
}

#[test]
fn many_tokens_decide_exactly_as_on_the_host() {
    // 2k tokens (two levels of the blocked prefix sum, routing::scan) and 20,000 (three levels,
    // the last block partly padded): the decision is the host's, token for token.
    let device = common::test_device();
    let mut rng = RoutingRng::seed_from_u64(5);
    for (n, e) in [(2048, 4), (20_000, 3)] {
        let p = probs(&mut rng, n, e);
        let opts = RoutingOptions {
            drop_policy: DropPolicy::Position,
            ..RoutingOptions::labml(1.0, true)
        };
        let host = host_decision(&RoutePlan::new(&p, e, &opts, &mut rng));
        let dev = device_decision(routes_on_device(&p, e, &opts, 0, &device), e);
        assert!(
            host.n_dropped > 0,
            "{n} tokens: the test should drop tokens"
        );
        assert_eq!(dev.counts, host.counts, "{n} tokens");
        assert_eq!(dev.n_dropped, host.n_dropped, "{n} tokens");
        assert_eq!(dev.kept, host.kept, "{n} tokens");
    }
}

#[test]
fn random_policy_keeps_a_random_subset_within_capacity() {
    let device = common::test_device();
    let mut rng = RoutingRng::seed_from_u64(2);
    for trial in 0..60 {
        let e = 1 + trial % 9;
        let n = 1 + (trial * 53) % 300;
        let cf = 0.25 + (trial % 7) as f64 * 0.3;
        let p = probs(&mut rng, n, e);
        let opts = RoutingOptions::labml(cf, true);
        let cap = capacity(cf, n, e);
        let d = device_decision(routes_on_device(&p, e, &opts, trial as u64, &device), e);
        let mut kept = vec![0; e];
        let mut positions = vec![vec![]; e];
        for t in 0..n {
            let row = &p[t * e..(t + 1) * e];
            assert_eq!(d.routes[t], switch_transformer::routing::argmax(row));
            if let Some((x, pos)) = d.kept[t] {
                assert_eq!(x, d.routes[t]);
                kept[x] += 1;
                positions[x].push(pos);
            }
        }
        for x in 0..e {
            assert_eq!(kept[x], d.counts[x].min(cap), "trial {trial} expert {x}");
            positions[x].sort();
            assert_eq!(positions[x], (0..kept[x]).collect::<Vec<_>>());
        }
        assert_eq!(d.counts.iter().sum::<usize>(), n);
        assert_eq!(
            d.n_dropped,
            d.counts
                .iter()
                .map(|c| c.saturating_sub(cap))
                .sum::<usize>()
        );
    }
    // Reproducible from the seed, different across seeds, every overflowing token kept with
    // probability capacity / count (a 4-sigma band).
    let p = probs(&mut rng, 200, 4);
    let opts = RoutingOptions::labml(0.5, true);
    let kept_set = |seed| -> Vec<bool> {
        let d = device_decision(routes_on_device(&p, 4, &opts, seed, &device), 4);
        d.kept.iter().map(Option::is_some).collect()
    };
    assert_eq!(kept_set(7), kept_set(7));
    assert_ne!(kept_set(7), kept_set(8));
    let runs = 200;
    let mut freq = vec![0usize; 200];
    for seed in 0..runs {
        for (f, k) in freq.iter_mut().zip(kept_set(seed)) {
            *f += k as usize;
        }
    }
    let d = device_decision(routes_on_device(&p, 4, &opts, 0, &device), 4);
    let cap = capacity(0.5, 200, 4) as f64;
    for (t, &f) in freq.iter().enumerate() {
        let c = d.counts[d.routes[t]] as f64;
        let want = (cap / c).min(1.0);
        let got = f as f64 / runs as f64;
        let sigma = (want * (1.0 - want) / runs as f64).sqrt();
        assert!(
            (got - want).abs() <= 4.0 * sigma + 1e-9,
            "token {t}: kept {got}, expected {want}"
        );
    }
}

#[test]
fn switch_layer_outputs_and_gradients_match_host_routing() {
    let device = common::test_device().autodiff();
    let (d, f, e, n) = (8, 12, 4, 64);
    let weights = common::random_switch_weights(3, d, f, e);
    let mut x_rng = RoutingRng::seed_from_u64(4);
    let x = common::uniform(&mut x_rng, vec![n, d], 1.5).to_f32();
    let run = |place: RoutePlace| {
        let config = ModelConfig {
            d_model: d,
            d_ff: f,
            n_experts: e,
            capacity_factor: 0.8,
            drop_policy: DropPolicy::Position,
            route_on: place,
            ..Default::default()
        };
        config.validate().unwrap();
        let sff = switch_from_state_dict(&config, &weights, &device).unwrap();
        let x = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, d]), &device).require_grad();
        let out = sff.forward(x.clone(), &mut RoutingRng::seed_from_u64(0));
        let stats = out.stats.host();
        let y = host_f32(out.out.clone());
        let w = Tensor::<2>::from_data(TensorData::new(x_rng_weights(n * d), [n, d]), &device);
        let grads = (out.out * w).sum().backward();
        let gx = host_f32(x.grad(&grads).unwrap());
        let mut g = vec![gx];
        g.extend(
            switch_state_dict(&sff, Source::Grads(&grads))
                .values()
                .map(|t| t.to_f32()),
        );
        (y, stats, g)
    };
    let (y_host, s_host, g_host) = run(RoutePlace::Host);
    let (y_dev, s_dev, g_dev) = run(RoutePlace::Device);
    assert!(s_host.n_dropped > 0, "the test should drop tokens");
    assert_eq!(s_host, s_dev);
    let close = |a: &[f32], b: &[f32]| {
        let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        common::max_rel_err(&a, &b)
    };
    assert!(close(&y_dev, &y_host) < 1e-6);
    for (a, b) in g_dev.iter().zip(&g_host) {
        assert!(close(a, b) < 1e-6);
    }
}

fn x_rng_weights(n: usize) -> Vec<f32> {
    let mut rng = RoutingRng::seed_from_u64(9);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

#[test]
fn device_routing_needs_a_top1_capacity_decision() {
    let bad = ModelConfig {
        route_on: RoutePlace::Device,
        top_k: 2,
        ..Default::default()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(
        e.contains("model.route_on = device") && e.contains("top_k = 1"),
        "{e}"
    );
    let confidence = ModelConfig {
        route_on: RoutePlace::Device,
        drop_policy: DropPolicy::Confidence,
        ..Default::default()
    };
    assert!(confidence.validate().is_err());
    // Auto: the host on the CPU backend, the device elsewhere.
    let opts = RoutingOptions::labml(1.0, true);
    assert!(!opts.on_device(&Device::flex()));
    let dropless = RoutingOptions::labml(1.0, false);
    assert!(!dropless.device_capable());
}
