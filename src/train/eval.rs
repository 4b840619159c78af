//! Evaluation over a set of batches: cross-entropy, accuracy, load balance and routing
//! statistics per layer. Runs without autodiff.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, sequence_tensor};
use crate::model::SwitchTransformer;
use crate::model::loss::{cross_entropy, load_balancing_loss};
use crate::model::switch::SwitchStats;
use crate::routing::RoutingRng;
use crate::store::host_f32;

/// Routing of one layer, aggregated over the evaluated tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Fraction of tokens routed to each expert (before dropping).
    pub expert_frac: Vec<f64>,
    /// Smallest expert fraction.
    pub min_frac: f64,
    /// Largest expert fraction.
    pub max_frac: f64,
    /// Standard deviation of the expert fractions.
    pub std_frac: f64,
    /// Mean of each token's top routing probability (router confidence).
    pub mean_top_prob: f64,
    /// Fraction of tokens dropped over capacity.
    pub dropped_frac: f64,
}

impl LayerStats {
    /// One layer's statistics from its routing sums over forward passes.
    pub(crate) fn from_sums(sums: &RoutingSums) -> Self {
        let t = sums.tokens.max(1) as f64;
        let expert_frac: Vec<f64> = sums.counts.iter().map(|c| c / t).collect();
        let n = expert_frac.len().max(1) as f64;
        let mean = expert_frac.iter().sum::<f64>() / n;
        let var = expert_frac.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / n;
        Self {
            min_frac: expert_frac.iter().cloned().fold(f64::INFINITY, f64::min),
            max_frac: expert_frac.iter().cloned().fold(0.0, f64::max),
            std_frac: var.sqrt(),
            expert_frac,
            mean_top_prob: sums.top_prob / t,
            dropped_frac: sums.dropped / t,
        }
    }
}

/// One Switch layer's routing summed over forward passes (in f64, pass order): what
/// [`LayerStats`] is computed from, and what the ranks of a job add up.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RoutingSums {
    /// Tokens whose first choice is each expert, before dropping.
    pub counts: Vec<f64>,
    /// Assignments dropped over capacity.
    pub dropped: f64,
    /// Sum of each token's top routing probability.
    pub top_prob: f64,
    /// Tokens routed.
    pub tokens: usize,
}

impl RoutingSums {
    /// Adds one pass's [`SwitchStats::summary`] values (`[n_experts + 2]`: counts, dropped,
    /// top-probability sum) over `tokens` tokens.
    fn add_summary(&mut self, summary: &[f32], tokens: usize) {
        let e = summary.len() - 2;
        self.counts.resize(e, 0.0);
        for (c, &v) in self.counts.iter_mut().zip(&summary[..e]) {
            *c += v as f64;
        }
        self.dropped += summary[e] as f64;
        self.top_prob += summary[e + 1] as f64;
        self.tokens += tokens;
    }

    /// Every layer's sums, flattened for an all-reduce between ranks: per layer the counts,
    /// dropped, top-probability sum, tokens.
    pub(crate) fn to_wire(layers: &[Self]) -> Vec<f64> {
        let mut flat = vec![];
        for l in layers {
            flat.extend(&l.counts);
            flat.extend([l.dropped, l.top_prob, l.tokens as f64]);
        }
        flat
    }

    /// [`to_wire`](Self::to_wire)'s layout read back, with `like`'s expert counts per layer.
    pub(crate) fn from_wire(flat: &[f64], like: &[Self]) -> Vec<Self> {
        let mut at = 0;
        like.iter()
            .map(|l| {
                let e = l.counts.len();
                let sums = Self {
                    counts: flat[at..at + e].to_vec(),
                    dropped: flat[at + e],
                    top_prob: flat[at + e + 1],
                    tokens: flat[at + e + 2] as usize,
                };
                at += e + 3;
                sums
            })
            .collect()
    }
}

/// Per-layer statistics over several forward passes (`passes[i][l]`: Switch layer `l` of pass
/// `i`, all layers of a pass on one device): one read-back per pass.
pub(crate) fn layer_stats(passes: &[Vec<SwitchStats>]) -> Vec<LayerStats> {
    layer_sums(passes)
        .iter()
        .map(LayerStats::from_sums)
        .collect()
}

/// Each Switch layer's routing summed over `passes`.
pub(crate) fn layer_sums(passes: &[Vec<SwitchStats>]) -> Vec<RoutingSums> {
    let read: Vec<Vec<f32>> = passes
        .iter()
        .map(|p| summaries(p).map_or_else(Vec::new, host_f32))
        .collect();
    layer_sums_of(passes, &read)
}

/// Every layer's [`SwitchStats::summary`] of one pass, concatenated (`None` without Switch
/// layers): what [`layer_sums_of`] reads.
pub(crate) fn summaries(pass: &[SwitchStats]) -> Option<Tensor<1>> {
    (!pass.is_empty()).then(|| Tensor::cat(pass.iter().map(SwitchStats::summary).collect(), 0))
}

/// [`layer_sums`] from each pass's [`summaries`] already read (`read[i]`: pass i's values).
pub(crate) fn layer_sums_of(passes: &[Vec<SwitchStats>], read: &[Vec<f32>]) -> Vec<RoutingSums> {
    let n_layers = passes.first().map_or(0, Vec::len);
    (0..n_layers)
        .map(|l| {
            let mut sums = RoutingSums::default();
            for (p, values) in passes.iter().zip(read) {
                let start: usize = p[..l].iter().map(|s| s.counts.dims()[0] + 2).sum();
                let len = p[l].counts.dims()[0] + 2;
                sums.add_summary(&values[start..start + len], p[l].n_tokens());
            }
            sums
        })
        .collect()
}

/// Metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy per token (nats).
    pub loss: f64,
    /// Fraction of next tokens predicted right (argmax).
    pub accuracy: f64,
    /// Load-balancing loss (summed over layers; = n_layers at perfect balance), batch mean.
    pub lb_loss: f64,
    /// Fraction of token-layer routings dropped.
    pub dropped_frac: f64,
    /// Routing per Switch layer.
    pub layers: Vec<LayerStats>,
    /// Tokens evaluated.
    pub tokens: usize,
}

impl EvalMetrics {
    /// `exp(loss)`.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Evaluates `model` (use a non-autodiff copy: `model.valid()`) on `batches`. Token dropping
/// follows the model's configuration; `rng` decides which tokens drop.
pub fn evaluate(model: &SwitchTransformer, batches: &[Batch], rng: &mut RoutingRng) -> EvalMetrics {
    evaluate_until(model, batches, rng, &AtomicBool::new(false)).expect("never stopped")
}

/// [`evaluate`] that gives up as soon as `stop` is set (checked before each batch): `None`
/// then. The training loop's validation, so that a stop signal does not wait for
/// `train.eval_batches` forward passes.
pub(crate) fn evaluate_until(
    model: &SwitchTransformer,
    batches: &[Batch],
    rng: &mut RoutingRng,
    stop: &AtomicBool,
) -> Option<EvalMetrics> {
    let device = model.src_embed.weight.device();
    let (mut loss, mut correct, mut lb, mut tokens) = (0.0, 0i64, 0.0, 0usize);
    let mut passes: Vec<Vec<SwitchStats>> = Vec::new();
    for batch in batches {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        let (x, y) = batch.tensors(&device);
        let out = model.forward(x, rng);
        let [b, s, v] = out.logits.dims();
        let logits = out.logits.reshape([b * s, v]);
        let y = y.reshape([b * s]);
        let n = b * s;
        let ce: f32 = host_f32(cross_entropy(logits.clone(), y.clone()))[0];
        loss += ce as f64 * n as f64;
        let hits: Tensor<1, Int> = logits.argmax(1).reshape([n]).equal(y).int().sum();
        correct += crate::store::host_i64(hits)[0];
        lb += host_f32(load_balancing_loss(&out.stats, &device))[0] as f64;
        tokens += n;
        passes.push(out.stats);
    }
    let layers = layer_stats(&passes);
    let dropped_frac =
        layers.iter().map(|l| l.dropped_frac).sum::<f64>() / layers.len().max(1) as f64;
    let t = tokens.max(1) as f64;
    Some(EvalMetrics {
        loss: loss / t,
        accuracy: correct as f64 / t,
        lb_loss: lb / batches.len().max(1) as f64,
        dropped_frac,
        layers,
        tokens,
    })
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
            let s = s.host();
            out[l].extend(s.routes.into_iter().zip(s.route_prob_max));
        }
    }
    out
}
