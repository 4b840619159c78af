//! labml's parameter names (PyTorch `state_dict` keys of
//! `labml_nn.transformers.switch.experiment.AutoregressiveModel`), spelled here and nowhere
//! else: the export, the import and the initialisation build every name with these.
//!
//! ```text
//! src_embed.weight                      pos_embed.weight (learned positions only)
//! transformer.layers.{l}.attn.{query,key,value}.linear.{weight,bias}
//! transformer.layers.{l}.attn.output.{weight,bias}
//! transformer.layers.{l}.norm_self_attn.{weight,bias}   ...norm_ff.{weight,bias}
//! transformer.layers.{l}.feed_forward.switch.{weight,bias}                  (Switch layer)
//! transformer.layers.{l}.feed_forward.experts.{e}.layer{1,2}.{weight,bias}  (Switch layer)
//! transformer.layers.{l}.feed_forward.expert_bias       (model.balance = bias only; not labml's)
//! transformer.layers.{l}.feed_forward.shared_experts.layer{1,2}.{weight,bias}  (shared experts)
//! transformer.layers.{l}.feed_forward.layer{1,2}.{weight,bias}              (dense FFN)
//! transformer.norm.{weight,bias}        generator.{weight,bias}
//! ```

/// The token embedding's weight.
pub(crate) const EMBED: &str = "src_embed.weight";
/// The learned positional embedding's weight.
pub(crate) const POS_EMBED: &str = "pos_embed.weight";
/// The final LayerNorm.
pub(crate) const FINAL_NORM: &str = "transformer.norm";
/// The output projection.
pub(crate) const GENERATOR: &str = "generator";
/// The query, key and value projections, within a block.
pub(crate) const ATTN_QKV: [&str; 3] =
    ["attn.query.linear", "attn.key.linear", "attn.value.linear"];
/// The attention output projection, within a block.
pub(crate) const ATTN_OUTPUT: &str = "attn.output";
/// The LayerNorm before attention, within a block.
pub(crate) const NORM_SELF_ATTN: &str = "norm_self_attn";
/// The LayerNorm before the feed-forward sub-layer, within a block.
pub(crate) const NORM_FF: &str = "norm_ff";
/// The feed-forward sub-layer, within a block.
pub(crate) const FEED_FORWARD: &str = "feed_forward";
/// The router's linear layer, within a Switch layer.
pub(crate) const ROUTER: &str = "switch";
/// The experts, within a Switch layer.
pub(crate) const EXPERTS: &str = "experts";
/// Auxiliary-loss-free balancing's expert biases, within a Switch layer (this project's; labml
/// has none).
pub(crate) const EXPERT_BIAS: &str = "expert_bias";
/// The shared experts' FFN, within a Switch layer (this project's; labml has none).
pub(crate) const SHARED_EXPERTS: &str = "shared_experts";
/// The two linear layers of an FFN (an expert or the dense FFN).
pub(crate) const FFN_LAYERS: [&str; 2] = ["layer1", "layer2"];

/// Block `l`.
pub(crate) fn block(l: usize) -> String {
    format!("transformer.layers.{l}")
}

/// `prefix.name`, or `name` alone for an empty prefix (a Switch layer exported on its own).
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Expert `e` of the experts at `prefix`.
pub(crate) fn expert(prefix: &str, e: usize) -> String {
    join(prefix, &e.to_string())
}

/// The weight of the layer at `prefix` (a Linear's or a LayerNorm's).
pub(crate) fn weight(prefix: &str) -> String {
    join(prefix, "weight")
}

/// The bias of the layer at `prefix`.
pub(crate) fn bias(prefix: &str) -> String {
    join(prefix, "bias")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_labmls() {
        let ff = join(&block(3), FEED_FORWARD);
        assert_eq!(
            weight(&join(&expert(&join(&ff, EXPERTS), 2), FFN_LAYERS[0])),
            "transformer.layers.3.feed_forward.experts.2.layer1.weight"
        );
        assert_eq!(bias(&join("", ROUTER)), "switch.bias");
        assert_eq!(
            weight(&join(&block(0), ATTN_QKV[1])),
            "transformer.layers.0.attn.key.linear.weight"
        );
    }
}
