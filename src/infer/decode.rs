//! Token-by-token decoding on the CPU with plain loops over host copies of the weights.
//!
//! Generating one token costs about 200 small tensor ops through Burn, each a few microseconds
//! of dispatch and allocation on the CPU backend for a few thousand multiply-adds: decoding is
//! all overhead there. This decoder does the same arithmetic as
//! [`SwitchTransformer::forward_cached`](crate::model::SwitchTransformer::forward_cached) for one
//! position (pre-LayerNorm blocks, cached keys and values in a sliding window of `max_len`,
//! dropless top-k routing) directly on `Vec<f32>`s. It is used on the CPU backend for f32
//! models without learned positions; every other case takes the generic Burn path.

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{DType, Tensor};

use crate::model::SwitchTransformer;
use crate::model::block::FeedForward;
use crate::model::precision::Precision;
use crate::routing::{argmax, top_k};
use crate::store::host_f32;

/// `y = x W + b`, `W` stored `[n_in, n_out]` row-major (Burn's layout).
struct HostLinear {
    w: Vec<f32>,
    b: Vec<f32>,
    n_out: usize,
}

impl HostLinear {
    fn new(l: &Linear) -> Self {
        let [_, n_out] = l.weight.dims();
        Self {
            w: host_f32(l.weight.val()),
            b: l.bias
                .as_ref()
                .map_or(vec![0.0; n_out], |b| host_f32(b.val())),
            n_out,
        }
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        matvec(x, &self.w, &self.b, self.n_out)
    }
}

/// `x W + b` with `W` `[x.len(), n_out]` row-major: rows scaled and added, a loop the compiler
/// vectorizes; with AVX2 and FMA where the CPU has them (checked at run time).
fn matvec(x: &[f32], w: &[f32], b: &[f32], n_out: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { matvec_avx2(x, w, b, n_out) };
    }
    matvec_loop::<false>(x, w, b, n_out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matvec_avx2(x: &[f32], w: &[f32], b: &[f32], n_out: usize) -> Vec<f32> {
    matvec_loop::<true>(x, w, b, n_out)
}

/// The loop itself; `FMA` fuses the multiply-add (only where the CPU has it: elsewhere
/// `mul_add` is a slow library call).
#[inline(always)]
fn matvec_loop<const FMA: bool>(x: &[f32], w: &[f32], b: &[f32], n_out: usize) -> Vec<f32> {
    let mut y = b.to_vec();
    for (xi, row) in x.iter().zip(w.chunks_exact(n_out)) {
        for (yj, wj) in y.iter_mut().zip(row) {
            *yj = if FMA {
                xi.mul_add(*wj, *yj)
            } else {
                *yj + xi * wj
            };
        }
    }
    y
}

struct HostNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl HostNorm {
    /// The epsilon every norm of the model uses.
    const EPS: f32 = crate::model::ops::LN_EPS as f32;

    fn new(n: &LayerNorm) -> Self {
        let gamma = host_f32(n.gamma.val());
        let beta = n
            .beta
            .as_ref()
            .map_or(vec![0.0; gamma.len()], |b| host_f32(b.val()));
        Self { gamma, beta }
    }

    /// `(x - mean) / sqrt(var + eps) * gamma + beta`, biased variance.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + Self::EPS).sqrt();
        x.iter()
            .zip(self.gamma.iter().zip(&self.beta))
            .map(|(v, (g, b))| (v - mean) * inv * g + b)
            .collect()
    }
}

/// A plain FFN on the host: `relu(x W1 + b1) W2 + b2`.
struct HostFfn {
    layer1: HostLinear,
    layer2: HostLinear,
}

impl HostFfn {
    fn new(f: &crate::model::block::DenseFeedForward) -> Self {
        Self {
            layer1: HostLinear::new(&f.layer1),
            layer2: HostLinear::new(&f.layer2),
        }
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut h = self.layer1.forward(x);
        h.iter_mut().for_each(|v| *v = v.max(0.0));
        self.layer2.forward(&h)
    }
}

enum HostFeedForward {
    Switch {
        router: HostLinear,
        /// `[n_experts, d_model, d_ff]`, `[n_experts, d_ff]`, `[n_experts, d_ff, d_model]`,
        /// `[n_experts, d_model]`.
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: Vec<f32>,
        d_ff: usize,
        top_k: usize,
        is_scale_prob: bool,
        /// With auxiliary-loss-free balancing: the experts are chosen by logits + bias.
        bias: Option<crate::routing::ExpertBias>,
        /// The shared experts, which every token passes through.
        shared: Option<Box<HostFfn>>,
    },
    Dense(HostFfn),
}

impl HostFeedForward {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        match self {
            Self::Dense(ffn) => ffn.forward(x),
            Self::Switch {
                router,
                w1,
                b1,
                w2,
                b2,
                d_ff,
                top_k: k,
                is_scale_prob,
                bias,
                shared,
            } => {
                let d = x.len();
                let logits = router.forward(x);
                let p = softmax(&logits);
                let scores = match bias {
                    Some(b) => b.scores(logits),
                    None => p.clone(),
                };
                let chosen = if *k == 1 {
                    vec![argmax(&scores)]
                } else {
                    top_k(&scores, *k)
                };
                let total: f32 = chosen.iter().map(|&e| p[e]).sum();
                let mut out = vec![0.0; d];
                for &e in &chosen {
                    // Gate: p (or p / p = 1 without is_scale_prob); renormalized for k >= 2.
                    let gate = if *k > 1 {
                        p[e] / total
                    } else if *is_scale_prob {
                        p[e]
                    } else {
                        1.0
                    };
                    let mut h = matvec(
                        x,
                        &w1[e * d * d_ff..(e + 1) * d * d_ff],
                        &b1[e * d_ff..(e + 1) * d_ff],
                        *d_ff,
                    );
                    h.iter_mut().for_each(|v| *v = v.max(0.0));
                    let y = matvec(
                        &h,
                        &w2[e * d_ff * d..(e + 1) * d_ff * d],
                        &b2[e * d..(e + 1) * d],
                        d,
                    );
                    for (o, v) in out.iter_mut().zip(y) {
                        *o += v * gate;
                    }
                }
                if let Some(ffn) = shared {
                    for (o, v) in out.iter_mut().zip(ffn.forward(x)) {
                        *o += v;
                    }
                }
                out
            }
        }
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

struct HostBlock {
    norm_self_attn: HostNorm,
    query: HostLinear,
    key: HostLinear,
    value: HostLinear,
    output: HostLinear,
    norm_ff: HostNorm,
    feed_forward: HostFeedForward,
}

/// Keys and values of the cached positions of every layer, one `d_model` row per position.
#[derive(Default, Clone)]
pub struct HostCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The model's weights on the host, ready to decode.
pub struct HostDecoder {
    embed: Vec<f32>,
    layers: Vec<HostBlock>,
    norm: HostNorm,
    generator: HostLinear,
    d_model: usize,
    heads: usize,
}

impl HostDecoder {
    /// The decoder for `model`, where it applies: on the CPU backend, f32, no learned
    /// positions.
    pub fn for_model(model: &SwitchTransformer) -> Option<Self> {
        let weight = model.src_embed.weight.val();
        if !crate::device::Paths::of(&weight.device()).host_kernels
            || model.precision != Precision::F32
            || weight.dtype() != DType::F32
            || model.pos_embed.is_some()
        {
            return None;
        }
        Some(Self::new(model))
    }

    fn new(model: &SwitchTransformer) -> Self {
        let [_, d_model] = model.src_embed.weight.dims();
        let vals3 = |p: &Param<Tensor<3>>| host_f32(p.val());
        let vals2 = |p: &Param<Tensor<2>>| host_f32(p.val());
        let layers = model
            .layers
            .iter()
            .map(|b| HostBlock {
                norm_self_attn: HostNorm::new(&b.norm_self_attn),
                query: HostLinear::new(&b.attn.query),
                key: HostLinear::new(&b.attn.key),
                value: HostLinear::new(&b.attn.value),
                output: HostLinear::new(&b.attn.output),
                norm_ff: HostNorm::new(&b.norm_ff),
                feed_forward: match &b.feed_forward {
                    FeedForward::Switch(s) => HostFeedForward::Switch {
                        router: HostLinear::new(&s.router.switch),
                        w1: vals3(&s.experts.w1),
                        b1: vals2(&s.experts.b1),
                        w2: vals3(&s.experts.w2),
                        b2: vals2(&s.experts.b2),
                        d_ff: s.experts.w1.dims()[2],
                        top_k: s.routing.top_k.clamp(1, s.n_experts()),
                        is_scale_prob: s.is_scale_prob,
                        bias: s.expert_bias.clone(),
                        shared: s.shared.as_ref().map(|f| Box::new(HostFfn::new(f))),
                    },
                    FeedForward::Dense(dense) => HostFeedForward::Dense(HostFfn::new(dense)),
                },
            })
            .collect();
        Self {
            embed: host_f32(model.src_embed.weight.val()),
            layers,
            norm: HostNorm::new(&model.norm),
            generator: HostLinear::new(&model.generator),
            d_model,
            heads: model.layers.first().map_or(1, |b| b.attn.heads),
        }
    }

    /// An empty cache for [`Self::step`].
    pub fn new_cache(&self) -> HostCache {
        HostCache {
            k: vec![Vec::new(); self.layers.len()],
            v: vec![Vec::new(); self.layers.len()],
        }
    }

    /// Next-token logits after `token`, which joins `cache` (trimmed to the `max_len` most
    /// recent positions).
    pub fn step(&self, token: u32, cache: &mut HostCache, max_len: usize) -> Vec<f32> {
        let d = self.d_model;
        let t = token as usize;
        let mut x = self.embed[t * d..(t + 1) * d].to_vec();
        for (l, block) in self.layers.iter().enumerate() {
            let a = block.norm_self_attn.forward(&x);
            let attn = self.attend(block, &a, &mut cache.k[l], &mut cache.v[l], max_len);
            x.iter_mut().zip(&attn).for_each(|(x, a)| *x += a);
            let f = block.feed_forward.forward(&block.norm_ff.forward(&x));
            x.iter_mut().zip(&f).for_each(|(x, f)| *x += f);
        }
        self.generator.forward(&self.norm.forward(&x))
    }

    /// `softmax(q k^T / sqrt(d_k)) v` per head over the cached positions and this one.
    fn attend(
        &self,
        b: &HostBlock,
        a: &[f32],
        keys: &mut Vec<f32>,
        values: &mut Vec<f32>,
        max_len: usize,
    ) -> Vec<f32> {
        let d = self.d_model;
        let dk = d / self.heads;
        keys.extend(b.key.forward(a));
        values.extend(b.value.forward(a));
        if keys.len() > max_len * d {
            let excess = keys.len() - max_len * d;
            keys.drain(..excess);
            values.drain(..excess);
        }
        let q = b.query.forward(a);
        let scale = 1.0 / (dk as f32).sqrt();
        let mut o = vec![0.0; d];
        for h in 0..self.heads {
            let cols = h * dk..(h + 1) * dk;
            let scores: Vec<f32> = keys
                .chunks_exact(d)
                .map(|k| {
                    q[cols.clone()]
                        .iter()
                        .zip(&k[cols.clone()])
                        .map(|(q, k)| q * k)
                        .sum::<f32>()
                        * scale
                })
                .collect();
            let p = softmax(&scores);
            for (pj, v) in p.iter().zip(values.chunks_exact(d)) {
                for (o, v) in o[cols.clone()].iter_mut().zip(&v[cols.clone()]) {
                    *o += pj * v;
                }
            }
        }
        b.output.forward(&o)
    }
}
