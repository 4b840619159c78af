//! Fine-tuning fixtures recorded with transformers 5.24.0 (`tools/hf_finetune_fixtures.py`)
//! replayed: the loss and its parts on the first micro-batch, every gradient of the first
//! update, and every weight after 3 updates, each a row of the project's parity [`Report`]
//! (the largest error relative to the recorded tensor's largest magnitude).
//!
//! Tolerances: loss parts 1e-5, gradients and weights 1e-4 (f32 arithmetic in a different
//! order than PyTorch's).

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;

use super::data::Batch;
use super::{Finetuner, Optimisation, batch_loss};
use crate::hf::model::HfSwitchTransformer;
use crate::hf::training::Training;
use crate::interop::parity::{FixtureKind, Report};
use crate::model::precision::Precision;
use crate::optim::{AdamWConfig, LinearSchedule};
use crate::routing::RoutingRng;
use crate::store::TensorFile;

/// Tolerance of the loss and its parts.
pub const LOSS_TOL: f64 = 1e-5;
/// Tolerance of the gradients and the weights after training.
pub const TENSOR_TOL: f64 = 1e-4;

fn meta_f64(meta: &serde_json::Value, k: &str) -> Result<f64> {
    meta.get(k)
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("fixture metadata has no number `{k}`"))
}

/// The micro-batches `mb0.*`, `mb1.*`, ... of `expected`.
pub fn micro_batches(expected: &TensorFile) -> Result<Vec<Batch>> {
    let mut out = Vec::new();
    while expected.contains(&format!("mb{}.input_ids", out.len())) {
        let k = out.len();
        let get = |n: &str| expected.get(&format!("mb{k}.{n}"));
        let (ids, labels) = (get("input_ids")?, get("labels")?);
        let [b, src] = <[usize; 2]>::try_from(ids.shape.as_slice())
            .map_err(|_| anyhow::anyhow!("mb{k}.input_ids is not [b, s]"))?;
        out.push(Batch {
            b,
            src,
            tgt: labels.shape[1],
            input_ids: ids.to_i64(),
            mask: get("attention_mask")?.to_i64(),
            labels: labels.to_i64(),
            decoder_input_ids: get("decoder_input_ids")?.to_i64(),
        });
    }
    if out.is_empty() {
        bail!("no micro-batch (mb0.input_ids) in the fixture");
    }
    Ok(out)
}

/// Replays the fixture in `dir` (its model) against `expected` (its recorded tensors) on
/// `device`.
pub fn replay(dir: &Path, expected: &TensorFile, device: &Device) -> Result<Report> {
    let meta = expected.meta_json()?;
    let model = HfSwitchTransformer::load(dir, device)?;
    let batches = micro_batches(expected)?;
    let opt = Optimisation {
        learning_rate: meta_f64(&meta, "learning_rate")?,
        adamw: AdamWConfig {
            weight_decay: meta_f64(&meta, "weight_decay")?,
            ..Default::default()
        },
        schedule: LinearSchedule {
            warmup: meta_f64(&meta, "warmup_steps")? as u64,
            total: meta_f64(&meta, "total_steps")? as u64,
        },
        max_grad_norm: meta_f64(&meta, "max_grad_norm")?,
        dropout: 0.0,
        jitter: 0.0,
        precision: Precision::F32,
    };
    let mut ft = Finetuner::new(model, device, opt, 0)?;
    let mut report = Report {
        kind: FixtureKind::HuggingFace,
        rows: Vec::new(),
    };

    let mut train = Training::new(0.0, 0.0, RoutingRng::seed_from_u64(0));
    let (loss, ..) = batch_loss(&ft.model, &batches[0], Some(&mut train))?;
    let scalar = |t: &burn::tensor::Tensor<1>| t.clone().into_scalar::<f32>();
    for (name, t) in [
        ("loss", &loss.total),
        ("cross_entropy", &loss.cross_entropy),
        ("encoder_z_loss", &loss.z[0]),
        ("encoder_aux_loss", &loss.aux[0]),
        ("decoder_z_loss", &loss.z[1]),
        ("decoder_aux_loss", &loss.aux[1]),
    ] {
        report.compare(name, &[scalar(t)], expected.get(name)?, LOSS_TOL);
    }
    // Their graph holds the parameters: let go of it before they are updated (in place).
    drop((loss, train));

    let grads = ft.gradients(&batches)?;
    let recorded = expected.with_prefix("grad.");
    for g in &grads.grads {
        let key = format!("grad.{}", g.name);
        match (g.pytorch_layout(), recorded.get(&g.name)) {
            (Some(ours), Some(t)) => report.compare(&key, &ours, t, TENSOR_TOL),
            (None, None) => {}
            (Some(_), None) => report.check(&key, false, "transformers has no gradient".into()),
            (None, Some(_)) => report.check(&key, false, "no gradient reached it here".into()),
        }
    }
    for name in recorded.keys() {
        if !grads.grads.iter().any(|g| &g.name == name) {
            report.check(
                &format!("grad.{name}"),
                false,
                "not a parameter here".into(),
            );
        }
    }
    if grads.grads.len() != expected.with_prefix("after.").len() {
        bail!(
            "{} parameters here, {} in the fixture",
            grads.grads.len(),
            expected.with_prefix("after.").len()
        );
    }

    let losses = expected.get("losses")?;
    let mut ours = Vec::new();
    for _ in 0..losses.numel() {
        ours.push(ft.update(&batches)?.loss as f32);
    }
    report.compare("losses", &ours, losses, LOSS_TOL);
    let weights = ft.model.tensors()?;
    for (name, t) in expected.with_prefix("after.") {
        let w = weights
            .get(&name)
            .with_context(|| format!("the model has no `{name}`"))?;
        report.compare(&format!("after.{name}"), &w.to_f32(), &t, TENSOR_TOL);
    }
    Ok(report)
}
