//! The paper's toolkit beyond labml's miniature, Switch-layer options: each option's defining
//! property (router z-loss, jitter, dropless, drop policies, top-2, zero for dropped tokens, the
//! evaluation capacity factor).

use crate::common;

use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use switch_transformer::ModelConfig;
use switch_transformer::interop::weights::{StateDict, switch_from_state_dict};
use switch_transformer::model::switch::{DroppedTokens, SwitchFeedForward};
use switch_transformer::routing::{DropPolicy, RoutePlan, RoutingOptions, RoutingRng};

const D: usize = 8;
const F: usize = 12;
const E: usize = 4;
const T: usize = 40;

pub(crate) fn switch(config: ModelConfig, seed: u64, device: &Device) -> SwitchFeedForward {
    let sd = common::random_switch_weights(seed, D, F, E);
    switch_from_state_dict(&config, &sd, device).unwrap()
}

pub(crate) fn config() -> ModelConfig {
    ModelConfig {
        d_model: D,
        d_ff: F,
        n_experts: E,
        ..Default::default()
    }
}

pub(crate) fn input(seed: u64, device: &Device) -> (Vec<f32>, Tensor<2>) {
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
