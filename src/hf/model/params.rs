//! The one walk over the model's trainable tensors, by transformers' names, in a fixed order
//! (the shared embedding, then the encoder's and the decoder's blocks as `tensors()` names
//! them): what fine-tuning reads gradients from and writes updates to.
//!
//! Tied embeddings are one parameter, `shared.weight`: [`HfSwitchTransformer::retie`] puts it
//! back into both stacks and the output layer after it changes.

use anyhow::{Result, bail};
use burn::tensor::Tensor;

use super::{Attention, FeedForward, HfSwitchTransformer, RmsNorm, Stack};
use crate::hf::training::{ParamMut, Visit};

impl RmsNorm {
    fn visit(&mut self, name: String, f: &mut Visit<'_>) -> Result<()> {
        f(&name, ParamMut::Vector(&mut self.weight))
    }
}

fn linear(name: &str, tensor: &mut Tensor<2>, f: &mut Visit<'_>) -> Result<()> {
    f(
        name,
        ParamMut::Matrix {
            tensor,
            linear: true,
        },
    )
}

impl Attention {
    fn visit(&mut self, p: &str, f: &mut Visit<'_>) -> Result<()> {
        for (n, w) in [
            ("q", &mut self.q),
            ("k", &mut self.k),
            ("v", &mut self.v),
            ("o", &mut self.o),
        ] {
            linear(&format!("{p}.{n}.weight"), w, f)?;
        }
        if let Some(t) = &mut self.relative_bias {
            f(
                &format!("{p}.relative_attention_bias.weight"),
                ParamMut::Matrix {
                    tensor: t,
                    linear: false,
                },
            )?;
        }
        Ok(())
    }
}

impl Stack {
    fn visit(&mut self, stack: &str, f: &mut Visit<'_>) -> Result<()> {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("{stack}.block.{i}.layer");
            b.self_norm.visit(format!("{p}.0.layer_norm.weight"), f)?;
            b.self_attn.visit(&format!("{p}.0.SelfAttention"), f)?;
            let ff = match &mut b.cross {
                Some((norm, attn)) => {
                    norm.visit(format!("{p}.1.layer_norm.weight"), f)?;
                    attn.visit(&format!("{p}.1.EncDecAttention"), f)?;
                    2
                }
                None => 1,
            };
            b.ff_norm.visit(format!("{p}.{ff}.layer_norm.weight"), f)?;
            match &mut b.ff {
                FeedForward::Dense { wi, wo } => {
                    linear(&format!("{p}.{ff}.mlp.wi.weight"), wi, f)?;
                    linear(&format!("{p}.{ff}.mlp.wo.weight"), wo, f)?;
                }
                FeedForward::Sparse(mlp) => mlp.visit(&format!("{p}.{ff}.mlp"), f)?,
            }
        }
        self.final_norm
            .visit(format!("{stack}.final_layer_norm.weight"), f)
    }
}

impl HfSwitchTransformer {
    /// Visits every trainable tensor by its transformers name (reading the experts not
    /// loaded yet). Only models with tied embeddings (every released Switch checkpoint):
    /// untied ones are refused.
    pub fn visit_params(&mut self, f: &mut Visit<'_>) -> Result<()> {
        if !self.config.tie_word_embeddings {
            bail!(
                "this model's embeddings are untied (tie_word_embeddings = false): fine-tuning \
                 supports tied embeddings only, as every released Switch checkpoint has them"
            );
        }
        f(
            "shared.weight",
            ParamMut::Matrix {
                tensor: &mut self.shared,
                linear: false,
            },
        )?;
        self.encoder.visit("encoder", f)?;
        self.decoder.visit("decoder", f)?;
        self.retie();
        Ok(())
    }

    /// Puts the shared embedding back into both stacks and the output layer (after it was
    /// replaced), as one tensor of the graph: their gradients add up in it.
    pub fn retie(&mut self) {
        self.encoder.embed = self.shared.clone();
        self.decoder.embed = self.shared.clone();
        self.lm_head = self.shared.clone().transpose();
    }

    /// Drops the stacks' and the output layer's handles on the shared embedding (until
    /// [`Self::retie`]), so that nothing else holds its storage while it is updated.
    pub(crate) fn untie(&mut self) {
        let device = self.shared.device();
        self.encoder.embed = Tensor::zeros([1, 1], &device);
        self.decoder.embed = Tensor::zeros([1, 1], &device);
        self.lm_head = Tensor::zeros([1, 1], &device);
    }

    /// Moves the model to `device` (an autodiff device to train), every parameter f32 (the walk
    /// reties the embedding).
    pub fn to_device_f32(&mut self, device: &burn::tensor::Device) -> Result<()> {
        self.visit_params(&mut |_, p| {
            match p {
                ParamMut::Vector(t) => *t = to_f32(t, device),
                ParamMut::Matrix { tensor, .. } => *tensor = to_f32(tensor, device),
            }
            Ok(())
        })?;
        self.device = device.clone();
        Ok(())
    }
}

/// `t` on `device` in f32: the same storage when only autodiff is added or taken away (no
/// second copy of the weights while a model moves), else a copy.
fn to_f32<const D: usize>(t: &Tensor<D>, device: &burn::tensor::Device) -> Tensor<D> {
    if t.dtype() == burn::tensor::DType::F32 {
        let (from, to) = (t.device().inner(), device.clone().inner());
        if from == to {
            let t = if t.is_autodiff() {
                t.clone().inner()
            } else {
                t.clone()
            };
            return if device.is_autodiff() {
                t.autodiff()
            } else {
                t
            };
        }
    }
    let data = t.clone().into_data().convert::<f32>();
    Tensor::from_data(data, device)
}
