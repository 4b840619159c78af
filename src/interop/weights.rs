//! PyTorch interop: the model as a labml `state_dict` (the names of `super::names`, and
//! PyTorch's layouts).
//!
//! Layout differences handled here and nowhere else:
//! * `nn.Linear` weight is `[out, in]` in PyTorch, `[in, out]` in Burn;
//! * LayerNorm `weight`/`bias` are Burn's `gamma`/`beta`;
//! * experts are separate `experts.{e}.layer{1,2}` Linears in PyTorch, stacked tensors here;

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use crate::model::ModelConfig;
use crate::model::SwitchTransformer;
use crate::model::attention::MultiHeadAttention;
use crate::model::block::{DenseFeedForward, FeedForward, SwitchBlock};
use crate::model::expert::Experts;
use crate::model::switch::SwitchFeedForward;
use crate::routing::Router;
use crate::store::HostTensor;

use super::names::{self, join};

/// PyTorch parameter name -> host tensor in PyTorch layout.
pub type StateDict = BTreeMap<String, HostTensor>;

// ---------------------------------------------------------------------------------------------
// Export: values or gradients, in PyTorch layout.

/// Which tensor of each parameter an export reads.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The parameters' values.
    Values,
    /// The parameters' gradients in these gradients (a missing one is zero).
    Grads(&'a Gradients),
}

struct Exporter<'a> {
    source: Source<'a>,
    out: StateDict,
}

impl Exporter<'_> {
    fn read<const D: usize>(&self, p: &Param<Tensor<D>>) -> Option<HostTensor> {
        match self.source {
            Source::Values => Some(HostTensor::from_tensor(p.val())),
            Source::Grads(g) => p.val().grad(g).map(HostTensor::from_tensor),
        }
    }

    fn put<const D: usize>(&mut self, name: String, p: &Param<Tensor<D>>) {
        if let Some(t) = self.read(p) {
            self.out.insert(name, t);
        }
    }

    fn linear(&mut self, prefix: &str, l: &Linear) {
        if let Some(w) = self.read(&l.weight) {
            self.out.insert(names::weight(prefix), w.transposed());
        }
        if let Some(b) = &l.bias {
            self.put(names::bias(prefix), b);
        }
    }

    fn layer_norm(&mut self, prefix: &str, n: &LayerNorm) {
        self.put(names::weight(prefix), &n.gamma);
        if let Some(b) = &n.beta {
            self.put(names::bias(prefix), b);
        }
    }

    fn experts(&mut self, prefix: &str, ex: &Experts) {
        let n = ex.n_experts();
        let split = |t: Option<HostTensor>, name: String, transpose: bool, out: &mut StateDict| {
            let Some(t) = t else { return };
            let per = t.numel() / n;
            let inner: Vec<usize> = t.shape[1..].to_vec();
            let v = t.to_f32();
            for e in 0..n {
                let m = HostTensor::f32(inner.clone(), v[e * per..(e + 1) * per].to_vec());
                let m = if transpose { m.transposed() } else { m };
                out.insert(join(&names::expert(prefix, e), &name), m);
            }
        };
        let [l1, l2] = names::FFN_LAYERS;
        split(self.read(&ex.w1), names::weight(l1), true, &mut self.out);
        split(self.read(&ex.b1), names::bias(l1), false, &mut self.out);
        split(self.read(&ex.w2), names::weight(l2), true, &mut self.out);
        split(self.read(&ex.b2), names::bias(l2), false, &mut self.out);
    }

    fn switch(&mut self, prefix: &str, s: &SwitchFeedForward) {
        self.linear(&join(prefix, names::ROUTER), &s.router.switch);
        self.experts(&join(prefix, names::EXPERTS), &s.experts);
        if let Some(shared) = &s.shared {
            self.ffn(&join(prefix, names::SHARED_EXPERTS), shared);
        }
        // Auxiliary-loss-free balancing's biases: state, not trained (no gradient).
        if let (Some(b), Source::Values) = (&s.expert_bias, &self.source) {
            let t = HostTensor::f32(vec![b.values.len()], b.values.clone());
            self.out.insert(join(prefix, names::EXPERT_BIAS), t);
        }
    }

    fn block(&mut self, prefix: &str, b: &SwitchBlock) {
        let at = |name: &str| join(prefix, name);
        for (name, l) in names::ATTN_QKV
            .iter()
            .zip([&b.attn.query, &b.attn.key, &b.attn.value])
        {
            self.linear(&at(name), l);
        }
        self.linear(&at(names::ATTN_OUTPUT), &b.attn.output);
        self.layer_norm(&at(names::NORM_SELF_ATTN), &b.norm_self_attn);
        self.layer_norm(&at(names::NORM_FF), &b.norm_ff);
        let ff = at(names::FEED_FORWARD);
        match &b.feed_forward {
            FeedForward::Switch(s) => self.switch(&ff, s),
            FeedForward::Dense(d) => self.ffn(&ff, d),
        }
    }

    fn ffn(&mut self, prefix: &str, f: &DenseFeedForward) {
        let [l1, l2] = names::FFN_LAYERS;
        self.linear(&join(prefix, l1), &f.layer1);
        self.linear(&join(prefix, l2), &f.layer2);
    }
}

/// The switch feed-forward alone, as labml's `SwitchFeedForward.state_dict()`.
pub fn switch_state_dict(s: &SwitchFeedForward, source: Source<'_>) -> StateDict {
    let mut ex = Exporter {
        source,
        out: StateDict::new(),
    };
    ex.switch("", s);
    ex.out
}

/// The whole model, as labml's `AutoregressiveModel.state_dict()`.
pub fn model_state_dict(m: &SwitchTransformer, source: Source<'_>) -> StateDict {
    let mut ex = Exporter {
        source,
        out: StateDict::new(),
    };
    ex.put(names::EMBED.into(), &m.src_embed.weight);
    if let Some(p) = &m.pos_embed {
        ex.put(names::POS_EMBED.into(), &p.weight);
    }
    for (l, b) in m.layers.iter().enumerate() {
        ex.block(&names::block(l), b);
    }
    ex.layer_norm(names::FINAL_NORM, &m.norm);
    ex.linear(names::GENERATOR, &m.generator);
    ex.out
}

// ---------------------------------------------------------------------------------------------
// Import: build modules from a state dict, checking every name and shape.

struct Importer<'a> {
    sd: &'a StateDict,
    device: &'a Device,
    used: Vec<String>,
}

impl Importer<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.sd.get(name).with_context(|| {
            format!("the weights have no tensor `{name}` (expected shape {shape:?})")
        })?;
        if t.shape != shape {
            bail!(
                "tensor `{name}` has shape {:?}, the model configuration needs {shape:?}",
                t.shape
            );
        }
        if let Some(v) = t.first_non_finite() {
            bail!("tensor `{name}` holds a non-finite value ({v}): these weights have diverged");
        }
        self.used.push(name.to_string());
        Ok(t.clone())
    }

    fn param<const D: usize>(&self, t: &HostTensor) -> Param<Tensor<D>> {
        Param::from_data(TensorData::new(t.to_f32(), t.shape.clone()), self.device)
    }

    fn take_param<const D: usize>(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Param<Tensor<D>>> {
        let t = self.take(name, shape)?;
        Ok(self.param(&t))
    }

    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let w = self.take(&names::weight(prefix), &[d_out, d_in])?;
        Ok(Linear {
            weight: self.param(&w.transposed()),
            bias: Some(self.take_param(&names::bias(prefix), &[d_out])?),
        })
    }

    fn layer_norm(&mut self, prefix: &str, d: usize) -> Result<LayerNorm> {
        let mut n = LayerNormConfig::new(d)
            .with_epsilon(crate::model::ops::LN_EPS)
            .init(self.device);
        n.gamma = self.take_param(&names::weight(prefix), &[d])?;
        n.beta = Some(self.take_param(&names::bias(prefix), &[d])?);
        Ok(n)
    }

    fn experts(&mut self, prefix: &str, n: usize, d: usize, f: usize) -> Result<Experts> {
        let mut stack = |name: String, shape: &[usize], transpose: bool| -> Result<HostTensor> {
            let mut data = Vec::new();
            let mut inner = shape.to_vec();
            for e in 0..n {
                let t = self.take(&join(&names::expert(prefix, e), &name), shape)?;
                let t = if transpose { t.transposed() } else { t };
                inner = t.shape.clone();
                data.extend(t.to_f32());
            }
            Ok(HostTensor::f32([vec![n], inner].concat(), data))
        };
        let [l1, l2] = names::FFN_LAYERS;
        let w1 = stack(names::weight(l1), &[f, d], true)?;
        let b1 = stack(names::bias(l1), &[f], false)?;
        let w2 = stack(names::weight(l2), &[d, f], true)?;
        let b2 = stack(names::bias(l2), &[d], false)?;
        Ok(Experts {
            w1: self.param(&w1),
            b1: self.param(&b1),
            w2: self.param(&w2),
            b2: self.param(&b2),
        })
    }

    fn ffn(&mut self, prefix: &str, d: usize, width: usize) -> Result<DenseFeedForward> {
        let [l1, l2] = names::FFN_LAYERS;
        Ok(DenseFeedForward {
            layer1: self.linear(&join(prefix, l1), d, width)?,
            layer2: self.linear(&join(prefix, l2), width, d)?,
        })
    }

    fn switch(&mut self, prefix: &str, c: &ModelConfig) -> Result<SwitchFeedForward> {
        let router = Router {
            switch: self.linear(&join(prefix, names::ROUTER), c.d_model, c.n_experts)?,
        };
        let experts = self.experts(
            &join(prefix, names::EXPERTS),
            c.n_experts,
            c.d_model,
            c.expert_width(),
        )?;
        let settings = c.switch_config();
        let shared = if c.shared_experts > 0 {
            Some(self.ffn(
                &join(prefix, names::SHARED_EXPERTS),
                c.d_model,
                settings.shared_width(),
            )?)
        } else {
            None
        };
        let mut switch = settings.assemble(router, experts, shared);
        if let Some(b) = &mut switch.expert_bias {
            b.values = self
                .take(&join(prefix, names::EXPERT_BIAS), &[c.n_experts])?
                .to_f32();
        }
        Ok(switch)
    }

    fn block(&mut self, prefix: &str, c: &ModelConfig, l: usize) -> Result<SwitchBlock> {
        let d = c.d_model;
        let at = |name: &str| join(prefix, name);
        let [q, k, v] = names::ATTN_QKV.map(at);
        let (query, key, value) = (
            self.linear(&q, d, d)?,
            self.linear(&k, d, d)?,
            self.linear(&v, d, d)?,
        );
        let ff = at(names::FEED_FORWARD);
        Ok(SwitchBlock {
            attn: MultiHeadAttention {
                query,
                key,
                value,
                output: self.linear(&at(names::ATTN_OUTPUT), d, d)?,
                heads: c.heads,
            },
            norm_self_attn: self.layer_norm(&at(names::NORM_SELF_ATTN), d)?,
            norm_ff: self.layer_norm(&at(names::NORM_FF), d)?,
            feed_forward: if c.is_switch_layer(l) {
                FeedForward::Switch(self.switch(&ff, c)?)
            } else {
                FeedForward::Dense(self.ffn(&ff, d, c.d_ff)?)
            },
            dropout: c.dropout,
            training: true,
        })
    }

    /// Every tensor of the state dict must have been used.
    fn finish(self) -> Result<()> {
        let unused: Vec<&String> = self.sd.keys().filter(|k| !self.used.contains(k)).collect();
        if !unused.is_empty() {
            bail!(
                "the weights have {} tensor(s) this model configuration does not use, e.g. `{}`",
                unused.len(),
                unused[0]
            );
        }
        Ok(())
    }
}

/// Builds a Switch feed-forward from labml `SwitchFeedForward` weights (`switch.*`, `experts.*`).
pub fn switch_from_state_dict(
    c: &ModelConfig,
    sd: &StateDict,
    device: &Device,
) -> Result<SwitchFeedForward> {
    let mut im = Importer {
        sd,
        device,
        used: Vec::new(),
    };
    let s = im.switch("", c)?;
    im.finish()?;
    Ok(s)
}

/// Builds the whole model from a labml `AutoregressiveModel` state dict.
pub fn model_from_state_dict(
    c: &ModelConfig,
    sd: &StateDict,
    device: &Device,
) -> Result<SwitchTransformer> {
    c.validate()?;
    crate::model::precision::check_device(c.precision, device)?;
    let mut im = Importer {
        sd,
        device,
        used: Vec::new(),
    };
    let src_embed = Embedding {
        weight: im.take_param(names::EMBED, &[c.n_vocab, c.d_model])?,
    };
    let pos_embed = if c.pos_embedding {
        Some(Embedding {
            weight: im.take_param(names::POS_EMBED, &[c.max_seq_len, c.d_model])?,
        })
    } else {
        None
    };
    let layers = (0..c.n_layers)
        .map(|l| im.block(&names::block(l), c, l))
        .collect::<Result<Vec<_>>>()?;
    let norm = im.layer_norm(names::FINAL_NORM, c.d_model)?;
    let generator = im.linear(names::GENERATOR, c.d_model, c.n_vocab)?;
    im.finish()?;
    Ok(SwitchTransformer {
        src_embed,
        pos_embed,
        layers,
        norm,
        generator,
        precision: c.precision,
    })
}

// ---------------------------------------------------------------------------------------------
// Files.

/// Saves the model as a PyTorch-loadable safetensors state dict
/// (`model.load_state_dict(safetensors.torch.load_file(path))` in labml), with the
/// configuration as JSON under the metadata key `config`. Written atomically.
///
/// ```
/// use burn::tensor::Device;
/// use switch_transformer::ModelConfig;
/// use switch_transformer::interop::weights::{Source, load_model, model_state_dict, save_model};
///
/// let (config, device) = (ModelConfig { n_layers: 1, ..ModelConfig::default() }, Device::default());
/// let model = config.init(7, &device)?;
/// let path = std::env::temp_dir().join(format!("switch-doc-{}.safetensors", std::process::id()));
/// save_model(&path, &model, &config)?;
/// let back = load_model(&path, &config, &device)?;
/// // labml's parameter names, e.g. `transformer.layers.0.feed_forward.switch.weight`.
/// let (a, b) = (model_state_dict(&model, Source::Values), model_state_dict(&back, Source::Values));
/// assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
/// assert!(a.iter().zip(&b).all(|((_, x), (_, y))| x == y));
/// # std::fs::remove_file(&path)?;
/// # anyhow::Ok(())
/// ```
pub fn save_model(path: &std::path::Path, m: &SwitchTransformer, c: &ModelConfig) -> Result<()> {
    let mut f = crate::store::TensorFile {
        tensors: model_state_dict(m, Source::Values),
        ..Default::default()
    };
    f.metadata
        .insert("config".into(), serde_json::to_string(c)?);
    f.write(path)
}

/// Loads weights saved by [`save_model`] or by PyTorch (`safetensors.torch.save_file(
/// model.state_dict(), path)`) for configuration `c`.
pub fn load_model(
    path: &std::path::Path,
    c: &ModelConfig,
    device: &Device,
) -> Result<SwitchTransformer> {
    let f = crate::store::TensorFile::read(path)?;
    model_from_state_dict(c, &f.tensors, device)
        .with_context(|| format!("{} does not fit the model configuration", path.display()))
}
