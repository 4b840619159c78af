//! Evaluation over a set of batches: cross-entropy, accuracy, load balance and routing
//! statistics per layer. Runs without autodiff.

use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, sequence_tensor};
use crate::loss::{cross_entropy, load_balancing_loss};
use crate::model::SwitchTransformer;
use crate::router::RoutingRng;
use crate::store::host_f32;
use crate::switch::SwitchStats;

/// Routing of one layer, aggregated over the evaluated tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Fraction of tokens routed to each expert (before dropping).
    pub expert_frac: Vec<f64>,
    pub min_frac: f64,
    pub max_frac: f64,
    pub std_frac: f64,
    /// Mean of each token's top routing probability (router confidence).
    pub mean_top_prob: f64,
    /// Fraction of tokens dropped over capacity.
    pub dropped_frac: f64,
}

impl LayerStats {
    /// Aggregates one layer's statistics over several forward passes.
    pub fn from_stats<'a>(stats: impl IntoIterator<Item = &'a SwitchStats>) -> Self {
        let (mut counts, mut top, mut dropped, mut tokens) =
            (Vec::<f64>::new(), 0.0, 0usize, 0usize);
        for s in stats {
            counts.resize(s.counts.len(), 0.0);
            for (c, &n) in counts.iter_mut().zip(&s.counts) {
                *c += n as f64;
            }
            top += s.route_prob_max.iter().map(|&p| p as f64).sum::<f64>();
            dropped += s.n_dropped;
            tokens += s.routes.len();
        }
        let t = tokens.max(1) as f64;
        let expert_frac: Vec<f64> = counts.iter().map(|c| c / t).collect();
        let n = expert_frac.len().max(1) as f64;
        let mean = expert_frac.iter().sum::<f64>() / n;
        let var = expert_frac.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / n;
        Self {
            min_frac: expert_frac.iter().cloned().fold(f64::INFINITY, f64::min),
            max_frac: expert_frac.iter().cloned().fold(0.0, f64::max),
            std_frac: var.sqrt(),
            expert_frac,
            mean_top_prob: top / t,
            dropped_frac: dropped as f64 / t,
        }
    }
}

/// Metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy per token (nats).
    pub loss: f64,
    pub accuracy: f64,
    /// Load-balancing loss (summed over layers; = n_layers at perfect balance), batch mean.
    pub lb_loss: f64,
    /// Fraction of token-layer routings dropped.
    pub dropped_frac: f64,
    pub layers: Vec<LayerStats>,
    pub tokens: usize,
}

impl EvalMetrics {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Evaluates `model` (use a non-autodiff copy: `model.valid()`) on `batches`. Token dropping
/// follows the model's configuration; `rng` decides which tokens drop.
pub fn evaluate(model: &SwitchTransformer, batches: &[Batch], rng: &mut RoutingRng) -> EvalMetrics {
    let device = model.src_embed.weight.device();
    let (mut loss, mut correct, mut lb, mut tokens) = (0.0, 0i64, 0.0, 0usize);
    let mut per_layer: Vec<Vec<SwitchStats>> = vec![Vec::new(); model.n_layers()];
    for batch in batches {
        let (x, y) = batch.tensors(&device);
        let out = model.forward(x, rng);
        let [b, s, v] = out.logits.dims();
        let logits = out.logits.reshape([b * s, v]);
        let y = y.reshape([b * s]);
        let n = b * s;
        let ce: f32 = host_f32(cross_entropy(logits.clone(), y.clone()))[0];
        loss += ce as f64 * n as f64;
        let hits: Tensor<1, Int> = logits.argmax(1).reshape([n]).equal(y).int().sum();
        correct += hits.into_scalar::<i64>();
        lb += host_f32(load_balancing_loss(&out.stats, &device))[0] as f64;
        tokens += n;
        for (l, st) in out.stats.into_iter().enumerate() {
            per_layer[l].push(st);
        }
    }
    let layers: Vec<LayerStats> = per_layer
        .iter()
        .map(|s| LayerStats::from_stats(s.iter()))
        .collect();
    let dropped_frac =
        layers.iter().map(|l| l.dropped_frac).sum::<f64>() / layers.len().max(1) as f64;
    let t = tokens.max(1) as f64;
    EvalMetrics {
        loss: loss / t,
        accuracy: correct as f64 / t,
        lb_loss: lb / batches.len().max(1) as f64,
        dropped_frac,
        layers,
        tokens,
    }
}

/// For each character of `ids` (in windows of `context`), the expert it goes to in each Switch
/// layer and its routing probability: `[switch layer][position]`. Token dropping is off.
pub fn route_tokens(
    model: &SwitchTransformer,
    ids: &[u32],
    context: usize,
) -> Vec<Vec<(usize, f32)>> {
    let mut model = model.clone();
    model.set_drop_tokens(false);
    let device = model.src_embed.weight.device();
    let n_switch = model.layers.iter().filter(|l| l.switch().is_some()).count();
    let mut out = vec![Vec::with_capacity(ids.len()); n_switch];
    let mut rng = <RoutingRng as rand::SeedableRng>::seed_from_u64(0);
    for window in ids.chunks(context.max(1)) {
        let stats = model
            .forward(sequence_tensor(window, &device), &mut rng)
            .stats;
        for (l, s) in stats.iter().enumerate() {
            out[l].extend(
                s.routes
                    .iter()
                    .copied()
                    .zip(s.route_prob_max.iter().copied()),
            );
        }
    }
    out
}
