//! What a fine-tuning checkpoint holds besides the model, so that `switch finetune --resume`
//! continues the run exactly (the same weights, losses and metrics as a run never stopped):
//!
//! ```text
//! model-step-N/config.json, model.safetensors   the model, f32 (whatever save_dtype says)
//! model-step-N/optimizer.safetensors            AdamW's moments by parameter name
//!                                               (`exp_avg.NAME`, `exp_avg_sq.NAME`) and, in
//!                                               its metadata, each parameter's update count
//! model-step-N/state.json                       updates done, the dropout/jitter generator,
//!                                               the data order and where it stands
//! runs/NAME/run.json                            the model, training and validation files the
//!                                               run started from, the training file's sha256
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::data::{Batch, Dataset};
use crate::optim::AdamW;
use crate::optim::adamw::Moments;
use crate::routing::RoutingRng;
use crate::store::{HostTensor, TensorFile};

/// The order the training pairs are drawn in: shuffled once per pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sampler {
    /// Indices of the pairs, this pass's order.
    pub order: Vec<usize>,
    /// The next position in `order`.
    pub cursor: usize,
    /// Shuffles each new pass.
    pub rng: RoutingRng,
}

impl Sampler {
    /// The first pass over `n` pairs, shuffled by `rng`.
    pub fn new(n: usize, mut rng: RoutingRng) -> Self {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        Self {
            order,
            cursor: 0,
            rng,
        }
    }

    /// The next micro-batch of at most `size` pairs (a pass's last one may be shorter).
    pub fn next(&mut self, data: &Dataset, size: usize, pad: i64, start: i64) -> Batch {
        if self.cursor >= self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.cursor = 0;
        }
        let end = (self.cursor + size).min(self.order.len());
        let refs: Vec<_> = self.order[self.cursor..end]
            .iter()
            .map(|&i| &data.examples[i])
            .collect();
        self.cursor = end;
        Batch::new(&refs, pad, start)
    }
}

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeState {
    /// Updates done.
    pub updates: u64,
    /// The dropout and jitter generator, mid-stream.
    pub rng: RoutingRng,
    /// The data order.
    pub sampler: Sampler,
}

impl ResumeState {
    /// Reads `checkpoint/state.json`, which must say the update the folder is named after.
    pub fn read(checkpoint: &Path, updates: u64) -> Result<Self> {
        let path = checkpoint.join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let state: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", path.display()))?;
        if state.updates != updates {
            bail!(
                "{}: state.json says update {}",
                checkpoint.display(),
                state.updates
            );
        }
        Ok(state)
    }
}

/// `run.json`: what the run was started from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInputs {
    /// The model folder.
    pub model: PathBuf,
    /// Training pairs.
    pub train: PathBuf,
    /// Their sha256, so that a resumed run refuses a changed file.
    pub train_sha256: String,
    /// Validation pairs.
    pub valid: Option<PathBuf>,
}

impl RunInputs {
    /// The inputs of a new run (hashing the training file).
    pub fn new(model: &Path, train: &Path, valid: Option<&Path>) -> Result<Self> {
        Ok(Self {
            model: model.to_path_buf(),
            train: train.to_path_buf(),
            train_sha256: sha256_of(train)?,
            valid: valid.map(Path::to_path_buf),
        })
    }

    /// Reads `dir/run.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("run.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: is {} a `switch finetune` run?",
                path.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Refuses a training file that changed since the run started.
    pub fn check_unchanged(&self) -> Result<()> {
        if sha256_of(&self.train)? != self.train_sha256 {
            bail!(
                "{} changed since the run started: a resumed run reads the same pairs (start a \
                 new run to train on the new file)",
                self.train.display()
            );
        }
        Ok(())
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(crate::data::download::sha256_hex(&bytes))
}

/// AdamW's state as tensors by parameter name (`names`: the walk's order).
pub fn optimizer_file(adamw: &AdamW, names: &[String]) -> Result<TensorFile> {
    let mut f = TensorFile::default();
    let mut steps = BTreeMap::new();
    for (name, s) in names.iter().zip(&adamw.state) {
        if s.step == 0 {
            continue;
        }
        let (m, v) = s.host();
        let n = m.len();
        f.tensors
            .insert(format!("exp_avg.{name}"), HostTensor::f32(vec![n], m));
        f.tensors
            .insert(format!("exp_avg_sq.{name}"), HostTensor::f32(vec![n], v));
        steps.insert(name.clone(), s.step);
    }
    f.metadata
        .insert("steps".into(), serde_json::to_string(&steps)?);
    Ok(f)
}

/// Restores AdamW's state from [`optimizer_file`]'s tensors; `sizes`: each parameter's element
/// count, in the walk's order with `names`.
pub fn restore_optimizer(
    adamw: &mut AdamW,
    f: &TensorFile,
    names: &[String],
    sizes: &[usize],
) -> Result<()> {
    let steps: BTreeMap<String, u64> = serde_json::from_str(
        f.metadata
            .get("steps")
            .context("optimizer.safetensors has no `steps` metadata")?,
    )
    .context("optimizer.safetensors: `steps` is not a name -> count map")?;
    adamw.state = names
        .iter()
        .zip(sizes)
        .map(|(name, &n)| -> Result<Moments> {
            let Some(&step) = steps.get(name) else {
                return Ok(Moments::default());
            };
            let read = |key: &str| -> Result<Vec<f32>> {
                let t = f.get(&format!("{key}.{name}"))?;
                if t.numel() != n {
                    bail!(
                        "optimizer state of `{name}` has {} values, not {n}",
                        t.numel()
                    );
                }
                Ok(t.to_f32())
            };
            Ok(Moments {
                m: read("exp_avg")?,
                v: read("exp_avg_sq")?,
                step,
                device: None,
            })
        })
        .collect::<Result<_>>()?;
    if steps.keys().any(|k| !names.contains(k)) {
        bail!("optimizer.safetensors names parameters the model does not have");
    }
    Ok(())
}

/// The latest complete checkpoint of the run in `dir`: `(updates, path)`.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    let mut best = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = e?.path();
        let Some(n) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("model-step-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if path.join("state.json").is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, path));
        }
    }
    Ok(best)
}

/// Keeps the lines of `metrics.jsonl` up to update `step` (a resumed run writes what follows
/// again).
pub fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    crate::util::keep_lines(path, |l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
            .is_some_and(|s| s <= step)
    })
}
