//! The paper's toolkit beyond labml's miniature: each option's defining property.

use crate::common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use switch_transformer::ModelConfig;
use switch_transformer::interop::weights::{
    Source, StateDict, model_from_state_dict, model_state_dict, switch_from_state_dict,
};
use switch_transformer::model::InitScheme;
use switch_transformer::model::switch::{DroppedTokens, SwitchFeedForward};
use switch_transformer::routing::{DropPolicy, RoutePlan, RoutingOptions, RoutingRng};

const D: usize = 8;
const F: usize = 12;
const E: usize = 4;
const T: usize = 40;

fn switch(config: ModelConfig, seed: u64, device: &Device) -> SwitchFeedForward {
    let sd = common::random_switch_weights(seed, D, F, E);
    switch_from_state_dict(&config, &sd, device).unwrap()
}

fn config() -> ModelConfig {
    ModelConfig {
        d_model: D,
        d_ff: F,
        n_experts: E,
        ..Default::default()
    }
}

fn input(seed: u64, device: &Device) -> (Vec<f32>, Tensor<2>) {
    let mut rng = RoutingRng::seed_from_u64(seed);
    let x = common::uniform(&mut rng, vec![T, D], 1.5).to_f32();
    let t = Tensor::from_data(TensorData::new(x.clone(), [T, D]), device);
    (x, t)
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

/// Expert `e` of `sd` applied to one row, in f64.
fn expert(sd: &StateDict, e: usize, x: &[f32]) -> Vec<f64> {
    let g = |n: &str| sd[&format!("experts.{e}.{n}")].to_f64();
    let (w1, b1, w2, b2) = (
        g("layer1.weight"),
        g("layer1.bias"),
        g("layer2.weight"),
        g("layer2.bias"),
    );
    let h: Vec<f64> = (0..F)
        .map(|k| (b1[k] + (0..D).map(|j| w1[k * D + j] * x[j] as f64).sum::<f64>()).max(0.0))
        .collect();
    (0..D)
        .map(|j| b2[j] + (0..F).map(|k| w2[j * F + k] * h[k]).sum::<f64>())
        .collect()
}

fn softmax_rows(logits: &[f32], n: usize) -> Vec<Vec<f64>> {
    logits
        .chunks(n)
        .map(|r| {
            let m = r.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        })
        .collect()
}

#[test]
fn z_loss_value_and_gradient_follow_the_formula() {
    let device = Device::default().autodiff();
    let sff = switch(config(), 1, &device);
    let (_, x) = input(2, &device);
    let out = sff.forward(x.clone(), &mut RoutingRng::seed_from_u64(0));
    let logits = host(sff.router.logits(x.clone()));
    let lse: Vec<f64> = logits
        .chunks(E)
        .map(|r| {
            let m = r.iter().cloned().fold(f32::MIN, f32::max) as f64;
            m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
        })
        .collect();
    let expected: f64 = lse.iter().map(|l| l * l).sum::<f64>() / T as f64;
    let got: f32 = out.stats.z_loss.clone().into_scalar();
    assert!(
        (got as f64 - expected).abs() < 1e-5 * expected.max(1.0),
        "{got} vs {expected}"
    );
    // d z / d bias_e = sum_t 2 lse_t softmax_te / T
    let grads = out.stats.z_loss.backward();
    let gb: Vec<f32> = sff
        .router
        .switch
        .bias
        .as_ref()
        .unwrap()
        .val()
        .grad(&grads)
        .unwrap()
        .into_data()
        .try_to_vec()
        .unwrap();
    let sm = softmax_rows(&logits, E);
    for e in 0..E {
        let want: f64 = (0..T).map(|t| 2.0 * lse[t] * sm[t][e]).sum::<f64>() / T as f64;
        assert!(
            (gb[e] as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
            "expert {e}: {} vs {want}",
            gb[e]
        );
    }
}

#[test]
fn jitter_is_training_only_and_never_reaches_the_experts() {
    let device = Device::default();
    let sd = common::random_switch_weights(3, D, F, E);
    let c = ModelConfig {
        router_jitter: 0.5,
        drop_tokens: false,
        ..config()
    };
    let mut sff = switch_from_state_dict(&c, &sd, &device).unwrap();
    let (xh, x) = input(4, &device);
    // Training: routing sees noise, yet each kept token's output is gate * E(x), un-noised x.
    let out = sff.forward(x.clone(), &mut RoutingRng::seed_from_u64(5));
    let y = host(out.out);
    let stats = out.stats.host();
    for t in 0..T {
        let e = stats.routes[t];
        let want = expert(&sd, e, &xh[t * D..(t + 1) * D]);
        let gate = stats.route_prob_max[t] as f64;
        for j in 0..D {
            assert!(
                (y[t * D + j] as f64 - gate * want[j]).abs() < 1e-4,
                "token {t}"
            );
        }
    }
    // Evaluation: no noise, so the same as a model without jitter, whatever the generator.
    sff.training = false;
    let a = host(
        sff.forward(x.clone(), &mut RoutingRng::seed_from_u64(6))
            .out,
    );
    let b = host(
        sff.forward(x.clone(), &mut RoutingRng::seed_from_u64(7))
            .out,
    );
    let mut plain = switch_from_state_dict(
        &ModelConfig {
            drop_tokens: false,
            ..config()
        },
        &sd,
        &device,
    )
    .unwrap();
    plain.training = false;
    let c = host(plain.forward(x, &mut RoutingRng::seed_from_u64(8)).out);
    assert_eq!(a, b);
    assert_eq!(a, c);
}

fn random_probs(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = RoutingRng::seed_from_u64(seed);
    let raw = common::uniform(&mut rng, vec![n, E], 1.0).to_f32();
    softmax_rows(&raw.iter().map(|v| v * 4.0 + 1.0).collect::<Vec<_>>(), E)
        .into_iter()
        .flatten()
        .map(|v| v as f32)
        .collect()
}

#[test]
fn dropless_drops_nothing() {
    let probs = random_probs(9, 200);
    let opts = RoutingOptions {
        drop_tokens: false,
        ..RoutingOptions::labml(0.05, true)
    };
    let plan = RoutePlan::new(&probs, E, &opts, &mut RoutingRng::seed_from_u64(0));
    assert_eq!(plan.n_dropped(), 0);
    assert_eq!(plan.slots, *plan.counts.iter().max().unwrap());
}

#[test]
fn confidence_policy_keeps_the_most_confident_tokens() {
    let probs = random_probs(10, 200);
    let opts = RoutingOptions {
        drop_policy: DropPolicy::Confidence,
        ..RoutingOptions::labml(0.6, true)
    };
    let plan = RoutePlan::new(&probs, E, &opts, &mut RoutingRng::seed_from_u64(0));
    assert!(plan.n_dropped() > 0);
    for e in 0..E {
        let p = |t: usize| probs[t * E + e];
        let mine: Vec<usize> = (0..200).filter(|&t| plan.routes[t] == e).collect();
        let kept_min = mine
            .iter()
            .filter(|&&t| !plan.dropped[t])
            .map(|&t| p(t))
            .fold(f32::MAX, f32::min);
        let dropped_max = mine
            .iter()
            .filter(|&&t| plan.dropped[t])
            .map(|&t| p(t))
            .fold(f32::MIN, f32::max);
        assert!(
            kept_min >= dropped_max,
            "expert {e}: kept {kept_min} < dropped {dropped_max}"
        );
    }
}

#[test]
fn position_policy_keeps_the_first_tokens() {
    let probs = random_probs(11, 200);
    let opts = RoutingOptions {
        drop_policy: DropPolicy::Position,
        ..RoutingOptions::labml(0.6, true)
    };
    let plan = RoutePlan::new(&probs, E, &opts, &mut RoutingRng::seed_from_u64(0));
    for e in 0..E {
        let mine: Vec<usize> = (0..200).filter(|&t| plan.routes[t] == e).collect();
        let kept: Vec<bool> = mine.iter().map(|&t| !plan.dropped[t]).collect();
        let n_kept = kept.iter().filter(|&&k| k).count();
        assert!(kept[..n_kept].iter().all(|&k| k) && kept[n_kept..].iter().all(|&k| !k));
        assert_eq!(n_kept, mine.len().min(plan.capacity));
    }
}

#[test]
fn top2_gates_sum_to_one() {
    let device = Device::default();
    let sd = common::random_switch_weights(12, D, F, E);
    let c = ModelConfig {
        top_k: 2,
        drop_tokens: false,
        ..config()
    };
    let sff = switch_from_state_dict(&c, &sd, &device).unwrap();
    let (xh, x) = input(13, &device);
    let probs = softmax_rows(&host(sff.router.logits(x.clone())), E);
    let y = host(sff.forward(x, &mut RoutingRng::seed_from_u64(0)).out);
    for t in 0..T {
        let row: Vec<f32> = probs[t].iter().map(|&p| p as f32).collect();
        let top = switch_transformer::routing::top_k(&row, 2);
        let (p0, p1) = (probs[t][top[0]], probs[t][top[1]]);
        let (g0, g1) = (p0 / (p0 + p1), p1 / (p0 + p1));
        assert!((g0 + g1 - 1.0).abs() < 1e-12);
        let (a, b) = (
            expert(&sd, top[0], &xh[t * D..][..D]),
            expert(&sd, top[1], &xh[t * D..][..D]),
        );
        for j in 0..D {
            let want = g0 * a[j] + g1 * b[j];
            assert!(
                (y[t * D + j] as f64 - want).abs() < 1e-4,
                "token {t}: {} vs {want}",
                y[t * D + j]
            );
        }
    }
    // Capacity counts assignments: 2 per token.
    let plan = RoutePlan::new(
        &random_probs(14, 100),
        E,
        &RoutingOptions {
            top_k: 2,
            ..RoutingOptions::labml(1.0, true)
        },
        &mut RoutingRng::seed_from_u64(0),
    );
    assert_eq!(plan.capacity, 50);
    assert_eq!(plan.routes.len(), 200);
    assert!(plan.kept_counts().iter().all(|&k| k <= 50));
}

#[test]
fn zero_policy_leaves_dropped_tokens_unchanged_through_the_sub_layer() {
    let device = Device::default();
    let c = ModelConfig {
        capacity_factor: 0.3,
        dropped_tokens: DroppedTokens::Zero,
        ..config()
    };
    let sff = switch(c, 15, &device);
    let (_, x) = input(16, &device);
    let route_prob = sff.router.forward(x.clone());
    let probs = host(route_prob.clone());
    let mut rng = RoutingRng::seed_from_u64(0);
    let plan = RoutePlan::new(&probs, E, &sff.routing_options(), &mut rng);
    assert!(plan.n_dropped() > 0);
    let y = host(sff.dispatch(x, route_prob, &plan, &mut rng).out);
    for t in 0..T {
        let zero = y[t * D..(t + 1) * D].iter().all(|&v| v == 0.0);
        assert_eq!(zero, plan.dropped[t], "token {t}");
    }
}

#[test]
fn eval_capacity_factor_applies_outside_training() {
    let device = Device::default();
    let mut sff = switch(
        ModelConfig {
            capacity_factor: 1.0,
            eval_capacity_factor: 2.0,
            ..config()
        },
        17,
        &device,
    );
    assert_eq!(sff.routing_options().capacity_factor, 1.0);
    sff.training = false;
    assert_eq!(sff.routing_options().capacity_factor, 2.0);
}

fn ids(device: &Device, b: usize, s: usize) -> Tensor<2, Int> {
    let v: Vec<i64> = (0..b * s).map(|i| (i * 5 % 65) as i64).collect();
    Tensor::from_data(TensorData::new(v, [b, s]), device)
}

fn small_model() -> ModelConfig {
    ModelConfig {
        d_model: 16,
        heads: 2,
        d_ff: 24,
        n_layers: 4,
        n_experts: 4,
        ..Default::default()
    }
}

#[test]
fn switch_every_other_layer_and_the_dense_baseline() {
    let device = Device::default();
    for (every, n_switch) in [(1, 4), (2, 2), (0, 0)] {
        let c = ModelConfig {
            switch_every: every,
            ..small_model()
        };
        let m = c.init(0, &device).unwrap();
        let switch_layers: Vec<usize> =
            (0..4).filter(|&l| m.layers[l].switch().is_some()).collect();
        assert_eq!(switch_layers.len(), n_switch);
        if every == 2 {
            assert_eq!(switch_layers, [1, 3]);
        }
        let out = m.forward(ids(&device, 2, 8), &mut RoutingRng::seed_from_u64(0));
        assert_eq!(out.stats.len(), n_switch);
        let sd = model_state_dict(&m, Source::Values);
        let n: usize = sd.values().map(|t| t.numel()).sum();
        assert_eq!(n, c.num_params(), "switch_every {every}");
        let back = model_from_state_dict(&c, &sd, &device).unwrap();
        assert_eq!(model_state_dict(&back, Source::Values), sd);
    }
    // Routing inspection lists the Switch layers only, every position in each.
    let c = ModelConfig {
        switch_every: 2,
        ..small_model()
    };
    let m = c.init(0, &device).unwrap();
    let routes = switch_transformer::train::eval::route_tokens(&m, &[1, 2, 3, 4, 5], 4);
    assert_eq!(routes.len(), 2);
    assert!(routes.iter().all(|r| r.len() == 5));
    // Equal compute per token: the dense baseline's FFN is one expert's size.
    let dense = ModelConfig {
        switch_every: 0,
        ..small_model()
    };
    let switch = small_model();
    assert!(switch.num_params() > dense.num_params());
}

#[test]
fn learned_positions_make_order_matter_and_cache_correctly() {
    let device = Device::default();
    let c = ModelConfig {
        pos_embedding: true,
        max_seq_len: 16,
        drop_tokens: false,
        ..small_model()
    };
    let mut m = c.init(1, &device).unwrap();
    m.set_training(false);
    let same = Tensor::<2, Int>::from_data(TensorData::new(vec![7i64; 6], [1, 6]), &device);
    let logits: Vec<f32> = m
        .forward(same.clone(), &mut RoutingRng::seed_from_u64(0))
        .logits
        .into_data()
        .try_to_vec()
        .unwrap();
    // Identical tokens at different positions now differ.
    assert_ne!(logits[..65], logits[65..130]);
    // The key/value cache offsets positions.
    let mut cache = vec![switch_transformer::model::attention::KvCache::default(); 4];
    let mut cached: Vec<f32> = Vec::new();
    for _ in 0..6 {
        let one = Tensor::<2, Int>::from_data(TensorData::new(vec![7i64], [1, 1]), &device);
        cached.extend(
            m.forward_cached(one, &mut cache, 16, &mut RoutingRng::seed_from_u64(0))
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
    }
    let err = logits
        .iter()
        .zip(&cached)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(err < 1e-4, "{err}");
}

#[test]
fn initialisation_schemes() {
    let base = small_model();
    let labml = switch_transformer::interop::init::initial_state_dict(&base, 0);
    let indep = switch_transformer::interop::init::initial_state_dict(
        &ModelConfig {
            init: InitScheme::Independent,
            ..base.clone()
        },
        0,
    );
    let trunc = switch_transformer::interop::init::initial_state_dict(
        &ModelConfig {
            init: InitScheme::TruncatedNormal,
            init_scale: 0.1,
            ..base.clone()
        },
        0,
    );
    let w = |sd: &StateDict, k: &str| sd[k].to_f32();
    let e0 = "transformer.layers.0.feed_forward.experts.0.layer1.weight";
    let e1 = "transformer.layers.0.feed_forward.experts.1.layer1.weight";
    let l1 = "transformer.layers.1.feed_forward.experts.0.layer1.weight";
    assert_eq!(w(&labml, e0), w(&labml, e1));
    assert_eq!(w(&labml, e0), w(&labml, l1));
    assert_ne!(w(&indep, e0), w(&indep, e1));
    assert_ne!(w(&indep, e0), w(&indep, l1));
    // Truncated normal: |w| <= 2 sigma, sigma = sqrt(0.1 / fan_in); biases 0.
    let sigma = (0.1f32 / 16.0).sqrt();
    let v = w(&trunc, e0);
    assert!(v.iter().all(|x| x.abs() <= 2.0 * sigma + 1e-7));
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    // A normal truncated at 2 sigma has standard deviation 0.88 sigma.
    assert!((std / sigma - 0.88).abs() < 0.08, "{}", std / sigma);
    assert!(
        trunc["transformer.layers.0.feed_forward.experts.0.layer1.bias"]
            .to_f32()
            .iter()
            .all(|&b| b == 0.0)
    );
}

#[test]
fn dropouts_act_in_training_only() {
    let device = Device::default();
    for c in [
        ModelConfig {
            expert_dropout: 0.5,
            drop_tokens: false,
            ..small_model()
        },
        ModelConfig {
            dropout: 0.5,
            drop_tokens: false,
            ..small_model()
        },
    ] {
        let mut m = c.init(2, &device).unwrap();
        let run = |m: &switch_transformer::SwitchTransformer, seed| -> Vec<f32> {
            m.forward(ids(&device, 2, 8), &mut RoutingRng::seed_from_u64(seed))
                .logits
                .into_data()
                .try_to_vec()
                .unwrap()
        };
        assert_ne!(
            run(&m, 1),
            run(&m, 2),
            "training: dropout masks differ by seed"
        );
        m.set_training(false);
        assert_eq!(run(&m, 1), run(&m, 2), "evaluation: no dropout");
        let plain = ModelConfig {
            expert_dropout: 0.0,
            dropout: 0.0,
            ..c.clone()
        };
        let mut p =
            model_from_state_dict(&plain, &model_state_dict(&m, Source::Values), &device).unwrap();
        p.set_training(false);
        assert_eq!(run(&m, 1), run(&p, 1));
    }
}

#[test]
fn selective_precision_keeps_the_router_in_f32() {
    use burn::tensor::{DType, FloatDType};
    use switch_transformer::model::precision::Precision;
    let device = Device::default().autodiff();
    let sff = switch(
        ModelConfig {
            drop_tokens: false,
            ..config()
        },
        20,
        &device,
    );
    let (_, x) = input(21, &device);
    let out = sff.forward(
        x.clone().cast(FloatDType::BF16),
        &mut RoutingRng::seed_from_u64(0),
    );
    assert_eq!(
        out.out.dtype(),
        DType::BF16,
        "experts run in the model's precision"
    );
    assert_eq!(
        out.stats.route_prob_sum.dtype(),
        DType::F32,
        "the router runs in f32"
    );
    assert_eq!(out.stats.z_loss.dtype(), DType::F32);
    // Same routing as in f32 (the router's input is the same bf16-rounded x, in f32).
    let f32_out = sff.forward(
        x.cast(FloatDType::BF16).cast(FloatDType::F32),
        &mut RoutingRng::seed_from_u64(0),
    );
    assert_eq!(out.stats.host().routes, f32_out.stats.host().routes);

    // A bf16 model: logits close to f32's, f32 losses, f32 gradients for the f32 parameters.
    let c = ModelConfig {
        drop_tokens: false,
        ..small_model()
    };
    let m32 = c.init(3, &device).unwrap();
    let m16 = model_from_state_dict(
        &ModelConfig {
            precision: Precision::Bf16,
            ..c.clone()
        },
        &model_state_dict(&m32, Source::Values),
        &device,
    )
    .unwrap();
    let a = m32.forward(ids(&device, 2, 8), &mut RoutingRng::seed_from_u64(0));
    let b = m16.forward(ids(&device, 2, 8), &mut RoutingRng::seed_from_u64(0));
    assert_eq!(b.logits.dtype(), DType::BF16);
    let (la, lb): (Vec<f32>, Vec<f32>) = (
        a.logits.into_data().convert::<f32>().try_to_vec().unwrap(),
        b.logits
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap(),
    );
    let scale = la.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = la
        .iter()
        .zip(&lb)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err / scale < 0.05, "bf16 logits differ by {}", err / scale);
    let targets = ids(&device, 2, 8);
    let losses =
        switch_transformer::model::loss::Losses::new(b.logits, targets, &b.stats, 0.01, 0.001);
    assert_eq!(losses.total.dtype(), DType::F32);
    let grads = losses.total.backward();
    let g = model_state_dict(&m16, Source::Grads(&grads));
    assert_eq!(
        g.len(),
        model_state_dict(&m16, Source::Values).len(),
        "every parameter gets a gradient"
    );
}
