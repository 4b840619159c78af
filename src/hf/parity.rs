//! Parity with transformers: a fixture directory (made by `tools/hf_fixtures.py`) holds a
//! checkpoint as `save_pretrained` writes it and `expected.safetensors` with transformers'
//! outputs; this replays it. Logits and the encoder's last hidden state must agree to
//! `FORWARD_TOL` relative to the largest recorded magnitude; the 10 greedy tokens, decoded
//! with the cache and without it, must be identical.

use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::Device;

use super::generate::greedy;
use super::model::HfSwitchTransformer;
use super::sparse::Grouping;
use crate::interop::parity::{FORWARD_TOL, FixtureKind, Report};
use crate::store::{TensorFile, host_f32};

/// Whether `path` is a Hugging Face fixture directory.
pub fn is_fixture(path: &Path) -> bool {
    path.is_dir() && path.join("expected.safetensors").is_file()
}

/// Replays the fixture directory `dir` on `device`.
pub fn run(dir: &Path, device: &Device) -> Result<Report> {
    let expected = TensorFile::read(&dir.join("expected.safetensors"))?;
    let model = HfSwitchTransformer::load(dir, device)?;
    let mut report = Report {
        kind: FixtureKind::HuggingFace,
        rows: Vec::new(),
    };
    let dims = |name: &str| -> Result<[usize; 2]> {
        let t = expected.get(name)?;
        match t.shape[..] {
            [b, s] => Ok([b, s]),
            _ => bail!("`{name}` has shape {:?}, expected [batch, len]", t.shape),
        }
    };
    let [b, s] = dims("input_ids")?;
    let [bd, t] = dims("decoder_input_ids")?;
    if bd != b || dims("attention_mask")? != [b, s] {
        bail!("input_ids, attention_mask and decoder_input_ids disagree on the batch");
    }
    let ids = expected.get("input_ids")?.to_i64();
    let mask = expected.get("attention_mask")?.to_i64();
    let dec = expected.get("decoder_input_ids")?.to_i64();

    let enc = model.encode(&ids, &mask, b, s)?;
    report.compare(
        "encoder_last_hidden_state",
        &host_f32(enc.hidden.clone()),
        expected.get("encoder_last_hidden_state")?,
        FORWARD_TOL,
    );
    let (logits, _) = model.decode(&dec, b, t, &enc, None, Grouping::PerSequence)?;
    report.compare(
        "logits",
        &host_f32(logits),
        expected.get("logits")?,
        FORWARD_TOL,
    );

    let want = expected.get("generated_ids")?;
    let steps = want.shape.get(1).copied().unwrap_or(1).saturating_sub(1);
    let want = want.to_i64();
    for (name, cached) in [
        ("generated_ids (cache)", true),
        ("generated_ids (no cache)", false),
    ] {
        let got = greedy(&model, &enc, steps, cached)?.concat();
        report.exact(name, &got, &want);
    }
    Ok(report)
}
