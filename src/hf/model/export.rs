//! The model's weights by transformers' names, as `save_pretrained` writes them, and saving
//! them as a folder transformers loads.

use std::collections::BTreeMap;

use anyhow::Result;
use burn::tensor::Tensor;

use super::{Attention, FeedForward, HfSwitchTransformer, Stack};
use crate::hf::checkpoint::{Deferred, SaveDtype, Weights};
use crate::store::HostTensor;

fn host<const D: usize>(t: &Tensor<D>) -> Deferred<'_> {
    Deferred::tensor(t)
}

fn linear(w: &Tensor<2>) -> Deferred<'_> {
    Deferred::linear(w)
}

impl Attention {
    fn tensors<'a>(&'a self, prefix: &str, out: &mut Weights<'a>) {
        for (n, w) in [
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("o", &self.o),
        ] {
            out.insert(format!("{prefix}.{n}.weight"), linear(w));
        }
        if let Some(t) = &self.relative_bias {
            out.insert(format!("{prefix}.relative_attention_bias.weight"), host(t));
        }
    }
}

impl Stack {
    fn tensors<'a>(&'a self, stack: &str, out: &mut Weights<'a>) -> Result<()> {
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("{stack}.block.{i}.layer");
            out.insert(
                format!("{p}.0.layer_norm.weight"),
                host(&b.self_norm.weight),
            );
            b.self_attn.tensors(&format!("{p}.0.SelfAttention"), out);
            let f = match &b.cross {
                Some((norm, attn)) => {
                    out.insert(format!("{p}.1.layer_norm.weight"), host(&norm.weight));
                    attn.tensors(&format!("{p}.1.EncDecAttention"), out);
                    2
                }
                None => 1,
            };
            out.insert(
                format!("{p}.{f}.layer_norm.weight"),
                host(&b.ff_norm.weight),
            );
            match &b.ff {
                FeedForward::Dense { wi, wo } => {
                    out.insert(format!("{p}.{f}.mlp.wi.weight"), linear(wi));
                    out.insert(format!("{p}.{f}.mlp.wo.weight"), linear(wo));
                }
                FeedForward::Sparse(mlp) => mlp.tensors(&format!("{p}.{f}.mlp"), out)?,
            }
        }
        out.insert(
            format!("{stack}.final_layer_norm.weight"),
            host(&self.final_norm.weight),
        );
        Ok(())
    }
}

impl HfSwitchTransformer {
    /// The weights by transformers' names, as `save_pretrained` writes them (with tied
    /// embeddings `shared.weight` only; untied, the stacks' embeddings and `lm_head` too).
    /// Reads the experts not loaded yet.
    pub fn tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        Ok(self
            .deferred_tensors()?
            .into_iter()
            .map(|(k, t)| (k, t.make()))
            .collect())
    }

    /// [`Self::tensors`], each copied to the host when it is asked for.
    fn deferred_tensors(&self) -> Result<Weights<'_>> {
        let mut out = BTreeMap::new();
        out.insert("shared.weight".to_string(), host(&self.shared));
        if !self.config.tie_word_embeddings {
            out.insert(
                "encoder.embed_tokens.weight".into(),
                host(&self.encoder.embed),
            );
            out.insert(
                "decoder.embed_tokens.weight".into(),
                host(&self.decoder.embed),
            );
            out.insert("lm_head.weight".into(), linear(&self.lm_head));
        }
        self.encoder.tensors("encoder", &mut out)?;
        self.decoder.tensors("decoder", &mut out)?;
        Ok(out)
    }

    /// Writes `dir/config.json` (as read) and `dir/model.safetensors` in `dtype`, a directory
    /// transformers' `from_pretrained` (and [`Self::load`]) reads. Refuses a directory that
    /// already holds a model.
    pub fn save(&self, dir: &std::path::Path, dtype: SaveDtype) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.config.raw)?;
        crate::hf::checkpoint::save(dir, &json, self.deferred_tensors()?, dtype)
    }
}
