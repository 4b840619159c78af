//! labml's initialisation, drawn on the host from a seed (so it does not depend on the order in
//! which Burn would lazily initialise parameters, nor on the backend).
//!
//! PyTorch defaults: Linear `W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`; Embedding `N(0, 1)`;
//! LayerNorm `gamma = 1, beta = 0`. labml builds experts and layers with `copy.deepcopy`, so all
//! experts of a layer, and all layers, start as identical copies.

use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::config::ModelConfig;
use crate::model::SwitchTransformer;
use crate::router::RoutingRng;
use crate::store::HostTensor;
use crate::weights::{StateDict, model_from_state_dict};

/// `nn.Linear(d_in, d_out)` default init, PyTorch layout `[d_out, d_in]`.
fn linear(rng: &mut RoutingRng, sd: &mut StateDict, name: &str, d_in: usize, d_out: usize) {
    let bound = 1.0 / (d_in as f32).sqrt();
    let mut u =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
    let w = HostTensor::f32(vec![d_out, d_in], u(d_out * d_in));
    let b = HostTensor::f32(vec![d_out], u(d_out));
    sd.insert(format!("{name}.weight"), w);
    sd.insert(format!("{name}.bias"), b);
}

fn layer_norm(sd: &mut StateDict, name: &str, d: usize) {
    sd.insert(
        format!("{name}.weight"),
        HostTensor::f32(vec![d], vec![1.0; d]),
    );
    sd.insert(
        format!("{name}.bias"),
        HostTensor::f32(vec![d], vec![0.0; d]),
    );
}

/// One block's parameters, experts as copies of one expert, names relative to the block.
fn block(rng: &mut RoutingRng, c: &ModelConfig) -> StateDict {
    let d = c.d_model;
    let mut sd = StateDict::new();
    for p in ["query", "key", "value"] {
        linear(rng, &mut sd, &format!("attn.{p}.linear"), d, d);
    }
    linear(rng, &mut sd, "attn.output", d, d);
    layer_norm(&mut sd, "norm_self_attn", d);
    layer_norm(&mut sd, "norm_ff", d);
    linear(rng, &mut sd, "feed_forward.switch", d, c.n_experts);
    let mut expert = StateDict::new();
    linear(rng, &mut expert, "layer1", d, c.d_ff);
    linear(rng, &mut expert, "layer2", c.d_ff, d);
    for e in 0..c.n_experts {
        for (k, v) in &expert {
            sd.insert(format!("feed_forward.experts.{e}.{k}"), v.clone());
        }
    }
    sd
}

/// labml's initial state dict for `c`: identical experts, identical layers.
pub fn labml_state_dict(c: &ModelConfig, seed: u64) -> StateDict {
    let mut rng = RoutingRng::seed_from_u64(seed);
    let mut sd = StateDict::new();
    let embed: Vec<f32> = (0..c.n_vocab * c.d_model)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    sd.insert(
        "src_embed.weight".into(),
        HostTensor::f32(vec![c.n_vocab, c.d_model], embed),
    );
    let layer = block(&mut rng, c);
    for l in 0..c.n_layers {
        for (k, v) in &layer {
            sd.insert(format!("transformer.layers.{l}.{k}"), v.clone());
        }
    }
    layer_norm(&mut sd, "transformer.norm", c.d_model);
    linear(&mut rng, &mut sd, "generator", c.d_model, c.n_vocab);
    sd
}

/// A model initialised as labml's, on `device`. `c` must be valid.
pub fn labml_init(c: &ModelConfig, seed: u64, device: &Device) -> SwitchTransformer {
    model_from_state_dict(c, &labml_state_dict(c, seed), device)
        .expect("labml_state_dict matches its own configuration")
}
