//! Data parallelism of fine-tuning: an update's micro-batches split over workers, which are
//! this process's replicas (threads sharing the weights, `replicas`) times the ranks of an MPI
//! job (`switch finetune --distributed`). The workers split the accumulation, so the update is
//! the one a single worker computes:
//!
//! ```text
//! seeds s_0..s_n     drawn in order from the run's generator (n = grad_accum micro-batches)
//! worker w of W      micro-batches w*n/W .. (w+1)*n/W, each with the dropout and jitter of
//!                    its own seed                      (W = ranks x replicas, n % W == 0)
//! g_w                = sum over its micro-batches j of d(loss_j / n) / d(params)
//! g                  = sum_w g_w: replicas added in order on this process, then Allreduce
//!                      over the ranks; every rank takes the same AdamW step with it
//! ```
//! With one micro-batch per worker the sums add in the same order as one worker's loop, so
//! the weights are the same bit for bit (the tests hold them to it). A replica is the model's
//! parameters as new autodiff leaves over the same storage: no copy of the weights, one
//! gradient set per replica.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};

use super::{Gradients, LayerLoad, UpdateStats};
use crate::distributed::Collective;
use crate::hf::model::HfSwitchTransformer;
use crate::hf::training::ParamMut;
use crate::store::host_f32;

/// Where an update's micro-batches are computed.
pub struct Workers {
    /// Replicas in this process (threads sharing the weights).
    pub replicas: usize,
    /// One thread pool per replica (empty with one replica), splitting the global pool's
    /// threads between them.
    pools: Vec<rayon::ThreadPool>,
    /// The ranks of the job this process is one of.
    pub world: Option<Arc<dyn Collective>>,
}

impl Workers {
    /// `replicas` threads in this process on `device` (the CPU when more than one), times the
    /// ranks of `world`.
    pub fn new(
        replicas: usize,
        world: Option<Arc<dyn Collective>>,
        device: &Device,
    ) -> Result<Self> {
        if replicas == 0 {
            bail!("replicas must be at least 1");
        }
        if replicas > 1 && !crate::device::Paths::of(device).host_kernels {
            bail!(
                "replicas = {replicas} runs replicas as threads on the CPU; on a GPU run one \
                 process per device instead (mpirun -np N switch finetune --distributed)"
            );
        }
        let pools = if replicas > 1 {
            crate::cpu::replica_pools(replicas, device)?
        } else {
            vec![]
        };
        Ok(Self {
            replicas,
            pools,
            world,
        })
    }

    /// Workers in all: replicas times ranks.
    pub fn count(&self) -> usize {
        self.replicas * self.world.as_ref().map_or(1, |w| w.size())
    }

    /// This process's micro-batches of an update of `n`: a range of `0..n`.
    pub fn share(&self, n: usize) -> Result<std::ops::Range<usize>> {
        let workers = self.count();
        if !n.is_multiple_of(workers) {
            bail!(
                "grad_accum = {n} micro-batches cannot be split over {workers} workers ({} \
                 replicas x {} ranks): every worker takes grad_accum / workers of them; set \
                 grad_accum to a multiple of {workers}",
                self.replicas,
                workers / self.replicas
            );
        }
        let per_process = n / workers * self.replicas;
        let rank = self.world.as_ref().map_or(0, |w| w.rank());
        Ok(rank * per_process..(rank + 1) * per_process)
    }

    /// `f(replica, k)` for each replica `k` of `model` (the model itself first, then
    /// replicas sharing its weights), each on its own thread pool; the results in order.
    pub fn on_replicas<R: Send>(
        &self,
        model: &mut HfSwitchTransformer,
        f: impl Fn(&mut HfSwitchTransformer, usize) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        if self.replicas == 1 {
            return Ok(vec![f(model, 0)?]);
        }
        let mut others = (1..self.replicas)
            .map(|_| replica(model))
            .collect::<Result<Vec<_>>>()?;
        let f = &f;
        std::thread::scope(|scope| {
            let first = &mut *model;
            let running: Vec<_> = std::iter::once(first)
                .chain(others.iter_mut())
                .zip(&self.pools)
                .enumerate()
                .map(|(k, (m, pool))| scope.spawn(move || pool.install(|| f(m, k))))
                .collect();
            running
                .into_iter()
                .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }
}

/// A replica of `model`: its parameters as new autodiff leaves over the same storage.
fn replica(model: &HfSwitchTransformer) -> Result<HfSwitchTransformer> {
    let mut m = model.clone();
    m.visit_params(&mut |_, p| {
        match p {
            ParamMut::Vector(t) => *t = t.clone().inner().autodiff().require_grad(),
            ParamMut::Matrix { tensor, .. } => {
                *tensor = tensor.clone().inner().autodiff().require_grad()
            }
        }
        Ok(())
    })?;
    Ok(m)
}

impl UpdateStats {
    /// The summed parts as numbers, to add over the ranks.
    fn to_values(&self) -> Vec<f64> {
        let mut v = vec![
            self.loss,
            self.cross_entropy,
            self.z[0],
            self.z[1],
            self.aux[0],
            self.aux[1],
            self.dropped,
            self.tokens as f64,
        ];
        for l in &self.layers {
            v.push(l.dropped);
            v.extend(&l.expert_frac);
        }
        v
    }

    /// Reads back what [`Self::to_values`] wrote.
    fn set_values(&mut self, v: &[f64]) {
        [
            self.loss,
            self.cross_entropy,
            self.z[0],
            self.z[1],
            self.aux[0],
            self.aux[1],
            self.dropped,
        ] = [v[0], v[1], v[2], v[3], v[4], v[5], v[6]];
        self.tokens = v[7].round() as usize;
        let mut i = 8;
        for LayerLoad {
            dropped,
            expert_frac,
            ..
        } in &mut self.layers
        {
            let e = expert_frac.len();
            *dropped = v[i];
            expert_frac.copy_from_slice(&v[i + 1..i + 1 + e]);
            i += 1 + e;
        }
    }
}

impl Gradients {
    /// The sum over the ranks of `world`: statistics, then each parameter that has a gradient
    /// on any rank (zeros where a rank has none; one that none has stays without, as in a
    /// single process), on `device`.
    pub(crate) fn all_reduce(&mut self, world: &dyn Collective, device: &Device) -> Result<()> {
        let mut values = self.stats.to_values();
        let stats_len = values.len();
        values.extend(
            self.grads
                .iter()
                .map(|g| if g.grad.is_some() { 1.0 } else { 0.0 }),
        );
        world.all_reduce_sum_f64("fine-tuning statistics", &mut values)?;
        self.stats.set_values(&values[..stats_len]);
        for (g, &anywhere) in self.grads.iter_mut().zip(&values[stats_len..]) {
            if anywhere == 0.0 {
                continue;
            }
            let mut host = match g.grad.take() {
                Some(t) => host_f32(t),
                None => vec![0.0; g.len],
            };
            world
                .all_reduce_sum("gradients", &mut host)
                .with_context(|| format!("summing the gradient of {}", g.name))?;
            let n = host.len();
            g.grad = Some(Tensor::from_data(TensorData::new(host, [n]), device));
        }
        Ok(())
    }
}
