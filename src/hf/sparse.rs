//! The Switch FFN of Hugging Face's checkpoints (`SwitchTransformersSparseMLP`, transformers
//! 5.24.0):
//!
//! ```text
//! p      = softmax(x W_router [+ b])                  f32 (x cast to f32 when it is bf16)
//! e(t)   = argmax p(t)                                first on ties
//! kept   = the first `expert_capacity` tokens of each expert in each sequence, by position
//! y(t)   = p(t)[e(t)] * relu(x(t) wi_e) wo_e          if kept, else 0 (the residual carries it)
//! ```
//! In a training pass ([`Training`]) `x` is jittered first, the logits are recorded for the
//! router losses, dropout follows the relu, and `p(t)[e(t)]` is gathered from the softmax in
//! the graph, so that the router learns from the experts' outputs.
//! The decision is a [`RoutePlan`] (the project's). An expert's weights are read from the
//! checkpoint the first time a token is routed to it: experts no token reaches never take
//! memory (as under transformers' memory-mapped loading, where their pages are never read).

use std::sync::{Arc, OnceLock};

use anyhow::Result;
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::checkpoint::{Checkpoint, TensorSource};
use super::checkpoint::{Deferred, Weights};
use super::config::HfConfig;
use super::linear::{linear_weight, linear_weight_f32, matmul2, matmul3};
use super::training::{ParamMut, Training, Visit};
use crate::model::precision::{cast_to, f32};
use crate::routing::RoutePlan;
use crate::routing::options::argmax;
use crate::store::host_f32;

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
}

/// One expert's weights `wi` `[d_model, d_ff]` and `wo` `[d_ff, d_model]`, read on first use.
#[derive(Debug, Clone)]
pub struct Expert {
    wi: TensorSource,
    wo: TensorSource,
    loaded: Arc<OnceLock<(Tensor<2>, Tensor<2>)>>,
    device: Device,
}

impl Expert {
    /// The weights (read from the checkpoint at the first call).
    pub(crate) fn weights(&self) -> Result<&(Tensor<2>, Tensor<2>)> {
        if let Some(w) = self.loaded.get() {
            return Ok(w);
        }
        let w = (
            linear_weight(&self.wi.read()?, &self.device),
            linear_weight(&self.wo.read()?, &self.device),
        );
        Ok(self.loaded.get_or_init(|| w))
    }

    /// Whether the weights are in memory.
    pub fn is_loaded(&self) -> bool {
        self.loaded.get().is_some()
    }
}

/// Router and experts of one sparse block.
#[derive(Debug, Clone)]
pub struct SparseMlp {
    router: Tensor<2>,
    router_bias: Option<Tensor<1>>,
    /// The experts.
    pub experts: Vec<Expert>,
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
        let router = linear_weight_f32(
            &ck.take(&format!("{p}.router.classifier.weight"), &[n, d])?,
            device,
        );
        let router_bias = if c.router_bias {
            let t = ck.take(&format!("{p}.router.classifier.bias"), &[n])?;
            Some(Tensor::from_data(TensorData::new(t.to_f32(), [n]), device))
        } else {
            None
        };
        let experts = (0..n)
            .map(|e| {
                Ok(Expert {
                    wi: ck.take_source(&format!("{p}.experts.expert_{e}.wi.weight"), &[f, d])?,
                    wo: ck.take_source(&format!("{p}.experts.expert_{e}.wo.weight"), &[d, f])?,
                    loaded: Arc::new(OnceLock::new()),
                    device: device.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            router,
            router_bias,
            experts,
            capacity: c.expert_capacity,
        })
    }

    /// The weights by transformers' names under `p` (`...layer.1.mlp`); reads the experts not
    /// loaded yet.
    pub(super) fn tensors<'a>(&'a self, p: &str, out: &mut Weights<'a>) -> Result<()> {
        let router = Deferred::linear(&self.router);
        out.insert(format!("{p}.router.classifier.weight"), router);
        if let Some(b) = &self.router_bias {
            out.insert(format!("{p}.router.classifier.bias"), Deferred::tensor(b));
        }
        for (e, x) in self.experts.iter().enumerate() {
            let (wi, wo) = x.weights()?;
            out.insert(
                format!("{p}.experts.expert_{e}.wi.weight"),
                Deferred::linear(wi),
            );
            out.insert(
                format!("{p}.experts.expert_{e}.wo.weight"),
                Deferred::linear(wo),
            );
        }
        Ok(())
    }

    /// Visits the router and every expert's weights under `p` (`...layer.1.mlp`), reading
    /// the experts not loaded yet ([`HfSwitchTransformer::visit_params`]).
    ///
    /// [`HfSwitchTransformer::visit_params`]: super::HfSwitchTransformer::visit_params
    pub(super) fn visit(&mut self, p: &str, f: &mut Visit<'_>) -> Result<()> {
        f(
            &format!("{p}.router.classifier.weight"),
            ParamMut::Matrix {
                tensor: &mut self.router,
                linear: true,
            },
        )?;
        if let Some(b) = &mut self.router_bias {
            f(&format!("{p}.router.classifier.bias"), ParamMut::Vector(b))?;
        }
        for (e, x) in self.experts.iter_mut().enumerate() {
            x.weights()?;
            let (wi, wo) = Arc::make_mut(&mut x.loaded)
                .get_mut()
                .expect("weights were just loaded");
            for (n, w) in [("wi", wi), ("wo", wo)] {
                f(
                    &format!("{p}.experts.expert_{e}.{n}.weight"),
                    ParamMut::Matrix {
                        tensor: w,
                        linear: true,
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Experts.
    pub(crate) fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// `x` `[b, s, d]` (normed) -> the layer's output `[b, s, d]` and its routing; a
    /// training pass when `train` is given.
    pub(crate) fn forward(
        &self,
        x: Tensor<3>,
        grouping: Grouping,
        train: &mut Option<&mut Training>,
    ) -> Result<(Tensor<3>, Routes)> {
        let [b, s, d] = x.dims();
        let n = self.n_experts();
        let device = x.device();
        let x = match train.as_deref_mut() {
            Some(t) => t.jitter(x),
            None => x,
        };
        // The router in f32 whatever the activations' type (transformers' `router_dtype`).
        let dtype = x.dtype();
        let mut logits = matmul3(f32(x.clone()), &self.router);
        if let Some(bias) = &self.router_bias {
            logits = logits + bias.clone().reshape([1, 1, n]);
        }
        if let Some(t) = train.as_deref_mut() {
            t.router_logits.push(logits.clone());
        }
        let probs_t = softmax(logits, 2);
        let probs = host_f32(probs_t.clone());
        // In training the scale comes from the graph (the router's gradient), else from the
        // host copy.
        let probs_t = train.is_some().then(|| probs_t.reshape([b * s, n]));
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

        // Each expert on its kept tokens (the plan's slots: in position order), scaled by the
        // router probability; dropped tokens stay 0.
        let flat = x.reshape([b * s, d]);
        let mut rows: Vec<i64> = Vec::new();
        let mut parts = Vec::new();
        for ((e, expert), kept) in self.experts.iter().enumerate().zip(plan.kept_counts()) {
            if kept == 0 {
                continue;
            }
            let slots = &plan.slot_token[e * plan.slots..e * plan.slots + kept];
            let mine: Vec<i64> = slots.iter().map(|&t| t as i64).collect();
            let m = mine.len();
            let (wi, wo) = expert.weights()?;
            let idx = Tensor::<1, Int>::from_data(TensorData::new(mine.clone(), [m]), &device);
            let hidden = relu(matmul2(flat.clone().select(0, idx.clone()), wi));
            let h = match train.as_deref_mut() {
                Some(t) => matmul2(t.dropout(hidden), wo),
                None => matmul2(hidden, wo),
            };
            let scale = match &probs_t {
                Some(p) => p.clone().select(0, idx).slice([0..m, e..e + 1]),
                None => {
                    let scale: Vec<f32> = mine.iter().map(|&t| prob[t as usize]).collect();
                    Tensor::<2>::from_data(TensorData::new(scale, [m, 1]), &device)
                }
            };
            parts.push(h * cast_to(scale, dtype));
            rows.extend(mine);
        }
        let out = Tensor::<2>::zeros([b * s, d], (&device, dtype));
        let out = if rows.is_empty() {
            out
        } else {
            let m = rows.len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [m]), &device);
            out.select_assign(0, idx, Tensor::cat(parts, 0), IndexingUpdateOp::Add)
        };
        Ok((out.reshape([b, s, d]), Routes { plan, prob }))
    }
}
