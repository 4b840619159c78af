//! Checkpoints: `model.safetensors` (a PyTorch-loadable state dict), `optimizer.safetensors`
//! (Adam moments) and `state.json` (step, data position, random-generator state).
//!
//! A checkpoint directory is written under a temporary name and renamed when complete, so a
//! crash never leaves a half-written checkpoint where a good one was.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::data::LoaderState;
use crate::interop::weights::{load_model, save_model};
use crate::model::ModelConfig;
use crate::model::SwitchTransformer;
use crate::optim::LabmlAdam;
use crate::routing::RoutingRng;
use crate::store::TensorFile;
use crate::util::write_atomic;

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Where the data loader stands.
    pub loader: LoaderState,
    /// The token-dropping generator, mid-stream.
    pub routing_rng: RoutingRng,
    /// Best validation loss seen so far.
    pub best_valid_loss: Option<f64>,
    /// Validation loss at this step, if validated.
    pub valid_loss: Option<f64>,
}

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// Writes a checkpoint to `dir` (replacing one there only once the new one is complete).
pub(crate) fn save(
    dir: &Path,
    model: &SwitchTransformer,
    config: &ModelConfig,
    adam: &LabmlAdam,
    state: &TrainState,
) -> Result<()> {
    let parent = dir.parent().context("checkpoint path has no parent")?;
    let name = dir.file_name().context("checkpoint path has no name")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{}.partial", name.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = (|| -> Result<()> {
        save_model(&tmp.join(MODEL), model, config)?;
        let mut opt = TensorFile::default();
        opt.tensors.extend(adam.state_tensors());
        opt.metadata.insert("step".into(), adam.step.to_string());
        opt.write(&tmp.join(OPTIMIZER))?;
        write_atomic(
            &tmp.join(STATE),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )
    })();
    if written.is_err() {
        // A failed write (a full disk, say) leaves nothing behind to keep the disk full.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    // Swap in: the old directory is removed only after the new one has its final name.
    let old = parent.join(format!(".{}.old", name.to_string_lossy()));
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    tracing::debug!("checkpoint written: {}", dir.display());
    Ok(())
}

/// Removes the checkpoint directory `dir` so that no partly deleted checkpoint ever keeps a
/// checkpoint's name: renamed out of the way first, then deleted.
pub(crate) fn remove(dir: &Path) -> Result<()> {
    let parent = dir.parent().context("checkpoint path has no parent")?;
    let name = dir.file_name().context("checkpoint path has no name")?;
    let doomed = parent.join(format!(".{}.deleting", name.to_string_lossy()));
    std::fs::rename(dir, &doomed)
        .and_then(|()| std::fs::remove_dir_all(&doomed))
        .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))
}

/// Finishes or undoes what an interrupted [`save`] or [`remove`] left in `parent`: leftover
/// `.NAME.partial` and `.NAME.deleting` directories are removed (and the `.NAME.partial-PID`
/// of `hf::checkpoint::write_dir_whole`), and a `.NAME.old` whose `NAME` is missing (a kill
/// between the two renames of a save) takes its name back.
pub(crate) fn tidy(parent: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(hidden) = name.strip_prefix('.') else {
            continue;
        };
        let path = e.path();
        if hidden.ends_with(".partial")
            || hidden.ends_with(".deleting")
            || (hidden.contains(".partial-") && path.is_dir())
        {
            tracing::debug!("removing the leftover {}", path.display());
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove the leftover {}", path.display()))?;
        } else if let Some(base) = hidden.strip_suffix(".old") {
            let target = parent.join(base);
            if target.exists() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::rename(&path, &target)
            }
            .with_context(|| format!("cannot restore {}", target.display()))?;
        }
    }
    Ok(())
}

/// A loaded checkpoint.
pub struct Loaded {
    /// The model.
    pub model: SwitchTransformer,
    /// Adam with its moments.
    pub adam: LabmlAdam,
    /// Step, data position, generator.
    pub state: TrainState,
}

/// Loads a checkpoint for model configuration `config`. The model lives on `device`, the
/// optimizer moments on its non-autodiff counterpart.
pub fn load(dir: &Path, config: &ModelConfig, adam: LabmlAdam, device: &Device) -> Result<Loaded> {
    let ctx = || format!("checkpoint {} is unusable", dir.display());
    let state: TrainState = serde_json::from_slice(
        &std::fs::read(dir.join(STATE)).with_context(|| format!("cannot read {STATE}"))?,
    )
    .with_context(|| format!("{STATE} is corrupt"))
    .with_context(ctx)?;
    let model = load_model(&dir.join(MODEL), config, device).with_context(ctx)?;
    check_stored_config(&dir.join(MODEL), config).with_context(ctx)?;
    let opt = TensorFile::read(&dir.join(OPTIMIZER)).with_context(ctx)?;
    let step: u64 = opt
        .metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .context("optimizer.safetensors has no step")
        .with_context(ctx)?;
    if step != state.step {
        bail!(
            "{}: optimizer step {step} differs from state step {}",
            ctx(),
            state.step
        );
    }
    let mut adam = adam;
    adam.load_state_tensors(step, &opt.tensors)
        .and_then(|()| adam.check_matches(&model))
        .with_context(ctx)?;
    Ok(Loaded { model, adam, state })
}

/// The model configuration stored in `model` (metadata `config`) must be `config`: a run's
/// `config.toml` edited or cut after the checkpoint was written is an error naming the keys.
fn check_stored_config(model: &Path, config: &ModelConfig) -> Result<()> {
    let file = TensorFile::read(model)?;
    let Some(stored) = file.metadata.get("config") else {
        return Ok(()); // written without it: nothing to compare
    };
    let stored: serde_json::Value = serde_json::from_str(stored).context("stored config")?;
    let differing = config_differences(&stored, config)?;
    if !differing.is_empty() {
        bail!(
            "the run's config.toml differs from the configuration the checkpoint was written \
             with: {}; restore config.toml",
            differing.join(", ")
        );
    }
    Ok(())
}

/// The keys whose value in `config` is not the one `stored` (a checkpoint's) holds, as
/// `model.key = now (the checkpoint has then)`. A key added since the checkpoint was written
/// ([`crate::train::config::KEYS_SINCE_V1`]) held its default then.
fn config_differences(stored: &serde_json::Value, config: &ModelConfig) -> Result<Vec<String>> {
    let current = serde_json::to_value(config)?;
    let (Some(stored), Some(current)) = (stored.as_object(), current.as_object()) else {
        bail!("the stored model configuration is not an object");
    };
    let defaults = serde_json::to_value(ModelConfig::default())?;
    let was = |k: &str| {
        stored.get(k).or_else(|| {
            let key = format!("model.{k}");
            let newer = crate::train::config::KEYS_SINCE_V1.contains(&key.as_str());
            newer.then(|| defaults.get(k)).flatten()
        })
    };
    Ok(current
        .iter()
        .filter_map(|(k, v)| {
            let was = was(k);
            (was != Some(v)).then(|| {
                let was = was.map_or("absent".into(), |s| s.to_string());
                format!("model.{k} = {v} (the checkpoint has {was})")
            })
        })
        .collect())
}

/// Name of the checkpoint directory for `step`.
pub(crate) fn step_dir(checkpoints: &Path, step: u64) -> PathBuf {
    checkpoints.join(format!("step-{step:07}"))
}

/// Complete checkpoints under `checkpoints`, oldest first.
pub fn list(checkpoints: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let step = path
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((step, path))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod config_tests {
    use super::*;

    /// A checkpoint written before `model.balance`, `model.bias_rate`, `model.expert_d_ff`,
    /// `model.balance_scope` and the shared experts' keys existed matches a configuration that holds their defaults, not one that changes them;
    /// an older key missing is still a difference.
    #[test]
    fn keys_newer_than_a_checkpoint_count_as_their_defaults() {
        let config = ModelConfig::default();
        let mut stored = serde_json::to_value(&config).unwrap();
        let object = stored.as_object_mut().unwrap();
        for k in [
            "balance",
            "bias_rate",
            "expert_d_ff",
            "balance_scope",
            "shared_experts",
            "shared_d_ff",
        ] {
            object.remove(k).unwrap();
        }
        assert!(config_differences(&stored, &config).unwrap().is_empty());
        let biased = ModelConfig {
            balance: crate::routing::Balance::Bias,
            ..config.clone()
        };
        let d = config_differences(&stored, &biased).unwrap();
        assert_eq!(d, [r#"model.balance = "bias" (the checkpoint has "aux")"#]);
        stored.as_object_mut().unwrap().remove("top_k").unwrap();
        let d = config_differences(&stored, &config).unwrap();
        assert_eq!(d, ["model.top_k = 1 (the checkpoint has absent)"]);
    }
}
