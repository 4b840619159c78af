//! Routing options: experts per token, capacity, which tokens drop, where the decision is made.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// Which tokens an over-capacity expert drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// A uniformly random subset keeps its place (labml: `torch.randperm`).
    #[default]
    Random,
    /// First come, first served: first choices before second choices, then by position in the
    /// batch (Mesh TensorFlow, Hugging Face).
    Position,
    /// The most confident assignments keep their place (batch-prioritized routing).
    Confidence,
}

/// Where the routing decision is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePlace {
    /// On the host on the CPU backend (fastest there), on the device on the others, where
    /// [`RoutingOptions::device_capable`].
    #[default]
    Auto,
    /// On the host, from the probabilities read back (one read per layer per forward).
    Host,
    /// On the device wherever [`RoutingOptions::device_capable`] (else on the host).
    Device,
}

/// How tokens are assigned to experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingOptions {
    /// Experts per token (1 = Switch; 2 = the top-2 MoE the paper compares against).
    pub top_k: usize,
    /// capacity = floor(capacity_factor * assignments / n_experts).
    pub capacity_factor: f64,
    /// Enforce capacity; off = dropless (capacity grows to the largest load).
    pub drop_tokens: bool,
    /// Which assignments an over-capacity expert drops.
    pub drop_policy: DropPolicy,
    /// Where the decision is made.
    pub place: RoutePlace,
}

impl RoutingOptions {
    /// labml's Switch routing.
    pub fn labml(capacity_factor: f64, drop_tokens: bool) -> Self {
        Self {
            top_k: 1,
            capacity_factor,
            drop_tokens,
            drop_policy: DropPolicy::Random,
            place: RoutePlace::Auto,
        }
    }

    /// Whether [`super::DeviceRoutes`] can make this decision: top-1 with a fixed capacity, dropping
    /// at random or by position (dropless needs the largest load, confidence a sort: both
    /// would read back to the host).
    pub fn device_capable(&self) -> bool {
        self.top_k == 1 && self.drop_tokens && self.drop_policy != DropPolicy::Confidence
    }

    /// Whether to route on the device for tensors on `device`.
    pub fn on_device(&self, device: &Device) -> bool {
        self.device_capable()
            && match self.place {
                RoutePlace::Host => false,
                RoutePlace::Device => true,
                RoutePlace::Auto => !crate::device::Paths::of(device).host_routing,
            }
    }
}

/// labml's capacity: `int(capacity_factor * tokens / n_experts)`, evaluated in f64 in the same
/// order as Python so the floor lands on the same integer. With top-k routing every assignment
/// takes a slot, so `tokens` counts assignments (`k * tokens`).
///
/// ```
/// // labml's configuration: 2,048 tokens a batch, 4 experts, capacity factor 1.0.
/// assert_eq!(switch_transformer::routing::capacity(1.0, 32 * 64, 4), 512);
/// // In Python's order, int(1.2 * 70 / 3) = 28; 1.2 * (70 / 3) would floor to 27.
/// assert_eq!(switch_transformer::routing::capacity(1.2, 70, 3), 28);
/// ```
pub fn capacity(capacity_factor: f64, n_tokens: usize, n_experts: usize) -> usize {
    (capacity_factor * n_tokens as f64 / n_experts as f64) as usize
}

/// Index of the largest value (the first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Indices of the `k` largest values, largest first (earlier index first on ties).
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}
