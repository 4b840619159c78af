//! Generation: the key/value cache gives the same logits as recomputing the window.

use crate::common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use switch_transformer::ModelConfig;
use switch_transformer::infer::generate::{SampleOptions, generate, generate_cached, pick};
use switch_transformer::model::attention::KvCache;
use switch_transformer::routing::RoutingRng;

fn config() -> ModelConfig {
    ModelConfig {
        n_vocab: 20,
        d_model: 16,
        heads: 2,
        d_ff: 24,
        n_layers: 3,
        n_experts: 4,
        capacity_factor: 1.0,
        drop_tokens: false,
        is_scale_prob: true,
        ..Default::default()
    }
}

fn ids(v: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [1, v.len()]), device)
}

#[test]
fn cached_logits_equal_full_forward() {
    let device = Device::default();
    let model = config().init(3, &device).unwrap();
    let tokens: Vec<i64> = (0..12).map(|i| (i * 7 + 3) % 20).collect();
    let mut rng = RoutingRng::seed_from_u64(0);
    let full: Vec<f32> = model
        .forward(ids(&tokens, &device), &mut rng)
        .logits
        .into_data()
        .try_to_vec()
        .unwrap();
    // Prompt of 5 at once, then one token at a time.
    let mut cache = vec![KvCache::default(); 3];
    let mut cached: Vec<f32> = model
        .forward_cached(ids(&tokens[..5], &device), &mut cache, 64, &mut rng)
        .into_data()
        .try_to_vec()
        .unwrap();
    for t in 5..tokens.len() {
        let step = model.forward_cached(ids(&tokens[t..t + 1], &device), &mut cache, 64, &mut rng);
        cached.extend(step.into_data().try_to_vec::<f32>().unwrap());
    }
    assert_eq!(cache[0].len(), 12);
    let err = common::max_rel_err_f32(&cached, &full);
    assert!(err < 1e-5, "cached logits differ: {err}");
}

#[test]
fn cached_generation_equals_recomputation_within_the_context() {
    let device = Device::default();
    let model = config().init(4, &device).unwrap();
    let opts = SampleOptions {
        max_tokens: 20,
        temperature: 0.0,
        top_k: None,
        context: 32,
    };
    let prompt = [1u32, 5, 9];
    let mut r = RoutingRng::seed_from_u64(1);
    let a = generate(&model, &prompt, &opts, &mut r.clone(), &mut r);
    let b = generate_cached(&model, &prompt, &opts, &mut r.clone(), &mut r);
    assert_eq!(a.len(), 20);
    assert_eq!(a, b);
    // Past the context the cache slides instead of recomputing: it still runs.
    let long = SampleOptions {
        max_tokens: 40,
        context: 8,
        ..opts
    };
    assert_eq!(
        generate_cached(&model, &prompt, &long, &mut r.clone(), &mut r).len(),
        40
    );
}

#[test]
fn sampling_respects_temperature_and_top_k() {
    let logits = [0.0f32, 5.0, 1.0, 4.9];
    let mut rng = RoutingRng::seed_from_u64(2);
    let greedy = SampleOptions {
        max_tokens: 1,
        temperature: 0.0,
        top_k: None,
        context: 8,
    };
    assert_eq!(pick(&logits, &greedy, &mut rng), 1);
    let top2 = SampleOptions {
        temperature: 1.0,
        top_k: Some(2),
        ..greedy
    };
    let mut seen = [0; 4];
    for _ in 0..2000 {
        seen[pick(&logits, &top2, &mut rng) as usize] += 1;
    }
    assert_eq!(
        seen[0] + seen[2],
        0,
        "top-k excluded tokens were sampled: {seen:?}"
    );
    // p(1) / p(3) = e^0.1 ~ 1.105
    let ratio = seen[1] as f64 / seen[3] as f64;
    assert!((ratio - 1.105).abs() < 0.15, "{seen:?}");
}

/// The CPU decoder against Burn's cached forward, step by step past the context (sliding
/// window), for Switch routing variants and dense blocks.
#[test]
fn host_decoder_matches_the_burn_path() {
    use switch_transformer::infer::decode::HostDecoder;
    use switch_transformer::infer::generate::{Decoding, generate_with};
    use switch_transformer::model::InitScheme;

    let device = Device::flex();
    let variants = [
        config(),
        ModelConfig {
            top_k: 2,
            ..config()
        },
        ModelConfig {
            is_scale_prob: false,
            switch_every: 2,
            ..config()
        },
    ];
    for (i, c) in variants.into_iter().enumerate() {
        let c = ModelConfig {
            init: InitScheme::Independent,
            ..c
        };
        let model = c.init(10 + i as u64, &device).unwrap();
        let decoder = HostDecoder::for_model(&model).expect("an f32 model on the CPU");
        let (mut host_cache, mut cache) = (decoder.new_cache(), vec![KvCache::default(); 3]);
        let mut rng = RoutingRng::seed_from_u64(0);
        let mut model_nodrop = model.clone();
        model_nodrop.set_drop_tokens(false);
        for step in 0..30i64 {
            let token = (step * 7 + 3) % 20;
            let host = decoder.step(token as u32, &mut host_cache, 8);
            let burn: Vec<f32> = model_nodrop
                .forward_cached(ids(&[token], &device), &mut cache, 8, &mut rng)
                .into_data()
                .try_to_vec()
                .unwrap();
            let err = common::max_rel_err_f32(&host, &burn);
            assert!(err < 1e-5, "variant {i} step {step}: {err}");
        }
        let opts = SampleOptions {
            max_tokens: 40,
            temperature: 0.0,
            top_k: None,
            context: 8,
        };
        let mut r = RoutingRng::seed_from_u64(1);
        let prompt = [1u32, 5, 9];
        assert_eq!(
            generate_cached(&model, &prompt, &opts, &mut r.clone(), &mut r.clone()),
            generate_with(
                &model,
                &prompt,
                &opts,
                Decoding::CachedGeneric,
                &mut r.clone(),
                &mut r,
                &mut |_| {}
            ),
            "variant {i}"
        );
    }
    // Other precisions and learned positions take the generic path.
    let bf16 = ModelConfig {
        precision: switch_transformer::model::precision::Precision::Bf16,
        ..config()
    };
    assert!(HostDecoder::for_model(&bf16.init(0, &device).unwrap()).is_none());
    let learned = ModelConfig {
        pos_embedding: true,
        max_seq_len: 16,
        ..config()
    };
    assert!(HostDecoder::for_model(&learned.init(0, &device).unwrap()).is_none());
}
