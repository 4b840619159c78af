//! Replay of the optimizer fixture: Noam learning rates, clipping and Adam steps.

use anyhow::{Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use super::*;
use crate::optim::{LabmlAdam, Noam, ParamGrads, clip_coefficient};
use crate::store::{TensorFile, host_f32};

/// Parameters of the optimizer fixture, flattened (Adam is elementwise).
#[derive(Module, Debug)]
struct FlatParams {
    params: Vec<Param<Tensor<1>>>,
}

pub(super) fn optimizer(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
    let meta = file.meta_json()?;
    let noam = Noam {
        lr: meta_f64(&meta, "lr")?,
        warmup: meta_usize(&meta, "warmup")? as u64,
        d_model: meta_usize(&meta, "d_model")?,
    };
    let betas = meta
        .get("betas")
        .and_then(Value::as_array)
        .context("fixture metadata has no `betas`")?;
    let mut adam = LabmlAdam::new(
        betas[0].as_f64().context("betas[0]")?,
        betas[1].as_f64().context("betas[1]")?,
        meta_f64(&meta, "eps")?,
    );
    let n_steps = meta_usize(&meta, "n_steps")?;
    let max_norm = meta_f64(&meta, "max_norm")?;
    let names: Vec<String> = file
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".init").map(str::to_string))
        .collect();
    let mut module = FlatParams {
        params: names
            .iter()
            .map(|n| {
                let t = file.get(&format!("{n}.init"))?;
                Ok(Param::from_data(
                    TensorData::new(t.to_f32(), [t.numel()]),
                    device,
                ))
            })
            .collect::<Result<_>>()?,
    };
    for step in 1..=n_steps {
        let mut grads = ParamGrads::default();
        for (n, p) in names.iter().zip(&module.params) {
            let g = file.get(&format!("step{step}.raw_grad.{n}"))?;
            grads.insert(
                p.id,
                Tensor::from_data(TensorData::new(g.to_f32(), [g.numel()]), device),
            );
        }
        // Exactly what training composes (train::step): the norm, the clip coefficient, and
        // Adam on the unscaled gradients with that coefficient applied in its pass.
        let norm = grads.global_norm();
        let coef = clip_coefficient(norm, max_norm);
        report.compare(
            &format!("step{step}.total_norm"),
            &[norm as f32],
            file.get(&format!("step{step}.total_norm"))?,
            FORWARD_TOL,
        );
        for (n, p) in names.iter().zip(&module.params) {
            let key = format!("step{step}.clipped_grad.{n}");
            let g = host_f32(grads.get(&p.id).expect("inserted above").clone() * coef);
            report.compare(&key, &g, file.get(&key)?, FORWARD_TOL);
        }
        let lr = noam.lr(step as u64);
        let expected_lr = file.get(&format!("step{step}.lr"))?.to_f64()[0];
        let lr_err = (lr - expected_lr).abs();
        report.rows.push(Row {
            name: format!("step{step}.lr"),
            max_abs: lr_err,
            max_rel: lr_err / expected_lr.abs(),
            tol: 1e-12,
            pass: lr_err / expected_lr.abs() <= 1e-12,
            note: String::new(),
        });
        module = adam.step_scaled(module, &grads, lr, coef);
        for (n, p) in names.iter().zip(&module.params) {
            let key = format!("step{step}.{n}");
            report.compare(&key, &host_f32(p.val()), file.get(&key)?, FORWARD_TOL);
        }
    }
    Ok(())
}
