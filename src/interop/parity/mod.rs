//! Parity with labml's PyTorch code: replays a recorded fixture (format of
//! `shared/fixtures/README.md`) through this implementation and compares every tensor.
//!
//! Errors are measured as `max |ours - theirs|` and relative to the recorded tensor's largest
//! magnitude; forward values must agree to `FORWARD_TOL`, gradients to `GRAD_TOL`.
//! Discrete outputs (routes, counts, drops) must agree exactly.

mod model;
mod optimizer;
mod switch;

use std::fmt;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use crate::interop::weights::StateDict;
use crate::model::ModelConfig;
use crate::store::{HostTensor, TensorFile};

/// Forward tolerance, relative to the recorded tensor's largest magnitude.
pub(crate) const FORWARD_TOL: f64 = 1e-4;
/// Gradient tolerance, relative to the recorded tensor's largest magnitude.
pub(crate) const GRAD_TOL: f64 = 1e-3;
/// Magnitudes below this count as zero when scaling errors: a tensor that is analytically zero
/// (the gradient of the attention key bias: softmax ignores a constant added to a row) holds
/// only rounding noise in both implementations, and is compared absolutely.
pub(crate) const ZERO_FLOOR: f64 = 1e-6;

/// What a fixture records, recognised from its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixtureKind {
    /// `SwitchFeedForward` without token dropping: exact outputs and gradients.
    SwitchFeedForward,
    /// `SwitchFeedForward` with dropping: invariants, plus one recorded drop set replayed.
    SwitchFeedForwardDrop,
    /// The whole `AutoregressiveModel`: logits, activations, losses, gradients.
    Model,
    /// Noam + labml Adam + global-norm clipping over several steps.
    Optimizer,
    /// A Hugging Face Switch Transformers checkpoint directory with transformers' outputs
    /// (replayed by the `hf` module's parity).
    HuggingFace,
}

impl FixtureKind {
    /// The kind of fixture `f` holds, from its `meta` metadata.
    pub fn detect(f: &TensorFile) -> Result<Self> {
        if f.contains("step1.lr") {
            Ok(Self::Optimizer)
        } else if f.contains("input_ids") {
            Ok(Self::Model)
        } else if f.contains("run.dropped_mask") {
            Ok(Self::SwitchFeedForwardDrop)
        } else if f.contains("param.switch.weight") {
            Ok(Self::SwitchFeedForward)
        } else {
            bail!(
                "not a recognised fixture: expected `step1.lr` (optimizer), `input_ids` (model), \
                 `run.dropped_mask` (switch with dropping) or `param.switch.weight` (switch)"
            )
        }
    }
}

/// One compared tensor, or one checked invariant.
#[derive(Debug, Clone)]
pub struct Row {
    /// The tensor compared.
    pub name: String,
    /// `max |ours - theirs|`.
    pub max_abs: f64,
    /// `max_abs` relative to the recorded tensor's largest magnitude.
    pub max_rel: f64,
    /// The tolerance it is held to.
    pub tol: f64,
    /// Whether it is within the tolerance.
    pub pass: bool,
    /// For invariants and exact checks: what was checked.
    pub note: String,
}

/// The comparison of one fixture, one row per tensor.
#[derive(Debug, Clone)]
pub struct Report {
    /// What the fixture records.
    pub kind: FixtureKind,
    /// One row per compared tensor.
    pub rows: Vec<Row>,
}

impl Report {
    /// Whether every row passed.
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }

    /// Adds a row comparing `ours` with `theirs` within relative tolerance `tol`.
    pub(crate) fn compare(&mut self, name: &str, ours: &[f32], theirs: &HostTensor, tol: f64) {
        let expected = theirs.to_f64();
        if ours.len() != expected.len() {
            self.check(
                name,
                false,
                format!("size {} vs recorded {:?}", ours.len(), theirs.shape),
            );
            return;
        }
        let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let max_abs = ours
            .iter()
            .zip(&expected)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        let max_rel = max_abs / scale.max(ZERO_FLOOR);
        self.rows.push(Row {
            name: name.to_string(),
            max_abs,
            max_rel,
            tol,
            pass: max_rel <= tol && max_abs.is_finite(),
            note: String::new(),
        });
    }

    pub(crate) fn exact(&mut self, name: &str, ours: &[i64], theirs: &[i64]) {
        let mismatches = if ours.len() == theirs.len() {
            ours.iter().zip(theirs).filter(|(a, b)| a != b).count()
        } else {
            usize::MAX
        };
        let note = if mismatches == 0 {
            "exact".to_string()
        } else if mismatches == usize::MAX {
            format!("length {} vs {}", ours.len(), theirs.len())
        } else {
            format!("{mismatches} of {} differ", theirs.len())
        };
        self.check(name, mismatches == 0, note);
    }

    pub(crate) fn check(&mut self, name: &str, pass: bool, note: String) {
        self.rows.push(Row {
            name: name.to_string(),
            max_abs: 0.0,
            max_rel: 0.0,
            tol: 0.0,
            pass,
            note,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fixture kind: {:?}", self.kind)?;
        writeln!(
            f,
            "{:<64} {:>11} {:>11} {:>8}  result",
            "tensor", "max abs", "max rel", "tol"
        )?;
        for r in &self.rows {
            let status = if r.pass { "ok" } else { "FAIL" };
            if r.note.is_empty() {
                writeln!(
                    f,
                    "{:<64} {:>11.3e} {:>11.3e} {:>8.0e}  {status}",
                    r.name, r.max_abs, r.max_rel, r.tol
                )?;
            } else {
                writeln!(f, "{:<64} {:>32}  {status} ({})", r.name, "", r.note)?;
            }
        }
        let failed = self.rows.iter().filter(|r| !r.pass).count();
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        write!(
            f,
            "fixture: {verdict} ({failed} of {} rows failed)",
            self.rows.len()
        )
    }
}

/// Runs the fixture in `file` on `device` (autodiff is enabled on it as needed).
pub fn run(file: &TensorFile, device: &Device) -> Result<Report> {
    let kind = FixtureKind::detect(file)?;
    let mut report = Report {
        kind,
        rows: Vec::new(),
    };
    let device = device.clone().autodiff();
    match kind {
        FixtureKind::SwitchFeedForward => switch::switch_exact(file, &device, &mut report)?,
        FixtureKind::SwitchFeedForwardDrop => switch::switch_drop(file, &device, &mut report)?,
        FixtureKind::Model => model::model(file, &device, &mut report)?,
        FixtureKind::Optimizer => optimizer::optimizer(file, &device, &mut report)?,
        FixtureKind::HuggingFace => {
            bail!("a Hugging Face fixture is a directory, not one file")
        }
    }
    Ok(report)
}

// ---- helpers shared by the fixtures' replays ----------------------------------------------

pub(super) fn meta_usize(meta: &Value, key: &str) -> Result<usize> {
    meta.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .with_context(|| format!("fixture metadata has no integer `{key}`"))
}

pub(super) fn meta_f64(meta: &Value, key: &str) -> Result<f64> {
    meta.get(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("fixture metadata has no number `{key}`"))
}

pub(super) fn meta_bool(meta: &Value, key: &str) -> Result<bool> {
    meta.get(key)
        .and_then(Value::as_bool)
        .with_context(|| format!("fixture metadata has no boolean `{key}`"))
}

pub(super) fn switch_config(meta: &Value) -> Result<ModelConfig> {
    Ok(ModelConfig {
        n_vocab: 1,
        d_model: meta_usize(meta, "d_model")?,
        heads: 1,
        d_ff: meta_usize(meta, "d_ff")?,
        n_layers: 1,
        n_experts: meta_usize(meta, "n_experts")?,
        capacity_factor: meta_f64(meta, "capacity_factor")?,
        drop_tokens: meta_bool(meta, "drop_tokens")?,
        is_scale_prob: meta_bool(meta, "is_scale_prob")?,
        ..Default::default()
    })
}

pub(super) fn as_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// Reorders batch-major rows (`b * seq + s`) to labml's sequence-major order (`s * batch + b`).
pub(super) fn to_seq_major(data: &[f32], batch: usize, seq: usize) -> Vec<f32> {
    let inner = data.len() / (batch * seq);
    let mut out = Vec::with_capacity(data.len());
    for s in 0..seq {
        for b in 0..batch {
            let r = b * seq + s;
            out.extend_from_slice(&data[r * inner..(r + 1) * inner]);
        }
    }
    out
}

pub(super) fn to_seq_major_idx(data: &[usize], batch: usize, seq: usize) -> Vec<i64> {
    let f: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    to_seq_major(&f, batch, seq)
        .into_iter()
        .map(|x| x as i64)
        .collect()
}

pub(super) fn leaf(t: &HostTensor, device: &Device) -> Result<Tensor<2>> {
    let [s, b, d] = <[usize; 3]>::try_from(t.shape.as_slice())
        .map_err(|_| anyhow::anyhow!("input `x` must be [seq, batch, d], got {:?}", t.shape))?;
    Ok(Tensor::from_data(TensorData::new(t.to_f32(), [s * b, d]), device).require_grad())
}

pub(super) fn compare_grads(
    report: &mut Report,
    ours: &StateDict,
    file: &TensorFile,
    prefix: &str,
) {
    for (name, theirs) in file.with_prefix(prefix) {
        if name == "x" {
            continue;
        }
        match ours.get(&name) {
            Some(t) => report.compare(&format!("{prefix}{name}"), &t.to_f32(), &theirs, GRAD_TOL),
            None => report.check(
                &format!("{prefix}{name}"),
                false,
                "no gradient reached this parameter".into(),
            ),
        }
    }
}
