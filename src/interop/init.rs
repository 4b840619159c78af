//! Initialisation, drawn on the host from a seed (so it does not depend on the order in which
//! Burn would lazily initialise parameters, nor on the backend).
//!
//! * `labml`: PyTorch defaults — Linear `W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, Embedding
//!   `N(0, 1)`, LayerNorm `gamma = 1, beta = 0` — and, as labml builds experts and layers with
//!   `copy.deepcopy`, all experts of a layer and all layers of a kind start as identical copies.
//! * `independent`: the same distributions, every tensor drawn separately.
//! * `truncated_normal` (the paper): weights `N(0, sigma)` truncated at 2 sigma with
//!   `sigma = sqrt(init_scale / fan_in)`, biases 0; embeddings `N(0, 1)`.

use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::interop::weights::{StateDict, model_from_state_dict};
use crate::model::SwitchTransformer;
use crate::model::{InitScheme, ModelConfig};
use crate::routing::{Balance, RoutingRng};
use crate::store::HostTensor;

use super::names::{self, join};

struct Init<'a> {
    rng: RoutingRng,
    c: &'a ModelConfig,
}

impl Init<'_> {
    fn normal(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect()
    }

    /// `nn.Linear(d_in, d_out)`, PyTorch layout `[d_out, d_in]`.
    fn linear(&mut self, sd: &mut StateDict, name: &str, d_in: usize, d_out: usize) {
        let (w, b) = match self.c.init {
            InitScheme::Labml | InitScheme::Independent => {
                let bound = 1.0 / (d_in as f32).sqrt();
                let mut u = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|_| self.rng.random_range(-bound..bound))
                        .collect()
                };
                (u(d_out * d_in), u(d_out))
            }
            InitScheme::TruncatedNormal => {
                let sigma = (self.c.init_scale / d_in as f64).sqrt() as f32;
                let w = (0..d_out * d_in)
                    .map(|_| {
                        loop {
                            let z: f32 = StandardNormal.sample(&mut self.rng);
                            if z.abs() <= 2.0 {
                                break z * sigma;
                            }
                        }
                    })
                    .collect();
                (w, vec![0.0; d_out])
            }
        };
        sd.insert(names::weight(name), HostTensor::f32(vec![d_out, d_in], w));
        sd.insert(names::bias(name), HostTensor::f32(vec![d_out], b));
    }

    fn layer_norm(sd: &mut StateDict, name: &str, d: usize) {
        sd.insert(names::weight(name), HostTensor::f32(vec![d], vec![1.0; d]));
        sd.insert(names::bias(name), HostTensor::f32(vec![d], vec![0.0; d]));
    }

    /// One FFN of hidden width `f` (labml `FeedForward`: an expert, or a dense block's),
    /// names relative to it.
    fn ffn(&mut self, f: usize) -> StateDict {
        let mut sd = StateDict::new();
        let [l1, l2] = names::FFN_LAYERS;
        self.linear(&mut sd, l1, self.c.d_model, f);
        self.linear(&mut sd, l2, f, self.c.d_model);
        sd
    }

    /// One block's parameters, names relative to the block.
    fn block(&mut self, switch: bool) -> StateDict {
        let (d, identical) = (self.c.d_model, self.c.init == InitScheme::Labml);
        let mut sd = StateDict::new();
        for p in names::ATTN_QKV {
            self.linear(&mut sd, p, d, d);
        }
        self.linear(&mut sd, names::ATTN_OUTPUT, d, d);
        Self::layer_norm(&mut sd, names::NORM_SELF_ATTN, d);
        Self::layer_norm(&mut sd, names::NORM_FF, d);
        let ff = names::FEED_FORWARD;
        if switch {
            self.linear(&mut sd, &join(ff, names::ROUTER), d, self.c.n_experts);
            let experts = join(ff, names::EXPERTS);
            let width = self.c.expert_width();
            let first = self.ffn(width);
            for e in 0..self.c.n_experts {
                let expert = if identical || e == 0 {
                    first.clone()
                } else {
                    self.ffn(width)
                };
                for (k, v) in expert {
                    sd.insert(join(&names::expert(&experts, e), &k), v);
                }
            }
            if self.c.shared_experts > 0 {
                // Drawn after the routed experts: a model without them draws as before.
                let shared = join(ff, names::SHARED_EXPERTS);
                for (k, v) in self.ffn(self.c.switch_config().shared_width()) {
                    sd.insert(join(&shared, &k), v);
                }
            }
            if self.c.balance == Balance::Bias {
                // Auxiliary-loss-free balancing starts every expert's bias at 0.
                let zeros = HostTensor::f32(vec![self.c.n_experts], vec![0.0; self.c.n_experts]);
                sd.insert(join(ff, names::EXPERT_BIAS), zeros);
            }
        } else {
            for (k, v) in self.ffn(self.c.d_ff) {
                sd.insert(join(ff, &k), v);
            }
        }
        sd
    }
}

/// The initial state dict for `c` (PyTorch names and layouts).
pub fn initial_state_dict(c: &ModelConfig, seed: u64) -> StateDict {
    let mut init = Init {
        rng: RoutingRng::seed_from_u64(seed),
        c,
    };
    let mut sd = StateDict::new();
    let embed = init.normal(c.n_vocab * c.d_model);
    sd.insert(
        names::EMBED.into(),
        HostTensor::f32(vec![c.n_vocab, c.d_model], embed),
    );
    if c.pos_embedding {
        let pos = init.normal(c.max_seq_len * c.d_model);
        sd.insert(
            names::POS_EMBED.into(),
            HostTensor::f32(vec![c.max_seq_len, c.d_model], pos),
        );
    }
    // labml: every layer of a kind is a copy of one template.
    let mut templates: [Option<StateDict>; 2] = [None, None];
    for l in 0..c.n_layers {
        let switch = c.is_switch_layer(l);
        let layer = if c.init == InitScheme::Labml {
            templates[switch as usize]
                .get_or_insert_with(|| init.block(switch))
                .clone()
        } else {
            init.block(switch)
        };
        for (k, v) in layer {
            sd.insert(join(&names::block(l), &k), v);
        }
    }
    Init::layer_norm(&mut sd, names::FINAL_NORM, c.d_model);
    init.linear(&mut sd, names::GENERATOR, c.d_model, c.n_vocab);
    sd
}

/// labml's initial state dict (the `labml` scheme whatever `c.init` says).
pub fn labml_state_dict(c: &ModelConfig, seed: u64) -> StateDict {
    let c = ModelConfig {
        init: InitScheme::Labml,
        ..c.clone()
    };
    initial_state_dict(&c, seed)
}

/// A freshly initialised model on `device`. `c` must be valid.
pub(crate) fn init_model(c: &ModelConfig, seed: u64, device: &Device) -> SwitchTransformer {
    model_from_state_dict(c, &initial_state_dict(c, seed), device)
        .expect("the initial state dict matches its own configuration")
}

impl ModelConfig {
    /// Builds a model initialised as `self.init` says, seeded (checked first: the
    /// configuration, and whether `device` computes in `self.precision`).
    pub fn init(&self, seed: u64, device: &Device) -> anyhow::Result<SwitchTransformer> {
        self.validate()?;
        crate::model::precision::check_device(self.precision, device)?;
        Ok(init_model(self, seed, device))
    }
}
