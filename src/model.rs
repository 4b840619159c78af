//! The autoregressive Switch Transformer (labml's `AutoregressiveModel`):
//! token embedding (no positional encoding, as labml) -> N Switch blocks -> LayerNorm ->
//! linear generator to vocabulary logits.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::tensor::{Int, Tensor};

use crate::attention::KvCache;
use crate::block::SwitchBlock;
use crate::router::RoutingRng;
use crate::store::HostTensor;
use crate::switch::SwitchStats;

#[derive(Module, Debug)]
pub struct SwitchTransformer {
    pub src_embed: Embedding,
    pub layers: Vec<SwitchBlock>,
    /// Final LayerNorm (labml `transformer.norm`).
    pub norm: LayerNorm,
    pub generator: Linear,
}

/// Logits plus each layer's routing statistics.
pub struct ModelOutput {
    /// `[batch, seq, n_vocab]`
    pub logits: Tensor<3>,
    pub stats: Vec<SwitchStats>,
}

/// Intermediate activations recorded by [`SwitchTransformer::forward_traced`], named as in the
/// fixtures (`embed`, `layers.{l}.attn_out`, ...), batch-major.
pub type Trace = BTreeMap<String, HostTensor>;

impl SwitchTransformer {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Turns token dropping on or off in every Switch layer (e.g. off for evaluation).
    pub fn set_drop_tokens(&mut self, drop_tokens: bool) {
        for layer in &mut self.layers {
            layer.feed_forward.drop_tokens = drop_tokens;
        }
    }

    /// Logits `[batch, n, n_vocab]` for `n` new tokens `ids` following those already in
    /// `cache` (one [`KvCache`] per layer; start with `vec![KvCache::default(); n_layers]`).
    /// Attention looks back at most `max_len` positions.
    pub fn forward_cached(
        &self,
        ids: Tensor<2, Int>,
        cache: &mut [KvCache],
        max_len: usize,
        rng: &mut RoutingRng,
    ) -> Tensor<3> {
        let mut x = self.src_embed.forward(ids);
        for (layer, c) in self.layers.iter().zip(cache.iter_mut()) {
            x = layer.forward_cached(x, c, max_len, rng);
        }
        self.generator.forward(self.norm.forward(x))
    }

    /// `ids`: `[batch, seq]` token ids.
    pub fn forward(&self, ids: Tensor<2, Int>, rng: &mut RoutingRng) -> ModelOutput {
        self.forward_traced(ids, rng, None)
    }

    pub fn forward_traced(
        &self,
        ids: Tensor<2, Int>,
        rng: &mut RoutingRng,
        mut trace: Option<&mut Trace>,
    ) -> ModelOutput {
        let tracing = trace.is_some();
        let mut x = self.src_embed.forward(ids);
        let mut record = |name: String, t: &Tensor<3>| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.insert(name, HostTensor::from_tensor(t.clone()));
            }
        };
        record("embed".into(), &x);
        let mut stats = Vec::with_capacity(self.layers.len());
        let mut logits_trace = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let out = layer.forward(x, rng);
            record(format!("layers.{l}.attn_out"), &out.attn_out);
            record(format!("layers.{l}.ff_out"), &out.ff_out);
            record(format!("layers.{l}.out"), &out.x);
            if tracing {
                logits_trace.push(out.ff_in);
            }
            stats.push(out.stats);
            x = out.x;
        }
        let x = self.norm.forward(x);
        record("final_norm".into(), &x);
        if let Some(tr) = trace {
            for (l, ff_in) in logits_trace.into_iter().enumerate() {
                let router = &self.layers[l].feed_forward.router;
                tr.insert(
                    format!("layers.{l}.router_logits"),
                    HostTensor::from_tensor(router.logits(ff_in)),
                );
            }
        }
        ModelOutput {
            logits: self.generator.forward(x),
            stats,
        }
    }
}
