//! Replay of the whole-model fixture: every layer's activations, the losses and every gradient.

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use serde_json::Value;

use super::*;
use crate::interop::weights::{Source, model_from_state_dict, model_state_dict};
use crate::model::ModelConfig;
use crate::model::loss::Losses;
use crate::model::switch::{HostStats, SwitchStats};
use crate::model::{SwitchTransformer, Trace};
use crate::optim::ParamGrads;
use crate::routing::RoutingRng;
use crate::store::{HostTensor, TensorFile, host_f32};

fn model_config(meta: &Value) -> Result<ModelConfig> {
    Ok(ModelConfig {
        n_vocab: meta_usize(meta, "n_vocab")?,
        d_model: meta_usize(meta, "d_model")?,
        heads: meta_usize(meta, "heads")?,
        d_ff: meta_usize(meta, "d_ff")?,
        n_layers: meta_usize(meta, "n_layers")?,
        n_experts: meta_usize(meta, "n_experts")?,
        capacity_factor: meta_f64(meta, "capacity_factor")?,
        drop_tokens: meta_bool(meta, "drop_tokens")?,
        is_scale_prob: meta_bool(meta, "is_scale_prob")?,
        ..Default::default()
    })
}

/// `[seq, batch]` ids from the fixture as a batch-major `[batch, seq]` tensor.
fn ids_batch_major(t: &HostTensor, device: &Device) -> Result<Tensor<2, burn::tensor::Int>> {
    let [s, b] = <[usize; 2]>::try_from(t.shape.as_slice())
        .map_err(|_| anyhow::anyhow!("token ids must be [seq, batch], got {:?}", t.shape))?;
    let v = t.to_i64();
    let mut out = vec![0i64; s * b];
    for si in 0..s {
        for bi in 0..b {
            out[bi * s + si] = v[si * b + bi];
        }
    }
    Ok(Tensor::from_data(TensorData::new(out, [b, s]), device))
}

pub(super) fn model(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
    let meta = file.meta_json()?;
    let c = model_config(&meta)?;
    if c.drop_tokens {
        bail!(
            "this model fixture drops tokens: which tokens drop is random, so its outputs \
             cannot be compared exactly (record it with drop_tokens=false)"
        );
    }
    let lb_coef = meta_f64(&meta, "lb_coef").unwrap_or(0.01);
    let m: SwitchTransformer = model_from_state_dict(&c, &file.with_prefix("param."), device)?;
    let ids = ids_batch_major(file.get("input_ids")?, device)?;
    let targets = ids_batch_major(file.get("target_ids")?, device)?;
    let [b, s] = ids.dims();
    let mut trace = Trace::new();
    let out = m.forward_traced(ids, &mut RoutingRng::seed_from_u64(0), Some(&mut trace));

    let seq_major = |t: &HostTensor| to_seq_major(&t.to_f32(), b, s);
    report.compare(
        "logits",
        &to_seq_major(&host_f32(out.logits.clone()), b, s),
        file.get("logits")?,
        FORWARD_TOL,
    );
    for (name, ours) in &trace {
        let key = format!("act.{name}");
        if file.contains(&key) {
            report.compare(&key, &seq_major(ours), file.get(&key)?, FORWARD_TOL);
        }
    }
    let stats: Vec<HostStats> = out.stats.iter().map(SwitchStats::host).collect();
    for (l, st) in stats.iter().enumerate() {
        let key = format!("act.layers.{l}.routes");
        if file.contains(&key) {
            report.exact(
                &key,
                &to_seq_major_idx(&st.routes, b, s),
                &file.get(&key)?.to_i64(),
            );
        }
    }
    let cat = |f: &dyn Fn(usize) -> Vec<f32>| -> Vec<f32> { (0..c.n_layers).flat_map(f).collect() };
    let (stats, sums) = (&stats, &out.stats);
    report.compare(
        "counts",
        &cat(&|l| stats[l].counts.clone()),
        file.get("counts")?,
        FORWARD_TOL,
    );
    report.compare(
        "route_prob_sum",
        &cat(&|l| host_f32(sums[l].route_prob_sum.clone())),
        file.get("route_prob_sum")?,
        FORWARD_TOL,
    );
    report.compare(
        "route_prob_max",
        &cat(&|l| to_seq_major(&stats[l].route_prob_max, b, s)),
        file.get("route_prob_max")?,
        FORWARD_TOL,
    );
    let tokens = (b * s) as f32;
    report.compare(
        "route_frac",
        &cat(&|l| stats[l].counts.iter().map(|c| c / tokens).collect()),
        file.get("route_frac")?,
        FORWARD_TOL,
    );
    report.compare(
        "route_prob_mean",
        &cat(&|l| {
            host_f32(sums[l].route_prob_sum.clone())
                .iter()
                .map(|p| p / tokens)
                .collect()
        }),
        file.get("route_prob_mean")?,
        FORWARD_TOL,
    );
    let dropped: Vec<i64> = stats.iter().map(|st| st.n_dropped as i64).collect();
    report.exact("n_dropped", &dropped, &file.get("n_dropped")?.to_i64());

    let losses = Losses::new(
        out.logits,
        targets,
        &out.stats,
        lb_coef,
        0.0,
        Default::default(),
    );
    report.compare(
        "ce_loss",
        &host_f32(losses.ce.clone()),
        file.get("ce_loss")?,
        FORWARD_TOL,
    );
    report.compare(
        "lb_loss",
        &host_f32(losses.lb.clone()),
        file.get("lb_loss")?,
        FORWARD_TOL,
    );
    report.compare(
        "total_loss",
        &host_f32(losses.total.clone()),
        file.get("total_loss")?,
        FORWARD_TOL,
    );
    let grads = losses.total.backward();
    compare_grads(
        report,
        &model_state_dict(&m, Source::Grads(&grads)),
        file,
        "grad.",
    );
    let norm = ParamGrads::from_gradients(&m, grads).global_norm();
    report.compare(
        "grad_total_norm",
        &[norm as f32],
        file.get("grad_total_norm")?,
        GRAD_TOL,
    );
    Ok(())
}
