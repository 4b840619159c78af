//! Routing that came after the Switch paper, against slow f64 implementations: the
//! sequence-level load-balancing loss and shared experts (values and gradients), and the
//! shared experts through the whole model (parameters, FLOPs, state dict, the CPU decoder).

use crate::common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use switch_transformer::interop::weights::{
    Source, model_from_state_dict, model_state_dict, switch_from_state_dict,
};
use switch_transformer::model::loss::{load_balancing_loss, sequence_balancing_loss};
use switch_transformer::routing::RoutingRng;
use switch_transformer::store::host_f32;
use switch_transformer::{ModelConfig, SwitchFeedForwardConfig};

fn tensor(v: &[f64], shape: [usize; 2], device: &Device) -> Tensor<2> {
    let v: Vec<f32> = v.iter().map(|&a| a as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// [`common::max_rel_err`] of f32 values against f64 ones.
fn max_rel(a: &[f32], b: &[f64]) -> f64 {
    let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    common::max_rel_err(&a, b)
}

/// The sequence-level loss equals `(1/S) sum_s E sum_i f_si P_si` computed token by token in
/// f64, and its gradient is that of `sum_t,i c_ti p_ti` with the constant `c` the slow
/// implementation derives (f counts first choices, so only P carries the gradient). With one
/// sequence it is the batch-level loss.
#[test]
fn the_sequence_balancing_loss_averages_each_sequence_s_loss() {
    let device = Device::default().autodiff();
    let (d, e, seqs, len) = (8, 4, 3, 10);
    let layer = SwitchFeedForwardConfig::new(d, 16, e)
        .with_capacity_factor(4.0)
        .init(&device);
    let mut rng = RoutingRng::seed_from_u64(3);
    let x = common::uniform(&mut rng, vec![seqs * len, d], 2.0).to_f64();
    // Burn keeps no graph after a backward: each loss below runs its own forward (same seed).
    let forward = |x: &[f64], n: usize| {
        layer
            .forward(
                tensor(x, [n, d], &device),
                &mut RoutingRng::seed_from_u64(4),
            )
            .stats
    };
    let out_stats = forward(&x, seqs * len);
    let stats = std::slice::from_ref(&out_stats);
    // Slow: per sequence, counts of first choices and sums of probabilities.
    let routes = out_stats.host().routes;
    let p: Vec<f64> = host_f32(out_stats.route_prob.clone())
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (mut want, mut c) = (0.0, vec![0.0; seqs * len * e]);
    for s in 0..seqs {
        let tokens = s * len..(s + 1) * len;
        let mut f = vec![0.0; e];
        let mut pm = vec![0.0; e];
        for t in tokens.clone() {
            f[routes[t]] += 1.0 / len as f64;
            for i in 0..e {
                pm[i] += p[t * e + i] / len as f64;
            }
        }
        want += e as f64 * (0..e).map(|i| f[i] * pm[i]).sum::<f64>() / seqs as f64;
        for t in tokens {
            for i in 0..e {
                c[t * e + i] = e as f64 * f[i] / (len * seqs) as f64;
            }
        }
    }
    let got = sequence_balancing_loss(stats, len, &device);
    let got_v = host_f32(got.clone())[0] as f64;
    assert!((got_v - want).abs() < 1e-5 * want, "{got_v} vs {want}");
    assert!(
        routes.iter().any(|&r| r != routes[0]),
        "the case routes to several experts"
    );

    let grad_of = |loss: Tensor<1>| -> Vec<f32> {
        let g = loss.backward();
        host_f32(layer.router.switch.weight.val().grad(&g).unwrap())
    };
    let again = forward(&x, seqs * len);
    let slow = (again.route_prob * tensor(&c, [seqs * len, e], &device)).sum();
    let want_g: Vec<f64> = grad_of(slow).iter().map(|&v| v as f64).collect();
    let err = max_rel(&grad_of(got), &want_g);
    assert!(err < 1e-5, "router gradient: {err}");

    // One sequence: the batch-level loss, value and gradient.
    let one = |x: &[f64]| [forward(x, len)];
    let (a, b) = (
        sequence_balancing_loss(&one(&x[..len * d]), len, &device),
        load_balancing_loss(&one(&x[..len * d]), &device),
    );
    let (va, vb) = (host_f32(a.clone())[0], host_f32(b.clone())[0]);
    assert!((va - vb).abs() < 1e-6 * vb, "{va} vs {vb}");
    let gb: Vec<f64> = grad_of(b).iter().map(|&v| v as f64).collect();
    assert!(max_rel(&grad_of(a), &gb) < 1e-5);
}

/// A Switch layer with shared experts outputs the routed layer's output plus
/// `relu(x W1^T + b1) W2^T + b2` over every token, and the shared weights' gradients are that
/// FFN's, computed in f64.
#[test]
fn shared_experts_add_an_ffn_that_every_token_passes_through() {
    let device = Device::default().autodiff();
    let (d, f, e, fs, tokens) = (8, 16, 4, 12, 24);
    let mut sd = common::random_switch_weights(11, d, f, e);
    let routed = sd.clone();
    let mut rng = RoutingRng::seed_from_u64(12);
    let w1 = common::uniform(&mut rng, vec![fs, d], 0.4);
    let b1 = common::uniform(&mut rng, vec![fs], 0.2);
    let w2 = common::uniform(&mut rng, vec![d, fs], 0.3);
    let b2 = common::uniform(&mut rng, vec![d], 0.2);
    for (name, t) in [
        ("layer1.weight", &w1),
        ("layer1.bias", &b1),
        ("layer2.weight", &w2),
        ("layer2.bias", &b2),
    ] {
        sd.insert(format!("shared_experts.{name}"), t.clone());
    }
    let config = |shared_experts| ModelConfig {
        d_model: d,
        d_ff: f,
        n_experts: e,
        capacity_factor: 1.0, // some tokens drop: the shared experts still see them
        shared_experts,
        shared_d_ff: fs / 2,
        ..Default::default()
    };
    let with = switch_from_state_dict(&config(2), &sd, &device).unwrap();
    let without = switch_from_state_dict(&config(0), &routed, &device).unwrap();
    assert!(without.shared.is_none());
    let x = common::uniform(&mut rng, vec![tokens, d], 1.5).to_f64();
    let g = common::uniform(&mut rng, vec![tokens, d], 1.0).to_f64();
    let a = with.forward(
        tensor(&x, [tokens, d], &device),
        &mut RoutingRng::seed_from_u64(5),
    );
    let b = without.forward(
        tensor(&x, [tokens, d], &device),
        &mut RoutingRng::seed_from_u64(5),
    );
    assert!(a.stats.host().n_dropped > 0, "the case drops tokens");
    assert_eq!(a.stats.host().routes, b.stats.host().routes);

    // Slow FFN and its weight gradient for L = sum(out * g).
    let (w1, b1, w2, b2) = (w1.to_f64(), b1.to_f64(), w2.to_f64(), b2.to_f64());
    let (mut ffn, mut gw1) = (vec![0.0; tokens * d], vec![0.0; d * fs]);
    for t in 0..tokens {
        let xt = &x[t * d..(t + 1) * d];
        let h: Vec<f64> = (0..fs)
            .map(|j| (b1[j] + (0..d).map(|k| w1[j * d + k] * xt[k]).sum::<f64>()).max(0.0))
            .collect();
        for o in 0..d {
            ffn[t * d + o] = b2[o] + (0..fs).map(|j| w2[o * fs + j] * h[j]).sum::<f64>();
        }
        for j in 0..fs {
            if h[j] > 0.0 {
                let dh: f64 = (0..d).map(|o| g[t * d + o] * w2[o * fs + j]).sum();
                for k in 0..d {
                    gw1[k * fs + j] += xt[k] * dh; // Burn's [d_in, d_out] layout
                }
            }
        }
    }
    let diff: Vec<f32> = host_f32(a.out.clone() - b.out.clone());
    let err = max_rel(&diff, &ffn);
    assert!(err < 1e-5, "output: {err}");
    let grads = (a.out * tensor(&g, [tokens, d], &device)).sum().backward();
    let shared = with.shared.as_ref().unwrap();
    let got = host_f32(shared.layer1.weight.val().grad(&grads).unwrap());
    let err = max_rel(&got, &gw1);
    assert!(err < 1e-5, "layer1 gradient: {err}");
}

/// Shared experts through the model: counted in the parameters and FLOPs (1 shared of width
/// f/2 beside top-1 routed experts of width f/2 costs one expert of width f), saved and loaded under
/// `feed_forward.shared_experts`, and decoded on the CPU as the generic path computes.
#[test]
fn shared_experts_are_counted_saved_and_decoded() {
    use switch_transformer::infer::decode::HostDecoder;
    use switch_transformer::model::InitScheme;
    let device = Device::flex();
    let base = ModelConfig {
        n_vocab: 20,
        n_layers: 2,
        d_model: 16,
        heads: 2,
        d_ff: 32,
        init: InitScheme::Independent,
        ..ModelConfig::default()
    };
    let c = ModelConfig {
        shared_experts: 1,
        shared_d_ff: 16,
        expert_d_ff: 16,
        top_k: 2,
        ..base.clone()
    };
    // 1 shared of width f/2 beside top-1 routed experts of width f/2: the base's FLOPs.
    let equal = ModelConfig {
        top_k: 1,
        ..c.clone()
    };
    assert_eq!(equal.flops_per_token(8), base.flops_per_token(8));
    let m = c.init(1, &device).unwrap();
    let sd = model_state_dict(&m, Source::Values);
    assert_eq!(
        sd["transformer.layers.1.feed_forward.shared_experts.layer1.weight"].shape,
        [16, 16]
    );
    assert_eq!(
        sd.values().map(|t| t.numel()).sum::<usize>(),
        c.num_params()
    );
    let back = model_from_state_dict(&c, &sd, &device).unwrap();
    assert_eq!(model_state_dict(&back, Source::Values), sd);
    // A model without shared experts refuses weights that have them, naming the tensor.
    let err = model_from_state_dict(&base, &sd, &device).unwrap_err();
    assert!(format!("{err:#}").contains("shape") || format!("{err:#}").contains("shared"));

    let decoder = HostDecoder::for_model(&m).expect("an f32 model on the CPU");
    let mut cache = decoder.new_cache();
    let mut burn_cache = vec![Default::default(); 2];
    let mut nodrop = m.clone();
    nodrop.set_drop_tokens(false);
    let mut rng = RoutingRng::seed_from_u64(0);
    for step in 0..12i64 {
        let token = (step * 5 + 2) % 20;
        let host = decoder.step(token as u32, &mut cache, 8);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![token], [1, 1]), &device);
        let burn: Vec<f32> = host_f32(
            nodrop
                .forward_cached(ids, &mut burn_cache, 8, &mut rng)
                .reshape([-1]),
        );
        let err = common::max_rel_err_f32(&host, &burn);
        assert!(err < 1e-5, "step {step}: {err}");
    }
}
