//! Weights move both ways between this implementation and PyTorch's state_dict format.

use crate::common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use switch_transformer::ModelConfig;
use switch_transformer::interop::weights::{
    Source, load_model, model_from_state_dict, model_state_dict, save_model,
};
use switch_transformer::routing::RoutingRng;
use switch_transformer::store::TensorFile;

fn tiny() -> ModelConfig {
    ModelConfig {
        n_vocab: 65,
        d_model: 32,
        heads: 4,
        d_ff: 64,
        n_layers: 2,
        n_experts: 4,
        capacity_factor: 1.0,
        drop_tokens: false,
        is_scale_prob: true,
        ..Default::default()
    }
}

fn logits(m: &switch_transformer::SwitchTransformer, device: &Device) -> Vec<f32> {
    let ids: Vec<i64> = (0..2 * 12).map(|i| (i * 7 % 65) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 12]), device);
    let out = m.forward(ids, &mut RoutingRng::seed_from_u64(0));
    out.logits.into_data().try_to_vec().unwrap()
}

#[test]
fn labml_weights_round_trip_exactly() {
    let device = Device::default();
    let f = TensorFile::read(&common::fixture("model_tiny.safetensors")).unwrap();
    let sd = f.with_prefix("param.");
    let m = model_from_state_dict(&tiny(), &sd, &device).unwrap();
    let back = model_state_dict(&m, Source::Values);
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        sd.keys().collect::<Vec<_>>()
    );
    for (k, v) in &sd {
        assert_eq!(&back[k], v, "{k} changed in the round trip");
    }
}

#[test]
fn save_then_load_gives_the_same_model() {
    let device = Device::default();
    let c = tiny();
    let m = c.init(5, &device).unwrap();
    let dir = std::env::temp_dir().join(format!("switch-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    save_model(&path, &m, &c).unwrap();
    let loaded = load_model(&path, &c, &device).unwrap();
    assert_eq!(logits(&m, &device), logits(&loaded, &device));
    // The file is a plain PyTorch state dict plus the config as metadata.
    let f = TensorFile::read(&path).unwrap();
    assert!(
        f.tensors
            .contains_key("transformer.layers.1.feed_forward.experts.3.layer2.weight")
    );
    assert_eq!(f.tensors["generator.weight"].shape, vec![65, 32]);
    let meta: ModelConfig = serde_json::from_str(&f.metadata["config"]).unwrap();
    assert_eq!(meta, c);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mismatched_weights_are_clear_errors() {
    let device = Device::default();
    let f = TensorFile::read(&common::fixture("model_tiny.safetensors")).unwrap();
    let sd = f.with_prefix("param.");
    let wrong_width = ModelConfig { d_ff: 32, ..tiny() };
    let err = model_from_state_dict(&wrong_width, &sd, &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has shape") && err.contains("layer1.weight"),
        "{err}"
    );
    let fewer_layers = ModelConfig {
        n_layers: 1,
        ..tiny()
    };
    let err = model_from_state_dict(&fewer_layers, &sd, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not use"), "{err}");
    let mut missing = sd.clone();
    missing.remove("transformer.norm.bias");
    let err = model_from_state_dict(&tiny(), &missing, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("transformer.norm.bias"), "{err}");
}

#[test]
fn labml_init_has_identical_experts_and_layers() {
    let c = ModelConfig::default();
    let sd = switch_transformer::interop::init::labml_state_dict(&c, 0);
    let n: usize = sd.values().map(|t| t.numel()).sum();
    assert_eq!(n, 2_001_497);
    let p = |k: &str| sd[k].to_f32();
    assert_eq!(
        p("transformer.layers.0.feed_forward.experts.0.layer1.weight"),
        p("transformer.layers.0.feed_forward.experts.3.layer1.weight")
    );
    assert_eq!(
        p("transformer.layers.0.attn.query.linear.weight"),
        p("transformer.layers.5.attn.query.linear.weight")
    );
    assert_ne!(
        p("transformer.layers.0.attn.query.linear.weight"),
        p("transformer.layers.0.attn.key.linear.weight")
    );
    // PyTorch's default Linear bound 1/sqrt(fan_in).
    let w = p("generator.weight");
    let bound = 1.0 / (128f32).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    assert!(w.iter().any(|v| v.abs() > 0.9 * bound));
}
