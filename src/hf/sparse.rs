//! The Switch FFN of Hugging Face's checkpoints (`SwitchTransformersSparseMLP`, transformers
//! 5.24.0):
//!
//! ```text
//! p      = softmax(x W_router [+ b])                  f32
//! e(t)   = argmax p(t)                                first on ties
//! kept   = the first `expert_capacity` tokens of each expert in each sequence, by position
//! y(t)   = p(t)[e(t)] * relu(x(t) wi_e) wo_e          if kept, else 0 (the residual carries it)
//! ```
//! The decision is a [`RoutePlan`] (the project's), and the experts run through the project's
//! grouped expert kernel ([`crate::model::ops::grouped_ffn`]) with zero biases.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use std::collections::BTreeMap;

use anyhow::Result;

use super::checkpoint::Checkpoint;
use super::config::HfConfig;
use super::linear::{host_linear, linear_weight, matmul3};
use crate::model::ops::grouped_ffn;
use crate::routing::RoutePlan;
use crate::routing::options::argmax;
use crate::store::{HostTensor, host_f32};

/// Which tokens share an expert's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// Each sequence of the batch (transformers' forward: capacity per sequence).
    PerSequence,
    /// Each token alone: what transformers' cached decoder does, one new token per step, so a
    /// generated token is never dropped. Used to decode without a cache and get the same
    /// tokens.
    PerToken,
}

/// The routing of one sparse layer.
#[derive(Debug, Clone)]
pub struct Routes {
    /// Experts, drops and per-expert counts of every token (batch-major).
    pub plan: RoutePlan,
    /// The router probability of each token's expert.
    pub prob: Vec<f32>,
    /// Tokens per sequence (the plan covers `batch * seq` tokens).
    pub seq: usize,
}

/// Router and experts of one sparse block.
#[derive(Debug, Clone)]
pub struct SparseMlp {
    router: Tensor<2>,
    router_bias: Option<Tensor<1>>,
    /// `[E, d_model, d_ff]`.
    wi: Tensor<3>,
    /// `[E, d_ff, d_model]`.
    wo: Tensor<3>,
    capacity: usize,
}

impl SparseMlp {
    pub(super) fn load(
        ck: &mut Checkpoint,
        p: &str,
        c: &HfConfig,
        device: &Device,
    ) -> Result<Self> {
        let (d, f, n) = (c.d_model, c.d_ff, c.num_experts);
        let router = linear_weight(
            &ck.take(&format!("{p}.router.classifier.weight"), &[n, d])?,
            device,
        );
        let router_bias = if c.router_bias {
            let t = ck.take(&format!("{p}.router.classifier.bias"), &[n])?;
            Some(Tensor::from_data(TensorData::new(t.to_f32(), [n]), device))
        } else {
            None
        };
        let mut wi = Vec::with_capacity(n * d * f);
        let mut wo = Vec::with_capacity(n * d * f);
        for e in 0..n {
            let x = ck.take(&format!("{p}.experts.expert_{e}.wi.weight"), &[f, d])?;
            wi.extend(x.transposed().to_f32());
            let x = ck.take(&format!("{p}.experts.expert_{e}.wo.weight"), &[d, f])?;
            wo.extend(x.transposed().to_f32());
        }
        Ok(Self {
            router,
            router_bias,
            wi: Tensor::from_data(TensorData::new(wi, [n, d, f]), device),
            wo: Tensor::from_data(TensorData::new(wo, [n, f, d]), device),
            capacity: c.expert_capacity,
        })
    }

    /// The weights by transformers' names under `p` (`...layer.1.mlp`).
    pub(super) fn tensors(&self, p: &str, out: &mut BTreeMap<String, HostTensor>) {
        out.insert(
            format!("{p}.router.classifier.weight"),
            host_linear(&self.router),
        );
        if let Some(b) = &self.router_bias {
            let n = b.dims()[0];
            out.insert(
                format!("{p}.router.classifier.bias"),
                HostTensor::f32(vec![n], host_f32(b.clone())),
            );
        }
        let [n, d, f] = self.wi.dims();
        for e in 0..n {
            let wi = self
                .wi
                .clone()
                .slice([e..e + 1, 0..d, 0..f])
                .reshape([d, f]);
            let wo = self
                .wo
                .clone()
                .slice([e..e + 1, 0..f, 0..d])
                .reshape([f, d]);
            out.insert(
                format!("{p}.experts.expert_{e}.wi.weight"),
                host_linear(&wi),
            );
            out.insert(
                format!("{p}.experts.expert_{e}.wo.weight"),
                host_linear(&wo),
            );
        }
    }

    /// Experts.
    pub fn n_experts(&self) -> usize {
        self.wi.dims()[0]
    }

    /// `x` `[b, s, d]` (normed) -> the layer's output `[b, s, d]` and its routing.
    pub fn forward(&self, x: Tensor<3>, grouping: Grouping) -> (Tensor<3>, Routes) {
        let [b, s, d] = x.dims();
        let n = self.n_experts();
        let device = x.device();
        let mut logits = matmul3(x.clone(), &self.router);
        if let Some(bias) = &self.router_bias {
            logits = logits + bias.clone().reshape([1, 1, n]);
        }
        let probs = host_f32(softmax(logits, 2));
        let routes: Vec<usize> = probs.chunks_exact(n).map(argmax).collect();
        let prob: Vec<f32> = routes
            .iter()
            .enumerate()
            .map(|(t, &e)| probs[t * n + e])
            .collect();
        let group = match grouping {
            Grouping::PerSequence => s,
            Grouping::PerToken => 1,
        };
        // First come, first served within each group, by position.
        let mut dropped = vec![false; routes.len()];
        for (g, chunk) in routes.chunks(group).enumerate() {
            let mut taken = vec![0usize; n];
            for (i, &e) in chunk.iter().enumerate() {
                taken[e] += 1;
                dropped[g * group + i] = taken[e] > self.capacity;
            }
        }
        let plan = RoutePlan::from_decisions(routes, dropped, n, 1, self.capacity);

        // Kept tokens grouped by expert, in position order within each.
        let mut rows: Vec<i64> = Vec::new();
        let mut offsets = vec![0usize];
        for e in 0..n {
            for (t, &r) in plan.routes.iter().enumerate() {
                if r == e && !plan.dropped[t] {
                    rows.push(t as i64);
                }
            }
            offsets.push(rows.len());
        }
        let flat = x.reshape([b * s, d]);
        let out = Tensor::<2>::zeros([b * s, d], &device);
        let out = if rows.is_empty() {
            out
        } else {
            let m = rows.len();
            let scale: Vec<f32> = rows.iter().map(|&t| prob[t as usize]).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [m]), &device);
            let f = self.wi.dims()[2];
            let y = grouped_ffn(
                flat.select(0, idx.clone()),
                &offsets,
                self.wi.clone(),
                Tensor::zeros([n, f], &device),
                self.wo.clone(),
                Tensor::zeros([n, d], &device),
            );
            let y = y * Tensor::<2>::from_data(TensorData::new(scale, [m, 1]), &device);
            out.select_assign(0, idx, y, IndexingUpdateOp::Add)
        };
        (out.reshape([b, s, d]), Routes { plan, prob, seq: s })
    }
}
