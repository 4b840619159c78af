//! A Switch layer inside your own Burn model, trained with Burn's own Adam.
//!
//! The model maps 8 inputs to 1 output through a residual Switch feed-forward layer with 4
//! experts; the target is a different function on each of four regions of the input, which
//! the experts can divide between them. The loss is the mean squared error plus the Switch
//! Transformer's load-balancing loss. Run with `cargo run --release --example switch_layer`.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use rand::SeedableRng;
use switch_transformer::model::SwitchStats;
use switch_transformer::model::loss::load_balancing_loss;
use switch_transformer::{RoutingRng, SwitchFeedForward, SwitchFeedForwardConfig};

/// Your model: an input projection, a Switch layer on a residual, an output projection.
#[derive(Module, Debug)]
struct Regressor {
    input: Linear,
    moe: SwitchFeedForward,
    output: Linear,
}

impl Regressor {
    fn new(device: &Device) -> Self {
        Self {
            input: LinearConfig::new(8, 32).init(device),
            moe: SwitchFeedForwardConfig::new(32, 64, 4)
                .with_capacity_factor(1.25)
                .init(device),
            output: LinearConfig::new(32, 1).init(device),
        }
    }

    /// `x` `[tokens, 8]` -> `[tokens, 1]`, with the Switch layer's routing statistics.
    fn forward(&self, x: Tensor<2>, rng: &mut RoutingRng) -> (Tensor<2>, SwitchStats) {
        let h = self.input.forward(x);
        let switch = self.moe.forward(h.clone(), rng);
        (self.output.forward(h + switch.out), switch.stats)
    }
}

/// The target: `x0 * x1` where both are positive, `sin(3 x2)` where only x0 is, `x3^2` where
/// only x1 is, and `-x4` elsewhere.
fn target(x: &Tensor<2>) -> Tensor<2> {
    let [n, _] = x.dims();
    let col = |i: usize| x.clone().slice([0..n, i..i + 1]);
    let (a, b) = (
        col(0).greater_elem(0.0).float(),
        col(1).greater_elem(0.0).float(),
    );
    let (na, nb) = (a.clone().neg() + 1.0, b.clone().neg() + 1.0);
    a.clone() * b.clone() * col(0) * col(1)
        + a * nb.clone() * (col(2) * 3.0).sin()
        + na.clone() * b * col(3).square()
        - na * nb * col(4)
}

fn main() {
    let device = Device::default().autodiff();
    let mut model = Regressor::new(&device);
    let mut optimizer = AdamConfig::new().init();
    let mut rng = RoutingRng::seed_from_u64(0);
    let (mut first, mut last) = (None, 0.0);
    for step in 1..=300 {
        let x = Tensor::<2>::random([256, 8], Distribution::Normal(0.0, 1.0), &device);
        let y = target(&x);
        let (prediction, stats) = model.forward(x, &mut rng);
        let mse = (prediction - y).square().mean();
        let balance = load_balancing_loss(std::slice::from_ref(&stats), &device);
        let loss = mse.clone() + balance.clone() * 0.01;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads);
        let mse: f32 = mse.into_scalar();
        first.get_or_insert(mse);
        last = mse;
        if step % 50 == 0 {
            let counts = stats.host().counts;
            println!(
                "step {step:>3}: mse {mse:.4}, load balance {:.3} (1 = even), tokens per expert {counts:?}",
                balance.into_scalar::<f32>()
            );
        }
    }
    let first = first.expect("trained");
    println!("mean squared error {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "the model did not learn");
}
