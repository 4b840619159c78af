//! A pre-LayerNorm Transformer block whose FFN is a Switch layer:
//! `x = x + MHA(LN(x)); x = x + Switch(LN(x))`.

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::Tensor;

use crate::attention::{KvCache, MultiHeadAttention};
use crate::router::RoutingRng;
use crate::switch::{SwitchFeedForward, SwitchStats};

#[derive(Module, Debug)]
pub struct SwitchBlock {
    pub attn: MultiHeadAttention,
    pub norm_self_attn: LayerNorm,
    pub norm_ff: LayerNorm,
    pub feed_forward: SwitchFeedForward,
}

/// Output of one block, with the intermediates parity checks look at.
pub struct BlockOutput {
    /// `[batch, seq, d_model]`, after both residual adds.
    pub x: Tensor<3>,
    /// Attention output before its residual add.
    pub attn_out: Tensor<3>,
    /// Normalised input of the Switch layer, `[batch * seq, d_model]`.
    pub ff_in: Tensor<2>,
    /// Switch layer output (already scaled) before its residual add.
    pub ff_out: Tensor<3>,
    pub stats: SwitchStats,
}

impl SwitchBlock {
    /// [`forward`](Self::forward) for new positions only, with earlier keys and values cached.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
        max_len: usize,
        rng: &mut RoutingRng,
    ) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let x = x.clone()
            + self
                .attn
                .forward_cached(self.norm_self_attn.forward(x), cache, max_len);
        let ff_in = self.norm_ff.forward(x.clone()).reshape([b * s, d]);
        x + self.feed_forward.forward(ff_in, rng).out.reshape([b, s, d])
    }

    /// `x`: `[batch, seq, d_model]`. Tokens reach the Switch layer flattened batch-major
    /// (token `b * seq + s`).
    pub fn forward(&self, x: Tensor<3>, rng: &mut RoutingRng) -> BlockOutput {
        let [b, s, d] = x.dims();
        let attn_out = self.attn.forward(self.norm_self_attn.forward(x.clone()));
        let x = x + attn_out.clone();
        let ff_in = self.norm_ff.forward(x.clone()).reshape([b * s, d]);
        let sw = self.feed_forward.forward(ff_in.clone(), rng);
        let ff_out = sw.out.reshape([b, s, d]);
        BlockOutput {
            x: x + ff_out.clone(),
            attn_out,
            ff_in,
            ff_out,
            stats: sw.stats,
        }
    }
}
