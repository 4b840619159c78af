//! Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
//! from Dense Checkpoints"): a dense run's latest checkpoint becomes a Switch run that
//! `switch train --resume` continues from the same step.
//!
//! ```text
//! every Switch layer's expert e     = a copy of that block's dense FFN (weights and Adam moments)
//! router, shared experts, biases    = freshly drawn as the new configuration initialises them
//! everything else                   = the dense model's (weights and Adam moments)
//! step, data position, generator    = the dense run's: the schedule and the data continue
//! ```
//! The upcycled layers gate with `p / stop_gradient(p)` (`model.is_scale_prob = false`) unless
//! told otherwise, so that the new model computes the dense model's function at the start (all
//! experts equal, gate 1; with dropping off, exactly), and the router learns from there. With
//! labml's gate `p` every FFN output would start scaled by its token's router probability.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use super::checkpoint::{self, TrainState};
use super::config::RunConfig;
use super::run_dir::RunDir;
use crate::interop::init::initial_state_dict;
use crate::interop::names;
use crate::interop::weights::{Source, model_from_state_dict, model_state_dict};
use crate::model::params;
use crate::optim::LabmlAdam;
use crate::store::{HostTensor, TensorFile};
use crate::util::write_atomic;

/// What [`upcycle`] made.
#[derive(Debug, Clone)]
pub struct Upcycled {
    /// The step the new run continues from.
    pub step: u64,
    /// Parameters before and after.
    pub params: (usize, usize),
    /// The state dict tensors drawn fresh (routers, shared experts, biases).
    pub fresh: Vec<String>,
}

/// The Switch configuration of `dense` with `n_experts` experts in every `every`-th block,
/// `overrides` (`model.key=value`) applied last.
pub fn switch_config(
    dense: &RunConfig,
    n_experts: usize,
    every: usize,
    overrides: &[String],
) -> Result<RunConfig> {
    if dense.model.switch_every != 0 {
        bail!(
            "the run is not dense (model.switch_every = {}): upcycling starts from a dense \
             model, such as `switch compare`'s dense baseline or a run with \
             model.switch_every = 0",
            dense.model.switch_every
        );
    }
    if n_experts < 2 || every == 0 {
        bail!("--experts must be at least 2 and --every at least 1");
    }
    let mut c = dense.clone();
    c.model.n_experts = n_experts;
    c.model.switch_every = every;
    c.model.is_scale_prob = false;
    for o in overrides {
        if !o.trim_start().starts_with("model.") {
            bail!("--set {o}: upcycling sets model.* keys only (train.* with train --resume)");
        }
        c.set(o)?;
    }
    if c.model.expert_width() != c.model.d_ff {
        bail!(
            "model.expert_d_ff = {}: an upcycled expert is a copy of the dense FFN, of width \
             model.d_ff = {}",
            c.model.expert_d_ff,
            c.model.d_ff
        );
    }
    c.validate()?;
    Ok(c)
}

/// Upcycles the dense run in `dense_dir` (its latest checkpoint) into a new run in `out`
/// (which must not exist), with `config` from [`switch_config`]; `seed` draws the fresh
/// tensors.
pub fn upcycle(
    dense_dir: &Path,
    out: &Path,
    config: &RunConfig,
    seed: u64,
    device: &Device,
) -> Result<Upcycled> {
    let dense_run = RunDir::new(dense_dir);
    let dense = dense_run.read_config()?;
    let latest = dense_run.latest_checkpoint().with_context(|| {
        format!("{dense_run} has no checkpoint yet: train it until it writes one")
    })?;
    if out.exists() {
        bail!(
            "{} exists: upcycling writes a new run (choose another --name)",
            out.display()
        );
    }
    let t = &dense.train;
    let loaded = checkpoint::load(
        &latest,
        &dense.model,
        LabmlAdam::new(t.beta1, t.beta2, t.eps),
        &device.clone().autodiff(),
    )?;
    let step = loaded.state.step;

    // Weights: the new model's initialisation, with every tensor the dense model has (same
    // name) and each expert a copy of its block's dense FFN.
    let old = model_state_dict(&loaded.model, Source::Values);
    let mut sd = initial_state_dict(&config.model, seed);
    let mut fresh = Vec::new();
    for (name, t) in sd.iter_mut() {
        let from = dense_name(name).unwrap_or_else(|| name.clone());
        match old.get(&from) {
            Some(o) if o.shape == t.shape => *t = o.clone(),
            Some(o) => bail!(
                "{name} has shape {:?} but the dense model's {from} has {:?}",
                t.shape,
                o.shape
            ),
            None => fresh.push(name.clone()),
        }
    }
    let model = model_from_state_dict(&config.model, &sd, &device.clone().autodiff())?;

    // Adam moments the same way, by parameter path: experts tile their block's dense FFN's
    // (stacked expert-major, the same layout per expert), fresh tensors start at 0.
    let old_opt = TensorFile::read(&latest.join("optimizer.safetensors"))?;
    let mut moments = std::collections::BTreeMap::new();
    for p in params::trainable(&model) {
        for which in ["m", "v"] {
            let value = match expert_moment_source(&p.path) {
                Some(dense_path) => {
                    let d = old_opt.get(&format!("{which}.{dense_path}"))?.to_f32();
                    d.repeat(p.len() / d.len().max(1))
                }
                None => match old_opt.tensors.get(&format!("{which}.{}", p.path)) {
                    Some(t) => t.to_f32(),
                    None => vec![0.0; p.len()],
                },
            };
            if value.len() != p.len() {
                bail!(
                    "the optimizer state of {} has {} values for {} parameters",
                    p.path,
                    value.len(),
                    p.len()
                );
            }
            moments.insert(
                format!("{which}.{}", p.path),
                HostTensor::f32(vec![p.len()], value),
            );
        }
    }
    let mut adam = LabmlAdam::new(t.beta1, t.beta2, t.eps);
    adam.load_state_tensors(step, &moments)?;
    adam.check_matches(&model)?;

    // The new run: configuration, vocabulary, data record, the dense run's metrics up to the
    // step (the report shows one curve), and the checkpoint.
    let run = RunDir::new(out);
    run.create(config, &dense_run.read_vocab()?)?;
    let record = dense_run.data_record_path();
    if record.exists() {
        std::fs::copy(&record, run.data_record_path())
            .with_context(|| format!("cannot copy {}", record.display()))?;
    }
    let metrics = std::fs::read_to_string(dense_run.metrics_path()).unwrap_or_default();
    write_atomic(&run.metrics_path(), metrics.as_bytes())?;
    run.truncate_metrics(step)?;
    let state = TrainState {
        best_valid_loss: None,
        valid_loss: None,
        ..loaded.state
    };
    checkpoint::save(
        &checkpoint::step_dir(&run.checkpoints(), step),
        &model,
        &config.model,
        &adam,
        &state,
    )?;
    Ok(Upcycled {
        step,
        params: (dense.model.num_params(), config.model.num_params()),
        fresh,
    })
}

/// The dense model's state dict name for an expert tensor
/// (`transformer.layers.3.feed_forward.experts.2.layer1.weight` ->
/// `transformer.layers.3.feed_forward.layer1.weight`); `None` for other names.
fn dense_name(name: &str) -> Option<String> {
    let marker = format!(".{}.{}.", names::FEED_FORWARD, names::EXPERTS);
    let (block, rest) = name.split_once(&marker)?;
    let (_expert, tensor) = rest.split_once('.')?;
    Some(format!("{block}.{}.{tensor}", names::FEED_FORWARD))
}

/// For an expert parameter path (`layers.3.feed_forward.Switch.experts.w1`), the dense FFN
/// parameter whose moments each expert starts with (`layers.3.feed_forward.Dense.layer1.weight`).
fn expert_moment_source(path: &str) -> Option<String> {
    let (block, tensor) = path.split_once(".feed_forward.Switch.experts.")?;
    let dense = match tensor {
        "w1" => "layer1.weight",
        "b1" => "layer1.bias",
        "w2" => "layer2.weight",
        "b2" => "layer2.bias",
        _ => return None,
    };
    Some(format!("{block}.feed_forward.Dense.{dense}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_names_map_to_the_dense_ffn() {
        assert_eq!(
            dense_name("transformer.layers.3.feed_forward.experts.12.layer1.weight").as_deref(),
            Some("transformer.layers.3.feed_forward.layer1.weight")
        );
        assert_eq!(
            dense_name("transformer.layers.3.feed_forward.switch.weight"),
            None
        );
        assert_eq!(
            expert_moment_source("layers.0.feed_forward.Switch.experts.b2"),
            Some("layers.0.feed_forward.Dense.layer2.bias".to_string())
        );
        assert_eq!(
            expert_moment_source("layers.0.feed_forward.Switch.router.switch.weight"),
            None
        );
    }
}
