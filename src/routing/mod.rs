//! The router: `p = softmax(x W_r + b_r)`, each token to its argmax expert, at most
//! `capacity = floor(capacity_factor * tokens / n_experts)` tokens per expert.
//!
//! The decision (argmax, capacity, which tokens drop) is discrete. It is made either on the host
//! from the probabilities read back ([`RoutePlan`]: index lists; any top-k, policy, dropless;
//! the fastest way on the CPU) or on the device with tensor ops ([`DeviceRoutes`]: top-1 with
//! capacity, no read-back; GPU backends). Either way it ends as index tensors that one gather
//! and one select use. Gradients reach the router through the probabilities only.
//!
//! Files: `router` (the layer), `options` (capacity, drop policy, where to decide), `balance`
//! (the auxiliary loss or the bias that keeps the load even),
//! `plan` (the host decision), `device` (the device decision), `scan` (its prefix sum,
//! linear in the tokens), `group` (shards of one batch, in threads of their own, deciding
//! together as one model would).

pub(crate) mod balance;
pub(crate) mod device;
pub(crate) mod group;
pub(crate) mod options;
pub(crate) mod plan;
pub(crate) mod router;
pub(crate) mod scan;

use burn::tensor::{Device, Int, Tensor, TensorData};

pub use balance::{Balance, BalanceScope, ExpertBias};
pub use device::DeviceRoutes;
pub(crate) use group::{RouteGroup, Shard};
pub use options::{DropPolicy, RoutePlace, RoutingOptions, argmax, capacity, top_k};
pub use plan::RoutePlan;
pub use router::Router;

/// Seeded random generator used for token dropping; the caller owns it so runs reproduce.
pub type RoutingRng = rand_chacha::ChaCha8Rng;

/// Uploads indices as an int tensor.
pub(crate) fn index_tensor(idx: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}
