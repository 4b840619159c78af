//! The autoregressive Switch Transformer (labml's `AutoregressiveModel`):
//! token embedding (no positional encoding, as labml) -> N Switch blocks -> LayerNorm ->
//! linear generator to vocabulary logits.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::tensor::{Int, Tensor};

use super::attention::KvCache;
use super::block::SwitchBlock;
use super::precision::{Precision, cast_to, layer_norm, linear};
use super::switch::SwitchStats;
use crate::routing::{RoutingRng, Shard};
use crate::store::HostTensor;

/// labml's `AutoregressiveModel` with Switch blocks.
#[derive(Module, Debug)]
pub struct SwitchTransformer {
    /// Token embedding `[n_vocab, d_model]`.
    pub src_embed: Embedding,
    /// Learned positional embedding `[max_seq_len, d_model]`, if configured.
    pub pos_embed: Option<Embedding>,
    /// The blocks, in order.
    pub layers: Vec<SwitchBlock>,
    /// Final LayerNorm (labml `transformer.norm`).
    pub norm: LayerNorm,
    /// The output projection to vocabulary logits.
    pub generator: Linear,
    /// Compute type of the activations (the router always runs in f32).
    #[module(skip)]
    pub precision: Precision,
}

/// Logits plus each Switch layer's routing statistics.
pub struct ModelOutput {
    /// `[batch, seq, n_vocab]`
    pub logits: Tensor<3>,
    /// One entry per Switch layer, in block order (dense blocks have none).
    pub stats: Vec<SwitchStats>,
}

/// Intermediate activations recorded by `SwitchTransformer::forward_traced`, named as in the
/// fixtures (`embed`, `layers.{l}.attn_out`, ...), batch-major.
pub type Trace = BTreeMap<String, HostTensor>;

impl SwitchTransformer {
    /// Number of blocks.
    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Turns token dropping on or off in every Switch layer (e.g. off for evaluation).
    pub fn set_drop_tokens(&mut self, drop_tokens: bool) {
        for layer in &mut self.layers {
            if let Some(s) = layer.switch_mut() {
                s.routing.drop_tokens = drop_tokens;
            }
        }
    }

    /// One step of auxiliary-loss-free balancing in every Switch layer (in block order, one
    /// `load` each: the fraction of the step's tokens whose first choice was each expert);
    /// nothing where the layer balances otherwise.
    pub(crate) fn update_expert_bias<'a>(&mut self, loads: impl IntoIterator<Item = &'a [f64]>) {
        let layers = self.layers.iter_mut().filter_map(|l| l.switch_mut());
        for (s, load) in layers.zip(loads) {
            s.update_expert_bias(load);
        }
    }

    /// Training mode (dropout, router jitter, training capacity factor) or evaluation mode.
    pub fn set_training(&mut self, training: bool) {
        for layer in &mut self.layers {
            layer.training = training;
            if let Some(s) = layer.switch_mut() {
                s.training = training;
            }
        }
    }

    /// Token embeddings plus, if configured, positional embeddings from position `start`.
    fn embed(&self, ids: Tensor<2, Int>, start: usize) -> Tensor<3> {
        let [_, s] = ids.dims();
        let x = cast_to(self.src_embed.forward(ids), self.precision.dtype().into());
        match &self.pos_embed {
            Some(p) => {
                let device = x.device();
                let pos: Vec<i64> = (start..start + s).map(|i| i as i64).collect();
                let pos = Tensor::<2, Int>::from_data(
                    burn::tensor::TensorData::new(pos, [1, s]),
                    &device,
                );
                let dtype = x.dtype();
                x + cast_to(p.forward(pos), dtype)
            }
            None => x,
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
        let start = cache.first().map_or(0, KvCache::len);
        let mut x = self.embed(ids, start);
        for (layer, c) in self.layers.iter().zip(cache.iter_mut()) {
            x = layer.forward_cached(x, c, max_len, rng);
        }
        linear(&self.generator, layer_norm(&self.norm, x))
    }

    /// `ids`: `[batch, seq]` token ids.
    pub fn forward(&self, ids: Tensor<2, Int>, rng: &mut RoutingRng) -> ModelOutput {
        self.forward_with(ids, rng, None, None)
    }

    /// [`forward`](Self::forward) for one shard of a batch whose shards route together, as
    /// one model routing the whole batch would (`shard`: its seat in the routing group).
    pub(crate) fn forward_in_group(
        &self,
        ids: Tensor<2, Int>,
        rng: &mut RoutingRng,
        shard: Shard<'_>,
    ) -> ModelOutput {
        self.forward_with(ids, rng, Some(shard), None)
    }

    /// [`forward`](Self::forward), recording the intermediate activations in `trace`.
    pub(crate) fn forward_traced(
        &self,
        ids: Tensor<2, Int>,
        rng: &mut RoutingRng,
        trace: Option<&mut Trace>,
    ) -> ModelOutput {
        self.forward_with(ids, rng, None, trace)
    }

    fn forward_with(
        &self,
        ids: Tensor<2, Int>,
        rng: &mut RoutingRng,
        shard: Option<Shard<'_>>,
        mut trace: Option<&mut Trace>,
    ) -> ModelOutput {
        let tracing = trace.is_some();
        let mut x = self.embed(ids, 0);
        let mut record = |name: String, t: &Tensor<3>| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.insert(name, HostTensor::from_tensor(t.clone()));
            }
        };
        record("embed".into(), &x);
        let mut stats = Vec::with_capacity(self.layers.len());
        let mut logits_trace = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let out = layer.forward(x, rng, shard);
            record(format!("layers.{l}.attn_out"), &out.attn_out);
            record(format!("layers.{l}.ff_out"), &out.ff_out);
            record(format!("layers.{l}.out"), &out.x);
            if tracing && out.stats.is_some() {
                logits_trace.push((l, out.ff_in));
            }
            stats.extend(out.stats);
            x = out.x;
        }
        let x = layer_norm(&self.norm, x);
        record("final_norm".into(), &x);
        if let Some(tr) = trace {
            for (l, ff_in) in logits_trace {
                let router = &self.layers[l].switch().expect("a Switch layer").router;
                tr.insert(
                    format!("layers.{l}.router_logits"),
                    HostTensor::from_tensor(router.logits(ff_in)),
                );
            }
        }
        ModelOutput {
            logits: linear(&self.generator, x),
            stats,
        }
    }
}
