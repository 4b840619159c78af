//! A run directory and its files, in one place:
//!
//! ```text
//! runs/NAME/config.toml                 the configuration used
//! runs/NAME/vocab.json                  the character vocabulary
//! runs/NAME/metrics.jsonl               one JSON object per line (train::metrics)
//! runs/NAME/checkpoints/step-NNNNNNN/   the last few checkpoints
//! runs/NAME/best/                       the checkpoint with the best validation loss
//! ```

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::config::RunConfig;
use super::metrics::MetricsLine;
use crate::data::Vocab;
use crate::model::SwitchTransformer;
use crate::util::write_atomic;
use burn::tensor::Device;

/// The text a run was trained on (`data.json`): its path, size and SHA-256, so that `eval` and
/// `--resume` find it without `--data`, and notice when it has changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRecord {
    /// The file, as an absolute path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
}

impl DataRecord {
    /// The record of the file at `path` (read and hashed now).
    pub(crate) fn of(path: &Path) -> Result<Self> {
        Ok(Self::of_bytes(path, &crate::data::read_data_file(path)?))
    }

    /// The record of the file at `path` whose contents are `bytes` (already read).
    pub fn of_bytes(path: &Path, bytes: &[u8]) -> Self {
        Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            bytes: bytes.len() as u64,
            sha256: crate::data::download::sha256_hex(bytes),
        }
    }
}

/// The directory of one training run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// The run in `path` (nothing is read or created).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The directory, for printing.
    pub fn display(&self) -> std::path::Display<'_> {
        self.0.display()
    }

    /// `config.toml`.
    pub(crate) fn config_path(&self) -> PathBuf {
        self.0.join("config.toml")
    }

    /// `vocab.json`.
    pub(crate) fn vocab_path(&self) -> PathBuf {
        self.0.join("vocab.json")
    }

    /// `metrics.jsonl`.
    pub(crate) fn metrics_path(&self) -> PathBuf {
        self.0.join("metrics.jsonl")
    }

    /// `data.json`: the [`DataRecord`] of the run's text.
    pub(crate) fn data_record_path(&self) -> PathBuf {
        self.0.join("data.json")
    }

    /// Records the run's text.
    pub fn write_data_record(&self, record: &DataRecord) -> Result<()> {
        let json = serde_json::to_string_pretty(record)?;
        write_atomic(&self.data_record_path(), json.as_bytes())
    }

    /// The recorded text, if the run has a record (runs of earlier builds do not).
    pub(crate) fn read_data_record(&self) -> Result<Option<DataRecord>> {
        let path = self.data_record_path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let record = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt: remove it and give --data", path.display()))?;
        Ok(Some(record))
    }

    /// The text file to use with this run: `given` (`--data`) when named, else the recorded
    /// one; `None` when neither exists. The recorded file must still hold the same text (its
    /// SHA-256): a changed or missing file is an error unless `--data` names it explicitly
    /// (then a differing text gets a note).
    pub fn resolve_data(&self, given: Option<&Path>) -> Result<Option<PathBuf>> {
        let record = self.read_data_record()?;
        match (given, record) {
            (Some(path), Some(r)) => {
                if path.is_file() && DataRecord::of(path)?.sha256 != r.sha256 {
                    tracing::info!(
                        "{} is not the text {self} was trained on ({}): using it, as \
                         --data says",
                        path.display(),
                        r.path.display()
                    );
                }
                Ok(Some(path.to_path_buf()))
            }
            (Some(path), None) => Ok(Some(path.to_path_buf())),
            (None, Some(r)) => {
                if !r.path.is_file() {
                    bail!(
                        "{self} was trained on {}, which is gone: give its text with --data",
                        r.path.display()
                    );
                }
                let now = DataRecord::of(&r.path)?;
                if now.sha256 != r.sha256 {
                    bail!(
                        "{} has changed since {self} was trained on it (SHA-256 {} then, {} \
                         now): give --data FILE to use a text anyway",
                        r.path.display(),
                        &r.sha256[..12],
                        &now.sha256[..12]
                    );
                }
                Ok(Some(r.path))
            }
            (None, None) => Ok(None),
        }
    }

    /// `checkpoints/`.
    pub(crate) fn checkpoints(&self) -> PathBuf {
        self.0.join("checkpoints")
    }

    /// `best/`.
    pub(crate) fn best(&self) -> PathBuf {
        self.0.join("best")
    }

    /// Whether a run was started here (a configuration or checkpoints exist).
    pub(crate) fn holds_run(&self) -> bool {
        self.config_path().exists() || self.checkpoints().exists()
    }

    /// Empties a run that has no checkpoint (neither in checkpoints/ nor in best/) so that it
    /// can start again from step 0 under the same name (`switch train --restart`): its
    /// configuration, vocabulary, data record and metrics are removed, other files are left.
    /// Refused while another process trains it (its lock) and when it has a checkpoint, which is
    /// never removed: that run is continued with `--resume`.
    pub fn clear_for_restart(&self) -> Result<()> {
        if !self.holds_run() {
            bail!("{self} holds no run to restart: start one with `switch train --name NAME`");
        }
        let lock = super::lock::RunLock::acquire(&self.0)?;
        self.tidy()?;
        if let Some(c) = self.latest_checkpoint().or_else(|| {
            let best = self.best();
            best.exists().then_some(best)
        }) {
            bail!(
                "{self} has a checkpoint ({}), which --restart never removes: continue the run \
                 with `switch train --resume {self}` (train.lr and train.warmup may change), or \
                 start another with --name",
                c.display()
            );
        }
        for file in [
            self.config_path(),
            self.vocab_path(),
            self.metrics_path(),
            self.data_record_path(),
        ] {
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", file.display()));
                }
                _ => {}
            }
        }
        // Only unfinished checkpoint writes can be left in checkpoints/ (no checkpoint loads).
        if self.checkpoints().exists() {
            std::fs::remove_dir_all(self.checkpoints())
                .with_context(|| format!("cannot remove {}", self.checkpoints().display()))?;
        }
        drop(lock);
        Ok(())
    }

    /// Creates the directory and writes the run's configuration and vocabulary.
    pub(crate) fn create(&self, config: &RunConfig, vocab: &Vocab) -> Result<()> {
        std::fs::create_dir_all(&self.0)
            .with_context(|| format!("cannot create the run directory {self}"))?;
        write_atomic(&self.config_path(), config.to_toml().as_bytes())?;
        write_atomic(&self.vocab_path(), vocab.to_json().as_bytes())
    }

    /// The run's configuration. Every key must be there (a key missing from a run's
    /// configuration would silently take its default): a cut or edited file is an error
    /// naming the missing keys.
    pub fn read_config(&self) -> Result<RunConfig> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))
            .with_context(|| format!("{self} is not a run directory"))?;
        let config = RunConfig::from_toml(&text)
            .with_context(|| format!("invalid config file {}", path.display()))
            .with_context(|| format!("{self} is not a run directory"))?;
        let missing = super::config::missing_keys(&text)?;
        if !missing.is_empty() {
            bail!(
                "{} lacks {} (cut short or edited?): a run's configuration must hold every key \
                 it was made with; restore the file",
                path.display(),
                missing.join(", ")
            );
        }
        Ok(config)
    }

    /// Replaces the run's configuration (atomically).
    pub(crate) fn write_config(&self, config: &RunConfig) -> Result<()> {
        write_atomic(&self.config_path(), config.to_toml().as_bytes())
    }

    /// Finishes or undoes what an interrupted checkpoint write or removal left behind (in
    /// `checkpoints/` and beside `best/`): see [`checkpoint::tidy`].
    pub(crate) fn tidy(&self) -> Result<()> {
        checkpoint::tidy(&self.checkpoints())?;
        checkpoint::tidy(&self.0)
    }

    /// The run's vocabulary.
    pub(crate) fn read_vocab(&self) -> Result<Vocab> {
        let text = std::fs::read_to_string(self.vocab_path())
            .with_context(|| format!("{self} has no vocab.json"))?;
        Vocab::from_json(&text)
    }

    /// The complete checkpoints, oldest first, with their steps.
    pub fn checkpoint_list(&self) -> Vec<(u64, PathBuf)> {
        checkpoint::list(&self.checkpoints())
    }

    /// The newest checkpoint.
    pub fn latest_checkpoint(&self) -> Option<PathBuf> {
        self.checkpoint_list().pop().map(|(_, dir)| dir)
    }

    /// The checkpoint to run inference from: `best/` if present, else the newest.
    pub(crate) fn inference_checkpoint(&self) -> Result<PathBuf> {
        self.tidy()?;
        if self.best().is_dir() {
            return Ok(self.best());
        }
        self.latest_checkpoint()
            .with_context(|| format!("{self} has no checkpoint"))
    }

    /// Every line of `metrics.jsonl`; a line that does not parse is an error naming it.
    pub fn read_metrics(&self) -> Result<Vec<MetricsLine>> {
        if !self.0.is_dir() {
            bail!("{self} is not a directory");
        }
        let path = self.metrics_path();
        let bytes = std::fs::read(&path).with_context(|| {
            format!("{self} has no metrics.jsonl: is it a run directory written by `switch train`?")
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            anyhow::anyhow!(
                "{} is damaged: line {line} is not UTF-8 text (byte {at}); `switch train` \
                 writes JSON lines: restore it from a copy or remove that line",
                path.display()
            )
        })?;
        let mut lines = Vec::new();
        let n = text.lines().count();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match MetricsLine::parse(line) {
                Ok(l) => lines.push(l),
                // A last line without its newline was cut by a kill mid-write: the end.
                Err(e)
                    if i + 1 == n
                        && !text.ends_with('\n')
                        && serde_json::from_str::<serde_json::Value>(line).is_err() =>
                {
                    tracing::warn!(
                        "{} line {} is incomplete ({e}); reading up to the line before",
                        path.display(),
                        i + 1
                    );
                }
                Err(e) => return Err(e.context(format!("{} line {}", path.display(), i + 1))),
            }
        }
        Ok(lines)
    }

    /// Appends `line` to `metrics.jsonl`.
    pub(crate) fn append_metrics(&self, line: &MetricsLine) -> Result<()> {
        let path = self.metrics_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        // One write of the whole line, so that a kill never leaves half a line behind.
        let text = format!("{}\n", line.to_json());
        f.write_all(text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Keeps only the metric lines up to `step` (a resumed run rewrites what follows); lines
    /// that do not parse go too.
    pub(crate) fn truncate_metrics(&self, step: u64) -> Result<()> {
        crate::util::keep_lines(&self.metrics_path(), |l| {
            MetricsLine::parse(l).is_ok_and(|m| m.step() <= step)
        })
    }
}

impl fmt::Display for RunDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())
    }
}

/// Loads the model of a run for inference: `best/` if present, else the latest checkpoint.
pub fn load_run_model(
    run_dir: &Path,
    device: &Device,
) -> Result<(RunConfig, Vocab, SwitchTransformer)> {
    let run_dir = RunDir::new(run_dir);
    let config = run_dir.read_config()?;
    let vocab = run_dir.read_vocab()?;
    let dir = run_dir.inference_checkpoint()?;
    let mut model =
        crate::interop::weights::load_model(&dir.join("model.safetensors"), &config.model, device)
            .with_context(|| format!("checkpoint {} is unusable", dir.display()))?;
    model.set_training(false);
    Ok((config, vocab, model))
}
