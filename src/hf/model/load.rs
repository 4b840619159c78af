//! Reading the model from a checkpoint in transformers' names: every tensor taken once with
//! its shape checked, linear weights transposed to `[in, out]` (kept bf16 on the CPU where
//! stored so), and any tensor left over refused.

use anyhow::Result;
use burn::tensor::{DType, Device, Tensor};

use super::{Attention, Block, FeedForward, HfSwitchTransformer, RmsNorm, Stack};
use crate::hf::checkpoint::Checkpoint;
use crate::hf::config::HfConfig;
use crate::hf::linear::linear_weight;
use crate::hf::sparse::SparseMlp;

impl RmsNorm {
    fn load(ck: &mut Checkpoint, name: &str, c: &HfConfig, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: ck.take(name, &[c.d_model])?.to_tensor(device)?,
            eps: c.layer_norm_epsilon,
        })
    }
}

impl Attention {
    fn load(
        ck: &mut Checkpoint,
        prefix: &str,
        relative: bool,
        c: &HfConfig,
        device: &Device,
    ) -> Result<Self> {
        let (d, inner) = (c.d_model, c.inner_dim());
        let mut w = |n: &str, shape: [usize; 2]| -> Result<Tensor<2>> {
            Ok(linear_weight(
                &ck.take(&format!("{prefix}.{n}.weight"), &shape)?,
                device,
            ))
        };
        let (q, k, v, o) = (
            w("q", [inner, d])?,
            w("k", [inner, d])?,
            w("v", [inner, d])?,
            w("o", [d, inner])?,
        );
        let relative_bias = if relative {
            let name = format!("{prefix}.relative_attention_bias.weight");
            let t = ck.take(&name, &[c.relative_attention_num_buckets, c.num_heads])?;
            Some(t.to_tensor(device)?)
        } else {
            None
        };
        Ok(Self {
            q,
            k,
            v,
            o,
            relative_bias,
            heads: c.num_heads,
            d_kv: c.d_kv,
        })
    }
}

impl Block {
    fn load(
        ck: &mut Checkpoint,
        stack: &str,
        i: usize,
        c: &HfConfig,
        device: &Device,
    ) -> Result<Self> {
        let decoder = stack == "decoder";
        let p = format!("{stack}.block.{i}.layer");
        let self_norm = RmsNorm::load(ck, &format!("{p}.0.layer_norm.weight"), c, device)?;
        let self_attn = Attention::load(ck, &format!("{p}.0.SelfAttention"), i == 0, c, device)?;
        let cross = if decoder {
            Some((
                RmsNorm::load(ck, &format!("{p}.1.layer_norm.weight"), c, device)?,
                Attention::load(ck, &format!("{p}.1.EncDecAttention"), false, c, device)?,
            ))
        } else {
            None
        };
        let f = if decoder { 2 } else { 1 };
        let ff_norm = RmsNorm::load(ck, &format!("{p}.{f}.layer_norm.weight"), c, device)?;
        let mlp = format!("{p}.{f}.mlp");
        let ff = if c.is_sparse(decoder, i) {
            FeedForward::Sparse(SparseMlp::load(ck, &mlp, c, device)?)
        } else {
            FeedForward::Dense {
                wi: linear_weight(
                    &ck.take(&format!("{mlp}.wi.weight"), &[c.d_ff, c.d_model])?,
                    device,
                ),
                wo: linear_weight(
                    &ck.take(&format!("{mlp}.wo.weight"), &[c.d_model, c.d_ff])?,
                    device,
                ),
            }
        };
        Ok(Self {
            self_norm,
            self_attn,
            cross,
            ff_norm,
            ff,
        })
    }
}

impl Stack {
    fn load(
        ck: &mut Checkpoint,
        stack: &str,
        embed: Tensor<2>,
        c: &HfConfig,
        device: &Device,
    ) -> Result<Self> {
        let n = if stack == "decoder" {
            c.decoder_layers()
        } else {
            c.num_layers
        };
        let blocks = (0..n)
            .map(|i| Block::load(ck, stack, i, c, device))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = RmsNorm::load(ck, &format!("{stack}.final_layer_norm.weight"), c, device)?;
        Ok(Self {
            embed,
            blocks,
            final_norm,
        })
    }
}

impl HfSwitchTransformer {
    /// Builds the model of `config` from the checkpoint's tensors; fails naming a missing or
    /// mis-shaped tensor, or tensors the config does not account for.
    pub(crate) fn from_checkpoint(
        config: HfConfig,
        mut ck: Checkpoint,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let shape = [c.vocab_size, c.d_model];
        let mut stored_bf16 = false;
        let mut embedding = |ck: &mut Checkpoint, names: &[&str]| -> Result<Tensor<2>> {
            let t = ck.take_first(names, &shape)?;
            stored_bf16 |= t.is_bf16();
            t.to_tensor(device)
        };
        let (shared, enc_embed, dec_embed) = if c.tie_word_embeddings {
            // One matrix for both stacks and the output; copies of it may be saved too.
            let shared = embedding(
                &mut ck,
                &[
                    "shared.weight",
                    "encoder.embed_tokens.weight",
                    "decoder.embed_tokens.weight",
                ],
            )?;
            for tied in [
                "encoder.embed_tokens.weight",
                "decoder.embed_tokens.weight",
                "lm_head.weight",
            ] {
                ck.discard(tied);
            }
            (shared.clone(), shared.clone(), shared)
        } else {
            let shared = embedding(&mut ck, &["shared.weight"])?;
            let enc = if ck.contains("encoder.embed_tokens.weight") {
                embedding(&mut ck, &["encoder.embed_tokens.weight"])?
            } else {
                shared.clone()
            };
            let dec = if ck.contains("decoder.embed_tokens.weight") {
                embedding(&mut ck, &["decoder.embed_tokens.weight"])?
            } else {
                shared.clone()
            };
            (shared, enc, dec)
        };
        let encoder = Stack::load(&mut ck, "encoder", enc_embed, c, device)?;
        let decoder = Stack::load(&mut ck, "decoder", dec_embed, c, device)?;
        let lm_head = if c.tie_word_embeddings && crate::device::Paths::of(device).host_kernels {
            // Its own row-major copy on the CPU, so that decoding streams it
            // (`cpu::thin_matmul` takes contiguous weights: a transposed view would go through
            // a general matmul that packs all of it every step).
            // bf16 where the checkpoint stored it so (exact: the values came from bf16).
            let t = shared.clone().transpose();
            let dtype = if stored_bf16 { DType::BF16 } else { DType::F32 };
            Tensor::from_data(t.into_data(), (device, dtype))
        } else if c.tie_word_embeddings {
            shared.clone().transpose()
        } else {
            linear_weight(&ck.take("lm_head.weight", &shape)?, device)
        };
        let left = ck.remaining();
        if !left.is_empty() {
            anyhow::bail!(
                "the checkpoint has {} tensors config.json does not account for (first: `{}`): \
                 is config.json the one saved with these weights?",
                left.len(),
                left[0]
            );
        }
        Ok(Self {
            config,
            shared,
            encoder,
            decoder,
            lm_head,
            compute: DType::F32,
            device: device.clone(),
        })
    }

    /// Reads `dir` (config.json and the safetensors weights) onto `device`.
    pub fn load(dir: &std::path::Path, device: &Device) -> Result<Self> {
        let config = HfConfig::read(dir)?;
        let ck = Checkpoint::read(dir)?;
        Self::from_checkpoint(config, ck, device)
            .map_err(|e| e.context(format!("loading {}", dir.display())))
    }
}
