//! Hugging Face's `SwitchTransformersForConditionalGeneration` (transformers 5.24.0), top-down:
//!
//! ```text
//! encoder: x = shared[ids]; per block: x += SelfAttn(RMS(x)); x += FF(RMS(x)); RMS(x)
//! decoder: y = shared[dec]; per block: y += CausalSelfAttn(RMS(y)); y += CrossAttn(RMS(y), enc);
//!          y += FF(RMS(y)); RMS(y)
//! logits  = (tied ? y * d_model^-0.5 : y) @ lm_head^T
//! RMS(x)  = w * x / sqrt(mean(x^2) + eps)                (no mean subtracted, no bias)
//! Attn    = softmax(q k^T + bias + mask) v               (no 1/sqrt(d_kv): T5 folds it into q)
//! bias    = table[bucket(key_pos - query_pos)]           (first block of each stack; shared)
//! FF      = relu(x wi) wo, or in sparse blocks a Switch FFN ([`super::sparse`])
//! ```
//! Weights are stored transposed (`[in, out]`), so a linear layer is `x @ w`. Reading them from a
//! checkpoint: `load`; writing them as transformers names them: `export`.
//!
//! Activations are f32, or bf16 where fine-tuning asks for it
//! ([`HfSwitchTransformer::set_compute`]: the embedding's output is cast, and every product then
//! casts its weight to the activations' type). In bf16 the parts transformers keeps in f32 stay
//! f32: the norms' mean square, the attention scores and their softmax (T5's
//! `softmax(scores.float())`), the router (its `router_dtype`), and the logits the loss reads.

use burn::tensor::activation::{relu, softmax};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use anyhow::Result;

use super::config::HfConfig;
use super::linear::matmul3;
use super::sparse::{Grouping, Routes, SparseMlp};
use crate::model::attention::KvCache;

mod export;
mod load;
mod params;

use crate::hf::training::{Training, dropout};
use crate::model::precision::{cast_to, f32};

/// Root-mean-square layer norm with a scale and no bias.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    /// `[d_model]`.
    pub weight: Tensor<1>,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// `x` `[b, s, d]`, computed in f32 and returned in `x`'s type.
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [_, _, d] = x.dims();
        let dtype = x.dtype();
        let x = f32(x);
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        let x = x * (variance + self.eps).sqrt().recip();
        cast_to(x * self.weight.clone().reshape([1, 1, d]), dtype)
    }
}

/// T5's relative-position bucket of `key - query` (Mesh TensorFlow's, as transformers
/// computes it: half the buckets exact, the rest logarithmic up to `max_distance`; in the
/// encoder half of them for keys after the query).
pub(crate) fn relative_bucket(
    relative: i64,
    bidirectional: bool,
    buckets: usize,
    max_distance: usize,
) -> usize {
    let mut n = buckets as i64;
    let mut bucket = 0i64;
    let mut rel = relative;
    if bidirectional {
        n /= 2;
        if rel > 0 {
            bucket += n;
        }
        rel = rel.abs();
    } else {
        rel = -rel.min(0);
    }
    let max_exact = n / 2;
    if rel < max_exact {
        bucket += rel;
    } else {
        // transformers computes this in f32: log(rel / max_exact) / log(max_distance / max_exact)
        // * (n - max_exact), truncated.
        let ratio = (rel as f32 / max_exact as f32).ln();
        let scale = ((max_distance as f64 / max_exact as f64).ln()) as f32;
        let large = max_exact + (ratio / scale * (n - max_exact) as f32) as i64;
        bucket += large.min(n - 1);
    }
    bucket as usize
}

/// Multi-head attention without biases; the first block's self-attention owns the
/// relative-position table.
#[derive(Debug, Clone)]
pub struct Attention {
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    o: Tensor<2>,
    /// `[buckets, heads]`, in the first block of a stack only.
    pub relative_bias: Option<Tensor<2>>,
    heads: usize,
    d_kv: usize,
}

impl Attention {
    fn split(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, s, _] = x.dims();
        x.reshape([b, s, self.heads, self.d_kv]).swap_dims(1, 2)
    }

    /// The keys and values of `x` `[b, s, d]`, `[b, heads, s, d_kv]` each.
    pub(crate) fn key_values(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>) {
        (
            self.split(matmul3(x.clone(), &self.k)),
            self.split(matmul3(x, &self.v)),
        )
    }

    /// Appends the keys and values of `x` to `cache` (the project's key/value cache).
    pub(crate) fn extend(&self, x: Tensor<3>, cache: &mut KvCache) {
        let (k, v) = self.key_values(x);
        let append = |old: Option<Tensor<4>>, new| match old {
            Some(old) => Tensor::cat(vec![old, new], 2),
            None => new,
        };
        cache.k = Some(append(cache.k.take(), k));
        cache.v = Some(append(cache.v.take(), v));
    }

    /// `[1, heads, q, k]`: the relative-position bias for queries at `past..past+q`.
    pub(crate) fn position_bias(
        &self,
        q: usize,
        k: usize,
        past: usize,
        bidirectional: bool,
        c: &HfConfig,
    ) -> Tensor<4> {
        let table = self.relative_bias.as_ref().expect("relative bias table");
        let mut ids = Vec::with_capacity(q * k);
        for i in 0..q {
            for j in 0..k {
                let rel = j as i64 - (i + past) as i64;
                ids.push(relative_bucket(
                    rel,
                    bidirectional,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                ) as i64);
            }
        }
        let device = table.device();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [q * k]), &device);
        table
            .clone()
            .select(0, ids)
            .reshape([q, k, self.heads])
            .permute([2, 0, 1])
            .unsqueeze_dim(0)
    }

    /// Attention of `x` `[b, q, d]` over the keys and values in `kv` (not empty), with
    /// `bias` (f32: position bias plus mask, broadcastable to `[b, heads, q, k]`); when
    /// training, with dropout on the attention probabilities. Scores and softmax in f32,
    /// the products in `x`'s type.
    pub(crate) fn attend(
        &self,
        x: Tensor<3>,
        kv: &KvCache,
        bias: Tensor<4>,
        train: &mut Option<&mut Training>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (k, v) = (kv.k.clone().expect("keys"), kv.v.clone().expect("values"));
        let dtype = x.dtype();
        let q = self.split(matmul3(x, &self.q));
        let probs = |scores: Tensor<4>| cast_to(softmax(f32(scores) + bias.clone(), 3), dtype);
        let out = if let Some(t) = train.as_deref_mut() {
            let p = probs(q.matmul(k.swap_dims(2, 3)));
            t.dropout(p).matmul(v)
        } else if s == 1 {
            // One query (a decoding step): the products as multiply-and-sum over the keys'
            // layout, two ops each instead of a batched matmul of one row per head (a
            // general matmul call per head on the CPU).
            let p = probs((q * k).sum_dim(3).swap_dims(2, 3));
            (p.swap_dims(2, 3) * v).sum_dim(2)
        } else {
            probs(q.matmul(k.swap_dims(2, 3))).matmul(v)
        };
        let out = out.swap_dims(1, 2).reshape([b, s, self.heads * self.d_kv]);
        matmul3(out, &self.o)
    }
}

/// A block's feed-forward network: dense, or a Switch FFN.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per block
pub enum FeedForward {
    /// `relu(x wi) wo`.
    Dense {
        /// `[d_model, d_ff]`.
        wi: Tensor<2>,
        /// `[d_ff, d_model]`.
        wo: Tensor<2>,
    },
    /// Top-1 routing to experts with a per-sequence capacity.
    Sparse(SparseMlp),
}

/// One encoder or decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    self_norm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    cross: Option<(RmsNorm, Attention)>,
    ff_norm: RmsNorm,
    /// Dense or sparse feed-forward.
    pub ff: FeedForward,
}

impl Block {
    fn feed_forward(
        &self,
        x: Tensor<3>,
        grouping: Grouping,
        routes: &mut Vec<Routes>,
        train: &mut Option<&mut Training>,
    ) -> Result<Tensor<3>> {
        let h = self.ff_norm.forward(x.clone());
        let y = match &self.ff {
            FeedForward::Dense { wi, wo } => matmul3(dropout(relu(matmul3(h, wi)), train), wo),
            FeedForward::Sparse(mlp) => {
                let (y, r) = mlp.forward(h, grouping, train)?;
                routes.push(r);
                y
            }
        };
        Ok(x + dropout(y, train))
    }
}

/// An encoder or a decoder: its token embedding, blocks and the final norm.
#[derive(Debug, Clone)]
pub struct Stack {
    /// `[vocab, d_model]`: the shared embedding, or with untied embeddings the stack's own
    /// `embed_tokens` (transformers 5.24.0 ties them to `shared` only with
    /// `tie_word_embeddings`).
    pub embed: Tensor<2>,
    /// The blocks.
    pub blocks: Vec<Block>,
    final_norm: RmsNorm,
}

/// Additive mask `[b, 1, 1, len]`: 0 where `mask` is 1, the most negative f32 where it is 0
/// (as transformers builds it).
pub(crate) fn key_mask(mask: &[i64], b: usize, len: usize, device: &Device) -> Tensor<4> {
    let v: Vec<f32> = mask
        .iter()
        .map(|&m| if m != 0 { 0.0 } else { f32::MIN })
        .collect();
    Tensor::from_data(TensorData::new(v, [b, 1, 1, len]), device)
}

/// `[1, 1, q, past + q]`: 0 where key `j <= past + i`, else the most negative f32.
fn causal_mask(q: usize, past: usize, device: &Device) -> Tensor<4> {
    let k = past + q;
    let mut v = vec![0f32; q * k];
    for i in 0..q {
        for j in (past + i + 1)..k {
            v[i * k + j] = f32::MIN;
        }
    }
    Tensor::from_data(TensorData::new(v, [1, 1, q, k]), device)
}

/// The encoder's output and mask, as the decoder uses them.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[b, src, d_model]`, after the final norm.
    pub hidden: Tensor<3>,
    /// The encoder attention mask, `[b, src]`, row-major.
    pub mask: Vec<i64>,
    /// Routing of every sparse encoder layer.
    pub routes: Vec<Routes>,
}

/// Per decoder block: the self-attention keys/values so far and the cross-attention
/// keys/values (computed once from the encoder output), in the project's [`KvCache`].
#[derive(Debug, Clone, Default)]
pub struct DecoderCache {
    /// Self-attention keys/values per block (empty before the first step).
    pub self_kv: Vec<KvCache>,
    /// Cross-attention keys/values per block.
    pub cross_kv: Vec<KvCache>,
}

impl DecoderCache {
    /// Positions decoded so far.
    pub(crate) fn len(&self) -> usize {
        self.self_kv.first().map_or(0, KvCache::len)
    }
}

/// The whole model.
///
/// ```
/// use std::path::Path;
/// use burn::tensor::Device;
/// use switch_transformer::hf::HfSwitchTransformer;
/// use switch_transformer::hf::generate::greedy;
/// use switch_transformer::hf::tokenize::HfTokenizer;
///
/// // A tiny random checkpoint in Hugging Face's layout (config.json, model.safetensors,
/// // tokenizer.json), as transformers saved it.
/// let dir = Path::new("tests/data/hf/tiny");
/// let model = HfSwitchTransformer::load(dir, &Device::default())?;
/// let tokenizer = HfTokenizer::load(dir, model.config.pad_token_id.unwrap_or(0))?;
/// let batch = tokenizer.encode(&["summarize: the king is dead".to_string()])?;
/// let encoded = model.encode(&batch.ids, &batch.mask, batch.batch, batch.len)?;
/// let ids = greedy(&model, &encoded, 4, true)?;
/// assert_eq!(ids[0].len(), 1 + 4); // the decoder start token, then 4 tokens
/// assert_eq!(ids, greedy(&model, &encoded, 4, false)?); // the key/value cache changes nothing
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct HfSwitchTransformer {
    /// Its configuration.
    pub config: HfConfig,
    /// `[vocab, d_model]`: transformers' `shared` embedding.
    pub shared: Tensor<2>,
    /// The encoder.
    pub encoder: Stack,
    /// The decoder.
    pub decoder: Stack,
    /// `[d_model, vocab]`: the output layer (the shared embedding, transposed, when tied).
    lm_head: Tensor<2>,
    /// The activations' type: f32, or bf16 in a fine-tuning run that asks for it.
    compute: DType,
    device: Device,
}

impl HfSwitchTransformer {
    /// The dtype the output layer (and with it every linear layer but the routers) is held
    /// in: bf16 where the checkpoint stores bf16 and the device is the CPU, else f32.
    pub fn weights_dtype(&self) -> DType {
        self.lm_head.dtype()
    }

    /// Computes in `dtype` from now on (f32 or bf16; see the module comment): the weights stay
    /// as they are, and every product casts them to the activations' type where used.
    pub fn set_compute(&mut self, dtype: DType) {
        self.compute = dtype;
    }

    /// The activations' type.
    pub fn compute(&self) -> DType {
        self.compute
    }

    /// The rows of `table` for `ids`, in the activations' type.
    fn embed(&self, table: &Tensor<2>, ids: &[i64], b: usize, s: usize) -> Result<Tensor<3>> {
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
            anyhow::bail!("token id {bad} is outside the vocabulary (0..{vocab})");
        }
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids.to_vec(), [b * s]), &self.device);
        let rows = table
            .clone()
            .select(0, ids)
            .reshape([b, s, self.config.d_model]);
        Ok(cast_to(rows, self.compute))
    }

    /// The encoder on `ids` `[b, s]` (row-major) with `mask` (1 = token, 0 = padding).
    pub fn encode(&self, ids: &[i64], mask: &[i64], b: usize, s: usize) -> Result<Encoded> {
        self.encode_pass(ids, mask, b, s, None)
    }

    /// [`Self::encode`], in a training pass when `train` is given.
    pub fn encode_pass(
        &self,
        ids: &[i64],
        mask: &[i64],
        b: usize,
        s: usize,
        mut train: Option<&mut Training>,
    ) -> Result<Encoded> {
        check_shape("input ids", ids.len(), b, s)?;
        check_shape("attention mask", mask.len(), b, s)?;
        let c = &self.config;
        let mut x = dropout(self.embed(&self.encoder.embed, ids, b, s)?, &mut train);
        let mut bias = None;
        let mut routes = Vec::new();
        for block in &self.encoder.blocks {
            if bias.is_none() {
                let pos = block.self_attn.position_bias(s, s, 0, true, c);
                bias = Some(pos + key_mask(mask, b, s, &self.device));
            }
            let h = block.self_norm.forward(x.clone());
            let mut kv = KvCache::default();
            block.self_attn.extend(h.clone(), &mut kv);
            let a = block
                .self_attn
                .attend(h, &kv, bias.clone().unwrap(), &mut train);
            x = x + dropout(a, &mut train);
            x = block.feed_forward(x, Grouping::PerSequence, &mut routes, &mut train)?;
        }
        let hidden = dropout(self.encoder.final_norm.forward(x), &mut train);
        Ok(Encoded {
            hidden,
            mask: mask.to_vec(),
            routes,
        })
    }

    /// An empty decoder cache for `enc` (cross-attention keys/values computed here, once).
    pub(crate) fn decoder_cache(&self, enc: &Encoded) -> DecoderCache {
        DecoderCache {
            self_kv: vec![KvCache::default(); self.decoder.blocks.len()],
            cross_kv: self
                .decoder
                .blocks
                .iter()
                .map(|b| {
                    let mut kv = KvCache::default();
                    b.cross
                        .as_ref()
                        .unwrap()
                        .1
                        .extend(enc.hidden.clone(), &mut kv);
                    kv
                })
                .collect(),
        }
    }

    /// The decoder on `ids` `[b, t]` following the positions in `cache` (extended with
    /// them), or, without a cache, on positions `0..t`; returns logits `[b, t, vocab]` and the
    /// routing of every sparse decoder layer. `grouping` decides the capacity groups of the
    /// sparse layers ([`Grouping`]).
    pub fn decode(
        &self,
        ids: &[i64],
        b: usize,
        t: usize,
        enc: &Encoded,
        cache: Option<&mut DecoderCache>,
        grouping: Grouping,
    ) -> Result<(Tensor<3>, Vec<Routes>)> {
        self.decode_pass(ids, b, t, enc, cache, grouping, None)
    }

    /// [`Self::decode`], in a training pass when `train` is given.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_pass(
        &self,
        ids: &[i64],
        b: usize,
        t: usize,
        enc: &Encoded,
        cache: Option<&mut DecoderCache>,
        grouping: Grouping,
        mut train: Option<&mut Training>,
    ) -> Result<(Tensor<3>, Vec<Routes>)> {
        check_shape("decoder input ids", ids.len(), b, t)?;
        let c = &self.config;
        let src = enc.hidden.dims()[1];
        let mut local;
        let cache = match cache {
            Some(cache) => cache,
            None => {
                local = self.decoder_cache(enc);
                &mut local
            }
        };
        let past = cache.len();
        let cross_bias = key_mask(&enc.mask, b, src, &self.device);
        let mut y = dropout(self.embed(&self.decoder.embed, ids, b, t)?, &mut train);
        let mut bias = None;
        let mut routes = Vec::new();
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            if bias.is_none() {
                let pos = block.self_attn.position_bias(t, past + t, past, false, c);
                bias = Some(pos + causal_mask(t, past, &self.device));
            }
            let h = block.self_norm.forward(y.clone());
            block.self_attn.extend(h.clone(), &mut cache.self_kv[i]);
            let a = block
                .self_attn
                .attend(h, &cache.self_kv[i], bias.clone().unwrap(), &mut train);
            y = y + dropout(a, &mut train);
            let (norm, cross) = block.cross.as_ref().unwrap();
            let h = norm.forward(y.clone());
            let a = cross.attend(h, &cache.cross_kv[i], cross_bias.clone(), &mut train);
            y = y + dropout(a, &mut train);
            y = block.feed_forward(y, grouping, &mut routes, &mut train)?;
        }
        let mut y = dropout(self.decoder.final_norm.forward(y), &mut train);
        if c.tie_word_embeddings {
            y = y * (c.d_model as f64).powf(-0.5);
        }
        Ok((matmul3(y, &self.lm_head), routes))
    }
}

fn check_shape(what: &str, len: usize, b: usize, s: usize) -> Result<()> {
    if len != b * s || b == 0 || s == 0 {
        anyhow::bail!(
            "{what}: {len} values for shape [{b}, {s}] (need {} > 0)",
            b * s
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' buckets for 32 buckets, max distance 128 (T5's defaults), computed with
    /// `SwitchTransformersAttention._relative_position_bucket`.
    #[test]
    fn buckets_match_transformers() {
        let rel = [
            -200i64, -128, -60, -20, -9, -8, -7, -1, 0, 1, 7, 8, 9, 20, 60, 128, 200,
        ];
        let bi: Vec<usize> = rel
            .iter()
            .map(|&r| relative_bucket(r, true, 32, 128))
            .collect();
        let uni: Vec<usize> = rel
            .iter()
            .map(|&r| relative_bucket(r, false, 32, 128))
            .collect();
        assert_eq!(
            bi,
            [
                15, 15, 13, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 29, 31, 31
            ]
        );
        assert_eq!(uni, [31, 31, 26, 17, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
