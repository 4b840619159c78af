//! The Switch layer against a slow, obviously correct f64 implementation (one token at a time,
//! one expert matrix at a time), on random weights and inputs: outputs, and gradients against
//! central finite differences of that implementation.

use crate::common;

use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use switch_transformer::ModelConfig;
use switch_transformer::interop::weights::{
    Source, StateDict, switch_from_state_dict, switch_state_dict,
};
use switch_transformer::routing::{RoutePlan, RoutingOptions, RoutingRng};
use switch_transformer::store::{HostData, HostTensor};

struct Case {
    d: usize,
    f: usize,
    e: usize,
    tokens: usize,
    capacity_factor: f64,
    drop_tokens: bool,
    is_scale_prob: bool,
}

fn get(sd: &StateDict, name: &str) -> Vec<f64> {
    sd[name].to_f64()
}

/// labml's SwitchFeedForward, token by token, for a fixed routing decision (routes, drops).
/// The gate is `p` (is_scale_prob) or `p / p0` with `p0` frozen: labml's `p / p.detach()`,
/// whose value is 1 at `p = p0` and whose derivative is that of `p / p0`.
/// Returns `sum(out * g)`, `out` and each token's top probability `p`.
fn slow_switch(
    sd: &StateDict,
    x: &[f64],
    g: &[f64],
    plan: &RoutePlan,
    c: &Case,
    p0: Option<&[f64]>,
) -> (f64, Vec<f64>, Vec<f64>) {
    let (d, f, e) = (c.d, c.f, c.e);
    let (wr, br) = (get(sd, "switch.weight"), get(sd, "switch.bias"));
    let mut out = vec![0.0; c.tokens * d];
    let mut probs = vec![0.0; c.tokens];
    let mut loss = 0.0;
    for t in 0..c.tokens {
        let xt = &x[t * d..(t + 1) * d];
        let logits: Vec<f64> = (0..e)
            .map(|i| br[i] + (0..d).map(|j| wr[i * d + j] * xt[j]).sum::<f64>())
            .collect();
        let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
        let r = plan.routes[t];
        let p = (logits[r] - mx).exp() / z;
        probs[t] = p;
        let y: Vec<f64> = if plan.dropped[t] {
            xt.to_vec()
        } else {
            let w1 = get(sd, &format!("experts.{r}.layer1.weight"));
            let b1 = get(sd, &format!("experts.{r}.layer1.bias"));
            let w2 = get(sd, &format!("experts.{r}.layer2.weight"));
            let b2 = get(sd, &format!("experts.{r}.layer2.bias"));
            let h: Vec<f64> = (0..f)
                .map(|k| (b1[k] + (0..d).map(|j| w1[k * d + j] * xt[j]).sum::<f64>()).max(0.0))
                .collect();
            (0..d)
                .map(|j| b2[j] + (0..f).map(|k| w2[j * f + k] * h[k]).sum::<f64>())
                .collect()
        };
        let gate = if c.is_scale_prob {
            p
        } else {
            p / p0.map_or(p, |p0| p0[t])
        };
        for j in 0..d {
            out[t * d + j] = y[j] * gate;
            loss += out[t * d + j] * g[t * d + j];
        }
    }
    (loss, out, probs)
}

/// d loss / d(every weight and input entry), by central differences of [`slow_switch`].
fn finite_difference(
    sd: &StateDict,
    x: &[f64],
    g: &[f64],
    plan: &RoutePlan,
    c: &Case,
) -> (StateDict, Vec<f64>) {
    let h = 1e-6;
    let (_, _, p0) = slow_switch(sd, x, g, plan, c, None);
    let loss = |sd: &StateDict, x: &[f64]| slow_switch(sd, x, g, plan, c, Some(&p0)).0;
    let mut grads = StateDict::new();
    for (name, t) in sd {
        let mut v = t.to_f64();
        let mut gv = vec![0.0f32; v.len()];
        for i in 0..v.len() {
            let orig = v[i];
            let mut probe = |val: f64| {
                v[i] = val;
                let mut sd2 = sd.clone();
                sd2.insert(
                    name.clone(),
                    HostTensor {
                        shape: t.shape.clone(),
                        data: HostData::F64(v.clone()),
                    },
                );
                loss(&sd2, x)
            };
            let (up, down) = (probe(orig + h), probe(orig - h));
            v[i] = orig;
            gv[i] = ((up - down) / (2.0 * h)) as f32;
        }
        grads.insert(name.clone(), HostTensor::f32(t.shape.clone(), gv));
    }
    let mut gx = vec![0.0; x.len()];
    let mut xv = x.to_vec();
    for i in 0..x.len() {
        let orig = xv[i];
        xv[i] = orig + h;
        let up = loss(sd, &xv);
        xv[i] = orig - h;
        let down = loss(sd, &xv);
        xv[i] = orig;
        gx[i] = (up - down) / (2.0 * h);
    }
    (grads, gx)
}

fn to_f64(t: Tensor<2>) -> Vec<f64> {
    switch_transformer::store::host_f32(t)
        .into_iter()
        .map(f64::from)
        .collect()
}

fn check(c: Case, seed: u64) {
    let device = Device::default().autodiff();
    let sd = common::random_switch_weights(seed, c.d, c.f, c.e);
    let config = ModelConfig {
        d_model: c.d,
        d_ff: c.f,
        n_experts: c.e,
        capacity_factor: c.capacity_factor,
        drop_tokens: c.drop_tokens,
        is_scale_prob: c.is_scale_prob,
        ..Default::default()
    };
    let sff = switch_from_state_dict(&config, &sd, &device).unwrap();
    let mut rng = RoutingRng::seed_from_u64(seed + 1000);
    let x_host = common::uniform(&mut rng, vec![c.tokens, c.d], 1.5).to_f64();
    let g_host = common::uniform(&mut rng, vec![c.tokens, c.d], 1.0).to_f64();
    let to_t = |v: &[f64]| {
        let v: Vec<f32> = v.iter().map(|&a| a as f32).collect();
        Tensor::<2>::from_data(TensorData::new(v, [c.tokens, c.d]), &device)
    };
    let x = to_t(&x_host).require_grad();
    let route_prob = sff.router.forward(x.clone());
    let probs: Vec<f32> = route_prob.clone().into_data().try_to_vec().unwrap();
    let opts = RoutingOptions::labml(c.capacity_factor, c.drop_tokens);
    let plan = RoutePlan::new(&probs, c.e, &opts, &mut rng);
    let out = sff.dispatch(x.clone(), route_prob, &plan, &mut rng);

    let (_, expected, _) = slow_switch(&sd, &x_host, &g_host, &plan, &c, None);
    let ours = to_f64(out.out.clone());
    let err = common::max_rel_err(&ours, &expected);
    assert!(err < 1e-5, "forward error {err}");

    let grads = (out.out * to_t(&g_host)).sum().backward();
    let ours_grads = switch_state_dict(&sff, Source::Grads(&grads));
    let (fd, fd_x) = finite_difference(&sd, &x_host, &g_host, &plan, &c);
    for (name, t) in &fd {
        // No gradient at all is right only where the true gradient is zero (an expert that
        // received no token).
        let ours = ours_grads
            .get(name)
            .map_or_else(|| vec![0.0; t.numel()], |g| g.to_f64());
        let err = common::max_rel_err(&ours, &t.to_f64());
        assert!(err < 1e-3, "gradient of {name}: error {err}");
    }
    let gx = to_f64(x.grad(&grads).unwrap());
    let err = common::max_rel_err(&gx, &fd_x);
    assert!(err < 1e-3, "gradient of x: error {err}");
}

#[test]
fn matches_slow_implementation_without_dropping() {
    for (seed, is_scale_prob) in [(1, true), (2, false)] {
        check(
            Case {
                d: 6,
                f: 10,
                e: 3,
                tokens: 20,
                capacity_factor: 1.0,
                drop_tokens: false,
                is_scale_prob,
            },
            seed,
        );
    }
}

#[test]
fn matches_slow_implementation_with_dropping() {
    for (seed, is_scale_prob) in [(3, true), (4, false)] {
        check(
            Case {
                d: 5,
                f: 7,
                e: 4,
                tokens: 24,
                capacity_factor: 0.6,
                drop_tokens: true,
                is_scale_prob,
            },
            seed,
        );
    }
}

#[test]
fn one_expert_and_zero_capacity() {
    // One expert: plain FFN scaled by p = 1. Capacity 0: every token dropped.
    for (e, cf) in [(1, 1.0), (4, 0.1)] {
        check(
            Case {
                d: 4,
                f: 6,
                e,
                tokens: 8,
                capacity_factor: cf,
                drop_tokens: true,
                is_scale_prob: true,
            },
            9,
        );
    }
}

/// The settings a Switch layer routes by, as one comparable value.
fn settings(
    s: &switch_transformer::SwitchFeedForward,
) -> (
    RoutingOptions,
    f64,
    bool,
    switch_transformer::model::switch::DroppedTokens,
    f64,
    f64,
    Option<switch_transformer::routing::ExpertBias>,
) {
    (
        s.routing,
        s.eval_capacity_factor,
        s.is_scale_prob,
        s.dropped_tokens,
        s.jitter,
        s.expert_dropout,
        s.expert_bias.clone(),
    )
}

/// A layer built from code (`SwitchFeedForwardConfig::new(d, f, e).init`) routes exactly as the
/// layers of a model built from a configuration file, by default and with every routing key
/// set (before, the two defaults differed: dropped tokens zeroed in one, passed through in the
/// other; capacity factor 1.0 against 1.2).
#[test]
fn a_layer_from_code_routes_as_one_from_a_config_file() {
    use switch_transformer::SwitchFeedForwardConfig;
    let device = common::test_device();
    let from_file = |c: &ModelConfig| {
        let model = c.init(0, &device).unwrap();
        settings(model.layers[0].switch().expect("a Switch layer"))
    };
    let mut c = ModelConfig::default();
    let code = SwitchFeedForwardConfig::new(c.d_model, c.d_ff, c.n_experts).init(&device);
    assert_eq!(settings(&code), from_file(&c), "defaults");

    let mut run = switch_transformer::train::config::RunConfig::default();
    for set in [
        "model.capacity_factor=1.7",
        "model.eval_capacity_factor=2.0",
        "model.drop_tokens=false",
        "model.top_k=2",
        "model.drop_policy=confidence",
        "model.route_on=host",
        "model.dropped_tokens=zero",
        "model.is_scale_prob=false",
        "model.router_jitter=0.01",
        "model.expert_dropout=0.3",
        "model.balance=bias",
        "model.bias_rate=0.01",
    ] {
        run.set(set).unwrap();
    }
    c = run.model;
    let code = c.switch_config().init(&device);
    assert_eq!(settings(&code), from_file(&c), "every key set");
    let built = SwitchFeedForwardConfig::new(c.d_model, c.d_ff, c.n_experts)
        .with_capacity_factor(1.7)
        .with_eval_capacity_factor(2.0)
        .with_drop_tokens(false)
        .with_top_k(2)
        .with_drop_policy(switch_transformer::routing::DropPolicy::Confidence)
        .with_route_on(switch_transformer::routing::RoutePlace::Host)
        .with_dropped_tokens(switch_transformer::model::switch::DroppedTokens::Zero)
        .with_is_scale_prob(false)
        .with_router_jitter(0.01)
        .with_expert_dropout(0.3)
        .with_balance(switch_transformer::routing::Balance::Bias)
        .with_bias_rate(0.01)
        .init(&device);
    assert_eq!(
        settings(&built),
        from_file(&c),
        "the same keys through the builder"
    );
}

/// Auxiliary-loss-free balancing (`model.balance = bias`): each token's expert is the top of
/// `logits + bias` (a slow f64 argmax), on the host and on the device decision alike, while its
/// gate stays the router's probability: the output and every gradient are the slow
/// implementation's for that choice (the bias itself has no gradient).
#[test]
fn a_bias_moves_the_choice_but_not_the_gate() {
    use switch_transformer::routing::{Balance, RoutePlace};
    let c = Case {
        d: 8,
        f: 16,
        e: 4,
        tokens: 48,
        // Capacity for every token: no drops, so the host and device decisions agree.
        capacity_factor: 4.0,
        drop_tokens: true,
        is_scale_prob: true,
    };
    let device = Device::default().autodiff();
    let mut sd = common::random_switch_weights(5, c.d, c.f, c.e);
    let bias = [0.3f32, -0.4, 0.0, 0.15];
    sd.insert(
        "expert_bias".into(),
        HostTensor::f32(vec![c.e], bias.to_vec()),
    );
    let config = ModelConfig {
        d_model: c.d,
        d_ff: c.f,
        n_experts: c.e,
        capacity_factor: c.capacity_factor,
        balance: Balance::Bias,
        ..Default::default()
    };
    let mut sff = switch_from_state_dict(&config, &sd, &device).unwrap();
    assert_eq!(sff.expert_bias.as_ref().unwrap().values, bias);
    let mut rng = RoutingRng::seed_from_u64(9);
    let x_host = common::uniform(&mut rng, vec![c.tokens, c.d], 1.5).to_f64();
    let g_host = common::uniform(&mut rng, vec![c.tokens, c.d], 1.0).to_f64();
    let to_t = |v: &[f64]| {
        let v: Vec<f32> = v.iter().map(|&a| a as f32).collect();
        Tensor::<2>::from_data(TensorData::new(v, [c.tokens, c.d]), &device)
    };

    // The slow choice: argmax over experts of x W_r + b_r + bias, in f64.
    let (wr, br) = (get(&sd, "switch.weight"), get(&sd, "switch.bias"));
    let (mut scores, mut unbiased_choice) = (vec![], vec![]);
    for t in 0..c.tokens {
        let xt = &x_host[t * c.d..(t + 1) * c.d];
        let logits: Vec<f64> = (0..c.e)
            .map(|i| br[i] + (0..c.d).map(|j| wr[i * c.d + j] * xt[j]).sum::<f64>())
            .collect();
        let top = |v: &[f64]| (0..c.e).fold(0, |b, i| if v[i] > v[b] { i } else { b });
        unbiased_choice.push(top(&logits));
        scores.extend(logits.iter().zip(bias).map(|(l, b)| (l + b as f64) as f32));
    }
    let opts = RoutingOptions::labml(c.capacity_factor, true);
    let plan = RoutePlan::new(&scores, c.e, &opts, &mut rng);
    assert!(
        plan.routes
            .iter()
            .zip(&unbiased_choice)
            .any(|(a, b)| a != b),
        "the bias should change some choices in this case"
    );
    let (_, expected, _) = slow_switch(&sd, &x_host, &g_host, &plan, &c, None);

    for place in [RoutePlace::Host, RoutePlace::Device] {
        sff.routing.place = place;
        let x = to_t(&x_host).require_grad();
        let out = sff.forward(x.clone(), &mut rng);
        let routes: Vec<usize> = out.stats.host().routes;
        assert_eq!(routes, plan.routes, "{place:?}: the choices");
        let err = common::max_rel_err(&to_f64(out.out.clone()), &expected);
        assert!(err < 1e-5, "{place:?}: forward error {err}");
        let grads = (out.out * to_t(&g_host)).sum().backward();
        let ours_grads = switch_state_dict(&sff, Source::Grads(&grads));
        assert!(!ours_grads.contains_key("expert_bias"));
        let (fd, fd_x) = finite_difference(&sd, &x_host, &g_host, &plan, &c);
        for (name, t) in fd.iter().filter(|(n, _)| *n != "expert_bias") {
            let ours = ours_grads
                .get(name)
                .map_or_else(|| vec![0.0; t.numel()], |g| g.to_f64());
            let err = common::max_rel_err(&ours, &t.to_f64());
            assert!(err < 1e-3, "{place:?}: gradient of {name}: error {err}");
        }
        let err = common::max_rel_err(&to_f64(x.grad(&grads).unwrap()), &fd_x);
        assert!(err < 1e-3, "{place:?}: gradient of x: error {err}");
    }

    // A step's update moves each bias towards an even load: the most loaded expert's down.
    let load = [0.5, 0.25, 0.125, 0.125];
    sff.update_expert_bias(&load);
    let rate = switch_transformer::SwitchFeedForwardConfig::new(1, 1, 1).bias_rate as f32;
    let moved: Vec<f32> = sff.expert_bias.as_ref().unwrap().values.clone();
    assert_eq!(
        moved,
        [bias[0] - rate, bias[1], bias[2] + rate, bias[3] + rate]
    );
}
