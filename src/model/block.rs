//! A pre-LayerNorm Transformer block whose FFN is a Switch layer (or, between Switch layers
//! and in the dense baseline, a plain FFN):
//! `x = x + drop(MHA(LN(x))); x = x + drop(FFN(LN(x)))`.

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::Tensor;

use super::attention::{KvCache, MultiHeadAttention};
pub use super::ffn::DenseFeedForward;
use super::precision::layer_norm;
use super::switch::{SwitchFeedForward, SwitchStats, dropout_mask};
use crate::routing::{RoutingRng, Shard};

/// The block's feed-forward sub-layer.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // a handful per model
pub enum FeedForward {
    /// A Switch layer.
    Switch(SwitchFeedForward),
    /// A dense FFN.
    Dense(DenseFeedForward),
}

/// One pre-LayerNorm block (labml's `SwitchTransformerLayer`).
#[derive(Module, Debug)]
pub struct SwitchBlock {
    /// Self-attention.
    pub attn: MultiHeadAttention,
    /// LayerNorm before attention.
    pub norm_self_attn: LayerNorm,
    /// LayerNorm before the feed-forward sub-layer.
    pub norm_ff: LayerNorm,
    /// The feed-forward sub-layer: Switch or dense.
    pub feed_forward: FeedForward,
    /// Dropout on the two sub-layer outputs, in training.
    pub dropout: f64,
    /// Training mode (dropout on).
    pub training: bool,
}

/// Output of one block, with the intermediates parity checks look at.
pub(crate) struct BlockOutput {
    /// `[batch, seq, d_model]`, after both residual adds.
    pub x: Tensor<3>,
    /// Attention output before its residual add.
    pub attn_out: Tensor<3>,
    /// Normalised input of the feed-forward sub-layer, `[batch * seq, d_model]`.
    pub ff_in: Tensor<2>,
    /// Feed-forward output (for a Switch layer already scaled) before its residual add.
    pub ff_out: Tensor<3>,
    /// Routing statistics, for a Switch layer.
    pub stats: Option<SwitchStats>,
}

impl SwitchBlock {
    /// The Switch layer, if this block has one.
    pub fn switch(&self) -> Option<&SwitchFeedForward> {
        match &self.feed_forward {
            FeedForward::Switch(s) => Some(s),
            FeedForward::Dense(_) => None,
        }
    }

    /// The Switch layer, mutably, if this block has one.
    pub(crate) fn switch_mut(&mut self) -> Option<&mut SwitchFeedForward> {
        match &mut self.feed_forward {
            FeedForward::Switch(s) => Some(s),
            FeedForward::Dense(_) => None,
        }
    }

    fn drop<const D: usize>(&self, t: Tensor<D>, rng: &mut RoutingRng) -> Tensor<D> {
        if self.training && self.dropout > 0.0 {
            let mask = dropout_mask(rng, t.dims(), self.dropout, &t.device());
            t * mask
        } else {
            t
        }
    }

    fn feed_forward(
        &self,
        ff_in: Tensor<2>,
        rng: &mut RoutingRng,
        shard: Option<Shard<'_>>,
    ) -> (Tensor<2>, Option<SwitchStats>) {
        match &self.feed_forward {
            FeedForward::Switch(s) => {
                let o = s.forward_routed(ff_in, rng, shard);
                (o.out, Some(o.stats))
            }
            FeedForward::Dense(d) => (d.forward(ff_in), None),
        }
    }

    /// `x`: `[batch, seq, d_model]`. Tokens reach the Switch layer flattened batch-major
    /// (token `b * seq + s`). `shard`: this batch's seat in a routing group, if its shards
    /// route together.
    pub(crate) fn forward(
        &self,
        x: Tensor<3>,
        rng: &mut RoutingRng,
        shard: Option<Shard<'_>>,
    ) -> BlockOutput {
        let [b, s, d] = x.dims();
        let attn_out = self
            .attn
            .forward(layer_norm(&self.norm_self_attn, x.clone()));
        let attn_out = self.drop(attn_out, rng);
        let x = x + attn_out.clone();
        let ff_in = layer_norm(&self.norm_ff, x.clone()).reshape([b * s, d]);
        let (ff_out, stats) = self.feed_forward(ff_in.clone(), rng, shard);
        let ff_out = self.drop(ff_out.reshape([b, s, d]), rng);
        BlockOutput {
            x: x + ff_out.clone(),
            attn_out,
            ff_in,
            ff_out,
            stats,
        }
    }

    /// [`forward`](Self::forward) for new positions only, with earlier keys and values cached.
    pub(crate) fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
        max_len: usize,
        rng: &mut RoutingRng,
    ) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let a =
            self.attn
                .forward_cached(layer_norm(&self.norm_self_attn, x.clone()), cache, max_len);
        let x = x + self.drop(a, rng);
        let ff_in = layer_norm(&self.norm_ff, x.clone()).reshape([b * s, d]);
        let ff_out = self.feed_forward(ff_in, rng, None).0.reshape([b, s, d]);
        x + self.drop(ff_out, rng)
    }
}
