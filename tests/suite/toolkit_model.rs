//! The paper's toolkit beyond labml's miniature, model-wide options: Switch layers every k-th
//! block, learned positions, initialisation schemes, dropouts, selective precision.

use crate::common;
use crate::toolkit::{config, input, switch};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use switch_transformer::ModelConfig;
use switch_transformer::interop::weights::{
    Source, StateDict, model_from_state_dict, model_state_dict,
};
use switch_transformer::model::InitScheme;
use switch_transformer::routing::RoutingRng;

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
    let err = common::max_rel_err_f32(&lb, &la);
    assert!(err < 0.05, "bf16 logits differ by {err}");
    let targets = ids(&device, 2, 8);
    let losses = switch_transformer::model::loss::Losses::new(
        b.logits,
        targets,
        &b.stats,
        0.01,
        0.001,
        Default::default(),
    );
    assert_eq!(losses.total.dtype(), DType::F32);
    let grads = losses.total.backward();
    let g = model_state_dict(&m16, Source::Grads(&grads));
    assert_eq!(
        g.len(),
        model_state_dict(&m16, Source::Values).len(),
        "every parameter gets a gradient"
    );
}

/// Fine-grained experts (`model.expert_d_ff`): 16 experts of width 64 with top-4 against
/// labml's 4 of width 256 with top-1: the experts take their own width (dense blocks keep
/// `d_ff`), the parameter count and the state dict follow, and the FLOPs per token are equal
/// but for the router's `2 d E` per Switch layer.
#[test]
fn fine_grained_experts_have_their_own_width_at_equal_flops() {
    let device = Device::default();
    let coarse = ModelConfig {
        n_layers: 2,
        ..ModelConfig::default()
    };
    let fine = ModelConfig {
        n_experts: 16,
        expert_d_ff: 64,
        top_k: 4,
        ..coarse.clone()
    };
    let router = |c: &ModelConfig| 2.0 * (2 * c.d_model * c.n_experts) as f64;
    assert_eq!(
        fine.flops_per_token(64) - router(&fine),
        coarse.flops_per_token(64) - router(&coarse)
    );
    for switch_every in [1, 2] {
        let c = ModelConfig {
            switch_every,
            ..fine.clone()
        };
        let m = c.init(0, &device).unwrap();
        let sd = model_state_dict(&m, Source::Values);
        for (l, b) in m.layers.iter().enumerate() {
            match b.switch() {
                Some(s) => assert_eq!(s.experts.w1.dims(), [16, 128, 64]),
                None => {
                    let name = format!("transformer.layers.{l}.feed_forward.layer1.weight");
                    assert_eq!(sd[&name].shape, [256, 128], "a dense block keeps d_ff");
                }
            }
        }
        assert_eq!(
            sd.values().map(|t| t.numel()).sum::<usize>(),
            c.num_params()
        );
        let back = model_from_state_dict(&c, &sd, &device).unwrap();
        assert_eq!(model_state_dict(&back, Source::Values), sd);
        let out = m.forward(ids(&device, 2, 8), &mut RoutingRng::seed_from_u64(0));
        assert_eq!(out.logits.dims(), [2, 8, c.n_vocab]);
    }
    // labml's weights do not fit a fine-grained configuration: a clear error.
    let labml = model_state_dict(&coarse.init(0, &device).unwrap(), Source::Values);
    let e = model_from_state_dict(&fine, &labml, &device).unwrap_err();
    assert!(format!("{e:#}").contains("shape"), "{e:#}");
}
